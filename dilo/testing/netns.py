"""Emulated hosts on one Linux machine: network namespaces joined by a bridge, each host's uplink
shaped with `tc tbf`, and latency added in user space (the kernel of our CI machines has no
`netem`). For multi-host tests and the WAN benchmark; needs root.

    with Hosts(4, rate="100mbit", latency_ms=50) as hosts:   # hosts.addr[i] = 10.77.0.(i + 1)
        p = hosts.spawn(1, [sys.executable, "-m", "dilo.cli", "worker", ...])

rate: every host's egress (its uplink), e.g. "100mbit", "1gbit". latency_ms: one-way delay added
to every TCP connection between two hosts, in each direction (a round trip gains twice that):
each host's outgoing TCP connections to the other hosts are redirected (iptables REDIRECT) to a
transparent proxy in its own namespace, which connects to the original destination and releases
every chunk latency_ms after it arrived. Where the kernel has `netem`, `tc qdisc ... netem delay`
does the same job in the kernel.

Everything is torn down on exit (processes killed, namespaces deleted).

    python -m dilo.testing.netns proxy LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS   # a fixed-target proxy
    python -m dilo.testing.netns delay PORT DELAY_MS                                  # the transparent one
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SUBNET = "10.77.0"
PROXY_PORT = 15001
"""Where each host's transparent delay proxy listens."""
_MARK = 0x77
"""The proxy's own connections carry this firewall mark, so they are not redirected again."""


def available() -> str | None:
    """None when namespaces can be made here; otherwise why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) is not installed"
    probe = f"dilo-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


def latency_available() -> str | None:
    """None when latency can be emulated (iptables with REDIRECT); otherwise why not."""
    if not shutil.which("iptables"):
        return "iptables is not installed (apt-get install iptables): latency needs its REDIRECT target"
    return None


class Hosts:
    def __init__(self, n: int, *, rate: str = "", latency_ms: float = 0.0, log_dir: Path | None = None) -> None:
        self.n = n
        self.rate = rate
        self.latency_ms = latency_ms
        self.tag = secrets.token_hex(2)
        self.switch = f"dilo-sw-{self.tag}"
        self.names = [f"dilo-h{i}-{self.tag}" for i in range(n)]
        self.addr = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> Hosts:
        try:
            _ip("netns", "add", self.switch)
            _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
            _ip("link", "set", "br0", "up", ns=self.switch)
            for i, name in enumerate(self.names):
                _ip("netns", "add", name)
                _ip("link", "add", f"v{i}-{self.tag}", "type", "veth", "peer", "name", f"p{i}-{self.tag}")
                _ip("link", "set", f"v{i}-{self.tag}", "netns", name)
                _ip("link", "set", f"p{i}-{self.tag}", "netns", self.switch)
                _ip("link", "set", f"p{i}-{self.tag}", "master", "br0", ns=self.switch)
                _ip("link", "set", f"p{i}-{self.tag}", "up", ns=self.switch)
                _ip("link", "set", f"v{i}-{self.tag}", "name", "eth0", ns=name)
                _ip("addr", "add", f"{self.addr[i]}/24", "dev", "eth0", ns=name)
                _ip("link", "set", "eth0", "up", ns=name)
                _ip("link", "set", "lo", "up", ns=name)
                if self.rate:
                    shape = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.rate,
                             "burst", "64kb", "latency", "400ms"]  # fmt: skip
                    subprocess.run(["ip", "netns", "exec", name, *shape], check=True, capture_output=True)
            if self.latency_ms > 0:
                why = latency_available()
                if why:
                    raise RuntimeError(why)
                for i, name in enumerate(self.names):
                    self._delay_outgoing(i, name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def spawn(
        self, host: int, cmd: list[str], *, env: dict[str, str] | None = None, name: str = ""
    ) -> subprocess.Popen[Any]:
        """Run cmd inside host's namespace; stderr to log_dir/NAME.err when log_dir is set."""
        err: Any = subprocess.DEVNULL
        if self.log_dir is not None and name:
            err = open(self.log_dir / f"{name}.err", "w")  # noqa: SIM115 - the child keeps its own descriptor
        p = subprocess.Popen(
            ["ip", "netns", "exec", self.names[host], *cmd],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        if err is not subprocess.DEVNULL:
            err.close()
            p.err_path = self.log_dir / f"{name}.err"  # type: ignore[attr-defined,operator]
        self.procs.append(p)
        return p

    def delay_proxy(self, host: int, *, listen_port: int, target_port: int, delay_ms: float) -> subprocess.Popen[Any]:
        """A TCP proxy in host's namespace: listen_port -> 127.0.0.1:target_port, each chunk delayed."""
        cmd = [sys.executable, "-m", "dilo.testing.netns", "proxy", str(listen_port), "127.0.0.1", str(target_port),
               str(delay_ms)]  # fmt: skip
        return self.spawn(host, cmd, name=f"proxy-h{host}")

    def _delay_outgoing(self, host: int, name: str) -> None:
        """Send host's TCP connections to the other hosts through its transparent delay proxy."""
        rule = ["iptables", "-t", "nat", "-A", "OUTPUT", "-o", "eth0", "-p", "tcp", "-d", f"{SUBNET}.0/24",
                "-m", "mark", "!", "--mark", str(_MARK), "-j", "REDIRECT", "--to-ports", str(PROXY_PORT)]  # fmt: skip
        proc = subprocess.run(["ip", "netns", "exec", name, *rule], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"iptables REDIRECT in {name}: {proc.stderr.strip()}")
        here = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(here), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "dilo.testing.netns", "delay", str(PROXY_PORT), str(self.latency_ms)]
        self.spawn(host, cmd, env=env, name=f"delay-h{host}")
        deadline = time.monotonic() + 30
        # ask the kernel whether it listens (a probe connection would be "redirected" to itself)
        probe = ["ip", "netns", "exec", name, "ss", "-Hltn", f"sport = :{PROXY_PORT}"]
        while not subprocess.run(probe, capture_output=True, text=True).stdout.strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the delay proxy of host {host} did not start listening")
            time.sleep(0.2)

    def __exit__(self, *exc: Any) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for name in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


