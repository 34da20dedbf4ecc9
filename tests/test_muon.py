"""inner.optimizer = "muon" (MuLoCo): torch's Muon on the hidden matrices and AdamW on the rest as
one optimizer, against the two torch optimizers run side by side; its state through a checkpoint;
training under DiLoCo, FedAvg and DDP over real Gloo, async local SGD in the simulator and
gossip over real ZeroMQ peers."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dilo.config import InnerConfig
from dilo.errors import ConfigError
from dilo.metrics import read_jsonl
from dilo.model import build_model
from dilo.muon import build_muon
from tests.conftest import tiny_config, train_threads

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")

INNER = InnerConfig(optimizer="muon", lr=0.01, weight_decay=0.1)


def _model(tmp_path: Path, corpus: Path) -> torch.nn.Module:
    return build_model(tiny_config(tmp_path, corpus).model, 0)


def _grads(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_muon_with_adamw_is_torchs_muon_and_adamw_side_by_side(tmp_path: Path, corpus_dir: Path) -> None:
    """Hidden matrices (attention, MLP) go to Muon, embeddings / biases / norms to AdamW (matrices
    decayed, the rest not); 4 steps equal those of torch.optim.Muon and torch.optim.AdamW on copies."""
    model, ref = _model(tmp_path, corpus_dir), _model(tmp_path, corpus_dir)
    opt = build_muon(model, INNER)
    named = dict(ref.named_parameters())
    hidden = [p for n, p in named.items() if p.dim() == 2 and "emb" not in n]
    assert len(hidden) == 4 and all("blocks.0" in n for n, p in named.items() if p.dim() == 2 and "emb" not in n)
    muon = torch.optim.Muon(hidden, lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")  # fmt: skip
    rest = [p for p in named.values() if all(p is not h for h in hidden)]
    adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.95),
    )  # fmt: skip
    for step in range(4):
        _grads(model, step)
        _grads(ref, step)
        opt.step()
        muon.step()
        adamw.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _model(tmp_path, corpus_dir).parameters()))


def test_muon_state_survives_a_state_dict_round_trip(tmp_path: Path, corpus_dir: Path) -> None:
    """3 steps, save, load into a fresh optimizer over a copy of the model, 2 more steps: the same
    parameters as 5 uninterrupted steps (Muon's momentum and AdamW's moments came back)."""
    a = _model(tmp_path, corpus_dir)
    opt = build_muon(a, INNER)
    for step in range(3):
        _grads(a, step)
        opt.step()
    b = _model(tmp_path, corpus_dir)
    with torch.no_grad():
        for p, q in zip(b.parameters(), a.parameters()):
            p.copy_(q)
    twin = build_muon(b, INNER)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint: torch hands out references
    for step in range(3, 5):
        for m, o in ((a, opt), (b, twin)):
            _grads(m, step)
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("outer", [{"kind": "diloco", "inner_steps": 4}, {"kind": "fedavg", "inner_steps": 4},
                                   {"kind": "ddp"}], ids=lambda o: o["kind"])  # fmt: skip
def test_muon_trains_under_every_outer_strategy(tmp_path: Path, corpus_dir: Path, outer: dict) -> None:
    """2 Gloo workers with Muon inner steps: the loss goes down, both end on the same parameters."""
    cfg = tiny_config(
        tmp_path, corpus_dir, steps=8, outer=outer, inner={"optimizer": "muon", "lr": 0.01, "warmup_steps": 2}
    )
    summaries = train_threads(cfg, 2)
    assert all(s["val_loss"] < s["initial_val_loss"] for s in summaries)
    assert summaries[0]["val_loss"] == summaries[1]["val_loss"]
    if outer["kind"] != "ddp":
        logs = [read_jsonl(tmp_path / "logs" / f"worker{w}.jsonl") for w in range(2)]
        hashes = [[r["anchor_hash"] for r in log if r["event"] == "round"] for log in logs]
        assert hashes[0] == hashes[1]


def test_muon_trains_under_async_local_sgd(tmp_path: Path, corpus_dir: Path) -> None:
    """Async local SGD (delayed Nesterov, the simulator's coordinator and 3 workers at speeds 1,
    1/2, 1/4) with Muon inner steps: every push is applied and the loss goes down."""
    from dilo.sim import simulate

    cfg = tiny_config(
        tmp_path, corpus_dir, workers=3, steps=16, outer={"kind": "async", "inner_steps": 4, "lr": 0.5},
        membership={"kind": "coordinator", "heartbeat_timeout_s": 2.0}, heterogeneity={"slowdown": [1, 2, 4]},
        inner={"optimizer": "muon", "lr": 0.01, "warmup_steps": 2},
    )  # fmt: skip
    simulate(cfg, timeout_s=120)
    logs = [read_jsonl(tmp_path / "logs" / f"worker-sim{w}.jsonl") for w in range(3)]
    pushes = [r for log in logs for r in log if r["event"] == "round"]
    assert len(pushes) >= 3 and all(r["committed"] for r in pushes)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["val_loss"] < summary["initial_val_loss"]


def test_muon_trains_under_gossip(tmp_path: Path, corpus_dir: Path) -> None:
    """Ring gossip between 3 workers (threads, real ZeroMQ peers on loopback) with Muon inner steps
    and a final merge: the loss goes down and every worker ends on the same parameters."""
    from tests.test_gossip import _cfg, _rounds, _run

    cfg = _cfg(tmp_path, corpus_dir, 3, {"final_merge": True}, inner={"optimizer": "muon", "lr": 0.01})
    summaries = _run(cfg, [0, 1, 2])
    assert all(s["val_loss"] < s["initial_val_loss"] for s in summaries.values())
    assert len({_rounds(tmp_path, f"rank{r}")[-1]["anchor_hash"] for r in range(3)}) == 1


def test_muon_resumes_bit_identically(tmp_path: Path, corpus_dir: Path) -> None:
    outer = {"kind": "diloco", "inner_steps": 4}
    inner = {"optimizer": "muon", "lr": 0.01, "warmup_steps": 2}
    full = train_threads(tiny_config(tmp_path / "full", corpus_dir, steps=8, outer=outer, inner=inner), 2)
    part = tiny_config(tmp_path / "part", corpus_dir, steps=8, outer=outer, inner=inner, checkpoint={"every": 1})
    train_threads(part, 2, max_rounds=1)
    resumed = tiny_config(tmp_path / "part", corpus_dir, steps=8, outer=outer, inner=inner,
                          checkpoint={"every": 1, "resume": True})  # fmt: skip
    assert train_threads(resumed, 2)[0]["val_loss"] == full[0]["val_loss"]


def test_muon_config_is_validated(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(ConfigError, match="island_shard='fsdp'"):
        tiny_config(tmp_path, corpus_dir, workers=2, inner={"optimizer": "muon"},
                    transport={"island_ranks": 2, "island_shard": "fsdp"})  # fmt: skip
    with pytest.raises(ConfigError, match="muon_exclude"):
        tiny_config(tmp_path, corpus_dir, inner={"optimizer": "muon", "muon_exclude": "("})
    with pytest.raises(ConfigError, match="no weight matrix"):
        build_muon(_model(tmp_path, corpus_dir), InnerConfig(optimizer="muon", muon_exclude="."))
