"""The run's counters that survive a resume, and the summary every worker writes at the end."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dilo.config import RunConfig
from dilo.state import rounds_of
from dilo.transport.base import ring_all_reduce_bytes
from dilo.worlds import World


@dataclass
class Totals:
    """Counters that survive a resume (the step and round counts live in `dilo.Outer`)."""

    tokens: int = 0
    global_tokens: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    inner_s: float = 0.0
    sync_s: float = 0.0
    eval_s: float = 0.0
    wall_s: float = 0.0
    val_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k in self.__dataclass_fields__:
                setattr(self, k, v)


def summarize(
    cfg: RunConfig, totals: Totals, world: World, *, steps: int, rounds: int, committed: int, param_bytes: int,
    stopped: bool,
) -> dict[str, Any]:  # fmt: skip
    """Static worlds agree on one summary; an elastic worker reports its own totals (tokens: the world's)."""
    sums, ranks = world.total(
        [totals.tokens, totals.bytes_sent, totals.bytes_recv, totals.inner_s, totals.wall_s, totals.eval_s]
    )
    tokens, sent, recv, inner_s, wall_s, eval_s = sums
    if world.elastic:
        tokens = totals.global_tokens
    workers = max(1, ranks // world.island_ranks)  # islands summed; only a lead rank talks to other islands
    sent_per_worker = sent / workers
    ddp_per_worker = steps * ring_all_reduce_bytes(param_bytes, max(world.size, 2) if world.elastic else workers)
    return {
        "name": cfg.name,
        "strategy": cfg.outer.kind,
        "workers": world.size,
        "steps": steps,
        "rounds": rounds,
        "rounds_committed": committed,
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


def stopped_message(rounds: int, steps: int, error: str | None, ckpt_dir: Path, name: str) -> str:
    """What a worker says when it stops early (Ctrl+C, SIGTERM): where to resume from, or, when this
    round's checkpoint failed, that there is nothing (or only an older round) to resume from."""
    if error is None:
        return (
            f"stopped after round {rounds} (step {steps}); checkpoint in {ckpt_dir}, "
            "continue with --checkpoint.resume=true"
        )
    prior = rounds_of(ckpt_dir, name)
    return f"dilo: error: stopped after round {rounds} (step {steps}) but its checkpoint failed ({error}): " + (
        f"there is no checkpoint of round {rounds} to resume from; --checkpoint.resume=true "
        f"would go back to round {prior[-1]}, the newest of {name} in {ckpt_dir}"
        if prior
        else f"there is no checkpoint to resume from ({ckpt_dir} holds none of {name})"
    )


def throughput(tokens: float, inner_s: float, flops_per_token: float, peak_tflops: float) -> dict[str, float]:
    """This rank's tokens/s in the round's compute, and its model FLOPs utilization when the peak is known."""
    rate = tokens / inner_s if inner_s > 0 else 0.0
    return {"tokens_per_s": rate, **({"mfu": rate * flops_per_token / (peak_tflops * 1e12)} if peak_tflops else {})}


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
