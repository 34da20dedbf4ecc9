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

from dilo.compress.base import Context, Encoded, check_finite, slab_rows, slabs
from dilo.compress.dither import LANE_MEAN, LANE_STEP, Dither
from dilo.compress.quant import _bf16_at_least, _blocks

_INT2_LEVELS = torch.tensor([[((b >> (2 * j)) & 3) - 1.5 for j in range(4)] for b in range(256)])
"""Every int2 byte's four levels, (q + 2) - 1.5 = q + 1/2: decode is one table lookup."""
_TRITS = torch.tensor([[(b // 3**j) % 3 - 1.0 for j in range(5)] for b in range(256)])
"""Every ternary byte's five values in {-1, 0, +1} (bytes past 242 are never written)."""


class _Packer:
    """Codes of [rows, block] (fp32 integers below `radix`) into bytes: `per_byte` codes to a byte,
    code j of a byte times radix^j, each row zero-padded to whole bytes. The codes are written
    into `codes(k)`, a view of a buffer whose padding columns stay zero; `pack_into` forms each
    byte's sum as one matrix-vector product (exact: integers below 256) and casts it to uint8,
    one pass over contiguous memory where per-digit shifts and adds would stride over it."""

    def __init__(self, block: int, per_byte: int, radix: int, rows: int, device: torch.device) -> None:
        self.block, self.per_byte = block, per_byte
        self.nbytes = -(-block // per_byte)
        self._buf = torch.zeros(rows, self.nbytes * per_byte, device=device)
        self._weights = torch.tensor([float(radix**j) for j in range(per_byte)], device=device)

    def codes(self, k: int) -> Tensor:
        return self._buf[:k, : self.block]

    def pack_into(self, out: Tensor) -> None:
        k = out.shape[0]
        out.copy_(torch.matmul(self._buf[:k].view(k, self.nbytes, self.per_byte), self._weights))


def _unpack(packed: Tensor, table: Tensor, block: int, scale: Tensor) -> Tensor:
    """[n_blocks, bytes] through a per-byte table of values, times each block's scale:
    [n_blocks, block] fp32, contiguous. Slab by slab: the looked-up values stay in cache and the
    output is written once."""
    table = table.to(packed.device)
    out = torch.empty(packed.shape[0], block, device=packed.device)
    for lo, hi in slabs(packed.shape[0], block):
        # an embedding lookup with int32 indices: about twice as fast as indexing, or as shifting bits out
        values = F.embedding(packed[lo:hi].int(), table)  # [rows, bytes, per_byte]
        torch.mul(values.flatten(1)[:, :block], scale[lo:hi, None], out=out[lo:hi])
    return out


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
    ctx.worker_seed() (`dilo.compress.dither`), between the two levels around x: |x - x_hat| <= s_b and E[x_hat] = x to
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
        dither = Dither(ctx.worker_seed(), xb.device) if self.stochastic else None
        packer = _Packer(self.block, 4, 4, slab_rows(xb.shape[0], self.block), xb.device)
        packed = torch.empty(xb.shape[0], packer.nbytes, dtype=torch.uint8, device=xb.device)
        for lo, hi in slabs(xb.shape[0], self.block):
            y = torch.div(xb[lo:hi], s[lo:hi], out=packer.codes(hi - lo))
            if dither is not None:  # x / s - 1/2 + u
                y.add_(dither.lanes(y.numel()).view(y.shape), alpha=LANE_STEP).add_(LANE_MEAN - 0.5)
            y.floor_().clamp_(-2, 1).add_(2)
            packer.pack_into(packed[lo:hi])
        return Encoded({"scale": scale, "q": packed}, n)

    def decode(self, e: Encoded) -> Tensor:
        scale = e.tensors["scale"].float()
        out = _unpack(e.tensors["q"], _INT2_LEVELS, self.block, scale).view(-1)[: e.numel]
        limit = torch.finfo(torch.float32).max
        if out.numel() and float(scale.max()) * 1.5 > limit:
            out.clamp_(-limit, limit)  # near fp32's limit the rounded-up scale overflows: +-max is closer
        return out

    def __repr__(self) -> str:
        return f"Int2(block={self.block}, stochastic={self.stochastic})"


class Ternary:
    """TernGrad (Wen et al., NeurIPS 2017): x_hat = s_b sign(x) b, b ~ Bernoulli(|x| / s_b).

    Per block: s_b = max |x| (bf16, rounded up), or with clip > 0 the smaller clip x the block's
    RMS (TernGrad's gradient clipping, c = 2.5: a few outliers would otherwise make s_b large and
    almost every b zero), and values are clipped to +-s_b. The draw is stochastic rounding of
    y = x_clipped / s_b in [-1, 1] to {-1, 0, +1}: floor(y + u), u uniform on a 2^-16 grid from
    ctx.worker_seed() (see `dilo.compress.dither`), which is +-1 with probability |y| and keeps
    y's sign: unbiased for the clipped values to within 2^-17 s_b, E[x_hat] = x_clipped, with
    |x_clipped - x_hat| <= s_b; the clipped excess is left to error feedback. Independent
    streams per worker.

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
        dither = Dither(ctx.worker_seed(), xb.device)
        packer = _Packer(self.block, 5, 3, slab_rows(xb.shape[0], self.block), xb.device)
        packed = torch.empty(xb.shape[0], packer.nbytes, dtype=torch.uint8, device=xb.device)
        for lo, hi in slabs(xb.shape[0], self.block):
            y = torch.div(xb[lo:hi], s[lo:hi], out=packer.codes(hi - lo)).clamp_(-1, 1)  # clipped at +-s_b
            # t = floor(y + u) + 1: -1, 0 or +1 with E = y, moved to the codes 0, 1, 2
            y.add_(dither.lanes(y.numel()).view(y.shape), alpha=LANE_STEP).add_(LANE_MEAN + 1)
            y.floor_().clamp_(0, 2)
            packer.pack_into(packed[lo:hi])
        return Encoded({"scale": scale, "t": packed}, n)

    def decode(self, e: Encoded) -> Tensor:
        scale = e.tensors["scale"].float()
        return _unpack(e.tensors["t"], _TRITS, self.block, scale).view(-1)[: e.numel]

    def __repr__(self) -> str:
        return f"Ternary(block={self.block}, clip={self.clip})"
