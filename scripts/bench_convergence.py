"""Convergence per token and per byte: DDP, FedAvg and DiLoCo at several H, equal tokens.

    .venv/bin/python scripts/bench_convergence.py [--steps 1000] [--workers 4]

Every arm is a real `dilo run` with 4 worker processes on the bundled stdlib corpus, the
quickstart model and the same inner hyper-parameters; they differ only in the outer strategy.
Every worker trains `steps` steps in every arm, so all arms see the same number of tokens.
Figures are ratios to the DDP arm of the same run. Writes scripts/results/convergence.json,
scripts/results/convergence.png and the "convergence" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchlib import REPO, RESULTS, machine, markdown_table, run_arm, update_benchmarks_md, write_json


def arms(steps: int) -> list[tuple[str, list[str]]]:
    every = 50  # evaluate every 50 steps in every arm
    out = [
        ("ddp", ["--outer.kind=ddp", f"--sync_every_ddp_eval={every}", "--log.eval_every=1"]),
        ("fedavg-h50", ["--outer.kind=fedavg", "--outer.inner_steps=50", "--log.eval_every=1"]),
    ]
    for h in (10, 50, 100):
        out.append(
            (
                f"diloco-h{h}",
                ["--outer.kind=diloco", f"--outer.inner_steps={h}", f"--log.eval_every={max(1, every // h)}"],
            )
        )
    # the paper's outer hyper-parameters, for comparison with the ones tuned for this model
    out.append(
        (
            "diloco-h50-lr0.7-m0.9",
            [
                "--outer.kind=diloco",
                "--outer.inner_steps=50",
                "--outer.lr=0.7",
                "--outer.momentum=0.9",
                "--log.eval_every=1",
            ],
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="inner steps per worker in every arm")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.toml"))
    ap.add_argument("--replot", action="store_true", help="redraw the plot from scripts/results/convergence.json")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((RESULTS / "convergence.json").read_text())["arms"], RESULTS / "convergence.png")
        return

    results = []
    with tempfile.TemporaryDirectory(prefix="dilo-bench-") as tmp:
        for name, overrides in arms(args.steps):
            common = [f"--steps={args.steps}", "--checkpoint.every=0", "--log.eval_batches=32"]
            results.append(run_arm(name, Path(args.config), args.workers, common + overrides, Path(tmp)))

    ddp = next(r["summary"] for r in results if r["name"] == "ddp")
    rows = []
    for r in results:
        s = r["summary"]
        r["ratios"] = {
            "val_loss_vs_ddp": s["val_loss"] / ddp["val_loss"],
            "bytes_vs_ddp": s["bytes_sent_per_worker"] / ddp["bytes_sent_per_worker"],
            "wall_vs_ddp": s["wall_s"] / ddp["wall_s"],
        }
        rows.append(
            [
                r["name"],
                f"{s['val_loss']:.4f}",
                f"{r['ratios']['val_loss_vs_ddp']:.3f}",
                f"{s['bytes_sent_per_worker'] / 1e6:.1f}",
                f"{1 / r['ratios']['bytes_vs_ddp']:.1f}x fewer",
                f"{s['wall_s']:.0f}",
                f"{r['ratios']['wall_vs_ddp']:.2f}",
                f"{100 * s['utilization']:.1f} %",
            ]
        )
    table = markdown_table(
        [
            "arm",
            "val loss",
            "loss / DDP",
            "MB sent per worker",
            "bytes vs DDP",
            "wall s",
            "wall / DDP",
            "compute utilization",
        ],
        rows,
    )
    payload = {
        "benchmark": "convergence",
        "machine": machine(),
        "steps": args.steps,
        "workers": args.workers,
        "config": args.config,
        "arms": results,
    }
    write_json("convergence", payload)
    plot(results, RESULTS / "convergence.png")
    tokens = ddp["tokens"]
    update_benchmarks_md(
        "convergence",
        f"""
## Convergence: DDP vs FedAvg vs DiLoCo (`scripts/bench_convergence.py`)

{args.workers} worker processes on {machine()["cpus"]} CPU cores, quickstart model and inner
hyper-parameters (AdamW lr 3e-3, bf16 autocast), stdlib corpus, iid islands, {args.steps} steps
per worker in every arm ({tokens:,} tokens in total). DiLoCo arms use the quickstart's outer
Nesterov SGD (lr 1.0, momentum 0.5) except the last, which uses the paper's (0.7, 0.9). Ratios
are against the DDP arm of the same run ({machine()["date"]}, torch {machine()["torch"]}).

{table}

![validation loss against tokens and bytes](scripts/results/convergence.png)

Raw results: `scripts/results/convergence.json`.
""",
    )
    print(table)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        pts = [(t, b, v) for t, b, v in r["curve"] if v is not None]
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], "o-", ms=3, label=r["name"])
        sent = [p for p in pts if p[1] > 0]  # the start (0 bytes) has no place on a log axis
        axes[1].plot([p[1] / 1e6 for p in sent], [p[2] for p in sent], "o-", ms=3, label=r["name"])
    axes[0].set_xlabel("tokens (all workers)")
    axes[1].set_xlabel("MB sent per worker (log)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=3.0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
