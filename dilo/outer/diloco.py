"""Synchronous DiLoCo and FedAvg (Douillard et al., arXiv:2311.08105, Algorithm 1).

Every `inner_steps` (H) steps each worker computes its pseudo-gradient
`delta = anchor - params` in fp32, the workers average it (a sum by all-reduce, divided by
the summed weights of the workers that contributed), the anchor takes one outer step with
`torch.optim.SGD` on that mean, and every worker's parameters are reset to the new anchor.

    outer = DiLoCo(model, transport, lr=0.7, momentum=0.9, nesterov=True, inner_steps=50)
    for step in range(steps):
        inner_step(...)
        if outer.due(step):
            report = outer.sync(model, tail=Tail(weight=1.0, contributes=True, stop=False, tokens=n))

FedAvg is the same loop with outer SGD at lr 1 and no momentum: the new anchor is the plain
average of the workers' parameters.

A worker whose pseudo-gradient holds NaN or Inf contributes nothing (weight 0) that round; if no
worker contributes, the round is skipped and everyone restarts from the old anchor. Because the
mean is computed identically from the same summed bytes on every worker, all anchors stay
bit-identical.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from dilo.compress.base import Codec, Identity
from dilo.errors import TransportError
from dilo.outer.base import (
    TAIL_COUNT,
    TAIL_STOP,
    TAIL_TOKENS,
    TAIL_WEIGHT,
    Anchor,
    FlatLayout,
    SyncReport,
    Tail,
    params_of,
)
from dilo.transport.base import Transport

log = logging.getLogger(__name__)


class DiLoCo:
    def __init__(
        self,
        model: nn.Module,
        transport: Transport,
        *,
        inner_steps: int,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        codec: Codec | None = None,
        bucket_mb: float = 32.0,
    ) -> None:
        if nesterov and momentum == 0.0:
            raise ValueError("outer nesterov=True needs momentum > 0; set outer.momentum or outer.nesterov=false")
        self.round_steps = inner_steps
        self.transport = transport
        self.codec = codec or Identity()
        if not self.codec.linear:
            raise ValueError(f"{self.codec!r} is not linear; the all-reduce exchange needs a linear codec")
        params = params_of(model)
        self.anchor = Anchor(params)
        self.layout = FlatLayout.of(params, bucket_mb)
        self.optimizer = torch.optim.SGD(self.anchor.params, lr=lr, momentum=momentum, nesterov=nesterov)
        self.rounds = 0

    def due(self, step: int) -> bool:
        """True after the last inner step of a round (steps count from 0)."""
        return (step + 1) % self.round_steps == 0

    @torch.no_grad()
    def broadcast_initial(self, model: nn.Module, src: int = 0) -> None:
        """Make every worker start from rank src's parameters (threads share one RNG; joiners need it)."""
        params = params_of(model)
        flat = self.layout.flatten(params)
        self.transport.broadcast_(self.layout.buckets(flat), src)
        for p, v in zip(params, self.layout.unflatten(flat)):
            p.copy_(v)
        self.anchor.load_from(params)

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        t0 = time.perf_counter()
        sent0, recv0 = self.transport.counter.sent, self.transport.counter.recv
        params = params_of(model)
        delta = self.layout.flatten(self.anchor.pseudo_grad(params))
        if tail.contributes and not bool(torch.isfinite(delta).all()):
            log.warning("non-finite pseudo-gradient on rank %d: not sending it this round", self.transport.rank)
            tail.contributes = False
        if tail.contributes:
            delta.mul_(tail.weight)
        else:
            delta.zero_()
        payload = self.codec.encode(delta).tensors["values"]
        tail_t = tail.tensor()
        try:
            self.transport.all_reduce_([*self.layout.buckets(payload), tail_t])
        except TransportError as e:
            log.error("outer sync failed on rank %d: %s; restoring the anchor", self.transport.rank, e)
            self.anchor.restore_into(params)
            return self._report(False, 0, t0, sent0, recv0, tail_t, reason=repr(e))
        total_weight = float(tail_t[TAIL_WEIGHT])
        participants = int(tail_t[TAIL_COUNT])
        if participants == 0 or total_weight <= 0.0:
            self.anchor.restore_into(params)
            return self._report(False, 0, t0, sent0, recv0, tail_t, reason="no worker contributed")
        mean = payload.div_(total_weight)
        for a, g in zip(self.anchor.params, self.layout.unflatten(mean)):
            a.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.anchor.restore_into(params)
        self.rounds += 1
        return self._report(True, participants, t0, sent0, recv0, tail_t)

    def _report(
        self,
        committed: bool,
        participants: int,
        t0: float,
        sent0: int,
        recv0: int,
        tail: torch.Tensor,
        reason: str = "",
    ) -> SyncReport:
        return SyncReport(
            committed=committed,
            participants=participants,
            bytes_sent=self.transport.counter.sent - sent0,
            bytes_recv=self.transport.counter.recv - recv0,
            sync_s=time.perf_counter() - t0,
            stop=bool(tail[TAIL_STOP] > 0),
            tokens=int(tail[TAIL_TOKENS]),
            reason=reason,
            anchor_hash=self.anchor.digest(),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": [a.detach() for a in self.anchor.params],
            "optimizer": self.optimizer.state_dict(),
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for a, v in zip(self.anchor.params, state["anchor"]):
                a.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds = int(state["rounds"])
