"""The global worlds a worker can live in, behind one small interface for dilo/train.py.

- `StaticWorld`: a fixed set of workers from the launcher's environment (torchrun, Slurm,
  `dilo run`: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), exchanging over torch.distributed.
  Validation is split across workers and summed; the summary is agreed by an all-reduce.
- `ElasticWorld`: workers join and leave a `dilo coordinator` over ZeroMQ. The coordinator holds
  the global state; a worker evaluates the full validation set itself and reports its own totals.
- `GossipWorld`: workers mix parameters with peers over direct ZeroMQ links; a coordinator (or a
  static list) only tells them where the peers are.

    world = StaticWorld(cfg, Placement.from_env())   # or ElasticWorld(cfg, worker_id)
    outer = world.strategy(model)
    world.start(model, outer)                         # broadcast / join
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dilo import wire
from dilo.config import AsyncConfig, DDPConfig, RunConfig
from dilo.data import corpus_fingerprint
from dilo.errors import DiloError
from dilo.inner import evaluate
from dilo.model import build_model, param_names
from dilo.outer.async_local import AsyncLocalSGD
from dilo.outer.base import Strategy, params_of, tensor_digest
from dilo.outer.ddp import DDP
from dilo.outer.diloco import DiLoCo
from dilo.outer.island import IslandSync
from dilo.outer.star import StarDiLoCo
from dilo.state import rounds_of
from dilo.transport.base import ByteCounter
from dilo.transport.torch_dist import TorchDistTransport, connect_store, resolve_backend, store_is_hosted
from dilo.transport.zmq_star import StarClient

log = logging.getLogger("dilo.world")


@dataclass
class Placement:
    """Where this worker sits in a static world and how to reach the others."""

    rank: int
    size: int
    host: str = "127.0.0.1"
    port: int = 0
    hosted: bool = False
    """The launcher serves the rendezvous store (torchrun's agent, `dilo run`)."""

    @classmethod
    def from_env(cls) -> Placement:
        if "WORLD_SIZE" not in os.environ:
            return cls(rank=0, size=1)
        try:
            return cls(
                rank=int(os.environ["RANK"]),
                size=int(os.environ["WORLD_SIZE"]),
                host=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                port=int(os.environ["MASTER_PORT"]),
                hosted=store_is_hosted(),
            )
        except (KeyError, ValueError) as e:
            raise DiloError(
                f"incomplete torch.distributed environment ({e}): set RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT, or launch with torchrun / dilo run"
            ) from None


class WallClock:
    """Real time for the worker loop. A slowdown factor above 1 makes this worker that many times
    slower by sleeping (factor - 1) times each inner step (heterogeneity.slowdown)."""

    def __init__(self, slowdown: float = 1.0) -> None:
        self.slowdown = slowdown

    def now(self) -> float:
        """Seconds since the epoch: durations, and a time axis shared by the processes of a machine."""
        return time.time()

    def step_begin(self) -> None:
        """Real steps cost what they cost."""

    def step_done(self, elapsed_s: float) -> None:
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * elapsed_s)


def pick_device(backend: str) -> torch.device:
    """NCCL workers train on the GPU of their local rank (shared round-robin when a machine runs more
    workers than it has GPUs, e.g. `dilo run --workers 4` on one GPU); Gloo workers on the CPU."""
    if resolve_backend(backend) != "nccl":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DiloError("transport.backend='nccl' needs a CUDA GPU; use 'gloo' (or 'auto') on this machine")
    gpu = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)


