"""Half-precision casts: fp16 and bf16 on the wire, 2x smaller than fp32.

The simplest codecs (hivemind's `Float16Compression`, OpenDiLoCo's fp16 option). Each value is
rounded to nearest-even in the narrow format; decoding widens back to fp32 exactly.

    codec = Float16()
    e = codec.encode(delta, ctx)      # {"values": fp16[n]}
    delta_hat = codec.decode(e)

Bounds (u = unit roundoff, the format's largest relative rounding error):
- Float16: values are first clamped to +-65504 (the largest fp16), so huge values saturate instead
  of becoming inf. For |x| <= 65504: |x - x_hat| <= 2^-11 |x| + 2^-25 (the absolute term covers
  fp16 subnormals, below 2^-14; anything below 2^-25 decodes to zero).
- BFloat16: fp32's exponent range, 8 significant bits: |x - x_hat| <= 2^-8 |x| + 2^-134; values
  above the largest bf16 (about 3.39e38) saturate to it.

Both are elementwise, so shardable. They are not `linear`: summing rounded payloads in the narrow
format would add a rounding per addition, and dilo always accumulates in fp32 after decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dilo.compress.base import Context, Encoded, check_finite


class _Cast:
    """An elementwise cast to `dtype`, saturating at the format's largest finite value."""

    linear = False
    shardable = True
    block = 1
    dtype: torch.dtype

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        check_finite(x, ctx)
        limit = torch.finfo(self.dtype).max
        # x is finite, so an inf after the cast is an overflow: saturate it. (Fixing the half-size
        # result in place is cheaper than clamping an fp32 copy first.)
        values = x.detach().reshape(-1).to(self.dtype).nan_to_num_(posinf=limit, neginf=-limit)
        return Encoded({"values": values}, x.numel())

    def decode(self, e: Encoded) -> Tensor:
        return e.tensors["values"].reshape(-1).float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Float16(_Cast):
    """IEEE half: 11 significant bits, range +-65504 (clamped)."""

    dtype = torch.float16


class BFloat16(_Cast):
    """bfloat16: 8 significant bits, fp32's range."""

    dtype = torch.bfloat16
