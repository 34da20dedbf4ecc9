"""The coordinator package and the worker's link to it: message bodies (dilo/bodies.py), the
round policies, close(), and the heartbeat and push deadlines of the client.

Each client test failed before its fix: a re-join followed at once by a spurious PeerLost (the
heartbeat thread re-set `lost` from the old link's silence), a worker thread that died with an
exception kept answering heartbeats (so the coordinator kept it in the view), a second close()
raised, and a push waited forever while stale replies kept arriving.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dilo import bodies, wire
from dilo.config import RunConfig
from dilo.coordinator import Coordinator
from dilo.errors import SyncTimeout
from dilo.transport.zmq_star import StarClient
from tests.conftest import tiny_config
from tests.test_async import DirectClient
from tests.test_elastic import FAST, _at, _serving

pytestmark = pytest.mark.timeout(120)


def _cfg(tmp_path: Path, corpus: Path, **membership: Any) -> RunConfig:
    return tiny_config(tmp_path, corpus, workers=2, membership={**FAST, **membership})


def _client(cfg: RunConfig, coord: Coordinator, worker: str = "w0") -> StarClient:
    return StarClient(_at(cfg, coord.address).membership, worker, run=cfg.name, fingerprint=cfg.fingerprint(),
                      secret=None, max_message_bytes=1 << 22)  # fmt: skip


def _wait(what: str, cond: Any, timeout_s: float) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.02)


def _type_of(coord: Coordinator, frames: list[Any]) -> wire.Message | None:
    try:
        return wire.decode(frames, secret=None, limits=coord.limits)
    except wire.WireError:
        return None


# ------------------------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"weight": True}, "weight"),  # a bool is not a number
        ({"weight": "1"}, "weight"),
        ({"weight": 2.0**41}, "weight"),
        ({"tokens": 3.0}, "tokens"),  # not an integer
        ({"contributes": 1}, "contributes"),
        ({"wieght": 1.0}, "wieght"),  # a typo is refused, not ignored
    ],
)
def test_a_bad_push_body_names_its_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(wire.WireError) as e:
        bodies.parse(bodies.PushBody, body, "PUSH body")
    assert e.value.code == "bad_body" and f"PUSH body: {field}:" in e.value.message


def test_join_and_async_push_bounds() -> None:
    assert bodies.parse(bodies.JoinBody, {"p2p": "tcp://10.0.0.1:65535", "island": "auto"}).island == "auto"
    for bad in ({"p2p": "tcp://h:65536"}, {"p2p": "udp://h:1"}, {"island": 0}):
        with pytest.raises(wire.WireError, match="bad_body|JoinBody"):
            bodies.parse(bodies.JoinBody, bad)
    for bad in ({"steps": -1}, {"inner_s": float("inf")}, {"steps": True}):
        with pytest.raises(wire.WireError):
            bodies.parse(bodies.AsyncPushBody, bad)
    # replies: unknown keys are ignored (a newer coordinator may add some), None fields are not sent
    ack = bodies.parse(bodies.AckBody, {"epoch": 1, "version": 0, "round": 0, "members": [], "boot": "b", "new": 1})
    assert bodies.dump(ack) == {"epoch": 1, "version": 0, "round": 0, "members": [], "boot": "b"}


def test_replies_match_their_models(tmp_path: Path, corpus_dir: Path) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir, start_quorum=1), inproc=True)
    welcome = DirectClient(coord, "w").join()
    bodies.parse(bodies.StateBody, welcome.body)
    assert welcome.body["inner_steps"] == 4 and "island" not in welcome.body


# ------------------------------------------------------------------------------- policies, close()


def test_the_gossip_tracker_builds_no_model(tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*args: Any) -> Any:
        raise AssertionError("a tracker built the model")

    monkeypatch.setattr("dilo.coordinator.global_model.build_run_model", no_model)
    cfg = tiny_config(tmp_path, corpus_dir, workers=2, outer={"kind": "gossip"}, membership=FAST)
    coord = Coordinator(cfg, inproc=True)
    assert coord.params == [] and coord.limits.max_frames == 0
    assert type(coord.policy).__name__ == "Tracker"


def test_close_is_idempotent_and_serve_closes(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _cfg(tmp_path, corpus_dir)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    coord.close()
    coord.close()
    assert coord.sock is None
    served = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with _serving(served):
        pass
    assert served.sock is None and served.ctx is None
    served.close()


# ------------------------------------------------------------------------------- the client


def test_a_rejoin_is_not_followed_by_a_spurious_peer_lost(tmp_path: Path, corpus_dir: Path) -> None:
    """Heartbeats go unanswered until the link is lost; the worker re-joins while they are still
    unanswered (as after a restart, before the first ACK): the new link is not lost at once."""
    cfg = _cfg(tmp_path, corpus_dir, heartbeat_s=0.05, request_timeout_s=1.0, heartbeat_timeout_s=30.0)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    deaf = threading.Event()
    requests = [b""]  # the socket of the worker's requests (its heartbeats have their own)
    real_handle = coord.handle

    def handle(identity: bytes, frames: list[Any]) -> None:
        if deaf.is_set() and identity != requests[0]:
            return  # heartbeats (and the heartbeat socket's HELLOs) go unanswered
        real_handle(identity, frames)

    coord.handle = handle  # type: ignore[method-assign]
    with _serving(coord):
        client = _client(cfg, coord)
        try:
            client.join()
            requests[0] = coord.members["w0"].identity
            _wait("an ACK", lambda: client.heartbeat.view is not None, 10)
            deaf.set()
            _wait("the link lost", client.heartbeat.lost.is_set, 10)
            client.join()
            assert not client.heartbeat.lost.wait(0.6), "lost again right after the re-join"
            deaf.clear()
            assert not client.heartbeat.lost.wait(1.5)
        finally:
            client.close()


def test_a_crashed_worker_thread_stops_its_heartbeats(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _cfg(tmp_path, corpus_dir, heartbeat_s=0.05, heartbeat_timeout_s=1.0, request_timeout_s=1.0)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    clients: list[StarClient] = []

    def worker() -> None:
        client = _client(cfg, coord)
        clients.append(client)
        client.join()
        raise RuntimeError("the worker crashed")  # and nobody closes its client

    with _serving(coord):
        t = threading.Thread(target=worker, daemon=True)
        t.start()
        t.join(timeout=30)
        _wait("the crashed worker to leave the view", lambda: "w0" not in coord.members, 10)
        heartbeat = clients[0].heartbeat._thread  # type: ignore[attr-defined]
        _wait("the heartbeat thread to end", lambda: not heartbeat.is_alive(), 5)
        clients[0].close()
        clients[0].close()  # idempotent


def test_a_push_has_a_deadline_while_heartbeats_succeed(tmp_path: Path, corpus_dir: Path) -> None:
    """The coordinator answers every heartbeat but never the push; stale replies keep arriving on
    the push's socket. The push still gives up by result_timeout_s."""
    cfg = _cfg(tmp_path, corpus_dir, heartbeat_s=0.05, request_timeout_s=1.0, round_timeout_s=1.0)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    pushed: list[tuple[bytes, wire.Message]] = []
    real_handle = coord.handle

    def handle(identity: bytes, frames: list[Any]) -> None:
        msg = _type_of(coord, frames)
        if msg is not None and msg.type == wire.MsgType.PUSH:
            pushed.append((identity, msg))  # taken, never answered
            return
        real_handle(identity, frames)
        for ident, push in pushed:  # a stale reply (an older seq of its session) with every heartbeat
            stale = wire.Message(type=wire.MsgType.STATE, worker="coordinator", sid=push.sid, seq=push.seq - 1)
            coord.send(ident, stale)

    coord.handle = handle  # type: ignore[method-assign]
    out: dict[str, BaseException] = {}
    with _serving(coord):
        client = _client(cfg, coord)
        try:
            client.join()

            def push() -> None:
                try:
                    client.push({}, {"contributes": False, "weight": 0.0}, base=coord.version)
                except BaseException as e:  # noqa: BLE001 - checked below
                    out["error"] = e

            t = threading.Thread(target=push, daemon=True)
            t0 = time.monotonic()
            t.start()
            t.join(timeout=15)
            assert not t.is_alive(), "the push is still waiting"
            assert isinstance(out.get("error"), SyncTimeout)
            assert time.monotonic() - t0 >= client.result_timeout_s - 0.1
            assert not client.heartbeat.lost.is_set()
        finally:
            client.close()


