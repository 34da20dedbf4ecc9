"""The simulator: k virtual workers in one process, on a virtual clock.

    dilo sim configs/async.toml [--workers=16] [--sim.step_s=0.1] [overrides]

Each virtual worker is a thread running the real worker loop (dilo/train.py) with the real
strategy: DiLoCo, FedAvg and DDP over an in-process transport with the collectives of
torch.distributed, or elastic DiLoCo and the asynchronous rules through an in-process coordinator
(dilo/coordinator.py, the same class `dilo coordinator` serves, without its socket; messages are
encoded and validated by dilo/wire.py as on the network). Logs, checkpoints and summaries are
written exactly as in a real run, with virtual seconds where a real run has wall seconds, so the
same reports and plots apply.

Only the clock is simulated. A scheduler runs one thread at a time, always the one furthest
behind in virtual time (ties: the lowest worker index), so a run is deterministic for a given
seed and config, whatever the machine's load:

- an inner step costs `sim.step_s * heterogeneity.slowdown[w]` virtual seconds, times a log-normal
  noise of sigma `sim.jitter` drawn from a per-worker seeded stream;
- a collective finishes when the last worker arrives plus its bytes over `sim.bandwidth_mbps`
  and `sim.latency_ms`; a message to or from the coordinator arrives after its own bytes' time;
- `sim.events` makes workers join late, leave (finish their round, then LEAVE) or crash (stop dead;
  the coordinator drops them after `membership.heartbeat_timeout_s` of virtual silence).

Validation, logging and checkpoints cost no virtual time.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dilo import wire
from dilo.config import RunConfig
from dilo.coordinator import Coordinator
from dilo.errors import ConfigError, DiloError, PeerLost
from dilo.session import ClientSession
from dilo.transport.base import ByteCounter, ring_all_reduce_bytes
from dilo.world import ElasticWorld, StaticWorld

log = logging.getLogger("dilo.sim")


class Crashed(BaseException):
    """Raised inside a virtual worker at its crash time; BaseException so that no handler in the
    worker loop mistakes it for an error it could recover from."""


class Deadlock(DiloError):
    """Every virtual worker waits and nothing is scheduled to wake any of them."""


# ---------------------------------------------------------------------------------------------
# scheduler


class Scheduler:
    """Runs threads one at a time in virtual-time order; timers run in between, in time order."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.vt: dict[int, float] = {}
        self.state: dict[int, str] = {}  # pending | ready | blocked | done
        self.crash_at: dict[int, float] = {}
        self.running: int | None = None
        self.now = 0.0
        """The virtual time of whatever runs now (a worker or a timer)."""
        self._timers: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._local = threading.local()
        self._threads: list[threading.Thread] = []
        self.errors: dict[int, BaseException] = {}
        self.finished = threading.Event()
        self.on_crash: Callable[[int], None] = lambda w: None

    # ----------------------------------------------------------------- called by the driver

    def spawn(self, w: int, fn: Callable[[], Any], at: float = 0.0) -> None:
        """Worker w starts running fn at virtual time `at`."""
        self.vt[w] = at
        self.state[w] = "ready"
        t = threading.Thread(target=self._body, args=(w, fn), name=f"sim-worker{w}", daemon=True)
        self._threads.append(t)

    def run(self, timeout_s: float | None = None) -> None:
        for t in self._threads:
            t.start()
        with self.cv:
            self._dispatch()
            if not self.cv.wait_for(self.finished.is_set, timeout=timeout_s):
                raise DiloError(f"the simulation did not finish within {timeout_s} s of real time")
        for t in self._threads:
            t.join(timeout=5)
        if self.deadlock is not None:
            raise self.deadlock

    deadlock: Deadlock | None = None

    # ----------------------------------------------------------------- called by workers

    @property
    def me(self) -> int:
        return self._local.w

    def at(self, t: float, fn: Callable[[float], None]) -> None:
        """Run fn(t) at virtual time t (never before the present)."""
        heapq.heappush(self._timers, (max(t, self.now), next(self._seq), fn))

    def advance(self, dt: float) -> None:
        """The calling worker spends dt virtual seconds; others may run meanwhile."""
        with self.cv:
            self.vt[self.me] += dt
            self._yield()

    def block(self) -> None:
        """The calling worker waits until someone calls wake() for it."""
        with self.cv:
            self.state[self.me] = "blocked"
            self._yield()

    def wake(self, w: int, at: float) -> None:
        if self.state.get(w) == "blocked":
            self.state[w] = "ready"
            self.vt[w] = max(self.vt[w], at)

    # ----------------------------------------------------------------- internals

    def _body(self, w: int, fn: Callable[[], Any]) -> None:
        self._local.w = w
        with self.cv:
            self.cv.wait_for(lambda: self.running == w)
        try:
            self._check_crash(w)
            fn()
        except Crashed:
            log.info("virtual worker %d crashed at %.1f s", w, self.vt[w])
            with self.cv:
                self.on_crash(w)
        except BaseException as e:  # noqa: BLE001 - reported by the driver
            self.errors[w] = e
        finally:
            with self.cv:
                self.state[w] = "done"
                self._dispatch()

    def _yield(self) -> None:
        w = self.me
        self._dispatch()
        self.cv.wait_for(lambda: self.running == w)
        self._check_crash(w)

    def _check_crash(self, w: int) -> None:
        if w in self.crash_at and self.vt[w] >= self.crash_at[w]:
            raise Crashed()

    def _dispatch(self) -> None:
        """Pick what runs next (with self.cv held): due timers first, then the worker furthest behind."""
        while True:
            ready = [(self.vt[w], w) for w, s in self.state.items() if s == "ready"]
            nxt = min(ready) if ready else None
            live = nxt is not None or any(s == "blocked" for s in self.state.values())
            if live and self._timers and (nxt is None or self._timers[0][0] <= nxt[0]):
                t, _, fn = heapq.heappop(self._timers)
                self.now = t
                fn(t)
                continue
            if nxt is None:
                if any(s == "blocked" for s in self.state.values()):
                    waiting = sorted(w for w, s in self.state.items() if s == "blocked")
                    self.deadlock = Deadlock(f"virtual workers {waiting} wait and nothing will wake them")
                    for w in waiting:
                        self.errors.setdefault(w, self.deadlock)
                        self.state[w] = "done"
                self.running = None
                self.finished.set()
                self.cv.notify_all()
                return
            self.now, self.running = nxt
            self.cv.notify_all()
            return


