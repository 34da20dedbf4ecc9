"""What every outer strategy shares: the `Strategy` protocol, the sync report, the fp32 anchor,
flat buffers.

A strategy is driven through `dilo.Outer` (dilo/api.py), the same way for every kind:

    strategy.start(model, resumed=False)      # broadcast / join the coordinator / find the peers
    strategy.reduce_grads(model)              # after every backward (DDP, islands; a no-op otherwise)
    if strategy.due(step):                    # end of a round
        report = strategy.sync(model, tail=Tail(...))

`sync` does not raise on a failed exchange: it returns `SyncReport(committed=False,
failure=Failure.X, reason=...)` with the parameters restored from the anchor. (An elastic worker
whose coordinator stays unreachable past its join deadline does raise: there is nobody left to
train with.)

Every collective carries a small fp32 *tail* after the payload: the contributor's weight, a
contributor count, a stop flag and the round's token count. Summing the tail with the payload
tells every worker, in the same message, how many workers contributed (the mean divides by
contributors, never by the configured world size), whether any worker asked to stop (so all stop
on the same round), and how many tokens the whole world trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import torch
import xxhash
from torch import Tensor, nn

from dilo.model import params_of
from dilo.transport.base import ByteCounter, Transport

if TYPE_CHECKING:
    from dilo.outer.star import StarLink
    from dilo.transport.zmq_p2p import P2PNode

__all__ = [
    "params_of",
    "Anchor",
    "Failure",
    "FlatLayout",
    "GossipLinks",
    "Joined",
    "Links",
    "SyncReport",
    "Tail",
    "Strategy",
    "tensor_digest",
    "all_finite",
]

TAIL_WEIGHT, TAIL_COUNT, TAIL_STOP, TAIL_TOKENS = range(4)
TAIL_LEN = 4


class Failure(str, Enum):
    """Why a round was not committed (`SyncReport.failure`; None when it was)."""

    NO_CONTRIBUTION = "no_contribution"
    """No worker sent a usable update (all non-finite or weight 0): the round is skipped everywhere."""
    TRANSPORT = "transport"
    """A collective failed or a peer was lost mid-round (a static world cannot go on without it)."""
    LOST = "lost"
    """Elastic: this worker's push was lost (the coordinator restarted or forgot it); it re-joined."""
    LATE = "late"
    """Elastic: the round had closed before the push arrived; restarted from the coordinator's state."""
    REFUSED = "refused"
    """The coordinator closed the round without committing it (e.g. the update would be non-finite)."""
    DROPPED = "dropped"
    """Async: the push was too stale (outer.max_staleness) and not applied."""
    ISOLATED = "isolated"
    """Gossip: no peer's parameters arrived this round; the worker trains on alone."""


@dataclass(frozen=True)
class SyncReport:
    committed: bool
    """True when the outer step was applied; False means parameters were restored."""
    participants: int
    """Workers whose contribution entered the mean."""
    bytes_sent: int
    bytes_recv: int
    sync_s: float
    stop: bool = False
    """Some worker asked to stop after this round."""
    tokens: int = 0
    """Tokens trained on by all contributors this round."""
    reason: str = ""
    """Human-readable detail for the log (why a round failed, who was missing)."""
    failure: Failure | None = None
    """Why the round was not committed, typed: the loop decides on this, never on `reason`."""
    anchor_hash: str = ""
    version: int = -1
    """The global version this worker holds after the sync (rounds committed, async: server updates)."""
    done: bool = False
    """The run's budget is spent (async): this worker finishes now."""
    staleness: int | None = None
    """async: versions that passed between this worker's pull and its push."""
    schedule_step: int | None = None
    """async: the step of the run's learning-rate schedule to continue from (the world's progress)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific metrics for the round's log line (gossip: disagreement, layer std)."""


@dataclass
class Tail:
    """The tail values of one worker, before the sum."""

    weight: float
    contributes: bool
    stop: bool
    tokens: int
    steps: int = 0
    """Inner steps of this round (async: measures the worker's speed; not part of the tensor)."""
    inner_s: float = 0.0
    """Seconds those steps took (not part of the tensor)."""
    last: bool = False
    """The loop ends after this round (outer.overlap finishes its exchange in the round; not part
    of the tensor)."""

    def tensor(self) -> Tensor:
        t = torch.zeros(TAIL_LEN, dtype=torch.float64)
        t[TAIL_WEIGHT] = self.weight if self.contributes else 0.0
        t[TAIL_COUNT] = 1.0 if self.contributes else 0.0
        t[TAIL_STOP] = 1.0 if self.stop else 0.0
        t[TAIL_TOKENS] = float(self.tokens)
        return t


