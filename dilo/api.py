"""dilo as a library: your model, your data, your loop; dilo's outer step.

    import dilo

    cfg = dilo.load("configs/diloco-int8.toml")    # or dilo.RunConfig(...), with overrides
    with dilo.init(cfg) as world:                   # static (torchrun / env), coordinator or gossip
        outer = dilo.wrap(model, inner_optimizer, world)    # cfg.outer and cfg.codec by default
        outer.start()                               # broadcast / join the coordinator / find the peers
        for x, y in loader:
            loss = model(x, y); loss.backward()
            inner_optimizer.step(); inner_optimizer.zero_grad()
            report = outer.step(loss=loss.item())   # counts the step; syncs when a round is due
            if outer.done:
                break

`dilo run` and `dilo worker` train through exactly this API (dilo/train.py).

Gradients: strategies that average gradients every step (outer.kind = "ddp", islands of several
ranks) do it just before the inner optimizer's step, through a hook `wrap` registers on it. A loop
that clips gradients calls `outer.sync_grads()` after backward and before clipping (it is a no-op
for every other strategy, and the hook then knows the step is synced).

Checkpoints: `outer.state_dict()` holds the model's parameters and buffers, the inner optimizer,
the strategy (anchor, outer momentum, error feedback) and the step and round counters;
`load_state_dict` before `start()` resumes from it bit for bit (the data position and RNG are the
loop's own to save).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dilo.adapters import shared_view
from dilo.config import CodecConfig, DDPConfig, DiLoCoConfig, FedAvgConfig, GossipConfig, OuterConfig, RunConfig, load
from dilo.errors import DiloError, TransportError
from dilo.model import params_of
from dilo.outer.base import Failure, Joined, Strategy, SyncReport, Tail, tensor_digest
from dilo.outer.build import build_strategy
from dilo.outer.ddp import DDP
from dilo.shard import local, reshard_optimizer_state
from dilo.worlds import ElasticWorld, GossipWorld, Placement, StaticWorld, World


def init(
    cfg: RunConfig | str | Path,
    *,
    overrides: list[str] | None = None,
    worker_id: str | None = None,
    placement: Placement | None = None,
) -> World:
    """The world this process lives in, from the config:

    - outer.kind = "gossip": a gossip world (peers from a tracker coordinator or membership.peers);
    - membership.kind = "coordinator": an elastic worker of a `dilo coordinator` (a torchrun launch
      of several ranks is one island that joins as one worker);
    - otherwise a static world from the launcher's environment (torchrun, Slurm, `dilo run`:
      RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; without them, a world of one).

    cfg: a RunConfig or a TOML path (with `overrides` like ["--outer.lr=0.5"]). placement: this
    rank's place instead of the environment's (tests run workers as threads)."""
    if not isinstance(cfg, RunConfig):
        cfg = load(cfg, overrides)
    elif overrides:
        raise DiloError("overrides apply to a config file: pass the file's path, or edit the RunConfig")
    placement = placement or Placement.from_env()
    if isinstance(cfg.outer, GossipConfig):
        if cfg.membership.kind == "coordinator":
            return GossipWorld(cfg, worker_id)
        return GossipWorld(cfg, worker_id, rank=placement.rank)
    if cfg.membership.kind == "coordinator":
        return ElasticWorld(cfg, worker_id, island=placement)
    return StaticWorld(cfg, placement)


def wrap(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    world: World,
    outer: OuterConfig | None = None,
    *,
    codec: CodecConfig | None = None,
) -> Outer:
    """dilo's outer loop around the caller's model and inner optimizer, in `world`.

    outer / codec: instead of the world's cfg.outer / cfg.codec (checked against the rest of the
    config; the outer kind must be one the world serves)."""
    cfg = world.cfg
    if outer is not None or codec is not None:
        update: dict[str, Any] = {}
        if outer is not None:
            if outer.kind != cfg.outer.kind and "gossip" in (outer.kind, cfg.outer.kind):
                raise DiloError(
                    f"outer.kind={outer.kind!r} needs another world than the one built for {cfg.outer.kind!r}: "
                    "pass the same outer config to dilo.init"
                )
            update["outer"] = outer
        if codec is not None:
            update["codec"] = codec
        cfg = RunConfig.model_validate({**cfg.model_dump(), **{k: v.model_dump() for k, v in update.items()}})
    return Outer(model, optimizer, world, cfg)


@dataclass(frozen=True)
class RoundReport:
    """One round as this worker saw it: what the loop trained, and what the outer step did."""

    round: int
    """Rounds this worker has finished, this one included."""
    step: int
    """Inner steps this worker has taken in all."""
    steps: int
    """Inner steps in this round."""
    tokens: int
    """Tokens this worker (its island) trained on in this round."""
    loss: float | None
    """Mean of the losses passed to `step(loss=...)` in this round (None if none were)."""
    inner_s: float
    """Seconds of inner compute in this round (gradient syncs left out)."""
    comm_s: float
    """Seconds spent averaging gradients inside the steps (DDP, islands)."""
    sync_s: float
    """Seconds of the outer step."""
    sync: SyncReport = field(repr=False)
    """The strategy's report: committed, participants, bytes, failure, anchor hash, ..."""

    @property
    def committed(self) -> bool:
        return self.sync.committed

    @property
    def failure(self) -> Failure | None:
        return self.sync.failure


