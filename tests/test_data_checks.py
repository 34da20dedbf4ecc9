"""Load-time checks of dilo/data.py: token ids that do not fit the model's vocabulary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dilo.config import DataConfig, GPTConfig
from dilo.data import load_island, load_validation
from dilo.errors import DataError
from dilo.model import build_model, model_vocab_size


def _tokens(path: Path, ids: np.ndarray) -> DataConfig:
    ids.astype(np.uint16).tofile(path)
    return DataConfig(corpus="tokens", paths=[str(path)], batch_size=2, seq_len=16, val_fraction=0.1)


def test_ids_beyond_vocab_name_file_largest_id_and_vocab(tmp_path: Path) -> None:
    ids = np.arange(5_000) % 200
    ids[1234] = 50_000  # a tokenizer with a larger vocabulary
    cfg = _tokens(tmp_path / "big_vocab.bin", ids)
    with pytest.raises(DataError) as err:
        load_island(cfg, 0, 1, seed=0, vocab_size=256)
    msg = str(err.value)
    assert "big_vocab.bin" in msg and "50000" in msg and "vocab_size=256" in msg and "1234" in msg
    load_island(cfg, 0, 1, seed=0)  # no vocab_size given: no check, as before
    load_island(cfg, 0, 1, seed=0, vocab_size=50_001)


def test_validation_split_is_checked_too(tmp_path: Path) -> None:
    ids = np.arange(5_000) % 200
    ids[-10] = 300  # in the held-out tail only
    cfg = _tokens(tmp_path / "tail.bin", ids)
    load_island(cfg, 0, 1, seed=0, vocab_size=256)
    with pytest.raises(DataError, match=r"tail\.bin.*300.*vocab_size=256"):
        load_validation(cfg, seed=0, num_batches=1, vocab_size=256)


def test_byte_corpus_against_a_small_vocab(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(bytes(range(97, 123)) * 200)
    cfg = DataConfig(corpus="text", paths=[str(tmp_path / "a.txt")], batch_size=2, seq_len=16)
    with pytest.raises(DataError, match=r"a\.txt: byte value 122.*vocab_size=100"):
        load_island(cfg, 0, 1, seed=0, vocab_size=100)
    load_island(cfg, 0, 1, seed=0, vocab_size=256)


def test_model_vocab_size_is_the_token_embedding() -> None:
    model = build_model(GPTConfig(vocab_size=300, n_layer=1, n_head=1, d_model=8, context=16), seed=0)
    assert model_vocab_size(model) == 300


@pytest.mark.slow
def test_dilo_run_reports_a_clear_error(tmp_path: Path) -> None:
    """The run stops with one `...: error: ...` line naming the file, not a traceback from the embedding."""
    ids = np.arange(20_000) % 250
    ids[7] = 40_000
    (tmp_path / "toks.bin").write_bytes(ids.astype(np.uint16).tobytes())
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'steps = 2\nout_dir = "{tmp_path / "out"}"\n'
        "[model]\nvocab_size = 256\nn_layer = 1\nn_head = 1\nd_model = 8\ncontext = 16\n"
        f'[data]\ncorpus = "tokens"\npaths = ["{tmp_path / "toks.bin"}"]\nbatch_size = 2\nseq_len = 16\n'
        "[inner]\nwarmup_steps = 0\n[log]\nprogress = false\nplot = false\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dilo.cli", "run", str(cfg)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "error: " in proc.stderr and "toks.bin" in proc.stderr and "40000" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
