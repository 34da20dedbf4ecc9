"""Streaming DiLoCo (Douillard et al., arXiv:2501.18512, Algorithm 2).

The model is split into P fragments of whole transformer blocks (`fragment_of`). With
period = H / P, fragment (k - 1) mod P is sent after inner step k * period (so each fragment
syncs once every H steps, and one fragment is on the wire at a time):

    send (step k * period):       delta_p = anchor_p - x_p; its mean goes over the wire in the
                                  background while training goes on
    apply (tau steps later):      wait for the mean; anchor_p <- OuterOpt_p(anchor_p, mean)
                                  x_p <- alpha * x_p + (1 - alpha) * anchor_p

The next delta_p is measured from the pure outer result (the anchor), never from the mixed
parameters; the outer momentum of a fragment moves only when that fragment syncs. tau = 0 sends
and applies in the same step. The last step of the run (and a stop every worker agreed on) waits
for the fragment in flight, then exchanges every fragment's progress in the step and ends every
worker on the anchor, as blocking DiLoCo does: the final anchors are bit-identical.

Every send and every apply is one round for the loop (dilo/api.py): it logs and checkpoints
there. The tokens of the steps between a send and its apply ride with the next send, so every
token is reported once; a stop asked for at an apply is carried the same way. A checkpoint waits
for the fragment in flight and holds its mean, so a resumed run applies it where it would have.

Each fragment has its own `Exchange` (dilo/outer/exchange.py), so every codec and its error
feedback works per fragment (the paper sends 4-bit outer gradients).
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dilo.config import CodecSpec
from dilo.errors import ConfigError, TransportError
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
from dilo.outer.exchange import Exchange, ExchangeResult, finished
from dilo.outer.outer_opt import OptimizerFactory
from dilo.transport.base import Transport

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def fragment_of(names: list[str], fragments: int, pattern: Literal["strided", "sequential"]) -> list[int]:
    """The fragment of every parameter (in `names` order), in whole blocks: a block is the first
    integer in a parameter's dotted name ("blocks.3.attn.w" -> block 3, "model.layers.3...").
    Blocks are counted in the order they appear; strided puts block j in fragment j mod P,
    sequential in fragment j * P // B. Parameters before the first block (embeddings) go with
    fragment 0, those after the last (final norm, head) with fragment P - 1."""
    blocks: list[str] = []
    of_param: list[int | None] = []
    for name in names:
        m = _BLOCK.search(name)
        if m is None:
            of_param.append(None)
            continue
        if m.group(1) not in blocks:
            blocks.append(m.group(1))
        of_param.append(blocks.index(m.group(1)))
    if len(blocks) < fragments:
        raise ConfigError(
            f"outer.fragments={fragments}, but the model has {len(blocks)} numbered blocks to split "
            f"(parameter names like 'layers.3.attn'): set outer.fragments <= {max(1, len(blocks))}"
        )

    def fragment(block: int) -> int:
        return block % fragments if pattern == "strided" else block * fragments // len(blocks)

    out, seen_block = [], False
    for block in of_param:
        if block is not None:
            seen_block = True
            out.append(fragment(block))
        else:
            out.append(0 if not seen_block else fragments - 1)
    return out


@dataclass
class _Fragment:
    index: int
    params: slice
    """Its parameters' range in the anchor's (fragment-major) order."""
    elems: slice
    """Its range in the anchor's flat buffer."""
    exchange: Exchange


@dataclass
class _InFlight:
    fragment: int
    result: Future[ExchangeResult]
    reset: bool
    """This worker's fragment was not finite at the send: it takes the global value (alpha = 0)."""


