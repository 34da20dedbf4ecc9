"""The worlds a worker can live in (see dilo/worlds/base.py for the `World` protocol)."""

from dilo.worlds.base import Clock, Placement, WallClock, World, default_worker_id, pick_device
from dilo.worlds.elastic import ElasticWorld
from dilo.worlds.gossip import GossipWorld
from dilo.worlds.static import StaticWorld, island_ranks_of

__all__ = [
    "Clock",
    "ElasticWorld",
    "GossipWorld",
    "Placement",
    "StaticWorld",
    "WallClock",
    "World",
    "default_worker_id",
    "island_ranks_of",
    "pick_device",
]
