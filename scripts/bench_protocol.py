"""The coordinator protocol's costs, measured over loopback against baselines from the same run.

    .venv/bin/python scripts/bench_protocol.py [--mb 100] [--repeats 3]

1. Throughput: one push of an fp32 pseudo-gradient of `--mb` MB through dilo's protocol and the
   RESULT that comes back (one worker, so the round closes at once), as a ratio to raw pyzmq
   sending the same buffer there and back, and to a memcpy of it. Also with message MACs on.
2. Rounds with 2 to 64 workers (real sockets, a 0.8M-parameter model): time from the first push
   of a round to the last RESULT received and the coordinator's peak memory growth, against raw
   ZeroMQ moving the same bytes (each server in its own process).
3. Time to detect a dead worker and close the round without it (heartbeat_timeout_s = 1 s).
4. Time for a joiner to receive the state of a 10M-parameter model (JOIN -> WELCOME), with and
   without MACs, against raw ZeroMQ sending the same bytes once.

Writes scripts/results/protocol.json and the "protocol" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from dilo import wire  # noqa: E402
from dilo.config import from_dict  # noqa: E402
from dilo.coordinator import Coordinator  # noqa: E402
from dilo.model import param_names, params_of  # noqa: E402
from dilo.outer.star import StarCodec  # noqa: E402
from dilo.session import ClientSession  # noqa: E402
from dilo.transport.zmq_star import tune  # noqa: E402


def gpt_config(name: str, d_model: int, n_layer: int, n_head: int, **extra: object):
    return from_dict(
        {
            "name": name,
            "out_dir": f"/tmp/dilo-bench-protocol/{name}",
            "steps": 10,
            "model": {"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "context": 128},
            "inner": {"warmup_steps": 1},
            "membership": {"heartbeat_s": 0.2, "heartbeat_timeout_s": 1.0, "round_timeout_s": 60.0},
            "coordinator": {"checkpoint_every": 0},
            **extra,
        }
    )


class Served:
    """A coordinator on a random loopback port, served by a thread."""

    def __init__(self, cfg, secret: bytes | None = None) -> None:
        self.coord = Coordinator(cfg, bind="tcp://127.0.0.1:0", secret=secret)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.coord.serve, args=(self.stop,), daemon=True)
        self.thread.start()
        self.address = f"tcp://{self.coord.address}" if "://" not in self.coord.address else self.coord.address

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class RawWorker:
    """The protocol from a worker's side, without training: join, push, wait."""

    def __init__(
        self, ctx: zmq.Context, served: Served, cfg, worker: str, secret: bytes | None = None, session=None
    ) -> None:
        """session: another RawWorker's (a heartbeat socket of the same worker), else a new one."""
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(served.address)
        self.cfg, self.worker, self.secret = cfg, worker, secret
        self.session = session or ClientSession()

    def request(self, type_: wire.MsgType, *, tensors=None, body=None, base: int = -1) -> wire.Message:
        self.send(type_, tensors=tensors, body=body, base=base)
        reply = self.recv()
        if type_ == wire.MsgType.JOIN:
            self.session.established()
        return reply

    def send(self, type_: wire.MsgType, *, tensors=None, body=None, base: int = -1) -> None:
        """Send one message; a JOIN first asks for its challenge (HELLO), as every worker does."""
        msg = wire.Message(type=type_, worker=self.worker, base=base, body=body or {}, tensors=tensors or {})
        if type_ == wire.MsgType.JOIN:
            self._send(self.session.hello(self.worker))
            assert self.session.accept_challenge(self.recv())
            self.session.opening(msg)
        else:
            self.session.stamp(msg)
        self._send(msg)

    def _send(self, msg: wire.Message) -> None:
        msg.run, msg.fp = self.cfg.name, self.cfg.fingerprint()
        self.sock.send_multipart(wire.encode(msg, self.secret), copy=False)

    def recv(self) -> wire.Message:
        reply = wire.decode(
            self.sock.recv_multipart(copy=False),
            secret=self.secret,
            limits=wire.Limits(max_frame_bytes=1 << 31, max_total_bytes=1 << 32),
        )
        assert reply.type != wire.MsgType.ERROR, reply.body
        return reply


