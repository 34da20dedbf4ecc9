"""Every strategy under injected faults (dilo/testing/faults/), over real parts: Gloo groups of threads,
ZeroMQ sockets on loopback, a `dilo worker` process where a kill must be real.

1. The link itself: a deterministic plan, non-blocking delays, reordering, partitions, kills,
   garbage that cannot be peeked.
2. Static worlds (DiLoCo, FedAvg, DDP over Gloo): a peer that dies or hangs mid-exchange. The
   survivors' round fails with the right error (PeerLost / SyncTimeout) and leaves no trace:
   parameters on the anchor, anchor and error-feedback memory as before the round.
3. Elastic star DiLoCo and async local SGD through a `FaultyLink` in front of the coordinator:
   duplicates, drops, corruption, delays and reordering, a partition longer than the heartbeat
   timeout, a worker process SIGKILLed right after its push reached the coordinator.
4. Gossip with every peer's listener behind a `FaultyLink`.

Assertions are about outcomes (the run ends, every worker's anchor is the coordinator's anchor
of the version it holds, versions never go backwards, rejections are counted), never about
durations. Timeouts are short and set in the configs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import zmq
from torch import nn

from dilo import wire
from dilo.config import CodecConfig, RunConfig
from dilo.coordinator import Coordinator
from dilo.errors import PeerLost, SyncTimeout
from dilo.model import params_of
from dilo.outer.base import Tail, tensor_digest
from dilo.outer.ddp import DDP
from dilo.outer.diloco import DiLoCo
from dilo.testing.faults import CollectiveFault, FaultyLink, FaultyTransport, Rule, peek
from dilo.train import train
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from dilo.worlds import ElasticWorld, GossipWorld, Placement
from tests.conftest import run_workers, tiny_config, write_toml
from tests.test_elastic import FAST, _env, _log, _reaped, _records, _serving, _spawn, _tail

SECRET = b"faults-secret-0123456789abcdef"


# ==========================================================================================
# 1. the link


def _echo_server(ctx: zmq.Context, stop: threading.Event) -> tuple[str, threading.Thread]:
    """A ROUTER that sends every message straight back to its sender."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve() -> None:
        while not stop.is_set():
            if sock.poll(20):
                sock.send_multipart(sock.recv_multipart())
        sock.close(0)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return address, t


@contextlib.contextmanager
def _echo() -> Iterator[tuple[zmq.Context, str]]:
    ctx = zmq.Context()
    stop = threading.Event()
    address, t = _echo_server(ctx, stop)
    try:
        yield ctx, address
    finally:
        stop.set()
        t.join(timeout=5)
        ctx.term()


def _msg(kind: wire.MsgType, n: int, secret: bytes | None = None) -> list[bytes]:
    m = wire.Message(type=kind, worker="w0", seq=n, body={"n": n}, tensors={"x": torch.full((64,), float(n))})
    return [bytes(f) for f in wire.encode(m, secret)]


