"""Averaging pseudo-gradients through a codec: the one place that picks the collective.

    ex = Exchange(transport, names, shapes, cfg.codec, seed=cfg.seed)
    result = ex.mean(deltas, tail, round_idx)     # every worker gets the same bits
    if result.mean is not None: apply result.mean

First the workers all-gather their tails (weight, contributed, stop, tokens: 32 bytes each), so
each knows every weight. Then, per parameter group (the codec, or a per-name override):

- linear codec (fp32, random-k): each worker scales its payload by its weight, the payloads are
  all-reduced in fp32 and decoded once. Bytes: a ring all-reduce of the payload.
- shardable codec (fp16, bf16, int8, int4): the flat vector is cut into W block-aligned shards;
  worker j receives every worker's encoded shard j (all-to-all), decodes and sums them in fp32
  in rank order, divides by the total weight, re-encodes its mean shard, and the mean shards are
  all-gathered and decoded. Bytes: 2(W-1)/W of the encoded size, like a ring all-reduce of the
  compressed vector. With error feedback the shard owner also keeps the error of re-encoding.
- otherwise (top-k, sign): every worker all-gathers every payload and sums the decoded vectors in
  fp32 in rank order. Bytes: (W-1) payloads.
- PowerSGD: two all-reduces (P = M Q, then Q' = M^T orth(P)); error feedback against the
  aggregated approximation.
- a robust aggregate (`[aggregate]`, dilo/outer/robust.py): every group's payload all-gathered
  and decoded per worker, whatever the codec (PowerSGD refused), then the rule on the whole
  vectors. Bytes: (W-1) payloads, as top-k's.

A worker that does not contribute (weight 0) still takes part in the collectives with zeros, so
nobody waits for it, and its error-feedback residual is left untouched.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dilo.compress import Context, pack, unpack
from dilo.compress.base import Codec
from dilo.compress.feedback import ErrorFeedback
from dilo.compress.lowrank import PowerSGD
from dilo.errors import TransportError
from dilo.outer.adaptive import CodecPlanner
from dilo.outer.base import TAIL_COUNT, TAIL_WEIGHT
from dilo.outer.groups import SHARDS_PER_GROUP, Group, _plain, build_groups, describe_groups, plan_groups
from dilo.outer.robust import Aggregator
from dilo.transport.base import Transport

if TYPE_CHECKING:
    from dilo.config import CodecSpec


@dataclass
class ExchangeResult:
    flat: Tensor | None
    """The weighted mean pseudo-gradient, laid out like the flat vector of all parameters, or None
    when nobody contributed."""
    tails: Tensor
    """[W, 4] float64: every worker's tail, in rank order."""
    mean: list[Tensor] | None = None
    """Per-parameter views of `flat`."""
    members: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """A robust aggregate's per-contributor statistics ("worker<rank>": its update's norm and its
    cosine to the aggregate), so that an operator sees an outlier; empty for the plain mean."""
    plan: dict[str, Any] | None = None
    """Adaptive compression (codec.adapt_every): the codec plan in force this round (parameters per
    codec, its relative squared error when it was chosen, bytes per worker) and whether it was
    chosen this round; None without it."""


