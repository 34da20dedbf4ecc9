"""torch.distributed transport: Gloo on CPU, NCCL on GPU, over an explicit store.

The group is built from a store and (rank, size), never from the default process group, so
several workers can live in one process (threads in tests) and torchrun's own group stays free
for the data-parallel ranks inside an island.

    store = connect_store("127.0.0.1", port, rank, size, hosted=False)
    t = TorchDistTransport(store, rank, size, backend="gloo", timeout_s=60)
    t.all_reduce_([flat])   # sum over workers, in place
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Protocol, cast

import torch
import torch.distributed as dist
from torch import Tensor

# Public torch.distributed names that torch/distributed/__init__.py imports without re-exporting them,
# so strict mypy (no implicit re-export) refuses them; their types still come from torch's type annotations.
from torch.distributed import PrefixStore, Store, TCPStore  # type: ignore[attr-defined]

from dilo.errors import PeerLost, SyncTimeout, TransportError
from dilo.transport.base import ByteCounter, ring_all_reduce_bytes


def connect_store(host: str, port: int, rank: int, size: int, *, hosted: bool, timeout_s: float = 300.0) -> Store:
    """Connect to the rendezvous store.

    hosted=True: a launcher (torchrun's agent, `dilo run`) already serves the store at host:port
    and every worker is a client. hosted=False: rank 0 serves it.
    """
    is_master = rank == 0 and not hosted
    try:
        return TCPStore(
            host, port, size, is_master=is_master, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
        )
    except (RuntimeError, OSError) as e:
        raise TransportError(f"cannot reach the rendezvous store at {host}:{port} (rank {rank}): {e}") from e


def store_is_hosted() -> bool:
    """True when the launcher hosts the store (torchrun >= 2.x sets TORCHELASTIC_USE_AGENT_STORE)."""
    return (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        or os.environ.get("DILO_STORE_HOSTED") == "1"
    )


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


class _Group(Protocol):
    """The collectives this transport calls on its Gloo / NCCL group.

    torch's type annotations declare them on ProcessGroup only, not on the Backend classes (ProcessGroupGloo,
    ProcessGroupNCCL) that implement them, so the group built below is cast to this.
    """

    def allreduce(self, tensors: list[Tensor], /) -> dist.Work: ...

    def allgather(self, output_tensors: list[list[Tensor]], input_tensors: list[Tensor], /) -> dist.Work: ...

    def alltoall_base(
        self,
        output: Tensor,
        input: Tensor,
        output_split_sizes: list[int],
        input_split_sizes: list[int],
        opts: dist.AllToAllOptions,
        /,
    ) -> dist.Work: ...

    def broadcast(self, tensors: list[Tensor], opts: dist.BroadcastOptions, /) -> dist.Work: ...


class TorchDistTransport:
    def __init__(
        self,
        store: Store,
        rank: int,
        size: int,
        *,
        backend: str = "gloo",
        timeout_s: float = 300.0,
        prefix: str = "dilo/global",
    ) -> None:
        self.rank, self.size = rank, size
        self.backend = resolve_backend(backend)
        self.counter = ByteCounter()
        self.device = torch.device("cpu")
        timeout = timedelta(seconds=timeout_s)
        pstore = PrefixStore(prefix, store)
        try:
            if self.backend == "gloo":
                self.pg = cast(_Group, dist.ProcessGroupGloo(pstore, rank, size, timeout))
            elif self.backend == "nccl":
                nccl = getattr(dist, "ProcessGroupNCCL", None)
                if nccl is None or not torch.cuda.is_available():
                    raise TransportError("backend 'nccl' needs a CUDA build of torch and a GPU; use backend='gloo'")
                opts = nccl.Options()
                opts._timeout = timeout
                self.device = torch.device("cuda", torch.cuda.current_device())
                self.pg = cast(_Group, nccl(pstore, rank, size, opts))
            else:
                raise TransportError(f"unknown backend {self.backend!r}; use 'gloo' or 'nccl'")
        except RuntimeError as e:
            raise TransportError(f"building the {self.backend} group failed (rank {rank} of {size}): {e}") from e

    def _wait(self, works: Sequence[dist.Work], what: str) -> None:
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:
            msg = str(e)
            kind = SyncTimeout if "timeout" in msg.lower() or "timed out" in msg.lower() else PeerLost
            raise kind(f"{what} failed on rank {self.rank}: {msg.splitlines()[0] if msg else e!r}") from e

    def _to_device(self, t: Tensor) -> Tensor:
        return t if t.device == self.device else t.to(self.device)

    def all_reduce_(self, tensors: list[Tensor]) -> None:
        staged = [self._to_device(t) for t in tensors]
        try:
            works = [self.pg.allreduce([t]) for t in staged]
        except RuntimeError as e:
            raise PeerLost(f"all_reduce failed on rank {self.rank}: {e}") from e
        self._wait(works, "all_reduce")
        for t, s in zip(tensors, staged):
            if s is not t:
                t.copy_(s)
            n = ring_all_reduce_bytes(t.numel() * t.element_size(), self.size)
            self.counter.add(n, n)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        src = self._to_device(tensor.contiguous())
        out = [torch.empty_like(src) for _ in range(self.size)]
        try:
            work = self.pg.allgather([out], [src])
        except RuntimeError as e:
            raise PeerLost(f"all_gather failed on rank {self.rank}: {e}") from e
        self._wait([work], "all_gather")
        n = tensor.numel() * tensor.element_size()
        self.counter.add((self.size - 1) * n, (self.size - 1) * n)
        return [o.to(tensor.device) for o in out]

    def all_to_all(self, chunks: list[Tensor]) -> list[Tensor]:
        """Send chunks[j] to worker j; return what every worker sent to this one, in rank order.
        All chunks must have the same dtype and size on every worker."""
        assert len(chunks) == self.size, f"need {self.size} chunks, got {len(chunks)}"
        src = self._to_device(torch.cat([c.reshape(-1) for c in chunks]))
        out = torch.empty_like(src)
        try:
            work = self.pg.alltoall_base(out, src, [], [], dist.AllToAllOptions())
        except RuntimeError as e:
            raise PeerLost(f"all_to_all failed on rank {self.rank}: {e}") from e
        self._wait([work], "all_to_all")
        n = chunks[0].numel() * chunks[0].element_size()
        self.counter.add((self.size - 1) * n, (self.size - 1) * n)
        return list(out.to(chunks[0].device).chunk(self.size))

    def broadcast_(self, tensors: list[Tensor], src: int) -> None:
        staged = [self._to_device(t) for t in tensors]
        works = []
        try:
            for t in staged:
                opts = dist.BroadcastOptions()
                opts.rootRank = src
                works.append(self.pg.broadcast([t], opts))
        except RuntimeError as e:
            raise PeerLost(f"broadcast failed on rank {self.rank}: {e}") from e
        self._wait(works, "broadcast")
        for t, s in zip(tensors, staged):
            if s is not t:
                t.copy_(s)
            n = t.numel() * t.element_size()
            if self.rank == src:
                self.counter.add(n * (self.size - 1), 0)
            else:
                self.counter.add(0, n)

    def close(self) -> None:
        # dropping the reference lets the backend close its sockets
        self.pg = None  # type: ignore[assignment]
