"""Corpora of documents: tokenize, hold out whole documents, pack into token arrays in memory.

- hf: the `data.text_field` column of local dataset files (see `dilo.data.hf`);
- import: `data.builder` returns a torch Dataset of token-id sequences;
- stdlib / text with a tokenizer: each file (each held-out part of one) is a document.

Each document is followed by the EOS id (`data.eos_id`, else the tokenizer's). The documents of
one (source, group) pair, in their order, become one array and one piece, so the islands of
`dilo.data.islands` apply unchanged: the group is the file (by_source) or the value of
`data.island_column` (by_column).
"""

from __future__ import annotations

import dataclasses
import importlib
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from dilo.config import DataConfig
from dilo.data.corpus import _Corpus, _held_out, _Piece
from dilo.data.hf import load_columns
from dilo.data.tokenizer import Tokenizer, load_tokenizer
from dilo.errors import DataError

_BATCH = 1024  # documents per encode_batch call


def dtype_for(max_id: int) -> type[np.unsignedinteger[Any]]:
    if max_id < 1 << 8:
        return np.uint8
    return np.uint16 if max_id < 1 << 16 else np.uint32


@dataclasses.dataclass
class _Doc:
    source: str  # the file (or "dataset")
    group: str  # the island unit: the file or the island_column value
    held_out: bool
    ids: np.ndarray


def _pack(name: str, docs: Iterable[_Doc], eos: int | None, fraction: float, **extra: Any) -> _Corpus:
    """One array per (source, group, side); the tail fallback of `_split_files` for documents."""
    items = list(docs)
    if not items:
        raise DataError(f"{name}: no documents; point data.paths at non-empty data")
    if all(d.held_out for d in items) or not any(d.held_out for d in items):
        # too few documents for the hash to put some on each side: hold out the last ones
        for d in items:
            d.held_out = False
        total, tail = sum(len(d.ids) for d in items), 0
        for d in reversed(items[1:]):
            if tail >= fraction * total:
                break
            d.held_out, tail = True, tail + len(d.ids)
        if tail == 0:
            raise DataError(f"{name}: too little data to hold out a validation split; add documents")
    max_id = max([int(d.ids.max()) for d in items if len(d.ids)] + [eos or 0])
    dtype = dtype_for(max_id)
    buckets: dict[tuple[bool, str, str], list[np.ndarray]] = {}
    sep = None if eos is None else np.array([eos], dtype=dtype)
    for d in items:
        parts = buckets.setdefault((d.held_out, d.source, d.group), [])
        parts.append(d.ids)
        if sep is not None:
            parts.append(sep)
    arrays: dict[str, np.ndarray] = {}
    sides: dict[bool, list[_Piece]] = {False: [], True: []}
    for (held, source, group), parts in buckets.items():
        path = f"<{name}>#{len(arrays)}"
        arrays[path] = np.concatenate(parts).astype(dtype, copy=False)
        sides[held].append(_Piece(path, f"{source}#{group}", group, 0, len(arrays[path])))
    return _Corpus(name, dtype, sides[False], sides[True], arrays=arrays, **extra)


def _tokenizer(cfg: DataConfig) -> tuple[Tokenizer, int | None, dict[str, Any]]:
    tok = load_tokenizer(cfg.tokenizer)
    eos = cfg.eos_id if cfg.eos_id is not None else tok.eos_id
    vocab = (
        {}
        if tok.name == "bytes"
        else {"vocab_size": tok.vocab_size, "vocab_source": f"data.tokenizer={cfg.tokenizer!r}"}
    )
    return tok, eos, vocab


def _encode(tok: Tokenizer, texts: list[str]) -> Iterator[np.ndarray]:
    for lo in range(0, len(texts), _BATCH):
        yield from tok.encode_batch(texts[lo : lo + _BATCH])


