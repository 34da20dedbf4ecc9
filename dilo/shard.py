"""FSDP2 islands (transport.island_shard = "fsdp"): the model sharded over an island's ranks, and
the per-shard view the outer step runs on.

    model = world.shard(model)                 # fully_shard each numbered block, then the root
    view = local_shards(model)                 # plain tensors: this rank's shard of every parameter

Inside the island FSDP2 all-gathers parameters for the forward and reduce-scatters gradients in
the backward (so no gradient hook of dilo's runs); the fp32 shards are the master weights, the
compute runs in bf16 under inner.precision = "bf16". Across islands, the ranks with the same
index hold the same slices of every parameter, so each exchanges its shard's pseudo-gradient with
them: the anchor, outer momentum and pseudo-gradient are per shard, never gathered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import PrefixStore, Store  # type: ignore[attr-defined]

from dilo.adapters import ParamView
from dilo.inner import evaluate, resolve_precision
from dilo.model import param_names, params_of

_BLOCK = re.compile(r"(?:^|\.)\d+$")


@dataclass
class IslandMesh:
    """What FSDP2 and the sharded checkpoints of one island run over."""

    mesh: Any
    """The island's 1-D device mesh (dimension "shard"): FSDP2 shards over it."""
    checkpoints: Any
    """A Gloo group of the island's ranks for DCP's planning collectives: they run on the
    checkpoint writer's thread, so they get a group of their own, never the mesh's."""

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def island_mesh(store: Store, rank: int, size: int, k: int, *, backend: str, timeout_s: float) -> IslandMesh:
    """Open torch.distributed's default group over `size` ranks (all of a static world's islands,
    or one island of an elastic world) and the device mesh of this rank's island of `k`: rank r
    is rank r % k of island r // k."""
    from torch.distributed.device_mesh import init_device_mesh

    backend = "nccl" if backend == "nccl" else "gloo"
    dist.init_process_group(
        backend, store=PrefixStore("dilo/default", store), rank=rank, world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip
    try:
        device = "cuda" if backend == "nccl" else "cpu"
        mesh = init_device_mesh(device, (size // k, k), mesh_dim_names=("island", "shard"))["shard"]
        groups = [dist.new_group(list(range(i * k, (i + 1) * k)), backend="gloo") for i in range(size // k)]
    except BaseException:
        dist.destroy_process_group()
        raise
    return IslandMesh(mesh, groups[rank // k])


def fully_shard_blocks(model: nn.Module, mesh: Any, precision: str) -> nn.Module:
    """FSDP2 over `mesh`: one unit per numbered block (a ModuleList entry: "blocks.3",
    "model.layers.3"), then the root for what is left (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = resolve_precision(precision, mesh.device_type) == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for name, module in model.named_modules():
        if _BLOCK.search(name) and any(True for _ in module.parameters()):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    # the root too reshards after every forward (FSDP2 keeps it gathered by default): the outer
    # step writes the shards, and an evaluation's forward must not leave stale gathered copies
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (sharing its memory), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def local_shards(model: nn.Module) -> ParamView:
    """This rank's shard of every trainable parameter, as parameters that share the shards'
    memory (a strategy writing them writes the sharded model); empty shards left out."""
    pairs = []
    for name, p in zip(param_names(model), params_of(model)):
        shard = local(p.detach())
        if shard.numel():
            pairs.append((name, nn.Parameter(shard, requires_grad=True)))
    return ParamView(pairs)


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` from a checkpoint of local shards: make each sharded parameter's
    state tensors (AdamW's moments) DTensors laid out like the parameter again."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            mesh = getattr(p, "device_mesh", None)
            if mesh is None:
                continue
            from torch.distributed.tensor import DTensor

            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == local(p).shape and v.dim():
                    state[k] = DTensor.from_local(v, mesh, p.placements, shape=p.shape, stride=p.stride())


def even_share(batches: list[Any], index: int, count: int) -> tuple[list[Any], int]:
    """Rank `index` of `count`'s validation batches, batches[index::count], padded with repeats
    of the first batch so that every rank runs as many forwards (a sharded forward is a
    collective of the island); with how many of them are real (the rest must not count)."""
    mine = batches[index::count]
    per = -(-len(batches) // count)
    return mine + batches[:1] * (per - len(mine)), len(mine)


def evaluate_share(model: nn.Module, batches: list[Any], real: int, precision: str) -> tuple[float, int]:
    """(summed loss, batches) over the first `real` batches; the padding after them runs its
    forwards for the island's collectives and is not counted."""
    total, n = evaluate(model, batches[:real], precision)
    if len(batches) > real:
        evaluate(model, batches[real:], precision)
    return total, n
