"""Checkpoints: everything a worker needs to continue bit-identically, saved atomically.

Layout (one directory per round, one pair of files per worker, so workers on different
machines need no shared file system):

    <run_dir>/checkpoints/round_000010/worker0.safetensors   tensors (params, optimizer moments, anchor, RNG)
    <run_dir>/checkpoints/round_000010/worker0.json          everything else; written last, so its
                                                              presence marks the pair complete

Each file is written to a temporary name, fsynced and renamed. State dicts of any shape
(torch optimizers, data cursors) are split generically: tensors go to safetensors under a
path-like key, the rest to JSON with a `{"__tensor__": key}` marker in their place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROUND_DIR = re.compile(r"^round_(\d{6,})$")


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a marker; collect the tensors."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        # safetensors refuses shared or non-contiguous storage; a private copy is cheap here
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_worker_state(ckpt_dir: Path, round_idx: int, who: str, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `who`'s state (e.g. "worker0") for a round; keep only its newest `keep` rounds."""
    d = ckpt_dir / f"round_{round_idx:06d}"
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = split_tensors(state, "s", tensors)
    _atomic_write(d / f"{who}.safetensors", lambda p: save_file(tensors, str(p)))
    _atomic_write(d / f"{who}.json", lambda p: p.write_text(json.dumps(meta)))
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in rounds_of(ckpt_dir, who)[:-keep]:
        od = ckpt_dir / f"round_{old:06d}"
        for suffix in (".json", ".safetensors"):
            (od / f"{who}{suffix}").unlink(missing_ok=True)
        # other workers may share this directory: remove it only once it is empty
        with contextlib.suppress(OSError):
            od.rmdir()
    return d


def rounds_of(ckpt_dir: Path, who: str) -> list[int]:
    """Rounds for which `who` has a complete checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for d in ckpt_dir.iterdir():
        m = ROUND_DIR.match(d.name)
        if m and (d / f"{who}.json").is_file() and (d / f"{who}.safetensors").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def load_worker_state(ckpt_dir: Path, round_idx: int, who: str) -> dict[str, Any]:
    d = ckpt_dir / f"round_{round_idx:06d}"
    meta = json.loads((d / f"{who}.json").read_text())
    tensors = load_file(str(d / f"{who}.safetensors"))
    state: dict[str, Any] = join_tensors(meta, tensors)
    return state
