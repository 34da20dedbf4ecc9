"""Star exchanges through a coordinator: what a worker pushes and what the coordinator returns.

The worker encodes its pseudo-gradient per parameter group (with its error feedback) and pushes
the payload tensors. The coordinator decodes every push as it arrives and adds it, weighted, to a
float64 sum (dilo/outer/aggregate.py `RunningMean`), divides by the total weight, and encodes the mean
once with the plain codec (keeping its own re-encoding error when feedback is on). Every worker
and the coordinator decode those same bytes and apply the same outer optimizer step to the same
fp32 anchor, so they stay bit-identical; RESULT carries the anchor hash to prove it.

    star = StarCodec(names, shapes, cfg.codec, seed=cfg.seed)
    tensors = star.encode_push(deltas, round_idx, worker_key, contributes=True)      # worker
    flat_means = star.weighted_mean([(w, star.decode_push(t)) for w, t in pushes])     # coordinator
    reply = star.encode_mean(flat_means, round_idx)                                    # coordinator
    mean = star.decode_mean(reply)                                                     # both
"""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from dilo import wire
from dilo.bodies import MAX_COUNT, MAX_SECONDS, RoundResultBody, StateBody, parse
from dilo.config import DiLoCoConfig
from dilo.errors import PeerLost, ProtocolError, SyncTimeout
from dilo.model import param_names, params_of
from dilo.outer.base import Anchor, Failure, Joined, SyncReport, Tail, all_finite
from dilo.outer.groups import describe_groups
from dilo.transport.base import ByteCounter

if TYPE_CHECKING:
    from dilo.config import RunConfig

from dilo.outer.star_codec import (  # noqa: E402 - re-exported: the coordinator and tests import them from here
    DOWNLINK_PART,
    StarCodec,
    adopt_parameters,
    load_outer_state,
    outer_optimizer,
    outer_state_tensors,
    worker_key,
)

__all__ = [
    "DOWNLINK_PART",
    "REJOIN_CODES",
    "StarCodec",
    "StarDiLoCo",
    "StarLink",
    "adopt_parameters",
    "joined_from",
    "load_outer_state",
    "outer_optimizer",
    "outer_state_tensors",
    "worker_key",
]

log = logging.getLogger("dilo.outer.star")

REJOIN_CODES = ("not_member", "session", "identity", "replay", "bad_base")
"""Refusals that a fresh JOIN cures: the coordinator forgot us, our session is not its current one,
a copy of our message reached it first (an attacker's replay that overtook the original), or it
restarted from a checkpoint older than the version we hold (bad_base: it takes us back to its)."""


