"""The worker loop of `dilo run` / `dilo worker`, top to bottom, on the public API (dilo/api.py).

    python -m dilo.train configs/quickstart.toml [--outer.lr=0.5 ...]

One process (or, in tests, one thread) is one worker. `dilo.init` picks its world from the config
and the environment: a static world from torchrun / Slurm / `dilo run` (alone without one), an
elastic worker of a `dilo coordinator`, or a gossip worker. Each round: `H` inner steps on the
worker's own island, then the outer step of `dilo.wrap`. Validation loss is evaluated on the
anchor; checkpoints are written at round boundaries, where every worker's parameters equal it.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

import dilo
from dilo import metrics
from dilo.adapters import build_run_model
from dilo.config import RunConfig, load
from dilo.data import Island, load_island, load_validation
from dilo.errors import DiloError, island_lost
from dilo.inner import InnerLoop, resolve_precision
from dilo.model import check_call, check_data_fits, model_vocab_size, num_params, params_of
from dilo.process import apply_threads, install_stop_handlers, setup_logging
from dilo.report import Totals, stopped_message, summarize, throughput, to_json
from dilo.worlds import World

log = logging.getLogger("dilo.train")


def train(
    cfg: RunConfig,
    world: World | None = None,
    *,
    stop: threading.Event | None = None,
    max_rounds: int | None = None,
    observe: Callable[[dilo.Outer], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) training on this worker; returns the run summary (identical on every worker
    of a static world). world: built by `dilo.init` from the config and the environment when None.

    stop: when set (Ctrl+C, SIGTERM), all workers finish the current round, save a checkpoint
    and return. max_rounds: stop after this many rounds in this call (tests of resume). observe:
    called with the started `dilo.Outer` (monitoring, tests). The world is closed on every way out."""
    w = world or dilo.init(cfg)
    finished = False
    try:
        summary = _train(cfg, w, stop or threading.Event(), max_rounds, observe)
        finished = True
        return summary
    except RuntimeError as e:  # a collective inside the island failed: a typed error, not a traceback
        lost = island_lost(e, w.log_name) if w.island_ranks > 1 else None
        if lost is None:
            raise
        raise lost from e
    finally:
        w.close(leaving=finished)


