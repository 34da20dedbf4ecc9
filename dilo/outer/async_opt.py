"""Async local SGD with an adaptive outer optimizer (outer.optimizer other than sgd).

The coordinator's parameters get their update from the configured optimizer (FedAdam, FedYogi,
FedAdagrad, any torch.optim optimizer; dilo/outer/outer_opt.py) instead of SGD's:

- update = "nesterov" (one step per push): the gradient of each step is the staleness-weighted
  push, `s(t) g`;
- update = "fedbuff" (one step per buffer, as FedBuff's server optimizer): the gradient is the
  mean of K buffered pushes, `sum s_i w_i g_i / sum s_i w_i`.

Delayed Nesterov and FedAsync define their own step and take no other optimizer (config check).
The optimizer's state (Adam's moments, its step count) is part of the rule's state, so the
coordinator's checkpoints carry it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dilo.outer.outer_opt import OptimizerFactory, load_state_tensors, state_tensors
from dilo.outer.server import _Buffered


class OptimizedPushes(_Buffered):
    """Pushes (per_push) or buffers of K pushes as the gradients of an outer optimizer's steps."""

    _tensor_keys = ("acc",)

    def __init__(
        self,
        params: list[Tensor],
        *,
        make_optimizer: OptimizerFactory,
        per_push: bool,
        buffer: int,
        workers: int,
        staleness: str = "constant",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
    ) -> None:
        super().__init__(params, staleness=staleness, staleness_a=staleness_a, staleness_b=staleness_b)
        self.name = "nesterov" if per_push else "fedbuff"
        self.per_push = per_push
        self._leaves = [torch.nn.Parameter(p, requires_grad=False) for p in params]  # views of params
        self.optimizer = make_optimizer(self._leaves)
        self._init_buffer(buffer, workers)

    def push(self, g: list[Tensor], *, staleness: int, weight: float = 1.0, base: list[Tensor] | None = None) -> bool:
        if not self.per_push:
            return self._buffered(g, staleness, weight)
        g = self._check(g)
        s = self._weight(staleness)
        self.pushes += 1
        self._flush([x * s for x in g])
        self.flushes += 1
        return True

    def _flush(self, mean: list[Tensor]) -> None:
        """One step of the optimizer with `mean` as the gradient."""
        for leaf, grad in zip(self._leaves, mean):
            leaf.grad = grad
        self.optimizer.step()
        for leaf in self._leaves:
            leaf.grad = None

    def state_dict(self) -> dict[str, Any]:
        # copies: the coordinator keeps this to roll a non-finite push back, and steps change the state in place
        tensors = state_tensors(self.optimizer, self._leaves)
        return {**super().state_dict(), "optimizer": {k: v.detach().clone() for k, v in tensors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "optimizer" not in state:
            raise ValueError(f"{self.name} state with outer.optimizer has no 'optimizer' entry")
        tensors = state.pop("optimizer")
        super().load_state_dict(state)
        load_state_tensors(self.optimizer, self._leaves, tensors)
