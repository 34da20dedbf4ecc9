"""Heartbeats to a coordinator, on a thread with a socket of its own.

    hb = Heartbeat(connect, worker_id, period_s=1.0, timeout_s=10.0)
    hb.start()
    hb.view           # latest View from the coordinator's ACKs
    hb.lost.is_set()  # no ACK for timeout_s: the coordinator is gone (or unreachable)
    hb.boot           # the coordinator process's id from the latest ACK: it changes on a restart
    hb.stop()

ZeroMQ sockets are not thread-safe, so the heartbeat socket is separate from the one that
pushes pseudo-gradients; the coordinator recognises the worker by the id in the header.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from dilo import wire
from dilo.membership.base import View
from dilo.session import ClientSession

log = logging.getLogger("dilo.membership")

_NEW_SESSION = ("session", "identity", "replay")
"""Refusals of our heartbeat session that a new one cures."""


class Heartbeat:
    def __init__(
        self,
        connect: Callable[[], zmq.Socket],
        worker_id: str,
        *,
        period_s: float,
        timeout_s: float,
        make_message: Callable[[wire.Message], list],
        read_reply: Callable[[list], wire.Message],
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dilo-heartbeat-{worker_id}", daemon=True)

    def start(self) -> None:
        self.last_ack = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _beat(self, sock: zmq.Socket) -> None:
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
            while not self._stop.is_set():
                self._beat(sock)
                deadline = time.monotonic() + self.period_s
                while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
                    if not sock.poll(int(left * 1000) + 1):
                        continue
                    try:
                        reply = self._read(sock.recv_multipart(copy=False))
                    except wire.WireError as e:
                        log.warning("bad heartbeat reply: %s", e)
                        continue
                    if reply.type == wire.MsgType.CHALLENGE:
                        if self.session.accept_challenge(reply):
                            deadline = 0.0  # beat at once with the new session
                        continue
                    if not self.session.owns(reply):
                        continue
                    if reply.type == wire.MsgType.ACK:
                        self.last_ack = time.monotonic()
                        self.lost.clear()
                        self.not_member.clear()
                        b = reply.body
                        self.view = View(int(b["epoch"]), tuple(b["members"]), self.worker_id)
                        self.boot = b.get("boot")
                        if isinstance(b.get("peers"), dict):
                            self.peers = {str(k): str(v) for k, v in b["peers"].items()}
                    elif reply.type == wire.MsgType.ERROR and reply.body.get("code") == "not_member":
                        self.last_ack = time.monotonic()
                        self.not_member.set()
                    elif reply.type == wire.MsgType.ERROR and reply.body.get("code") in (
                        "session",
                        "identity",
                        "replay",
                    ):
                        self.session.reset()  # e.g. a restarted coordinator: ask for a new challenge
                if time.monotonic() - self.last_ack > self.timeout_s and not self.lost.is_set():
                    log.warning("no heartbeat reply for %.1f s: coordinator lost", self.timeout_s)
                    self.lost.set()
                    # a fresh socket (and session) drops heartbeats queued for the dead peer
                    sock.close(0)
                    sock = self._connect()
                    self.session.reset()
        finally:
            sock.close(0)
