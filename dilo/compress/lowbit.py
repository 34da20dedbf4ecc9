"""Below 4 bits per value: 2-bit blockwise quantization and TernGrad's ternary codec.

    codec = Int2(block=128)            # 4 levels per block, 2 bits per value
    codec = Ternary(block=128, clip=2.5)   # {-1, 0, +1} x scale, 5 values per byte (1.6 bits)

Both quantize per block of `block` values with one bf16 scale, pack each block into whole bytes
of its own (so slices aligned to blocks are shardable, like BlockQuant's) and decode exactly
numel values. Payloads of different workers have different scales: not linear.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from dilo.compress.base import Context, Encoded, check_finite
from dilo.compress.quant import _bf16_at_least, _blocks

_SLAB = 1 << 18
"""Values quantized per step (about 1 MB of fp32): the temporaries stay in cache (as BlockQuant's)."""

_INT2_LEVELS = torch.tensor([[((b >> (2 * j)) & 3) - 1.5 for j in range(4)] for b in range(256)])
"""Every int2 byte's four levels, (q + 2) - 1.5 = q + 1/2: decode is one table lookup."""
_TRITS = torch.tensor([[(b // 3**j) % 3 - 1.0 for j in range(5)] for b in range(256)])
"""Every ternary byte's five values in {-1, 0, +1} (bytes past 242 are never written)."""


def _slabs(n_blocks: int, block: int) -> Iterator[tuple[int, int]]:
    """(first, end) block ranges of about _SLAB values: the fp32 temporaries of each stay in cache."""
    rows = max(1, _SLAB // block)
    for lo in range(0, n_blocks, rows):
        yield lo, min(lo + rows, n_blocks)


def _pack(q: Tensor, per_byte: int, radix: int) -> Tensor:
    """[rows, block] codes (uint8, < radix) packed per row, `per_byte` to a byte, value j of a byte
    times radix^j; each row zero-padded to whole bytes."""
    pad = -q.shape[1] % per_byte
    if pad:
        q = F.pad(q, (0, pad))
    v = q.view(q.shape[0], -1, per_byte)
    out = v[:, :, 0].clone()
    for j in range(1, per_byte):
        out += v[:, :, j] * radix**j  # uint8: the digits never carry past 255
    return out


def _unpack(packed: Tensor, table: Tensor, block: int) -> Tensor:
    """[n_blocks, bytes] through a per-byte table of values: [n_blocks, block] fp32."""
    # an embedding lookup with int32 indices: about twice as fast as indexing, or as shifting bits out
    values = F.embedding(packed.int(), table.to(packed.device))  # [n_blocks, bytes, per_byte]
    return values.flatten(1)[:, :block]


def _uniform16(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) draws on a 2^-16 grid plus half a step (so the mean is exactly 1/2), three per
    64-bit random word (its low 48 bits: random_ on int64 draws from [0, 2^63)): the CPU generator's
    cost per word, not per value, is what limits a stochastic codec. An event of probability p then
    has probability p to within 2^-17."""
    n = 1
    for d in shape:
        n *= d
    words = torch.empty((n + 2) // 3, dtype=torch.int64, device=device).random_(generator=gen)
    lanes = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:n].to(torch.int32).add_(32768)  # 0 .. 65535
    return lanes.float().add_(0.5).mul_(2.0**-16).view(shape)


def _rms(xb: Tensor, n: int) -> Tensor:
    """Each block's root mean square (fp64), over its real values: the padding of the last block
    does not count. fp32 norms, redone in fp64 for blocks whose squares overflow."""
    counts = torch.full((xb.shape[0],), float(xb.shape[1]), dtype=torch.float64, device=xb.device)
    if n:
        counts[-1] = n - (xb.shape[0] - 1) * xb.shape[1]
    norms = torch.linalg.vector_norm(xb, dim=1).double()
    big = ~torch.isfinite(norms) | (norms > 1e30)
    if bool(big.any()):
        norms[big] = xb[big].double().square().sum(dim=1).sqrt()
    tiny = norms < 1e-30  # fp32 squares of subnormal values underflow: fp64 for those blocks too
    if bool(tiny.any()):
        norms[tiny] = xb[tiny].double().square().sum(dim=1).sqrt()
    rms: Tensor = norms / counts.sqrt()
    return rms


class Int2:
    """2 bits per value, 4 levels per block: x_hat = (q + 1/2) s_b with q in {-2, -1, 0, 1}.

    s_b = min(absmax_b / 1.5, RMS_b) (bf16, rounded up): a step of about one RMS is the uniform 4-level
    quantizer of least squared error for bell-shaped values (absmax / 1.5 alone would make it about
    twice as coarse on a block of 128 Gaussians: 0.54 relative error instead of 0.35), and never
    puts the outer level beyond the block's largest value. Values beyond +-2 s_b are clipped to the
    outer levels +-1.5 s_b (error feedback, on by default, keeps the rest); a zero block has s_b =
    0 and decodes to zeros. Deterministic: q = floor(x / s_b) clamped to [-2, 1], the level at the
    middle of the value's interval, |x - x_hat| <= s_b / 2 where |x| <= 2 s_b. Stochastic
    (stochastic = True): q = floor(x / s_b - 1/2 + u), u uniform on a 2^-16 grid from
    ctx.worker_seed(), between the two levels around x: |x - x_hat| <= s_b and E[x_hat] = x to
    within 2^-17 s_b where |x| <= 1.5 s_b. Zero is not a level: small values cost up to s_b / 2.

    Payload {"scale": bf16[n_blocks], "q": uint8[n_blocks, ceil(block / 4)]}, value 4i + j of a
    block in bits 2j..2j+1 of its byte i, as q + 2."""

    linear = False
    shardable = True

    def __init__(self, block: int = 128, stochastic: bool = False) -> None:
        if block <= 0:
            raise ValueError(f"block must be positive, got {block}")
        self.block = block
        self.stochastic = stochastic

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        n = x.numel()
        xb = _blocks(x, self.block)
        absmax = torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg())
        check_finite(absmax)  # NaN and Inf reach the block maxima
        scale = _bf16_at_least(torch.minimum(absmax.double() / 1.5, _rms(xb, n)))
        s = scale.float()
        s = torch.where(s > 0, s, 1.0)[:, None]
        gen = torch.Generator(xb.device).manual_seed(ctx.worker_seed()) if self.stochastic else None
        packed = torch.empty(xb.shape[0], -(-self.block // 4), dtype=torch.uint8, device=xb.device)
        for lo, hi in _slabs(xb.shape[0], self.block):
            y = xb[lo:hi] / s[lo:hi]
            if gen is not None:
                y.sub_(0.5).add_(_uniform16(tuple(y.shape), gen, y.device))
            q = y.floor_().clamp_(-2, 1).add_(2).to(torch.uint8)
            packed[lo:hi] = _pack(q, 4, 4)
        return Encoded({"scale": scale, "q": packed}, n)

    def decode(self, e: Encoded) -> Tensor:
        scale = e.tensors["scale"].float()
        out = _unpack(e.tensors["q"], _INT2_LEVELS, self.block).mul_(scale[:, None]).reshape(-1)[: e.numel]
        limit = torch.finfo(torch.float32).max
        if out.numel() and float(scale.max()) * 1.5 > limit:
            out.clamp_(-limit, limit)  # near fp32's limit the rounded-up scale overflows: +-max is closer
        return out

    def __repr__(self) -> str:
        return f"Int2(block={self.block}, stochastic={self.stochastic})"


class Ternary:
    """TernGrad (Wen et al., NeurIPS 2017): x_hat = s_b sign(x) b, b ~ Bernoulli(|x| / s_b).

    Per block: with clip > 0, values are first clipped to +-clip x the block's RMS (TernGrad's
    gradient clipping, c = 2.5: a few outliers would otherwise make s_b large and almost every b
    zero); s_b = max |x_clipped| (bf16, rounded up). The draw is unbiased for the clipped values
    (to within 2^-17 s_b: 16-bit uniform draws), E[x_hat] = x_clipped, with |x_clipped - x_hat| <=
    s_b; the clipped excess is left to error feedback. Random streams from ctx.worker_seed(),
    independent per worker.

    Payload {"scale": bf16[n_blocks], "t": uint8[n_blocks, ceil(block / 5)]}: five values per byte
    in base 3 (t = sign b + 1, value 5i + j of a block times 3^j in its byte i): 1.6 bits per value."""

    linear = False
    shardable = True
    stochastic = True
    """Always: a slice encoded on its own draws another stream (the same grid, at most a step apart)."""

    def __init__(self, block: int = 128, clip: float = 2.5) -> None:
        if block <= 0:
            raise ValueError(f"block must be positive, got {block}")
        if not clip >= 0:
            raise ValueError(f"clip must be >= 0, got {clip}")
        self.block = block
        self.clip = clip

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        n = x.numel()
        xb = _blocks(x, self.block)
        absmax = torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg())
        check_finite(absmax)
        bound = (_rms(xb, n) * self.clip).float() if self.clip > 0 else None
        top = torch.minimum(absmax, bound) if bound is not None else absmax  # the clipped block's largest value
        # rounded up, but not past bf16's largest value (values within 0.4% of fp32's limit saturate)
        scale = _bf16_at_least(top.double()).clamp_(max=torch.finfo(torch.bfloat16).max)
        s = scale.float()
        s = torch.where(s > 0, s, 1.0)[:, None]
        gen = torch.Generator(xb.device).manual_seed(ctx.worker_seed())
        packed = torch.empty(xb.shape[0], -(-self.block // 5), dtype=torch.uint8, device=xb.device)
        for lo, hi in _slabs(xb.shape[0], self.block):
            xs = xb[lo:hi]
            if bound is not None:
                b = bound[lo:hi, None]
                xs = torch.maximum(torch.minimum(xs, b), b.neg())
            keep = _uniform16(tuple(xs.shape), gen, xs.device) < xs.abs() / s[lo:hi]
            t = (torch.sign(xs) * keep).add_(1).to(torch.uint8)
            packed[lo:hi] = _pack(t, 5, 3)
        return Encoded({"scale": scale, "t": packed}, n)

    def decode(self, e: Encoded) -> Tensor:
        scale = e.tensors["scale"].float()
        return _unpack(e.tensors["t"], _TRITS, self.block).mul_(scale[:, None]).reshape(-1)[: e.numel]

    def __repr__(self) -> str:
        return f"Ternary(block={self.block}, clip={self.clip})"
