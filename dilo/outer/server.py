"""Server-side update rules of asynchronous local SGD: one worker push at a time, in arrival order.

A push carries a pseudo-gradient `g = old - new` (fp32, points like a gradient, docs/ALGORITHMS.md §0)
computed from the parameters the worker pulled, and its staleness: how many server versions were
applied since that pull. Each rule scales the push by a staleness weight `s(t)` (constant 1;
poly `(1 + t)^-a`; hinge `1` if `t <= b` else `1 / (a (t - b) + 1)`) and updates the
coordinator's fp32 parameters in place:

- `NesterovPerPush` ("nesterov", naive async): every push is one torch Nesterov step,
  `m <- mu m + s g; p <- p - lr (s g + mu m)`.
- `DelayedNesterov` ("delayed_nesterov", Liu et al. Alg. 3, §3.1): pushes are buffered; every
  push moves `p` by `lr (c mu m + s g / N)`, and the N-th push of a buffer also updates the momentum
  with the buffer's mean and applies it, so with c = 0 a full buffer equals one Nesterov step on the
  mean of its N pushes. `buffer=0` makes N the current number of workers (`set_workers`). If N
  shrinks below the pushes already buffered, the next push closes the buffer and the momentum takes
  the mean over the pushes actually in it.
- `FedBuff` ("fedbuff", Nguyen et al., §6): K pushes are summed as `sum s_i w_i g_i / sum s_i w_i`,
  then applied as one torch SGD step with momentum (no Nesterov, dampening 0) on the K-th push.
- `FedAsync` ("fedasync", Xie et al., §6): `x <- (1 - a) x + a (base - g)` with `a = alpha s(t)`,
  where `base` is the parameters the worker started from.

`dylu_steps` gives each worker its DyLU step count for the next round (§3.2).

    rule = build_rule(cfg.outer, params, workers=4)   # params: list of fp32 tensors, owned by the caller
    changed = rule.push(g, staleness=version - pulled_version, base=pulled if rule.needs_base else None)
    rule.set_workers(len(view))                        # buffer=0 rules follow the view size
    torch.save(rule.state_dict(), path)                # momentum, buffers, counters (not the params)

The rules do no I/O and keep no reference to the pushed tensors; all arithmetic runs under
`torch.no_grad()` in fp32 on the parameters' device.
"""

from __future__ import annotations

import abc
import functools
import math
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from dilo.config import AsyncConfig

__all__ = [
    "STALENESS_KINDS",
    "staleness_weight",
    "dylu_steps",
    "ServerRule",
    "NesterovPerPush",
    "DelayedNesterov",
    "FedBuff",
    "FedAsync",
    "build_rule",
]

STALENESS_KINDS = ("constant", "poly", "hinge")


def staleness_weight(kind: str, staleness: int, a: float, b: int) -> float:
    """s(t) for a push `staleness` versions old: constant 1, poly (1 + t)^-a, hinge 1 / (a (t - b) + 1) past b."""
    if staleness < 0:
        raise ValueError(f"staleness={staleness} must be >= 0")
    if kind == "constant":
        return 1.0
    if kind == "poly":
        return float((1.0 + staleness) ** -a)
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"staleness kind {kind!r} is not one of {', '.join(STALENESS_KINDS)}")


def dylu_steps(speeds: dict[str, float], inner_steps: int) -> dict[str, int]:
    """DyLU (Liu et al. Eq. 6): floor(v_w / max v * H) inner steps per worker, at least 1.

    Workers whose speed is not known yet (<= 0, NaN or Inf) get the full H.
    """
    if inner_steps < 1:
        raise ValueError(f"inner_steps={inner_steps} must be >= 1")
    known = [v for v in speeds.values() if math.isfinite(v) and v > 0]
    top = max(known, default=0.0)
    out = {}
    for w, v in speeds.items():
        if not (math.isfinite(v) and v > 0):
            out[w] = inner_steps
        else:
            out[w] = min(inner_steps, max(1, math.floor(v / top * inner_steps + 1e-9)))
    return out


