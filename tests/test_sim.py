"""The simulator (dilo/sim/): the real worker loop and strategies on a virtual clock.

It must agree with real threaded workers over Gloo for the same seeded synchronous schedule, be
deterministic, charge virtual time as documented, and play join / leave / crash schedules through
the in-process coordinator.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dilo.config import RunConfig
from dilo.errors import ConfigError
from dilo.sim import simulate
from dilo.state import load_worker_state
from tests.conftest import REPO, tiny_config, train_threads


def _records(run_dir: Path, name: str, event: str = "round") -> list[dict[str, Any]]:
    path = run_dir / "logs" / f"{name}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == event]


def _final_params(run_dir: Path, name: str, rounds: int) -> list[torch.Tensor]:
    return load_worker_state(run_dir / "checkpoints", rounds, name)["params"]


def _async(run_dir: Path, corpus: Path, **sections: Any) -> RunConfig:
    return tiny_config(
        run_dir,
        corpus,
        workers=sections.pop("workers", 4),
        steps=sections.pop("steps", 24),
        outer={"kind": "async", "inner_steps": 4, "lr": 0.5, **sections.pop("outer", {})},
        membership={"kind": "coordinator", "heartbeat_timeout_s": 2.0, **sections.pop("membership", {})},
        **sections,
    )


@pytest.mark.parametrize(
    "sections",
    [
        {"codec": {"kind": "int8"}},  # shard-owner sums in rank order: bit-identical
        {},  # fp32 all-reduce: Gloo's ring sums in another order
        {"outer": {"kind": "ddp"}, "sync_every_ddp_eval": 4},
        {"outer": {"kind": "fedavg", "inner_steps": 4}},
    ],
    ids=["diloco-int8", "diloco-fp32", "ddp", "fedavg"],
)
def test_sim_equals_real_threaded_workers(tmp_path: Path, corpus_dir: Path, sections: dict[str, Any]) -> None:
    real = tiny_config(tmp_path / "real", corpus_dir, workers=3, **sections)
    sim = tiny_config(tmp_path / "sim", corpus_dir, workers=3, heterogeneity={"slowdown": [1, 2, 3]}, **sections)
    train_threads(real, 3)
    simulate(sim, timeout_s=120)
    real_recs, sim_recs = _records(tmp_path / "real", "worker0"), _records(tmp_path / "sim", "worker0")
    assert len(real_recs) == len(sim_recs) == 3
    rounds = real_recs[-1]["round"]
    # Gloo's fp32 ring sums in another order than rank order; AdamW magnifies those last bits a little
    atol = 0.0 if sections.get("codec") else 2e-5
    for w in range(3):
        a = _final_params(tmp_path / "real", f"worker{w}", rounds)
        b = _final_params(tmp_path / "sim", f"worker{w}", rounds)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=atol)
    if sections.get("codec"):
        assert [r["anchor_hash"] for r in real_recs] == [r["anchor_hash"] for r in sim_recs]
    for r, s in zip(real_recs, sim_recs):
        assert s["val_loss"] == pytest.approx(r["val_loss"], abs=1e-4)
        assert s["cum_bytes_sent"] == r["cum_bytes_sent"]  # the same byte accounting


def test_sync_rounds_wait_for_the_slowest_in_virtual_time(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        corpus_dir,
        workers=3,
        heterogeneity={"slowdown": [1, 2, 4]},
        sim={"step_s": 0.5, "bandwidth_mbps": 8.0, "latency_ms": 100.0},
    )
    result = simulate(cfg, timeout_s=120)
    recs = _records(tmp_path, "worker0")
    # 3 rounds of 4 steps, each waiting for the 4x slower worker: 4 * 0.5 * 4 = 8 s of compute,
    # plus per round the tail all-gather and the pseudo-gradient all-reduce at 1 MB/s and 100 ms
    for r in recs:
        assert 8.0 < r["round_s"] < 8.0 + 2.0
        assert r["inner_s"] == pytest.approx(2.0)  # worker 0 itself computes 4 * 0.5 s
        assert r["sync_s"] > 6.0  # and waits for the slowest
    # after the last round: the summary's all-reduces (latency bound)
    assert recs[-1]["wall_s"] <= result["virtual_s"] < recs[-1]["wall_s"] + 1.0


def test_async_sim_is_deterministic(tmp_path: Path, corpus_dir: Path) -> None:
    def run(d: str) -> list[list[tuple[Any, ...]]]:
        cfg = _async(tmp_path / d, corpus_dir, heterogeneity={"slowdown": [1, 1, 2, 4]}, sim={"jitter": 0.3})
        simulate(cfg, timeout_s=120)
        return [
            [
                (r["anchor_hash"], r["wall_s"], r["staleness"], r["next_steps"])
                for r in _records(tmp_path / d, f"worker-sim{w}")
            ]
            for w in range(4)
        ]

    assert run("a") == run("b")


def test_async_dylu_beats_sync_in_virtual_time_for_the_same_compute(tmp_path: Path, corpus_dir: Path) -> None:
    hetero = {"slowdown": [1, 1, 2, 4]}
    sync = simulate(tiny_config(tmp_path / "sync", corpus_dir, workers=4, steps=24, heterogeneity=hetero))
    asy = simulate(_async(tmp_path / "async", corpus_dir, heterogeneity=hetero))
    assert asy["coordinator"]["steps"] == 4 * 24  # the same number of inner steps in total
    # sync: every round waits for the 4x slower worker; async lets the fast ones do more
    assert asy["virtual_s"] < 0.6 * sync["virtual_s"]
    per_worker = {w: s["steps"] for w, s in asy["summaries"].items()}
    assert per_worker["0"] > per_worker["3"] * 2


def test_join_leave_and_crash_schedule(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _async(
        tmp_path,
        corpus_dir,
        steps=40,
        sim={
            "events": [
                {"at_s": 1.0, "worker": 3, "action": "join"},
                {"at_s": 1.5, "worker": 1, "action": "leave"},
                {"at_s": 1.2, "worker": 2, "action": "crash"},
            ]
        },
    )
    result = simulate(cfg, timeout_s=120)
    assert result["crashed"] == [2]
    assert sorted(result["summaries"]) == ["0", "1", "3"]
    assert result["summaries"]["1"]["stopped"] is True  # left on its own
    start3 = _records(tmp_path, "worker-sim3", "start")[0]
    assert start3["joined"]["version"] > 0  # joined late, with the current parameters
    assert _records(tmp_path, "worker-sim3")[0]["time"] > 1.0  # the virtual time of the round's end
    assert _records(tmp_path, "worker-sim2", "end") == []  # no word after the crash
    assert all(r["time"] < 1.2 for r in _records(tmp_path, "worker-sim2"))
    st = result["coordinator"]
    assert st["members"] == [] and st["steps"] == st["budget"] == 160
    # epochs: 4 joins, the leave, the crash noticed after heartbeat_timeout_s, and 2 leaves at the end
    assert st["epoch"] == 8


@pytest.mark.parametrize("update", ["delayed_nesterov", "nesterov", "fedbuff", "fedasync"])
def test_async_rules_with_compressed_pushes_and_a_worker_budget(tmp_path: Path, corpus_dir: Path, update: str) -> None:
    """Every server rule trains through int8 pushes; worker 3 has its own budget of 6 steps and leaves."""
    cfg = _async(
        tmp_path,
        corpus_dir,
        outer={
            "update": update,
            "staleness": "hinge" if update == "fedasync" else "constant",
            # every push straight into Nesterov overshoots at the others' lr (the reason for DN)
            "lr": 0.15 if update == "nesterov" else 0.5,
        },
        codec={"kind": "int8"},
        heterogeneity={"slowdown": [1, 2, 1, 1], "max_steps": [0, 0, 0, 6]},
    )
    result = simulate(cfg, timeout_s=120)
    summaries = result["summaries"]
    assert summaries["3"]["steps"] == 6 and not summaries["3"]["stopped"]
    # the others share the rest of the world's budget of 4 * 24 steps
    assert sum(s["steps"] for s in summaries.values()) == result["coordinator"]["steps"] == 96
    start = _records(tmp_path, "worker-sim0", "start")[0]["val_loss"]
    assert all(s["val_loss"] < start for s in summaries.values())
    pushed = sum(r["bytes_sent"] for w in range(4) for r in _records(tmp_path, f"worker-sim{w}"))
    rounds = sum(len(_records(tmp_path, f"worker-sim{w}")) for w in range(4))
    received = sum(r["bytes_recv"] for w in range(4) for r in _records(tmp_path, f"worker-sim{w}"))
    # int8 pushes up (about a quarter of the fp32 parameters that come down)
    assert pushed / rounds < 0.35 * received / rounds


def test_elastic_sync_rounds_go_on_without_a_crashed_worker(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = tiny_config(
        tmp_path,
        corpus_dir,
        workers=3,
        steps=24,
        membership={"kind": "coordinator", "heartbeat_timeout_s": 2.0, "round_timeout_s": 30.0},
        sim={"events": [{"at_s": 0.5, "worker": 2, "action": "crash"}]},
    )
    result = simulate(cfg, timeout_s=120)
    parts = [r["participants"] for r in _records(tmp_path, "worker-sim0")]
    assert parts[0] == 3 and parts[-1] == 2 and len(parts) == 6
    # the round w2 died in closed once the coordinator dropped it, about heartbeat_timeout_s later
    slow = [r for r in _records(tmp_path, "worker-sim0") if r["participants"] == 2][0]
    assert slow["sync_s"] > 1.5
    assert result["crashed"] == [2]


def test_sim_rejects_schedules_for_static_worlds_and_resume(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(ConfigError, match="membership.kind='coordinator'"):
        tiny_config(tmp_path, corpus_dir, workers=2, sim={"events": [{"at_s": 1, "worker": 1, "action": "crash"}]})
    with pytest.raises(ConfigError, match="worker 5 does not exist"):
        _async(tmp_path, corpus_dir, sim={"events": [{"at_s": 1, "worker": 5, "action": "crash"}]})
    with pytest.raises(ConfigError, match="resume"):
        simulate(tiny_config(tmp_path, corpus_dir, workers=2, checkpoint={"resume": True}))
    with pytest.raises(ConfigError, match="one rank per virtual worker"):
        simulate(tiny_config(tmp_path, corpus_dir, workers=2, transport={"island_ranks": 2}))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_dilo_sim_command(tmp_path: Path, corpus_dir: Path) -> None:
    toml = tmp_path / "sim.toml"
    toml.write_text(
        f"""
