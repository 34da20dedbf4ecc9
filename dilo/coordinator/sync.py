"""Synchronous star rounds (DiLoCo, FedAvg): the coordinator holds the global parameters and the
outer optimizer, and applies one outer step per round.

A round closes when every member of the round has pushed, or `round_timeout_s` after the first
push with at least `min_workers` pushes. The mean divides by the weights of the workers that
contributed. Pushes based on an older version are answered with the current state (and counted
as late); a joiner gets the current state at once and never blocks a round in progress. A worker
that leaves the view (LEAVE, or silence) is no longer waited for.

No round can make the global state non-finite: a push that overflows the mean is left out (and
named in the log, the RESULT and STATUS), and an outer step that would still produce NaN or Inf
is undone and the round is not committed. A committed version is checkpointed (every
`coordinator.checkpoint_every`) before any RESULT announces it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dilo import wire
from dilo.bodies import JoinBody, PushBody, RoundResultBody, dump
from dilo.coordinator.global_model import GlobalModel
from dilo.coordinator.policy import Member
from dilo.outer.aggregate import finite, member_stats, outliers
from dilo.outer.star import load_outer_state, outer_optimizer, outer_state_tensors

if TYPE_CHECKING:
    from dilo.coordinator.server import Coordinator

log = logging.getLogger("dilo.coordinator")


@dataclass
class Push:
    identity: bytes
    worker: str
    sid: str
    seq: int
    weight: float
    contributes: bool
    tokens: int
    loss: float
    flats: list[torch.Tensor] | None


@dataclass
class Round:
    index: int
    members: set[str]
    pushes: dict[str, Push] = field(default_factory=dict)
    first_push: float | None = None


class SyncRounds:
    """The RoundPolicy of DiLoCo and FedAvg."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.mcfg = coord.cfg.membership
        self.model = GlobalModel(coord.cfg)
        self.names, self.params, self.limits = self.model.names, self.model.params, self.model.limits
        self.star = self.model.star
        self.optimizer = outer_optimizer(coord.cfg, self.params)
        self.inner_steps = int(getattr(coord.cfg.outer, "inner_steps", 1))
        self.round = Round(0, set())
        self.speeds: dict[str, float] = {}
        """Inner steps per second of each member, from its last push that reported them."""

    # ------------------------------------------------------------------------------- events

    def check_join(self, body: JoinBody) -> None:
        pass

    def on_join(self, member: Member, identity: bytes, msg: wire.Message, body: JoinBody, *, new: bool) -> bool:
        return False  # welcomed at once; a joiner never blocks the round in progress

    def on_leave(self, worker: str) -> None:
        self.round.members.discard(worker)
        self.speeds.pop(worker, None)

    def handout(self, worker: str, msg_type: wire.MsgType, body: dict[str, Any]) -> wire.Message:
        return self.coord.state_message(msg_type, {"inner_steps": self.inner_steps, **body})

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.model.copies()
        tensors.update({k: v.clone() for k, v in outer_state_tensors(self.optimizer, self.params).items()})
        return tensors

    def peers(self) -> dict[str, str] | None:
        return None

    def excused(self, worker: str) -> bool:
        return False

    def on_push(self, identity: bytes, msg: wire.Message) -> None:
        coord = self.coord
        body = self.model.check_push(msg, PushBody, coord.version)
        if msg.base != coord.version:
            # a push for a round that already closed: the worker catches up from the current state
            coord.late += 1
            coord.send(identity, coord.state_message(wire.MsgType.STATE, {"reason": "late"}), msg.worker, to=msg)
            return
        flats = self.model.decode(msg) if body.contributes else None
        if not self.round.members:
            self.round.members = set(coord.members)
        now = coord.clock()
        self.round.first_push = self.round.first_push or now
        self.round.pushes[msg.worker] = Push(
            identity,
            msg.worker,
            msg.sid,
            msg.seq,
            body.weight,
            body.contributes and body.weight > 0,
            body.tokens,
            body.loss,
            flats,
        )
        coord.members[msg.worker].pushes += 1
        if body.steps > 0 and body.inner_s > 0:
            self.speeds[msg.worker] = body.steps / body.inner_s
        self.maybe_close(now)

    def tick(self, now: float) -> None:
        self.maybe_close(now)

    def next_deadline(self) -> float | None:
        if self.round.pushes and self.round.first_push is not None:
            return self.round.first_push + self.mcfg.round_timeout_s
        return None

    # ------------------------------------------------------------------------------- rounds

    def maybe_close(self, now: float) -> None:
        r = self.round
        if not r.pushes:
            return
        waiting = {w for w in r.members if w in self.coord.members} - set(r.pushes)
        timed_out = r.first_push is not None and now - r.first_push >= self.mcfg.round_timeout_s
        if waiting and not (timed_out and len(r.pushes) >= self.mcfg.min_workers):
            return
        if self.coord.version == 0 and len(r.pushes) < self.mcfg.start_quorum and not timed_out:
            return  # the first round waits for the expected workers (or its deadline)
        if waiting:
            log.warning("round %d closes at its deadline without %s", r.index, sorted(waiting))
        self.close()

    def close(self) -> None:
        """Close the round: the weighted mean of its contributions, one outer step, RESULT to every
        pusher (see the module docstring for what a round that overflows does)."""
        coord, r = self.coord, self.round
        contributors = [(w, p) for w, p in sorted(r.pushes.items()) if p.contributes and p.flats]
        tokens = sum(p.tokens for p in r.pushes.values())
        coord.global_tokens += tokens
        tensors: dict[str, torch.Tensor] = {}
        committed, reason = False, ""
        stats: dict[str, dict[str, float | None]] = {}
        left_out: list[str] = []
        try:
            means, left_out = self._finite_mean(contributors)
            if means is not None:
                stats = member_stats([(w, p.flats) for w, p in contributors if w not in left_out and p.flats], means)
                for w, s in stats.items():
                    s["steps_per_s"] = self._speed(w)
                tensors, reason = self._outer_step(means, r.index)
                committed = not reason
            elif contributors:
                reason = "every contribution overflowed the mean"
        except Exception as e:  # noqa: BLE001 - a round that cannot close must still answer its workers
            log.exception("round %d could not be closed; not committed", r.index)
            tensors, committed, reason = {}, False, f"internal error closing the round: {type(e).__name__}"
        if committed:
            coord.version += 1
        coord.last_round = {"round": r.index, "members": stats, "left_out": left_out, "reason": reason}
        result = RoundResultBody(
            version=coord.version,
            round=r.index,
            committed=committed,
            participants=len(contributors) - len(left_out) if committed else 0,
            tokens=tokens,
            anchor_hash=coord.anchor_hash(),
            inner_steps=self.inner_steps,
            members=sorted(coord.members),
            epoch=coord.epoch,
            boot=coord.boot,
            member_stats=stats,
            left_out=left_out,
            reason=reason,
        )
        coord.round_index += 1
        # the next round waits only for today's members: a worker joining later never blocks it
        self.round = Round(coord.round_index, set(coord.members))
        if committed:
            # Write-ahead: on disk before any worker sees the new version. Checkpointing after the
            # RESULTs left a window where a crash lost a version the workers had already moved to
            # (they then dropped the round they had trained on top of it too: two rounds lost).
            coord.checkpoint_due()
        body = dump(result)
        for w, p in sorted(r.pushes.items()):
            reply = wire.Message(type=wire.MsgType.RESULT, worker="coordinator", base=coord.version, body=body,
                                 tensors=tensors, sid=p.sid, seq=p.seq)  # fmt: skip
            coord.send(p.identity, reply, w)
        log.info("round %d closed: %d contributions, version %d", r.index, result.participants, coord.version)
        if reason:
            log.warning("round %d was not committed: %s", r.index, reason)
        if stats:
            log.info("round %d update norms %s", r.index, {w: s["norm"] for w, s in stats.items()})
        speeds = {w: self._speed(w) for w in sorted(r.pushes) if w in self.speeds}
        if speeds:
            slowest = min(speeds, key=lambda w: speeds[w] or 0.0)
            log.info("round %d steps/s %s (slowest: %s)", r.index, speeds, slowest)
        for w in outliers(stats):
            log.warning(
                "round %d: the update of %s stands out (norm %s, cosine to the mean %s): check that worker",
                r.index, w, stats[w]["norm"], stats[w]["cos"],
            )  # fmt: skip

    def _finite_mean(self, contributors: list[tuple[str, Push]]) -> tuple[list[torch.Tensor] | None, list[str]]:
        """The weighted mean of the contributions; while it is not finite, leave out the push with
        the largest weighted magnitude (the one that overflows the sum) and try again."""
        left: list[tuple[str, Push]] = list(contributors)
        out: list[str] = []
        while left:
            means = self.star.weighted_mean([(p.weight, p.flats) for _, p in left if p.flats])
            if finite(means):
                return means, out
            worker, _ = max(left, key=lambda wp: _magnitude(wp[1]))
            self.coord.rejects.reject(
                "overflow", f"round {self.round.index}: the push of {worker!r} overflows the mean"
            )
            log.error("round %d: the push of %s overflows the mean; it is left out", self.round.index, worker)
            out.append(worker)
            left = [(w, p) for w, p in left if w != worker]
        return None, out

    def _outer_step(self, means: list[torch.Tensor], round_idx: int) -> tuple[dict[str, torch.Tensor], str]:
        """Encode the mean, apply it with the outer optimizer: (the RESULT tensors, "") or, when the
        new state would not be finite, everything undone: ({}, why)."""
        params = self.model.snapshot()
        momentum = {k: v.clone() for k, v in outer_state_tensors(self.optimizer, self.params).items()}
        owners = [g.owner_residual for g in self.star.groups]  # encode_mean replaces, never mutates, them
        tensors = self.star.encode_mean(means, round_idx)
        for p, g in zip(self.params, self.star.decode_mean(tensors)):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.model.is_finite() and finite(list(outer_state_tensors(self.optimizer, self.params).values())):
            return tensors, ""
        self.model.restore(params)
        load_outer_state(self.optimizer, self.params, momentum)
        for group, owner in zip(self.star.groups, owners):
            group.owner_residual = owner
        why = "the outer step would make the global parameters non-finite"
        self.coord.rejects.reject("nonfinite_update", f"round {round_idx}: {why}; not committed")
        log.error("round %d: %s; the round is not committed", round_idx, why)
        return {}, why

    # ------------------------------------------------------------------------------- status, checkpoints

    def member_status(self, member: Member) -> dict[str, Any]:
        return {"steps_per_s": self._speed(member.worker)}

    def _speed(self, worker: str) -> float | None:
        """The worker's inner steps per second (3 decimals), None until it reported any."""
        speed = self.speeds.get(worker)
        return None if speed is None else round(speed, 3)

    def status(self) -> dict[str, Any]:
        return {"pending": sorted(self.round.pushes)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": [p.detach() for p in self.params],
            "outer": outer_state_tensors(self.optimizer, self.params),
            "star": self.star.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.restore(state["params"])
        load_outer_state(self.optimizer, self.params, state["outer"])
        self.star.load_state_dict(state["star"])
        self.round = Round(self.coord.round_index, set())


def _magnitude(p: Push) -> float:
    """weight x the largest |value| of a push, in float64: what it can add to a float32 sum."""
    return p.weight * max((float(f.abs().max()) for f in p.flats or [] if f.numel()), default=0.0)
