"""Asynchronous local SGD, worker side: train, push, continue at once from the fresh parameters.

The coordinator (dilo/coordinator/) applies each push on arrival with the server rule of
dilo/outer/server.py and answers with the new parameters and how many inner steps to run next
(DyLU). The pseudo-gradient is relative to the parameters this worker last received, so a push
is meaningful whatever happened on the coordinator in between; its staleness is counted there.

    outer = AsyncLocalSGD(model, client, cfg)
    outer.start(model, resumed=False)       # WELCOME: parameters, version, first step count
    if outer.due(step):
        report = outer.sync(model, tail=Tail(..., steps=n, inner_s=t))   # push, adopt the reply

If the reply is lost (the coordinator restarted or stopped answering), the worker re-joins and
starts from the current parameters: it never computes a pseudo-gradient against parameters the
coordinator may have moved past without telling it. Inner AdamW state stays local and is kept
across rounds (Liu et al. section 10.1).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dilo import wire
from dilo.bodies import AsyncResultBody, StateBody, parse
from dilo.errors import PeerLost, ProtocolError, SyncTimeout
from dilo.model import param_names, params_of
from dilo.outer.base import Anchor, Failure, Joined, SyncReport, Tail, all_finite
from dilo.outer.groups import describe_groups
from dilo.outer.star import REJOIN_CODES, StarCodec, StarLink, adopt_parameters, joined_from, worker_key

if TYPE_CHECKING:
    from dilo.config import RunConfig

log = logging.getLogger("dilo.outer.async")


class AsyncLocalSGD:
    def __init__(self, model: nn.Module, client: StarLink, cfg: RunConfig) -> None:
        self.client = client
        params = params_of(model)
        self.anchor = Anchor(params)
        self.star = StarCodec(param_names(model), [p.shape for p in params], cfg.codec, seed=cfg.seed)
        self.key = worker_key(client.worker_id)
        self.round_steps = cfg.round_steps
        """Inner steps of the current round, as the coordinator assigned them."""
        self.version = -1
        self.pushes = 0
        self.members: tuple[str, ...] = ()
        self.done = False
        self.schedule_step: int | None = None
        self.world_tokens = 0
        """Tokens trained by all workers, as of the latest reply."""
        self._reported_tokens = 0
        self._start = 0
        self._last = -1

    def due(self, step: int) -> bool:
        self._last = step
        return step + 1 - self._start >= self.round_steps

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        """JOIN and start from the coordinator's parameters (resumed or not: it holds them)."""
        return joined_from(self.join(model))

    def reduce_grads(self, model: nn.Module) -> None:
        """Gradients stay local."""

    def describe(self) -> list[str]:
        return describe_groups(self.star.groups)

    @torch.no_grad()
    def join(self, model: nn.Module) -> wire.Message:
        welcome = self.client.join()
        self._adopt(welcome, model)
        self.star.reset_feedback()
        return welcome

    @torch.no_grad()
    def _adopt(self, msg: wire.Message, model: nn.Module) -> StateBody:
        b = parse(AsyncResultBody if msg.type == wire.MsgType.RESULT else StateBody, msg.body)
        adopt_parameters(self.anchor, msg.tensors, model)
        self.version = b.version
        self.members = tuple(b.members)
        self.round_steps = max(1, b.inner_steps or self.round_steps)
        self.done = bool(b.done)
        self.schedule_step = b.schedule_step
        self.world_tokens = b.world_tokens if b.world_tokens is not None else self.world_tokens
        self._start = self._last + 1
        if self.anchor.digest() != b.anchor_hash:
            raise ProtocolError("the parameters received from the coordinator do not match their hash")
        return b

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        t0 = time.perf_counter()
        sent0, recv0 = self.client.counter.sent, self.client.counter.recv
        delta = self.anchor.pseudo_grad(params_of(model))
        contributes = tail.contributes and all_finite([delta])
        deltas = self.anchor.split(delta)
        tensors = self.star.encode_push(deltas, self.pushes, self.key, contributes=contributes)
        self.pushes += 1
        body = {
            "weight": tail.weight if contributes else 0.0,
            "contributes": contributes,
            "stop": tail.stop,
            "tokens": tail.tokens,
            "steps": tail.steps,
            "inner_s": float(tail.inner_s),
        }
        try:
            reply = self.client.push(tensors, body, base=self.version)
        except (PeerLost, SyncTimeout, wire.WireError) as e:
            if isinstance(e, wire.WireError) and e.code not in (*REJOIN_CODES, "bad_base"):
                raise
            # Whether the push was applied is unknown: start over from the coordinator's parameters.
            log.warning("push of worker %s got no answer (%s): re-pulling the parameters", self.client.worker_id, e)
            self._adopt(self.client.join(), model)
            return self._report(
                False,
                t0,
                sent0,
                recv0,
                tail,
                reason=f"reply lost ({e}): re-pulled",
                failure=Failure.LOST,
                tokens=self._tokens_since_report(),
            )
        b = self._adopt(reply, model)
        applied = isinstance(b, AsyncResultBody) and b.applied
        dropped = isinstance(b, AsyncResultBody) and b.dropped
        reason = "dropped: too stale" if dropped else ""
        failure = None if applied else Failure.DROPPED if dropped else Failure.REFUSED
        if not isinstance(b, AsyncResultBody):  # a STATE: the push came too late or was refused
            reason = f"restarted from the coordinator's state ({b.reason or 'late'})"
            failure = Failure.LATE
        return self._report(
            applied,
            t0,
            sent0,
            recv0,
            tail,
            reason=reason,
            failure=failure,
            staleness=b.staleness if isinstance(b, AsyncResultBody) else None,
            tokens=self._tokens_since_report(),
        )

    def _tokens_since_report(self) -> int:
        """World tokens since the last report: their sum over a worker's reports is the world's total."""
        delta, self._reported_tokens = self.world_tokens - self._reported_tokens, self.world_tokens
        return delta

    def _report(
        self,
        committed: bool,
        t0: float,
        sent0: int,
        recv0: int,
        tail: Tail,
        *,
        reason: str = "",
        failure: Failure | None = None,
        staleness: int | None = None,
        tokens: int | None = None,
    ) -> SyncReport:
        return SyncReport(
            committed=committed,
            participants=int(committed),
            bytes_sent=self.client.counter.sent - sent0,
            bytes_recv=self.client.counter.recv - recv0,
            sync_s=time.perf_counter() - t0,
            stop=tail.stop,
            tokens=tail.tokens if tokens is None else tokens,
            reason=reason,
            failure=failure,
            anchor_hash=self.anchor.digest(),
            version=self.version,
            done=self.done,
            staleness=staleness,
            schedule_step=self.schedule_step,
            # every async round logs its staleness and the step count the coordinator assigned next
            extra={"staleness": staleness, "next_steps": self.round_steps},
        )

    def state_dict(self) -> dict[str, Any]:
        # the parameters live on the coordinator; a worker keeps its error feedback and push count
        return {"star": self.star.state_dict(), "pushes": self.pushes, "reported_tokens": self._reported_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.star.load_state_dict(state["star"])
        self.pushes = int(state.get("pushes", 0))
        self._reported_tokens = int(state.get("reported_tokens", 0))
