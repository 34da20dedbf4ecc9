"""The quality-per-byte frontier of pseudo-gradient codecs.

    .venv/bin/python scripts/bench_frontier.py [--steps 800] [--workers 4] [--only ARM ...]

DiLoCo H=50, 4 worker processes, the quickstart model on the stdlib corpus, equal tokens in
every arm; one arm per codec, plus uncompressed DiLoCo and DDP measured in the same run. Each
arm reports its final validation loss and bytes sent per worker as ratios to uncompressed
DiLoCo and to DDP. Writes scripts/results/frontier.json, scripts/results/frontier.png and the
"frontier" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from benchlib import REPO, RESULTS, machine, markdown_table, run_arm, update_benchmarks_md, write_json

ARMS: list[tuple[str, list[str]]] = [
    ("ddp", ["--outer.kind=ddp", "--sync_every_ddp_eval=50"]),
    ("diloco", []),
    ("int4", ["--codec.kind=int4"]),
    ("topk1-ef", ["--codec.kind=topk", "--codec.fraction=0.01", "--codec.chunk=4096", "--codec.error_feedback=true"]),
    ("powersgd-r4-ef", ["--codec.kind=powersgd", "--codec.rank=4", "--codec.error_feedback=true",
                        "--codec.warm_start=false"]),
    ("powersgd-r4-warm-ef", ["--codec.kind=powersgd", "--codec.rank=4", "--codec.error_feedback=true"]),
    ("int2-ef", ["--codec.kind=int2"]),
    ("int2-stochastic-ef", ["--codec.kind=int2", "--codec.stochastic=true"]),
    ("ternary-ef", ["--codec.kind=ternary", "--codec.error_feedback=true"]),
    ("ternary", ["--codec.kind=ternary", "--codec.error_feedback=false"]),  # TernGrad sends no residual
    ("dct3-ef", ["--codec.kind=dct", "--codec.fraction=0.03"]),
    ("dct3-int2-ef", ["--codec.kind=dct", "--codec.fraction=0.03", "--codec.values=int2"]),
    ("dct2.5-c256-int2-ef", ["--codec.kind=dct", "--codec.fraction=0.025", "--codec.chunk=256",
                             "--codec.values=int2"]),
    # SparseLoCo's outer step: the error feedback is the only momentum (outer SGD, lr 1)
    ("dct2.5-c256-int2-ef-m0", ["--codec.kind=dct", "--codec.fraction=0.025", "--codec.chunk=256",
                                "--codec.values=int2", "--outer.momentum=0", "--outer.nesterov=false"]),
    # DGC: its momentum correction replaces the outer momentum (outer SGD, lr 1)
    ("topk1-dgc", ["--codec.kind=topk", "--codec.fraction=0.01", "--codec.chunk=4096", "--codec.momentum=0.9",
                   "--codec.warmup_rounds=4", "--outer.momentum=0", "--outer.nesterov=false"]),
    ("adaptive", ["--codec.adapt_every=5", "--codec.adapt_error=0.05"]),
    # inner optimizers (fp32 wire): Muon on the matrices at AdamW's lr; Lion at 1/3 and 1/10 of it (same lr x decay)
    ("muon", ["--inner.optimizer=muon"]),
    ("lion", ["--inner.optimizer=lion", "--inner.lr=1e-3", "--inner.weight_decay=0.3"]),
    ("lion-lr3e-4", ["--inner.optimizer=lion", "--inner.lr=3e-4", "--inner.weight_decay=1.0"]),
    ("muon-int2-ef", ["--inner.optimizer=muon", "--codec.kind=int2"]),
    # Distributed Lion: data parallel, every step 1 bit per parameter all-gathered and a majority vote
    ("dlion-majority", ["--outer.kind=ddp", "--sync_every_ddp_eval=50", "--outer.vote=majority",
                        "--inner.optimizer=lion", "--inner.lr=1e-3", "--inner.weight_decay=0.3"]),
    ("muon-dct2.5-c256-int2-ef", ["--inner.optimizer=muon", "--codec.kind=dct", "--codec.fraction=0.025",
                                  "--codec.chunk=256", "--codec.values=int2"]),
]  # fmt: skip

LONG_ARMS: list[tuple[str, list[str]]] = [
    # the long run's own arms (--steps 1500 --only NAME): H must divide the steps
    ("muon-int2-h150-ef", ["--inner.optimizer=muon", "--codec.kind=int2", "--outer.inner_steps=150"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800, help="inner steps per worker in every arm")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="run only these arms (plus ddp and diloco)")
    ap.add_argument(
        "--no-ddp",
        action="store_true",
        help="skip the DDP arm (a long run): bytes against DDP use the all-reduce bytes DDP would "
        "send for these steps, as every run counts them (ddp_bytes_per_worker); no loss against DDP",
    )
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.toml"))
    args = ap.parse_args()

    arms = [a for a in ARMS if not args.only or a[0] in ("ddp", "diloco", *args.only)]
    arms += [a for a in LONG_ARMS if args.only and a[0] in args.only]
    if args.no_ddp:
        arms = [a for a in arms if a[0] != "ddp"]
    for name, _ in arms:  # arm names become run names: check them all before the first run
        if not re.fullmatch(r"[\w.-]+", name):
            raise SystemExit(f"arm name {name!r} must be letters, digits, '.', '-' or '_'")
    results = []
    with tempfile.TemporaryDirectory(prefix="dilo-frontier-") as tmp:
        for name, overrides in arms:
            common = [
                f"--steps={args.steps}",
                "--outer.inner_steps=50",
                "--checkpoint.every=0",
                "--log.eval_batches=32",
                "--log.eval_every=1",
            ]
            if "--outer.kind=ddp" in overrides:
                common.remove("--outer.inner_steps=50")
            results.append(
                run_arm(
                    name,
                    Path(args.config),
                    args.workers,
                    common + overrides,
                    Path(tmp),
                    cache=Path(tempfile.gettempdir()) / "dilo-frontier-cache",
                )
            )

    base = next(r["summary"] for r in results if r["name"] == "diloco")
    ran_ddp = next((r["summary"] for r in results if r["name"] == "ddp"), None)
    ddp_loss = ran_ddp["val_loss"] if ran_ddp else None
    ddp_bytes = ran_ddp["bytes_sent_per_worker"] if ran_ddp else base["ddp_bytes_per_worker"]
    rows = []
    for r in results:
        s = r["summary"]
        r["ratios"] = {
            "val_loss_vs_diloco": s["val_loss"] / base["val_loss"],
            "val_loss_vs_ddp": s["val_loss"] / ddp_loss if ddp_loss else None,
            "bytes_vs_diloco": s["bytes_sent_per_worker"] / base["bytes_sent_per_worker"],
            "bytes_vs_ddp": s["bytes_sent_per_worker"] / ddp_bytes,
        }
        q = r["ratios"]
        rows.append(
            [
                r["name"],
                f"{s['val_loss']:.4f}",
                f"{q['val_loss_vs_diloco']:.4f}",
                "-" if q["val_loss_vs_ddp"] is None else f"{q['val_loss_vs_ddp']:.4f}",
                f"{s['bytes_sent_per_worker'] / 1e6:.2f}",
                f"{1 / q['bytes_vs_diloco']:.1f}x",
                f"{1 / q['bytes_vs_ddp']:.0f}x",
            ]
        )
    table = markdown_table(
        [
            "arm",
            "val loss",
            "loss / DiLoCo",
            "loss / DDP",
            "MB sent per worker",
            "fewer bytes than DiLoCo",
            "fewer bytes than DDP",
        ],
        rows,
    )
    # the standard run (800 steps, every arm) is the "frontier" section; a longer or partial one its own
    key = "frontier" if args.steps == 800 and not args.only and not args.no_ddp else f"frontier-{args.steps}"
    write_json(
        key,
        {
            "benchmark": "frontier",
            "machine": machine(),
            "steps": args.steps,
            "workers": args.workers,
            "inner_steps": 50,
            "arms": results,
        },
    )
    plot(results, RESULTS / f"{key}.png")
    m = machine()
    title = "" if key == "frontier" else f", {args.steps} steps ({args.steps // 50} outer rounds), selected arms"
    no_ddp = (
        ""
        if ran_ddp
        else " DDP was not run: its bytes are those its per-step fp32 all-reduce sends over these"
        " steps, as every run counts them."
    )
    update_benchmarks_md(
        key,
        f"""
## Quality per byte: pseudo-gradient codecs (`scripts/bench_frontier.py`{title})

DiLoCo H=50, {args.workers} worker processes on {m["cpus"]} CPU cores, the quickstart model and
inner hyper-parameters, {args.steps} steps per worker in every arm (equal tokens), {m["date"]},
torch {m["torch"]}. "ef" is error feedback. Ratios are against uncompressed DiLoCo and DDP from
the same run.{no_ddp}

{table}

![validation loss against bytes sent](scripts/results/{key}.png)

Raw results: `scripts/results/{key}.json`.
""",
    )
    print(table)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        s = r["summary"]
        ax.scatter(s["bytes_sent_per_worker"] / 1e6, s["val_loss"], s=40)
        ax.annotate(
            r["name"],
            (s["bytes_sent_per_worker"] / 1e6, s["val_loss"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("MB sent per worker (log)")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
