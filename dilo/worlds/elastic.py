"""Workers that join and leave a `dilo coordinator` over ZeroMQ.

    world = ElasticWorld(cfg, worker_id)                       # one process, one worker
    world = ElasticWorld(cfg, worker_id, island=Placement.from_env())   # a torchrun launch: one island
    world = ElasticWorld(cfg, worker_id, connect=fn, clock=c)  # injected client and clock (dilo sim)

The coordinator holds the global state; a worker evaluates the full validation set itself and
reports its own totals. With a torchrun launch of several ranks those ranks form one island that
joins as one worker, led by its rank 0; the others follow through the island's group.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dilo import wire
from dilo.config import AsyncConfig, RunConfig
from dilo.errors import DiloError
from dilo.outer.base import Joined, Links
from dilo.outer.star import StarLink
from dilo.shard import IslandMesh, evaluate_share, even_share
from dilo.state import Checkpoints
from dilo.transport.base import ByteCounter, Transport
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from dilo.worlds.base import (
    Batch,
    Clock,
    OwnTotals,
    Placement,
    WallClock,
    check_worker_id,
    default_worker_id,
    island_of,
    pick_device,
)

log = logging.getLogger("dilo.worlds")

Connect = Callable[[RunConfig, str, int, dict[str, Any]], StarLink]
"""(cfg, worker id, the largest message in bytes, extra JOIN body) -> a client of the coordinator."""


def connect_zmq(cfg: RunConfig, worker_id: str, max_message_bytes: int, join_body: dict[str, Any]) -> StarLink:
    """The coordinator over ZeroMQ (dilo.transport.zmq_star.StarClient)."""
    from dilo.transport.zmq_star import StarClient

    client = StarClient(
        cfg.membership,
        worker_id,
        run=cfg.name,
        fingerprint=cfg.fingerprint(),
        secret=wire.load_secret(file=cfg.membership.secret_file or None),
        max_message_bytes=max_message_bytes,
        hold_s=cfg.outer.grace_s if isinstance(cfg.outer, AsyncConfig) else 0.0,
    )
    client.join_body.update(join_body)
    return client


class ElasticWorld(OwnTotals):
    elastic = True

    def __init__(
        self,
        cfg: RunConfig,
        worker_id: str | None = None,
        *,
        island: Placement | None = None,
        connect: Connect = connect_zmq,
        clock: Clock | None = None,
        device: torch.device | None = None,
    ) -> None:
        """island: the launcher's world (torchrun's RANK, WORLD_SIZE, ...); with more than one rank
        those ranks form one island that joins as one worker, led by its rank 0."""
        self.cfg = cfg
        self._precision = cfg.inner.precision
        self._connect = connect
        self._injected_clock = clock
        self.worker_id = check_worker_id(worker_id or cfg.membership.worker_id or default_worker_id())
        self.device = device or pick_device(cfg.transport.backend)
        self.client: StarLink | None = None
        self.group: Transport | None = None
        self._counter = ByteCounter()
        self.joined: dict[str, Any] = {}
        """The start's record (version, anchor hash, members, island) once joined; empty before."""
        self.size = max(1, cfg.workers)
        self.island_mesh: IslandMesh | None = None
        """transport.island_shard = "fsdp": the island's device mesh (FSDP2 shards over it)."""
        self._eval_real = 0
        """How many of validation_share's batches are real (a sharded island pads the rest)."""
        mine, self.auto_island = island_of(self.worker_id, self.size, allow_auto=True)
        if island is not None and island.size > 1:
            self._join_island(island)
        elif cfg.transport.island_shard == "fsdp":
            raise DiloError(
                "transport.island_shard='fsdp' shards the island of one torchrun launch: start this worker "
                "with torchrun --nproc-per-node=K (K > 1 ranks), or set transport.island_shard='none'"
            )
        self.log_name = f"worker-{self.worker_id}" + (f".{self.local_rank}" if self.local_rank else "")
        if self.group is not None:  # the lead rank's choice holds for the island
            t = torch.tensor([float(mine), float(self.auto_island)], dtype=torch.float64)
            self.group.broadcast_([t], src=0)
            mine, self.auto_island = int(t[0]), bool(t[1])
        self._set_island(mine)

    def _join_island(self, island: Placement) -> None:
        t = self.cfg.transport
        store = connect_store(
            island.host, island.port, island.rank, island.size, hosted=island.hosted, timeout_s=t.timeout_s
        )
        self.group = TorchDistTransport(
            store, island.rank, island.size, backend=t.backend, timeout_s=t.timeout_s, prefix="dilo/island"
        )
        self.island_ranks, self.local_rank = island.size, island.rank
        if t.island_shard == "fsdp":
            from dilo.shard import island_mesh

            self.island_mesh = island_mesh(
                store, island.rank, island.size, island.size, backend=t.backend, timeout_s=t.timeout_s
            )
        # the island is one worker: its ranks go by the lead rank's id
        key = f"dilo/island-id/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        if self.local_rank == 0:
            store.set(key, self.worker_id)
        else:
            self.worker_id = store.get(key).decode()

    def _set_island(self, island: int) -> None:
        cfg = self.cfg
        self.rank = island
        self.clock: Clock = self._injected_clock or WallClock(cfg.heterogeneity.slowdown_of(island))
        own = cfg.heterogeneity.max_steps_of(island)
        if isinstance(cfg.outer, AsyncConfig):
            # the coordinator ends an async run when the world's budget is spent
            self.step_limit = own or sys.maxsize
        else:
            self.step_limit = min(cfg.steps, own) if own else cfg.steps

    @property
    def counter(self) -> ByteCounter:
        return self._counter

    def links(self, model: nn.Module, cfg: RunConfig) -> Links:
        lead = self.local_rank == 0
        if lead and self.client is None:
            param_bytes = sum(p.numel() * 4 for p in model.parameters())
            join_body: dict[str, Any] = {"island": "auto"} if self.auto_island else {}
            self.client = self._connect(cfg, self.worker_id, 4 * param_bytes + (1 << 20), join_body)
            self._counter = self.client.counter
        return Links(
            counter=self._counter, island=self.group, star=self.client if lead else None, lead=lead,
            sharded=self.island_mesh is not None,
        )  # fmt: skip

    def shard(self, model: nn.Module) -> nn.Module:
        """transport.island_shard = "fsdp": FSDP2 over the island's ranks (the lead relays to the
        coordinator: dilo/outer/sharded.py); otherwise the model as it is."""
        if self.island_mesh is None:
            return model
        from dilo.shard import fully_shard_blocks

        return fully_shard_blocks(model, self.island_mesh.mesh, self.cfg.inner.precision)

    def checkpoints(self, ckpt_dir: Path) -> Checkpoints:
        if self.island_mesh is None:
            return super().checkpoints(ckpt_dir)
        from dilo.sharded_checkpoint import ShardedCheckpoints

        return ShardedCheckpoints(ckpt_dir, f"worker-{self.worker_id}", self.island_mesh)

    def validation_share(self, batches: list[Batch]) -> list[Batch]:
        if self.island_mesh is None:
            return super().validation_share(batches)
        # a sharded forward is collective: every rank runs as many (the padding is not counted)
        mine, self._eval_real = even_share(batches, self.local_rank, self.island_ranks)
        return mine

    def evaluate(self, model: nn.Module, batches: list[Batch]) -> float:
        if self.island_mesh is None:
            return super().evaluate(model, batches)
        total, n = evaluate_share(model, batches, self._eval_real, self._precision)
        return self._island_mean(total, n)

    def adopt(self, joined: Joined, *, resumed: bool) -> None:
        """DILO_ISLAND=auto: train on the island the coordinator handed out (a resumed worker keeps
        the island its checkpoint's data position belongs to)."""
        if self.auto_island and not resumed and joined.island >= 0:
            self._set_island(joined.island)
        self.joined = {**joined.record(), "island": self.rank}
        log.info(
            "worker %s joined at version %d, anchor %s, with members %s",
            self.worker_id + (f" (island rank {self.local_rank})" if self.local_rank else ""),
            joined.version,
            joined.anchor_hash,
            list(joined.members) if joined.members is not None else "(known to the lead rank)",
        )

    def close(self, *, leaving: bool) -> None:
        client, self.client = self.client, None
        group, self.group = self.group, None
        try:
            if client is not None:
                try:
                    if leaving:
                        client.leave()
                finally:
                    client.close()
        finally:
            mesh, self.island_mesh = self.island_mesh, None
            try:
                if group is not None:
                    group.close()
            finally:
                if mesh is not None:
                    mesh.close()
