"""Gossip averaging: the vanishing-variance experiment, and gossip against DiLoCo and DDP.

    .venv/bin/python scripts/bench_gossip.py [--steps 400] [--variance-steps 300] [--only variance|compare]

1. Vanishing variance. 8 workers start from independent initialisations (outer.independent_init)
   and gossip over a ring every 10 steps: plain averaging against variance-corrected averaging.
   Per-layer weight std (mean over the matrices, relative to the first round's before-merge
   value) and validation loss over rounds.
2. Gossip (ring, exponential), DiLoCo H=25 and DDP, 4 workers, the quickstart model, equal tokens:
   validation loss and bytes sent per worker, as ratios to DiLoCo.

Every arm runs as real processes (`dilo run`, peers on loopback). Writes scripts/results/gossip.json,
gossip.md, gossip-variance.png and the "gossip" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import REPO, RESULTS, machine, markdown_table, run_arm, update_benchmarks_md, write_json

CONFIG = REPO / "configs" / "quickstart.toml"
GOSSIP = ["--outer.kind=gossip", "--outer.peer_timeout_s=60"]


def rounds_of(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for path in sorted((run_dir / "logs").glob("*.jsonl")):
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        out[path.stem] = recs
    return out


def arm(name: str, overrides: list[str], workers: int, out: Path, cache: Path) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([str(CONFIG), workers, overrides]).encode()).hexdigest()[:12]
    key = cache / f"{name}-{digest}.json"
    if key.exists():
        return json.loads(key.read_text())
    res = run_arm(name, CONFIG, workers, [*overrides, "--checkpoint.every=0"], out)
    res["logs"] = rounds_of(out / name)
    cache.mkdir(parents=True, exist_ok=True)
    key.write_text(json.dumps(res))
    return res


def variance_curves(res: dict[str, Any]) -> dict[str, list[float]]:
    """Per round, averaged over workers and over the weight matrices: the std after the merge
    relative to round 1's before-merge std, the std after the merge relative to just before it (what
    the merge itself does), and the validation loss."""
    std_rel: dict[int, list[float]] = {}
    merge: dict[int, list[float]] = {}
    loss: dict[int, list[float]] = {}
    for recs in res["logs"].values():
        rounds = [r for r in recs if r["event"] == "round"]
        if not rounds:
            continue
        ref = {k: v for k, v in rounds[0]["layer_std"]["before"].items() if k.endswith("weight") and "ln" not in k}
        for r in rounds:
            after, before = r["layer_std"]["after"], r["layer_std"]["before"]
            rel = [after[k] / v for k, v in ref.items() if v > 0]
            std_rel.setdefault(r["round"], []).append(sum(rel) / len(rel))
            ratio = [after[k] / before[k] for k in ref if before[k] > 0]
            merge.setdefault(r["round"], []).append(sum(ratio) / len(ratio))
            if r.get("val_loss") is not None:
                loss.setdefault(r["round"], []).append(r["val_loss"])
    rounds = sorted(std_rel)
    return {
        "round": rounds,
        "std_rel": [sum(std_rel[k]) / len(std_rel[k]) for k in rounds],
        "merge_ratio": [sum(merge[k]) / len(merge[k]) for k in rounds],
        "loss_round": sorted(loss),
        "val_loss": [sum(loss[k]) / len(loss[k]) for k in sorted(loss)],
    }


def first_round_at(curve: dict[str, list[float]], target: float) -> int | None:
    for k, v in zip(curve["loss_round"], curve["val_loss"]):
        if v <= target:
            return k
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="inner steps per worker in the comparison")
    ap.add_argument("--variance-steps", type=int, default=300, help="inner steps per worker, variance experiment")
    ap.add_argument("--only", choices=["variance", "compare"], default=None)
    ap.add_argument("--cache", default=str(REPO / ".bench-cache" / "gossip"))
    args = ap.parse_args()
    cache = Path(args.cache)
    out = Path(tempfile.mkdtemp(prefix="dilo-gossip-"))
    payload: dict[str, Any] = {"machine": machine()}
    md: list[str] = []
    try:
        if args.only in (None, "variance"):
            common = [
                *GOSSIP,
                "--outer.topology=ring",
                "--outer.inner_steps=10",
                "--outer.independent_init=true",
                f"--steps={args.variance_steps}",
                "--log.eval_every=2",
                "--log.eval_batches=8",
            ]
            plain = arm("variance-plain", [*common, "--outer.variance_correction=false"], 8, out, cache)
            corrected = arm("variance-corrected", [*common, "--outer.variance_correction=true"], 8, out, cache)
            cp, cc = variance_curves(plain), variance_curves(corrected)
            target = cp["val_loss"][-1]
            reach = first_round_at(cc, target)
            payload["variance"] = {
                "plain": cp,
                "corrected": cc,
                "plain_final_loss": target,
                "corrected_reaches_at": reach,
            }
            md += [
                "### Vanishing variance: 8 independently initialised workers, ring gossip every 10 steps",
                "",
                markdown_table(
                    [
                        "averaging",
                        "std after / before the first merge",
                        "same, worst merge",
                        "std at the end / before the first merge",
                        "final val loss",
                        "rounds to plain's final loss",
                    ],
                    [
                        [
                            name,
                            f"{c['merge_ratio'][0]:.3f}",
                            f"{min(c['merge_ratio']):.3f}",
                            f"{c['std_rel'][-1]:.3f}",
                            f"{c['val_loss'][-1]:.4f}",
                            rounds,
                        ]
                        for name, c, rounds in (
                            ("plain", cp, str(cp["loss_round"][-1])),
                            ("variance-corrected", cc, "not reached" if reach is None else str(reach)),
                        )
                    ],
                ),
                "",
                "Std: the mean over the weight matrices and the workers. A merge of independent models shrinks it"
                " (plain); the corrected merge keeps it. Training itself grows the weights in both arms, so the"
                " std at the end is above its first value in both.",
                "",
                "![variance](scripts/results/gossip-variance.png)",
                "",
            ]
            plot_variance(cp, cc)
        if args.only in (None, "compare"):
            steps = [f"--steps={args.steps}", "--log.eval_every=4"]
            arms = [
                ("diloco", ["--outer.inner_steps=25", *steps]),
                ("ddp", ["--outer.kind=ddp", "--sync_every_ddp_eval=25", *steps]),
                ("gossip-ring", [*GOSSIP, "--outer.topology=ring", "--outer.inner_steps=25", *steps]),
                ("gossip-exp", [*GOSSIP, "--outer.topology=exponential", "--outer.inner_steps=25", *steps]),
                ("gossip-ring-final", [*GOSSIP, "--outer.topology=ring", "--outer.inner_steps=25",
                                       "--outer.final_merge=true", *steps]),
            ]  # fmt: skip
            results = {name: arm(name, o, 4, out, cache) for name, o in arms}
            base = results["diloco"]["summary"]
            rows, table = [], []
            for name, res in results.items():
                s = res["summary"]
                rows.append(
                    {
                        "arm": name,
                        "val_loss": s["val_loss"],
                        "loss_ratio": s["val_loss"] / base["val_loss"],
                        "bytes_sent_per_worker": s["bytes_sent_per_worker"],
                        "bytes_ratio": s["bytes_sent_per_worker"] / base["bytes_sent_per_worker"],
                        "wall_s": s["wall_s"],
                    }
                )
                sent = s["bytes_sent_per_worker"]
                table.append(
                    [
                        name,
                        f"{s['val_loss']:.4f} ({s['val_loss'] / base['val_loss']:.3f}x)",
                        f"{sent / 1e6:.1f} MB ({sent / base['bytes_sent_per_worker']:.2f}x)",
                        f"{s['wall_s']:.0f} s",
                    ]
                )
            payload["compare"] = rows
            md += [
                "### Gossip against DiLoCo and DDP: 4 workers, quickstart model, "
                f"{args.steps} steps each (equal tokens)",
                "",
                "Gossip workers evaluate their own parameters; the loss shown is worker 0's. `gossip-ring-final`"
                " adds one fully connected average at the end.",
                "",
                markdown_table(["arm", "final val loss (vs DiLoCo)", "bytes sent / worker (vs DiLoCo)", "wall"], table),
            ]
        write_json("gossip", payload)
        (RESULTS / "gossip.md").write_text("\n".join(md) + "\n")
        update_benchmarks_md("gossip", "## Gossip averaging\n\n" + "\n".join(md))
        print("\n".join(md))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def plot_variance(plain: dict[str, list[float]], corrected: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4))
    for name, c in (("plain", plain), ("variance-corrected", corrected)):
        ax0.plot(c["round"], c["merge_ratio"], ".-", label=name)
        ax1.plot(c["round"], c["std_rel"], ".-", label=name)
        ax2.plot(c["loss_round"], c["val_loss"], ".-", label=name)
    for ax in (ax0, ax1):
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.axhspan(0.9, 1.1, color="gray", alpha=0.1)
        ax.set_xlabel("gossip round")
    ax0.set_ylabel("layer std after / before the merge")
    ax1.set_ylabel("layer std after the merge / before round 1")
    ax2.set_xlabel("gossip round")
    ax2.set_ylabel("validation loss (mean over workers)")
    for ax in (ax0, ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("8 independently initialised workers, ring gossip")
    fig.tight_layout()
    fig.savefig(RESULTS / "gossip-variance.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
