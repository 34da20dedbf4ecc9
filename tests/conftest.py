"""Shared fixtures: a small text corpus, tiny configs, and workers as threads over real Gloo."""

from __future__ import annotations

import shutil
import sysconfig
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import dilo
from dilo.config import RunConfig, from_dict, to_toml
from dilo.train import train
from dilo.worlds import Placement

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files with the longest process tests first, the quick ones after: pytest-xdist hands
    out whole files (--dist loadfile) in collection order, so the quick files fill in behind the
    long ones instead of a long file starting last and running alone. A file's weight is the sum
    of its `slow` tests' timeouts (60 s for one without its own); files keep their order among
    equals, tests theirs in a file."""

    def weight(item: pytest.Item) -> float:
        if item.get_closest_marker("slow") is None:
            return 0.0
        mark = item.get_closest_marker("timeout")
        return float(mark.args[0]) if mark and mark.args else 60.0

    files: dict[Path, float] = {}
    for item in items:
        files[item.path] = files.get(item.path, 0.0) + weight(item)
    rank = {f: i for i, f in enumerate(sorted(files, key=lambda f: -files[f]))}
    items.sort(key=lambda item: rank[item.path])


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 1 MB of Python sources: small enough to load in milliseconds per worker."""
    src = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for pkg in ("json", "email", "collections", "concurrent", "logging", "urllib"):
        for f in sorted((src / pkg).rglob("*.py")):
            dest = out / pkg / f.relative_to(src / pkg)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    return out


TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 256,
    "max_position_embeddings": 64,
}
"""A Hugging Face Llama of about 40k parameters, for `[model] kind = "hf", config = TINY_LLAMA`."""


def tiny_config(run_dir: Path, corpus: Path, **sections: Any) -> RunConfig:
    """A config that trains in well under a second per round."""
    raw: dict[str, Any] = {
        "name": "test",
        "out_dir": str(run_dir),
        "steps": 12,
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context": 32},
        "data": {"corpus": "text", "paths": [str(corpus)], "batch_size": 4, "seq_len": 32, "val_fraction": 0.1},
        "inner": {"lr": 3e-3, "warmup_steps": 2},
        "outer": {"kind": "diloco", "inner_steps": 4},
        "log": {"progress": False, "plot": False, "eval_every": 1, "eval_batches": 4},
        "transport": {"timeout_s": 20},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "outer":
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return from_dict(raw)


def run_workers(fn: Callable[[Placement], Any], n: int) -> list[Any]:
    """Run fn(world) for n workers as threads sharing a real TCPStore; re-raise the first error."""
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False)
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def target(rank: int) -> None:
        try:
            results[rank] = fn(Placement(rank=rank, size=n, port=store.port, hosted=True))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[rank] = e

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for e in errors:
        if e is not None:
            raise e
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return results


def train_threads(cfg: RunConfig, n: int, **kwargs: Any) -> list[dict[str, Any]]:
    return run_workers(lambda p: train(cfg, dilo.init(cfg, placement=p), **kwargs), n)


def write_toml(cfg: RunConfig, path: Path) -> Path:
    """The config as a TOML file for the command-line tools (only what differs from the defaults)."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    for section, table in data.items():
        kind = getattr(getattr(cfg, section), "kind", None)
        if isinstance(table, dict) and table and kind is not None and "kind" not in table:
            data[section] = {"kind": kind, **table}  # a kind that is the default still names the table's fields
    path.write_text(to_toml({k: v for k, v in data.items() if v != {}}))
    return path
