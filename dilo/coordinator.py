"""The dilo coordinator: membership, views, and the global state of synchronous star rounds.

    dilo coordinator CONFIG [--resume] [--coordinator.bind=tcp://0.0.0.0:29600]

A small single-threaded ZeroMQ ROUTER server. It keeps the membership table (who joined, when
each was last heard from), numbered views (an epoch that grows with every join and leave), the
global fp32 parameters and the outer optimizer state. It never runs a forward or backward pass.

A synchronous round (DiLoCo, FedAvg) closes when every member of the round has pushed, or
`round_timeout_s` after the first push with at least `min_workers` pushes. The mean divides by the weights of the
workers that contributed. Pushes based on an older version are answered with the current state
(and counted as late); a joiner gets the current state at once and never blocks a round in
progress. A worker that misses heartbeats for `heartbeat_timeout_s` leaves the view, and a round
waiting for it closes without it.

With outer.kind = "async" there are no rounds: every push is applied on arrival by the server
rule of dilo/outer/server.py (delayed Nesterov, naive Nesterov, FedBuff, FedAsync), and its
RESULT carries the fresh parameters, the pusher's staleness and the number of inner steps it
should run next (DyLU: in proportion to its measured speed). The run ends when the workers
together have trained `steps * workers` inner steps, the compute of a synchronous run of the same
config; each worker's last RESULT says `done`.

Every message is validated (dilo/wire.py: sizes before parsing, HMAC, protocol version, run,
config fingerprint, tensor names, shapes, dtypes, finite values). A bad message is answered with
ERROR naming the cause, counted and logged; the state is untouched and the others are served.

The state is checkpointed atomically every `coordinator.checkpoint_every` versions (before the
RESULTs that announce the version go out) and on SIGTERM; `--resume` restarts from the newest
checkpoint and the workers re-join with their ids, so a crash loses at most the round in progress.
Every ACK, WELCOME and RESULT carries `boot`, an id of this process, so that workers notice a
restart even when it was quicker than their request timeout.

`Coordinator(cfg, inproc=True, clock=...)` has no socket: `handle()` takes encoded frames and
the replies collect in `outbox`; `dilo sim` drives it so on a virtual clock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq

from dilo import wire
from dilo.config import AsyncConfig, GossipConfig, RunConfig
from dilo.errors import ConfigError
from dilo.guard import RateLimiter, RejectLog
from dilo.model import build_model, param_names, params_of
from dilo.outer.aggregate import finite, member_stats, outliers
from dilo.outer.base import tensor_digest
from dilo.outer.server import build_rule, dylu_steps
from dilo.outer.star import StarCodec, load_outer_state, outer_optimizer, outer_state_tensors
from dilo.session import Sessions, challenge_reply
from dilo.state import load_worker_state, rounds_of, save_worker_state
from dilo.transport.zmq_star import bind as zmq_bind
from dilo.transport.zmq_star import frames_nbytes

log = logging.getLogger("dilo.coordinator")

_ITEMSIZE = {name: dtype.itemsize for name, dtype in wire.DTYPES.items()}
MAX_WEIGHT = float(2**40)
"""The largest push weight (token counts of a round stay far below it); larger is refused."""
MAX_COUNT = 2**40
"""The largest tokens or steps one push may claim."""
MAX_SECONDS = 1e7
BATCH = 256
"""Messages handled between two timer ticks: a flood cannot starve expiry and deadlines."""
TICK_S = 0.05


@dataclass
class Member:
    worker: str
    joined_at: float
    last_seen: float
    joined_version: int
    pushes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    holds: int = -1
    """async: the version this worker was last handed."""
    address: str = ""
    """gossip: where the worker listens for its peers."""
    island: int = -1
    """The data island handed out to a worker that asked for one (JOIN with island = "auto")."""
    staleness: Counter[int] = field(default_factory=Counter)
    """async: how many of its applied pushes had each staleness."""
    identity: bytes = b""
    """The ZeroMQ routing id of the socket that joined: its PUSH, PULL and LEAVE must come from it."""


@dataclass
class Push:
    identity: bytes
    worker: str
    sid: str
    seq: int
    weight: float
    contributes: bool
    tokens: int
    loss: float
    flats: list[torch.Tensor] | None


@dataclass
class Round:
    index: int
    members: set[str]
    pushes: dict[str, Push] = field(default_factory=dict)
    first_push: float | None = None


class Coordinator:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        bind: str | None = None,
        resume: bool = False,
        secret: bytes | None = None,
        inproc: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.mcfg = cfg.membership
        self.run_id = cfg.name
        self.fingerprint = cfg.fingerprint()
        self.secret = secret
        model = build_model(cfg.model, cfg.seed)
        self.names = param_names(model)
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in params_of(model)]
        self.async_cfg = cfg.outer if isinstance(cfg.outer, AsyncConfig) else None
        self.tracker = isinstance(cfg.outer, GossipConfig)
        """gossip: the coordinator only tracks members and their peer addresses; it holds no model."""
        self.optimizer = None if self.async_cfg or self.tracker else outer_optimizer(cfg, self.params)
        self.rule = build_rule(self.async_cfg, [p.data for p in self.params], 1) if self.async_cfg else None
        # async bookkeeping: measured speeds (steps/s), steps assigned and not yet pushed, the global
        # budget, parameters of versions still held by a worker (FedAsync mixes them), held replies
        self.speeds: dict[str, float] = {}
        self.in_flight: dict[str, int] = {}
        self.budget = cfg.steps * cfg.workers
        self.steps_done = 0
        self.applied = 0
        self.dropped = 0
        self.staleness: Counter[int] = Counter()
        """async: how many applied pushes had each staleness."""
        self.snapshots: dict[int, list[torch.Tensor]] = {}
        self.grace: list[tuple[bytes, str, wire.Message, dict[str, Any]]] = []
        self.grace_until: float | None = None
        self.started = not self.async_cfg or cfg.membership.start_quorum <= 1
        self.waiting: dict[str, tuple[bytes, wire.Message]] = {}
        """async start: joiners whose WELCOME waits for start_quorum (their socket and JOIN)."""
        self.start_deadline: float | None = None
        self.star = StarCodec(self.names, [p.shape for p in self.params], cfg.codec, seed=cfg.seed)
        self.push_spec = self.star.push_spec()
        self.param_bytes = sum(p.numel() * 4 for p in self.params)
        # What a worker may send: a push is the largest message, and its frames have known sizes.
        frame_bytes = [math.prod(shape) * _ITEMSIZE[dtype] for shape, dtype in self.push_spec.values()]
        self.limits = wire.Limits(
            max_frame_bytes=max(frame_bytes, default=0),
            max_total_bytes=sum(frame_bytes) + wire.Limits.max_header_bytes,
            max_frames=len(frame_bytes),
        )
        self.version = 0
        self.round_index = 0
        self.epoch = 0
        self.members: dict[str, Member] = {}
        self.round = Round(0, set())
        self.rejects = RejectLog(log, clock=clock)
        self.sessions = Sessions(clock=clock)
        rate = cfg.membership.rate_limit
        self.limiter = RateLimiter(rate, 2 * rate, clock=clock)
        self.late = 0
        self.last_round: dict[str, Any] = {}
        """The latest closed round: per-member update norms and cosines, who was left out and why."""
        self.bytes_in = 0
        self.bytes_out = 0
        self.global_tokens = 0
        # A new id per process: workers compare it across heartbeats to notice a restart (a
        # coordinator that came back within request_timeout_s never looks "lost" to them, and a
        # PUSH the old process received and never answered would otherwise be waited on forever).
        self.boot = secrets.token_hex(8)
        self.ckpt_dir = cfg.run_dir / "coordinator"
        if resume:
            self._load_checkpoint()
        self.outbox: list[tuple[bytes, list[Any]]] = []
        self.sock: zmq.Socket | None = None
        if inproc:
            self.address = "inproc"
            return
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # libzmq drops a frame larger than any a worker sends (and the connection that sent it)
        # before allocating it; a few queued messages per connection keep a flooder's memory small
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(self.limits.max_frame_bytes, self.limits.max_header_bytes))
        self.sock.setsockopt(zmq.RCVHWM, 64)
        if cfg.membership.curve_dir:
            from dilo import keys

            keys.apply_server(self.sock, Path(cfg.membership.curve_dir) / "server.key")
        self.address = zmq_bind(self.sock, bind or cfg.coordinator.bind, cfg.coordinator.advertise)

    # ------------------------------------------------------------------------------- plumbing

    def _send(
        self, identity: bytes, msg: wire.Message, worker: str | None = None, *, to: wire.Message | None = None
    ) -> None:
        """Send msg to identity; as the reply `to` a request, it carries that request's session and seq."""
        msg.run = self.run_id
        msg.fp = self.fingerprint
        if to is not None:
            msg.sid, msg.seq = to.sid, to.seq
        frames = wire.encode(msg, self.secret)
        n = frames_nbytes(frames)
        self.bytes_out += n
        if worker in self.members:
            self.members[worker].bytes_out += n
        if self.sock is None:
            self.outbox.append((identity, frames))
        else:
            self.sock.send_multipart([identity, *frames], copy=False)

    @property
    def rejected(self) -> Counter[str]:
        """Rejected messages since start, by code."""
        return self.rejects.total

    def _error(self, identity: bytes, code: str, message: str, to: wire.Message | None = None) -> None:
        self.rejects.reject(code, message)
        self._send(
            identity,
            wire.Message(type=wire.MsgType.ERROR, worker="coordinator", body={"code": code, "message": message}),
            to=to,
        )

    def state_message(self, msg_type: wire.MsgType, body: dict[str, Any] | None = None) -> wire.Message:
        # copies: frames go out zero-copy and the next outer step updates the parameters in place
        tensors = {f"p.{i}": p.detach().clone() for i, p in enumerate(self.params)}
        if self.optimizer is not None:
            tensors.update({k: v.clone() for k, v in outer_state_tensors(self.optimizer, self.params).items()})
        return wire.Message(
            type=msg_type,
            worker="coordinator",
            base=self.version,
            tensors=tensors,
            body={
                "version": self.version,
                "round": self.round_index,
                "epoch": self.epoch,
                "members": sorted(self.members),
                "anchor_hash": self.anchor_hash(),
                "boot": self.boot,
                **(body or {}),
            },
        )

    def anchor_hash(self) -> str:
        return tensor_digest(self.params)

    # ------------------------------------------------------------------------------- serving

    def serve(self, stop: threading.Event | None = None, poll_ms: int = 50) -> None:
        """Serve until `stop` is set (or SIGTERM sets it); checkpoint on the way out.

        At most BATCH messages are handled between two ticks and a tick runs at least every
        TICK_S, so membership expiry and round deadlines keep their time under any flood (ZeroMQ
        queues each connection separately and serves them in turn, so honest workers keep their
        share of the BATCH)."""
        assert self.sock is not None
        stop = stop or threading.Event()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while not stop.is_set():
                if poller.poll(poll_ms):
                    until = time.monotonic() + TICK_S
                    for _ in range(BATCH):
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.handle(frames[0].bytes, frames[1:])
                        if time.monotonic() >= until:
                            break
                self.tick()
        finally:
            self.rejects.flush(force=True)
            try:
                self.checkpoint()
            finally:
                self.sock.close(0)
                self.ctx.term()

    def tick(self, now: float | None = None) -> None:
        """Expire silent workers, close a round whose deadline passed, end a grace period; a failure
        in any of it is logged and the coordinator serves on."""
        try:
            self._tick(now)
        except Exception:  # noqa: BLE001 - the timer must keep running whatever one round does
            log.exception("unexpected error in the coordinator's timer; serving on")
        self.rejects.flush()
        self.sessions.prune()

    def _tick(self, now: float | None) -> None:
        now = self.clock() if now is None else now
        for worker, m in list(self.members.items()):
            if now - m.last_seen >= self.mcfg.heartbeat_timeout_s and worker not in self.waiting:
                log.warning("worker %s silent for %.1f s: leaves the view", worker, now - m.last_seen)
                self._remove(worker)
        if self.async_cfg:
            if self.waiting and self.start_deadline is not None and now >= self.start_deadline:
                self._start()
            if self.grace_until is not None and now >= self.grace_until:
                self._release_grace()
        else:
            self._maybe_close(now)

    def next_deadline(self) -> float | None:
        """The earliest time at which tick() has something to do (the simulator sleeps until then)."""
        times = [m.last_seen + self.mcfg.heartbeat_timeout_s for w, m in self.members.items() if w not in self.waiting]
        if self.waiting and self.start_deadline is not None:
            times.append(self.start_deadline)
        if self.grace_until is not None:
            times.append(self.grace_until)
        if not self.async_cfg and self.round.pushes and self.round.first_push is not None:
            times.append(self.round.first_push + self.mcfg.round_timeout_s)
        return min(times) if times else None

    def handle(self, identity: bytes, frames: list[Any]) -> None:
        if not self.limiter.allow(identity):
            self.rejects.count("rate")  # over its budget: dropped unread and unanswered
            return
        try:
            self._handle(identity, frames)
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen payload must not stop the coordinator
            log.exception("unexpected error while handling a message")
            with contextlib.suppress(Exception):  # e.g. an identity that cannot be sent to; logged above
                self._error(identity, "internal", f"could not handle the message: {type(e).__name__}: {e}")

    def _handle(self, identity: bytes, frames: list[Any]) -> None:
        size = frames_nbytes(frames)
        self.bytes_in += size
        try:
            msg = wire.decode(frames, secret=self.secret, limits=self.limits)
            if msg.type != wire.MsgType.STATUS:  # `dilo status` knows only the address
                if msg.run != self.run_id:
                    raise wire.WireError("run", f"message for run {msg.run!r}, this coordinator serves {self.run_id!r}")
                if msg.fp != self.fingerprint:
                    raise wire.WireError(
                        "config",
                        f"config fingerprint {msg.fp!r} differs from the coordinator's "
                        f"{self.fingerprint!r}: start workers and coordinator with the same config",
                    )
        except wire.WireError as e:
            self._error(identity, e.code, str(e))
            return
        try:
            self._dispatch(identity, msg, size)
        except wire.WireError as e:
            self._error(identity, e.code, str(e), to=msg)
        except (ValueError, KeyError, IndexError, TypeError, RuntimeError, OverflowError) as e:
            # a message that passed the wire checks but not the codec's: reject it, keep serving
            self._error(identity, "bad_payload", f"{type(e).__name__}: {e}", to=msg)

    def _dispatch(self, identity: bytes, msg: wire.Message, size: int) -> None:
        """One valid, authenticated message: its session first, then its meaning."""
        t = msg.type
        if t == wire.MsgType.STATUS:
            self._send(identity, wire.Message(type=wire.MsgType.STATUS_REPLY, worker="coordinator", body=self.status()))
            return
        if t == wire.MsgType.HELLO:  # costs nothing to keep: the challenge is checked, not stored
            self._send(identity, challenge_reply(self.sessions, msg, "coordinator", identity), to=msg)
            return
        if t == wire.MsgType.JOIN:
            self._join(identity, msg)
            return
        member = self.members.get(msg.worker)
        if member is None:
            raise wire.WireError("not_member", f"worker {msg.worker!r} is not a member: send JOIN first")
        # Each session belongs to the connection that opened it: requests to the one that joined,
        # heartbeats (a socket of their own, a session opened by its first heartbeat) to theirs.
        # A copy from any other connection is refused ("identity") before its number is spent,
        # a repeated number is refused ("replay"): nothing below runs for either.
        if t == wire.MsgType.HEARTBEAT:
            self.sessions.accept(msg.worker, msg.sid, msg.seq, channel="heartbeat", identity=identity)
        else:
            self.sessions.check(msg.worker, msg.sid, msg.seq, identity=identity)
        member.last_seen = self.clock()
        member.bytes_in += size
        if t == wire.MsgType.HEARTBEAT:
            self._send(
                identity,
                wire.Message(
                    type=wire.MsgType.ACK,
                    worker="coordinator",
                    body={
                        "epoch": self.epoch,
                        "version": self.version,
                        "round": self.round_index,
                        "members": sorted(self.members),
                        "boot": self.boot,
                        **({"peers": self.peers()} if self.tracker else {}),
                    },
                ),
                msg.worker,
                to=msg,
            )
        elif t == wire.MsgType.PUSH and self.tracker:
            raise wire.WireError("bad_type", "a gossip run has no central state: peers exchange directly")
        elif t == wire.MsgType.PUSH:
            if self.async_cfg:
                self._push_async(identity, msg)
            else:
                self._push(identity, msg)
        elif t == wire.MsgType.PULL:
            self._send(identity, self._handout(msg.worker, wire.MsgType.STATE), msg.worker, to=msg)
        elif t == wire.MsgType.LEAVE:
            self._remove(msg.worker)
            self._send(identity, wire.Message(type=wire.MsgType.BYE, worker="coordinator"), to=msg)
        else:
            raise wire.WireError("bad_type", f"a coordinator does not accept {t.value} messages")

    def _join(self, identity: bytes, msg: wire.Message) -> None:
        now = self.clock()
        address = ""
        if self.tracker:
            address = msg.body.get("p2p", "")
            if not isinstance(address, str) or not re.fullmatch(r"tcp://[^:\s]+:\d{1,5}", address):
                raise wire.WireError("bad_body", f"a gossip JOIN carries p2p = tcp://HOST:PORT, got {address!r}")
        wants = msg.body.get("island")
        if wants is not None and wants != "auto":
            raise wire.WireError("bad_body", f"island must be 'auto' or absent, got {wants!r}")
        # a fresh challenge, or "session" / "replay"; from now on this session is the worker's only one
        self.sessions.open(msg.worker, msg.sid, msg.seq, identity=identity)
        if msg.worker in self.members:
            m = self.members[msg.worker]
            if m.identity and m.identity != identity:
                log.info("worker %s joined again from a new connection; its old session is closed", msg.worker)
            m.last_seen = now
        else:
            self.members[msg.worker] = Member(msg.worker, now, now, self.version, address=address)
            self.epoch += 1
            if self.rule is not None:
                self.rule.set_workers(len(self.members))
            log.info(
                "worker %s joined at version %d, anchor %s (epoch %d, %d members)",
                msg.worker,
                self.version,
                self.anchor_hash(),
                self.epoch,
                len(self.members),
            )
        self.members[msg.worker].identity = identity
        if wants == "auto" and self.members[msg.worker].island < 0:
            self.members[msg.worker].island = self._free_island(msg.worker)
        if address and self.members[msg.worker].address != address:  # re-joined from another port
            self.members[msg.worker].address = address
            self.epoch += 1
        if self.async_cfg and not self.started:
            # async runs start together: the WELCOMEs wait for start_quorum joiners (or the deadline),
            # so that the first worker up does not spend the budget alone
            self.waiting[msg.worker] = (identity, msg)  # a re-sent JOIN comes from a new socket
            self.start_deadline = self.start_deadline or now + self.mcfg.round_timeout_s
            if len(self.members) >= self.mcfg.start_quorum:
                self._start()
            return
        self._send(identity, self._handout(msg.worker, wire.MsgType.WELCOME), msg.worker, to=msg)

    def _free_island(self, worker: str) -> int:
        """The lowest island no other member holds; past `workers`, the least used one."""
        held = Counter(m.island for w, m in self.members.items() if w != worker and m.island >= 0)
        n = max(1, self.cfg.workers)
        return min(range(n), key=lambda i: (held[i], i))

    def peers(self) -> dict[str, str]:
        return {w: m.address for w, m in sorted(self.members.items())}

    def _start(self) -> None:
        self.started = True
        waiting, self.waiting = self.waiting, {}
        log.info("starting with %d workers", len(waiting))
        for worker, (identity, join) in sorted(waiting.items()):
            if worker in self.members:
                self._send(identity, self._handout(worker, wire.MsgType.WELCOME), worker, to=join)

    def _inner_steps(self) -> int:
        return int(getattr(self.cfg.outer, "inner_steps", 1))

    def _handout(self, worker: str, msg_type: wire.MsgType, body: dict[str, Any] | None = None) -> wire.Message:
        """The current state for `worker`; async: with its next step assignment, which it now holds;
        gossip: only the members and their addresses."""
        member = self.members.get(worker)
        if member is not None and member.island >= 0:
            body = {**(body or {}), "island": member.island}
        if self.tracker:
            return wire.Message(
                type=msg_type,
                worker="coordinator",
                body={
                    "epoch": self.epoch,
                    "members": sorted(self.members),
                    "peers": self.peers(),
                    "boot": self.boot,
                    **(body or {}),
                },
            )
        if not self.async_cfg:
            return self.state_message(msg_type, {"inner_steps": self._inner_steps(), **(body or {})})
        steps = self._assign(worker)
        self._hold(worker)
        return self.state_message(
            msg_type,
            {
                "inner_steps": max(steps, 1),
                "done": steps == 0,
                "schedule_step": self.steps_done // max(1, self.cfg.workers),
                "world_tokens": self.global_tokens,
                **(body or {}),
            },
        )

    def _remove(self, worker: str) -> None:
        self.sessions.close(worker)
        self.sessions.close(worker, channel="heartbeat")
        if self.members.pop(worker, None) is not None:
            self.epoch += 1
            self.round.members.discard(worker)
            self.in_flight.pop(worker, None)
            self.speeds.pop(worker, None)
            self.grace = [g for g in self.grace if g[1] != worker]
            if self.rule is not None:
                self.rule.set_workers(max(1, len(self.members)))
            self._prune_snapshots()
            log.info("worker %s left (epoch %d, %d members)", worker, self.epoch, len(self.members))

    def _check_push(self, msg: wire.Message) -> tuple[bool, float, int, float]:
        """Validate a push's body and tensors: (contributes, weight, tokens, loss), or WireError.

        Everything is checked before any state changes: a bad push is answered with ERROR whatever
        its base version (garbage is not "late"), and a rejected push leaves no trace (no deadline
        started, no member list frozen, nothing applied). Every number has bounds: a weight of
        1e39 overflowed float32 inside the next round's mean, and 3e38 turned a finite mean into inf."""
        body = msg.body
        contributes = _flag(body, "contributes", True)
        _flag(body, "stop", False)  # validated; a worker's stop concerns only itself
        weight = _number(body, "weight", 1.0, MAX_WEIGHT)
        tokens = int(_number(body, "tokens", 0, MAX_COUNT, integer=True))
        loss = body.get("loss", float("nan"))
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise wire.WireError("bad_body", f"loss must be a number, got {loss!r}")
        if not -(2**63) < msg.base <= self.version:
            raise wire.WireError("bad_base", f"base version {msg.base} is newer than this coordinator's {self.version}")
        if contributes:
            wire.check_shapes(msg, self.push_spec)
            wire.check_finite(msg)
        elif msg.tensors:
            wire.check_shapes(msg, self.push_spec)  # a non-contributing push may carry its (ignored) zeros
        return contributes, weight, tokens, float(loss)

    def _decode(self, msg: wire.Message) -> list[torch.Tensor]:
        flats = self.star.decode_push(msg.tensors)
        if not finite(flats):
            raise wire.WireError("nonfinite", "the decoded pseudo-gradient holds NaN or Inf")
        return flats

    def _push(self, identity: bytes, msg: wire.Message) -> None:
        contributes, weight, tokens, loss = self._check_push(msg)
        if msg.base != self.version:
            # a push for a round that already closed: the worker catches up from the current state
            self.late += 1
            self._send(identity, self.state_message(wire.MsgType.STATE, {"reason": "late"}), msg.worker, to=msg)
            return
        flats = self._decode(msg) if contributes else None
        if not self.round.members:
            self.round.members = set(self.members)
        now = self.clock()
        self.round.first_push = self.round.first_push or now
        self.round.pushes[msg.worker] = Push(
            identity, msg.worker, msg.sid, msg.seq, weight, contributes and weight > 0, tokens, loss, flats
        )
        self.members[msg.worker].pushes += 1
        self._maybe_close(now)

    # ------------------------------------------------------------------------------- async

    def _push_async(self, identity: bytes, msg: wire.Message) -> None:
        """Apply one push at once; answer with the fresh parameters and the next step count."""
        member = self.members[msg.worker]
        contributes, weight, tokens, _ = self._check_push(msg)
        # a push may claim the steps it was assigned (after a restart, one round's worth)
        most = max(self.in_flight.get(msg.worker, 0), self.async_cfg.inner_steps)
        steps = int(_number(msg.body, "steps", 0, most, integer=True))
        inner_s = _number(msg.body, "inner_s", 0.0, MAX_SECONDS)
        if not 0 <= msg.base <= self.version:
            raise wire.WireError("bad_base", f"base version {msg.base} is not one this coordinator handed out")
        staleness = self.version - msg.base
        base = None
        if contributes and self.rule.needs_base:
            base = self.snapshots.get(msg.base)
            if base is None:  # a worker pushing on a version it never got from us (or a resumed run)
                raise wire.WireError("bad_base", f"version {msg.base} is unknown here: pull the current state")
        flats = self._decode(msg) if contributes else None
        # the work is done either way: it counts against the budget, and it measured the speed
        self.in_flight.pop(msg.worker, None)
        self.steps_done += steps
        self.global_tokens += tokens
        if steps > 0 and inner_s > 0:
            self.speeds[msg.worker] = steps / inner_s
        member.pushes += 1
        limit = self.async_cfg.max_staleness
        applied = False
        refused = ""
        if limit and staleness > limit:
            self.dropped += 1
            log.info("dropped a push of %s: staleness %d > %d", msg.worker, staleness, limit)
        elif flats is not None and weight > 0:
            g = [t.contiguous() for t in self.star.split(flats)]
            saved = ([p.detach().clone() for p in self.params], self.rule.state_dict())
            applied = self.rule.push(g, staleness=staleness, weight=weight, base=base)
            if not finite([p.detach() for p in self.params]):
                # the rule's arithmetic overflowed: nothing of this push may reach the global state
                with torch.no_grad():
                    for p, v in zip(self.params, saved[0]):
                        p.copy_(v)
                self.rule.load_state_dict(saved[1])
                applied, refused = False, "the update would make the global parameters non-finite"
                self.rejects.reject("nonfinite_update", f"push of {msg.worker!r}: {refused}; not applied")
            else:
                member.staleness[staleness] += 1
                self.staleness[staleness] += 1
                self.applied += 1
            if applied:
                self.version += 1
                every = self.cfg.coordinator.checkpoint_every
                if every and self.version % every == 0:
                    try:
                        self.checkpoint()
                    except OSError:
                        log.exception("checkpoint of version %d failed; serving on without it", self.version)
        reply = {"staleness": staleness, "applied": applied, "dropped": bool(limit and staleness > limit)}
        if refused:
            reply["refused"] = refused
        if self.async_cfg.grace_s > 0:
            # hold the reply: whoever else finishes within grace_s restarts from the same parameters
            now = self.clock()
            if self.grace_until is None:
                self.grace_until = now + self.async_cfg.grace_s
            self.grace.append((identity, msg.worker, _reply_to(msg), reply))
            return
        self._result(identity, msg.worker, msg, reply)

    def _result(self, identity: bytes, worker: str, to: wire.Message, body: dict[str, Any]) -> None:
        self._send(identity, self._handout(worker, wire.MsgType.RESULT, body), worker, to=to)

    def _release_grace(self) -> None:
        held, self.grace, self.grace_until = self.grace, [], None
        for identity, worker, to, body in held:
            if worker in self.members:
                self._result(identity, worker, to, body)

    def _assign(self, worker: str) -> int:
        """Inner steps for the worker's next round: DyLU share of H, capped by the budget left (0: done)."""
        h = self.async_cfg.inner_steps
        steps = h
        if self.async_cfg.dylu:
            known = {w: v for w, v in self.speeds.items() if w in self.members}
            steps = dylu_steps({**known, worker: known.get(worker, 0.0)}, h)[worker]
        self.in_flight.pop(worker, None)
        left = self.budget - self.steps_done - sum(self.in_flight.values())
        steps = max(0, min(steps, left))
        if steps:
            self.in_flight[worker] = steps
        return steps

    def _hold(self, worker: str) -> None:
        """The worker now holds the current version: keep its parameters while FedAsync may need them."""
        if worker in self.members:
            self.members[worker].holds = self.version
        if self.rule is not None and self.rule.needs_base and self.version not in self.snapshots:
            self.snapshots[self.version] = [p.detach().clone() for p in self.params]
        self._prune_snapshots()

    def _prune_snapshots(self) -> None:
        held = {m.holds for m in self.members.values()}
        for v in [v for v in self.snapshots if v not in held]:
            del self.snapshots[v]

    def _maybe_close(self, now: float) -> None:
        r = self.round
        if not r.pushes:
            return
        waiting = {w for w in r.members if w in self.members} - set(r.pushes)
        timed_out = r.first_push is not None and now - r.first_push >= self.mcfg.round_timeout_s
        if waiting and not (timed_out and len(r.pushes) >= self.mcfg.min_workers):
            return
        if self.version == 0 and len(r.pushes) < self.mcfg.start_quorum and not timed_out:
            return  # the first round waits for the expected workers (or its deadline)
        if waiting:
            log.warning("round %d closes at its deadline without %s", r.index, sorted(waiting))
        self._close()

    def _close(self) -> None:
        """Close the round: the weighted mean of its contributions, one outer step, RESULT to every
        pusher. No round can make the global state non-finite: a push that overflows the mean is
        left out (and named in the log, the RESULT and STATUS), and an outer step that would still
        produce NaN or Inf is undone and the round is not committed."""
        r = self.round
        contributors = [(w, p) for w, p in sorted(r.pushes.items()) if p.contributes and p.flats]
        tokens = sum(p.tokens for p in r.pushes.values())
        self.global_tokens += tokens
        tensors: dict[str, torch.Tensor] = {}
        committed, reason = False, ""
        stats: dict[str, dict[str, float | None]] = {}
        left_out: list[str] = []
        try:
            means, left_out = self._finite_mean(contributors)
            if means is not None:
                stats = member_stats([(w, p.flats) for w, p in contributors if w not in left_out], means)
                tensors, reason = self._outer_step(means, r.index)
                committed = not reason
            elif contributors:
                reason = "every contribution overflowed the mean"
        except Exception as e:  # noqa: BLE001 - a round that cannot close must still answer its workers
            log.exception("round %d could not be closed; not committed", r.index)
            tensors, committed, reason = {}, False, f"internal error closing the round: {type(e).__name__}"
        if committed:
            self.version += 1
        self.last_round = {"round": r.index, "members": stats, "left_out": left_out, "reason": reason}
        body = {
            "version": self.version,
            "round": r.index,
            "committed": committed,
            "participants": len(contributors) - len(left_out) if committed else 0,
            "tokens": tokens,
            "anchor_hash": self.anchor_hash(),
            "inner_steps": self._inner_steps(),
            "members": sorted(self.members),
            "epoch": self.epoch,
            "boot": self.boot,
            "member_stats": stats,
            "left_out": left_out,
            "reason": reason,
        }
        self.round_index += 1
        # the next round waits only for today's members: a worker joining later never blocks it
        self.round = Round(self.round_index, set(self.members))
        every = self.cfg.coordinator.checkpoint_every
        if committed and every and self.version % every == 0:
            # Write-ahead: on disk before any worker sees the new version. Checkpointing after the
            # RESULTs left a window where a crash lost a version the workers had already moved to
            # (they then dropped the round they had trained on top of it too: two rounds lost).
            try:
                self.checkpoint()
            except OSError:  # a full or failing disk must not strand the workers waiting for RESULT
                log.exception("checkpoint of version %d failed; serving on without it", self.version)
        for w, p in sorted(r.pushes.items()):
            reply = wire.Message(type=wire.MsgType.RESULT, worker="coordinator", base=self.version, body=body,
                                 tensors=tensors, sid=p.sid, seq=p.seq)  # fmt: skip
            self._send(p.identity, reply, w)
        log.info("round %d closed: %d contributions, version %d", r.index, body["participants"], self.version)
        if reason:
            log.warning("round %d was not committed: %s", r.index, reason)
        if stats:
            log.info("round %d update norms %s", r.index, {w: s["norm"] for w, s in stats.items()})
        for w in outliers(stats):
            log.warning(
                "round %d: the update of %s stands out (norm %s, cosine to the mean %s): check that worker",
                r.index, w, stats[w]["norm"], stats[w]["cos"],
            )  # fmt: skip

    def _finite_mean(self, contributors: list[tuple[str, Push]]) -> tuple[list[torch.Tensor] | None, list[str]]:
        """The weighted mean of the contributions; while it is not finite, leave out the push with
        the largest weighted magnitude (the one that overflows the sum) and try again."""
        left: list[tuple[str, Push]] = list(contributors)
        out: list[str] = []
        while left:
            means = self.star.weighted_mean([(p.weight, p.flats) for _, p in left if p.flats])
            if finite(means):
                return means, out
            worker, _ = max(left, key=lambda wp: _magnitude(wp[1]))
            self.rejects.reject("overflow", f"round {self.round.index}: the push of {worker!r} overflows the mean")
            log.error("round %d: the push of %s overflows the mean; it is left out", self.round.index, worker)
            out.append(worker)
            left = [(w, p) for w, p in left if w != worker]
        return None, out

    def _outer_step(self, means: list[torch.Tensor], round_idx: int) -> tuple[dict[str, torch.Tensor], str]:
        """Encode the mean, apply it with the outer optimizer: (the RESULT tensors, "") or, when the
        new state would not be finite, everything undone: ({}, why)."""
        assert self.optimizer is not None
        params = [p.detach().clone() for p in self.params]
        momentum = {k: v.clone() for k, v in outer_state_tensors(self.optimizer, self.params).items()}
        owners = [g.owner_residual for g in self.star.groups]  # encode_mean replaces, never mutates, them
        tensors = self.star.encode_mean(means, round_idx)
        for p, g in zip(self.params, self.star.decode_mean(tensors)):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite([p.detach() for p in self.params]) and finite(
            list(outer_state_tensors(self.optimizer, self.params).values())
        ):
            return tensors, ""
        with torch.no_grad():
            for p, v in zip(self.params, params):
                p.copy_(v)
        load_outer_state(self.optimizer, self.params, momentum)
        for g, owner in zip(self.star.groups, owners):
            g.owner_residual = owner
        why = "the outer step would make the global parameters non-finite"
        self.rejects.reject("nonfinite_update", f"round {round_idx}: {why}; not committed")
        log.error("round %d: %s; the round is not committed", round_idx, why)
        return {}, why

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "run": self.run_id,
            "version": self.version,
            "round": self.round_index,
            "epoch": self.epoch,
            "members": [
                {
                    "worker": m.worker,
                    "last_seen_s": round(now - m.last_seen, 3),
                    "pushes": m.pushes,
                    "bytes_in": m.bytes_in,
                    "bytes_out": m.bytes_out,
                    "joined_version": m.joined_version,
                    **(
                        {
                            "steps_per_s": round(self.speeds.get(m.worker, 0.0), 3),
                            "mean_staleness": _mean_of(m.staleness),
                            "max_staleness": max(m.staleness, default=None),
                        }
                        if self.async_cfg
                        else {}
                    ),
                }
                for m in sorted(self.members.values(), key=lambda m: m.worker)
            ],
            **(
                {
                    "applied": self.applied,
                    "dropped": self.dropped,
                    "steps": self.steps_done,
                    "budget": self.budget,
                    "staleness": {
                        "mean": _mean_of(self.staleness) or 0.0,
                        "max": max(self.staleness, default=0),
                        "histogram": {str(k): n for k, n in sorted(self.staleness.items())},
                    },
                }
                if self.async_cfg
                else {}
            ),
            "pending": sorted(self.round.pushes),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected": dict(self.rejected),
            "last_round": self.last_round,
            "late": self.late,
            "tokens": self.global_tokens,
            "boot": self.boot,
        }

    # ------------------------------------------------------------------------------- checkpoints

    def checkpoint(self) -> Path:
        state = {
            "params": [p.detach() for p in self.params],
            "outer": (
                self.rule.state_dict()
                if self.rule
                else outer_state_tensors(self.optimizer, self.params)
                if self.optimizer
                else {}
            ),
            "star": self.star.state_dict(),
            "async": {
                "steps": self.steps_done,
                "applied": self.applied,
                "dropped": self.dropped,
                "speeds": self.speeds,
            },
            "version": self.version,
            "round": self.round_index,
            "epoch": self.epoch,
            "members": sorted(self.members),
            "tokens": self.global_tokens,
            "fingerprint": self.fingerprint,
        }
        return save_worker_state(self.ckpt_dir, self.version, "coordinator", state)

    def _load_checkpoint(self) -> None:
        rounds = rounds_of(self.ckpt_dir, "coordinator")
        if not rounds:
            log.warning("--resume: no checkpoint in %s, starting from version 0", self.ckpt_dir)
            return
        state = load_worker_state(self.ckpt_dir, rounds[-1], "coordinator")
        if state["fingerprint"] != self.fingerprint:
            raise ConfigError(
                f"the checkpoint in {self.ckpt_dir} was written by another configuration "
                f"({state['fingerprint']} != {self.fingerprint})"
            )
        with torch.no_grad():
            for p, v in zip(self.params, state["params"]):
                p.copy_(v)
        if self.rule is not None:
            self.rule.load_state_dict(state["outer"])
            a = state["async"]
            self.steps_done, self.applied, self.dropped = int(a["steps"]), int(a["applied"]), int(a["dropped"])
            self.speeds = dict(a["speeds"])
        elif self.optimizer is not None:
            load_outer_state(self.optimizer, self.params, state["outer"])
        self.star.load_state_dict(state["star"])
        self.version, self.round_index, self.epoch = int(state["version"]), int(state["round"]), int(state["epoch"]) + 1
        self.started = True
        self.round = Round(self.round_index, set())
        self.global_tokens = int(state["tokens"])
        now = self.clock()
        # the old members get a heartbeat period to come back before they are dropped
        self.members = {w: Member(w, now, now, self.version) for w in state["members"]}
        if self.rule is not None:
            self.rule.set_workers(max(1, len(self.members)))
        log.info("resumed at version %d from %s", self.version, self.ckpt_dir)


def _mean_of(histogram: Counter[int]) -> float | None:
    n = sum(histogram.values())
    return round(sum(k * c for k, c in histogram.items()) / n, 3) if n else None


def _number(body: dict[str, Any], key: str, default: float, most: float, *, integer: bool = False) -> float:
    """body[key] as a number in [0, most] (an integer when asked), else WireError bad_body."""
    value = body.get(key, default)
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 <= value <= most:
        what = "an integer" if integer else "a number"
        raise wire.WireError("bad_body", f"{key} must be {what} in [0, {most:g}], got {value!r}")
    return float(value)


def _magnitude(p: Push) -> float:
    """weight x the largest |value| of a push, in float64: what it can add to a float32 sum."""
    return p.weight * max((float(f.abs().max()) for f in p.flats or [] if f.numel()), default=0.0)


def _reply_to(msg: wire.Message) -> wire.Message:
    """What a held reply needs of its request (session and seq), without the request's tensors."""
    return wire.Message(type=msg.type, worker=msg.worker, sid=msg.sid, seq=msg.seq)


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise wire.WireError("bad_body", f"{key} must be true or false, got {value!r}")
    return value