def _client(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def _receive(sock: zmq.Socket, n: int, secret: bytes | None = None) -> list[int | str]:
    """The body numbers of the next n messages; "bad:<code>" for one that fails validation."""
    out: list[int | str] = []
    for _ in range(n):
        assert sock.poll(10_000), f"only {len(out)} of {n} messages came back: {out}"
        try:
            out.append(int(wire.decode(sock.recv_multipart(), secret=secret).body["n"]))
        except wire.WireError as e:
            out.append(f"bad:{e.code}")
    return out


def _wait_until(what: str, cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.01)


PLAN = [
    Rule("drop", types="push", direction="to_server", nth=2),
    Rule("duplicate", types="push", direction="to_server", nth=4),
    Rule("corrupt", types="push", direction="to_server", nth=6, frame=-1),
    Rule("delay", types="push", direction="to_server", nth=7, delay_s=0.6),
    Rule("drop", types="heartbeat", direction="to_client", nth=1),  # the echo of the heartbeat
]


def _run_plan(seed: int) -> tuple[list[int | str], list[tuple[str, str, str]], dict[str, int]]:
    with _echo() as (ctx, address), FaultyLink(address, PLAN, seed=seed) as link:
        sock = _client(ctx, link.address)
        for n in range(1, 9):  # one connection keeps its order: the plan sees 1..8, then the heartbeat
            sock.send_multipart(_msg(wire.MsgType.PUSH, n, SECRET))
        sock.send_multipart(_msg(wire.MsgType.HEARTBEAT, 9, SECRET))
        got = _receive(sock, 8, SECRET)
        assert not sock.poll(200), "more came back than the plan lets through"
        sock.close(0)
        events = [(e.direction, e.type, e.action) for e in link.events() if e.action != "forwarded"]
        return got, events, link.counts()


def test_link_applies_a_deterministic_plan_in_both_directions() -> None:
    got, events, counts = _run_plan(seed=3)
    # 2 dropped on the way in; 4 twice; 6 corrupted (a byte of its tensor frame: the HMAC fails);
    # 7 delayed without holding up 8 and the heartbeat, whose echo is dropped on the way out
    assert got == [1, 3, 4, 4, 5, "bad:auth", 8, 7]
    assert counts == {"forwarded": 17, "dropped": 2, "duplicated": 1, "corrupted": 1, "delayed": 1}
    assert events == [
        ("to_server", "push", "dropped"),
        ("to_server", "push", "duplicated"),
        ("to_server", "push", "corrupted"),
        ("to_server", "push", "delayed"),
        ("to_client", "heartbeat", "dropped"),
    ]
    assert _run_plan(seed=3) == (got, events, counts)


def test_link_reorders_partitions_heals_and_kills() -> None:
    killed: list[Any] = []
    rules = [
        Rule("reorder", types="heartbeat", direction="to_client", nth=1),
        Rule("kill", types="leave", nth=1, deliver=False, callback=killed.append),
    ]
    with _echo() as (ctx, address), FaultyLink(address, rules) as link:
        sock = _client(ctx, link.address)
        sock.send_multipart(_msg(wire.MsgType.HEARTBEAT, 1))
        _wait_until("the held echo", lambda: link.counts().get("reordered") == 1)
        sock.send_multipart(_msg(wire.MsgType.HEARTBEAT, 2))
        assert _receive(sock, 2) == [2, 1]  # the first echo waited for the second
        link.partition()
        sock.send_multipart(_msg(wire.MsgType.HEARTBEAT, 3))
        _wait_until("the cut message", lambda: link.counts().get("partitioned") == 1)
        assert link.partitioned and not sock.poll(100)
        link.heal()
        sock.send_multipart(_msg(wire.MsgType.HEARTBEAT, 4))
        assert _receive(sock, 1) == [4]
        sock.send_multipart(_msg(wire.MsgType.LEAVE, 5))
        _wait_until("the kill", lambda: bool(killed))
        assert killed[0].type == "leave" and killed[0].worker == "w0" and killed[0].direction == "to_server"
        assert not sock.poll(100)  # deliver=False: the message died with its sender
        sock.send_multipart(_msg(wire.MsgType.LEAVE, 6))  # nth=1: the rule acted once
        assert _receive(sock, 1) == [6]
        sock.close(0)


def test_link_passes_what_it_cannot_peek_and_peek_never_raises() -> None:
    g = torch.Generator().manual_seed(0)
    samples: list[list[bytes]] = [[b""], [b"\xc1"], [b"\x92\xc4\x01x"], [b"\x92\xc4\x02\x81\xa4\xc0"]]
    for _ in range(300):
        n = int(torch.randint(0, 80, (1,), generator=g))
        samples.append([bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())])
    frames = _msg(wire.MsgType.PUSH, 1)
    for i in range(0, len(frames[0]), 3):  # every truncation of a real envelope
        samples.append([frames[0][:i]])
    for s in samples:
        t, w = peek(s)
        assert isinstance(t, str) and isinstance(w, str)
    assert peek(frames) == ("push", "w0")
    with _echo() as (ctx, address), FaultyLink(address, [Rule("drop", types="push", times=None)]) as link:
        sock = _client(ctx, link.address)
        sock.send_multipart([b"\xc1garbage", b"more"])
        assert sock.poll(10_000) and sock.recv_multipart() == [b"\xc1garbage", b"more"]
        assert link.seen("to_server", "") == 1
        sock.close(0)


# ==========================================================================================
# 2. static worlds over Gloo: a peer dies or hangs mid-exchange

GLOO_TIMEOUT_S = 1.5


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))


