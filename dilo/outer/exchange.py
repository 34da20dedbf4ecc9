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

A worker that does not contribute (weight 0) still takes part in the collectives with zeros, so
nobody waits for it, and its error-feedback residual is left untouched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import Tensor

from dilo.compress import Context, build_codec, pack, unpack
from dilo.compress.base import Codec
from dilo.compress.feedback import ErrorFeedback
from dilo.compress.lowrank import PowerSGD
from dilo.errors import TransportError
from dilo.outer.base import TAIL_COUNT, TAIL_WEIGHT, FlatLayout
from dilo.transport.base import Transport

if TYPE_CHECKING:
    from dilo.config import CodecOverride, CodecSpec

SHARDS_PER_GROUP = 1 << 16  # ctx.part = group * SHARDS_PER_GROUP + shard


@dataclass
class Group:
    index: int
    label: str
    params: list[int]
    codec: Codec | PowerSGD
    """As build_codec made it: a flat codec (maybe wrapped in ErrorFeedback) or a bare PowerSGD."""
    feedback: bool
    layout: FlatLayout
    owner_residual: Tensor | None = None
    lowrank_residual: list[Tensor] = field(default_factory=list)

    @property
    def flat_codec(self) -> Codec:
        """The codec of a group whose kind is not "powersgd" (PowerSGD has no flat encode / decode)."""
        assert not isinstance(self.codec, PowerSGD), f"{self.label}: PowerSGD is not a flat codec"
        return self.codec

    @property
    def kind(self) -> str:
        plain = _plain(self.codec)
        if isinstance(plain, PowerSGD):
            return "powersgd"
        if plain.linear:
            return "all_reduce"
        return "reduce_scatter" if plain.shardable else "all_gather"


@dataclass
class ExchangeResult:
    mean: list[Tensor] | None
    """The weighted mean pseudo-gradient per parameter, or None when nobody contributed."""
    tails: Tensor
    """[W, 4] float64: every worker's tail, in rank order."""


@overload
def _plain(codec: Codec) -> Codec: ...
@overload
def _plain(codec: Codec | PowerSGD) -> Codec | PowerSGD: ...
def _plain(codec: Codec | PowerSGD) -> Codec | PowerSGD:
    """The codec without its error feedback."""
    return codec.codec if isinstance(codec, ErrorFeedback) else codec


def build_groups(names: list[str], shapes: list[torch.Size], spec: CodecSpec, bucket_mb: float = 32.0) -> list[Group]:
    """Split parameters by codec: the first override whose pattern matches a name wins, else the default.

    `spec` is a CodecConfig, or a bare CodecSpec (no overrides).
    """
    overrides: list[CodecOverride] = list(getattr(spec, "overrides", []))
    specs = [spec, *overrides]
    members: list[list[int]] = [[] for _ in specs]
    for i, name in enumerate(names):
        k = next((j + 1 for j, o in enumerate(overrides) if re.search(o.pattern, name)), 0)
        members[k].append(i)
    groups = []
    for k, (s, idx) in enumerate(zip(specs, members)):
        if not idx:
            continue
        label = "default" if k == 0 else f"override {overrides[k - 1].pattern!r}"
        layout = FlatLayout(
            [shapes[i] for i in idx], [shapes[i].numel() for i in idx], max(1, int(bucket_mb * 2**20 / 4))
        )
        groups.append(Group(k, label, idx, build_codec(s), bool(s.feedback), layout))
    return groups


