"""Stragglers: 4 workers of speeds 1, 1, 1/2, 1/4 through a coordinator, in the simulator (the real
workers and coordinator on a virtual clock, 0.1 virtual s per full-speed step).

    python scripts/bench_stragglers.py          # about 3 minutes on 2 CPU cores

Arms (a 2-layer GPT of width 64, H = 15, outer Nesterov lr 1.0 / momentum 0.5):
- sync:       every round waits for the slowest worker (the baseline);
- semi-sync:  membership.backup_workers = 1 (a round closes without the slowest), late pushes
              folded into the next round at late_weight 0.5;
- compass:    membership.schedule = compass (steps in proportion to each worker's speed);
- dn-dylu:    async local SGD, delayed Nesterov + DyLU, with the world step budget of sync.

Figure: the virtual time each arm needs to reach the sync run's final validation loss, as a ratio
to the sync run's time.

Churn (participation-aware weights): 4 workers of speeds 1, 1, 1, 1/4 on non-IID islands
(data.islands = by_source) with membership.backup_workers = 1, so that the slow worker takes part
in only some rounds (its late pushes dropped): uniform weights against membership.participation
= fedau; figures: final validation loss against uniform's, and each worker's participation
(rounds it contributed to) and FedAU weight.

Results: scripts/results/stragglers.json and the "stragglers" section of BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

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
    # async: the same world budget of inner steps (4 x STEPS), delayed Nesterov + DyLU
    "dn-dylu": ["--outer.kind=async", "--outer.inner_steps=15", "--outer.lr=1.0", "--outer.momentum=0.5",
                "--outer.update=delayed_nesterov", "--outer.dylu=true", f"--steps={STEPS}"],
}  # fmt: skip
# speeds 1, 1, 1, 1/4 with one backup worker: the slow worker's pushes mostly miss their round (it
# catches up from the current state) and count only now and then: a member present in few rounds
CHURN = [*SYNC, "--data.islands=by_source", "--membership.backup_workers=1", "--heterogeneity.slowdown=[1, 1, 1, 4]"]
CHURN_ARMS: dict[str, list[str]] = {
    "churn-uniform": CHURN,
    "churn-fedau": [*CHURN, "--membership.participation=fedau"],
}


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


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, v in curve if v <= target), None)


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="bench-stragglers-"))
    arms = {name: arm(name, overrides, out) for name, overrides in {**ARMS, **CHURN_ARMS}.items()}
    sync = arms["sync"]
    target, sync_time = sync["curve"][-1][1], sync["virtual_s"]
    rows = []
    for name, a in ((n, arms[n]) for n in ARMS):
        reach = time_to(a["curve"], target)
        a["time_to_sync_loss_ratio"] = None if reach is None else reach / sync_time
        rows.append([
            name, f"{a['curve'][-1][1]:.4f} ({a['curve'][-1][1] / target:.3f}x)",
            "not reached" if reach is None else f"{reach / sync_time:.2f}x", f"{a['virtual_s'] / sync_time:.2f}x",
        ])  # fmt: skip
    table = markdown_table(
        ["arm", "final val loss (vs sync)", "time to sync's final loss / sync time", "run time / sync time"], rows
    )
    uniform = arms["churn-uniform"]["final_val_loss"]
    churn = markdown_table(
        ["weights", "final val loss (vs uniform)", "FedAU weight per worker"],
        [[n.removeprefix("churn-"), f"{arms[n]['final_val_loss']:.4f} ({arms[n]['final_val_loss'] / uniform:.3f}x)",
          ", ".join(f"{w} {v:.2f}" for w, v in (arms[n]["weights"] or {}).items()) or "-"]
         for n in CHURN_ARMS],
    )  # fmt: skip
    write_json("stragglers", {"machine": machine(), "base": BASE, "arms": arms})
    update_benchmarks_md(
        "stragglers",
        "## Stragglers: semi-synchronous rounds and the compass schedule\n\n"
        "`python scripts/bench_stragglers.py`: 4 workers of speeds 1, 1, 1/2, 1/4 through a coordinator in the "
        f"simulator, a 2-layer GPT of width 64, {STEPS} steps per worker for sync (the async arm: the same world "
        f"budget), H = 15. Sync's final validation loss is {target:.4f} after {sync_time:.0f} virtual s.\n\n"
        f"{table}\n\nChurn on non-IID islands (by_source), speeds 1, 1, 1, 1/4 and backup_workers = 1: the slow "
        "worker takes part in only some rounds; participation-aware (FedAU) weights against uniform ones."
        f"\n\n{churn}\n",
    )
    print(table)
    print(churn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
