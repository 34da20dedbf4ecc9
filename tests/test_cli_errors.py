"""Bad input on the command line and in the environment: one `dilo: error:` line that says what to
fix, exit code 2, never a traceback; and `dilo run` leaves no process behind when a worker fails."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_config, write_toml


def _dilo(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dilo.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _refused(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    line = next((x for x in p.stderr.splitlines() if x.startswith("dilo: error:")), "")
    assert line, p.stderr[-2000:]
    for needle in needles:
        assert needle in p.stderr, (needle, p.stderr[-2000:])


def _elastic_toml(tmp_path: Path, corpus: Path, **extra: object) -> Path:
    cfg = tiny_config(tmp_path, corpus, workers=2,
                      membership={"kind": "coordinator", "address": "tcp://127.0.0.1:1", "request_timeout_s": 1.0,
                                  "heartbeat_s": 0.2, "heartbeat_timeout_s": 2.0}, **extra)  # fmt: skip
    return write_toml(cfg, tmp_path / "elastic.toml")


def test_a_port_in_use_is_an_error_line(tmp_path: Path, corpus_dir: Path) -> None:
    toml = _elastic_toml(tmp_path, corpus_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = _dilo("coordinator", str(toml), f"--coordinator.bind=tcp://127.0.0.1:{port}")
    _refused(p, f"cannot listen on tcp://127.0.0.1:{port}", "another process listens there")


@pytest.mark.parametrize(
    ("island", "needle"),
    [("5", "DILO_ISLAND='5': give an island number in [0, 2)"), ("abc", "DILO_ISLAND='abc'")],
)
def test_dilo_island_outside_the_workers_is_refused(tmp_path: Path, corpus_dir: Path, island: str, needle: str) -> None:
    p = _dilo("worker", str(_elastic_toml(tmp_path, corpus_dir)), "--id", "w0", env={"DILO_ISLAND": island})
    _refused(p, needle)


def test_auto_island_for_gossip_is_refused(tmp_path: Path, corpus_dir: Path) -> None:
    toml = _elastic_toml(tmp_path, corpus_dir, outer={"kind": "gossip", "inner_steps": 4})
    p = _dilo("worker", str(toml), "--id", "g0", env={"DILO_ISLAND": "auto"})
    _refused(p, "DILO_ISLAND=auto needs a coordinator that hands out islands")


def test_a_gossip_worker_id_cannot_name_a_path(tmp_path: Path, corpus_dir: Path) -> None:
    toml = _elastic_toml(tmp_path, corpus_dir, outer={"kind": "gossip", "inner_steps": 4})
    p = _dilo("worker", str(toml), "--id", "../../x")
    _refused(p, "worker id '../../x' may hold only letters, digits")
    assert not (tmp_path.parent.parent / "x").exists()


def test_dilo_threads_must_be_a_number(tmp_path: Path, corpus_dir: Path) -> None:
    toml = write_toml(tiny_config(tmp_path, corpus_dir), tmp_path / "static.toml")
    p = subprocess.run([sys.executable, "-m", "dilo.train", str(toml)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DILO_THREADS": "abc"})  # fmt: skip
    _refused(p, "DILO_THREADS='abc'")
    _refused(_dilo("worker", str(_elastic_toml(tmp_path, corpus_dir)), env={"DILO_THREADS": "abc"}), "DILO_THREADS")


@pytest.mark.parametrize(
    "args",
    [("status", "tcp://127.0.0.1:1", "--bogus"), ("keys", "KEYDIR", "--forse"), ("config", "schema", "--x=1")],
)
def test_commands_without_overrides_refuse_unknown_flags(tmp_path: Path, args: tuple[str, ...]) -> None:
    args = tuple(a.replace("KEYDIR", str(tmp_path / "keys")) for a in args)
    _refused(_dilo(*args), f"dilo {args[0]}: unknown arguments {args[-1]}")
    assert not (tmp_path / "keys").exists()


@pytest.mark.parametrize("command", ["coordinator", "worker", "run", "sim"])
def test_help_says_that_dotted_overrides_are_accepted(command: str) -> None:
    p = _dilo(command, "--help")
    assert p.returncode == 0 and "--section.key=value" in p.stdout and "--coordinator.bind=" in p.stdout


def test_dilo_sim_refuses_gossip_clearly(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    _refused(_dilo("sim", str(root / "configs" / "gossip.toml")), "dilo sim runs DiLoCo, FedAvg, DDP and async")


@pytest.mark.slow
def test_dilo_run_leaves_no_coordinator_behind_when_a_worker_fails(tmp_path: Path, corpus_dir: Path) -> None:
    """A worker dies at start (its data holds token ids the model's vocabulary cannot embed): `dilo
    run` stops, says which process failed, and its coordinator is gone when it returns."""
    toml = _elastic_toml(tmp_path, corpus_dir)
    p = _dilo("run", str(toml), "--workers=2", "--model.vocab_size=50", timeout=240)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "exited with code" in p.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _running(f"coordinator {toml}"):
        time.sleep(0.2)
    assert not _running(f"coordinator {toml}"), "dilo run left its coordinator running"


def _running(pattern: str) -> bool:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return bool(out.stdout.strip())
