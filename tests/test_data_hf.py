"""Tokenizers, Hugging Face datasets (data.corpus = "hf"), `dilo data prepare` and the import corpus,
with the real datasets / tokenizers packages on tiny files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dilo.config import DataConfig
from dilo.data import Island, load_island, load_validation, plan_islands
from dilo.data.prepare import prepare
from dilo.errors import DataError
from dilo.metrics import read_jsonl
from tests.conftest import tiny_config, train_threads, write_toml

WORDS = {
    "en": ["the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "away", "from", "the", "dog"],
    "fr": ["le", "chat", "est", "sur", "la", "table", "et", "puis", "il", "part", "vers", "le", "jardin"],
    "de": ["die", "katze", "sitzt", "auf", "dem", "tisch", "und", "dann", "geht", "sie", "nach", "hause"],
}


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    langs = list(WORDS)
    return [
        {"text": " ".join(rng.choices(WORDS[lang], k=rng.randint(20, 60))), "lang": lang}
        for lang in (langs[i % 3] for i in range(n))
    ]


def _jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict[str, str]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _island_docs(island: Island, eos: int = 0) -> list[str]:
    tokens = np.concatenate([np.asarray(s) for s in island._segments]).astype(np.uint8)
    return [d.decode() for d in tokens.tobytes().split(bytes([eos])) if d]


def _rounds(run_dir: Path, rank: int) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "logs" / f"worker{rank}.jsonl") if r["event"] == "round"]


# ---------------------------------------------------------------------------------------------
# the hf corpus


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_hf_dataset_trains(tmp_path: Path, fmt: str) -> None:
    write = _jsonl if fmt == "jsonl" else _parquet
    files = [write(tmp_path / f"part{i}.{fmt}", _rows(300, seed=i)) for i in range(2)]
    cfg = tiny_config(tmp_path / "run", files[0], data={"corpus": "hf", "paths": [str(f) for f in files]}, steps=8)
    out = train_threads(cfg, 2)
    assert all(s["steps"] == 8 and np.isfinite(s["val_loss"]) for s in out)
    assert out[0]["val_loss"] < out[0]["initial_val_loss"]


def test_hf_documents_are_packed_with_eos_and_split_by_document(tmp_path: Path) -> None:
    rows = _rows(400)
    path = _jsonl(tmp_path / "a.jsonl", rows)
    cfg = DataConfig(corpus="hf", paths=[str(path)], batch_size=2, seq_len=16, val_fraction=0.1)
    islands = [load_island(cfg, i, 2, seed=0, vocab_size=256) for i in range(2)]
    val = load_validation(cfg, seed=0, num_batches=2)
    assert len(val) == 2 and val[0][0].shape == (2, 16)
    texts = {r["text"] for r in rows}
    # iid blocks may cut a document; whole documents between two EOS ids are all real rows
    docs = [d for island in islands for d in _island_docs(island)[1:-1]]
    assert docs and sum(d in texts for d in docs) / len(docs) > 0.95
    held = sum(1 for r in rows if r["text"] not in set(docs))
    assert 0 < held < len(rows) // 2  # some documents are held out, most train


def test_by_column_gives_each_island_whole_column_values(tmp_path: Path) -> None:
    rows = _rows(600)
    path = _jsonl(tmp_path / "a.jsonl", rows)
    cfg = DataConfig(corpus="hf", paths=[str(path)], islands="by_column", island_column="lang", seq_len=16)
    plans = plan_islands(cfg, 2, seed=0)
    values = [set(p.sources) for p in plans]
    assert values[0] and values[1] and not values[0] & values[1] and values[0] | values[1] == set(WORDS)
    lang_of = {r["text"]: r["lang"] for r in rows}
    for i, plan in enumerate(plans):
        docs = _island_docs(load_island(cfg, i, 2, seed=0, vocab_size=256))
        assert docs and {lang_of[d] for d in docs} == set(plan.sources)  # only its values, each whole
    with pytest.raises(DataError, match=r"only 3 distinct values of data.island_column='lang' \(de, en, fr\)"):
        plan_islands(cfg, 4, seed=0)


def test_missing_text_field_names_the_columns(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", _rows(30))
    cfg = DataConfig(corpus="hf", paths=[str(path)], text_field="body")
    with pytest.raises(DataError, match=r"no column 'body' \(data.text_field\).*\['text', 'lang'\]"):
        load_island(cfg, 0, 1, seed=0)


def test_resume_on_an_hf_corpus_is_bit_identical(tmp_path: Path) -> None:
    files = [str(_jsonl(tmp_path / f"p{i}.jsonl", _rows(300, seed=i))) for i in range(2)]
    data = {"corpus": "hf", "paths": files, "islands": "by_source"}
    full = tiny_config(tmp_path / "full", Path(files[0]), data=data, steps=8, checkpoint={"every": 1})
    train_threads(full, 2)
    part = tiny_config(tmp_path / "part", Path(files[0]), data=data, steps=8, checkpoint={"every": 1})
    assert train_threads(part, 2, max_rounds=1)[0]["stopped"]
    resumed = tiny_config(
        tmp_path / "part", Path(files[0]), data=data, steps=8, checkpoint={"every": 1, "resume": True}
    )
    assert train_threads(resumed, 2)[0]["steps"] == 8
    events = [r["event"] for r in read_jsonl(tmp_path / "part" / "logs" / "worker0.jsonl")]
    assert events.count("resume") == 1 and events.index("resume") > events.index("round")
    for rank in range(2):
        a, b = _rounds(tmp_path / "full", rank), _rounds(tmp_path / "part", rank)
        assert [r["loss"] for r in a] == [r["loss"] for r in b]
        assert [r["anchor_hash"] for r in a] == [r["anchor_hash"] for r in b]


def test_island_cursor_restores_exactly_on_hf(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", _rows(300))
    cfg = DataConfig(corpus="hf", paths=[str(path)], batch_size=3, seq_len=16)
    a = load_island(cfg, 1, 2, seed=5)
    for _ in range(7):
        a.next_batch()
    b = load_island(cfg, 1, 2, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(40):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert xa.equal(xb) and ya.equal(yb)


# ---------------------------------------------------------------------------------------------
# tokenizers and `dilo data prepare`


def _word_tokenizer(path: Path, vocab_size: int) -> Path:
    """A word-level tokenizer.json with `vocab_size` ids ("w0" .. ), EOS "<|endoftext|>" last."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_prepare_train_bpe_then_train_on_the_shards(tmp_path: Path, corpus_dir: Path) -> None:
    out = tmp_path / "tok"
    rows = _jsonl(tmp_path / "extra.jsonl", _rows(200))
    proc = subprocess.run(
        [sys.executable, "-m", "dilo.cli", "data", "prepare", str(corpus_dir / "json"), str(rows)]
        + ["--out", str(out), "--train-bpe", "512"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1/" in proc.stderr and 'corpus = "tokens"' in proc.stderr  # one line per file off a TTY
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["eos_id"] == 0
    assert (out / "tokenizer.json").is_file() and len(meta["shards"]) == len(list(out.glob("*.bin"))) > 2
    cfg = tiny_config(
        tmp_path / "run",
        out,
        data={"corpus": "tokens", "tokenizer": str(out / "tokenizer.json"), "islands": "by_source"},
        model={"vocab_size": 512},
        steps=8,
    )
    s = train_threads(cfg, 2)[0]
    assert s["steps"] == 8 and s["val_loss"] < s["initial_val_loss"]


def test_uint32_shards_are_read_back(tmp_path: Path) -> None:
    tok = _word_tokenizer(tmp_path / "words.json", 70_000)
    rng = np.random.default_rng(0)
    ids = rng.integers(60_000, 69_999, size=4000)
    (tmp_path / "in.txt").write_text(" ".join(f"w{i}" for i in ids))
    meta = prepare([str(tmp_path / "in.txt")], tmp_path / "out", tokenizer=str(tok))
    assert meta["dtype"] == "uint32" and meta["eos_id"] == 69_999
    cfg = DataConfig(corpus="tokens", paths=[str(tmp_path / "out")], tokenizer=str(tok), seq_len=16, val_fraction=0.1)
    island = load_island(cfg, 0, 1, seed=0, vocab_size=70_000)
    stream = np.concatenate([np.asarray(s) for s in island._segments])
    assert stream.dtype == np.uint32 and np.array_equal(stream, ids[: len(stream)])
    x, _ = island.next_batch()
    assert int(x.max()) >= 65_536
    with pytest.raises(DataError, match="vocabulary of 70000 ids but the model's vocab_size is 256"):
        load_island(cfg, 0, 1, seed=0, vocab_size=256)


def test_text_corpus_with_a_tokenizer(tmp_path: Path, corpus_dir: Path) -> None:
    tok = tmp_path / "tok"
    prepare([str(corpus_dir / "json")], tok, bpe_vocab=400)
    cfg = DataConfig(corpus="text", paths=[str(corpus_dir / "json")], tokenizer=str(tok), seq_len=16)
    island = load_island(cfg, 0, 1, seed=0, vocab_size=400)
    x, y = island.next_batch()
    assert int(x.max()) >= 256 and x[:, 1:].equal(y[:, :-1])
    bytes_island = load_island(DataConfig(corpus="text", paths=[str(corpus_dir / "json")], seq_len=16), 0, 1, seed=0)
    assert island.num_tokens < bytes_island.num_tokens / 2  # BPE packs several bytes per id


def _cli_run(tmp_path: Path, cfg_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dilo.train", str(cfg_path)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("case", ["text_field", "vocab"])
def test_cli_errors_name_the_fix(tmp_path: Path, case: str) -> None:
    """One `dilo: error:` line naming the fix, no traceback (python -m dilo.train, as a worker runs)."""
    path = _jsonl(tmp_path / "a.jsonl", _rows(60))
    if case == "text_field":
        data, fix = {"corpus": "hf", "text_field": "body"}, "set data.text_field to one of them"
    else:
        data, fix = (
            {"corpus": "hf", "tokenizer": str(_word_tokenizer(tmp_path / "w.json", 1000))},
            "set model.vocab_size = 1000",
        )
    cfg = tiny_config(tmp_path / "run", path, data=data, steps=2, inner={"warmup_steps": 0})
    proc = _cli_run(tmp_path, write_toml(cfg, tmp_path / "run.toml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "dilo: error: " in proc.stderr and fix in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# the import corpus


BUILDER = """
import torch
from torch.utils.data import Dataset, IterableDataset

class Docs(Dataset):
    def __len__(self):
        return 200
    def __getitem__(self, i):
        return torch.arange(i % 50, i % 50 + 30) % 200

class Stream(IterableDataset):
    def __iter__(self):
        for i in range(200):
            yield list(range(i % 50, i % 50 + 30))

def docs():
    return Docs()

def stream():
    return Stream()
"""


@pytest.mark.parametrize("fn", ["docs", "stream"])
def test_import_corpus_packs_a_torch_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fn: str) -> None:
    (tmp_path / "my_builder.py").write_text(BUILDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = DataConfig(corpus="import", builder=f"my_builder:{fn}", eos_id=255, seq_len=16, batch_size=2)
    iid = [load_island(cfg, i, 2, seed=0, vocab_size=256) for i in range(2)]
    assert abs(iid[0].num_tokens - iid[1].num_tokens) <= 8
    by_source = cfg.model_copy(update={"islands": "by_source"})
    islands = [load_island(by_source, i, 2, seed=0, vocab_size=256) for i in range(2)]
    streams = [np.concatenate([np.asarray(s) for s in isl._segments]) for isl in islands]
    assert abs(len(streams[0]) - len(streams[1])) <= 1 and (streams[0] == 255).sum() > 50
    # contiguous index ranges in the dataset's order: island 0 starts with the first document, whole
    doc = streams[0][: int(np.argmax(streams[0] == 255))]
    assert np.array_equal(doc, np.arange(0, 30) % 200)
    assert len(load_validation(cfg, seed=0, num_batches=1)) == 1
    with pytest.raises(DataError, match="cannot import"):
        load_island(DataConfig(corpus="import", builder="my_builder:nope"), 0, 1, seed=0)


def test_hugging_face_tokenizer_directory(tmp_path: Path) -> None:
    """A save_pretrained directory loads through AutoTokenizer (local files only) and tokenizes the hf corpus."""
    from transformers import PreTrainedTokenizerFast

    prepare([str(_jsonl(tmp_path / "train.jsonl", _rows(200)))], tmp_path / "bpe", bpe_vocab=300)
    auto = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe" / "tokenizer.json"), eos_token="<|endoftext|>")
    auto.save_pretrained(str(tmp_path / "hf_tok"))
    from dilo.data import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "hf_tok"))
    assert tok.vocab_size == 300 and tok.eos_id == 0
    path = _jsonl(tmp_path / "a.jsonl", _rows(100, seed=1))
    cfg = DataConfig(corpus="hf", paths=[str(path)], tokenizer=str(tmp_path / "hf_tok"), seq_len=16)
    island = load_island(cfg, 0, 1, seed=0, vocab_size=300)
    stream = np.concatenate([np.asarray(s) for s in island._segments])
    assert stream.dtype == np.uint16 and int(stream.max()) >= 256 and (stream == 0).sum() > 50


def test_data_config_keys_go_together() -> None:
    with pytest.raises(ValueError, match='needs data.corpus="hf" and data.island_column'):
        DataConfig(corpus="hf", paths=["x"], islands="by_column")
    with pytest.raises(ValueError, match='only read with data.islands="by_column"'):
        DataConfig(corpus="hf", paths=["x"], island_column="lang")
    with pytest.raises(ValueError, match="go together"):
        DataConfig(corpus="import")
    with pytest.raises(DataError, match="neither 'bytes' nor an existing tokenizer.json"):
        load_island(DataConfig(corpus="text", paths=[__file__], tokenizer="no/such/tokenizer.json"), 0, 1, seed=0)


def test_by_column_trains_two_workers_on_their_languages(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", _rows(600))
    data = {"corpus": "hf", "islands": "by_column", "island_column": "lang"}
    cfg = tiny_config(tmp_path / "run", path, data=data, steps=8)
    out = train_threads(cfg, 2)
    assert all(s["steps"] == 8 for s in out) and out[0]["val_loss"] < out[0]["initial_val_loss"]


def test_hf_text_format_reads_each_file_as_one_document(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"doc{i}.md").write_text(f"# document {i}\n\n" + "some words on a line\n" * 40)
    cfg = DataConfig(corpus="hf", paths=[str(tmp_path)], format="text", islands="by_source", seq_len=16)
    plans = plan_islands(cfg, 2, seed=0)
    sources = [set(p.sources) for p in plans]  # whole files per island
    assert sources[0] and sources[1] and not sources[0] & sources[1]
    assert sources[0] | sources[1] <= {f"doc{i}.md" for i in range(6)}
    docs = [d for i in range(2) for d in _island_docs(load_island(cfg, i, 2, seed=0))]
    assert all(d.startswith("# document ") and d.count("\n") == 42 for d in docs)