class Exchange:
    def __init__(
        self,
        transport: Transport,
        names: list[str],
        shapes: list[torch.Size],
        spec: CodecSpec,
        *,
        seed: int = 0,
        bucket_mb: float = 32.0,
        aggregator: Aggregator | None = None,
    ) -> None:
        """aggregator: a robust rule (`[aggregate]`); None: the weighted mean through the codec's
        collective (see the module docstring)."""
        self.transport = transport
        self.aggregator = aggregator
        self.seed = seed
        self.bucket_mb = bucket_mb
        self.shapes = shapes
        self.numels = [s.numel() for s in shapes]
        self.groups = build_groups(names, shapes, spec, bucket_mb)
        every = int(getattr(spec, "adapt_every", 0))
        self.planner = (
            CodecPlanner(spec.adapt_candidates, every=every, budget=spec.adapt_error, workers=transport.size)  # type: ignore[attr-defined]
            if every > 0
            else None
        )
        """codec.adapt_every: L-GreCo's per-parameter codec choice (dilo/outer/adaptive.py)."""
        self.plan: list[int] | None = None
        self._plan_summary: dict[str, Any] = {}

    def describe(self) -> list[str]:
        return describe_groups(self.groups)

    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def mean(self, deltas: list[Tensor], tail: Tensor, round_idx: int) -> ExchangeResult:
        """`mean_flat` for a list of per-parameter pseudo-gradients (left untouched)."""
        flat = torch.cat([d.detach().reshape(-1).float() for d in deltas]) if deltas else torch.zeros(0)
        return self.mean_flat(flat, tail, round_idx)

    @torch.no_grad()
    def mean_flat(self, flat: Tensor, tail: Tensor, round_idx: int, *, finite: bool = False) -> ExchangeResult:
        """The weighted mean of every worker's pseudo-gradient, given as one flat fp32 vector in
        parameter order. The vector is the exchange's to overwrite (the fp32 all-reduce scales and
        sums it in place; the mean may come back in it).

        A failed collective raises its TransportError with the error-feedback memory as it was
        before the call: the round left no trace (encoding had already folded this round's delta
        into the residuals, and a shard owner may have re-encoded its mean, for a payload nobody
        applied). finite: the caller checked `flat` for NaN and Inf (the codecs do not scan it again)."""
        saved = self._feedback_snapshot()
        plan = (self.groups, self.plan, self._plan_summary)  # a new plan made this round is undone too
        try:
            return self._mean(flat, tail, round_idx, finite)
        except TransportError:
            self.groups, self.plan, self._plan_summary = plan
            self._restore_feedback(saved)
            raise

    def _feedback_snapshot(self) -> list[_Snapshot]:
        # References, not copies: every residual is replaced by a new tensor, never updated in place
        # (ErrorFeedback.encode, the owner's and PowerSGD's residuals below), and so is PowerSGD's warm Q.
        snapshot = []
        for g in self.groups:
            memory = g.codec.memory() if isinstance(g.codec, ErrorFeedback) else None
            warm = g.codec.warm if isinstance(g.codec, PowerSGD) else None
            snapshot.append((memory, g.owner_residual, list(g.lowrank_residual), warm))
        return snapshot

    def _restore_feedback(self, saved: list[_Snapshot]) -> None:
        for g, (memory, owner, lowrank, warm) in zip(self.groups, saved):
            if memory is not None and isinstance(g.codec, ErrorFeedback):
                g.codec.restore(memory)
            if warm is not None and isinstance(g.codec, PowerSGD):
                g.codec.warm = warm
            g.owner_residual, g.lowrank_residual = owner, lowrank

    def _mean(self, flat: Tensor, tail: Tensor, round_idx: int, finite: bool) -> ExchangeResult:
        t = self.transport
        tails = torch.stack(t.all_gather(tail.reshape(1, -1).to(torch.float64))).reshape(t.size, -1)
        weights = [float(w) if c > 0 else 0.0 for w, c in zip(tails[:, TAIL_WEIGHT], tails[:, TAIL_COUNT])]
        total = sum(weights)
        if total <= 0.0:
            return ExchangeResult(None, tails)
        mine = weights[t.rank]
        if mine <= 0:
            flat.zero_()  # a worker that does not contribute takes part with zeros
        if self.aggregator is not None:
            return self._robust(flat, tails, weights, round_idx, finite)
        solved = self._replan(flat, round_idx) if self.planner is not None else False
        whole = len(self.groups) == 1 and self.groups[0].span == (0, flat.numel())
        out = None if whole else torch.empty_like(flat)
        for g in self.groups:
            ctx = Context(
                seed=self.seed,
                round=round_idx,
                rank=t.rank,
                part=g.index * SHARDS_PER_GROUP,
                checked=finite or mine <= 0,
            )
            values = g.take(flat)
            if g.kind == "powersgd":
                means = self._powersgd(g, g.layout.unflatten(values), ctx, mine, total)
                mean_flat = torch.cat([m.reshape(-1) for m in means])
            else:
                codec = g.flat_codec if mine > 0 else _plain(g.flat_codec)
                if g.kind == "all_reduce":
                    mean_flat = self._all_reduce(codec, values, ctx, mine, total)
                elif g.kind == "reduce_scatter":
                    mean_flat = self._reduce_scatter(g, codec, values, ctx, weights, total)
                else:
                    mean_flat = self._all_gather(codec, values, ctx, weights, total)
            if out is None:
                out = mean_flat
            else:
                g.put(out, mean_flat)
        assert out is not None
        plan = {**self._plan_summary, "solved": solved} if self.planner is not None else None
        views = [v.view(s) for v, s in zip(torch.split(out, self.numels), self.shapes)]
        return ExchangeResult(out, tails, views, plan=plan)

    def _replan(self, flat: Tensor, round_idx: int) -> bool:
        """L-GreCo: every planner.every rounds (and first thing after a start), measure every
        candidate on every parameter of this round's pseudo-gradient, sum the errors over workers
        and choose the plan; a new plan regroups the parameters (their error feedback restarts)."""
        planner = self.planner
        assert planner is not None
        if self.plan is not None and not planner.due(round_idx):
            return False
        values = list(torch.split(flat, self.numels))
        errors, norms = planner.measure(values, Context(seed=self.seed, round=round_idx, rank=self.transport.rank))
        both = torch.cat([errors.reshape(-1), norms])
        self.transport.all_reduce_([both])  # the sums: every worker solves the same problem
        errors, norms = both[: errors.numel()].view_as(errors), both[errors.numel() :]
        plan = planner.solve(errors, norms, self.shapes)
        if plan != self.plan:
            self._set_plan(plan)
        self._plan_summary = planner.summary(plan, errors, norms, self.shapes)
        return True

    def _set_plan(self, plan: list[int]) -> None:
        assert self.planner is not None
        self.plan = plan
        self.groups = plan_groups(self.shapes, self.planner.specs, plan, self.bucket_mb)

    def _robust(
        self, flat: Tensor, tails: Tensor, weights: list[float], round_idx: int, finite: bool
    ) -> ExchangeResult:
        """A robust aggregate (`[aggregate]`, dilo/outer/robust.py): every group's encoded payload is
        all-gathered and decoded per worker, and the rule runs on the contributors' whole vectors
        (the same bytes and the same rule everywhere: the same bits)."""
        t, mine = self.transport, weights[self.transport.rank]
        vectors = {i: torch.empty_like(flat) for i in range(t.size) if weights[i] > 0}
        for g in self.groups:
            ctx = Context(seed=self.seed, round=round_idx, rank=t.rank, part=g.index * SHARDS_PER_GROUP,
                          checked=finite or mine <= 0)  # fmt: skip
            codec = g.flat_codec if mine > 0 else _plain(g.flat_codec)
            e = codec.encode(g.take(flat), ctx)
            for i, buf in enumerate(t.all_gather(pack(e))):
                if i in vectors:
                    g.put(vectors[i], _plain(codec).decode(unpack(buf, like=e)))
        assert self.aggregator is not None
        out = self.aggregator([vectors[i] for i in sorted(vectors)], [weights[i] for i in sorted(vectors)])
        views = [v.view(s) for v, s in zip(torch.split(out, self.numels), self.shapes)]
        return ExchangeResult(out, tails, views, members=member_stats(vectors, out))

    def _all_reduce(self, codec: Codec, flat: Tensor, ctx: Context, mine: float, total: float) -> Tensor:
        e = codec.encode(flat, ctx)
        # the payload may be `flat` itself (fp32): scaled and summed in place, no copy
        floats = [v for v in e.tensors.values() if v.is_floating_point()]
        if mine != 1.0:
            for v in floats:
                v.mul_(mine)
        # non-float payload parts (random-k's seed) are identical on every worker: not summed
        self.transport.all_reduce_([b for v in floats for b in torch.split(v, self.bucket_elems)])
        return _plain(codec).decode(e).div_(total)

    @property
    def bucket_elems(self) -> int:
        return max(1, int(self.bucket_mb * 2**20 / 4))

    def _reduce_scatter(
        self, g: Group, codec: Codec, flat: Tensor, ctx: Context, weights: list[float], total: float
    ) -> Tensor:
        t, plain = self.transport, _plain(codec)
        n, size, rank = flat.numel(), self.transport.size, self.transport.rank
        shard = max(1, math.ceil(n / size / plain.block)) * plain.block
        if n == shard * size:
            padded = flat
        else:  # one zero-padded buffer per group, reused every round (the tail stays zero)
            if g.padded is None or g.padded.numel() != shard * size or g.padded.device != flat.device:
                g.padded = torch.zeros(shard * size, dtype=torch.float32, device=flat.device)
            padded = g.padded
            padded[:n] = flat
        payloads = [codec.encode(padded[j * shard : (j + 1) * shard], _part(ctx, j)) for j in range(size)]
        received = t.all_to_all([pack(p) for p in payloads])
        acc = torch.zeros(shard, dtype=torch.float32, device=flat.device)
        for i, buf in enumerate(received):  # rank order: the owner's sum is deterministic
            if weights[i] > 0:
                acc.add_(plain.decode(unpack(buf, like=payloads[rank])), alpha=weights[i])
        acc.div_(total)
        if g.feedback:  # keep what re-encoding the mean shard loses, as workers do for their own
            if g.owner_residual is None or g.owner_residual.numel() != shard:
                g.owner_residual = torch.zeros_like(acc)
            acc.add_(g.owner_residual)
        mean_payload = plain.encode(acc, _part(ctx, size + rank))
        if g.feedback:
            assert g.owner_residual is not None
            g.owner_residual = acc - plain.decode(mean_payload)
        gathered = t.all_gather(pack(mean_payload))
        return torch.cat([plain.decode(unpack(b, like=mean_payload)) for b in gathered])[:n]

    def _all_gather(self, codec: Codec, flat: Tensor, ctx: Context, weights: list[float], total: float) -> Tensor:
        plain = _plain(codec)
        e = codec.encode(flat, ctx)
        gathered = self.transport.all_gather(pack(e))
        acc = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
        for i, buf in enumerate(gathered):
            if weights[i] > 0:
                acc.add_(plain.decode(unpack(buf, like=e)), alpha=weights[i])
        return acc.div_(total)

    def _powersgd(self, g: Group, tensors: list[Tensor], ctx: Context, mine: float, total: float) -> list[Tensor]:
        psgd = _plain(g.codec)
        assert isinstance(psgd, PowerSGD)  # g.kind == "powersgd"
        shapes = [t.shape for t in tensors]
        if g.feedback and not g.lowrank_residual:
            g.lowrank_residual = [torch.zeros_like(t) for t in tensors]
        m = [t + r for t, r in zip(tensors, g.lowrank_residual)] if g.feedback and mine > 0 else list(tensors)
        weighted = [x * mine for x in m]
        p = psgd.first_pass(weighted, ctx)
        self.transport.all_reduce_([p])
        q = psgd.second_pass(weighted, p)
        self.transport.all_reduce_([q])
        out = psgd.decode(p, q, total, shapes)
        psgd.keep(q, shapes)  # warm_start: the next round's Q, the same on every worker
        if g.feedback and mine > 0:
            g.lowrank_residual = [x - o for x, o in zip(m, out)]
        return out

    # -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self.plan is not None:  # the groups below belong to this plan
            state["plan"] = torch.tensor(self.plan, dtype=torch.int64)
        for g in self.groups:
            key = f"group{g.index}"
            state[key] = {
                "codec": g.codec.state_dict() if isinstance(g.codec, ErrorFeedback | PowerSGD) else {},
                "owner": g.owner_residual,
                "lowrank": list(g.lowrank_residual),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "plan" in state and self.planner is not None:
            self._set_plan([int(c) for c in state["plan"]])
        for g in self.groups:
            s = state.get(f"group{g.index}")
            if s is None:
                continue
            if isinstance(g.codec, ErrorFeedback | PowerSGD):
                g.codec.load_state_dict(s["codec"])
            g.owner_residual = s["owner"]
            g.lowrank_residual = list(s["lowrank"])

    def reset_feedback(self) -> None:
        """Forget every residual (a worker joining, or a change of world size)."""
        for g in self.groups:
            if isinstance(g.codec, ErrorFeedback):
                g.codec.reset()
            if isinstance(g.codec, PowerSGD):
                g.codec.warm = {}  # every worker draws the same fresh Q again
            g.owner_residual = None
            g.lowrank_residual = []


_Snapshot = tuple[
    tuple[dict[int, Tensor], dict[int, Tensor]] | None, Tensor | None, list[Tensor], dict[int, Tensor] | None
]
"""One group's error-feedback memory: the codec's residuals and velocities, the shard owner's
residual, PowerSGD's, its warm Q."""


def _part(ctx: Context, shard: int) -> Context:
    return dataclasses.replace(ctx, part=ctx.part + shard)


__all__ = ["Exchange", "ExchangeResult", "finished", "member_stats"]


def finished(result: ExchangeResult) -> Future[ExchangeResult]:
    """An exchange that is already done, as a future (a resumed checkpoint's result in flight)."""
    future: Future[ExchangeResult] = Future()
    future.set_result(result)
    return future


def member_stats(vectors: dict[int, Tensor], aggregate: Tensor) -> dict[str, dict[str, float | None]]:
    """Each contributor's update norm and cosine to the aggregate, by "worker<rank>"."""
    agg = aggregate.double()
    agg_norm = float(torch.linalg.vector_norm(agg))
    out: dict[str, dict[str, float | None]] = {}
    for i, v in sorted(vectors.items()):
        x = v.double()
        norm = float(torch.linalg.vector_norm(x))
        cos = float(x.dot(agg)) / (norm * agg_norm) if norm > 0 and agg_norm > 0 else float("nan")
        out[f"worker{i}"] = {
            "norm": round(norm, 6) if math.isfinite(norm) else None,
            "cos": round(cos, 4) if math.isfinite(cos) else None,
        }
    return out
