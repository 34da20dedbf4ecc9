"""Experiment trackers as sinks: TensorBoard event files (`log.tensorboard`) and Weights & Biases
runs (`log.wandb`), both fed the same scalars from each "round" record of a worker's log.

    <run_dir>/tensorboard/<worker log name>/events.out.tfevents...   one TensorBoard run per worker
    <run_dir>/wandb/offline-run-.../run-<id>.wandb                    one W&B run per worker

`tensorboard --logdir <run_dir>/tensorboard` shows one curve per worker; W&B groups the workers'
runs by `log.wandb_group` (default: the run name). The x axis is the worker's global inner step;
`time/steps_per_s` (and `time/utilization`, inner / round seconds) show which worker is slow.
Both packages are optional extras, imported only when enabled; a missing one is a ConfigError
raised when the sinks are opened, before the first training step. Built by
`dilo.metrics.open_sinks`, never directly by the loop.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dilo.errors import ConfigError

if TYPE_CHECKING:
    from dilo.config import RunConfig

# tag -> the round record's key (numbers only; None and missing keys are skipped)
_DIRECT = {
    "train/loss": "loss",
    "val/loss": "val_loss",
    "lr": "lr",
    "bytes/sent": "bytes_sent",
    "bytes/recv": "bytes_recv",
    "bytes/cum_sent": "cum_bytes_sent",
    "bytes/cum_recv": "cum_bytes_recv",
    "time/inner_s": "inner_s",
    "time/sync_s": "sync_s",
    "time/eval_s": "eval_s",
    "time/round_s": "round_s",
    "progress/tokens": "global_tokens",
    "sync/participants": "participants",
    "sync/committed": "committed",
    "sync/staleness": "staleness",
    "sync/disagreement": "disagreement",
}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars a tracker keeps of one "round" record (see the module docstring for the tags)."""
    out: dict[str, float] = {}
    for tag, key in _DIRECT.items():
        v = record.get(key)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[tag] = float(v)  # committed: 1.0 / 0.0
    inner, total = record.get("inner_s"), record.get("round_s")
    if isinstance(inner, (int, float)) and isinstance(total, (int, float)) and total > 0:
        out["time/utilization"] = float(inner) / float(total)  # the share of the round spent computing
    return out


class RoundScalars:
    """`scalars` of each round record, plus `time/steps_per_s`: the inner steps since the
    previous record (the "start" record gives the first step) over the round's inner seconds,
    so that the slow worker's curve stands out."""

    def __init__(self) -> None:
        self.last_step: int | None = None

    def __call__(self, record: dict[str, Any]) -> dict[str, float] | None:
        """The scalars of a "round" record; None for other records (which only move the step)."""
        step = record.get("step")
        last, self.last_step = self.last_step, step if isinstance(step, int) else self.last_step
        if record.get("event") != "round":
            return None
        out = scalars(record)
        inner = out.get("time/inner_s", 0.0)
        if isinstance(step, int) and last is not None and step > last and inner > 0:
            out["time/steps_per_s"] = (step - last) / inner
        return out


def missing(package: str, extra: str, key: str) -> ConfigError:
    return ConfigError(f"{key} = true needs the {package} package: pip install 'dilo[{extra}]'")


class TensorBoardSink:
    """Scalars of each round, written by torch's SummaryWriter under `log_dir` (one worker's run).
    The validation loss is also written against tokens (`val/loss_by_tokens`, step = tokens seen
    by all workers), so runs with different batch sizes compare on one axis."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise missing("tensorboard", "tensorboard", "log.tensorboard") from e
        log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(log_dir))
        self._scalars = RoundScalars()

    def write(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        values = self._scalars(record)
        if values is not None:
            step = int(record.get("step", 0))
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, global_step=step)
            if "val/loss" in values and "progress/tokens" in values:
                tokens = int(values["progress/tokens"])
                self._writer.add_scalar("val/loss_by_tokens", values["val/loss"], global_step=tokens)
        if values is not None or event == "end":
            # one small write a round: a live `tensorboard --logdir` sees every round, and a worker
            # that dies keeps its curves up to its last round
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """One W&B run per worker (named after it, grouped by run), the same scalars as TensorBoard,
    the run's config as the W&B config and the "end" record's totals as its summary."""

    def __init__(self, cfg: RunConfig, run_dir: Path, log_name: str, *, resumed: bool) -> None:
        try:
            import wandb
        except ImportError as e:
            raise missing("wandb", "wandb", "log.wandb") from e
        run_dir.mkdir(parents=True, exist_ok=True)  # wandb writes <dir>/wandb/
        lc = cfg.log
        self._run: Any = wandb.init(
            project=lc.wandb_project,
            group=lc.wandb_group or cfg.name,
            name=log_name,
            job_type="resume" if resumed else "train",
            dir=str(run_dir),
            mode=lc.wandb_mode,
            config=cfg.model_dump(mode="json"),
            reinit="create_new",  # workers as threads of one process: one run each
        )
        self._scalars = RoundScalars()

    def write(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        values = self._scalars(record)
        if values is not None:
            self._run.log(values, step=int(record.get("step", 0)))
        elif event == "end":
            totals = {k: v for k, v in record.items() if isinstance(v, (int, float, str)) and k != "event"}
            self._run.summary.update(totals)

    def close(self) -> None:
        self._run.finish()
