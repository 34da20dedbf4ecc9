"""What every outer strategy shares: the sync report, the fp32 anchor, flat buffers.

A strategy is driven by the worker loop (dilo/train.py):

    if outer.reduce_grads is not None:        # DDP only: after every backward
        outer.reduce_grads(model, tail)
    if outer.due(step):                       # end of a round
        report = outer.sync(model, weight=tokens, stop=stop_requested)

`sync` does not raise on a failed exchange: it returns `SyncReport(committed=False, reason=...)`
with the parameters restored from the anchor. (An elastic worker whose coordinator stays
unreachable past its join deadline does raise: there is nobody left to train with.)

Every collective carries a small fp32 *tail* after the payload: the contributor's weight, a
contributor count, a stop flag and the round's token count. Summing the tail with the payload
tells every worker, in the same message, how many workers contributed (the mean divides by
contributors, never by the configured world size), whether any worker asked to stop (so all stop
on the same round), and how many tokens the whole world trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dilo.model import params_of

__all__ = ["params_of", "Anchor", "FlatLayout", "SyncReport", "Tail", "Strategy", "tensor_digest"]

TAIL_WEIGHT, TAIL_COUNT, TAIL_STOP, TAIL_TOKENS = range(4)
TAIL_LEN = 4


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

    def tensor(self) -> Tensor:
        t = torch.zeros(TAIL_LEN, dtype=torch.float64)
        t[TAIL_WEIGHT] = self.weight if self.contributes else 0.0
        t[TAIL_COUNT] = 1.0 if self.contributes else 0.0
        t[TAIL_STOP] = 1.0 if self.stop else 0.0
        t[TAIL_TOKENS] = float(self.tokens)
        return t


class Strategy(Protocol):
    round_steps: int

    def due(self, step: int) -> bool: ...

    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
    def of(cls, tensors: list[Tensor], bucket_mb: float) -> FlatLayout:
        return cls([t.shape for t in tensors], [t.numel() for t in tensors], max(1, int(bucket_mb * 2**20 / 4)))

    def flatten(self, tensors: list[Tensor], out: Tensor | None = None) -> Tensor:
        if out is None:
            out = torch.empty(self.total, dtype=torch.float32, device=tensors[0].device)
        torch.cat([t.detach().reshape(-1).float() for t in tensors], out=out)
        return out

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes)]

    def buckets(self, flat: Tensor) -> list[Tensor]:
        """Contiguous views of `flat`, each at most bucket_elems long."""
        return list(flat.split(self.bucket_elems))


class Anchor:
    """fp32 copy of the global parameters at the start of a round (theta_start).

    Anchors are `nn.Parameter`s so that torch.optim can run the outer step on them, with the
    pseudo-gradient written into `.grad`.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = [nn.Parameter(p.detach().float().clone()) for p in params]

    def pseudo_grad(self, params: list[Tensor]) -> list[Tensor]:
        """delta = anchor - params: old minus new, so it points like a gradient."""
        return [a.detach() - p.detach().float() for a, p in zip(self.params, params)]

    @torch.no_grad()
    def restore_into(self, params: list[Tensor]) -> None:
        for a, p in zip(self.params, params):
            p.copy_(a)

    @torch.no_grad()
    def load_from(self, params: list[Tensor]) -> None:
        for a, p in zip(self.params, params):
            a.copy_(p)

    def digest(self) -> str:
        return tensor_digest(self.params)


def tensor_digest(tensors: list[Tensor]) -> str:
    """Short hash of the exact bytes of some tensors: equal digests mean bit-identical values."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def broadcast_params(model: nn.Module, layout: FlatLayout, transport: Any, src: int = 0) -> list[nn.Parameter]:
    """Overwrite every worker's parameters with rank src's, bucket by bucket; returns them."""
    params = params_of(model)
    flat = layout.flatten(params)
    transport.broadcast_(layout.buckets(flat), src)
    for p, v in zip(params, layout.unflatten(flat)):
        p.copy_(v)
    return params
