"""Data pipeline throughput: tokens/s the data pipeline delivers, against the model step it feeds.

    python scripts/bench_data.py [--mb 4] [--steps 20] [--bpe 8192]

A corpus of about `mb` MB of standard-library sources (one document per file) is read four ways:
text bytes, the hf corpus on a jsonl of the same documents (bytes, then a byte-level BPE trained
with `dilo data prepare --train-bpe`), and the tokens corpus on the prepared shards. For each arm:
setup (load_island + load_validation: listing, reading, tokenizing) in corpus tokens/s, and
next_batch in tokens/s; the model step is the quickstart model (2 layers, d_model 128, batch 16 x
128, AdamW, fp32) at that arm's vocabulary, timed in the same run. `batch / step` above 1 means the
data pipeline is faster than the model it feeds. Writes scripts/results/data.json and data.md and
the data section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS, machine, markdown_table, update_benchmarks_md, write_json

from dilo.config import DataConfig, GPTConfig
from dilo.data import load_island, load_validation
from dilo.data.prepare import prepare
from dilo.model import build_model


def corpus(root: Path, mb: float) -> tuple[Path, Path]:
    """Stdlib .py files up to `mb` MB copied under root/text, and the same as root/docs.jsonl."""
    src = Path(sysconfig.get_paths()["stdlib"])
    text, total = root / "text", 0
    with open(root / "docs.jsonl", "w") as out:
        for f in sorted(src.glob("*.py")) + sorted(src.glob("*/*.py")):
            if total > mb * 1e6:
                break
            dest = text / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
            total += f.stat().st_size
            out.write(json.dumps({"text": f.read_text(errors="replace"), "source": f.parent.name}) + "\n")
    return text, root / "docs.jsonl"


def step_tokens_per_s(vocab: int, steps: int) -> float:
    model = build_model(GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, d_model=128, context=128), 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, vocab, (16, 128))
    t0 = 0.0
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()  # two warm-up steps
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return 16 * 128 * steps / (time.perf_counter() - t0)


def arm(name: str, cfg: DataConfig, vocab: int, steps: int, batches: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    island = load_island(cfg, 0, 1, seed=0, vocab_size=vocab)
    load_validation(cfg, seed=0, num_batches=4, vocab_size=vocab)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        island.next_batch()
    batch_tps = island.tokens_per_batch * batches / (time.perf_counter() - t0)
    step_tps = step_tokens_per_s(vocab, steps)
    row = {
        "arm": name,
        "vocab": vocab,
        "island_tokens": island.num_tokens,
        "setup_s": setup_s,
        "setup_tokens_per_s": island.num_tokens / setup_s,
        "batch_tokens_per_s": batch_tps,
        "step_tokens_per_s": step_tps,
        "batch_vs_step": batch_tps / step_tps,
    }
    print(f"[bench] {name}: setup {setup_s:.2f} s, batches {batch_tps:,.0f} tok/s, step {step_tps:,.0f} tok/s")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="corpus size in MB (default 4)")
    parser.add_argument("--steps", type=int, default=20, help="timed model steps per arm (default 20)")
    parser.add_argument("--batches", type=int, default=500, help="timed next_batch calls per arm (default 500)")
    parser.add_argument("--bpe", type=int, default=8192, help="BPE vocabulary for the tokenizer arms (default 8192)")
    parser.add_argument("--note", default="", help="a sentence added to the table's note (e.g. the machine's load)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="dilo-bench-data-") as tmp:
        root = Path(tmp)
        text, jsonl = corpus(root, args.mb)
        t0 = time.perf_counter()
        meta = prepare([str(jsonl)], root / "shards", bpe_vocab=args.bpe)
        prepare_s = time.perf_counter() - t0
        tok = str(root / "shards" / "tokenizer.json")
        common: dict[str, Any] = {"batch_size": 16, "seq_len": 128}
        n = (args.steps, args.batches)
        rows = [
            arm("text, bytes", DataConfig(corpus="text", paths=[str(text)], **common), 256, *n),
            arm("hf jsonl, bytes", DataConfig(corpus="hf", paths=[str(jsonl)], **common), 256, *n),
            arm(
                f"hf jsonl, BPE {args.bpe}",
                DataConfig(corpus="hf", paths=[str(jsonl)], tokenizer=tok, **common),
                args.bpe,
                args.steps,
                args.batches,
            ),
            arm(
                f"tokens (prepared), BPE {args.bpe}",
                DataConfig(corpus="tokens", paths=[str(root / "shards")], tokenizer=tok, **common),
                args.bpe,
                args.steps,
                args.batches,
            ),
        ]
    columns = [
        ("arm", lambda r: r["arm"]),
        ("island tokens", lambda r: f"{r['island_tokens']:,}"),
        ("setup s", lambda r: f"{r['setup_s']:.2f}"),
        ("setup tok/s", lambda r: f"{r['setup_tokens_per_s']:,.0f}"),
        ("next_batch tok/s", lambda r: f"{r['batch_tokens_per_s']:,.0f}"),
        ("model step tok/s", lambda r: f"{r['step_tokens_per_s']:,.0f}"),
        ("batch / step", lambda r: f"{r['batch_vs_step']:.0f}x"),
    ]
    table = markdown_table([h for h, _ in columns], [[f(r) for _, f in columns] for r in rows])
    note = (
        f"{args.mb:g} MB of stdlib sources ({meta['shards'][0]['documents']} documents), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads. `dilo data prepare --train-bpe {args.bpe}` "
        f"(training the BPE and writing the shards) took {prepare_s:.1f} s. Model step: the quickstart "
        "model, batch 16 x 128, AdamW, fp32, at each arm's vocabulary. Setup is paid once per worker start."
        + (f" {args.note}" if args.note else "")
    )
    write_json("data", {**machine(), **vars(args), "prepare_s": prepare_s, "rows": rows})
    (RESULTS / "data.md").write_text(note + "\n\n" + table + "\n")
    update_benchmarks_md(
        "data",
        "## Data pipeline throughput (`scripts/bench_data.py`)\n\n" + note + "\n\n" + table
        + "\n\nRaw results: `scripts/results/data.json`.",
    )  # fmt: skip
    print(note + "\n\n" + table)


if __name__ == "__main__":
    main()
