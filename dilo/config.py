"""One validated configuration tree for a dilo run.

A run is described by a TOML file (see `configs/`) plus dotted command-line overrides:

    cfg = load("configs/quickstart.toml", ["--outer.lr=0.5", "--inner.precision=bf16"])

Every section is a frozen pydantic model with `extra="forbid"`, so a misspelt key, a wrong type
or a value out of range fails here, before any process or socket starts, with a `ConfigError`
that names the dotted key and the allowed values. Field docstrings are the help text shown by
`dilo config schema`.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dilo.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# ---------------------------------------------------------------------------------------------
# model


class GPTConfig(Frozen):
    kind: Literal["gpt"] = "gpt"
    """The built-in small GPT (dilo/model.py)."""
    vocab_size: int = Field(256, gt=1)
    """Vocabulary size; 256 for the byte-level corpora."""
    n_layer: int = Field(4, gt=0)
    """Number of transformer blocks."""
    n_head: int = Field(4, gt=0)
    """Attention heads per block; must divide d_model."""
    d_model: int = Field(128, gt=0)
    """Width of the residual stream."""
    context: int = Field(128, gt=0)
    """Longest sequence the position embedding covers; data.seq_len must not exceed it."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability inside the blocks (0 keeps runs deterministic and fast)."""
    tie_weights: bool = True
    """Share the token embedding with the output projection."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide d_model={self.d_model}")
        return self


class ImportModelConfig(Frozen):
    kind: Literal["import"] = "import"
    """Any nn.Module, built by a function named by import path."""
    builder: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    """"package.module:function"; called as function(**kwargs) and must return an nn.Module
    whose forward(x, y) returns the scalar loss of the batch."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the builder."""


ModelConfig = Annotated[GPTConfig | ImportModelConfig, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------
# data


class DataConfig(Frozen):
    corpus: Literal["stdlib", "text", "tokens"] = "stdlib"
    """stdlib: the .py sources of the running Python's standard library (no download);
    text: UTF-8 files, directories or globs in `paths`, read as bytes;
    tokens: .bin files of uint16 token ids in `paths`, read by memmap."""
    paths: list[str] = Field(default_factory=list)
    """Files, directories or glob patterns for the text and tokens corpora."""
    islands: Literal["iid", "by_source"] = "iid"
    """iid: every worker sees the same distribution; by_source: whole files (stdlib: whole
    top-level packages) per worker, the non-IID case."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share held out for validation: whole files, chosen by a stable hash of their path
    (tokens: the tail of each file)."""
    batch_size: int = Field(16, gt=0)
    """Sequences per micro-batch on each worker."""
    seq_len: int = Field(128, gt=0)
    """Tokens per sequence."""


# ---------------------------------------------------------------------------------------------
# inner loop


class InnerConfig(Frozen):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """Inner optimizer; AdamW in DiLoCo, SGD for exactness tests against DDP."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak inner learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW decoupled weight decay (ignored by SGD)."""
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """SGD momentum (ignored by AdamW)."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warmup from 0 to lr, then cosine decay over the rest of the run."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine decays to lr * min_lr_ratio at the last step."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 runs forward and backward under bf16 autocast; parameters, optimizer state,
    anchors and pseudo-gradients stay fp32."""

    @model_validator(mode="after")
    def _betas_in_range(self) -> InnerConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas} must both lie in [0, 1)")
        return self


# ---------------------------------------------------------------------------------------------
# outer strategies