@dataclass(frozen=True)
class Joined:
    """What a worker starts from, as its strategy's `start` found it."""

    island: int = -1
    """The data island the coordinator handed out (JOIN with island = "auto"), else -1."""
    version: int = -1
    """The global version joined at (elastic), else -1."""
    members: tuple[str, ...] | None = None
    """The members at the join (None: not known on this rank, e.g. an island's follower)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific facts for the start log (gossip: whom it took its parameters from)."""
    anchor_hash: str = ""
    """The hash of the parameters this worker starts from (filled in by `dilo.Outer.start`)."""

    def record(self) -> dict[str, Any]:
        """For the start log: tests and operators compare the hash with the coordinator's anchor."""
        members = list(self.members) if self.members is not None else None
        return {"island": self.island, "version": self.version, "members": members, **self.extra,
                "anchor_hash": self.anchor_hash}  # fmt: skip


class Strategy(Protocol):
    """An outer strategy, as the loop sees it: every kind implements all of it."""

    @property
    def round_steps(self) -> int:
        """Inner steps in the current round (async: as the coordinator assigned them)."""
        ...

    def due(self, step: int) -> bool:
        """Called after every inner step (0-based): True when the round ends there."""
        ...

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        """Agree on the starting parameters: broadcast (static), join the coordinator (elastic),
        find the peers (gossip). resumed: the model was just loaded from a checkpoint."""
        ...

    def reduce_grads(self, model: nn.Module) -> None:
        """Called after every backward pass, before clipping and the optimizer step: DDP and islands
        average the gradients here; every other strategy does nothing."""
        ...

    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        """The end of a round: the outer step. Never raises for a failed exchange (see Failure)."""
        ...

    def describe(self) -> list[str]:
        """What the exchange sends (codec and collective per parameter group), for the start log."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class GossipLinks:
    """What a gossip worker talks through: its listening node, who its peers are, and (tracked
    runs) how to join the tracker."""

    node: P2PNode
    view: Callable[[], dict[str, str]]
    """The current members and their addresses (this worker's own entry may be missing)."""
    worker_id: str
    rank: int
    """This worker's island (independent initialisation seeds from it)."""
    join: Callable[[], None] | None = None
    """Tracked runs: join the tracker (the view then follows its heartbeats)."""


@dataclass
class Links:
    """Everything a world gives a strategy to talk through; `dilo.outer.build` picks the strategy
    that fits the config and uses the links it needs."""

    counter: ByteCounter
    """The bytes this rank exchanges with other islands (a follower rank: none)."""
    collective: Transport | None = None
    """A static world's every rank (DDP exchanges gradients over it)."""
    outer: Transport | None = None
    """A static world's island lead ranks (DiLoCo / FedAvg); None on an island's follower ranks."""
    island: Transport | None = None
    """This island's ranks, when it has more than one (gradients every step, broadcasts)."""
    star: StarLink | None = None
    """The coordinator (elastic DiLoCo / FedAvg, async); None on an island's follower ranks."""
    gossip: GossipLinks | None = None
    lead: bool = True
    """This rank talks to the other islands (an island's local rank 0, or a one-rank island)."""
    shares: int = 1
    """transport.island_wire = "all": every rank of the island exchanges its share of the
    parameters over `outer` (a group of the same local rank across islands); 1 otherwise."""
    sharded: bool = False
    """transport.island_shard = "fsdp": the model is sharded over the island; every rank exchanges
    its own shard over `outer`."""


@dataclass
class FlatLayout:
    """Where each parameter lives in one flat fp32 vector, and how it splits into buckets."""

    shapes: list[torch.Size]
    numels: list[int]
    bucket_elems: int
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = sum(self.numels)

    @classmethod
    def of(cls, tensors: Sequence[Tensor], bucket_mb: float) -> FlatLayout:
        return cls([t.shape for t in tensors], [t.numel() for t in tensors], max(1, int(bucket_mb * 2**20 / 4)))

    def flatten(self, tensors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        if out is None:
            out = torch.empty(self.total, dtype=torch.float32, device=tensors[0].device)
        torch.cat([t.detach().reshape(-1).float() for t in tensors], out=out)
        return out

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        return [v.view(s) for v, s in zip(torch.split(flat, self.numels), self.shapes)]

    def buckets(self, flat: Tensor) -> list[Tensor]:
        """Contiguous views of `flat`, each at most bucket_elems long."""
        return list(torch.split(flat, self.bucket_elems))


class Anchor:
    """fp32 copy of the global parameters at the start of a round (theta_start), in one flat
    contiguous buffer.

    `params` are `nn.Parameter` views into `flat`, so that torch.optim can run the outer step on
    them (the pseudo-gradient written into `.grad`) while the digest, the finiteness check and the
    collectives see one buffer. The pseudo-gradient goes into a flat buffer that is reused every
    round (`pseudo_grad`): no allocation on the round's path.
    """

    def __init__(self, params: Sequence[Tensor], *, device: torch.device | None = None) -> None:
        """device: where the anchor lives (outer.offload: the host, in pinned memory when the
        parameters are on a GPU); the parameters' device by default."""
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        home = params[0].device if params else torch.device("cpu")
        device = device or home
        pin = device.type == "cpu" and home.type == "cuda"
        self.flat = torch.empty(sum(self.numels), dtype=torch.float32, device=device, pin_memory=pin)
        self._pin = pin
        views = self.split(self.flat)
        with torch.no_grad():
            for v, p in zip(views, params):
                v.copy_(p.detach())
        self.params = [nn.Parameter(v) for v in views]
        self._delta: Tensor | None = None

    def split(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of a flat buffer laid out like the anchor."""
        return [v.view(s) for v, s in zip(torch.split(flat, self.numels), self.shapes)]

    def empty_like(self) -> Tensor:
        return torch.empty_like(self.flat, pin_memory=self._pin)

    @torch.no_grad()
    def pseudo_grad(self, params: Sequence[Tensor], out: Tensor | None = None, base: Tensor | None = None) -> Tensor:
        """delta = anchor - params (old minus new, so it points like a gradient), one pass per
        parameter into a flat buffer: `out`, or one the anchor keeps and overwrites next call.
        base: a flat vector laid out like the anchor to measure from instead of the anchor."""
        if out is None:
            if self._delta is None:
                self._delta = self.empty_like()
            out = self._delta
        start = self.params if base is None else self.split(base)
        for a, p, d in zip(start, params, self.split(out)):
            if p.device == d.device:
                torch.sub(a, p.detach(), out=d)
            else:  # outer.offload: the parameters copied to the host, then subtracted in place
                d.copy_(p.detach())
                torch.sub(a, d, out=d)
        return out

    @torch.no_grad()
    def restore_into(self, params: Sequence[Tensor]) -> None:
        for a, p in zip(self.params, params):
            p.copy_(a)

    @torch.no_grad()
    def load_from(self, params: Sequence[Tensor]) -> None:
        for a, p in zip(self.params, params):
            a.copy_(p)

    def digest(self) -> str:
        return tensor_digest([self.flat])


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host synchronisation.

    NaN and Inf reach a tensor's extremes, so one aminmax per tensor (no bool tensor as large as
    the input, unlike isfinite().all()) and one check of the extremes together: 6-7x faster than a
    per-tensor isfinite on CPU."""
    ends = [x for t in tensors if t.numel() for x in torch.aminmax(t.detach())]
    return not ends or bool(torch.isfinite(torch.stack(ends)).all())


def tensor_digest(tensors: Sequence[Tensor]) -> str:
    """Short hash of the exact bytes of some tensors: equal digests mean bit-identical values.

    The hash reads each tensor's memory in place (a contiguous CPU tensor is not copied; a GPU
    tensor is copied to the host once). XXH3-64 hashes at several GB/s, near memcpy speed (a
    10M-parameter anchor: 7 ms against blake2b's 78 ms); it guards against accidents (divergent
    anchors), not adversaries: messages are authenticated separately."""
    h = xxhash.xxh3_64()
    for t in tensors:
        t = t.detach()
        if hasattr(t, "to_local"):  # a sharded island's DTensor: this rank's shard
            t = t.to_local()
        flat = t.reshape(-1)
        if flat.device.type != "cpu":
            flat = flat.cpu()
        h.update(flat.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


@torch.no_grad()
def broadcast_params(model: nn.Module, layout: FlatLayout, transport: Transport, src: int = 0) -> list[nn.Parameter]:
    """Overwrite every worker's parameters with rank src's, bucket by bucket; returns them."""
    params = params_of(model)
    flat = layout.flatten(params)
    transport.broadcast_(layout.buckets(flat), src)
    for p, v in zip(params, layout.unflatten(flat)):
        p.copy_(v)
    return params
