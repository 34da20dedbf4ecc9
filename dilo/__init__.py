"""dilo: train PyTorch models across poorly connected compute islands.

The library API (dilo/api.py):

    world = dilo.init(cfg)                          # static, coordinator or gossip, from the config
    outer = dilo.wrap(model, inner_optimizer, world)
    for batch in loader:
        ...; inner_optimizer.step(); inner_optimizer.zero_grad()
        report = outer.step()                       # syncs when a round is due

Names are imported on first use, so that `import dilo.config` stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dilo.api import Outer as Outer
    from dilo.api import RoundReport as RoundReport
    from dilo.api import init as init
    from dilo.api import wrap as wrap
    from dilo.config import RunConfig as RunConfig
    from dilo.config import load as load
    from dilo.errors import DiloError as DiloError
    from dilo.outer.base import Failure as Failure
    from dilo.outer.base import Joined as Joined
    from dilo.outer.base import Strategy as Strategy
    from dilo.outer.base import SyncReport as SyncReport
    from dilo.outer.base import tensor_digest as tensor_digest
    from dilo.worlds import ElasticWorld as ElasticWorld
    from dilo.worlds import GossipWorld as GossipWorld
    from dilo.worlds import Placement as Placement
    from dilo.worlds import StaticWorld as StaticWorld
    from dilo.worlds import World as World

__version__ = "0.1.0"

_WHERE = {
    "init": "dilo.api",
    "wrap": "dilo.api",
    "Outer": "dilo.api",
    "RoundReport": "dilo.api",
    "RunConfig": "dilo.config",
    "load": "dilo.config",
    "DiloError": "dilo.errors",
    "Failure": "dilo.outer.base",
    "Joined": "dilo.outer.base",
    "Strategy": "dilo.outer.base",
    "SyncReport": "dilo.outer.base",
    "tensor_digest": "dilo.outer.base",
    "World": "dilo.worlds",
    "Placement": "dilo.worlds",
    "StaticWorld": "dilo.worlds",
    "ElasticWorld": "dilo.worlds",
    "GossipWorld": "dilo.worlds",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'dilo' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value