def _train(cfg: RunConfig, world: World, stop: threading.Event, max_rounds: int | None, observe: Any) -> dict[str, Any]:
    clock = world.clock  # wall time, or the simulator's virtual time
    setup_t0 = clock.now()
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    main = world.rank == 0 and world.local_rank == 0  # prints, plots and writes the summary
    device = world.device
    model = build_run_model(cfg).to(device)  # cfg.model, with LoRA adapters when cfg.lora.r > 0
    model = world.shard(model)  # transport.island_shard = "fsdp": FSDP2 over the island
    check_data_fits(model, cfg.data)  # byte-level data needs 256 ids; seq_len within the model's positions
    vocab = model_vocab_size(model)  # ids >= vocab fail at load time, naming the file (dilo/data.py)
    island = _island_data(cfg, world, vocab)
    val = load_validation(cfg.data, cfg.seed, cfg.log.eval_batches, vocab_size=vocab)
    val_batches = [_to(b, device) for b in world.validation_share(val)]
    inner = InnerLoop(model, cfg.inner, total_steps=cfg.steps)
    outer = dilo.wrap(model, inner.optimizer, world)
    totals = Totals()
    checkpoints = world.checkpoints(ckpt_dir)  # this rank's files, or its island's sharded (DCP) checkpoint
    resume_round = world.agree_resume_round(checkpoints) if cfg.checkpoint.resume else -1
    if resume_round < 0 and cfg.checkpoint.resume and main:
        log.warning("resume requested but no complete checkpoint in %s: starting from scratch", ckpt_dir)
    if resume_round >= 0:
        state = checkpoints.load(resume_round)
        outer.load_state_dict(state)  # the API's own keys; the loop's are beside them
        inner.step_count = int(state["loop"]["inner_step"])
        island.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        totals.load_state_dict(state["totals"])
    first_island = world.rank
    joined = outer.start()  # static: rank 0's parameters; elastic: the coordinator's; gossip: the peers
    if observe is not None:
        observe(outer)
    check_call(model, cfg.model, cfg.seed)  # an imported forward follows model.call: before its first use
    if world.rank != first_island:  # DILO_ISLAND=auto: the coordinator handed out another island
        island = _island_data(cfg, world, vocab)
    # bytes count from here: the start-up broadcast or JOIN is not training traffic
    bytes0 = (world.counter.sent - totals.bytes_sent, world.counter.recv - totals.bytes_recv)
    if resume_round < 0:
        totals.extra["initial_val_loss"] = world.evaluate(model, val_batches)
    # a resumed worker, or an elastic one (re)joining a run in progress, goes on with its log
    rejoined = world.elastic and joined.version > 0
    sink = metrics.open_sinks(cfg, run_dir, world.log_name, append=resume_round >= 0 or rejoined)  # JSONL, TB, W&B
    sink.write(
        {
            "event": "resume" if resume_round >= 0 else "start",
            **{"rank": world.rank, "local_rank": world.local_rank, "island_ranks": world.island_ranks},
            **{"workers": world.size, "num_params": num_params(model), "fingerprint": cfg.fingerprint()},
            "step": outer.steps,
            "val_loss": totals.extra.get("initial_val_loss"),
            "setup_s": clock.now() - setup_t0,
            "time": clock.now(),
            # the island, version and members this worker started with, and its parameters' hash
            "joined": joined.record(),
            "precision": resolve_precision(cfg.inner.precision, next(model.parameters()).device.type),
            "exchange": outer.describe(),  # which codec each parameter group uses, through which collective
            "config": cfg.model_dump(mode="json"),
        }
    )
    bar = metrics.Progress(cfg.steps, outer.steps, enabled=cfg.log.progress and main, desc=f"{cfg.outer.kind}")
    flops_per_token = 6.0 * sum(p.numel() for p in model.parameters())  # forward and backward, dense
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.inner.grad_accum * world.island_ranks
    wall_t0 = clock.now() - totals.wall_s
    round_t0 = clock.now()
    rounds_this_call, stopped = 0, False

    def sync_grads(_: torch.nn.Module) -> None:
        outer.sync_grads()  # DDP / islands: averaged here, before clipping

    record_errors: list[str] = []  # failed checkpoints, for the next round's record
    try:
        while not outer.done and outer.steps < world.step_limit:
            t0, comm0 = clock.now(), outer.comm_s
            clock.step_begin()
            loss = inner.step(lambda: _to(island.next_batch(), device), grad_hook=sync_grads)
            clock.step_done(clock.now() - t0 - (outer.comm_s - comm0))  # a slowed-down or simulated worker
            bar.update()
            report = outer.step(
                loss=loss, tokens=tokens_per_step, inner_s=clock.now() - t0 - (outer.comm_s - comm0), stop=stop.is_set()
            )
            if report is None:
                continue
            # ---------------------------------------------------------------- end of a round
            sync = report.sync
            # async: the schedule follows the world's progress; outer.round_seconds: the round's skipped steps
            inner.step_count = sync.schedule_step if sync.schedule_step is not None else outer.steps
            rounds_this_call += 1
            totals.tokens += report.tokens // world.island_ranks  # this rank's share
            totals.global_tokens += sync.tokens
            totals.inner_s += report.inner_s
            totals.sync_s += report.sync_s + report.comm_s
            val_loss, eval_t0 = None, clock.now()
            if outer.done or (cfg.log.eval_every and outer.rounds % cfg.log.eval_every == 0):
                val_loss = totals.val_loss = world.evaluate(model, val_batches)
            totals.eval_s += clock.now() - eval_t0
            totals.bytes_sent, totals.bytes_recv = world.counter.sent - bytes0[0], world.counter.recv - bytes0[1]
            totals.wall_s = clock.now() - wall_t0
            # checkpoint before the round's record, which says whether it failed
            stopping = sync.stop or (max_rounds is not None and rounds_this_call >= max_rounds)
            checkpoint_error, failed = None, []
            final = outer.done or stopping
            if final or (cfg.checkpoint.every and outer.rounds % cfg.checkpoint.every == 0):
                state = {**outer.state_dict(), "loop": {"inner_step": inner.step_count}}
                state.update(data=island.state_dict(), rng=torch.get_rng_state(), totals=totals.state_dict())
                # written behind the next round; the run's last one is waited for
                failed = checkpoints.save(outer.rounds, state, wait=final)
            for r, e in failed:  # a full or failing disk costs that checkpoint, not the run
                error = f"{e.filename or ckpt_dir}: {e.strerror or e}"
                going_on = "" if final and r == outer.rounds else "; training goes on"
                log.error("round %d: checkpoint failed%s: %s", r, going_on, error)
                if r == outer.rounds:
                    checkpoint_error = error
                else:
                    record_errors.append(error)
            record = {
                "event": "round",
                **{"round": outer.rounds, "step": outer.steps, "inner_steps": report.steps, "tokens": totals.tokens},
                **{"global_tokens": totals.global_tokens, "loss": report.loss, "val_loss": val_loss, "lr": inner.lr},
                **{"bytes_sent": sync.bytes_sent, "bytes_recv": sync.bytes_recv},
                **{"cum_bytes_sent": totals.bytes_sent, "cum_bytes_recv": totals.bytes_recv},
                **{"inner_s": report.inner_s, "sync_s": report.sync_s + report.comm_s, "eval_s": clock.now() - eval_t0},
                **{"round_s": clock.now() - round_t0, "wall_s": totals.wall_s, "time": clock.now()},
                **throughput(report.tokens / world.island_ranks, report.inner_s, flops_per_token, cfg.log.peak_tflops),
                **_device_memory(device),
                **{"committed": sync.committed, "participants": sync.participants, "anchor_hash": sync.anchor_hash},
                "reason": sync.reason,
                "failure": sync.failure.value if sync.failure is not None else None,
                "version": sync.version if sync.version >= 0 else outer.rounds_committed,
                **sync.extra,
            }
            if checkpoint_error is not None or record_errors:
                record["checkpoint_error"] = "; ".join(
                    [*record_errors, *([checkpoint_error] if checkpoint_error else [])]
                )
                record_errors.clear()
            sink.write(record)
            bar.show(
                round=outer.rounds,
                loss=report.loss,
                val=totals.val_loss if totals.val_loss is not None else "-",
                tok_s=int(totals.global_tokens / max(totals.wall_s, 1e-9)),
                sent=metrics.human_bytes(totals.bytes_sent),
            )
            round_t0 = clock.now()
            if stopping and not outer.done:
                stopped = True
                message = stopped_message(outer.rounds, outer.steps, checkpoint_error, ckpt_dir, world.log_name)
                if checkpoint_error is not None or main:  # a failed checkpoint is this worker's own news
                    bar.print(message)
                break
    finally:
        for r, e in checkpoints.close():
            log.error("round %d: checkpoint failed: %s", r, e)
    bar.close()

    # summary, identical on every worker of a static world
    summary = summarize(
        cfg, totals, world, steps=outer.steps, rounds=outer.rounds, committed=outer.rounds_committed,
        param_bytes=4 * sum(p.numel() for p in params_of(model)), stopped=stopped,
    )  # fmt: skip
    sink.write({"event": "end", **summary})
    sink.close()
    outer.close()
    if main:
        (run_dir / "summary.json").write_text(to_json(summary))
        if cfg.log.progress:
            print(metrics.format_summary(summary), file=sys.stderr)
        if cfg.log.plot:
            title = f"{cfg.name}: {cfg.outer.kind}, {world.size} workers"
            metrics.plot_run(run_dir / "logs" / f"{world.log_name}.jsonl", run_dir / "loss.png", title)
    return summary


def _island_data(cfg: RunConfig, world: World, vocab: int | None) -> Island:
    """This rank's share of its island's data (the whole island when the island is one rank)."""
    island = load_island(cfg.data, world.rank, world.size, cfg.seed, vocab_size=vocab)
    return island.split(world.local_rank, world.island_ranks)


def _device_memory(device: torch.device) -> dict[str, float]:
    """On a GPU: the most memory this rank's tensors have held so far, in GiB (what sharding saves)."""
    if device.type != "cuda":
        return {}
    return {"max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def _to(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m dilo.train CONFIG [--a.b=c ...]`: one worker of the world in the environment."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    try:
        setup_logging()
        cfg = load(argv[0], argv[1:])
        stop = install_stop_handlers()
        apply_threads()
        summary = train(cfg, stop=stop)
    except DiloError as e:
        print(f"dilo: error: {e}", file=sys.stderr)
        return 2
    return 130 if summary["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
