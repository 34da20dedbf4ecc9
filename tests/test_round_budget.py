"""A time budget per round (outer.round_seconds): variable local work in synchronous rounds, the
mean weighted by the work done; against a naive loop over real Gloo, and in the simulator's loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import dilo
from dilo.errors import ConfigError
from dilo.metrics import read_jsonl
from dilo.sim import simulate
from dilo.worlds import Placement
from tests.conftest import run_workers, tiny_config

H, ROUNDS, LR, BUDGET = 4, 3, 0.1, 5.0
COST = (1.0, 2.5)  # compute seconds of one inner step: worker 1 fits 2 steps in the budget, worker 0 all 4
TOKENS = 8
COMPASS = {"schedule": "compass"}


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(TOKENS, 6, generator=g), torch.randn(TOKENS, 2, generator=g)


def _start() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().clone() for p in torch.nn.Linear(6, 2).parameters()]


def test_a_round_budget_cuts_slow_workers_and_weighs_updates_by_work(tmp_path: Path, corpus_dir: Path) -> None:
    """2 workers, H = 4, a 5 s budget, steps of 1 s and 2.5 s: worker 0 trains 4 steps a round,
    worker 1 two, and both step counters move on to the round's end; the anchor is outer Nesterov on
    the token-weighted mean of their pseudo-gradients (weights 32 and 16), as a naive loop computes."""
    outer_cfg = {"kind": "diloco", "inner_steps": H, "lr": 0.7, "momentum": 0.9, "round_seconds": BUDGET}
    cfg = tiny_config(tmp_path, corpus_dir, steps=H * ROUNDS, outer={**outer_cfg, "weighting": "tokens"})

    start = _start()  # once: the threads share torch's global generator

    def worker(p: Placement) -> dict[str, Any]:
        model = torch.nn.Linear(6, 2)
        with torch.no_grad():
            for q, v in zip(model.parameters(), start):
                q.copy_(v)
        trained, counts = 0, []
        with dilo.init(cfg, placement=p) as world:
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            outer = dilo.wrap(model, opt, world)
            outer.start()
            while not outer.done:
                x, y = _data(p.rank, trained)
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                trained += 1
                report = outer.step(tokens=TOKENS, inner_s=COST[p.rank])
                if report is not None:
                    counts.append((report.steps, outer.steps))
            outer.close()
        return {"counts": counts, "params": [q.detach().clone() for q in model.parameters()]}

    out = run_workers(worker, 2)
    assert out[0]["counts"] == [(4, 4), (4, 8), (4, 12)]
    assert out[1]["counts"] == [(2, 4), (2, 8), (2, 12)]  # cut at 5 s of compute, the count at the round's end
    for a, b in zip(out[0]["params"], out[1]["params"]):
        assert torch.equal(a, b)

    anchor, momentum, done = start, None, [0, 0]
    for _ in range(ROUNDS):
        ends, weights = [], []
        for rank, steps in ((0, 4), (1, 2)):
            w = [a.clone() for a in anchor]
            for _ in range(steps):
                w = [t.requires_grad_(True) for t in w]
                x, y = _data(rank, done[rank])
                torch.nn.functional.mse_loss(x @ w[0].T + w[1], y).backward()
                w = [(t - LR * t.grad).detach() for t in w]
                done[rank] += 1
            ends.append(w)
            weights.append(float(steps * TOKENS))
        delta = [sum(wt * (a - e[i]) for wt, e in zip(weights, ends)) / sum(weights) for i, a in enumerate(anchor)]
        momentum = delta if momentum is None else [0.9 * m + d for m, d in zip(momentum, delta)]
        anchor = [a - 0.7 * (d + 0.9 * m) for a, d, m in zip(anchor, delta, momentum)]
    for p, r in zip(out[0]["params"], anchor):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_the_simulated_loop_runs_slow_workers_short_rounds(tmp_path: Path, corpus_dir: Path) -> None:
    """The worker loop in virtual time: speeds 1 and 1/3, 0.5 s steps, H = 4, a 1.4 s budget (off
    the grid of step times): the slow worker trains one step a round, the fast one three; both run
    the same 3 rounds and end on the same anchor, in under half the time of waiting for the slow one."""

    def run(name: str, budget: float) -> list[list[dict[str, Any]]]:
        outer = {"kind": "diloco", "inner_steps": H, "weighting": "tokens", "round_seconds": budget}
        cfg = tiny_config(
            tmp_path / name, corpus_dir, workers=2, steps=12, outer=outer,
            heterogeneity={"slowdown": [1, 3]}, sim={"step_s": 0.5},
        )  # fmt: skip
        simulate(cfg, timeout_s=120)
        logs = [read_jsonl(tmp_path / name / "logs" / f"worker{w}.jsonl") for w in range(2)]
        return [[r for r in log if r["event"] == "round"] for log in logs]

    fast, slow = run("budget", 1.4)
    assert [r["inner_steps"] for r in fast] == [3, 3, 3]
    assert [r["inner_steps"] for r in slow] == [1, 1, 1]
    assert [r["step"] for r in slow] == [r["step"] for r in fast] == [4, 8, 12]
    assert fast[-1]["anchor_hash"] == slow[-1]["anchor_hash"]
    full_fast, _ = run("full", 0.0)
    assert [r["inner_steps"] for r in full_fast] == [4, 4, 4]
    assert fast[-1]["wall_s"] < 0.5 * full_fast[-1]["wall_s"]


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"outer": {"kind": "diloco", "inner_steps": 4, "fragments": 2, "round_seconds": 1.0}}, "Streaming"),
        ({"outer": {"kind": "fedavg", "round_seconds": 1.0}, "transport": {"island_ranks": 2}}, "island"),
        (
            {"outer": {"kind": "diloco", "round_seconds": 1.0}, "membership": {"kind": "coordinator", **COMPASS}},
            "compass",
        ),
        ({"outer": {"kind": "diloco", "round_seconds": -1.0}}, "round_seconds"),
    ],
)
def test_round_budget_config_is_validated(tmp_path: Path, corpus_dir: Path, sections: dict, needle: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=needle):
        tiny_config(tmp_path, corpus_dir, workers=2, **sections)
