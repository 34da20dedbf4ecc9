"""The one place that builds an outer strategy from its config.

    strategy = build_strategy(cfg, model, links)    # links: what the world talks through

A world (dilo/worlds/) knows how workers reach each other and hands over `Links`; the config says
what to run over them. On an island of several ranks every rank gets an `IslandSync` (gradients
averaged inside the island), and only the lead rank holds the strategy that talks to the other
islands.

| outer.kind        | static world (torchrun, `dilo run`) | coordinator            | gossip         |
|-------------------|-------------------------------------|------------------------|----------------|
| diloco / fedavg   | DiLoCo over the lead ranks' group   | StarDiLoCo             | -              |
| ddp               | DDP over every rank                 | refused                | -              |
| async             | refused (config validation)         | AsyncLocalSGD          | -              |
| gossip            | -                                   | -                      | Gossip (P2P)   |
"""

from __future__ import annotations

import warnings

from torch import nn

from dilo.config import AsyncConfig, DDPConfig, DiLoCoConfig, FedAvgConfig, GossipConfig, RunConfig
from dilo.errors import ConfigError
from dilo.outer.async_local import AsyncLocalSGD
from dilo.outer.base import Links, Strategy
from dilo.outer.ddp import DDP
from dilo.outer.diloco import DiLoCo
from dilo.outer.gossip import Gossip
from dilo.outer.island import IslandSync
from dilo.outer.star import StarDiLoCo


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
        return DDP(model, links.collective, log_every=cfg.sync_every_ddp_eval, bucket_mb=bucket_mb)
    lead = _lead_strategy(cfg, o, model, links) if links.lead else None
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
    return DiLoCo(
        model,
        links.outer,
        inner_steps=o.inner_steps,
        lr=o.lr,
        momentum=momentum,
        nesterov=nesterov,
        codec=cfg.codec,
        seed=cfg.seed,
        bucket_mb=cfg.transport.bucket_mb,
    )