def hf_corpus(cfg: DataConfig, files: list[tuple[str, str, str]]) -> _Corpus:
    """data.corpus = "hf": every file of `paths` through datasets, tokenized and packed."""
    tok, eos, vocab = _tokenizer(cfg)
    column = cfg.island_column if cfg.islands == "by_column" else None
    fields = {cfg.text_field: "data.text_field"} | ({column: "data.island_column"} if column else {})
    docs: list[_Doc] = []
    values: dict[str, None] = {}
    for key, path, _ in files:
        cols = load_columns(path, cfg.format, fields)
        texts = ["" if t is None else str(t) for t in cols[cfg.text_field]]
        groups = [str(v) for v in cols[column]] if column else [key] * len(texts)
        values.update(dict.fromkeys(groups))
        for text, group, ids in zip(texts, groups, _encode(tok, texts), strict=True):
            if len(ids):
                held = zlib.crc32(text.encode("utf-8", errors="replace")) < cfg.val_fraction * 2**32
                docs.append(_Doc(key, group, held, ids))
    name = f"data.paths={cfg.paths}"
    unit = f"distinct values of data.island_column={column!r} ({', '.join(sorted(values))})" if column else "files"
    return _pack(name, docs, eos, cfg.val_fraction, unit=unit, **vocab)


def tokenize_pieces(cfg: DataConfig, corpus: _Corpus) -> _Corpus:
    """stdlib / text with a tokenizer: each piece (a file or a held-out part of one) is a document,
    tokenized into memory; the split and the groups stay those of the byte listing."""
    tok, eos, vocab = _tokenizer(cfg)
    sides: list[list[_Piece]] = [[], []]
    arrays: dict[str, np.ndarray] = {}
    for side, pieces in enumerate((corpus.train, corpus.val)):
        texts = []
        for p in pieces:
            with open(p.path, "rb") as f:
                f.seek(p.start)
                texts.append(f.read(p.size).decode("utf-8", errors="replace"))
        for p, ids in zip(pieces, _encode(tok, texts), strict=True):
            key = f"{p.path}@{p.start}"
            arrays[key] = ids if eos is None else np.append(ids, eos)
            sides[side].append(_Piece(key, p.key, p.group, 0, len(arrays[key])))
    max_id = max([int(a.max()) for a in arrays.values() if len(a)] + [0])
    dtype = dtype_for(max(max_id, tok.vocab_size - 1))
    arrays = {k: a.astype(dtype, copy=False) for k, a in arrays.items()}
    return _Corpus(corpus.name, dtype, sides[0], sides[1], arrays=arrays, **vocab)


def _as_ids(item: Any, i: int, builder: str) -> np.ndarray:
    arr = np.asarray(item.numpy() if hasattr(item, "numpy") else item)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise DataError(
            f"data.builder={builder!r}: item {i} is not a 1-D sequence of integer token ids "
            f"(shape {arr.shape}, dtype {arr.dtype}); return 1-D int tensors or lists"
        )
    if arr.size and int(arr.min()) < 0:
        raise DataError(f"data.builder={builder!r}: item {i} holds a negative token id {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def import_corpus(cfg: DataConfig) -> _Corpus:
    """data.corpus = "import": the Dataset `data.builder` returns, in its order, packed."""
    builder = str(cfg.builder)
    module, _, attr = builder.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise DataError(f"data.builder={builder!r}: cannot import it ({e}); use 'package.module:function'") from e
    dataset = fn()
    items: Iterable[Any] = dataset if not hasattr(dataset, "__len__") else (dataset[i] for i in range(len(dataset)))
    docs = []
    for i, item in enumerate(items):
        ids = _as_ids(item, i, builder)
        if len(ids):
            held = zlib.crc32(ids.tobytes()) < cfg.val_fraction * 2**32
            docs.append(_Doc("dataset", "dataset", held, ids))
    return _pack(f"data.builder={builder!r}", docs, cfg.eos_id, cfg.val_fraction, contiguous=True)


def with_tokenizer_vocab(cfg: DataConfig, corpus: _Corpus) -> _Corpus:
    """tokens with data.tokenizer set: check the tokenizer's vocabulary too."""
    if cfg.tokenizer == "bytes":
        return corpus
    tok = load_tokenizer(cfg.tokenizer)
    if corpus.vocab_size is not None and corpus.vocab_size >= tok.vocab_size:
        return corpus
    return dataclasses.replace(corpus, vocab_size=tok.vocab_size, vocab_source=f"data.tokenizer={cfg.tokenizer!r}")


__all__ = ["_held_out", "dtype_for", "hf_corpus", "import_corpus", "tokenize_pieces", "with_tokenizer_vocab"]
