"""Checkpoints of sharded islands (transport.island_shard = "fsdp"), written with
torch.distributed.checkpoint (DCP): one checkpoint per island and round, which an island of any
number of ranks resumes.

    <ckpt_dir>/worker0/round_000010/             DCP: .metadata and one __<rank>_0.distcp per rank
    <ckpt_dir>/worker0/round_000010/rank1.json   rank 1's state without its tensors (markers in their place)
    <ckpt_dir>/worker0/round_000010.json         written last, by the island's lead: the round is complete

What is sharded (a DTensor: the parameters, AdamW's moments, the outer anchor and momentum) is
saved under one key for the island, by its global shape and each rank's offsets, so that a layout
of K' ranks reads its own slices of it. What is not (the data cursor, the RNG, error feedback,
counters) is saved under the rank's own keys. Resumed on another number of ranks, rank r takes the
per-rank state of the saved rank r (of rank 0 where the saved layout had fewer), and a strategy
drops what belongs to the old shards (the codec's error feedback: see `ShardedIsland`).

The island's ranks must see one checkpoint directory (one node's disk, or a shared file system):
DCP writes each rank's slices to its own file and the lead the metadata. As with every other
checkpoint, `save` copies the state on the caller's thread and a background thread writes it;
DCP's planning collectives run there, over a Gloo group of the island's own (`IslandMesh`).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor, Shard

from dilo.errors import DiloError
from dilo.shard import IslandMesh
from dilo.state import CheckpointWriter, atomic_write, fsync_dir

log = logging.getLogger("dilo.sharded_checkpoint")


class ShardedCheckpoints(CheckpointWriter):
    """The `Checkpoints` of a rank of a sharded island (see the module docstring)."""

    def __init__(self, ckpt_dir: Path, island: str, mesh: IslandMesh, keep: int = 2) -> None:
        super().__init__(ckpt_dir, island, keep)
        self.island = mesh
        self.rank, self.ranks = mesh.mesh.get_local_rank(), mesh.mesh.size()
        self.dir = ckpt_dir / island

    def _round(self, round_idx: int) -> Path:
        return self.dir / f"round_{round_idx:06d}"

    # ------------------------------------------------------------------------------------------
    # writing

    def _prepare(self, round_idx: int, state: dict[str, Any]) -> Callable[[], Path]:
        flat: dict[str, torch.Tensor] = {}
        skeleton = json.dumps(_split(state, "s", f"r{self.rank}", flat))
        return lambda: self._write(round_idx, skeleton, flat)

    def _write(self, round_idx: int, skeleton: str, flat: dict[str, torch.Tensor]) -> Path:
        d, marker = self._round(round_idx), self._round(round_idx).with_suffix(".json")
        lead = self.rank == 0
        if lead:  # rewriting a round (after a resume): incomplete until the new marker lands
            marker.unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)
        dist.barrier(group=self.island.checkpoints)
        error: OSError | None = None
        try:
            d.mkdir(parents=True, exist_ok=True)
            atomic_write(d / f"rank{self.rank}.json", lambda p: p.write_text(skeleton))
        except OSError as e:
            error = e
        self._agree(error)  # a rank that cannot write its part must not leave the others in DCP's save
        try:
            dcp_save(flat, storage_writer=FileSystemWriter(str(d)), process_group=self.island.checkpoints)
        except CheckpointException as e:
            cause = _os_error(e)
            if cause is None:
                raise
            raise cause from e
        if lead:
            atomic_write(marker, lambda p: p.write_text(json.dumps({"round": round_idx, "ranks": self.ranks})))
            fsync_dir(self.dir)
            self._prune()
        return marker

    def _agree(self, error: OSError | None) -> None:
        failed = torch.tensor([float(error is not None)])
        dist.all_reduce(failed, group=self.island.checkpoints)
        if error is not None:
            raise error
        if failed[0] > 0:
            raise OSError(f"another rank of {self.who} could not write its part of the checkpoint (its log says why)")

    def _prune(self) -> None:
        complete = self.rounds()
        for r in complete[: -self.keep] if len(complete) > self.keep else []:
            self._round(r).with_suffix(".json").unlink(missing_ok=True)  # incomplete first, then removed
            shutil.rmtree(self._round(r), ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    # reading

    def load(self, round_idx: int) -> dict[str, Any]:
        d = self._round(round_idx)
        saved = int(json.loads(d.with_suffix(".json").read_text())["ranks"])
        src = self.rank if self.rank < saved else 0
        if saved != self.ranks and self.rank == 0:
            log.warning(
                "%s: resuming round %d, saved by %d ranks, on %d: the shards are read anew; rank r takes the "
                "per-rank state (data cursor, RNG, counters) of saved rank r, or of rank 0 beyond them",
                self.who, round_idx, saved, self.ranks,
            )  # fmt: skip
        return _read(d, src, self.island.mesh, self.island.checkpoints)


def consolidate(d: Path) -> dict[str, Any]:
    """A sharded island's checkpoint directory (round_NNNNNN/) read whole in this process: every
    sharded tensor at its full size, the lead rank's state for the rest (`dilo export`, tests)."""
    return _read(d, 0, None, None)


