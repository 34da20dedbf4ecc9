"""How `dilo merge` combines one tensor of several models (all in float32; `dilo/merge.py` picks).

    weighted_mean(ts, ws)                       sum_i w_i t_i / sum_i w_i
    fisher_mean(ts, fs, ws)                     per element: sum_i w_i F_i t_i / sum_i w_i F_i (Matena & Raffel, 2022)
    ties(base, ts, ws, density)                 TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint mean
    dare(base, ts, ws, density, seed)           DARE (Yu et al., 2024): drop and rescale the task vectors, then average

TIES and DARE work on task vectors t_i - base (base: the models' common starting point, e.g. the
DiLoCo anchor they were fine-tuned from) and add the merged vector back to the base.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def weighted_mean(tensors: list[Tensor], weights: list[float]) -> Tensor:
    total = sum(weights)
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc.add_(t.double(), alpha=w)
    return (acc / total).float()


def fisher_mean(tensors: list[Tensor], fishers: list[Tensor], weights: list[float], eps: float = 1e-8) -> Tensor:
    """Each element weighted by the model's (diagonal) Fisher information there: the merge keeps
    every model's values where that model is sure of them. eps keeps elements no model is sure of
    at their plain weighted mean."""
    num = torch.zeros_like(tensors[0], dtype=torch.float64)
    den = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, f, w in zip(tensors, fishers, weights):
        fw = w * (f.double() + eps)
        num.add_(fw * t.double())
        den.add_(fw)
    return (num / den).float()


def trim(task: Tensor, density: float) -> Tensor:
    """The task vector with all but its `density` largest-magnitude entries set to 0 (ties kept)."""
    k = max(1, int(round(density * task.numel())))
    if k >= task.numel():
        return task.clone()
    threshold = task.abs().reshape(-1).kthvalue(task.numel() - k + 1).values
    return torch.where(task.abs() >= threshold, task, torch.zeros_like(task))


def ties(base: Tensor, tensors: list[Tensor], weights: list[float], *, density: float) -> Tensor:
    """TIES-merging: trim each task vector to its top `density` entries by magnitude, elect each
    element's sign by the weighted sum of the trimmed vectors, and average (weighted) only the
    entries that agree with it."""
    b = base.double()
    trimmed = [trim(t.double() - b, density) for t in tensors]
    sign = torch.sign(sum(w * t for w, t in zip(weights, trimmed)))  # type: ignore[arg-type]
    num = torch.zeros_like(b)
    den = torch.zeros_like(b)
    for t, w in zip(trimmed, weights):
        agree = (torch.sign(t) == sign) & (t != 0)
        num.add_(torch.where(agree, t, torch.zeros_like(t)), alpha=w)
        den.add_(agree.double(), alpha=w)
    return (b + torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))).float()


def dare(base: Tensor, tensors: list[Tensor], weights: list[float], *, density: float, seed: int, name: str) -> Tensor:
    """DARE: keep each task-vector entry with probability `density` (a seeded mask per model and
    tensor) and rescale the kept ones by 1 / density, then take the weighted mean."""
    b = base.double()
    kept = []
    for i, t in enumerate(tensors):
        digest = hashlib.blake2b(f"{seed}/{name}/{i}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        mask = torch.rand(t.shape, generator=gen) < density
        kept.append(torch.where(mask, (t.double() - b) / density, torch.zeros_like(b)))
    return (b + weighted_mean(kept, weights).double()).float()
