"""Listing a corpus: which files, which ranges are training and which validation.

Byte corpora (stdlib, text) and token files (tokens) are listed without reading any data; a
tokenizer other than "bytes", and the hf and import corpora, tokenize into memory here (see
`dilo.data.documents`), and the pieces then point at those arrays instead of files.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import math
import os
import sysconfig
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dilo.config import DataConfig
from dilo.errors import DataError

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
META = "meta.json"
"""The sidecar `dilo data prepare` writes next to its shards: dtype, vocab_size, tokenizer, eos_id."""
_DTYPES: dict[str, type[np.unsignedinteger[Any]]] = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass(frozen=True)
class _Piece:
    """Tokens [start, stop) of one file (or of the in-memory array `_Corpus.arrays[path]`); `key`
    is its path relative to the corpus root and `group` the by_source (by_column) unit it belongs to."""

    path: str
    key: str
    group: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _Corpus:
    name: str  # what error messages call it
    dtype: type[np.unsignedinteger[Any]]
    train: list[_Piece]
    val: list[_Piece]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """Tokenized pieces held in memory (a tokenizer, the hf and import corpora), by piece path."""
    vocab_size: int | None = None
    """Ids the tokenizer (or meta.json) can produce, checked against the model's."""
    vocab_source: str = ""
    contiguous: bool = False
    """by_source cuts equal contiguous ranges of the stream (token files fewer than islands, import)."""
    unit: str = "sources"


def _held_out(key: str, fraction: float) -> bool:
    return zlib.crc32(key.encode()) < fraction * 2**32


_CACHE: dict[str, _Corpus] = {}
_CACHE_LOCK = threading.Lock()


def _list_corpus(cfg: DataConfig) -> _Corpus:
    if cfg.corpus == "stdlib":
        corpus = _split_files("stdlib corpus", _stdlib_files(), cfg.val_fraction)
    elif cfg.corpus == "import":
        from dilo.data.documents import import_corpus

        return _memo(cfg, [], lambda: import_corpus(cfg))
    elif not cfg.paths:
        raise DataError(f"data.corpus={cfg.corpus!r} needs data.paths (files, directories or glob patterns)")
    elif cfg.corpus == "text":
        corpus = _split_files(f"data.paths={cfg.paths}", _expand(cfg.paths, suffix=""), cfg.val_fraction)
    elif cfg.corpus == "hf":
        from dilo.data.documents import hf_corpus

        files = _expand(cfg.paths, suffix="")
        return _memo(cfg, [p for _, p, _ in files], lambda: hf_corpus(cfg, files))
    else:
        from dilo.data.documents import with_tokenizer_vocab

        return with_tokenizer_vocab(cfg, _token_corpus(cfg))
    if cfg.tokenizer == "bytes":
        return corpus
    from dilo.data.documents import tokenize_pieces

    return _memo(cfg, [p.path for p in corpus.train + corpus.val], lambda: tokenize_pieces(cfg, corpus))


def _memo(cfg: DataConfig, paths: list[str], build: Any) -> _Corpus:
    """Tokenizing is the slow part: keep the last two tokenized corpora in memory (never on disk),
    keyed by the config and the files' sizes and mtimes, so load_island and load_validation (and
    threaded workers) tokenize once."""
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    key = repr((cfg.model_dump(exclude={"batch_size", "seq_len"}), stats))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        corpus: _Corpus = build()
        while len(_CACHE) >= 2:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = corpus
        return corpus


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Hash of the corpus listing (files, split, sizes). Workers must agree on it: the stdlib of
    another Python version, or a differently synced text directory, gives overlapping islands."""
    corpus = _list_corpus(cfg)
    listing = [(p.key, p.start, p.stop) for p in corpus.train] + [("val", p.key, p.start, p.stop) for p in corpus.val]
    return hashlib.sha256(repr(listing).encode()).hexdigest()[:16]


def _stdlib_files() -> list[tuple[str, str, str]]:
    """(key, path, group) of every stdlib .py file; group is the first path component."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                key = Path(dirpath, name).relative_to(root).as_posix()
                out.append((key, os.path.join(dirpath, name), key.split("/")[0]))
    if not out:
        raise DataError(f"stdlib corpus: no .py files under {root}; use data.corpus='text' with data.paths")
    return out


