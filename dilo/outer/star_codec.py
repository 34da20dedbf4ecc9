"""The star exchange's codec and outer optimizer, shared by the coordinator and its workers:
what a worker pushes, what the coordinator returns, and the outer SGD both apply.

    star = StarCodec(names, shapes, cfg.codec, seed=cfg.seed)
    tensors = star.encode_push(deltas, round_idx, worker_key, contributes=True)      # worker
    reply = star.encode_mean(flat_means, round_idx)                                    # coordinator
    mean = star.decode_mean(reply)                                                     # both
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dilo import wire
from dilo.compress import Context, Encoded
from dilo.compress.lowrank import PowerSGD
from dilo.compress.sparse import TopK
from dilo.config import DDPConfig
from dilo.errors import ConfigError
from dilo.model import params_of
from dilo.outer.base import Anchor
from dilo.outer.groups import SHARDS_PER_GROUP, Group, _plain, build_groups
from dilo.outer.outer_opt import build_outer_optimizer, load_state_tensors, state_tensors

if TYPE_CHECKING:
    pass


DOWNLINK_PART = SHARDS_PER_GROUP - 1


def worker_key(worker_id: str) -> int:
    """A stable integer per worker id: separates the workers' stochastic-rounding streams."""
    return zlib.crc32(worker_id.encode())


