"""Sharded islands (transport.island_shard = "fsdp") behind a coordinator: torchrun launches of
two FSDP2 ranks join as one worker each and their lead relays; a lost rank stops its island while
the others go on; and the GPU benchmark's arms, run on the CPU.

Real processes: a coordinator in this process (real ZeroMQ sockets on loopback), torchrun islands
over Gloo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dilo.metrics import read_jsonl
from tests.conftest import REPO, write_toml
from tests.test_islands import _rounds


def _torchrun_worker(toml: Path, address: str, worker: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "-m", "dilo.cli", "worker", str(toml), f"--membership.address={address}", "--id", worker,
            "--transport.island_shard=fsdp"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("kind", ["diloco", "async"])
def test_sharded_islands_behind_a_coordinator(tmp_path: Path, corpus_dir: Path, kind: str) -> None:
    """Two torchrun launches of two FSDP2 ranks join a coordinator as one worker each; the lead
    rank relays its island's gathered parameters. DiLoCo: every round commits with both islands
    and every rank ends on the coordinator's anchor; async local SGD: pushes are applied and the
    run ends on the coordinator's budget. Only the leads talk to the coordinator."""
    from dilo.coordinator import Coordinator
    from dilo.transport.zmq_star import status
    from tests.test_elastic import _serving
    from tests.test_islands import _run_all

    outer = {"kind": "diloco", "inner_steps": 4} if kind == "diloco" else {"kind": "async", "inner_steps": 4}
    cfg = _elastic(tmp_path, corpus_dir, outer=outer)
    toml = write_toml(cfg, tmp_path / "elastic.toml")
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with _serving(coord):
        _run_all([_torchrun_worker(toml, coord.address, f"isl{i}") for i in range(2)])
        final = status(coord.address, secret=None)
    names = ["worker-isl0", "worker-isl0.1", "worker-isl1", "worker-isl1.1"]
    logs = {n: _rounds(tmp_path, n) for n in names}
    for n in ("worker-isl0.1", "worker-isl1.1"):
        assert all(r["bytes_sent"] == 0 for r in logs[n])  # followers send nothing
    if kind == "diloco":
        assert final["version"] == 4
        hashes = [[r["anchor_hash"] for r in log] for log in logs.values()]
        assert all(h == hashes[0] for h in hashes) and len(hashes[0]) == 4
        assert all(r["participants"] == 2 and r["committed"] for log in logs.values() for r in log)
        assert hashes[0][-1] == coord.anchor_hash()
    else:
        assert final["version"] >= 4 and all(logs[n] for n in names)
    start = [r for r in read_jsonl(tmp_path / "logs" / "worker-isl0.jsonl") if r["event"] == "start"][0]
    assert start["config"]["transport"]["island_shard"] == "fsdp"
    assert logs["worker-isl0"][-1]["val_loss"] < start["val_loss"]


def _child_with(parent: int, local_rank: int) -> int:
    """The pid of torchrun's worker process of `local_rank`."""
    for child in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"torchrun {parent} has no worker of local rank {local_rank}")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_lost_rank_stops_its_sharded_island_and_the_others_go_on(tmp_path: Path, corpus_dir: Path) -> None:
    """A whole-model worker and a sharded island of two FSDP2 ranks train behind one coordinator
    (the island's sharding is its own business). SIGKILL the island's second rank after a round:
    the island stops with an error instead of hanging, the coordinator drops it, and the other
    worker trains to the end, its later rounds committed alone."""
    import os
    import signal

    from dilo.coordinator import Coordinator
    from tests.test_elastic import _serving, _spawn, _tail, _wait_for

    # rounds wait for the slower island (round_timeout_s) until its lost rank stops its heartbeats
    cfg = _elastic(tmp_path, corpus_dir, steps=60, membership={"heartbeat_timeout_s": 2.0, "round_timeout_s": 60.0})
    toml = write_toml(cfg, tmp_path / "elastic.toml")
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with _serving(coord):
        alone = _spawn(["worker", str(toml), f"--membership.address={coord.address}", "--id", "a"], tmp_path, "a")
        island = subprocess.Popen(_torchrun_worker(toml, coord.address, "b"), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            follower = tmp_path / "logs" / "worker-b.1.jsonl"
            _wait_for("a round of the sharded island", lambda: follower.is_file() and _rounds(tmp_path, "worker-b.1"),
                      120, [alone, island])  # fmt: skip
            os.kill(_child_with(island.pid, 1), signal.SIGKILL)
            island_err = island.communicate(timeout=120)[1]
            assert island.returncode != 0
            assert "dilo: error: worker-b: a rank of this island was lost" in island_err, island_err[-3000:]
            assert "[rank0]: Traceback" not in island_err  # the lead stops with dilo's error, not a traceback
            assert alone.wait(timeout=200) == 0, _tail(alone)
        finally:
            for proc in (alone, island):
                if proc.poll() is None:
                    proc.kill()
    rounds = _rounds(tmp_path, "worker-a")
    seen = [(r["round"], r["committed"], r["participants"]) for r in rounds]
    assert len(rounds) == 15 and all(r["committed"] for r in rounds), seen
    assert any(p == 2 for _, _, p in seen) and seen[-1][2] == 1, seen  # with the island, then alone


def _elastic(tmp_path: Path, corpus: Path, **kw: Any) -> Any:
    from tests.test_elastic import _elastic_cfg

    common = {
        "steps": 16,
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context": 32},
        "inner": {"lr": 3e-3, "warmup_steps": 0, "precision": "fp32"},
        "transport": {"timeout_s": 60},
    }
    membership = {"heartbeat_s": 0.3, "heartbeat_timeout_s": 5.0, "start_quorum": 2, **kw.pop("membership", {})}
    return _elastic_cfg(tmp_path, corpus, workers=2, membership=membership, **{**common, **kw})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_gpu_benchmark_runs_its_arms_on_the_cpu(tmp_path: Path) -> None:
    """scripts/bench_gpu.py --smoke: the GPU benchmark's arms (a whole-model and an FSDP2 island
    layout of 2 x 2 ranks) on Gloo with a tiny Hugging Face Llama in bf16 over fp32 master
    weights: every round commits, the loss falls, each sharded rank sends half the bytes."""
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = json.loads((tmp_path / "bench_gpu_smoke.json").read_text())["arms"]
    whole, sharded = arms["tiny-none"], arms["tiny-fsdp"]
    assert whole["ranks"] == sharded["ranks"] == 4 and whole["rounds_committed"] == sharded["rounds_committed"] == 3
    lead = max(whole["bytes_sent_per_rank"].values())
    assert all(b == pytest.approx(lead / 2, rel=0.05) for b in sharded["bytes_sent_per_rank"].values())
    assert abs(sharded["val_loss"] - whole["val_loss"]) < 0.05  # the same training, sharded
    assert all(arm["val_loss"] < arm["initial_val_loss"] for arm in (whole, sharded))
