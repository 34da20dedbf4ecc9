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
use the wire format of dilo/wire.py: size caps before parsing, HMAC when a secret is set, run and
config fingerprint, tensor names, shapes, dtypes and finite values. A bad message is logged,
counted in `rejected` and dropped (a PULL gets an ERROR); it never reaches the mixing step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from dilo import wire
from dilo.transport.base import ByteCounter
from dilo.transport.zmq_star import bind as bind_socket
from dilo.transport.zmq_star import frames_nbytes

log = logging.getLogger("dilo.transport.p2p")

MAX_QUEUED = 8
"""Uncollected messages kept per sender; older ones are dropped (and counted in `overflow`)."""


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
        self.rejected: Counter[str] = Counter()
        self.overflow = 0
        self.ctx = zmq.Context()
        self._server = self.ctx.socket(zmq.ROUTER)
        self._server.setsockopt(zmq.LINGER, 0)
        self._server.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if curve_dir:
            from dilo import keys

            keys.apply_server(self._server, Path(curve_dir) / "server.key")
        self.address = bind_socket(self._server, bind, advertise)
        self._cv = threading.Condition()
        self._inbox: dict[str, list[wire.Message]] = {}
        """Messages not yet collected, per sender, oldest first (at most MAX_QUEUED each)."""
        self._final: dict[str, wire.Message] = {}
        self._publish: Callable[[], wire.Message] | None = None
        self._peers: dict[str, zmq.Socket] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"dilo-p2p-{worker_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------- server thread

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._server, zmq.POLLIN)
        while not self._stop.is_set():
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
        try:
            msg = wire.decode(frames, secret=self.secret, limits=self.limits)
            if msg.run != self.run:
                raise wire.WireError("run", f"message for run {msg.run!r}, this worker runs {self.run!r}")
            if msg.fp != self.fingerprint:
                raise wire.WireError("config", f"config fingerprint {msg.fp!r} differs from ours {self.fingerprint!r}")
            if msg.type == wire.MsgType.GOSSIP:
                wire.check_shapes(msg, self.spec)
                wire.check_finite(msg)
                r = msg.body.get("round")
                final = msg.body.get("final", False)
                weight = msg.body.get("weight", 1.0)
                if isinstance(r, bool) or not isinstance(r, int) or r < 0 or not isinstance(final, bool):
                    raise wire.WireError("bad_body", f"round must be an integer >= 0 and final a bool, got {r!r}")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                    raise wire.WireError("bad_body", f"weight must be a finite number > 0, got {weight!r}")
            elif msg.type != wire.MsgType.PULL:
                raise wire.WireError("bad_type", f"a gossip peer does not accept {msg.type.value} messages")
        except wire.WireError as e:
            self.rejected[e.code] += 1
            log.warning("rejected a peer message (%s): %s", e.code, e)
            if e.code not in ("size", "frames"):  # answer what looks like a request; the sender may wait
                self._reply(identity, wire.Message(type=wire.MsgType.ERROR, worker=self.worker_id,
                                                   body={"code": e.code, "message": str(e)}))  # fmt: skip
            return
        if msg.type == wire.MsgType.PULL:
            publish = self._publish
            if publish is None:
                self._reply(identity, wire.Message(type=wire.MsgType.ERROR, worker=self.worker_id,
                                                   body={"code": "not_ready", "message": "no state yet"}))  # fmt: skip
            else:
                reply = publish()
                reply.seq = msg.seq
                self._reply(identity, reply)
            return
        with self._cv:
            if msg.body.get("final", False):
                self._final[msg.worker] = msg
            else:
                queue = self._inbox.setdefault(msg.worker, [])
                queue.append(msg)
                if len(queue) > MAX_QUEUED:
                    queue.pop(0)
                    self.overflow += 1
                    log.warning("more than %d uncollected messages from %s: dropped the oldest", MAX_QUEUED, msg.worker)
            self._cv.notify_all()

    def _reply(self, identity: bytes, msg: wire.Message) -> None:
        msg.run, msg.fp = self.run, self.fingerprint
        frames = wire.encode(msg, self.secret)
        with self._cv:
            self.counter.add(frames_nbytes(frames), 0)
        self._server.send_multipart([identity, *frames], copy=False)

    # ------------------------------------------------------------------------------- training thread

    def publish(self, make_state: Callable[[], wire.Message]) -> None:
        """What PULL returns from now on (called on the server thread: it must be thread-safe)."""
        self._publish = make_state

    def _socket(self, address: str) -> zmq.Socket:
        sock = self._peers.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
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
        """Queue msg for peer; False when its queue is full (a peer that stopped reading)."""
        msg.worker, msg.run, msg.fp = self.worker_id, self.run, self.fingerprint
        frames = wire.encode(msg, self.secret)
        try:
            self._socket(address).send_multipart(frames, copy=False)
        except zmq.Again:
            log.warning("peer %s at %s is not reading: message dropped", peer, address)
            return False
        with self._cv:
            self.counter.add(frames_nbytes(frames), 0)
        return True

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
                self._inbox[p] = [m for m in queue if m not in take]
                out[p] = take
            return out

    def pull(self, peer: str, address: str, timeout_s: float) -> wire.Message | None:
        """A peer's current state (STATE), or None when it does not answer in time."""
        sock = self.ctx.socket(zmq.DEALER)  # a private socket: no stale replies from earlier pulls
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve_dir:
                from dilo import keys

                d = Path(self.curve_dir)
                keys.apply_client(sock, d / "client.key", d / "server.pub")
            sock.connect(address)
            frames = wire.encode(
                wire.Message(type=wire.MsgType.PULL, worker=self.worker_id, run=self.run, fp=self.fingerprint),
                self.secret,
            )
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
            if reply.type != wire.MsgType.STATE:
                log.warning("peer %s refused a pull: %s", peer, reply.body)
                return None
            wire.check_shapes(reply, self.state_spec)
            wire.check_finite(reply)
            return reply
        except wire.WireError as e:
            self.rejected[e.code] += 1
            log.warning("bad state from peer %s (%s): %s", peer, e.code, e)
            return None
        finally:
            sock.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._peers.values():
            sock.close(0)
        self._peers.clear()
        self.ctx.term()
