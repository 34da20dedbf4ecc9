"""The dilo coordinator: membership, views, and the global state of star rounds.

    dilo coordinator CONFIG [--resume] [--coordinator.bind=tcp://0.0.0.0:29600]

    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0", secret=secret)
    coord.serve(stop)                 # until stop is set; checkpoints and closes on the way out

A small single-threaded ZeroMQ ROUTER server that never runs a forward or backward pass:

- server.py: the socket loop, rate limits, decoding and validation, sessions, the membership
  table and its expiry, STATUS / HELLO / JOIN / LEAVE / HEARTBEAT, checkpoints and `--resume`;
- policy.py: the RoundPolicy seam between the server and what a push does, chosen once from
  `outer.kind`: sync.py (DiLoCo / FedAvg rounds), asynchronous.py (async local SGD: pushes
  applied on arrival, DyLU step assignment, a step budget), tracker.py (gossip: members and
  peer addresses only, no model);
- global_model.py: the global fp32 parameters of sync and async runs and the checks of a push;
- dilo/bodies.py: the pydantic models of every message body, requests and replies.

`Coordinator(cfg, inproc=True, clock=...)` has no socket: `handle()` takes encoded frames and
the replies collect in `outbox`; `dilo sim` drives it so on a virtual clock.
"""

from dilo.coordinator.policy import Member, RoundPolicy
from dilo.coordinator.server import Coordinator

__all__ = ["Coordinator", "Member", "RoundPolicy"]
