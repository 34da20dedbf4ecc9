"""Stragglers: 4 workers of speeds 1, 1, 1/2, 1/4 through a coordinator, in the simulator (the real
workers and coordinator on a virtual clock, 0.1 virtual s per full-speed step) and as real processes
(`dilo run`, slowdowns by sleeping, wall-clock time).

    python scripts/bench_stragglers.py          # about 8 minutes on 2 CPU cores

Arms (a 2-layer GPT of width 64, H = 15, outer Nesterov lr 1.0 / momentum 0.5):
- sync:        every round waits for the slowest worker (the baseline);
- semi-sync:   membership.backup_workers = 1 (a round closes without the slowest), late pushes
               folded into the next round at late_weight 0.5;
- compass:     membership.schedule = compass (steps in proportion to each worker's speed);
- time-budget: outer.round_seconds = the fast workers' compute time of a round, token-weighted
               mean (slow workers train fewer steps; real processes: measured from the sync arm);
- dn-dylu:     async local SGD, delayed Nesterov + DyLU, with the world step budget of sync.

Figure: the time each arm needs to reach the sync run's final validation loss, as a ratio to the
sync run's time (real processes: wall seconds of worker 0 without its evaluations). The churn
benchmark (participation-aware weights) is scripts/bench_churn.py.

Results: scripts/results/stragglers.json, stragglers.png and the "stragglers" section of BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, RESULTS, machine, markdown_table, run_arm, update_benchmarks_md, write_json  # noqa: E402

from dilo.config import load  # noqa: E402
from dilo.metrics import read_jsonl  # noqa: E402
from dilo.sim import simulate  # noqa: E402

CONFIG = REPO / "configs" / "quickstart.toml"
STEPS = 240
BASE = [
    "--workers=4", "--heterogeneity.slowdown=[1, 1, 2, 4]", "--inner.warmup_steps=10",
    "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--model.context=64",
    "--data.seq_len=64", "--data.batch_size=8", "--log.eval_every=1", "--log.eval_batches=16",
    "--checkpoint.every=0", "--log.plot=false", "--sim.step_s=0.1",
    "--membership.kind=coordinator", "--membership.heartbeat_timeout_s=600", "--membership.round_timeout_s=600",
]  # fmt: skip
SYNC = ["--outer.kind=diloco", "--outer.inner_steps=15", "--outer.lr=1.0", "--outer.momentum=0.5", f"--steps={STEPS}"]
ARMS: dict[str, list[str]] = {
    "sync": SYNC,
    "semi-sync": [*SYNC, "--membership.backup_workers=1", "--membership.late_weight=0.5"],
    "compass": [*SYNC, "--membership.schedule=compass"],
    "time-budget": [*SYNC, "--outer.weighting=tokens", f"--outer.round_seconds={15 * 0.1 - 0.05}"],
    # async: the same world budget of inner steps (4 x STEPS), delayed Nesterov + DyLU
    "dn-dylu": ["--outer.kind=async", "--outer.inner_steps=15", "--outer.lr=1.0", "--outer.momentum=0.5",
                "--outer.update=delayed_nesterov", "--outer.dylu=true", f"--steps={STEPS}"],
}  # fmt: skip


def arm(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    cfg = load(CONFIG, [*BASE, *overrides, f"--out_dir={out / name}", f"--name={name}"])
    print(f"[bench] {name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
    result = simulate(cfg)
    coord = result.get("coordinator") or {}
    points, t0 = [], None
    for log in sorted((out / name / "logs").glob("*.jsonl")):
        for r in read_jsonl(log):
            if r["event"] == "start":
                t0 = r["time"] if t0 is None else min(t0, r["time"])
            elif r["event"] == "round" and r.get("val_loss") is not None:
                points.append((r["time"], r["val_loss"]))
    curve = sorted((t - (t0 or 0.0), v) for t, v in points)
    final = curve[-1][1]  # the last evaluation, by virtual time
    row = {"name": name, "overrides": overrides, "virtual_s": result["virtual_s"], "curve": curve,
           "final_val_loss": final, "real_s": result["real_s"], "weights": coord.get("participation_weights"),
           "pushes": {m["worker"]: m["pushes"] for m in coord.get("members", [])}}  # fmt: skip
    print(f"[bench] {name}: {result['virtual_s']:.0f} virtual s, val {final:.4f}", file=sys.stderr, flush=True)
    return row


def real_arm(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """The arm as real processes (`dilo run`: a coordinator and 4 workers on loopback)."""
    sim_only = {"--sim.step_s=0.1", "--workers=4"}
    base = [o for o in BASE if o not in sim_only]
    run_arm(f"real-{name}", CONFIG, 4, [*base, *overrides, "--membership.heartbeat_s=0.5"], out)
    records = read_jsonl(out / f"real-{name}" / "logs" / "worker-w0.jsonl")
    t0 = next(r["time"] for r in records if r["event"] == "start")
    curve, evals = [], 0.0
    for r in records:
        if r["event"] == "round":
            evals += r.get("eval_s") or 0.0
            if r.get("val_loss") is not None:
                curve.append((r["time"] - t0 - evals, r["val_loss"]))
    inner = [r["inner_s"] for r in records if r["event"] == "round"]
    print(f"[bench] real-{name}: {curve[-1][0]:.0f} s, val {curve[-1][1]:.4f}", file=sys.stderr, flush=True)
    return {"name": f"real-{name}", "overrides": overrides, "curve": curve, "final_val_loss": curve[-1][1],
            "run_s": curve[-1][0], "median_round_inner_s": sorted(inner)[len(inner) // 2]}  # fmt: skip


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, v in curve if v <= target), None)


def table_of(arms: dict[str, dict[str, Any]], time_key: str) -> tuple[str, list[list[str]]]:
    names = list(arms)
    sync = arms[names[0]]
    target, sync_time = sync["curve"][-1][1], sync[time_key]
    rows = []
    for name, a in arms.items():
        reach = time_to(a["curve"], target)
        a["time_to_sync_loss_ratio"] = None if reach is None else reach / sync_time
        rows.append([
            name, f"{a['curve'][-1][1]:.4f} ({a['curve'][-1][1] / target:.3f}x)",
            "not reached" if reach is None else f"{reach / sync_time:.2f}x", f"{a[time_key] / sync_time:.2f}x",
        ])  # fmt: skip
    header = ["arm", "final val loss (vs sync)", "time to sync's final loss / sync time", "run time / sync time"]
    return markdown_table(header, rows), rows


def plot(sim: dict[str, dict[str, Any]], real: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, arms, unit in ((axes[0], sim, "virtual s"), (axes[1], real, "wall s (evaluations left out)")):
        for i, (name, a) in enumerate(arms.items()):
            t, v = zip(*a["curve"])
            ax.plot(t, v, label=name.removeprefix("real-"), color=f"C{i}")
        ax.axhline(next(iter(arms.values()))["curve"][-1][1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(unit)
        ax.set_ylabel("validation loss")
        ax.legend()
    axes[0].set_title("simulator, speeds 1, 1, 1/2, 1/4")
    axes[1].set_title("real processes, speeds 1, 1, 1/2, 1/4")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="bench-stragglers-"))
    sim = {name: arm(name, overrides, out) for name, overrides in ARMS.items()}
    real: dict[str, dict[str, Any]] = {}
    for name, overrides in ARMS.items():
        if name == "time-budget":  # the fast workers' compute per round, as the sync run measured it
            budget = 0.97 * real["real-sync"]["median_round_inner_s"]
            overrides = [*SYNC, "--outer.weighting=tokens", f"--outer.round_seconds={budget:.3f}"]
        real[f"real-{name}"] = real_arm(name, overrides, out)
    sim_table, _ = table_of(sim, "virtual_s")
    real_table, _ = table_of(real, "run_s")
    write_json("stragglers", {"machine": machine(), "base": BASE, "arms": sim, "real": real})
    plot(sim, real, RESULTS / "stragglers.png")
    target, sync_time = sim["sync"]["curve"][-1][1], sim["sync"]["virtual_s"]
    update_benchmarks_md(
        "stragglers",
        "## Stragglers: semi-synchronous rounds, the compass schedule and time budgets\n\n"
        "`python scripts/bench_stragglers.py`: 4 workers of speeds 1, 1, 1/2, 1/4 through a coordinator, a "
        f"2-layer GPT of width 64, {STEPS} steps per worker for sync (the async arm: the same world budget), "
        f"H = 15. In the simulator sync's final validation loss is {target:.4f} after {sync_time:.0f} virtual s:"
        f"\n\n{sim_table}\n\nThe same arms as real processes (`dilo run`, a coordinator and 4 worker processes "
        "on loopback, the slowdowns by sleeping; time: worker 0's wall seconds without its evaluations; the "
        f"time-budget arm's budget is the sync run's median compute per round):\n\n{real_table}\n\n"
        "Plot: `scripts/results/stragglers.png`.\n",
    )
    print(sim_table)
    print(real_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
