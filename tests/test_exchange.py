"""Compressed exchanges over real Gloo: every codec, every collective, 4 workers as threads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dilo.compress import pack
from dilo.config import CodecConfig
from dilo.outer.base import Tail
from dilo.outer.exchange import Exchange
from dilo.transport.base import ring_all_reduce_bytes
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from tests.conftest import run_workers, tiny_config, train_threads

SHAPES = [torch.Size([300, 70]), torch.Size([70]), torch.Size([64, 64]), torch.Size([5])]
NAMES = ["blocks.0.fc.weight", "blocks.0.fc.bias", "tok_emb.weight", "ln_f.weight"]

CODECS = {
    "none": ({}, "all_reduce", 1e-6),
    "fp16": ({}, "reduce_scatter", 2e-3),
    "bf16": ({}, "reduce_scatter", 1.5e-2),
    "int8": ({}, "reduce_scatter", 2e-2),
    "int4": ({}, "reduce_scatter", 0.3),
    "int2": ({}, "reduce_scatter", 0.7),  # quantized twice: each worker's share, then the mean shard
    "ternary": (
        {"error_feedback": False},
        "reduce_scatter",
        2.0,
    ),  # TernGrad's draws: one round is noisier than its signal (unbiased)
    "topk": ({"fraction": 0.1}, "all_gather", None),
    "dct": ({"fraction": 0.1}, "all_gather", None),
    "randomk": ({"fraction": 0.1}, "all_reduce", None),
    "sign": ({}, "all_gather", None),
    "powersgd": ({"rank": 4}, "powersgd", None),
}


def _delta(rank: int, round_idx: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + round_idx)
    return [torch.randn(s, generator=g) * (1 + rank) for s in SHAPES]


def _exchange_worker(world, spec: CodecConfig, rounds: int = 2, weights=None, skip_rank=None):
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)
    ex = Exchange(t, NAMES, SHAPES, spec, seed=7)
    out = []
    for r in range(rounds):
        w = 1.0 if weights is None else weights[world.rank]
        contributes = world.rank != skip_rank
        tail = Tail(weight=w, contributes=contributes, stop=False, tokens=1).tensor()
        before = t.counter.sent
        res = ex.mean(_delta(world.rank, r), tail, r)
        out.append((res.mean, t.counter.sent - before))
    return ex, out


@pytest.mark.parametrize("kind", list(CODECS))
def test_every_codec_gives_every_worker_the_same_mean(kind: str) -> None:
    extra, collective, tol = CODECS[kind]
    spec = CodecConfig(kind=kind, **extra)
    n = 4
    results = run_workers(lambda w: _exchange_worker(w, spec), n)
    assert results[0][0].groups[0].kind == collective
    for r in range(2):
        means = [res[1][r][0] for res in results]
        for other in means[1:]:
            assert all(torch.equal(a, b) for a, b in zip(means[0], other)), f"{kind}: workers disagree"
        exact = [torch.stack([_delta(k, r)[i] for k in range(n)]).mean(0) for i in range(len(SHAPES))]
        num = math.sqrt(sum(float((m - e).pow(2).sum()) for m, e in zip(means[0], exact)))
        den = math.sqrt(sum(float(e.pow(2).sum()) for e in exact))
        if tol is not None:
            assert num / den < tol, f"{kind}: relative error {num / den:.3g}"
        else:
            assert num / den < 1.0, f"{kind}: the mean is worse than sending nothing ({num / den:.3g})"


def test_bytes_match_the_payloads(tmp_path: Path) -> None:
    n = 4
    for kind in ("none", "int8", "int2", "ternary", "topk"):
        spec = CodecConfig(kind=kind, fraction=0.1)
        results = run_workers(lambda w, spec=spec: _exchange_worker(w, spec, rounds=1), n)
        ex = results[0][0]
        codec = ex.groups[0].codec
        from dilo.compress.base import Context

        total = sum(s.numel() for s in SHAPES)
        tail_bytes = (n - 1) * 4 * 8  # the all-gathered tails
        if kind == "none":
            expected = ring_all_reduce_bytes(4 * total, n)
        elif kind in ("int8", "int2", "ternary"):  # reduce-scatter, then all-gather of the mean shards
            block = 128
            shard = math.ceil(total / n / block) * block
            one = pack(codec.encode(torch.zeros(shard), Context())).numel()
            expected = 2 * (n - 1) * one
        else:
            one = pack(codec.encode(torch.zeros(total), Context())).numel()
            expected = (n - 1) * one
        assert all(res[1][0][1] == expected + tail_bytes for res in results), (kind, expected)


def test_overrides_split_parameters_into_groups() -> None:
    spec = CodecConfig(kind="int4", overrides=[{"pattern": "emb|ln", "kind": "fp16"}])
    ex = run_workers(lambda w: _exchange_worker(w, spec, rounds=1), 2)[0][0]
    assert [(g.label, g.params) for g in ex.groups] == [("default", [0, 1]), ("override 'emb|ln'", [2, 3])]
    assert "BlockQuant" in ex.describe()[0] or "int4" in ex.describe()[0].lower()


def test_weights_and_non_contributors() -> None:
    n, weights = 4, [1.0, 2.0, 3.0, 4.0]
    spec = CodecConfig(kind="none")
    results = run_workers(lambda w: _exchange_worker(w, spec, rounds=1, weights=weights, skip_rank=1), n)
    mean = results[0][1][0][0]
    keep = [0, 2, 3]
    exact = [sum(weights[k] * _delta(k, 0)[i] for k in keep) / sum(weights[k] for k in keep) for i in range(4)]
    for m, e in zip(mean, exact):
        torch.testing.assert_close(m, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kind", ["fp16", "int8", "int4", "int2", "ternary", "topk", "dct", "sign", "randomk", "powersgd"]
)
def test_diloco_with_each_codec_keeps_anchors_bit_identical(tmp_path: Path, corpus_dir: Path, kind: str) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, steps=8, codec={"kind": kind, "fraction": 0.1, "block": 64})
    summaries = train_threads(cfg, 4)
    from dilo.metrics import read_jsonl

    logs = [[r for r in read_jsonl(tmp_path / "logs" / f"worker{k}.jsonl") if r["event"] == "round"] for k in range(4)]
    for rnd in range(2):
        assert len({log[rnd]["anchor_hash"] for log in logs}) == 1
    assert summaries[0]["rounds_committed"] == 2
    assert summaries[0]["comm_reduction"] > 4.0  # compressed: more than H=4 times less than DDP


@pytest.mark.parametrize(
    "codec",
    [{"kind": "powersgd", "rank": 2}, {"kind": "dct", "fraction": 0.1},
     {"kind": "topk", "fraction": 0.05, "momentum": 0.9, "warmup_rounds": 2}],
    ids=["powersgd", "dct", "dgc"],
)  # fmt: skip
def test_resume_keeps_warm_start_and_feedback_state(tmp_path: Path, corpus_dir: Path, codec: dict) -> None:
    """2 Gloo workers, stopped after round 1 and resumed: the same anchors as the uninterrupted run
    (PowerSGD's warm Q and its residual, DCT's error feedback, DGC's velocities are in the
    checkpoint; DGC's density warms up by round index)."""
    from dilo.metrics import read_jsonl

    full = tiny_config(tmp_path / "full", corpus_dir, steps=12, codec=codec, checkpoint={"every": 1})
    train_threads(full, 2)
    part = tiny_config(tmp_path / "part", corpus_dir, steps=12, codec=codec, checkpoint={"every": 1})
    train_threads(part, 2, max_rounds=1)
    resumed = tiny_config(tmp_path / "part", corpus_dir, steps=12, codec=codec, checkpoint={"every": 1, "resume": True})
    train_threads(resumed, 2)
    hashes = {
        run: [r["anchor_hash"] for r in read_jsonl(tmp_path / run / "logs" / "worker0.jsonl") if r["event"] == "round"]
        for run in ("full", "part")
    }
    assert hashes["part"] == hashes["full"] and len(set(hashes["full"])) == 3