def push_tensors(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    from dilo.model import build_model

    model = build_model(cfg.model, 0)
    params = params_of(model)
    star = StarCodec(param_names(model), [p.shape for p in params], cfg.codec, seed=0)
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]
    return star.encode_push(deltas, 0, seed, contributes=True)


def bench_throughput(mb: int, repeats: int) -> dict:
    # a GPT whose parameters weigh about `mb` MB in fp32
    d = 512
    layers = max(1, round(mb * 2**20 / 4 / (12 * d * d)))
    cfg = gpt_config("throughput", d, layers, 8)
    tensors = push_tensors(cfg)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    ctx = zmq.Context()
    out: dict = {"payload_mb": nbytes / 1e6}

    # raw pyzmq: the same bytes there and back
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    raw = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a.send(memoryview(flat.numpy()), copy=False)
        f = b.recv(copy=False)
        b.send(f, copy=False)
        a.recv(copy=False)
        raw.append(time.perf_counter() - t0)
    a.close(0)
    b.close(0)
    out["raw_s"] = min(raw[1:])
    mem = []
    for _ in range(repeats):
        dst = torch.empty_like(flat)
        t0 = time.perf_counter()
        dst.copy_(flat)
        dst.copy_(flat)
        mem.append(time.perf_counter() - t0)
    out["memcpy_s"] = min(mem)

    # the protocol alone: encode, send, receive, validate (sizes, shapes, dtypes, finite), reply, validate
    spec = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
    for label, secret in (("protocol", None), ("protocol_hmac", b"0123456789abcdef0123")):
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        limits = wire.Limits(max_frame_bytes=1 << 31, max_total_bytes=1 << 32)

        def echo(router=router, secret=secret, limits=limits) -> None:
            for _ in range(repeats + 1):
                ident, *frames = router.recv_multipart(copy=False)
                msg = wire.decode(frames, secret=secret, limits=limits)
                wire.check_shapes(msg, spec)
                wire.check_finite(msg)
                reply = wire.Message(type=wire.MsgType.STATE, worker="coordinator", tensors=msg.tensors)
                router.send_multipart([ident, *wire.encode(reply, secret)], copy=False)

        th = threading.Thread(target=echo, daemon=True)
        th.start()
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            dealer.send_multipart(
                wire.encode(wire.Message(type=wire.MsgType.PUSH, worker="w0", tensors=tensors), secret), copy=False
            )
            back = wire.decode(dealer.recv_multipart(copy=False), secret=secret, limits=limits)
            wire.check_finite(back)
            times.append(time.perf_counter() - t0)
        th.join()
        router.close(0)
        dealer.close(0)
        out[f"{label}_s"] = min(times[1:])

    for label, secret in (("dilo", None), ("dilo_hmac", b"0123456789abcdef0123")):
        served = Served(cfg, secret)
        w = RawWorker(ctx, served, cfg, "w0", secret)
        welcome = w.request(wire.MsgType.JOIN)
        version = int(welcome.body["version"])
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            reply = w.request(wire.MsgType.PUSH, tensors=tensors, body={"weight": 1.0, "tokens": 1}, base=version)
            times.append(time.perf_counter() - t0)
            version = int(reply.body["version"])
        w.sock.close(0)
        served.close()
        out[f"{label}_s"] = min(times[1:])
    ctx.term()
    out["protocol_vs_raw"] = out["raw_s"] / out["protocol_s"]
    out["protocol_hmac_vs_raw"] = out["raw_s"] / out["protocol_hmac_s"]
    out["protocol_vs_memcpy"] = out["memcpy_s"] / out["protocol_s"]
    out["dilo_vs_raw"] = out["raw_s"] / out["dilo_s"]
    out["dilo_hmac_vs_raw"] = out["raw_s"] / out["dilo_hmac_s"]
    out["dilo_vs_memcpy"] = out["memcpy_s"] / out["dilo_s"]
    out["raw_vs_memcpy"] = out["memcpy_s"] / out["raw_s"]
    return out


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _serve_coordinator(cfg, ready, stop) -> None:
    """A child process: a coordinator on a loopback port until `stop` is set."""
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    ready.put(coord.address if "://" in coord.address else f"tcp://{coord.address}")
    coord.serve(stop)


