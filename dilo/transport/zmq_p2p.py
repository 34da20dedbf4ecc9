"""Peer-to-peer links between workers over ZeroMQ, for gossip averaging.

    node = P2PNode("w0", bind="tcp://0.0.0.0:0", run=cfg.name, fingerprint=fp, secret=secret,
                   spec={"p.0": ((256, 128), "float32"), ...}, max_message_bytes=n)
    node.publish(lambda: STATE message)          # what a peer gets when it pulls our parameters
    node.send("w1", "tcp://10.0.0.2:41234", msg)  # fire and forget (GOSSIP)
    got = node.collect({"w1", "w3"}, timeout_s=10)   # {peer: [Message, ...]}, whoever sent something new
    state = node.pull("tcp://10.0.0.3:40001", timeout_s=10)     # a live peer's current parameters

Every worker listens on one ROUTER socket, served by a thread of its own: GOSSIP messages queue per
sender until collected, PULL requests are answered with the published state. It sends through
one DEALER per peer, from the training thread only (ZeroMQ sockets are not thread-safe). Messages
use the wire format of dilo/wire.py: size caps before parsing, a MAC when a secret is set, run and
config fingerprint, tensor names, shapes, dtypes and finite values. A bad message is counted in
`rejected` and dropped (a PULL gets an ERROR); it never reaches the mixing step. A sender whose
messages pile up uncollected loses its oldest, counted in `overflow`. Both counters are updated
from the server thread and the training thread, under one lock, and logged as the coordinator logs
its rejections (dilo/guard.py RejectLog): the first of each code (for overflow, of each sender)
gets a line of its own, later ones a summary every 10 s and at close. `stats()` gives a snapshot
for reports.

Each link is a session (dilo/session.py): before its first message to a peer, a worker says HELLO
and gets the peer's challenge; every message then carries that session id and a fresh sequence
number, so a captured message replayed to the peer is refused ("replay"). A peer that restarted
answers with a "session" ERROR, and the sender opens a new session before its next message.
Each connection may send `rate_limit` messages per second; the rest are dropped unread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from dilo import wire
from dilo.bodies import GossipBody, PeerStateBody, parse
from dilo.guard import RateLimiter, RejectLog
from dilo.session import ClientSession, Sessions, challenge_reply
from dilo.transport.base import ByteCounter
from dilo.transport.zmq_star import bind as bind_socket
from dilo.transport.zmq_star import frames_nbytes, tune

log = logging.getLogger("dilo.transport.p2p")

MAX_QUEUED = 8
"""Uncollected messages kept per sender; older ones are dropped (and counted in `overflow`)."""

SUMMARY_PERIOD_S = 10.0
"""How often repeated rejections and overflows are summarised in the log."""


@dataclass
class _Link:
    """Our side of the session with one peer address."""

    session: ClientSession = field(default_factory=ClientSession)
    hello_at: float = 0.0
    silent: bool = False
    """The peer did not answer our last HELLO in time: it is not waited for again."""


class P2PNode:
    def __init__(
        self,
        worker_id: str,
        *,
        bind: str,
        advertise: str = "",
        run: str,
        fingerprint: str,
        secret: bytes | None,
        spec: dict[str, tuple[tuple[int, ...], str]],
        max_message_bytes: int,
        curve_dir: str = "",
        state_spec: dict[str, tuple[tuple[int, ...], str]] | None = None,
        rate_limit: float = 200.0,
        hello_timeout_s: float = 5.0,
    ) -> None:
        self.worker_id = worker_id
        self.run = run
        self.fingerprint = fingerprint
        self.secret = secret
        self.spec = spec
        """Tensors of a GOSSIP message."""
        self.state_spec = state_spec if state_spec is not None else spec
        """Tensors of the STATE a pull returns."""
        self.curve_dir = curve_dir
        self.limits = wire.Limits(max_frame_bytes=max_message_bytes, max_total_bytes=max_message_bytes)
        self.counter = ByteCounter()
        self._stats_lock = threading.Lock()
        """Guards _rejects and the overflow counters: both threads update them."""
        self._rejects = RejectLog(log, period_s=SUMMARY_PERIOD_S)
        self._overflow: Counter[str] = Counter()
        """Dropped uncollected messages since start, by sender."""
        self._overflow_pending: Counter[str] = Counter()
        """Drops not yet in a log line (each sender's first is logged at once)."""
        self.sessions = Sessions()
        """Sessions peers opened with us (their GOSSIP and PULL)."""
        self._limiter = RateLimiter(rate_limit, 2 * rate_limit)
        self._links: dict[str, _Link] = {}
        """Our sessions with each peer address (used from the training thread)."""
        self.hello_timeout_s = hello_timeout_s
        self.ctx = zmq.Context()
        self._server = tune(self.ctx.socket(zmq.ROUTER))
        self._server.setsockopt(zmq.LINGER, 0)
        self._server.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._server.setsockopt(zmq.RCVHWM, 64)
        if curve_dir:
            from dilo import keys

            keys.apply_server(self._server, Path(curve_dir) / "server.key")
        self.address = bind_socket(self._server, bind, advertise)
        self._cv = threading.Condition()
        self._inbox: dict[str, list[wire.Message]] = {}
        """Messages not yet collected, per sender, oldest first (at most MAX_QUEUED each)."""
        self._final: dict[str, wire.Message] = {}
        self._publish: Callable[[], wire.Message] | None = None
        self._peers: dict[str, zmq.Socket[bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"dilo-p2p-{worker_id}", daemon=True)
        self._thread.start()

    @property
    def rejected(self) -> Counter[str]:
        """Refused peer messages since start, by code (a copy)."""
        with self._stats_lock:
            return Counter(self._rejects.total)

    @property
    def overflow(self) -> int:
        """Uncollected messages dropped since start because their sender had MAX_QUEUED queued."""
        with self._stats_lock:
            return sum(self._overflow.values())

    def stats(self) -> dict[str, Any]:
        """A snapshot for reports: {"rejected": {code: n}, "overflow": n, "overflow_by_peer": {peer: n}}."""
        with self._stats_lock:
            return {
                "rejected": dict(sorted(self._rejects.total.items())),
                "overflow": sum(self._overflow.values()),
                "overflow_by_peer": dict(sorted(self._overflow.items())),
            }

    def _reject(self, code: str, message: str) -> None:
        with self._stats_lock:
            self._rejects.reject(code, message)

    def _count_reject(self, code: str) -> None:
        with self._stats_lock:
            self._rejects.count(code)

    def _dropped(self, sender: str) -> None:
        """One uncollected message of `sender` dropped: logged the first time, then summarised."""
        with self._stats_lock:
            first = sender not in self._overflow
            self._overflow[sender] += 1
            if not first:
                self._overflow_pending[sender] += 1
        if first:
            log.warning(
                "more than %d uncollected messages from %s: dropped the oldest (further drops are summarised)",
                MAX_QUEUED,
                sender,
            )

    def flush_log(self, force: bool = False) -> None:
        """Log the summaries that are due (the server thread calls this; `force` at close)."""
        with self._stats_lock:
            self._rejects.flush(force)
            pending, self._overflow_pending = self._overflow_pending, Counter()
        if pending:
            parts = ", ".join(f"{peer} {n}" for peer, n in pending.most_common())
            log.warning("dropped %d more uncollected messages: %s", sum(pending.values()), parts)

    # ------------------------------------------------------------------------------- server thread

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._server, zmq.POLLIN)
        next_flush = time.monotonic() + SUMMARY_PERIOD_S
        while not self._stop.is_set():
            if time.monotonic() >= next_flush:
                self.flush_log()
                next_flush = time.monotonic() + SUMMARY_PERIOD_S
            if not poller.poll(50):
                continue
            while True:
                try:
                    frames = self._server.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    return
                try:
                    self._handle(frames[0].bytes, frames[1:])
                except Exception:  # noqa: BLE001 - a bug or odd payload must not end the server
                    log.exception("unexpected error while handling a peer message")
        self._server.close(0)

    def _handle(self, identity: bytes, frames: list[Any]) -> None:
        with self._cv:
            self.counter.add(0, frames_nbytes(frames))
        if not self._limiter.allow(identity):
            self._count_reject("rate")
            return
        msg: wire.Message | None = None
        try:
            msg = wire.decode(frames, secret=self.secret, limits=self.limits)
            if msg.run != self.run:
                raise wire.WireError("run", f"message for run {msg.run!r}, this worker runs {self.run!r}")
            if msg.fp != self.fingerprint:
                raise wire.WireError("config", f"config fingerprint {msg.fp!r} differs from ours {self.fingerprint!r}")
            if msg.type == wire.MsgType.HELLO:
                self._reply(identity, challenge_reply(self.sessions, msg, self.worker_id, identity), to=msg)
                return
            if msg.type in (wire.MsgType.GOSSIP, wire.MsgType.PULL):
                self.sessions.accept(
                    msg.worker, msg.sid, msg.seq, msg.type.value, identity
                )  # session / identity / replay
            if msg.type == wire.MsgType.GOSSIP:
                wire.check_shapes(msg, self.spec)
                wire.check_finite(msg)
                parse(GossipBody, msg.body, "GOSSIP body")  # round, final, weight, seq: typed and bounded
            elif msg.type != wire.MsgType.PULL:
                raise wire.WireError("bad_type", f"a gossip peer does not accept {msg.type.value} messages")
        except wire.WireError as e:
            self._reject(e.code, str(e))
            if e.code not in ("size", "frames"):  # answer what looks like a request; the sender may wait
                self._reply(identity, wire.Message(type=wire.MsgType.ERROR, worker=self.worker_id,
                                                   body={"code": e.code, "message": str(e)}), to=msg)  # fmt: skip
            return
        if msg.type == wire.MsgType.PULL:
            publish = self._publish
            if publish is None:
                refusal = wire.Message(type=wire.MsgType.ERROR, worker=self.worker_id,
                                       body={"code": "not_ready", "message": "no state yet"})  # fmt: skip
                self._reply(identity, refusal, to=msg)
            else:
                self._reply(identity, publish(), to=msg)
            return
        dropped = False
        with self._cv:
            if msg.body.get("final", False):
                self._final[msg.worker] = msg
            else:
                queue = self._inbox.setdefault(msg.worker, [])
                queue.append(msg)
                if len(queue) > MAX_QUEUED:
                    queue.pop(0)
                    dropped = True
            self._cv.notify_all()
        if dropped:
            self._dropped(msg.worker)

    def _reply(self, identity: bytes, msg: wire.Message, *, to: wire.Message | None = None) -> None:
        msg.run, msg.fp = self.run, self.fingerprint
        if to is not None:  # a reply carries its request's session and seq
            msg.sid, msg.seq = to.sid, to.seq
        frames = wire.encode(msg, self.secret)
        with self._cv:
            self.counter.add(frames_nbytes(frames), 0)
        self._server.send_multipart([identity, *frames], copy=False)

    # ------------------------------------------------------------------------------- training thread

    def publish(self, make_state: Callable[[], wire.Message]) -> None:
        """What PULL returns from now on (called on the server thread: it must be thread-safe)."""
        self._publish = make_state

    def _socket(self, address: str) -> zmq.Socket[bytes]:
        sock = self._peers.get(address)
        if sock is None:
            sock = tune(self.ctx.socket(zmq.DEALER))
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 4)
            sock.setsockopt(zmq.SNDTIMEO, 0)
            if self.curve_dir:
                from dilo import keys

                d = Path(self.curve_dir)
                keys.apply_client(sock, d / "client.key", d / "server.pub")
            sock.connect(address)
            self._peers[address] = sock
        return sock

    def send(self, peer: str, address: str, msg: wire.Message) -> bool:
        """Queue msg for peer; False when it was not sent (a peer that stopped reading, or with
        which no session could be opened yet)."""
        sock = self._socket(address)
        link = self._links.setdefault(address, _Link())
        self._read_replies(peer, sock, link)
        opening = not link.session.sid
        if opening and not link.session.pending and not self._hello(peer, sock, link):
            return False
        msg.worker = self.worker_id
        link.session.opening(msg) if opening else link.session.stamp(msg)
        frames = self._frames(msg)
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            log.warning("peer %s at %s is not reading: message dropped", peer, address)
            return False
        if opening:
            link.session.established()  # the peer opens the session with this message; no reply comes
        with self._cv:
            self.counter.add(frames_nbytes(frames), 0)
        return True

    def _frames(self, msg: wire.Message) -> list[Any]:
        msg.run, msg.fp = self.run, self.fingerprint
        return wire.encode(msg, self.secret)

    def _hello(self, peer: str, sock: zmq.Socket[bytes], link: _Link) -> bool:
        """Ask `peer` for a challenge: True once `link` holds one to open a session with.

        The first time, wait up to hello_timeout_s for the answer. A peer that did not answer then
        is not waited for again (every round would pay the timeout for a dead peer): a new HELLO
        goes out at most once per hello_timeout_s, and its answer is picked up by a later send."""
        now = time.monotonic()
        if link.silent and now - link.hello_at < self.hello_timeout_s:
            return False
        hello = link.session.hello(self.worker_id)
        frames = self._frames(hello)
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            return False
        link.hello_at = now
        with self._cv:
            self.counter.add(frames_nbytes(frames), 0)
        if link.silent:
            return False
        deadline = now + self.hello_timeout_s
        while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
            self._read_replies(peer, sock, link)
            if link.session.pending:
                return True
        link.silent = True
        log.warning("peer %s did not answer HELLO within %.1f s: message dropped", peer, self.hello_timeout_s)
        return False

    def _read_replies(self, peer: str, sock: zmq.Socket[bytes], link: _Link) -> None:
        """A peer answers only HELLO, and GOSSIP it refuses: take a challenge; a refusal of our
        session (the peer restarted, or our session is not its current one) makes the next
        message open a new one."""
        while sock.poll(0):
            raw = sock.recv_multipart(copy=False)
            with self._cv:
                self.counter.add(0, frames_nbytes(raw))
            try:
                reply = wire.decode(raw, secret=self.secret, limits=self.limits, expect_run=self.run)
            except wire.WireError as e:
                log.warning("bad reply from peer %s (%s): %s", peer, e.code, e)
                continue
            if reply.type == wire.MsgType.CHALLENGE:
                if link.session.accept_challenge(reply):
                    link.silent = False
                continue
            if reply.type != wire.MsgType.ERROR or not link.session.owns(reply):
                continue
            code = reply.body.get("code")
            log.warning("peer %s refused a message (%s): %s", peer, code, reply.body.get("message"))
            if code in ("session", "replay"):
                link.session.reset()

    def collect(
        self,
        peers: set[str],
        timeout_s: float,
        *,
        round_idx: int = 0,
        final: bool = False,
        wait_for: set[str] | None = None,
    ) -> dict[str, list[wire.Message]]:
        """Messages of `peers` for round `round_idx`, oldest first.

        Waits until every peer in `wait_for` (default: all of `peers`) has sent one for this round
        or a later one, or timeout_s. Takes every queued message up to this round (a peer that fell
        behind still counts, with what it sent last); a peer's messages for later rounds stay queued
        for them, unless it has nothing up to this round (it skipped ahead), in which case its
        oldest is taken."""
        deadline = time.monotonic() + timeout_s
        needed = peers if wait_for is None else wait_for
        with self._cv:
            if final:
                while not needed <= set(self._final) and (left := deadline - time.monotonic()) > 0:
                    self._cv.wait(timeout=left)
                return {p: [self._final.pop(p)] for p in peers if p in self._final}

            def ready(p: str) -> bool:
                return any(int(m.body["round"]) >= round_idx for m in self._inbox.get(p, []))

            while not all(ready(p) for p in needed) and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(timeout=left)
            out: dict[str, list[wire.Message]] = {}
            for p in peers:
                queue = self._inbox.get(p, [])
                if not queue:
                    continue
                take = [m for m in queue if int(m.body["round"]) <= round_idx] or queue[:1]
                # by identity: == on Messages would compare their tensors
                self._inbox[p] = [m for m in queue if not any(m is t for t in take)]
                out[p] = take
            return out

    def pull(self, peer: str, address: str, timeout_s: float) -> wire.Message | None:
        """A peer's current state (STATE), or None when it does not answer in time."""
        sock = tune(self.ctx.socket(zmq.DEALER))  # a private socket: no stale replies from earlier pulls
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve_dir:
                from dilo import keys

                d = Path(self.curve_dir)
                keys.apply_client(sock, d / "client.key", d / "server.pub")
            sock.connect(address)
            link = _Link()  # a session of its own: the pull is one request on one socket
            if not self._hello(peer, sock, link):
                return None
            request = link.session.opening(wire.Message(type=wire.MsgType.PULL, worker=self.worker_id))
            frames = self._frames(request)
            sock.send_multipart(frames, copy=False)
            with self._cv:
                self.counter.add(frames_nbytes(frames), 0)
            if not sock.poll(int(timeout_s * 1000)):
                log.warning("peer %s at %s did not answer a pull within %.1f s", peer, address, timeout_s)
                return None
            raw = sock.recv_multipart(copy=False)
            with self._cv:
                self.counter.add(0, frames_nbytes(raw))
            reply = wire.decode(raw, secret=self.secret, limits=self.limits, expect_run=self.run)
            if not link.session.owns(reply, request):
                log.warning("peer %s answered a pull with a reply of another request", peer)
                return None
            if reply.type != wire.MsgType.STATE:
                log.warning("peer %s refused a pull: %s", peer, reply.body)
                return None
            wire.check_shapes(reply, self.state_spec)
            wire.check_finite(reply)
            parse(PeerStateBody, reply.body, "STATE body")
            return reply
        except wire.WireError as e:
            self._reject(e.code, f"bad state from peer {peer}: {e}")
            return None
        finally:
            sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush_log(force=True)
        for sock in self._peers.values():
            sock.close(0)
        self._peers.clear()
        self.ctx.term()
