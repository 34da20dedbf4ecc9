"""Byzantine benchmark: 8 DiLoCo workers, one of them sending a wrong (finite) pseudo-gradient
every round, under the plain mean and each robust aggregator ([aggregate]); in the simulator (the
real workers, exchange and outer step in one process on a virtual clock), equal tokens per arm.

    python scripts/bench_byzantine.py            # about 14 minutes on 2 CPU cores

Arms: the clean run (no attacker, plain mean) is the baseline; for each attack (scale: the
pseudo-gradient times -10; random: Gaussian noise of 10 times its norm) the plain mean and every
robust rule; and each robust rule on the clean run, for its cost when nobody attacks. Figures:
final validation loss as a ratio to the clean run's, and bytes per worker as a ratio to the plain
mean's (the robust rules all-gather instead of all-reducing).

Results: scripts/results/byzantine.json, byzantine.png and the "byzantine" section of BENCHMARKS.md.
"""

from __future__ import annotations

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
BASE = [
    "--workers=8", "--steps=150", "--outer.inner_steps=15", "--inner.warmup_steps=10",
    "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--model.context=64",
    "--data.seq_len=64", "--data.batch_size=8", "--log.eval_every=2", "--log.eval_batches=16",
    "--checkpoint.every=0", "--log.plot=false", "--sim.step_s=0.1",
]  # fmt: skip
RULES = {
    "median": ["--aggregate.kind=median"],
    "trimmed_mean": ["--aggregate.kind=trimmed_mean", "--aggregate.trim=1"],
    "centered_clip": ["--aggregate.kind=centered_clip", "--aggregate.tau=1.0", "--aggregate.iterations=3"],
    "krum": ["--aggregate.kind=krum", "--aggregate.byzantine=1"],
    "multikrum": ["--aggregate.kind=multikrum", "--aggregate.byzantine=1", "--aggregate.select=4"],
}
ATTACKS = {
    "scale": ["--heterogeneity.hostile=[7]", "--heterogeneity.attack=scale", "--heterogeneity.attack_scale=-10"],
    "random": ["--heterogeneity.hostile=[7]", "--heterogeneity.attack=random", "--heterogeneity.attack_scale=10"],
}


def arm(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    cfg = load(CONFIG, [*BASE, *overrides, f"--out_dir={out / name}", f"--name={name}"])
    print(f"[bench] {name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
    result = simulate(cfg)
    records = list(read_jsonl(out / name / "logs" / "worker0.jsonl"))
    start = next(r for r in records if r["event"] == "start")
    curve = [(0, start["val_loss"])] + [
        (r["round"], r["val_loss"]) for r in records if r["event"] == "round" and r.get("val_loss") is not None
    ]
    summary = result["summaries"]["0"]
    row = {
        "name": name,
        "overrides": overrides,
        "val_loss": summary["val_loss"],
        "bytes_sent_per_worker": summary["bytes_sent_per_worker"],
        "bytes_recv_per_worker": summary.get("bytes_recv_per_worker"),
        "rounds_committed": summary["rounds_committed"],
        "curve": curve,
        "real_s": result["real_s"],
    }
    print(f"[bench] {name}: val {row['val_loss']:.4f} ({row['real_s']:.0f} s)", file=sys.stderr, flush=True)
    return row


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="bench-byzantine-"))
    arms: dict[str, dict[str, Any]] = {"clean-mean": arm("clean-mean", [], out)}
    for rule, flags in RULES.items():
        arms[f"clean-{rule}"] = arm(f"clean-{rule}", flags, out)
    for attack, flags in ATTACKS.items():
        arms[f"{attack}-mean"] = arm(f"{attack}-mean", flags, out)
        for rule, rflags in RULES.items():
            arms[f"{attack}-{rule}"] = arm(f"{attack}-{rule}", [*flags, *rflags], out)
    clean = arms["clean-mean"]
    rows = []
    for rule in ["mean", *RULES]:
        cells = [rule]
        for attack in ("clean", *ATTACKS):
            a = arms[f"{attack}-{rule}"]
            cells.append(f"{a['val_loss']:.4f} ({a['val_loss'] / clean['val_loss']:.3f}x)")
        mine = arms[f"clean-{rule}"]
        cells.append(f"{mine['bytes_sent_per_worker'] / clean['bytes_sent_per_worker']:.2f}x")
        rows.append(cells)
    table = markdown_table(
        ["aggregate", "no attacker: val loss (vs clean mean)", "1 of 8 sends x -10", "1 of 8 sends noise x 10",
         "bytes sent per worker (vs mean)"],
        rows,
    )  # fmt: skip
    best = {
        attack: min(RULES, key=lambda r: arms[f"{attack}-{r}"]["val_loss"]) for attack in ATTACKS
    }  # the best robust rule under each attack

    def ratio(name: str) -> float:
        return float(arms[name]["val_loss"] / clean["val_loss"])

    readings = [
        f"- {attack}: the best robust rule is {rule} at {ratio(f'{attack}-{rule}'):.3f}x the clean run's validation "
        f"loss (plain mean: {ratio(f'{attack}-mean'):.3f}x); without an attacker {rule} costs "
        f"{ratio(f'clean-{rule}'):.3f}x."
        for attack, rule in best.items()
    ]
    payload = {"machine": machine(), "base": BASE, "arms": arms, "best": best}
    write_json("byzantine", payload)
    plot(arms)
    update_benchmarks_md(
        "byzantine",
        "## Byzantine workers: robust aggregation ([aggregate])\n\n"
        "`python scripts/bench_byzantine.py`: 8 DiLoCo workers in the simulator (the real workers, exchange and "
        "outer step on a virtual clock), a 2-layer GPT of width 64, 150 steps, H = 15, equal tokens per arm; "
        "worker 7 is hostile every round (heterogeneity.hostile). Final validation loss of worker 0 against the "
        "clean run with the plain mean, and bytes each worker sends against the plain mean's.\n\n"
        f"{table}\n\n" + "\n".join(readings) + "\n\n![byzantine](scripts/results/byzantine.png)\n",
    )
    print(table)
    print("\n".join(readings))
    return 0


def plot(arms: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, attack in zip(axes, ("clean", *ATTACKS)):
        for rule in ["mean", *RULES]:
            pts = arms[f"{attack}-{rule}"]["curve"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", ms=3, lw=1, label=rule)
        ax.set_title({"clean": "no attacker", "scale": "1 of 8 sends x -10", "random": "1 of 8 sends noise"}[attack])
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[0].set_ylim(top=min(6.0, axes[0].get_ylim()[1]))
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "byzantine.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
