"""Outer learning rate and momentum of DiLoCo at H=50 on the quickstart model, against DDP.

    .venv/bin/python scripts/bench_outer_lr.py [--steps 400] [--workers 4]

Every arm is a real `dilo run` of configs/quickstart.toml with `workers` worker processes, the
same data, seed and inner hyper-parameters, and `steps` inner steps per worker (equal tokens in
every arm); they differ only in the outer step: DiLoCo with Nesterov at several (lr, momentum),
FedAvg (lr 1, no momentum) and, as the baseline measured in the same run, DDP. Only the final
validation loss is evaluated (log.eval_every=0). Each arm's loss is reported as a ratio to the
DDP arm's. Sized for 2 CPU cores: 6 arms of 4 workers x 400 steps, about 10 minutes in all.

Writes scripts/results/outer_lr.json and the "outer-sweep" section of BENCHMARKS.md. An arm
already run with the same overrides is read back from .bench-cache/outer_lr/ (delete
it to measure again).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, RESULTS, machine, markdown_table, run_arm, update_benchmarks_md, write_json

H = 50
SETTINGS = [(0.3, 0.9), (0.5, 0.8), (0.7, 0.9), (1.0, 0.5)]
"""(outer lr, Nesterov momentum) of the DiLoCo arms: the paper's 0.7 / 0.9, the configs' 1.0 / 0.5
and two lower learning rates with high momentum."""


def arms(steps: int) -> list[tuple[str, str, list[str]]]:
    """(name, label, overrides) per arm; DDP first."""
    common = [f"--steps={steps}", "--log.eval_every=0", "--checkpoint.every=0"]
    out = [("ddp", "DDP (baseline)", [*common, "--outer.kind=ddp", f"--sync_every_ddp_eval={H}"])]
    for lr, m in SETTINGS:
        out.append(
            (
                f"diloco-lr{lr}-m{m}",
                f"{lr} / {m}",
                [*common, "--outer.kind=diloco", f"--outer.inner_steps={H}", f"--outer.lr={lr}",
                 f"--outer.momentum={m}", "--outer.nesterov=true"],
            )
        )  # fmt: skip
    out.append(("fedavg", "1.0 / 0 (FedAvg)", [*common, "--outer.kind=fedavg", f"--outer.inner_steps={H}"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="inner steps per worker in every arm")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.toml"))
    ap.add_argument(
        "--table-only", action="store_true", help="rewrite BENCHMARKS.md from scripts/results/outer_lr.json"
    )
    args = ap.parse_args()
    if args.table_only:
        update_benchmarks_md("outer-sweep", section(json.loads((RESULTS / "outer_lr.json").read_text())))
        return
    config = Path(args.config)
    cache = REPO / ".bench-cache" / "outer_lr"
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="dilo-outer-lr-") as tmp:
        for name, label, overrides in arms(args.steps):
            r = run_arm(name, config, args.workers, overrides, Path(tmp), cache=cache)
            r["label"] = label
            results.append(r)
    ddp = results[0]["summary"]["val_loss"]
    best = min(results[1:], key=lambda r: r["summary"]["val_loss"])
    payload = {
        "machine": machine(),
        "config": f"{config.parent.name}/{config.name}",
        "workers": args.workers,
        "steps": args.steps,
        "inner_steps": H,
        "baseline": "ddp",
        "bench_wall_s": time.perf_counter() - t0,
        "best": best["label"],
        "arms": [
            {
                "name": r["name"],
                "label": r["label"],
                "overrides": r["overrides"],
                "val_loss": r["summary"]["val_loss"],
                "val_loss_vs_ddp": r["summary"]["val_loss"] / ddp,
                "bytes_sent_per_worker": r["summary"]["bytes_sent_per_worker"],
                "wall_s": r["summary"]["wall_s"],
                "summary": r["summary"],
            }
            for r in results
        ],
    }
    write_json("outer_lr", payload)
    body = section(payload)
    update_benchmarks_md("outer-sweep", body)
    print(body)


def section(payload: dict[str, Any]) -> str:
    """The markdown of the outer-sweep section of BENCHMARKS.md, from the JSON results."""
    m, steps, workers = payload["machine"], payload["steps"], payload["workers"]
    rows = [
        [a["label"], f"{a['val_loss']:.4f}", f"{a['val_loss_vs_ddp']:.3f}", f"{a['wall_s']:.0f} s"]
        for a in payload["arms"]
    ]
    return "\n".join(
        [
            "## Outer learning rate and momentum at this scale",
            "",
            f"DiLoCo H={payload['inner_steps']}, {workers} workers, {steps} steps each "
            f"({steps // payload['inner_steps']} outer steps), the quickstart model and data "
            "(configs/quickstart.toml: AdamW lr 3e-3, bf16, stdlib corpus); one run per setting, final "
            "validation loss, as a ratio to DDP on the same data and tokens, measured by the same script. "
            f"`python scripts/bench_outer_lr.py --steps {steps} --workers {workers}` ({m['date']}, "
            f"{m['cpus']} CPUs; the arms took {sum(a['wall_s'] for a in payload['arms']) / 60:.0f} min "
            "together, on a machine shared with other jobs, so the wall column is noisy); raw figures in "
            f"scripts/results/outer_lr.json. Best DiLoCo setting here: {payload['best']}.",
            "",
            markdown_table(["outer lr / momentum (Nesterov)", "validation loss", "loss / DDP", "wall"], rows),
        ]
    )


if __name__ == "__main__":
    main()