class StreamingDiLoCo:
    def __init__(
        self,
        model: nn.Module,
        transport: Transport,
        *,
        inner_steps: int,
        fragments: int,
        delay: int,
        mixing: float,
        pattern: Literal["strided", "sequential"] = "strided",
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        codec: CodecSpec | None = None,
        seed: int = 0,
        bucket_mb: float = 32.0,
        make_optimizer: OptimizerFactory | None = None,
    ) -> None:
        if inner_steps % fragments or delay >= inner_steps // fragments:
            raise ConfigError(
                f"Streaming DiLoCo needs inner_steps ({inner_steps}) a multiple of fragments ({fragments}) "
                f"and fragment_delay ({delay}) below inner_steps / fragments"
            )
        if nesterov and momentum == 0.0:
            raise ValueError("outer nesterov=True needs momentum > 0; set outer.momentum or outer.nesterov=false")
        self.transport = transport
        self.period = inner_steps // fragments
        self.delay = delay
        self.mixing = mixing
        params = params_of(model)
        names = param_names(model)
        assigned = fragment_of(names, fragments, pattern)
        # the anchor is laid out fragment by fragment: each fragment is one contiguous slice of it
        self.order = sorted(range(len(params)), key=lambda i: (assigned[i], i))
        self.anchor = Anchor([params[i] for i in self.order])
        self.layout = FlatLayout.of(params, bucket_mb)
        self.fragments: list[_Fragment] = []
        first = offset = 0
        for p in range(fragments):
            members = [i for i in self.order if assigned[i] == p]
            elems = sum(params[i].numel() for i in members)
            exchange = Exchange(
                transport,
                [names[i] for i in members],
                [params[i].shape for i in members],
                codec if codec is not None else CodecSpec(),
                seed=seed,
                bucket_mb=bucket_mb,
            )
            self.fragments.append(
                _Fragment(p, slice(first, first + len(members)), slice(offset, offset + elems), exchange)
            )
            first, offset = first + len(members), offset + elems
        # the outer optimizer (outer.optimizer): SGD with momentum / Nesterov unless a factory says otherwise
        self.optimizer: torch.optim.Optimizer = (
            make_optimizer(self.anchor.params)
            if make_optimizer is not None
            else torch.optim.SGD(self.anchor.params, lr=lr, momentum=momentum, nesterov=nesterov, foreach=True)
        )
        self.rounds = 0
        """Exchanges started (the same count on every worker, so it seeds the codecs)."""
        self._at = 0
        """Inner steps taken, as of the last `due` call."""
        self._buffer = torch.empty(max(f.elems.stop - f.elems.start for f in self.fragments), dtype=torch.float32)
        self._buffer = self._buffer.to(self.anchor.flat.device)
        self._pending: _InFlight | None = None
        self._carry_tokens = 0
        self._carry_stop = False
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------------------------------ schedule

    @property
    def round_steps(self) -> int:
        return self.period

    def _sends(self, at: int) -> bool:
        return at % self.period == 0

    def _applies(self, at: int) -> bool:
        return self.delay > 0 and at > self.delay and (at - self.delay) % self.period == 0

    def due(self, step: int) -> bool:
        """True after a step at which a fragment is sent or its outer step applied."""
        self._at = step + 1
        return self._sends(self._at) or self._applies(self._at)

    # ------------------------------------------------------------------------------------------ start

    def broadcast_initial(self, model: nn.Module, src: int = 0) -> None:
        params = broadcast_params(model, self.layout, self.transport, src)
        self.anchor.load_from([params[i] for i in self.order])

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        if not resumed:
            self.broadcast_initial(model)
        return Joined()

    def reduce_grads(self, model: nn.Module) -> None:
        """Gradients stay local."""

    def describe(self) -> list[str]:
        lines = []
        for f in self.fragments:
            n = f.elems.stop - f.elems.start
            lines += [f"fragment {f.index} ({n} elements): {line}" for line in f.exchange.describe()]
        return lines

    # ------------------------------------------------------------------------------------------ sync

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        t0 = time.perf_counter()
        sent0, recv0 = self.transport.counter.sent, self.transport.counter.recv
        x = self._ordered(model)
        received: list[Tensor] = []  # the tails of every exchange applied in this call
        outcome: tuple[bool, str, Failure | None] = (True, "", None)
        events: list[str] = []
        unsent = tail.tokens  # this call's tokens, until an exchange carries them
        try:
            if self._pending is not None:  # its apply step, or the run ends before it
                outcome, tails = self._apply_pending(x)
                received.append(tails)
                events.append(outcome[1])
            if not (tail.last or _stops(received)) and self._sends(self._at):
                index = (self._at // self.period - 1) % len(self.fragments)
                self._send(index, x, tail)
                unsent = 0
                events.append(f"fragment {index} sent")
                if self.delay == 0:
                    outcome, tails = self._apply_pending(x)
                    received.append(tails)
                    events.append(outcome[1])
            elif not (tail.last or _stops(received)):  # an apply step: its steps ride with the next send
                self._carry_tokens += tail.tokens
                self._carry_stop = self._carry_stop or tail.stop
            if tail.last or _stops(received):
                outcome, tails = self._flush(x, tail, unsent)
                received.append(tails)
                events.append(outcome[1])
        except TransportError as e:
            log.error("streaming outer sync failed on rank %d: %s", self.transport.rank, e)
            self.anchor.restore_into(x)
            return self._report(False, t0, sent0, recv0, [], reason=repr(e), failure=Failure.TRANSPORT, stop=False)
        committed, _, failure = outcome
        return self._report(committed, t0, sent0, recv0, received, reason="; ".join(events), failure=failure)

    def _ordered(self, model: nn.Module) -> list[nn.Parameter]:
        params = params_of(model)
        return [params[i] for i in self.order]

    def _delta(self, f: _Fragment, x: list[nn.Parameter]) -> Tensor:
        """delta_p = anchor_p - x_p into the reused buffer (one fragment is on the wire at a time)."""
        out = self._buffer[: f.elems.stop - f.elems.start]
        for a, p, d in zip(self.anchor.params[f.params], x[f.params], self._views(f, out)):
            torch.sub(a, p.detach(), out=d)
        return out

    def _views(self, f: _Fragment, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of a flat buffer laid out like fragment f."""
        numels, shapes = self.anchor.numels[f.params], self.anchor.shapes[f.params]
        return [v.view(s) for v, s in zip(torch.split(flat, numels), shapes)]

    def _send(self, index: int, x: list[nn.Parameter], tail: Tail) -> None:
        f = self.fragments[index]
        delta = self._delta(f, x)
        finite = all_finite([delta])
        if not finite:
            rank = self.transport.rank
            log.warning("non-finite fragment %d on rank %d: not sending it; restarting from the anchor", index, rank)
            self.anchor.restore_into(x)  # the whole model: the fragment's NaN came from somewhere
            delta.zero_()
        t = Tail(
            weight=tail.weight,
            contributes=tail.contributes and finite,
            stop=tail.stop or self._carry_stop,
            tokens=tail.tokens + self._carry_tokens,
        ).tensor()
        self._carry_tokens, self._carry_stop = 0, False
        round_idx = self.rounds
        self.rounds += 1
        if self.delay == 0:
            future: Future[ExchangeResult] = finished(f.exchange.mean_flat(delta, t, round_idx, finite=True))
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="dilo-streaming")
            future = self._pool.submit(f.exchange.mean_flat, delta, t, round_idx, finite=True)
        self._pending = _InFlight(index, future, reset=not finite)

    def _apply_pending(self, x: list[nn.Parameter]) -> tuple[tuple[bool, str, Failure | None], Tensor]:
        """Wait for the fragment in flight; its outer step, then the mixing."""
        assert self._pending is not None
        pending, self._pending = self._pending, None
        result = pending.result.result()
        f = self.fragments[pending.fragment]
        if result.flat is None:
            self.anchor.restore_into(x)  # the restore after a skipped round, as in blocking DiLoCo
            return (False, f"fragment {f.index}: no worker contributed", Failure.NO_CONTRIBUTION), result.tails
        self._outer_step([f], [result.flat])
        alpha = 0.0 if pending.reset else self.mixing
        for a, p in zip(self.anchor.params[f.params], x[f.params]):
            p.lerp_(a.to(p.dtype), 1.0 - alpha)  # x <- alpha * x + (1 - alpha) * anchor
        return (True, f"fragment {f.index} applied", None), result.tails

    def _flush(self, x: list[nn.Parameter], tail: Tail, tokens: int) -> tuple[tuple[bool, str, Failure | None], Tensor]:
        """The run's end: every fragment's progress exchanged in the step, one outer step of each,
        and every worker on the anchor. Returns fragment 0's tails (they carry the tokens)."""
        means, synced, first_tails = [], [], None
        for f in self.fragments:
            delta = self._delta(f, x)
            finite = all_finite([delta])
            if not finite:
                delta.zero_()
            first = f.index == 0
            t = Tail(
                weight=tail.weight,
                contributes=tail.contributes and finite,
                stop=tail.stop or self._carry_stop,
                tokens=tokens + self._carry_tokens if first else 0,
            ).tensor()
            round_idx = self.rounds
            self.rounds += 1
            result = f.exchange.mean_flat(delta, t, round_idx, finite=True)
            if first:
                first_tails = result.tails
            if result.flat is not None:
                means.append(result.flat.clone())  # the buffer is reused by the next fragment
                synced.append(f)
        self._carry_tokens, self._carry_stop = 0, False
        self._outer_step(synced, means)
        self.anchor.restore_into(x)
        assert first_tails is not None
        if not synced:
            return (False, "final exchange: no worker contributed", Failure.NO_CONTRIBUTION), first_tails
        return (True, "final exchange of every fragment", None), first_tails

    def _outer_step(self, fragments: list[_Fragment], means: list[Tensor]) -> None:
        """One outer step on these fragments (the others' parameters and momentum do not move)."""
        for f, mean in zip(fragments, means):
            for a, g in zip(self.anchor.params[f.params], self._views(f, mean)):
                a.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _report(
        self,
        committed: bool,
        t0: float,
        sent0: int,
        recv0: int,
        received: list[Tensor],
        *,
        reason: str,
        failure: Failure | None,
        stop: bool | None = None,
    ) -> SyncReport:
        tokens = sum(int(t.sum(0)[TAIL_TOKENS]) for t in received)
        participants = int(received[-1].sum(0)[TAIL_COUNT]) if received and committed else 0
        return SyncReport(
            committed=committed,
            participants=participants,
            bytes_sent=self.transport.counter.sent - sent0,
            bytes_recv=self.transport.counter.recv - recv0,
            sync_s=time.perf_counter() - t0,
            stop=_stops(received) if stop is None else stop,
            tokens=tokens,
            reason=reason,
            failure=failure,
            anchor_hash=self.anchor.digest(),
        )

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        pending = None
        if self._pending is not None:  # a checkpoint holds the finished mean, not a half-done collective
            result = self._pending.result.result()
            self._pending.result = finished(result)
            flat = None if result.flat is None else result.flat.clone()
            pending = {"fragment": self._pending.fragment, "reset": self._pending.reset, "flat": flat,
                       "tails": result.tails}  # fmt: skip
        return {
            "anchor": [a.detach() for a in self.anchor.params],
            "optimizer": self.optimizer.state_dict(),
            "rounds": self.rounds,
            "exchanges": [f.exchange.state_dict() for f in self.fragments],
            "streaming": {
                "pending": pending,
                "carry_tokens": self._carry_tokens,
                "carry_stop": self._carry_stop,
                "fragments": len(self.fragments),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("streaming")
        if saved is None or saved["fragments"] != len(self.fragments):
            raise ConfigError(
                "this checkpoint was not written by Streaming DiLoCo with "
                f"outer.fragments={len(self.fragments)}: resume it with the outer settings it was written with"
            )
        with torch.no_grad():
            for a, v in zip(self.anchor.params, state["anchor"]):
                a.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds = int(state["rounds"])
        for f, s in zip(self.fragments, state["exchanges"]):
            f.exchange.load_state_dict(s)
        self._carry_tokens, self._carry_stop = int(saved["carry_tokens"]), bool(saved["carry_stop"])
        p = saved["pending"]
        self._pending = None
        if p is not None:
            result = finished(ExchangeResult(p["flat"], p["tails"]))
            self._pending = _InFlight(int(p["fragment"]), result, bool(p["reset"]))


def _stops(received: list[Tensor]) -> bool:
    """A stop every worker agreed on: some worker's tail in an exchange everyone received asked for it."""
    return any(bool(t.sum(0)[TAIL_STOP] > 0) for t in received)
