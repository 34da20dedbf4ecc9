"""Sharded islands (transport.island_shard = "fsdp"): the outer step of an island whose ranks
shard the model with FSDP2 (dilo/shard.py).

- `ShardedIsland` (static worlds: DiLoCo, FedAvg): every rank runs the outer strategy on its own
  shard against the same rank of the other islands, in parallel; nothing is gathered.
- `ShardedRelay` (a coordinator: elastic DiLoCo / FedAvg, async local SGD): the island's lead
  gathers the shards into one host-memory copy of the model, runs the strategy on it as a
  whole-model island's lead does, and scatters the result back to the shards.

Why the lead relays to a coordinator instead of each rank pushing its shard: the coordinator's
members, versions, authentication and failure handling are per worker, and an island is one
worker that lives and dies as a whole (a lost rank stops its island). With one connection per
island the coordinator's work per round stays in proportion to the islands, not to their ranks,
and an island's shards can never be committed in different rounds. The price is the lead's:
one NIC carries the island's traffic (as with island_wire = "lead") and its host memory holds
the model in fp32 once more, plus the strategy's anchor (GPU memory is not used for it).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from dilo.adapters import ParamView
from dilo.errors import DiloError
from dilo.model import param_names
from dilo.outer.base import Joined, Strategy, SyncReport, Tail, params_of, tensor_digest
from dilo.outer.island import IslandSync
from dilo.shard import local
from dilo.transport.base import Transport

log = logging.getLogger("dilo.outer.sharded")


def whole_view(model: nn.Module) -> ParamView:
    """Full-size fp32 host-memory copies of a sharded model's parameters, by name: what a relaying
    lead's strategy runs on (the island's other ranks: an empty view)."""
    return ParamView(
        [
            (n, nn.Parameter(torch.zeros(p.shape, dtype=torch.float32)))
            for n, p in zip(param_names(model), params_of(model))
        ]
    )


class ShardedRelay(IslandSync):
    """A sharded island behind a coordinator (see the module docstring): the lead rank's strategy
    runs on `whole` (`whole_view`), which the island fills from its shards before every start and
    round and scatters back to them after; the rest is `IslandSync`'s (the lead decides when a
    round ends, its outcome is broadcast, a failing lead stops its followers)."""

    def __init__(self, model: nn.Module, whole: nn.Module | None, group: Transport, outer: Strategy | None) -> None:
        if (group.rank == 0) != (outer is not None and whole is not None):
            raise ValueError("the island's lead rank (local rank 0), and only it, relays to the coordinator")
        self.group = group
        self.outer = outer
        self.lead = outer is not None
        self.whole = whole
        self._round_steps = 0
        self._params = params_of(model)

    def reduce_grads(self, model: nn.Module) -> None:
        """FSDP2 reduce-scatters the gradients in the backward pass."""

    @torch.no_grad()
    def _collect(self, model: nn.Module) -> nn.Module:
        """Every parameter, gathered one at a time (a collective over the island's mesh), into the
        lead's host copy."""
        whole = params_of(self.whole) if self.whole is not None else None
        for i, p in enumerate(self._params):
            full = p.detach().full_tensor()  # type: ignore[attr-defined]
            if whole is not None:
                whole[i].copy_(full)
            del full
        return self.whole if self.whole is not None else model

    @torch.no_grad()
    def _spread(self, model: nn.Module) -> None:
        """Each rank's slices of the lead's parameters, scattered from it one parameter at a time."""
        from torch.distributed.tensor import distribute_tensor

        whole = params_of(self.whole) if self.whole is not None else None
        for i, p in enumerate(self._params):
            like: Any = p
            src = whole[i].to(local(p).device) if whole is not None else torch.empty(p.shape, device=local(p).device)
            mine = distribute_tensor(src, like.device_mesh, like.placements, src_data_rank=0)
            local(p).copy_(local(mine))

    def _digest(self, model: nn.Module) -> str:
        return ""  # a follower holds shards only; the lead's header carries the island's hash

    def state_dict(self) -> dict[str, Any]:
        # the lead's state (the codec's error feedback, counters) is whole-model: any layout resumes it
        return {"ranks": self.group.size, **({"lead": self.outer.state_dict()} if self.outer is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ranks" not in state:
            raise DiloError("this checkpoint was not written by a sharded island: resume with its island layout")
        if self.outer is not None:
            if "lead" not in state:
                raise DiloError("the sharded checkpoint holds no lead rank's state: its files are incomplete")
            self.outer.load_state_dict(state["lead"])


class ShardedIsland:
    """transport.island_shard = "fsdp": an island whose ranks shard the model (dilo/shard.py).

    Every rank runs the outer strategy (DiLoCo, FedAvg) on its own shard (`part`) against the same
    rank of the other islands; FSDP2 averages gradients inside the island by itself, and nothing
    is gathered: the next forward all-gathers the updated shards. The round's anchor hash is the
    hash of every shard's digest, the same on every rank of every island when the anchors agree.

    Its checkpoint holds the anchor and outer momentum as DTensors laid out like their parameters
    (`model`), by name, so that an island of another number of ranks resumes them (a sharded
    checkpoint, dilo/sharded_checkpoint.py); the codec's error feedback belongs to this rank's
    shard and is kept only when the layout is the same."""

    def __init__(self, part: nn.Module, model: nn.Module, group: Transport, share: Strategy) -> None:
        self.part = part
        self.group = group
        self.outer = share
        self._like = dict(zip(param_names(model), params_of(model)))
        """Every sharded parameter by name (the part leaves out empty shards)."""

    @property
    def round_steps(self) -> int:
        return self.outer.round_steps

    def reduce_grads(self, model: nn.Module) -> None:
        """FSDP2 reduce-scatters the gradients in the backward pass."""

    def due(self, step: int) -> bool:
        return self.outer.due(step)

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        return self.outer.start(self.part, resumed=resumed)

    def describe(self) -> list[str]:
        return [f"shard {self.group.rank} of {self.group.size}: {line}" for line in self.outer.describe()]

    def _island_digest(self) -> str:
        mine = int(tensor_digest(params_of(self.part)), 16) - (1 << 63)  # as an int64
        digests = self.group.all_gather(torch.tensor([mine], dtype=torch.int64))
        return tensor_digest([torch.cat([d.reshape(-1) for d in digests])])

    @torch.no_grad()
    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        stop = torch.tensor([float(tail.stop)], dtype=torch.float64)
        self.group.all_reduce_([stop])
        tail.stop = bool(stop[0] > 0)
        report = self.outer.sync(self.part, tail=tail)
        failed = torch.tensor([0.0 if report.committed else 1.0], dtype=torch.float64)
        self.group.all_reduce_([failed])
        committed = report.committed and bool(failed[0] == 0)
        reason = report.reason or ("" if committed else "another shard of this island was not committed")
        return dataclasses.replace(report, committed=committed, reason=reason, anchor_hash=self._island_digest())

    def _global(self, name: str, shard: torch.Tensor | None) -> torch.Tensor:
        """This rank's `shard` of parameter `name` as a DTensor laid out like it (an empty one
        where this rank holds none of it)."""
        from torch.distributed.tensor import DTensor

        like: Any = self._like[name]  # a DTensor parameter
        mine = local(like).detach() if shard is None else shard
        return DTensor.from_local(mine, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.outer.state_dict())  # DiLoCo's: anchor and optimizer state by the part's index
        names = param_names(self.part)
        anchor = dict(zip(names, state.pop("anchor")))
        optimizer = state.pop("optimizer")
        per_key: dict[str, dict[str, Any]] = {}  # the outer optimizer's state: key -> parameter name -> value
        for i, entries in optimizer["state"].items():
            for key, value in entries.items():
                per_key.setdefault(key, {})[names[i]] = value
        sharded, scalars = {}, {}
        for key, values in per_key.items():
            elementwise = all(isinstance(v, torch.Tensor) and v.shape == anchor[n].shape for n, v in values.items())
            if not elementwise:  # a step count: the same on every shard, saved per rank
                scalars[key] = values
                continue
            if len(values) != len(names):
                raise DiloError(f"the outer optimizer holds {key!r} for some shards only: cannot checkpoint it")
            sharded[key] = {n: self._global(n, values.get(n)) for n in self._like}  # momentum, Adam's moments
        return {
            "ranks": self.group.size,
            "anchor": {n: self._global(n, anchor.get(n)) for n in self._like},
            "sharded": sharded,
            "scalars": scalars,
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]],
            "rest": state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "anchor" not in state:
            raise DiloError("this checkpoint was not written by a sharded island: resume with its island layout")
        names = param_names(self.part)
        rest = dict(state["rest"])
        if int(state["ranks"]) != self.group.size:  # the error feedback belongs to the old shards
            rest["exchange"] = {}
            if self.group.rank == 0:
                log.warning(
                    "the checkpoint's islands had %d ranks, this one %d: the codec's error feedback starts afresh",
                    state["ranks"], self.group.size,
                )  # fmt: skip
        entries: dict[int, dict[str, Any]] = {}
        for i, n in enumerate(names):
            mine = {key: local(values[n]) for key, values in state["sharded"].items()}
            for key, values in state["scalars"].items():  # another layout's rank may not have held n
                mine[key] = values.get(n, next(iter(values.values())))
            if mine:
                entries[i] = mine
        self.outer.load_state_dict(
            {
                **rest,
                "anchor": [local(state["anchor"][n]) for n in names],
                "optimizer": {
                    "state": entries,
                    "param_groups": [{**g, "params": list(range(len(names)))} for g in state["groups"]],
                },
            }
        )
