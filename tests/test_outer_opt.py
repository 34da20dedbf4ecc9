"""Outer optimizers (outer.optimizer): FedAdam / FedYogi / FedAdagrad and torch optimizers by name,
against the naive reference over real Gloo (workers as threads) and through a real coordinator;
their state in checkpoints and in what a joiner receives."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from dilo.config.outer import DiLoCoConfig
from dilo.errors import ConfigError
from dilo.metrics import read_jsonl
from dilo.outer import reference
from dilo.outer.base import Tail, params_of
from dilo.outer.diloco import DiLoCo
from dilo.outer.outer_opt import build_outer_optimizer, load_state_tensors, state_tensors
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from tests.conftest import run_workers, tiny_config, train_threads
from tests.test_outer import _drift, _model

ROUNDS = 4


def _worker(world: Any, o: DiLoCoConfig) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)
    model = _model()
    outer = DiLoCo(model, t, inner_steps=1, lr=o.lr, make_optimizer=partial(build_outer_optimizer, o, foreach=True))
    ends = []
    for r in range(ROUNDS):
        with torch.no_grad():
            for i, p in enumerate(params_of(model)):
                p.sub_(_drift(world.rank, 10 * r + i, p.shape))
        ends.append([p.detach().clone() for p in params_of(model)])
        report = outer.sync(model, tail=Tail(weight=1.0, contributes=True, stop=False, tokens=10))
        assert report.committed
    return ends, [a.detach().clone() for a in outer.anchor.params]


@pytest.mark.parametrize("rule", ["adam", "yogi", "adagrad"])
def test_fedopt_matches_the_reference_over_gloo(rule: str) -> None:
    """3 workers, 4 rounds: every worker ends on the same anchor bits, and on the float64 reference
    of Reddi et al.'s rule applied to the workers' mean pseudo-gradient."""
    o = DiLoCoConfig(optimizer=f"fed{rule}", lr=0.05, optimizer_args={"betas": [0.9, 0.99], "tau": 1e-2})
    out = run_workers(lambda w: _worker(w, o), 3)
    for _, anchor in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[0][1], anchor))
    ref = [p.detach().clone() for p in params_of(_model())]
    state = None
    for r in range(ROUNDS):
        delta = reference.mean_pseudo_grad(ref, [ends[r] for ends, _ in out])
        ref, state = reference.fedopt_step(ref, delta, state, rule=rule, lr=0.05, betas=(0.9, 0.99), tau=1e-2)
    for a, b in zip(out[0][1], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [p.detach() for p in params_of(_model())]
    assert any(not torch.equal(a, b) for a, b in zip(out[0][1], moved))


def test_a_torch_optimizer_by_name_is_the_outer_step() -> None:
    """outer.optimizer = "torch.optim.Adam" (eps 0.1, as the DiLoCo paper's outer Adam): the anchor
    is what that torch optimizer makes of the reference mean, round after round."""
    o = DiLoCoConfig(optimizer="torch.optim.Adam", lr=0.05, optimizer_args={"eps": 0.1, "betas": [0.9, 0.95]})
    out = run_workers(lambda w: _worker(w, o), 2)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params_of(_model())]
    adam = torch.optim.Adam(ref, lr=0.05, eps=0.1, betas=(0.9, 0.95))
    for r in range(ROUNDS):
        for p, g in zip(ref, reference.mean_pseudo_grad([p.detach() for p in ref], [e[r] for e, _ in out])):
            p.grad = g
        adam.step()
    for a, b in zip(out[0][1], ref):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_state_tensors_round_trip_every_optimizers_state() -> None:
    """The coordinator's view of an outer optimizer's state (checkpoints, WELCOME): named tensors
    that load back into the same state, SGD's momentum under its old name."""
    for name in ("sgd", "fedyogi", "torch.optim.Adam"):
        kw = {"momentum": 0.9} if name == "sgd" else {}
        o = DiLoCoConfig(optimizer=name, lr=0.1, **kw)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
        opt = build_outer_optimizer(o, params)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        tensors = state_tensors(opt, params)
        assert ("m.0" in tensors) == (name == "sgd") and tensors
        twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
        other = build_outer_optimizer(o, twin)
        load_state_tensors(other, twin, tensors)
        for p, q in zip(params, twin):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        opt.step()
        other.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin)), name


