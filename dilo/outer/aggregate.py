"""Aggregation checks the coordinator applies to a round: finiteness, and what an operator needs
to see a member whose update stands out (its norm, its cosine to the round's mean).

    if not finite(means): ...                       # one aminmax per tensor
    mean = RunningMean(sizes); mean.add(worker, weight, flats)   # as pushes arrive
    stats = mean.stats()
    for w in outliers(stats): log.warning(...)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN or Inf in any tensor (one aminmax per tensor: NaN and Inf reach the extremes)."""
    for t in tensors:
        if t.numel():
            lo, hi = torch.aminmax(t)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                return False
    return True


def update_norm(flats: list[torch.Tensor]) -> float:
    """The norm of one member's update, given as flat pieces."""
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(f)) ** 2 for f in flats))
    if not math.isfinite(norm):  # squares beyond float32 (values near its limit): again in float64
        norm = math.sqrt(sum(float(torch.linalg.vector_norm(f, dtype=torch.float64)) ** 2 for f in flats))
    return norm


SAMPLE = 1 << 16
"""Coordinates of each push kept for the cosine to the mean (a fixed strided sample)."""


class RunningMean:
    """The weighted mean of a round's pushes, folded in as they arrive: memory O(model), not
    O(workers x model).

    The sum is float64: a float32 value times the largest accepted weight cannot overflow it, and
    the mean (never larger than the largest value) is finite in float32 again. Per member it keeps
    the exact norm of its update and a fixed strided sample of at most SAMPLE coordinates, on
    which `stats` computes the cosine to the mean (exact for models of up to SAMPLE values)."""

    def __init__(self, sizes: list[int]) -> None:
        self.stride = max(1, math.ceil(sum(sizes) / SAMPLE))
        self.sums = [torch.zeros(n, dtype=torch.float64) for n in sizes]
        self.total = 0.0
        self.norms: dict[str, float] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}

    def add(self, worker: str, weight: float, flats: list[torch.Tensor]) -> None:
        for acc, f in zip(self.sums, flats):
            acc.add_(f, alpha=weight)
        self.total += weight
        self.norms[worker] = update_norm(flats)
        self.samples[worker] = [f[:: self.stride].double() for f in flats]

    def reset(self) -> None:
        """Empty, for the next round (the buffers are kept: no allocation on the round's path)."""
        for acc in self.sums:
            acc.zero_()
        self.total = 0.0
        self.norms, self.samples = {}, {}

    @property
    def members(self) -> list[str]:
        return sorted(self.norms)

    def mean(self) -> list[torch.Tensor]:
        """The weighted mean in float32. It divides the sums in place: the round's last use
        (`stats` comes first)."""
        assert self.total > 0, "the mean needs at least one contribution"
        return [acc.div_(self.total).float() for acc in self.sums]

    def stats(self) -> dict[str, dict[str, float | None]]:
        """Per member: the norm of its decoded pseudo-gradient and its cosine to the round's mean,
        so an operator can see a scaled or sign-flipped update."""
        mean = [(acc[:: self.stride] / self.total) for acc in self.sums]
        mean_norm = math.sqrt(sum(float(m.dot(m)) for m in mean))
        out: dict[str, dict[str, float | None]] = {}
        for w in self.members:
            sample = self.samples[w]
            n = math.sqrt(sum(float(x.dot(x)) for x in sample))
            dot = sum(float(x.dot(m)) for x, m in zip(sample, mean))
            cos = dot / (n * mean_norm) if n > 0 and mean_norm > 0 else float("nan")
            norm = self.norms[w]
            out[w] = {
                "norm": round(norm, 6) if math.isfinite(norm) else None,
                "cos": round(cos, 4) if math.isfinite(cos) else None,
            }
        return out


def outliers(stats: dict[str, dict[str, float | None]]) -> list[str]:
    """Members whose update points away from the mean, or is 4x longer or shorter than the median."""
    norms = sorted(float(s["norm"] or 0.0) for s in stats.values())
    if len(norms) < 3:
        return []
    median = norms[len(norms) // 2]
    out = []
    for w, s in stats.items():
        n, cos = float(s["norm"] or 0.0), s["cos"]
        if (cos is not None and cos < 0) or (median > 0 and not median / 4 <= n <= 4 * median):
            out.append(w)
    return out


class RobustMean(RunningMean):
    """A round's pushes under a robust rule (`[aggregate]`, dilo/outer/robust.py): each member's
    decoded pseudo-gradient is kept (memory O(members x model): the rules need every vector), the
    rule runs when the round closes, and `stats` gives each member's cosine to that aggregate
    rather than to the plain mean (which one scaled update can turn against every honest one)."""

    def __init__(self, sizes: list[int], aggregator: Callable[[list[torch.Tensor], list[float]], torch.Tensor]) -> None:
        super().__init__(sizes)
        self.sizes = sizes
        self.aggregator = aggregator
        self.vectors: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}
        self._result: torch.Tensor | None = None

    def add(self, worker: str, weight: float, flats: list[torch.Tensor]) -> None:
        # no running sum or sample: the rule and `stats` work on the kept vectors
        self.total += weight
        self.norms[worker] = update_norm(flats)
        self.vectors[worker] = torch.cat([f.reshape(-1).float() for f in flats])
        self.weights[worker] = weight

    def reset(self) -> None:
        super().reset()
        self.vectors, self.weights, self._result = {}, {}, None

    def _aggregate(self) -> torch.Tensor:
        if self._result is None:
            members = self.members
            self._result = self.aggregator([self.vectors[w] for w in members], [self.weights[w] for w in members])
        return self._result

    def mean(self) -> list[torch.Tensor]:
        """The robust aggregate, split like the pushes' groups."""
        return [t.clone() for t in torch.split(self._aggregate(), self.sizes)]

    def stats(self) -> dict[str, dict[str, float | None]]:
        result = self._aggregate().double()
        result_norm = float(torch.linalg.vector_norm(result))
        out: dict[str, dict[str, float | None]] = {}
        for w in self.members:
            v = self.vectors[w].double()
            n = float(torch.linalg.vector_norm(v))
            cos = float(v.dot(result)) / (n * result_norm) if n > 0 and result_norm > 0 else float("nan")
            norm = self.norms[w]
            out[w] = {
                "norm": round(norm, 6) if math.isfinite(norm) else None,
                "cos": round(cos, 4) if math.isfinite(cos) else None,
            }
        return out
