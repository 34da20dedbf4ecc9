"""Corpora, data islands and resumable batch streams.

Each dilo worker trains on its own *island*, a fixed share of the training data that it alone
reads. Five corpora (`DataConfig.corpus`):

- stdlib: the .py files of the running Python's standard library (no download; about 11 MB),
  skipping site-packages, dist-packages, test, tests, idlelib and __pycache__ directories.
- text: files, directories (recursive, sorted, dotfiles skipped) or glob patterns, as bytes.
- tokens: .bin files of uint16 token ids (uint32 when the directory's meta.json, written by
  `dilo data prepare`, says so), read through numpy.memmap and never loaded whole.
- hf: local json/jsonl, parquet, text or arrow files read with the `datasets` library; the
  `data.text_field` column is tokenized and the documents are packed into one stream, each
  followed by the EOS (separator) id.
- import: `data.builder = "pkg.mod:fn"` returns a torch Dataset / IterableDataset of token-id
  sequences, packed the same way.

`data.tokenizer` is "bytes" (a token is a byte value 0..255, the default), a tokenizer.json file
or a Hugging Face tokenizer directory (local files only; see `dilo.data.tokenizer`). stdlib and
text with a tokenizer tokenize each file (each held-out part) as one document.

    island = load_island(cfg.data, index=rank, count=num_workers, seed=cfg.seed)
    x, y = island.next_batch()       # int64 [batch_size, seq_len]; y is x shifted by one
    cursor = island.state_dict()     # JSON-safe; island.load_state_dict(cursor) resumes exactly
    val = load_validation(cfg.data, seed=cfg.seed, num_batches=cfg.log.eval_batches)

Everything below is a pure function of the config, the seed and the files, so every worker
derives the same split and the same assignment without talking to the others; nothing is cached
on disk (tokenized corpora are kept in memory for the process, see `corpus._memo`).

Validation split. stdlib and text hold out whole files, chosen by a stable hash (crc32) of the
path relative to its root (the stdlib directory, the directory named in `paths`, or the literal
prefix of a glob), so moving a corpus does not reshuffle it. When that leaves the validation (or
training) side empty, which happens with a handful of files, the tail of the last file is held
out instead. tokens holds out the tail `val_fraction` of every file. hf and import hold out whole
documents by the crc32 of their text (import: of their ids), with the same tail fallback.

Islands, over the training stream (the training files concatenated in listing order):
- iid: the stream is cut into equal blocks (at most about 64 Ki tokens, at least 8 per island
  when the corpus allows), shuffled with the run seed and dealt round-robin, the same number to
  each island, so every island sees the same distribution and sizes match to a few tokens.
- by_source: whole sources per island (stdlib: top-level packages and modules; text and tokens:
  files; tokens with fewer files than islands: equal contiguous ranges), largest first to the
  island holding the fewest tokens. Sizes stay balanced, content differs: the non-IID case.
  import: equal contiguous ranges of the stream, in the dataset's order.
- by_column (hf): every distinct value of `data.island_column` (e.g. a language) goes whole to
  one island, balanced by tokens the same way: the realistic non-IID case.

Cost. hf, import and a tokenizer on stdlib / text tokenize the whole corpus into memory on every
worker at start (every worker needs the token counts to balance the islands; about 1 MB/s of text
per core with a BPE, see BENCHMARKS.md); for a large corpus, `dilo data prepare` it once into
token shards and train on `corpus = "tokens"`, which memory-maps them.

Sampling. An island is cut into non-overlapping windows of seq_len + 1 tokens, visited in a
fresh random permutation each epoch; the permutation is seeded from (seed, island, epoch), so
the cursor (epoch, position) is all the state there is.

Modules: corpus (listing, split, meta.json), islands (plans, Island, load_island / load_validation),
tokenizer, hf (local files through datasets), documents (tokenize and pack: hf, import, tokenizers
on byte corpora), prepare (`dilo data prepare`).
"""

from __future__ import annotations

from dilo.data.corpus import _Corpus, _expand, _held_out, _list_corpus, _Piece, corpus_fingerprint, read_meta
from dilo.data.islands import (
    _CHECK_CHUNK,
    Island,
    IslandPlan,
    _check_ids,
    _gather,
    _generator,
    _merge,
    _plan,
    _read,
    _to_batch,
    load_island,
    load_validation,
    plan_islands,
)
from dilo.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "_CHECK_CHUNK",
    "Island",
    "IslandPlan",
    "Tokenizer",
    "_Corpus",
    "_Piece",
    "_check_ids",
    "_expand",
    "_gather",
    "_generator",
    "_held_out",
    "_list_corpus",
    "_merge",
    "_plan",
    "_read",
    "_to_batch",
    "corpus_fingerprint",
    "load_island",
    "load_tokenizer",
    "load_validation",
    "plan_islands",
    "read_meta",
]
