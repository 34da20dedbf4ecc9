"""The public API (dilo.init / dilo.wrap / Outer) around a user's own model, data and loop: the
example script under torchrun and with a coordinator, every strategy and codec, bit-identical
resume from outer.state_dict(), teardown on every exit path."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import dilo
from dilo.config import load
from dilo.coordinator import Coordinator
from dilo.worlds import Placement
from tests.conftest import run_workers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_loop.py"
TOML = ROOT / "examples" / "own_loop.toml"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["own_loop"] = module  # model.builder = "own_loop:build_model" resolves to it
    spec.loader.exec_module(module)
    return module


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    """40 steps in rounds of 10 (DDP has no rounds: it logs every sync_every_ddp_eval steps)."""
    h = [] if "--outer.kind=ddp" in extra else ["--outer.inner_steps=10"]
    return [f"--out_dir={tmp_path / 'run'}", "--steps=40", *h, *extra]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{ROOT / 'examples'}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")


def _done(out: str) -> list[dict[str, Any]]:
    """The `done {...}` lines the example prints, parsed."""
    # two processes share the pipe: lines may interleave, so match each dict on its own
    return [eval(m, {}) for m in re.findall(r"done (\{[^{}]*\})", out)]  # noqa: S307 - our own repr of a dict


def _threads(fn: Any, n: int) -> list[Any]:
    return run_workers(fn, n)


# ---------------------------------------------------------------------------------------------
# the example script, as users run it


@pytest.mark.slow
def test_example_trains_under_torchrun(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(EXAMPLE)]
    p = subprocess.run([*cmd, *_overrides(tmp_path)], capture_output=True, text=True, timeout=300, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    done = _done(p.stdout)
    assert len(done) == 2 and done[0]["anchor"] == done[1]["anchor"]  # one model, bit for bit
    assert all(d["rounds"] == 4 and d["steps"] == 40 for d in done)
    assert done[0]["loss"] < 1.25  # chance is ln 4 = 1.386


@pytest.mark.slow
def test_example_joins_a_coordinator(tmp_path: Path) -> None:
    extra = ("--membership.kind=coordinator", "--coordinator.bind=tcp://127.0.0.1:0", "--membership.start_quorum=2")
    cfg = load(TOML, _overrides(tmp_path, *extra))
    _example()  # the coordinator builds the example's model by its builder path
    coord = Coordinator(cfg)
    stop = threading.Event()
    server = threading.Thread(target=coord.serve, args=(stop,), daemon=True)
    server.start()
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, str(EXAMPLE), "--coordinator", coord.address, "--id", f"w{i}", *_overrides(tmp_path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        stop.set()
        server.join(timeout=30)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    done = [d for out, _ in outs for d in _done(out)]
    assert len(done) == 2 and done[0]["anchor"] == done[1]["anchor"] == coord.anchor_hash()
    assert coord.version == 4


# ---------------------------------------------------------------------------------------------
# every strategy and codec through the API


def _cfg(tmp_path: Path, *extra: str) -> Any:
    return load(TOML, _overrides(tmp_path, *extra))


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("--codec.kind=none",), id="diloco-fp32"),
        pytest.param(("--codec.kind=int8",), id="diloco-int8"),
        pytest.param(("--codec.kind=int4",), id="diloco-int4"),
        pytest.param(("--codec.kind=fp16",), id="diloco-fp16"),
        pytest.param(("--codec.kind=sign",), id="diloco-sign"),
        pytest.param(("--codec.kind=topk", "--codec.fraction=0.1"), id="diloco-topk"),
        pytest.param(("--codec.kind=powersgd", "--codec.rank=2"), id="diloco-powersgd"),
        pytest.param(("--outer.kind=fedavg", "--codec.kind=int8"), id="fedavg-int8"),
        pytest.param(("--outer.kind=ddp", "--codec.kind=none"), id="ddp"),
    ],
)
def test_static_strategies_through_the_api(tmp_path: Path, extra: tuple[str, ...]) -> None:
    own_loop = _example()
    cfg = _cfg(tmp_path, *extra)

    def worker(p: Placement) -> dict[str, Any]:
        with dilo.init(cfg, placement=p) as world:
            return dict(own_loop.train(world))

    results = _threads(worker, 2)
    assert results[0]["anchor"] == results[1]["anchor"]  # the workers hold one model
    assert all(r["steps"] == 40 for r in results)
    assert results[0]["loss"] < 1.3


@contextmanager
def _coordinator(cfg: Any) -> Iterator[Coordinator]:
    coord = Coordinator(cfg)
    stop = threading.Event()
    server = threading.Thread(target=coord.serve, args=(stop,), daemon=True)
    server.start()
    try:
        yield coord
    finally:
        stop.set()
        server.join(timeout=30)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("--codec.kind=int8",), id="diloco-int8"),
        pytest.param(("--outer.kind=fedavg", "--codec.kind=none"), id="fedavg"),
        pytest.param(("--outer.kind=async", "--outer.inner_steps=10", "--codec.kind=int8"), id="async"),
    ],
)
def test_coordinator_strategies_through_the_api(tmp_path: Path, extra: tuple[str, ...]) -> None:
    own_loop = _example()
    base = _cfg(tmp_path, "--membership.kind=coordinator", "--coordinator.bind=tcp://127.0.0.1:0",
                "--membership.start_quorum=2", *extra)  # fmt: skip
    with _coordinator(base) as coord:
        cfg = load(TOML, [*_overrides(tmp_path, "--membership.kind=coordinator", *extra),
                          f"--membership.address={coord.address}", "--membership.start_quorum=2"])  # fmt: skip
        results = _threads(lambda p: _elastic_worker(own_loop, cfg, f"w{p.rank}"), 2)
    assert all(r["steps"] > 0 for r in results)
    if cfg.outer.kind != "async":
        assert results[0]["anchor"] == results[1]["anchor"] == coord.anchor_hash()
    assert coord.version > 0


def _elastic_worker(own_loop: ModuleType, cfg: Any, worker_id: str) -> dict[str, Any]:
    with dilo.init(cfg, worker_id=worker_id, placement=Placement(0, 1)) as world:
        return dict(own_loop.train(world))


def test_gossip_through_the_api(tmp_path: Path) -> None:
    own_loop = _example()
    ports = [_free_port() for _ in range(2)]
    peers = "[" + ", ".join(f'"tcp://127.0.0.1:{p}"' for p in ports) + "]"
    cfg = _cfg(tmp_path, "--outer.kind=gossip", "--codec.kind=none", "--outer.peer_timeout_s=5",
               f"--membership.peers={peers}")  # fmt: skip

    def worker(p: Placement) -> dict[str, Any]:
        with dilo.init(cfg, placement=Placement(p.rank, 2)) as world:
            return dict(own_loop.train(world))

    results = _threads(worker, 2)
    assert all(r["steps"] == 40 and r["rounds"] == 4 for r in results)
    assert results[0]["loss"] < 1.3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_own_loop_resumes_bit_identically_from_the_state_dict(tmp_path: Path) -> None:
    """DiLoCo + int8 with the user's own model and DataLoader: stopped after 2 of 4 rounds and
    resumed from outer.state_dict(), it ends on the same bits as a run that never stopped."""
    own_loop = _example()
    cfg = _cfg(tmp_path, "--codec.kind=int8")
    assert cfg.outer.kind == "diloco"

    def run(checkpoint: Path | None, resume: bool, stop_after: int | None) -> list[dict[str, Any]]:
        def worker(p: Placement) -> dict[str, Any]:
            with dilo.init(cfg, placement=p) as world:
                return dict(own_loop.train(world, checkpoint=checkpoint, resume=resume, stop_after=stop_after))

        return _threads(worker, 2)

    straight = run(None, False, None)
    first = run(tmp_path / "ckpt", False, 2)
    assert all(r["rounds"] == 2 for r in first)
    resumed = run(tmp_path / "ckpt", True, None)
    assert all(r["rounds"] == 4 and r["steps"] == 40 for r in resumed)
    assert [r["anchor"] for r in resumed] == [r["anchor"] for r in straight]
    assert first[0]["anchor"] != straight[0]["anchor"]  # the comparison can fail


def test_load_state_dict_after_start_is_refused(tmp_path: Path) -> None:
    own_loop = _example()
    cfg = _cfg(tmp_path)
    with dilo.init(cfg, placement=Placement(0, 1)) as world:
        model = own_loop.build_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        outer = dilo.wrap(model, opt, world)
        state = outer.state_dict()
        outer.start()
        with pytest.raises(dilo.DiloError, match="before outer.start"):
            outer.load_state_dict(state)
        outer.close()


# ---------------------------------------------------------------------------------------------
# gradients, config overrides, teardown


def test_ddp_averages_gradients_before_the_users_clipping(tmp_path: Path) -> None:
    """outer.sync_grads() before clipping: both ranks clip the same averaged gradient and stay
    identical every step; the optimizer hook then does not average twice."""
    own_loop = _example()
    cfg = _cfg(tmp_path, "--outer.kind=ddp", "--codec.kind=none")

    def worker(p: Placement) -> list[str]:
        with dilo.init(cfg, placement=p) as world:
            torch.manual_seed(p.rank)  # different initial parameters: start() must align them
            model = own_loop.build_model()
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            outer = dilo.wrap(model, opt, world)
            outer.start()
            data = iter(own_loop.Shard(own_loop.dataset(), p.rank, 2, batch_size=16, seed=p.rank))
            digests = []
            for _ in range(5):
                x, y = next(data)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                outer.sync_grads()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                opt.step()
                opt.zero_grad()
                outer.step()
                digests.append(dilo.tensor_digest([q.detach() for q in model.parameters()]))
            outer.close()
            return digests

    a, b = _threads(worker, 2)
    assert a == b


def test_wrap_takes_another_outer_and_codec(tmp_path: Path) -> None:
    from dilo.config import CodecConfig, FedAvgConfig

    own_loop = _example()
    cfg = _cfg(tmp_path)
    with dilo.init(cfg, placement=Placement(0, 1)) as world:
        model = own_loop.build_model()
        outer = dilo.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), world, FedAvgConfig(inner_steps=5),
                          codec=CodecConfig(kind="int4"))  # fmt: skip
        assert outer.cfg.outer.kind == "fedavg" and outer.cfg.codec.kind == "int4" and outer.round_steps == 5
        assert any("int4" in line.lower() or "block" in line.lower() for line in outer.describe())
        outer.close()


def test_a_failing_worker_closes_its_coordinator_link(tmp_path: Path) -> None:
    """An elastic worker whose loop raises closes its world on the way out: its heartbeat thread
    stops (a crashed in-process worker must not keep answering heartbeats)."""
    from dilo.train import train

    base = _cfg(tmp_path, "--membership.kind=coordinator", "--coordinator.bind=tcp://127.0.0.1:0")
    _example()
    with _coordinator(base) as coord:
        cfg = load(TOML, [*_overrides(tmp_path, "--membership.kind=coordinator"),
                          f"--membership.address={coord.address}"])  # fmt: skip

        def explode(outer: dilo.Outer) -> None:
            raise RuntimeError("the loop failed")

        world = dilo.init(cfg, worker_id="crash1", placement=Placement(0, 1))
        with pytest.raises(RuntimeError, match="the loop failed"):
            train(cfg, world, observe=explode)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(t.name == "dilo-heartbeat-crash1" for t in threading.enumerate()):
            time.sleep(0.05)
        assert not any(t.name == "dilo-heartbeat-crash1" for t in threading.enumerate())


def test_auto_island_workers_count_their_bytes(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DILO_ISLAND=auto (the compose path): the island is handed out at JOIN, and the bytes the
    worker exchanges are still counted (they read 0, and comm_reduction inf, before)."""
    from dilo.train import train

    monkeypatch.setenv("DILO_ISLAND", "auto")
    from tests.conftest import tiny_config

    base = tiny_config(tmp_path, corpus_dir, workers=2, steps=8, outer={"kind": "diloco", "inner_steps": 4},
                       membership={"kind": "coordinator", "start_quorum": 2, "heartbeat_s": 0.2,
                                   "heartbeat_timeout_s": 10.0},
                       coordinator={"bind": "tcp://127.0.0.1:0"})  # fmt: skip
    with _coordinator(base) as coord:
        cfg = base.model_copy(update={"membership": base.membership.model_copy(update={"address": coord.address})})
        summaries = _threads(lambda p: train(cfg, dilo.init(cfg, worker_id=f"auto{p.rank}", placement=Placement(0, 1))),
                             2)  # fmt: skip
    for s in summaries:
        assert s["bytes_sent_per_worker"] > 0 and s["comm_reduction"] != float("inf")
