"""Checkpoints: everything a worker needs to continue bit-identically, saved atomically.

Layout: one directory per writer, one pair of files per round (workers on different machines
need no shared file system; elastic workers that share one need no coordination):

    <run_dir>/checkpoints/worker0/round_000010.safetensors   tensors (params, optimizer moments, anchor, RNG)
    <run_dir>/checkpoints/worker0/round_000010.json          everything else; written last, so its
                                                              presence marks the pair complete
    <run_dir>/coordinator/coordinator/round_000040.*         the coordinator's (its ckpt_dir is run_dir/coordinator)

Why one directory per writer: elastic workers come and go at different rounds. With one directory
per round, shared by all workers (the layout before), a worker pruning its old round removed that
directory once it looked empty while a restarted, lagging worker was about to write into it, and
the lagging worker died with ENOENT. Now no directory is shared by two writers, a writer deletes
only its own files, and no directory is ever removed, so pruning cannot race a write. A directory
that vanishes anyway (someone deleted the run's checkpoints) is recreated and the write retried
once; temporary names carry the process and thread, so two writers never share one.

Each file is written to a temporary name, fsynced and renamed, then the directory is fsynced.
State dicts of any shape (torch optimizers, data cursors) are split generically: tensors go to
safetensors under a path-like key, the rest to JSON with a `{"__tensor__": key}` marker in their
place. Runs written with the previous layout (`checkpoints/round_000010/worker0.*`) still resume:
`rounds_of` and `load_worker_state` read it too, but nothing writes or prunes it any more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("dilo.state")

ROUND_FILE = re.compile(r"^round_(\d{6,})\.(json|safetensors)$")
"""A checkpoint file in a writer's directory: <who>/round_000010.json"""
ROUND_DIR = re.compile(r"^round_(\d{6,})$")
"""A round directory of the previous layout: round_000010/<who>.json"""
_ROUND_OF = re.compile(r"^round_(\d{6,})\.")  # any file of a round, temporary ones included
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error names its errno


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a marker; collect the tensors."""
    if isinstance(obj, torch.Tensor):
        key = prefix
        obj = obj.detach()
        if hasattr(obj, "to_local"):  # a sharded island's DTensor: this rank's shard
            obj = obj.to_local()
        # safetensors refuses shared or non-contiguous storage; a private copy is cheap here
        tensors[key] = obj.cpu().contiguous().clone()
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


def checkpoint_path(ckpt_dir: Path, round_idx: int, who: str, suffix: str = ".json") -> Path:
    """Where `who`'s checkpoint of a round lives (the .json marks the pair complete)."""
    return ckpt_dir / who / f"round_{round_idx:06d}{suffix}"


def _legacy_path(ckpt_dir: Path, round_idx: int, who: str, suffix: str) -> Path:
    return ckpt_dir / f"round_{round_idx:06d}" / f"{who}{suffix}"


