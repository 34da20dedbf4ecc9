"""Tests for dilo/data.py: corpora, validation split, islands and resumable cursors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilo import data
from dilo.config import DataConfig
from dilo.data import Island, corpus_fingerprint, load_island, load_validation, plan_islands
from dilo.errors import DataError

STDLIB = DataConfig(batch_size=4, seq_len=64)


def _stream(corpus: data._Corpus) -> np.ndarray:
    """The whole training stream, read the slow obvious way."""
    parts = []
    for p in corpus.train:
        raw = np.fromfile(p.path, dtype=corpus.dtype)
        parts.append(raw[p.start : p.stop])
    return np.concatenate(parts)


def _island_tokens(island: Island) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in island._segments])


def _write_text(root: Path, sizes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, size in sizes.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(bytes(rng.integers(97, 123, size, dtype=np.uint8)))


# ---------------------------------------------------------------------------------------------
# stdlib


def test_stdlib_corpus_split_is_disjoint_and_deterministic() -> None:
    a, b = data._list_corpus(STDLIB), data._list_corpus(STDLIB)
    assert a == b
    train_files = {p.path for p in a.train}
    val_files = {p.path for p in a.val}
    assert val_files and not train_files & val_files
    train_size = sum(p.size for p in a.train)
    assert train_size > 1_000_000
    assert all(p.start == 0 for p in a.train + a.val)  # whole files
    for skipped in ("site-packages", "test", "tests", "idlelib", "__pycache__"):
        assert not any(f"/{skipped}/" in p.path for p in a.train + a.val)
    assert all(p.path.endswith(".py") for p in a.train)


def test_iid_islands_partition_the_training_stream() -> None:
    corpus = data._list_corpus(STDLIB)
    stream = _stream(corpus)
    plans = plan_islands(STDLIB, count=3, seed=1)
    ranges = sorted(r for p in plans for r in p.ranges)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(stream)
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(ranges))  # disjoint
    assert sum(b - a for a, b in ranges) == len(stream)  # and nothing missing
    sizes = [p.num_tokens for p in plans]
    assert max(sizes) - min(sizes) <= 100  # equal blocks, the same number per island
    for plan in plans:
        island = load_island(STDLIB, plan.index, 3, seed=1)
        assert island.num_tokens == plan.num_tokens
        expected = np.concatenate([stream[a:b] for a, b in plan.ranges])
        assert np.array_equal(_island_tokens(island), expected)
    # another seed deals other blocks
    assert plan_islands(STDLIB, count=3, seed=2)[0].ranges != plans[0].ranges


def test_by_source_islands_are_disjoint_by_package_and_balanced() -> None:
    cfg = STDLIB.model_copy(update={"islands": "by_source"})
    plans = plan_islands(cfg, count=4, seed=0)
    sources = [set(p.sources) for p in plans]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not sources[i] & sources[j]
    groups = {p.group for p in data._list_corpus(cfg).train}
    assert set().union(*sources) == groups
    assert "asyncio" in groups and "argparse.py" in groups  # packages and modules are sources
    sizes = [p.num_tokens for p in plans]
    assert max(sizes) / min(sizes) < 1.05
    island = load_island(cfg, 2, 4, seed=0)
    assert island.sources == plans[2].sources and island.num_tokens == plans[2].num_tokens


def test_validation_batches_are_fixed_and_shifted() -> None:
    a = load_validation(STDLIB, seed=0, num_batches=3)
    b = load_validation(STDLIB, seed=0, num_batches=3)
    assert len(a) == 3
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape == ya.shape == (4, 64) and xa.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])


# ---------------------------------------------------------------------------------------------
# cursors


def _small_island(seed: int = 0, batch_size: int = 3) -> Island:
    tokens = np.arange(1000, dtype=np.uint16)
    # two segments so some windows straddle a boundary
    return Island([tokens[:333], tokens[333:]], batch_size=batch_size, seq_len=9, seed=seed, index=1)


def test_island_batches_cover_each_window_once_per_epoch() -> None:
    island = _small_island()
    assert island.num_windows == 100 and island.tokens_per_batch == 27
    starts = []
    for _ in range(100):  # 300 windows = 3 epochs
        x, y = island.next_batch()
        assert x.shape == y.shape == (3, 9) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        starts += x[:, 0].tolist()
    assert all(s % 10 == 0 for s in starts)
    epochs = [sorted(starts[i : i + 100]) for i in (0, 100, 200)]
    assert all(e == list(range(0, 1000, 10)) for e in epochs)
    assert starts[:100] != starts[100:200]  # a fresh permutation per epoch


@pytest.mark.parametrize("parts", [2, 3])
def test_island_ranks_split_the_islands_stream(parts: int) -> None:
    """The ranks of a data-parallel island together read exactly what one rank with a `parts` times
    larger batch would (epoch boundaries included); their cursors agree."""
    whole = _small_island(batch_size=3 * parts)
    ranks = [_small_island().split(r, parts) for r in range(parts)]
    for _ in range(70):  # 70 * 3 * parts windows: several epochs
        x, _ = whole.next_batch()
        shares = [r.next_batch()[0] for r in ranks]
        assert all(s.shape == (3, 9) for s in shares)
        for r, s in enumerate(shares):
            assert torch.equal(s, x[r::parts])
    assert all(r.state_dict() == whole.state_dict() for r in ranks)
    with pytest.raises(ValueError, match="outside"):
        _small_island().split(2, 2)


def test_cursor_restore_gives_bit_identical_batches() -> None:
    island = _small_island()
    for _ in range(31):  # stop mid-epoch, mid-batch alignment
        island.next_batch()
    state = json.loads(json.dumps(island.state_dict()))
    expected = [island.next_batch() for _ in range(80)]  # crosses two epoch boundaries
    resumed = _small_island()
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(80)), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(10, 400),
    seq_len=st.integers(1, 9),
    batch_size=st.integers(1, 7),
    before=st.integers(0, 60),
    after=st.integers(1, 30),
)
def test_cursor_restore_property(n: int, seq_len: int, batch_size: int, before: int, after: int) -> None:
    tokens = np.arange(n, dtype=np.uint16)

    def make() -> Island:
        return Island([tokens[: n // 3], tokens[n // 3 :]], batch_size=batch_size, seq_len=seq_len, seed=5)

    island = make()
    for _ in range(before):
        island.next_batch()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(island.state_dict())))
    for _ in range(after):
        (x, y), (rx, ry) = island.next_batch(), resumed.next_batch()
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert torch.equal(x[:, 1:], y[:, :-1]) and bool((x % (seq_len + 1) == 0)[:, :1].all())


def test_cursor_from_another_island_is_refused() -> None:
    state = _small_island(seed=0).state_dict()
    with pytest.raises(DataError, match="seed"):
        _small_island(seed=1).load_state_dict(state)


def test_island_shorter_than_one_window_raises() -> None:
    with pytest.raises(DataError, match="fewer than one window"):
        Island([np.zeros(9, dtype=np.uint8)], batch_size=1, seq_len=9, seed=0)


# ---------------------------------------------------------------------------------------------
# text


def test_text_corpus_from_directory_files_and_globs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write_text(tmp_path / "corpus", {f"d{i % 3}/f{i:02d}.txt": 3000 + 100 * i for i in range(40)})
    _write_text(tmp_path / "corpus", {".hidden/skip.txt": 500})
    by_dir = DataConfig(corpus="text", paths=["corpus"], batch_size=2, seq_len=32, val_fraction=0.2)
    by_glob = by_dir.model_copy(update={"paths": ["corpus/**/*.txt"]})
    files = by_dir.model_copy(update={"paths": [f"corpus/d{i % 3}/f{i:02d}.txt" for i in range(40)]})
    corpora = [data._list_corpus(c) for c in (by_dir, by_glob, files)]
    total = sum(3000 + 100 * i for i in range(40))
    for c in corpora:
        assert sum(p.size for p in c.train + c.val) == total
        assert not {p.path for p in c.train} & {p.path for p in c.val}
        assert c.val  # 40 files at 20%: the hash holds out several
    # the held-out files depend on paths below the root, not on how the root was named
    assert {Path(p.path).name for p in corpora[0].val} == {Path(p.path).name for p in corpora[1].val}
    x, y = load_island(by_glob, 0, 2, seed=0).next_batch()
    assert x.shape == (2, 32) and int(x.min()) >= 97 and int(x.max()) < 123
    plans = plan_islands(by_dir.model_copy(update={"islands": "by_source"}), 5, seed=0)
    assert sum(len(p.sources) for p in plans) == len(corpora[0].train)


def test_corpus_fingerprint_tracks_the_listing(tmp_path: Path) -> None:
    _write_text(tmp_path, {f"f{i}.txt": 1000 for i in range(5)})
    cfg = DataConfig(corpus="text", paths=[str(tmp_path)])
    first = corpus_fingerprint(cfg)
    assert corpus_fingerprint(cfg) == first and len(first) == 16
    _write_text(tmp_path, {"f2.txt": 999})
    assert corpus_fingerprint(cfg) != first
    assert corpus_fingerprint(STDLIB) == corpus_fingerprint(STDLIB)


def test_text_single_file_holds_out_its_tail(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_bytes(bytes(range(256)) * 40)
    cfg = DataConfig(corpus="text", paths=[str(tmp_path / "one.txt")], batch_size=2, seq_len=16, val_fraction=0.1)
    corpus = data._list_corpus(cfg)
    assert len(corpus.train) == len(corpus.val) == 1
    assert corpus.train[0].stop == corpus.val[0].start == 10240 - 1024
    assert load_validation(cfg, seed=0, num_batches=2)[0][0].shape == (2, 16)


# ---------------------------------------------------------------------------------------------
# tokens


def test_tokens_corpus_reads_uint16_by_memmap(tmp_path: Path) -> None:
    n = 20_000
    for k in range(2):
        (np.arange(n, dtype=np.uint16) + 30_000 * k).tofile(tmp_path / f"shard{k}.bin")
    cfg = DataConfig(corpus="tokens", paths=[str(tmp_path)], batch_size=4, seq_len=32, val_fraction=0.1)
    island = load_island(cfg, 0, 1, seed=0)
    assert island.num_tokens == 2 * 18_000
    assert all(isinstance(s, np.memmap) for s in island._segments)
    x, _ = island.next_batch()
    assert x.dtype == torch.int64 and int(x.max()) < 50_000
    # validation is the tail 10% of every file
    for xv, _ in load_validation(cfg, seed=0, num_batches=4):
        assert bool(((xv % 30_000) >= 18_000).all())  # windows may straddle the two tails
    # iid over memmaps: two islands split the stream exactly
    stream = _stream(data._list_corpus(cfg))
    islands = [load_island(cfg, i, 2, seed=0) for i in range(2)]
    assert sum(i.num_tokens for i in islands) == len(stream)
    for i, plan in enumerate(plan_islands(cfg, 2, seed=0)):
        assert np.array_equal(_island_tokens(islands[i]), np.concatenate([stream[a:b] for a, b in plan.ranges]))
    # by_source with more islands than files falls back to contiguous ranges
    plans = plan_islands(cfg.model_copy(update={"islands": "by_source"}), 3, seed=0)
    assert [p.num_tokens for p in plans] == [12_000] * 3


def test_tokens_odd_size_raises(tmp_path: Path) -> None:
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 101)
    cfg = DataConfig(corpus="tokens", paths=[str(tmp_path / "bad.bin")])
    with pytest.raises(DataError, match="bad.bin"):
        load_island(cfg, 0, 1, seed=0)


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_path_raises(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="does not exist") as info:
        load_island(DataConfig(corpus="text", paths=[missing]), 0, 1, seed=0)
    assert missing in str(info.value)


def test_glob_without_matches_raises(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(DataError, match="matched no files") as info:
        plan_islands(DataConfig(corpus="text", paths=[pattern]), 1, seed=0)
    assert pattern in str(info.value)


def test_empty_directory_raises(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no files") as info:
        load_validation(DataConfig(corpus="text", paths=[str(tmp_path / "empty")]), seed=0, num_batches=1)
    assert str(tmp_path / "empty") in str(info.value)
    (tmp_path / "empty" / "zero.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_validation(DataConfig(corpus="text", paths=[str(tmp_path / "empty")]), seed=0, num_batches=1)


def test_too_many_islands_raises(tmp_path: Path) -> None:
    _write_text(tmp_path, {f"f{i}.txt": 400 for i in range(4)})
    cfg = DataConfig(corpus="text", paths=[str(tmp_path)], islands="by_source", seq_len=8, val_fraction=0.3)
    with pytest.raises(DataError, match="asked for 9 islands but the training split has only") as info:
        plan_islands(cfg, 9, seed=0)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="asked for 500 islands"):
        plan_islands(cfg.model_copy(update={"islands": "iid"}), 500, seed=0)
