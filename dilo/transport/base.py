"""The Transport seam: collectives over the global world of workers.

A transport owns the process group (or sockets) it was built for and never touches
torch.distributed's default group. It raises only `TransportError` subclasses, so an outer
strategy can turn any network fault into a failed round instead of a crash.

Byte counters follow the ring algorithms that Gloo and NCCL use for large messages: an
all-reduce of n bytes over W workers sends (and receives) 2(W-1)/W * n bytes per worker,
an all-gather of n bytes per worker sends (W-1) * n, and an all-to-all of W chunks of
n bytes sends (W-1) * n. These are the payload bytes a worker
puts on the wire; headers of the underlying library are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass
class ByteCounter:
    sent: int = 0
    recv: int = 0

    def add(self, sent: int, recv: int) -> None:
        self.sent += sent
        self.recv += recv


def ring_all_reduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one worker sends in a ring all-reduce (reduce-scatter + all-gather) of nbytes."""
    return 2 * (world - 1) * nbytes // world if world > 1 else 0


class Transport(Protocol):
    rank: int
    size: int
    counter: ByteCounter

    def all_reduce_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over all workers, in place. All calls are issued before waiting."""
        ...

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every worker's tensor (same shape and dtype everywhere), in rank order."""
        ...

    def all_to_all(self, chunks: list[Tensor]) -> list[Tensor]:
        """Send chunks[j] to worker j; receive one chunk from every worker, in rank order."""
        ...

    def broadcast_(self, tensors: list[Tensor], src: int) -> None:
        """Overwrite each tensor with rank src's, in place."""
        ...

    def close(self) -> None: ...
