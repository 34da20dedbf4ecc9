"""Aggregation checks the coordinator applies to a round: finiteness, and what an operator needs
to see a member whose update stands out (its norm, its cosine to the round's mean).

    if not finite(means): ...                       # one aminmax per tensor
    stats = member_stats([(worker, flats), ...], means)
    for w in outliers(stats): log.warning(...)
"""

from __future__ import annotations

import math

import torch


def finite(tensors: list[torch.Tensor]) -> bool:
    """No NaN or Inf in any tensor (one aminmax per tensor: NaN and Inf reach the extremes)."""
    for t in tensors:
        if t.numel():
            lo, hi = torch.aminmax(t)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                return False
    return True


def member_stats(
    contributions: list[tuple[str, list[torch.Tensor] | None]], means: list[torch.Tensor]
) -> dict[str, dict[str, float | None]]:
    """Per member: the norm of its decoded pseudo-gradient and its cosine to the round's mean, so an
    operator can see a scaled or sign-flipped update (robust aggregation would also act on it)."""

    def norm(xs: list[torch.Tensor]) -> float:
        return math.sqrt(sum(float(torch.linalg.vector_norm(x)) ** 2 for x in xs))

    mean_norm = norm(means)
    out: dict[str, dict[str, float | None]] = {}
    for w, flats in contributions:
        if not flats:
            continue
        n = norm(flats)
        dot = sum(float(torch.dot(f, m)) for f, m in zip(flats, means))
        cos = dot / (n * mean_norm) if n > 0 and mean_norm > 0 else float("nan")
        out[w] = {
            "norm": round(n, 6) if math.isfinite(n) else None,
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
