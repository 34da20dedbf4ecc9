"""The outer step hidden behind compute: outer.overlap and Streaming DiLoCo against blocking
DiLoCo and DDP on an emulated 100 Mbit/s, 50 ms link.

    sudo .venv/bin/python scripts/bench_overlap.py [--steps 200] [--inner-steps 10] [--print-only]

The setting of scripts/bench_wan.py (four `python -m dilo.train` processes, one network namespace
each, `tc tbf` uplinks and 50 ms one-way latency, a static Gloo world, the quickstart model and
data), with H = 10 so that a blocking outer step costs a large share of a round: that is where
hiding it matters. Arms, all fp32 on the wire, the same steps and data:

- ddp:             gradients all-reduced every step (evaluated every H steps, like a round);
- diloco:          blocking DiLoCo, H inner steps per round;
- diloco+overlap:  outer.overlap: round t's exchange runs while round t + 1 trains;
- streaming:       Streaming DiLoCo, outer.fragments = 2 (the model's two blocks), one fragment
                   every H / 2 steps, fragment_delay = 2 steps, mixing 0.5.

Per arm: compute utilization (inner seconds over the training loop's wall seconds, evaluations
left out), the share of a round the outer step costs, time to the common target loss (the highest
final validation loss among the arms), bytes and the final validation loss, each also as a ratio
to DDP and to blocking DiLoCo in the same run. Needs root (network namespaces, tc); about 12
minutes on 2 cores. Finished arms are cached in .bench-cache/overlap. Writes
scripts/results/overlap.json, overlap.png and the "overlap" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import bench_wan
from bench_wan import link_rows, run_arm
from benchlib import REPO, RESULTS, machine, markdown_table, update_benchmarks_md, write_json

from dilo.testing import netns

LINK = "100mbit"
ARMS = ("ddp", "diloco", "diloco+overlap", "streaming")


def overrides(arm: str, steps: int, h: int) -> list[str]:
    base = [f"--steps={steps}", f"--inner.warmup_steps={min(40, max(1, steps // 5))}", "--log.eval_every=1"]
    diloco = ["--outer.kind=diloco", f"--outer.inner_steps={h}"]
    strategy = {
        "ddp": ["--outer.kind=ddp", f"--sync_every_ddp_eval={h}"],
        "diloco": diloco,
        "diloco+overlap": [*diloco, "--outer.overlap=true"],
        "streaming": [*diloco, "--outer.fragments=2", "--outer.fragment_delay=2", "--outer.mixing=0.5"],
    }[arm]
    return [*base, *strategy]


def rows_of(results: dict[str, dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    target, rows = link_rows(results)
    blocking = next(r for r in rows if r["arm"] == "diloco")
    for r in rows:
        rounds_s = (r["inner_ms_per_step"] + r["sync_ms_per_step"]) * r["steps"] / 1e3
        r["sync_share"] = r["sync_ms_per_step"] * r["steps"] / 1e3 / rounds_s if rounds_s else None
        r["val_loss_vs_diloco"] = r["val_loss"] / blocking["val_loss"]
        r["utilization_vs_diloco"] = r["utilization"] / blocking["utilization"]
        reach, base = r["time_to_target_s"], blocking["time_to_target_s"]
        r["time_to_target_vs_diloco"] = reach / base if reach is not None and base else None
    return target, rows


def table(rows: list[dict[str, Any]]) -> str:
    body = [
        [
            r["arm"],
            f"{r['utilization']:.1%} ({x(r['utilization_vs_diloco'], 3)})",
            f"{r['sync_share']:.1%}",
            "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.0f} s",
            x(r["time_to_target_vs_ddp"]),
            x(r["time_to_target_vs_diloco"]),
            f"{r['bytes_sent_per_worker'] / 1e6:.1f} MB ({x(r['bytes_fewer_than_ddp'], 1)} fewer)",
            f"{r['val_loss']:.4f} ({r['val_loss_vs_diloco']:.3f}x)",
        ]
        for r in rows
    ]
    header = [
        "arm",
        "compute utilization (vs blocking DiLoCo)",
        "outer step's share of the loop",
        "time to target",
        "vs DDP",
        "vs blocking DiLoCo",
        "bytes sent / worker (vs DDP)",
        "final val loss (vs blocking DiLoCo)",
    ]
    return markdown_table(header, body)


def x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def readings(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["arm"]: r for r in rows}
    d = by["diloco"]
    out = [
        f"- Blocking DiLoCo spends {d['sync_share']:.0%} of its loop in the outer step "
        f"({d['sync_ms_per_step'] * d['steps'] / max(1, d['rounds']) / 1e3:.2f} s per round of "
        f"{d['inner_ms_per_step'] * d['steps'] / max(1, d['rounds']) / 1e3:.2f} s of compute)."
    ]
    for arm in ("diloco+overlap", "streaming"):
        r = by.get(arm)
        if r is None:
            continue
        out.append(
            f"- {arm}: compute utilization {r['utilization']:.1%} ({r['utilization_vs_diloco']:.3f}x blocking "
            f"DiLoCo's {d['utilization']:.1%}); final loss {r['val_loss_vs_diloco']:.3f}x blocking DiLoCo's; "
            f"time to the target {x(r['time_to_target_vs_diloco'])}."
        )
    s = by.get("streaming")
    if s is not None:
        out.append(
            "- Streaming logs (and here evaluates) at every send and every apply: twice per H / 2 steps, so its "
            f"utilization with evaluations ({s['utilization_with_eval']:.1%}) counts four times blocking DiLoCo's "
            "evaluations; the compute utilization column leaves evaluations out for every arm."
        )
    return out


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, res in results.items():
        curve = res["curve"]
        ax.plot([p["wall_s"] for p in curve], [p["val_loss"] for p in curve], marker=".", label=arm)
    ax.set_xlabel("wall seconds (worker 0)")
    ax.set_ylabel("validation loss")
    ax.set_title("100 Mbit/s, 50 ms: hiding the outer step behind compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--print-only", action="store_true", help="write nothing under scripts/")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--cache", default=str(REPO / ".bench-cache" / "overlap"))
    args = ap.parse_args()
    for why in (netns.available(), netns.latency_available()):
        if why is not None:
            print(f"bench_overlap: cannot emulate the link here: {why}", file=sys.stderr)
            return 2
    out = Path(tempfile.mkdtemp(prefix="dilo-overlap-"))
    cache = None if args.print_only else Path(args.cache)
    results = {
        arm: run_arm(LINK, arm, overrides(arm, args.steps, args.inner_steps), out, cache, args.timeout) for arm in ARMS
    }
    target, rows = rows_of(results)
    md = [
        f"{bench_wan.WORKERS} workers on emulated {LINK} uplinks with {bench_wan.LATENCY_MS:.0f} ms one-way latency "
        f"(the setting of bench_wan), the quickstart model ({results['ddp']['num_params']:,} parameters), "
        f"{args.steps} steps, H = {args.inner_steps}, fp32 on the wire. Target loss {target:.4f} (the highest final "
        "loss among the arms). Streaming: 2 fragments, fragment_delay 2, mixing 0.5.",
        "",
        table(rows),
        "",
        *readings(rows),
        "",
        "![overlap](scripts/results/overlap.png)",
    ]
    print("\n".join(md))
    if not args.print_only:
        payload = {
            "machine": machine(),
            "link": LINK,
            "steps": args.steps,
            "inner_steps": args.inner_steps,
            "target_loss": target,
            "arms": rows,
        }
        write_json("overlap", payload)
        plot(results, RESULTS / "overlap.png")
        update_benchmarks_md("overlap", "## Overlap and Streaming DiLoCo on a slow link\n\n" + "\n".join(md))
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
