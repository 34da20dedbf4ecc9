"""The inner loop: local optimizer steps on one worker's island. It never communicates.

AdamW (or SGD) with linear warmup and cosine decay over the whole run, gradient accumulation,
global-norm clipping and optional bf16 autocast (`precision = "auto"`: bf16 only where the device
computes it natively). Parameters and optimizer state stay fp32.
The optimizer state persists across rounds: DiLoCo keeps each worker's AdamW moments local.

    inner = InnerLoop(model, cfg.inner, total_steps=cfg.steps)
    loss = inner.step(island.next_batch, grad_hook=None)   # one optimizer step
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import platform
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dilo.config import InnerConfig
from dilo.errors import ConfigError
from dilo.model import params_of

Batch = tuple[Tensor, Tensor]
log = logging.getLogger("dilo.inner")


def _cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (x86 `flags`, arm64 `Features`); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether the device has bf16 arithmetic in hardware. Without it, bf16 autocast emulates the
    matmuls: on an AVX2-only x86 CPU they run 15-100x slower than fp32 ones."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        flags = _cpu_flags()
        if platform.machine().lower() in ("aarch64", "arm64"):
            return "bf16" in flags
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


@functools.cache
def resolve_precision(precision: str, device_type: str) -> str:
    """What `inner.precision` means on this device: "fp32" or "bf16" ("auto": bf16 where it is native)."""
    if precision == "auto":
        return "bf16" if native_bf16(device_type) else "fp32"
    if precision == "bf16" and not native_bf16(device_type):
        log.warning(
            "inner.precision = 'bf16' on a %s without native bf16 arithmetic: autocast emulates it, "
            "much slower than fp32; set inner.precision = 'auto' (bf16 only where it is native) or 'fp32'",
            device_type.upper(),
        )
    return precision


def autocast(precision: str, device_type: str) -> Callable[[], contextlib.AbstractContextManager[object]]:
    """A factory of the autocast context for `precision` ("fp32", "bf16" or "auto") on the device."""
    if resolve_precision(precision, device_type) == "bf16":
        return lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def lr_at(step: int, cfg: InnerConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio*lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: InnerConfig) -> torch.optim.Optimizer:
    """AdamW decays matrices (weights, embeddings) but not biases and norm gains, as in GPT-2;
    muon: dilo/muon.py; lion: dilo/lion.py."""
    params = params_of(model)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "muon":
        from dilo.muon import build_muon

        return build_muon(model, cfg)
    if cfg.optimizer == "lion":
        from dilo.lion import build_lion

        return build_lion(model, cfg)
    return torch.optim.AdamW(decay_groups(params, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, foreach=True)


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups with the weight decay on matrices (weights, embeddings) and none on biases
    and norm gains, as in GPT-2 (AdamW, Lion, Muon's AdamW half); empty groups left out."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: each block of the model's layer stack (its first nn.ModuleList)
    recomputes its activations in the backward pass; a Hugging Face model inside `model` uses its
    own gradient_checkpointing_enable. Parameter names do not change."""
    for m in model.modules():
        enable = getattr(m, "gradient_checkpointing_enable", None)  # a transformers PreTrainedModel
        if callable(enable):
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList)), None)
    if layers is None or not len(layers):
        raise ConfigError("inner.activation_checkpointing needs a model with its blocks in an nn.ModuleList")
    for block in layers:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(*args: Any, **kwargs: Any) -> Tensor:
        out: Tensor = checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return out

    return run


class InnerLoop:
    def __init__(self, model: nn.Module, cfg: InnerConfig, *, total_steps: int) -> None:
        self.model = model
        self.cfg = cfg
        self.total_steps = total_steps
        self.optimizer = build_optimizer(model, cfg)
        self.step_count = 0
        self._params = params_of(model)
        self._autocast = autocast(cfg.precision, next(model.parameters()).device.type)
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        # the compiled module shares the model's parameters: strategies and checkpoints see no difference
        self._forward: Callable[..., Any] = torch.compile(model) if cfg.compile else model

    def step(self, next_batch: Callable[[], Batch], grad_hook: Callable[[nn.Module], None] | None = None) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss."""
        lr = lr_at(self.step_count, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        total = 0.0
        for _ in range(self.cfg.grad_accum):
            x, y = next_batch()
            with self._autocast():
                loss = self._forward(x, y)
            (loss / self.cfg.grad_accum).backward()
            total += float(loss.detach())
        if grad_hook is not None:
            grad_hook(self.model)  # DDP averages gradients here, before clipping
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._params, self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return total / self.cfg.grad_accum

    @property
    def lr(self) -> float:
        return lr_at(max(0, self.step_count - 1), self.cfg, self.total_steps)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Batch] | list[Batch], precision: str = "fp32") -> tuple[float, int]:
    """Sum of per-batch mean losses and the number of batches (so workers can add them up)."""
    was_training = model.training
    model.eval()
    ctx = autocast(precision, next(model.parameters()).device.type)
    total, n = 0.0, 0
    for x, y in batches:
        with ctx():
            total += float(model(x, y))
        n += 1
    model.train(was_training)
    return total, n
