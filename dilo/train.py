"""The worker loop, top to bottom.

    python -m dilo.train configs/quickstart.toml [--outer.lr=0.5 ...]

One process (or, in tests, one thread) is one worker. With membership.kind = "static" the
global world comes from the environment that torchrun, Slurm or `dilo run` sets (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT; without it the worker trains alone); with "coordinator"
the worker joins a `dilo coordinator` and may come and go (dilo/world.py).

Each round: `H` inner steps on the worker's own island, then the outer strategy's sync
(DiLoCo / FedAvg: one exchange of pseudo-gradients; DDP: gradients were exchanged every step).
Validation loss is evaluated on the anchor, split across workers. Checkpoints are written at
round boundaries, where every worker's parameters equal the anchor.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from dilo import metrics
from dilo.config import GossipConfig, RunConfig, load
from dilo.data import load_island, load_validation, model_vocab_size
from dilo.errors import DiloError, TransportError
from dilo.inner import InnerLoop
from dilo.model import build_model, num_params
from dilo.outer.async_local import AsyncLocalSGD
from dilo.outer.base import Strategy, Tail, params_of
from dilo.outer.ddp import DDP
from dilo.state import load_worker_state, rounds_of, save_worker_state
from dilo.transport.base import ring_all_reduce_bytes
from dilo.world import ElasticWorld, GossipWorld, Placement, StaticWorld

log = logging.getLogger("dilo.train")


@dataclass
class Totals:
    """Counters that survive a resume."""

    step: int = 0
    round: int = 0
    tokens: int = 0
    global_tokens: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    inner_s: float = 0.0
    sync_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0
    rounds_committed: int = 0
    val_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def train(
    cfg: RunConfig,
    world: StaticWorld | ElasticWorld | GossipWorld | Placement | None = None,
    *,
    stop: threading.Event | None = None,
    max_rounds: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) training on this worker. Returns the run summary (identical on every worker).

    stop: when set (Ctrl+C, SIGTERM), all workers finish the current round, save a checkpoint
    and return. max_rounds: stop after this many rounds in this call (tests of resume).
    """
    stop = stop or threading.Event()
    if world is None:
        if isinstance(cfg.outer, GossipConfig):
            world = GossipWorld(cfg)
        elif cfg.membership.kind == "coordinator":
            world = ElasticWorld(cfg, island=Placement.from_env())  # a torchrun launch is one island
        else:
            world = StaticWorld(cfg, Placement.from_env())
    elif isinstance(world, Placement):
        world = GossipWorld(cfg, rank=world.rank) if isinstance(cfg.outer, GossipConfig) else StaticWorld(cfg, world)
    rank, size = world.rank, world.size  # this worker's (island's) number, and how many there are
    main = rank == 0 and world.local_rank == 0  # prints, plots and writes the summary
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    clock = world.clock  # wall time, or the simulator's virtual time
    setup_t0 = clock.now()

    # --------------------------------------------------------------------------------------
    # the model, this worker's island, the strategy
    device = world.device
    model = build_model(cfg.model, cfg.seed).to(device)
    vocab = model_vocab_size(model)  # ids >= vocab fail at load time, naming the file (dilo/data.py)
    island = _island_data(cfg, world, rank, size, vocab)
    val = load_validation(cfg.data, cfg.seed, cfg.log.eval_batches, vocab_size=vocab)
    val_batches = [_to(b, device) for b in world.validation_share(val)]
    inner = InnerLoop(model, cfg.inner, total_steps=cfg.steps)
    outer: Strategy = world.strategy(model)
    n_params = num_params(model)
    param_bytes = 4 * sum(p.numel() for p in params_of(model))
    totals = Totals()

    resume_round = world.agree_resume_round(ckpt_dir) if cfg.checkpoint.resume else -1
    if resume_round < 0 and cfg.checkpoint.resume and main:
        log.warning("resume requested but no complete checkpoint in %s: starting from scratch", ckpt_dir)
    if resume_round >= 0:
        _load_state(load_worker_state(ckpt_dir, resume_round, world.log_name), model, inner, outer, island, totals)
    if resume_round < 0 or world.elastic:
        # static: broadcast rank 0's parameters; elastic: join the coordinator; gossip: find the peers
        world.start(model, outer, resumed=resume_round >= 0)
        if world.rank != rank and resume_round < 0:  # the coordinator handed out another island
            rank = world.rank
            island = _island_data(cfg, world, rank, size, vocab)
    world.counter.sent, world.counter.recv = totals.bytes_sent, totals.bytes_recv
    if isinstance(outer, DDP):
        outer.mark_bytes()

    if resume_round < 0:
        totals.extra["initial_val_loss"] = world.evaluate(model, val_batches)
    sink = metrics.JsonlSink(run_dir / "logs" / f"{world.log_name}.jsonl", append=resume_round >= 0)
    sink.write(
        {
            "event": "resume" if resume_round >= 0 else "start",
            "rank": rank,
            "local_rank": world.local_rank,
            "island_ranks": world.island_ranks,
            "workers": size,
            "num_params": n_params,
            "fingerprint": cfg.fingerprint(),
            "step": totals.step,
            "val_loss": totals.extra.get("initial_val_loss"),
            "setup_s": clock.now() - setup_t0,
            "time": clock.now(),
            # elastic: the version and anchor hash this worker joined with (equal to the coordinator's)
            "joined": getattr(world, "joined", None),
            # which codec each parameter group uses and through which collective
            "exchange": outer.exchange.describe() if hasattr(outer, "exchange") else None,
            "config": cfg.model_dump(mode="json"),
        }
    )
    bar = metrics.Progress(cfg.steps, totals.step, enabled=cfg.log.progress and main, desc=f"{cfg.outer.kind} x{size}")

    # --------------------------------------------------------------------------------------
    # the loop
    comm = _CommTimer(clock)
    # DDP: gradients averaged over all workers; an island: over the island's ranks
    reduce_grads = getattr(outer, "reduce_grads", None)
    grad_hook = comm.wrap(reduce_grads) if reduce_grads is not None else None
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.inner.grad_accum  # this rank's
    island_tokens_per_step = tokens_per_step * world.island_ranks
    wall_t0 = clock.now() - totals.wall_s
    round_t0 = clock.now()
    round_loss, round_steps, round_inner_s, round_comm_s = 0.0, 0, 0.0, 0.0
    rounds_this_call = 0
    stopped = False
    limit = world.step_limit  # async: the coordinator says when the world's budget is spent
    while totals.step < limit:
        t0, comm0 = clock.now(), comm.seconds
        clock.step_begin()
        loss = inner.step(lambda: _to(island.next_batch(), device), grad_hook=grad_hook)
        step_comm = comm.seconds - comm0  # DDP's gradient all-reduce is communication, not compute
        clock.step_done(clock.now() - t0 - step_comm)  # a slowed-down or simulated worker takes longer
        round_inner_s += clock.now() - t0 - step_comm
        round_comm_s += step_comm
        round_loss += loss
        round_steps += 1
        totals.step += 1
        totals.tokens += tokens_per_step
        bar.update()

        last = totals.step >= limit
        if not (outer.due(totals.step - 1) or last):
            continue
        # ---------------------------------------------------------------- end of a round
        tail = Tail(
            weight=float(round_steps * island_tokens_per_step) if _token_weighted(cfg) else 1.0,
            contributes=True,
            stop=stop.is_set(),
            tokens=round_steps * island_tokens_per_step,
            steps=round_steps,
            inner_s=round_inner_s,
        )
        sync_t0 = clock.now()
        report = outer.sync(model, tail=tail)
        sync_s = clock.now() - sync_t0
        if report.schedule_step is not None:
            inner.step_count = report.schedule_step  # async: the schedule follows the world's progress
        last = last or report.done
        if not report.committed and not world.elastic and size > 1 and "no worker contributed" not in report.reason:
            raise TransportError(
                f"round {totals.round + 1}: {report.reason}; a static world cannot continue "
                f"without the lost worker: restart with --checkpoint.resume=true"
            )
        totals.round += 1
        rounds_this_call += 1
        totals.rounds_committed += int(report.committed)
        totals.global_tokens += report.tokens
        totals.inner_s += round_inner_s
        totals.sync_s += sync_s + round_comm_s

        val_loss = None
        eval_t0 = clock.now()
        if last or (cfg.log.eval_every and totals.round % cfg.log.eval_every == 0):
            val_loss = world.evaluate(model, val_batches)
            totals.val_loss = val_loss
        eval_s = clock.now() - eval_t0
        totals.eval_s += eval_s
        totals.bytes_sent, totals.bytes_recv = world.counter.sent, world.counter.recv
        totals.wall_s = clock.now() - wall_t0
        # checkpoint before the round's record, which says whether it failed
        stopping = report.stop or (max_rounds is not None and rounds_this_call >= max_rounds)
        every = cfg.checkpoint.every
        checkpoint_error = None
        if last or stopping or (every and totals.round % every == 0):
            try:
                save_worker_state(ckpt_dir, totals.round, world.log_name, _state(model, inner, outer, island, totals))
            except OSError as e:  # a full or failing disk costs this checkpoint, not the run
                checkpoint_error = f"{e.filename or ckpt_dir}: {e.strerror or e}"
                going_on = "" if last or stopping else "; training goes on"
                log.error("round %d: checkpoint failed%s: %s", totals.round, going_on, checkpoint_error)
        record = {
            "event": "round",
            "round": totals.round,
            "step": totals.step,
            "tokens": totals.tokens,
            "global_tokens": totals.global_tokens,
            "loss": round_loss / round_steps,
            "val_loss": val_loss,
            "lr": inner.lr,
            "bytes_sent": report.bytes_sent,
            "bytes_recv": report.bytes_recv,
            "cum_bytes_sent": totals.bytes_sent,
            "cum_bytes_recv": totals.bytes_recv,
            "inner_s": round_inner_s,
            "sync_s": sync_s + round_comm_s,
            "eval_s": eval_s,
            "round_s": clock.now() - round_t0,
            "wall_s": totals.wall_s,
            "time": clock.now(),
            "committed": report.committed,
            "participants": report.participants,
            "anchor_hash": report.anchor_hash,
            "reason": report.reason,
            "version": report.version if report.version >= 0 else totals.rounds_committed,
        }
        if report.staleness is not None or isinstance(outer, AsyncLocalSGD):
            record["staleness"] = report.staleness
            record["next_steps"] = outer.round_steps
        record.update(report.extra)
        if checkpoint_error is not None:
            record["checkpoint_error"] = checkpoint_error
        sink.write(record)
        bar.show(
            round=totals.round,
            loss=record["loss"],
            val=totals.val_loss if totals.val_loss is not None else "-",
            tok_s=int(totals.global_tokens / max(totals.wall_s, 1e-9)),
            sent=metrics.human_bytes(totals.bytes_sent),
        )
        round_loss, round_steps, round_inner_s, round_comm_s = 0.0, 0, 0.0, 0.0
        round_t0 = clock.now()

        if stopping and not last:
            stopped = True
            if checkpoint_error is not None:  # this worker's own news: the others' checkpoints may be fine
                prior = rounds_of(ckpt_dir, world.log_name)
                bar.print(
                    f"dilo: error: stopped after round {totals.round} (step {totals.step}) but its checkpoint "
                    f"failed ({checkpoint_error}): "
                    + (
                        f"there is no checkpoint of round {totals.round} to resume from; --checkpoint.resume=true "
                        f"would go back to round {prior[-1]}, the newest of {world.log_name} in {ckpt_dir}"
                        if prior
                        else f"there is no checkpoint to resume from ({ckpt_dir} holds none of {world.log_name})"
                    )
                )
            elif main:
                bar.print(
                    f"stopped after round {totals.round} (step {totals.step}); checkpoint in {ckpt_dir}, "
                    "continue with --checkpoint.resume=true"
                )
            break
        if last:
            break
    bar.close()

    # --------------------------------------------------------------------------------------
    # summary, identical on every worker
    summary = _summarize(cfg, totals, world, param_bytes, stopped)
    sink.write({"event": "end", **summary})
    sink.close()
    if main:
        (run_dir / "summary.json").write_text(_json(summary))
        if cfg.log.progress:
            print(metrics.format_summary(summary), file=sys.stderr)
        if cfg.log.plot:
            metrics.plot_run(
                run_dir / "logs" / f"{world.log_name}.jsonl",
                run_dir / "loss.png",
                f"{cfg.name}: {cfg.outer.kind}, {size} workers",
            )
    world.close(outer, leaving=True)
    return summary


