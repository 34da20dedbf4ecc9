"""Below 4 bits per value: 2-bit blockwise quantization and TernGrad's ternary codec.

    codec = Int2(block=128)            # 4 levels per block, 2 bits per value
    codec = Ternary(block=128, clip=2.5)   # {-1, 0, +1} x scale, 5 values per byte (1.6 bits)

Both quantize per block of `block` values with one bf16 scale, pack each block into whole bytes
of its own (so slices aligned to blocks are shardable, like BlockQuant's) and decode exactly
numel values. Payloads of different workers have different scales: not linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dilo.compress.base import Context, Encoded, check_finite
from dilo.compress.quant import _bf16_at_least, _blocks

_INT2_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)


def _grouped(t: Tensor, per_byte: int) -> Tensor:
    """[n_blocks, block] small codes as [n_blocks, bytes per block, per_byte], zero-padded per block."""
    pad = -t.shape[1] % per_byte
    if pad:
        t = F.pad(t, (0, pad))
    return t.view(t.shape[0], t.shape[1] // per_byte, per_byte)


def _rms(xb: Tensor, n: int) -> Tensor:
    """Each block's root mean square (fp64), over its real values: the padding of the last block
    does not count."""
    counts = torch.full((xb.shape[0],), float(xb.shape[1]), dtype=torch.float64, device=xb.device)
    if n:
        counts[-1] = n - (xb.shape[0] - 1) * xb.shape[1]
    return (xb.double().square().sum(dim=1) / counts).sqrt()


class Int2:
    """2 bits per value, 4 levels per block: x_hat = (q + 1/2) s_b with q in {-2, -1, 0, 1}.

    s_b = min(absmax_b / 1.5, RMS_b) (bf16, rounded up): a step of about one RMS is the uniform 4-level
    quantizer of least squared error for bell-shaped values (absmax / 1.5 alone would make it about
    twice as coarse on a block of 128 Gaussians: 0.54 relative error instead of 0.35), and never
    puts the outer level beyond the block's largest value. Values beyond +-2 s_b are clipped to the
    outer levels +-1.5 s_b (error feedback, on by default, keeps the rest); a zero block has s_b =
    0 and decodes to zeros. Deterministic: q = floor(x / s_b) clamped to [-2, 1], the level at the
    middle of the value's interval, |x - x_hat| <= s_b / 2 where |x| <= 2 s_b. Stochastic
    (stochastic = True): q = floor(x / s_b - 1/2 + u), u ~ U[0, 1) from ctx.worker_seed(), between
    the two levels around x: |x - x_hat| <= s_b and E[x_hat] = x where |x| <= 1.5 s_b. Zero is not
    a level: small values cost up to s_b / 2.

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
        y = xb / torch.where(s > 0, s, 1.0)[:, None]
        if self.stochastic:
            gen = torch.Generator(xb.device).manual_seed(ctx.worker_seed())
            y.sub_(0.5).add_(torch.rand(y.shape, generator=gen, device=y.device))
        q = y.floor_().clamp_(-2, 1).add_(2).to(torch.uint8)
        packed = (_grouped(q, 4) << _INT2_SHIFTS.to(q.device)).sum(dim=2, dtype=torch.uint8)
        return Encoded({"scale": scale, "q": packed}, n)

    def decode(self, e: Encoded) -> Tensor:
        scale = e.tensors["scale"].float()
        packed = e.tensors["q"]
        codes = (packed[:, :, None] >> _INT2_SHIFTS.to(packed.device)) & 3
        q = codes.flatten(1)[:, : self.block]
        out = q.float().sub_(1.5).mul_(scale[:, None]).view(-1)[: e.numel]
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
    zero); s_b = max |x_clipped| (bf16, rounded up). The draw is unbiased for the clipped values,
    E[x_hat] = x_clipped, with |x_clipped - x_hat| <= s_b; the clipped excess is left to error
    feedback. Random streams from ctx.worker_seed(), independent per worker.

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
        check_finite(torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg()))
        if self.clip > 0:
            bound = (_rms(xb, n) * self.clip).float()[:, None]
            xb = torch.maximum(torch.minimum(xb, bound), bound.neg())
        # rounded up, but not past bf16's largest value (values within 0.4% of fp32's limit saturate)
        scale = _bf16_at_least(xb.abs().amax(dim=1).double()).clamp_(max=torch.finfo(torch.bfloat16).max)
        s = scale.float()
        p = xb.abs() / torch.where(s > 0, s, 1.0)[:, None]
        gen = torch.Generator(xb.device).manual_seed(ctx.worker_seed())
        keep = torch.rand(p.shape, generator=gen, device=p.device) < p
        t = (torch.sign(xb) * keep + 1).to(torch.uint8)
        packed = (_grouped(t, 5) * _POW3.to(t.device)).sum(dim=2, dtype=torch.uint8)
        return Encoded({"scale": scale, "t": packed}, n)

    def decode(self, e: Encoded) -> Tensor:
        scale = e.tensors["scale"].float()
        packed = e.tensors["t"]
        digits = torch.div(packed[:, :, None], _POW3.to(packed.device), rounding_mode="floor") % 3
        t = digits.flatten(1)[:, : self.block]
        return t.float().sub_(1.0).mul_(scale[:, None]).view(-1)[: e.numel]

    def __repr__(self) -> str:
        return f"Ternary(block={self.block}, clip={self.clip})"