def _serve_raw(n: int, reply_bytes: int, ready, stop) -> None:
    """A child process: raw ZeroMQ with the coordinator's traffic and no protocol: collect n
    messages, then answer each with reply_bytes (a RESULT of the same size)."""
    ctx = zmq.Context()
    sock = tune(ctx.socket(zmq.ROUTER))
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ready.put(f"tcp://127.0.0.1:{port}")
    reply = bytes(reply_bytes)
    waiting: list[bytes] = []
    while not stop.is_set():
        if not sock.poll(50):
            continue
        frames = sock.recv_multipart(copy=False)
        waiting.append(frames[0].bytes)
        if len(waiting) == n:
            for identity in waiting:
                sock.send_multipart([identity, reply], copy=False)
            waiting = []
    sock.close(0)
    ctx.term()


def bench_rounds(sizes: list[int], rounds: int) -> dict:
    """Round latency and the coordinator's peak memory with n workers, against raw ZeroMQ moving
    the same bytes (each in a process of its own, so that its peak RSS is its own)."""
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    cfg = gpt_config("rounds", 128, 4, 4)
    tensors = push_tensors(cfg)
    push_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    flat = [t.contiguous().view(torch.uint8).numpy() for t in tensors.values()]
    out = {}
    for n in sizes:
        row: dict[str, float] = {}
        for kind in ("raw", "dilo"):
            ready, stop = spawn.Queue(), spawn.Event()
            target = _serve_raw if kind == "raw" else _serve_coordinator
            args = (n, push_bytes, ready, stop) if kind == "raw" else (cfg, ready, stop)
            proc = spawn.Process(target=target, args=args, daemon=True)
            proc.start()
            address = ready.get(timeout=120)
            time.sleep(0.5)
            base_mb = _peak_rss_mb(proc.pid or 0)
            ctx = zmq.Context()
            lat = []
            if kind == "raw":
                socks = []
                for _ in range(n):
                    s = tune(ctx.socket(zmq.DEALER))
                    s.connect(address)
                    socks.append(s)
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    for s in socks:
                        s.send_multipart([b"push", *flat], copy=False)
                    for s in socks:
                        s.recv_multipart(copy=False)
                    lat.append(time.perf_counter() - t0)
                for s in socks:
                    s.close(0)
            else:
                served = type("Served", (), {"address": address})()
                workers = [RawWorker(ctx, served, cfg, f"w{i:02d}") for i in range(n)]
                version = 0
                for w in workers:
                    version = int(w.request(wire.MsgType.JOIN).body["version"])
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    for w in workers:
                        w.send(wire.MsgType.PUSH, tensors=tensors, body={"weight": 1.0, "tokens": 1}, base=version)
                    replies = [w.recv() for w in workers]
                    lat.append(time.perf_counter() - t0)
                    version = int(replies[0].body["version"])
                for w in workers:
                    w.sock.close(0)
            ctx.term()
            peak = _peak_rss_mb(proc.pid or 0)
            stop.set()
            proc.join(timeout=30)
            row[f"{kind}_median_s"] = statistics.median(lat[1:])
            row[f"{kind}_peak_growth_mb"] = peak - base_mb
        row["dilo_vs_raw"] = row["dilo_median_s"] / row["raw_median_s"]
        out[n] = row
        print(f"[bench] {n} workers: {row}", file=sys.stderr, flush=True)
    return {"push_mb": push_bytes / 1e6, "by_workers": out}


