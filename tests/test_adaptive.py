"""Adaptive per-parameter compression (codec.adapt_every, L-GreCo): the knapsack solver against
brute force, the plan over real Gloo (the same on every worker, within its budget, more bytes
for a tighter one), the plan in the round log and through a checkpoint."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from dilo.config import CodecConfig, CodecSpec
from dilo.errors import ConfigError
from dilo.metrics import read_jsonl
from dilo.outer.adaptive import CodecPlanner
from dilo.outer.base import Tail
from dilo.outer.exchange import Exchange
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from tests.conftest import run_workers, tiny_config, train_threads

SHAPES = [torch.Size([64, 32]), torch.Size([32]), torch.Size([128, 16]), torch.Size([48, 48]), torch.Size([7])]
NAMES = [f"p{i}" for i in range(len(SHAPES))]
CANDIDATES = [
    CodecSpec(kind="int8"),
    CodecSpec(kind="int4"),
    CodecSpec(kind="int2"),
    CodecSpec(kind="topk", fraction=0.1),
]


@pytest.mark.parametrize("seed", range(6))
def test_the_solver_finds_the_least_bytes_within_the_budget(seed: int) -> None:
    """Random errors and norms on 5 parameters x 4 candidates: the dynamic programme's plan is the
    brute-force optimum over all 4^5 plans of the same (unit-rounded) problem, and its exact error
    is within the budget."""
    g = torch.Generator().manual_seed(seed)
    planner = CodecPlanner(CANDIDATES, every=1, budget=0.2, workers=3, resolution=200)
    norms = torch.rand(len(SHAPES), generator=g, dtype=torch.float64) + 0.5
    errors = torch.rand(len(SHAPES), len(CANDIDATES), generator=g, dtype=torch.float64) * norms[:, None] * 0.4
    plan = planner.solve(errors, norms, SHAPES)
    cost = planner.wire_bytes(SHAPES)
    allowed = 0.2 * float(norms.sum())
    units = torch.ceil(errors / (allowed / 200) - 1e-9)
    fits = [p for p in itertools.product(range(len(CANDIDATES)), repeat=len(SHAPES))
            if sum(float(units[i, c]) for i, c in enumerate(p)) <= 200]  # fmt: skip
    if not fits:
        assert plan == [int(c) for c in errors.argmin(dim=1)]
        return
    best = min(sum(float(cost[i, c]) for i, c in enumerate(p)) for p in fits)
    assert sum(float(cost[i, c]) for i, c in enumerate(plan)) == best
    assert sum(float(errors[i, c]) for i, c in enumerate(plan)) <= allowed


def _worker(world: Any, spec: CodecConfig) -> tuple[list[list[int] | None], list[torch.Tensor], list[dict]]:
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)
    ex = Exchange(t, NAMES, SHAPES, spec, seed=7)
    plans, means, summaries = [], [], []
    for r in range(3):
        g = torch.Generator().manual_seed(100 * world.rank + r)
        deltas = [torch.randn(s, generator=g).cumsum(-1) * (1 + i) for i, s in enumerate(SHAPES)]
        res = ex.mean(deltas, Tail(weight=1.0, contributes=True, stop=False, tokens=1).tensor(), r)
        plans.append(list(ex.plan) if ex.plan is not None else None)
        means.append(res.flat.clone())
        summaries.append(res.plan)
    return plans, means, summaries


def test_the_plan_is_shared_within_budget_and_follows_it_over_gloo() -> None:
    """3 workers: the same plan and the same mean bits on every worker, solved in rounds 0 and 2
    (adapt_every = 2), within its error budget; a budget 10x tighter costs more bytes."""
    loose = CodecConfig(adapt_every=2, adapt_error=0.2, adapt_candidates=CANDIDATES)
    tight = CodecConfig(adapt_every=2, adapt_error=0.02, adapt_candidates=CANDIDATES)
    runs = {
        name: run_workers(lambda w, s=spec: _worker(w, s), 3) for name, spec in (("loose", loose), ("tight", tight))
    }
    for out in runs.values():
        for plans, means, _ in out[1:]:
            assert plans == out[0][0]
            assert all(torch.equal(a, b) for a, b in zip(means, out[0][1]))
        summaries = out[0][2]
        assert [s["solved"] for s in summaries] == [True, False, True]
        assert all(s["rel_error"] <= (0.2 if out is runs["loose"] else 0.02) for s in summaries)
        assert sum(summaries[0]["params"].values()) == len(SHAPES)
    assert runs["tight"][0][2][0]["bytes"] > runs["loose"][0][2][0]["bytes"]


def test_adaptive_diloco_logs_its_plan_and_resumes_bit_identically(tmp_path: Path, corpus_dir: Path) -> None:
    codec = {"adapt_every": 2, "adapt_error": 0.1}
    full = tiny_config(tmp_path / "full", corpus_dir, steps=12, codec=codec, checkpoint={"every": 1})
    train_threads(full, 2)
    part = tiny_config(tmp_path / "part", corpus_dir, steps=12, codec=codec, checkpoint={"every": 1})
    train_threads(part, 2, max_rounds=1)  # resumed at round 1, which plans nothing: the plan comes back
    resumed = tiny_config(tmp_path / "part", corpus_dir, steps=12, codec=codec, checkpoint={"every": 1, "resume": True})
    train_threads(resumed, 2)
    rounds = {
        run: [r for r in read_jsonl(tmp_path / run / "logs" / "worker0.jsonl") if r["event"] == "round"]
        for run in ("full", "part")
    }
    assert [r["anchor_hash"] for r in rounds["part"]] == [r["anchor_hash"] for r in rounds["full"]]
    plans = [r["codec_plan"] for r in rounds["full"]]
    assert [p["solved"] for p in plans] == [True, False, True]
    assert all(p["rel_error"] <= 0.1 and sum(p["params"].values()) > 0 for p in plans)


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"codec": {"adapt_every": 2, "overrides": [{"pattern": "emb", "kind": "fp16"}]}}, "drop codec.overrides"),
        ({"codec": {"adapt_every": 2, "adapt_candidates": [{"kind": "powersgd"}]}}, "other than powersgd"),
        ({"codec": {"adapt_every": 2}, "membership": {"kind": "coordinator"}}, "static DiLoCo"),
        ({"codec": {"adapt_every": 2}, "aggregate": {"kind": "median"}, "workers": 3}, "static DiLoCo"),
    ],
)
def test_adaptive_compression_is_validated(tmp_path: Path, corpus_dir: Path, sections: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        tiny_config(tmp_path, corpus_dir, **sections)
