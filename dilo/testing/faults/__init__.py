"""Fault injection for chaos tests: a ZeroMQ link that mangles messages, a transport that fails collectives.

- `link.py`: `FaultyLink`, a seeded message-level proxy in front of a ROUTER server (a `dilo
  coordinator`, a gossip peer's listener): drop, delay, duplicate, reorder, corrupt, partition,
  kill at a protocol point; `peek` reads a message's type and worker without the secret.
- `transport.py`: `FaultyTransport`, a wrapper around a transport of dilo/transport/base.py that
  fails its n-th collective of a kind (PeerLost, SyncTimeout, a really broken Gloo group, a hang,
  a kill).
- `plan.py`: the plans both take, `Rule` and `CollectiveFault`, and the `Event` a link records.

    from dilo.testing.faults import CollectiveFault, FaultyLink, FaultyTransport, Rule

    with FaultyLink(coordinator.address, [Rule("drop", types="result", nth=2)], seed=0) as link:
        ...  # workers connect to link.address
    t = FaultyTransport(inner, [CollectiveFault("abort", op="all_to_all", at=2)])

A test and benchmark tool: nothing in the runtime imports it.
"""

from __future__ import annotations

from dilo.testing.faults.link import FaultyLink, peek
from dilo.testing.faults.plan import CollectiveFault, Event, Rule
from dilo.testing.faults.transport import FaultyTransport

__all__ = ["Rule", "Event", "FaultyLink", "peek", "CollectiveFault", "FaultyTransport"]
