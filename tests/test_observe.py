"""Observability: TensorBoard and W&B sinks fed from the round records, a clear error when their
package is missing, and which worker is slow (steps/s per member in STATUS, `dilo status`, the
RESULT's member stats and the workers' round logs)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from dilo import cli, metrics, wire
from dilo.coordinator import Coordinator
from dilo.errors import ConfigError
from dilo.outer.star import StarCodec
from dilo.train import train
from tests.conftest import tiny_config, train_threads
from tests.test_async import DirectClient
from tests.test_elastic import FAST, _at, _log, _records, _run_threads, _serving

pytestmark = pytest.mark.timeout(120)

ROUND_TAGS = {
    "train/loss", "val/loss", "lr", "bytes/sent", "bytes/recv", "bytes/cum_sent", "bytes/cum_recv",
    "time/inner_s", "time/sync_s", "time/eval_s", "time/round_s", "time/utilization",
    "progress/tokens", "sync/participants", "sync/committed", "time/steps_per_s",
}  # fmt: skip


# ------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_one_run_per_worker_with_the_round_scalars(tmp_path: Path, corpus_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, corpus_dir, workers=2, log={"tensorboard": True})
    train_threads(cfg, 2)  # 12 steps, H = 4: 3 rounds
    root = tmp_path / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == ["worker0", "worker1"]
    for worker in ("worker0", "worker1"):
        acc = EventAccumulator(str(root / worker))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert ROUND_TAGS | {"val/loss_by_tokens"} <= tags, ROUND_TAGS - tags
        for tag in ROUND_TAGS:
            assert [e.step for e in acc.Scalars(tag)] == [4, 8, 12], tag
        rounds = metrics.read_jsonl(tmp_path / "logs" / f"{worker}.jsonl")
        losses = [r["loss"] for r in rounds if r["event"] == "round"]
        assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses)
        assert all(e.value == 2 for e in acc.Scalars("sync/participants"))
        assert all(0 < e.value <= 1 for e in acc.Scalars("time/utilization"))
        inner = [r["inner_s"] for r in rounds if r["event"] == "round"]
        assert [e.value for e in acc.Scalars("time/steps_per_s")] == pytest.approx([4 / t for t in inner], rel=1e-5)
        tokens = [e.step for e in acc.Scalars("val/loss_by_tokens")]
        assert tokens == sorted(tokens) and tokens[0] > 0


# ------------------------------------------------------------------------------- W&B


def test_wandb_offline_one_run_per_worker(tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-env"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    cfg = tiny_config(tmp_path / "run", corpus_dir, workers=2, log={"wandb": True, "wandb_project": "obs"})
    train_threads(cfg, 2)
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, list((tmp_path / "run").rglob("*"))
    names = set()
    for run in runs:
        (history,) = run.glob("run-*.wandb")
        data = history.read_bytes()
        assert len(data) > 0
        # wandb 0.31 ships no Python reader of its .wandb files: look for the strings in the records
        for key in (b"train/loss", b"val/loss", b"time/utilization", b"time/steps_per_s", b"obs", b"inner_steps"):
            assert key in data, key
        assert b"test" in data  # the group: the run's name
        names |= {w for w in ("worker0", "worker1") if w.encode() in data}
    assert names == {"worker0", "worker1"}


# ------------------------------------------------------------------------------- missing packages


@pytest.mark.parametrize(
    ("key", "modules", "extra"),
    [
        ("tensorboard", ["tensorboard", "torch.utils.tensorboard"], "dilo[tensorboard]"),
        ("wandb", ["wandb"], "dilo[wandb]"),
    ],
)
def test_a_missing_tracker_package_is_a_clear_error(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch, key: str, modules: list[str], extra: str
) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    cfg = tiny_config(tmp_path, corpus_dir, log={key: True})
    with pytest.raises(ConfigError, match=rf"log.{key} = true needs .*pip install '{extra}'".replace("[", r"\[")):
        metrics.open_sinks(cfg, tmp_path, "worker0")
    assert not (tmp_path / "logs").exists()  # nothing opened


def test_without_trackers_the_sink_is_the_jsonl_log(tmp_path: Path, corpus_dir: Path) -> None:
    sink = metrics.open_sinks(tiny_config(tmp_path, corpus_dir), tmp_path, "worker3")
    assert isinstance(sink, metrics.JsonlSink)
    sink.write({"event": "round", "step": 1})
    sink.close()
    assert metrics.read_jsonl(tmp_path / "logs" / "worker3.jsonl") == [{"event": "round", "step": 1}]


# ------------------------------------------------------------------------------- which worker is slow


def _sync_push(coord: Coordinator, worker: str, seed: int, *, steps: int, inner_s: float) -> None:
    star = StarCodec(coord.names, [p.shape for p in coord.params], coord.cfg.codec, seed=coord.cfg.seed)
    g = torch.Generator().manual_seed(seed)
    delta = [torch.randn(p.shape, generator=g) * 1e-2 for p in coord.params]
    body = {"weight": 1.0, "contributes": True, "stop": False, "tokens": 128, "steps": steps, "inner_s": inner_s}
    msg = wire.Message(type=wire.MsgType.PUSH, worker=worker, base=coord.version, body=body,
                       tensors=star.encode_push(delta, 0, 1, contributes=True))  # fmt: skip
    DirectClient(coord, worker).send(msg)


def test_sync_status_and_result_show_steps_per_s(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, workers=2, membership={**FAST, "start_quorum": 2})
    coord = Coordinator(cfg, inproc=True)
    for w in ("fast", "slow"):
        DirectClient(coord, w).join()
    assert [m["steps_per_s"] for m in coord.status()["members"]] == [None, None]  # nothing reported yet
    _sync_push(coord, "fast", 1, steps=4, inner_s=0.5)
    _sync_push(coord, "slow", 2, steps=4, inner_s=2.0)
    results = [wire.decode([bytes(f) for f in frames]) for _, frames in coord.outbox]
    assert [r.type for r in results] == [wire.MsgType.RESULT] * 2
    stats = results[0].body["member_stats"]
    assert stats["fast"]["steps_per_s"] == 8.0 and stats["slow"]["steps_per_s"] == 2.0
    st = coord.status()
    assert {m["worker"]: m["steps_per_s"] for m in st["members"]} == {"fast": 8.0, "slow": 2.0}
    # `dilo status` prints the column and marks the slowest member
    monkeypatch.setattr("dilo.transport.zmq_star.status", lambda *a, **k: st)
    assert cli.main(["status", "tcp://127.0.0.1:1"]) == 0
    out = capsys.readouterr().out
    assert "steps/s" in out.splitlines()[2]
    rows = {line.split()[0]: line for line in out.splitlines()[3:]}
    assert "8.00" in rows["fast"] and "slowest" not in rows["fast"]
    assert "2.00" in rows["slow"] and rows["slow"].endswith("<- slowest")


def test_elastic_workers_report_their_speed_to_the_round_logs(
    tmp_path: Path, corpus_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, workers=2, steps=8, membership=FAST)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with caplog.at_level(logging.INFO, logger="dilo.coordinator"), _serving(coord):
        _run_threads(_at(cfg, coord.address), ["w0", "w1"])
    # the coordinator's log line of each round names the slowest member
    lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
    assert len(lines) == 2 and all("'w0'" in x and "'w1'" in x and "(slowest: w" in x for x in lines), lines
    for w in ("w0", "w1"):
        recs = _records(_log(tmp_path, w))
        assert len(recs) == 2
        for r in recs:
            assert set(r["member_steps_per_s"]) == {"w0", "w1"}
            assert all(v > 0 for v in r["member_steps_per_s"].values())


def test_tensorboard_sees_each_round_before_the_run_ends(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dilo.trackers import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "w")
    sink.write({"event": "resume", "step": 40})  # a resumed run: steps/s counts from step 40
    sink.write({"event": "round", "step": 50, "loss": 2.0, "inner_s": 5.0, "round_s": 10.0, "val_loss": None})
    acc = EventAccumulator(str(tmp_path / "w"))
    acc.Reload()  # read while the writer is still open
    assert [(e.step, e.value) for e in acc.Scalars("time/steps_per_s")] == [(50, 2.0)]
    assert [e.value for e in acc.Scalars("time/utilization")] == [0.5]
    assert "val/loss" not in acc.Tags()["scalars"]  # None is not a value
    sink.close()


def test_a_missing_package_stops_the_worker_before_its_first_step(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = tiny_config(tmp_path, corpus_dir, workers=1, log={"wandb": True})
    with pytest.raises(ConfigError, match=r"pip install 'dilo\[wandb\]'"):
        train(cfg)
    assert not (tmp_path / "logs").exists() and not (tmp_path / "checkpoints").exists()
