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
from dilo.state import load_worker_state, rounds_of
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
        for w, s in zip(_final(runs["none"], f"worker{i}"), _final(runs["fsdp"], f"worker{i}")):
            torch.testing.assert_close(s, w, rtol=1e-4, atol=1e-5)
    sent = {s: [r["bytes_sent"] for r in _rounds(runs[s], n)] for s, n in (("none", "worker0"), ("fsdp", "worker0"))}
    sent["fsdp.1"] = [r["bytes_sent"] for r in _rounds(runs["fsdp"], "worker0.1")]
    for whole, a, b in zip(sent["none"], sent["fsdp"], sent["fsdp.1"]):
        assert a + b == pytest.approx(whole, rel=0.01) and a == pytest.approx(whole / 2, rel=0.05)
    hashes = [[r["anchor_hash"] for r in _rounds(runs["fsdp"], n)] for n in RANKS]
    assert all(h == hashes[0] for h in hashes)  # one island-wide hash, the same on every rank
    # dilo export / dilo merge read a sharded checkpoint whole
    from dilo.export import load_trained
    from dilo.merge import merge

    ckpt = runs["fsdp"] / "checkpoints"
    _, model = load_trained(ckpt)
    assert _same([p.detach() for p in model.parameters()], _final(runs["fsdp"], "worker0"))
    last = rounds_of(ckpt, "worker0")[-1]
    report = merge([ckpt / f"worker{i}" / f"round_{last:06d}.json" for i in range(2)], tmp_path / "merged.safetensors")
    assert report["variance_corrected"] is False and (tmp_path / "merged.safetensors").is_file()


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
@pytest.mark.timeout(600)
def test_fsdp_checkpoints_resume_on_the_same_and_on_another_layout(tmp_path: Path, corpus_dir: Path) -> None:
    """Sharded islands' DCP checkpoints (int4 with error feedback on the wire, AdamW, Nesterov):
    - a 2x2 run stopped after round 1 and resumed on 2x2 ends on the uninterrupted run's anchors,
      bit for bit (error feedback and AdamW moments included);
    - islands of 3 ranks (uneven shards) resume the 2x2 checkpoint with every tensor (parameters,
      AdamW moments, outer anchor and momentum) equal at full size to the saved one, bit for bit;
    - the 2x2 run then goes on as 2x3 and commits its rounds."""
    common = {
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context": 32},
        "inner": {"lr": 3e-3, "warmup_steps": 0, "min_lr_ratio": 1.0, "precision": "fp32"},
        "codec": {"kind": "int4", "error_feedback": True},
        "checkpoint": {"every": 1},
    }
    cfg = _islands(tmp_path, corpus_dir, steps=8, transport={"timeout_s": 60, "island_shard": "fsdp"}, **common)
    toml = write_toml(cfg, tmp_path / "run.toml")
    whole, part = tmp_path / "whole", tmp_path / "part"
    _dilo_run(toml, "--island-ranks=2", f"--out_dir={whole}")
    _dilo_run(toml, "--island-ranks=2", f"--out_dir={part}", "--steps=4")
    _dilo_run(toml, "--island-ranks=2", f"--out_dir={part}", "--checkpoint.resume=true")
    for name in RANKS:  # the second call resumed at round 1 (a fresh start would match too)
        events = [(r["event"], r.get("round")) for r in read_jsonl(part / "logs" / f"{name}.jsonl")]
        assert [e for e in events if e[0] != "end"] == [("start", None), ("round", 1), ("resume", None), ("round", 2)]
    for name in ("worker0", "worker1"):
        assert _same(_final(whole, name), _final(part, name)), name
    # another layout: 3 ranks read the 2 ranks' checkpoint; compared with it read whole in one process
    saved = load_worker_state(whole / "checkpoints", 2, "worker0")
    got = _probe(toml, whole / "checkpoints", 2, 3, tmp_path / "probe.pt")
    moments = {
        f"{i}.{k}": v for i, st in saved["inner"]["optimizer"]["state"].items() for k, v in st.items() if k != "step"
    }
    assert got["rounds"] == 2 and got["momentum"] and got["moments"]  # Nesterov momentum, AdamW moments
    assert _same(got["params"], saved["params"]) and _same(got["moments"], moments)
    assert _same(got["anchor"], saved["outer"]["anchor"])
    assert _same(got["momentum"], saved["outer"]["sharded"]["momentum_buffer"])
    _dilo_run(toml, "--island-ranks=3", f"--out_dir={whole}", "--steps=12", "--checkpoint.resume=true")
    for name in ("worker0", "worker0.2", "worker1.1"):
        events = [(r["event"], r.get("round")) for r in read_jsonl(whole / "logs" / f"{name}.jsonl")]
        assert ("resume", None) in events and events[-2] == ("round", 3), (name, events)
    assert all(r["committed"] for r in _rounds(whole, "worker0"))
    assert json.loads((whole / "checkpoints" / "worker0" / "round_000003.json").read_text())["ranks"] == 3
    assert not _same(_final(whole, "worker0"), saved["params"])  # it trained


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
