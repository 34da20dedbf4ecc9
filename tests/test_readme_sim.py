"""The README's `dilo sim ... --sim.events=...` example, run as written there (with fewer steps,
so the test stays short): the crash it schedules happens, as sim.json's `crashed` records."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 100
"""Instead of async.toml's 800. The async run's budget is steps x workers inner steps in all,
shared by speed (0.1 s a step, slowdowns 1, 1, 2, 4: 27.5 steps per virtual second), so 100 steps
last about 15 virtual s, past the README's 10 s (800 steps: about 115 s). The full command takes
minutes on 2 cores; this one, with a tiny model (virtual time does not depend on it), seconds."""
TINY = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=2", "--model.context=32", "--data.seq_len=32",
        "--data.batch_size=4", "--log.eval_batches=2"]  # fmt: skip


def readme_sim_events_command() -> list[str]:
    lines = [
        x for x in (REPO / "README.md").read_text().splitlines() if x.startswith("dilo sim ") and "--sim.events=" in x
    ]
    assert len(lines) == 1, lines
    return shlex.split(lines[0], comments=True)


def test_the_readme_line_is_found_and_parsed() -> None:
    argv = readme_sim_events_command()
    assert argv[:3] == ["dilo", "sim", "configs/async.toml"]
    events = next(a for a in argv if a.startswith("--sim.events="))
    assert "crash" in events and "at_s=" in events


@pytest.mark.slow
def test_the_readme_crash_happens(tmp_path: Path) -> None:
    argv = readme_sim_events_command()
    cmd = [sys.executable, "-m", "dilo.cli", *argv[1:], f"--steps={STEPS}", f"--out_dir={tmp_path}", "--log.plot=false",
           *TINY]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sim = json.loads((tmp_path / "sim.json").read_text())
    worker = int(next(a for a in argv if a.startswith("--sim.events=")).split("worker=")[1].split(",")[0])
    assert sim["crashed"] == [worker], sim["crashed"]
