"""The whole worker loop, 2 and 4 workers as threads over real Gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dilo
from dilo.metrics import read_jsonl
from dilo.state import load_worker_state, rounds_of
from tests.conftest import tiny_config, train_threads


def _rounds(run_dir: Path, rank: int) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "logs" / f"worker{rank}.jsonl") if r["event"] == "round"]


def _final_params(run_dir: Path, rank: int = 0) -> list[torch.Tensor]:
    ckpt = run_dir / "checkpoints"
    return load_worker_state(ckpt, rounds_of(ckpt, f"worker{rank}")[-1], f"worker{rank}")["params"]


@pytest.mark.parametrize("n", [2, 4])
def test_diloco_workers_keep_bit_identical_anchors(tmp_path: Path, corpus_dir: Path, n: int) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, steps=16)
    summaries = train_threads(cfg, n)
    assert all(s == summaries[0] for s in summaries)  # the summary is agreed, not per-worker
    logs = [_rounds(tmp_path, r) for r in range(n)]
    assert [r["round"] for r in logs[0]] == [1, 2, 3, 4]
    for rnd in range(4):
        hashes = {log[rnd]["anchor_hash"] for log in logs}
        assert len(hashes) == 1, f"anchors diverged in round {rnd + 1}: {hashes}"
        assert all(log[rnd]["committed"] and log[rnd]["participants"] == n for log in logs)
    s = summaries[0]
    assert s["rounds_committed"] == 4 and s["tokens"] == 16 * n * 4 * 32
    assert s["val_loss"] < logs[0][0]["val_loss"]  # learning, even this briefly
    assert s["comm_reduction"] == pytest.approx(4.0, rel=0.01)  # H=4: a quarter of DDP's traffic
    for rank in range(n):  # every worker ends on the anchor
        assert all(torch.equal(a, b) for a, b in zip(_final_params(tmp_path, 0), _final_params(tmp_path, rank)))


def test_h1_fedavg_with_sgd_equals_ddp(tmp_path: Path, corpus_dir: Path) -> None:
    common = {"steps": 6, "inner": {"optimizer": "sgd", "lr": 0.05, "warmup_steps": 0, "grad_clip": 0.0}}
    fedavg = tiny_config(tmp_path / "fedavg", corpus_dir, outer={"kind": "fedavg", "inner_steps": 1}, **common)
    ddp = tiny_config(tmp_path / "ddp", corpus_dir, outer={"kind": "ddp"}, sync_every_ddp_eval=1, **common)
    train_threads(fedavg, 2)
    train_threads(ddp, 2)
    a, b = _final_params(tmp_path / "fedavg"), _final_params(tmp_path / "ddp")
    moved = max(float((x - y).abs().max()) for x, y in zip(a, _initial(fedavg)))
    assert moved > 1e-3  # the comparison is not between two untouched models
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def _initial(cfg) -> list[torch.Tensor]:
    from dilo.model import build_model
    from dilo.outer.base import params_of

    return [p.detach() for p in params_of(build_model(cfg.model, cfg.seed))]


def test_ddp_sends_every_step(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, outer={"kind": "ddp"}, sync_every_ddp_eval=4, steps=8)
    s = train_threads(cfg, 2)[0]
    assert s["strategy"] == "ddp" and s["rounds"] == 2
    # DDP's own traffic is the baseline it defines (plus two tiny tail/eval exchanges per round)
    assert s["comm_reduction"] == pytest.approx(1.0, rel=0.01)
    logs = [_rounds(tmp_path, r) for r in range(2)]
    assert logs[0][-1]["anchor_hash"] == logs[1][-1]["anchor_hash"]


@pytest.mark.parametrize(
    "codec", [{"kind": "none"}, {"kind": "topk", "fraction": 0.1}, {"kind": "int4"}], ids=lambda c: c["kind"]
)
def test_resume_is_bit_identical(tmp_path: Path, corpus_dir: Path, codec: dict) -> None:
    """Including error-feedback residuals (top-k) and the shard owners' residuals (int4 + feedback)."""
    if codec["kind"] == "int4":
        codec = {**codec, "error_feedback": True}
    full = tiny_config(tmp_path / "full", corpus_dir, steps=12, checkpoint={"every": 1}, codec=codec)
    train_threads(full, 2)
    part = tiny_config(tmp_path / "part", corpus_dir, steps=12, checkpoint={"every": 1}, codec=codec)
    first = train_threads(part, 2, max_rounds=1)
    assert first[0]["stopped"] and first[0]["steps"] == 4
    resumed = tiny_config(tmp_path / "part", corpus_dir, steps=12, checkpoint={"every": 1, "resume": True}, codec=codec)
    second = train_threads(resumed, 2)
    assert second[0]["steps"] == 12 and not second[0]["stopped"]
    for rank in range(2):
        a, b = _rounds(tmp_path / "full", rank), _rounds(tmp_path / "part", rank)
        assert [r["anchor_hash"] for r in a] == [r["anchor_hash"] for r in b]
        assert [r["loss"] for r in a] == [r["loss"] for r in b]
        assert all(
            torch.equal(x, y)
            for x, y in zip(_final_params(tmp_path / "full", rank), _final_params(tmp_path / "part", rank))
        )


def test_stop_event_stops_all_workers_on_the_same_round(tmp_path: Path, corpus_dir: Path) -> None:
    import threading

    from dilo.train import train
    from tests.conftest import run_workers

    cfg = tiny_config(tmp_path, corpus_dir, steps=40)
    stops = [threading.Event(), threading.Event()]
    stops[1].set()  # only worker 1 was asked; worker 0 learns it through the sync
    out = run_workers(lambda w: train(cfg, dilo.init(cfg, placement=w), stop=stops[w.rank]), 2)
    assert all(s["stopped"] and s["rounds"] == 1 for s in out)
    assert rounds_of(tmp_path / "checkpoints", "worker0") == [1] == rounds_of(tmp_path / "checkpoints", "worker1")


def test_noniid_token_weighted_bf16_run(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        corpus_dir,
        data={"islands": "by_source"},
        inner={"precision": "bf16", "grad_accum": 2},
        outer={"kind": "diloco", "inner_steps": 4, "weighting": "tokens"},
        log={"plot": True, "progress": False},
    )
    s = train_threads(cfg, 2)[0]
    assert s["rounds_committed"] == 3 and s["tokens"] == 12 * 2 * 2 * 4 * 32
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "summary.json").read_text())["val_loss"] == s["val_loss"]


def test_workers_with_different_configs_refuse_to_train(tmp_path: Path, corpus_dir: Path) -> None:
    from dilo.errors import DiloError
    from dilo.train import train
    from tests.conftest import run_workers

    cfgs = [tiny_config(tmp_path, corpus_dir), tiny_config(tmp_path, corpus_dir, inner={"lr": 0.1})]
    with pytest.raises(DiloError, match="run a different configuration"):
        run_workers(lambda w: train(cfgs[w.rank], dilo.init(cfgs[w.rank], placement=w)), 2)
