"""The worker loop, top to bottom.

    python -m dilo.train configs/quickstart.toml [--outer.lr=0.5 ...]

One process (or, in tests, one thread) is one worker. The global world comes from the
environment that torchrun, Slurm or `dilo run` sets (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT); without it the worker trains alone.

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
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from dilo import metrics
from dilo.config import DDPConfig, RunConfig, load
from dilo.data import corpus_fingerprint, load_island, load_validation
from dilo.errors import DiloError, TransportError
from dilo.inner import InnerLoop, evaluate
from dilo.model import build_model, num_params
from dilo.outer.base import Strategy, Tail, params_of
from dilo.outer.ddp import DDP
from dilo.outer.diloco import DiLoCo
from dilo.state import load_worker_state, rounds_of, save_worker_state
from dilo.transport.base import ring_all_reduce_bytes
from dilo.transport.torch_dist import TorchDistTransport, connect_store, resolve_backend, store_is_hosted

log = logging.getLogger("dilo.train")


@dataclass
class World:
    """Where this worker sits in the global world and how to reach the others."""

    rank: int
    size: int
    host: str = "127.0.0.1"
    port: int = 0
    hosted: bool = False
    """The launcher serves the rendezvous store (torchrun's agent, `dilo run`)."""

    @classmethod
    def from_env(cls) -> World:
        if "WORLD_SIZE" not in os.environ:
            return cls(rank=0, size=1)
        try:
            return cls(
                rank=int(os.environ["RANK"]),
                size=int(os.environ["WORLD_SIZE"]),
                host=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                port=int(os.environ["MASTER_PORT"]),
                hosted=store_is_hosted(),
            )
        except (KeyError, ValueError) as e:
            raise DiloError(
                f"incomplete torch.distributed environment ({e}): set RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT, or launch with torchrun / dilo run"
            ) from None


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


def build_strategy(cfg: RunConfig, model: torch.nn.Module, transport: TorchDistTransport) -> DiLoCo | DDP:
    o = cfg.outer
    if isinstance(o, DDPConfig):
        if cfg.codec.kind != "none" or cfg.codec.overrides:
            warnings.warn(
                "codec settings are ignored by outer.kind='ddp': the baseline sends fp32 gradients", stacklevel=2
            )
        return DDP(model, transport, log_every=cfg.sync_every_ddp_eval, bucket_mb=cfg.transport.bucket_mb)
    momentum = getattr(o, "momentum", 0.0)
    nesterov = getattr(o, "nesterov", False)
    return DiLoCo(
        model,
        transport,
        inner_steps=o.inner_steps,
        lr=o.lr,
        momentum=momentum,
        nesterov=nesterov,
        codec=cfg.codec,
        seed=cfg.seed,
        bucket_mb=cfg.transport.bucket_mb,
    )


def train(
    cfg: RunConfig, world: World | None = None, *, stop: threading.Event | None = None, max_rounds: int | None = None
) -> dict[str, Any]:
    """Run (or resume) training on this worker. Returns the run summary (identical on every worker).

    stop: when set (Ctrl+C, SIGTERM), all workers finish the current round, save a checkpoint
    and return. max_rounds: stop after this many rounds in this call (tests of resume).
    """
    world = world or World.from_env()
    stop = stop or threading.Event()
    rank, size = world.rank, world.size
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    setup_t0 = time.perf_counter()

    # --------------------------------------------------------------------------------------
    # the global world, the model, this worker's island
    store = connect_store(world.host, world.port, rank, size, hosted=world.hosted, timeout_s=cfg.transport.timeout_s)
    device = _pick_device(cfg.transport.backend)
    transport = TorchDistTransport(store, rank, size, backend=cfg.transport.backend, timeout_s=cfg.transport.timeout_s)
    _check_same_run(cfg, transport)
    model = build_model(cfg.model, cfg.seed).to(device)
    island = load_island(cfg.data, rank, size, cfg.seed)
    val_batches = [_to(b, device) for b in load_validation(cfg.data, cfg.seed, cfg.log.eval_batches)[rank::size]]
    inner = InnerLoop(model, cfg.inner, total_steps=cfg.steps)
    outer: Strategy = build_strategy(cfg, model, transport)
    n_params = num_params(model)
    param_bytes = 4 * sum(p.numel() for p in params_of(model))
    totals = Totals()

    resume_round = _agree_resume_round(ckpt_dir, rank, transport) if cfg.checkpoint.resume else -1
    if resume_round >= 0:
        state = load_worker_state(ckpt_dir, resume_round, rank)
        _load_state(state, model, inner, outer, island, totals)
    else:
        outer.broadcast_initial(model)  # threads share one RNG; joiners will need this anyway
    transport.counter.sent, transport.counter.recv = totals.bytes_sent, totals.bytes_recv
    if isinstance(outer, DDP):
        outer.mark_bytes()

    if resume_round < 0:
        totals.extra["initial_val_loss"] = _distributed_eval(model, val_batches, transport, cfg.inner.precision)
    sink = metrics.JsonlSink(run_dir / "logs" / f"worker{rank}.jsonl", append=resume_round >= 0)
    sink.write(
        {
            "event": "resume" if resume_round >= 0 else "start",
            "rank": rank,
            "workers": size,
            "num_params": n_params,
            "fingerprint": cfg.fingerprint(),
            "step": totals.step,
            "val_loss": totals.extra.get("initial_val_loss"),
            "setup_s": time.perf_counter() - setup_t0,
            "config": cfg.model_dump(mode="json"),
        }
    )
    bar = metrics.Progress(
        cfg.steps, totals.step, enabled=cfg.log.progress and rank == 0, desc=f"{cfg.outer.kind} x{size}"
    )

    # --------------------------------------------------------------------------------------
    # the loop
    comm = _CommTimer()
    grad_hook = comm.wrap(outer.reduce_grads) if isinstance(outer, DDP) else None
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.inner.grad_accum
    wall_t0 = time.perf_counter() - totals.wall_s
    round_t0 = time.perf_counter()
    round_loss, round_steps, round_inner_s, round_comm_s = 0.0, 0, 0.0, 0.0
    rounds_this_call = 0
    stopped = False
    while totals.step < cfg.steps:
        t0, comm0 = time.perf_counter(), comm.seconds
        loss = inner.step(lambda: _to(island.next_batch(), device), grad_hook=grad_hook)
        step_comm = comm.seconds - comm0  # DDP's gradient all-reduce is communication, not compute
        round_inner_s += time.perf_counter() - t0 - step_comm
        round_comm_s += step_comm
        round_loss += loss
        round_steps += 1
        totals.step += 1
        totals.tokens += tokens_per_step
        bar.update()

        last = totals.step == cfg.steps
        if not (outer.due(totals.step - 1) or last):
            continue
        # ---------------------------------------------------------------- end of a round
        tail = Tail(
            weight=float(round_steps * tokens_per_step) if _token_weighted(cfg) else 1.0,
            contributes=True,
            stop=stop.is_set(),
            tokens=round_steps * tokens_per_step,
        )
        report = outer.sync(model, tail=tail)
        if not report.committed and size > 1 and "no worker contributed" not in report.reason:
            raise TransportError(
                f"round {totals.round + 1}: {report.reason}; a static world cannot continue "
                f"without the lost worker: restart with --checkpoint.resume=true"
            )
        totals.round += 1
        rounds_this_call += 1
        totals.rounds_committed += int(report.committed)
        totals.global_tokens += report.tokens
        totals.inner_s += round_inner_s
        totals.sync_s += report.sync_s + round_comm_s

        val_loss = None
        eval_t0 = time.perf_counter()
        if last or (cfg.log.eval_every and totals.round % cfg.log.eval_every == 0):
            val_loss = _distributed_eval(model, val_batches, transport, cfg.inner.precision)
            totals.val_loss = val_loss
        totals.eval_s += time.perf_counter() - eval_t0
        totals.bytes_sent, totals.bytes_recv = transport.counter.sent, transport.counter.recv
        totals.wall_s = time.perf_counter() - wall_t0
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
            "sync_s": report.sync_s + round_comm_s,
            "round_s": time.perf_counter() - round_t0,
            "wall_s": totals.wall_s,
            "committed": report.committed,
            "participants": report.participants,
            "anchor_hash": report.anchor_hash,
            "reason": report.reason,
        }
        sink.write(record)
        bar.show(
            round=totals.round,
            loss=record["loss"],
            val=totals.val_loss if totals.val_loss is not None else "-",
            tok_s=int(totals.global_tokens / max(totals.wall_s, 1e-9)),
            sent=metrics.human_bytes(totals.bytes_sent),
        )
        round_loss, round_steps, round_inner_s, round_comm_s = 0.0, 0, 0.0, 0.0
        round_t0 = time.perf_counter()

        stopping = report.stop or (max_rounds is not None and rounds_this_call >= max_rounds)
        every = cfg.checkpoint.every
        if last or stopping or (every and totals.round % every == 0):
            save_worker_state(ckpt_dir, totals.round, rank, _state(model, inner, outer, island, totals))
        if stopping and not last:
            stopped = True
            if rank == 0:
                bar.print(
                    f"stopped after round {totals.round} (step {totals.step}); checkpoint in {ckpt_dir}, "
                    "continue with --checkpoint.resume=true"
                )
            break
    bar.close()

    # --------------------------------------------------------------------------------------
    # summary, identical on every worker
    summary = _summarize(cfg, totals, transport, size, param_bytes, stopped)
    sink.write({"event": "end", **summary})
    sink.close()
    if rank == 0:
        (run_dir / "summary.json").write_text(_json(summary))
        if cfg.log.progress:
            print(metrics.format_summary(summary), file=sys.stderr)
        if cfg.log.plot:
            metrics.plot_run(
                run_dir / "logs" / "worker0.jsonl",
                run_dir / "loss.png",
                f"{cfg.name}: {cfg.outer.kind}, {size} workers",
            )
    transport.close()
    return summary


