"""Checkpoints under churn: writers that prune while others (lagging, restarted) write, and a loop
that survives a failing checkpoint."""

from __future__ import annotations

import errno
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import dilo.state as state
from dilo.state import load_worker_state, rounds_of, save_worker_state


def _state(tag: int) -> dict[str, Any]:
    return {"params": [torch.full((3,), float(tag)), torch.arange(4) + tag], "inner": {"step": tag}}


def _assert_holds(ckpt: Path, round_idx: int, who: str, tag: int) -> None:
    got = load_worker_state(ckpt, round_idx, who)
    want = _state(tag)
    assert got["inner"] == want["inner"]
    assert all(torch.equal(a, b) for a, b in zip(got["params"], want["params"]))


def _in_thread(fn: Any, name: str) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - the test asserts on it
            errors.append(e)

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t, errors


def test_pruning_never_races_a_lagging_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The churn bug, forced: a restarted worker1, two rounds behind, has prepared its checkpoint of
    round 10 when worker0 saves round 12 and prunes its own round 10; then worker1 writes. With one
    directory per round, worker0's prune removed that (then empty) directory under worker1's feet
    and worker1 died with ENOENT."""
    ckpt = tmp_path / "checkpoints"
    for r in (10, 11):
        save_worker_state(ckpt, r, "worker0", _state(r))
    ready, pruned = threading.Event(), threading.Event()
    real_save_file = state.save_file

    def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
        if threading.current_thread().name == "lagging":  # its directory exists, nothing written yet
            ready.set()
            assert pruned.wait(60), "worker0 never pruned"
        real_save_file(tensors, path)

    monkeypatch.setattr(state, "save_file", save_file)
    t, errors = _in_thread(lambda: save_worker_state(ckpt, 10, "worker1", _state(100)), "lagging")
    try:
        assert ready.wait(60), "worker1 never reached its write"
        save_worker_state(ckpt, 12, "worker0", _state(12))  # keep=2: prunes worker0's round 10
    finally:
        pruned.set()
        t.join(60)
    assert not t.is_alive()
    assert errors == [], f"the lagging writer failed: {errors[0]!r}" if errors else ""
    assert rounds_of(ckpt, "worker0") == [11, 12]
    assert rounds_of(ckpt, "worker1") == [10]
    _assert_holds(ckpt, 10, "worker1", 100)
    _assert_holds(ckpt, 12, "worker0", 12)


def test_a_vanished_directory_is_recreated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone deletes the run's checkpoints mid-write: the write recreates the directory and
    retries once; a directory that keeps vanishing is an OSError naming the path."""
    ckpt = tmp_path / "checkpoints"
    save_worker_state(ckpt, 1, "worker0", _state(1))
    real_save_file = state.save_file
    deletions = []

    def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
        if len(deletions) < times:
            shutil.rmtree(ckpt)
            deletions.append(path)
        real_save_file(tensors, path)  # the real safetensors error (it is not an OSError by itself)

    monkeypatch.setattr(state, "save_file", save_file)
    times = 1
    save_worker_state(ckpt, 2, "worker0", _state(2))
    assert len(deletions) == 1 and rounds_of(ckpt, "worker0") == [2]  # round 1 went with the directory
    _assert_holds(ckpt, 2, "worker0", 2)

    deletions.clear()
    times = 2
    with pytest.raises(FileNotFoundError) as e:
        save_worker_state(ckpt, 3, "worker0", _state(3))
    assert e.value.errno == errno.ENOENT and "round_000003.safetensors" in str(e.value.filename)
    assert len(deletions) == 2


