"""Churn: members present in 100%, 100%, 50% and 25% of the rounds, participation-aware (FedAU)
weights against uniform ones, in the simulator (the real workers and coordinator on a virtual clock).

    python scripts/bench_churn.py          # about 4 minutes on 2 CPU cores

4 workers through a coordinator (elastic DiLoCo, a 2-layer GPT of width 64, H = 15, 16 rounds of
1.5 virtual s) on non-IID islands (data.islands = by_source: each worker trains on its own
files). Workers 0 and 1 stay all along; worker 2 leaves after every 4 rounds and comes back 4
rounds later, worker 3 stays 2 rounds of every 8 (sim.events: leave, then join again as a fresh
process that takes the current model). With uniform weights the run leans towards the data of the
members that are there most; membership.participation = "fedau" weighs each update by the mean
interval between its member's participations (about 1 / its participation rate).

Figures, per seed and on average over 3 seeds: the final validation loss (held-out text of every
island) with FedAU weights as a ratio to uniform weights; each member's share of the rounds and
its FedAU weight at the end.

Results: scripts/results/churn.json, churn.png and the "churn" section of BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, RESULTS, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from dilo.config import load  # noqa: E402
from dilo.metrics import read_jsonl  # noqa: E402
from dilo.sim import simulate  # noqa: E402

CONFIG = REPO / "configs" / "quickstart.toml"
STEPS, H, STEP_S = 240, 15, 0.1
ROUND_S = H * STEP_S
SEEDS = (0, 1, 2)
# (leave, join again) pairs in rounds: worker 2 away for rounds 5-8 (of each 8), worker 3 for rounds 3-8
AWAY = {2: [(4, 8), (12, None)], 3: [(2, 8), (10, None)]}
BASE = [
    "--workers=4", "--data.islands=by_source", "--inner.warmup_steps=10",
    "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--model.context=64",
    "--data.seq_len=64", "--data.batch_size=8", "--log.eval_every=1", "--log.eval_batches=16",
    "--checkpoint.every=0", "--log.plot=false", f"--sim.step_s={STEP_S}",
    "--membership.kind=coordinator", "--membership.heartbeat_timeout_s=600", "--membership.round_timeout_s=600",
    "--outer.kind=diloco", f"--outer.inner_steps={H}", "--outer.lr=1.0", "--outer.momentum=0.5", f"--steps={STEPS}",
]  # fmt: skip
ARMS = {"uniform": [], "fedau": ["--membership.participation=fedau"]}


def events() -> str:
    """sim.events as a TOML array: leaves a little before a round's end, joins at a round's end."""
    out = []
    for w, stays in AWAY.items():
        for leave, back in stays:
            out.append(f'{{at_s = {leave * ROUND_S - 0.05:.2f}, worker = {w}, action = "leave"}}')
            if back is not None:
                out.append(f'{{at_s = {back * ROUND_S:.2f}, worker = {w}, action = "join"}}')
    return "--sim.events=[" + ", ".join(out) + "]"


def arm(name: str, seed: int, out: Path) -> dict[str, Any]:
    run = out / f"{name}-{seed}"
    cfg = load(CONFIG, [*BASE, *ARMS[name], events(), f"--seed={seed}", f"--out_dir={run}", f"--name={name}"])
    print(f"[bench] {name} seed {seed}", file=sys.stderr, flush=True)
    result = simulate(cfg)
    rounds = {
        log.stem.removeprefix("worker-"): [r for r in read_jsonl(log) if r["event"] == "round"]
        for log in sorted((run / "logs").glob("*.jsonl"))
    }
    always = rounds["sim0"]
    curve = [(r["time"], r["val_loss"]) for r in always if r.get("val_loss") is not None]
    total = len(always)
    share = {w: round(sum(1 for r in rs if r["committed"]) / total, 3) for w, rs in rounds.items()}
    row = {"arm": name, "seed": seed, "final_val_loss": curve[-1][1], "curve": curve, "rounds": total,
           "presence": share, "weights": (result["coordinator"] or {}).get("participation_weights"),
           "real_s": result["real_s"]}  # fmt: skip
    print(f"[bench] {name} seed {seed}: val {row['final_val_loss']:.4f}, presence {share}", file=sys.stderr)
    return row


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        t, v = zip(*r["curve"])
        ax.plot(t, v, color="C0" if r["arm"] == "uniform" else "C1", alpha=0.8,
                label=r["arm"] if r["seed"] == SEEDS[0] else None)  # fmt: skip
    ax.set_xlabel("virtual seconds")
    ax.set_ylabel("validation loss")
    ax.set_title("churn (presence 100/100/50/25%): uniform vs FedAU weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="bench-churn-"))
    rows = [arm(name, seed, out) for seed in SEEDS for name in ARMS]
    by = {(r["arm"], r["seed"]): r for r in rows}
    ratios = [by[("fedau", s)]["final_val_loss"] / by[("uniform", s)]["final_val_loss"] for s in SEEDS]
    table = markdown_table(
        ["seed", "uniform final val loss", "FedAU final val loss", "FedAU / uniform", "FedAU weights (w0, w1, w2, w3)"],
        [[str(s), f"{by[('uniform', s)]['final_val_loss']:.4f}", f"{by[('fedau', s)]['final_val_loss']:.4f}",
          f"{r:.4f}x", ", ".join(f"{v:.2f}" for v in (by[('fedau', s)]["weights"] or {}).values())]
         for s, r in zip(SEEDS, ratios)],
    )  # fmt: skip
    presence = by[("uniform", SEEDS[0])]["presence"]
    mean = statistics.fmean(ratios)
    write_json("churn", {"machine": machine(), "base": BASE, "away": AWAY, "rows": rows, "ratios": ratios})
    plot(rows, RESULTS / "churn.png")
    update_benchmarks_md(
        "churn",
        "## Churn: participation-aware (FedAU) weights\n\n"
        "`python scripts/bench_churn.py`: elastic DiLoCo through a coordinator in the simulator, 4 workers on "
        f"non-IID islands (by_source), {STEPS // H} rounds of H = {H}; workers 2 and 3 leave and join again "
        f"(sim.events), so that the members' shares of the rounds are "
        f"{', '.join(f'{w} {100 * v:.0f}%' for w, v in presence.items())}. Uniform weights against "
        f"membership.participation = fedau, {len(SEEDS)} seeds.\n\n{table}\n\n"
        f"Mean FedAU / uniform final validation loss: {mean:.4f}x. Plot: `scripts/results/churn.png`.\n",
    )
    print(table)
    print(f"mean ratio {mean:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
