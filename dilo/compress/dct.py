"""DCT + top-k (DeMo, Peng et al. 2024; SparseLoCo, Sarfi et al. 2025): the pseudo-gradient cut
into chunks, each chunk's orthonormal DCT-II, and its k largest coefficients sent.

    codec = ErrorFeedback(DCTTopK(fraction=1 / 32, chunk=64, values="int2"))
    e = codec.encode(delta, ctx)   # {"scale"?, "values", "idx": uint8 or int16 [n_chunks, k]}
    delta_hat = codec.decode(e)    # the inverse DCT of the kept coefficients, per chunk

Smooth or correlated structure within a chunk gathers into few coefficients, so top-k in the DCT
domain keeps more of the vector's energy than top-k of its values; the DCT is orthonormal, so the
error is exactly that of the dropped (and rounded) coefficients. Run under error feedback: what
is not sent this round is sent later. Payloads are gathered (indices differ per worker).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dilo.compress.base import Context, Encoded, check_finite, slab_rows
from dilo.compress.lowbit import Int2
from dilo.compress.sparse import _count

_BF16_MAX = torch.finfo(torch.bfloat16).max
_FP32_MAX = torch.finfo(torch.float32).max
_LARGE = 1e36
"""Coefficients above this may sum past fp32's limit in the inverse transform (chunk <= 4096)."""


@functools.lru_cache(maxsize=8)
def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix D (n x n, fp32): coefficients c = D x, x = D^T c."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


_MAX_PASSES = 12
"""Up to this many kept coefficients per chunk of up to _PASS_CHUNK values are found by repeated
row maxima, others by topk (measured on 1 MB slabs: passes take 0.3-0.7x topk's time there,
topk is faster for longer chunks or more coefficients)."""
_PASS_CHUNK = 256


def _largest(mags: Tensor, k: int, out: Tensor, scratch: Tensor) -> None:
    """The column indices of each row's k largest values (any order) into out [rows, k]; mags
    (finite, >= 0) is overwritten, scratch (mags' shape) is a buffer. For a few per row, k
    passes, each finding every row's maximum (amax), its column (the largest index where the row
    equals it: a compare and a multiply by the column numbers, then amax) and taking it out: all
    vectorised, about 4x faster than argmax; torch.topk for more, or longer rows."""
    if k > _MAX_PASSES or mags.shape[1] > _PASS_CHUNK:
        torch.topk(mags, k, dim=1, sorted=False, out=(torch.empty_like(out, dtype=mags.dtype), out))
        return
    columns = torch.arange(mags.shape[1], dtype=mags.dtype, device=mags.device)
    for j in range(k):
        top = mags.amax(dim=1, keepdim=True)
        at = torch.ge(mags, top, out=scratch).mul_(columns).amax(dim=1, keepdim=True).long()
        out[:, j : j + 1] = at
        mags.scatter_(1, at, -1.0)  # below every magnitude: not found again


