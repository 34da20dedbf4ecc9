"""Sharded islands (transport.island_shard = "fsdp"): FSDP2 over an island's ranks, the outer step
on each rank's shards, DCP checkpoints that resume on the same or another number of ranks.

Real processes: `dilo run` islands of two Gloo ranks on this machine (FSDP2 runs on the CPU), and
a torchrun helper (tests/sharded_probe.py) that resumes a checkpoint on another layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dilo.errors import ConfigError
from dilo.metrics import read_jsonl
from tests.conftest import REPO, write_toml
from tests.test_islands import RANKS, _final, _islands, _rounds


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_islands_train_like_whole_model_islands(tmp_path: Path, corpus_dir: Path) -> None:
    """transport.island_shard='fsdp' (FSDP2 over Gloo, two real processes per island): 2 islands x
    2 sharded ranks end on the anchors of 2 unsharded islands of the same global batch (fp32:
    within 1e-5 absolute; the sharded run reduce-scatters where the other all-reduces, and AdamW
    turns the last-bit differences of near-zero gradients into steps of up to its lr), and each
    rank's exchange carries half of the bytes."""
    common = {
        "steps": 8,
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context": 32},
        "inner": {"optimizer": "adamw", "lr": 3e-3, "warmup_steps": 0, "precision": "fp32"},
    }
    runs = {}
    for shard in ("none", "fsdp"):
        run = tmp_path / shard
        cfg = _islands(run, corpus_dir, transport={"timeout_s": 60, "island_shard": shard}, **common)
        toml = write_toml(cfg, tmp_path / f"{shard}.toml")
        proc = subprocess.run([sys.executable, "-m", "dilo.cli", "run", str(toml), "--workers=2", "--island-ranks=2"],
                              capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[shard] = run
    for i in range(2):  # a sharded island's checkpoint (DCP), read whole
        for w, s in zip(_final(runs["none"], f"worker{i}"), _final(runs["fsdp"], f"island{i}")):
            torch.testing.assert_close(s, w, rtol=1e-4, atol=1e-5)
    sent = {s: [r["bytes_sent"] for r in _rounds(runs[s], n)] for s, n in (("none", "worker0"), ("fsdp", "worker0"))}
    sent["fsdp.1"] = [r["bytes_sent"] for r in _rounds(runs["fsdp"], "worker0.1")]
    for whole, a, b in zip(sent["none"], sent["fsdp"], sent["fsdp.1"]):
        assert a + b == pytest.approx(whole, rel=0.01) and a == pytest.approx(whole / 2, rel=0.05)
    hashes = [[r["anchor_hash"] for r in _rounds(runs["fsdp"], n)] for n in RANKS]
    assert all(h == hashes[0] for h in hashes)  # one island-wide hash, the same on every rank


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"transport": {"island_ranks": 1, "island_shard": "fsdp"}}, "needs islands of several ranks"),
        ({"outer": {"kind": "diloco", "inner_steps": 4, "overlap": True}}, "blocking outer step"),
        ({"inner": {"compile": True}}, "uncompiled"),
    ],
    ids=["one-rank", "overlap", "compile"],
)
def test_fsdp_islands_config_is_validated(tmp_path: Path, corpus_dir: Path, overrides: dict, needle: str) -> None:
    transport = {"island_ranks": 2, "island_shard": "fsdp", **overrides.pop("transport", {})}
    with pytest.raises(ConfigError, match=needle):
        _islands(tmp_path, corpus_dir, transport=transport, **overrides)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_islands_resume_bit_identically(tmp_path: Path, corpus_dir: Path) -> None:
    """A sharded run stopped after its first round and resumed from its checkpoints (each rank its
    own shards, AdamW moments included) ends on the anchors of the run that did not stop."""
    common = {
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context": 32},
        "inner": {"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0, "precision": "fp32"},
        "checkpoint": {"every": 1},
    }

    def run(run_dir: Path, steps: int, *extra: str) -> None:
        cfg = _islands(run_dir, corpus_dir, steps=steps, transport={"timeout_s": 60, "island_shard": "fsdp"}, **common)
        toml = write_toml(cfg, tmp_path / f"{run_dir.name}-{steps}.toml")
        proc = subprocess.run([sys.executable, "-m", "dilo.cli", "run", str(toml), "--workers=2", "--island-ranks=2",
                               *extra], capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "whole", 8)
    run(tmp_path / "resumed", 4)
    run(tmp_path / "resumed", 8, "--checkpoint.resume=true")
    for name in RANKS:  # the second call resumed at round 1 (a fresh start would match too)
        events = [(r["event"], r.get("round")) for r in read_jsonl(tmp_path / "resumed" / "logs" / f"{name}.jsonl")]
        assert [e for e in events if e[0] != "end"] == [("start", None), ("round", 1), ("resume", None), ("round", 2)]
    for name in ("island0", "island1"):
        a, b = _final(tmp_path / "whole", name), _final(tmp_path / "resumed", name)
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_islands_train_a_hugging_face_llama_in_bf16(tmp_path: Path) -> None:
    """configs/hf-llama.toml (a tiny transformers Llama) on 2 islands of 2 FSDP2 ranks, bf16 compute
    over fp32 master shards: every round commits, the loss falls, and both ranks of an island send."""
    pytest.importorskip("transformers")
    cmd = [sys.executable, "-m", "dilo.cli", "run", str(REPO / "configs" / "hf-llama.toml"), "--workers=2",
           "--island-ranks=2", "--transport.island_shard=fsdp", "--steps=20",
           "--inner.warmup_steps=2", "--outer.inner_steps=10", f"--out_dir={tmp_path}", "--log.progress=false",
           "--checkpoint.every=0", "--inner.precision=bf16", "--log.plot=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = [r for r in read_jsonl(tmp_path / "logs" / "worker0.jsonl") if r["event"] == "start"][0]
    for name in RANKS:
        rounds = _rounds(tmp_path, name)
        assert len(rounds) == 2 and all(r["committed"] and r["bytes_sent"] > 0 for r in rounds), name
    assert _rounds(tmp_path, "worker0")[-1]["val_loss"] < start["val_loss"]


def _dilo_run(toml: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dilo.cli", "run", str(toml), "--workers=2", *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _probe(toml: Path, ckpt: Path, round_idx: int, ranks: int, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(REPO / "tests" / "sharded_probe.py"), str(toml), str(ckpt), str(round_idx), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got: dict[str, Any] = torch.load(out)
    return got


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_checkpoint_resumes_on_another_number_of_ranks(tmp_path: Path, corpus_dir: Path) -> None:
    """A DCP checkpoint of islands of 2 FSDP ranks, resumed by islands of 3 (uneven shards) and of
    2: every resumed tensor (parameters, AdamW moments, outer anchor and Nesterov momentum) is the
    same at full size, bit for bit; then the 2x2 run goes on as 2x3 and commits its rounds."""
    common = {
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context": 32},
        "inner": {"lr": 3e-3, "warmup_steps": 0, "precision": "fp32"},
        "checkpoint": {"every": 1},
    }
    cfg = _islands(tmp_path, corpus_dir, steps=8, transport={"timeout_s": 60, "island_shard": "fsdp"}, **common)
    toml = write_toml(cfg, tmp_path / "run.toml")
    _dilo_run(toml, "--island-ranks=2")
    ckpt = tmp_path / "checkpoints"
    two, three = (_probe(toml, ckpt, 2, k, tmp_path / f"probe{k}.pt") for k in (2, 3))
    assert two["rounds"] == three["rounds"] == 2 and two["momentum"] and two["moments"]  # Nesterov, AdamW
    assert _same(two, three)
    whole = _final(tmp_path, "island0")  # read in one process, at full size
    assert _same(two["params"], whole)
    # the run goes on with islands of 3 ranks
    _dilo_run(toml, "--island-ranks=3", "--steps=12", "--checkpoint.resume=true")
    for name in ("worker0", "worker0.2", "worker1.1"):
        events = [(r["event"], r.get("round")) for r in read_jsonl(tmp_path / "logs" / f"{name}.jsonl")]
        assert ("resume", None) in events and events[-2] == ("round", 3), (name, events)
    assert all(r["committed"] for r in _rounds(tmp_path, "worker0"))
    marker = json.loads((ckpt / "island0" / "round_000003.json").read_text())
    assert marker["ranks"] == 3
    assert not _same(_final(tmp_path, "island0"), whole)  # it trained


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

    cfg = _elastic(tmp_path, corpus_dir, steps=60, membership={"heartbeat_timeout_s": 2.0})
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


def test_offload_keeps_the_anchor_on_the_host_with_the_same_anchors(tmp_path: Path, corpus_dir: Path) -> None:
    """outer.offload through the training loop (threads over real Gloo): the anchors are those of
    the run without it, bit for bit (the placement on a GPU is tests/test_gpu.py's)."""
    from tests.conftest import tiny_config, train_threads

    runs = {}
    for offload in (False, True):
        run = tmp_path / str(offload)
        train_threads(tiny_config(run, corpus_dir, steps=8, outer={"kind": "diloco", "inner_steps": 4,
                                                                   "offload": offload}), 2)  # fmt: skip
        runs[offload] = [r["anchor_hash"] for r in read_jsonl(run / "logs" / "worker0.jsonl") if r["event"] == "round"]
    assert runs[True] == runs[False] and len(runs[True]) == 2


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"membership": {"kind": "coordinator"}}, "with a coordinator the anchor"),
        ({"outer": {"kind": "diloco", "inner_steps": 4, "offload": True, "fragments": 2}}, "Streaming DiLoCo keeps"),
    ],
    ids=["coordinator", "streaming"],
)
def test_offload_config_is_validated(tmp_path: Path, corpus_dir: Path, sections: dict, needle: str) -> None:
    from tests.conftest import tiny_config

    sections.setdefault("outer", {"kind": "diloco", "inner_steps": 4, "offload": True})
    with pytest.raises(ConfigError, match=needle):
        tiny_config(tmp_path, corpus_dir, **sections)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_gpu_benchmark_runs_its_arms_on_the_cpu(tmp_path: Path) -> None:
    """scripts/bench_gpu.py --smoke: the GPU benchmark's arms (a whole-model and an FSDP2 island
    layout of 2 x 2 ranks) on Gloo with a tiny Llama; each sharded rank sends half the bytes."""
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
