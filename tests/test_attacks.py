"""What a hostile sender or an unlucky operator did to the coordinator, one test per finding.

Each of these stalled or corrupted a run before sessions, rate limits and the finite-state checks:
- a byte-for-byte replay of a captured PUSH took the honest worker's slot (and its RESULT),
  replayed HEARTBEATs kept a dead worker in the view, a replayed JOIN brought a departed worker
  back as a ghost;
- a flood of junk starved heartbeat expiry, and wrote a log line per message;
- a frame far larger than any push was buffered whole before being refused;
- one PUSH with an overflowing weight ended `dilo coordinator` or wrote NaN into the global state;
- a worker whose PUSH (or RESULT) was lost waited for its RESULT forever;
- a worker without the coordinator's CURVE keys blocked forever.

In-process coordinators (no socket, a test clock) where the order of events must be exact; a
served coordinator and real ZeroMQ sockets on loopback where the socket is the point.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from dilo import keys, wire
from dilo.config import RunConfig
from dilo.coordinator import Coordinator
from dilo.errors import DiloError
from dilo.model import build_model
from dilo.outer.base import Tail, tensor_digest
from dilo.outer.star import StarCodec, StarDiLoCo
from dilo.session import ClientSession, ReplayWindow, Sessions
from dilo.transport.zmq_star import StarClient, status
from tests.conftest import tiny_config, write_toml
from tests.test_async import DirectClient
from tests.test_elastic import FAST, _at, _env, _free_port, _serving

pytestmark = pytest.mark.timeout(120)


def _cfg(tmp_path: Path, corpus: Path, **membership: Any) -> RunConfig:
    return tiny_config(tmp_path, corpus, workers=3, membership={**FAST, **membership})


def _frames(client: DirectClient, msg: wire.Message, *, opening: bool = False) -> list[bytes]:
    """What `client` would put on the wire for msg (stamped with its session): a captured message."""
    client.session.opening(msg) if opening else client.session.stamp(msg)
    msg.run, msg.fp = client.coord.run_id, client.coord.fingerprint
    return [bytes(f) for f in wire.encode(msg)]


def _replies(coord: Coordinator) -> list[tuple[bytes, wire.Message]]:
    out, coord.outbox = coord.outbox, []
    return [(identity, wire.decode([bytes(f) for f in frames])) for identity, frames in out]


def _push_body(weight: float = 1.0) -> dict[str, Any]:
    return {"weight": weight, "contributes": True, "stop": False, "tokens": 128}


def _payload(coord: Coordinator, deltas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    star = StarCodec(coord.names, [p.shape for p in coord.params], coord.cfg.codec, seed=coord.cfg.seed)
    return star.encode_push(deltas, coord.round_index, 1, contributes=True)


# ------------------------------------------------------------------------------------------
# sessions


def test_replay_window_takes_each_number_once_and_tolerates_reordering() -> None:
    w = ReplayWindow(size=8)
    assert [w.accept(s) for s in (1, 3, 2, 3, 0, -1)] == [True, True, True, False, False, False]
    assert w.accept(20) and not w.accept(12) and w.accept(13) and not w.accept(13)
    assert w.accept(10**12) and not w.accept(20)  # far behind the newest: refused


def test_challenges_are_single_use_bound_to_the_peer_and_expire() -> None:
    now = [0.0]
    s = Sessions(ttl_s=10.0, clock=lambda: now[0])
    c1, c2 = s.challenge("w"), s.challenge("w")
    with pytest.raises(wire.WireError, match="was not issued"):
        s.open("v", c1, 1)  # issued to another peer
    s.open("w", c2, 1)
    with pytest.raises(wire.WireError) as e:
        s.open("w", c1, 1)  # older than the session w opened since: a replayed opening
    assert e.value.code == "replay"
    s.close("w")
    with pytest.raises(wire.WireError) as e:
        s.open("w", c2, 1)  # the session ended, but its challenge stays spent
    assert e.value.code == "replay"
    c3 = s.challenge("w")
    now[0] = 11.0
    with pytest.raises(wire.WireError, match="expired"):
        s.open("w", c3, 1)
    # a receiver that restarted (a new key) knows none of its old challenges
    with pytest.raises(wire.WireError, match="not issued"):
        Sessions(clock=lambda: now[0]).open("w", s.challenge("w"), 1)


def test_a_replayed_push_cannot_take_the_honest_workers_slot(tmp_path: Path, corpus_dir: Path) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir, start_quorum=2), inproc=True)
    w0, w1 = DirectClient(coord, "w0"), DirectClient(coord, "w1")
    w0.join(), w1.join()
    deltas = [torch.randn(p.shape) * 1e-3 for p in coord.params]
    captured = _frames(w0, wire.Message(type=wire.MsgType.PUSH, worker="w0", base=0, body=_push_body(),
                                        tensors=_payload(coord, deltas)))  # fmt: skip
    # someone on the path sends a copy first (it overtakes the original), then again after it
    coord.handle(b"attacker", captured)
    coord.handle(b"w0", captured)  # the honest push is still taken
    coord.handle(b"attacker", captured)
    refusals = _replies(coord)
    assert [(who, m.type, m.body["code"]) for who, m in refusals] == [(b"attacker", wire.MsgType.ERROR, "identity")] * 2
    coord.handle(b"w0", captured)  # and a replay on w0's own connection is refused as one
    (_, again), = _replies(coord)  # fmt: skip
    assert again.body["code"] == "replay"
    assert coord.policy.round.pushes["w0"].identity == b"w0"
    w1.send(
        wire.Message(type=wire.MsgType.PUSH, worker="w1", base=0, body=_push_body(), tensors=_payload(coord, deltas))
    )
    results = {identity: m for identity, m in _replies(coord)}
    assert set(results) == {b"w0", b"w1"}  # the RESULT goes to the worker that pushed, not the replayer
    assert results[b"w0"].body["committed"] is True and results[b"w0"].body["participants"] == 2
    assert results[b"w0"].sid == w0.session.sid  # and it is bound to w0's session
    assert coord.rejected["replay"] == 1 and coord.rejected["identity"] == 2


def test_replayed_heartbeats_do_not_keep_a_dead_worker(tmp_path: Path, corpus_dir: Path) -> None:
    now = [0.0]
    coord = Coordinator(_cfg(tmp_path, corpus_dir), inproc=True, clock=lambda: now[0])
    dead, alive = DirectClient(coord, "dead"), DirectClient(coord, "alive")
    dead.join(), alive.join()
    beat = _frames(dead, wire.Message(type=wire.MsgType.HEARTBEAT, worker="dead"))
    coord.handle(b"dead", beat)
    assert [m.type for _, m in _replies(coord)] == [wire.MsgType.ACK]
    # "dead" stops; an attacker keeps replaying its last heartbeat, "alive" heartbeats for real
    for t in range(1, 8):
        now[0] = t * 0.5
        coord.handle(b"attacker", beat)
        alive.send(wire.Message(type=wire.MsgType.HEARTBEAT, worker="alive"))
        coord.tick()
    assert sorted(coord.members) == ["alive"]  # heartbeat_timeout_s = 2 passed without a fresh one
    # copies from another connection are refused before they count; once it left, as a non-member's
    assert coord.rejected["identity"] >= 3 and coord.rejected["not_member"] >= 1
    _replies(coord)
    coord.handle(b"dead", beat)  # even on its own connection, the copy is refused
    assert [m.body["code"] for _, m in _replies(coord)] == ["not_member"]


def test_a_replayed_join_does_not_bring_back_a_departed_worker(tmp_path: Path, corpus_dir: Path) -> None:
    now = [0.0]
    coord = Coordinator(_cfg(tmp_path, corpus_dir), inproc=True, clock=lambda: now[0])
    w = DirectClient(coord, "w")
    assert w.session.accept_challenge(w.request(w.session.hello("w"), stamped=True))
    join = _frames(w, wire.Message(type=wire.MsgType.JOIN, worker="w"), opening=True)
    coord.handle(b"w", join)
    assert _replies(coord)[0][1].type == wire.MsgType.WELCOME
    w.session.established()
    w.request(wire.Message(type=wire.MsgType.LEAVE, worker="w"))
    assert coord.members == {}
    epoch = coord.epoch
    for t in (1.0, 1000.0):  # soon after, and long after the challenge expired
        now[0] = t
        coord.handle(b"ghost", join)
        (_, refusal), = _replies(coord)  # fmt: skip
        assert refusal.type == wire.MsgType.ERROR and refusal.body["code"] in ("replay", "session")
        assert coord.members == {} and coord.epoch == epoch
    w.join()  # the real worker can always come back: a fresh challenge
    assert sorted(coord.members) == ["w"]


# ------------------------------------------------------------------------------------------
# fair service under load


def test_a_flood_cannot_starve_membership_expiry(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _cfg(tmp_path, corpus_dir, heartbeat_timeout_s=1.0, heartbeat_s=0.2)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        ctx = zmq.Context()
        socks = [ctx.socket(zmq.DEALER) for _ in range(4)]
        for s in socks:
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(coord.address)
        junk = [b"\x93junk" * 8]
        try:
            while not stop.is_set():
                for s in socks:
                    for _ in range(200):
                        try:
                            s.send_multipart(junk, zmq.NOBLOCK)
                            sent[0] += 1
                        except zmq.Again:
                            break
        finally:
            for s in socks:
                s.close(0)
            ctx.term()

    with _serving(coord):
        client = StarClient(_at(cfg, coord.address).membership, "w0", run=cfg.name,
                            fingerprint=cfg.fingerprint(), secret=None, max_message_bytes=1 << 20)  # fmt: skip
        client.join()
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            while sent[0] < 20_000:
                time.sleep(0.05)
            client.heartbeat.stop()  # w0 dies in the middle of the flood
            gone = False
            t0 = time.monotonic()
            while not gone and time.monotonic() - t0 < 60:
                gone = "w0" not in [m["worker"] for m in status(coord.address, secret=None, timeout_s=30)["members"]]
                time.sleep(0.2)
        finally:
            stop.set()
            flooder.join(timeout=10)
            client.close()
        assert gone, f"w0 was still a member 60 s after its last heartbeat, under a flood of {sent[0]} messages"
        st = status(coord.address, secret=None)
        assert st["rejected"].get("rate", 0) > 0  # most of the flood was dropped before parsing


def test_rejections_are_logged_in_summaries(tmp_path: Path, corpus_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    coord = Coordinator(_cfg(tmp_path, corpus_dir, rate_limit=0.0), inproc=True, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="dilo.coordinator")
    for i in range(2000):
        coord.handle(f"junk{i % 7}".encode(), [b"not msgpack at all"])
    assert len(_replies(coord)) == 2000  # each refused with an ERROR (the rate limit is off here)
    now[0] = 11.0
    coord.tick()
    lines = [r.getMessage() for r in caplog.records if r.name == "dilo.coordinator"]
    assert len(lines) == 2, lines  # the first rejection in full, then one summary
    assert "rejected 1999 more messages" in lines[1] and "bad_header 1999" in lines[1]
    assert coord.rejected["bad_header"] == 2000


def test_a_connection_over_its_rate_is_dropped_unanswered(tmp_path: Path, corpus_dir: Path) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir, rate_limit=10.0), inproc=True, clock=lambda: 0.0)
    for _ in range(100):
        coord.handle(b"flooder", [b"junk"])
    assert len(_replies(coord)) == 20  # a burst of twice the rate, then nothing
    assert coord.rejected["rate"] == 80
    DirectClient(coord, "w").join()  # another connection is served as usual


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(180)
def test_frames_larger_than_any_push_are_dropped_before_they_are_buffered(tmp_path: Path, corpus_dir: Path) -> None:
    """Messages of 256 MB in frames of 8 MB, against a model whose pushes carry one frame of 3.5 MB:
    before, the cap was 4x the model plus 1 MB (14.9 MB), and the coordinator took in every byte."""
    port = _free_port()
    cfg = tiny_config(tmp_path, corpus_dir, model={"n_layer": 1, "n_head": 4, "d_model": 256, "context": 32},
                      membership={**FAST}, coordinator={"bind": f"tcp://127.0.0.1:{port}"})  # fmt: skip
    path = write_toml(cfg, tmp_path / "c.toml")
    coord = subprocess.Popen([sys.executable, "-m", "dilo.cli", "coordinator", str(path)], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        address = f"tcp://127.0.0.1:{port}"
        status(address, secret=None, timeout_s=60)  # up
        time.sleep(0.5)
        before = _rss_kb(coord.pid)
        sock.connect(address)
        big = bytes(8 << 20)
        for _ in range(4):
            sock.send_multipart([b"x", *([big] * 32)], copy=False)
        time.sleep(2.0)  # what libzmq would buffer, it has buffered by now
        after = _rss_kb(coord.pid)
        assert status(address, secret=None)["version"] == 0  # still serving
        grew_mb = (after - before) / 1024
        print(f"\ncoordinator RSS {before / 1024:.0f} MB -> {after / 1024:.0f} MB after 1 GB of oversized frames")
        assert grew_mb < 64, f"the coordinator grew by {grew_mb:.0f} MB"
    finally:
        sock.close(0)
        ctx.term()
        coord.terminate()
        coord.wait(timeout=30)


# ------------------------------------------------------------------------------------------
# state no message can poison


def _three_pushes(coord: Coordinator, pushes: list[tuple[float, float]]) -> dict[str, wire.Message]:
    """One push per (weight, value) from workers w0.., all values equal; the RESULTs by worker."""
    clients = [DirectClient(coord, f"w{i}") for i in range(len(pushes))]
    for c in clients:
        c.join()
    for c, (weight, value) in zip(clients, pushes):
        deltas = [torch.full(p.shape, value) for p in coord.params]
        c.send(wire.Message(type=wire.MsgType.PUSH, worker=c.worker_id, base=coord.version, body=_push_body(weight),
                            tensors=_payload(coord, deltas)))  # fmt: skip
    return {identity.decode(): m for identity, m in _replies(coord)}


def test_a_push_that_overflowed_a_float32_mean_leaves_it_finite(tmp_path: Path, corpus_dir: Path) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir, start_quorum=3), inproc=True)
    # the largest weight accepted times a finite float32 value overflowed the float32 sum; the
    # float64 running sum holds it, and the mean is never larger than the largest value
    results = _three_pushes(coord, [(2.0**40, 1e30), (1.0, 1e-3), (1.0, 1e-3)])
    body = results["w1"].body
    assert body["committed"] is True and body["participants"] == 3
    assert all(bool(torch.isfinite(p).all()) for p in coord.params)
    assert body["member_stats"]["w0"]["norm"] > 1e30  # the operator sees who dominated the mean


def test_an_outer_step_that_would_overflow_is_undone(tmp_path: Path, corpus_dir: Path) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir, start_quorum=2), inproc=True)
    digest = tensor_digest(coord.params)
    results = _three_pushes(coord, [(1.0, 3e38), (1.0, 3e38)])  # a finite mean; Nesterov's step is not
    body = results["w0"].body
    assert body["committed"] is False and body["version"] == 0 and "non-finite" in body["reason"]
    assert tensor_digest(coord.params) == digest and body["anchor_hash"] == digest
    assert coord.policy.optimizer.state == {} or all(  # type: ignore[union-attr]
        bool(torch.isfinite(s["momentum_buffer"]).all())
        for s in coord.policy.optimizer.state.values()  # type: ignore[union-attr]
    )
    # and the run goes on: the next round commits
    results = _three_pushes(coord, [(1.0, 1e-3), (1.0, 1e-3)])
    assert results["w0"].body["committed"] is True and coord.version == 1


def test_a_round_that_fails_to_close_is_still_answered(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir, start_quorum=2), inproc=True)

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in a codec")

    monkeypatch.setattr(coord.policy.star, "encode_mean", broken)
    results = _three_pushes(coord, [(1.0, 1e-3), (1.0, 1e-3)])
    assert {w: m.body["committed"] for w, m in results.items()} == {"w0": False, "w1": False}
    assert "internal error" in results["w0"].body["reason"] and coord.version == 0
    monkeypatch.undo()
    assert _three_pushes(coord, [(1.0, 1e-3), (1.0, 1e-3)])["w1"].body["committed"] is True


def test_a_failing_timer_keeps_the_coordinator_serving(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coord = Coordinator(_cfg(tmp_path, corpus_dir), inproc=True)
    calls = [0]

    def broken(now: float) -> None:
        calls[0] += 1
        raise KeyError("a bug in the timer")

    monkeypatch.setattr(coord.policy, "tick", broken)
    coord.tick()
    coord.tick()
    assert calls[0] == 2
    DirectClient(coord, "w").join()  # still serving


def test_each_members_update_norm_and_cosine_are_reported(
    tmp_path: Path, corpus_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, workers=5, membership={**FAST, "start_quorum": 5})
    coord = Coordinator(cfg, inproc=True)
    caplog.set_level(logging.WARNING, logger="dilo.coordinator")
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(p.shape, generator=g) * 1e-3 for p in coord.params]
    scales = {"h0": 1.0, "h1": 1.0, "h2": 1.0, "flipped": -1.0, "scaled": 10.0}
    clients = {w: DirectClient(coord, w) for w in scales}
    for c in clients.values():
        c.join()
    for w, scale in scales.items():  # one member flips the sign of its update, one scales it up
        tensors = _payload(coord, [scale * b for b in base])
        clients[w].send(wire.Message(type=wire.MsgType.PUSH, worker=w, base=0, body=_push_body(), tensors=tensors))
    stats = _replies(coord)[0][1].body["member_stats"]
    norm = math.sqrt(sum(float(b.square().sum()) for b in base))
    assert stats["h0"]["norm"] == pytest.approx(norm, rel=1e-3)
    assert stats["scaled"]["norm"] == pytest.approx(10 * norm, rel=1e-3)
    assert stats["flipped"]["cos"] == pytest.approx(-1.0, abs=1e-3) and stats["h0"]["cos"] == pytest.approx(
        1.0, abs=1e-3
    )
    assert coord.status()["last_round"]["members"] == stats
    flagged = {w for w in scales if any(f"of {w} stands out" in r.getMessage() for r in caplog.records)}
    assert flagged == {"flipped", "scaled"}


# ------------------------------------------------------------------------------------------
# the worker side


def test_a_lost_push_makes_the_worker_rejoin_after_its_deadline(
    tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, corpus_dir, round_timeout_s=1.0, request_timeout_s=1.0)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    real_push, lost = coord.policy.on_push, [0]

    def lose_the_first(identity: bytes, msg: wire.Message) -> None:
        if not lost[0]:
            lost[0] += 1  # as if the network dropped it: no reply will ever come
            return
        real_push(identity, msg)

    monkeypatch.setattr(coord.policy, "on_push", lose_the_first)
    with _serving(coord):
        model = build_model(cfg.model, cfg.seed)
        client = StarClient(_at(cfg, coord.address).membership, "w0", run=cfg.name,
                            fingerprint=cfg.fingerprint(), secret=None, max_message_bytes=1 << 22)  # fmt: skip
        outer = StarDiLoCo(model, client, _at(cfg, coord.address))
        try:
            outer.join(model)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)
            report = outer.sync(model, tail=Tail(weight=1.0, contributes=True, stop=False, tokens=1, steps=1))
        finally:
            client.leave()
            client.close()
    assert lost[0] == 1
    assert report.committed and report.anchor_hash == tensor_digest(coord.params) and coord.version == 1


def test_a_worker_without_the_curve_keys_gives_up_with_a_message(tmp_path: Path, corpus_dir: Path) -> None:
    if not keys.curve_available():
        pytest.skip("libzmq without CURVE")
    key_dir = tmp_path / "keys"
    keys.generate(key_dir)
    cfg = _cfg(tmp_path, corpus_dir, curve_dir=str(key_dir), request_timeout_s=1.0)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with _serving(coord):
        plain = _at(cfg, coord.address).membership.model_copy(update={"curve_dir": ""})
        client = StarClient(plain, "w0", run=cfg.name, fingerprint=cfg.fingerprint(), secret=None,
                            max_message_bytes=1 << 20)  # fmt: skip
        try:
            with pytest.raises(DiloError, match="handshake failed.*has no keys"):
                client.join(give_up_s=60)
        finally:
            client.close()


def test_client_sessions_take_only_their_own_replies() -> None:
    s = ClientSession()
    hello = s.hello("w")
    ok = wire.Message(type=wire.MsgType.CHALLENGE, worker="c", body={"nonce": hello.body["nonce"], "challenge": "c1"})
    stale = wire.Message(type=wire.MsgType.CHALLENGE, worker="c", body={"nonce": "0" * 32, "challenge": "c0"})
    assert not s.accept_challenge(stale) and s.accept_challenge(ok)
    join = s.opening(wire.Message(type=wire.MsgType.JOIN, worker="w"))
    assert join.sid == "c1" and s.sid == ""  # heartbeats keep the old session until the WELCOME
    s.established()
    beat = s.stamp(wire.Message(type=wire.MsgType.HEARTBEAT, worker="w"))
    assert beat.sid == "c1" and beat.seq > join.seq
    reply = wire.Message(type=wire.MsgType.ACK, worker="c", sid="c1", seq=beat.seq)
    assert s.owns(reply, beat) and not s.owns(reply, join)
    assert not s.owns(wire.Message(type=wire.MsgType.ACK, worker="c", sid="c0", seq=beat.seq))
