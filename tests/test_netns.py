"""A 3-host elastic run across network namespaces: the coordinator on host 0 behind a delaying
proxy (25 ms each way), workers on hosts 1-3 over links shaped to 100 Mbit/s; one worker is
SIGKILLed mid-run and the others finish. Skipped, with the reason, when namespaces cannot be made
(not root, no iproute2)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dilo.testing import netns
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


_ECHO = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 7000)); s.listen()
c, _ = s.accept()
while d := c.recv(1 << 20):
    if d == b"p" or d.endswith(b"E"):
        c.sendall(b"k")
"""

_PROBE = r"""
import socket, time
c = socket.create_connection(("10.77.0.1", 7000)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.perf_counter(); c.sendall(b"p"); c.recv(1); rtts.append(time.perf_counter() - t)
t = time.perf_counter(); c.sendall(b"x" * (4 << 20) + b"E"); c.recv(1); dt = time.perf_counter() - t
print(min(rtts), (4 << 20) * 8 / 1e6 / max(dt - min(rtts), 1e-6))
"""

_GLOO = r"""
import os, sys, torch, torch.distributed as dist
from datetime import timedelta
r = int(sys.argv[1])
store = dist.TCPStore("10.77.0.1", 29555, 3, is_master=r == 0, timeout=timedelta(seconds=60))
pg = dist.ProcessGroupGloo(dist.PrefixStore("t", store), r, 3, timedelta(seconds=60))
t = torch.full((1 << 18,), float(r + 1))
pg.allreduce([t]).wait()
assert bool((t == 6.0).all()), t[:4]
pg.barrier().wait()
os._exit(0)  # torch may abort while tearing down a group that is still referenced at exit
"""


def _iptables() -> str | None:
    """None when iptables is there (installed with apt-get when it is not); otherwise why not."""
    if netns.latency_available() is None:
        return None
    import shutil
    import subprocess

    if shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "iptables"], capture_output=True)
    return netns.latency_available()


@pytest.mark.timeout(120)
def test_emulated_links_have_the_latency_and_rate_asked_for(tmp_path: Path) -> None:
    """Every TCP connection between hosts crosses a delaying proxy (both directions) and a shaped
    uplink; Gloo's full mesh works through them."""
    why = netns.available() or _iptables()
    if why:
        pytest.skip(why)
    import subprocess

    env = {**_env(), "GLOO_SOCKET_IFNAME": "eth0"}
    with netns.Hosts(3, rate="50mbit", latency_ms=20, log_dir=tmp_path) as hosts:
        hosts.spawn(0, [sys.executable, "-c", _ECHO], name="echo")
        probe = ["ip", "netns", "exec", hosts.names[1], sys.executable, "-c", _PROBE]
        for _ in range(100):  # until the echo server listens
            out = subprocess.run(probe, capture_output=True, text=True, timeout=60)
            if out.returncode == 0:
                break
            time.sleep(0.1)
        assert out.returncode == 0, out.stderr
        rtt, mbit = map(float, out.stdout.split())
        print(f"\nemulated link: round trip {rtt * 1e3:.1f} ms, {mbit:.0f} Mbit/s (asked: 40 ms, 50 Mbit/s)")
        assert 0.040 <= rtt < 0.5 and mbit < 55  # delayed both ways; never faster than the shaper allows
        gloo = [hosts.spawn(i, [sys.executable, "-c", _GLOO, str(i)], env=env, name=f"gloo{i}") for i in range(3)]
        for i, p in enumerate(gloo):
            assert p.wait(timeout=90) == 0, (tmp_path / f"gloo{i}.err").read_text()[-2000:]