def bench_dead_worker() -> dict:
    cfg = gpt_config("dead", 128, 2, 4)
    tensors = push_tensors(cfg)
    served = Served(cfg)
    ctx = zmq.Context()
    alive, dead = RawWorker(ctx, served, cfg, "alive"), RawWorker(ctx, served, cfg, "dead")
    version = int(alive.request(wire.MsgType.JOIN).body["version"])
    dead.request(wire.MsgType.JOIN)
    dead.sock.close(0)  # the dead worker never pushes and never heartbeats again
    stop = threading.Event()

    def heartbeats() -> None:
        # a socket and session of their own, opened by the first HEARTBEAT (as dilo's heartbeat thread does)
        hb = RawWorker(ctx, served, cfg, "alive")
        hb._send(hb.session.hello("alive"))
        assert hb.session.accept_challenge(hb.recv())
        opening = True
        while not stop.is_set():
            msg = wire.Message(type=wire.MsgType.HEARTBEAT, worker="alive")
            hb.session.opening(msg) if opening else hb.session.stamp(msg)
            if opening:
                hb.session.established()
                opening = False
            hb._send(msg)
            hb.recv()
            time.sleep(0.2)
        hb.sock.close(0)

    t = threading.Thread(target=heartbeats, daemon=True)
    t.start()
    t0 = time.perf_counter()
    reply = alive.request(wire.MsgType.PUSH, tensors=tensors, body={"weight": 1.0, "tokens": 1}, base=version)
    closed = time.perf_counter() - t0
    stop.set()
    t.join()
    alive.sock.close(0)
    ctx.term()
    served.close()
    return {
        "heartbeat_timeout_s": cfg.membership.heartbeat_timeout_s,
        "close_after_s": closed,
        "participants": reply.body["participants"],
        "members_after": reply.body["members"],
    }


