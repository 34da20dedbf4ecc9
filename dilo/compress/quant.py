"""Blockwise quantizers: absmax int8 / int4, and 1-bit sign with a mean-magnitude scale.

BlockQuant is the generic linear absmax scheme (docs/ALGORITHMS.md 5.2); stochastic rounding is 5.3;
Sign is the 1-bit scaled-sign compressor used with error feedback (signSGD / EF-sign, 5.8).

    codec = BlockQuant(bits=8, block=128)
    e = codec.encode(delta, ctx)   # {"scale": bf16[n_blocks], "q": int8[n_padded]}
    delta_hat = codec.decode(e)

Everything is vectorised over blocks: the vector is zero-padded to a multiple of `block` and
viewed as [n_blocks, block]; each step is a tensor op on that view (BlockQuant walks it in slabs
of about 1 MB, see dilo.compress.base.SLAB). Decoding returns exactly numel values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dilo.compress.base import Context, Encoded, check_finite, slab_rows
from dilo.compress.dither import LANE_MEAN, LANE_STEP, Dither

_SHIFTS = torch.arange(8, dtype=torch.uint8)
"""Bit i of sign byte j holds the sign of value 8j + i."""


def _blocks(x: Tensor, block: int) -> Tensor:
    """x as a [n_blocks, block] view, zero-padded at the end (a copy only when padding)."""
    flat = x.detach().reshape(-1).float()
    pad = -flat.numel() % block
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.view(-1, block)


def _bf16_at_least(s: Tensor) -> Tensor:
    """The smallest bf16 >= s, elementwise (s >= 0, fp32 or fp64)."""
    b = s.to(torch.bfloat16)
    low = b.to(s.dtype) < s
    # For non-negative floats the bit pattern is monotonic, so +1 on the bits is the next value up.
    bumped = (b.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(low, bumped, b)


def pack_int4(q: Tensor) -> Tensor:
    """Pack int8 values in [-7, 7] two per byte: element 2i in the low nibble, 2i+1 in the high.

    Each nibble holds q + 8 (1..15). An odd count is padded with a zero value.
    """
    u = (q.reshape(-1).to(torch.int8) + 8).view(torch.uint8)
    if u.numel() % 2:
        u = F.pad(u, (0, 1), value=8)
    pairs = u.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: Tensor, n: int) -> Tensor:
    """The inverse of `pack_int4`: the first n int8 values."""
    b = packed.reshape(-1)
    pairs = torch.stack([b & 15, b >> 4], dim=1).view(-1)[:n]
    return pairs.view(torch.int8) - 8


class BlockQuant:
    """Absmax quantization per block of `block` values to `bits` = 8 or 4 signed integers.

    Per block b: s_b = absmax_b / qmax (qmax = 127 for int8, 7 for int4), stored as bf16 rounded
    UP, so |x| / s_b <= qmax always holds and no value is clipped. A zero block gets s_b = 0 and
    decodes to exact zeros. q = round(x / s_b) (half to even), or with `stochastic`,
    q = floor(x / s_b + u), u uniform on a 2^-16 grid in (0, 1) drawn from ctx.worker_seed() (see
    `dilo.compress.dither`), so each worker draws an independent stream. Decode: x_hat = q * s_b.

    Bounds, with s_b the stored scale (absmax_b / qmax <= s_b <= absmax_b / qmax * (1 + 2^-7)
    while s_b is a normal bf16), up to the fp32 rounding of the product (2^-24 |x_hat|):
    - deterministic: |x - x_hat| <= s_b / 2;
    - stochastic: |x - x_hat| <= s_b, and E[x_hat] = x to within 2^-17 s_b (unbiased).
    Within 1% of the fp32 maximum, q * s_b can exceed it; decode saturates those values, which only
    brings them closer to x.

    int8 payload {"scale": bf16[n_blocks], "q": int8[n_padded]}; int4 packs two values per byte,
    {"scale": bf16[n_blocks], "q": uint8[ceil(n_padded / 2)]} (see `pack_int4`). Payloads of
    different workers have different scales, so they are not linear; blocks are independent, so
    slices aligned to `block` are shardable.
    """

    linear = False
    shardable = True

    def __init__(self, bits: int = 8, block: int = 128, stochastic: bool = False) -> None:
        if bits not in (8, 4):
            raise ValueError(f"BlockQuant supports 8 or 4 bits, got {bits}")
        if block <= 0:
            raise ValueError(f"block must be positive, got {block}")
        self.bits = bits
        self.block = block
        self.stochastic = stochastic
        self.qmax = 2 ** (bits - 1) - 1

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        xb = _blocks(x, self.block)
        n_blocks = xb.shape[0]
        absmax = torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg())
        # NaN and Inf propagate into the block maxima: checking them avoids a pass over x.
        check_finite(absmax)
        # fp64 so that absmax / qmax is not rounded down before rounding up to bf16.
        scale = _bf16_at_least(absmax.double() / self.qmax)
        s = scale.float()
        s = torch.where(s > 0, s, 1.0)[:, None]
        dither = Dither(ctx.worker_seed(), xb.device) if self.stochastic else None
        q = torch.empty(xb.shape, dtype=torch.int8, device=xb.device)
        rows = slab_rows(n_blocks, self.block)
        y = torch.empty(min(rows, n_blocks), self.block, device=xb.device)
        # Slab by slab, so the fp32 temporaries stay in cache (see SLAB).
        for lo in range(0, n_blocks, rows):
            hi = min(lo + rows, n_blocks)
            ys = torch.div(xb[lo:hi], s[lo:hi], out=y[: hi - lo])
            if dither is not None:  # x / s + u
                ys.add_(dither.lanes(ys.numel()).view(ys.shape), alpha=LANE_STEP).add_(LANE_MEAN).floor_()
                # x/s + u may round up to qmax + 1 in fp32 when x/s == qmax and u is close to 1.
                ys.clamp_(-self.qmax, self.qmax)
            else:
                # No clamp needed: |x| <= qmax * s exactly, and correctly rounded division is
                # monotonic, so fl(x / s) never exceeds qmax.
                ys.round_()
            q[lo:hi].copy_(ys)
        packed = q.view(-1) if self.bits == 8 else pack_int4(q)
        return Encoded({"scale": scale, "q": packed}, x.numel())

    def decode(self, e: Encoded) -> Tensor:
        scale = e.tensors["scale"].float()
        n_padded = scale.numel() * self.block
        q = e.tensors["q"]
        if self.bits == 4:
            q = unpack_int4(q, n_padded)
        # Widen, then scale in place: faster than the mixed-dtype torch.mul (one fewer temporary).
        out = q.view(-1, self.block).float().mul_(scale[:, None]).view(-1)[: e.numel]
        limit = torch.finfo(torch.float32).max
        if out.numel() and float(scale.max()) * self.qmax > limit:
            # Within 1% of fp32's limit the rounded-up scale can overflow: x_hat = +-max is closer.
            out.clamp_(-limit, limit)
        return out

    def __repr__(self) -> str:
        return f"BlockQuant(bits={self.bits}, block={self.block}, stochastic={self.stochastic})"


class Sign:
    """1 bit per value (its sign; zero counts as +) and one bf16 scale per block.

    Per block b: scale_b = mean |x| over the block's real values (the padding of the last block
    does not count), x_hat = sign(x) * scale_b. mean |x| is the least-squares scale for a sign
    vector, so per block ||x_b - x_hat_b||_2 <= ||x_b||_2 (rounding the scale to bf16 keeps this:
    the excess error is quadratic in the rounding), and every x_hat has magnitude scale_b.

    Payload {"scale": bf16[n_blocks], "bits": uint8[ceil(n_padded / 8)]}, bit set for negative
    values, 8 values per byte, least significant bit first. Aggregation is gather-based (the
    algebra of 5.8 needs each worker's signs), so neither linear nor shardable. Use with error
    feedback: without it the bias is large.
    """

    linear = False
    shardable = False

    def __init__(self, block: int = 128) -> None:
        if block <= 0:
            raise ValueError(f"block must be positive, got {block}")
        self.block = block

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        n = x.numel()
        xb = _blocks(x, self.block)
        sums = torch.linalg.vector_norm(xb, 1, dim=1)
        over = ~torch.isfinite(sums)
        if bool(over.any()):
            # NaN/Inf in x, or a block near the fp32 limit whose sum overflowed: redo it in fp64.
            check_finite(xb[over])
            sums = sums.double()
            sums[over] = xb[over].double().abs().sum(dim=1)
        counts = torch.full_like(sums, float(self.block))
        counts[-1] = n - (xb.shape[0] - 1) * self.block
        limit = torch.finfo(torch.bfloat16).max
        scale = (sums / counts).clamp_(max=limit).to(torch.bfloat16)
        neg = (xb < 0).view(-1).view(torch.uint8)
        pad = -neg.numel() % 8
        if pad:
            neg = F.pad(neg, (0, pad))
        bits = (neg.view(-1, 8) << _SHIFTS.to(neg.device)).sum(dim=1, dtype=torch.uint8)
        return Encoded({"scale": scale, "bits": bits}, n)

    def decode(self, e: Encoded) -> Tensor:
        scale = e.tensors["scale"].float()
        bits = e.tensors["bits"]
        neg = ((bits[:, None] >> _SHIFTS.to(bits.device)) & 1).view(-1)[: scale.numel() * self.block]
        # 1 - 2 * bit is +1 for a clear bit and -1 for a set one; in place on one fp32 buffer.
        out = neg.view(-1, self.block).float().mul_(-2.0).add_(1.0).mul_(scale[:, None])
        return out.view(-1)[: e.numel]

    def __repr__(self) -> str:
        return f"Sign(block={self.block})"
