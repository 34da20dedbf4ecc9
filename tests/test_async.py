"""Asynchronous local SGD through the coordinator: every push applied on arrival, staleness, DyLU,
the budget, lost replies, and a real run with processes of different speeds, one SIGKILLed and
one joining mid-run.

Fast tests drive an in-process coordinator (the `dilo coordinator` class without its socket)
with encoded, validated messages; the slow one starts real processes on loopback.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import statistics
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from dilo import wire
from dilo.config import RunConfig, load
from dilo.coordinator import Coordinator
from dilo.errors import PeerLost
from dilo.model import build_model, params_of
from dilo.outer.async_local import AsyncLocalSGD
from dilo.outer.base import Tail, tensor_digest
from dilo.outer.server import DelayedNesterov
from dilo.outer.star import StarCodec
from dilo.session import ClientSession
from dilo.transport.base import ByteCounter
from tests.conftest import tiny_config, write_toml
from tests.test_elastic import FAST, _env, _log, _reaped, _records, _serving, _spawn, _tail, _wait_for, _wait_ok

ASYNC = {"kind": "async", "inner_steps": 8, "lr": 0.5, "momentum": 0.9, "buffer": 2}


def _cfg(tmp_path: Path, corpus: Path, outer: dict[str, Any] | None = None, **sections: Any) -> RunConfig:
    return tiny_config(
        tmp_path,
        corpus,
        workers=sections.pop("workers", 3),
        membership={**FAST, **sections.pop("membership", {})},
        outer={**ASYNC, **(outer or {})},
        **sections,
    )


_SESSIONS: weakref.WeakKeyDictionary[Coordinator, dict[str, ClientSession]] = weakref.WeakKeyDictionary()


class DirectClient:
    """StarClient's interface, handing encoded frames straight to an in-process coordinator.
    `drop` loses the reply to the next push after the coordinator handled it."""

    def __init__(self, coord: Coordinator, worker_id: str) -> None:
        self.coord = coord
        self.worker_id = worker_id
        self.cfg = coord.cfg.membership
        self.counter = ByteCounter()
        # one session per worker and coordinator, however many clients a test makes for it
        self.session = _SESSIONS.setdefault(coord, {}).setdefault(worker_id, ClientSession())
        self.drop = False

    def send(self, msg: wire.Message, *, stamped: bool = False) -> None:
        if not stamped:
            self.session.stamp(msg)
        msg.run, msg.fp = self.coord.run_id, self.coord.fingerprint
        self.coord.handle(self.worker_id.encode(), [bytes(f) for f in wire.encode(msg)])

    def request(self, msg: wire.Message, *, stamped: bool = False) -> wire.Message:
        self.send(msg, stamped=stamped)
        (identity, frames), *rest = self.coord.outbox
        self.coord.outbox = rest
        assert identity == self.worker_id.encode()
        reply = wire.decode([bytes(f) for f in frames], expect_run=self.coord.run_id)
        if reply.type == wire.MsgType.ERROR:
            raise wire.WireError(reply.body["code"], reply.body["message"])
        return reply

    def join(self) -> wire.Message:
        assert self.session.accept_challenge(self.request(self.session.hello(self.worker_id), stamped=True))
        join = self.session.opening(wire.Message(type=wire.MsgType.JOIN, worker=self.worker_id))
        welcome = self.request(join, stamped=True)
        self.session.established()
        return welcome

    def push(self, tensors: dict[str, torch.Tensor], body: dict[str, Any], *, base: int) -> wire.Message:
        reply = self.request(
            wire.Message(type=wire.MsgType.PUSH, worker=self.worker_id, base=base, body=body, tensors=tensors)
        )
        if self.drop:
            self.drop = False
            raise PeerLost("reply lost (test)")
        return reply


def _push(
    coord: Coordinator, worker: str, delta: list[torch.Tensor], *, base: int, steps: int = 8, inner_s: float = 1.0
) -> wire.Message:
    star = StarCodec(coord.names, [p.shape for p in coord.params], coord.cfg.codec, seed=coord.cfg.seed)
    tensors = star.encode_push(delta, 0, 1, contributes=True)
    body = {"weight": 1.0, "contributes": True, "stop": False, "tokens": 128, "steps": steps, "inner_s": inner_s}
    return DirectClient(coord, worker).push(tensors, body, base=base)


def _deltas(coord: Coordinator, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * 1e-2 for p in coord.params]


# ------------------------------------------------------------------------------------------
# the coordinator's async rules


def test_pushes_apply_on_arrival_with_delayed_nesterov_and_staleness(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _cfg(tmp_path, corpus_dir, {"dylu": False})
    coord = Coordinator(cfg, inproc=True)
    ref = DelayedNesterov([p.detach().clone() for p in coord.params], lr=0.5, momentum=0.9, buffer=2, workers=1)
    for w in ("a", "b", "c"):
        assert DirectClient(coord, w).join().body["version"] == 0
    # a, b and c all started from version 0; each push moves the version, so b and c are stale
    for i, w in enumerate(("a", "b", "c")):
        d = _deltas(coord, i)
        reply = _push(coord, w, d, base=0)
        ref.push(d, staleness=i)
        assert reply.type == wire.MsgType.RESULT and reply.body["applied"] is True
        assert reply.body["staleness"] == i and reply.body["version"] == i + 1
        # the reply carries the fresh parameters, exactly the server's
        got = [reply.tensors[f"p.{k}"] for k in range(len(coord.params))]
        assert tensor_digest(got) == tensor_digest(coord.params) == reply.body["anchor_hash"]
    for p, r in zip(coord.params, ref.params):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-7)
    st = {m["worker"]: m for m in coord.status()["members"]}
    assert [st[w]["max_staleness"] for w in "abc"] == [0, 1, 2]
    assert coord.status()["applied"] == 3 and coord.status()["steps"] == 24


def test_max_staleness_drops_old_pushes(tmp_path: Path, corpus_dir: Path) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir, {"max_staleness": 1}), inproc=True)
    for w in ("a", "b", "c"):
        DirectClient(coord, w).join()
    _push(coord, "a", _deltas(coord, 0), base=0)
    _push(coord, "b", _deltas(coord, 1), base=0)  # staleness 1: applied
    before = tensor_digest(coord.params)
    reply = _push(coord, "c", _deltas(coord, 2), base=0)  # staleness 2: dropped
    assert reply.body["dropped"] is True and reply.body["applied"] is False and reply.body["staleness"] == 2
    assert tensor_digest(coord.params) == before and coord.version == 2
    assert coord.status()["dropped"] == 1
    assert reply.body["version"] == 2  # c restarts from the current parameters


def test_dylu_assigns_steps_by_measured_speed_and_the_budget_ends_the_run(tmp_path: Path, corpus_dir: Path) -> None:
    # budget: steps * workers = 40 * 2 = 80 inner steps
    cfg = _cfg(tmp_path, corpus_dir, {"inner_steps": 10}, steps=40, workers=2)
    coord = Coordinator(cfg, inproc=True)
    assert DirectClient(coord, "fast").join().body["inner_steps"] == 10  # speeds unknown yet: H
    DirectClient(coord, "slow").join()
    # fast: 10 steps in 1 s; slow: 10 steps in 4 s -> slow gets floor(2.5 / 10 * 10) = 2
    r = _push(coord, "fast", _deltas(coord, 0), base=0, steps=10, inner_s=1.0)
    assert r.body["inner_steps"] == 10
    r = _push(coord, "slow", _deltas(coord, 1), base=0, steps=10, inner_s=4.0)
    assert r.body["inner_steps"] == 2 and not r.body["done"]
    # 20 of 80 done; fast holds 10 and slow 2 in flight: fast may get at most 80 - 30 - 2 = 48 more
    r = _push(coord, "fast", _deltas(coord, 2), base=1, steps=10, inner_s=1.0)
    assert r.body["inner_steps"] == 10 and coord.policy.in_flight == {"fast": 10, "slow": 2}
    for i in range(4):  # fast: 30 + 40 = 70 done, its last assignments run into the budget
        r = _push(coord, "fast", _deltas(coord, 3 + i), base=coord.version, steps=10, inner_s=1.0)
    assert coord.policy.steps_done == 70 and r.body["inner_steps"] == 8 and not r.body["done"]  # 80 - 70 - 2 slow
    r = _push(coord, "slow", _deltas(coord, 9), base=coord.version, steps=2, inner_s=0.8)
    assert r.body["done"]  # 72 done + 8 in flight for fast: nothing left for slow
    r = _push(coord, "fast", _deltas(coord, 10), base=coord.version, steps=8, inner_s=0.8)
    assert r.body["done"] and coord.policy.steps_done == coord.policy.budget == 80
    # the learning-rate schedule follows the world's progress: steps done / workers
    assert r.body["schedule_step"] == 40


def test_fedasync_mixes_the_workers_parameters_from_its_own_base(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _cfg(tmp_path, corpus_dir, {"update": "fedasync", "alpha": 0.5, "staleness": "poly", "staleness_a": 1.0})
    coord = Coordinator(cfg, inproc=True)
    for w in ("a", "b"):
        DirectClient(coord, w).join()
    base0 = [p.detach().clone() for p in coord.params]
    da, db = _deltas(coord, 0), _deltas(coord, 1)
    _push(coord, "a", da, base=0)
    x1 = [b - 0.5 * d for b, d in zip(base0, da)]  # (1 - .5) x0 + .5 (x0 - da)
    for p, x in zip(coord.params, x1):
        torch.testing.assert_close(p.detach(), x, rtol=0, atol=1e-6)
    _push(coord, "b", db, base=0)  # staleness 1: alpha * (1 + 1)^-1 = 0.25, mixed from version 0's params
    for p, x, b, d in zip(coord.params, x1, base0, db):
        torch.testing.assert_close(p.detach(), 0.75 * x + 0.25 * (b - d), rtol=0, atol=1e-6)
    assert set(coord.policy.snapshots) == {1, 2}  # a holds version 1, b version 2; version 0 is released


def test_fedbuff_applies_only_full_buffers(tmp_path: Path, corpus_dir: Path) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir, {"update": "fedbuff", "buffer": 2, "lr": 1.0}), inproc=True)
    for w in ("a", "b"):
        DirectClient(coord, w).join()
    before = tensor_digest(coord.params)
    r = _push(coord, "a", _deltas(coord, 0), base=0)
    assert r.body["applied"] is False and coord.version == 0 and tensor_digest(coord.params) == before
    r = _push(coord, "b", _deltas(coord, 1), base=0)
    assert r.body["applied"] is True and coord.version == 1


def test_grace_period_restarts_close_finishers_from_the_same_parameters(tmp_path: Path, corpus_dir: Path) -> None:
    now = [0.0]
    coord = Coordinator(_cfg(tmp_path, corpus_dir, {"grace_s": 1.0}), inproc=True, clock=lambda: now[0])
    clients = {w: DirectClient(coord, w) for w in ("a", "b", "c")}
    for c in clients.values():
        c.join()
    star = StarCodec(coord.names, [p.shape for p in coord.params], coord.cfg.codec)
    body = {"weight": 1.0, "contributes": True, "stop": False, "tokens": 1, "steps": 8, "inner_s": 1.0}

    def send(w: str, seed: int) -> None:
        msg = wire.Message(
            type=wire.MsgType.PUSH, worker=w, base=0, body=body,
            tensors=star.encode_push(_deltas(coord, seed), 0, 1, contributes=True),
        )  # fmt: skip
        clients[w].send(msg)

    send("a", 0)
    now[0] = 0.5
    send("b", 1)
    assert coord.outbox == [] and coord.version == 2  # both applied, neither answered yet
    now[0] = 1.2
    coord.tick()
    send("c", 2)  # after the window: starts a new one
    replies = {i.decode(): wire.decode([bytes(f) for f in fr]) for i, fr in coord.outbox}
    assert set(replies) == {"a", "b"}
    assert replies["a"].body["anchor_hash"] == replies["b"].body["anchor_hash"]
    assert replies["a"].body["version"] == 2 and coord.policy.grace_until == pytest.approx(2.2)


def test_bad_async_pushes_are_rejected_without_touching_the_state(tmp_path: Path, corpus_dir: Path) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir), inproc=True)
    DirectClient(coord, "a").join()
    before = tensor_digest(coord.params)
    star = StarCodec(coord.names, [p.shape for p in coord.params], coord.cfg.codec)
    good = star.encode_push(_deltas(coord, 0), 0, 1, contributes=True)
    ok = {"weight": 1.0, "contributes": True, "stop": False, "tokens": 1, "steps": 8, "inner_s": 1.0}
    cases = [
        ({**ok, "steps": -1}, 0, good, "bad_body"),
        ({**ok, "inner_s": float("inf")}, 0, good, "bad_body"),
        ({**ok, "steps": True}, 0, good, "bad_body"),
        (ok, 5, good, "bad_base"),  # a version from the future
        (ok, 0, {k: v * float("nan") for k, v in good.items()}, "nonfinite"),
    ]
    for body, base, tensors, code in cases:
        with pytest.raises(wire.WireError) as e:
            DirectClient(coord, "a").push(tensors, body, base=base)
        assert e.value.code == code
    assert tensor_digest(coord.params) == before and coord.version == 0 and coord.policy.steps_done == 0
    assert sum(coord.rejected.values()) == len(cases)


def test_async_checkpoint_resume_keeps_rule_state_and_budget(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _cfg(tmp_path, corpus_dir, {"buffer": 3})
    coord = Coordinator(cfg, inproc=True)
    for w in ("a", "b"):
        DirectClient(coord, w).join()
    _push(coord, "a", _deltas(coord, 0), base=0)
    _push(coord, "b", _deltas(coord, 1), base=0)  # mid-buffer: 2 of 3
    coord.checkpoint()
    twin = Coordinator(cfg, inproc=True, resume=True)
    assert (
        twin.version == 2 and twin.policy.steps_done == 16 and tensor_digest(twin.params) == tensor_digest(coord.params)
    )
    assert twin.policy.speeds == coord.policy.speeds
    d = _deltas(coord, 2)
    _push(coord, "a", d, base=2)
    DirectClient(twin, "a").join()  # a restarted coordinator knows no session: workers re-join
    _push(twin, "a", d, base=2)  # the third push completes the buffer on both, identically
    assert tensor_digest(twin.params) == tensor_digest(coord.params)


# ------------------------------------------------------------------------------------------
# the worker side


def test_lost_reply_makes_the_worker_pull_before_its_next_pseudo_gradient(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _cfg(tmp_path, corpus_dir, {"dylu": False})
    coord = Coordinator(cfg, inproc=True)
    other = DirectClient(coord, "other")
    other.join()
    model = build_model(cfg.model, cfg.seed)
    client = DirectClient(coord, "w")
    outer = AsyncLocalSGD(model, client, cfg)  # type: ignore[arg-type]
    outer.join(model)
    tail = Tail(weight=1.0, contributes=True, stop=False, tokens=64, steps=8, inner_s=1.0)

    def train_a_bit(seed: int) -> None:
        with torch.no_grad():
            for p, d in zip(params_of(model), _deltas(coord, seed)):
                p.sub_(d)

    train_a_bit(0)
    client.drop = True
    report = outer.sync(model, tail=tail)
    # the coordinator applied the push; the worker never heard back, re-joined and holds the
    # coordinator's current parameters, not its stale anchor
    assert not report.committed and "reply lost" in report.reason
    assert coord.version == 1 and outer.version == 1
    assert outer.anchor.digest() == tensor_digest(coord.params) == tensor_digest(params_of(model))
    _push(coord, "other", _deltas(coord, 5), base=0)  # the world moves on: version 2
    train_a_bit(1)
    expected = [a.detach() - p.detach() for a, p in zip(outer.anchor.params, params_of(model))]
    snapshot = copy.deepcopy([p.detach() for p in coord.params])
    report = outer.sync(model, tail=tail)
    # the next pseudo-gradient is relative to the re-pulled parameters (base version 1, staleness 1)
    assert report.committed and report.staleness == 1 and report.version == 3
    # pushes so far: w (since 1), other (milestone), w again: between milestones with c = 0 the step
    # is plain SGD of lr / N on exactly this pseudo-gradient
    for p, s_, g in zip(coord.params, snapshot, expected):
        torch.testing.assert_close(p.detach(), s_ - 0.5 * g / 2, rtol=0, atol=1e-6)


def test_async_config_errors_are_clear(tmp_path: Path, corpus_dir: Path) -> None:
    from dilo.config import from_dict
    from dilo.errors import ConfigError

    with pytest.raises(ConfigError, match="membership.kind='coordinator'"):
        from_dict({"outer": {"kind": "async"}})
    with pytest.raises(ConfigError, match="activation"):
        from_dict({"outer": {"kind": "async", "buffer": 4, "activation": 0.5}, "membership": {"kind": "coordinator"}})
    with pytest.raises(ConfigError, match="update='delayed_nesterov' has its own step"):
        from_dict({"outer": {"kind": "async", "optimizer": "fedadam"}, "membership": {"kind": "coordinator"}})
    with pytest.raises(ConfigError, match="max_steps"):
        from_dict({"heterogeneity": {"max_steps": [10]}})
    with pytest.raises(ConfigError, match="slowdown"):
        from_dict({"heterogeneity": {"slowdown": [0.5]}})


# ------------------------------------------------------------------------------------------
# real processes: 3 workers of different speeds, one SIGKILLed, one joining mid-run


def _write_async_config(run_dir: Path, corpus: Path) -> Path:
    cfg = tiny_config(
        run_dir,
        corpus,
        name="async",
        workers=3,
        steps=1000,
        outer={**ASYNC, "buffer": 3},
        heterogeneity={"slowdown": [2, 4, 8]},
        log={"eval_every": 1, "eval_batches": 2},
        membership={
            "kind": "coordinator",
            "heartbeat_s": 0.2,
            "heartbeat_timeout_s": 2.0,
            "request_timeout_s": 3.0,
            "start_quorum": 3,
            "round_timeout_s": 60,
        },
        coordinator={"bind": "tcp://127.0.0.1:0"},
    )
    return write_toml(cfg, run_dir / "async.toml")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_real_async_run_with_a_sigkill_and_a_joiner(tmp_path: Path, corpus_dir: Path) -> None:
    """w0, w1, w2 run at speeds 1, 1/2, 1/4 (islands 0, 1, 2, slowed down 2, 4 and 8 times); they
    start together (start_quorum = 3). w1 is SIGKILLed after its second push and w3 joins after
    that; the survivors and the joiner finish the world's budget of 3000 steps."""
    toml = _write_async_config(tmp_path, corpus_dir)
    coord = Coordinator(load(str(toml)), bind="tcp://127.0.0.1:0")
    addr = coord.address
    with _serving(coord), _reaped([]) as procs:
        workers = {}
        for i, w in enumerate(("w0", "w1", "w2")):
            workers[w] = _spawn(
                ["worker", str(toml), "--id", w, f"--membership.address={addr}"],
                tmp_path,
                w,
                env=_env(DILO_ISLAND=str(i)),
            )
        procs.extend(workers.values())
        _wait_for("two pushes of w1", lambda: len(_records(_log(tmp_path, "w1"))) >= 2, 90, procs)
        os.kill(workers["w1"].pid, signal.SIGKILL)
        workers["w1"].wait(timeout=10)
        version_at_kill = coord.version
        joiner = _spawn(
            ["worker", str(toml), "--id", "w3", f"--membership.address={addr}"],
            tmp_path,
            "w3",
            env=_env(DILO_ISLAND="1"),
        )
        procs.append(joiner)
        _wait_for("w1 to leave the view", lambda: "w1" not in coord.members, 30, [workers["w0"], joiner])
        for w in ("w0", "w2"):
            _wait_ok(workers[w], 90)
        _wait_ok(joiner, 90)
        status = coord.status()
    recs = {w: _records(_log(tmp_path, w)) for w in ("w0", "w2", "w3")}
    joined = _records(_log(tmp_path, "w3"), "start")[0]["joined"]
    print(
        f"\nasync: {status['applied']} pushes applied, version {coord.version}; w1 killed at version "
        f"{version_at_kill}, w3 joined at {joined['version']}; steps per round: "
        + ", ".join(f"{w} {sorted({r['next_steps'] for r in rs})}" for w, rs in recs.items())
    )
    assert status["steps"] == status["budget"] == 3000
    assert joined["version"] >= version_at_kill
    # DyLU: the 4x slower w2 is given fewer steps per round than w0
    # (the last assignments are cut short by the budget)
    typical = {w: statistics.median(r["next_steps"] for r in rs[:-2]) for w, rs in recs.items()}
    assert typical["w2"] < typical["w0"] == 8
    # staleness is recorded per applied push (one that timed out on a loaded machine has none)
    applied = [r for rs in recs.values() for r in rs if r["committed"]]
    assert applied and all(r["staleness"] is not None and r["staleness"] >= 0 for r in applied)
    # the last RESULT of every survivor said done, and the loss went down
    for w, rs in recs.items():
        end = _records(_log(tmp_path, w), "end")[0]
        assert not end["stopped"], _tail(workers.get(w, joiner))
        assert rs[-1]["val_loss"] < _records(_log(tmp_path, "w0"), "start")[0]["val_loss"]
    assert json.loads((tmp_path / "summary.json").read_text())["strategy"] == "async"


