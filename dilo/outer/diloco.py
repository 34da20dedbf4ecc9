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

import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from dilo.config import CodecSpec
from dilo.errors import ConfigError, TransportError
from dilo.model import param_names
from dilo.outer.base import (
    TAIL_COUNT,
    TAIL_LEN,
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
from dilo.outer.exchange import Exchange, ExchangeResult, finished
from dilo.outer.outer_opt import OptimizerFactory
from dilo.outer.robust import Aggregator
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
        overlap: bool = False,
        offload: bool = False,
        make_optimizer: OptimizerFactory | None = None,
        aggregator: Aggregator | None = None,
        attack: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        if nesterov and momentum == 0.0:
            raise ValueError("outer nesterov=True needs momentum > 0; set outer.momentum or outer.nesterov=false")
        self.round_steps = inner_steps
        self.transport = transport
        params = params_of(model)
        self.anchor = Anchor(params, device=torch.device("cpu") if offload else None)
        self.layout = FlatLayout.of(params, bucket_mb)
        self.exchange = Exchange(
            transport,
            param_names(model),
            [p.shape for p in params],
            codec if codec is not None else CodecSpec(),
            seed=seed,
            bucket_mb=bucket_mb,
            aggregator=aggregator,
        )
        # the outer optimizer (outer.optimizer): SGD with momentum / Nesterov unless a factory says otherwise
        self.optimizer: torch.optim.Optimizer = (
            make_optimizer(self.anchor.params)
            if make_optimizer is not None
            else torch.optim.SGD(self.anchor.params, lr=lr, momentum=momentum, nesterov=nesterov, foreach=True)
        )
        self.rounds = 0
        """Rounds attempted (committed or not): the same count on every worker, so it seeds codecs."""
        self.overlap = overlap
        self.attack = attack
        """heterogeneity.hostile: what this worker does to its pseudo-gradient before sending it (tests)."""
        self._base: torch.Tensor | None = None
        """outer.overlap: the fp32 parameters this round started from (its progress is measured from them)."""
        self._buffers: list[torch.Tensor] = []
        self._pending: Future[ExchangeResult] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def due(self, step: int) -> bool:
        """True after the last inner step of a round (steps count from 0)."""
        return (step + 1) % self.round_steps == 0

    def broadcast_initial(self, model: nn.Module, src: int = 0) -> None:
        """Make every worker start from rank src's parameters (threads share one RNG; joiners need it)."""
        self.anchor.load_from(broadcast_params(model, self.layout, self.transport, src))
        if self.overlap:
            self._base = self.anchor.flat.clone()

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        """A fresh run starts from rank 0's parameters; a resumed one from the checkpoint every
        rank loaded (its round boundary, where all parameters equal the anchor)."""
        if not resumed:
            self.broadcast_initial(model)
        elif self.overlap and self._base is None:
            self._base = self.anchor.flat.clone()
        return Joined()

    def reduce_grads(self, model: nn.Module) -> None:
        """Gradients stay local: workers exchange only at the end of a round."""

    def describe(self) -> list[str]:
        return self.exchange.describe()

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        if self.overlap:
            return self._sync_overlapped(model, tail)
        t0 = time.perf_counter()
        sent0, recv0 = self.transport.counter.sent, self.transport.counter.recv
        params = params_of(model)
        delta, checked = self._pseudo_grad(params, tail)
        round_idx = self.rounds
        self.rounds += 1
        try:
            result = self.exchange.mean_flat(delta, tail.tensor(), round_idx, finite=checked)
        except TransportError as e:
            log.error("outer sync failed on rank %d: %s; restoring the anchor", self.transport.rank, e)
            self.anchor.restore_into(params)
            tails = tail.tensor().reshape(1, -1)
            return self._report(False, t0, sent0, recv0, tails, reason=repr(e), failure=Failure.TRANSPORT)
        committed, reason = self._apply(result)
        self.anchor.restore_into(params)
        failure = None if committed else Failure.NO_CONTRIBUTION
        report = self._report(committed, t0, sent0, recv0, result.tails, reason=reason, failure=failure)
        if result.plan is not None:  # adaptive compression: the codec plan in force, in the round log
            report = dataclasses.replace(report, extra={**report.extra, "codec_plan": result.plan})
        if result.members:  # a robust aggregate: who sent what (the round log's member_norms / member_cosines)
            extra = {"member_norms": {w: s["norm"] for w, s in result.members.items()},
                     "member_cosines": {w: s["cos"] for w, s in result.members.items()}}  # fmt: skip
            report = dataclasses.replace(report, extra={**report.extra, **extra})
        return report

    def _pseudo_grad(self, params: list[nn.Parameter], tail: Tail, **where: Any) -> tuple[torch.Tensor, bool]:
        """The round's flat pseudo-gradient (Anchor.pseudo_grad's `out` / `base`) and whether it is
        finite; a non-finite one is not sent (the tail stops contributing)."""
        delta = self.anchor.pseudo_grad(params, **where)
        if self.attack is not None:
            self.attack(delta)
        checked = all_finite([delta])
        if tail.contributes and not checked:
            log.warning("non-finite pseudo-gradient on rank %d: not sending it this round", self.transport.rank)
            tail.contributes = False
        return delta, checked

    def _sync_overlapped(self, model: nn.Module, tail: Tail) -> SyncReport:
        """One-step-delayed outer step (outer.overlap; docs/ALGORITHMS.md):

            delta_t = base_t - x_t                    this round's own progress, from where it started
            wait for the mean of delta_(t-1); anchor <- OuterOpt(anchor, mean)
            x <- anchor - delta_t; base_(t+1) <- x    the progress moved onto the new anchor
            send delta_t in the background; train round t + 1 meanwhile

        The last round (and the one at which the workers agreed to stop) exchanges in the round and
        ends on the anchor, as without overlap."""
        t0 = time.perf_counter()
        sent0, recv0 = self.transport.counter.sent, self.transport.counter.recv
        params = params_of(model)
        assert self._base is not None, "start() comes before the first sync"
        if len(self._buffers) < 2:  # the round in flight owns one buffer, this round the other
            self._buffers = [self.anchor.empty_like(), self.anchor.empty_like()]
        delta, checked = self._pseudo_grad(params, tail, out=self._buffers[self.rounds % 2], base=self._base)
        round_idx = self.rounds
        self.rounds += 1
        tails = torch.zeros(1, TAIL_LEN, dtype=torch.float64)  # nothing applied yet (the first round)
        committed, reason, failure = True, "first round of outer.overlap: its exchange runs behind the next", None
        seen = self._pending is not None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                result = pending.result()
            except TransportError as e:
                log.error("outer sync failed on rank %d: %s", self.transport.rank, e)
                return self._report(False, t0, sent0, recv0, tails, reason=repr(e), failure=Failure.TRANSPORT)
            tails = result.tails
            committed, reason = self._apply(result)
            failure = None if committed else Failure.NO_CONTRIBUTION
        if not checked:
            delta.zero_()  # the local progress is lost: restart from the anchor
        # a stop is agreed from the tails every worker received (round t - 1's), never from its own
        stop = seen and bool(tails.sum(0)[TAIL_STOP] > 0)
        if tail.last or stop:  # finish in this round: everyone ends on the same anchor
            earlier = int(tails.sum(0)[TAIL_TOKENS]) if self.rounds > 1 else 0
            try:
                result = self.exchange.mean_flat(delta, tail.tensor(), round_idx, finite=True)
            except TransportError as e:
                log.error("outer sync failed on rank %d: %s", self.transport.rank, e)
                return self._report(False, t0, sent0, recv0, tails, reason=repr(e), failure=Failure.TRANSPORT)
            committed, reason = self._apply(result)
            self.anchor.restore_into(params)
            self._base.copy_(self.anchor.flat)
            failure = None if committed else Failure.NO_CONTRIBUTION
            report = self._report(committed, t0, sent0, recv0, result.tails, reason=reason, failure=failure)
            return dataclasses.replace(report, stop=report.stop or stop, tokens=report.tokens + earlier)
        for a, d, b, p in zip(self.anchor.params, self.anchor.split(delta), self.anchor.split(self._base), params):
            torch.sub(a, d, out=b)
            p.copy_(b)
            if p.dtype != b.dtype:
                b.copy_(p)  # measure the next round's progress from what the model holds
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dilo-overlap")
        self._pending = self._pool.submit(self.exchange.mean_flat, delta, tail.tensor(), round_idx, finite=True)
        return self._report(committed, t0, sent0, recv0, tails, reason=reason, failure=failure, stop=stop)

    def _apply(self, result: ExchangeResult) -> tuple[bool, str]:
        """One outer step on the anchor with the exchanged mean: (committed, reason)."""
        if result.flat is None:
            return False, "no worker contributed"
        flat = result.flat if result.flat.device == self.anchor.flat.device else result.flat.to(self.anchor.flat.device)
        for a, g in zip(self.anchor.params, self.anchor.split(flat)):
            a.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True, ""

    def _finish_pending(self) -> ExchangeResult | None:
        """Wait for the exchange in flight (a checkpoint holds its result, not a half-done collective)."""
        if self._pending is None:
            return None
        result = self._pending.result()
        self._pending = finished(result)
        return result

    def _report(
        self,
        committed: bool,
        t0: float,
        sent0: int,
        recv0: int,
        tails: torch.Tensor,
        reason: str = "",
        failure: Failure | None = None,
        stop: bool | None = None,
    ) -> SyncReport:
        total = tails.sum(0)
        return SyncReport(
            committed=committed,
            participants=int(total[TAIL_COUNT]) if committed else 0,
            bytes_sent=self.transport.counter.sent - sent0,
            bytes_recv=self.transport.counter.recv - recv0,
            sync_s=time.perf_counter() - t0,
            stop=bool(total[TAIL_STOP] > 0) if stop is None else stop,
            tokens=int(total[TAIL_TOKENS]),
            reason=reason,
            failure=failure,
            anchor_hash=self.anchor.digest(),
        )

    def state_dict(self) -> dict[str, Any]:
        state = {
            "anchor": [a.detach() for a in self.anchor.params],
            "optimizer": self.optimizer.state_dict(),
            "rounds": self.rounds,
            "exchange": self.exchange.state_dict(),
        }
        if self.overlap:
            pending = self._finish_pending()
            state["overlap"] = {
                "base": self._base,
                "pending": None if pending is None else {"flat": pending.flat, "tails": pending.tails},
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for a, v in zip(self.anchor.params, state["anchor"]):
                a.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds = int(state["rounds"])
        self.exchange.load_state_dict(state["exchange"])
        if self.overlap:
            saved = state.get("overlap")
            if saved is None:
                raise ConfigError(
                    "this checkpoint was written without outer.overlap: resume it with outer.overlap=false"
                )
            self._base = saved["base"].clone()
            pending = saved["pending"]
            self._pending = None if pending is None else finished(ExchangeResult(pending["flat"], pending["tails"]))