def _read(d: Path, src: int, mesh: Any, group: Any) -> dict[str, Any]:
    """Saved rank `src`'s state, its sharded tensors laid out on `mesh` (whole when None)."""
    reader = FileSystemReader(str(d))
    sizes = reader.read_metadata().state_dict_metadata
    flat: dict[str, torch.Tensor] = {}
    state = _template(json.loads((d / f"rank{src}.json").read_text()), mesh, sizes, flat)
    try:
        with warnings.catch_warnings():  # read in one process on purpose (consolidate)
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp_load(flat, storage_reader=reader, process_group=group, no_dist=group is None)
    except CheckpointException as e:
        raise DiloError(f"{d}: the sharded checkpoint could not be read: {e}") from e
    if not isinstance(state, dict):
        raise DiloError(f"{d}: not a checkpoint of dilo's (rank{src}.json holds no state)")
    return state


def _split(obj: Any, path: str, rank: str, flat: dict[str, torch.Tensor]) -> Any:
    """`obj` with its tensors replaced by markers; copies of the tensors (on the CPU) in `flat`. A
    DTensor goes under the island's key `g.<path>` (the same on every rank: DCP puts the slices
    together), any other tensor under this rank's `r<rank>.<path>`."""
    if isinstance(obj, DTensor):
        if obj.placements != (Shard(0),):
            raise ValueError(f"{path}: sharded as {obj.placements}; a sharded island's tensors are Shard(0)")
        copy = obj.to_local().detach().to("cpu", copy=True)
        key = f"g.{path}"
        flat[key] = DTensor.from_local(copy, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape,
                                       stride=obj.stride())  # fmt: skip
        return {"__dtensor__": key, "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch.")}
    if isinstance(obj, torch.Tensor):
        key = f"{rank}.{path}"
        flat[key] = obj.detach().to("cpu", copy=True)
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split(v, f"{path}.{k}", rank, flat)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{path}.{i}", rank, flat) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {path}")


def _template(obj: Any, mesh: Any, sizes: dict[str, Any], flat: dict[str, torch.Tensor]) -> Any:
    """The state of a skeleton, with tensors for DCP to load into: a DTensor laid out on this
    rank's island mesh for every sharded marker, a plain tensor of the saved size elsewhere."""
    if isinstance(obj, dict) and "__dtensor__" in obj:
        dtype = getattr(torch, obj["dtype"])
        if mesh is None:
            t: torch.Tensor = torch.empty(obj["shape"], dtype=dtype)
        else:
            t = torch.distributed.tensor.empty(obj["shape"], dtype=dtype, device_mesh=mesh, placements=[Shard(0)])
        flat[obj["__dtensor__"]] = t
        return t
    if isinstance(obj, dict) and "__tensor__" in obj:
        meta = sizes.get(obj["__tensor__"])
        if meta is None:
            raise DiloError(f"the sharded checkpoint has no tensor {obj['__tensor__']}: its files are incomplete")
        t = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        flat[obj["__tensor__"]] = t
        return t
    if isinstance(obj, dict):
        return {k: _template(v, mesh, sizes, flat) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_template(v, mesh, sizes, flat) for v in obj]
    return obj


def _os_error(e: CheckpointException) -> OSError | None:
    """The OSError (a full or failing disk: training goes on) behind DCP's exception, if one is."""
    for failure in e.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
        if isinstance(cause, OSError):
            return cause
    return None
