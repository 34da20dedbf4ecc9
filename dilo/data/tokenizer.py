"""Tokenizers for `data.tokenizer`: "bytes", a tokenizer.json file or a Hugging Face directory.

    tok = load_tokenizer("bytes")                # ids 0..255, the byte values of the UTF-8 text
    tok = load_tokenizer("out/tokenizer.json")   # tokenizers.Tokenizer.from_file
    tok = load_tokenizer("models/gpt2")          # AutoTokenizer.from_pretrained(dir, local_files_only=True)
    ids = tok.encode_batch(["one document", "another"])   # list of uint arrays

The tokenizers and transformers packages are imported only when a file or directory is named;
nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dilo.errors import DataError

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]", "<|im_end|>")


class Tokenizer:
    """What the data pipeline needs of a tokenizer: batch encoding, vocabulary size and EOS id."""

    def __init__(self, name: str, vocab_size: int, eos_id: int | None, encode: Any) -> None:
        self.name, self.vocab_size, self.eos_id = name, vocab_size, eos_id
        self._encode = encode  # list[str] -> list[list[int]]

    @property
    def dtype(self) -> type[np.unsignedinteger[Any]]:
        """The narrowest dtype that holds every id: uint8 for bytes, uint16 up to 65,536 ids, else uint32."""
        if self.vocab_size <= 256:
            return np.uint8
        return np.uint16 if self.vocab_size <= 1 << 16 else np.uint32

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self.name == "bytes":
            return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts]
        return [np.asarray(ids, dtype=self.dtype) for ids in self._encode(list(texts))]


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by `data.tokenizer` (see the module docstring)."""
    if spec == "bytes":
        return Tokenizer("bytes", 256, 0, None)
    path = Path(spec)
    if path.is_dir() and not (path / "tokenizer_config.json").is_file() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"  # a `dilo data prepare` output directory
    if path.is_file():
        try:
            from tokenizers import Tokenizer as _Fast
        except ImportError as e:  # pragma: no cover - the hf extra is missing
            raise DataError(f"data.tokenizer={spec!r} needs the tokenizers package: pip install 'dilo[hf]'") from e
        try:
            fast = _Fast.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise DataError(f"data.tokenizer={spec!r}: not a tokenizer.json file ({e})") from e
        vocab = fast.get_vocab_size(with_added_tokens=True)
        eos = next((i for name in _EOS_NAMES if (i := fast.token_to_id(name)) is not None), None)

        def encode_fast(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]

        return Tokenizer(str(path), vocab, eos, encode_fast)
    if path.is_dir():
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - the hf extra is missing
            raise DataError(f"data.tokenizer={spec!r} needs the transformers package: pip install 'dilo[hf]'") from e
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            auto = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
            raise DataError(f"data.tokenizer={spec!r}: not a Hugging Face tokenizer directory ({e})") from e
        eos_auto = auto.eos_token_id if isinstance(auto.eos_token_id, int) else None

        def encode_auto(texts: list[str]) -> list[list[int]]:
            out: list[list[int]] = auto(texts, add_special_tokens=False)["input_ids"]
            return out

        return Tokenizer(str(path), len(auto), eos_auto, encode_auto)
    raise DataError(
        f"data.tokenizer={spec!r} is neither 'bytes' nor an existing tokenizer.json file or tokenizer directory "
        f"(relative paths start at {os.getcwd()}); fix the path"
    )
