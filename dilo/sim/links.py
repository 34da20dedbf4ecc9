"""What the simulated workers talk through: virtual network costs, in-process collectives with
torch.distributed's semantics (`SimTransport`), and an in-process coordinator link (`Post`,
`LocalStarClient`) that carries real encoded messages."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dilo import wire
from dilo.coordinator import Coordinator
from dilo.errors import DiloError, PeerLost
from dilo.session import ClientSession
from dilo.sim.clock import Scheduler
from dilo.transport.base import ByteCounter, ring_all_reduce_bytes


class Network:
    """Virtual transfer times: latency plus bytes over the link speed."""

    def __init__(self, bandwidth_mbps: float, latency_ms: float) -> None:
        self.bytes_per_s = bandwidth_mbps * 1e6 / 8
        self.latency_s = latency_ms / 1e3

    def cost(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


class Hub:
    """Meeting point of the virtual workers' collectives: the n-th call of every rank meets the
    n-th call of every other rank (collectives are issued in the same order everywhere)."""

    def __init__(self, sched: Scheduler, size: int, net: Network) -> None:
        self.sched = sched
        self.size = size
        self.net = net
        self.pending: dict[int, dict[int, tuple[float, Any]]] = {}
        self.results: dict[tuple[int, int], Any] = {}

    def meet(self, rank: int, call: int, payload: Any, combine: Callable[[list[Any]], list[Any]], nbytes: int) -> Any:
        s = self.sched
        with s.cv:
            arrived = self.pending.setdefault(call, {})
            arrived[rank] = (s.vt[s.me], payload)
            if len(arrived) < self.size:
                s.block()
                return self.results.pop((call, rank))
            del self.pending[call]
            outs = combine([arrived[r][1] for r in range(self.size)])
            done = max(t for t, _ in arrived.values()) + self.net.cost(nbytes)
            for r in range(self.size):
                if r == rank:
                    continue
                self.results[(call, r)] = outs[r]
                s.wake(r, done)  # in a static simulation, thread r is rank r
            s.vt[s.me] = max(s.vt[s.me], done)
            s._yield()
            return outs[rank]


class SimTransport:
    """The Transport protocol (dilo/transport/base.py) over a Hub: sums in rank order, byte counts
    as TorchDistTransport counts them."""

    def __init__(self, hub: Hub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.size = hub.size
        self.counter = ByteCounter()
        self._calls = 0

    def _meet(self, payload: Any, combine: Callable[[list[Any]], list[Any]], nbytes: int) -> Any:
        self._calls += 1
        return self.hub.meet(self.rank, self._calls, payload, combine, nbytes)

    def all_reduce_(self, tensors: list[Tensor]) -> None:
        nbytes = sum(ring_all_reduce_bytes(t.numel() * t.element_size(), self.size) for t in tensors)

        def combine(parts: list[list[Tensor]]) -> list[list[Tensor]]:
            sums = [
                torch.stack([p[i] for p in parts]).sum(0) if self.size > 1 else parts[0][i].clone()
                for i in range(len(tensors))
            ]
            return [sums] * self.size

        sums = self._meet([t.detach().clone() for t in tensors], combine, nbytes)
        for t, v in zip(tensors, sums):
            t.copy_(v)
        self.counter.add(nbytes, nbytes)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        n = tensor.numel() * tensor.element_size()
        out: list[Tensor] = self._meet(tensor.detach().clone(), lambda parts: [parts] * self.size, (self.size - 1) * n)
        self.counter.add((self.size - 1) * n, (self.size - 1) * n)
        return [o.clone() for o in out]

    def all_to_all(self, chunks: list[Tensor]) -> list[Tensor]:
        assert len(chunks) == self.size, f"need {self.size} chunks, got {len(chunks)}"
        n = chunks[0].numel() * chunks[0].element_size()
        out: list[Tensor] = self._meet(
            [c.detach().clone() for c in chunks],
            lambda parts: [[parts[j][r] for j in range(self.size)] for r in range(self.size)],
            (self.size - 1) * n,
        )
        self.counter.add((self.size - 1) * n, (self.size - 1) * n)
        return out

    def broadcast_(self, tensors: list[Tensor], src: int) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors)
        out = self._meet([t.detach().clone() for t in tensors], lambda parts: [parts[src]] * self.size, n)
        if self.rank != src:
            for t, v in zip(tensors, out):
                t.copy_(v)
        self.counter.add(n * (self.size - 1), 0) if self.rank == src else self.counter.add(0, n)

    def close(self) -> None:
        """Nothing to release."""


# ---------------------------------------------------------------------------------------------
# in-process coordinator link


class Post:
    """Carries encoded messages between workers and the in-process coordinator, with virtual delays.

    The coordinator handles a message when it arrives; its replies travel back and wake their
    worker. Members that are alive in the simulation count as heartbeating."""

    def __init__(self, sched: Scheduler, coord: Coordinator, net: Network) -> None:
        self.sched = sched
        self.coord = coord
        self.net = net
        self.clients: dict[bytes, LocalStarClient] = {}
        self.alive: set[str] = set()
        self._tick_gen = 0

    def send(self, client: LocalStarClient, frames: list[bytes]) -> None:
        nbytes = sum(len(f) for f in frames)
        self.sched.at(self.sched.now + self.net.cost(nbytes), lambda t: self._arrive(client.identity, frames))

    def _arrive(self, identity: bytes, frames: list[bytes]) -> None:
        self._heartbeats()
        self.coord.handle(identity, frames)
        self._deliver()

    def _deliver(self) -> None:
        out, self.coord.outbox = self.coord.outbox, []
        for identity, frames in out:
            client = self.clients.get(identity)
            if client is None:
                continue
            frames = [bytes(f) for f in frames]
            nbytes = sum(len(f) for f in frames)
            self.sched.at(self.sched.now + self.net.cost(nbytes), functools.partial(_arrive, client, frames))
        self._schedule_tick()

    def _heartbeats(self) -> None:
        now = self.sched.now
        for w, m in self.coord.members.items():
            if w in self.alive:
                m.last_seen = now

    def _schedule_tick(self) -> None:
        deadline = self.coord.next_deadline()
        if deadline is None:
            return
        self._tick_gen += 1
        gen = self._tick_gen

        def tick(t: float) -> None:
            if gen != self._tick_gen:
                return
            self._heartbeats()
            self.coord.tick(t)
            self._deliver()

        self.sched.at(deadline, tick)


class LocalStarClient:
    """A `StarLink` (dilo/outer/star.py) over a Post, in place of the ZeroMQ StarClient. `drop_replies` loses that
    many of the next PUSH replies, as a coordinator restart would (the push is applied)."""

    def __init__(self, post: Post, mcfg: Any, worker_id: str, *, run: str, fingerprint: str, thread: int) -> None:
        self.post = post
        self.cfg = mcfg
        self.worker_id = worker_id
        self.identity = worker_id.encode()
        self.run = run
        self.fingerprint = fingerprint
        self.counter = ByteCounter()
        self.thread = thread
        self.session = ClientSession()
        self.drop_replies = 0
        self._reply: list[bytes] | None = None
        post.clients[self.identity] = self

    def _receive(self, frames: list[bytes], t: float) -> None:
        self._reply = frames
        self.post.sched.wake(self.thread, t)

    def request(self, msg: wire.Message, *, stamped: bool = False) -> wire.Message:
        if not stamped:
            self.session.stamp(msg)
        msg.run, msg.fp = self.run, self.fingerprint
        frames = [bytes(f) for f in wire.encode(msg, None)]
        self.counter.add(sum(len(f) for f in frames), 0)
        s = self.post.sched
        with s.cv:
            self._reply = None
            self.post.send(self, frames)
            s.block()
            raw, self._reply = self._reply, None
        assert raw is not None
        self.counter.add(0, sum(len(f) for f in raw))
        reply = wire.decode(raw, secret=None, expect_run=self.run)
        assert self.session.owns(reply, msg), "the simulated post delivers each reply to its request"
        if reply.type == wire.MsgType.ERROR:
            raise wire.WireError(str(reply.body.get("code", "error")), str(reply.body.get("message", "")))
        return reply

    def join(self, *, give_up_s: float | None = None) -> wire.Message:
        self.post.alive.add(self.worker_id)
        if not self.session.accept_challenge(self.request(self.session.hello(self.worker_id), stamped=True)):
            raise DiloError("expected CHALLENGE from the coordinator")
        join = self.session.opening(wire.Message(type=wire.MsgType.JOIN, worker=self.worker_id))
        welcome = self.request(join, stamped=True)
        if welcome.type != wire.MsgType.WELCOME:
            raise DiloError(f"expected WELCOME from the coordinator, got {welcome.type.value}")
        self.session.established()
        return welcome

    def push(self, tensors: dict[str, Tensor], body: dict[str, Any], *, base: int) -> wire.Message:
        reply = self.request(
            wire.Message(type=wire.MsgType.PUSH, worker=self.worker_id, base=base, body=body, tensors=tensors)
        )
        if self.drop_replies > 0:
            self.drop_replies -= 1
            raise PeerLost("the reply to this push was lost (simulated)")
        return reply

    def pull(self) -> wire.Message:
        return self.request(wire.Message(type=wire.MsgType.PULL, worker=self.worker_id))

    def leave(self) -> None:
        self.post.alive.discard(self.worker_id)
        self.request(wire.Message(type=wire.MsgType.LEAVE, worker=self.worker_id))

    def close(self) -> None:
        self.post.alive.discard(self.worker_id)


def _arrive(client: LocalStarClient, frames: list[bytes], t: float) -> None:
    client._receive(frames, t)