class DiLoCoConfig(Frozen):
    kind: Literal["diloco"] = "diloco"
    """Synchronous DiLoCo (Douillard et al., arXiv:2311.08105): mean pseudo-gradient, then
    outer Nesterov SGD on the fp32 anchor."""
    inner_steps: int = Field(50, gt=0)
    """H: inner steps between two outer steps."""
    lr: float = Field(0.7, gt=0.0)
    """Outer learning rate."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """Outer momentum."""
    nesterov: bool = True
    """Nesterov momentum (torch.optim.SGD semantics)."""
    weighting: Literal["uniform", "tokens"] = "uniform"
    """uniform: plain mean over contributors; tokens: weight each pseudo-gradient by the
    tokens its worker trained on this round."""


class FedAvgConfig(Frozen):
    kind: Literal["fedavg"] = "fedavg"
    """FedAvg: average the workers' parameters every H steps (outer SGD, lr 1, no momentum)."""
    inner_steps: int = Field(50, gt=0)
    """H: inner steps between two averages."""
    lr: float = Field(1.0, gt=0.0)
    """Outer learning rate; 1 is plain parameter averaging."""
    weighting: Literal["uniform", "tokens"] = "uniform"
    """uniform or token-weighted mean."""


class DDPConfig(Frozen):
    kind: Literal["ddp"] = "ddp"
    """Data-parallel baseline: gradients are averaged over all workers after every step."""


