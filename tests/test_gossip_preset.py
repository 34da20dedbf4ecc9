"""configs/gossip.toml: it loads, it is a gossip run, and a tiny override of it trains over
loopback (`dilo run` fills in one listening port per worker when membership.peers is empty)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dilo.config import GossipConfig, load

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "configs" / "gossip.toml"
TINY = [
    "--steps=8",
    "--workers=2",
    "--outer.inner_steps=4",
    "--inner.warmup_steps=1",
    "--model.n_layer=1",
    "--model.d_model=32",
    "--model.context=32",
    "--data.seq_len=32",
    "--data.batch_size=4",
    "--log.eval_batches=2",
    "--log.eval_every=1",
    "--log.plot=false",
    "--checkpoint.every=0",
]


def test_gossip_preset_loads_and_validates() -> None:
    cfg = load(str(PRESET))
    assert isinstance(cfg.outer, GossipConfig)
    assert cfg.workers == 4 and cfg.outer.topology == "ring" and cfg.outer.final_merge
    assert cfg.membership.kind == "static" and cfg.membership.peers == []  # filled in by `dilo run`
    assert cfg.steps % cfg.outer.inner_steps == 0 and cfg.inner.warmup_steps < cfg.steps


@pytest.mark.slow
def test_gossip_preset_runs_tiny_on_loopback(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dilo.cli", "run", str(PRESET), *TINY, f"--out_dir={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # about 15 s of CPU; the rest is starting 3 processes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "gossip" and summary["workers"] == 2
    assert summary["rounds_committed"] == summary["rounds"] == 2
    assert summary["val_loss"] < summary["initial_val_loss"]
