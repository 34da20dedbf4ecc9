"""Islands (which ranges of the training stream each worker gets) and the resumable batch stream.

See the package docstring (`dilo.data`) for the rules; the listing is in `dilo.data.corpus`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dilo.config import DataConfig
from dilo.data.corpus import _Corpus, _list_corpus, _Piece
from dilo.errors import DataError

_BLOCK_TOKENS = 1 << 16
_MIN_BLOCKS_PER_ISLAND = 8
_IDENTITY = ("index", "seed", "num_tokens", "seq_len")  # cursor fields that must match on restore


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
    elif corpus.contiguous or (len(corpus.train) < count and corpus.dtype != np.uint8 and not corpus.arrays):
        # fewer token files than islands (or an import corpus): equal contiguous ranges keep
        # neighbouring text together
        shares = [[(i * total // count, (i + 1) * total // count)] for i in range(count)]
    else:
        if len(groups) < count:
            raise DataError(
                f"{corpus.name}: data.islands={cfg.islands!r} asked for {count} islands but the training "
                f"split has only {len(groups)} {corpus.unit}; use fewer workers, more files or "
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
            if p.path in corpus.arrays:
                out.append(corpus.arrays[p.path][lo:hi])
            elif corpus.dtype != np.uint8:
                if p.path not in maps:
                    maps[p.path] = np.memmap(p.path, dtype=corpus.dtype, mode="r")
                out.append(maps[p.path][lo:hi])  # a lazy view; pages load when batches touch them
            else:
                with open(p.path, "rb") as f:
                    f.seek(lo)
                    out.append(np.frombuffer(f.read(hi - lo), dtype=np.uint8))
            if vocab_size is not None:
                _check_ids(out[-1], p.path, lo, vocab_size)
    if (corpus.dtype == np.uint8 or corpus.arrays) and len(out) > 1:
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
            unit = "byte value" if tokens.dtype == np.uint8 else "token id"
            raise DataError(
                f"{path}: {unit} {top} (the largest in the part this worker reads; the first id >= "
                f"{vocab_size} is at token {where}) does not fit the model's vocab_size={vocab_size}; "
                f"the data was tokenized with a larger vocabulary: set model.vocab_size to at least "
                f"{top + 1}, or re-tokenize the data with the model's vocabulary"
            )


def _check_vocab(corpus: _Corpus, vocab_size: int | None) -> None:
    """A tokenizer (or prepared shards) with more ids than the model's embedding fails here, before
    any id is read, naming both numbers and the fix."""
    if vocab_size is not None and corpus.vocab_size is not None and corpus.vocab_size > vocab_size:
        raise DataError(
            f"{corpus.vocab_source} has a vocabulary of {corpus.vocab_size} ids but the model's "
            f"vocab_size is {vocab_size}; set model.vocab_size = {corpus.vocab_size} (or larger), or use a "
            "tokenizer with the model's vocabulary"
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
    _check_vocab(corpus, vocab_size)
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
    _check_vocab(corpus, vocab_size)
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