name = "sim"
steps = 16
workers = 3
out_dir = "{tmp_path}"
[model]
n_layer = 1
n_head = 2
d_model = 32
context = 32
[data]
corpus = "text"
paths = ["{corpus_dir}"]
batch_size = 4
seq_len = 32
[inner]
warmup_steps = 2
[outer]
kind = "async"
inner_steps = 4
[membership]
kind = "coordinator"
[heterogeneity]
slowdown = [1, 2, 4]
[log]
plot = false
"""
    )
    p = subprocess.run(
        [sys.executable, "-m", "dilo.cli", "sim", str(toml), "--workers=4", "--sim.step_s=0.2"],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=REPO,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "4 virtual workers" in p.stderr and "virtual time" in p.stderr
    result = json.loads((tmp_path / "sim.json").read_text())
    assert result["workers"] == 4 and result["coordinator"]["steps"] == 64


def test_a_worker_leaves_and_joins_again(tmp_path: Path, corpus_dir: Path) -> None:
    """Elastic DiLoCo with FedAU weights: worker 2 leaves after its first rounds and comes back
    later as a fresh process: its second start joins at the run's current version and appends to
    its log; the rounds it missed make its participation weight grow above the others'."""
    cfg = tiny_config(
        tmp_path, corpus_dir, workers=3, steps=24,
        membership={"kind": "coordinator", "heartbeat_timeout_s": 30.0, "round_timeout_s": 60.0,
                    "participation": "fedau"},
        sim={"step_s": 0.5, "events": [{"at_s": 3.0, "worker": 2, "action": "leave"},
                                       {"at_s": 7.0, "worker": 2, "action": "join"}]},
    )  # fmt: skip
    result = simulate(cfg, timeout_s=120)
    starts = _records(tmp_path, "worker-sim2", "start")
    assert len(starts) == 2 and starts[0]["joined"]["version"] == 0
    assert starts[1]["joined"]["version"] > 0 and starts[1]["time"] >= 7.0
    assert len(_records(tmp_path, "worker-sim2", "end")) == 2  # both stays in one log
    weights = result["coordinator"]["participation_weights"]
    assert weights["sim2"] > weights["sim0"] == weights["sim1"] == 1.0


@pytest.mark.parametrize(
    ("events", "needle"),
    [
        ([{"at_s": 1.0, "worker": 1, "action": "join"}, {"at_s": 2.0, "worker": 1, "action": "join"}], "in the run"),
        (
            [{"at_s": 1.0, "worker": 1, "action": "leave"}, {"at_s": 2.0, "worker": 1, "action": "leave"}],
            "cannot leave",
        ),
        ([{"at_s": 1.0, "worker": 1, "action": "crash"}, {"at_s": 2.0, "worker": 1, "action": "join"}], "come back"),
    ],
)
def test_event_schedules_are_checked(
    tmp_path: Path, corpus_dir: Path, events: list[dict[str, Any]], needle: str
) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, workers=2, membership={"kind": "coordinator"}, sim={"events": events})
    with pytest.raises(ConfigError, match=needle):
        simulate(cfg, timeout_s=60)
