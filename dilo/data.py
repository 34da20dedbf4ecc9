"""Corpora, data islands and resumable batch streams.

Each dilo worker trains on its own *island*, a fixed share of the training data that it alone
reads. Three corpora (`DataConfig.corpus`):

- stdlib: the .py files of the running Python's standard library (no download; about 11 MB),
  skipping site-packages, dist-packages, test, tests, idlelib and __pycache__ directories.
- text: files, directories (recursive, sorted, dotfiles skipped) or glob patterns, as bytes.
- tokens: .bin files of uint16 token ids, read through numpy.memmap and never loaded whole.

stdlib and text are byte-level: a token is a byte value 0..255.

    island = load_island(cfg.data, index=rank, count=num_workers, seed=cfg.seed)
    x, y = island.next_batch()       # int64 [batch_size, seq_len]; y is x shifted by one
    cursor = island.state_dict()     # JSON-safe; island.load_state_dict(cursor) resumes exactly
    val = load_validation(cfg.data, seed=cfg.seed, num_batches=cfg.log.eval_batches)

Everything below is a pure function of the config, the seed and the files, so every worker
derives the same split and the same assignment without talking to the others; nothing is cached
on disk.

Validation split. stdlib and text hold out whole files, chosen by a stable hash (crc32) of the
path relative to its root (the stdlib directory, the directory named in `paths`, or the literal
prefix of a glob), so moving a corpus does not reshuffle it. When that leaves the validation (or
training) side empty, which happens with a handful of files, the tail of the last file is held
out instead. tokens holds out the tail `val_fraction` of every file.

Islands, over the training stream (the training files concatenated in listing order):
- iid: the stream is cut into equal blocks (at most about 64 Ki tokens, at least 8 per island
  when the corpus allows), shuffled with the run seed and dealt round-robin, the same number to
  each island, so every island sees the same distribution and sizes match to a few tokens.
- by_source: whole sources per island (stdlib: top-level packages and modules; text and tokens:
  files; tokens with fewer files than islands: equal contiguous ranges), largest first to the
  island holding the fewest tokens. Sizes stay balanced, content differs: the non-IID case.

Sampling. An island is cut into non-overlapping windows of seq_len + 1 tokens, visited in a
fresh random permutation each epoch; the permutation is seeded from (seed, island, epoch), so
the cursor (epoch, position) is all the state there is.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import itertools
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dilo.config import DataConfig
from dilo.errors import DataError

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
_BLOCK_TOKENS = 1 << 16
_MIN_BLOCKS_PER_ISLAND = 8
_IDENTITY = ("index", "seed", "num_tokens", "seq_len")  # cursor fields that must match on restore


# ---------------------------------------------------------------------------------------------
# listing: which files, which ranges are train and which are validation (no file is read)


@dataclass(frozen=True)
class _Piece:
    """Tokens [start, stop) of one file; `key` is its path relative to the corpus root and
    `group` the by_source unit it belongs to."""

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


def _held_out(key: str, fraction: float) -> bool:
    return zlib.crc32(key.encode()) < fraction * 2**32


def _list_corpus(cfg: DataConfig) -> _Corpus:
    if cfg.corpus == "stdlib":
        return _split_files("stdlib corpus", _stdlib_files(), cfg.val_fraction)
    if not cfg.paths:
        raise DataError(f"data.corpus={cfg.corpus!r} needs data.paths (files, directories or glob patterns)")
    if cfg.corpus == "text":
        return _split_files(f"data.paths={cfg.paths}", _expand(cfg.paths, suffix=""), cfg.val_fraction)
    return _token_corpus(cfg)


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
    Directories contribute files ending in `suffix`.
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
                    if f.is_file() and not any(p.startswith(".") for p in f.relative_to(base).parts)
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


def _token_corpus(cfg: DataConfig) -> _Corpus:
    name = f"data.paths={cfg.paths}"
    train: list[_Piece] = []
    val: list[_Piece] = []
    for key, path, group in _expand(cfg.paths, suffix=".bin"):
        size = os.path.getsize(path)
        if size % 2:
            raise DataError(f"{path!r} has an odd size ({size} bytes), so it is not a file of uint16 token ids")
        n = size // 2
        n_val = int(n * cfg.val_fraction)
        if n - n_val:
            train.append(_Piece(path, key, group, 0, n - n_val))
        if n_val:
            val.append(_Piece(path, key, group, n - n_val, n))
    if not train or not val:
        side = "training" if not train else "validation"
        raise DataError(f"{name}: the {side} split is empty; add token files or change data.val_fraction")
    return _Corpus(name, np.uint16, train, val)


# ---------------------------------------------------------------------------------------------
# islands: which ranges of the training stream each worker gets


@dataclass(frozen=True)
class IslandPlan:
    """What island `index` holds, decided without reading any data."""

    index: int
    ranges: tuple[tuple[int, int], ...]
    """[start, stop) ranges of the training stream (all training files concatenated), sorted."""
    sources: tuple[str, ...]
    """Sources (stdlib: top-level packages and modules; text/tokens: files) the ranges touch."""

    @property
    def num_tokens(self) -> int:
        return sum(b - a for a, b in self.ranges)


def plan_islands(cfg: DataConfig, count: int, seed: int) -> list[IslandPlan]:
    """Split the training stream into `count` islands (see the module docstring); lists files only."""
    return _plan(_list_corpus(cfg), cfg, count, seed)


def _plan(corpus: _Corpus, cfg: DataConfig, count: int, seed: int) -> list[IslandPlan]:
    if count < 1:
        raise ValueError(f"count={count}: need at least one island")
    offsets = list(itertools.accumulate((p.size for p in corpus.train), initial=0))
    total = offsets[-1]
    groups: dict[str, list[int]] = {}  # group -> its pieces' indices, in listing order
    for i, p in enumerate(corpus.train):
        groups.setdefault(p.group, []).append(i)

    if cfg.islands == "iid":
        window = cfg.seq_len + 1
        if total < count * window:
            raise DataError(
                f"{corpus.name}: asked for {count} islands but the {total} training tokens give fewer than one "
                f"window of seq_len+1={window} each; use fewer workers, a shorter seq_len or more data"
            )
        # Equal blocks, the same number per island, so sizes match to a few tokens. Blocks need
        # not align with windows: windows are cut later from each island's own stream.
        per_island = max(
            math.ceil(total / (count * _BLOCK_TOKENS)), min(_MIN_BLOCKS_PER_ISLAND, total // (count * window))
        )
        num_blocks = per_island * count
        bounds = [b * total // num_blocks for b in range(num_blocks + 1)]
        order = torch.randperm(num_blocks, generator=_generator(seed, "blocks")).tolist()
        shares = [[(bounds[b], bounds[b + 1]) for b in order[i::count]] for i in range(count)]
    elif len(corpus.train) < count and corpus.dtype == np.uint16:
        # fewer token files than islands: equal contiguous ranges keep neighbouring text together
        shares = [[(i * total // count, (i + 1) * total // count)] for i in range(count)]
    else:
        if len(groups) < count:
            raise DataError(
                f"{corpus.name}: data.islands='by_source' asked for {count} islands but the training "
                f"split has only {len(groups)} sources; use fewer workers, more files or "
                "data.islands='iid'"
            )
        loads = [0] * count
        members: list[list[str]] = [[] for _ in range(count)]
        sizes = {g: sum(corpus.train[i].size for i in idx) for g, idx in groups.items()}
        for g in sorted(groups, key=lambda g: (-sizes[g], g)):
            k = min(range(count), key=lambda k: (loads[k], k))
            members[k].append(g)
            loads[k] += sizes[g]
        shares = [[(offsets[i], offsets[i + 1]) for i in sorted(j for g in m for j in groups[g])] for m in members]

    plans = []
    for k, share in enumerate(shares):
        ranges = _merge(share)
        touched = {corpus.train[i].group: None for a, b in ranges for i in _pieces_in(offsets, a, b)}
        plans.append(IslandPlan(k, tuple(ranges), tuple(touched)))
    return plans


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        elif b > a:
            out.append((a, b))
    return out


def _pieces_in(offsets: list[int], a: int, b: int) -> range:
    """Indices of the pieces that overlap stream range [a, b)."""
    return range(bisect.bisect_right(offsets, a) - 1, bisect.bisect_left(offsets, b))


def _read(
    corpus: _Corpus, pieces: list[_Piece], ranges: list[tuple[int, int]], vocab_size: int | None = None
) -> list[np.ndarray]:
    """The tokens of `ranges` of the stream `pieces`, reading only the files they touch.

    With `vocab_size`, every id read is checked to lie below it (see `_check_ids`)."""
    offsets = list(itertools.accumulate((p.size for p in pieces), initial=0))
    maps: dict[str, np.ndarray] = {}
    out = []
    for a, b in ranges:
        for i in _pieces_in(offsets, a, b):
            p = pieces[i]
            lo, hi = p.start + max(a - offsets[i], 0), p.start + min(b, offsets[i + 1]) - offsets[i]
            if corpus.dtype == np.uint16:
                if p.path not in maps:
                    maps[p.path] = np.memmap(p.path, dtype=np.uint16, mode="r")
                out.append(maps[p.path][lo:hi])  # a lazy view; pages load when batches touch them
            else:
                with open(p.path, "rb") as f:
                    f.seek(lo)
                    out.append(np.frombuffer(f.read(hi - lo), dtype=np.uint8))
            if vocab_size is not None:
                _check_ids(out[-1], p.path, lo, vocab_size)
    if corpus.dtype == np.uint8 and len(out) > 1:
        out = [np.concatenate(out)]  # byte islands are small: one array makes windows one slice
    return out


_CHECK_CHUNK = 1 << 24
"""Token ids checked per step by `_check_ids` (32 MB of uint16): bounds the memory of the scan."""


def _check_ids(tokens: np.ndarray, path: str, offset: int, vocab_size: int) -> None:
    """Raise DataError when an id in `tokens` (ids offset.. of file `path`) is >= vocab_size.

    Without this, a file tokenized with a larger vocabulary than the model's fails much later with
    an index error inside the embedding. Reads the slice once, in chunks."""
    if vocab_size > int(np.iinfo(tokens.dtype).max):
        return  # every value of the dtype is a valid id
    for lo in range(0, len(tokens), _CHECK_CHUNK):
        chunk = np.asarray(tokens[lo : lo + _CHECK_CHUNK])
        if chunk.size and int(chunk.max()) >= vocab_size:
            where = offset + lo + int(np.argmax(chunk >= vocab_size))
            top = int(np.max(tokens))
            unit = "token id" if tokens.dtype == np.uint16 else "byte value"
            raise DataError(
                f"{path}: {unit} {top} (the largest in the part this worker reads; the first id >= "
                f"{vocab_size} is at token {where}) does not fit the model's vocab_size={vocab_size}; "
                f"the data was tokenized with a larger vocabulary: set model.vocab_size to at least "
                f"{top + 1}, or re-tokenize the data with the model's vocabulary"
            )


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


# ---------------------------------------------------------------------------------------------
# reading


class Island:
    """An endless, resumable stream of batches over one island's tokens.

    `segments` are 1-D arrays (numpy or memmap slices) read as one concatenated stream; `index`
    and `seed` pick the per-epoch window permutation.
    """

    def __init__(
        self,
        segments: list[np.ndarray],
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        index: int = 0,
        sources: tuple[str, ...] = (),
    ) -> None:
        self._segments = [s for s in segments if len(s)]
        self._starts = list(itertools.accumulate((len(s) for s in self._segments), initial=0))
        self.batch_size, self.seq_len, self.seed, self.index, self.sources = batch_size, seq_len, seed, index, sources
        self.num_windows = self.num_tokens // (seq_len + 1)
        if self.num_windows == 0:
            raise DataError(
                f"island {index} holds {self.num_tokens} tokens, fewer than one window of "
                f"seq_len+1={seq_len + 1}; lower data.seq_len, use fewer workers or add data"
            )
        self._epoch, self._position = 0, 0
        self._perm: Tensor | None = None
        self._part, self._parts = 0, 1

    def split(self, part: int, parts: int) -> Island:
        """Make this stream rank `part`'s share of an island trained by `parts` data-parallel ranks:
        each step the island reads parts * batch_size windows and this rank takes every parts-th,
        starting at `part`. The cursor moves the same on every rank, so checkpoints agree; the
        ranks together see exactly the windows one rank would with a parts times larger batch."""
        if not 0 <= part < parts:
            raise ValueError(f"rank {part} is outside 0..{parts - 1} of the island")
        self._part, self._parts = part, parts
        return self

    @property
    def num_tokens(self) -> int:
        return self._starts[-1]

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(x, y), int64 [batch_size, seq_len], y = x shifted left by one token."""
        rows = []
        for j in range(self.batch_size * self._parts):
            if self._position == self.num_windows:
                self._epoch, self._position, self._perm = self._epoch + 1, 0, None
            if self._perm is None:
                gen = _generator(self.seed, self.index, self._epoch)
                self._perm = torch.randperm(self.num_windows, generator=gen)
            if j % self._parts == self._part:
                rows.append(self._window(int(self._perm[self._position]) * (self.seq_len + 1)))
            self._position += 1
        return _to_batch(rows)

    def _window(self, start: int) -> np.ndarray:
        return _gather(self._segments, self._starts, start, self.seq_len + 1)

    def state_dict(self) -> dict[str, int]:
        """The cursor, plus what identifies the island so a wrong restore fails loudly."""
        return {"epoch": self._epoch, "position": self._position} | {k: getattr(self, k) for k in _IDENTITY}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in _IDENTITY:
            if int(state[key]) != getattr(self, key):
                raise DataError(
                    f"data cursor is for {key}={state[key]} but this island has {key}={getattr(self, key)}; "
                    "resume with the data config and worker count of the saved run"
                )
        if not 0 <= int(state["position"]) <= self.num_windows:
            raise DataError(f"data cursor position {state['position']} is outside 0..{self.num_windows}")
        self._epoch, self._position, self._perm = int(state["epoch"]), int(state["position"]), None


