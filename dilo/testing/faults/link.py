"""A ZeroMQ proxy that mangles messages by a seeded plan.

`FaultyLink` is a message-level proxy between DEALER clients and a ROUTER server (a `dilo
coordinator`, a gossip peer's listener). Clients connect to `link.address` instead of the
server; the link opens one DEALER to the server per client connection and forwards whole
multipart messages both ways on a thread of its own, applying a fault plan on the way:

    from dilo.testing.faults import FaultyLink, Rule

    with FaultyLink(coordinator.address, [
        Rule("drop", types="result", nth=2),                        # the 2nd RESULT never arrives
        Rule("duplicate", types={"push", "heartbeat"}, times=None),  # every push and heartbeat twice
        Rule("delay", types="push", delay_s=0.05, jitter_s=0.05, times=None),
        Rule("corrupt", types="push", direction="to_server", frame=-1),   # flip a byte of the last frame
        Rule("reorder", types="result"),          # held until the next message to a client has passed
        Rule("partition", types="push", nth=3, duration_s=4.0),      # cut the link for 4 s at the 3rd push
        Rule("kill", types="push", nth=2, callback=lambda ev: os.kill(pid, signal.SIGKILL)),
    ], seed=0) as link:
        cfg = ...membership.address = link.address...
        link.partition(); link.heal()      # or by hand, from any thread
        link.counts()                      # {"forwarded": 41, "dropped": 1, "duplicated": 12, ...}
        link.seen("to_server", "push")     # messages of that type that reached the link
        link.events()                      # [Event(time, direction, type, worker, action, nbytes), ...]

Messages are opaque to the link: it only peeks at the message type and the sender's worker id,
which lie in the unauthenticated part of dilo's envelope (`[msgpack([header_bytes, mac]),
*tensor_frames]`, header_bytes a msgpack map with "type" and "worker"; dilo/wire.py). It needs
no secret and works whatever the header holds besides; a message that cannot be peeked (garbage,
another protocol) has type "" and matches only rules without `types`. CURVE-encrypted traffic
cannot be proxied (the link would need the server's key).

Rules: every rule counts the messages that match its selector (direction, types, worker) in the
order they reach the link; it acts on matches number skip+1 .. skip+times (`nth=k` is skip=k-1,
times=1; times=None: every one from then on), each with `probability` (drawn from the link's
seeded generator). When several rules act on one message the first in the list decides. The
plan is deterministic for a given order of arrival; the order in which concurrent clients'
messages arrive is up to the operating system, so tests should select by type and count, not
by timing. Messages that a partition swallows reach no rule; a partition drops them (a cut
cable), it does not queue them for later. `counts()["forwarded"]` counts every copy sent on.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from dilo.testing.faults.plan import Event, Rule

log = logging.getLogger("dilo.testing.faults")

_MAX_PEEK_BYTES = 1 << 20
"""Envelopes larger than this are not parsed (dilo's own cap is 64 KiB)."""


def peek(frames: list[Any]) -> tuple[str, str]:
    """(message type, worker) from a dilo envelope, ("", "") when it cannot be read. Never raises."""
    try:
        env = frames[0]
        raw = env.bytes if isinstance(env, zmq.Frame) else bytes(env)
        if len(raw) > _MAX_PEEK_BYTES:
            return "", ""
        outer = msgpack.unpackb(raw, raw=False)
        if not (isinstance(outer, (list, tuple)) and outer and isinstance(outer[0], bytes)):
            return "", ""
        header = msgpack.unpackb(outer[0], raw=False)
        if not isinstance(header, dict):
            return "", ""
        t, w = header.get("type"), header.get("worker")
        return (t if isinstance(t, str) else ""), (w if isinstance(w, str) else "")
    except Exception:  # noqa: BLE001 - msgpack raises many types on garbage; all mean "unreadable"
        return "", ""


def _nbytes(frames: list[Any]) -> int:
    return sum(len(f.buffer) if isinstance(f, zmq.Frame) else len(f) for f in frames)


@dataclass(order=True)
class _Timed:
    due: float
    order: int
    direction: str = field(compare=False)
    identity: bytes = field(compare=False)
    frames: list[Any] = field(compare=False)
    meta: tuple[str, str] = field(compare=False)


class FaultyLink:
    """A proxy for one server address; see the module docstring. Start: constructor; stop: close()."""

    def __init__(
        self,
        upstream: str,
        rules: Iterable[Rule] = (),
        *,
        seed: int = 0,
        bind: str = "tcp://127.0.0.1:0",
        max_events: int = 100_000,
    ) -> None:
        self.upstream = upstream
        self.rules = list(rules)
        self.rng = random.Random(seed)
        self._matched = [0] * len(self.rules)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._seen: Counter[tuple[str, str]] = Counter()
        self._events: deque[Event] = deque(maxlen=max_events)
        self._partition_until = 0.0
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        self._front.bind(bind)
        self.address: str = self._front.getsockopt_string(zmq.LAST_ENDPOINT)
        """Where clients connect: tcp://127.0.0.1:PORT."""
        self._backs: dict[bytes, zmq.Socket[bytes]] = {}
        self._identity_of: dict[zmq.Socket[bytes], bytes] = {}
        self._timers: list[_Timed] = []
        self._held: dict[str, _Timed] = {}
        self._order = 0
        self._thread = threading.Thread(target=self._run, name=f"dilo-faulty-link-{self.address}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------- control

    def partition(self, duration_s: float | None = None) -> None:
        """Stop forwarding in both directions, for duration_s or until heal()."""
        with self._lock:
            self._partition_until = float("inf") if duration_s is None else time.monotonic() + duration_s

    def heal(self) -> None:
        with self._lock:
            self._partition_until = 0.0

    @property
    def partitioned(self) -> bool:
        with self._lock:
            return time.monotonic() < self._partition_until

    def counts(self) -> dict[str, int]:
        """What the link did so far, by action (a message duplicated counts once in "duplicated")."""
        with self._lock:
            return dict(self._counts)

    def events(self) -> list[Event]:
        """What happened to each message, oldest first (the latest max_events of them)."""
        with self._lock:
            return list(self._events)

    def seen(self, direction: str, msg_type: str) -> int:
        """Messages of this direction and type that reached the link (partitioned ones included)."""
        with self._lock:
            return self._seen[(direction, msg_type)]

    def close(self) -> None:
        """Stop the thread and close every socket; messages still delayed or held are lost."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultyLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._release_due(now)
                wake = [t.due for t in self._timers[:1]] + [h.due for h in self._held.values()]
                timeout_ms = 50 if not wake else max(0, min(50, int((min(wake) - now) * 1000) + 1))
                for sock, _ in poller.poll(timeout_ms):
                    self._drain(sock, poller)
        except Exception:  # noqa: BLE001 - logged: a dead link looks like a partition to the tests
            log.exception("faulty link %s stopped on an unexpected error", self.address)
        finally:
            for s in [self._front, *self._backs.values()]:
                s.close(0)
            self._ctx.term()

    def _drain(self, sock: zmq.Socket[bytes], poller: zmq.Poller) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if sock is self._front:
                identity, body = frames[0].bytes, frames[1:]
                if identity not in self._backs:
                    back = self._ctx.socket(zmq.DEALER)
                    back.setsockopt(zmq.LINGER, 0)
                    back.connect(self.upstream)
                    self._backs[identity] = back
                    self._identity_of[back] = identity
                    poller.register(back, zmq.POLLIN)
                self._process("to_server", identity, body)
            else:
                self._process("to_client", self._identity_of[sock], frames)

    def _process(self, direction: str, identity: bytes, frames: list[Any]) -> None:
        msg_type, worker = peek(frames)
        meta = (msg_type, worker)
        with self._lock:
            self._seen[(direction, msg_type)] += 1
            cut = time.monotonic() < self._partition_until
        if cut:
            self._record("partitioned", direction, meta, frames)
            return
        rule = None
        for i, r in enumerate(self.rules):
            if not r.selects(direction, msg_type, worker):
                continue
            self._matched[i] += 1
            k = self._matched[i]
            acts = k > r.skip and (r.times is None or k <= r.skip + r.times)
            if acts and r.probability < 1.0:
                acts = self.rng.random() < r.probability
            if acts and rule is None:
                rule = r
        if rule is None:
            self._forward(direction, identity, frames, meta)
            return
        action = rule.action
        if action == "drop":
            self._record("dropped", direction, meta, frames)
        elif action == "delay":
            due = time.monotonic() + rule.delay_s + (self.rng.uniform(0.0, rule.jitter_s) if rule.jitter_s else 0.0)
            self._order += 1
            heapq.heappush(self._timers, _Timed(due, self._order, direction, identity, frames, meta))
            self._record("delayed", direction, meta, frames)
        elif action == "duplicate":
            self._record("duplicated", direction, meta, frames)
            for _ in range(rule.copies):
                self._forward(direction, identity, frames, meta)
        elif action == "reorder":
            self._record("reordered", direction, meta, frames)
            held = self._held.pop(direction, None)
            self._order += 1
            self._held[direction] = _Timed(
                time.monotonic() + rule.hold_s, self._order, direction, identity, frames, meta
            )
            if held is not None:  # the held one waited for a next message, and this is it: it goes now
                self._send(held.direction, held.identity, held.frames, held.meta)
        elif action == "corrupt":
            self._record("corrupted", direction, meta, frames)
            self._forward(direction, identity, self._corrupt(frames, rule), meta)
        elif action == "partition":
            with self._lock:
                self._partition_until = float("inf") if rule.duration_s is None else time.monotonic() + rule.duration_s
            self._record("partitioned", direction, meta, frames)
        else:  # kill
            if rule.deliver:
                self._forward(direction, identity, frames, meta)
            event = self._record("killed", direction, meta, frames)
            try:
                assert rule.callback is not None
                rule.callback(event)
            except Exception:  # noqa: BLE001 - the test's callback must not take the link down
                log.exception("the kill callback of %s raised", rule)

    def _corrupt(self, frames: list[Any], rule: Rule) -> list[Any]:
        out: list[Any] = list(frames)
        i = rule.frame if -len(frames) <= rule.frame < len(frames) else -1
        i %= len(frames)
        if _nbytes([frames[i]]) == 0:
            i = 0  # nothing to flip in an empty tensor frame: flip the envelope instead
        data = bytearray(frames[i].bytes if isinstance(frames[i], zmq.Frame) else bytes(frames[i]))
        if data:
            pos = rule.offset if rule.offset is not None else self.rng.randrange(len(data))
            data[pos % len(data)] ^= 0xFF
        out[i] = bytes(data)
        return out

    def _forward(self, direction: str, identity: bytes, frames: list[Any], meta: tuple[str, str]) -> None:
        self._send(direction, identity, frames, meta)
        held = self._held.pop(direction, None)
        if held is not None:  # the message it waited for has passed
            self._send(held.direction, held.identity, held.frames, held.meta)

    def _release_due(self, now: float) -> None:
        while self._timers and self._timers[0].due <= now:
            t = heapq.heappop(self._timers)
            if self.partitioned:  # in flight on a wire that was cut meanwhile
                self._record("partitioned", t.direction, t.meta, t.frames)
            else:
                self._forward(t.direction, t.identity, t.frames, t.meta)
        for direction, h in list(self._held.items()):
            if h.due <= now:
                del self._held[direction]
                self._send(h.direction, h.identity, h.frames, h.meta)

    def _send(self, direction: str, identity: bytes, frames: list[Any], meta: tuple[str, str]) -> None:
        try:
            if direction == "to_server":
                self._backs[identity].send_multipart(frames, copy=False)
            else:
                self._front.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as e:  # e.g. a client gone: a ROUTER drops it anyway
            log.warning("faulty link %s could not forward a %s message: %s", self.address, meta[0] or "?", e)
            return
        self._record("forwarded", direction, meta, frames)

    def _record(self, action: str, direction: str, meta: tuple[str, str], frames: list[Any]) -> Event:
        event = Event(time.monotonic(), direction, meta[0], meta[1], action, _nbytes(frames))
        with self._lock:
            self._counts[action] += 1
            self._events.append(event)
        return event
