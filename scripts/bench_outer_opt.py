"""Outer optimizers: DiLoCo's Nesterov SGD against FedAdam and FedYogi at H = 50 and H = 10, each
with its outer learning rate picked by a small sweep the script runs; and FedProx on non-IID
islands against plain DiLoCo. 4 workers in the simulator (the real workers and exchange on a
virtual clock), a 2-layer GPT of width 64, equal tokens per arm.

    python scripts/bench_outer_opt.py          # about 15 minutes on 2 CPU cores (27 arms)

Figure: each arm's best final validation loss, as a ratio to Nesterov's at the same H (and, for
FedProx, to DiLoCo without it on the same islands). Results: scripts/results/outer_opt.json and
the "outer-opt" section of BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, RESULTS, machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from dilo.config import load  # noqa: E402
from dilo.sim import simulate  # noqa: E402

CONFIG = REPO / "configs" / "quickstart.toml"
BASE = [
    "--workers=4", "--steps=200", "--inner.warmup_steps=10",
    "--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--model.context=64",
    "--data.seq_len=64", "--data.batch_size=8", "--log.eval_every=0", "--log.eval_batches=16",
    "--checkpoint.every=0", "--log.plot=false",
]  # fmt: skip
SWEEPS: dict[str, tuple[list[str], list[float]]] = {
    # (flags, outer learning rates tried)
    "nesterov": (["--outer.optimizer=sgd", "--outer.momentum=0.5", "--outer.nesterov=true"], [0.5, 1.0]),
    # FedOpt moves each element by about lr per round (m / sqrt(v) ~ 1): lr near a pseudo-gradient's
    # typical element (0.01 and 0.03 were far too small on this model: 3.85 and 2.95 at H = 50)
    "fedadam": (["--outer.optimizer=fedadam", "--outer.optimizer_args={tau = 0.01}"], [0.03, 0.1, 0.3]),
    "fedyogi": (["--outer.optimizer=fedyogi", "--outer.optimizer_args={tau = 0.01}"], [0.03, 0.1, 0.3]),
}
TAUS = (0.001, 0.1)
"""Tried at the best lr of the tau = 0.01 sweep."""


def arm(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    cfg = load(CONFIG, [*BASE, *overrides, f"--out_dir={out / name}", f"--name={name}"])
    print(f"[bench] {name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
    result = simulate(cfg)
    summary = result["summaries"]["0"]
    print(f"[bench] {name}: val {summary['val_loss']:.4f} ({result['real_s']:.0f} s)", file=sys.stderr, flush=True)
    return {"name": name, "overrides": overrides, "val_loss": summary["val_loss"], "real_s": result["real_s"]}


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="bench-outer-opt-"))
    arms: dict[str, dict[str, Any]] = {}
    best: dict[str, dict[str, Any]] = {}
    for h in (50, 10):
        for opt, (flags, lrs) in SWEEPS.items():
            tried = [
                arm(f"h{h}-{opt}-lr{lr}", [f"--outer.inner_steps={h}", *flags, f"--outer.lr={lr}"], out) for lr in lrs
            ]
            if opt != "nesterov":  # second stage: tau, the adaptivity, at the best lr of the first
                lr = min(tried, key=lambda a: a["val_loss"])["name"].rsplit("-lr", 1)[1]
                tried += [
                    arm(
                        f"h{h}-{opt}-lr{lr}-tau{tau}",
                        [
                            f"--outer.inner_steps={h}",
                            flags[0],
                            f"--outer.optimizer_args={{tau = {tau}}}",
                            f"--outer.lr={lr}",
                        ],
                        out,
                    )  # fmt: skip
                    for tau in TAUS
                ]
            for a in tried:
                arms[a["name"]] = a
            best[f"h{h}-{opt}"] = min(tried, key=lambda a: a["val_loss"])
    prox: dict[str, dict[str, Any]] = {}
    for name, extra in (("noniid-diloco", []), ("noniid-fedprox", ["--outer.prox_mu=0.01"]),
                        ("noniid-fedprox-0.1", ["--outer.prox_mu=0.1"])):  # fmt: skip
        prox[name] = arm(name, ["--outer.inner_steps=50", "--outer.lr=1.0", "--data.islands=by_source", *extra], out)
    rows = []
    for h in (50, 10):
        base = best[f"h{h}-nesterov"]["val_loss"]
        for opt in SWEEPS:
            b = best[f"h{h}-{opt}"]
            lr, _, tau = b["name"].rsplit("-lr", 1)[1].partition("-tau")
            rows.append([f"{h}", opt, lr, tau or ("0.01" if opt != "nesterov" else "-"),
                         f"{b['val_loss']:.4f} ({b['val_loss'] / base:.3f}x)"])  # fmt: skip
    table = markdown_table(
        ["H", "outer optimizer", "best outer lr", "best tau", "val loss (vs Nesterov at that H)"], rows
    )
    plain = prox["noniid-diloco"]["val_loss"]
    prox_table = markdown_table(
        ["arm", "val loss (vs DiLoCo on the same islands)"],
        [[n, f"{a['val_loss']:.4f} ({a['val_loss'] / plain:.3f}x)"] for n, a in prox.items()],
    )
    write_json("outer_opt", {"machine": machine(), "base": BASE, "arms": arms, "best": best, "fedprox": prox})
    plot(best, prox, RESULTS / "outer_opt.png")
    update_benchmarks_md(
        "outer-opt",
        "## Outer optimizers and FedProx\n\n"
        "`python scripts/bench_outer_opt.py`: 4 workers in the simulator, a 2-layer GPT of width 64, 200 steps per "
        "worker, equal tokens; each outer optimizer with the best of its swept outer learning rates (Nesterov "
        "0.5 / 1.0, FedOpt 0.03 / 0.1 / 0.3 with tau = 0.01, then tau 0.001 / 0.1 at the best of those, "
        "betas 0.9 / 0.99).\n\n"
        f"{table}\n\nFedProx (mu = 0.01 and 0.1) on non-IID islands (data.islands = by_source), H = 50, outer "
        f"SGD lr 1.0 momentum 0.5 (plot: `scripts/results/outer_opt.png`):\n\n{prox_table}\n",
    )
    print(table)
    print(prox_table)
    return 0


def plot(best: dict[str, dict[str, Any]], prox: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, h in enumerate((50, 10)):
        base = best[f"h{h}-nesterov"]["val_loss"]
        axes[0].bar([x + 0.4 * i for x in range(len(SWEEPS))], [best[f"h{h}-{o}"]["val_loss"] / base for o in SWEEPS],
                    width=0.4, label=f"H = {h}")  # fmt: skip
    axes[0].set_xticks([x + 0.2 for x in range(len(SWEEPS))], list(SWEEPS))
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("best val loss / Nesterov's")
    axes[0].legend()
    plain = prox["noniid-diloco"]["val_loss"]
    axes[1].bar(list(prox), [a["val_loss"] / plain for a in prox.values()], color="C2")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set_ylabel("val loss / DiLoCo on the same islands")
    axes[1].set_ylim(0.9, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
