"""What every world shares: the `World` protocol, the clock, where a worker sits.

A world is how the workers of a run reach each other, built once per process by `dilo.init`:

- `StaticWorld` (dilo/worlds/static.py): a fixed set of ranks from the launcher (torchrun, Slurm,
  `dilo run`), exchanging over torch.distributed;
- `ElasticWorld` (dilo/worlds/elastic.py): workers that join and leave a `dilo coordinator`;
- `GossipWorld` (dilo/worlds/gossip.py): workers that mix with peers over direct ZeroMQ links.

The loop asks a world for its links (`world.links(model, cfg)`, which `dilo.outer.build` turns into
a strategy), evaluates and sums through it, and closes it; it never asks which kind it is.
"""

from __future__ import annotations

import abc
import os
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

import torch
from torch import nn
from typing_extensions import Self

from dilo.config import RunConfig
from dilo.errors import DiloError
from dilo.inner import evaluate
from dilo.outer.base import Joined, Links
from dilo.state import Checkpoints, CheckpointWriter
from dilo.transport.base import ByteCounter, Transport
from dilo.transport.torch_dist import resolve_backend, store_is_hosted

Batch = tuple[torch.Tensor, torch.Tensor]


class Clock(Protocol):
    """Time for the worker loop: wall time, or the simulator's virtual time."""

    def now(self) -> float: ...

    def step_begin(self) -> None: ...

    def step_done(self, elapsed_s: float) -> None: ...


class World(Protocol):
    """How this worker reaches the others (see the module docstring)."""

    @property
    def cfg(self) -> RunConfig: ...

    @property
    def rank(self) -> int:
        """This worker's island number (the data it trains on), in [0, size)."""
        ...

    @property
    def size(self) -> int:
        """How many islands there are (configured `workers` in elastic worlds)."""
        ...

    @property
    def local_rank(self) -> int:
        """This rank inside its island (0: the lead rank)."""
        ...

    @property
    def island_ranks(self) -> int:
        """Ranks per island (data-parallel inside it)."""
        ...

    @property
    def log_name(self) -> str:
        """This rank's name in logs and checkpoint paths."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def step_limit(self) -> int:
        """Inner steps this worker trains at most (async: until the coordinator says done)."""
        ...

    @property
    def elastic(self) -> bool:
        """Workers may come and go: a lost peer costs a round, not the run."""
        ...

    @property
    def counter(self) -> ByteCounter:
        """Bytes this rank exchanged with other islands."""
        ...

    def links(self, model: nn.Module, cfg: RunConfig) -> Links:
        """Open what the strategy of cfg talks through (sockets, groups, the coordinator client)."""
        ...

    def adopt(self, joined: Joined, *, resumed: bool) -> None:
        """Take what the strategy's start found (elastic: the island the coordinator handed out)."""
        ...

    def checkpoints(self, ckpt_dir: Path) -> Checkpoints:
        """Where this rank's checkpoints are read and written: its own files under its log name,
        or (a sharded island) one DCP checkpoint per island that any layout can resume."""
        ...

    def agree_resume_round(self, store: Checkpoints) -> int:
        """The newest round of `store` that every rank that must agree has a checkpoint of, or -1."""
        ...

    def validation_share(self, batches: list[Batch]) -> list[Batch]: ...

    def shard(self, model: nn.Module) -> nn.Module:
        """The model as this world trains it: sharded over the island (transport.island_shard =
        "fsdp"), else itself. Call it before building the inner optimizer."""
        ...

    def evaluate(self, model: nn.Module, batches: list[Batch]) -> float:
        """The validation loss, summed over the ranks that split the batches."""
        ...

    def total(self, values: list[float]) -> tuple[list[float], int]:
        """Sum values over the ranks that report together, and how many ranks were summed."""
        ...

    def close(self, *, leaving: bool) -> None:
        """Close every socket, thread and group (leaving: say goodbye to the coordinator first).
        Idempotent; called on every exit path."""
        ...

    def __enter__(self) -> World: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        """close(), leaving when the block ended without an error."""
        ...