@runtime_checkable
class ServerRule(Protocol):
    """What the coordinator and the simulator drive: one push at a time, params updated in place."""

    name: str
    needs_base: bool

    def push(
        self, g: list[Tensor], *, staleness: int, weight: float = 1.0, base: list[Tensor] | None = None
    ) -> bool: ...

    def set_workers(self, n: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Rule:
    """Shared argument checks, staleness weighting and state (de)serialisation."""

    name = ""
    needs_base = False
    _tensor_keys: tuple[str, ...] = ()
    """Lists of fp32 tensors shaped like params."""
    _int_keys: tuple[str, ...] = ()
    _float_keys: tuple[str, ...] = ()
    """Saved as 0-d float64 tensors."""

    def __init__(self, params: list[Tensor], *, staleness: str, staleness_a: float, staleness_b: int) -> None:
        if not params:
            raise ValueError("params must hold at least one tensor")
        for i, p in enumerate(params):
            if p.dtype != torch.float32:
                raise ValueError(f"params[{i}] has dtype {p.dtype}; the server keeps fp32 parameters")
        if staleness not in STALENESS_KINDS:
            raise ValueError(f"staleness={staleness!r} is not one of {', '.join(STALENESS_KINDS)}")
        if not staleness_a >= 0:
            raise ValueError(f"staleness_a={staleness_a} must be >= 0")
        if staleness_b < 0:
            raise ValueError(f"staleness_b={staleness_b} must be >= 0")
        self.params = params
        self.staleness = staleness
        self.staleness_a = float(staleness_a)
        self.staleness_b = int(staleness_b)
        self.pushes = 0
        """Pushes received (skipped ones included)."""

    def _weight(self, staleness: int) -> float:
        return staleness_weight(self.staleness, staleness, self.staleness_a, self.staleness_b)

    def _check(self, g: list[Tensor], what: str = "g") -> list[Tensor]:
        if len(g) != len(self.params):
            raise ValueError(f"{what} has {len(g)} tensors, params has {len(self.params)}")
        for i, (x, p) in enumerate(zip(g, self.params)):
            if x.shape != p.shape:
                raise ValueError(f"{what}[{i}] has shape {tuple(x.shape)}, params[{i}] has {tuple(p.shape)}")
        return [x.to(device=p.device, dtype=torch.float32) for x, p in zip(g, self.params)]

    def set_workers(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"workers={n} must be >= 1")

    def _zeros(self) -> list[Tensor]:
        return [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: int(getattr(self, k)) for k in ("pushes", *self._int_keys)}
        for k in self._float_keys:
            state[k] = torch.tensor(getattr(self, k), dtype=torch.float64)
        for k in self._tensor_keys:
            state[k] = [x.detach().clone() for x in getattr(self, k)]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"pushes", *self._int_keys, *self._float_keys, *self._tensor_keys}
        if set(state) != keys:
            raise ValueError(f"{self.name} state has keys {sorted(state)}, expected {sorted(keys)}")
        for k in self._tensor_keys:
            self._check(state[k], what=f"state[{k!r}]")
        with torch.no_grad():
            for k in self._tensor_keys:
                for dst, src in zip(getattr(self, k), state[k]):
                    dst.copy_(src)
        for k in ("pushes", *self._int_keys):
            setattr(self, k, int(state[k]))
        for k in self._float_keys:
            setattr(self, k, float(state[k]))


def _check_lr_momentum(lr: float, momentum: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr={lr} must be > 0")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum} must lie in [0, 1)")


def _check_buffer_workers(buffer: int, workers: int) -> None:
    if buffer < 0:
        raise ValueError(f"buffer={buffer} must be >= 0 (0: the number of workers)")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")


class NesterovPerPush(_Rule):
    """Naive async: each push is one torch Nesterov step, m <- mu m + s g; p <- p - lr (s g + mu m)."""

    name = "nesterov"
    _tensor_keys = ("momentum_buf",)

    def __init__(
        self,
        params: list[Tensor],
        *,
        lr: float,
        momentum: float,
        staleness: str = "constant",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
    ) -> None:
        super().__init__(params, staleness=staleness, staleness_a=staleness_a, staleness_b=staleness_b)
        _check_lr_momentum(lr, momentum)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.momentum_buf = self._zeros()

    def push(self, g: list[Tensor], *, staleness: int, weight: float = 1.0, base: list[Tensor] | None = None) -> bool:
        g = self._check(g)
        s = self._weight(staleness)
        self.pushes += 1
        with torch.no_grad():
            for p, m, x in zip(self.params, self.momentum_buf, g):
                x = x * s
                m.mul_(self.momentum).add_(x)
                p.sub_(x.add(m, alpha=self.momentum), alpha=self.lr)
        return True