def test_a_full_disk_is_an_oserror_and_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors reports I/O errors as SafetensorError; callers get the OSError (ENOSPC here) that
    the training loop catches, and the half-written temporary file is gone."""
    ckpt = tmp_path / "checkpoints"
    save_worker_state(ckpt, 1, "worker0", _state(1))

    def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
        Path(path).write_bytes(b"half a tensor")
        raise state.SafetensorError(  # safetensors 0.8's wording, errno included
            f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
        )

    monkeypatch.setattr(state, "save_file", save_file)
    with pytest.raises(OSError) as e:
        save_worker_state(ckpt, 2, "worker0", _state(2))
    assert e.value.errno == errno.ENOSPC and "round_000002.safetensors" in str(e.value.filename)
    assert sorted(f.name for f in (ckpt / "worker0").iterdir()) == ["round_000001.json", "round_000001.safetensors"]
    assert rounds_of(ckpt, "worker0") == [1]


def test_a_failed_rewrite_leaves_no_mismatched_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting a round (after a resume) whose .json then fails must not pair the old .json with
    the new tensors: the round is incomplete until a new .json lands."""
    ckpt = tmp_path / "checkpoints"
    save_worker_state(ckpt, 3, "worker0", _state(1))
    real_atomic_write = state.atomic_write

    def atomic_write(path: Path, write: Any) -> None:
        if path.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_atomic_write(path, write)

    monkeypatch.setattr(state, "atomic_write", atomic_write)
    with pytest.raises(OSError):
        save_worker_state(ckpt, 3, "worker0", _state(2))
    assert rounds_of(ckpt, "worker0") == []
    monkeypatch.undo()
    save_worker_state(ckpt, 3, "worker0", _state(2))
    _assert_holds(ckpt, 3, "worker0", 2)


def test_two_writers_of_one_name_never_share_a_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted worker and its not quite dead predecessor write the same round: the old one has
    begun its tensor file when the new one writes its whole pair; both finish, the pair is whole."""
    ckpt = tmp_path / "checkpoints"
    started, overtaken = threading.Event(), threading.Event()
    real_save_file = state.save_file
    tmp_names = []

    def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
        tmp_names.append(Path(path).name)
        if threading.current_thread().name == "old":
            real_save_file(tensors, path)  # written, not yet renamed
            started.set()
            assert overtaken.wait(60), "the new writer never finished"
            return
        real_save_file(tensors, path)

    monkeypatch.setattr(state, "save_file", save_file)
    t, errors = _in_thread(lambda: save_worker_state(ckpt, 5, "worker-a", _state(1)), "old")
    try:
        assert started.wait(60), "the old writer never started"
        save_worker_state(ckpt, 5, "worker-a", _state(2))
    finally:
        overtaken.set()
        t.join(60)
    assert errors == [], f"the old writer failed: {errors[0]!r}" if errors else ""
    assert len(set(tmp_names)) == 2
    assert rounds_of(ckpt, "worker-a") == [5]
    _assert_holds(ckpt, 5, "worker-a", 1)  # the last rename wins, and both files are its
    assert sorted(f.name for f in (ckpt / "worker-a").iterdir()) == ["round_000005.json", "round_000005.safetensors"]


_CHURN = """
import sys, time
from pathlib import Path
import torch
from dilo.state import load_worker_state, rounds_of, save_worker_state

ckpt, who, first, n, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
(go.parent / f"{who}.ready").touch()
deadline = time.monotonic() + 120
while not go.exists():  # start together: importing torch takes seconds, the rounds milliseconds
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.01)
for r in range(first, first + n):
    save_worker_state(ckpt, r, who, {"params": [torch.full((64,), float(r))], "round": r})
    newest = rounds_of(ckpt, who)[-1]
    got = load_worker_state(ckpt, newest, who)
    assert newest == r and got["round"] == r and bool((got["params"][0] == r).all()), (r, newest, got["round"])
