"""A fixed world from the launcher's environment: torchrun, Slurm, `dilo run` (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), exchanging over torch.distributed. Validation is split across ranks
and summed; the run summary is agreed by an all-reduce.

    world = StaticWorld(cfg, Placement.from_env())
    world = StaticWorld(cfg, Placement(rank, size), transport=t, clock=c)   # injected (dilo sim)
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from dilo.config import RunConfig
from dilo.data import corpus_fingerprint
from dilo.errors import DiloError
from dilo.outer.base import Joined, Links
from dilo.shard import IslandMesh, evaluate_share, even_share
from dilo.state import Checkpoints, CheckpointWriter
from dilo.transport.base import ByteCounter, Transport
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from dilo.worlds.base import Batch, Clock, Closing, Placement, WallClock, pick_device


def island_ranks_of(cfg: RunConfig, placement: Placement) -> int:
    """Ranks per island in a static world (transport.island_ranks; "node": LOCAL_WORLD_SIZE)."""
    k = cfg.transport.island_ranks
    if k == "node":
        try:
            k = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            raise DiloError(f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']!r} is not a number") from None
    if k < 1 or placement.size % k:
        raise DiloError(
            f"transport.island_ranks={cfg.transport.island_ranks} ({k} ranks per island) does not divide the "
            f"world of {placement.size} ranks; launch the same number of ranks on every node"
        )
    return k


class StaticWorld(Closing):
    """A fixed world. With islands of K > 1 ranks (transport.island_ranks), global rank g is rank
    g % K of island g // K; three groups are built from the one store: every rank (checks,
    validation, totals, DDP), the island (gradients every step, broadcasts) and the islands' lead
    ranks (the outer step).

    transport / clock / device: injected instead of built from the environment (the simulator's
    in-process collectives and virtual clock); an injected world has islands of one rank."""

    elastic = False

    def __init__(
        self,
        cfg: RunConfig,
        placement: Placement,
        *,
        transport: Transport | None = None,
        clock: Clock | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.global_rank, self.global_size = placement.rank, placement.size
        self.step_limit = cfg.steps
        self.group: Transport | None = None
        self.outer_transport: Transport | None
        self._transports: list[Transport] = []
        self.island_mesh: IslandMesh | None = None
        """transport.island_shard = "fsdp": this island's device mesh (FSDP2 shards over it)."""
        self._eval_real = 0
        """How many of validation_share's batches are real (a sharded island pads the rest)."""
        if transport is not None:
            if cfg.transport.island_ranks not in (1, "node"):
                raise DiloError("an injected transport serves islands of one rank: drop transport.island_ranks")
            k = 1
            self.transport = self.outer_transport = transport
        else:
            k = island_ranks_of(cfg, placement)
            self._connect(placement, k)
        self.island_ranks = k
        self.rank, self.size = placement.rank // k, placement.size // k  # the island and the islands
        self.local_rank = placement.rank % k
        self.log_name = f"worker{self.rank}" if self.local_rank == 0 else f"worker{self.rank}.{self.local_rank}"
        self.clock: Clock = clock or WallClock(cfg.heterogeneity.slowdown_of(self.rank))
        self.device = device or pick_device(cfg.transport.backend)
        # the traffic between islands; a follower rank sends none
        self._counter = self.outer_transport.counter if self.outer_transport is not None else ByteCounter()
        try:
            self._check_same_run()
        except BaseException:
            self.close(leaving=False)
            raise

    def _connect(self, placement: Placement, k: int) -> None:
        t = self.cfg.transport
        store = connect_store(
            placement.host,
            placement.port,
            placement.rank,
            placement.size,
            hosted=placement.hosted,
            timeout_s=t.timeout_s,
        )
        island, local = placement.rank // k, placement.rank % k
        self.transport = TorchDistTransport(
            store, placement.rank, placement.size, backend=t.backend, timeout_s=t.timeout_s
        )
        self._transports.append(self.transport)
        self.outer_transport = self.transport
        if k == 1 and (getattr(self.cfg.outer, "overlap", False) or getattr(self.cfg.outer, "streaming", False)):
            # the overlapped / streamed exchange runs on a background thread: a group of its own, so that it
            # never interleaves with the validation and totals collectives of the loop's thread
            self.outer_transport = TorchDistTransport(
                store, placement.rank, placement.size, backend=t.backend, timeout_s=t.timeout_s, prefix="dilo/outer"
            )
            self._transports.append(self.outer_transport)
        if k > 1:
            self.group = TorchDistTransport(
                store, local, k, backend=t.backend, timeout_s=t.timeout_s, prefix=f"dilo/island{island}"
            )
            self._transports.append(self.group)
            self.outer_transport = None
            sharded = t.island_shard == "fsdp"
            if sharded:
                from dilo.shard import island_mesh

                self.island_mesh = island_mesh(
                    store, placement.rank, placement.size, k, backend=t.backend, timeout_s=t.timeout_s
                )
            if local == 0 or t.island_wire == "all" or sharded:
                # lead: the lead ranks' group; all: one group per local rank, across the islands
                prefix = f"dilo/outer-share{local}" if t.island_wire == "all" or sharded else "dilo/outer"
                self.outer_transport = TorchDistTransport(
                    store, island, placement.size // k, backend=t.backend, timeout_s=t.timeout_s, prefix=prefix
                )
                self._transports.append(self.outer_transport)

    def shard(self, model: nn.Module) -> nn.Module:
        """transport.island_shard = "fsdp": shard `model` over this rank's island (FSDP2: each
        numbered block, then the rest); call it before building the inner optimizer. Otherwise
        the model as it is."""
        if self.island_mesh is None:
            return model
        from dilo.shard import fully_shard_blocks

        return fully_shard_blocks(model, self.island_mesh.mesh, self.cfg.inner.precision)

    @property
    def counter(self) -> ByteCounter:
        return self._counter

    def links(self, model: nn.Module, cfg: RunConfig) -> Links:
        return Links(
            counter=self._counter,
            collective=self.transport,
            outer=self.outer_transport,
            island=self.group,
            lead=self.local_rank == 0,
            shares=self.island_ranks if self.cfg.transport.island_wire == "all" and self.group is not None else 1,
            sharded=self.island_mesh is not None,
        )

    def adopt(self, joined: Joined, *, resumed: bool) -> None:
        """A static world's islands are fixed by rank."""

    def checkpoints(self, ckpt_dir: Path) -> Checkpoints:
        if self.island_mesh is None:
            return CheckpointWriter(ckpt_dir, self.log_name)
        from dilo.sharded_checkpoint import ShardedCheckpoints

        return ShardedCheckpoints(ckpt_dir, f"worker{self.rank}", self.island_mesh)

    def agree_resume_round(self, store: Checkpoints) -> int:
        """The newest round every rank has a checkpoint for, or -1."""
        mine = store.rounds()
        newest = torch.tensor([float(mine[-1] if mine else -1)], dtype=torch.float64)
        agreed = int(min(float(t) for t in self.transport.all_gather(newest)))
        if agreed >= 0 and agreed not in mine:
            raise DiloError(
                f"{self.log_name} has no checkpoint for round {agreed} in {store} (it has {mine}); "
                "the workers' checkpoint directories disagree"
            )
        return agreed

    def validation_share(self, batches: list[Batch]) -> list[Batch]:
        mine, self._eval_real = even_share(batches, self.global_rank, self.global_size)
        return mine if self.island_mesh is not None else mine[: self._eval_real]

    def evaluate(self, model: nn.Module, batches: list[Batch]) -> float:
        # a sharded island's padding (validation_share) runs for the collectives and is not counted
        real = self._eval_real if self.island_mesh is not None else len(batches)
        total, n = evaluate_share(model, batches, real, self.cfg.inner.precision)
        t = torch.tensor([total, float(n)], dtype=torch.float64)
        self.transport.all_reduce_([t])
        return float(t[0] / t[1]) if t[1] > 0 else float("nan")

    def total(self, values: list[float]) -> tuple[list[float], int]:
        """Sum over ranks, and how many ranks were summed."""
        t = torch.tensor(values, dtype=torch.float64)
        self.transport.all_reduce_([t])
        return [float(x) for x in t], self.global_size

    def close(self, *, leaving: bool) -> None:
        transports, self._transports = self._transports, []
        for t in transports:
            t.close()
        mesh, self.island_mesh = self.island_mesh, None
        if mesh is not None:
            mesh.close()

    def _check_same_run(self) -> None:
        """Refuse to train when workers were started with different configs or see different corpora."""
        mine = int((self.cfg.fingerprint() + corpus_fingerprint(self.cfg.data))[:15], 16)
        everyone = [int(t) for t in self.transport.all_gather(torch.tensor([mine], dtype=torch.int64))]
        if any(f != everyone[0] for f in everyone):
            odd = [r for r, f in enumerate(everyone) if f != everyone[self.global_rank]]
            raise DiloError(
                f"{self.log_name}: ranks {odd} run a different configuration or see a different corpus "
                "(another config file or overrides, another Python's stdlib, other files); start every worker "
                "with the same config"
            )
