"""LoRA fine-tuning with DiLoCo: full fine-tuning, LoRA and FedSA-LoRA (B matrices local), equal tokens.

    .venv/bin/python scripts/bench_lora.py [--pretrain-steps 400] [--steps 100] [--workers 4]

1. A small "pre-trained" model, made here: a tiny Llama (inline transformers config, byte vocabulary,
   about 1.2M parameters) trained by one worker (`dilo run --workers 1`, outer.kind = "ddp") on the
   stdlib corpus (Python sources), then written out with `dilo export` as a model directory.
2. Fine-tuned from that directory (model.path, pretrained = true) by `workers` DiLoCo workers on
   another distribution: this repository's own prose and configuration, a snapshot of README.md,
   docs/*.md, configs/*.toml and examples/*.toml (data.corpus = "text", read as bytes; the file
   docs/DESIGN.md and one config are held out for validation by dilo's hash of their names), in
   three arms with the same data, seed, outer step (DiLoCo H=20, Nesterov lr 1.0 / momentum 0.5)
   and steps (equal tokens); the inner AdamW learning rate is each method's own (--lr 3e-3 for full
   fine-tuning, --lora-lr 1e-2 for LoRA: LoRA wants a higher one; each was the better of two in a
   30-step trial):

   - full: every weight trains and travels (lora.r = 0), the baseline;
   - lora: rank-8 adapters on every attention projection, the base frozen: only the adapters travel;
   - fedsa-lora: the same adapters with outer.local = "lora_B" (FedSA-LoRA): the B matrices stay on
     their worker, only the A matrices are averaged.

Reported, each as a ratio to full fine-tuning of the same run: bytes sent per worker per round (the
run summaries' bytes_sent_per_worker / rounds), parameters trained and sent (fractions of the model),
and the validation loss after the last round; the base model's loss on the fine-tuning data before
any fine-tuning (every arm's initial_val_loss: LoRA's B starts at zero, so all three start there) is
the reference the losses are also given against. Sized for 2 idle CPU cores: about 3 minutes of
pre-training (one worker, about 0.4 s a step) and 2 to 3 minutes per fine-tuning arm; on a machine
shared with other jobs the one-worker pre-training slows down far more than that (see BENCHMARKS.md).

Writes scripts/results/lora.json, scripts/results/lora.png and the "lora" section of BENCHMARKS.md.
The pre-trained model, the corpus snapshot and every arm are kept in .bench-cache/lora/ and read
back when run again with the same settings (delete the directory to measure again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, RESULTS, machine, markdown_table, run_arm, update_benchmarks_md, write_json

from dilo.config import to_toml

LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 8
FINETUNE_FILES = ["README.md", "docs/*.md", "configs/*.toml", "examples/*.toml"]
"""The fine-tuning corpus, copied under <work>/corpus/dilo/ (the prefix fixes which files dilo's
hash of their names holds out: docs/DESIGN.md and configs/fedavg.toml, about a fifth of the bytes)."""


def write_toml(path: Path, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> Path:
    path.write_text(to_toml({**top, **sections}))
    return path


def snapshot_corpus(dest: Path) -> dict[str, Any]:
    """Copy the fine-tuning files (once: later runs reuse the snapshot their cached arms saw)."""
    root = dest / "dilo"
    if not root.is_dir():
        for pattern in FINETUNE_FILES:
            for f in sorted(REPO.glob(pattern)):
                target = root / f.relative_to(REPO)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, target)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(dest).as_posix().encode() + b"\0" + f.read_bytes())
    return {
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "sha256": digest.hexdigest()[:16],
        "patterns": FINETUNE_FILES,
    }


def export(ckpt: Path, out: Path) -> None:
    """`dilo export CKPT --out DIR`, once."""
    if (out / "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "dilo.cli", "export", str(ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"dilo export failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def counts(run_dir: Path) -> dict[str, int]:
    """Parameters of a run's model (rebuilt from its logged config): in all, trained, and sent."""
    sys.path.insert(0, str(REPO))
    from dilo.adapters import build_run_model, shared_view
    from dilo.config import from_dict
    from dilo.model import params_of

    start = json.loads((run_dir / "logs" / "worker0.jsonl").read_text().splitlines()[0])
    cfg = from_dict(start["config"])
    model = build_run_model(cfg)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trained": sum(p.numel() for p in params_of(model)),
        "sent": sum(p.numel() for p in params_of(shared_view(model, cfg.outer))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-steps", type=int, default=400, help="steps of the one-worker pre-training run")
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps per worker in every arm")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=20, help="DiLoCo H of the fine-tuning arms")
    ap.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate of full fine-tuning")
    ap.add_argument("--lora-lr", type=float, default=1e-2, help="inner AdamW learning rate of the LoRA arms")
    ap.add_argument("--table-only", action="store_true", help="rewrite BENCHMARKS.md from scripts/results/lora.json")
    ap.add_argument("--replot", action="store_true", help="redraw the plot from scripts/results/lora.json")
    args = ap.parse_args()
    if args.table_only or args.replot:
        payload = json.loads((RESULTS / "lora.json").read_text())
        if args.replot:
            plot(payload, RESULTS / "lora.png")
        if args.table_only:
            update_benchmarks_md("lora", section(payload))
        return
    t0 = time.perf_counter()
    cache = REPO / ".bench-cache" / "lora"
    work = cache / f"work-p{args.pretrain_steps}"
    work.mkdir(parents=True, exist_ok=True)
    corpus = snapshot_corpus(work / "corpus")

    # 1. the "pre-trained" model: one worker on Python sources, exported as a model directory
    pre_cfg = write_toml(
        work / "pretrain.toml",
        {"name": "pretrain", "seed": 0, "steps": args.pretrain_steps},
        {
            "model": {"kind": "hf", "config": LLAMA},
            "data": {"corpus": "stdlib", "batch_size": 16, "seq_len": 128},
            "inner": {"lr": 3e-3, "warmup_steps": 20},
            "outer": {"kind": "ddp"},
            "log": {"eval_every": 1, "eval_batches": 8},
        },
    )
    pre = run_arm(
        "pretrain", pre_cfg, 1, [f"--sync_every_ddp_eval={max(1, args.pretrain_steps // 6)}"], work, cache=cache
    )
    base = work / "base"
    export(work / "pretrain" / "checkpoints", base)

    # 2. fine-tuning on the repository's prose, three arms at equal tokens
    ft_cfg = write_toml(
        work / "finetune.toml",
        {"name": "finetune", "seed": 0},
        {
            "model": {"kind": "hf", "path": str(base), "pretrained": True},
            "data": {"corpus": "text", "paths": [str(work / "corpus")], "batch_size": 8, "seq_len": 128,
                     "val_fraction": 0.1},
            "inner": {"lr": args.lr, "warmup_steps": 10},
            "outer": {"kind": "diloco", "inner_steps": args.inner_steps, "lr": 1.0, "momentum": 0.5},
            "lora": {"alpha": 2 * RANK, "target_modules": TARGETS},
            "log": {"eval_every": 1, "eval_batches": 14},  # 112 windows: about the whole held-out split
            "checkpoint": {"every": 0},
        },
    )  # fmt: skip
    common = [f"--steps={args.steps}"]
    plan = [
        ("full", "full fine-tuning (baseline)", [*common, "--lora.r=0"]),
        ("lora", f"LoRA r={RANK}, q/k/v/o", [*common, f"--lora.r={RANK}", f"--inner.lr={args.lora_lr}"]),
        (
            "fedsa-lora",
            f"FedSA-LoRA r={RANK} (B local)",
            [*common, f"--lora.r={RANK}", f"--inner.lr={args.lora_lr}", "--outer.local=lora_B"],
        ),
    ]
    results = []
    for name, label, overrides in plan:
        r = run_arm(name, ft_cfg, args.workers, overrides, work, cache=cache)
        r["label"] = label
        r["counts"] = counts(work / name)
        results.append(r)

    # every process's own wall time, cached arms included: what the benchmark costs from scratch
    measured_s = sum(r["summary"]["process_wall_s"] for r in [pre, *results])
    full = results[0]
    full_per_round = full["summary"]["bytes_sent_per_worker"] / full["summary"]["rounds"]
    base_loss = full["summary"]["initial_val_loss"]
    payload = {
        "machine": machine(),
        "model": {"config": LLAMA, "params": full["counts"]["params"]},
        "pretrain": {
            "steps": args.pretrain_steps,
            "corpus": "stdlib",
            "val_loss_stdlib": pre["summary"]["val_loss"],
            "initial_val_loss_stdlib": pre["summary"]["initial_val_loss"],
            "wall_s": pre["summary"]["wall_s"],
            "process_wall_s": pre["summary"]["process_wall_s"],
            "tokens_per_s": pre["summary"]["tokens"] / pre["summary"]["inner_s"],
        },
        "finetune_corpus": corpus,
        "workers": args.workers,
        "steps": args.steps,
        "inner_steps": args.inner_steps,
        "inner_lr": args.lr,
        "lora_inner_lr": args.lora_lr,
        "lora": {"r": RANK, "alpha": 2 * RANK, "target_modules": TARGETS},
        "base_val_loss": base_loss,
        "baseline": "full",
        "bench_wall_s": time.perf_counter() - t0,
        "runs_wall_s": measured_s,
        "arms": [
            {
                "name": r["name"],
                "label": r["label"],
                "overrides": r["overrides"],
                "val_loss": r["summary"]["val_loss"],
                "initial_val_loss": r["summary"]["initial_val_loss"],
                "val_loss_vs_full": r["summary"]["val_loss"] / full["summary"]["val_loss"],
                "val_loss_vs_base": r["summary"]["val_loss"] / base_loss,
                "rounds": r["summary"]["rounds"],
                "bytes_sent_per_worker": r["summary"]["bytes_sent_per_worker"],
                "bytes_per_round": r["summary"]["bytes_sent_per_worker"] / r["summary"]["rounds"],
                "bytes_per_round_vs_full": r["summary"]["bytes_sent_per_worker"] / r["summary"]["rounds"]
                / full_per_round,
                **r["counts"],
                "trained_fraction": r["counts"]["trained"] / r["counts"]["params"],
                "sent_fraction": r["counts"]["sent"] / r["counts"]["params"],
                "wall_s": r["summary"]["wall_s"],
                "curve": r["curve"],
                "summary": r["summary"],
            }
            for r in results
        ],
    }  # fmt: skip
    write_json("lora", payload)
    plot(payload, RESULTS / "lora.png")
    body = section(payload)
    update_benchmarks_md("lora", body)
    print(body)
    print(
        f"[bench] done in {payload['bench_wall_s'] / 60:.1f} min ({measured_s / 60:.1f} min of dilo runs, "
        "cached ones included)",
        file=sys.stderr,
    )


def section(payload: dict[str, Any]) -> str:
    """The markdown of the lora section of BENCHMARKS.md, from the JSON results."""
    m, pre, c = payload["machine"], payload["pretrain"], payload["finetune_corpus"]
    rows = [
        [
            a["label"],
            f"{a['trained_fraction']:.2%}",
            f"{a['sent_fraction']:.2%}",
            f"{a['bytes_per_round'] / 1e3:,.0f} kB",
            f"{a['bytes_per_round_vs_full']:.4f}",
            f"{a['val_loss']:.4f}",
            f"{a['val_loss_vs_full']:.3f}",
            f"{a['val_loss_vs_base']:.3f}",
        ]
        for a in payload["arms"]
    ]
    rounds = payload["arms"][0]["rounds"]
    fine_s = sum(a["summary"]["process_wall_s"] for a in payload["arms"])
    return "\n".join(
        [
            "## LoRA fine-tuning with DiLoCo: bytes and loss against full fine-tuning",
            "",
            f"A tiny Llama ({payload['model']['params'] / 1e6:.2f}M parameters, byte vocabulary) pre-trained here "
            f"by one worker for {pre['steps']} steps on the stdlib corpus (validation loss "
            f"{pre['initial_val_loss_stdlib']:.2f} -> {pre['val_loss_stdlib']:.2f}) and exported with `dilo export`, "
            f"then fine-tuned from that directory by {payload['workers']} DiLoCo workers (H={payload['inner_steps']}, "
            f"{payload['steps']} steps each: {rounds} rounds, outer Nesterov lr 1.0 / momentum 0.5, equal tokens "
            f"in every arm; inner AdamW lr {payload['inner_lr']:g} for full fine-tuning, "
            f"{payload['lora_inner_lr']:g} for LoRA, each the better of two in a 30-step trial) on another "
            "distribution: this repository's prose and configs ("
            f"{c['files']} files, {c['bytes'] / 1e3:.0f} kB of README.md, docs/*.md, configs/*.toml, "
            "examples/*.toml, as bytes; docs/DESIGN.md held out for validation). "
            f"The base model's validation loss on that data before fine-tuning: {payload['base_val_loss']:.4f}. "
            f"LoRA: rank {payload['lora']['r']}, alpha {payload['lora']['alpha']}, on "
            f"{'/'.join(payload['lora']['target_modules'])}; FedSA-LoRA keeps the B matrices local "
            "(`outer.local = \"lora_B\"`; its loss is worker 0's model, with its own B). Bytes are each worker's "
            "sent bytes per round from the run summaries; "
            "ratios are against full fine-tuning in the same run. "
            f"`python scripts/bench_lora.py --pretrain-steps {pre['steps']} --steps {payload['steps']} "
            f"--workers {payload['workers']}` ({m['date']}, {m['cpus']} CPUs shared with other jobs: the "
            f"pre-training took {pre['process_wall_s'] / 60:.0f} min at {pre['tokens_per_s']:,.0f} tokens/s, the "
            f"three fine-tuning arms {fine_s / 60:.0f} min; a one-worker run uses both cores' intra-op threads, "
            "which is what suffers most when other jobs hold them); raw figures in scripts/results/lora.json, "
            "curves in scripts/results/lora.png.",
            "",
            markdown_table(
                [
                    "arm",
                    "trained",
                    "sent",
                    "bytes / worker / round",
                    "bytes / full",
                    "val loss",
                    "loss / full",
                    "loss / base",
                ],
                rows,
            ),  # fmt: skip
        ]
    )


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for a in payload["arms"]:
        pts = [(t, b, v) for t, b, v in a["curve"] if v is not None]
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], "o-", ms=3, label=a["label"])
        sent = [p for p in pts if p[1] > 0]  # the start (0 bytes) has no place on a log axis
        axes[1].plot([p[1] / 1e6 for p in sent], [p[2] for p in sent], "o-", ms=3, label=a["label"])
    for ax in axes:
        ax.axhline(payload["base_val_loss"], color="grey", ls="--", lw=1, label="base model, before fine-tuning")
        ax.set_ylabel("validation loss (fine-tuning data)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_xlabel("tokens (all workers)")
    axes[1].set_xlabel("MB sent per worker (log)")
    axes[1].set_xscale("log")
    fig.suptitle(f"LoRA vs full fine-tuning, DiLoCo, {payload['workers']} workers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
