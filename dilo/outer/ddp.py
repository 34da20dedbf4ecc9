"""Data-parallel baseline: average gradients over all workers after every backward pass.

This is the reference dilo is measured against: it communicates every step, so its bytes are
`steps * 2(W-1)/W * 4 * num_params` per worker. It has no outer optimizer; the inner
optimizer steps on the averaged gradient, so all workers stay identical.

    ddp = DDP(model, transport, log_every=50)
    loss.backward(); ddp.reduce_grads(model); optimizer.step()
    if ddp.due(step): report = ddp.sync(model, tail=...)   # logging boundary only
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from dilo.errors import TransportError
from dilo.outer.base import (
    TAIL_COUNT,
    TAIL_STOP,
    TAIL_TOKENS,
    Failure,
    FlatLayout,
    Joined,
    SyncReport,
    Tail,
    broadcast_params,
    params_of,
    tensor_digest,
)
from dilo.transport.base import Transport

_BITS = torch.arange(8, dtype=torch.uint8)


class DDP:
    """vote = "majority" / "mean": Distributed Lion, see `vote`; the gradients stay local."""

    def __init__(
        self, model: nn.Module, transport: Transport, *, log_every: int, bucket_mb: float = 32.0, vote: str = "none"
    ) -> None:
        self.round_steps = log_every
        self.transport = transport
        self.layout = FlatLayout.of(params_of(model), bucket_mb)
        self._flat = torch.empty(self.layout.total, dtype=torch.float32, device=params_of(model)[0].device)
        self._bytes_mark = (0, 0)
        if vote not in ("none", "majority", "mean"):
            raise ValueError(f"vote must be none, majority or mean, got {vote!r}")
        self.voting = vote

    def due(self, step: int) -> bool:
        return (step + 1) % self.round_steps == 0

    def broadcast_initial(self, model: nn.Module, src: int = 0) -> None:
        broadcast_params(model, self.layout, self.transport, src)
        self.mark_bytes()  # the start-up broadcast is not part of the first round's traffic

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        if not resumed:
            self.broadcast_initial(model)
        self.mark_bytes()
        return Joined()

    def describe(self) -> list[str]:
        if self.voting != "none":
            return [
                f"every parameter: the sign of each worker's Lion update, 1 bit, all_gather every step ({self.voting})"
            ]
        return ["every parameter: fp32 gradients, all_reduce after every backward pass"]

    def mark_bytes(self) -> None:
        """Count this round's traffic from here (start of training, or after a resume)."""
        self._bytes_mark = (self.transport.counter.sent, self.transport.counter.recv)

    @torch.no_grad()
    def reduce_grads(self, model: nn.Module) -> None:
        """Replace every .grad by the mean over workers. Raises TransportError: in DDP a lost
        peer ends the step, there is no round to fall back to."""
        if self.voting != "none":
            return  # Distributed Lion: each worker's gradient feeds its own Lion momentum; signs are voted on
        params = params_of(model)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.layout.flatten(grads, out=self._flat)
        self.transport.all_reduce_(self.layout.buckets(flat))
        flat.div_(self.transport.size)
        for p, g in zip(params, self.layout.unflatten(flat)):
            if p.grad is None:
                p.grad = g.to(p.dtype).clone()
            else:
                p.grad.copy_(g)

    @torch.no_grad()
    def vote(self, signs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Distributed Lion's exchange: this worker's update signs (+-1; a 0 counts as +1) packed 8
        per byte and all-gathered, then the majority (sign of the sum over workers, 0 on a tie) or
        the mean (sum / workers) per parameter, the same on every worker (integer sums)."""
        layout = FlatLayout.of(signs, 1e9)  # the optimizer's order of tensors, the same on every worker
        flat = layout.flatten(signs)
        neg = (flat < 0).to(torch.uint8)
        pad = -neg.numel() % 8
        packed = (torch.nn.functional.pad(neg, (0, pad)).view(-1, 8) << _BITS.to(neg.device)).sum(1, dtype=torch.uint8)
        votes = torch.zeros(flat.numel(), dtype=torch.int32, device=flat.device)
        for buf in self.transport.all_gather(packed):  # rank order: the same sum everywhere
            bits = ((buf[:, None] >> _BITS.to(buf.device)) & 1).view(-1)[: flat.numel()]
            votes += 1 - 2 * bits.to(torch.int32)
        out = votes.sign().float() if self.voting == "majority" else votes.float().div_(self.transport.size)
        return [t.to(s.dtype) for t, s in zip(layout.unflatten(out), signs)]

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        """Agree on stop and count tokens; the gradients were already averaged every step."""
        t0 = time.perf_counter()
        sent0, recv0 = self._bytes_mark
        t = tail.tensor()
        reason = ""
        try:
            self.transport.all_reduce_([t])
            committed = True
        except TransportError as e:
            # a collective that failed half way may have left partial sums in t: report our own
            committed, reason, t = False, repr(e), tail.tensor()
            failure: Failure | None = Failure.TRANSPORT
        else:
            failure = None
        c = self.transport.counter
        self._bytes_mark = (c.sent, c.recv)
        return SyncReport(
            committed=committed,
            participants=int(t[TAIL_COUNT]) if committed else 0,
            bytes_sent=c.sent - sent0,
            bytes_recv=c.recv - recv0,
            sync_s=time.perf_counter() - t0,
            stop=bool(t[TAIL_STOP] > 0),
            tokens=int(t[TAIL_TOKENS]),
            reason=reason,
            failure=failure,
            anchor_hash=tensor_digest(params_of(model)),
        )

    def state_dict(self) -> dict[str, Any]:
        # the model and the inner optimizer hold all of DDP's state
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                f"DDP keeps no outer state, got keys {sorted(state)}: was this checkpoint written by another strategy?"
            )