def _expand(paths: list[str], suffix: str) -> list[tuple[str, str, str]]:
    """(key, path, group) for every file named by `paths`, in order, without duplicates.

    key is the path relative to the entry's root (used for the held-out hash); group is the path.
    Directories contribute files ending in `suffix` (never meta.json or tokenizer.json).
    """
    out: dict[str, tuple[str, str, str]] = {}
    for entry in paths:
        if any(c in entry for c in "*?["):
            base = Path(*itertools.takewhile(lambda p: not any(c in p for c in "*?["), Path(entry).parts))
            files = sorted(Path(m) for m in glob.glob(entry, recursive=True) if os.path.isfile(m))
            if not files:
                raise DataError(f"data.paths: pattern {entry!r} matched no files (cwd: {os.getcwd()}); fix the pattern")
        else:
            base = Path(entry)
            if base.is_file():
                files, base = [base], base.parent
            elif base.is_dir():
                files = sorted(
                    f
                    for f in base.rglob(f"*{suffix}")
                    if f.is_file()
                    and not any(p.startswith(".") for p in f.relative_to(base).parts)
                    and f.name not in (META, "tokenizer.json")
                )
                if not files:
                    what = f"no {suffix} files" if suffix else "no files"
                    raise DataError(f"data.paths: directory {entry!r} contains {what}; point data.paths at the data")
            else:
                raise DataError(
                    f"data.paths: {entry!r} does not exist (relative paths start at {os.getcwd()}); fix the path"
                )
        for f in files:
            out.setdefault(str(f), (f.relative_to(base).as_posix(), str(f), str(f)))
    return list(out.values())


def _split_files(name: str, files: list[tuple[str, str, str]], fraction: float) -> _Corpus:
    """Byte corpora: hold out whole files by the hash of their key."""
    train: list[_Piece] = []
    val: list[_Piece] = []
    for key, path, group in files:
        size = os.path.getsize(path)
        if size:
            (val if _held_out(key, fraction) else train).append(_Piece(path, key, group, 0, size))
    if not train and not val:
        raise DataError(f"{name}: every file is empty; point data.paths at non-empty files")
    if not train or not val:
        # Too few files for the hash to put some on each side: hold out the tail of the last one.
        rank = {path: i for i, (_, path, _) in enumerate(files)}
        train = sorted(train + val, key=lambda p: rank[p.path])
        last = train[-1]
        tail = min(math.ceil(sum(p.size for p in train) * fraction), last.size // 2)
        if tail == 0:
            raise DataError(f"{name}: too little data to hold out a validation split; add more text")
        train[-1] = _Piece(last.path, last.key, last.group, 0, last.size - tail)
        val = [_Piece(last.path, last.key, last.group, last.size - tail, last.size)]
    return _Corpus(name, np.uint8, train, val)


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The meta.json of a directory of token shards, or None."""
    path = directory / META
    if not path.is_file():
        return None
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}); rerun dilo data prepare") from e
    if meta.get("dtype") not in _DTYPES:
        raise DataError(f"{path}: dtype {meta.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    return meta


def _token_corpus(cfg: DataConfig) -> _Corpus:
    """.bin files of uint16 ids, or of the dtype their directory's meta.json names (uint32 when
    the vocabulary exceeds 65,535)."""
    name = f"data.paths={cfg.paths}"
    train: list[_Piece] = []
    val: list[_Piece] = []
    dtypes: dict[str, str] = {}
    vocab: int | None = None
    for key, path, group in _expand(cfg.paths, suffix=".bin"):
        meta = read_meta(Path(path).parent)
        dtype = "uint16" if meta is None else str(meta["dtype"])
        dtypes.setdefault(dtype, path)
        if meta is not None and meta.get("vocab_size") is not None:
            vocab = max(vocab or 0, int(meta["vocab_size"]))
        width = np.dtype(_DTYPES[dtype]).itemsize
        size = os.path.getsize(path)
        if size % width:
            raise DataError(
                f"{path!r} has a size ({size} bytes) that is not a multiple of {width}, "
                f"so it is not a file of {dtype} token ids"
            )
        n = size // width
        n_val = int(n * cfg.val_fraction)
        if n - n_val:
            train.append(_Piece(path, key, group, 0, n - n_val))
        if n_val:
            val.append(_Piece(path, key, group, n - n_val, n))
    if len(dtypes) > 1:
        raise DataError(f"{name}: mixes token files of dtypes {dtypes}; prepare them with one tokenizer")
    if not train or not val:
        side = "training" if not train else "validation"
        raise DataError(f"{name}: the {side} split is empty; add token files or change data.val_fraction")
    return _Corpus(name, _DTYPES[next(iter(dtypes))], train, val, vocab_size=vocab, vocab_source=f"{name} (meta.json)")
