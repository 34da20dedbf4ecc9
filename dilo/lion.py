"""Lion for the inner steps (inner.optimizer = "lion"; Chen et al., "Symbolic Discovery of
Optimization Algorithms", arXiv:2302.06675): the sign of an interpolated momentum, so every
update element is +-lr.

    c = beta1 m + (1 - beta1) g
    p <- p (1 - lr wd) - lr sign(c)          (decoupled weight decay, on matrices only)
    m <- beta2 m + (1 - beta2) g

Lion wants a learning rate 3-10x below AdamW's and a weight decay as much larger (the paper's
advice); inner.betas are its (beta1, beta2), e.g. (0.9, 0.99). Its state is one momentum per
parameter, half of AdamW's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dilo.config import InnerConfig
from dilo.model import params_of

Vote = Callable[[list[Tensor]], list[Tensor]]
"""Distributed Lion: the workers' update signs in, the aggregated directions out (a collective)."""


class Lion(torch.optim.Optimizer):
    """Lion over `params` (tensors or groups), foreach over each group's tensors.

    vote (set by DDP with outer.vote): each step's local signs of every group go through it in one
    call, and the directions it returns are applied instead; each worker's momentum still follows
    its own gradient."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0 or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(
                f"Lion needs lr > 0, betas in [0, 1), weight_decay >= 0; got {lr}, {betas}, {weight_decay}"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self.vote: Vote | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        groups: list[tuple[dict[str, Any], list[Tensor]]] = []
        signs: list[Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            moms = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moms.append(state["exp_avg"])
            c = torch._foreach_lerp(grads, moms, beta1)  # beta1 m + (1 - beta1) g
            torch._foreach_sign_(c)
            torch._foreach_lerp_(moms, grads, 1.0 - beta2)  # beta2 m + (1 - beta2) g: this worker's own
            groups.append((group, params))
            signs.extend(c)
        if self.vote is not None:
            signs = self.vote(signs)
        at = 0
        for group, params in groups:
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, signs[at : at + len(params)], alpha=-lr)
            at += len(params)


def build_lion(model: nn.Module, cfg: InnerConfig) -> Lion:
    """Lion with the weight decay on matrices (weights, embeddings), not on biases and norm gains."""
    from dilo.inner import decay_groups

    return Lion(decay_groups(params_of(model), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
