"""The coordinator's server: one ZeroMQ ROUTER socket, sessions, the membership table and views.

A small single-threaded server. It keeps the membership table (who joined, when each was last
heard from), numbered views (an epoch that grows with every join and leave) and the counters
every reply carries; what a push does is the round policy's (policy.py). A worker that misses
heartbeats for `heartbeat_timeout_s` leaves the view, and a round waiting for it closes without it.

Every message is validated (dilo/wire.py: sizes before parsing, MAC, protocol version, run,
config fingerprint, tensor names, shapes, dtypes, finite values; dilo/bodies.py: every body). A
bad message is answered with ERROR naming the cause, counted and logged; the state is untouched
and the others are served.

The state is checkpointed atomically every `coordinator.checkpoint_every` versions and on the
way out of serve(). A version's checkpoint is a memory copy in the round's path; the files are
written on a background thread while the workers train the next round (one write at a time, so
the previous checkpoint is always complete). `--resume` restarts from the newest checkpoint and
the workers re-join with their ids, so a crash loses the round in progress and at most one
committed version (the one whose checkpoint was being written); workers that already hold it
find the coordinator older than themselves and re-join from its state. Every ACK, WELCOME and
RESULT carries `boot`, an id of this process, so that workers notice a restart even when it was
quicker than their request timeout.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zmq

from dilo import wire
from dilo.bodies import AckBody, ByeBody, Empty, ErrorBody, JoinBody, StateBody, dump, parse
from dilo.config import RunConfig
from dilo.coordinator.policy import Member, RoundPolicy, build_policy
from dilo.errors import ConfigError
from dilo.guard import RateLimiter, RejectLog
from dilo.outer.base import tensor_digest
from dilo.session import Sessions, challenge_reply
from dilo.state import CheckpointWriter, load_worker_state, rounds_of, save_worker_state
from dilo.transport.zmq_star import bind as zmq_bind
from dilo.transport.zmq_star import frames_nbytes, tune

log = logging.getLogger("dilo.coordinator")

BATCH = 256
"""Messages handled between two timer ticks: a flood cannot starve expiry and deadlines."""
TICK_S = 0.05


class Coordinator:
    """The coordinator of one run; `Coordinator(cfg, inproc=True, clock=...)` has no socket:
    `handle()` takes encoded frames and the replies collect in `outbox` (`dilo sim`)."""

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
        # the counters every reply carries; the policy advances version, round_index and tokens
        self.version = 0
        self.round_index = 0
        self.epoch = 0
        self.global_tokens = 0
        self.late = 0
        """Pushes for a round that had already closed (answered with the current state)."""
        self.late_folded = 0
        """Late pushes counted in a later round (membership.late_weight)."""
        self.last_round: dict[str, Any] = {}
        """The latest closed round: per-member update norms and cosines, who was left out and why."""
        self.members: dict[str, Member] = {}
        self.rejects = RejectLog(log, clock=clock)
        self.sessions = Sessions(clock=clock)
        rate = cfg.membership.rate_limit
        self.limiter = RateLimiter(rate, 2 * rate, clock=clock)
        self.bytes_in = 0
        self.bytes_out = 0
        # A new id per process: workers compare it across heartbeats to notice a restart (a
        # coordinator that came back within request_timeout_s never looks "lost" to them, and a
        # PUSH the old process received and never answered would otherwise be waited on forever).
        self.boot = secrets.token_hex(8)
        self.policy: RoundPolicy = build_policy(self)
        self.limits = self.policy.limits
        self.ckpt_dir = cfg.run_dir / "coordinator"
        self.writer = CheckpointWriter(self.ckpt_dir, "coordinator")
        self._hash: tuple[tuple[int, int, int], str] | None = None
        if resume:
            self._load_checkpoint()
        self.outbox: list[tuple[bytes, list[Any]]] = []
        self.sock: zmq.Socket[bytes] | None = None
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        if inproc:
            self.address = "inproc"
            return
        self.ctx = zmq.Context()
        self.sock = tune(self.ctx.socket(zmq.ROUTER))
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

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The global parameters ([] for a gossip tracker)."""
        return self.policy.params

    @property
    def names(self) -> list[str]:
        return self.policy.names

    @property
    def rejected(self) -> Counter[str]:
        """Rejected messages since start, by code."""
        return self.rejects.total

    def anchor_hash(self) -> str:
        """The global parameters' hash, computed once per version (RESULTs, handouts and logs of
        one version share it)."""
        key = (self.version, self.round_index, self.epoch)
        if self._hash is None or self._hash[0] != key:
            self._hash = (key, tensor_digest(list(self.params)))
        return self._hash[1]

    # ------------------------------------------------------------------------------- sending

    def send(
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

    def _error(self, identity: bytes, code: str, message: str, to: wire.Message | None = None) -> None:
        self.rejects.reject(code, message)
        body = dump(ErrorBody(code=code, message=message))
        self.send(identity, wire.Message(type=wire.MsgType.ERROR, worker="coordinator", body=body), to=to)

    def state_message(
        self, msg_type: wire.MsgType, body: dict[str, Any] | None = None, *, model: type[StateBody] = StateBody
    ) -> wire.Message:
        """The global state as a message: the policy's tensors, and the view in the body."""
        state = model.model_validate(
            {
                "version": self.version,
                "round": self.round_index,
                "epoch": self.epoch,
                "members": sorted(self.members),
                "anchor_hash": self.anchor_hash(),
                "boot": self.boot,
                **(body or {}),
            }
        )
        return wire.Message(
            type=msg_type, worker="coordinator", base=self.version, tensors=self.policy.tensors(), body=dump(state)
        )

    def handout(self, worker: str, msg_type: wire.MsgType, body: dict[str, Any] | None = None) -> wire.Message:
        """The state `worker` starts from, with the island it was handed (if any)."""
        member = self.members.get(worker)
        extra = dict(body or {})
        if member is not None and member.island >= 0:
            extra["island"] = member.island
        return self.policy.handout(worker, msg_type, extra)

    # ------------------------------------------------------------------------------- serving

    def serve(self, stop: threading.Event | None = None, poll_ms: int = 50) -> None:
        """Serve until `stop` is set (or SIGTERM sets it); checkpoint and close on the way out.

        At most BATCH messages are handled between two ticks and a tick runs at least every
        TICK_S, so membership expiry and round deadlines keep their time under any flood (ZeroMQ
        queues each connection separately and serves them in turn, so honest workers keep their
        share of the BATCH)."""
        sock = self.sock
        assert sock is not None, "an in-process coordinator has no socket to serve"
        stop = stop or threading.Event()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not stop.is_set():
                if poller.poll(poll_ms):
                    until = time.monotonic() + TICK_S
                    for _ in range(BATCH):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
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
                self.close()

    def close(self) -> None:
        """Close the socket and its context (after the checkpoint in flight); a second call does nothing."""
        self._log_failures(self.writer.close())
        sock, ctx, self.sock, self.ctx = self.sock, self.ctx, None, None
        if sock is not None:
            sock.close(0)
        if ctx is not None:
            ctx.term()

    def tick(self, now: float | None = None) -> None:
        """Expire silent workers and act on the policy's deadlines; a failure in any of it is
        logged and the coordinator serves on."""
        try:
            now = self.clock() if now is None else now
            for worker, m in list(self.members.items()):
                if now - m.last_seen >= self.mcfg.heartbeat_timeout_s and not self.policy.excused(worker):
                    log.warning("worker %s silent for %.1f s: leaves the view", worker, now - m.last_seen)
                    self._remove(worker)
            self.policy.tick(now)
        except Exception:  # noqa: BLE001 - the timer must keep running whatever one round does
            log.exception("unexpected error in the coordinator's timer; serving on")
        self.rejects.flush()
        self.sessions.prune()

    def next_deadline(self) -> float | None:
        """The earliest time at which tick() has something to do (the simulator sleeps until then)."""
        timeout = self.mcfg.heartbeat_timeout_s
        times = [m.last_seen + timeout for w, m in self.members.items() if not self.policy.excused(w)]
        policy = self.policy.next_deadline()
        if policy is not None:
            times.append(policy)
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
            self.send(identity, wire.Message(type=wire.MsgType.STATUS_REPLY, worker="coordinator", body=self.status()))
            return
        if t == wire.MsgType.HELLO:  # costs nothing to keep: the challenge is checked, not stored
            self.send(identity, challenge_reply(self.sessions, msg, "coordinator", identity), to=msg)
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
        if t == wire.MsgType.PUSH:
            self.policy.on_push(identity, msg)
            return
        if t not in (wire.MsgType.HEARTBEAT, wire.MsgType.PULL, wire.MsgType.LEAVE):
            raise wire.WireError("bad_type", f"a coordinator does not accept {t.value} messages")
        parse(Empty, msg.body, f"{t.value.upper()} body")
        if t == wire.MsgType.HEARTBEAT:
            ack = AckBody(epoch=self.epoch, version=self.version, round=self.round_index,
                          members=sorted(self.members), boot=self.boot, peers=self.policy.peers())  # fmt: skip
            self.send(identity, wire.Message(type=wire.MsgType.ACK, worker="coordinator", body=dump(ack)),
                      msg.worker, to=msg)  # fmt: skip
        elif t == wire.MsgType.PULL:
            self.send(identity, self.handout(msg.worker, wire.MsgType.STATE), msg.worker, to=msg)
        else:
            self._remove(msg.worker)
            self.send(identity, wire.Message(type=wire.MsgType.BYE, worker="coordinator", body=dump(ByeBody())), to=msg)

    # ------------------------------------------------------------------------------- membership

    def _join(self, identity: bytes, msg: wire.Message) -> None:
        now = self.clock()
        body = parse(JoinBody, msg.body, "JOIN body")
        self.policy.check_join(body)
        # a fresh challenge, or "session" / "replay"; from now on this session is the worker's only one
        self.sessions.open(msg.worker, msg.sid, msg.seq, identity=identity)
        new = msg.worker not in self.members
        if new:
            self.members[msg.worker] = Member(msg.worker, now, now, self.version)
            self.epoch += 1
            log.info(
                "worker %s joined at version %d, anchor %s (epoch %d, %d members)",
                msg.worker, self.version, self.anchor_hash(), self.epoch, len(self.members),
            )  # fmt: skip
        member = self.members[msg.worker]
        if not new:
            if member.identity and member.identity != identity:
                log.info("worker %s joined again from a new connection; its old session is closed", msg.worker)
            member.last_seen = now
        member.identity = identity
        if body.island == "auto" and member.island < 0:
            member.island = self._free_island(msg.worker)
        if self.policy.on_join(member, identity, msg, body, new=new):
            return  # its WELCOME waits (async: for the start quorum)
        self.send(identity, self.handout(msg.worker, wire.MsgType.WELCOME), msg.worker, to=msg)

    def _free_island(self, worker: str) -> int:
        """The lowest island no other member holds; past `workers`, the least used one."""
        held = Counter(m.island for w, m in self.members.items() if w != worker and m.island >= 0)
        n = max(1, self.cfg.workers)
        return min(range(n), key=lambda i: (held[i], i))

    def _remove(self, worker: str) -> None:
        self.sessions.close(worker)
        self.sessions.close(worker, channel="heartbeat")
        if self.members.pop(worker, None) is not None:
            self.epoch += 1
            self.policy.on_leave(worker)
            log.info("worker %s left (epoch %d, %d members)", worker, self.epoch, len(self.members))

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
                    **self.policy.member_status(m),
                }
                for m in sorted(self.members.values(), key=lambda m: m.worker)
            ],
            **self.policy.status(),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "rejected": dict(self.rejected),
            "last_round": self.last_round,
            "late": self.late,
            "late_folded": self.late_folded,
            "tokens": self.global_tokens,
            "boot": self.boot,
        }

    # ------------------------------------------------------------------------------- checkpoints

    def checkpoint_due(self) -> None:
        """Checkpoint a new version when `checkpoint_every` says so, in the background; a failing
        disk is logged and the coordinator serves on (it must not strand the workers waiting for
        their replies)."""
        every = self.cfg.coordinator.checkpoint_every
        if every and self.version % every == 0:
            self._log_failures(self.writer.save(self.version, self._state()))

    def _log_failures(self, failed: list[tuple[int, OSError]]) -> None:
        for version, e in failed:
            log.error("checkpoint of version %d failed; serving on without it: %s", version, e)

    def checkpoint(self) -> Path:
        """Write the current state now (after the background write in flight)."""
        self._log_failures(self.writer.wait())
        return save_worker_state(self.ckpt_dir, self.version, "coordinator", self._state())

    def _state(self) -> dict[str, Any]:
        return {
            **self.policy.state_dict(),
            "version": self.version,
            "round": self.round_index,
            "epoch": self.epoch,
            "members": sorted(self.members),
            "tokens": self.global_tokens,
            "fingerprint": self.fingerprint,
        }

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
        self.version, self.round_index, self.epoch = int(state["version"]), int(state["round"]), int(state["epoch"]) + 1
        self.global_tokens = int(state["tokens"])
        now = self.clock()
        # the old members get a heartbeat period to come back before they are dropped
        self.members = {w: Member(w, now, now, self.version) for w in state["members"]}
        self.policy.load_state_dict(state)
        log.info("resumed at version %d from %s", self.version, self.ckpt_dir)