# ---------------------------------------------------------------------------------------------
# costs and clocks


class Network:
    """Virtual transfer times: latency plus bytes over the link speed."""

    def __init__(self, bandwidth_mbps: float, latency_ms: float) -> None:
        self.bytes_per_s = bandwidth_mbps * 1e6 / 8
        self.latency_s = latency_ms / 1e3

    def cost(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


class VirtualClock:
    """A worker's clock: inner steps cost virtual time, charged before the step's compute so that a
    DDP gradient all-reduce inside the step sees the right arrival times."""

    def __init__(self, sched: Scheduler, step_s: float, jitter: float, seed: int) -> None:
        self.sched = sched
        self.step_s = step_s
        self.jitter = jitter
        self.rng = random.Random(seed)

    def now(self) -> float:
        return self.sched.vt[self.sched.me]

    def step_begin(self) -> None:
        noise = self.rng.lognormvariate(0.0, self.jitter) if self.jitter > 0 else 1.0
        self.sched.advance(self.step_s * noise)

    def step_done(self, elapsed_s: float) -> None:
        """The step's virtual cost was charged by step_begin."""


# ---------------------------------------------------------------------------------------------
# in-process collectives


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
        out = self._meet(tensor.detach().clone(), lambda parts: [parts] * self.size, (self.size - 1) * n)
        self.counter.add((self.size - 1) * n, (self.size - 1) * n)
        return [o.clone() for o in out]

    def all_to_all(self, chunks: list[Tensor]) -> list[Tensor]:
        assert len(chunks) == self.size, f"need {self.size} chunks, got {len(chunks)}"
        n = chunks[0].numel() * chunks[0].element_size()
        out = self._meet(
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
            self.sched.at(self.sched.now + self.net.cost(nbytes), lambda t, c=client, f=frames: c._receive(f, t))
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
    """StarClient's interface (dilo/transport/zmq_star.py) over a Post. `drop_replies` loses that
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


# ---------------------------------------------------------------------------------------------
# worlds


class SimStaticWorld(StaticWorld):
    """A static world whose transport is the in-process Hub."""

    def __init__(self, cfg: RunConfig, rank: int, transport: SimTransport, clock: VirtualClock) -> None:
        self.cfg = cfg
        self.rank, self.size = rank, transport.size
        self.global_rank, self.global_size = rank, transport.size  # one rank per island
        self.log_name = f"worker{rank}"
        self.device = torch.device("cpu")
        self.transport = transport  # type: ignore[assignment]
        self.outer_transport = transport  # type: ignore[assignment]
        self.counter = transport.counter
        self.clock = clock  # type: ignore[assignment]
        self.step_limit = cfg.steps


class SimElasticWorld(ElasticWorld):
    """An elastic world whose coordinator link is a LocalStarClient."""

    def __init__(self, cfg: RunConfig, index: int, post: Post, clock: VirtualClock, thread: int) -> None:
        super().__init__(cfg, f"sim{index}")  # island: index % workers, from the id's digits
        self.post = post
        self.thread = thread
        self.clock = clock  # type: ignore[assignment]

    def strategy(self, model: torch.nn.Module) -> Any:
        from dilo.outer.async_local import AsyncLocalSGD
        from dilo.outer.star import StarDiLoCo

        self.client = LocalStarClient(  # type: ignore[assignment]
            self.post,
            self.cfg.membership,
            self.worker_id,
            run=self.cfg.name,
            fingerprint=self.cfg.fingerprint(),
            thread=self.thread,
        )
        self.counter = self.client.counter
        cls = AsyncLocalSGD if self.cfg.outer.kind == "async" else StarDiLoCo
        return cls(model, self.client, self.cfg)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# driver


def simulate(
    cfg: RunConfig, *, timeout_s: float | None = None, hooks: dict[int, Callable[[Any], None]] | None = None
) -> dict[str, Any]:
    """Run cfg.workers virtual workers to the end; write logs and `sim.json`; return its content.

    hooks: {worker index: fn(world)} called in that worker's thread before it trains (tests use
    it to reach a worker's client)."""
    from dilo.train import train

    if cfg.checkpoint.resume:
        raise ConfigError("dilo sim starts from scratch: drop checkpoint.resume")
    if cfg.transport.island_ranks != 1:
        raise ConfigError("dilo sim runs one rank per virtual worker: drop transport.island_ranks")
    cfg = cfg.model_copy(update={"log": cfg.log.model_copy(update={"progress": False})})
    n = cfg.workers
    sched = Scheduler()
    net = Network(cfg.sim.bandwidth_mbps, cfg.sim.latency_ms)
    elastic = cfg.membership.kind == "coordinator"
    coord: Coordinator | None = None
    post: Post | None = None
    hub: Hub | None = None
    if elastic:
        coord = Coordinator(cfg, inproc=True, clock=lambda: sched.now)
        post = Post(sched, coord, net)
        sched.on_crash = lambda w: post.alive.discard(f"sim{w}")  # it stops heartbeating
    else:
        hub = Hub(sched, n, net)
    start = {w: 0.0 for w in range(n)}
    for e in cfg.sim.events:
        if e.action == "join":
            start[e.worker] = e.at_s
        elif e.action == "crash":
            sched.crash_at[e.worker] = min(e.at_s, sched.crash_at.get(e.worker, math.inf))
    stops = {w: threading.Event() for w in range(n)}
    summaries: dict[int, dict[str, Any]] = {}

    def worker(w: int) -> None:
        clock = VirtualClock(
            sched, cfg.sim.step_s * cfg.heterogeneity.slowdown_of(w), cfg.sim.jitter, cfg.seed * 7919 + w
        )
        if elastic:
            world: Any = SimElasticWorld(cfg, w, post, clock, thread=w)  # type: ignore[arg-type]
        else:
            world = SimStaticWorld(cfg, w, SimTransport(hub, w), clock)  # type: ignore[arg-type]
        if hooks and w in hooks:
            hooks[w](world)
        summaries[w] = train(cfg, world, stop=stops[w])

    for e in cfg.sim.events:
        if e.action == "leave":
            sched.at(e.at_s, lambda t, w=e.worker: stops[w].set())
    for w in range(n):
        sched.spawn(w, lambda w=w: worker(w), at=start[w])
    t0 = time.perf_counter()
    sched.run(timeout_s=timeout_s)
    errors = {w: e for w, e in sched.errors.items() if not isinstance(e, Deadlock)}
    if errors:
        w, e = min(errors.items())
        raise DiloError(f"virtual worker {w} failed: {type(e).__name__}: {e}") from e
    if sched.deadlock is not None:
        raise sched.deadlock
    result = {
        "name": cfg.name,
        "strategy": cfg.outer.kind,
        "update": getattr(cfg.outer, "update", None),
        "workers": n,
        "virtual_s": max(sched.vt.values(), default=0.0),
        "real_s": time.perf_counter() - t0,
        "crashed": sorted(w for w in sched.crash_at if w not in summaries),
        "summaries": {str(w): s for w, s in sorted(summaries.items())},
        "coordinator": coord.status() if coord is not None else None,
    }
    out = cfg.run_dir / "sim.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def format_result(result: dict[str, Any], run_dir: Path) -> str:
    vals = [s.get("val_loss") for s in result["summaries"].values() if s.get("val_loss") is not None]
    lines = [
        f"dilo sim: {result['strategy']}{' / ' + result['update'] if result['update'] else ''}, "
        f"{result['workers']} virtual workers",
        f"  virtual time {result['virtual_s']:.1f} s in {result['real_s']:.1f} s of real time",
        f"  final validation loss {min(vals):.4f} (best worker), {max(vals):.4f} (worst)" if vals else "",
        f"  logs in {run_dir / 'logs'}, summary in {run_dir / 'sim.json'}",
    ]
    return "\n".join(x for x in lines if x)