class StarLink(Protocol):
    """A worker's link to the coordinator: dilo.transport.zmq_star.StarClient over ZeroMQ, or the
    simulator's in-process client. Requests raise PeerLost / SyncTimeout when the coordinator is
    gone and wire.WireError when it refuses."""

    worker_id: str
    counter: ByteCounter

    def join(self) -> wire.Message: ...

    def push(self, tensors: dict[str, Tensor], body: dict[str, Any], *, base: int) -> wire.Message: ...

    def pull(self) -> wire.Message: ...

    def leave(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Outcome:
    """The answer to a push: RESULT or STATE (reply), or None when the round was lost; welcome:
    the coordinator's state after a re-join found it elsewhere (the caller adopts it)."""

    reply: wire.Message | None
    welcome: wire.Message | None = None


@dataclass(frozen=True)
class _Applied:
    result: RoundResultBody | None
    """The round's RESULT, None when the round was lost or late."""
    reason: str
    failure: Failure | None
    digest: str | None = None


class StarDiLoCo:
    """DiLoCo / FedAvg whose rounds go through a coordinator (membership.kind = "coordinator").

    The worker keeps a replica of the outer optimizer (its momentum comes with WELCOME) and applies
    the coordinator's decoded mean itself; RESULT carries the coordinator's anchor hash, and a
    mismatch makes the worker pull the full state.
    """

    def __init__(self, model: nn.Module, client: StarLink, cfg: RunConfig) -> None:
        self.client = client
        params = params_of(model)
        self.anchor = Anchor(params)
        self.optimizer = outer_optimizer(cfg, self.anchor.params)
        self.star = StarCodec(param_names(model), [p.shape for p in params], cfg.codec, seed=cfg.seed)
        self.key = worker_key(client.worker_id)
        self.round_steps = cfg.round_steps
        self.cfg_round_steps = cfg.round_steps
        self.address = cfg.membership.address
        self.version = -1
        self.round = 0
        self.members: tuple[str, ...] = ()
        self.resyncs = 0
        self.overlap = isinstance(cfg.outer, DiLoCoConfig) and cfg.outer.overlap
        self.compass = cfg.membership.schedule == "compass"
        """membership.schedule = compass: rounds may be shorter than inner_steps, so the run lasts
        a number of rounds (the same versions for everyone), not of steps."""
        self.planned_rounds = max(1, cfg.steps // max(1, cfg.round_steps))
        self._in_round = 0
        """Inner steps of the round in progress."""
        self._base: Tensor | None = None
        """outer.overlap: the fp32 parameters this round started from."""
        self._buffers: list[Tensor] = []
        self._parity = 0
        self._pending: Future[_Outcome] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def due(self, step: int) -> bool:
        """The round ends after round_steps steps from its start (the coordinator may hand a
        joiner a shorter first round)."""
        self._in_round += 1
        return self._in_round >= self.round_steps

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        """JOIN and start from the coordinator's state, resumed or not: it holds the global state."""
        return joined_from(self.join(model))

    def reduce_grads(self, model: nn.Module) -> None:
        """Gradients stay local."""

    def describe(self) -> list[str]:
        return describe_groups(self.star.groups)

    @torch.no_grad()
    def join(self, model: nn.Module) -> wire.Message:
        """JOIN (or re-join) and start from the coordinator's state; error feedback starts empty."""
        welcome = self.client.join()
        self._adopt(welcome, model)
        self.star.reset_feedback()
        self._base = None  # outer.overlap: the next round's progress is measured from this state
        self._in_round = 0
        return welcome

    @torch.no_grad()
    def _adopt(self, msg: wire.Message, model: nn.Module) -> None:
        b = parse(StateBody, msg.body)
        adopt_parameters(self.anchor, msg.tensors, model)
        load_outer_state(self.optimizer, self.anchor.params, msg.tensors)
        self.version, self.round = b.version, b.round
        self.members = tuple(b.members)
        self.round_steps = b.inner_steps or self.round_steps
        if self.anchor.digest() != b.anchor_hash:
            raise ProtocolError("the state received from the coordinator does not match its hash")

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        self._in_round = 0
        if self.overlap:
            return self._sync_overlapped(model, tail)
        t0 = time.perf_counter()
        sent0, recv0 = self.client.counter.sent, self.client.counter.recv
        params = params_of(model)
        delta = self.anchor.pseudo_grad(params)
        tensors, body = self._push_of(delta, tail)
        outcome = self._exchange(tensors, body, self.version, self.anchor.digest())
        applied = self._apply(outcome, model)
        self.anchor.restore_into(params)
        return self._outcome_report(applied, t0, sent0, recv0, tail)

    def _push_of(self, delta: Tensor, tail: Tail) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The PUSH of a flat pseudo-gradient: its encoded tensors (error feedback moves here, on
        the caller's thread) and body."""
        contributes = tail.contributes and all_finite([delta])
        tensors = self.star.encode_push(self.anchor.split(delta), self.round, self.key, contributes=contributes)
        body = {
            "weight": tail.weight if contributes else 0.0,
            "contributes": contributes,
            "stop": tail.stop,
            "tokens": tail.tokens,
            "round": self.round,
            # the worker's speed, for STATUS and the round logs (which worker is slow)
            "steps": min(max(tail.steps, 0), MAX_COUNT),
            "inner_s": min(max(float(tail.inner_s), 0.0), MAX_SECONDS),
        }
        return tensors, body

    def _exchange(self, tensors: dict[str, Tensor], body: dict[str, Any], base: int, anchor: str) -> _Outcome:
        """Push and wait for the answer: network only, no state touched (outer.overlap runs it on
        a background thread). base / anchor: the version and hash the push was computed from."""
        try:
            return _Outcome(self.client.push(tensors, body, base=base))
        except (PeerLost, SyncTimeout) as e:
            log.warning("%s; re-joining", e)
        except wire.WireError as e:
            if e.code not in REJOIN_CODES:
                raise
            log.warning("the coordinator refused the push (%s: %s); re-joining", e.code, e)
        return self._rejoin_and_repush(tensors, body, base, anchor)

    def _apply(self, outcome: _Outcome, model: nn.Module) -> _Applied:
        """What the push's answer does to the anchor (and, on a catch-up, to the model)."""
        if outcome.welcome is not None:  # the coordinator moved on (or restarted): the round is lost
            self._adopt(outcome.welcome, model)
            return _Applied(None, "round lost", Failure.LOST)
        reply = outcome.reply
        if reply is None:
            return _Applied(None, "round lost", Failure.LOST)
        if reply.type == wire.MsgType.STATE:
            self._adopt(reply, model)
            return _Applied(None, "late: restarted from the coordinator's state", Failure.LATE)
        b = parse(RoundResultBody, reply.body)
        if b.committed:
            for a, g in zip(self.anchor.params, self.star.decode_mean(reply.tensors)):
                a.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.version, self.round = b.version, b.round + 1
        self.members = tuple(b.members)
        self.round_steps = b.inner_steps or self.round_steps
        digest = self.anchor.digest()  # once per round: the check, and the round's report
        if digest != b.anchor_hash:
            log.warning("anchor differs from the coordinator's after round %d: pulling its state", b.round)
            self.resyncs += 1
            self._adopt(self.client.pull(), model)
            digest = self.anchor.digest()
        failure: Failure | None = None
        if not b.committed:
            failure = Failure.REFUSED if b.participants or b.reason else Failure.NO_CONTRIBUTION
        return _Applied(b, b.reason, failure, digest)

    def _outcome_report(self, applied: _Applied, t0: float, sent0: int, recv0: int, tail: Tail) -> SyncReport:
        b = applied.result
        if b is None:
            return self._report(False, 0, t0, sent0, recv0, tail, reason=applied.reason, failure=applied.failure)
        return self._report(
            b.committed,
            b.participants,
            t0,
            sent0,
            recv0,
            tail,
            stop=tail.stop,  # a worker's Ctrl+C makes it leave; the others go on
            tokens=b.tokens,
            reason=applied.reason,
            failure=applied.failure,
            extra=_round_stats(b),
            anchor_hash=applied.digest,
        )

    @torch.no_grad()
    def _sync_overlapped(self, model: nn.Module, tail: Tail) -> SyncReport:
        """outer.overlap through the coordinator: the rule of the static world (docs/ALGORITHMS.md
        1.1.1). This round's progress is measured from where it started; the answer to the last
        round's push is applied (its outer step, or the coordinator's state on a catch-up); the
        progress moves onto the new anchor and is pushed in the background while the next round
        trains. The pushes carry the version they were computed from, as blocking pushes do, so
        the coordinator runs the same rounds. The last round (or a stop: the worker leaves) waits
        for its own push and ends on the anchor."""
        t0 = time.perf_counter()
        sent0, recv0 = self.client.counter.sent, self.client.counter.recv
        params = params_of(model)
        if self._base is None:
            self._base = self.anchor.flat.clone()
        if len(self._buffers) < 2:  # the push in flight owns one buffer, this round the other
            self._buffers = [self.anchor.empty_like(), self.anchor.empty_like()]
        delta = self.anchor.pseudo_grad(params, out=self._buffers[self._parity], base=self._base)
        self._parity ^= 1
        report: SyncReport | None = None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            report = self._outcome_report(self._apply(pending.result(), model), t0, sent0, recv0, tail)
        if not all_finite([delta]):
            delta.zero_()  # the local progress is lost: restart from the anchor
        if tail.last or tail.stop:
            tensors, body = self._push_of(delta, tail)
            applied = self._apply(self._exchange(tensors, body, self.version, self.anchor.digest()), model)
            self.anchor.restore_into(params)
            self._base.copy_(self.anchor.flat)
            last = self._outcome_report(applied, t0, sent0, recv0, tail)
            earlier = report.tokens if report is not None and report.committed else 0
            return dataclasses.replace(last, tokens=last.tokens + earlier)
        for a, d, b, p in zip(self.anchor.params, self.anchor.split(delta), self.anchor.split(self._base), params):
            torch.sub(a, d, out=b)
            p.copy_(b)
            if p.dtype != b.dtype:
                b.copy_(p)  # measure the next round's progress from what the model holds
        tensors, body = self._push_of(delta, tail)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="dilo-overlap")
        self._pending = self._pool.submit(self._exchange, tensors, body, self.version, self.anchor.digest())
        if report is None:
            report = self._report(True, 0, t0, sent0, recv0, tail, tokens=0,
                                  reason="first round of outer.overlap: its push runs behind the next")  # fmt: skip
        return dataclasses.replace(report, sync_s=time.perf_counter() - t0)

    def _rejoin_and_repush(self, tensors: dict[str, Tensor], body: dict[str, Any], base: int, anchor: str) -> _Outcome:
        """The coordinator restarted (or forgot us): re-join; if it is still at our state, push
        again, else hand back its WELCOME for the caller to adopt.

        A few tries: a heartbeat answered just before the JOIN can make the push that follows look
        lost once more (a not_member reply, or the old process's id, arriving late)."""
        for attempt in range(1, 4):
            welcome = self.client.join()
            w = parse(StateBody, welcome.body)
            # The version alone does not prove the same state: a coordinator restarted from an
            # older checkpoint (or none) reuses version numbers once another worker moved it on.
            if w.version != base or w.anchor_hash != anchor:
                return _Outcome(None, welcome)
            self.members = tuple(w.members)
            try:
                return _Outcome(self.client.push(tensors, body, base=base))
            except (PeerLost, SyncTimeout) as e:
                log.warning("push after re-joining failed (%s), try %d of 3", e, attempt)
            except wire.WireError as e:
                if e.code not in REJOIN_CODES:
                    raise
                log.warning("push after re-joining refused (%s), try %d of 3", e, attempt)
        # The round is lost for this worker; its next push is late and brings the current state.
        log.warning("the coordinator at %s kept losing this worker's push: the round is lost", self.address)
        return _Outcome(None)

    def _report(
        self,
        committed: bool,
        participants: int,
        t0: float,
        sent0: int,
        recv0: int,
        tail: Tail,
        reason: str = "",
        stop: bool | None = None,
        tokens: int | None = None,
        failure: Failure | None = None,
        extra: dict[str, Any] | None = None,
        anchor_hash: str | None = None,
    ) -> SyncReport:
        # compass: every worker ends at the planned version, and its lr schedule follows the rounds
        done = self.compass and self.version >= self.planned_rounds
        return SyncReport(
            committed=committed,
            participants=participants,
            done=done,
            schedule_step=self.version * self.cfg_round_steps if self.compass and self.version >= 0 else None,
            bytes_sent=self.client.counter.sent - sent0,
            bytes_recv=self.client.counter.recv - recv0,
            sync_s=time.perf_counter() - t0,
            stop=tail.stop if stop is None else stop,
            tokens=tail.tokens if tokens is None else tokens,
            reason=reason,
            failure=failure,
            anchor_hash=self.anchor.digest() if anchor_hash is None else anchor_hash,
            extra=extra or {},
        )

    def state_dict(self) -> dict[str, Any]:
        # the global state lives on the coordinator; a worker keeps only its error feedback
        return {"star": self.star.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.star.load_state_dict(state["star"])


def joined_from(welcome: wire.Message) -> Joined:
    """What a WELCOME says about the start: the island handed out, the version, the members."""
    b = parse(StateBody, welcome.body)
    return Joined(island=-1 if b.island is None else b.island, version=b.version, members=tuple(b.members))


def _round_stats(body: RoundResultBody) -> dict[str, Any]:
    """What the round log keeps of the coordinator's per-member statistics: each member's update
    norm and cosine to the mean, and who was left out for overflowing it."""
    if not body.member_stats:
        return {}
    out: dict[str, Any] = {
        "member_norms": {w: v.get("norm") for w, v in body.member_stats.items()},
        "member_cosines": {w: v.get("cos") for w, v in body.member_stats.items()},
    }
    speeds = {w: v["steps_per_s"] for w, v in body.member_stats.items() if v.get("steps_per_s") is not None}
    if speeds:
        out["member_steps_per_s"] = speeds
    return out
