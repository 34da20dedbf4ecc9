"""The global parameters that star rounds and async pushes update, and the checks of a push's
tensors against them (shapes and dtypes from the codec, finite values)."""

from __future__ import annotations

import math
from typing import TypeVar

import torch

from dilo import wire
from dilo.adapters import build_run_model, shared_view
from dilo.bodies import PushBody, parse
from dilo.config import RunConfig
from dilo.model import param_names, params_of
from dilo.outer.aggregate import finite
from dilo.outer.star import StarCodec

_ITEMSIZE = {name: dtype.itemsize for name, dtype in wire.DTYPES.items()}
B = TypeVar("B", bound=PushBody)


def header_limits(frame_bytes: list[int]) -> wire.Limits:
    """What a worker may send when its largest message has tensor frames of these sizes."""
    return wire.Limits(
        max_frame_bytes=max(frame_bytes, default=0),
        max_total_bytes=sum(frame_bytes) + wire.Limits.max_header_bytes,
        max_frames=len(frame_bytes),
    )


class GlobalModel:
    """fp32 copies of the model's parameters (the coordinator never runs a forward pass), and
    the codec that decodes pushes into them."""

    def __init__(self, cfg: RunConfig) -> None:
        # the parameters the workers exchange: trainable (LoRA: the adapters), not outer.local
        model = shared_view(build_run_model(cfg), cfg.outer)
        self.names = param_names(model)
        self.params = [torch.nn.Parameter(p.detach().float().clone()) for p in params_of(model)]
        self.star = StarCodec(self.names, [p.shape for p in self.params], cfg.codec, seed=cfg.seed)
        self.push_spec = self.star.push_spec()
        # a push is the largest message a worker sends, and its frames have known sizes
        self.limits = header_limits([math.prod(shape) * _ITEMSIZE[dtype] for shape, dtype in self.push_spec.values()])

    def copies(self) -> dict[str, torch.Tensor]:
        """The parameters as message tensors: copies, since frames go out zero-copy and the next
        outer step updates the parameters in place."""
        return {f"p.{i}": p.detach().clone() for i, p in enumerate(self.params)}

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)

    def is_finite(self) -> bool:
        return finite([p.detach() for p in self.params])

    def check_push(self, msg: wire.Message, body_model: type[B], version: int) -> B:
        """Validate a push's body and tensors: the body, or WireError.

        Everything is checked before any state changes: a bad push is answered with ERROR whatever
        its base version (garbage is not "late"), and a rejected push leaves no trace (no deadline
        started, no member list frozen, nothing applied). Every number has bounds (dilo/bodies.py):
        a weight of 1e39 overflowed float32 inside the next round's mean, and 3e38 turned a finite
        mean into inf."""
        body = parse(body_model, msg.body, "PUSH body")
        if not -(2**63) < msg.base <= version:
            raise wire.WireError("bad_base", f"base version {msg.base} is newer than this coordinator's {version}")
        if body.contributes:
            wire.check_shapes(msg, self.push_spec)
            wire.check_finite(msg)
        elif msg.tensors:
            wire.check_shapes(msg, self.push_spec)  # a non-contributing push may carry its (ignored) zeros
        return body

    def decode(self, msg: wire.Message) -> list[torch.Tensor]:
        """The push's pseudo-gradient as one flat tensor per codec group."""
        flats = self.star.decode_push(msg.tensors)
        if not finite(flats):
            raise wire.WireError("nonfinite", "the decoded pseudo-gradient holds NaN or Inf")
        return flats
