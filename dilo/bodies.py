"""The bodies of coordinator messages, as frozen pydantic models: one place that says what each
request may carry and what each reply holds.

    push = parse(PushBody, msg.body)          # WireError("bad_body", "PUSH body: weight: ...") if not
    ack = parse(AckBody, reply.body)          # a worker checks a reply before it trusts it
    msg.body = dump(AckBody(epoch=3, ...))    # the coordinator builds its replies from the models

Requests come from workers the coordinator does not trust: their models forbid unknown keys and
are strict (a bool is not a number, "1" is not a number, 3.0 is not an integer), and every number
has bounds, so that no body can overflow the float32 arithmetic of a round (a weight of 1e39 did,
once). Bounds that depend on the coordinator's state (a push may claim at most the steps it was
assigned, its base version must exist) are checked by the round policy, not here.

Replies come from the coordinator the worker joined: their models are strict too but ignore
keys they do not know, so that a newer coordinator may add fields. The coordinator sends
`dump(model)`: fields left at None are not sent at all (e.g. `island` for a worker that did not
ask for one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dilo import wire

MAX_WEIGHT = float(2**40)
"""The largest push weight (token counts of a round stay far below it); larger is refused."""
MAX_COUNT = 2**40
"""The largest tokens or steps one push may claim."""
MAX_SECONDS = 1e7
"""The longest inner phase (seconds) an async push may report."""
MAX_PORT = 65535

Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Weight = Annotated[float, Field(ge=0, le=MAX_WEIGHT)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS)]


class Request(BaseModel):
    """A body sent by a worker: strict, bounded, no unknown keys."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class Reply(BaseModel):
    """A body sent by the coordinator: strict, unknown keys ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


# ------------------------------------------------------------------------------- requests


class Empty(Request):
    """HEARTBEAT, PULL and LEAVE carry nothing but their header."""


class JoinBody(Request):
    p2p: str | None = None
    """gossip: where this worker listens for its peers, tcp://HOST:PORT (required by a tracker)."""
    island: Literal["auto"] | None = None
    """"auto": the coordinator hands out a data island (the lowest one no other member holds)."""

    @field_validator("p2p")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        m = re.fullmatch(r"tcp://[^:\s]+:(\d{1,5})", value)
        if m is None or int(m.group(1)) > MAX_PORT:
            raise ValueError(f"must be tcp://HOST:PORT with a port up to {MAX_PORT}")
        return value


class PushBody(Request):
    """A synchronous push: the pseudo-gradient's weight in the round's mean and what it cost."""

    weight: Weight = 1.0
    """The push's weight in the mean (its tokens, or 1); 0 leaves it out."""
    contributes: bool = True
    """False: the worker has nothing to add this round (its tensors, if any, are ignored zeros)."""
    stop: bool = False
    """The worker stops after this round (it concerns only the worker)."""
    tokens: Count = 0
    loss: float = math.nan
    round: Count | None = None
    """The worker's round counter (informational)."""
    steps: Count = 0
    """Inner steps behind this push (0: not reported). Sync: informational, the worker's speed in
    STATUS; async: the policy caps it by the steps it assigned (DyLU)."""
    inner_s: Seconds = 0.0
    """Seconds those inner steps took, communication excluded (0: not reported)."""


class AsyncPushBody(PushBody):
    """An async push: the same fields; its `steps` are checked against the steps assigned."""


# ------------------------------------------------------------------------------- replies


class ErrorBody(Reply):
    code: str
    """A short machine string (wire.WireError codes, "not_member", "bad_type", ...)."""
    message: str = ""


class ByeBody(Reply):
    """The answer to LEAVE: nothing."""


class AckBody(Reply):
    """The answer to a HEARTBEAT: the current view."""

    epoch: int
    version: int
    round: int
    members: list[str]
    boot: str
    """An id of the coordinator process: it changes on a restart."""
    peers: dict[str, str] | None = None
    """gossip: member -> listening address."""


class StateBody(Reply):
    """WELCOME, STATE, and the async RESULT: the global state that comes with the message's tensors."""

    version: int
    round: int
    epoch: int
    members: list[str]
    anchor_hash: str
    boot: str
    inner_steps: int | None = None
    """H for the next round (async: the steps assigned to this worker, at least 1)."""
    island: int | None = None
    """The data island handed out to a worker that joined with island = "auto"."""
    reason: str | None = None
    """STATE answering a push: "late" (the round it was for has closed)."""
    done: bool | None = None
    """async: the step budget is spent; the worker stops."""
    schedule_step: int | None = None
    """async: the step of the LR schedule (steps done so far / workers)."""
    world_tokens: int | None = None


class AsyncResultBody(StateBody):
    """The answer to an async push: the fresh state, and what became of the push."""

    staleness: int
    """Versions applied between the push's base and now."""
    applied: bool
    dropped: bool
    """Refused for its staleness (max_staleness)."""
    refused: str | None = None
    """Why an update was not applied (it would make the global state non-finite)."""


class RoundResultBody(Reply):
    """The answer to a synchronous push, sent to every pusher when the round closes."""

    version: int
    round: int
    committed: bool
    participants: int
    tokens: int
    anchor_hash: str
    inner_steps: int
    members: list[str]
    epoch: int
    boot: str
    member_stats: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    """Per contributing member: its update's norm and its cosine to the mean."""
    reason: str = ""
    """Why the round was not committed ("" when it was)."""


class TrackerStateBody(Reply):
    """WELCOME and STATE of a gossip tracker: only the members and where they listen."""

    epoch: int
    members: list[str]
    peers: dict[str, str]
    boot: str
    island: int | None = None


# ------------------------------------------------------------------------------- between gossip peers

PeerWeight = Annotated[float, Field(gt=0, le=MAX_WEIGHT, allow_inf_nan=False)]


class GossipBody(Request):
    """A GOSSIP message from a peer: its round, whether it is the final merge's, its push-sum weight
    (plain gossip: 1), and in compressed gossip the sequence number of its public estimate."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    round: Count
    final: bool = False
    weight: PeerWeight = 1.0
    seq: Count | None = None


class PeerStateBody(Reply):
    """The STATE a peer answers a pull with: its round, push-sum weight, parameters' digest and the
    sequence number of its public estimate."""

    round: Count
    weight: PeerWeight = 1.0
    digest: str = ""
    seq: Count = 0


# ------------------------------------------------------------------------------- helpers

M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], body: Mapping[str, Any], what: str | None = None) -> M:
    """`body` as a `model`, or WireError("bad_body") naming each field that is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise wire.WireError("bad_body", f"{what or model.__name__}: {describe(e)}") from None


def describe(e: ValidationError, most: int = 3) -> str:
    """The first `most` problems of a validation error, one clause each, with the value received."""
    parts = []
    for err in e.errors()[:most]:
        field = ".".join(str(x) for x in err["loc"]) or "body"
        got = "" if err["type"] == "missing" else f", got {_short(err['input'])}"
        parts.append(f"{field}: {err['msg']}{got}")
    if len(e.errors()) > most:
        parts.append(f"and {len(e.errors()) - most} more")
    return "; ".join(parts)


def _short(value: Any, most: int = 80) -> str:
    """repr(value), cut to `most` characters: a hostile body must not fill the logs."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def dump(model: BaseModel) -> dict[str, Any]:
    """A body to send: the model's fields, without those left at None."""
    return model.model_dump(exclude_none=True)
