"""A 3-host elastic run across network namespaces: the coordinator on host 0 behind a delaying
proxy (25 ms each way), workers on hosts 1-3 over links shaped to 100 Mbit/s; one worker is
SIGKILLed mid-run and the others finish. Skipped, with the reason, when namespaces cannot be made
(not root, no iproute2)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from dilo import netns
from tests.conftest import REPO, tiny_config, write_toml
from tests.test_elastic import _env, _tail, _wait_for

pytestmark = pytest.mark.slow


def _rounds(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "round"]


@pytest.mark.timeout(150)
def test_elastic_run_across_namespaces_with_a_killed_worker(tmp_path: Path, corpus_dir: Path) -> None:
    why = netns.available()
    if why:
        pytest.skip(why)
    cfg = tiny_config(
        tmp_path / "run",
        corpus_dir,
        workers=3,
        steps=60,
        outer={"kind": "diloco", "inner_steps": 4},
        membership={
            "kind": "coordinator",
            "heartbeat_s": 0.3,
            "heartbeat_timeout_s": 3.0,
            "request_timeout_s": 5.0,
            "round_timeout_s": 30.0,
            "start_quorum": 3,
        },
        coordinator={"bind": "tcp://0.0.0.0:29600"},
    )
    toml = str(write_toml(cfg, tmp_path / "netns.toml"))
    env = {**_env(), "PYTHONPATH": str(REPO)}
    with netns.Hosts(4, rate="100mbit", log_dir=tmp_path) as hosts:
        coord = hosts.spawn(0, [sys.executable, "-m", "dilo.cli", "coordinator", toml], env=env, name="coordinator")
        hosts.delay_proxy(0, listen_port=29700, target_port=29600, delay_ms=25)
        address = f"tcp://{hosts.addr[0]}:29700"
        workers = {
            w: hosts.spawn(
                i + 1,
                [sys.executable, "-m", "dilo.cli", "worker", toml, "--id", w, f"--membership.address={address}"],
                env={**env, "DILO_ISLAND": str(i)},
                name=w,
            )
            for i, w in enumerate(("w0", "w1", "w2"))
        }
        log = tmp_path / "run" / "logs"
        _wait_for("3 rounds of w2", lambda: len(_rounds(log / "worker-w2.jsonl")) >= 3, 90, list(workers.values()))
        os.kill(workers["w2"].pid, signal.SIGKILL)
        workers["w2"].wait(timeout=10)
        for w in ("w0", "w1"):
            try:
                workers[w].wait(timeout=90)
            except Exception:  # noqa: BLE001 - reported with the worker's log
                pytest.fail(f"{w} did not finish:\n{_tail(workers[w])}")
            assert workers[w].returncode == 0, _tail(workers[w])
        coord.send_signal(signal.SIGTERM)
        coord.wait(timeout=30)
    recs = {w: _rounds(log / f"worker-{w}.jsonl") for w in ("w0", "w1")}
    parts = [r["participants"] for r in recs["w0"]]
    rtt = min(r["sync_s"] for r in recs["w0"])
    print(f"\nnetns: participants per round {parts}; fastest round trip through the proxy {rtt * 1e3:.0f} ms")
    assert len(parts) == 15 and parts[0] == 3 and parts[-1] == 2
    assert [r["anchor_hash"] for r in recs["w0"]] == [r["anchor_hash"] for r in recs["w1"]]
    assert rtt >= 0.05  # two 25 ms legs at least: the proxy's latency is in every exchange
