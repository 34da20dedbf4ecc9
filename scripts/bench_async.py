"""Asynchronous local SGD with heterogeneous workers: does delayed Nesterov + DyLU beat sync DiLoCo?

    .venv/bin/python scripts/bench_async.py [--steps 400] [--real-steps 200] [--skip-real]

Four workers with speeds 1, 1, 1/2 and 1/4 (heterogeneity.slowdown = [1, 1, 2, 4]), the
quickstart model on the stdlib corpus, H = 25. Arms, all in the simulator (dilo/sim/: the real
worker loop and coordinator on a virtual clock, 0.1 virtual s per full-speed step):

- sync:      synchronous DiLoCo (outer Nesterov lr 1.0, momentum 0.5); every round waits for the
             slowest worker. `steps` inner steps per worker: the baseline.
- naive:     async, each push straight into the same outer Nesterov (and naive-lr0.25: with a
             quarter of its learning rate, the per-push share delayed Nesterov uses).
- dn:        async, delayed Nesterov (buffer = members, same lr and momentum), fixed H.
- dn-dylu:   delayed Nesterov + dynamic local updates (H for the fastest, in proportion for the rest).
- fedbuff:   async, buffer of 4 pushes, their mean into outer SGD (lr 1.0, momentum 0.5).
- dn-lr0.5, dn-dylu-lr0.5, dn-dylu-lr2: the delayed-Nesterov arms at other outer learning rates
             (the 1.0 / 0.5 pair was tuned for sync DiLoCo on this model).

The async arms get a budget of world inner steps that lasts about 0.7x the sync run's virtual
time when every worker is busy, so that "time to reach the sync run's final loss" can be read
off. One extra arm runs dn-dylu as real processes (`dilo run`, slowdown by sleeping) next to a
real sync run, to check the simulator's conclusion on the wall clock. Each figure is a ratio to
the sync arm of the same run. Writes scripts/results/async.json, async.md, async.png and the
"async" section of BENCHMARKS.md. A 16-worker simulator timing is recorded as well.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, RESULTS, machine, markdown_table, run_arm, update_benchmarks_md, write_json

sys.path.insert(0, str(REPO))

from dilo.config import load  # noqa: E402
from dilo.sim import simulate  # noqa: E402

CONFIG = REPO / "configs" / "async.toml"
# switching outer.kind drops the file's [outer] table: restate H and the outer optimizer
SYNC = [
    "--membership.kind=static",
    "--outer.kind=diloco",
    "--outer.inner_steps=25",
    "--outer.lr=1.0",
    "--outer.momentum=0.5",
]
ASYNC = ["--outer.lr=1.0", "--outer.momentum=0.5"]
ARMS: list[tuple[str, list[str]]] = [
    ("sync", SYNC),
    ("naive", [*ASYNC, "--outer.update=nesterov", "--outer.dylu=false"]),
    ("naive-lr0.25", ["--outer.lr=0.25", "--outer.momentum=0.5", "--outer.update=nesterov", "--outer.dylu=false"]),
    ("dn", [*ASYNC, "--outer.update=delayed_nesterov", "--outer.dylu=false"]),
    ("dn-dylu", [*ASYNC, "--outer.update=delayed_nesterov", "--outer.dylu=true"]),
    ("fedbuff", [*ASYNC, "--outer.update=fedbuff", "--outer.buffer=4", "--outer.dylu=false"]),
    # the outer lr was tuned for sync DiLoCo; a small sweep for the two delayed-Nesterov arms
    ("dn-lr0.5", ["--outer.lr=0.5", "--outer.momentum=0.5", "--outer.update=delayed_nesterov", "--outer.dylu=false"]),
    (
        "dn-dylu-lr0.5",
        ["--outer.lr=0.5", "--outer.momentum=0.5", "--outer.update=delayed_nesterov", "--outer.dylu=true"],
    ),
    ("dn-dylu-lr2", ["--outer.lr=2.0", "--outer.momentum=0.5", "--outer.update=delayed_nesterov", "--outer.dylu=true"]),
]
SPEEDS = [1, 1, 2, 4]


def curve(run_dir: Path) -> list[dict[str, float]]:
    """Every evaluation the workers logged, as (seconds since the first worker started, server
    version, validation loss). A static world's workers log the same evaluation: worker 0 only."""
    logs = sorted((run_dir / "logs").glob("*.jsonl"))
    if (run_dir / "logs" / "worker0.jsonl").exists():
        logs = [run_dir / "logs" / "worker0.jsonl"]
    starts, points = [], []
    for path in logs:
        for r in map(json.loads, path.read_text().splitlines()):
            if r["event"] == "start":
                starts.append(r["time"])
            elif r["event"] == "round" and r.get("val_loss") is not None:
                points.append({"time": r["time"], "version": r["version"], "val_loss": r["val_loss"]})
    t0 = min(starts, default=0.0)
    for p in points:
        p["time"] -= t0
    return sorted(points, key=lambda p: (p["time"], p["version"]))


