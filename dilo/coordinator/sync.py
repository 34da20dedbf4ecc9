"""Synchronous star rounds (DiLoCo, FedAvg): the coordinator holds the global parameters and the
outer optimizer, and applies one outer step per round.

A round closes when every member of the round has pushed, or `round_timeout_s` after the first
push with at least `min_workers` pushes. The mean divides by the weights of the workers that
contributed. A worker that starts from the current state mid-round (a joiner, a late worker) is
told to train only what the round's members have left of it (from their measured speed), so that
its first push counts with theirs instead of arriving late; with uniform weights it weighs its
share of a full round. Pushes based on an older version are answered with the current state (and counted
as late); a joiner gets the current state at once and never blocks a round in progress. A worker
that leaves the view (LEAVE, or silence) is no longer waited for.

The mean is folded in as pushes arrive (dilo/outer/aggregate.py `RunningMean`: float64, memory
O(model) whatever the number of workers); a second push of the same worker in a round only
changes where its RESULT goes. No round can make the global state non-finite: every decoded push
is finite, the float64 sum cannot overflow, and an outer step that would still produce NaN or Inf
is undone and the round is not committed. A committed version is checkpointed (every
`coordinator.checkpoint_every`) in the background, while the workers train the next round.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from dilo import wire
from dilo.bodies import JoinBody, PushBody, RoundResultBody, dump
from dilo.coordinator.global_model import GlobalModel
from dilo.coordinator.policy import Member
from dilo.outer.aggregate import RobustMean, RunningMean, finite, outliers
from dilo.outer.robust import build_aggregator
from dilo.outer.star import load_outer_state, outer_optimizer, outer_state_tensors

if TYPE_CHECKING:
    from dilo.coordinator.server import Coordinator

log = logging.getLogger("dilo.coordinator")

MAX_LATE = 8
"""membership.late_weight: pushes more versions behind than this are dropped."""


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


@dataclass
class Round:
    index: int
    members: set[str]
    mean: RunningMean
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
        self.sizes = [g.layout.total for g in self.star.groups]
        self._sum: RunningMean | None = None
        self.round = self._new_round(0, set())
        self.speeds: dict[str, float] = {}
        """Inner steps per second of each member, from its last push that reported them."""
        self.opened_at: float | None = None
        """When the round in progress opened (the previous one's RESULTs went out)."""
        self.catch_up: dict[str, int] = {}
        """Workers handed a shortened first round (see `_catch_up_steps`), and its steps."""
        self.uniform = getattr(coord.cfg.outer, "weighting", "uniform") == "uniform"
        self.compass = self.mcfg.schedule == "compass"
        self.arrivals: dict[str, float] = {}
        """backup_workers = auto: each member's running mean arrival, seconds after a round opened."""
        self.participation = Participation(self.mcfg.participation_cap) if self.mcfg.participation == "fedau" else None

    # ------------------------------------------------------------------------------- events

    def check_join(self, body: JoinBody) -> None:
        pass

    def on_join(self, member: Member, identity: bytes, msg: wire.Message, body: JoinBody, *, new: bool) -> bool:
        return False  # welcomed at once; a joiner never blocks the round in progress

    def on_leave(self, worker: str) -> None:
        self.arrivals.pop(worker, None)
        self.round.members.discard(worker)
        self.speeds.pop(worker, None)
        self.catch_up.pop(worker, None)

    def handout(self, worker: str, msg_type: wire.MsgType, body: dict[str, Any]) -> wire.Message:
        steps = self._catch_up_steps()
        if steps < self.inner_steps:
            self.catch_up[worker] = steps
        else:
            self.catch_up.pop(worker, None)
        return self.coord.state_message(msg_type, {"inner_steps": steps, **body})

    def _backups(self, members: set[str]) -> int:
        """How many members a round may close without (membership.backup_workers); "auto": those
        whose expected arrival (a running mean of their arrivals after the round opened) is later
        than twice the median member's."""
        b = self.mcfg.backup_workers
        if b != "auto":
            return b
        expected = [self.arrivals[w] for w in members if w in self.arrivals]
        if len(expected) < 2:
            return 0
        median = statistics.median(expected)
        return sum(1 for t in expected if t > 2 * median)

    def _arrived(self, worker: str, now: float) -> None:
        """backup_workers = auto: this member's arrival, seconds after the round opened."""
        if self.opened_at is None:
            return
        t = now - self.opened_at
        self.arrivals[worker] = t if worker not in self.arrivals else 0.5 * self.arrivals[worker] + 0.5 * t

    def _compass_steps(self, worker: str) -> int:
        """membership.schedule = compass: the next round's steps for `worker`, in proportion to its
        measured speed (the fastest member trains outer.inner_steps), at least min_steps_ratio of
        them; a full round while its speed is unknown."""
        h = self.inner_steps
        fastest = max(self.speeds.values(), default=0.0)
        mine = self.speeds.get(worker)
        if mine is None or fastest <= 0:
            return h
        fewest = max(1, math.ceil(h * self.mcfg.min_steps_ratio))
        return max(fewest, min(h, round(h * mine / fastest)))

    def _catch_up_steps(self) -> int:
        """Inner steps for a worker that starts from the current state now (a joiner, a late or
        lost worker catching up): what the round's members have left of it, from the time since
        the round opened and their measured speed, so that its push arrives with theirs and
        counts instead of being late. A full round when nothing is known yet."""
        h = self.inner_steps
        speeds = [self.speeds[w] for w in sorted(self.round.members or self.coord.members) if w in self.speeds]
        if self.opened_at is None or not speeds:
            return h
        done = (self.coord.clock() - self.opened_at) * statistics.median(speeds)
        return max(1, min(h, round(h - done)))

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
            # a push for a round that already closed: the worker catches up from the current state,
            # and with membership.late_weight its update still counts, discounted, in the open round
            coord.late += 1
            self._fold_late(msg, body)
            coord.send(identity, coord.state_message(wire.MsgType.STATE, {"reason": "late"}), msg.worker, to=msg)
            return
        r = self.round
        contributes = body.contributes and body.weight > 0
        weight = body.weight
        if self.uniform and (msg.worker in self.catch_up or self.compass):
            # a catch-up or scheduled round weighs its share of a full round (token weights already say so)
            weight *= min(1.0, max(body.steps, 1) / self.inner_steps)
        if self.participation is not None:  # FedAU: the mean interval between its participations
            weight *= self.participation.weight(msg.worker)
        if contributes and msg.worker not in r.pushes:
            r.mean.add(msg.worker, weight, self.model.decode(msg))  # decode raises before any change
            self.catch_up.pop(msg.worker, None)
        if not r.members:
            r.members = set(coord.members)
        now = coord.clock()
        self._arrived(msg.worker, now)
        r.first_push = r.first_push or now
        push = Push(identity, msg.worker, msg.sid, msg.seq, body.weight, contributes, body.tokens, body.loss)
        first = r.pushes.setdefault(msg.worker, push)
        if first is not push:  # counted once: the second push only says where the RESULT goes
            first.identity, first.sid, first.seq = push.identity, push.sid, push.seq
        coord.members[msg.worker].pushes += 1
        if body.steps > 0 and body.inner_s > 0:
            self.speeds[msg.worker] = body.steps / body.inner_s
        self.maybe_close(now)

    def _fold_late(self, msg: wire.Message, body: PushBody) -> None:
        """membership.late_weight: a late push joins the open round with weight w * late_weight ** s
        (s: versions behind, at most MAX_LATE), under a name of its own (it owes no RESULT)."""
        staleness = self.coord.version - msg.base
        if self.mcfg.late_weight <= 0 or not body.contributes or body.weight <= 0 or staleness > MAX_LATE:
            return
        name = f"{msg.worker}@v{msg.base}"
        if name in self.round.mean.members:
            return
        self.round.mean.add(name, body.weight * self.mcfg.late_weight**staleness, self.model.decode(msg))
        self.coord.late_folded += 1

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
        # semi-synchronous (membership.backup_workers = b): the round needs all but b of its members
        enough = len(waiting) <= self._backups(r.members) and len(r.pushes) >= self.mcfg.min_workers
        if waiting and not enough and not (timed_out and len(r.pushes) >= self.mcfg.min_workers):
            return
        if self.coord.version == 0 and len(r.pushes) < self.mcfg.start_quorum and not timed_out:
            return  # the first round waits for the expected workers (or its deadline)
        if waiting and not enough:
            log.warning("round %d closes at its deadline without %s", r.index, sorted(waiting))
        elif waiting:
            log.info("round %d closes without its %d slowest members %s", r.index, len(waiting), sorted(waiting))
        self.close()

    def close(self) -> None:
        """Close the round: the weighted mean of its contributions, one outer step, RESULT to every
        pusher (see the module docstring for what a round that overflows does)."""
        coord, r = self.coord, self.round
        contributors = r.mean.members
        tokens = sum(p.tokens for p in r.pushes.values())
        coord.global_tokens += tokens
        tensors: dict[str, torch.Tensor] = {}
        committed, reason = False, ""
        stats: dict[str, dict[str, float | None]] = {}
        try:
            if contributors:
                stats = r.mean.stats()
                for w, s in stats.items():
                    s["steps_per_s"] = self._speed(w)
                tensors, reason = self._outer_step(r.mean.mean(), r.index)
                committed = not reason
        except Exception as e:  # noqa: BLE001 - a round that cannot close must still answer its workers
            log.exception("round %d could not be closed; not committed", r.index)
            tensors, committed, reason = {}, False, f"internal error closing the round: {type(e).__name__}"
        if committed:
            coord.version += 1
            if self.participation is not None:  # late updates folded in (name@v<base>) are not members
                self.participation.seen(r.index, [w for w in contributors if w in r.pushes], set(coord.members))
        coord.last_round = {"round": r.index, "members": stats, "reason": reason}
        result = RoundResultBody(
            version=coord.version,
            round=r.index,
            committed=committed,
            participants=len(contributors) if committed else 0,
            tokens=tokens,
            anchor_hash=coord.anchor_hash(),
            inner_steps=self.inner_steps,
            members=sorted(coord.members),
            epoch=coord.epoch,
            boot=coord.boot,
            member_stats=stats,
            reason=reason,
        )
        coord.round_index += 1
        # the next round waits only for today's members: a worker joining later never blocks it
        self.round = self._new_round(coord.round_index, set(coord.members))
        self.opened_at = coord.clock()
        if committed:
            coord.checkpoint_due()  # a memory copy here; the files are written behind the next round
        body = dump(result)
        for w, p in sorted(r.pushes.items()):
            mine = body if not self.compass else dump(result.model_copy(update={"inner_steps": self._compass_steps(w)}))
            reply = wire.Message(type=wire.MsgType.RESULT, worker="coordinator", base=coord.version, body=mine,
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
        fedau = {"weight": round(self.participation.weight(member.worker), 4)} if self.participation else {}
        return {"steps_per_s": self._speed(member.worker), **fedau}

    def _speed(self, worker: str) -> float | None:
        """The worker's inner steps per second (3 decimals), None until it reported any."""
        speed = self.speeds.get(worker)
        return None if speed is None else round(speed, 3)

    def status(self) -> dict[str, Any]:
        fedau = {"participation_weights": self.participation.weights()} if self.participation else {}
        return {"pending": sorted(self.round.pushes), **fedau}

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": [p.detach() for p in self.params],
            "outer": outer_state_tensors(self.optimizer, self.params),
            "star": self.star.state_dict(),
            **({"participation": self.participation.state_dict()} if self.participation is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.restore(state["params"])
        load_outer_state(self.optimizer, self.params, state["outer"])
        self.star.load_state_dict(state["star"])
        if self.participation is not None and "participation" in state:
            self.participation.load_state_dict(state["participation"])
        self.round = self._new_round(self.coord.round_index, set())

    def _new_round(self, index: int, members: set[str]) -> Round:
        """The next round, folding into the same buffers (the last round's mean is applied by now)."""
        if self._sum is None:
            aggregator = build_aggregator(self.coord.cfg.aggregate)  # [aggregate]: None for the plain mean
            self._sum = RunningMean(self.sizes) if aggregator is None else RobustMean(self.sizes, aggregator)
        self._sum.reset()
        return Round(index, members, self._sum)


class Participation:
    """FedAU's online estimate of each member's participation (Wang & Ji, arXiv:2306.03401): the
    mean length, in committed rounds, of the intervals between two of its participations (each
    capped), which is about 1 / its participation rate; used as its update's weight."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.since: dict[str, int] = {}
        """Rounds since the member last took part (counted while it is a member)."""
        self.intervals: dict[str, tuple[int, float]] = {}
        """Per member: (intervals seen, their mean)."""

    def weight(self, worker: str) -> float:
        return self.intervals.get(worker, (0, 1.0))[1]

    def weights(self) -> dict[str, float]:
        """Every worker seen so far and its current weight (`dilo status`)."""
        return {w: round(self.weight(w), 4) for w in sorted(set(self.since) | set(self.intervals))}

    def seen(self, round_idx: int, contributors: list[str], members: set[str]) -> None:
        """A committed round: the contributors' intervals end, every other known worker's grows
        (a member that left and came back was absent all that time)."""
        for w in members | set(contributors) | set(self.since) | set(self.intervals):
            self.since[w] = self.since.get(w, 0) + 1
        for w in contributors:
            interval = min(self.since.pop(w), self.cap)
            n, mean = self.intervals.get(w, (0, 1.0))
            self.intervals[w] = (n + 1, mean + (interval - mean) / (n + 1))

    def state_dict(self) -> dict[str, Any]:
        return {"since": dict(self.since), "intervals": {w: list(v) for w, v in self.intervals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.since = {w: int(v) for w, v in state["since"].items()}
        self.intervals = {w: (int(v[0]), float(v[1])) for w, v in state["intervals"].items()}
