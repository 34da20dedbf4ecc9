"""Heartbeats to a coordinator, on a thread with a socket of its own.

    hb = Heartbeat(connect, worker_id, period_s=1.0, timeout_s=10.0, make_message=..., read_reply=...)
    hb.start()        # beats while the calling thread (the worker) is alive, or until stop()
    hb.view           # latest View from the coordinator's ACKs
    hb.lost.is_set()  # no ACK for timeout_s: the coordinator is gone (or unreachable)
    hb.boot           # the coordinator process's id from the latest ACK: it changes on a restart
    hb.rejoined()     # after a re-join: forget what was learnt of the old link
    hb.stop()         # idempotent; joins the thread (with a timeout)

ZeroMQ sockets are not thread-safe, so the heartbeat socket is separate from the one that
pushes pseudo-gradients; the coordinator recognises the worker by the id in the header.

Every ACK is validated (dilo/bodies.py): an invalid one is counted in `bad_replies` and not
trusted. A heartbeat answers for the link only in the generation it was sent in: `rejoined()`
starts a new one, so a heartbeat in flight before a re-join can neither mark the new link lost
(a spurious PeerLost right after the re-join) nor report the old coordinator's `boot`. The thread
also ends when the thread that started it ends: a worker that died of an exception must not be
kept in the view by its heartbeats.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from dilo import wire
from dilo.bodies import AckBody, ErrorBody, parse
from dilo.membership.base import View
from dilo.session import ClientSession

log = logging.getLogger("dilo.membership")

_NEW_SESSION = ("session", "identity", "replay")
"""Refusals of our heartbeat session that a new one cures."""


class Heartbeat:
    def __init__(
        self,
        connect: Callable[[], zmq.Socket[bytes]],
        worker_id: str,
        *,
        period_s: float,
        timeout_s: float,
        make_message: Callable[[wire.Message], list[Any]],
        read_reply: Callable[[list[Any]], wire.Message],
    ) -> None:
        self._connect = connect
        self.worker_id = worker_id
        self.period_s = period_s
        self.timeout_s = timeout_s
        self._make = make_message
        self._read = read_reply
        self.session = ClientSession()
        """The heartbeat socket's own session (dilo/session.py), opened by its first HEARTBEAT with
        a challenge asked on this socket: copies of our heartbeats sent from anywhere else, or
        replayed, are refused, and ACKs of an old session are ignored."""
        self.lost = threading.Event()
        self.not_member = threading.Event()
        self.view: View | None = None
        self.boot: str | None = None
        """The `boot` id of the coordinator process that sent the latest ACK."""
        self.peers: dict[str, str] | None = None
        """gossip: member -> listening address, from the latest ACK of a tracker."""
        self.last_ack = time.monotonic()
        self.bad_replies = 0
        """Replies that failed validation (unreadable, or an ACK or ERROR with a bad body)."""
        self.generation = 0
        """Bumped by rejoined(): replies to heartbeats of an older generation are ignored."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._owner: threading.Thread | None = None
        self._thread = threading.Thread(target=self._run, name=f"dilo-heartbeat-{worker_id}", daemon=True)

    def start(self, owner: threading.Thread | None = None) -> None:
        """Beat until stop() or until `owner` (by default the calling thread) has ended."""
        self._owner = owner or threading.current_thread()
        self.last_ack = time.monotonic()
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop beating; idempotent. True when the thread has ended (it may still be in a send
        that times out after request_timeout_s)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout_s)
        return not self._thread.is_alive()

    def rejoined(self) -> None:
        """The worker joined again: a new generation, with a fresh deadline and nothing known of
        the coordinator process (an id seen before the WELCOME may be the old process's)."""
        with self._lock:
            self.generation += 1
            self.last_ack = time.monotonic()
            self.lost.clear()
            self.not_member.clear()
            self.boot = None

    def _running(self) -> bool:
        owner = self._owner
        return not self._stop.is_set() and (owner is None or owner.is_alive())

    def _beat(self, sock: zmq.Socket[bytes]) -> None:
        """A HEARTBEAT of our session, the one that opens it, or, with no session, a HELLO for one."""
        s = self.session
        if s.sid or s.pending:
            msg = wire.Message(type=wire.MsgType.HEARTBEAT, worker=self.worker_id)
            opening = not s.sid
            s.opening(msg) if opening else s.stamp(msg)
            if opening:
                s.established()  # the coordinator opens the session with this heartbeat
        else:
            msg = s.hello(self.worker_id)
        sock.send_multipart(self._make(msg), copy=False)

    def _run(self) -> None:
        sock = self._connect()
        try:
            while self._running():
                generation = self.generation
                self._beat(sock)
                deadline = time.monotonic() + self.period_s
                while (left := deadline - time.monotonic()) > 0 and self._running():
                    if not sock.poll(int(left * 1000) + 1):
                        continue
                    if self._receive(sock, generation):
                        deadline = 0.0  # a new challenge: beat at once with the new session
                with self._lock:
                    if generation != self.generation:
                        continue  # a re-join since this beat: its silence says nothing of the new link
                    if time.monotonic() - self.last_ack <= self.timeout_s or self.lost.is_set():
                        continue
                    log.warning("no heartbeat reply for %.1f s: coordinator lost", self.timeout_s)
                    self.lost.set()
                # a fresh socket (and session) drops heartbeats queued for the dead peer
                sock.close(0)
                sock = self._connect()
                self.session.reset()
        finally:
            sock.close(0)

    def _receive(self, sock: zmq.Socket[bytes], generation: int) -> bool:
        """Read one reply; True when it is a challenge that opens a new session."""
        try:
            reply = self._read(sock.recv_multipart(copy=False))
        except wire.WireError as e:
            self.bad_replies += 1
            log.warning("bad heartbeat reply: %s", e)
            return False
        if reply.type == wire.MsgType.CHALLENGE:
            return self.session.accept_challenge(reply)
        if not self.session.owns(reply):
            return False
        try:
            if reply.type == wire.MsgType.ACK:
                ack = parse(AckBody, reply.body, "ACK body")
            elif reply.type == wire.MsgType.ERROR:
                error = parse(ErrorBody, reply.body, "ERROR body")
            else:
                return False
        except wire.WireError as e:
            self.bad_replies += 1
            log.warning("a heartbeat reply not trusted: %s", e)
            return False
        with self._lock:
            if generation != self.generation:
                return False  # answers a heartbeat sent before the latest re-join
            if reply.type == wire.MsgType.ACK:
                self.last_ack = time.monotonic()
                self.lost.clear()
                self.not_member.clear()
                self.view = View(ack.epoch, tuple(ack.members), self.worker_id)
                self.boot = ack.boot
                if ack.peers is not None:
                    self.peers = dict(ack.peers)
            elif error.code == "not_member":
                self.last_ack = time.monotonic()
                self.not_member.set()
            elif error.code in _NEW_SESSION:
                self.session.reset()  # e.g. a restarted coordinator: ask for a new challenge
        return False