def _island_data(cfg: RunConfig, world: Any, island: int, islands: int, vocab: int | None = None) -> Any:
    """This rank's share of its island's data (the whole island when the island is one rank)."""
    data = load_island(cfg.data, island, islands, cfg.seed, vocab_size=vocab)
    return data.split(world.local_rank, world.island_ranks)


def _to(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def _token_weighted(cfg: RunConfig) -> bool:
    return getattr(cfg.outer, "weighting", "uniform") == "tokens"


class _CommTimer:
    """Times the DDP gradient hook so that inner_s counts compute only."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.seconds = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(model: torch.nn.Module) -> None:
            t0 = self.clock.now()
            fn(model)
            self.seconds += self.clock.now() - t0

        return timed


def _state(model: torch.nn.Module, inner: InnerLoop, outer: Strategy, island: Any, totals: Totals) -> dict[str, Any]:
    return {
        "params": [p.detach() for p in params_of(model)],
        "buffers": {k: v for k, v in model.named_buffers()},
        "inner": {"optimizer": inner.optimizer.state_dict(), "step": inner.step_count},
        "outer": outer.state_dict(),
        "data": island.state_dict(),
        "rng": torch.get_rng_state(),
        "totals": {k: v for k, v in totals.__dict__.items()},
    }


def _load_state(
    state: dict[str, Any], model: torch.nn.Module, inner: InnerLoop, outer: Strategy, island: Any, totals: Totals
) -> None:
    with torch.no_grad():
        for p, v in zip(params_of(model), state["params"]):
            p.copy_(v)
        buffers = dict(model.named_buffers())
        for k, v in state["buffers"].items():
            buffers[k].copy_(v)
    inner.optimizer.load_state_dict(state["inner"]["optimizer"])
    inner.step_count = int(state["inner"]["step"])
    outer.load_state_dict(state["outer"])
    island.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"])
    for k, v in state["totals"].items():
        setattr(totals, k, v)


def _summarize(cfg: RunConfig, totals: Totals, world: Any, param_bytes: int, stopped: bool) -> dict[str, Any]:
    """Static worlds agree on one summary; an elastic worker reports its own totals (tokens: the world's)."""
    sums, ranks = world.total(
        [totals.tokens, totals.bytes_sent, totals.bytes_recv, totals.inner_s, totals.wall_s, totals.eval_s]
    )
    tokens, sent, recv, inner_s, wall_s, eval_s = sums
    if world.elastic:
        tokens = totals.global_tokens
    workers = max(1, ranks // world.island_ranks)  # islands summed; only a lead rank talks to other islands
    sent_per_worker = sent / workers
    ddp_per_worker = totals.step * ring_all_reduce_bytes(param_bytes, max(world.size, 2) if world.elastic else workers)
    return {
        "name": cfg.name,
        "strategy": cfg.outer.kind,
        "workers": world.size,
        "steps": totals.step,
        "rounds": totals.round,
        "rounds_committed": totals.rounds_committed,
        "val_loss": totals.val_loss,
        "initial_val_loss": totals.extra.get("initial_val_loss"),
        "tokens": int(tokens),
        "wall_s": wall_s / ranks,
        "inner_s": inner_s / ranks,
        "eval_s": eval_s / ranks,
        "bytes_sent_per_worker": sent_per_worker,
        "bytes_recv_per_worker": recv / workers,
        "ddp_bytes_per_worker": ddp_per_worker,
        "comm_reduction": ddp_per_worker / sent_per_worker if sent_per_worker > 0 else float("inf"),
        "utilization": inner_s / wall_s if wall_s > 0 else 0.0,
        # the share of training time (evaluations left out) spent computing rather than waiting
        "train_utilization": inner_s / (wall_s - eval_s) if wall_s > eval_s else 0.0,
        "stopped": stopped,
    }


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m dilo.train CONFIG [--a.b=c ...]`: one worker of the world in the environment."""
    from dilo.cli import install_stop_handlers, setup_logging

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    setup_logging()
    try:
        cfg = load(argv[0], argv[1:])
        stop = install_stop_handlers()
        torch.set_num_threads(int(os.environ.get("DILO_THREADS", torch.get_num_threads())))
        summary = train(cfg, stop=stop)
    except DiloError as e:
        print(f"dilo.train: error: {e}", file=sys.stderr)
        return 2
    return 130 if summary["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