class DelayedNesterov(_Rule):
    """Delayed Nesterov (Liu et al., arXiv:2401.09135, Alg. 3): momentum updated once per N pushes."""

    name = "delayed_nesterov"
    _tensor_keys = ("momentum_buf", "delta")
    _int_keys = ("since", "workers")

    def __init__(
        self,
        params: list[Tensor],
        *,
        lr: float,
        momentum: float,
        buffer: int,
        workers: int,
        activation: float = 0.0,
        staleness: str = "constant",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
    ) -> None:
        super().__init__(params, staleness=staleness, staleness_a=staleness_a, staleness_b=staleness_b)
        _check_lr_momentum(lr, momentum)
        _check_buffer_workers(buffer, workers)
        if not 0 <= activation <= 1:
            raise ValueError(f"activation={activation} must lie in [0, 1]")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.buffer = int(buffer)
        self.workers = int(workers)
        self.activation = float(activation)
        self.momentum_buf = self._zeros()
        self.delta = self._zeros()
        """Sum of the (staleness-scaled) pushes of the current buffer."""
        self.since = 0
        """Pushes already in the current buffer."""

    @property
    def buffer_size(self) -> int:
        """N: pushes per momentum update."""
        return self.buffer or self.workers

    @property
    def c(self) -> float:
        """The momentum activation in effect, min(activation, 1/N)."""
        return min(self.activation, 1.0 / self.buffer_size)

    def set_workers(self, n: int) -> None:
        super().set_workers(n)
        self.workers = int(n)

    def push(self, g: list[Tensor], *, staleness: int, weight: float = 1.0, base: list[Tensor] | None = None) -> bool:
        g = self._check(g)
        s = self._weight(staleness)
        n, c, beta = self.buffer_size, self.c, self.momentum
        milestone = self.since + 1 >= n
        count = self.since + 1  # == n unless N shrank mid-buffer
        with torch.no_grad():
            for p, m, d, x in zip(self.params, self.momentum_buf, self.delta, g):
                x = x * s
                d.add_(x)
                if milestone:
                    m.mul_(beta).add_(d, alpha=1.0 / count)
                    p.sub_(m, alpha=self.lr * (1.0 - c * n + c) * beta)
                    d.zero_()
                elif c > 0:
                    p.sub_(m, alpha=self.lr * c * beta)
                p.sub_(x, alpha=self.lr / n)
        self.since = 0 if milestone else self.since + 1
        self.pushes += 1
        return True


class _Buffered(_Rule, abc.ABC):
    """K pushes summed as sum s_i w_i g_i / sum s_i w_i, the mean handed to `_flush` on the K-th
    (FedBuff's buffer; also the adaptive outer optimizers' of dilo/outer/async_opt.py)."""

    _int_keys = ("count", "workers", "flushes")
    _float_keys = ("acc_weight",)

    def _init_buffer(self, buffer: int, workers: int) -> None:
        _check_buffer_workers(buffer, workers)
        self.buffer = int(buffer)
        self.workers = int(workers)
        self.acc = self._zeros()
        """Sum of s_i w_i g_i over the buffered pushes."""
        self.acc_weight = 0.0
        """Sum of s_i w_i over the buffered pushes."""
        self.count = 0
        """Pushes in the buffer."""
        self.flushes = 0
        """Buffers applied."""

    @property
    def buffer_size(self) -> int:
        """K: pushes per applied mean."""
        return self.buffer or self.workers

    def set_workers(self, n: int) -> None:
        super().set_workers(n)
        self.workers = int(n)

    def _buffered(self, g: list[Tensor], staleness: int, weight: float) -> bool:
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight={weight} must be finite and >= 0")
        g = self._check(g)
        w = self._weight(staleness) * weight
        self.pushes += 1
        if w == 0:
            return False
        with torch.no_grad():
            for a, x in zip(self.acc, g):
                a.add_(x, alpha=w)
            self.acc_weight += w
            self.count += 1
            if self.count < self.buffer_size:
                return False
            for a in self.acc:
                a.div_(self.acc_weight)
            self._flush(self.acc)
            for a in self.acc:
                a.zero_()
        self.acc_weight = 0.0
        self.count = 0
        self.flushes += 1
        return True

    @abc.abstractmethod
    def _flush(self, mean: list[Tensor]) -> None:
        """Apply the buffer's mean (FedBuff: one SGD step; async_opt: one step of the optimizer)."""