def sim_arm(name: str, overrides: list[str], out: Path, cache: Path) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([str(CONFIG), overrides]).encode()).hexdigest()[:12]
    key = cache / f"sim-{name}-{digest}.json"
    if key.exists():
        return json.loads(key.read_text())
    cfg = load(CONFIG, [*overrides, f"--out_dir={out / name}", f"--name={name}", "--log.plot=false"])
    print(f"[bench] sim {name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
    result = simulate(cfg)
    points = curve(out / name)
    coord = result.get("coordinator") or {}
    summaries = list(result["summaries"].values())
    out_row = {
        "name": name,
        "overrides": overrides,
        "virtual_s": result["virtual_s"],
        "real_s": result["real_s"],
        "curve": points,
        "final_val_loss": points[-1]["val_loss"],
        "updates": coord.get("applied") if coord else summaries[0]["rounds_committed"],
        "world_steps": coord.get("steps") if coord else sum(s["steps"] for s in summaries),
        "steps_per_worker": [s["steps"] for s in summaries],
        "bytes_sent_per_worker": sum(s["bytes_sent_per_worker"] for s in summaries) / len(summaries),
        "mean_staleness": _mean_staleness(coord),
    }
    cache.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(out_row))
    print(
        f"[bench] sim {name}: val {out_row['final_val_loss']:.4f} after {out_row['virtual_s']:.0f} virtual s "
        f"({out_row['real_s']:.0f} s real), {out_row['updates']} updates",
        file=sys.stderr,
        flush=True,
    )
    return out_row


def _mean_staleness(coord: dict[str, Any]) -> float | None:
    return coord["staleness"]["mean"] if coord else None


def time_to(points: list[dict[str, float]], target: float) -> float | None:
    for p in points:
        if p["val_loss"] <= target:
            return p["time"]
    return None


def loss_at_update(points: list[dict[str, float]], update: int) -> float | None:
    """The loss of the first evaluation of a model with at least `update` server updates."""
    for p in sorted(points, key=lambda p: (p["version"], p["time"])):
        if p["version"] >= update:
            return p["val_loss"]
    return None


