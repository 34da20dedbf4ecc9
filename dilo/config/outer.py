"""The outer strategies, one config per `outer.kind`, and their discriminated union `OuterConfig`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from typing_extensions import Self

from dilo.config.base import Frozen


class KeepsLocal(Frozen):
    local: str = ""
    """Regular expression (re.search on parameter names) of trainable parameters that never leave
    the worker: not averaged, not sent, e.g. "lora_B" (FedSA-LoRA: the B matrices stay personal).
    Empty: every trainable parameter is exchanged."""

    @field_validator("local")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{value!r} is not a valid regular expression: {e}") from None
        return value


class OuterOptimizer(Frozen):
    """outer.optimizer and its arguments (DiLoCo, FedAvg, async local SGD)."""

    optimizer: str = "sgd"
    """The outer optimizer: sgd (the only one outer.momentum / outer.nesterov apply to), fedadam,
    fedyogi, fedadagrad (Reddi et al., arXiv:2003.00295: no bias correction, v starts at tau^2;
    optimizer_args betas = [0.9, 0.99], tau = 1e-3), or torch.optim.<Name> (any torch optimizer,
    optimizer_args as its keyword arguments, e.g. torch.optim.Adam with eps = 0.1). DiLoCo / FedAvg:
    it steps the anchor with the round's mean pseudo-gradient; async local SGD (update = nesterov or
    fedbuff): each staleness-weighted push, or each buffer's mean. Its state is checkpointed and
    (DiLoCo / FedAvg) handed to joiners with the coordinator's parameters."""
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of outer.optimizer besides lr, e.g. {betas = [0.9, 0.99], tau = 1e-3}."""

    @model_validator(mode="after")
    def _check_optimizer(self) -> Self:
        if self.optimizer == "sgd":  # its settings are this section's fields, checked above: no torch here
            if self.optimizer_args:
                raise ValueError("outer.optimizer_args are for the other outer optimizers; sgd takes outer.momentum")
            if getattr(self, "nesterov", False) and not getattr(self, "momentum", 0.0):
                raise ValueError("outer.nesterov = true needs outer.momentum > 0 (outer.nesterov = false: plain SGD)")
            return self
        from dilo.outer.outer_opt import check_outer_optimizer  # builds it on a dummy parameter

        check_outer_optimizer(self)
        return self


class AnchorRounds(KeepsLocal, OuterOptimizer):
    """What DiLoCo and FedAvg share: an fp32 anchor stepped by an outer optimizer every round."""

    prox_mu: float = Field(0.0, ge=0.0)
    """FedProx (Li et al., arXiv:1812.06127): mu of the proximal term mu/2 ||x - x_0||^2 added to
    the inner objective, x_0 the parameters the round started from (the anchor), so that workers
    on different data drift less; its gradient mu (x - x_0) is added to every inner step's. 0: off."""
    round_seconds: float = Field(0.0, ge=0.0)
    """A time budget per round (variable local work): a worker ends its round after inner_steps
    steps or as soon as the round's inner steps have taken this many seconds of compute (exchange,
    evaluation and checkpoints left out), whichever comes first, so that a slow worker does less
    work instead of holding everyone up. Its step count moves on to the round's end, so every
    worker runs the same rounds and learning-rate schedule. With weighting = "tokens" each update
    weighs by the work done. Islands of one rank. 0: every round runs inner_steps steps."""
    offload: bool = False
    """Keep the outer step's fp32 anchor, outer momentum and pseudo-gradient in host memory
    (pinned) instead of on the GPU: 2-3 fp32 copies of the parameters (of a sharded island's
    shard) less GPU memory per rank, for one device-to-host copy of the parameters and one
    host-to-device copy of the new anchor per round. Static worlds; on a CPU they live in host
    memory anyway, and a sharded island behind a coordinator keeps them there on its lead."""