def _local_steps(model: nn.Module, rank: int, round_idx: int, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1000 * rank + round_idx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def _feedback(outer: DiLoCo) -> list[torch.Tensor]:
    """Every error-feedback memory of the exchange: the workers' residuals and the shard owners'."""
    out: list[torch.Tensor] = []
    for g in outer.exchange.groups:
        out += [r for _, r in sorted(getattr(g.codec, "residuals", {}).items())]
        out += [g.owner_residual] if g.owner_residual is not None else []
        out += list(g.lowrank_residual)
    return out


class _Shared:
    """What the rank threads of one test share: the transports, and who has finished its round."""

    def __init__(self, n: int) -> None:
        self.transports: dict[int, FaultyTransport] = {}
        self.done = threading.Barrier(n)
        self.lock = threading.Lock()
        self.survivors_done = 0


def _diloco_round_with_a_failing_peer(
    world: Placement, *, fault: CollectiveFault, victim: int, codec: dict[str, Any], fedavg: bool, shared: _Shared
) -> dict[str, Any]:
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = FaultyTransport(TorchDistTransport(store, world.rank, world.size, timeout_s=GLOO_TIMEOUT_S))
    shared.transports[world.rank] = t
    model = _mlp()
    lr, momentum = (1.0, 0.0) if fedavg else (0.7, 0.9)
    outer = DiLoCo(
        model, t, inner_steps=3, lr=lr, momentum=momentum, nesterov=not fedavg, codec=CodecConfig(**codec), seed=1
    )
    outer.broadcast_initial(model)
    tail = Tail(weight=1.0, contributes=True, stop=False, tokens=48)
    _local_steps(model, world.rank, 0)
    first = outer.sync(model, tail=tail)
    before = {"anchor": outer.anchor.digest(), "feedback": [r.clone() for r in _feedback(outer)]}
    if world.rank == victim:
        t.inject(fault)
    _local_steps(model, world.rank, 1)
    report = outer.sync(model, tail=tail)
    if world.rank != victim:
        with shared.lock:
            shared.survivors_done += 1
            if shared.survivors_done == world.size - 1:
                shared.transports[victim].release()  # a hung victim comes back only now
    shared.done.wait(timeout=60)  # nobody closes its group while a peer may still be in a collective
    return {
        "first": first,
        "report": report,
        "before": before,
        "anchor": outer.anchor.digest(),
        "params": tensor_digest(params_of(model)),
        "feedback": _feedback(outer),
        "fired": list(t.fired),
    }


CASES = {
    # a peer's process dies while the others wait in the payload's collective
    "diloco-abort": ({"kind": "none"}, False, CollectiveFault("abort", op="all_reduce", at=1), PeerLost),
    "fedavg-abort": ({"kind": "none"}, True, CollectiveFault("abort", op="all_gather", at=1), PeerLost),
    # int8 with error feedback: the all-to-all of shards went through, the all-gather of the mean
    # shards did not; the survivors' residuals and shard-owner residuals must roll back too
    "diloco-int8-ef-abort": (
        {"kind": "int8", "block": 32, "error_feedback": True},
        False,
        CollectiveFault("abort", op="all_gather", at=2),
        PeerLost,
    ),
    # a peer stops taking part: the others time out
    "diloco-hang": ({"kind": "none"}, False, CollectiveFault("hang", op="all_reduce", at=1), SyncTimeout),
    "diloco-int8-ef-hang": (
        {"kind": "int8", "block": 32, "error_feedback": True},
        False,
        CollectiveFault("hang", op="all_to_all", at=1),
        SyncTimeout,
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_static_round_fails_cleanly_when_a_peer_dies_or_hangs(case: str) -> None:
    codec, fedavg, fault, error = CASES[case]
    n, victim = 3, 2
    shared = _Shared(n)
    out = run_workers(
        lambda w: _diloco_round_with_a_failing_peer(
            w, fault=fault, victim=victim, codec=codec, fedavg=fedavg, shared=shared
        ),
        n,
    )
    assert out[victim]["fired"] == [fault]
    assert all(o["first"].committed for o in out)
    assert len({o["before"]["anchor"] for o in out}) == 1
    for o in out[:victim]:
        r = o["report"]
        assert not r.committed and r.participants == 0
        assert r.reason.startswith(f"{error.__name__}("), r.reason
        # rollback: the anchor did not move, the parameters are back on it, the memory of what
        # earlier rounds did not send is as it was before this round
        assert o["anchor"] == o["before"]["anchor"] == r.anchor_hash
        assert o["params"] == o["anchor"]
        assert len(o["feedback"]) == len(o["before"]["feedback"])
        assert all(torch.equal(a, b) for a, b in zip(o["feedback"], o["before"]["feedback"]))
        if codec.get("error_feedback"):
            assert o["feedback"], "the codec should hold residuals after a committed round"
    # the victim's own round failed too, and it restored its parameters like the others
    assert not out[victim]["report"].committed and out[victim]["params"] == out[victim]["anchor"]


def _ddp_with_a_failing_peer(world: Placement, *, hang: bool, shared: _Shared) -> dict[str, Any]:
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = FaultyTransport(TorchDistTransport(store, world.rank, world.size, timeout_s=GLOO_TIMEOUT_S))
    shared.transports[world.rank] = t
    model = _mlp()
    ddp = DDP(model, t, log_every=2)
    ddp.broadcast_initial(model)
    g = torch.Generator().manual_seed(world.rank)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    F.mse_loss(model(x), y).backward()
    ddp.reduce_grads(model)  # a clean step
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    local = [p.grad.clone() for p in params_of(model)]
    fault = CollectiveFault("hang" if hang else "abort", op="all_reduce", at=1)
    if world.rank == 2:
        t.inject(fault)
    step_error: BaseException | None = None
    try:
        ddp.reduce_grads(model)
    except (PeerLost, SyncTimeout) as e:
        step_error = e
    grads_kept = all(torch.equal(p.grad, g0) for p, g0 in zip(params_of(model), local))
    # the logging boundary after the failure: a failed report, with this worker's own figures
    report = ddp.sync(model, tail=Tail(weight=1.0, contributes=True, stop=False, tokens=48))
    if world.rank != 2:
        with shared.lock:
            shared.survivors_done += 1
            if shared.survivors_done == world.size - 1:
                shared.transports[2].release()
    shared.done.wait(timeout=60)
    return {"step_error": step_error, "grads_kept": grads_kept, "report": report}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hang", [False, True], ids=["abort", "hang"])
def test_ddp_step_raises_the_right_error_and_keeps_local_gradients(hang: bool) -> None:
    shared = _Shared(3)
    out = run_workers(lambda w: _ddp_with_a_failing_peer(w, hang=hang, shared=shared), 3)
    error = SyncTimeout if hang else PeerLost
    for o in out[:2]:
        assert type(o["step_error"]) is error, o["step_error"]
        assert o["grads_kept"]  # a failed all-reduce leaves the local gradients, not partial sums
        r = o["report"]
        assert not r.committed and r.participants == 0 and r.tokens == 48 and not r.stop
        assert r.reason.startswith("PeerLost(") or r.reason.startswith("SyncTimeout(")


@pytest.mark.timeout(60)
def test_a_fault_raised_on_every_rank_fails_the_round_everywhere_and_the_next_commits() -> None:
    """peer_lost / timeout leave the group intact: injected on every rank at the same collective,
    the round fails on all of them (nobody waits for anybody) and the next round commits."""

    def worker(world: Placement) -> list[Any]:
        store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
        t = FaultyTransport(TorchDistTransport(store, world.rank, world.size, timeout_s=GLOO_TIMEOUT_S))
        model = _mlp()
        outer = DiLoCo(model, t, inner_steps=3, lr=0.7, momentum=0.9, nesterov=True)
        outer.broadcast_initial(model)
        tail = Tail(weight=1.0, contributes=True, stop=False, tokens=48)
        t.inject(CollectiveFault("timeout", op="all_reduce", at=1))
        t.inject(CollectiveFault("peer_lost", op="all_gather", at=2))  # the tails of round 2
        out = []
        for r in range(3):
            _local_steps(model, world.rank, r)
            out.append((outer.sync(model, tail=tail), outer.anchor.digest()))
        t.close()
        return out

    out = run_workers(worker, 3)
    for rank in out:
        assert [r.committed for r, _ in rank] == [False, False, True]
        assert rank[0][0].reason.startswith("SyncTimeout(") and rank[1][0].reason.startswith("PeerLost(")
    assert len({rank[2][1] for rank in out}) == 1


# ==========================================================================================
# 3. the elastic star and async local SGD through a faulty link


class _Recorder(Coordinator):
    """A coordinator that remembers the anchor hash of every version it reached, in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.versions: list[int] = [self.version]
        self.hashes: dict[int, str] = {self.version: self.anchor_hash()}

    def handle(self, identity: bytes, frames: list[Any]) -> None:
        super().handle(identity, frames)
        self._note()

    def tick(self, now: float | None = None) -> None:
        super().tick(now)
        self._note()

    def _note(self) -> None:
        if self.version != self.versions[-1]:
            self.versions.append(self.version)
            self.hashes.setdefault(self.version, self.anchor_hash())


class _Worker(ElasticWorld):
    """An elastic worker that waits for the others after joining (all are members of the first
    round) and records the coordinator version it holds after every sync."""

    def __init__(self, cfg: RunConfig, worker_id: str, barrier: threading.Barrier) -> None:
        super().__init__(cfg, worker_id)
        self.barrier = barrier
        self.outer: Any = None
        self.versions: list[int] = []
        self.reports: list[Any] = []

    def observe(self, started: Any) -> None:
        """train() hands over the started Outer: record its strategy's version after every sync."""
        outer = self.outer = started.strategy
        self.versions.append(outer.version)
        sync = outer.sync

        def recorded(model: nn.Module, *, tail: Tail) -> Any:
            report = sync(model, tail=tail)
            self.versions.append(outer.version)
            self.reports.append(report)
            return report

        outer.sync = recorded

    def adopt(self, joined: Any, *, resumed: bool) -> None:
        super().adopt(joined, resumed=resumed)
        self.barrier.wait(timeout=60)


def _train_all(cfgs: dict[str, RunConfig], *, grace_s: float = 20.0) -> tuple[list[dict[str, Any]], list[_Worker]]:
    """Train one thread per worker id; fail (naming who) when one raises, or is still running grace_s
    after the first one finished (a worker waiting for a reply that will never come)."""
    barrier = threading.Barrier(len(cfgs))
    worlds = [_Worker(cfg, w, barrier) for w, cfg in cfgs.items()]
    results: list[Any] = [None] * len(worlds)
    errors: dict[str, BaseException] = {}

    def target(k: int) -> None:
        try:
            results[k] = train(worlds[k].cfg, worlds[k], observe=worlds[k].observe)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[worlds[k].worker_id] = e
            barrier.abort()

    threads = [threading.Thread(target=target, args=(k,), daemon=True) for k in range(len(worlds))]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 120:
        if not all(t.is_alive() for t in threads):
            deadline = time.monotonic() + grace_s
            for t in threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            break
        time.sleep(0.05)
    hung = [w.worker_id for w, t in zip(worlds, threads) if t.is_alive()]
    for w in worlds:
        if w.client is not None and w.worker_id in errors:
            # a worker that raised never closed its client: its heartbeats would go on forever (a hung
            # one gives up by itself once the coordinator is gone: it re-joins until its join deadline)
            w.client.close()
    if errors:
        w_id, e = next(iter(errors.items()))
        raise AssertionError(f"worker {w_id} raised {e!r}") from e
    assert not hung, f"{hung} still waiting {grace_s:.0f} s after another worker finished"
    return results, worlds


def _check_outcome(coord: _Recorder, worlds: list[_Worker]) -> None:
    """The run ended consistently: versions only move forward, on the coordinator and on every
    worker, and every worker's final anchor is the coordinator's anchor of the version it holds."""
    assert coord.versions == sorted(set(coord.versions)), f"the coordinator's versions went back: {coord.versions}"
    for w in worlds:
        assert w.versions == sorted(w.versions), f"{w.worker_id}'s versions went back: {w.versions}"
        assert w.outer.version in coord.hashes, (w.worker_id, w.outer.version, coord.versions)
        assert w.outer.anchor.digest() == coord.hashes[w.outer.version], f"{w.worker_id} ends on another anchor"
    assert max(w.outer.version for w in worlds) == coord.version


def _star_cfg(tmp_path: Path, corpus: Path, address: str, *, outer: dict[str, Any] | None = None,
              secret: bool = False, **membership: Any) -> RunConfig:  # fmt: skip
    m: dict[str, Any] = {**FAST, "address": address, **membership}
    if secret:
        (tmp_path / "secret").write_bytes(SECRET)
        m["secret_file"] = str(tmp_path / "secret")
    sections: dict[str, Any] = {"outer": outer} if outer else {}
    return tiny_config(tmp_path, corpus, workers=2, steps=12, membership=m, **sections)


ASYNC = {"kind": "async", "inner_steps": 4, "lr": 0.5, "momentum": 0.9, "buffer": 2, "dylu": False}
STRATEGIES = {"diloco": None, "async": ASYNC}


@contextlib.contextmanager
def _through_link(
    tmp_path: Path,
    corpus: Path,
    rules: list[Rule],
    *,
    strategy: str = "diloco",
    secret: bool = False,
    **membership: Any,
) -> Iterator[tuple[_Recorder, FaultyLink, RunConfig]]:
    """A coordinator serving from a thread, a faulty link in front of it, and a config that points
    the workers at the link."""
    probe = _star_cfg(tmp_path, corpus, "tcp://127.0.0.1:1", outer=STRATEGIES[strategy], secret=secret, **membership)
    coord = _Recorder(probe, bind="tcp://127.0.0.1:0", secret=SECRET if secret else None)
    with _serving(coord), FaultyLink(coord.address, rules, seed=7) as link:
        cfg = _star_cfg(tmp_path, corpus, link.address, outer=STRATEGIES[strategy], secret=secret, **membership)
        yield coord, link, cfg


def _rounds_of(worlds: list[_Worker]) -> dict[str, list[tuple[bool, int]]]:
    return {w.worker_id: [(r.committed, r.participants) for r in w.reports] for w in worlds}


HARMLESS = {
    # a coordinator may see a heartbeat twice, and a worker an ACK twice
    "duplicate-heartbeats-acks": [
        Rule("duplicate", types="heartbeat", direction="to_server", times=None),
        Rule("duplicate", types="ack", direction="to_client", times=None),
    ],
    # damaged heartbeats are refused (with a secret, any flipped byte fails the HMAC) and counted;
    # damaged ACKs are dropped by the worker
    "corrupt-heartbeats-acks": [
        Rule("corrupt", types="heartbeat", direction="to_server", skip=2, times=3),
        Rule("corrupt", types="ack", direction="to_client", skip=2, times=3),
    ],
    # every RESULT waits for the next message to a worker; pushes and ACKs arrive late, by up to
    # 0.1 s (less than the heartbeat period, so a connection's own messages keep their order)
    "delay-reorder": [
        Rule("reorder", types="result", direction="to_client", times=None),
        Rule("reorder", types="push", direction="to_server", nth=2),
        Rule("delay", types={"push", "ack", "welcome"}, delay_s=0.02, jitter_s=0.08, times=None),
    ],
}


ACTED = {"duplicate-heartbeats-acks": ("duplicated",), "corrupt-heartbeats-acks": ("corrupted",),
         "delay-reorder": ("reordered", "delayed")}  # fmt: skip


def _check_budget_or_rounds(coord: _Recorder, worlds: list[_Worker], strategy: str) -> dict[str, Any]:
    """Nothing lost, nothing applied twice: every sync round committed with both workers (one
    version each), or every async push applied once and the world's budget spent exactly."""
    status = coord.status()
    if strategy == "diloco":
        assert all(r == [(True, 2)] * 3 for r in _rounds_of(worlds).values()), _rounds_of(worlds)
        assert coord.version == 3
    else:
        assert status["applied"] == sum(w.outer.pushes for w in worlds) == coord.version, status
        assert status["steps"] == status["budget"] == 24, status
    return status


@pytest.mark.timeout(90)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("plan", list(HARMLESS))
def test_star_and_async_shrug_off_harmless_faults(tmp_path: Path, corpus_dir: Path, plan: str, strategy: str) -> None:
    # heartbeats every 50 ms: plenty of them during the run
    with _through_link(tmp_path, corpus_dir, HARMLESS[plan], strategy=strategy, secret=True, heartbeat_s=0.05) as (
        coord,
        link,
        cfg,
    ):
        _, worlds = _train_all({w: cfg for w in ("w0", "w1")})
        status = _check_budget_or_rounds(coord, worlds, strategy)
        if plan.startswith("corrupt"):  # the last damaged heartbeat may still be on its way
            _wait_until("3 rejections", lambda: sum(coord.status()["rejected"].values()) >= 3)
        rejected = coord.status()["rejected"]
    counts = link.counts()
    assert all(counts.get(a, 0) > 0 for a in ACTED[plan]), counts
    _check_outcome(coord, worlds)
    if plan.startswith("corrupt"):
        assert sum(rejected.values()) == 3, rejected  # the 3 damaged heartbeats, whatever byte was hit
    else:
        assert set(rejected) <= {"replay"}, rejected  # with sessions, a duplicated heartbeat is a replay
    assert status["late"] == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("strategy", ["diloco", "async"])
def test_duplicated_pushes_are_rejected_as_replays_never_applied_twice(
    tmp_path: Path, corpus_dir: Path, strategy: str
) -> None:
    rules = [Rule("duplicate", types="push", direction="to_server", times=None)]
    with _through_link(tmp_path, corpus_dir, rules, strategy=strategy, secret=True) as (coord, link, cfg):
        _, worlds = _train_all({w: cfg for w in ("w0", "w1")})
        status = _check_budget_or_rounds(coord, worlds, strategy)
        copies = link.counts()["duplicated"]
        _wait_until("every copy refused", lambda: coord.status()["rejected"].get("replay", 0) >= copies, 10)
        status = coord.status()
    _check_outcome(coord, worlds)
    assert status["rejected"] == {"replay": link.counts()["duplicated"]}, status["rejected"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_lost_result_makes_the_worker_rejoin(tmp_path: Path, corpus_dir: Path, strategy: str) -> None:
    """The coordinator applied w's push, its RESULT never arrived: w gives up at its RESULT
    deadline, re-joins and goes on from the coordinator's state; nothing is applied twice."""
    rules = [Rule("drop", types="result", direction="to_client", nth=2)]
    timing = {"round_timeout_s": 1.0, "request_timeout_s": 1.5}  # a RESULT deadline of 2.5 s
    with _through_link(tmp_path, corpus_dir, rules, strategy=strategy, **timing) as (coord, link, cfg):
        _, worlds = _train_all({w: cfg for w in ("w0", "w1")}, grace_s=12)
        status = coord.status()
    assert link.counts()["dropped"] == 1
    _check_outcome(coord, worlds)
    failed = {w.worker_id: [r.reason for r in w.reports if not r.committed] for w in worlds}
    assert sum(len(v) for v in failed.values()) >= 1, failed  # the worker without its RESULT lost that round
    if strategy == "async":
        assert status["applied"] == sum(w.outer.pushes for w in worlds) == coord.version, status
        assert status["steps"] == status["budget"], status


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "direction",
    [pytest.param("to_server", id="push"), pytest.param("to_client", id="result")],
)  # fmt: skip
def test_a_corrupted_push_or_result_costs_one_round(tmp_path: Path, corpus_dir: Path, direction: str) -> None:
    """A byte of the 2nd push's (or RESULT's) last tensor frame flipped on the way: the HMAC fails,
    the receiver refuses it, the worker gets no RESULT it can use and re-joins at its deadline."""
    kind = "push" if direction == "to_server" else "result"
    rules = [Rule("corrupt", types=kind, direction=direction, nth=2, frame=-1)]
    timing = {"round_timeout_s": 1.0, "request_timeout_s": 1.5}
    with _through_link(tmp_path, corpus_dir, rules, secret=True, **timing) as (coord, link, cfg):
        _, worlds = _train_all({w: cfg for w in ("w0", "w1")})
        rejected = coord.status()["rejected"]
    assert link.counts()["corrupted"] == 1
    _check_outcome(coord, worlds)
    assert sum(rejected.values()) == (1 if kind == "push" else 0), rejected


@pytest.mark.timeout(90)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_partition_longer_than_the_heartbeat_timeout(tmp_path: Path, corpus_dir: Path, strategy: str) -> None:
    """w1 sits behind the link; at its 2nd push the link goes dark for longer than the heartbeat
    timeout (2.5 s against 1.5 s). The coordinator drops w1 from the view and goes on with w0; w1
    notices, re-joins once the link heals and ends on the coordinator's state; the lost push is
    never applied."""
    rules = [Rule("partition", types="push", worker="w1", nth=2, duration_s=2.5)]
    timing = {"heartbeat_s": 0.1, "heartbeat_timeout_s": 1.5, "request_timeout_s": 1.5, "round_timeout_s": 3.0}
    with _through_link(tmp_path, corpus_dir, rules, strategy=strategy, **timing) as (coord, link, cfg):
        direct = cfg.model_copy(update={"membership": cfg.membership.model_copy(update={"address": coord.address})})
        _, worlds = _train_all({"w0": direct, "w1": cfg})
        status = coord.status()
        epoch = coord.epoch
    lost_pushes = sum(1 for e in link.events() if e.type == "push" and e.action == "partitioned")
    assert lost_pushes >= 1, link.counts()
    _check_outcome(coord, worlds)
    w1 = next(w for w in worlds if w.worker_id == "w1")
    assert any(not r.committed for r in w1.reports), [r.reason for r in w1.reports]
    assert epoch >= 4  # w0 and w1 joined, w1 was dropped and joined again (and both left)
    if strategy == "async":
        assert status["applied"] == sum(w.outer.pushes for w in worlds) - lost_pushes == coord.version, status
        assert status["steps"] == status["budget"], status


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_worker_process_killed_right_after_its_push_reached_the_coordinator(tmp_path: Path, corpus_dir: Path) -> None:
    """w1 is a `dilo worker` process behind the link, SIGKILLed the moment its 2nd push has been
    forwarded: the coordinator holds a push from a dead worker. That round closes with both
    contributions, the next one without w1 once its heartbeats stopped; w0 ends on the final state."""
    procs: list[Any] = []

    def kill(event: Any) -> None:
        os.kill(procs[0].pid, signal.SIGKILL)

    rules = [Rule("kill", types="push", direction="to_server", worker="w1", nth=2, callback=kill)]
    # the first round waits (up to 60 s) for the process to start and push
    timing = {"start_quorum": 2, "round_timeout_s": 60.0}
    with _through_link(tmp_path, corpus_dir, rules, **timing) as (coord, link, cfg), _reaped(procs):
        toml = write_toml(cfg, tmp_path / "w1.toml")
        procs.append(_spawn(["worker", str(toml), "--id", "w1"], tmp_path, "w1", env=_env(DILO_LOG="WARNING")))
        direct = cfg.model_copy(update={"membership": cfg.membership.model_copy(update={"address": coord.address})})
        _, worlds = _train_all({"w0": direct}, grace_s=60)
        assert procs[0].wait(timeout=30) == -signal.SIGKILL, _tail(procs[0])
        status = coord.status()
    assert link.counts()["killed"] == 1
    _check_outcome(coord, worlds)
    assert _rounds_of(worlds)["w0"] == [(True, 2), (True, 2), (True, 1)]
    assert coord.version == 3 and status["members"] == [] and status["rejected"] == {}
    # w1 logged the round it finished, not the one it died in
    assert [r["participants"] for r in _records(_log(tmp_path, "w1"))] == [2]


# ==========================================================================================
# 4. gossip: every peer's listener behind a faulty link


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


GOSSIP_PLANS: dict[str, list[Rule]] = {
    # what happens to the messages sent to one worker (ring: two gossip messages a round)
    "lossy": [
        Rule("drop", types="gossip", direction="to_server", nth=2),  # waited for, then replaced by a pull
        Rule("corrupt", types="gossip", direction="to_server", nth=3, frame=-1),  # refused: the HMAC fails
        Rule("delay", types="gossip", direction="to_server", nth=4, delay_s=0.1),
    ],
    "duplicate": [Rule("duplicate", types="gossip", direction="to_server", nth=2)],
}
DRIFT = (
    "gossip: after lost messages the workers' round counters drift apart (a worker adopts the highest "
    "round it received, gossip.py _round), one then waits a full peer_timeout_s for peers whose messages "
    "carry lower numbers, and the final merge, which waits no longer, misses it"
)
GOSSIP_CASES: dict[str, tuple[str, dict[str, Any], bool, str]] = {
    # plan, codec, final merge, why it is expected to fail ("": it is not)
    "lossy-fp32": ("lossy", {"kind": "none"}, False, ""),
    "lossy-int8-choco": ("lossy", {"kind": "int8"}, False, ""),
    # a duplicate must be refused as a replay: if it reached collect(), its `m not in take` would
    # compare two equal messages' tensors with == and raise
    "duplicate-fp32-final-merge": ("duplicate", {"kind": "none"}, True, ""),
    "lossy-fp32-final-merge": ("lossy", {"kind": "none"}, True, DRIFT),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(reason=v[3], strict=False)) if v[3] else c
        for c, v in GOSSIP_CASES.items()
    ],
)
def test_gossip_through_faulty_links(tmp_path: Path, corpus_dir: Path, case: str) -> None:
    """Four workers in a ring, every listener behind a faulty link: training ends, the models come
    closer, refused messages are counted; compressed replicas stay exact; a final merge agrees.
    (No final merge in compressed gossip: its fp32 messages do not fit the peers' compressed spec
    and are refused, faults or not.)"""
    plan, codec, final_merge, _ = GOSSIP_CASES[case]
    plain = codec["kind"] == "none"
    n = 4
    real = [f"tcp://127.0.0.1:{_free_port()}" for _ in range(n)]
    (tmp_path / "secret").write_bytes(SECRET)
    outer = {"kind": "gossip", "inner_steps": 4, "topology": "ring", "peer_timeout_s": 1.0, "final_merge": final_merge}
    if not plain:
        outer["consensus_step"] = 1.0
    base = tiny_config(
        tmp_path, corpus_dir, workers=n, steps=16, outer=outer, codec=codec,
        membership={"peers": real, "secret_file": str(tmp_path / "secret")},
    )  # fmt: skip
    links = [FaultyLink(real[r], GOSSIP_PLANS[plan], seed=r) for r in range(n)]
    worlds: dict[int, GossipWorld] = {}
    out: dict[int, Any] = {}

    def one(r: int) -> None:
        # worker r listens on its real address and reaches every other worker through its link
        peers = [real[j] if j == r else links[j].address for j in range(n)]
        cfg = base.model_copy(update={"membership": base.membership.model_copy(update={"peers": peers})})
        worlds[r] = GossipWorld(cfg, rank=r)
        try:
            out[r] = train(cfg, worlds[r])
        except BaseException as e:  # noqa: BLE001 - reported below
            out[r] = e

    try:
        threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=80)
        counts = [link.counts() for link in links]
    finally:
        for link in links:
            link.close()
        for r, v in out.items():
            if isinstance(v, BaseException):  # a worker that raised left its node listening
                worlds[r].close(leaving=False)
    assert not any(t.is_alive() for t in threads), "a gossip worker hung"
    for v in out.values():
        if isinstance(v, BaseException):
            raise v
    acted = {"lossy": ("dropped", "corrupted", "delayed"), "duplicate": ("duplicated",)}[plan]
    assert all(c.get(a) == 1 for c in counts for a in acted), counts
    logs = {r: [x for x in _records(tmp_path / "logs" / f"worker-rank{r}.jsonl")] for r in range(n)}
    for r, recs in logs.items():
        assert len(recs) == 4, recs
        if final_merge:
            assert recs[-1]["final_merge"]["missing"] == []
        assert recs[-1]["disagreement"] < recs[0]["disagreement"]
        assert out[r]["val_loss"] < out[r]["initial_val_loss"]
        # the damaged message was refused, nothing else (a duplicate is a replay once sessions exist)
        rejected = dict(worlds[r].node.rejected)
        assert rejected == ({"auth": 1} if plan == "lossy" else {"replay": 1}), rejected
        # the round records carry the node's counters as they were then (the last round: all but late ones)
        logged = recs[-1]["p2p"]["rejected"]
        assert all(n <= rejected.get(code, 0) for code, n in logged.items()), (logged, rejected)
    if final_merge:  # the final fully connected merge puts every worker on the same parameters
        assert len({recs[-1]["anchor_hash"] for recs in logs.values()}) == 1
    if not plain:
        # every replica a worker holds of a neighbour's public estimate is bit-identical to the
        # neighbour's own at that sequence number, even after lost, doubled and damaged messages
        own = {(f"rank{r}", rec["hat"][1]): rec["hat"][0] for r, recs in logs.items() for rec in recs}
        checked = 0
        for recs in logs.values():
            for rec in recs:
                for peer, (digest, seq) in rec["replicas"].items():
                    if (peer, seq) in own:
                        assert own[(peer, seq)] == digest
                        checked += 1
        assert checked >= 8
        assert any(rec["pulled_states"] > 0 for recs in logs.values() for rec in recs[1:])