def test_an_invalid_ack_is_not_trusted(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _cfg(tmp_path, corpus_dir, heartbeat_s=0.05, request_timeout_s=1.0, heartbeat_timeout_s=30.0)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    real_send = coord.send

    def send(identity: bytes, msg: wire.Message, worker: str | None = None, *, to: wire.Message | None = None) -> None:
        if msg.type == wire.MsgType.ACK:
            msg.body = {**msg.body, "epoch": "three"}
        real_send(identity, msg, worker, to=to)

    coord.send = send  # type: ignore[method-assign]
    with _serving(coord):
        client = _client(cfg, coord)
        try:
            client.join()
            _wait("invalid ACKs counted", lambda: client.heartbeat.bad_replies >= 3, 10)
            assert client.heartbeat.view is None  # nothing of them was believed
            _wait("the link lost (no valid ACK)", client.heartbeat.lost.is_set, 10)
        finally:
            client.close()


# ------------------------------------------------------------------------------------------
# a worker that starts mid-round is handed what the round has left


def test_a_joiner_mid_round_trains_what_is_left_and_counts(tmp_path: Path, corpus_dir: Path) -> None:
    import torch

    from dilo.outer.star import StarCodec

    now = [0.0]
    outer = {"kind": "diloco", "inner_steps": 10, "lr": 1.0, "momentum": 0.0, "nesterov": False}
    cfg = tiny_config(tmp_path, corpus_dir, workers=3, membership={**FAST, "start_quorum": 2}, outer=outer)
    coord = Coordinator(cfg, inproc=True, clock=lambda: now[0])
    star = StarCodec(coord.names, [p.shape for p in coord.params], cfg.codec, seed=cfg.seed)

    def push(c: DirectClient, value: float, steps: int) -> None:
        deltas = [torch.full(p.shape, value) for p in coord.params]
        body = {"weight": 1.0, "contributes": True, "stop": False, "tokens": 1, "steps": steps, "inner_s": steps / 10}
        c.send(wire.Message(type=wire.MsgType.PUSH, worker=c.worker_id, base=coord.version, body=body,
                            tensors=star.encode_push(deltas, coord.round_index, 1, contributes=True)))  # fmt: skip

    w0, w1, w2 = (DirectClient(coord, f"w{i}") for i in range(3))
    for c in (w0, w1):
        assert c.join().body["inner_steps"] == 10  # nothing measured yet: a full round
    push(w0, 1.0, 10)
    push(w1, 1.0, 10)  # 10 steps per second each; round 0 closes at t = 0
    coord.outbox.clear()
    before = [p.detach().clone() for p in coord.params]
    now[0] = 0.6  # six of the round's ten steps are done
    assert w2.join().body["inner_steps"] == 4
    push(w2, 0.5, 4)  # its push arrives with the others' and counts, at 4/10 of a full round's weight
    push(w0, 1.0, 10)
    push(w1, 2.0, 10)
    result = [wire.decode([bytes(f) for f in frames]) for _, frames in coord.outbox][-1]
    assert result.type == wire.MsgType.RESULT and result.body["participants"] == 3
    mean = (1.0 + 2.0 + 0.4 * 0.5) / 2.4
    for p, b in zip(coord.params, before):
        torch.testing.assert_close(b - p, torch.full(p.shape, mean))  # outer SGD at lr 1
    assert coord.policy.catch_up == {}
