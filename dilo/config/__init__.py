"""One validated configuration tree for a dilo run.

A run is described by a TOML file (see `configs/`) plus dotted command-line overrides:

    cfg = load("configs/quickstart.toml", ["--outer.lr=0.5", "--inner.precision=bf16"])

Every section is a frozen pydantic model with `extra="forbid"`, so a misspelt key, a wrong type
or a value out of range fails here, before any process or socket starts, with a `ConfigError`
that names the dotted key and the allowed values. Field docstrings are the help text shown by
`dilo config schema`.

The package, by responsibility (importing it never imports torch):

- `base.py`: `Frozen`, the base of every section;
- `sections.py`: model, data, inner loop, codec, heterogeneity, simulation, logging, checkpoints;
- `outer.py`: one config per outer strategy and their union `OuterConfig`;
- `network.py`: transport, membership and coordinator, with the checks on their addresses;
- `run.py`: `RunConfig`, the root, and the checks that span sections;
- `load.py`: TOML files and `--section.key=value` overrides, error messages, the JSON schema.
"""

from __future__ import annotations

from dilo.config.base import Frozen
from dilo.config.load import from_dict, load, parse_overrides, schema, to_toml
from dilo.config.network import CoordinatorConfig, MembershipConfig, TransportConfig
from dilo.config.outer import AsyncConfig, DDPConfig, DiLoCoConfig, FedAvgConfig, GossipConfig, OuterConfig
from dilo.config.run import RunConfig
from dilo.config.sections import (
    AggregateConfig,
    CheckpointConfig,
    CodecConfig,
    CodecKind,
    CodecOverride,
    CodecSpec,
    DataConfig,
    GPTConfig,
    HeterogeneityConfig,
    HFModelConfig,
    ImportModelConfig,
    InnerConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    SimConfig,
    SimEvent,
)

__all__ = [
    "AggregateConfig",
    "AsyncConfig",
    "CheckpointConfig",
    "CodecConfig",
    "CodecKind",
    "CodecOverride",
    "CodecSpec",
    "CoordinatorConfig",
    "DDPConfig",
    "DataConfig",
    "DiLoCoConfig",
    "FedAvgConfig",
    "Frozen",
    "GPTConfig",
    "GossipConfig",
    "HFModelConfig",
    "HeterogeneityConfig",
    "ImportModelConfig",
    "InnerConfig",
    "LogConfig",
    "LoraConfig",
    "MembershipConfig",
    "ModelConfig",
    "OuterConfig",
    "RunConfig",
    "SimConfig",
    "SimEvent",
    "TransportConfig",
    "from_dict",
    "load",
    "parse_overrides",
    "schema",
    "to_toml",
]
