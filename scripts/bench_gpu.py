"""GPU benchmark: FSDP2 islands against whole-model islands, for Llama-shaped models of ~125M and
~1B parameters, on one node's GPUs (islands = groups of GPUs).

    python scripts/bench_gpu.py              # every GPU of this node; under 8 minutes on 1 or 8 H200s
    python scripts/bench_gpu.py --smoke      # the same arms on the CPU (Gloo, a tiny Llama): checks the script

Layout: with n >= 4 GPUs, two islands of n // 2 GPUs (DiLoCo across them); with 2 or 3, one
island of 2; with 1, one island of one GPU (whole-model only: a sharded island needs 2 ranks).
Each arm is one `dilo run` (a Hugging Face Llama built from an inline config, bf16 compute, the
embedded byte-level corpus, 30 inner steps, H = 10) and reports, from every rank's round log:

- tokens/s of the whole run's compute and MFU per rank (against --peak-tflops, 989 for H100/H200
  dense bf16), as a ratio to the whole-model island of the same model;
- the DiLoCo outer step's time per round (the slowest rank) and the bytes each rank sends per
  round (a sharded island's ranks each send their shard: 1/K of the whole-model lead's bytes);
- the most GPU memory a rank held.

Results: scripts/results/bench_gpu.json and the "gpu" section of BENCHMARKS.md (not in --smoke).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine, markdown_table, run_arm, update_benchmarks_md, write_json  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    # ~134M: Llama-2's shape at width 768 (untied 32k-vocabulary embeddings included)
    "125m": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
             "intermediate_size": 2048, "vocab_size": 32000},
    # ~1.07B: TinyLlama's width and grouped-query attention, 20 layers
    "1b": {"hidden_size": 2048, "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 8,
           "intermediate_size": 5632, "vocab_size": 32000},
    # --smoke: a tiny Llama that trains on two CPU cores
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 256},
}  # fmt: skip
BATCH = {"125m": (16, 1024), "1b": (8, 1024), "tiny": (4, 64)}
"""(batch size per rank, sequence length)"""


def layout(gpus: int) -> tuple[int, int]:
    """(islands, ranks per island) for this many GPUs."""
    if gpus >= 4:
        return 2, gpus // 2
    if gpus >= 2:
        return 1, 2
    return 1, 1


def write_config(path: Path, model: str, steps: int, smoke: bool) -> Path:
    batch, seq = BATCH[model]
    inline = ", ".join(f"{k} = {v}" for k, v in {**MODELS[model], "max_position_embeddings": seq}.items())
    path.write_text(
        f"""name = "bench-gpu-{model}"
steps = {steps}
seed = 0

[model]
kind = "hf"
config = {{ model_type = "llama", {inline} }}

[data]
corpus = "stdlib"
batch_size = {batch}
seq_len = {seq}

[inner]
lr = 3e-4
warmup_steps = 5
precision = "bf16"

