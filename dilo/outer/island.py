"""Islands of several ranks: one model replica trained by a data-parallel group, one worker of
the global world.

An island is a torchrun group, say the eight GPUs of a node. Inside it, gradients are averaged
over the island's ranks after every backward pass (data parallelism over NCCL or Gloo), so every
rank holds the same parameters and the same inner optimizer state. At the end of a round only
the island's lead rank (local rank 0) runs the outer strategy against the other islands; it then
broadcasts the resulting parameters and the round's outcome to its island:

    island = IslandSync(model, group, strategy if group.rank == 0 else None)
    island.start(model, resumed=False)   # the lead joins / broadcasts, then the island takes its parameters
    inner.step(next_batch, grad_hook=island.reduce_grads)
    if island.due(step):                 # the lead's strategy decides, the others follow
        report = island.sync(model, tail=tail)

The strategy on the lead rank does not know that it leads an island: DiLoCo, FedAvg, the elastic
star and async local SGD run unchanged, and only the lead rank's traffic leaves the island.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from dilo.errors import DiloError
from dilo.outer.base import (
    FlatLayout,
    Joined,
    Strategy,
    SyncReport,
    Tail,
    broadcast_params,
    params_of,
    tensor_digest,
)
from dilo.outer.ddp import DDP
from dilo.transport.base import Transport

log = logging.getLogger("dilo.outer.island")

# the round's outcome, as the lead rank broadcasts it (float64: exact for every integer below 2**53)
(
    H_FAILED,
    H_COMMITTED,
    H_PARTICIPANTS,
    H_SENT,
    H_RECV,
    H_STOP,
    H_TOKENS,
    H_VERSION,
    H_DONE,
    H_STALENESS,
    H_SCHEDULE,
    H_ROUND_STEPS,
    H_HASH_HI,
    H_HASH_LO,
) = range(14)
HEADER_LEN = 14
REASON_BYTES = 240


class IslandSync:
    """The outer strategy of an island, seen from any of its ranks.

    group: the island's own transport (rank 0 leads). outer: the strategy against the other
    islands, on the lead rank only (None elsewhere)."""

    def __init__(self, model: nn.Module, group: Transport, outer: Strategy | None, *, bucket_mb: float = 32.0) -> None:
        if (group.rank == 0) != (outer is not None):
            raise ValueError("the island's lead rank (local rank 0), and only it, runs the outer strategy")
        self.group = group
        self.outer = outer
        self.lead = outer is not None
        self._grads = DDP(model, group, log_every=1, bucket_mb=bucket_mb)
        self.layout = self._grads.layout
        self._round_steps = 0
        """A follower's copy of the lead's round length (the lead asks its strategy)."""

    # ------------------------------------------------------------------------------------------
    # inside the island

    def reduce_grads(self, model: nn.Module) -> None:
        """Average the gradients over the island's ranks (after every backward pass)."""
        self._grads.reduce_grads(model)

    def due(self, step: int) -> bool:
        """The lead rank's strategy decides when a round ends (async: the coordinator assigns each
        round's length), and the island follows: one tiny broadcast per step."""
        flag = torch.zeros(1, dtype=torch.float64)
        if self.outer is not None:
            flag[0] = float(self.outer.due(step))
        self.group.broadcast_([flag], src=0)
        return bool(flag[0])

    def share(self, model: nn.Module, values: list[float]) -> list[float]:
        """Give every rank the lead rank's parameters and a few numbers (after a join, at start)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self.group.broadcast_([t], src=0)
        self._spread(model)
        return [float(v) for v in t]

    def _collect(self, model: nn.Module) -> nn.Module:
        """What the lead's strategy runs on: the model itself (every rank holds all of it)."""
        return model

    def _spread(self, model: nn.Module) -> None:
        """Give every rank the parameters the lead's strategy left."""
        broadcast_params(model, self.layout, self.group, 0)

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        """The lead rank starts its strategy (a static broadcast across islands, a JOIN), then the
        island takes the lead's parameters and what it learnt (the island handed out, the version).
        A lead that fails to start tells its followers, which raise too instead of waiting."""
        joined = Joined()
        failure: BaseException | None = None
        lead_view = self._collect(model)
        if self.outer is not None:
            try:
                joined = self.outer.start(lead_view, resumed=resumed)
            except BaseException as e:  # an island's followers must hear of it, not wait for a timeout
                failure = e
        island, version, failed = self.share(model, [joined.island, joined.version, failure is not None])
        if failure is not None:
            raise failure
        if failed:
            raise DiloError("the island's lead rank could not start (its log says why); stopping this rank")
        return Joined(island=int(island), version=int(version), members=joined.members, extra=joined.extra)

    def describe(self) -> list[str]:
        """The lead rank's exchange plan; a follower sends nothing to other islands."""
        return self.outer.describe() if self.outer is not None else []

    # ------------------------------------------------------------------------------------------
    # across islands

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        stop = torch.tensor([float(tail.stop)], dtype=torch.float64)
        self.group.all_reduce_([stop])  # any rank of the island may have been asked to stop
        tail.stop = bool(stop[0] > 0)
        header = torch.zeros(HEADER_LEN, dtype=torch.float64)
        reason = torch.zeros(REASON_BYTES, dtype=torch.uint8)
        report: SyncReport | None = None
        failure: BaseException | None = None
        lead_view = self._collect(model)
        if self.outer is not None:
            try:
                report = self.outer.sync(lead_view, tail=tail)
                _write_header(header, report, self.outer.round_steps)
                text = report.reason.encode()[:REASON_BYTES]
                reason[: len(text)] = torch.tensor(list(text), dtype=torch.uint8)
            except BaseException as e:  # the followers must not wait for a round that never ends
                failure = e
                header[H_FAILED] = 1.0
        self.group.broadcast_([header, reason], src=0)
        if failure is not None:
            raise failure
        if header[H_FAILED] > 0:
            raise DiloError("the island's lead rank failed in the outer step (its log says why); stopping this rank")
        self._spread(model)
        if report is not None:
            return report
        self._round_steps = int(header[H_ROUND_STEPS])
        why = bytes(reason.tolist()).rstrip(b"\0").decode(errors="replace")
        return _read_header(header, why, self._digest(model))

    def _digest(self, model: nn.Module) -> str:
        """A follower's fallback anchor hash (the lead's header carries the island's)."""
        return tensor_digest(params_of(model))

    @property
    def round_steps(self) -> int:
        return self.outer.round_steps if self.outer is not None else self._round_steps

    def state_dict(self) -> dict[str, Any]:
        return {"lead": self.outer.state_dict()} if self.outer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ("lead" in state) != self.lead:
            raise DiloError(
                "this checkpoint was written by an island rank with another role (lead or follower); "
                "resume with the same island layout (transport.island_ranks, ranks per node)"
            )
        if self.outer is not None:
            self.outer.load_state_dict(state["lead"])


