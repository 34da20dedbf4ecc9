"""The one place that builds an outer strategy from its config.

    strategy = build_strategy(cfg, model, links)    # links: what the world talks through

A world (dilo/worlds/) knows how workers reach each other and hands over `Links`; the config says
what to run over them. On an island of several ranks every rank gets an `IslandSync` (gradients
averaged inside the island), and only the lead rank holds the strategy that talks to the other
islands. With `outer.local` the strategy that talks to other islands sees only the parameters
that are shared (dilo/adapters.py `SharedView`); the island still averages every gradient.

| outer.kind        | static world (torchrun, `dilo run`) | coordinator            | gossip         |
|-------------------|-------------------------------------|------------------------|----------------|
| diloco / fedavg   | DiLoCo over the lead ranks' group   | StarDiLoCo             | -              |
| diloco, streaming | StreamingDiLoCo (same group)        | refused                | -              |
| ddp               | DDP over every rank                 | refused                | -              |
| async             | refused (config validation)         | AsyncLocalSGD          | -              |
| gossip            | -                                   | -                      | Gossip (P2P)   |

Sharded islands (transport.island_shard = "fsdp"): `ShardedIsland` around DiLoCo / FedAvg in a
static world (each rank its own shard), `ShardedRelay` around the coordinator's strategies (the
lead relays a gathered host copy).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

from torch import nn

from dilo.adapters import share_view, shared_view
from dilo.config import AsyncConfig, DDPConfig, DiLoCoConfig, FedAvgConfig, GossipConfig, RunConfig
from dilo.errors import ConfigError
from dilo.outer.async_local import AsyncLocalSGD
from dilo.outer.base import Joined, Links, Strategy, SyncReport, Tail
from dilo.outer.ddp import DDP
from dilo.outer.diloco import DiLoCo
from dilo.outer.gossip import Gossip
from dilo.outer.island import IslandShares, IslandSync
from dilo.outer.outer_opt import build_outer_optimizer
from dilo.outer.robust import build_aggregator
from dilo.outer.sharded import ShardedIsland, ShardedRelay, whole_view
from dilo.outer.star import StarDiLoCo
from dilo.outer.streaming import StreamingDiLoCo
from dilo.shard import local_shards


def build_strategy(cfg: RunConfig, model: nn.Module, links: Links) -> Strategy:
    """The strategy of cfg.outer over the world's links (see the table above)."""
    o = cfg.outer
    bucket_mb = cfg.transport.bucket_mb
    if isinstance(o, DDPConfig):
        if links.collective is None:
            raise ConfigError("outer.kind='ddp' needs membership.kind='static': it exchanges gradients every step")
        if cfg.codec.kind != "none" or cfg.codec.overrides:
            warnings.warn(
                "codec settings are ignored by outer.kind='ddp': the baseline sends fp32 gradients", stacklevel=2
            )
        return DDP(model, links.collective, log_every=cfg.sync_every_ddp_eval, bucket_mb=bucket_mb, vote=o.vote)
    view = shared_view(model, o)
    if links.sharded and links.island is not None:  # transport.island_shard = "fsdp" (dilo/outer/sharded.py)
        if links.outer is not None:  # static: every rank exchanges its shard
            part = local_shards(model)
            return ShardedIsland(part, model, links.island, _lead_strategy(cfg, o, part, links))
        whole = whole_view(model) if links.lead else None  # a coordinator: the lead relays
        relay = _lead_strategy(cfg, o, whole, links) if whole is not None else None
        return ShardedRelay(model, whole, links.island, relay)
    if links.shares > 1 and links.island is not None:  # transport.island_wire = "all"
        part = share_view(view, links.shares, links.island.rank)
        share = _lead_strategy(cfg, o, part, links)
        return IslandShares(model, view, part, links.island, share, bucket_mb=bucket_mb)
    lead = _lead_strategy(cfg, o, view, links) if links.lead else None
    if lead is not None and view is not model:
        lead = OnShared(lead, view)
    if links.island is None:
        if lead is None:
            raise ConfigError("a worker without an island group must be its own lead rank")
        return lead
    return IslandSync(model, links.island, lead, bucket_mb=bucket_mb)


def _lead_strategy(
    cfg: RunConfig, o: DiLoCoConfig | FedAvgConfig | AsyncConfig | GossipConfig, model: nn.Module, links: Links
) -> Strategy:
    if isinstance(o, GossipConfig):
        if links.gossip is None:
            raise ConfigError("outer.kind='gossip' needs a gossip world (dilo.init with outer.kind='gossip')")
        return Gossip(model, links.gossip, cfg, o)
    if isinstance(o, AsyncConfig):
        if links.star is None:
            raise ConfigError("outer.kind='async' needs membership.kind='coordinator' (or `dilo sim`)")
        return AsyncLocalSGD(model, links.star, cfg)
    if links.star is not None:
        return StarDiLoCo(model, links.star, cfg)
    if links.outer is None:
        raise ConfigError(f"outer.kind={o.kind!r} needs a static world's transport or a coordinator")
    momentum, nesterov = (o.momentum, o.nesterov) if isinstance(o, DiLoCoConfig) else (0.0, False)
    common: dict[str, Any] = {
        "inner_steps": o.inner_steps, "lr": o.lr, "momentum": momentum, "nesterov": nesterov,
        "codec": cfg.codec, "seed": cfg.seed, "bucket_mb": cfg.transport.bucket_mb,
        "make_optimizer": partial(build_outer_optimizer, o, foreach=True),
    }  # fmt: skip
    if isinstance(o, DiLoCoConfig) and o.streaming:
        return StreamingDiLoCo(
            model, links.outer, fragments=o.fragments, delay=o.fragment_delay, mixing=o.mixing,
            pattern=o.fragment_pattern, **common,
        )  # fmt: skip
    return DiLoCo(
        model, links.outer, overlap=isinstance(o, DiLoCoConfig) and o.overlap, offload=o.offload,
        aggregator=build_aggregator(cfg.aggregate), attack=cfg.heterogeneity.attack_of(links.outer.rank), **common,
    )  # fmt: skip


class OnShared:
    """A strategy run on the shared parameters only (`outer.local`): whatever model the loop
    passes, the strategy sees the view, so local parameters are never sent, averaged or reset."""

    def __init__(self, inner: Strategy, view: nn.Module) -> None:
        self.inner = inner
        self.view = view

    @property
    def round_steps(self) -> int:
        return self.inner.round_steps

    def due(self, step: int) -> bool:
        return self.inner.due(step)

    def start(self, model: nn.Module, *, resumed: bool) -> Joined:
        return self.inner.start(self.view, resumed=resumed)

    def reduce_grads(self, model: nn.Module) -> None:
        self.inner.reduce_grads(self.view)

    def sync(self, model: nn.Module, *, tail: Tail) -> SyncReport:
        return self.inner.sync(self.view, tail=tail)

    def describe(self) -> list[str]:
        return self.inner.describe()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:  # tests and tools reach the inner strategy's figures
        return getattr(self.inner, name)
