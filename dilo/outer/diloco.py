"""Synchronous DiLoCo and FedAvg (Douillard et al., arXiv:2311.08105, Algorithm 1).

Every `inner_steps` (H) steps each worker computes its pseudo-gradient
`delta = anchor - params` in fp32, the workers average it through the configured codec
(dilo/outer/exchange.py picks the collective; the mean divides by the summed weights of the
workers that contributed), the anchor takes one outer step with `torch.optim.SGD` on that
mean, and every worker's parameters are reset to the new anchor.

    outer = DiLoCo(model, transport, lr=0.7, momentum=0.9, nesterov=True, inner_steps=50)
    outer.start(model, resumed=False)                      # every worker starts from rank 0's
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

from dilo.config import CodecSpec
from dilo.errors import TransportError
from dilo.model import param_names
from dilo.outer.base import (
    TAIL_COUNT,
    TAIL_STOP,
    TAIL_TOKENS,
    Anchor,
    Failure,
    FlatLayout,
    Joined,
    SyncReport,
    Tail,
    all_finite,
    broadcast_params,
    params_of,
)
from dilo.outer.exchange import Exchange
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
        codec: Any = None,
        seed: int = 0,
        bucket_mb: float = 32.0,
    ) -> None:
        if nesterov and momentum == 0.0:
            raise ValueError("outer nesterov=True needs momentum > 0; set outer.momentum or outer.nesterov=false")
        self.round_steps = inner_steps
        self.transport = transport
        params = params_of(model)
        self.anchor = Anchor(params)
        self.layout = FlatLayout.of(params, bucket_mb)
        self.exchange = Exchange(
            transport,
            param_names(model),
            [p.shape for p in params],
            codec if codec is not None else CodecSpec(),
            seed=seed,
            bucket_mb=bucket_mb,
        )
        self.optimizer = torch.optim.SGD(self.anchor.params, lr=lr, momentum=momentum, nesterov=nesterov, foreach=True)
        self.rounds = 0
        """Rounds attempted (committed or not): the same count on every worker, so it seeds codecs."""

    def due(self, step: int) -> bool:
        """True after the last inner step of a round (steps count from 0)."""
        return (step + 1) % self.round_steps == 0

    def broadcast_initial(self, model: nn.Module, src: int = 0) -> None:
        """Make every worker start from rank src's parameters (threads share one RNG; joiners need it)."""
        self.anchor.load_from(broadcast_params(model, self.layout, self.transport, src))

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        """A fresh run starts from rank 0's parameters; a resumed one from the checkpoint every
        rank loaded (its round boundary, where all parameters equal the anchor)."""
        if not resumed:
            self.broadcast_initial(model)
        return Joined()

    def reduce_grads(self, model: nn.Module) -> None:
        """Gradients stay local: workers exchange only at the end of a round."""

    def describe(self) -> list[str]:
        return self.exchange.describe()

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        t0 = time.perf_counter()
        sent0, recv0 = self.transport.counter.sent, self.transport.counter.recv
        params = params_of(model)
        delta = self.anchor.pseudo_grad(params)
        checked = all_finite([delta])
        if tail.contributes and not checked:
            log.warning("non-finite pseudo-gradient on rank %d: not sending it this round", self.transport.rank)
            tail.contributes = False
        round_idx = self.rounds
        self.rounds += 1
        try:
            result = self.exchange.mean_flat(delta, tail.tensor(), round_idx, finite=checked)
        except TransportError as e:
            log.error("outer sync failed on rank %d: %s; restoring the anchor", self.transport.rank, e)
            self.anchor.restore_into(params)
            tails = tail.tensor().reshape(1, -1)
            return self._report(False, t0, sent0, recv0, tails, reason=repr(e), failure=Failure.TRANSPORT)
        if result.flat is None:
            self.anchor.restore_into(params)
            return self._report(
                False, t0, sent0, recv0, result.tails, reason="no worker contributed", failure=Failure.NO_CONTRIBUTION
            )
        for a, g in zip(self.anchor.params, self.anchor.split(result.flat)):
            a.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.anchor.restore_into(params)
        return self._report(True, t0, sent0, recv0, result.tails)

    def _report(
        self,
        committed: bool,
        t0: float,
        sent0: int,
        recv0: int,
        tails: torch.Tensor,
        reason: str = "",
        failure: Failure | None = None,
    ) -> SyncReport:
        total = tails.sum(0)
        return SyncReport(
            committed=committed,
            participants=int(total[TAIL_COUNT]) if committed else 0,
            bytes_sent=self.transport.counter.sent - sent0,
            bytes_recv=self.transport.counter.recv - recv0,
            sync_s=time.perf_counter() - t0,
            stop=bool(total[TAIL_STOP] > 0),
            tokens=int(total[TAIL_TOKENS]),
            reason=reason,
            failure=failure,
            anchor_hash=self.anchor.digest(),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "anchor": [a.detach() for a in self.anchor.params],
            "optimizer": self.optimizer.state_dict(),
            "rounds": self.rounds,
            "exchange": self.exchange.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for a, v in zip(self.anchor.params, state["anchor"]):
                a.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds = int(state["rounds"])
        self.exchange.load_state_dict(state["exchange"])
