"""A transport wrapper that fails collectives by plan.

`FaultyTransport` wraps a transport of dilo/transport/base.py (a `TorchDistTransport` over
Gloo, say) and fails its n-th collective of a kind: it raises `PeerLost` or `SyncTimeout` on
this rank only, really breaks the group (`abort`: the peers get Gloo's own "connection closed"
error), stops taking part (`hang`: the peers time out), or calls a kill callback:

    t = FaultyTransport(TorchDistTransport(store, rank, size), [CollectiveFault("abort", op="all_to_all", at=2)])
    t.inject(CollectiveFault("hang", op="any", at=1, hang_s=5.0))   # counted from now on
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable

from torch import Tensor

from dilo.errors import PeerLost, SyncTimeout
from dilo.testing.faults.plan import CollectiveFault
from dilo.transport.base import ByteCounter, Transport

log = logging.getLogger("dilo.testing.faults")


class FaultyTransport:
    """A Transport that passes every call to `inner` until a planned fault fires.

    Once the group was broken (abort, hang, kill) every later collective raises PeerLost: the
    group is gone, as it would be after a real failure. peer_lost and timeout leave the group
    as it is (inject them on every rank at the same call to fail a round everywhere)."""

    def __init__(self, inner: Transport, faults: Iterable[CollectiveFault] = ()) -> None:
        self.inner = inner
        self.rank, self.size = inner.rank, inner.size
        self.calls: Counter[str] = Counter()
        """Collectives issued so far, by op (and "any")."""
        self.fired: list[CollectiveFault] = []
        self._pending: list[tuple[CollectiveFault, int]] = []
        self._released = threading.Event()
        self.broken = False
        for f in faults:
            self.inject(f)

    @property
    def counter(self) -> ByteCounter:
        return self.inner.counter

    def inject(self, fault: CollectiveFault) -> None:
        """Add a fault; its `at` counts calls of its op from now."""
        self._pending.append((fault, self.calls[fault.op]))

    def release(self) -> None:
        """End every hang now (the hung rank then raises SyncTimeout)."""
        self._released.set()

    def _before(self, op: str) -> None:
        if self.broken:
            raise PeerLost(f"{op} on rank {self.rank}: the group was broken by an injected fault")
        self.calls[op] += 1
        self.calls["any"] += 1
        for i, (fault, start) in enumerate(self._pending):
            if self.calls[fault.op] - start == fault.at:
                del self._pending[i]
                self.fired.append(fault)
                self._fire(fault, op)
                return

    def _fire(self, fault: CollectiveFault, op: str) -> None:
        what = f"injected {fault.action} at {op} call {self.calls[op]} on rank {self.rank}"
        log.warning("%s", what)
        if fault.action == "peer_lost":
            raise PeerLost(what)
        if fault.action == "timeout":
            raise SyncTimeout(what)
        if fault.action == "hang":
            self.broken = True
            self._released.wait(timeout=fault.hang_s)
            raise SyncTimeout(what)
        if fault.action == "kill":
            assert fault.callback is not None
            fault.callback()
        self.broken = True
        self._break()
        raise PeerLost(what)

    def _break(self) -> None:
        """Destroy the backend's group: its sockets close, and the peers' pending and next operations
        fail as if this process had died. (Gloo's abort() alone leaves the connections open, so the
        peers would only time out; the group closes them when its last reference goes, which the
        inner transport's close() drops.)"""
        abort = getattr(getattr(self.inner, "pg", None), "abort", None)
        if callable(abort):
            abort()  # pending work must not hold the destruction up
        self.inner.close()

    def all_reduce_(self, tensors: list[Tensor]) -> None:
        self._before("all_reduce")
        self.inner.all_reduce_(tensors)

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        self._before("all_gather")
        return self.inner.all_gather(tensor)

    def all_to_all(self, chunks: list[Tensor]) -> list[Tensor]:
        self._before("all_to_all")
        return self.inner.all_to_all(chunks)

    def broadcast_(self, tensors: list[Tensor], src: int) -> None:
        self._before("broadcast")
        self.inner.broadcast_(tensors, src)

    def close(self) -> None:
        if not self.broken:
            self.inner.close()