class StarCodec:
    def __init__(self, names: list[str], shapes: list[torch.Size], spec: Any, *, seed: int = 0) -> None:
        self.groups: list[Group] = build_groups(names, shapes, spec)
        if any(isinstance(_plain(g.codec), PowerSGD) for g in self.groups):
            raise ConfigError(
                "codec.kind='powersgd' needs the all-reduce of membership.kind='static'; "
                "with a coordinator use int8, int4, topk, sign, fp16 or none"
            )
        self.seed = seed
        self.num_params = len(shapes)
        ctx = Context(seed=seed)
        self._templates: list[Encoded] = [
            _plain(g.flat_codec).encode(torch.zeros(g.layout.total), ctx) for g in self.groups
        ]

    def push_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, dtype) of every tensor a valid push carries (sizes never depend on values)."""
        out = {}
        for g, tmpl in zip(self.groups, self._templates):
            for name, t in tmpl.tensors.items():
                out[f"g{g.index}.{name}"] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        return out

    def encode_push(
        self, deltas: list[Tensor], round_idx: int, key: int, *, contributes: bool, feedback: bool = True
    ) -> dict[str, Tensor]:
        """The payload of one push; feedback=False encodes without the error-feedback memory (for
        callers that keep the residual themselves, like compressed gossip's public estimates)."""
        tensors: dict[str, Tensor] = {}
        for g in self.groups:
            flat = g.layout.flatten([deltas[i] if contributes else torch.zeros_like(deltas[i]) for i in g.params])
            codec = g.flat_codec if contributes and feedback else _plain(g.flat_codec)
            e = codec.encode(flat, Context(seed=self.seed, round=round_idx, rank=key, part=g.index * SHARDS_PER_GROUP))
            tensors.update({f"g{g.index}.{n}": t.contiguous() for n, t in e.tensors.items()})
        return tensors

    def decode_push(self, tensors: dict[str, Tensor]) -> list[Tensor]:
        """One flat fp32 vector per group; a push whose indices point outside the vector is refused."""
        for g in self.groups:
            _check_indices(g, tensors)
        return [self._decode_group(g, tmpl, tensors) for g, tmpl in zip(self.groups, self._templates)]

    def weighted_mean(self, pushes: list[tuple[float, list[Tensor]]]) -> list[Tensor]:
        """Sum of weight * decoded push, in the order given (callers sort by worker id), over the total weight."""
        total = sum(w for w, _ in pushes)
        assert total > 0, "weighted_mean needs at least one contribution"
        out = [torch.zeros(g.layout.total) for g in self.groups]
        for w, flats in pushes:
            for acc, f in zip(out, flats):
                acc.add_(f, alpha=w)
        return [acc.div_(total) for acc in out]

    def encode_mean(self, means: list[Tensor], round_idx: int) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for g, mean in zip(self.groups, means):
            plain = _plain(g.flat_codec)
            x = mean
            if g.feedback:
                if g.owner_residual is None or g.owner_residual.numel() != mean.numel():
                    g.owner_residual = torch.zeros_like(mean)
                x = mean + g.owner_residual
            e = plain.encode(
                x, Context(seed=self.seed, round=round_idx, part=g.index * SHARDS_PER_GROUP + DOWNLINK_PART)
            )
            if g.feedback:
                g.owner_residual = x - plain.decode(e)
            tensors.update({f"g{g.index}.{n}": t.contiguous() for n, t in e.tensors.items()})
        return tensors

    def split(self, flats: list[Tensor]) -> list[Tensor]:
        """Per-parameter views of one flat vector per group (as decode_push returns them)."""
        out: list[Tensor | None] = [None] * self.num_params
        for g, flat in zip(self.groups, flats):
            for i, t in zip(g.params, g.layout.unflatten(flat)):
                out[i] = t
        return [t for t in out if t is not None]

    def decode_mean(self, tensors: dict[str, Tensor]) -> list[Tensor]:
        """The mean pseudo-gradient per parameter, from the coordinator's reply."""
        return self.split([self._decode_group(g, tmpl, tensors) for g, tmpl in zip(self.groups, self._templates)])

    def _decode_group(self, g: Group, tmpl: Encoded, tensors: dict[str, Tensor]) -> Tensor:
        payload = Encoded({n: tensors[f"g{g.index}.{n}"] for n in tmpl.tensors}, tmpl.numel)
        return _plain(g.flat_codec).decode(payload).float()

    def reset_feedback(self) -> None:
        for g in self.groups:
            if hasattr(g.codec, "reset"):
                g.codec.reset()
            g.owner_residual = None

    def state_dict(self) -> dict[str, Any]:
        return {
            f"group{g.index}": {
                "codec": g.codec.state_dict() if hasattr(g.codec, "state_dict") else {},
                "owner": g.owner_residual,
            }
            for g in self.groups
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for g in self.groups:
            s = state.get(f"group{g.index}")
            if s is None:
                continue
            if hasattr(g.codec, "load_state_dict"):
                g.codec.load_state_dict(s["codec"])
            g.owner_residual = s["owner"]


def _check_indices(g: Group, tensors: dict[str, Tensor]) -> None:
    """Top-k indices must lie in the group's vector (or chunk). Shapes and dtypes were checked
    against the push spec, but not values: an index past the end made index_put_ raise
    IndexError, and a negative one silently wrapped around to the end of the vector."""
    codec = _plain(g.codec)
    if not isinstance(codec, TopK):
        return
    idx = tensors[f"g{g.index}.idx"]
    if idx.numel() == 0:
        return
    n = g.layout.total
    lo, hi = (0, n) if codec.chunk == 0 else (-32768, min(codec.chunk, n) - 32768)
    imin, imax = (int(v) for v in torch.aminmax(idx))
    if imin < lo or imax >= hi:
        raise wire.WireError(
            "bad_payload", f"group {g.index}: top-k indices span [{imin}, {imax}], outside [{lo}, {hi})"
        )


@torch.no_grad()
def adopt_parameters(anchor: Anchor, tensors: dict[str, Tensor], model: nn.Module) -> None:
    """The coordinator's parameters (tensors p.0, p.1, ...) become the anchor and the model's."""
    for i, a in enumerate(anchor.params):
        a.copy_(tensors[f"p.{i}"])
    anchor.restore_into(params_of(model))


def outer_optimizer(cfg: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The outer optimizer of DiLoCo / FedAvg (outer.optimizer); the same on the coordinator and on
    every worker, which keeps a replica of its state."""
    o = cfg.outer
    if isinstance(o, DDPConfig):
        raise ConfigError(
            "outer.kind='ddp' synchronises every step and has no coordinator rounds; "
            "use membership.kind='static' for the DDP baseline"
        )
    return build_outer_optimizer(o, params)


def outer_state_tensors(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The outer optimizer's state as named tensors (dilo/outer/outer_opt.py `state_tensors`)."""
    return state_tensors(opt, params)


def load_outer_state(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], tensors: dict[str, torch.Tensor]
) -> None:
    load_state_tensors(opt, params, tensors)
