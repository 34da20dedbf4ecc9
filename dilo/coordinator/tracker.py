"""The gossip tracker: with outer.kind = "gossip" the coordinator only tracks the members and
where each listens for its peers (JOIN carries p2p = tcp://HOST:PORT); workers exchange their
parameters directly. The tracker holds no model: it builds no parameters, and a PUSH is refused."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dilo import wire
from dilo.bodies import JoinBody, TrackerStateBody, dump
from dilo.coordinator.global_model import header_limits
from dilo.coordinator.policy import Member

if TYPE_CHECKING:
    from dilo.coordinator.server import Coordinator


class Tracker:
    """The RoundPolicy of gossip runs: members and peer addresses only."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.limits = header_limits([])  # workers send headers only: no message of theirs has tensors

    def check_join(self, body: JoinBody) -> None:
        if body.p2p is None:
            raise wire.WireError("bad_body", "a gossip JOIN carries p2p = tcp://HOST:PORT")

    def on_join(self, member: Member, identity: bytes, msg: wire.Message, body: JoinBody, *, new: bool) -> bool:
        address = body.p2p or ""
        if member.address != address:
            if not new:  # re-joined from another port: peers must learn the new address
                self.coord.epoch += 1
            member.address = address
        return False

    def on_leave(self, worker: str) -> None:
        pass

    def on_push(self, identity: bytes, msg: wire.Message) -> None:
        raise wire.WireError("bad_type", "a gossip run has no central state: peers exchange directly")

    def handout(self, worker: str, msg_type: wire.MsgType, body: dict[str, Any]) -> wire.Message:
        coord = self.coord
        state = TrackerStateBody(epoch=coord.epoch, members=sorted(coord.members), peers=self.peers(),
                                 boot=coord.boot, **body)  # fmt: skip
        return wire.Message(type=msg_type, worker="coordinator", body=dump(state))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def peers(self) -> dict[str, str]:
        return {w: m.address for w, m in sorted(self.coord.members.items())}

    def excused(self, worker: str) -> bool:
        return False

    def tick(self, now: float) -> None:
        pass

    def next_deadline(self) -> float | None:
        return None

    def member_status(self, member: Member) -> dict[str, Any]:
        return {}

    def status(self) -> dict[str, Any]:
        return {"pending": []}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
