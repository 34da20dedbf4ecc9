"""The Codec seam: how a pseudo-gradient is written on the wire.

`encode` turns an fp32 tensor into an `Encoded` payload whose `nbytes` is exactly what is
sent; `decode` turns it back into fp32. `linear` says whether payloads may be summed element
by element (so an all-reduce can combine them); a non-linear codec's payloads must be gathered
and decoded one by one.

    codec = build_codec(cfg.codec)
    payload = codec.encode(delta)
    delta_hat = codec.decode(payload)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Encoded:
    tensors: dict[str, Tensor]
    """Exactly what goes on the wire."""
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Codec(Protocol):
    linear: bool

    def encode(self, x: Tensor) -> Encoded: ...

    def decode(self, e: Encoded) -> Tensor: ...


class Identity:
    """fp32 as it is: lossless, linear."""

    linear = True

    def encode(self, x: Tensor) -> Encoded:
        return Encoded({"values": x.float().contiguous()}, tuple(x.shape), torch.float32)

    def decode(self, e: Encoded) -> Tensor:
        return e.tensors["values"].view(e.shape)

    def __repr__(self) -> str:
        return "Identity()"


def build_codec(cfg: Any) -> Codec:
    if cfg.kind == "none":
        return Identity()
    raise ValueError(f"unknown codec kind {cfg.kind!r}")
