"""The fault plans: `Rule` for a `FaultyLink` (which messages, what happens to them), the
`Event` it records per message, and `CollectiveFault` for a `FaultyTransport`. Plain frozen
dataclasses, checked when they are made; no sockets, no tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

Action = Literal["drop", "delay", "duplicate", "reorder", "corrupt", "partition", "kill"]
_ACTIONS = ("drop", "delay", "duplicate", "reorder", "corrupt", "partition", "kill")
_DIRECTIONS = ("to_server", "to_client", "any")


# ------------------------------------------------------------------------------------------------
# the message link


@dataclass(frozen=True)
class Rule:
    """One line of a fault plan: which messages, and what happens to them."""

    action: Action
    """drop: lost. delay: forwarded after delay_s + U(0, jitter_s), other messages flow meanwhile.
    duplicate: forwarded `copies` times. reorder: held until the next message in the same direction
    has passed (or hold_s). corrupt: one byte of frame `frame` flipped. partition: nothing passes
    either way for duration_s (None: until heal()), this message included. kill: `callback(event)`
    runs, on the link's thread, after the message was forwarded (deliver=True) or instead."""
    types: str | Iterable[str] | None = None
    """Message types ("push", "result", "heartbeat", "ack", "join", "gossip", ...); None: any."""
    direction: Literal["to_server", "to_client", "any"] = "any"
    worker: str | None = None
    """Only messages whose header names this worker (the coordinator's replies name "coordinator")."""
    nth: int | None = None
    """Act on the nth match only (1-based); shorthand for skip=nth-1, times=1."""
    skip: int = 0
    """Matches that pass untouched before the rule acts."""
    times: int | None = 1
    """Matches acted on after the skipped ones; None: every one."""
    probability: float = 1.0
    delay_s: float = 0.0
    jitter_s: float = 0.0
    copies: int = 2
    frame: int = -1
    """corrupt: index of the frame among the message's frames (0: the envelope, -1: the last)."""
    offset: int | None = None
    """corrupt: byte to flip within the frame; None: drawn from the seeded generator."""
    hold_s: float = 1.0
    """reorder: release a held message after this long even if nothing followed it (a client
    waiting for the reply to its only request sends nothing else)."""
    duration_s: float | None = None
    callback: Callable[[Event], None] | None = None
    deliver: bool = True

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"action {self.action!r} is not one of {', '.join(_ACTIONS)}")
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"direction {self.direction!r} is not one of {', '.join(_DIRECTIONS)}")
        types = self.types
        if types is not None:
            raw = [types] if isinstance(types, str) else list(types)
            # plain strings: str() of a str Enum member (wire.MsgType.PUSH) is its qualified name
            object.__setattr__(self, "types", frozenset(str(getattr(t, "value", t)) for t in raw))
        if self.nth is not None:
            if self.nth < 1:
                raise ValueError(f"nth={self.nth} counts from 1")
            object.__setattr__(self, "skip", self.nth - 1)
            object.__setattr__(self, "times", 1)
        if self.skip < 0 or (self.times is not None and self.times < 0):
            raise ValueError(f"skip={self.skip} and times={self.times} must be >= 0")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability={self.probability} must lie in [0, 1]")
        if self.delay_s < 0 or self.jitter_s < 0 or self.hold_s < 0:
            raise ValueError("delay_s, jitter_s and hold_s must be >= 0")
        if self.copies < 1:
            raise ValueError(f"copies={self.copies} must be >= 1")
        if self.action == "kill" and self.callback is None:
            raise ValueError("a kill rule needs a callback (e.g. lambda ev: os.kill(pid, signal.SIGKILL))")

    def selects(self, direction: str, msg_type: str, worker: str) -> bool:
        return (
            (self.direction == "any" or self.direction == direction)
            and (self.types is None or msg_type in self.types)
            and (self.worker is None or self.worker == worker)
        )


@dataclass(frozen=True)
class Event:
    """What the link did with one message."""

    time: float
    direction: str
    type: str
    worker: str
    action: str
    """forwarded, dropped, delayed, duplicated, reordered, corrupted, partitioned, killed."""
    nbytes: int


# ------------------------------------------------------------------------------------------------
# the collective transport

TransportAction = Literal["peer_lost", "timeout", "abort", "hang", "kill"]
Op = Literal["any", "all_reduce", "all_gather", "all_to_all", "broadcast"]


@dataclass(frozen=True)
class CollectiveFault:
    """Fail the `at`-th call (from 1) of `op` on this rank, counted from when the fault was added."""

    action: TransportAction
    """peer_lost / timeout: raise PeerLost / SyncTimeout here without taking part (the peers, if
    they take part, time out). abort: break the group for real (the peers see Gloo's "connection
    closed by peer", as from a crashed process), then raise PeerLost here. hang: do not take part
    for hang_s seconds (None: until release()), then raise SyncTimeout here (the peers time out).
    kill: call `callback` (e.g. SIGKILL this process); if it returns, break the group like abort."""
    op: Op = "any"
    at: int = 1
    hang_s: float | None = None
    callback: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.at < 1:
            raise ValueError(f"at={self.at} counts calls from 1")
        if self.action == "kill" and self.callback is None:
            raise ValueError("a kill fault needs a callback")
