"""Codecs for pseudo-gradients on the wire. Imports only torch.

`build_codec(cfg.codec)` turns a codec spec (dilo.config.CodecSpec, read through the `CodecSpecLike`
protocol) into a codec;
see base.py for the seam and the meaning of the `linear` / `shardable` flags.
"""

from __future__ import annotations

from typing import Protocol

from dilo.compress.base import Codec, Context, Encoded, Identity, check_finite, pack, unpack
from dilo.compress.cast import BFloat16, Float16
from dilo.compress.dct import DCTTopK
from dilo.compress.feedback import ErrorFeedback
from dilo.compress.lowbit import Int2, Ternary
from dilo.compress.lowrank import PowerSGD
from dilo.compress.quant import BlockQuant, Sign, pack_int4, unpack_int4
from dilo.compress.sparse import RandomK, TopK


class CodecSpecLike(Protocol):
    """The fields of a codec spec that `build_codec` reads (dilo.config.CodecSpec has them all;
    read-only, so frozen pydantic models and plain namespaces both fit)."""

    @property
    def kind(self) -> str: ...
    @property
    def block(self) -> int: ...
    @property
    def stochastic(self) -> bool: ...
    @property
    def clip(self) -> float: ...
    @property
    def fraction(self) -> float: ...
    @property
    def chunk(self) -> int: ...
    @property
    def values(self) -> str: ...
    @property
    def momentum(self) -> float: ...
    @property
    def warmup_rounds(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def min_compression(self) -> float: ...
    @property
    def warm_start(self) -> bool: ...
    @property
    def feedback(self) -> bool: ...


def build_codec(spec: CodecSpecLike) -> Codec | PowerSGD:
    """The codec a spec asks for: reads kind, block, stochastic, clip, fraction, chunk, values,
    momentum, warmup_rounds, rank, min_compression, warm_start and the `feedback` property.

    Lossy flat codecs are wrapped in ErrorFeedback when spec.feedback is true. Two exceptions:
    "none" is always a bare Identity (lossless, its residual would stay zero), and "powersgd"
    returns a bare PowerSGD, never wrapped: its residual is M - M_hat after the two all-reduces,
    so the caller keeps it, reading spec.feedback itself.
    """
    kind = spec.kind
    codec: Codec
    if kind == "none":
        return Identity()
    if kind == "powersgd":
        return PowerSGD(rank=spec.rank, min_compression=spec.min_compression, warm_start=spec.warm_start)
    if kind == "fp16":
        codec = Float16()
    elif kind == "bf16":
        codec = BFloat16()
    elif kind in ("int8", "int4"):
        codec = BlockQuant(bits=8 if kind == "int8" else 4, block=spec.block, stochastic=spec.stochastic)
    elif kind == "int2":
        codec = Int2(block=spec.block, stochastic=spec.stochastic)
    elif kind == "ternary":
        codec = Ternary(block=spec.block, clip=spec.clip)
    elif kind == "sign":
        codec = Sign(block=spec.block)
    elif kind == "topk":
        codec = TopK(fraction=spec.fraction, chunk=spec.chunk, warmup_rounds=spec.warmup_rounds)
    elif kind == "dct":
        codec = DCTTopK(fraction=spec.fraction, chunk=spec.chunk or 64, values=spec.values)
    elif kind == "randomk":
        codec = RandomK(fraction=spec.fraction)
    else:
        raise ValueError(f"unknown codec kind {kind!r}")
    return ErrorFeedback(codec, momentum=spec.momentum) if spec.feedback else codec


__all__ = [
    "BFloat16",
    "BlockQuant",
    "Codec",
    "DCTTopK",
    "CodecSpecLike",
    "Context",
    "Encoded",
    "ErrorFeedback",
    "Float16",
    "Identity",
    "Int2",
    "PowerSGD",
    "RandomK",
    "Sign",
    "Ternary",
    "TopK",
    "build_codec",
    "check_finite",
    "pack",
    "pack_int4",
    "unpack",
    "unpack_int4",
]