def _write_header(h: torch.Tensor, r: SyncReport, round_steps: int) -> None:
    h[H_COMMITTED] = float(r.committed)
    h[H_PARTICIPANTS] = r.participants
    h[H_SENT], h[H_RECV] = r.bytes_sent, r.bytes_recv
    h[H_STOP] = float(r.stop)
    h[H_TOKENS] = r.tokens
    h[H_VERSION] = r.version
    h[H_DONE] = float(r.done)
    h[H_STALENESS] = -1 if r.staleness is None else r.staleness
    h[H_SCHEDULE] = -1 if r.schedule_step is None else r.schedule_step
    h[H_ROUND_STEPS] = round_steps
    # the lead's anchor hash (64 bits as two exact 32-bit halves): a follower's parameters need not
    # be the anchor (outer.overlap, Streaming DiLoCo), so it reports the island's anchor, not its own
    digest = int(r.anchor_hash, 16) if r.anchor_hash else -1
    h[H_HASH_HI], h[H_HASH_LO] = (-1, -1) if digest < 0 else (digest >> 32, digest & 0xFFFFFFFF)


def _read_header(h: torch.Tensor, reason: str, anchor_hash: str) -> SyncReport:
    committed = bool(h[H_COMMITTED] > 0)
    if h[H_HASH_HI] >= 0:
        anchor_hash = f"{(int(h[H_HASH_HI]) << 32) | int(h[H_HASH_LO]):016x}"
    return SyncReport(
        committed=committed,
        participants=int(h[H_PARTICIPANTS]),
        # a follower's own traffic to other islands is nil; the island's is on the lead rank's log
        bytes_sent=0,
        bytes_recv=0,
        sync_s=0.0,
        stop=bool(h[H_STOP] > 0),
        tokens=int(h[H_TOKENS]),
        reason=reason,
        anchor_hash=anchor_hash,
        version=int(h[H_VERSION]),
        done=bool(h[H_DONE] > 0),
        staleness=None if h[H_STALENESS] < 0 else int(h[H_STALENESS]),
        schedule_step=None if h[H_SCHEDULE] < 0 else int(h[H_SCHEDULE]),
    )