def _to_batch(rows: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    batch = torch.from_numpy(np.stack(rows).astype(np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def _gather(segments: list[np.ndarray], starts: list[int], start: int, length: int) -> np.ndarray:
    i = bisect.bisect_right(starts, start) - 1
    parts = []
    while length > 0:
        chunk = segments[i][start - starts[i] : start - starts[i] + length]
        parts.append(chunk)
        start, length, i = start + len(chunk), length - len(chunk), i + 1
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def load_island(cfg: DataConfig, index: int, count: int, seed: int, *, vocab_size: int | None = None) -> Island:
    """Island `index` of `count`, reading only the files (or memmap ranges) it holds.

    With `vocab_size` (the model's, see `dilo.model.model_vocab_size`), a token id >= vocab_size in the
    island raises DataError naming the file, the largest id and vocab_size."""
    if not 0 <= index < count:
        raise ValueError(f"island index {index} is outside 0..{count - 1}")
    corpus = _list_corpus(cfg)
    plan = _plan(corpus, cfg, count, seed)[index]
    segments = _read(corpus, corpus.train, list(plan.ranges), vocab_size)
    return Island(
        segments, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=seed, index=index, sources=plan.sources
    )


def load_validation(
    cfg: DataConfig, seed: int, num_batches: int, *, vocab_size: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """A fixed list of `num_batches` (x, y) batches from the held-out data, identical on every worker.

    Windows of seq_len + 1 tokens are drawn without repeats in a seeded order; a validation split
    with fewer windows than needed is cycled. `vocab_size` checks the ids as in `load_island`.
    """
    corpus = _list_corpus(cfg)
    total = sum(p.size for p in corpus.val)
    segments = _read(corpus, corpus.val, [(0, total)], vocab_size)
    starts = list(itertools.accumulate((len(s) for s in segments), initial=0))
    window = cfg.seq_len + 1
    num_windows = total // window
    if num_windows == 0:
        raise DataError(
            f"{corpus.name}: the validation split has {total} tokens, fewer than one window of "
            f"seq_len+1={window}; raise data.val_fraction, lower data.seq_len or add data"
        )
    order = torch.randperm(num_windows, generator=_generator(seed, "validation"))
    picks = order[torch.arange(num_batches * cfg.batch_size) % num_windows].tolist()
    out = []
    for b in range(num_batches):
        rows = [_gather(segments, starts, k * window, window) for k in picks[b * cfg.batch_size :][: cfg.batch_size]]
        out.append(_to_batch(rows))
    return out
