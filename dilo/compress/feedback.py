"""Error feedback: keep what a lossy codec did not send and add it to the next round's input.

The generic EF scheme (Seide et al. 2014, "1-bit SGD"; Karimireddy et al. 2019, "Error Feedback
Fixes SignSGD"; docs/ALGORITHMS.md 5.4). Per slice of the pseudo-gradient (ctx.part):

    y = x + r;  e = codec.encode(y);  r = y - codec.decode(e);  send e

So over any number of rounds, sum(decoded payloads) + r == sum(inputs) (up to fp32 rounding):
nothing is lost, only delayed. Usage:

    codec = ErrorFeedback(TopK(0.01))
    e = codec.encode(delta, Context(seed, round, rank, part))

The residual is fp32, as large as the slice, per worker; checkpoint it with `state_dict`, and
`reset` it when a worker (re)joins: a departed worker's residual is lost (a bias we accept).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dilo.compress.base import Codec, Context, Encoded, check_finite


class ErrorFeedback:
    """Wraps a codec with a residual per part; the flags are the wrapped codec's."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.linear = codec.linear
        self.shardable = codec.shardable
        self.block = codec.block
        self.residuals: dict[int, Tensor] = {}

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        # Checked before touching the residual, so a refused round leaves it as it was.
        check_finite(x, ctx)
        flat = x.detach().reshape(-1).float()
        r = self.residuals.get(ctx.part)
        if r is not None and r.numel() != flat.numel():
            raise ValueError(f"part {ctx.part} has {flat.numel()} values but its residual has {r.numel()}")
        y = flat + r if r is not None else flat
        e = self.codec.encode(y, ctx)
        # Not in place: a decode may alias the payload, which may alias y (fp32 Identity).
        self.residuals[ctx.part] = y - self.codec.decode(e)
        return e

    def decode(self, e: Encoded) -> Tensor:
        return self.codec.decode(e)

    def reset(self) -> None:
        """Forget every residual (on join, or after the layout changed)."""
        self.residuals.clear()

    def state_dict(self) -> dict[str, Tensor]:
        return {f"part{p}": r.clone() for p, r in sorted(self.residuals.items())}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        if any(not k.startswith("part") for k in d):
            raise ValueError(f"error-feedback state keys must look like 'part<N>', got {sorted(d)}")
        self.residuals = {int(k[4:]): v.detach().reshape(-1).to(torch.float32).clone() for k, v in d.items()}

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.codec!r})"