[outer]
kind = "diloco"
inner_steps = {steps // 3}
lr = 0.7
momentum = 0.9

[transport]
backend = "{"gloo" if smoke else "nccl"}"
timeout_s = 600

[log]
eval_every = 0
eval_batches = 2

[checkpoint]
every = 0
"""
    )
    return path


def rank_logs(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every rank's round records, by log name."""
    out = {}
    for log in sorted((run_dir / "logs").glob("*.jsonl")):
        records = [json.loads(x) for x in log.read_text().splitlines()]
        out[log.stem] = [r for r in records if r["event"] == "round"]
    return out


def measure(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The arm's figures from its ranks' round logs; the first round (compilation, allocator
    warm-up) is left out of the rates."""
    logs = rank_logs(run_dir)
    later = {name: rounds[1:] or rounds for name, rounds in logs.items()}
    per_round = list(zip(*later.values()))  # per round: every rank's record
    tokens_s = [sum(r["tokens_per_s"] for r in ranks) for ranks in per_round]
    mfu = [r["mfu"] for rounds in later.values() for r in rounds if "mfu" in r]
    return {
        "ranks": len(logs),
        "tokens_per_s": statistics.median(tokens_s),
        "mfu": statistics.median(mfu) if mfu else None,
        "sync_s": statistics.median(max(r["sync_s"] for r in ranks) for ranks in per_round),
        "bytes_sent_per_rank": {n: statistics.median(r["bytes_sent"] for r in rounds) for n, rounds in later.items()},
        "max_memory_gib": max((r.get("max_memory_gib", 0.0) for rounds in logs.values() for r in rounds), default=0.0),
        "rounds_committed": summary["rounds_committed"],
        "val_loss": summary["val_loss"],
        "initial_val_loss": summary["initial_val_loss"],
        "wall_s": summary["wall_s"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the CPU check: Gloo, a tiny Llama, 2 islands of 2 ranks")
    ap.add_argument("--models", default=None, help="comma-separated subset of 125m,1b (default: both)")
    ap.add_argument("--steps", type=int, default=30, help="inner steps per arm (three DiLoCo rounds)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU, for MFU")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    args = ap.parse_args()
    if args.smoke:
        gpus, models, steps = 4, ["tiny"], 12
    else:
        gpus = torch.cuda.device_count()
        if gpus == 0:
            print("bench_gpu: error: no CUDA device here; use --smoke to check the script on the CPU", file=sys.stderr)
            return 2
        models, steps = (args.models.split(",") if args.models else ["125m", "1b"]), args.steps
    islands, k = layout(gpus)
    shards = ["none", "fsdp"] if k > 1 else ["none"]
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for model in models:
        config = write_config(out / f"{model}.toml", model, steps, args.smoke)
        for shard in shards:
            name = f"{model}-{shard}"
            overrides = [f"--island-ranks={k}", f"--transport.island_shard={shard}"]
            if not args.smoke:
                overrides.append(f"--log.peak_tflops={args.peak_tflops}")
            arm = run_arm(name, config, islands, overrides, out)
            results[name] = {"model": model, "island_shard": shard, **measure(out / name, arm["summary"])}
    gpu = torch.cuda.get_device_name(0) if not args.smoke else "cpu (--smoke)"
    payload = {
        "machine": {**machine(), "gpus": gpus, "gpu": gpu},
        "layout": {"islands": islands, "ranks_per_island": k},
        "steps": steps,
        "arms": results,
        "smoke": args.smoke,
    }
    rows = []
    for r in results.values():
        base = results[f"{r['model']}-none"]
        lead = max(r["bytes_sent_per_rank"].values())
        base_lead = max(base["bytes_sent_per_rank"].values())
        rows.append(
            [
                r["model"], "FSDP2" if r["island_shard"] == "fsdp" else "whole model", f"{islands} x {k}",
                f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)",
                f"{r['mfu']:.1%}" if r["mfu"] is not None else "-",
                f"{r['sync_s']:.3f} ({r['sync_s'] / base['sync_s']:.2f}x)",
                f"{lead / 1e6:,.1f} MB ({lead / base_lead:.2f}x)" if base_lead else "-",
                f"{r['max_memory_gib']:.1f} ({r['max_memory_gib'] / base['max_memory_gib']:.2f}x)"
                if base["max_memory_gib"] else "-",
            ]
        )  # fmt: skip
    table = markdown_table(
        ["model", "island", "islands x ranks", "tokens/s (vs whole)", "MFU", "outer step s (vs whole)",
         "most bytes a rank sends per round (vs whole)", "GPU memory GiB (vs whole)"],
        rows,
    )  # fmt: skip
    print(table)
    if not args.smoke:
        write_json("bench_gpu", payload)
        update_benchmarks_md(
            "gpu",
            f"## FSDP2 islands vs whole-model islands on {payload['machine']['gpu']} x {gpus}\n\n"
            f"`python scripts/bench_gpu.py`: {islands} island(s) of {k} GPUs, DiLoCo H = {steps // 3}, "
            f"{steps} steps, bf16, medians over rounds 2-3.\n\n{table}\n",
        )
    else:
        (out / "bench_gpu_smoke.json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
