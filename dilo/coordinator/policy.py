"""What the coordinator does with pushes: the RoundPolicy seam, and the one place that picks it.

The server (server.py) owns everything every run needs: the socket, sessions, the membership
table, epochs, and the counters every reply carries (`version`, `round_index`, `global_tokens`).
A policy owns what one kind of outer loop needs and advances those counters on the server:

- SyncRounds (sync.py): DiLoCo / FedAvg star rounds, one outer step per round;
- AsyncPushes (asynchronous.py): async local SGD, every push applied on arrival;
- Tracker (tracker.py): gossip, members and peer addresses only; no model at all.

The server calls the policy at each event (join, leave, push, a state handed out, a timer tick)
and never asks which one it holds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dilo import wire
from dilo.bodies import JoinBody
from dilo.config import AsyncConfig, GossipConfig

if TYPE_CHECKING:
    from dilo.coordinator.server import Coordinator


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


class RoundPolicy(Protocol):
    """One kind of outer loop as the coordinator serves it."""

    names: list[str]
    """Names of the global parameters ([] for the tracker)."""
    params: list[torch.nn.Parameter]
    """The global fp32 parameters ([] for the tracker)."""
    limits: wire.Limits
    """The largest message a worker may send (a push is the largest)."""

    def check_join(self, body: JoinBody) -> None:
        """Refuse a JOIN this policy cannot serve (WireError), before any session is opened."""

    def on_join(self, member: Member, identity: bytes, msg: wire.Message, body: JoinBody, *, new: bool) -> bool:
        """A member joined (or joined again); True when its WELCOME is held back for later."""

    def on_leave(self, worker: str) -> None:
        """A member left the view (LEAVE or silence)."""

    def on_push(self, identity: bytes, msg: wire.Message) -> None:
        """A PUSH of a member: validate it (WireError), take it, answer when due."""

    def handout(self, worker: str, msg_type: wire.MsgType, body: dict[str, Any]) -> wire.Message:
        """The state `worker` starts from (WELCOME, STATE); `body` adds to its fields."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the state a worker adopts: parameters (and the outer optimizer's tensors)."""

    def peers(self) -> dict[str, str] | None:
        """gossip: member -> listening address, for heartbeat ACKs; None elsewhere."""

    def excused(self, worker: str) -> bool:
        """True while a member may stay silent (async: waiting for the start quorum)."""

    def tick(self, now: float) -> None:
        """Act on the deadlines that passed (a round's, a start's, a grace period's)."""

    def next_deadline(self) -> float | None:
        """The earliest time tick() has something to do, or None."""

    def member_status(self, member: Member) -> dict[str, Any]:
        """Fields this policy adds to a member's line in STATUS."""

    def status(self) -> dict[str, Any]:
        """Fields this policy adds to STATUS."""

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps of this policy."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint; the server's counters and members are already restored."""


def build_policy(coord: Coordinator) -> RoundPolicy:
    """The policy for the run's outer kind, chosen once when the coordinator starts."""
    outer = coord.cfg.outer
    if isinstance(outer, GossipConfig):
        from dilo.coordinator.tracker import Tracker

        return Tracker(coord)
    if isinstance(outer, AsyncConfig):
        from dilo.coordinator.asynchronous import AsyncPushes

        return AsyncPushes(coord, outer)
    from dilo.coordinator.sync import SyncRounds

    return SyncRounds(coord)
