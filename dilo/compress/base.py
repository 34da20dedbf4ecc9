"""The Codec seam: how a pseudo-gradient is written on the wire.

Codecs work on flat 1-D fp32 tensors (a pseudo-gradient, or one shard of it) and return fp32.

    payload = codec.encode(delta, ctx)        # Encoded: the exact tensors that go on the wire
    buf = pack(payload)                       # one uint8 tensor; len(buf) == payload.nbytes
    delta_hat = codec.decode(unpack(buf, like=payload))

Two flags state the codec's algebra, and `dilo.outer.exchange` picks the collective from them
in one place:

- `linear`: payloads may be summed element by element in fp32 and the sum decodes to the sum
  of the inputs (identity, random-k with a shared mask). Such payloads are all-reduced.
- `shardable`: encoding a slice gives the slice of the encoding (elementwise casts, blockwise
  quantizers with slices aligned to blocks). Such payloads are reduce-scattered: every worker
  sends shard j to worker j, worker j decodes and sums in fp32, re-encodes its mean shard, and
  the mean shards are all-gathered. Bytes per worker are those of a ring all-reduce scaled by
  the compression ratio.
- neither (top-k, sign): every worker all-gathers all payloads and decodes and sums them in
  rank order.

The payload size depends only on the input's length (never on its values), so a receiver can
unpack a peer's bytes with its own payload as the template.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

SLAB = 1 << 18
"""Values a codec works on per step (about 1 MB of fp32): its temporaries stay in cache and live
in buffers reused slab after slab. A new vector-sized temporary costs a pass over memory, and on
a fresh allocation the first touch of every page as well."""


def slab_rows(n_rows: int, width: int) -> int:
    """Rows of `width` values per slab: about SLAB values, at least one, at most all of them."""
    return max(1, min(n_rows, SLAB // width))


def slabs(n_rows: int, width: int) -> Iterator[tuple[int, int]]:
    """(first, end) row ranges of about SLAB values each."""
    rows = slab_rows(n_rows, width)
    for lo in range(0, n_rows, rows):
        yield lo, min(lo + rows, n_rows)


@dataclass(frozen=True)
class Context:
    """What a codec may use to derive random streams.

    Random-k needs a mask shared by every worker of the round: derive it from (seed, round, part).
    Stochastic rounding needs streams independent across workers: add rank.
    """

    seed: int = 0
    round: int = 0
    rank: int = 0
    part: int = 0
    """Which slice of the pseudo-gradient (a parameter group or a shard), so slices differ."""
    checked: bool = False
    """The caller has checked the whole vector for NaN and Inf in one pass already: the codec
    does not scan it again."""

    def shared_seed(self) -> int:
        return _mix(self.seed, self.round, self.part, 0x5EED)

    def worker_seed(self) -> int:
        return _mix(self.seed, self.round, self.part, self.rank + 1)


def _mix(*parts: int) -> int:
    h = 0xCBF29CE484222325
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class Encoded:
    tensors: dict[str, Tensor]
    """Exactly what goes on the wire, in a fixed order."""
    numel: int
    """Length of the fp32 vector this payload decodes to."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Codec(Protocol):
    linear: bool
    shardable: bool
    block: int
    """Shard boundaries must be multiples of this (1 for elementwise codecs)."""

    def encode(self, x: Tensor, ctx: Context) -> Encoded: ...

    def decode(self, e: Encoded) -> Tensor: ...


def pack(e: Encoded) -> Tensor:
    """The payload as one uint8 tensor (a copy), in the order of `e.tensors`."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in e.tensors.values()]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack(buf: Tensor, like: Encoded) -> Encoded:
    """Rebuild a payload from bytes, using a payload of the same length as the template."""
    if buf.numel() != like.nbytes:
        raise ValueError(f"payload of {buf.numel()} bytes, expected {like.nbytes}")
    out: dict[str, Tensor] = {}
    offset = 0
    for name, t in like.tensors.items():
        n = t.numel() * t.element_size()
        out[name] = buf[offset : offset + n].view(t.dtype).view(t.shape)
        offset += n
    return Encoded(out, like.numel)


def check_finite(x: Tensor, ctx: Context | None = None) -> None:
    """Codecs refuse NaN/Inf: a non-finite pseudo-gradient must never reach the wire (unless
    `ctx.checked` says the caller verified it)."""
    if x.numel() == 0 or (ctx is not None and ctx.checked):
        return
    # NaN and Inf propagate into the extremes; on CPU this is ~30x faster than isfinite().all(),
    # which materialises a bool tensor as large as x.
    lo, hi = torch.aminmax(x.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError("cannot encode a tensor holding NaN or Inf; the worker must skip this round")


class Identity:
    """fp32 as it is: lossless and linear."""

    linear = True
    shardable = True
    block = 1

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        check_finite(x, ctx)
        return Encoded({"values": x.detach().float().reshape(-1).contiguous()}, x.numel())

    def decode(self, e: Encoded) -> Tensor:
        return e.tensors["values"].float()

    def __repr__(self) -> str:
        return "Identity()"