# ---------------------------------------------------------------------------------------------
# the delay proxy


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Forward chunks, each released delay_s after it arrived (order kept; no added serialisation)."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def sender() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(sender())
    try:
        while data := await reader.read(1 << 16):
            await queue.put((loop.time() + delay_s, data))
    finally:
        await queue.put((0.0, b""))
        await task


async def _serve(listen_port: int, host: str, port: int, delay_s: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            _pipe(client_r, server_w, delay_s), _pipe(server_r, client_w, delay_s), return_exceptions=True
        )

    server = await asyncio.start_server(handle, "0.0.0.0", listen_port)
    async with server:
        await server.serve_forever()


_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


async def _serve_transparent(port: int, delay_s: float) -> None:
    """Accept the redirected connections, reach each one's original destination, delay both ways."""
    loop = asyncio.get_running_loop()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        raw = client_w.get_extra_info("socket").getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
        target = (socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big"))
        if target == client_w.get_extra_info("sockname")[:2]:  # not redirected: someone dialled us directly
            client_w.close()
            return
        out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, _MARK)
        out.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out.setblocking(False)
        try:
            await loop.sock_connect(out, target)
            server_r, server_w = await asyncio.open_connection(sock=out)
        except OSError:
            out.close()
            client_w.close()
            return
        await asyncio.gather(
            _pipe(client_r, server_w, delay_s), _pipe(server_r, client_w, delay_s), return_exceptions=True
        )

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "proxy":
        asyncio.run(_serve(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]) / 1e3))
    elif len(sys.argv) == 4 and sys.argv[1] == "delay":
        asyncio.run(_serve_transparent(int(sys.argv[2]), float(sys.argv[3]) / 1e3))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