class Closing(abc.ABC):
    """`with world:` closes it on the way out (leaving the coordinator when the block succeeded)."""

    @abc.abstractmethod
    def close(self, *, leaving: bool) -> None:
        """Each world closes its own sockets, threads and groups."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close(leaving=kind is None)


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


@dataclass
class Placement:
    """Where this rank sits in the launcher's world and how to reach the others."""

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
            placement = cls(
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
        if not 0 <= placement.rank < placement.size or not 0 < placement.port <= 65535:
            raise DiloError(
                f"RANK={placement.rank}, WORLD_SIZE={placement.size}, MASTER_PORT={placement.port}: "
                "RANK must lie in [0, WORLD_SIZE) and MASTER_PORT in [1, 65535]"
            )
        return placement


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


def default_worker_id() -> str:
    return os.environ.get("DILO_WORKER_ID") or f"{socket.gethostname()}-{os.getpid()}"


def check_worker_id(worker_id: str) -> str:
    """A worker id names log and checkpoint files: letters, digits, '-', '_' and '.', not only dots."""
    if (
        not worker_id
        or len(worker_id) > 128
        or not worker_id.replace("-", "").replace("_", "").replace(".", "").isalnum()
        or not worker_id.isascii()
        or set(worker_id) == {"."}
    ):
        raise DiloError(
            f"worker id {worker_id!r} may hold only letters, digits, '-', '_' and '.' (at most 128, not only dots)"
        )
    return worker_id


def island_of(worker_id: str, islands: int, *, allow_auto: bool) -> tuple[int, bool]:
    """This worker's data island: DILO_ISLAND (a number in [0, islands), or "auto": the coordinator
    hands out the lowest free one at JOIN, for replicas that share one environment such as
    `docker compose --scale`), else a stable slot from the worker id, so that a restarted worker
    reads the same data. Returns (island, auto)."""
    choice = os.environ.get("DILO_ISLAND", "")
    if choice == "auto":
        if not allow_auto:
            raise DiloError(
                "DILO_ISLAND=auto needs a coordinator that hands out islands: a gossip worker takes "
                f"DILO_ISLAND=0..{islands - 1} or none (a stable slot from its id)"
            )
        return stable_slot(worker_id, islands), True
    if choice:
        if not choice.isdigit() or not 0 <= int(choice) < islands:
            raise DiloError(
                f"DILO_ISLAND={choice!r}: give an island number in [0, {islands}) (workers = {islands})"
                + (" or 'auto'" if allow_auto else "")
            )
        return int(choice), False
    return stable_slot(worker_id, islands), False


def stable_slot(worker_id: str, n: int) -> int:
    digits = "".join(c for c in worker_id if c.isdigit())
    return int(digits) % n if digits else zlib.crc32(worker_id.encode()) % n


class OwnTotals(Closing):
    """What the worlds without a global collective share: each worker (island) evaluates the whole
    validation set on its own parameters, reports its own totals and checkpoints under its own
    name. An island of several ranks sums over its own group (`self.group`)."""

    group: Transport | None = None
    island_ranks = 1
    local_rank = 0
    log_name: str
    _precision: str

    def checkpoints(self, ckpt_dir: Path) -> Checkpoints:
        return CheckpointWriter(ckpt_dir, self.log_name)

    def agree_resume_round(self, store: Checkpoints) -> int:
        mine = store.rounds()
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

    def shard(self, model: nn.Module) -> nn.Module:
        return model  # elastic and gossip islands hold whole models

    def validation_share(self, batches: list[Batch]) -> list[Batch]:
        # no collective with the other workers: every worker (island) evaluates the whole set
        return batches[self.local_rank :: self.island_ranks]

    def evaluate(self, model: nn.Module, batches: list[Batch]) -> float:
        total, n = evaluate(model, batches, self._precision)
        return self._island_mean(total, n)

    def _island_mean(self, total: float, n: int) -> float:
        """The mean loss over the island's ranks' batches (summed over its group)."""
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