def _pick_device(backend: str) -> torch.device:
    """NCCL workers train on the GPU of their local rank; Gloo workers on the CPU."""
    if resolve_backend(backend) != "nccl":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _to(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def _token_weighted(cfg: RunConfig) -> bool:
    return getattr(cfg.outer, "weighting", "uniform") == "tokens"


class _CommTimer:
    """Times the DDP gradient hook so that inner_s counts compute only."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Any) -> Any:
        def timed(model: torch.nn.Module) -> None:
            t0 = time.perf_counter()
            fn(model)
            self.seconds += time.perf_counter() - t0

        return timed


def _distributed_eval(
    model: torch.nn.Module, batches: list[Any], transport: TorchDistTransport, precision: str
) -> float:
    total, n = evaluate(model, batches, precision)
    t = torch.tensor([total, float(n)], dtype=torch.float64)
    transport.all_reduce_([t])
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _check_same_run(cfg: RunConfig, transport: TorchDistTransport) -> None:
    """Refuse to train when workers were started with different configs or see different corpora."""
    mine = int((cfg.fingerprint() + corpus_fingerprint(cfg.data))[:15], 16)
    everyone = [int(t) for t in transport.all_gather(torch.tensor([mine], dtype=torch.int64))]
    if any(f != everyone[0] for f in everyone):
        odd = [r for r, f in enumerate(everyone) if f != everyone[transport.rank]]
        raise DiloError(
            f"worker {transport.rank}: workers {odd} run a different configuration or see a different corpus "
            "(another config file or overrides, another Python's stdlib, other files); start every worker "
            "with the same config"
        )


def _agree_resume_round(ckpt_dir: Any, rank: int, transport: TorchDistTransport) -> int:
    """The newest round every worker has a checkpoint for, or -1."""
    mine = rounds_of(ckpt_dir, rank)
    newest = torch.tensor([float(mine[-1] if mine else -1)], dtype=torch.float64)
    agreed = int(min(float(t) for t in transport.all_gather(newest)))
    if agreed >= 0 and agreed not in mine:
        raise DiloError(
            f"worker {rank} has no checkpoint for round {agreed} in {ckpt_dir} (it has {mine}); "
            "the workers' checkpoint directories disagree"
        )
    if agreed < 0 and rank == 0:
        log.warning("resume requested but no complete checkpoint in %s: starting from scratch", ckpt_dir)
    return agreed


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


def _summarize(
    cfg: RunConfig, totals: Totals, transport: TorchDistTransport, size: int, param_bytes: int, stopped: bool
) -> dict[str, Any]:
    mine = torch.tensor(
        [totals.tokens, totals.bytes_sent, totals.bytes_recv, totals.inner_s, totals.wall_s], dtype=torch.float64
    )
    transport.all_reduce_([mine])
    tokens, sent, recv, inner_s, wall_s = (float(x) for x in mine)
    sent_per_worker = sent / size
    ddp_per_worker = totals.step * ring_all_reduce_bytes(param_bytes, size)
    return {
        "name": cfg.name,
        "strategy": cfg.outer.kind,
        "workers": size,
        "steps": totals.step,
        "rounds": totals.round,
        "rounds_committed": totals.rounds_committed,
        "val_loss": totals.val_loss,
        "initial_val_loss": totals.extra.get("initial_val_loss"),
        "tokens": int(tokens),
        "wall_s": wall_s / size,
        "inner_s": inner_s / size,
        "bytes_sent_per_worker": sent_per_worker,
        "bytes_recv_per_worker": recv / size,
        "ddp_bytes_per_worker": ddp_per_worker,
        "comm_reduction": ddp_per_worker / sent_per_worker if sent_per_worker > 0 else float("inf"),
        "utilization": inner_s / wall_s if wall_s > 0 else 0.0,
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
