"""Parameter groups of an exchange: which codec encodes which parameters.

A group is the parameters that share one codec (the default, a codec.overrides pattern, or one
candidate of an adaptive plan), laid out as one flat vector; its kind names the collective its
codec's algebra needs (dilo/outer/exchange.py runs it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import Tensor

from dilo.compress import build_codec
from dilo.compress.base import Codec
from dilo.compress.feedback import ErrorFeedback
from dilo.compress.lowrank import PowerSGD
from dilo.outer.base import FlatLayout

if TYPE_CHECKING:
    from dilo.config import CodecOverride, CodecSpec

SHARDS_PER_GROUP = 1 << 16  # ctx.part = group * SHARDS_PER_GROUP + shard


@dataclass
class Group:
    index: int
    label: str
    params: list[int]
    codec: Codec | PowerSGD
    """As build_codec made it: a flat codec (maybe wrapped in ErrorFeedback) or a bare PowerSGD."""
    feedback: bool
    layout: FlatLayout
    pieces: list[tuple[int, int]] = field(default_factory=list)
    """(offset, numel) of each of the group's parameters in the flat vector of all parameters."""
    owner_residual: Tensor | None = None
    padded: Tensor | None = None
    """The zero-padded copy of the group's vector that reduce-scatter cuts into shards (reused)."""
    lowrank_residual: list[Tensor] = field(default_factory=list)

    @property
    def flat_codec(self) -> Codec:
        """The codec of a group whose kind is not "powersgd" (PowerSGD has no flat encode / decode)."""
        assert not isinstance(self.codec, PowerSGD), f"{self.label}: PowerSGD is not a flat codec"
        return self.codec

    @property
    def span(self) -> tuple[int, int] | None:
        """(start, end) in the flat vector of all parameters when the group's parameters lie next
        to each other there (always, without overrides), else None."""
        if not self.pieces:
            return None
        start, end = self.pieces[0][0], self.pieces[0][0]
        for offset, numel in self.pieces:
            if offset != end:
                return None
            end += numel
        return start, end

    def take(self, flat: Tensor) -> Tensor:
        """The group's values from the flat vector of all parameters: a view when they are contiguous."""
        span = self.span
        if span is not None:
            return flat[span[0] : span[1]]
        return torch.cat([flat[o : o + n] for o, n in self.pieces])

    def put(self, flat: Tensor, values: Tensor) -> None:
        """Write the group's values back into the flat vector of all parameters."""
        done = 0
        for offset, numel in self.pieces:
            flat[offset : offset + numel].copy_(values[done : done + numel])
            done += numel

    @property
    def kind(self) -> str:
        plain = _plain(self.codec)
        if isinstance(plain, PowerSGD):
            return "powersgd"
        if plain.linear:
            return "all_reduce"
        return "reduce_scatter" if plain.shardable else "all_gather"


@overload
def _plain(codec: Codec) -> Codec: ...
@overload
def _plain(codec: Codec | PowerSGD) -> Codec | PowerSGD: ...
def _plain(codec: Codec | PowerSGD) -> Codec | PowerSGD:
    """The codec without its error feedback."""
    return codec.codec if isinstance(codec, ErrorFeedback) else codec


def build_groups(names: list[str], shapes: list[torch.Size], spec: CodecSpec, bucket_mb: float = 32.0) -> list[Group]:
    """Split parameters by codec: the first override whose pattern matches a name wins, else the default.

    `spec` is a CodecConfig, or a bare CodecSpec (no overrides).
    """
    overrides: list[CodecOverride] = list(getattr(spec, "overrides", []))
    chosen = [next((j + 1 for j, o in enumerate(overrides) if re.search(o.pattern, name)), 0) for name in names]
    labels = ["default", *(f"override {o.pattern!r}" for o in overrides)]
    return _grouped(shapes, [spec, *overrides], labels, chosen, bucket_mb)


def plan_groups(shapes: list[torch.Size], specs: list[Any], plan: list[int], bucket_mb: float = 32.0) -> list[Group]:
    """Groups for an adaptive plan: the parameters of each chosen candidate (index c) form group c."""
    return _grouped(shapes, specs, [f"adaptive {s.kind}" for s in specs], plan, bucket_mb)


def _grouped(
    shapes: list[torch.Size], specs: list[Any], labels: list[str], chosen: list[int], bucket_mb: float
) -> list[Group]:
    """Group k: the parameters i with chosen[i] == k, encoded by build_codec(specs[k]); empty groups
    are left out (the others keep their index k)."""
    offsets = [0]
    for shape in shapes:
        offsets.append(offsets[-1] + shape.numel())
    groups = []
    for k, spec in enumerate(specs):
        idx = [i for i, c in enumerate(chosen) if c == k]
        if not idx:
            continue
        numels = [shapes[i].numel() for i in idx]
        layout = FlatLayout([shapes[i] for i in idx], numels, max(1, int(bucket_mb * 2**20 / 4)))
        pieces = [(offsets[i], n) for i, n in zip(idx, numels)]
        groups.append(Group(k, labels[k], idx, build_codec(spec), bool(spec.feedback), layout, pieces))
    return groups


def describe_groups(groups: list[Group]) -> list[str]:
    return [
        f"{g.label}: {_plain(g.codec)!r} via {g.kind}"
        + (" + error feedback" if g.feedback else "")
        + f", {g.layout.total:,} values"
        for g in groups
    ]
