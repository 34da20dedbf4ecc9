"""inner.optimizer = "lion": the update rule against a naive per-tensor loop, its state through a
checkpoint, and DiLoCo with Lion inner steps over real Gloo."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import dilo
from dilo.config import InnerConfig
from dilo.lion import Lion, build_lion
from dilo.metrics import read_jsonl
from dilo.worlds import Placement
from tests.conftest import run_workers, tiny_config, train_threads


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


@pytest.mark.parametrize("vote", ["majority", "mean"])
def test_distributed_lion_votes_on_update_signs_over_gloo(tmp_path: Path, corpus_dir: Path, vote: str) -> None:
    """3 Gloo workers, DDP with outer.vote: each computes its Lion sign from its own gradient and
    momentum, the signs are all-gathered at 1 bit per parameter, and every worker applies the
    majority (or the mean); 4 steps equal a naive loop over the 3 workers' momenta, and each step
    sends (workers - 1) x ceil(parameters / 8) bytes."""
    n_workers, lr, steps = 3, 0.01, 4
    cfg = tiny_config(tmp_path, corpus_dir, steps=steps, outer={"kind": "ddp", "vote": vote},
                      inner={"optimizer": "lion", "lr": lr, "warmup_steps": 1})  # fmt: skip
    torch.manual_seed(0)
    start = [p.detach().clone() for p in torch.nn.Linear(6, 2).parameters()]

    def data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 * rank + step)
        return torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)

    def worker(p: Placement) -> tuple[list[torch.Tensor], list[int]]:
        model = torch.nn.Linear(6, 2)
        with torch.no_grad():
            for q, v in zip(model.parameters(), start):
                q.copy_(v)
        sent = []
        with dilo.init(cfg, placement=p) as world:
            opt = Lion(model.parameters(), lr=lr, betas=(0.9, 0.99))
            outer = dilo.wrap(model, opt, world)
            outer.start()
            for step in range(steps):
                before = world.counter.sent
                x, y = data(p.rank, step)
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                sent.append(world.counter.sent - before)
                outer.step()
            outer.close()
        return [q.detach().clone() for q in model.parameters()], sent

    out = run_workers(worker, n_workers)
    ref = [s.clone().double() for s in start]
    moms = [[torch.zeros_like(r) for r in ref] for _ in range(n_workers)]
    for step in range(steps):
        total = [torch.zeros_like(r) for r in ref]
        for rank in range(n_workers):
            w = [r.clone().float().requires_grad_(True) for r in ref]
            x, y = data(rank, step)
            torch.nn.functional.mse_loss(x @ w[0].T + w[1], y).backward()
            for i, q in enumerate(w):
                g = q.grad.double()
                c = 0.9 * moms[rank][i] + 0.1 * g
                total[i] += torch.where(c < 0, -1.0, 1.0)
                moms[rank][i] = 0.99 * moms[rank][i] + 0.01 * g
        ref = [r - lr * (t.sign() if vote == "majority" else t / n_workers) for r, t in zip(ref, total)]
    for params, _ in out:
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.double(), r, rtol=0, atol=1e-6)
    assert all(s == (n_workers - 1) * math.ceil(14 / 8) for _, sent in out for s in sent[1:])


def test_distributed_lion_trains_and_is_validated(tmp_path: Path, corpus_dir: Path) -> None:
    """The worker loop with outer.vote = majority: the loss goes down and the workers stay
    identical; outer.vote without Lion is refused before anything starts."""
    from dilo.errors import ConfigError

    cfg = tiny_config(tmp_path, corpus_dir, steps=8, outer={"kind": "ddp", "vote": "majority"},
                      inner={"optimizer": "lion", "lr": 3e-4, "warmup_steps": 2})  # fmt: skip
    summaries = train_threads(cfg, 2)
    assert all(s["val_loss"] < s["initial_val_loss"] for s in summaries)
    assert summaries[0]["val_loss"] == summaries[1]["val_loss"]
    with pytest.raises(ConfigError, match="inner.optimizer='lion'"):
        tiny_config(tmp_path, corpus_dir, outer={"kind": "ddp", "vote": "mean"})
