"""outer.overlap (one-step-delayed outer step) over real Gloo, against the naive reference."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dilo.coordinator import Coordinator
from dilo.errors import ConfigError
from dilo.model import build_model
from dilo.outer import reference
from dilo.outer.base import Tail, params_of, tensor_digest
from dilo.outer.diloco import DiLoCo
from dilo.outer.star import StarDiLoCo
from dilo.state import load_worker_state, rounds_of
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from dilo.transport.zmq_star import StarClient
from tests.conftest import run_workers, tiny_config, train_threads, write_toml
from tests.test_elastic import (
    _at,
    _elastic_cfg,
    _free_port,
    _log,
    _reaped,
    _records,
    _serving,
    _spawn,
    _stop_coordinator,
    _tail,
    _wait_for,
    _wait_ok,
    _write_config,
)
from tests.test_outer import _drift, _model
from tests.test_train import _final_params, _rounds

ROUNDS = 4


def _move(r: int, rank: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """An inner step that depends on where the worker is (a pull towards its own target), so
    that applying an outer step a round late changes the outcome."""
    return [0.3 * (p - _drift(rank, i, p.shape)) for i, p in enumerate(params)]


def _worker(world, codec=None):
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)
    model = _model()
    outer = DiLoCo(model, t, inner_steps=1, lr=0.7, momentum=0.9, nesterov=True, overlap=True, codec=codec)
    outer.start(model, resumed=False)
    reports = []
    for r in range(ROUNDS):
        with torch.no_grad():
            params = params_of(model)
            for p, m in zip(params, _move(r, world.rank, [p.detach().clone() for p in params])):
                p.sub_(m)
        tail = Tail(weight=1.0, contributes=True, stop=False, tokens=10, last=r == ROUNDS - 1)
        reports.append(outer.sync(model, tail=tail))
    return reports, [a.detach().clone() for a in outer.anchor.params], [p.detach().clone() for p in params_of(model)]


@pytest.mark.parametrize("n", [2, 3])
def test_overlap_matches_the_reference_and_is_bit_identical(n: int) -> None:
    out = run_workers(_worker, n)
    anchors = [o[1] for o in out]
    for other in anchors[1:]:
        assert all(torch.equal(a, b) for a, b in zip(anchors[0], other))
    for o in out:  # the last round ends on the anchor
        assert all(torch.equal(a, p) for a, p in zip(o[1], o[2]))
    start = [p.detach().clone() for p in params_of(_model())]
    ref, _ = reference.overlapped_diloco(start, _move, ROUNDS, n, lr=0.7, momentum=0.9, nesterov=True)
    for a, b in zip(anchors[0], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    reports = out[0][0]
    assert all(rep.committed for rep in reports)
    # round 1 applies nothing yet; the last one applies two outer steps (its own exchange in the round)
    assert [rep.participants for rep in reports] == [0] + [n] * (ROUNDS - 1)
    assert reports[-1].tokens == 2 * 10 * n


def test_overlap_is_not_the_blocking_rule() -> None:
    """The reference differs from blocking DiLoCo: the test above could not pass by accident."""
    start = [p.detach().clone() for p in params_of(_model())]
    overlapped, _ = reference.overlapped_diloco(start, _move, ROUNDS, 2, lr=0.7, momentum=0.9, nesterov=True)
    g, buf = start, None
    for r in range(ROUNDS):
        ends = [[a - m for a, m in zip(g, _move(r, i, g))] for i in range(2)]
        g, buf = reference.diloco_round(g, ends, buf, lr=0.7, momentum=0.9, nesterov=True)
    assert not all(torch.allclose(a, b) for a, b in zip(overlapped, g))


def _same_final_anchor(run_dir: Path, n: int) -> None:
    logs = [_rounds(run_dir, r) for r in range(n)]
    assert len({log[-1]["anchor_hash"] for log in logs}) == 1
    finals = [_final_params(run_dir, r) for r in range(n)]
    assert all(torch.equal(a, b) for f in finals[1:] for a, b in zip(finals[0], f))


def test_overlap_trains_in_the_loop(tmp_path: Path, corpus_dir: Path) -> None:
    """The real loop with outer.overlap (workers as threads, the exchange on its own Gloo group)."""
    cfg = tiny_config(tmp_path, corpus_dir, outer={"kind": "diloco", "inner_steps": 4, "overlap": True})
    summaries = train_threads(cfg, 2)
    assert summaries[0]["tokens"] == 12 * 2 * 4 * 32  # every round's tokens reported once
    assert summaries[0]["val_loss"] < _rounds(tmp_path, 0)[0]["val_loss"]
    _same_final_anchor(tmp_path, 2)


def test_overlap_trains_processes(tmp_path: Path, corpus_dir: Path) -> None:
    """Two real processes through `dilo run`: every worker ends on one anchor."""
    cfg = tiny_config(tmp_path, corpus_dir, outer={"kind": "diloco", "inner_steps": 4, "overlap": True})
    toml = write_toml(cfg, tmp_path / "overlap.toml")
    run = subprocess.run(
        [sys.executable, "-m", "dilo.cli", "run", str(toml), "--workers=2"], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    _same_final_anchor(tmp_path, 2)


def test_overlap_is_not_simulated(tmp_path: Path, corpus_dir: Path) -> None:
    from dilo.sim import simulate

    cfg = tiny_config(tmp_path, corpus_dir, outer={"kind": "diloco", "overlap": True})
    with pytest.raises(ConfigError, match="outer.overlap"):
        simulate(cfg)


# ------------------------------------------------------------------------------------------
# through a coordinator


def _star_worker(cfg, address: str, worker: str, rank: int, rounds: int):
    model = build_model(cfg.model, cfg.seed)
    client = StarClient(_at(cfg, address).membership, worker, run=cfg.name, fingerprint=cfg.fingerprint(),
                        secret=None, max_message_bytes=1 << 24)  # fmt: skip
    outer = StarDiLoCo(model, client, _at(cfg, address))
    reports = []
    try:
        outer.join(model)
        for r in range(rounds):
            with torch.no_grad():
                params = params_of(model)
                for p, m in zip(params, _move(r, rank, [p.detach().clone() for p in params])):
                    p.sub_(m)
            tail = Tail(weight=1.0, contributes=True, stop=False, tokens=10, steps=1, last=r == rounds - 1)
            reports.append(outer.sync(model, tail=tail))
    finally:
        client.leave()
        client.close()
    return reports, [a.detach().clone() for a in outer.anchor.params], [p.detach().clone() for p in params_of(model)]


def test_overlap_through_a_coordinator_matches_the_reference(tmp_path: Path, corpus_dir: Path) -> None:
    """Two workers (threads, real sockets) with outer.overlap against a real coordinator: the
    pushes run on background threads, and the anchors follow the naive reference."""
    cfg = _elastic_cfg(tmp_path, corpus_dir, workers=2, outer={"kind": "diloco", "inner_steps": 1, "overlap": True},
                       membership={"start_quorum": 2})  # fmt: skip
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    start = [p.detach().clone() for p in coord.params]
    with _serving(coord):
        out: list = [None, None]

        def run(k: int) -> None:
            out[k] = _star_worker(cfg, coord.address, f"w{k}", k, ROUNDS)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        final = tensor_digest(coord.params)
    assert all(o is not None for o in out), "a worker failed"
    for reports, anchor, params in out:
        assert tensor_digest(anchor) == final  # the coordinator's state, bit for bit
        assert all(torch.equal(a, p) for a, p in zip(anchor, params))  # the last round ends on it
        assert all(r.committed for r in reports)
        assert [r.participants for r in reports] == [0] + [2] * (ROUNDS - 1)
    o = cfg.outer
    ref, _ = reference.overlapped_diloco(start, _move, ROUNDS, 2, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    for a, b in zip(out[0][1], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert coord.version == ROUNDS


def test_overlap_through_a_coordinator_trains_processes(tmp_path: Path, corpus_dir: Path) -> None:
    """`dilo coordinator` and two `dilo worker` processes with outer.overlap: both end on the
    coordinator's final anchor."""
    port = _free_port()
    toml = _write_config(tmp_path, corpus_dir, steps=12, h=4, port=port, workers=2)
    overlap = ["--outer.overlap=true", "--membership.start_quorum=2"]
    with _reaped([]) as procs:
        coord = _spawn(["coordinator", str(toml), *overlap], tmp_path, "coordinator")
        procs.append(coord)
        _wait_for("the coordinator", lambda: "listening on" in _tail(coord), 60, procs)
        for w in ("w0", "w1"):
            procs.append(_spawn(["worker", str(toml), "--id", w, *overlap], tmp_path, w))
        for p in procs[1:]:
            _wait_ok(p, 120)
        _stop_coordinator(coord)
    hashes = [_records(_log(tmp_path, w))[-1]["anchor_hash"] for w in ("w0", "w1")]
    ckpt = tmp_path / "coordinator"
    final = tensor_digest(load_worker_state(ckpt, rounds_of(ckpt, "coordinator")[-1], "coordinator")["params"])
    assert hashes == [final, final]
