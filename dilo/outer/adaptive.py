"""Adaptive per-layer compression (L-GreCo, Markov et al., MLSys 2024): every K rounds, each
parameter's codec is chosen among candidates so that the bytes on the wire are least while the
total compression error stays within a budget, measured on the round's real pseudo-gradients.

    planner = CodecPlanner(candidates, every=10, budget=0.05, workers=4)
    if planner.due(round_idx):
        errors, norms = planner.measure(values, ctx)    # this worker's, per parameter and candidate
        all-reduce errors and norms                       # the sums: the same on every worker
        plan = planner.solve(errors, norms, shapes)      # one candidate index per parameter

The problem is a multiple-choice knapsack: minimise sum_l bytes(l, c_l) subject to
sum_l err(l, c_l) <= budget * sum_l ||delta_l||^2, with err the squared error of candidate c on
parameter l (summed over workers) and bytes what that codec puts on the wire through its
collective (a reduce-scatter or all-reduce sends 2 (W - 1) / W payloads, an all-gather W - 1).
It is solved exactly on a grid of `resolution` error units by dynamic programming over the
parameters (each error rounded up to whole units, so the plan never exceeds the budget); when no
plan fits, every parameter takes its candidate of least error. The DP runs in fp64 on the same
all-reduced numbers on every worker, so all workers pick the same plan.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from dilo.compress import Context, build_codec
from dilo.compress.base import Codec
from dilo.compress.feedback import ErrorFeedback


def _plain(codec: Any) -> Codec:
    codec = codec.codec if isinstance(codec, ErrorFeedback) else codec
    return codec  # type: ignore[no-any-return]


class CodecPlanner:
    def __init__(self, candidates: Sequence[Any], *, every: int, budget: float, workers: int, resolution: int = 1000):
        if not candidates:
            raise ValueError("adaptive compression needs at least one candidate codec")
        if every < 1 or not budget > 0 or resolution < 1:
            raise ValueError(f"every={every} must be >= 1, budget={budget} > 0 and resolution={resolution} >= 1")
        self.specs = list(candidates)
        self.codecs = [_plain(build_codec(s)) for s in self.specs]
        self.every, self.budget, self.workers, self.resolution = every, budget, workers, resolution
        self._bytes: dict[tuple[torch.Size, ...], Tensor] = {}

    def due(self, round_idx: int) -> bool:
        return round_idx % self.every == 0

    def label(self, c: int) -> str:
        s = self.specs[c]
        extra = f" {s.fraction:g}" if s.kind in ("topk", "randomk", "dct") else ""
        return f"{s.kind}{extra}"

    @torch.no_grad()
    def measure(self, values: Sequence[Tensor], ctx: Context) -> tuple[Tensor, Tensor]:
        """[L, C] squared errors of each candidate on each parameter's values, and [L] squared norms
        (fp64), this worker's."""
        errors = torch.zeros(len(values), len(self.codecs), dtype=torch.float64)
        norms = torch.zeros(len(values), dtype=torch.float64)
        for i, v in enumerate(values):
            flat = v.detach().reshape(-1).float()
            norms[i] = flat.double().square().sum()
            for c, codec in enumerate(self.codecs):
                part = Context(seed=ctx.seed, round=ctx.round, rank=ctx.rank, part=ctx.part + i, checked=True)
                err = flat - codec.decode(codec.encode(flat, part))
                errors[i, c] = err.double().square().sum()
        return errors, norms

    def wire_bytes(self, shapes: Sequence[torch.Size]) -> Tensor:
        """[L, C] bytes each worker sends for each candidate on each parameter, through its
        collective (computed once per set of shapes: payload sizes depend only on lengths)."""
        key = tuple(shapes)
        if key in self._bytes:
            return self._bytes[key]
        w = self.workers
        out = torch.zeros(len(shapes), len(self.codecs), dtype=torch.float64)
        for c, codec in enumerate(self.codecs):
            factor = (w - 1) if not (codec.linear or codec.shardable) else 2 * (w - 1) / w
            for i, shape in enumerate(shapes):
                out[i, c] = factor * codec.encode(torch.zeros(shape.numel()), Context(checked=True)).nbytes
        self._bytes[key] = out
        return out

    def solve(self, errors: Tensor, norms: Tensor, shapes: Sequence[torch.Size]) -> list[int]:
        """The plan of least bytes within the error budget (see the module docstring)."""
        cost = self.wire_bytes(shapes)
        allowed = self.budget * float(norms.sum())
        fallback = [int(c) for c in errors.argmin(dim=1)]
        if allowed <= 0:  # nothing to send: the cheapest codec everywhere
            return [int(c) for c in cost.argmin(dim=1)]
        unit = allowed / self.resolution
        units = torch.ceil(errors / unit - 1e-9).clamp_(min=0)
        R = self.resolution
        inf = math.inf
        dp = torch.full((R + 1,), inf, dtype=torch.float64)
        dp[0] = 0.0
        choice: list[Tensor] = []
        for i in range(errors.shape[0]):
            best = torch.full((R + 1,), inf, dtype=torch.float64)
            arg = torch.full((R + 1,), -1, dtype=torch.int64)
            for c in range(errors.shape[1]):
                u = int(units[i, c]) if math.isfinite(float(units[i, c])) else R + 1
                if u > R:
                    continue
                shifted = torch.full((R + 1,), inf, dtype=torch.float64)
                shifted[u:] = dp[: R + 1 - u] + cost[i, c]
                better = shifted < best
                best = torch.where(better, shifted, best)
                arg = torch.where(better, torch.full_like(arg, c), arg)
            dp = best
            choice.append(arg)
        if not math.isfinite(float(dp.min())):
            return fallback
        j = int(dp.argmin())
        plan = [0] * errors.shape[0]
        for i in range(errors.shape[0] - 1, -1, -1):
            c = int(choice[i][j])
            plan[i] = c
            j -= int(units[i, c])
        return plan

    def summary(
        self, plan: Sequence[int], errors: Tensor, norms: Tensor, shapes: Sequence[torch.Size]
    ) -> dict[str, Any]:
        """For the round log: parameters per codec, the plan's relative squared error, bytes sent."""
        cost = self.wire_bytes(shapes)
        err = sum(float(errors[i, c]) for i, c in enumerate(plan))
        total = float(norms.sum())
        return {
            "params": dict(Counter(self.label(c) for c in plan)),
            "rel_error": err / total if total > 0 else 0.0,
            "bytes": int(sum(float(cost[i, c]) for i, c in enumerate(plan))),
        }