def island_ranks_of(cfg: RunConfig, placement: Placement) -> int:
    """Ranks per island in a static world (transport.island_ranks; "node": LOCAL_WORLD_SIZE)."""
    k = cfg.transport.island_ranks
    if k == "node":
        try:
            k = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            raise DiloError(f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']!r} is not a number") from None
    if placement.size % k:
        raise DiloError(
            f"transport.island_ranks={cfg.transport.island_ranks} ({k} ranks per island) does not divide the "
            f"world of {placement.size} ranks; launch the same number of ranks on every node"
        )
    return k


class StaticWorld:
    """A fixed world from the launcher. With islands of K > 1 ranks (transport.island_ranks), global
    rank g is rank g % K of island g // K; three groups are built from the one store: every rank
    (checks, validation, totals), the island (gradients every step, broadcasts) and the islands'
    lead ranks (the outer step)."""

    elastic = False
    island_ranks = 1
    local_rank = 0
    group: TorchDistTransport | None = None

    def __init__(self, cfg: RunConfig, placement: Placement) -> None:
        self.cfg = cfg
        k = island_ranks_of(cfg, placement)
        self.island_ranks = k
        self.global_rank, self.global_size = placement.rank, placement.size
        self.rank, self.size = placement.rank // k, placement.size // k  # the island and the islands
        self.local_rank = placement.rank % k
        self.log_name = f"worker{self.rank}" if self.local_rank == 0 else f"worker{self.rank}.{self.local_rank}"
        self.clock = WallClock(cfg.heterogeneity.slowdown_of(self.rank))
        self.step_limit = cfg.steps
        self.device = pick_device(cfg.transport.backend)
        store = connect_store(
            placement.host,
            placement.port,
            placement.rank,
            placement.size,
            hosted=placement.hosted,
            timeout_s=cfg.transport.timeout_s,
        )
        t = cfg.transport
        self.transport = TorchDistTransport(
            store, placement.rank, placement.size, backend=t.backend, timeout_s=t.timeout_s
        )
        self.outer_transport: TorchDistTransport | None = self.transport
        if k > 1:
            self.group = TorchDistTransport(
                store, self.local_rank, k, backend=t.backend, timeout_s=t.timeout_s, prefix=f"dilo/island{self.rank}"
            )
            self.outer_transport = None
            if self.local_rank == 0:
                self.outer_transport = TorchDistTransport(
                    store, self.rank, self.size, backend=t.backend, timeout_s=t.timeout_s, prefix="dilo/outer"
                )
        # the traffic between islands; a follower rank sends none
        self.counter: ByteCounter = self.outer_transport.counter if self.outer_transport else ByteCounter()
        self._check_same_run()

    def strategy(self, model: torch.nn.Module) -> Strategy:
        cfg, o = self.cfg, self.cfg.outer
        if isinstance(o, DDPConfig):
            if cfg.codec.kind != "none" or cfg.codec.overrides:
                warnings.warn(
                    "codec settings are ignored by outer.kind='ddp': the baseline sends fp32 gradients", stacklevel=2
                )
            return DDP(model, self.transport, log_every=cfg.sync_every_ddp_eval, bucket_mb=cfg.transport.bucket_mb)
        outer = None
        if self.outer_transport is not None:
            outer = DiLoCo(
                model,
                self.outer_transport,
                inner_steps=o.inner_steps,
                lr=o.lr,
                momentum=getattr(o, "momentum", 0.0),
                nesterov=getattr(o, "nesterov", False),
                codec=cfg.codec,
                seed=cfg.seed,
                bucket_mb=cfg.transport.bucket_mb,
            )
        if self.group is None:
            return outer  # type: ignore[return-value]
        return IslandSync(model, self.group, outer, bucket_mb=cfg.transport.bucket_mb)

    def agree_resume_round(self, ckpt_dir: Path) -> int:
        """The newest round every rank has a checkpoint for, or -1."""
        mine = rounds_of(ckpt_dir, self.log_name)
        newest = torch.tensor([float(mine[-1] if mine else -1)], dtype=torch.float64)
        agreed = int(min(float(t) for t in self.transport.all_gather(newest)))
        if agreed >= 0 and agreed not in mine:
            raise DiloError(
                f"{self.log_name} has no checkpoint for round {agreed} in {ckpt_dir} (it has {mine}); "
                "the workers' checkpoint directories disagree"
            )
        return agreed

    def start(self, model: torch.nn.Module, outer: Any, *, resumed: bool = False) -> None:
        outer.broadcast_initial(model)  # threads share one RNG; joiners will need this anyway

    def validation_share(self, batches: list[Any]) -> list[Any]:
        return batches[self.global_rank :: self.global_size]

    def evaluate(self, model: torch.nn.Module, batches: list[Any]) -> float:
        total, n = evaluate(model, batches, self.cfg.inner.precision)
        t = torch.tensor([total, float(n)], dtype=torch.float64)
        self.transport.all_reduce_([t])
        return float(t[0] / t[1]) if t[1] > 0 else float("nan")

    def total(self, values: list[float]) -> tuple[list[float], int]:
        """Sum over ranks, and how many ranks were summed."""
        t = torch.tensor(values, dtype=torch.float64)
        self.transport.all_reduce_([t])
        return [float(x) for x in t], self.global_size

    def close(self, outer: Any, *, leaving: bool) -> None:
        for t in (self.transport, self.group, self.outer_transport):
            if t is not None:
                t.close()

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


def default_worker_id() -> str:
    return os.environ.get("DILO_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"


class _OnItsOwn:
    """What the worlds without a collective share: each worker evaluates the whole validation set
    on its own parameters, reports its own totals, and checkpoints under its own name."""

    cfg: RunConfig
    log_name: str
    client: StarClient | None
    island_ranks = 1
    local_rank = 0
    group: TorchDistTransport | None = None
    """An island of several ranks (one torchrun launch): its own group; the lead rank talks to the world."""

    def agree_resume_round(self, ckpt_dir: Path) -> int:
        mine = rounds_of(ckpt_dir, self.log_name)
        newest = mine[-1] if mine else -1
        if self.group is None:
            return newest
        everyone = self.group.all_gather(torch.tensor([float(newest)], dtype=torch.float64))
        agreed = int(min(float(t) for t in everyone))
        if agreed >= 0 and agreed not in mine:
            raise DiloError(
                f"{self.log_name} has no checkpoint for round {agreed} (it has {mine}); the island's ranks disagree"
            )
        return agreed

    def validation_share(self, batches: list[Any]) -> list[Any]:
        # no collective with the other workers: every worker (island) evaluates the whole set
        return batches[self.local_rank :: self.island_ranks]

    def evaluate(self, model: torch.nn.Module, batches: list[Any]) -> float:
        total, n = evaluate(model, batches, self.cfg.inner.precision)
        if self.group is not None:
            t = torch.tensor([total, float(n)], dtype=torch.float64)
            self.group.all_reduce_([t])
            total, n = float(t[0]), int(t[1])
        return total / n if n else float("nan")

    def total(self, values: list[float]) -> tuple[list[float], int]:
        """This worker's own totals (summed over its island's ranks), and how many ranks were summed."""
        if self.group is None:
            return list(values), 1
        t = torch.tensor(values, dtype=torch.float64)
        self.group.all_reduce_([t])
        return [float(x) for x in t], self.island_ranks

    def close(self, outer: Any, *, leaving: bool) -> None:
        if self.client is not None:
            if leaving:
                self.client.leave()
            self.client.close()
        if self.group is not None:
            self.group.close()


class ElasticWorld(_OnItsOwn):
    elastic = True

    def __init__(self, cfg: RunConfig, worker_id: str | None = None, *, island: Placement | None = None) -> None:
        """island: the launcher's world (torchrun's RANK, WORLD_SIZE, ...); with more than one rank
        those ranks form one island that joins as one worker, led by its rank 0."""
        self.cfg = cfg
        self.worker_id = worker_id or cfg.membership.worker_id or default_worker_id()
        if not self.worker_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise DiloError(f"worker id {self.worker_id!r} may hold only letters, digits, '-', '_' and '.'")
        self.device = pick_device(cfg.transport.backend)
        self._secret = wire.load_secret(file=cfg.membership.secret_file or None)
        self.client: StarClient | None = None
        store = None
        if island is not None and island.size > 1:
            t = cfg.transport
            store = connect_store(
                island.host, island.port, island.rank, island.size, hosted=island.hosted, timeout_s=t.timeout_s
            )
            self.group = TorchDistTransport(
                store, island.rank, island.size, backend=t.backend, timeout_s=t.timeout_s, prefix="dilo/island"
            )
            self.island_ranks, self.local_rank = island.size, island.rank
            # the island is one worker: its ranks go by the lead rank's id
            key = f"dilo/island-id/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            if self.local_rank == 0:
                store.set(key, self.worker_id)
            else:
                self.worker_id = store.get(key).decode()
        self.log_name = f"worker-{self.worker_id}" + (f".{self.local_rank}" if self.local_rank else "")
        # island: DILO_ISLAND, "auto" (the coordinator hands out the lowest free one at JOIN: replicas
        # that share one environment, like `docker compose --scale`), or a stable slot from the
        # worker id, so that a restarted worker reads the same data
        islands = max(1, cfg.workers)
        self.size = islands
        choice = os.environ.get("DILO_ISLAND", "")
        self.auto_island = choice == "auto"
        if choice and not self.auto_island and not choice.isdigit():
            raise DiloError(f"DILO_ISLAND={choice!r}: give an island number or 'auto'")
        mine = int(choice) if choice.isdigit() else _stable_slot(self.worker_id, islands)
        if self.group is not None:  # the lead rank's choice holds for the island
            t = torch.tensor([float(mine), float(self.auto_island)], dtype=torch.float64)
            self.group.broadcast_([t], src=0)
            mine, self.auto_island = int(t[0]), bool(t[1])
        self._set_island(mine)

    def _set_island(self, island: int) -> None:
        cfg = self.cfg
        self.rank = island
        self.clock = WallClock(cfg.heterogeneity.slowdown_of(island))
        own = cfg.heterogeneity.max_steps_of(island)
        if isinstance(cfg.outer, AsyncConfig):
            # the coordinator ends an async run when the world's budget is spent
            self.step_limit = own or sys.maxsize
        else:
            self.step_limit = min(cfg.steps, own) if own else cfg.steps
        self.counter = ByteCounter()
        self.joined: dict[str, Any] = {}
        """Version, anchor hash and members at the latest start(); empty before."""

    def strategy(self, model: torch.nn.Module) -> Strategy:
        if isinstance(self.cfg.outer, DDPConfig):
            raise DiloError("outer.kind='ddp' needs membership.kind='static': it exchanges gradients every step")
        bucket_mb = self.cfg.transport.bucket_mb
        if self.group is not None and self.local_rank != 0:
            return IslandSync(model, self.group, None, bucket_mb=bucket_mb)  # type: ignore[return-value]
        outer = self._lead_strategy(model)
        if self.group is not None:
            return IslandSync(model, self.group, outer, bucket_mb=bucket_mb)  # type: ignore[return-value]
        return outer

    def _lead_strategy(self, model: torch.nn.Module) -> Strategy:
        param_bytes = sum(p.numel() * 4 for p in model.parameters())
        self.client = StarClient(
            self.cfg.membership,
            self.worker_id,
            run=self.cfg.name,
            fingerprint=self.cfg.fingerprint(),
            secret=self._secret,
            max_message_bytes=4 * param_bytes + (1 << 20),
            hold_s=self.cfg.outer.grace_s if isinstance(self.cfg.outer, AsyncConfig) else 0.0,
        )
        self.counter = self.client.counter
        if self.auto_island:
            self.client.join_body["island"] = "auto"
        if isinstance(self.cfg.outer, AsyncConfig):
            return AsyncLocalSGD(model, self.client, self.cfg)
        return StarDiLoCo(model, self.client, self.cfg)

    def start(self, model: torch.nn.Module, outer: Any, *, resumed: bool = False) -> None:
        island, version, members = -1, -1, None
        lead = outer.outer if isinstance(outer, IslandSync) else outer
        failure: BaseException | None = None
        if lead is not None:
            try:
                welcome = lead.join(model)
                if isinstance(welcome.body.get("island"), int):
                    island = int(welcome.body["island"])
                version, members = int(welcome.body["version"]), list(welcome.body["members"])
            except BaseException as e:  # an island's followers must hear of it, not wait for a timeout
                if not isinstance(outer, IslandSync):
                    raise
                failure = e
        if isinstance(outer, IslandSync):  # the island starts from what its lead rank received
            island, version, failed = (int(v) for v in outer.share(model, [island, version, failure is not None]))
            if failure is not None:
                raise failure
            if failed:
                raise DiloError("the island's lead rank could not join the coordinator (its log says why)")
        if self.auto_island and not resumed and island >= 0:
            self._set_island(island)  # train() loads that island's data
        # What this worker starts from, hashed from its own model after adopting the WELCOME (not
        # the coordinator's claim): tests and operators compare it with the coordinator's anchor.
        self.joined = {
            "island": self.rank,
            "version": version,
            "anchor_hash": tensor_digest(list(params_of(model))),
            "members": members,
        }
        log.info(
            "worker %s joined at version %d, anchor %s, with members %s",
            self.worker_id + (f" (island rank {self.local_rank})" if self.local_rank else ""),
            version,
            self.joined["anchor_hash"],
            members if members is not None else "(known to the lead rank)",
        )


class GossipWorld(_OnItsOwn):
    """Workers that gossip with each other directly (outer.kind = "gossip").

    Peers come from a coordinator acting as a tracker (membership.kind = "coordinator": it knows
    members and their listening addresses, nothing else) or from a fixed list
    (membership.kind = "static": membership.peers[rank], rank from RANK). Every worker evaluates
    the whole validation set on its own parameters and reports its own totals."""

    elastic = True

    def __init__(self, cfg: RunConfig, worker_id: str | None = None, *, rank: int | None = None) -> None:
        self.cfg = cfg
        self.mcfg = cfg.membership
        self.tracked = cfg.membership.kind == "coordinator"
        self._secret = wire.load_secret(file=cfg.membership.secret_file or None)
        if self.tracked:
            if Placement.from_env().size > 1:
                raise DiloError(
                    "outer.kind='gossip' runs one rank per worker: start each `dilo worker` on its own, not as "
                    "several ranks of one torchrun"
                )
            self.worker_id = worker_id or cfg.membership.worker_id or default_worker_id()
            self.rank = int(os.environ.get("DILO_ISLAND", str(_stable_slot(self.worker_id, max(1, cfg.workers)))))
        else:
            if not cfg.membership.peers:
                raise DiloError(
                    "outer.kind='gossip' with membership.kind='static' needs membership.peers (one tcp://HOST:PORT "
                    "per worker, by rank), or membership.kind='coordinator' to let a coordinator track the peers"
                )
            self.rank = Placement.from_env().rank if rank is None else rank
            self.worker_id = worker_id or f"rank{self.rank}"
        self.size = max(1, cfg.workers)
        self.log_name = f"worker-{self.worker_id}"
        self.device = pick_device(cfg.transport.backend)
        self.clock = WallClock(cfg.heterogeneity.slowdown_of(self.rank))
        own = cfg.heterogeneity.max_steps_of(self.rank)
        self.step_limit = min(cfg.steps, own) if own else cfg.steps
        self.counter = ByteCounter()
        self.client: StarClient | None = None
        self.node: Any = None
        self.joined: dict[str, Any] = {}
        self._welcome_peers: dict[str, str] = {}

    def strategy(self, model: torch.nn.Module) -> Strategy:
        from dilo.outer.gossip import Gossip
        from dilo.transport.zmq_p2p import P2PNode

        params = params_of(model)
        param_bytes = sum(p.numel() * 4 for p in params)
        m = self.mcfg
        bind = m.peers[self.rank] if not self.tracked else m.p2p_bind
        fp32 = {f"p.{i}": (tuple(p.shape), "float32") for i, p in enumerate(params)}
        spec, state_spec = fp32, fp32
        if self.cfg.codec.kind != "none":  # compressed gossip: encoded differences; states carry x and x^
            from dilo.outer.star import StarCodec

            spec = StarCodec(param_names(model), [p.shape for p in params], self.cfg.codec).push_spec()
            state_spec = {**fp32, **{f"h.{i}": v for i, (_, v) in enumerate(fp32.items())}}
        self.node = P2PNode(
            self.worker_id,
            bind=bind,
            advertise=m.p2p_advertise if self.tracked else m.peers[self.rank],
            run=self.cfg.name,
            fingerprint=self.cfg.fingerprint(),
            secret=self._secret,
            spec=spec,
            state_spec=state_spec,
            max_message_bytes=3 * param_bytes + (1 << 20),
            curve_dir=m.curve_dir,
            rate_limit=m.rate_limit,
            hello_timeout_s=min(self.cfg.outer.peer_timeout_s, 5.0),
        )
        self.counter = self.node.counter
        if self.tracked:
            self.client = StarClient(
                m,
                self.worker_id,
                run=self.cfg.name,
                fingerprint=self.cfg.fingerprint(),
                secret=self._secret,
                max_message_bytes=1 << 20,
            )
            self.client.join_body = {"p2p": self.node.address}
            view = self._tracked_view
        else:
            static = {f"rank{r}": a for r, a in enumerate(m.peers)}
            view = lambda: static  # noqa: E731 - the fixed world
        return Gossip(model, self.node, view, self.cfg, self.worker_id)  # type: ignore[return-value]

    def _tracked_view(self) -> dict[str, str]:
        assert self.client is not None
        peers = self.client.heartbeat.peers
        return dict(peers) if peers else dict(self._welcome_peers)

    @torch.no_grad()
    def start(self, model: torch.nn.Module, outer: Any, *, resumed: bool = False) -> None:
        if self.cfg.outer.independent_init and not resumed:
            fresh = params_of(build_model(self.cfg.model, self.cfg.seed + 1000 * self.rank))
            for p, v in zip(params_of(model), fresh):
                p.copy_(v)
        if self.client is not None:
            welcome = self.client.join()
            self._welcome_peers = dict(welcome.body["peers"])
        # a static world starts together (a restarted worker resumes from its checkpoint); a tracked
        # worker may be joining a run in progress
        took = outer.join_from_neighbour(model) if self.tracked and not resumed else None
        outer.publish(model)
        self.joined = {
            "members": sorted(outer.view()),
            "from": took,
            "anchor_hash": tensor_digest(list(params_of(model))),
            "address": self.node.address,
        }
        log.info("worker %s gossips at %s with %s", self.worker_id, self.node.address, self.joined["members"])

    def close(self, outer: Any, *, leaving: bool) -> None:
        super().close(outer, leaving=leaving)
        if self.node is not None:
            self.node.close()


def _stable_slot(worker_id: str, n: int) -> int:
    import zlib

    digits = "".join(c for c in worker_id if c.isdigit())
    return int(digits) % n if digits else zlib.crc32(worker_id.encode()) % n
