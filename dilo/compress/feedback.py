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


def _private(t: Tensor, e: Encoded, sent: Tensor) -> bool:
    """t shares memory with neither the payload's tensors nor the decoded vector."""
    ptr = t.untyped_storage().data_ptr()
    return all(o.untyped_storage().data_ptr() != ptr for o in (*e.tensors.values(), sent))


class ErrorFeedback:
    """Wraps a codec with a residual per part; the flags are the wrapped codec's.

    momentum > 0: Deep Gradient Compression's momentum correction (Lin et al., ICLR 2018) for
    sparsifiers: a velocity u <- m u + x per part is what accumulates into the residual
    (y = r + u), and where a value was sent both its residual and its velocity are cleared
    (momentum factor masking), so a coordinate's momentum does not keep pushing after it went
    out. Nothing is lost either way: the sum of the payloads plus r equals the sum of the u."""

    def __init__(self, codec: Codec, momentum: float = 0.0) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.codec = codec
        self.momentum = momentum
        self.linear = codec.linear
        self.shardable = codec.shardable
        self.block = codec.block
        self.residuals: dict[int, Tensor] = {}
        self.velocities: dict[int, Tensor] = {}
        """momentum > 0: the velocity per part."""

    def encode(self, x: Tensor, ctx: Context) -> Encoded:
        # Checked before touching the residual, so a refused round leaves it as it was.
        check_finite(x, ctx)
        flat = x.detach().reshape(-1).float()
        r = self.residuals.get(ctx.part)
        if r is not None and r.numel() != flat.numel():
            raise ValueError(f"part {ctx.part} has {flat.numel()} values but its residual has {r.numel()}")
        if self.momentum > 0:
            u = self.velocities.get(ctx.part)
            flat = torch.add(flat, u, alpha=self.momentum) if u is not None else flat
        y = flat + r if r is not None else flat
        e = self.codec.encode(y, ctx)
        sent = self.codec.decode(e)
        # In place where the tensor is this encode's own and nothing sent aliases it (the fp32
        # Identity's payload is y itself, and its decode returns the payload); the caller's x,
        # the last residual and velocity (kept by `memory` for a rollback) are never written.
        if r is not None and _private(y, e, sent):
            self.residuals[ctx.part] = y.sub_(sent)
        else:
            self.residuals[ctx.part] = y - sent
        if self.momentum > 0:  # momentum factor masking: where a value went out its velocity stops
            own = u is not None and _private(flat, e, sent)  # (after the residual: y may be flat)
            self.velocities[ctx.part] = (flat if own else flat.clone()).masked_fill_(sent != 0, 0.0)
        return e

    def decode(self, e: Encoded) -> Tensor:
        return self.codec.decode(e)

    def reset(self) -> None:
        """Forget every residual and velocity (on join, or after the layout changed)."""
        self.residuals.clear()
        self.velocities.clear()

    def memory(self) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
        """The residuals and velocities as they are (references: encode replaces them, never updates
        them in place), for `restore` after a failed round."""
        return dict(self.residuals), dict(self.velocities)

    def restore(self, memory: tuple[dict[int, Tensor], dict[int, Tensor]]) -> None:
        self.residuals, self.velocities = dict(memory[0]), dict(memory[1])

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"part{p}": r.clone() for p, r in sorted(self.residuals.items())}
        state.update({f"velocity{p}": u.clone() for p, u in sorted(self.velocities.items())})
        return state

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        if any(not (k.startswith("part") or k.startswith("velocity")) for k in d):
            raise ValueError(f"error-feedback state keys must look like 'part<N>' or 'velocity<N>', got {sorted(d)}")

        def flat(v: Tensor) -> Tensor:
            return v.detach().reshape(-1).to(torch.float32).clone()

        self.residuals = {int(k[4:]): flat(v) for k, v in d.items() if k.startswith("part")}
        self.velocities = {int(k[8:]): flat(v) for k, v in d.items() if k.startswith("velocity")}

    def __repr__(self) -> str:
        extra = f", momentum={self.momentum}" if self.momentum else ""
        return f"ErrorFeedback({self.codec!r}{extra})"
