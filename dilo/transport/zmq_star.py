"""A worker's link to the coordinator: ZeroMQ DEALER, validated and authenticated messages.

    client = StarClient(cfg.membership, worker_id, run=cfg.name, fingerprint=cfg.fingerprint())
    welcome = client.join()                       # HELLO + JOIN, with backoff until the coordinator answers
    reply = client.push(tensors, body, base=v)    # RESULT at the end of the round (or STATE if late)
    client.leave(); client.close()

Every message belongs to a session opened by JOIN with the coordinator's challenge and carries a
fresh sequence number (dilo/session.py); a reply counts only if it echoes both, so stale or
replayed replies are dropped. While a push waits for its round to close, the heartbeat thread
(dilo/membership/client.py) watches the coordinator: if it stops answering, or its ACKs come
from another coordinator process (a restart, seen by the `boot` id), `push` raises `PeerLost`;
if no RESULT comes within round_timeout_s + request_timeout_s (+ the async grace period) it raises
`SyncTimeout`, whatever else arrives meanwhile (stale replies, refused copies, healthy heartbeats).
Either way the caller re-joins, keeping its local state. `close()` stops the heartbeats and may be
called more than once (e.g. in a `finally` after `leave()`). An ERROR reply is raised as `wire.WireError`
with the coordinator's code and message.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from dilo import wire
from dilo.errors import DiloError, PeerLost, SyncTimeout
from dilo.membership.client import Heartbeat
from dilo.session import ClientSession
from dilo.transport.base import ByteCounter

log = logging.getLogger("dilo.transport.zmq")

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
RETRY_JOIN_CODES = ("session", "replay", "rate", "bad_header", "frames", "size", "bad_message")
"""A JOIN refused for these (a challenge that expired or raced, or a reply damaged on the way) is
tried again; any other refusal is a configuration to fix, reported at once."""


class StarClient:
    def __init__(
        self,
        mcfg: Any,
        worker_id: str,
        *,
        run: str,
        fingerprint: str,
        secret: bytes | None,
        max_message_bytes: int,
        hold_s: float = 0.0,
    ) -> None:
        """hold_s: how long the coordinator may hold a RESULT beyond the round (async grace_s)."""
        self.cfg = mcfg
        self.worker_id = worker_id
        self.run = run
        self.fingerprint = fingerprint
        self.secret = secret
        self.limits = wire.Limits(max_frame_bytes=max_message_bytes, max_total_bytes=max_message_bytes)
        self.counter = ByteCounter()
        self.ctx = zmq.Context()
        self.session = ClientSession()
        self.result_timeout_s = mcfg.round_timeout_s + mcfg.request_timeout_s + hold_s
        """How long a push waits for its RESULT before it re-joins (a round closes by round_timeout_s)."""
        self.boot: str | None = None
        """The `boot` id of the coordinator process that welcomed us."""
        self.join_body: dict[str, Any] = {}
        self._monitor: zmq.Socket[bytes] | None = None
        self._handshake_refused = False
        """A handshake failed since the latest join began (the monitor of a closed socket is gone)."""
        self.sock = self._connect_watched()
        self.heartbeat = Heartbeat(
            self._connect,
            worker_id,
            period_s=mcfg.heartbeat_s,
            timeout_s=mcfg.request_timeout_s,
            make_message=self._frames,
            read_reply=self._read,
        )
        self._heartbeat_started = False
        self._closed = False

    # ------------------------------------------------------------------------------- plumbing

    def _connect(self) -> zmq.Socket[bytes]:
        sock = tune(self.ctx.socket(zmq.DEALER))
        sock.setsockopt(zmq.LINGER, 0)
        # A DEALER whose connection failed its handshake (e.g. no CURVE keys for a CURVE
        # coordinator) has no peer, and a send without a timeout would wait for one forever.
        sock.setsockopt(zmq.SNDTIMEO, int(self.cfg.request_timeout_s * 1000))
        if self.cfg.curve_dir:
            from dilo import keys

            d = Path(self.cfg.curve_dir)
            keys.apply_client(sock, d / "client.key", d / "server.pub")
        sock.connect(self.cfg.address)
        return sock

    def _frames(self, msg: wire.Message) -> list[Any]:
        msg.run, msg.fp = self.run, self.fingerprint
        return wire.encode(msg, self.secret)

    def _read(self, frames: list[Any]) -> wire.Message:
        return wire.decode(frames, secret=self.secret, limits=self.limits, expect_run=self.run)

    def _connect_watched(self) -> zmq.Socket[bytes]:
        """The request socket, with a monitor that hears of failed handshakes (a wrong or missing
        CURVE key never produces a reply, only this event)."""
        sock = self._connect()
        self._close_monitor()
        self._monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        return sock

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.close(0)
            self._monitor = None

    def _handshake_failed(self) -> bool:
        return self._monitor is not None and bool(self._monitor.poll(0))

    def _reconnect(self) -> None:
        failed = self._handshake_failed()
        self.sock.disable_monitor()
        self.sock.close(0)
        self.sock = self._connect_watched()
        self._handshake_refused = self._handshake_refused or failed

    def request(self, msg: wire.Message, *, wait_s: float, watch: bool = False, stamped: bool = False) -> wire.Message:
        """Send and wait up to wait_s for the reply of this session to this message (anything else
        that arrives is stale and dropped). watch=True: also give up as soon as the heartbeats say
        the coordinator is gone, restarted or no longer counts us (PeerLost)."""
        if not stamped:
            self.session.stamp(msg)
        frames = self._frames(msg)
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            self._reconnect()
            raise SyncTimeout(f"cannot send {msg.type.value} to {self.cfg.address}: no connection") from None
        self.counter.add(frames_nbytes(frames), 0)
        deadline = time.monotonic() + wait_s
        while True:
            # The deadline holds whatever arrives meanwhile: a stream of stale replies, refused
            # copies or unreadable frames must not keep a push waiting forever.
            left = deadline - time.monotonic()
            if left <= 0:
                self._reconnect()  # drop whatever is still queued for the old request
                raise SyncTimeout(f"no reply to {msg.type.value} from {self.cfg.address} within {wait_s:.0f} s")
            if self.sock.poll(int(min(left, 0.2) * 1000) + 1):
                reply = self._receive(msg, watch)
                if reply is not None:
                    return reply
            if watch and self._heartbeat_started:
                self._check_link()

    def _receive(self, msg: wire.Message, watch: bool) -> wire.Message | None:
        """The reply to msg, None for anything to drop (stale, damaged mid-push, a refused copy),
        or the coordinator's ERROR raised as WireError."""
        raw = self.sock.recv_multipart(copy=False)
        self.counter.add(0, frames_nbytes(raw))
        try:
            reply = self._read(raw)
        except wire.WireError as e:
            if not watch:  # e.g. a reply signed with another secret or for another run: say so
                raise
            # mid-push, a corrupted reply is dropped: the RESULT deadline still holds
            log.warning("dropping an unreadable reply (%s): %s", e.code, e)
            return None
        if not self.session.owns(reply, msg):
            log.debug("dropping a stale %s reply (seq %d, expected %d)", reply.type.value, reply.seq, msg.seq)
            return None
        if reply.type != wire.MsgType.ERROR:
            return reply
        code = str(reply.body.get("code", "error"))
        if code == "replay" and reply.sid:
            # a copy of this request reached the coordinator after the original, which it took:
            # the answer to the original is still to come
            log.warning("a copy of our %s was refused as a replay; waiting for the answer", msg.type.value)
            return None
        if watch and not reply.sid:
            # an established session's request was unreadable on arrival (damaged in transit):
            # as good as lost, so re-join and push again
            self._reconnect()
            raise SyncTimeout(f"the coordinator could not read our {msg.type.value} ({code})")
        raise wire.WireError(code, str(reply.body.get("message", "")))

    def _check_link(self) -> None:
        """PeerLost when the heartbeats say the coordinator is gone, restarted or no longer counts us."""
        if self.heartbeat.lost.is_set():
            self._reconnect()
            raise PeerLost(f"the coordinator at {self.cfg.address} stopped answering")
        if self._restarted():
            # A coordinator restarted faster than request_timeout_s never looks lost, but the
            # request went to the old process and will never be answered.
            self._reconnect()
            raise PeerLost(f"the coordinator at {self.cfg.address} restarted")
        if self.heartbeat.not_member.is_set():
            # The coordinator answers our heartbeats with not_member (it restarted without us,
            # e.g. from no checkpoint, or dropped us): a push it never took will never be
            # answered. If it did take it, re-joining and pushing again replaces it, or finds
            # the round closed and catches up from the current state.
            self._reconnect()
            raise PeerLost(f"the coordinator at {self.cfg.address} no longer counts {self.worker_id!r} as a member")

    def _restarted(self) -> bool:
        seen = self.heartbeat.boot if self._heartbeat_started else None
        return seen is not None and self.boot is not None and seen != self.boot

    # ------------------------------------------------------------------------------- requests

    def join(self, *, give_up_s: float | None = None) -> wire.Message:
        """HELLO, then JOIN with the coordinator's challenge, until WELCOME; exponential backoff
        while the coordinator is unreachable, a DiloError after give_up_s. `join_body` (e.g. a
        gossip worker's listening address) goes with every JOIN."""
        give_up_s = give_up_s if give_up_s is not None else max(60.0, 6 * self.cfg.request_timeout_s)
        wait_s = min(self.cfg.request_timeout_s, 5.0)
        t0, delay = time.monotonic(), 0.25
        self._handshake_refused = False
        log.info("worker %s joining the coordinator at %s", self.worker_id, self.cfg.address)
        while True:
            try:
                challenge = self.request(self.session.hello(self.worker_id), wait_s=wait_s, stamped=True)
                if not self.session.accept_challenge(challenge):
                    raise wire.WireError("session", f"expected CHALLENGE, got {challenge.type.value}")
                join = wire.Message(type=wire.MsgType.JOIN, worker=self.worker_id, body=dict(self.join_body))
                welcome = self.request(self.session.opening(join), wait_s=wait_s, stamped=True)
            except (SyncTimeout, wire.WireError) as e:
                if isinstance(e, wire.WireError) and e.code not in RETRY_JOIN_CODES:
                    raise DiloError(_join_refusal(self.worker_id, e, has_secret=self.secret is not None)) from e
                # no answer, or a challenge that expired or lost a race with another JOIN: again
                if self._handshake_refused or self._handshake_failed():
                    raise DiloError(self._refused_handshake()) from None
                if time.monotonic() - t0 > give_up_s:
                    raise DiloError(self._unreachable(give_up_s)) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if welcome.type != wire.MsgType.WELCOME:
                raise DiloError(f"expected WELCOME from the coordinator, got {welcome.type.value}")
            self.session.established()
            self.boot = welcome.body.get("boot")
            # a new generation of heartbeats: one in flight from before this WELCOME cannot mark
            # the new link lost, nor report the old process's boot id
            self.heartbeat.rejoined()
            if not self._heartbeat_started:
                self.heartbeat.start()  # beats while this (the worker's) thread lives
                self._heartbeat_started = True
            return welcome

    def _refused_handshake(self) -> str:
        if self.cfg.curve_dir:
            fix = (
                f"the keys in membership.curve_dir={self.cfg.curve_dir!r} are not the coordinator's, or the "
                "coordinator does not encrypt: use the server.pub and client.key made with its `dilo keys`"
            )
        else:
            fix = (
                "the coordinator encrypts its traffic (CURVE) and this worker has no keys: set membership.curve_dir "
                "to a directory holding the coordinator's server.pub and a client.key (`dilo keys`)"
            )
        return f"worker {self.worker_id!r} cannot join {self.cfg.address}: the connection handshake failed; {fix}"

    def _unreachable(self, give_up_s: float) -> str:
        hint = (
            "is `dilo coordinator` running, and is membership.address right? If the coordinator encrypts "
            "(membership.curve_dir), this worker needs the same key directory"
            if not self.cfg.curve_dir
            else "is `dilo coordinator` running, is membership.address right, and are membership.curve_dir's "
            "keys the coordinator's (a wrong server.pub fails silently)?"
        )
        return f"cannot reach the coordinator at {self.cfg.address} after {give_up_s:.0f} s; {hint}"

    def push(self, tensors: dict[str, torch.Tensor], body: dict[str, Any], *, base: int) -> wire.Message:
        """RESULT (or STATE when late); PeerLost when the coordinator is gone, SyncTimeout when no
        RESULT came by result_timeout_s (a lost push or reply): either way the caller re-joins."""
        return self.request(
            wire.Message(type=wire.MsgType.PUSH, worker=self.worker_id, base=base, body=body, tensors=tensors),
            wait_s=self.result_timeout_s,
            watch=True,
        )

    def pull(self) -> wire.Message:
        return self.request(
            wire.Message(type=wire.MsgType.PULL, worker=self.worker_id), wait_s=self.cfg.request_timeout_s
        )

    def leave(self) -> None:
        # heartbeats first: one sent after LEAVE would be refused as "not a member" and counted
        # among the coordinator's rejected messages
        self.heartbeat.stop()
        try:
            self.request(wire.Message(type=wire.MsgType.LEAVE, worker=self.worker_id), wait_s=2.0)
        except (SyncTimeout, PeerLost, wire.WireError) as e:
            log.warning("leave was not acknowledged: %s", e)

    def close(self) -> None:
        """Stop the heartbeats and close the sockets; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        stopped = self.heartbeat.stop()
        self.sock.disable_monitor()
        self._close_monitor()
        self.sock.close(0)
        if stopped:
            self.ctx.term()
        else:  # term() would wait for the heartbeat socket; the daemon thread closes it on its way out
            log.warning("the heartbeat thread of %s did not stop in time; leaving its context open", self.worker_id)


def _join_refusal(worker_id: str, e: wire.WireError, *, has_secret: bool) -> str:
    """What a failed JOIN means, in words. The code comes from the coordinator's ERROR or, when
    its reply fails our own checks (a reply signed with another secret, or signed while we have
    none), from that local check; either way both sides disagree on the same thing."""
    if e.code == "auth" and not has_secret:
        hint = (
            "authentication failed: the coordinator requires a secret and this worker has none "
            "(set DILO_SECRET or membership.secret_file to the coordinator's secret)"
        )
    elif e.code == "auth":
        hint = (
            "authentication failed: this worker's secret is not the coordinator's, or the coordinator has none "
            "(the same DILO_SECRET or membership.secret_file on both, or no secret on either)"
        )
    else:
        hint = {
            "config": "configuration mismatch: start the worker with the coordinator's config file and overrides",
            "run": "run name mismatch: the worker and the coordinator were started with different `name`s",
            "version": "protocol version mismatch: run the same dilo version on both ends",
        }.get(e.code, "the coordinator refused the join")
    return f"worker {worker_id!r} cannot join: {hint} [{e.code}: {e}]"


def frames_nbytes(frames: Any) -> int:
    """Bytes of a multipart message as sent or received (bytes, memoryviews or zmq.Frames)."""
    total = 0
    for frame in frames:
        if isinstance(frame, memoryview):
            total += frame.nbytes
        elif isinstance(frame, zmq.Frame):
            total += len(frame.buffer)
        else:
            total += len(frame)
    return total


SOCKET_BUFFER = 4 << 20
"""Kernel send/receive buffers of the sockets that carry tensors: with the system default a
38 MB state crossed loopback at 1.0 GB/s; with 4 MiB at 2.2 GB/s (scripts/bench_sync.py)."""


def tune(sock: zmq.Socket[bytes]) -> zmq.Socket[bytes]:
    """Size a tensor-carrying socket's kernel buffers (before it binds or connects)."""
    sock.setsockopt(zmq.SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(zmq.RCVBUF, SOCKET_BUFFER)
    return sock


def bind(sock: zmq.Socket[bytes], address: str, advertise: str = "") -> str:
    """Bind sock to tcp://HOST:PORT (port 0: a free one) and return the address peers should use:
    `advertise` if given, else the bound address with 0.0.0.0 shown as 127.0.0.1."""
    host, _, port = address.rpartition(":")
    try:
        if port == "0":
            real = sock.bind_to_random_port(host, min_port=20000, max_port=60000)
        else:
            sock.bind(address)
            real = int(port)
    except zmq.ZMQError as e:  # a port in use, an address of another machine: the user's to fix
        sock.close(0)
        hint = "; another process listens there: stop it or pick another port" if e.errno == zmq.EADDRINUSE else ""
        raise DiloError(f"cannot listen on {address}: {e.strerror}{hint}") from None
    return advertise or f"{host.replace('0.0.0.0', '127.0.0.1')}:{real}"


def status(address: str, *, secret: bytes | None, curve_dir: str = "", timeout_s: float = 5.0) -> dict[str, Any]:
    """Ask a coordinator for its STATUS (used by `dilo status`)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if curve_dir:
            from dilo import keys

            keys.apply_client(sock, Path(curve_dir) / "client.key", Path(curve_dir) / "server.pub")
        sock.connect(address)
        sock.send_multipart(wire.encode(wire.Message(type=wire.MsgType.STATUS, worker="dilo-status"), secret))
        if not sock.poll(int(timeout_s * 1000)):
            raise DiloError(f"no answer from a coordinator at {address} within {timeout_s:.0f} s")
        try:
            reply = wire.decode(sock.recv_multipart(), secret=secret)
        except wire.WireError as e:
            hint = " (pass --secret-file or DILO_SECRET with the coordinator's secret)" if e.code == "auth" else ""
            raise DiloError(f"cannot read the coordinator's reply ({e.code}): {e}{hint}") from e
        if reply.type == wire.MsgType.ERROR:
            raise DiloError(f"the coordinator refused: {reply.body.get('code')}: {reply.body.get('message')}")
        return dict(reply.body)
    finally:
        sock.close(0)
        ctx.term()
