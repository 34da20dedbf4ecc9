"""`RunConfig`, the root of the tree: every section plus the checks that span sections."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from dilo.config.base import Frozen
from dilo.config.network import CoordinatorConfig, MembershipConfig, TransportConfig
from dilo.config.outer import AsyncConfig, DDPConfig, DiLoCoConfig, FedAvgConfig, GossipConfig, OuterConfig
from dilo.config.sections import (
    AggregateConfig,
    CheckpointConfig,
    CodecConfig,
    DataConfig,
    GPTConfig,
    HeterogeneityConfig,
    InnerConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    SimConfig,
)


class RunConfig(Frozen):
    name: str = Field("dilo", pattern=r"^[\w.-]+$")
    """Run name; logs and checkpoints go to out_dir."""
    out_dir: str = ""
    """Where logs, plots and checkpoints go; empty means runs/<name>."""
    seed: int = 0
    """Seeds model initialisation and data order."""
    steps: int = Field(1000, gt=0)
    """Inner steps each worker runs in total."""
    workers: int = Field(1, gt=0)
    """Default worker count for `dilo run` (overridden by --workers)."""
    sync_every_ddp_eval: int = Field(50, gt=0)
    """DDP has no rounds; it logs and evaluates as if a round were this many steps."""
    model: ModelConfig = Field(default_factory=GPTConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    inner: InnerConfig = Field(default_factory=InnerConfig)
    outer: OuterConfig = Field(default_factory=DiLoCoConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    membership: MembershipConfig = Field(default_factory=MembershipConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    heterogeneity: HeterogeneityConfig = Field(default_factory=HeterogeneityConfig)
    sim: SimConfig = Field(default_factory=SimConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        # a [model] or [outer] table without `kind` means the default variant
        if isinstance(data, dict):
            data = dict(data)
            for section, default in (("model", "gpt"), ("outer", "diloco")):
                if isinstance(data.get(section), dict) and "kind" not in data[section]:
                    data[section] = {"kind": default, **data[section]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if isinstance(self.model, GPTConfig) and self.data.seq_len > self.model.context:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.context={self.model.context}; "
                "raise model.context or lower data.seq_len"
            )
        if self.data.corpus in ("text", "tokens") and not self.data.paths:
            raise ValueError(f"data.corpus={self.data.corpus!r} needs data.paths (files, dirs or globs)")
        if self.data.corpus == "stdlib" and self.data.paths:
            raise ValueError("data.paths is only read by the text and tokens corpora; remove it or set data.corpus")
        if isinstance(self.outer, AsyncConfig) and self.membership.kind != "coordinator":
            raise ValueError(
                "outer.kind='async' applies pushes on a coordinator: set membership.kind='coordinator' "
                "(`dilo run` then starts one; `dilo sim` runs it in-process)"
            )
        if isinstance(self.outer, AsyncConfig) and not self.outer.buffer and self.outer.activation * self.workers > 1:
            raise ValueError(
                f"outer.activation={self.outer.activation} must not exceed 1/workers = {1.0 / self.workers:.4g} "
                "(outer.buffer = 0 uses the number of members as the buffer size)"
            )
        for e in self.sim.events:
            if e.worker >= self.workers:
                raise ValueError(f"sim.events: worker {e.worker} does not exist (workers = {self.workers})")
        if any(self.heterogeneity.max_steps) and self.membership.kind != "coordinator":
            raise ValueError(
                "heterogeneity.max_steps makes workers leave early, which needs membership.kind='coordinator'"
            )
        if self.sim.events and self.membership.kind != "coordinator":
            raise ValueError(
                "sim.events (join, leave, crash) need membership.kind='coordinator': a static world "
                "cannot lose or gain a worker"
            )
        if self.membership.peers and len(self.membership.peers) != self.workers:
            raise ValueError(
                f"membership.peers lists {len(self.membership.peers)} addresses for workers={self.workers}"
            )
        if isinstance(self.outer, GossipConfig) and self.codec.kind != "none":
            if self.outer.push_sum or self.outer.variance_correction or self.outer.nearest:
                raise ValueError(
                    "compressed gossip (codec.kind != 'none') mixes public estimates; it cannot be combined with "
                    "outer.push_sum, outer.variance_correction or outer.nearest"
                )
            if self.codec.kind == "powersgd" or any(o.kind == "powersgd" for o in self.codec.overrides):
                raise ValueError(
                    "codec.kind='powersgd' needs an all-reduce; gossip can use int8, int4, topk, sign, fp16"
                )
        if self.transport.island_ranks != 1:
            if isinstance(self.outer, DDPConfig):
                raise ValueError(
                    "outer.kind='ddp' averages gradients over every rank at every step, so islands do not apply: "
                    "set transport.island_ranks=1"
                )
            if isinstance(self.outer, GossipConfig):
                raise ValueError("outer.kind='gossip' runs one rank per worker: set transport.island_ranks=1")
            if self.membership.kind == "coordinator":
                raise ValueError(
                    "transport.island_ranks is for static worlds; with membership.kind='coordinator' the ranks "
                    "of one torchrun launch form one island by themselves: leave island_ranks at 1"
                )
        if isinstance(self.outer, DiLoCoConfig) and self.outer.streaming and self.membership.kind != "static":
            raise ValueError(
                "Streaming DiLoCo (outer.fragments / outer.fragment_delay) exchanges fragments over "
                "torch.distributed: it needs membership.kind='static' (torchrun, Slurm, `dilo run`); "
                "set outer.fragments=1 and outer.fragment_delay=0"
            )
        if isinstance(self.outer, DDPConfig) and self.outer.vote != "none" and self.inner.optimizer != "lion":
            raise ValueError(
                f"outer.vote={self.outer.vote!r} is Distributed Lion: the workers vote on Lion update signs; set "
                "inner.optimizer='lion', or outer.vote='none'"
            )
        if getattr(self.outer, "round_seconds", 0.0):
            if self.transport.island_ranks != 1:
                raise ValueError(
                    "outer.round_seconds is measured by each process, and the ranks of an island must end their "
                    "rounds together: set transport.island_ranks=1, or outer.round_seconds=0"
                )
            if self.membership.schedule == "compass":
                raise ValueError(
                    "membership.schedule='compass' hands each worker its steps per round; outer.round_seconds "
                    "cuts rounds by time: choose one"
                )
        if self.codec.adapt_every:
            streaming = isinstance(self.outer, DiLoCoConfig) and self.outer.streaming
            sharded = self.transport.island_shard == "fsdp" or self.transport.island_wire == "all"
            if (
                self.membership.kind != "static"
                or not isinstance(self.outer, DiLoCoConfig | FedAvgConfig)
                or streaming
                or sharded
                or self.aggregate.robust
            ):
                raise ValueError(
                    "codec.adapt_every plans a static DiLoCo / FedAvg exchange of whole parameters: use "
                    "membership.kind='static', outer.kind='diloco' or 'fedavg' (not streaming), islands that "
                    "exchange through their lead, and aggregate.kind='mean'; or set codec.adapt_every=0"
                )
        if self.aggregate.robust:
            self._check_robust()
        if self.heterogeneity.hostile and (
            self.membership.kind != "static" or not isinstance(self.outer, DiLoCoConfig | FedAvgConfig)
        ):
            raise ValueError(
                "heterogeneity.hostile makes workers of a static DiLoCo / FedAvg run send wrong updates: "
                "use membership.kind='static' and outer.kind='diloco' or 'fedavg', or drop it"
            )
        if getattr(self.outer, "offload", False) and self.membership.kind != "static":
            raise ValueError(
                "outer.offload moves a static world's outer state to host memory; with a coordinator the anchor "
                "lives there (a sharded island's lead keeps its copy in host memory already): set outer.offload=false"
            )
        if self.transport.island_shard == "fsdp":
            if not isinstance(self.outer, DiLoCoConfig | FedAvgConfig | AsyncConfig):
                raise ValueError(
                    "transport.island_shard='fsdp' shards islands for DiLoCo, FedAvg and async local SGD: set "
                    "outer.kind='diloco', 'fedavg' or 'async', or transport.island_shard='none'"
                )
            if self.membership.kind == "static" and self.transport.island_ranks == 1:
                raise ValueError(
                    "transport.island_shard='fsdp' needs islands of several ranks: set transport.island_ranks "
                    "(with a coordinator: launch each worker with torchrun --nproc-per-node=K)"
                )
            if isinstance(self.outer, DiLoCoConfig) and (self.outer.streaming or self.outer.overlap):
                raise ValueError(
                    "transport.island_shard='fsdp' runs the blocking outer step: set outer.overlap=false, "
                    "outer.fragments=1 and outer.fragment_delay=0"
                )
            if self.inner.optimizer == "muon":
                raise ValueError(
                    "inner.optimizer='muon' orthogonalises whole matrices, which transport.island_shard='fsdp' "
                    "splits over ranks: use adamw there, or islands that hold the whole model"
                )
            if self.outer.local or self.lora.r > 0 or self.inner.compile:
                raise ValueError(
                    "transport.island_shard='fsdp' trains every parameter of an uncompiled model: drop outer.local, "
                    "lora and inner.compile"
                )
        if self.transport.island_wire == "all":
            if self.membership.kind != "static" or not isinstance(self.outer, DiLoCoConfig | FedAvgConfig):
                raise ValueError(
                    "transport.island_wire='all' splits a static world's DiLoCo / FedAvg exchange over an island's "
                    "ranks; with a coordinator the lead rank relays (one connection per island): set "
                    "transport.island_wire='lead'"
                )
            if isinstance(self.outer, DiLoCoConfig) and self.outer.streaming:
                raise ValueError(
                    "Streaming DiLoCo syncs whole blocks, which transport.island_wire='all' splits over ranks: "
                    "set transport.island_wire='lead'"
                )
        if self.inner.warmup_steps >= self.steps:
            raise ValueError(f"inner.warmup_steps={self.inner.warmup_steps} must be below steps={self.steps}")
        return self

    @property
    def round_steps(self) -> int:
        """Inner steps per round: H for DiLoCo/FedAvg, the logging period for DDP."""
        return self.sync_every_ddp_eval if isinstance(self.outer, DDPConfig) else self.outer.inner_steps

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    def _check_robust(self) -> None:
        """aggregate.kind / clip_norm other than the plain mean: where they apply."""
        a = self.aggregate
        if not isinstance(self.outer, DiLoCoConfig | FedAvgConfig):
            raise ValueError(
                f"aggregate.kind={a.kind!r} combines the pseudo-gradients of DiLoCo / FedAvg rounds: set "
                "outer.kind='diloco' or 'fedavg', or aggregate.kind='mean' and aggregate.clip_norm=0"
            )
        if self.membership.kind == "static":
            if self.workers < a.fewest():
                raise ValueError(
                    f"aggregate.kind={a.kind!r} needs at least {a.fewest()} workers with these settings, "
                    f"the run has {self.workers}: add workers or lower aggregate.trim / aggregate.byzantine"
                )
            if self.codec.kind == "powersgd" or any(o.kind == "powersgd" for o in self.codec.overrides):
                raise ValueError(
                    "a robust aggregate needs each worker's pseudo-gradient; PowerSGD only ever sums them: "
                    "choose another codec, or aggregate.kind='mean'"
                )
            sharded = self.transport.island_shard == "fsdp" or self.transport.island_wire == "all"
            if sharded and (a.kind not in ("median", "trimmed_mean") or a.clip_norm > 0):
                raise ValueError(
                    f"aggregate.kind={a.kind!r} looks at whole pseudo-gradients, which islands exchanging shares "
                    "(island_shard='fsdp', island_wire='all') never hold: use median or trimmed_mean (per "
                    "coordinate) there"
                )
            if isinstance(self.outer, DiLoCoConfig) and self.outer.streaming:
                raise ValueError("Streaming DiLoCo averages its fragments: set aggregate.kind='mean' with it")

    def fingerprint(self) -> str:
        """Hash of everything that must agree between workers (not logging or resume flags)."""
        d = self.model_dump(
            mode="json", exclude={"log", "checkpoint", "out_dir", "workers", "membership", "coordinator", "sim"}
        )
        if self.membership.kind == "coordinator":  # how an island holds its model is its own business:
            d["transport"].pop("island_shard")  # sharded and whole-model islands push the same tensors
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
