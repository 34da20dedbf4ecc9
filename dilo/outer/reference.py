"""Naive loop-over-workers versions of the outer steps. Used only by tests.

They are written from the update rules in docs/ALGORITHMS.md, without torch.optim, buckets or
collectives, so the fast paths can be checked against them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mean_pseudo_grad(
    anchor: list[Tensor], workers: list[list[Tensor]], weights: list[float] | None = None
) -> list[Tensor]:
    """Delta = sum_i w_i (anchor - theta_i) / sum_i w_i, over the contributing workers."""
    weights = weights if weights is not None else [1.0] * len(workers)
    total = sum(w for w in weights)
    out = []
    for j, a in enumerate(anchor):
        acc = torch.zeros_like(a, dtype=torch.float64)
        for w, params in zip(weights, workers):
            acc += w * (a.double() - params[j].double())
        out.append((acc / total).float())
    return out


def nesterov_step(
    anchor: list[Tensor],
    grad: list[Tensor],
    momentum_buf: list[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """One outer SGD step with PyTorch semantics (dampening 0):
    m <- mu*m + g (m <- g on the first step); theta <- theta - lr*(g + mu*m) if nesterov else theta - lr*m."""
    new_anchor, new_buf = [], []
    for j, (a, g) in enumerate(zip(anchor, grad)):
        if momentum == 0.0:
            new_anchor.append(a - lr * g)
            new_buf.append(torch.zeros_like(a))
            continue
        m = g.clone() if momentum_buf is None else momentum * momentum_buf[j] + g
        step = g + momentum * m if nesterov else m
        new_anchor.append(a - lr * step)
        new_buf.append(m)
    return new_anchor, new_buf


def diloco_round(
    anchor: list[Tensor],
    workers: list[list[Tensor]],
    momentum_buf: list[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weights: list[float] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """One DiLoCo outer step from the workers' end-of-round parameters."""
    delta = mean_pseudo_grad(anchor, workers, weights)
    return nesterov_step(anchor, delta, momentum_buf, lr=lr, momentum=momentum, nesterov=nesterov)
