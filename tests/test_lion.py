"""inner.optimizer = "lion": the update rule against a naive per-tensor loop, its state through a
checkpoint, and DiLoCo with Lion inner steps over real Gloo."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dilo.config import InnerConfig
from dilo.lion import Lion, build_lion
from dilo.metrics import read_jsonl
from tests.conftest import tiny_config, train_threads


def _grads(params: list[torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_lion_matches_the_naive_rule() -> None:
    """c = b1 m + (1 - b1) g; p <- p (1 - lr wd) - lr sign(c); m <- b2 m + (1 - b2) g, 5 steps,
    weight decay on the first group only; and a state_dict round trip continues identically."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    ref = [p.detach().clone().double() for p in params]
    moms = [torch.zeros_like(r) for r in ref]
    opt = Lion([{"params": params[:1], "weight_decay": 0.3}, {"params": params[1:]}], lr=0.01, betas=(0.9, 0.99))
    for step in range(5):
        _grads(params, step)
        opt.step()
        for i, (r, p) in enumerate(zip(ref, params)):
            g = p.grad.double()
            c = 0.9 * moms[i] + 0.1 * g
            wd = 0.3 if i == 0 else 0.0
            ref[i] = r * (1 - 0.01 * wd) - 0.01 * torch.sign(c)
            moms[i] = 0.99 * moms[i] + 0.01 * g
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=1e-6)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = Lion([{"params": twin_params[:1], "weight_decay": 0.3}, {"params": twin_params[1:]}], lr=0.01)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for ps, o in ((params, opt), (twin_params, twin)):
        _grads(ps, 9)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


def test_lion_groups_decay_matrices_only(tmp_path: Path, corpus_dir: Path) -> None:
    from dilo.model import build_model

    model = build_model(tiny_config(tmp_path, corpus_dir).model, 0)
    opt = build_lion(model, InnerConfig(optimizer="lion", lr=1e-4, weight_decay=1.0))
    decay, plain = opt.param_groups
    assert decay["weight_decay"] == 1.0 and all(p.dim() >= 2 for p in decay["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])


def test_diloco_with_lion_inner_steps_over_gloo(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, steps=8, inner={"optimizer": "lion", "lr": 3e-4, "warmup_steps": 2})
    summaries = train_threads(cfg, 2)
    assert all(s["val_loss"] < s["initial_val_loss"] for s in summaries)
    logs = [read_jsonl(tmp_path / "logs" / f"worker{w}.jsonl") for w in range(2)]
    hashes = [[r["anchor_hash"] for r in log if r["event"] == "round"] for log in logs]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2