class IslandShares:
    """transport.island_wire = "all": the island's exchange over all of its ranks.

    Every rank runs the outer strategy on its share of the parameters (`adapters.share_view`:
    about 1/N of the elements each) against the same local rank of the other islands, over a
    group of its own, so the N exchanges run in parallel on N links; then each rank broadcasts its
    share's new parameters to its island, and every rank holds the whole model again. Within the
    island the parameters were equal before (data parallelism), so each share's pseudo-gradient
    is the island's own: the result is the lead-only exchange's, bit for bit."""

    def __init__(
        self, model: nn.Module, view: nn.Module, part: nn.Module, group: Transport, share: Strategy, *, bucket_mb: float
    ) -> None:
        """view: the parameters the island exchanges (outer.local left out); part: this rank's
        share of them (`adapters.share_view`), which `share` runs on."""
        from dilo.adapters import share_owners

        shares = group.size
        self.group = group
        self.outer = share
        self.part = part
        params = params_of(view)
        owner = share_owners([p.numel() for p in params], shares)
        self.owned = [[p for p, o in zip(params, owner) if o == r] for r in range(shares)]
        self.layouts = [FlatLayout.of(ps, bucket_mb) for ps in self.owned]
        self.view = view
        self._grads = DDP(model, group, log_every=1, bucket_mb=bucket_mb)

    @property
    def round_steps(self) -> int:
        return self.outer.round_steps

    def reduce_grads(self, model: nn.Module) -> None:
        self._grads.reduce_grads(model)

    def due(self, step: int) -> bool:
        """Every rank's strategy counts the same steps: they agree without a message."""
        return self.outer.due(step)

    @torch.no_grad()
    def gather(self) -> None:
        """Every rank's share, broadcast by its owner to the island."""
        for r, (params, layout) in enumerate(zip(self.owned, self.layouts)):
            flat = layout.flatten(params)
            self.group.broadcast_(layout.buckets(flat), r)
            for p, v in zip(params, layout.unflatten(flat)):
                p.copy_(v)

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        """Each share starts from island 0's (the static broadcast of its group), then the island
        gathers the shares."""
        joined = self.outer.start(self.part, resumed=resumed)
        self.gather()
        return joined

    def describe(self) -> list[str]:
        return [f"share {self.group.rank} of {self.group.size}: {line}" for line in self.outer.describe()]

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        stop = torch.tensor([float(tail.stop)], dtype=torch.float64)
        self.group.all_reduce_([stop])  # any rank of the island may have been asked to stop
        tail.stop = bool(stop[0] > 0)
        report = self.outer.sync(self.part, tail=tail)
        self.gather()
        # the island's round is committed when every share's is
        failed = torch.tensor([0.0 if report.committed else 1.0], dtype=torch.float64)
        self.group.all_reduce_([failed])
        committed = report.committed and bool(failed[0] == 0)
        reason = report.reason or ("" if committed else "another share of this island was not committed")
        return dataclasses.replace(
            report, committed=committed, reason=reason, anchor_hash=tensor_digest(params_of(self.view))
        )

    def state_dict(self) -> dict[str, Any]:
        return {"share": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "share" not in state:
            raise DiloError(
                "this checkpoint was written with transport.island_wire='lead': resume with the same island layout"
            )
        self.outer.load_state_dict(state["share"])