@pytest.mark.parametrize(
    ("outer", "needle"),
    [
        ({"optimizer": "adamw"}, "expected sgd, fedadam"),
        ({"optimizer": "torch.optim.Adam", "optimizer_args": {"bogus": 1}}, "unexpected keyword"),
        ({"optimizer": "fedadam", "optimizer_args": {"tau": -1.0}}, "tau > 0"),
        ({"optimizer_args": {"eps": 0.1}}, "sgd takes outer.momentum"),
    ],
    ids=["unknown", "bad-argument", "bad-tau", "sgd-args"],
)
def test_outer_optimizer_config_is_validated(tmp_path: Path, corpus_dir: Path, outer: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        tiny_config(tmp_path, corpus_dir, outer={"kind": "diloco", "inner_steps": 4, **outer})


def test_fedadam_training_resumes_bit_identically(tmp_path: Path, corpus_dir: Path) -> None:
    """Two workers with FedAdam: a run stopped after 1 round and resumed ends on the uninterrupted
    run's anchors (the adaptive state is in the checkpoint)."""
    outer = {"kind": "diloco", "inner_steps": 4, "lr": 0.05, "optimizer": "fedadam"}
    full = train_threads(tiny_config(tmp_path / "full", corpus_dir, steps=12, checkpoint={"every": 1}, outer=outer), 2)
    part = tiny_config(tmp_path / "part", corpus_dir, steps=12, checkpoint={"every": 1}, outer=outer)
    train_threads(part, 2, max_rounds=1)
    resumed = tiny_config(tmp_path / "part", corpus_dir, steps=12, checkpoint={"every": 1, "resume": True}, outer=outer)
    second = train_threads(resumed, 2)
    assert second[0]["val_loss"] == full[0]["val_loss"]
    hashes = {
        run: [r["anchor_hash"] for r in read_jsonl(tmp_path / run / "logs" / "worker0.jsonl") if r["event"] == "round"]
        for run in ("full", "part")
    }
    assert hashes["part"] == hashes["full"] and len(set(hashes["full"])) == 3


def test_fedyogi_through_a_coordinator_and_to_a_joiner(tmp_path: Path, corpus_dir: Path) -> None:
    """Elastic DiLoCo with FedYogi: both workers end on the coordinator's parameters, its
    checkpoint holds the adaptive state, and a worker joining afterwards gets that state."""
    from dilo.coordinator import Coordinator
    from dilo.outer.base import tensor_digest
    from dilo.state import load_worker_state
    from tests.test_elastic import _at, _elastic_cfg, _run_threads, _serving

    cfg = _elastic_cfg(tmp_path, corpus_dir, workers=2, steps=12,
                       outer={"kind": "diloco", "inner_steps": 4, "lr": 0.05, "optimizer": "fedyogi"})  # fmt: skip
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with _serving(coord):
        _, worlds = _run_threads(_at(cfg, coord.address), ["w0", "w1"])
        final = tensor_digest(coord.params)
        state = coord.policy.tensors()  # what WELCOME carries: parameters and outer state
        from dilo.transport.zmq_star import StarClient

        joiner = StarClient(_at(cfg, coord.address).membership, "w9", run=cfg.name, fingerprint=cfg.fingerprint(),
                            secret=None, max_message_bytes=1 << 26)  # fmt: skip
        try:
            welcome = joiner.join()
        finally:
            joiner.close()
    assert coord.version == 3 and all(w.outer.anchor.digest() == final for w in worlds)
    adaptive = {k: v for k, v in state.items() if k.startswith("o.")}
    assert adaptive and all(torch.equal(welcome.tensors[k], v) for k, v in adaptive.items())
    saved = load_worker_state(cfg.run_dir / "coordinator", 3, "coordinator")
    assert all(torch.equal(saved["outer"][k], v) for k, v in adaptive.items())
