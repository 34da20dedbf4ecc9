"""Sessions: what makes every authenticated message unique, so that a captured one cannot be replayed.

The MAC (dilo/wire.py) proves who wrote a message, not that it is new. A session adds freshness:

    sender                                       receiver (coordinator, gossip peer)
    HELLO   {nonce: n}                   ──►     sessions.challenge(peer) -> c     (no state kept)
    CHALLENGE {nonce: n, challenge: c}   ◄──
    JOIN / first GOSSIP: sid=c, seq=1    ──►     sessions.open(peer, c, 1)         (c is spent)
    ...                  sid=c, seq=k    ──►     sessions.check(peer, c, k)        (k never seen)

- The challenge `c` is issued by the receiver and stateless there: a counter, a time and a MAC
  under a key the receiver process draws at start-up. Opening a session verifies the MAC, refuses
  a challenge older than `ttl_s`, and refuses one that is not newer than the newest session that
  peer ever opened (remembered for `ttl_s` after it closes): a replayed JOIN of a departed worker
  or an old session's first message are refused, however often they are sent.
- Within a session, `seq` is checked against a sliding window (as IPsec's anti-replay window):
  each number is accepted once, a little reordering is fine (a worker's heartbeat and request
  sockets share one counter and their messages may overtake each other), and a number that fell
  more than `window` behind is refused.
- `sid` and `seq` sit in the header under the MAC, so neither can be changed without the secret.
  Replies echo the request's `sid` and `seq`, and the sender takes only replies of its own session.
- A receiver that restarts draws a new key: every old session and challenge becomes invalid and
  the senders say HELLO again.

Without a secret anyone can write any message, and sessions only keep honest peers from confusing
each other (two processes started with the same worker id, stale replies after a restart).
"""

from __future__ import annotations

import hmac
import itertools
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from typing import TypeVar

from dilo.wire import Message, MsgType, WireError

WINDOW = 1024
"""Sequence numbers a session tolerates out of order."""
MAX_SESSIONS = 65536
"""Active sessions and remembered floors kept by one receiver (oldest dropped first)."""

_V = TypeVar("_V")


