"""The outer optimizer: what the anchor does with the round's mean pseudo-gradient.

    opt = build_outer_optimizer(cfg.outer, anchor_params)   # outer.optimizer picks it
    for a, g in zip(anchor_params, mean): a.grad = g
    opt.step()

- "sgd": torch.optim.SGD with outer.momentum / outer.nesterov (DiLoCo's Nesterov; FedAvg at lr 1);
- "fedadam", "fedyogi", "fedadagrad": the adaptive server optimizers of Reddi et al., "Adaptive
  Federated Optimization" (arXiv:2003.00295, Algorithm 2), `FedOpt` below;
- "torch.optim.<Name>": any torch optimizer, with outer.optimizer_args as its keyword arguments
  (e.g. torch.optim.Adam with eps = 0.1, which the DiLoCo paper found outer Adam needs).

The pseudo-gradient keeps dilo's sign everywhere (anchor minus local parameters, so it points like
a gradient and every torch optimizer descends along it); the paper writes the FedOpt rules with
the opposite sign (the mean of local minus global, added to the model), which is the same update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

FEDOPT = ("fedadam", "fedyogi", "fedadagrad")

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
"""The anchor's parameters -> their outer optimizer (a strategy builds it over its own anchor)."""


class FedOpt(torch.optim.Optimizer):
    """FedAdam, FedYogi and FedAdagrad (Reddi et al., Algorithm 2), with g the mean pseudo-gradient:

        m <- beta1 m + (1 - beta1) g
        v <- v + g^2                                   (adagrad)
        v <- beta2 v + (1 - beta2) g^2                 (adam)
        v <- v - (1 - beta2) g^2 sign(v - g^2)         (yogi)
        x <- x - lr m / (sqrt(v) + tau)

    No bias correction (as in the paper's algorithm); v starts at tau^2 (the paper's v_{-1} >=
    tau^2), m at 0. tau is the adaptivity: the larger, the closer to momentum SGD."""

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        rule: str,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-3,
    ) -> None:
        if rule not in ("adam", "yogi", "adagrad"):
            raise ValueError(f"FedOpt rule {rule!r}: expected adam, yogi or adagrad")
        if not lr > 0 or not tau > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"FedOpt needs lr > 0, tau > 0 and betas in [0, 1); got {lr}, {tau}, {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "tau": tau, "rule": rule})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, tau, rule = group["lr"], group["tau"], group["rule"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.full_like(p, tau * tau)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                if rule == "adagrad":
                    v.add_(g2)
                elif rule == "adam":
                    v.mul_(beta2).add_(g2, alpha=1 - beta2)
                else:  # yogi: v moves towards g^2 by at most (1 - beta2) g^2
                    v.sub_(g2.mul_(torch.sign(v - g2)), alpha=1 - beta2)
                p.addcdiv_(m, v.sqrt().add_(tau), value=-lr)


def build_outer_optimizer(
    o: Any, params: list[torch.nn.Parameter], *, foreach: bool | None = None
) -> torch.optim.Optimizer:
    """The outer optimizer of an outer config (DiLoCoConfig, FedAvgConfig) over the anchor's
    parameters; the same on every worker and on the coordinator. foreach: SGD's implementation
    (None: torch's choice)."""
    name = getattr(o, "optimizer", "sgd")
    args = dict(getattr(o, "optimizer_args", {}) or {})
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=o.lr, momentum=getattr(o, "momentum", 0.0), nesterov=getattr(o, "nesterov", False),
            foreach=foreach,
        )  # fmt: skip
    if name in FEDOPT:
        betas = tuple(args.pop("betas", (0.9, 0.99)))
        return FedOpt(params, rule=name.removeprefix("fed"), lr=o.lr, betas=betas, **args)
    cls: Any = torch_optimizer(name)
    optimizer: torch.optim.Optimizer = cls(params, lr=o.lr, **args)
    return optimizer


def torch_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """torch.optim.<Name> by its dotted name; ValueError when there is none."""
    attr = name.removeprefix("torch.optim.")
    cls = getattr(torch.optim, attr, None) if name.startswith("torch.optim.") else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"outer.optimizer={name!r}: expected sgd, fedadam, fedyogi, fedadagrad or torch.optim.<Name> "
            "(e.g. torch.optim.Adam)"
        )
    return cls


def check_outer_optimizer(o: Any) -> None:
    """Build the configured outer optimizer on one dummy parameter, so that a wrong name or keyword
    argument fails at config time (ValueError), before any socket opens."""
    param = torch.nn.Parameter(torch.zeros(2))
    try:
        build_outer_optimizer(o, [param])
    except TypeError as e:
        raise ValueError(f"outer.optimizer_args {getattr(o, 'optimizer_args', {})}: {e}") from None


def state_tensors(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, Tensor]:
    """The outer optimizer's per-parameter state as named tensors (the coordinator's checkpoints,
    WELCOME and STATE): "m.<i>" for SGD's momentum buffer, "o.<i>.<key>" for any other entry
    (Adam's exp_avg, its step count as a 0-d tensor, ...)."""
    out: dict[str, Tensor] = {}
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            name = f"m.{i}" if key == "momentum_buffer" else f"o.{i}.{key}"
            out[name] = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
    return out


def load_state_tensors(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], tensors: dict[str, Tensor]
) -> None:
    """The inverse of `state_tensors`: each parameter's state exactly as named (none: no state)."""
    with torch.no_grad():
        for i, p in enumerate(params):
            state: dict[str, Any] = {}
            if f"m.{i}" in tensors:
                state["momentum_buffer"] = tensors[f"m.{i}"].clone()
            prefix = f"o.{i}."
            for name, t in tensors.items():
                if name.startswith(prefix):
                    state[name[len(prefix) :]] = t.clone()
            if state:
                opt.state[p] = state
            else:
                opt.state.pop(p, None)
