"""Naive loop-over-workers versions of the outer steps. Used only by tests.

They are written from the update rules in docs/ALGORITHMS.md, without torch.optim, buckets or
collectives, so the fast paths can be checked against them.
"""

from __future__ import annotations

from collections.abc import Callable

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


def overlapped_diloco(
    anchor: list[Tensor],
    move: Callable[[int, int, list[Tensor]], list[Tensor]],
    rounds: int,
    workers: int,
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """outer.overlap, one loop over rounds and workers. move(t, i, x): what worker i's inner steps
    subtract from its parameters x in round t. Round t's mean is applied at the end of round t + 1,
    whose own progress (delta_i = base_i - x_i) is then moved onto the new anchor; the last round
    exchanges at once and everyone ends on the anchor. Returns (anchor, each worker's parameters)."""
    n = workers
    g, buf = [a.clone() for a in anchor], None
    x = [[a.clone() for a in anchor] for _ in range(n)]
    base = [[a.clone() for a in anchor] for _ in range(n)]
    pending: list[Tensor] | None = None
    for t in range(rounds):
        x = [[p - m for p, m in zip(x[i], move(t, i, x[i]))] for i in range(n)]
        deltas = [[b - p for b, p in zip(base[i], x[i])] for i in range(n)]
        mean = [torch.stack([d[j] for d in deltas]).double().mean(0).float() for j in range(len(g))]
        if pending is not None:
            g, buf = nesterov_step(g, pending, buf, lr=lr, momentum=momentum, nesterov=nesterov)
        if t == rounds - 1:
            g, buf = nesterov_step(g, mean, buf, lr=lr, momentum=momentum, nesterov=nesterov)
            x = [[a.clone() for a in g] for _ in range(n)]
        else:
            x = [[a - d for a, d in zip(g, deltas[i])] for i in range(n)]
            base = [[p.clone() for p in x[i]] for i in range(n)]
            pending = mean
    return g, x


def streaming_diloco(
    anchor: list[Tensor],
    fragment: list[int],
    move: Callable[[int, int, list[Tensor]], list[Tensor]],
    steps: int,
    workers: int,
    *,
    inner_steps: int,
    fragments: int,
    delay: int,
    alpha: float,
    lr: float,
    momentum: float,
    nesterov: bool,
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Streaming DiLoCo, one loop over inner steps and workers. fragment[j]: parameter j's
    fragment. move(s, i, x): what worker i's inner step s subtracts from its parameters x.
    Fragment (k - 1) mod P is sent after step k * H / P and applied `delay` steps later (at once
    when 0): outer SGD on its parameters only, then x <- alpha * x + (1 - alpha) * anchor. The last
    step applies the fragment in flight, exchanges every fragment's progress, takes one outer step
    of all of them and puts every worker on the anchor. Returns (anchor, each worker's parameters)."""
    n, period = workers, inner_steps // fragments
    g = [a.clone() for a in anchor]
    buf: list[Tensor | None] = [None] * len(g)  # per-parameter momentum, from its first outer step
    x = [[a.clone() for a in anchor] for _ in range(n)]

    def mean_delta(j: int) -> Tensor:
        return torch.stack([g[j] - x[i][j] for i in range(n)]).double().mean(0).float()

    def outer_step(means: dict[int, Tensor]) -> None:
        for j, d in means.items():
            if momentum == 0.0:
                g[j] = g[j] - lr * d
                continue
            prev = buf[j]
            m = d.clone() if prev is None else momentum * prev + d
            buf[j] = m
            g[j] = g[j] - lr * (d + momentum * m if nesterov else m)

    def apply(q: int, means: dict[int, Tensor]) -> None:
        outer_step(means)
        for i in range(n):
            for j in means:
                x[i][j] = torch.lerp(x[i][j], g[j], 1.0 - alpha)

    pending: tuple[int, dict[int, Tensor]] | None = None
    for s in range(steps):
        x = [[p - m for p, m in zip(x[i], move(s, i, x[i]))] for i in range(n)]
        c = s + 1
        if pending is not None and (c == steps or (c - delay) % period == 0):
            apply(*pending)
            pending = None
        if c == steps:
            outer_step({j: mean_delta(j) for j in range(len(g))})
            x = [[a.clone() for a in g] for _ in range(n)]
            break
        if c % period == 0:
            q = (c // period - 1) % fragments
            pending = (q, {j: mean_delta(j) for j in range(len(g)) if fragment[j] == q})
            if delay == 0:
                apply(*pending)
                pending = None
    return g, x


def fedopt_step(
    anchor: list[Tensor],
    grad: list[Tensor],
    state: tuple[list[Tensor], list[Tensor]] | None,
    *,
    rule: str,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.99),
    tau: float = 1e-3,
) -> tuple[list[Tensor], tuple[list[Tensor], list[Tensor]]]:
    """One FedAdam / FedYogi / FedAdagrad step (Reddi et al., Algorithm 2) in float64, with g the
    mean pseudo-gradient in dilo's sign (old minus new): m <- b1 m + (1 - b1) g; v <- v + g^2
    (adagrad), b2 v + (1 - b2) g^2 (adam), v - (1 - b2) g^2 sign(v - g^2) (yogi); theta <- theta -
    lr m / (sqrt(v) + tau); m starts at 0 and v at tau^2."""
    b1, b2 = betas
    ms, vs = (
        state
        if state is not None
        else ([torch.zeros_like(a) for a in anchor], [torch.full_like(a, tau**2) for a in anchor])
    )
    new_anchor, new_m, new_v = [], [], []
    for a, g, m, v in zip(anchor, grad, ms, vs):
        g64, m64, v64 = g.double(), m.double(), v.double()
        m64 = b1 * m64 + (1 - b1) * g64
        if rule == "adagrad":
            v64 = v64 + g64 * g64
        elif rule == "adam":
            v64 = b2 * v64 + (1 - b2) * g64 * g64
        else:
            v64 = v64 - (1 - b2) * g64 * g64 * torch.sign(v64 - g64 * g64)
        new_anchor.append((a.double() - lr * m64 / (v64.sqrt() + tau)).float())
        new_m.append(m64.float())
        new_v.append(v64.float())
    return new_anchor, (new_m, new_v)


def robust_aggregate(kind: str, vectors: list[Tensor], **kw: float) -> Tensor:
    """The robust rules of dilo/outer/robust.py, one coordinate (or one pair of vectors) at a time
    in Python floats: median, trimmed_mean (trim), centered_clip (tau, iterations), krum and
    multikrum (byzantine, select)."""
    n, d = len(vectors), vectors[0].numel()
    rows = [[float(x) for x in v.reshape(-1).tolist()] for v in vectors]

    def coordinate_median(points: list[list[float]]) -> list[float]:
        out = []
        for j in range(d):
            col = sorted(p[j] for p in points)
            m = len(col)
            out.append(col[m // 2] if m % 2 else (col[m // 2 - 1] + col[m // 2]) / 2)
        return out

    if kind == "median":
        result = coordinate_median(rows)
    elif kind == "trimmed_mean":
        b = int(kw["trim"])
        result = [sum(sorted(p[j] for p in rows)[b : n - b]) / (n - 2 * b) for j in range(d)]
    elif kind == "centered_clip":
        v = coordinate_median(rows)
        for _ in range(int(kw["iterations"])):
            step = [0.0] * d
            for p in rows:
                diff = [p[j] - v[j] for j in range(d)]
                norm = sum(x * x for x in diff) ** 0.5
                scale = min(1.0, kw["tau"] / norm) if norm > 0 else 1.0
                step = [s + scale * x for s, x in zip(step, diff)]
            v = [a + s / n for a, s in zip(v, step)]
        result = v
    elif kind in ("krum", "multikrum"):
        closest = n - int(kw["byzantine"]) - 2
        scores = []
        for i in range(n):
            dists = sorted(sum((rows[i][j] - rows[k][j]) ** 2 for j in range(d)) for k in range(n) if k != i)
            scores.append(sum(dists[:closest]))
        select = 1 if kind == "krum" else int(kw["select"])
        best = sorted(range(n), key=lambda i: (scores[i], i))[:select]
        result = [sum(rows[i][j] for i in best) / len(best) for j in range(d)]
    else:
        raise ValueError(kind)
    return torch.tensor(result, dtype=torch.float32).reshape(vectors[0].shape)
