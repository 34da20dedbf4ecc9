"""True multi-process runs: torchrun, `dilo run`, Ctrl+C and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dilo.metrics import read_jsonl

pytestmark = pytest.mark.slow


def _overrides(run_dir: Path, corpus: Path, steps: int = 16, h: int = 4) -> list[str]:
    return [
        f"--steps={steps}",
        "--inner.warmup_steps=2",
        f"--outer.inner_steps={h}",
        "--data.corpus=text",
        f"--data.paths=['{corpus}']",
        "--data.batch_size=4",
        "--data.seq_len=32",
        "--model.n_layer=1",
        "--model.d_model=32",
        "--model.n_head=2",
        "--model.context=32",
        "--log.progress=false",
        "--log.plot=false",
        "--log.eval_batches=4",
        f"--out_dir={run_dir}",
        "--transport.timeout_s=30",
    ]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _dilo_run(*args: str) -> list[str]:
    """`dilo run configs/quickstart.toml ARGS...` as a command line."""
    repo = Path(__file__).resolve().parent.parent
    return [sys.executable, "-m", "dilo.cli", "run", str(repo / "configs" / "quickstart.toml"), *args]


def _hashes(run_dir: Path, rank: int) -> list[str]:
    return [r["anchor_hash"] for r in read_jsonl(run_dir / "logs" / f"worker{rank}.jsonl") if r["event"] == "round"]


def test_torchrun_two_processes(tmp_path: Path, corpus_dir: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "-m",
        "dilo.train",
        str(repo / "configs" / "quickstart.toml"),
        *_overrides(tmp_path, corpus_dir),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["rounds_committed"] == 4
    assert _hashes(tmp_path, 0) == _hashes(tmp_path, 1)


def test_dilo_run_two_workers(tmp_path: Path, corpus_dir: Path) -> None:
    cmd = _dilo_run("--workers", "2", *_overrides(tmp_path, corpus_dir), "--log.plot=true")
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 16
    assert _hashes(tmp_path, 0) == _hashes(tmp_path, 1)
    assert (tmp_path / "loss.png").is_file()


def test_dilo_run_rejects_a_bad_config_before_starting_workers(tmp_path: Path) -> None:
    cmd = _dilo_run("--outer.lr=fast", f"--out_dir={tmp_path}")
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "outer.lr: Input should be a valid number" in proc.stderr
    assert not (tmp_path / "logs").exists()
    for args, why in (
        (["--island-ranks", "2", "--outer.kind=gossip"], "runs one rank per worker"),
        (["--island-ranks", "2", "--outer.kind=ddp"], "islands do not apply"),
        (["--island-ranks", "0"], "--island-ranks must be at least 1"),
    ):
        proc = subprocess.run(_dilo_run(*args, f"--out_dir={tmp_path}"), env=_env(), capture_output=True, text=True)
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr
        assert not (tmp_path / "logs").exists()


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path: Path, corpus_dir: Path) -> None:
    cmd = _dilo_run("--workers", "2", *_overrides(tmp_path, corpus_dir, steps=4000, h=20))
    # a new session, so that the signal reaches the launcher and its workers as a terminal's Ctrl+C would
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    log0 = tmp_path / "logs" / "worker0.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (log0.exists() and '"event": "round"' in log0.read_text()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] and 0 < summary["steps"] < 4000, (summary, err[-3000:])
    stopped_at = summary["steps"]
    # resume and finish a short run from there
    resume = [*cmd, f"--steps={stopped_at + 40}", "--checkpoint.resume=true"]
    proc2 = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    final = json.loads((tmp_path / "summary.json").read_text())
    assert final["steps"] == stopped_at + 40 and not final["stopped"], (final, proc2.stderr[-3000:])
    assert _hashes(tmp_path, 0) == _hashes(tmp_path, 1), proc2.stderr[-3000:]


def test_dilo_run_static_gossip_on_loopback(tmp_path: Path, corpus_dir: Path) -> None:
    """`dilo run` gives each gossip worker a loopback port; no coordinator, no torch.distributed group."""
    cmd = _dilo_run(
        "--workers", "3", *_overrides(tmp_path, corpus_dir), "--outer.kind=gossip", "--outer.inner_steps=4",
        "--outer.final_merge=true",
    )  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = {r: (tmp_path / "logs" / f"worker-rank{r}.jsonl").read_text().splitlines() for r in range(3)}
    finals = {json.loads([x for x in v if '"round"' in x][-1])["anchor_hash"] for v in logs.values()}
    assert len(finals) == 1  # the final merge leaves every worker with the same parameters