class ReplayWindow:
    """Accept each sequence number at most once; numbers more than `size` behind the newest are refused."""

    def __init__(self, size: int = WINDOW) -> None:
        self.size = size
        self.top = 0
        self.mask = 0
        """Bit i set: number top - i was seen."""

    def accept(self, seq: int) -> bool:
        if seq <= 0:
            return False
        if seq > self.top:
            shift = seq - self.top
            self.mask = ((self.mask << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = seq
            return True
        offset = self.top - seq
        if offset >= self.size or self.mask >> offset & 1:
            return False
        self.mask |= 1 << offset
        return True


@dataclass
class _Active:
    sid: str
    window: ReplayWindow
    identity: bytes
    """The connection that opened the session: copies sent from any other are refused."""


class Sessions:
    """The receiver's side: issues challenges, opens and checks sessions per peer name."""

    def __init__(self, *, ttl_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._key = secrets.token_bytes(32)
        self._counter = itertools.count(1)
        self._active: OrderedDict[str, _Active] = OrderedDict()
        self._floor: OrderedDict[str, tuple[int, float]] = OrderedDict()
        """peer -> (counter of the newest session it opened, when): older challenges are spent."""

    def _mac(self, peer: str, identity: bytes, n: int, t_ms: int) -> str:
        msg = f"{peer}|{n}|{t_ms}|".encode() + identity
        return hmac.new(self._key, msg, sha256).hexdigest()[:32]

    def challenge(self, peer: str, identity: bytes = b"") -> str:
        """A challenge for `peer` on the connection `identity` (a ZeroMQ routing id, which never
        travels on the wire): only a message from that connection can open a session with it."""
        n, t_ms = next(self._counter), int(self.clock() * 1000)
        return f"{n:x}.{t_ms:x}.{self._mac(peer, identity, n, t_ms)}"

    def open(self, peer: str, sid: str, seq: int, channel: str = "", identity: bytes = b"") -> None:
        """Start `peer`'s session `sid` (from our challenge) with its first message; replaces any
        session it had on that channel (a peer may keep one per kind of request, e.g. gossip and
        pulls). Raises WireError "session" (not our challenge, not for this connection, or
        expired) or "replay"."""
        n, t_ms = self._parse(peer, sid, identity)
        key = f"{peer}\0{channel}"
        now = self.clock()
        if now * 1000 - t_ms > self.ttl_s * 1000:
            raise WireError("session", f"the challenge of {peer!r} expired ({self.ttl_s:.0f} s): say HELLO again")
        floor = self._floor.get(key)
        if floor is not None and n <= floor[0]:
            raise WireError("replay", f"session {sid[:12]}... of {peer!r} was opened before: a replayed message")
        window = ReplayWindow()
        if not window.accept(seq):
            raise WireError("replay", f"sequence number {seq} of {peer!r} is not a fresh one")
        self._remember(self._floor, key, (n, now))
        self._remember(self._active, key, _Active(sid, window, identity))

    def check(self, peer: str, sid: str, seq: int, channel: str = "", identity: bytes = b"") -> None:
        """A message of `peer`'s open session. Raises WireError "session" (no session, or another
        one: say HELLO and open a new one), "identity" (sent from another connection than the one
        that opened it: a copy, checked before the number is spent so that a copy overtaking the
        original does not make the original look like the replay) or "replay" (this sequence
        number was seen)."""
        active = self._active.get(f"{peer}\0{channel}")
        if active is None or not sid or not hmac.compare_digest(active.sid, sid):
            raise WireError(
                "session", f"{peer!r} has no open session {sid[:12] or '(none)'}: say HELLO and start a new one"
            )
        if active.identity != identity:
            raise WireError("identity", f"{peer!r} opened this session from another connection: open a new one here")
        if not active.window.accept(seq):
            raise WireError("replay", f"sequence number {seq} of {peer!r} was seen before (or is too old)")

    def accept(self, peer: str, sid: str, seq: int, channel: str = "", identity: bytes = b"") -> None:
        """check() a message of the open session, or open() a new one with it (gossip peers and
        heartbeat sockets, which have no JOIN)."""
        active = self._active.get(f"{peer}\0{channel}")
        if active is not None and sid and hmac.compare_digest(active.sid, sid):
            self.check(peer, sid, seq, channel, identity)
        else:
            self.open(peer, sid, seq, channel, identity)

    def close(self, peer: str, channel: str = "") -> None:
        """End `peer`'s session (it left); its floor stays, so its old challenges stay spent."""
        self._active.pop(f"{peer}\0{channel}", None)

    def prune(self) -> None:
        """Forget floors older than the challenge lifetime: their challenges have expired anyway."""
        horizon = self.clock() - self.ttl_s
        for key in [k for k, (_, t) in self._floor.items() if t < horizon and k not in self._active]:
            del self._floor[key]

    def _parse(self, peer: str, sid: str, identity: bytes) -> tuple[int, int]:
        try:
            n_hex, t_hex, mac = sid.split(".")
            n, t_ms = int(n_hex, 16), int(t_hex, 16)
        except ValueError:
            raise WireError("session", f"{sid[:40]!r} is not a session this receiver issued: say HELLO") from None
        if not hmac.compare_digest(self._mac(peer, identity, n, t_ms), mac):
            raise WireError(
                "session",
                f"session {sid[:12]}... was not issued to {peer!r} on this connection by this process: say HELLO again",
            )
        return n, t_ms

    @staticmethod
    def _remember(table: OrderedDict[str, _V], key: str, value: _V) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_SESSIONS:
            table.popitem(last=False)


class ClientSession:
    """The sender's side: the session id from the receiver's challenge and one sequence counter for
    the sender's lifetime, shared by all its sockets (thread-safe).

    The session id changes only when the message that opens the new session is answered
    (`established`): until then heartbeats keep the old one, and a late refusal of an old-session
    heartbeat cannot be mistaken for a refusal of the new session."""

    def __init__(self) -> None:
        self.sid = ""
        self.pending = ""
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._nonce = ""

    def hello(self, worker: str) -> Message:
        """A HELLO asking for a challenge; the CHALLENGE must echo its nonce."""
        self._nonce = secrets.token_hex(16)
        return self.stamp(Message(type=MsgType.HELLO, worker=worker, body={"nonce": self._nonce}), sid="")

    def accept_challenge(self, reply: Message) -> bool:
        """Keep the challenge in `reply` for the message that opens the next session; False for
        anything else (a stale or replayed CHALLENGE does not echo our latest nonce)."""
        b = reply.body
        if reply.type != MsgType.CHALLENGE or b.get("nonce") != self._nonce or not isinstance(b.get("challenge"), str):
            return False
        self.pending = b["challenge"]
        return True

    def opening(self, msg: Message) -> Message:
        """Stamp the message that opens the pending session (JOIN, or a peer's first message)."""
        return self.stamp(msg, sid=self.pending)

    def established(self) -> None:
        with self._lock:
            self.sid, self.pending = self.pending, ""

    def stamp(self, msg: Message, *, sid: str | None = None) -> Message:
        with self._lock:
            msg.sid, msg.seq = (self.sid if sid is None else sid), next(self._seq)
        return msg

    def owns(self, reply: Message, request: Message | None = None) -> bool:
        """A reply to `request` (same session and seq), or with no request, one of the current
        session. An ERROR to a message the receiver could not read carries no session or seq; it
        is taken as the answer too (so a worker with the wrong secret hears why it is refused)."""
        if reply.type == MsgType.ERROR and not reply.sid and reply.seq == 0:
            return True
        if request is not None:
            return reply.sid == request.sid and reply.seq == request.seq
        return bool(self.sid) and reply.sid == self.sid

    def reset(self) -> None:
        with self._lock:
            self.sid = self.pending = ""


def challenge_reply(sessions: Sessions, msg: Message, me: str, identity: bytes) -> Message:
    """The CHALLENGE answering a HELLO from connection `identity` (WireError for a malformed one)."""
    nonce = msg.body.get("nonce")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 64:
        raise WireError("bad_body", "HELLO carries nonce = a string of 16 to 64 characters")
    challenge = sessions.challenge(msg.worker, identity)
    return Message(type=MsgType.CHALLENGE, worker=me, body={"nonce": nonce, "challenge": challenge})
