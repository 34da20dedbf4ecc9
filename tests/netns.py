"""A few emulated hosts on one machine: network namespaces joined by a bridge, links shaped with
`tc tbf`, and a user-space TCP proxy that adds latency (this kernel has no `netem`).

    with Hosts(3, rate="100mbit") as hosts:          # hosts.addr[i] = 10.77.0.(i + 1)
        proxy = hosts.delay_proxy(0, listen_port=29700, target_port=29600, delay_ms=25)
        p = hosts.spawn(1, [sys.executable, "-m", "dilo.cli", "worker", ...])

Everything is torn down on exit (processes killed, namespaces deleted). Needs root.

    python -m tests.netns proxy LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS   # the delay proxy
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

SUBNET = "10.77.0"


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


class Hosts:
    def __init__(self, n: int, *, rate: str = "", log_dir: Path | None = None) -> None:
        self.n = n
        self.rate = rate
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
        cmd = [sys.executable, "-m", "tests.netns", "proxy", str(listen_port), "127.0.0.1", str(target_port),
               str(delay_ms)]  # fmt: skip
        return self.spawn(host, cmd, name=f"proxy-h{host}")

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


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "proxy":
    asyncio.run(_serve(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]) / 1e3))