class DCTTopK:
    """Per chunk of `chunk` values (the last one zero-padded): c = D x, the k = max(1, ceil(fraction
    x chunk)) coefficients of largest magnitude kept.

    values = "bf16": the kept coefficients as bf16, payload {"values": bf16[n_chunks, k], "idx":
    uint8 (chunk <= 256) or int16 [n_chunks, k]}: 3 bytes per kept coefficient.
    values = "int2": the kept coefficients of each chunk quantized like int2 (4 levels, a bf16
    scale per chunk, SparseLoCo's 2-bit values), payload {"scale": bf16[n_chunks], "values":
    uint8[n_chunks, ceil(k / 4)], "idx": ...}: 1.25 bytes per kept coefficient and 2 per chunk.

    Bound: decode is D^T of the sparse coefficients, so ||x - x_hat||_2 = ||c - c_hat||_2 per chunk
    (up to fp32 rounding of the transforms), the dropped coefficients being no larger in
    magnitude than the kept ones. Neither linear nor shardable."""

    linear = False
    shardable = False
    block = 1

    def __init__(self, fraction: float, chunk: int = 64, values: str = "bf16") -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if not 2 <= chunk <= 4096:
            raise ValueError(f"chunk must be in [2, 4096] for the DCT, got {chunk}")
        if values not in ("bf16", "int2"):
            raise ValueError(f"values must be bf16 or int2, got {values!r}")
        self.fraction = fraction
        self.chunk = chunk
        self.values = values
        self.k = _count(fraction, chunk)
        self._int2 = Int2(block=self.k)

    def _chunks(self, x: Tensor) -> Tensor:
        flat = x.detach().reshape(-1).float()
        pad = -flat.numel() % self.chunk
        return (F.pad(flat, (0, pad)) if pad else flat).view(-1, self.chunk)

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        check_finite(x, ctx)
        xc = self._chunks(x)
        n_chunks = xc.shape[0]
        d_t = dct_matrix(self.chunk).to(xc.device).T.contiguous()
        kept = torch.empty(n_chunks, self.k, device=xc.device)
        idx = torch.empty(n_chunks, self.k, dtype=torch.long, device=xc.device)
        # slab by slab: the coefficients and their magnitudes stay in cache, in two buffers
        rows = slab_rows(n_chunks, self.chunk)
        coeffs = torch.empty(rows, self.chunk, device=xc.device)
        mags, scratch = torch.empty_like(coeffs), torch.empty_like(coeffs)
        for lo in range(0, n_chunks, rows):
            hi = min(lo + rows, n_chunks)
            c = torch.mm(xc[lo:hi], d_t, out=coeffs[: hi - lo])
            m = torch.abs(c, out=mags[: hi - lo])
            if not bool(torch.isfinite(m.amax())):
                # chunks near fp32's limit overflowed: in fp64, saturated at bf16's largest value
                c.copy_((xc[lo:hi].double() @ d_t.double()).clamp_(-_BF16_MAX, _BF16_MAX))
                m = torch.abs(c, out=mags[: hi - lo])
            _largest(m, self.k, idx[lo:hi], scratch[: hi - lo])
            torch.gather(c, 1, idx[lo:hi], out=kept[lo:hi])
        small = idx.to(torch.uint8) if self.chunk <= 256 else (idx - 32768).to(torch.int16)
        if self.values == "bf16":
            return Encoded({"values": kept.to(torch.bfloat16), "idx": small}, x.numel())
        q = self._int2.encode(kept, ctx)  # one int2 block per chunk: its scale and 4 values per byte
        return Encoded({"scale": q.tensors["scale"], "values": q.tensors["q"], "idx": small}, x.numel())

    def decode(self, e: Encoded) -> Tensor:
        idx = e.tensors["idx"].long()
        if self.chunk > 256:
            idx = idx + 32768
        n_chunks = idx.shape[0]
        if self.values == "bf16":
            kept = e.tensors["values"].float()
        else:
            q = Encoded({"scale": e.tensors["scale"], "q": e.tensors["values"]}, n_chunks * self.k)
            kept = self._int2.decode(q).view(n_chunks, self.k)
        d = dct_matrix(self.chunk).to(kept.device)
        out = torch.empty(n_chunks, self.chunk, device=kept.device)
        if kept.numel() and float(kept.abs().max()) > _LARGE:  # the sum could overflow fp32: in fp64, saturated
            coeffs = torch.zeros(n_chunks, self.chunk, device=kept.device).scatter_(1, idx, kept)
            out.copy_((coeffs.double() @ d.double()).clamp_(-_FP32_MAX, _FP32_MAX))
            return out.view(-1)[: e.numel]
        # slab by slab: the sparse coefficients are scattered into a buffer in cache, and the
        # output is written once, by the inverse transform
        rows = slab_rows(n_chunks, self.chunk)
        coeffs = torch.empty(rows, self.chunk, device=kept.device)
        for lo in range(0, n_chunks, rows):
            hi = min(lo + rows, n_chunks)
            c = coeffs[: hi - lo].zero_().scatter_(1, idx[lo:hi], kept[lo:hi])
            torch.mm(c, d, out=out[lo:hi])
        return out.view(-1)[: e.numel]

    def __repr__(self) -> str:
        return f"DCTTopK(fraction={self.fraction}, chunk={self.chunk}, values={self.values!r})"
