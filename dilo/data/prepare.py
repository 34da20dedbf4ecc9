"""`dilo data prepare`: pre-tokenize a corpus into token shards for `data.corpus = "tokens"`.

    dilo data prepare corpus/ more.jsonl --out data/tok --train-bpe 8192
    # then: [data] corpus = "tokens", paths = ["data/tok"], tokenizer = "data/tok/tokenizer.json"
    #       [model] vocab_size = 8192

Every input file becomes one shard DIR/NNNNN-<name>.bin (so by_source islands still see whole
files): its documents' ids, each followed by the EOS id, as uint16, or uint32 when an id exceeds
65,535. Text files are one document each; .jsonl/.json/.parquet/.arrow/.csv files (or any file
with --format) are read with datasets, one document per row of --text-field. DIR/meta.json
records the dtype, the vocabulary size, the tokenizer and the EOS id; the tokens corpus reads it.
With --train-bpe N a byte-level BPE tokenizer of N ids is first trained on the inputs with the
tokenizers library and saved as DIR/tokenizer.json.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dilo.data.corpus import META, _expand
from dilo.data.hf import load_columns, loader_for
from dilo.data.tokenizer import Tokenizer, load_tokenizer
from dilo.errors import DataError

EOS_TOKEN = "<|endoftext|>"


def _documents(path: str, fmt: str, text_field: str) -> list[str]:
    if loader_for(path, fmt) == "text":
        return [Path(path).read_bytes().decode("utf-8", errors="replace")]
    cols = load_columns(path, fmt, {text_field: "--text-field"})
    return ["" if t is None else str(t) for t in cols[text_field]]


def train_bpe(files: list[str], fmt: str, text_field: str, vocab_size: int, out: Path) -> Path:
    """Train a byte-level BPE tokenizer of `vocab_size` ids (EOS_TOKEN included) on the files."""
    from tokenizers import Tokenizer as _Fast
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"--train-bpe {vocab_size}: a byte-level BPE needs at least 257 ids (256 bytes and EOS)")
    tok = _Fast(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterator[str]:
        for f in files:
            yield from _documents(f, fmt, text_field)

    tok.train_from_iterator(texts(), trainer=trainer)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def _progress(total: int) -> Any:
    """A tqdm bar on a terminal; elsewhere None (one line per file is printed instead)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="dilo data prepare", file=sys.stderr)


def prepare(
    inputs: list[str],
    out: Path,
    *,
    tokenizer: str | None = None,
    bpe_vocab: int | None = None,
    text_field: str = "text",
    fmt: str = "auto",
    eos_id: int | None = None,
) -> dict[str, Any]:
    """Write the shards and meta.json (see the module docstring); returns the meta dict."""
    if tokenizer and bpe_vocab:
        raise DataError("--tokenizer and --train-bpe exclude each other: use an existing tokenizer or train one")
    try:
        files = [path for _, path, _ in _expand(inputs, suffix="")]
    except DataError as e:  # the listing speaks of the config key; here the paths are arguments
        raise DataError(str(e).replace("data.paths", "dilo data prepare INPUT")) from None
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("*.bin"))
    if stale:
        raise DataError(f"--out {out} already holds token shards ({stale[0].name}, ...); use an empty directory")
    tok_spec = str(train_bpe(files, fmt, text_field, bpe_vocab, out)) if bpe_vocab else (tokenizer or "bytes")
    tok: Tokenizer = load_tokenizer(tok_spec)
    eos = eos_id if eos_id is not None else tok.eos_id
    top = max(tok.vocab_size - 1, eos or 0)
    dtype = np.uint16 if top < 1 << 16 else np.uint32
    bar = _progress(len(files))
    shards, total = [], 0
    for i, path in enumerate(files):
        docs = _documents(path, fmt, text_field)
        parts: list[np.ndarray] = []
        for lo in range(0, len(docs), 1024):
            for ids in tok.encode_batch(docs[lo : lo + 1024]):
                parts.append(ids.astype(dtype, copy=False))
                if eos is not None:
                    parts.append(np.array([eos], dtype=dtype))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        name = f"{i:05d}-{re.sub(r'[^A-Za-z0-9._-]', '_', Path(path).stem)[:60]}.bin"
        tokens.tofile(out / name)
        shards.append({"file": name, "source": path, "documents": len(docs), "tokens": int(tokens.size)})
        total += int(tokens.size)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tokens=total)
        else:
            print(
                f"dilo data prepare: [{i + 1}/{len(files)}] {path}: {len(docs)} documents, {tokens.size} tokens",
                file=sys.stderr,
                flush=True,
            )
    if bar is not None:
        bar.close()
    tok_path = tok_spec if tok_spec == "bytes" else str(Path(tok_spec).resolve())
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok_path,
        "eos_id": eos,
        "num_tokens": total,
        "shards": shards,
    }
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str]) -> int:
    """`dilo data prepare INPUT... --out DIR [--tokenizer PATH | --train-bpe N] [--text-field F]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="dilo data", description="Prepare data for dilo.")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="pre-tokenize text / jsonl / parquet files into token shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or glob patterns")
    p.add_argument("--out", required=True, help="directory for the shards, meta.json (and tokenizer.json)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default=None, help="tokenizer.json or a Hugging Face tokenizer directory")
    tok.add_argument("--train-bpe", type=int, default=None, metavar="N", help="train a byte-level BPE of N ids")
    p.add_argument("--text-field", default="text", help="column holding the text (jsonl / parquet; default text)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "json", "parquet", "text", "arrow", "csv"],
        help="datasets loader (default: from each file's extension)",
    )
    p.add_argument("--eos-id", type=int, default=None, help="id after each document (default: the tokenizer's EOS)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    meta = prepare(
        args.inputs,
        out,
        tokenizer=args.tokenizer,
        bpe_vocab=args.train_bpe,
        text_field=args.text_field,
        fmt=args.format,
        eos_id=args.eos_id,
    )
    tok_key = "" if meta["tokenizer"] == "bytes" else f', tokenizer = "{meta["tokenizer"]}"'
    print(
        f"dilo data prepare: wrote {len(meta['shards'])} shards ({meta['num_tokens']:,} {meta['dtype']} tokens) "
        f'to {out}; train on them with [data] corpus = "tokens", paths = ["{out}"]{tok_key} and a model '
        f'of at least {meta["vocab_size"]} ids ([model] vocab_size, or vocab_size in a kind = "hf" config)',
        file=sys.stderr,
    )
    return 0