def locate(path: Path) -> tuple[Path, int, str]:
    """(ckpt_dir, round, who) of a checkpoint named by either of its two files, in either layout."""
    m = ROUND_FILE.match(path.name)
    if m is not None:
        return path.parent.parent, int(m.group(1)), path.parent.name
    m = ROUND_DIR.match(path.parent.name)
    if m is not None and path.suffix in (".json", ".safetensors"):
        return path.parent.parent, int(m.group(1)), path.stem
    raise ValueError(
        f"{path}: not a checkpoint file <who>/round_NNNNNN.json or .safetensors "
        "(or round_NNNNNN/<who>.json of older runs)"
    )


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file (it streams from the tensors' memory: no second copy of a large state), with its
    I/O errors raised as the OSError they are, so that callers can catch one kind of error."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        m = _OS_ERROR.search(str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    # the process and thread in the name: another writer of the same name (a restarted worker whose
    # old process is not quite dead, a test's threads) never writes to or renames this file
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a full disk must not also keep a partial file
        raise


def fsync_dir(d: Path) -> None:
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_worker_state(ckpt_dir: Path, round_idx: int, who: str, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `who`'s state (e.g. "worker0") for a round; keep only its newest `keep` rounds.

    Returns the .json file that marks the pair complete. Raises OSError when the disk refuses.
    """
    return write_snapshot(ckpt_dir, round_idx, who, snapshot(state), keep)


Snapshot = tuple[str, dict[str, torch.Tensor]]
"""A state dict as it will be written: its JSON (tensors replaced by markers) and private copies
of its tensors."""


def snapshot(state: dict[str, Any]) -> Snapshot:
    """Copy a state's tensors (a memory copy, on the caller's thread), so that training can go on
    changing them while the copy is written."""
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(split_tensors(state, "s", tensors))
    return meta, tensors


def write_snapshot(ckpt_dir: Path, round_idx: int, who: str, snap: Snapshot, keep: int = 2) -> Path:
    meta, tensors = snap
    d = ckpt_dir / who
    json_path = checkpoint_path(ckpt_dir, round_idx, who)
    for attempt in (1, 2):
        d.mkdir(parents=True, exist_ok=True)
        try:
            # rewriting a round (after a resume): the pair is incomplete until the new .json lands,
            # never an old .json with new tensors
            json_path.unlink(missing_ok=True)
            atomic_write(json_path.with_suffix(".safetensors"), lambda p: _save_tensors(tensors, p))
            atomic_write(json_path, lambda p: p.write_text(meta))
            fsync_dir(d)
            break
        except FileNotFoundError as e:
            if attempt == 2:
                raise
            # nothing of dilo removes a writer's directory: someone deleted the checkpoints
            log.warning("%s vanished while writing %s (%s); recreating it and retrying once", d, json_path.name, e)
    _prune(d, keep)
    return json_path


class Checkpoints(Protocol):
    """Where a rank's checkpoints live (a world picks: `world.checkpoints(ckpt_dir)`)."""

    def rounds(self) -> list[int]: ...

    def load(self, round_idx: int) -> dict[str, Any]: ...

    def save(self, round_idx: int, state: dict[str, Any], *, wait: bool = False) -> list[tuple[int, OSError]]: ...

    def close(self) -> list[tuple[int, OSError]]: ...


class CheckpointWriter:
    """Checkpoints written behind training: `save` copies the state's tensors and returns; a
    background thread writes the files (atomically, as `save_worker_state` does) while the next
    round trains. One write at a time and in order: `save` first waits for the write before it,
    so a crash loses at most the checkpoint being written, and the one before is complete.

        writer = CheckpointWriter(ckpt_dir, "worker0")
        failed = writer.save(round_idx, state)             # [(round, OSError)] found since the last call
        failed = writer.save(round_idx, state, wait=True)  # ... this one's too (the end of a run)
        writer.close()

    A failing disk does not stop training: its OSError is handed back by a later `save` or
    `wait`; any other error is raised there."""

    def __init__(self, ckpt_dir: Path, who: str, keep: int = 2) -> None:
        self.ckpt_dir, self.who, self.keep = ckpt_dir, who, keep
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[Path]] | None = None

    def __str__(self) -> str:
        return str(self.ckpt_dir / self.who)

    def rounds(self) -> list[int]:
        """The rounds this writer has a complete checkpoint of, oldest first."""
        return rounds_of(self.ckpt_dir, self.who)

    def load(self, round_idx: int) -> dict[str, Any]:
        """The state saved for a round (see `rounds`)."""
        return load_worker_state(self.ckpt_dir, round_idx, self.who)

    def save(self, round_idx: int, state: dict[str, Any], *, wait: bool = False) -> list[tuple[int, OSError]]:
        failed = self.wait()
        write = self._prepare(round_idx, state)  # the copy, on the caller's thread
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"dilo-checkpoint-{self.who}")
        self._pending = (round_idx, self._pool.submit(write))
        return failed + self.wait() if wait else failed

    def _prepare(self, round_idx: int, state: dict[str, Any]) -> Callable[[], Path]:
        """Copy what `state` holds now; return the write of that copy (run on the writer's thread)."""
        snap = snapshot(state)
        return lambda: write_snapshot(self.ckpt_dir, round_idx, self.who, snap, self.keep)

    def wait(self) -> list[tuple[int, OSError]]:
        """Wait for the write in flight: [(its round, its OSError)] if the disk refused it."""
        if self._pending is None:
            return []
        (round_idx, future), self._pending = self._pending, None
        try:
            future.result()
        except OSError as e:
            return [(round_idx, e)]
        return []

    def close(self) -> list[tuple[int, OSError]]:
        failed = self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return failed


def _prune(d: Path, keep: int) -> None:
    """Delete this writer's files of rounds older than its newest `keep` complete ones, the .json
    of each first (so that a crash in between leaves an incomplete pair, never a half-deleted
    complete one), temporary files left by a crashed write included. Directories stay."""
    complete = _complete_rounds(d)
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    old: dict[int, list[Path]] = {}
    for f in _entries(d):
        m = _ROUND_OF.match(f.name)
        if m is not None and int(m.group(1)) < oldest_kept:
            old.setdefault(int(m.group(1)), []).append(f)
    for files in old.values():
        for f in sorted(files, key=lambda f: f.suffix != ".json"):
            f.unlink(missing_ok=True)


def _entries(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _complete_rounds(d: Path) -> list[int]:
    out = []
    for f in _entries(d):
        m = ROUND_FILE.match(f.name)
        # tensors beside the .json: a safetensors file, or a sharded island's DCP directory
        tensors = f.with_suffix(".safetensors").is_file() or f.with_suffix("").is_dir()
        if m is not None and m.group(2) == "json" and tensors:
            out.append(int(m.group(1)))
    return sorted(out)


def rounds_of(ckpt_dir: Path, who: str) -> list[int]:
    """Rounds for which `who` has a complete checkpoint, in either layout, oldest first."""
    rounds = set(_complete_rounds(ckpt_dir / who))
    for d in _entries(ckpt_dir):  # the previous layout: round_NNNNNN/<who>.json + .safetensors
        m = ROUND_DIR.match(d.name)
        if m and (d / f"{who}.json").is_file() and (d / f"{who}.safetensors").is_file():
            rounds.add(int(m.group(1)))
    return sorted(rounds)


def load_worker_state(ckpt_dir: Path, round_idx: int, who: str) -> dict[str, Any]:
    """`who`'s state of a round; the previous layout is read where the current one has no such round.
    A sharded island's (under its lead's name) comes whole: every tensor of its lead's state at full size."""
    json_path = checkpoint_path(ckpt_dir, round_idx, who)
    tensor_path = json_path.with_suffix(".safetensors")
    if json_path.with_suffix("").is_dir():  # a sharded island's: its tensors put back together
        from dilo.sharded_checkpoint import consolidate

        return consolidate(json_path.with_suffix(""))
    if not json_path.is_file() and _legacy_path(ckpt_dir, round_idx, who, ".json").is_file():
        json_path = _legacy_path(ckpt_dir, round_idx, who, ".json")
        tensor_path = _legacy_path(ckpt_dir, round_idx, who, ".safetensors")
    meta = json.loads(json_path.read_text())
    tensors = load_file(str(tensor_path))
    state: dict[str, Any] = join_tensors(meta, tensors)
    return state