@pytest.mark.parametrize("update", ["nesterov", "fedbuff"])
def test_an_adaptive_outer_optimizer_steps_async_pushes(tmp_path: Path, corpus_dir: Path, update: str) -> None:
    """outer.optimizer under async local SGD: FedAdam steps with each poly-staleness-weighted push
    (update = nesterov), torch.optim.Adam with each buffer's mean (fedbuff, K = 2), as the float64
    reference and torch's Adam compute them; the coordinator's checkpoint carries the optimizer's
    state, so a resumed coordinator takes the next step identically."""
    from dilo.outer import reference

    adam = update == "fedbuff"
    outer = {"update": update, "lr": 0.05, "dylu": False, "staleness": "poly", "staleness_a": 0.5}
    if adam:
        outer.update(optimizer="torch.optim.Adam", optimizer_args={"eps": 0.1}, buffer=2)
    else:
        outer.update(optimizer="fedadam", optimizer_args={"tau": 0.01})
    cfg = _cfg(tmp_path, corpus_dir, outer)
    coord = Coordinator(cfg, inproc=True)
    start = [p.detach().clone() for p in coord.params]
    for w in ("a", "b", "c"):
        DirectClient(coord, w).join()
    pushes = [(w, _deltas(coord, i), i) for i, w in enumerate(("a", "b", "c"))]  # staleness 0, 1, 2 (nesterov)
    for w, d, _ in pushes:
        _push(coord, w, d, base=0)
    if adam:  # one step on the mean of the first two pushes (both of version 0); the third waits in the buffer
        ref = [torch.nn.Parameter(p.clone()) for p in start]
        opt = torch.optim.Adam(ref, lr=0.05, eps=0.1)
        for i, p in enumerate(ref):
            p.grad = (pushes[0][1][i] + pushes[1][1][i]) / 2
        opt.step()
        expected = [p.detach() for p in ref]
    else:
        expected, state = [p.double() for p in start], None
        for _, d, t in pushes:
            g = [(1.0 + t) ** -0.5 * x.double() for x in d]
            expected, state = reference.fedopt_step(expected, g, state, rule="adam", lr=0.05, tau=0.01)
    for p, r in zip(coord.params, expected):
        torch.testing.assert_close(p.detach(), r.float(), rtol=1e-5, atol=1e-6)
    assert coord.policy.rule.flushes == (1 if adam else 3)

    coord.checkpoint()
    twin = Coordinator(cfg, inproc=True, resume=True)
    d = _deltas(coord, 9)
    _push(coord, "a", d, base=coord.version)
    DirectClient(twin, "a").join()
    _push(twin, "a", d, base=twin.version)
    assert tensor_digest(twin.params) == tensor_digest(coord.params) != tensor_digest(expected)
