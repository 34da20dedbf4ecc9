"""What a run reports: progress (a live bar on a terminal, one line per round elsewhere), one JSONL
log per worker, a summary, plots.

Each worker writes `logs/worker<rank>.jsonl` with one record per line:

    {"event": "start", "rank": 0, "workers": 4, "num_params": ..., "config": {...}}
    {"event": "round", "round": 3, "step": 150, "tokens": ..., "loss": 2.31, "val_loss": 2.40,
     "bytes_sent": ..., "bytes_recv": ..., "inner_s": ..., "sync_s": ..., "eval_s": ...,
     "wall_s": ..., "committed": true, "participants": 4, "anchor_hash": "..."}
    {"event": "end", ...totals...}

Worker 0 also writes `summary.json` and, with `log.plot`, `loss.png`. With `log.tensorboard` /
`log.wandb` every worker also feeds its records to TensorBoard / W&B (dilo/trackers.py); the loop
writes each record once, to the sink `open_sinks` builds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from dilo.config import RunConfig


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: Path, *, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = path.open("a" if append else "w")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class NullSink:
    def write(self, record: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class FanoutSink:
    """Several sinks as one: each record goes to every sink, in order; close() closes them all."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        errors: list[BaseException] = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - every sink gets closed; the first error is raised
                errors.append(e)
        if errors:
            raise errors[0]


def open_sinks(cfg: RunConfig, run_dir: Path, log_name: str, *, append: bool = False) -> Sink:
    """Every sink of one worker, from `cfg.log`: the JSONL log `logs/<log_name>.jsonl` always,
    TensorBoard (`tensorboard/<log_name>/`) and W&B (`wandb/`) when enabled. append: a resumed
    run (the JSONL log goes on; TensorBoard adds an event file; W&B starts a run of job type
    "resume"). A missing optional package is a ConfigError, raised before any file is opened."""
    sinks: list[Sink] = []
    if cfg.log.tensorboard or cfg.log.wandb:
        from dilo import trackers

        if cfg.log.tensorboard:
            sinks.append(trackers.TensorBoardSink(run_dir / "tensorboard" / log_name))
        if cfg.log.wandb:
            try:
                sinks.append(trackers.WandbSink(cfg, run_dir, log_name, resumed=append))
            except BaseException:
                for sink in sinks:
                    sink.close()
                raise
    jsonl = JsonlSink(run_dir / "logs" / f"{log_name}.jsonl", append=append)
    return jsonl if not sinks else FanoutSink([jsonl, *sinks])


class Progress:
    """Progress over inner steps, on stderr of worker 0; a null object where disabled.

    On a terminal it is a tqdm bar, with `show`'s figures as its postfix. Anywhere else (CI,
    nohup, Slurm logs: `stream` is not a TTY) a bar would write a carriage-return update every
    half second, so instead each `show` call (one per round) prints one plain line:

        diloco x4: step 150/800 (19%), 42 s, round=3 loss=2.31 val=2.40 tok_s=5120 sent=1.20 MB
    """

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._total = total
        self._step = initial
        self._desc = desc
        self._t0 = time.monotonic()
        self._bar: tqdm[Any] | None = None
        if enabled and _isatty(self._stream):
            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=self._stream,
                mininterval=0.5,
            )

    @property
    def is_bar(self) -> bool:
        """Whether a live tqdm bar is drawn (enabled, on a terminal)."""
        return self._bar is not None

    def update(self, n: int = 1) -> None:
        self._step += n
        if self._bar is not None:
            self._bar.update(n)

    def show(self, **fields: Any) -> None:
        figures = {k: _short(v) for k, v in fields.items()}
        if self._bar is not None:
            self._bar.set_postfix(figures, refresh=False)
        elif self._enabled:
            pct = f" ({100 * self._step // self._total}%)" if self._total > 0 else ""
            elapsed = time.monotonic() - self._t0
            text = " ".join(f"{k}={v}" for k, v in figures.items())
            self._write(f"{self._desc}: step {self._step}/{self._total}{pct}, {elapsed:.0f} s, {text}")

    def print(self, text: str) -> None:
        """A message for the user, shown whether or not progress is enabled (above the bar on a TTY)."""
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            self._write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _write(self, line: str) -> None:
        self._stream.write(line + "\n")
        self._stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_summary(s: dict[str, Any]) -> str:
    """The end-of-run table printed by worker 0."""
    val = s.get("val_loss")
    rows = [
        ("strategy", s["strategy"]),
        ("workers", str(s["workers"])),
        ("validation loss", _val_text(s.get("initial_val_loss"), val)),
        ("tokens (all workers)", f"{s['tokens']:,}"),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("tokens/s (all workers)", f"{s['tokens'] / max(s['wall_s'], 1e-9):,.0f}"),
        ("bytes sent per worker", human_bytes(s["bytes_sent_per_worker"])),
        ("bytes DDP would send", human_bytes(s["ddp_bytes_per_worker"])),
        ("communication reduction", f"{s['comm_reduction']:.1f}x"),
        ("compute utilization", f"{100 * s['utilization']:.1f} %"),
        ("rounds committed", f"{s['rounds_committed']}/{s['rounds']}"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 24)
    return "\n".join([line, *(f"{k.ljust(width)}  {v}" for k, v in rows), line])


def _val_text(first: float | None, last: float | None) -> str:
    if last is None:
        return "n/a"
    return f"{last:.4f}" if first is None else f"{first:.4f} -> {last:.4f}"


def plot_run(log_path: Path, out_path: Path, title: str) -> Path | None:
    """Validation (and inner) loss against tokens and against bytes sent, from one worker's log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    rounds = [r for r in records if r.get("event") == "round"]
    if not rounds:
        return None
    start = next((r for r in records if r.get("event") == "start"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    tokens = [r["global_tokens"] for r in rounds]
    sent = [r["cum_bytes_sent"] / 1e6 for r in rounds]
    val = [(t, b, r["val_loss"]) for t, b, r in zip(tokens, sent, rounds) if r.get("val_loss") is not None]
    if start is not None and start.get("val_loss") is not None:
        val.insert(0, (0, 0.0, start["val_loss"]))
    for ax, xs, xlabel in ((axes[0], tokens, "tokens (all workers)"), (axes[1], sent, "MB sent per worker")):
        ax.plot(xs, [r["loss"] for r in rounds], label="inner loss (worker 0)", alpha=0.6)
        if val:
            ax.plot([v[0] if ax is axes[0] else v[1] for v in val], [v[2] for v in val], "o-", label="validation loss")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