@dataclass
class _Round:
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    inner_s: float = 0.0
    comm_s: float = 0.0


class Outer:
    """The outer loop around a model and its inner optimizer (build it with `dilo.wrap`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World, cfg: RunConfig) -> None:
        self.model = model
        self.optimizer = optimizer
        self.world = world
        self.cfg = cfg
        # the links are sized for what is exchanged (outer.local and frozen parameters stay home)
        links = world.links(shared_view(model, cfg.outer), cfg)
        self.strategy: Strategy = build_strategy(cfg, model, links)
        self.steps = 0
        """Inner steps counted so far (survives a resume)."""
        self.rounds = 0
        self.rounds_committed = 0
        self.joined: Joined | None = None
        """What `start()` found (None before)."""
        self._resumed = False
        self._done = False
        self._round = _Round()
        self._grads_synced = False
        self.comm_s = 0.0
        """Seconds spent averaging gradients inside steps, in all (DDP, islands)."""
        self._comm_at_mark = 0.0
        self._mark: float | None = None
        self._weighted = isinstance(cfg.outer, DiLoCoConfig | FedAvgConfig) and cfg.outer.weighting == "tokens"
        self._prox_mu = cfg.outer.prox_mu if isinstance(cfg.outer, DiLoCoConfig | FedAvgConfig) else 0.0
        self._budget = cfg.outer.round_seconds if isinstance(cfg.outer, DiLoCoConfig | FedAvgConfig) else 0.0
        if self._budget and world.island_ranks > 1:
            raise DiloError(
                "outer.round_seconds is measured by each process, and the ranks of an island must end their rounds "
                "together: run islands of one rank with it, or set outer.round_seconds=0"
            )
        self._prox: list[tuple[torch.Tensor, torch.Tensor]] = []
        """FedProx: (parameter, where the round started) for every exchanged parameter."""
        if isinstance(cfg.outer, DDPConfig) and cfg.outer.vote != "none":  # Distributed Lion
            from dilo.lion import Lion

            if not isinstance(optimizer, Lion) or not isinstance(self.strategy, DDP):
                raise DiloError("outer.vote (Distributed Lion) needs dilo.lion.Lion as the inner optimizer")
            optimizer.vote = self.strategy.vote
        self._hook = optimizer.register_step_pre_hook(self._before_inner_step)

    # ------------------------------------------------------------------------------------------ start

    def start(self) -> Joined:
        """Agree on the starting point with the other workers: the static world's rank 0 broadcasts
        (unless resuming), an elastic worker joins the coordinator and takes its state, a gossip worker
        finds its peers. Called by the first inner optimizer step if the loop did not call it."""
        if self.joined is not None:
            return self.joined
        joined = self.strategy.start(self.model, resumed=self._resumed)
        # what this worker starts from, hashed from its own model (not the coordinator's claim)
        joined = dataclasses.replace(joined, anchor_hash=tensor_digest(params_of(self.model)))
        self.world.adopt(joined, resumed=self._resumed)
        self.joined = joined
        self._round_starts()
        self._set_mark()
        return joined

    @torch.no_grad()
    def _round_starts(self) -> None:
        """FedProx: remember where this round starts (the anchor), in the parameters' own layout."""
        if self._prox_mu <= 0:
            return
        if not self._prox:
            shared = params_of(shared_view(self.model, self.cfg.outer))
            self._prox = [(p, p.detach().clone()) for p in shared]
        else:
            for p, x0 in self._prox:
                x0.copy_(p.detach())

    @property
    def started(self) -> bool:
        return self.joined is not None

    # ------------------------------------------------------------------------------------------ steps

    def sync_grads(self) -> None:
        """Average the gradients where the strategy does so every step (DDP, islands of several
        ranks); a no-op otherwise. Call it after backward and before clipping; otherwise the hook on
        the inner optimizer calls it just before the step."""
        if self._grads_synced:
            return
        if self.joined is None:
            self.start()
        clock = self.world.clock
        t0 = clock.now()
        self.strategy.reduce_grads(self.model)
        spent = clock.now() - t0
        self.comm_s += spent
        self._round.comm_s += spent
        self._grads_synced = True
        with torch.no_grad():  # FedProx: the gradient of mu/2 ||x - x_0||^2, before any clipping
            for p, x0 in self._prox:
                if p.grad is not None:
                    p.grad.add_(p.detach() - x0, alpha=self._prox_mu)

    def _before_inner_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.sync_grads()

    def step(
        self,
        *,
        loss: float | None = None,
        tokens: int = 0,
        inner_s: float | None = None,
        last: bool = False,
        stop: bool = False,
    ) -> RoundReport | None:
        """Count one inner step (call it after the inner optimizer's step); at the end of a round run
        the outer step and return its report, else None.

        loss: this step's training loss (for the round's mean). tokens: tokens trained on in this step
        (outer.weighting = "tokens" weights each worker's update by them; the round's step count
        when none are given). inner_s: this step's compute seconds, when the loop measures them
        itself (default: the time since the previous call, gradient syncs left out). last: end the
        round now, the loop is finishing. stop: ask every worker to stop after this round (static
        worlds stop together; an elastic worker leaves)."""
        if self.joined is None:
            self.start()
        clock = self.world.clock
        now = clock.now()
        r = self._round
        if inner_s is None:
            mark = self._mark if self._mark is not None else now
            inner_s = max(0.0, now - mark - (self.comm_s - self._comm_at_mark))
        r.steps += 1
        r.tokens += tokens
        r.inner_s += inner_s
        if loss is not None:
            r.losses.append(float(loss))
        self.steps += 1
        self._grads_synced = False
        due = self.strategy.due(self.steps - 1)  # every step: async and gossip follow the count
        # outer.round_seconds: the round's compute budget is spent; its remaining steps are skipped
        cut = not due and self._budget > 0 and r.inner_s >= self._budget
        skipped = max(0, self.strategy.round_steps - r.steps) if cut else 0
        last = last or self.steps + skipped >= self.world.step_limit
        if not (due or last or cut):
            self._set_mark()
            return None
        weight = float(r.tokens or r.steps) if self._weighted else 1.0
        tail = Tail(
            weight=weight, contributes=True, stop=stop, tokens=r.tokens, steps=r.steps, inner_s=r.inner_s, last=last
        )
        t0 = clock.now()
        report = self.strategy.sync(self.model, tail=tail)
        sync_s = clock.now() - t0
        self.steps += skipped  # the step count moves on to the round's end, as on every other worker
        self.rounds += 1
        self.rounds_committed += int(report.committed)
        self._done = last or report.done
        out = RoundReport(
            round=self.rounds,
            step=self.steps,
            steps=r.steps,
            tokens=r.tokens,
            loss=sum(r.losses) / len(r.losses) if r.losses else None,
            inner_s=r.inner_s,
            comm_s=r.comm_s,
            sync_s=sync_s,
            sync=report,
        )
        self._round = _Round()
        self._round_starts()
        if report.failure is Failure.TRANSPORT and not self.world.elastic and self.world.size > 1:
            raise TransportError(
                f"round {self.rounds}: {report.reason}; a static world cannot continue without the lost worker: "
                "restart from the last checkpoint"
            )
        self._set_mark()
        return out

    def _set_mark(self) -> None:
        self._mark, self._comm_at_mark = self.world.clock.now(), self.comm_s

    @property
    def done(self) -> bool:
        """The run is over for this worker: its step limit is reached, or (async) the world's budget."""
        return self._done

    @property
    def round_steps(self) -> int:
        """Inner steps in the current round."""
        return self.strategy.round_steps

    def describe(self) -> list[str]:
        """What the outer step sends, per parameter group."""
        return self.strategy.describe()

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this worker bit for bit, but its data position and RNG."""
        return {
            "params": [p.detach() for p in params_of(self.model)],
            "buffers": dict(self.model.named_buffers()),
            "inner": {"optimizer": self.optimizer.state_dict()},
            "outer": self.strategy.state_dict(),
            "progress": {"steps": self.steps, "rounds": self.rounds, "rounds_committed": self.rounds_committed},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; call it before `start()` (which then does not overwrite the
        loaded parameters in a static world; an elastic worker still takes the coordinator's)."""
        if self.joined is not None:
            raise DiloError("load_state_dict must come before outer.start() and the first step")
        with torch.no_grad():
            params = params_of(self.model)
            if len(params) != len(state["params"]):
                raise DiloError(
                    f"the checkpoint holds {len(state['params'])} parameters, the model {len(params)}: another model?"
                )
            for p, v in zip(params, state["params"]):
                mine, v = local(p), local(v)  # a sharded island's checkpoint: this rank's shards
                if mine.shape != v.shape:
                    raise DiloError(
                        f"the checkpoint holds a parameter of shape {tuple(v.shape)} where this rank has "
                        f"{tuple(mine.shape)}: resume with the island layout it was written with "
                        "(transport.island_ranks, transport.island_shard)"
                    )
                mine.copy_(v)
            buffers = dict(self.model.named_buffers())
            for k, v in state["buffers"].items():
                buffers[k].copy_(v)
        self.optimizer.load_state_dict(state["inner"]["optimizer"])
        reshard_optimizer_state(self.optimizer)
        self.strategy.load_state_dict(state["outer"])
        progress = state["progress"]
        self.steps, self.rounds = int(progress["steps"]), int(progress["rounds"])
        self.rounds_committed = int(progress["rounds_committed"])
        self._resumed = True

    def close(self) -> None:
        """Remove the hook from the inner optimizer (the world closes the links: `world.close`)."""
        self._hook.remove()