class FedBuff(_Buffered):
    """FedBuff: K buffered pushes, their s_i w_i-weighted mean applied as one SGD (momentum) step."""

    name = "fedbuff"
    _tensor_keys = ("momentum_buf", "acc")

    def __init__(
        self,
        params: list[Tensor],
        *,
        lr: float,
        momentum: float,
        buffer: int,
        workers: int,
        staleness: str = "constant",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
    ) -> None:
        super().__init__(params, staleness=staleness, staleness_a=staleness_a, staleness_b=staleness_b)
        _check_lr_momentum(lr, momentum)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.momentum_buf = self._zeros()
        self._init_buffer(buffer, workers)

    def push(self, g: list[Tensor], *, staleness: int, weight: float = 1.0, base: list[Tensor] | None = None) -> bool:
        return self._buffered(g, staleness, weight)

    def _flush(self, mean: list[Tensor]) -> None:
        for p, m, a in zip(self.params, self.momentum_buf, mean):
            if self.momentum:
                m.mul_(self.momentum).add_(a)
                p.sub_(m, alpha=self.lr)
            else:
                p.sub_(a, alpha=self.lr)


class FedAsync(_Rule):
    """FedAsync (Xie et al., arXiv:1903.03934): x <- (1 - a) x + a (base - g), a = alpha s(staleness)."""

    name = "fedasync"
    needs_base = True

    def __init__(
        self,
        params: list[Tensor],
        *,
        alpha: float,
        staleness: str = "constant",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
    ) -> None:
        super().__init__(params, staleness=staleness, staleness_a=staleness_a, staleness_b=staleness_b)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha} must lie in (0, 1]")
        self.alpha = float(alpha)

    def push(self, g: list[Tensor], *, staleness: int, weight: float = 1.0, base: list[Tensor] | None = None) -> bool:
        if base is None:
            raise ValueError("fedasync needs base: the parameters the worker started from")
        g = self._check(g)
        base = self._check(base, what="base")
        a = self.alpha * self._weight(staleness)
        self.pushes += 1
        with torch.no_grad():
            for p, b, x in zip(self.params, base, g):
                p.lerp_(b - x, a)
        return True


class _StalenessArgs(TypedDict):
    """The keyword arguments every rule takes for its staleness weight s(t)."""

    staleness: str
    staleness_a: float
    staleness_b: int


def build_rule(cfg: AsyncConfig, params: list[Tensor], workers: int) -> ServerRule:
    """The rule named by cfg.update, with cfg's hyper-parameters, over the coordinator's params."""
    stale: _StalenessArgs = {"staleness": cfg.staleness, "staleness_a": cfg.staleness_a, "staleness_b": cfg.staleness_b}
    if cfg.optimizer != "sgd":  # an adaptive outer optimizer takes the steps (dilo/outer/async_opt.py)
        from dilo.outer.async_opt import OptimizedPushes
        from dilo.outer.outer_opt import build_outer_optimizer

        return OptimizedPushes(
            params, make_optimizer=functools.partial(build_outer_optimizer, cfg), per_push=cfg.update == "nesterov",
            buffer=cfg.buffer, workers=workers, **stale,
        )  # fmt: skip
    if cfg.update == "nesterov":
        return NesterovPerPush(params, lr=cfg.lr, momentum=cfg.momentum, **stale)
    if cfg.update == "delayed_nesterov":
        return DelayedNesterov(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            buffer=cfg.buffer,
            workers=workers,
            activation=cfg.activation,
            **stale,
        )
    if cfg.update == "fedbuff":
        return FedBuff(params, lr=cfg.lr, momentum=cfg.momentum, buffer=cfg.buffer, workers=workers, **stale)
    if cfg.update == "fedasync":
        return FedAsync(params, alpha=cfg.alpha, **stale)
    raise ValueError(f"update={cfg.update!r} is not one of nesterov, delayed_nesterov, fedbuff, fedasync")
