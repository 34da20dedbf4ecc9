"""Byzantine-robust aggregation of a round's pseudo-gradients (`[aggregate]`): what to make of N
vectors when some may be wrong (a bug, a bad island, a member that has the secret).

    agg = build_aggregator(cfg.aggregate)            # None: the plain weighted mean
    mean = agg(vectors, weights)                     # vectors: one flat fp32 tensor per contributor

- "median": the coordinate-wise median (the mean of the two middle values for an even count);
- "trimmed_mean": per coordinate, the `trim` largest and `trim` smallest values dropped, the rest
  averaged (Yin et al., 2018);
- "centered_clip": `iterations` of v <- v + mean_i clip(x_i - v, tau), from the coordinate-wise
  median (Karimireddy et al., 2021, "Learning from History for Byzantine Robust Optimization");
- "krum" / "multikrum": each vector scored by the summed squared distances to its N - f - 2
  nearest others; Krum takes the best one, Multi-Krum averages the `select` best (Blanchard et al.,
  2017);
- `clip_norm` > 0: every vector first scaled down to at most that norm (also with the plain mean).

The robust rules ignore the weights (every contributor counts once): a member that claims a large
weight must not buy influence with it. They need every contributor's vector, not their sum: in a
static world the exchange all-gathers the encoded payloads instead of all-reducing them ((N - 1)
payloads received per worker instead of about 2 (N - 1) / N), and the coordinator keeps the
round's pushes (memory O(N x model) instead of O(model)). Every worker runs the same deterministic
rule on the same bytes, so the anchors stay bit-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("dilo.outer.robust")

Aggregator = Callable[[list[Tensor], list[float]], Tensor]
"""(one flat fp32 vector per contributor, their weights) -> the round's aggregate."""


def clip_norms(vectors: list[Tensor], max_norm: float) -> list[Tensor]:
    """Each vector scaled down to a norm of at most max_norm (the others untouched)."""
    out = []
    for v in vectors:
        norm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
        out.append(v * (max_norm / norm) if norm > max_norm else v)
    return out


def weighted_mean(vectors: list[Tensor], weights: list[float]) -> Tensor:
    total = sum(weights)
    acc = torch.zeros_like(vectors[0], dtype=torch.float64)
    for v, w in zip(vectors, weights):
        acc.add_(v, alpha=w)
    return acc.div_(total).float()


def median(vectors: list[Tensor], weights: list[float]) -> Tensor:
    stacked = torch.stack(vectors).double()
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if n % 2:
        return ordered[n // 2].float()
    return ((ordered[n // 2 - 1] + ordered[n // 2]) / 2).float()


def trimmed_mean(vectors: list[Tensor], weights: list[float], *, trim: int) -> Tensor:
    n = len(vectors)
    if n <= 2 * trim:
        raise ValueError(f"a trimmed mean of {n} vectors cannot drop {trim} from each end")
    ordered = torch.stack(vectors).double().sort(dim=0).values
    return ordered[trim : n - trim].mean(dim=0).float()


def centered_clip(vectors: list[Tensor], weights: list[float], *, tau: float, iterations: int) -> Tensor:
    v = median(vectors, weights).double()
    xs = [x.double() for x in vectors]
    for _ in range(iterations):
        step = torch.zeros_like(v)
        for x in xs:
            d = x - v
            norm = float(torch.linalg.vector_norm(d))
            step.add_(d, alpha=min(1.0, tau / norm) if norm > 0 else 1.0)
        v = v + step / len(xs)
    return v.float()


def krum_scores(vectors: list[Tensor], byzantine: int) -> list[float]:
    """Each vector's summed squared distance to its N - f - 2 nearest others."""
    n = len(vectors)
    closest = n - byzantine - 2
    if closest < 1:
        raise ValueError(f"Krum with {n} vectors tolerates fewer than (n - 2) / 2 faulty ones, not {byzantine}")
    stacked = torch.stack(vectors).double()
    d2 = torch.cdist(stacked, stacked).pow(2)
    scores = []
    for i in range(n):
        others = torch.cat([d2[i, :i], d2[i, i + 1 :]])
        scores.append(float(others.sort().values[:closest].sum()))
    return scores


def multikrum(vectors: list[Tensor], weights: list[float], *, byzantine: int, select: int) -> Tensor:
    scores = krum_scores(vectors, byzantine)
    best = sorted(range(len(vectors)), key=lambda i: (scores[i], i))[: max(1, min(select, len(vectors)))]
    return torch.stack([vectors[i].double() for i in best]).mean(dim=0).float()


def build_aggregator(a: Any) -> Aggregator | None:
    """The aggregator of an `[aggregate]` config section; None for the plain weighted mean (which
    the exchange computes with its all-reduce, no vector gathered)."""
    rules: dict[str, Aggregator] = {
        "mean": weighted_mean,
        "median": median,
        "trimmed_mean": lambda v, w: trimmed_mean(v, w, trim=a.trim),
        "centered_clip": lambda v, w: centered_clip(v, w, tau=a.tau, iterations=a.iterations),
        "krum": lambda v, w: multikrum(v, w, byzantine=a.byzantine, select=1),
        "multikrum": lambda v, w: multikrum(v, w, byzantine=a.byzantine, select=a.select),
    }
    if not a.robust:
        return None
    rule, fewest = rules[a.kind], a.fewest()

    def aggregate(vectors: list[Tensor], weights: list[float]) -> Tensor:
        if a.clip_norm > 0:
            vectors = clip_norms(vectors, a.clip_norm)
        if len(vectors) < fewest:  # too few contributors this round (some left, or sent NaN)
            log.warning(
                "aggregate.kind=%r needs %d contributors, the round has %d: the coordinate-wise median instead",
                a.kind, fewest, len(vectors),
            )  # fmt: skip
            return median(vectors, weights)
        return rule(vectors, weights)

    return aggregate