"""


def test_two_processes_write_and_prune_side_by_side(tmp_path: Path) -> None:
    """Two real processes share one checkpoint directory for 300 rounds each, one two rounds behind
    the other (it writes the rounds the other one prunes): no error, and every complete checkpoint
    left loads with its own contents."""
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    ckpt, go, rounds = tmp_path / "checkpoints", tmp_path / "go", 300
    writers = {"worker-ahead": 2, "worker-lagging": 0}  # who -> first round
    procs = {
        who: subprocess.Popen(
            [sys.executable, "-c", _CHURN, str(ckpt), who, str(first), str(rounds), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for who, first in writers.items()
    }
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"{who}.ready").exists() for who in writers):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), "a writer died early"
            time.sleep(0.05)
        go.touch()
        outputs = {who: p.communicate(timeout=300)[0] for who, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for who, p in procs.items():
        assert p.returncode == 0, f"{who} failed:\n{outputs[who][-3000:]}"
    for who, first in writers.items():
        last = first + rounds - 1
        assert rounds_of(ckpt, who) == [last - 1, last]
        for r in (last - 1, last):
            got = load_worker_state(ckpt, r, who)
            assert got["round"] == r and bool((got["params"][0] == r).all())
        names = sorted(f.name for f in (ckpt / who).iterdir())
        assert names == [f"round_{r:06d}.{s}" for r in (last - 1, last) for s in ("json", "safetensors")]


# ------------------------------------------------------------------------------ the training loop


def _records(run_dir: Path, name: str = "worker0") -> list[dict[str, Any]]:
    from dilo.metrics import read_jsonl

    return list(read_jsonl(run_dir / "logs" / f"{name}.jsonl"))


def _full_disk_at(monkeypatch: pytest.MonkeyPatch, *rounds: int) -> list[str]:
    """Make the tensor file of these rounds fail as a full disk does (safetensors' own error)."""
    real_save_file = state.save_file
    failed: list[str] = []

    def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
        if any(Path(path).name.startswith(f"round_{r:06d}.") for r in rounds):
            failed.append(path)
            raise state.SafetensorError(
                f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
            )
        real_save_file(tensors, path)

    monkeypatch.setattr(state, "save_file", save_file)
    return failed


def test_training_goes_on_after_a_failed_checkpoint(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import tiny_config, train_threads

    cfg = tiny_config(tmp_path, corpus_dir, steps=12, checkpoint={"every": 1})  # 3 rounds
    failed = _full_disk_at(monkeypatch, 2)
    summary = train_threads(cfg, 1)[0]
    assert failed and summary["rounds"] == 3 and not summary["stopped"]
    rounds = [r for r in _records(tmp_path) if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # round 2's checkpoint is written behind round 3: its failure is in round 3's record
    assert [("checkpoint_error" in r) for r in rounds] == [False, False, True]
    assert "round_000002.safetensors" in rounds[2]["checkpoint_error"]
    assert "No space left on device" in rounds[2]["checkpoint_error"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "round 2: checkpoint failed; training goes on" in errors[0]
    assert "No space left on device" in errors[0]
    ckpt = tmp_path / "checkpoints"
    assert rounds_of(ckpt, "worker0") == [1, 3]
    assert sorted(f.name for f in (ckpt / "worker0").iterdir()) == [
        f"round_{r:06d}.{s}" for r in (1, 3) for s in ("json", "safetensors")
    ]


def test_a_stop_whose_checkpoint_failed_says_where_a_resume_goes(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import tiny_config, train_threads

    cfg = tiny_config(tmp_path, corpus_dir, steps=12, checkpoint={"every": 1})
    failed = _full_disk_at(monkeypatch, 1)
    first = train_threads(cfg, 1, max_rounds=1)[0]
    err = capsys.readouterr().err
    assert failed and first["stopped"] and first["rounds"] == 1
    assert "dilo: error: stopped after round 1 (step 4) but its checkpoint failed" in err
    assert "there is no checkpoint to resume from" in err and "Traceback" not in err

    monkeypatch.undo()
    _full_disk_at(monkeypatch, 2)
    cfg = tiny_config(tmp_path, corpus_dir, steps=12, checkpoint={"every": 1, "resume": True})
    train_threads(cfg, 1, max_rounds=2)  # nothing to resume from: starts over; round 1 saved, round 2 fails
    err = capsys.readouterr().err
    assert "there is no checkpoint of round 2 to resume from" in err
    assert "--checkpoint.resume=true would go back to round 1" in err

    monkeypatch.undo()  # the disk has room again
    last = train_threads(cfg, 1)[0]
    assert last["rounds"] == 3 and not last["stopped"]
    # a fresh start truncates the log: the second call's rounds, then the resumed ones from round 1 on
    log = [(r["event"], r.get("round"), "checkpoint_error" in r) for r in _records(tmp_path) if r["event"] != "end"]
    assert log == [
        ("start", None, False),
        ("round", 1, False),
        ("round", 2, True),
        ("resume", None, False),
        ("round", 2, False),
        ("round", 3, False),
    ]


def test_resume_from_the_previous_layout(tmp_path: Path, corpus_dir: Path) -> None:
    """A run stopped by an older dilo (checkpoints/round_NNNNNN/<who>.*) resumes bit-identically,
    and the new checkpoints go to the writers' directories without touching the old ones."""
    from tests.conftest import tiny_config, train_threads

    full = tiny_config(tmp_path / "full", corpus_dir, steps=12, checkpoint={"every": 1})
    train_threads(full, 2)
    part = tiny_config(tmp_path / "part", corpus_dir, steps=12, checkpoint={"every": 1})
    train_threads(part, 2, max_rounds=1)
    ckpt = tmp_path / "part" / "checkpoints"
    for who in ("worker0", "worker1"):  # as an older dilo laid them out
        (ckpt / "round_000001").mkdir(exist_ok=True)
        for suffix in (".json", ".safetensors"):
            (ckpt / who / f"round_000001{suffix}").rename(ckpt / "round_000001" / f"{who}{suffix}")
        (ckpt / who).rmdir()
    assert rounds_of(ckpt, "worker0") == [1] == rounds_of(ckpt, "worker1")

    resumed = tiny_config(tmp_path / "part", corpus_dir, steps=12, checkpoint={"every": 1, "resume": True})
    assert train_threads(resumed, 2)[0]["rounds"] == 3
    for who in ("worker0", "worker1"):
        a, b = _records(tmp_path / "full", who), _records(tmp_path / "part", who)
        assert [r["anchor_hash"] for r in a if r["event"] == "round"] == [
            r["anchor_hash"] for r in b if r["event"] == "round"
        ]
        assert rounds_of(ckpt, who) == [1, 2, 3]  # the old round stays: never written, never pruned
        assert sorted(f.name for f in (ckpt / who).iterdir()) == [
            f"round_{r:06d}.{s}" for r in (2, 3) for s in ("json", "safetensors")
        ]
        assert (ckpt / "round_000001" / f"{who}.json").is_file()


def test_previous_layout_is_read_but_never_pruned(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    old = ckpt / "round_000004"
    old.mkdir(parents=True)
    new = save_worker_state(tmp_path / "scratch", 4, "worker0", _state(4))
    for suffix in (".json", ".safetensors"):
        (old / f"worker0{suffix}").write_bytes(new.with_suffix(suffix).read_bytes())
    (old / "worker1.json").write_text("{}")  # a pair without its tensors is not a checkpoint
    assert rounds_of(ckpt, "worker0") == [4] and rounds_of(ckpt, "worker1") == []
    _assert_holds(ckpt, 4, "worker0", 4)
    save_worker_state(ckpt, 4, "worker0", _state(40))
    _assert_holds(ckpt, 4, "worker0", 40)  # the current layout wins over the previous one
    for r in (5, 6, 7):
        save_worker_state(ckpt, r, "worker0", _state(r))
    assert rounds_of(ckpt, "worker0") == [4, 6, 7]  # the new round 4 is pruned, the old one is not
    _assert_holds(ckpt, 4, "worker0", 4)
    _assert_holds(ckpt, 7, "worker0", 7)
    assert sorted(f.name for f in old.iterdir()) == ["worker0.json", "worker0.safetensors", "worker1.json"]