def real_arm(name: str, overrides: list[str], out: Path, cache: Path) -> dict[str, Any]:
    """`dilo run` with 4 processes; the curve of every worker's evaluations on the wall clock."""
    digest = hashlib.sha256(json.dumps([str(CONFIG), overrides]).encode()).hexdigest()[:12]
    key = cache / f"real-{name}-{digest}.json"
    if key.exists():
        return json.loads(key.read_text())
    res = run_arm(name, CONFIG, 4, [*overrides, "--checkpoint.every=0"], out)
    res["points"] = curve(out / name)
    cache.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="inner steps per worker of the sync arm")
    ap.add_argument("--real-steps", type=int, default=200, help="inner steps per worker of the real sync arm")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--cache", default=str(REPO / ".bench-cache" / "async"))
    args = ap.parse_args()
    cache = Path(args.cache)
    # async budget (steps * workers): the world's step rate is sum(1 / slowdown) full-speed steps per
    # step_s, the sync run lasts steps * max(slowdown) step_s; give async 0.7x that time
    rate = sum(1 / s for s in SPEEDS)
    async_steps = int(0.7 * args.steps * max(SPEEDS) * rate / len(SPEEDS))
    out = Path(tempfile.mkdtemp(prefix="dilo-async-"))
    try:
        arms = []
        for name, overrides in ARMS:
            steps = args.steps if name == "sync" else async_steps
            arms.append(sim_arm(name, [*overrides, f"--steps={steps}", "--checkpoint.every=0"], out, cache))
        t0 = time.perf_counter()
        sixteen = simulate(
            load(CONFIG, ["--workers=16", "--steps=50", f"--out_dir={out / 'sixteen'}", "--log.plot=false"])
        )
        sixteen_s = time.perf_counter() - t0
        real: dict[str, Any] = {}
        if not args.skip_real:
            async_real_steps = int(0.7 * args.real_steps * max(SPEEDS) * rate / len(SPEEDS))
            for name, overrides, steps in (
                ("real-sync", SYNC, args.real_steps),
                ("real-dn-dylu", dict(ARMS)["dn-dylu"], async_real_steps),
            ):
                real[name] = real_arm(name, [*overrides, f"--steps={steps}"], out, cache)
        report(arms, real, sixteen, sixteen_s, args, async_steps)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def report(
    arms: list[dict[str, Any]],
    real: dict[str, Any],
    sixteen: dict[str, Any],
    sixteen_s: float,
    args: argparse.Namespace,
    async_steps: int,
) -> None:
    sync = arms[0]
    target, sync_time, sync_updates = sync["final_val_loss"], sync["virtual_s"], sync["updates"]
    rows, table = [], []
    for a in arms:
        reach = time_to(a["curve"], target)
        at_sync_updates = loss_at_update(a["curve"], sync_updates)
        row = {
            "arm": a["name"],
            "final_val_loss": a["final_val_loss"],
            "final_loss_ratio": a["final_val_loss"] / target,
            "virtual_s": a["virtual_s"],
            "time_ratio": a["virtual_s"] / sync_time,
            "time_to_sync_loss_ratio": reach / sync_time if reach is not None else None,
            "updates": a["updates"],
            "loss_at_sync_updates": at_sync_updates,
            "world_steps": a["world_steps"],
            "steps_per_worker": a["steps_per_worker"],
            "bytes_ratio": a["bytes_sent_per_worker"] / sync["bytes_sent_per_worker"],
            "mean_staleness": a["mean_staleness"],
            "real_s": a["real_s"],
        }
        rows.append(row)
        table.append(
            [
                a["name"],
                f"{row['final_val_loss']:.4f} ({row['final_loss_ratio']:.3f}x)",
                "not reached" if row["time_to_sync_loss_ratio"] is None else f"{row['time_to_sync_loss_ratio']:.2f}x",
                f"{row['time_ratio']:.2f}x",
                f"{row['updates']}",
                "-" if at_sync_updates is None else f"{at_sync_updates:.4f}",
                "/".join(str(s) for s in row["steps_per_worker"]),
                "-" if row["mean_staleness"] is None else f"{row['mean_staleness']:.2f}",
                f"{row['bytes_ratio']:.2f}x",
            ]
        )
    header = [
        "arm",
        "final val loss (vs sync)",
        "time to sync's final loss / sync time",
        "run time / sync time",
        "server updates",
        f"val loss after {sync_updates} updates",
        "steps per worker",
        "mean staleness",
        "bytes sent / worker vs sync",
    ]
    md = [
        f"Simulator, 4 workers with speeds 1, 1, 1/2, 1/4, quickstart model, H=25; sync: {args.steps} steps "
        f"per worker ({sync_time:.0f} virtual s); async arms: a budget of {async_steps * 4} world steps. "
        f"Sync's final validation loss is {target:.4f}.",
        "",
        markdown_table(header, table),
        "",
        f"16 virtual workers, 50 steps each (800 inner steps of the quickstart model): {sixteen_s:.0f} s of real "
        f"time for {sixteen['virtual_s']:.0f} virtual s.",
    ]
    real_rows = {}
    if real:
        rs, ra = real["real-sync"], real["real-dn-dylu"]
        target_r = rs["summary"]["val_loss"]
        reach = time_to(ra["points"], target_r)
        real_rows = {
            "sync": {"val_loss": target_r, "wall_s": rs["summary"]["wall_s"], "steps": args.real_steps},
            "dn_dylu": {
                "val_loss": ra["summary"]["val_loss"],
                "wall_s": ra["summary"]["wall_s"],
                "time_to_sync_loss_s": reach,
            },
        }
        md += [
            "",
            f"Real processes (`dilo run`, 2 CPU cores, slowdown by sleeping): sync DiLoCo {args.real_steps} steps per "
            f"worker reached {target_r:.4f} in {rs['summary']['wall_s']:.0f} s; DN+DyLU reached "
            f"{ra['summary']['val_loss']:.4f} in {ra['summary']['wall_s']:.0f} s "
            f"({ra['summary']['wall_s'] / rs['summary']['wall_s']:.2f}x), and sync's final loss "
            + ("never" if reach is None else f"after {reach:.0f} s ({reach / rs['summary']['wall_s']:.2f}x)")
            + ".",
        ]
    payload = {
        "machine": machine(),
        "steps": args.steps,
        "async_world_steps": async_steps * 4,
        "speeds": SPEEDS,
        "arms": rows,
        "curves": {a["name"]: a["curve"] for a in arms},
        "sixteen_workers": {"real_s": sixteen_s, "virtual_s": sixteen["virtual_s"]},
        "real": real_rows,
    }
    write_json("async", payload)
    (RESULTS / "async.md").write_text("\n".join(md) + "\n")
    plot(arms)
    update_benchmarks_md(
        "async",
        "## Asynchronous local SGD, heterogeneous workers\n\n"
        + "\n".join(md)
        + "\n\n![async](scripts/results/async.png)",
    )
    print("\n".join(md))


def plot(arms: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for a in arms:
        pts = a["curve"]
        ax1.plot([p["version"] for p in pts], [p["val_loss"] for p in pts], ".-", ms=3, lw=1, label=a["name"])
        ax2.plot([p["time"] for p in pts], [p["val_loss"] for p in pts], ".-", ms=3, lw=1, label=a["name"])
    target = arms[0]["final_val_loss"]
    for ax, xl in ((ax1, "server updates (outer steps)"), (ax2, "virtual time (s)")):
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
    ax1.set_xscale("log")
    ax2.legend()
    fig.suptitle("4 workers, speeds 1, 1, 1/2, 1/4 (simulator)")
    fig.tight_layout()
    fig.savefig(RESULTS / "async.png", dpi=120)


if __name__ == "__main__":
    main()