def bench_join(repeats: int) -> dict:
    cfg = gpt_config("join", 448, 4, 7)
    out: dict = {}
    for label, secret in (("join", None), ("join_mac", b"0123456789abcdef0123")):
        served = Served(cfg, secret=secret)
        ctx = zmq.Context()
        n_params = sum(p.numel() for p in served.coord.params)
        times, state_bytes = [], 0
        for i in range(repeats + 1):
            w = RawWorker(ctx, served, cfg, f"joiner{i}", secret=secret)
            t0 = time.perf_counter()
            welcome = w.request(wire.MsgType.JOIN)
            times.append(time.perf_counter() - t0)
            state_bytes = sum(t.numel() * t.element_size() for t in welcome.tensors.values())
            assert len(welcome.tensors) >= len(served.coord.params)
            w.sock.close(0)
        ctx.term()
        served.close()
        out.update({"params": n_params, "state_mb": state_bytes / 1e6, f"{label}_s": min(times[1:]),
                    f"{label}_median_s": statistics.median(times[1:])})  # fmt: skip
    # raw ZeroMQ: the same bytes once, from a ROUTER to a DEALER that asked for them
    ctx = zmq.Context()
    router, dealer = tune(ctx.socket(zmq.ROUTER)), tune(ctx.socket(zmq.DEALER))
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    payload = torch.zeros(int(out["state_mb"] * 1e6), dtype=torch.uint8).numpy()
    raw = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dealer.send(b"join")
        identity, _ = router.recv_multipart()
        router.send_multipart([identity, payload], copy=False)
        dealer.recv(copy=False)
        raw.append(time.perf_counter() - t0)
    router.close(0)
    dealer.close(0)
    ctx.term()
    out["raw_s"] = min(raw[1:])
    out["join_vs_raw"] = out["join_s"] / out["raw_s"]
    out["join_mac_vs_raw"] = out["join_mac_s"] / out["raw_s"]
    out["join_gb_s"] = out["state_mb"] / 1e3 / out["join_s"]
    out["join_mac_gb_s"] = out["state_mb"] / 1e3 / out["join_mac_s"]
    out["raw_gb_s"] = out["state_mb"] / 1e3 / out["raw_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    res = {
        "machine": machine(),
        "throughput": bench_throughput(args.mb, args.repeats),
        "rounds": bench_rounds([2, 8, 16, 32, 64], args.rounds),
        "dead_worker": bench_dead_worker(),
        "join": bench_join(args.repeats),
    }
    write_json("protocol", res)
    th, dead, join = res["throughput"], res["dead_worker"], res["join"]
    t1 = markdown_table(
        ["path", "push + result (s)", "vs raw pyzmq", "vs memcpy"],
        [
            ["raw pyzmq, same bytes there and back", f"{th['raw_s']:.3f}", "1.00", f"{th['raw_vs_memcpy']:.3f}"],
            [
                "dilo protocol (encode, validate, decode)",
                f"{th['protocol_s']:.3f}",
                f"{th['protocol_vs_raw']:.2f}",
                f"{th['protocol_vs_memcpy']:.3f}",
            ],
            ["dilo protocol + MAC", f"{th['protocol_hmac_s']:.3f}", f"{th['protocol_hmac_vs_raw']:.2f}", "-"],
            [
                "full round through a coordinator (+ mean, outer step, hash)",
                f"{th['dilo_s']:.3f}",
                f"{th['dilo_vs_raw']:.2f}",
                f"{th['dilo_vs_memcpy']:.3f}",
            ],
            ["full round + MAC", f"{th['dilo_hmac_s']:.3f}", f"{th['dilo_hmac_vs_raw']:.2f}", "-"],
        ],
    )
    rounds = res["rounds"]["by_workers"]
    t2 = markdown_table(
        ["workers", "round (ms)", "raw ZeroMQ, same bytes (ms)", "vs raw", "coordinator peak memory growth (MB)",
         "raw ZeroMQ's (MB)"],
        [[str(n), f"{1e3 * v['dilo_median_s']:.1f}", f"{1e3 * v['raw_median_s']:.1f}", f"{v['dilo_vs_raw']:.2f}x",
          f"{v['dilo_peak_growth_mb']:.0f}", f"{v['raw_peak_growth_mb']:.0f}"] for n, v in rounds.items()],
    )  # fmt: skip
    update_benchmarks_md(
        "protocol",
        f"""
## Coordinator protocol (`scripts/bench_protocol.py`)

Loopback, {res["machine"]["cpus"]} CPU cores, {res["machine"]["date"]}, torch {res["machine"]["torch"]}.

One push of a {th["payload_mb"]:.0f} MB fp32 pseudo-gradient and a {th["payload_mb"]:.0f} MB reply. "Protocol"
is dilo's framing and validation alone (an echo server that decodes and checks every message);
"full round" goes through a real coordinator with one worker, so it adds the decode, the mean,
the outer Nesterov step and the anchor hash:

{t1}

Rounds with many workers, the protocol alone: the workers (sockets driven from one thread) push
a 0.8M-parameter model's fp32 pseudo-gradient ({res["rounds"]["push_mb"]:.1f} MB) and wait for the
RESULT; no training. The baseline is raw ZeroMQ moving the same bytes (a ROUTER that collects
the pushes and answers each with as many bytes), each server in a process of its own, whose peak
RSS growth over the rounds is the memory column:

{t2}

A worker that dies silently (heartbeat_timeout_s = {dead["heartbeat_timeout_s"]:.0f} s): the round closed
{dead["close_after_s"]:.2f} s after the survivor's push, with {dead["participants"]} participant.
A joiner received the state of a {join["params"] / 1e6:.1f}M-parameter model ({join["state_mb"]:.0f} MB) in
{1e3 * join["join_s"]:.0f} ms ({join["join_gb_s"]:.2f} GB/s; median {1e3 * join["join_median_s"]:.0f} ms), with MACs in
{1e3 * join["join_mac_s"]:.0f} ms ({join["join_mac_gb_s"]:.2f} GB/s): {join["join_vs_raw"]:.2f}x and
{join["join_mac_vs_raw"]:.2f}x the {1e3 * join["raw_s"]:.0f} ms raw ZeroMQ takes to send the same bytes once
({join["raw_gb_s"]:.2f} GB/s).

Raw results: `scripts/results/protocol.json`.
""",
    )
    print(t1)
    print(t2)
    print(dead, join)


if __name__ == "__main__":
    main()