class AsyncConfig(Frozen):
    kind: Literal["async"] = "async"
    """Asynchronous local SGD through a coordinator (Liu et al., arXiv:2401.09135): every push is
    applied on arrival and the worker goes on at once from the fresh parameters. Needs
    membership.kind = "coordinator" (or `dilo sim`)."""
    inner_steps: int = Field(50, gt=0)
    """H: inner steps per round of the fastest worker (DyLU gives slower workers fewer)."""
    update: Literal["delayed_nesterov", "nesterov", "fedbuff", "fedasync"] = "delayed_nesterov"
    """Server rule. delayed_nesterov: momentum updated once per `buffer` pushes, plain SGD steps of
    lr/buffer in between; nesterov: each push straight into outer Nesterov ("naive async");
    fedbuff: buffer pushes, apply their staleness-weighted mean with SGD (momentum optional);
    fedasync: mix the worker's parameters in, x <- (1 - a) x + a x_worker, a = alpha * s(staleness)."""
    lr: float = Field(0.7, gt=0.0)
    """Outer learning rate (delayed_nesterov divides each push by the buffer size, so over a full
    buffer the step equals one Nesterov step of this lr on the buffer's mean)."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """Outer momentum (nesterov, delayed_nesterov, fedbuff)."""
    buffer: int = Field(0, ge=0)
    """N for delayed_nesterov, K for fedbuff: pushes per momentum update / per applied mean. 0: the
    number of members, recomputed whenever the view changes."""
    activation: float = Field(0.0, ge=0.0, le=1.0)
    """c in delayed Nesterov: the share of momentum applied on pushes between two momentum updates
    (0 to 1/N; the paper's default 0)."""
    alpha: float = Field(0.6, gt=0.0, le=1.0)
    """fedasync: mixing weight of a fresh push."""
    staleness: Literal["constant", "poly", "hinge"] = "constant"
    """Staleness weight s(t): constant 1; poly (1 + t)^-a; hinge 1 if t <= b else 1 / (a (t - b) + 1).
    Scales each push (nesterov, delayed_nesterov), its weight in the mean (fedbuff) or alpha (fedasync)."""
    staleness_a: float = Field(0.5, ge=0.0)
    """a of the poly and hinge staleness weights."""
    staleness_b: int = Field(4, ge=0)
    """b of the hinge staleness weight."""
    max_staleness: int = Field(0, ge=0)
    """Drop pushes more than this many versions old (the worker restarts from the current
    parameters); 0 accepts every push."""
    dylu: bool = True
    """Dynamic local updates: the coordinator measures each worker's steps per second and gives it
    floor(v / v_max * inner_steps) steps (at least 1) for its next round."""
    grace_s: float = Field(0.0, ge=0.0)
    """Grace period: pushes arriving within grace_s of the first one are applied one by one and
    all those workers restart from the same parameters; 0 answers every push at once."""

    @model_validator(mode="after")
    def _activation_in_range(self) -> AsyncConfig:
        if self.buffer and self.activation * self.buffer > 1.0:
            raise ValueError(f"activation={self.activation} must not exceed 1/buffer = {1.0 / self.buffer:.4g}")
        return self


class GossipConfig(Frozen):
    kind: Literal["gossip"] = "gossip"
    """Decentralised gossip averaging: every H steps each worker mixes its parameters with a few
    peers' over direct ZeroMQ links (dilo/transport/zmq_p2p.py); no central parameter state."""
    inner_steps: int = Field(50, gt=0)
    """H: inner steps between two gossip rounds."""
    topology: Literal[
        "ring", "exponential", "one_peer_exponential", "random_pairs", "random_graph", "fully_connected"
    ] = "ring"
    """Who mixes with whom, rebuilt from the sorted member list every round: ring (1/3 self, left,
    right), exponential (peers 2^j away), one_peer_exponential (one peer 2^(k mod log n) away at round
    k), random_pairs (a random matching per round), random_graph (each node links to a random peer each
    round; irregular degrees, Metropolis-Hastings weights), fully_connected (1/n)."""
    push_sum: bool = False
    """Push-sum: send (x, w) shares to out-peers and train the de-biased x / w; survives directed and
    time-varying graphs (a lost message loses its share of the mass)."""
    peer_timeout_s: float = Field(10.0, gt=0.0)
    """A peer whose message has not arrived after this long is skipped for the round, and the
    current parameters of another live member are pulled in its place."""
    variance_correction: bool = False
    """Rescale each merged layer around its mean to the (weighted) mean of the inputs' variances,
    so averaging uncorrelated models does not shrink the weights (Tian et al., arXiv:2404.04616)."""
    conservative: float = Field(0.0, ge=0.0, lt=1.0)
    """Blend c of the worker's own layer (and its variance) into the corrected merge."""
    final_merge: bool = False
    """After the last round, average the parameters of all live workers once (fully connected)."""
    consensus_step: float = Field(1.0, gt=0.0, le=1.0)
    """Compressed gossip (codec.kind != "none", CHOCO-gossip): x <- x + step * sum_j w_j (x^_j - x^_self),
    where x^ are the public estimates that the compressed differences build up; lower it for
    aggressive codecs."""
    independent_init: bool = False
    """Initialise each worker's model from its own seed (seed + 1000 * island), as in independently
    trained models; otherwise every worker starts from the same parameters."""

    @model_validator(mode="after")
    def _push_sum_plain(self) -> GossipConfig:
        if self.push_sum and self.variance_correction:
            raise ValueError("variance_correction rescales parameters, which breaks push-sum's mass; use one")
        return self


OuterConfig = Annotated[
    DiLoCoConfig | FedAvgConfig | DDPConfig | AsyncConfig | GossipConfig, Field(discriminator="kind")
]


# ---------------------------------------------------------------------------------------------
# codec, transport, logging, checkpoints


CodecKind = Literal["none", "fp16", "bf16", "int8", "int4", "topk", "randomk", "sign", "powersgd"]


class CodecSpec(Frozen):
    kind: CodecKind = "none"
    """How pseudo-gradients are encoded on the wire: none (fp32), fp16, bf16, int8 / int4
    (blockwise absmax), topk, randomk (shared mask per round), sign (1 bit + a scale per block),
    powersgd (rank-r factors)."""
    block: int = Field(128, gt=0)
    """int8 / int4 / sign: values per scale."""
    stochastic: bool = False
    """int8 / int4: stochastic rounding (unbiased) with a per-worker random stream."""
    fraction: float = Field(0.01, gt=0.0, le=1.0)
    """topk / randomk: share of the values sent."""
    chunk: int = Field(0, ge=0, le=65536)
    """topk: 0 picks the top values of the whole vector (int32 indices); > 0 picks them per chunk of
    this many values (16-bit indices within the chunk)."""
    rank: int = Field(4, gt=0)
    """powersgd: rank r of the factors."""
    min_compression: float = Field(2.0, ge=1.0)
    """powersgd: a matrix is factorised only if (n + m) * r * min_compression < n * m; smaller
    tensors go uncompressed."""
    error_feedback: bool | None = None
    """Keep what was not sent and add it to the next round's pseudo-gradient. Default: on for
    topk, randomk, sign and powersgd, off otherwise."""

    @property
    def feedback(self) -> bool:
        if self.error_feedback is not None:
            return self.error_feedback
        return self.kind in ("topk", "randomk", "sign", "powersgd")


class CodecOverride(CodecSpec):
    pattern: str
    """Regular expression matched (re.search) against parameter names, e.g. "emb|ln|norm"; the
    first matching override decides a parameter's codec."""

    @model_validator(mode="after")
    def _valid_regex(self) -> CodecOverride:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        if self.kind == "powersgd":
            raise ValueError("powersgd cannot be a per-parameter override; set it as codec.kind")
        return self


class CodecConfig(CodecSpec):
    overrides: list[CodecOverride] = Field(default_factory=list)
    """Per-parameter codecs, e.g. [[codec.overrides]] pattern = "emb|ln" kind = "fp16"."""


class TransportConfig(Frozen):
    kind: Literal["torch"] = "torch"
    """torch.distributed collectives between workers."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto picks nccl when CUDA is available, gloo otherwise."""
    bucket_mb: float = Field(32.0, gt=0.0)
    """Size of the flat fp32 buckets that are all-reduced together."""
    timeout_s: float = Field(300.0, gt=0.0)
    """A collective that has not finished after this many seconds fails the round."""
    island_ranks: Annotated[int, Field(ge=1)] | Literal["node"] = 1
    """Ranks per island (static worlds). 1: every rank is a worker. N > 1: each N consecutive ranks
    (torchrun numbers a node's ranks consecutively) train one replica with data parallelism inside
    and count as one worker in the outer step; "node": one island per node (LOCAL_WORLD_SIZE
    ranks). With membership.kind = "coordinator" the ranks of one torchrun launch always form one
    island, which joins as one worker."""


class MembershipConfig(Frozen):
    kind: Literal["static", "coordinator"] = "static"
    """static: the world is fixed by the launcher (torchrun, Slurm, dilo run: RANK, WORLD_SIZE);
    coordinator: workers join and leave a `dilo coordinator` over ZeroMQ (elastic)."""
    address: str = "tcp://127.0.0.1:29600"
    """coordinator: where workers connect (tcp://HOST:PORT)."""
    worker_id: str = ""
    """coordinator: this worker's stable id (re-joins after a restart keep it); empty: DILO_WORKER_ID
    from the environment, else host-pid."""
    heartbeat_s: float = Field(1.0, gt=0.0)
    """Seconds between two heartbeats of a worker."""
    heartbeat_timeout_s: float = Field(10.0, gt=0.0)
    """A worker silent for this long leaves the view."""
    round_timeout_s: float = Field(120.0, gt=0.0)
    """A synchronous round closes at this deadline with whoever pushed (at least min_workers)."""
    min_workers: int = Field(1, gt=0)
    """Fewest pushes that may close a round at its deadline."""
    start_quorum: int = Field(0, ge=0)
    """The first round waits for this many pushes (or round_timeout_s), so a run does not start with
    whichever worker was up first; `dilo run` sets it to --workers."""
    request_timeout_s: float = Field(30.0, gt=0.0)
    """A worker waits this long for any reply before reconnecting (with backoff). A push waits for
    its RESULT at most round_timeout_s + request_timeout_s (async: plus grace_s), then re-joins."""
    rate_limit: float = Field(200.0, ge=0.0)
    """Messages per second one connection may send to a coordinator or a gossip peer, in bursts of
    up to twice that; the rest are dropped unread and unanswered, and counted (0: no limit). A
    worker sends about one heartbeat per heartbeat_s and a few requests per round."""
    secret_file: str = ""
    """File holding the shared HMAC secret (else DILO_SECRET from the environment; else no
    authentication)."""
    curve_dir: str = ""
    """Directory with CURVE keys from `dilo keys` (server.key / server.pub / client.key): encrypts
    the ZeroMQ traffic. Empty: no encryption."""
    p2p_bind: str = "tcp://127.0.0.1:0"
    """gossip: where this worker listens for its peers (tcp://HOST:PORT; port 0 picks a free one)."""
    p2p_advertise: str = ""
    """gossip: the address peers reach this worker at; empty: derived from p2p_bind."""
    peers: list[str] = Field(default_factory=list)
    """gossip with membership.kind = "static": every worker's listening address, by rank (the
    coordinator is then not needed; worker `rank` binds peers[rank])."""

    @model_validator(mode="after")
    def _address(self) -> MembershipConfig:
        if not re.fullmatch(r"tcp://[^:\s]+:\d{1,5}", self.address):
            raise ValueError(f"address={self.address!r} must look like tcp://HOST:PORT")
        for key, value in (("p2p_bind", self.p2p_bind), ("p2p_advertise", self.p2p_advertise), ("peers", None)):
            values = self.peers if key == "peers" else [value] if value else []
            for v in values:
                if not re.fullmatch(r"tcp://[^:\s]+:\d{1,5}", v):
                    raise ValueError(f"{key}: {v!r} must look like tcp://HOST:PORT")
        if self.heartbeat_timeout_s <= self.heartbeat_s:
            raise ValueError("heartbeat_timeout_s must exceed heartbeat_s")
        return self


class CoordinatorConfig(Frozen):
    bind: str = "tcp://0.0.0.0:29600"
    """Where `dilo coordinator` listens (tcp://HOST:PORT; port 0 picks a free one)."""
    advertise: str = ""
    """The address printed for workers to connect to; empty: derived from bind."""
    checkpoint_every: int = Field(1, ge=0)
    """Checkpoint the global state every this many versions (0: only on SIGTERM)."""


class HeterogeneityConfig(Frozen):
    slowdown: list[float] = Field(default_factory=list)
    """Per island (worker rank or DILO_ISLAND): make that worker this many times slower, by
    sleeping (factor - 1) times each measured inner step (`dilo sim`: scales its virtual step
    time). Islands past the end of the list run at full speed. E.g. [1, 1, 2, 4]."""
    max_steps: list[int] = Field(default_factory=list)
    """Per island: the most inner steps that worker runs before it leaves (0 or past the end of
    the list: no limit of its own)."""

    @model_validator(mode="after")
    def _positive(self) -> HeterogeneityConfig:
        if any(not f >= 1.0 for f in self.slowdown):
            raise ValueError(f"slowdown={self.slowdown}: every factor must be >= 1 (1 = full speed)")
        if any(n < 0 for n in self.max_steps):
            raise ValueError(f"max_steps={self.max_steps}: every budget must be >= 0 (0 = no limit)")
        return self

    def slowdown_of(self, island: int) -> float:
        return self.slowdown[island] if island < len(self.slowdown) else 1.0

    def max_steps_of(self, island: int) -> int:
        return self.max_steps[island] if island < len(self.max_steps) else 0


class SimEvent(Frozen):
    at_s: float = Field(ge=0.0)
    """Virtual time of the event, in seconds."""
    worker: int = Field(ge=0)
    """Virtual worker index (0 .. workers-1)."""
    action: Literal["join", "leave", "crash"]
    """join: the worker starts here (it is absent before); leave: it finishes its round and leaves;
    crash: it stops dead, without a word (the coordinator drops it after heartbeat_timeout_s)."""


class SimConfig(Frozen):
    step_s: float = Field(0.1, gt=0.0)
    """Virtual seconds of one inner step of a full-speed worker."""
    jitter: float = Field(0.0, ge=0.0, le=2.0)
    """Log-normal sigma of per-step time noise (0: every step takes exactly step_s * slowdown)."""
    bandwidth_mbps: float = Field(1000.0, gt=0.0)
    """Link speed of every worker, megabits per second, for the virtual cost of messages."""
    latency_ms: float = Field(0.0, ge=0.0)
    """One-way latency added to every exchange."""
    events: list[SimEvent] = Field(default_factory=list)
    """Join, leave and crash schedule; needs membership.kind = "coordinator"."""


class LogConfig(Frozen):
    eval_every: int = Field(1, ge=0)
    """Evaluate validation loss every this many rounds (DDP: every inner_steps-equivalent of
    50 steps); 0 evaluates only at the end."""
    eval_batches: int = Field(16, gt=0)
    """Validation batches, split across the workers."""
    progress: bool = True
    """Show a live progress bar on worker 0."""
    plot: bool = True
    """Write loss plots (PNG) next to the logs at the end of the run."""


class CheckpointConfig(Frozen):
    every: int = Field(0, ge=0)
    """Save a checkpoint every this many rounds; 0 saves only at the end and on Ctrl+C."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir/checkpoints."""


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
    data: DataConfig = Field(default_factory=DataConfig)
    inner: InnerConfig = Field(default_factory=InnerConfig)
    outer: OuterConfig = Field(default_factory=DiLoCoConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
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
            if self.outer.push_sum or self.outer.variance_correction:
                raise ValueError(
                    "compressed gossip (codec.kind != 'none') mixes public estimates; it cannot be combined with "
                    "outer.push_sum or outer.variance_correction"
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

    def fingerprint(self) -> str:
        """Hash of everything that must agree between workers (not logging or resume flags)."""
        d = self.model_dump(
            mode="json", exclude={"log", "checkpoint", "out_dir", "workers", "membership", "coordinator", "sim"}
        )
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# loading


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ["--outer.lr=0.5", "--inner.precision", "bf16"] into a nested dict.

    Values are read as TOML literals when they parse (numbers, booleans, arrays, quoted
    strings) and as plain strings otherwise.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} has no value; write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        i += 1
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad override key {key!r}; write --section.key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier override of --{p}")
        node[leaf] = _literal(value)
    return out


def _literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


_DEFAULT_KIND = {"model": "gpt", "outer": "diloco"}


def load(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML file (or start from defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        for section in ("model", "outer"):
            # switching a section to another kind drops the file's settings of the old kind
            new_kind = extra.get(section, {}).get("kind") if isinstance(extra.get(section), dict) else None
            old = raw.get(section)
            if new_kind is not None and isinstance(old, dict) and old.get("kind", _DEFAULT_KIND[section]) != new_kind:
                raw = {**raw, section: {}}
        raw = _merge(raw, extra)
    return from_dict(raw, source=str(path) if path else "config")


def from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def _describe(err: Any) -> str:
    cls, parts = _resolve([str(x) for x in err["loc"]])
    key = ".".join(parts)
    if err["type"] == "extra_forbidden":
        parent, _ = _resolve([str(x) for x in err["loc"]][:-1])
        hint = f"; allowed keys here: {', '.join(sorted(parent.model_fields))}" if parent else ""
        return f"unknown key {key!r}{hint}"
    shown = err.get("input")
    shown_text = "" if isinstance(shown, dict) or err["type"] == "missing" else f" (got {shown!r})"
    return f"{key or '(top level)'}: {err['msg']}{shown_text}"


def _union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """For an Annotated discriminated union, map tag -> model class."""
    members: dict[str, type[BaseModel]] = {}
    args = typing.get_args(annotation)
    inner = args[0] if args and typing.get_origin(annotation) is Annotated else annotation
    for cls in typing.get_args(inner):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and "kind" in cls.model_fields:
            members[cls.model_fields["kind"].default] = cls
    return members


def _resolve(loc: list[str]) -> tuple[type[BaseModel] | None, list[str]]:
    """Follow a pydantic error location through the config tree.

    Returns the model class the location ends in (None for a leaf) and the location as the
    user writes it, without the union tags pydantic inserts ("outer.diloco.lr" -> "outer.lr").
    """
    cls: type[BaseModel] | None = RunConfig
    parts: list[str] = []
    i = 0
    while i < len(loc):
        parts.append(loc[i])
        field = cls.model_fields.get(loc[i]) if cls is not None else None
        if field is None:
            cls = None
            i += 1
            continue
        members = _union_members(field.annotation)
        if members:
            cls = members.get(loc[i + 1]) if i + 1 < len(loc) else None
            i += 2
            continue
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        i += 1
    return cls, parts


def schema() -> dict[str, Any]:
    return RunConfig.model_json_schema()