class DiLoCoConfig(AnchorRounds):
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
    overlap: bool = False
    """One-step-delayed outer step: the exchange of round t runs in the background while round
    t + 1 trains; its outer step is applied at the end of round t + 1, and that round's local
    progress is moved onto the new anchor (docs/ALGORITHMS.md). Static worlds (Gloo, NCCL) and
    the coordinator (the push runs on a background thread)."""
    fragments: int = Field(1, ge=1)
    """Streaming DiLoCo (Douillard et al., arXiv:2501.18512): P fragments of whole transformer
    blocks, synced on a staggered schedule: one fragment every inner_steps / P steps, each one
    every inner_steps. 1: the whole model at once. Static worlds (Gloo, NCCL)."""
    fragment_pattern: Literal["strided", "sequential"] = "strided"
    """Which blocks make a fragment: strided (fragment p holds blocks p, p + P, ...; the paper's
    choice) or sequential (consecutive blocks)."""
    fragment_delay: int = Field(0, ge=0)
    """tau: inner steps a fragment's exchange runs in the background before its outer step is
    applied (the paper uses 1 to 5). 0: applied in the step it is sent. Below inner_steps / P."""
    mixing: float = Field(0.5, ge=0.0, le=1.0)
    """alpha: after its outer step a fragment becomes alpha * local + (1 - alpha) * global, so
    the tau steps trained meanwhile are half kept at 0.5; 0 keeps only the global value."""

    @property
    def streaming(self) -> bool:
        """Streaming DiLoCo is on: several fragments, or a delayed outer step."""
        return self.fragments > 1 or self.fragment_delay > 0

    @model_validator(mode="after")
    def _check_streaming(self) -> DiLoCoConfig:
        if not self.streaming:
            return self
        if self.round_seconds:
            raise ValueError(
                "Streaming DiLoCo syncs its fragments on a fixed step schedule, which outer.round_seconds would cut "
                "short: set outer.round_seconds=0, or outer.fragments=1 and outer.fragment_delay=0"
            )
        if self.offload:
            raise ValueError(
                "outer.offload keeps DiLoCo's anchor in host memory; Streaming DiLoCo keeps its fragments on the "
                "device: set outer.offload=false, or outer.fragments=1 and outer.fragment_delay=0"
            )
        if self.overlap:
            raise ValueError(
                "outer.overlap and Streaming DiLoCo (outer.fragments / outer.fragment_delay) both hide the "
                "exchange behind compute: choose one"
            )
        if self.inner_steps % self.fragments:
            raise ValueError(
                f"outer.inner_steps={self.inner_steps} must be a multiple of outer.fragments={self.fragments}: "
                "one fragment syncs every inner_steps / fragments steps"
            )
        period = self.inner_steps // self.fragments
        if self.fragment_delay >= period:
            raise ValueError(
                f"outer.fragment_delay={self.fragment_delay} must be below inner_steps / fragments = {period}: "
                "a fragment's outer step lands before the next fragment is sent"
            )
        return self


class FedAvgConfig(AnchorRounds):
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
    vote: Literal["none", "majority", "mean"] = "none"
    """Distributed Lion (Liu et al., arXiv:2311.00537), with inner.optimizer = "lion": instead of
    averaging gradients, every step each worker computes its own Lion update from its own gradient
    and momentum and sends only its sign (1 bit per parameter, all-gathered); every worker applies
    the majority vote (the sign of the sum; a tie moves nothing) or the mean of the signs. none:
    plain DDP."""


class AsyncConfig(KeepsLocal, OuterOptimizer):
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
        if self.optimizer != "sgd" and self.update not in ("nesterov", "fedbuff"):
            raise ValueError(
                f"outer.optimizer={self.optimizer!r} steps async local SGD's pushes (update = 'nesterov') or buffers "
                f"(update = 'fedbuff'); update={self.update!r} has its own step: choose one of those, or "
                "optimizer='sgd'"
            )
        if self.buffer and self.activation * self.buffer > 1.0:
            raise ValueError(f"activation={self.activation} must not exceed 1/buffer = {1.0 / self.buffer:.4g}")
        return self


class GossipConfig(KeepsLocal):
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

    nearest: int = Field(0, ge=0)
    """Robust mixing (after MoNNA, Farhadkhani et al., 2023): leave out of each mix the this-many
    received peers whose parameters are farthest from this worker's (the rest keep their weights,
    renormalised), so that a few wrong peers cannot pull it away. 0: mix every peer. Plain
    gossip (not with push_sum or a codec)."""

    @model_validator(mode="after")
    def _push_sum_plain(self) -> GossipConfig:
        if self.push_sum and self.variance_correction:
            raise ValueError("variance_correction rescales parameters, which breaks push-sum's mass; use one")
        if self.nearest and self.push_sum:
            raise ValueError("outer.nearest leaves peers out of a mix, which breaks push-sum's mass; use one")
        return self


OuterConfig = Annotated[
    DiLoCoConfig | FedAvgConfig | DDPConfig | AsyncConfig | GossipConfig, Field(discriminator="kind")
]
