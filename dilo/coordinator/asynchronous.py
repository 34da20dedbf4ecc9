"""Async local SGD: no rounds, every push is applied on arrival.

The server rule of dilo/outer/server.py (delayed Nesterov, naive Nesterov, FedBuff, FedAsync)
applies each push; its RESULT carries the fresh parameters, the pusher's staleness and the
number of inner steps it should run next (DyLU: in proportion to its measured speed). The run
ends when the workers together have trained `steps * workers` inner steps, the compute of a
synchronous run of the same config; each worker's last RESULT says `done`.

Async runs start together: the WELCOMEs wait for `start_quorum` joiners (or `round_timeout_s`
after the first), so that the first worker up does not spend the budget alone. With
`grace_s` > 0 the RESULTs are held until the grace period ends, so that whoever finishes within
it restarts from the same parameters. FedAsync mixes a push into the version it was based on:
the parameters of every version a worker still holds are kept for it.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

from dilo import wire
from dilo.bodies import AsyncPushBody, AsyncResultBody, JoinBody, StateBody
from dilo.config import AsyncConfig
from dilo.coordinator.global_model import GlobalModel
from dilo.coordinator.policy import Member
from dilo.outer.server import build_rule, dylu_steps

if TYPE_CHECKING:
    from dilo.coordinator.server import Coordinator

log = logging.getLogger("dilo.coordinator")


class AsyncPushes:
    """The RoundPolicy of async local SGD."""

    def __init__(self, coord: Coordinator, acfg: AsyncConfig) -> None:
        self.coord = coord
        self.acfg = acfg
        self.mcfg = coord.cfg.membership
        self.model = GlobalModel(coord.cfg)
        self.names, self.params, self.limits = self.model.names, self.model.params, self.model.limits
        self.star = self.model.star
        self.rule = build_rule(acfg, [p.data for p in self.params], 1)
        self.speeds: dict[str, float] = {}
        """Measured speed of each member, inner steps per second."""
        self.in_flight: dict[str, int] = {}
        """Steps assigned to each member and not yet pushed."""
        self.budget = coord.cfg.steps * coord.cfg.workers
        self.steps_done = 0
        self.applied = 0
        self.dropped = 0
        self.staleness: Counter[int] = Counter()
        """How many applied pushes had each staleness."""
        self.snapshots: dict[int, list[torch.Tensor]] = {}
        """Parameters of versions still held by a worker (FedAsync mixes them)."""
        self.grace: list[tuple[bytes, str, wire.Message, dict[str, Any]]] = []
        """RESULTs held until the grace period ends: (socket, worker, request, body)."""
        self.grace_until: float | None = None
        self.started = self.mcfg.start_quorum <= 1
        self.waiting: dict[str, tuple[bytes, wire.Message]] = {}
        """Joiners whose WELCOME waits for start_quorum (their socket and JOIN)."""
        self.start_deadline: float | None = None

    # ------------------------------------------------------------------------------- membership

    def check_join(self, body: JoinBody) -> None:
        pass

    def on_join(self, member: Member, identity: bytes, msg: wire.Message, body: JoinBody, *, new: bool) -> bool:
        if new:
            self.rule.set_workers(len(self.coord.members))
        if self.started:
            return False
        self.waiting[member.worker] = (identity, msg)  # a re-sent JOIN comes from a new socket
        self.start_deadline = self.start_deadline or self.coord.clock() + self.mcfg.round_timeout_s
        if len(self.coord.members) >= self.mcfg.start_quorum:
            self._start()
        return True

    def _start(self) -> None:
        self.started = True
        waiting, self.waiting = self.waiting, {}
        log.info("starting with %d workers", len(waiting))
        for worker, (identity, join) in sorted(waiting.items()):
            if worker in self.coord.members:
                self.coord.send(identity, self.coord.handout(worker, wire.MsgType.WELCOME), worker, to=join)

    def on_leave(self, worker: str) -> None:
        self.in_flight.pop(worker, None)
        self.speeds.pop(worker, None)
        self.grace = [g for g in self.grace if g[1] != worker]
        self.rule.set_workers(max(1, len(self.coord.members)))
        self._prune_snapshots()

    def excused(self, worker: str) -> bool:
        return worker in self.waiting

    def peers(self) -> dict[str, str] | None:
        return None

    # ------------------------------------------------------------------------------- state handed out

    def handout(self, worker: str, msg_type: wire.MsgType, body: dict[str, Any]) -> wire.Message:
        """The current state with the worker's next step assignment, a version it now holds."""
        steps = self._assign(worker)
        self._hold(worker)
        return self.coord.state_message(
            msg_type,
            {
                "inner_steps": max(steps, 1),
                "done": steps == 0,
                "schedule_step": self.steps_done // max(1, self.coord.cfg.workers),
                "world_tokens": self.coord.global_tokens,
                **body,
            },
            model=AsyncResultBody if msg_type == wire.MsgType.RESULT else StateBody,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.model.copies()

    def _assign(self, worker: str) -> int:
        """Inner steps for the worker's next round: DyLU share of H, capped by the budget left (0: done)."""
        h = self.acfg.inner_steps
        steps = h
        if self.acfg.dylu:
            known = {w: v for w, v in self.speeds.items() if w in self.coord.members}
            steps = dylu_steps({**known, worker: known.get(worker, 0.0)}, h)[worker]
        self.in_flight.pop(worker, None)
        left = self.budget - self.steps_done - sum(self.in_flight.values())
        steps = max(0, min(steps, left))
        if steps:
            self.in_flight[worker] = steps
        return steps

    def _hold(self, worker: str) -> None:
        """The worker now holds the current version: keep its parameters while FedAsync may need them."""
        version = self.coord.version
        if worker in self.coord.members:
            self.coord.members[worker].holds = version
        if self.rule.needs_base and version not in self.snapshots:
            self.snapshots[version] = self.model.snapshot()
        self._prune_snapshots()

    def _prune_snapshots(self) -> None:
        held = {m.holds for m in self.coord.members.values()}
        for v in [v for v in self.snapshots if v not in held]:
            del self.snapshots[v]

    # ------------------------------------------------------------------------------- pushes

    def on_push(self, identity: bytes, msg: wire.Message) -> None:
        """Apply one push at once; answer with the fresh parameters and the next step count."""
        coord = self.coord
        member = coord.members[msg.worker]
        body = self.model.check_push(msg, AsyncPushBody, coord.version)
        # a push may claim the steps it was assigned (after a restart, one round's worth)
        most = max(self.in_flight.get(msg.worker, 0), self.acfg.inner_steps)
        if body.steps > most:
            raise wire.WireError("bad_body", f"PUSH body: steps: {body.steps} is more than the {most} assigned")
        if not 0 <= msg.base <= coord.version:
            raise wire.WireError("bad_base", f"base version {msg.base} is not one this coordinator handed out")
        staleness = coord.version - msg.base
        base = None
        if body.contributes and self.rule.needs_base:
            base = self.snapshots.get(msg.base)
            if base is None:  # a worker pushing on a version it never got from us (or a resumed run)
                raise wire.WireError("bad_base", f"version {msg.base} is unknown here: pull the current state")
        flats = self.model.decode(msg) if body.contributes else None
        # the work is done either way: it counts against the budget, and it measured the speed
        self.in_flight.pop(msg.worker, None)
        self.steps_done += body.steps
        coord.global_tokens += body.tokens
        if body.steps > 0 and body.inner_s > 0:
            self.speeds[msg.worker] = body.steps / body.inner_s
        member.pushes += 1
        limit = self.acfg.max_staleness
        dropped = bool(limit and staleness > limit)
        applied, refused = False, ""
        if dropped:
            self.dropped += 1
            log.info("dropped a push of %s: staleness %d > %d", msg.worker, staleness, limit)
        elif flats is not None and body.weight > 0:
            applied, refused = self._apply(msg.worker, flats, staleness, body.weight, base)
            if not refused:
                member.staleness[staleness] += 1
                self.staleness[staleness] += 1
                self.applied += 1
            if applied:
                coord.version += 1
                coord.checkpoint_due()
        reply: dict[str, Any] = {"staleness": staleness, "applied": applied, "dropped": dropped}
        if refused:
            reply["refused"] = refused
        if self.acfg.grace_s > 0:
            # hold the reply: whoever else finishes within grace_s restarts from the same parameters
            if self.grace_until is None:
                self.grace_until = coord.clock() + self.acfg.grace_s
            self.grace.append((identity, msg.worker, _reply_to(msg), reply))
            return
        self._result(identity, msg.worker, msg, reply)

    def _apply(
        self, worker: str, flats: list[torch.Tensor], staleness: int, weight: float, base: list[torch.Tensor] | None
    ) -> tuple[bool, str]:
        """The rule applies the push: (whether a new version was made, why it was refused or "")."""
        g = [t.contiguous() for t in self.star.split(flats)]
        saved = (self.model.snapshot(), self.rule.state_dict())
        applied = self.rule.push(g, staleness=staleness, weight=weight, base=base)
        if self.model.is_finite():
            return applied, ""
        # the rule's arithmetic overflowed: nothing of this push may reach the global state
        self.model.restore(saved[0])
        self.rule.load_state_dict(saved[1])
        refused = "the update would make the global parameters non-finite"
        self.coord.rejects.reject("nonfinite_update", f"push of {worker!r}: {refused}; not applied")
        return False, refused

    def _result(self, identity: bytes, worker: str, to: wire.Message, body: dict[str, Any]) -> None:
        self.coord.send(identity, self.coord.handout(worker, wire.MsgType.RESULT, body), worker, to=to)

    def _release_grace(self) -> None:
        held, self.grace, self.grace_until = self.grace, [], None
        for identity, worker, to, body in held:
            if worker in self.coord.members:
                self._result(identity, worker, to, body)

    # ------------------------------------------------------------------------------- timer

    def tick(self, now: float) -> None:
        if self.waiting and self.start_deadline is not None and now >= self.start_deadline:
            self._start()
        if self.grace_until is not None and now >= self.grace_until:
            self._release_grace()

    def next_deadline(self) -> float | None:
        times = [t for t in (self.start_deadline if self.waiting else None, self.grace_until) if t is not None]
        return min(times) if times else None

    # ------------------------------------------------------------------------------- status, checkpoints

    def member_status(self, member: Member) -> dict[str, Any]:
        return {
            "steps_per_s": round(self.speeds.get(member.worker, 0.0), 3),
            "mean_staleness": _mean_of(member.staleness),
            "max_staleness": max(member.staleness, default=None),
        }

    def status(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "dropped": self.dropped,
            "steps": self.steps_done,
            "budget": self.budget,
            "staleness": {
                "mean": _mean_of(self.staleness) or 0.0,
                "max": max(self.staleness, default=0),
                "histogram": {str(k): n for k, n in sorted(self.staleness.items())},
            },
            "pending": [],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": [p.detach() for p in self.params],
            "outer": self.rule.state_dict(),
            "star": self.star.state_dict(),
            "async": {
                "steps": self.steps_done,
                "applied": self.applied,
                "dropped": self.dropped,
                "speeds": self.speeds,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.restore(state["params"])
        self.rule.load_state_dict(state["outer"])
        a = state["async"]
        self.steps_done, self.applied, self.dropped = int(a["steps"]), int(a["applied"]), int(a["dropped"])
        self.speeds = dict(a["speeds"])
        self.star.load_state_dict(state["star"])
        self.started = True
        self.rule.set_workers(max(1, len(self.coord.members)))


def _mean_of(histogram: Counter[int]) -> float | None:
    n = sum(histogram.values())
    return round(sum(k * c for k, c in histogram.items()) / n, 3) if n else None


def _reply_to(msg: wire.Message) -> wire.Message:
    """What a held reply needs of its request (session and seq), without the request's tensors."""
    return wire.Message(type=msg.type, worker=msg.worker, sid=msg.sid, seq=msg.seq)