def describe_groups(groups: list[Group]) -> list[str]:
    return [
        f"{g.label}: {_plain(g.codec)!r} via {g.kind}"
        + (" + error feedback" if g.feedback else "")
        + f", {g.layout.total:,} values"
        for g in groups
    ]


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
    ) -> None:
        self.transport = transport
        self.seed = seed
        self.bucket_mb = bucket_mb
        self.shapes = shapes
        self.groups = build_groups(names, shapes, spec, bucket_mb)

    def describe(self) -> list[str]:
        return [
            f"{g.label}: {_plain(g.codec)!r} via {g.kind}"
            + (" + error feedback" if g.feedback else "")
            + f", {g.layout.total:,} values"
            for g in self.groups
        ]

    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def mean(self, deltas: list[Tensor], tail: Tensor, round_idx: int) -> ExchangeResult:
        """The weighted mean of every worker's pseudo-gradient. A failed collective raises its
        TransportError with the error-feedback memory as it was before the call: the round left
        no trace (encoding had already folded this round's delta into the residuals, and a shard
        owner may have re-encoded its mean, for a payload nobody applied)."""
        saved = self._feedback_snapshot()
        try:
            return self._mean(deltas, tail, round_idx)
        except TransportError:
            self._restore_feedback(saved)
            raise

    def _feedback_snapshot(self) -> list[tuple[dict[int, Tensor] | None, Tensor | None, list[Tensor]]]:
        # References, not copies: every residual is replaced by a new tensor, never updated in place
        # (ErrorFeedback.encode, the owner's and PowerSGD's residuals below).
        snapshot = []
        for g in self.groups:
            residuals = dict(g.codec.residuals) if isinstance(g.codec, ErrorFeedback) else None
            snapshot.append((residuals, g.owner_residual, list(g.lowrank_residual)))
        return snapshot

    def _restore_feedback(self, saved: list[tuple[dict[int, Tensor] | None, Tensor | None, list[Tensor]]]) -> None:
        for g, (residuals, owner, lowrank) in zip(self.groups, saved):
            if residuals is not None and isinstance(g.codec, ErrorFeedback):
                g.codec.residuals = residuals
            g.owner_residual, g.lowrank_residual = owner, lowrank

    def _mean(self, deltas: list[Tensor], tail: Tensor, round_idx: int) -> ExchangeResult:
        t = self.transport
        tails = torch.stack(t.all_gather(tail.reshape(1, -1).to(torch.float64))).reshape(t.size, -1)
        weights = [float(w) if c > 0 else 0.0 for w, c in zip(tails[:, TAIL_WEIGHT], tails[:, TAIL_COUNT])]
        total = sum(weights)
        if total <= 0.0:
            return ExchangeResult(None, tails)
        mine = weights[t.rank]
        out: list[Tensor | None] = [None] * len(deltas)
        for g in self.groups:
            tensors = [deltas[i] if mine > 0 else torch.zeros_like(deltas[i]) for i in g.params]
            ctx = Context(seed=self.seed, round=round_idx, rank=t.rank, part=g.index * SHARDS_PER_GROUP)
            if g.kind == "powersgd":
                means = self._powersgd(g, tensors, ctx, mine, total)
            else:
                flat = g.layout.flatten(tensors)
                codec = g.flat_codec if mine > 0 else _plain(g.flat_codec)
                if g.kind == "all_reduce":
                    mean_flat = self._all_reduce(codec, flat, ctx, mine, total)
                elif g.kind == "reduce_scatter":
                    mean_flat = self._reduce_scatter(g, codec, flat, ctx, weights, total)
                else:
                    mean_flat = self._all_gather(codec, flat, ctx, weights, total)
                means = g.layout.unflatten(mean_flat)
            for i, m in zip(g.params, means):
                out[i] = m
        assert all(m is not None for m in out)
        return ExchangeResult([m for m in out if m is not None], tails)

    def _all_reduce(self, codec: Codec, flat: Tensor, ctx: Context, mine: float, total: float) -> Tensor:
        e = codec.encode(flat, ctx)
        summed = {k: v.clone() for k, v in e.tensors.items()}
        floats = [v for v in summed.values() if v.is_floating_point()]
        for v in floats:
            v.mul_(mine)
        # non-float payload parts (random-k's seed) are identical on every worker: not summed
        self.transport.all_reduce_([b for v in floats for b in torch.split(v, self.bucket_elems)])
        return _plain(codec).decode(type(e)(summed, e.numel)).div_(total)

    @property
    def bucket_elems(self) -> int:
        return max(1, int(self.bucket_mb * 2**20 / 4))

    def _reduce_scatter(
        self, g: Group, codec: Codec, flat: Tensor, ctx: Context, weights: list[float], total: float
    ) -> Tensor:
        t, plain = self.transport, _plain(codec)
        n, size, rank = flat.numel(), self.transport.size, self.transport.rank
        shard = max(1, math.ceil(n / size / plain.block)) * plain.block
        padded = torch.zeros(shard * size, dtype=torch.float32, device=flat.device)
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
        if g.feedback and mine > 0:
            g.lowrank_residual = [x - o for x, o in zip(m, out)]
        return out

    # -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for g in self.groups:
            key = f"group{g.index}"
            state[key] = {
                "codec": g.codec.state_dict() if isinstance(g.codec, ErrorFeedback) else {},
                "owner": g.owner_residual,
                "lowrank": list(g.lowrank_residual),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for g in self.groups:
            s = state.get(f"group{g.index}")
            if s is None:
                continue
            if isinstance(g.codec, ErrorFeedback):
                g.codec.load_state_dict(s["codec"])
            g.owner_residual = s["owner"]
            g.lowrank_residual = list(s["lowrank"])

    def reset_feedback(self) -> None:
        """Forget every residual (a worker joining, or a change of world size)."""
        for g in self.groups:
            if isinstance(g.codec, ErrorFeedback):
                g.codec.reset()
            g.owner_residual = None
            g.lowrank_residual = []


def _part(ctx: Context, shard: int) -> Context:
    return Context(seed=ctx.seed, round=ctx.round, rank=ctx.rank, part=ctx.part + shard)


__all__ = ["Exchange", "ExchangeResult", "Group", "build_groups", "describe_groups"]
