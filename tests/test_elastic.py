"""Elastic training through a `dilo coordinator`: agreement, hostile input, crashes, joins, restarts.

Fast tests run the coordinator and the workers as threads of this process over real ZeroMQ on
loopback; the `slow` ones start real `dilo coordinator` / `dilo worker` processes and kill them.
Timings are short (heartbeat 0.2 s, silent-worker timeout 2 s, request timeout 3 s, round deadline
5 s) so that every fault is detected and survived within seconds. Measured times are printed
(run with -s to see them).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
import torch
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dilo import wire
from dilo.config import RunConfig
from dilo.coordinator import Coordinator
from dilo.errors import DiloError
from dilo.outer.base import tensor_digest
from dilo.outer.star import StarCodec
from dilo.state import load_worker_state, rounds_of
from dilo.train import train
from dilo.transport.zmq_star import StarClient, status
from dilo.worlds import ElasticWorld
from tests.conftest import tiny_config, write_toml

SECRET = b"s3cret-s3cret-s3cret-0123456789"
FAST = {
    "kind": "coordinator",
    "heartbeat_s": 0.2,
    "heartbeat_timeout_s": 2.0,
    "request_timeout_s": 3.0,
    "round_timeout_s": 5.0,
}


# ------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _elastic_cfg(run_dir: Path, corpus: Path, **sections: Any) -> RunConfig:
    membership = {**FAST, **sections.pop("membership", {})}
    return tiny_config(run_dir, corpus, membership=membership, **sections)


def _at(cfg: RunConfig, address: str) -> RunConfig:
    """The same config, with workers pointed at `address` (membership is not in the fingerprint)."""
    return cfg.model_copy(update={"membership": cfg.membership.model_copy(update={"address": address})})


@contextlib.contextmanager
def _serving(coord: Coordinator) -> Iterator[Coordinator]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            coord.serve(stop)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=serve, name="coordinator", daemon=True)
    t.start()
    coord.thread = t  # type: ignore[attr-defined]
    try:
        yield coord
    finally:
        stop.set()
        t.join(timeout=10)
        assert not errors, f"the coordinator thread raised {errors[0]!r}"


class _World(ElasticWorld):
    """An elastic worker that waits for the others after joining (so that every worker is a member
    of the first round) and keeps its strategy for the test to inspect."""

    def __init__(self, cfg: RunConfig, worker_id: str, barrier: threading.Barrier | None = None) -> None:
        super().__init__(cfg, worker_id)
        self.barrier = barrier
        self.outer: Any = None

    def observe(self, outer: Any) -> None:
        """train() hands over the started Outer: keep its strategy."""
        self.outer = outer.strategy

    def adopt(self, joined: Any, *, resumed: bool) -> None:
        super().adopt(joined, resumed=resumed)
        if self.barrier is not None:
            self.barrier.wait(timeout=60)


class _Gated(Coordinator):
    """Records the anchor hash of every version; with `hold_at`, rounds stop closing once that
    version is reached, until the test sets `gate` (pushes stay pending; workers wait)."""

    def __init__(self, *args: Any, hold_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hashes = {self.version: self.anchor_hash()}
        self.hold_at = hold_at
        self.gate = threading.Event()
        # wrap the round policy's closing (instance attributes shadow its methods)
        maybe_close, close = self.policy.maybe_close, self.policy.close

        def gated_maybe_close(now: float) -> None:
            if self.hold_at is not None and self.version >= self.hold_at and not self.gate.is_set():
                return
            maybe_close(now)

        def recorded_close() -> None:
            close()
            self.hashes[self.version] = self.anchor_hash()

        self.policy.maybe_close = gated_maybe_close
        self.policy.close = recorded_close


def _run_threads(cfg: RunConfig, ids: list[str]) -> tuple[list[dict[str, Any]], list[_World]]:
    barrier = threading.Barrier(len(ids))
    worlds = [_World(cfg, i, barrier) for i in ids]
    results: list[Any] = [None] * len(ids)
    errors: list[BaseException] = []

    def target(k: int) -> None:
        try:
            results[k] = train(cfg, worlds[k], observe=worlds[k].observe)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(k,), daemon=True) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    return results, worlds


def _records(path: Path, event: str = "round") -> list[dict[str, Any]]:
    """JSONL records of one kind; tolerates a line being written right now."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            r = json.loads(line)
            if r.get("event") == event:
                out.append(r)
    return out


def _log(run_dir: Path, worker: str) -> Path:
    return run_dir / "logs" / f"worker-{worker}.jsonl"


def _wait_for(what: str, cond: Any, timeout: float, procs: list[subprocess.Popen[str]] = ()) -> float:
    """Poll cond() until true; returns the seconds waited; fails early if one of procs exited."""
    t0 = time.monotonic()
    while not cond():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: {p.args} exited with {p.returncode}:\n{_tail(p)}")
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------
# processes


def _write_config(run_dir: Path, corpus: Path, *, steps: int, h: int, port: int = 0, workers: int = 3) -> Path:
    """A TOML for `dilo coordinator` / `dilo worker` (port 0: the coordinator binds a free port and the
    test passes --membership.address to the workers; the file names a placeholder, 1, for them)."""
    cfg = tiny_config(
        run_dir,
        corpus,
        name="elastic",
        workers=workers,
        steps=steps,
        outer={"kind": "diloco", "inner_steps": h},
        membership={**FAST, "address": f"tcp://127.0.0.1:{port or 1}"},
        coordinator={"bind": f"tcp://127.0.0.1:{port}"},
    )
    return write_toml(cfg, run_dir / "elastic.toml")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DILO_SECRET"}
    env.update(OMP_NUM_THREADS="1", DILO_THREADS="1", PYTHONUNBUFFERED="1", DILO_LOG="INFO")
    env.update(extra)
    return env


def _spawn(args: list[str], run_dir: Path, name: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`python -m dilo.cli ARGS` with stderr in run_dir/NAME.err (read with _tail)."""
    err = open(run_dir / f"{name}.err", "w")  # noqa: SIM115 - the child keeps its own descriptor
    p = subprocess.Popen(
        [sys.executable, "-m", "dilo.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=env or _env(),
        text=True,
        start_new_session=True,
    )
    p.err_path = run_dir / f"{name}.err"  # type: ignore[attr-defined]
    err.close()
    return p


def _tail(p: subprocess.Popen[str], n: int = 4000) -> str:
    path = getattr(p, "err_path", None)
    return path.read_text()[-n:] if path is not None and path.is_file() else ""


@contextlib.contextmanager
def _reaped(procs: list[subprocess.Popen[str]]) -> Iterator[list[subprocess.Popen[str]]]:
    """Kill whatever is still running when the test ends, pass or fail."""
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def _wait_ok(p: subprocess.Popen[str], timeout: float) -> None:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{p.args} still running after {timeout:.0f} s:\n{_tail(p)}")
    assert p.returncode == 0, f"{p.args} exited with {p.returncode}:\n{_tail(p)}"


def _stop_coordinator(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGTERM)  # checkpoints and exits
    _wait_ok(p, 30)


# ==========================================================================================
# 1. workers as threads agree with the coordinator, bit for bit


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "codec",
    [{"kind": "none"}, {"kind": "int8"}, {"kind": "topk", "fraction": 0.05, "error_feedback": True}],
    ids=["fp32", "int8", "topk-ef"],
)
def test_threads_end_on_the_coordinators_params(tmp_path: Path, corpus_dir: Path, codec: dict[str, Any]) -> None:
    cfg = _elastic_cfg(tmp_path, corpus_dir, workers=2, steps=16, codec=codec)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    initial = coord.anchor_hash()
    with _serving(coord):
        summaries, worlds = _run_threads(_at(cfg, coord.address), ["w0", "w1"])
        final = tensor_digest(coord.params)
        version = coord.version
    assert version == 4  # 16 steps / H=4, every round committed
    for w in worlds:
        assert w.outer.anchor.digest() == final
        assert w.joined["version"] == 0 and w.joined["anchor_hash"] == initial
    per_worker = [_records(_log(tmp_path, w)) for w in ("w0", "w1")]
    hashes = [[r["anchor_hash"] for r in recs] for recs in per_worker]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 4 and hashes[0][-1] == final
    assert all(r["committed"] and r["participants"] == 2 for recs in per_worker for r in recs)
    assert len(set(hashes[0])) == 4  # every round moved the anchor
    for s in summaries:
        assert s["rounds_committed"] == 4 and s["val_loss"] < s["initial_val_loss"]
    assert summaries[0]["val_loss"] == summaries[1]["val_loss"]  # same anchor, same validation set
    # the coordinator's checkpoint holds the same final state
    ckpt = cfg.run_dir / "coordinator"
    assert rounds_of(ckpt, "coordinator")[-1] == 4
    assert tensor_digest(load_worker_state(ckpt, 4, "coordinator")["params"]) == final


# ==========================================================================================
# 2. a live coordinator against hostile input


def _sign(raw: dict[str, Any], frames: list[bytes], secret: bytes | None) -> list[bytes]:
    """Frames for a hand-made header map, signed like wire.encode signs (or not, secret=None)."""
    header = msgpack.packb(raw, use_bin_type=True)
    mac = wire._mac(secret, header, frames) if secret is not None else None
    return [msgpack.packb([header, mac], use_bin_type=True), *frames]


class _Raw:
    """A bare DEALER: sends any frames, reads the coordinator's reply."""

    def __init__(self, ctx: zmq.Context[Any], address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def ask(self, frames: list[bytes], timeout_s: float = 10.0) -> wire.Message:
        self.sock.send_multipart(frames)
        assert self.sock.poll(int(timeout_s * 1000)), "no reply from the coordinator"
        return wire.decode(self.sock.recv_multipart(), secret=SECRET)


class _Fixture:
    """A coordinator with a secret and a top-k + int8 push format, one member ("m0"), and a valid
    push of m0 (never sent as is: it would close the round and move the parameters)."""

    def __init__(self, coord: Coordinator, raw: _Raw, sid: str = "") -> None:
        self.coord, self.raw = coord, raw
        self.sid = sid
        self.seqs = itertools.count(2)  # 1 opened the session
        self.sent = 0
        star = StarCodec(coord.names, [p.shape for p in coord.params], coord.cfg.codec, seed=0)
        deltas = [torch.randn(p.shape) * 1e-3 for p in coord.params]
        self.tensors = star.encode_push(deltas, 0, 7, contributes=True)
        self.base = coord.version

    def header(self, **over: Any) -> dict[str, Any]:
        raw = {
            "v": wire.PROTOCOL_VERSION,
            "type": "push",
            "run": self.coord.run_id,
            "worker": "m0",
            "sid": self.sid,
            "seq": next(self.seqs),
            "base": self.base,
            "fp": self.coord.fingerprint,
            "body": {"weight": 1.0, "contributes": True, "stop": False, "tokens": 128},
            "tensors": [],
        }
        raw.update(over)
        return raw

    def push(
        self, payload: dict[str, torch.Tensor] | None = None, secret: bytes | None = SECRET, **over: Any
    ) -> list[bytes]:
        """A signed PUSH of `payload` (default: the valid tensors) with header fields overridden."""
        payload = self.tensors if payload is None else payload
        descs, frames = [], []
        for name, t in payload.items():
            t = t.contiguous()
            descs.append(
                {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "nbytes": t.nbytes}
            )
            frames.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        raw = self.header(tensors=descs)
        raw.update(over)
        return _sign(raw, frames, secret)

    def expect_error(self, frames: list[bytes], codes: set[str] | None = None) -> str:
        reply = self.raw.ask(frames)
        self.sent += 1
        assert reply.type == wire.MsgType.ERROR, f"expected ERROR, got {reply.type.value}: {reply.body}"
        code = str(reply.body["code"])
        if codes is not None:
            assert code in codes, f"expected {codes}, got {code}: {reply.body.get('message')}"
        return code


def _open_session(raw: _Raw, coord: Coordinator, worker: str) -> str:
    """HELLO, then JOIN with the challenge: the session id every later message of `worker` carries."""
    fx = _Fixture(coord, raw)
    hello = {**fx.header(type="hello", worker=worker, body={"nonce": "n" * 32}, seq=1), "tensors": []}
    challenge = raw.ask(_sign(hello, [], SECRET))
    assert challenge.type == wire.MsgType.CHALLENGE and challenge.body["nonce"] == "n" * 32, challenge.body
    sid = challenge.body["challenge"]
    join = {**fx.header(type="join", worker=worker, body={}, sid=sid, seq=1), "tensors": []}
    welcome = raw.ask(_sign(join, [], SECRET))
    assert welcome.type == wire.MsgType.WELCOME and welcome.sid == sid and welcome.seq == 1, welcome.body
    return str(sid)


@pytest.fixture
def hostile(tmp_path: Path, corpus_dir: Path) -> Iterator[_Fixture]:
    codec = {"kind": "topk", "fraction": 0.1, "overrides": [{"pattern": "ln", "kind": "int8", "block": 32}]}
    # no heartbeats here: m0 must stay a member however long hypothesis takes
    # hypothesis sends hundreds of messages a second from one socket: no rate limit here
    membership = {"heartbeat_timeout_s": 3600.0, "rate_limit": 0.0}
    cfg = _elastic_cfg(tmp_path, corpus_dir, codec=codec, membership=membership)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0", secret=SECRET)
    ctx: zmq.Context[Any] = zmq.Context()
    raw = _Raw(ctx, coord.address)
    try:
        with _serving(coord):
            fx = _Fixture(coord, raw, _open_session(raw, coord, "m0"))
            digest0 = tensor_digest(coord.params)
            yield fx
            # still alive and serving, state untouched, every bad message counted
            assert coord.thread.is_alive()  # type: ignore[attr-defined]
            st_ = status(coord.address, secret=SECRET)
            assert sum(st_["rejected"].values()) == fx.sent, st_["rejected"]
            assert st_["version"] == 0 and st_["pending"] == [] and [m["worker"] for m in st_["members"]] == ["m0"]
            ack = raw.ask(_sign(fx.header(type="heartbeat", body={}), [], SECRET))
            assert ack.type == wire.MsgType.ACK
            assert tensor_digest(coord.params) == digest0
    finally:
        raw.sock.close(0)
        ctx.term()


def test_hostile_semantic_mutations_get_specific_errors(hostile: _Fixture) -> None:
    fx = hostile
    t = fx.tensors
    idx_name = next(k for k in t if k.endswith(".idx"))
    val_name = next(k for k in t if k.endswith(".values"))
    q_name = next(k for k in t if k.endswith(".q"))
    n_vec = next(g.layout.total for g in fx.coord.policy.star.groups if f"g{g.index}.idx" == idx_name)

    def with_(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**t, name: value}

    nan = t[val_name].clone()
    nan[0] = float("nan")
    inf_scale = {k: v.clone() for k, v in t.items()}
    scale_name = next(k for k in t if k.endswith(".scale"))
    inf_scale[scale_name][0] = float("inf")
    cases: list[tuple[str, list[bytes], set[str]]] = [
        ("push before join", fx.push(worker="stranger"), {"not_member"}),
        (
            "heartbeat before join",
            _sign(fx.header(type="heartbeat", worker="stranger", body={}), [], SECRET),
            {"not_member"},
        ),
        ("protocol version", fx.push(v=wire.PROTOCOL_VERSION + 1), {"version"}),
        ("wrong secret", fx.push(secret=b"another-secret-of-32-bytes-xxxxx"), {"auth"}),
        ("no mac", fx.push(secret=None), {"auth"}),
        ("wrong run", fx.push(run="another-run"), {"run"}),
        ("wrong config", fx.push(fp="0123456789abcdef"), {"config"}),
        ("nan values", fx.push(with_(val_name, nan)), {"nonfinite"}),
        ("inf scale", fx.push(inf_scale), {"nonfinite"}),
        # twice the bytes: refused by the size cap (the largest frame a push has) or the spec
        ("dtype", fx.push(with_(val_name, t[val_name].double())), {"shape", "dtype", "size"}),
        ("int dtype", fx.push(with_(q_name, t[q_name].to(torch.int16))), {"shape", "dtype"}),
        ("shape", fx.push(with_(val_name, t[val_name][:-1])), {"shape"}),
        ("2-d shape", fx.push(with_(val_name, t[val_name].reshape(1, -1))), {"shape"}),
        ("missing tensor", fx.push({k: v for k, v in t.items() if k != val_name}), {"shape"}),
        ("extra tensor", fx.push({**t, "zzz": torch.zeros(3)}), {"shape", "size"}),  # size: more frames than a push has
        ("index past the end", fx.push(with_(idx_name, torch.full_like(t[idx_name], n_vec))), {"bad_payload"}),
        ("negative index", fx.push(with_(idx_name, torch.full_like(t[idx_name], -1))), {"bad_payload"}),
        ("nan weight", fx.push(body={"weight": float("nan"), "contributes": True}), {"bad_body"}),
        ("negative weight", fx.push(body={"weight": -1.0}), {"bad_body"}),
        ("string weight", fx.push(body={"weight": "1"}), {"bad_body"}),
        ("inf tokens", fx.push(body={"tokens": float("inf")}), {"bad_body"}),
        ("negative tokens", fx.push(body={"tokens": -5}), {"bad_body"}),
        # once raised inside the next round's close and ended the coordinator
        ("weight past float32", fx.push(body={"weight": 1e39, "contributes": True}), {"bad_body"}),
        # once overflowed the mean to inf and wrote NaN into the global parameters
        ("weight near float32's max", fx.push(body={"weight": 3e38, "contributes": True}), {"bad_body"}),
        ("no session", fx.push(sid=""), {"session"}),
        ("a session never issued", fx.push(sid="1.2.0123456789abcdef0123456789abcdef"), {"session"}),
        ("seq 0", fx.push(seq=0), {"replay"}),
        ("contributes not a bool", fx.push(body={"contributes": "yes"}), {"bad_body"}),
        # garbage is refused as garbage even when it claims an old base version
        ("late and malformed", fx.push(with_(val_name, nan), base=fx.base - 1), {"nonfinite"}),
        ("base from the future", fx.push(base=fx.base + 7), {"bad_base"}),
        ("not for a coordinator", _sign(fx.header(type="result", body={}), [], SECRET), {"bad_type"}),
        ("unknown type", _sign(fx.header(type="teleport", body={}), [], SECRET), {"bad_header"}),
        (
            "unknown dtype",
            _sign(
                fx.header(tensors=[{"name": val_name, "dtype": "complex64", "shape": [2], "nbytes": 16}]),
                [b"x" * 16],
                SECRET,
            ),
            {"dtype"},
        ),
    ]
    # huge declared sizes: the frame is small, the descriptor claims terabytes
    for shape, nbytes in (([2**40], 2**42), ([2**20, 2**20, 2**20], 8), ([4], 2**62)):
        d = {"name": val_name, "dtype": "float32", "shape": shape, "nbytes": nbytes}
        cases.append((f"declared {shape}", _sign(fx.header(tensors=[d]), [b"\0" * 16], SECRET), {"shape"}))
    # more bytes in total than the coordinator accepts (each frame under libzmq's cap)
    half = fx.coord.limits.max_total_bytes // 2 + 1
    cases.append(("too big", [_sign(fx.header(), [], SECRET)[0], b"\0" * half, b"\0" * half], {"size"}))
    for what, frames, codes in cases:
        code = fx.expect_error(frames, codes)
        assert code in codes, what
    rejected = fx.coord.rejected
    assert rejected["not_member"] == 2 and rejected["bad_body"] == 8 and rejected["auth"] == 2
    # a replay, byte for byte, of a message the coordinator took (a heartbeat: it changes nothing)
    beat = _sign(fx.header(type="heartbeat", body={}), [], SECRET)
    assert fx.raw.ask(beat).type == wire.MsgType.ACK
    assert fx.expect_error(beat, {"replay"}) == "replay"
    # m0's session from another connection (a copy sent by someone on the path): refused
    other = _Raw(fx.raw.sock.context, fx.coord.address)  # type: ignore[arg-type]
    try:
        reply = other.ask(fx.push(body={"weight": 0.0, "contributes": True, "stop": False, "tokens": 128}))
        assert reply.type == wire.MsgType.ERROR and reply.body["code"] == "identity", reply.body
        fx.sent += 1
    finally:
        other.sock.close(0)
    # control: the unmutated push passes every check (sent with weight 0, so that the round it
    # closes commits nothing and the parameters stay put)
    reply = fx.raw.ask(fx.push(body={"weight": 0.0, "contributes": True, "stop": False, "tokens": 128}))
    assert reply.type == wire.MsgType.RESULT, reply.body
    assert reply.body["committed"] is False and reply.body["participants"] == 0 and reply.body["version"] == 0


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def _fuzz_bytes(fx: _Fixture, data: st.DataObject) -> None:
    # one fixed seq: the frames must not change length between examples (every mutation breaks
    # the HMAC, so the number is never spent)
    valid = fx.push(seq=2**40)
    kind = data.draw(st.sampled_from(["random", "truncate", "flip", "drop", "splice"]))
    if kind == "random":
        frames = data.draw(st.lists(st.binary(max_size=300), min_size=1, max_size=6))
    elif kind == "truncate":
        i = data.draw(st.integers(0, len(valid) - 1))
        cut = data.draw(st.integers(0, max(0, len(valid[i]) - 1)))
        frames = [*valid[:i], valid[i][:cut], *valid[i + 1 :]]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(valid) - 1))
        if not valid[i]:
            i = 0
        pos = data.draw(st.integers(0, len(valid[i]) - 1))
        x = data.draw(st.integers(1, 255))
        b = bytearray(valid[i])
        b[pos] ^= x
        frames = [*valid[:i], bytes(b), *valid[i + 1 :]]
    elif kind == "drop":
        i = data.draw(st.integers(0, len(valid) - 1))
        frames = valid[:i] + valid[i + 1 :] or [b""]
    else:  # the envelope of one message with the frames of a different, valid message
        other = fx.push({k: v + 1 if v.is_floating_point() else v for k, v in fx.tensors.items()}, seq=2**40)
        frames = [valid[0], *other[1:]]
    fx.expect_error(frames)


def test_hostile_fuzzed_bytes_never_pass(hostile: _Fixture) -> None:
    _fuzz_bytes(hostile)
    assert hostile.sent >= 150


def _valid_body(body: dict[str, Any]) -> bool:
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    w, tok = body.get("weight", 1.0), body.get("tokens", 0)
    return (
        number(w)
        and 0 <= w < float("inf")
        and isinstance(tok, int)
        and not isinstance(tok, bool)
        and tok >= 0
        and all(isinstance(body.get(k, True), bool) for k in ("contributes", "stop"))
    )


def _fresh(fx: _Fixture, seq: int) -> bool:
    """Whether m0's session would take this sequence number (asked of a copy of its window)."""
    window = copy.deepcopy(fx.coord.sessions._active["m0\0"].window)
    return window.accept(seq)


def _still_valid(fx: _Fixture, field_: str, value: Any) -> bool:
    """Whether a push with this header value would be accepted (so the fuzzer must not send it)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return (
        (field_ == "seq" and is_int and 0 <= value < 2**63 and _fresh(fx, value))
        or (field_ == "sid" and value == fx.sid)
        or (field_ == "base" and is_int and value >= -1)
        or (field_ == "v" and is_int and value == wire.PROTOCOL_VERSION)
        or (field_ == "worker" and value == "m0")
        or (field_ == "run" and value == fx.coord.run_id)
        or (field_ == "fp" and value == fx.coord.fingerprint)
        or (field_ == "type" and value == "push")
        or (field_ == "body" and isinstance(value, dict) and _valid_body(value))
    )


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    field_=st.sampled_from(["v", "type", "run", "worker", "sid", "seq", "base", "fp", "body", "tensors"]),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),
        st.dictionaries(
            st.sampled_from(["weight", "tokens", "contributes", "stop", "x"]),
            st.integers(-(2**63), 2**64 - 1),
            max_size=3,
        ),
    ),
)
def _fuzz_fields(fx: _Fixture, field_: str, value: Any) -> None:
    """A validly signed push with one header field replaced by junk."""
    assume(not _still_valid(fx, field_, value))
    frames = fx.push(**{field_: value})
    code = fx.expect_error(frames)
    if field_ == "v" and isinstance(value, int) and not isinstance(value, bool):
        assert code == "version"


def test_hostile_fuzzed_header_fields(hostile: _Fixture) -> None:
    _fuzz_fields(hostile)
    assert hostile.sent >= 60


# ==========================================================================================
# a coordinator restarted faster than request_timeout_s (threads)


@pytest.mark.timeout(60)
def test_fast_coordinator_restart_is_noticed(tmp_path: Path, corpus_dir: Path) -> None:
    """The old process took both pushes of round 1 and died; the new one is up before any
    heartbeat went unanswered. Workers notice by the `boot` id in its ACKs, re-join and re-push:
    nothing is lost. (Before the boot id, they waited for a RESULT that could never come.)"""
    cfg = _elastic_cfg(tmp_path, corpus_dir, workers=2, steps=12, membership={"request_timeout_s": 30.0})
    bind = f"tcp://127.0.0.1:{_free_port()}"
    old = _Gated(cfg, bind=bind, hold_at=1)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = _run_threads(_at(cfg, bind), ["w0", "w1"])
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    runner = threading.Thread(target=run, daemon=True)
    with _serving(old):
        runner.start()
        _wait_for("both pushes of round 1", lambda: status(bind, secret=None)["pending"] == ["w0", "w1"], 30)
    # `old` stopped: its pending pushes are gone with it (its checkpoint is at version 1)
    t0 = time.monotonic()
    new = Coordinator(cfg, bind=bind, resume=True)
    assert new.version == 1 and sorted(new.members) == ["w0", "w1"]
    with _serving(new):
        runner.join(timeout=25)
        elapsed = time.monotonic() - t0
        assert not runner.is_alive(), "workers still waiting on the dead coordinator's round"
        assert "error" not in out, out.get("error")
        final, version = tensor_digest(new.params), new.version
    print(f"\nfast restart: workers re-joined and finished {elapsed:.2f} s after the restart")
    assert elapsed < 10 < cfg.membership.request_timeout_s
    assert version == 3  # 12 steps / H=4: no round lost
    summaries, worlds = out["result"]
    assert all(w.outer.anchor.digest() == final for w in worlds)
    assert all(s["rounds_committed"] == 3 for s in summaries)


# ==========================================================================================
# 3. SIGKILL a worker process mid-run


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_a_worker_the_others_go_on(tmp_path: Path, corpus_dir: Path) -> None:
    """Three `dilo worker` processes; w2 is SIGKILLed after a round with all three. The coordinator
    serves from a thread here so that the test can hold rounds: the first until all three pushed
    (process start-up varies by seconds, the whole run takes one), and one after w2 is gone,
    while `dilo status --json` is asked who is left."""
    toml = str(_write_config(tmp_path, corpus_dir, steps=120, h=10, workers=3))
    from dilo.config import load

    coord = _Gated(load(toml), bind="tcp://127.0.0.1:0", hold_at=0)
    addr = coord.address
    with _serving(coord), _reaped([]) as procs:
        workers = {
            w: _spawn(["worker", toml, "--id", w, f"--membership.address={addr}"], tmp_path, w)
            for w in ("w0", "w1", "w2")
        }
        procs.extend(workers.values())
        _wait_for(
            "three pushes in round 0", lambda: status(addr, secret=None)["pending"] == ["w0", "w1", "w2"], 90, procs
        )
        coord.gate.set()
        _wait_for("the first round", lambda: len(_records(_log(tmp_path, "w0"))) >= 1, 30, procs)
        seen = len(_records(_log(tmp_path, "w0")))
        os.kill(workers["w2"].pid, signal.SIGKILL)
        workers["w2"].wait(timeout=10)
        survivors = [workers["w0"], workers["w1"]]

        def gone() -> bool:
            return "w2" not in [m["worker"] for m in status(addr, secret=None)["members"]]

        detect_s = _wait_for("w2 to leave the view", gone, 30, survivors)
        # let one more round close (the one without w2, if it has not yet), hold the next and ask
        # the CLI who is in the view
        coord.hold_at = coord.version + 1
        coord.gate.clear()
        close_s = detect_s + _wait_for(
            "a round without w2",
            lambda: any(r["participants"] == 2 for r in _records(_log(tmp_path, "w0"))[seen:]),
            30,
            survivors,
        )
        _wait_for(
            "the survivors' next pushes", lambda: status(addr, secret=None)["pending"] == ["w0", "w1"], 30, survivors
        )
        cli = [sys.executable, "-m", "dilo.cli", "status", addr, "--json"]
        shown = subprocess.run(cli, env=_env(DILO_LOG="WARNING"), capture_output=True, text=True, timeout=60)
        coord.gate.set()
        _wait_ok(workers["w0"], 60)
        _wait_ok(workers["w1"], 60)
        final = tensor_digest(coord.params)
        version = coord.version
    print(f"\nworker SIGKILL: out of the view after {detect_s:.2f} s, round closed without it after {close_s:.2f} s")
    assert detect_s < 6  # heartbeat_timeout_s = 2, heartbeats every 0.2 s
    assert shown.returncode == 0, shown.stderr
    st_ = json.loads(shown.stdout)
    assert [m["worker"] for m in st_["members"]] == ["w0", "w1"] and st_["pending"] == ["w0", "w1"]
    assert st_["epoch"] == 4  # three joins and one leave
    recs = [_records(_log(tmp_path, w)) for w in ("w0", "w1")]
    assert [r["anchor_hash"] for r in recs[0]] == [r["anchor_hash"] for r in recs[1]]
    for rs in recs:
        assert len(rs) == 12 and all(r["committed"] for r in rs) and rs[-1]["anchor_hash"] == final
        parts = [r["participants"] for r in rs]
        # three until the round w2 died in, then two to the end
        assert parts[0] == 3 and parts[-1] == 2 and parts == sorted(parts, reverse=True) and set(parts) == {2, 3}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_committed"] == 12 and summary["steps"] == 120
    assert version == 12


# ==========================================================================================
# 4. a worker joins mid-run


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_worker_joins_mid_run_with_the_coordinators_state(tmp_path: Path, corpus_dir: Path) -> None:
    toml = _write_config(tmp_path, corpus_dir, steps=60, h=10, workers=3)
    from dilo.config import load

    # round 0 waits for both first workers (start-up times vary); rounds stop closing again at
    # version 2 until the joiner is in, so that it joins while a round is in progress
    coord = _Gated(load(str(toml)), bind="tcp://127.0.0.1:0", hold_at=0)
    addr = coord.address
    with _serving(coord), _reaped([]) as procs:
        for w in ("w0", "w1"):
            procs.append(_spawn(["worker", str(toml), "--id", w, f"--membership.address={addr}"], tmp_path, w))
        _wait_for("round 0", lambda: status(addr, secret=None)["pending"] == ["w0", "w1"], 90, procs)
        coord.hold_at = 2
        _wait_for("round 2 in progress", lambda: status(addr, secret=None)["pending"] == ["w0", "w1"], 90, procs)
        joiner = _spawn(["worker", str(toml), "--id", "w2", f"--membership.address={addr}"], tmp_path, "w2")
        procs.append(joiner)
        _wait_for("the joiner's WELCOME", lambda: "worker w2 joined at version" in _tail(joiner), 90, procs)
        # handed the one step round 2 has left, the joiner pushes into it
        pending = ["w0", "w1", "w2"]
        _wait_for("the joiner's push", lambda: status(addr, secret=None)["pending"] == pending, 90, procs)
        coord.gate.set()
        for p in procs:
            _wait_ok(p, 60)
        hashes = dict(coord.hashes)
    line = next(x for x in _tail(joiner, 100_000).splitlines() if "worker w2 joined at version" in x)
    version = int(line.split("joined at version ")[1].split(",")[0])
    anchor = line.split("anchor ")[1].split(",")[0]
    print(f"\njoiner: joined at version {version} with anchor {anchor}")
    assert version == 2 and anchor == hashes[2]
    # every anchor any worker logged is the coordinator's at some version: nobody ever diverged
    for w in ("w0", "w1", "w2"):
        recs = _records(_log(tmp_path, w))
        assert len(recs) == (6 if w != "w2" else 7) and recs[-1]["step"] == 60
        assert all(r["anchor_hash"] in hashes.values() for r in recs), w
    first = [r["participants"] for r in _records(_log(tmp_path, "w0"))]
    assert first[:2] == [2, 2] and 3 in first
    # the joiner was handed what round 2 had left (the others had already pushed: one step), so its
    # first round counted instead of arriving late
    joined = _records(_log(tmp_path, "w2"))
    assert joined[0]["step"] < 10 and joined[0]["committed"] and joined[0]["participants"] == 3
    assert _records(_log(tmp_path, "w2"), "start")[0]["step"] == 0


# ==========================================================================================
# 5. SIGKILL the coordinator, restart it with --resume


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_coordinator_sigkill_and_resume(tmp_path: Path, corpus_dir: Path) -> None:
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    run = tmp_path / "run"
    run.mkdir()
    toml = str(_write_config(run, corpus_dir, steps=120, h=10, port=port, workers=2))
    with _reaped([]) as procs:
        coord = _spawn(["coordinator", toml], run, "coordinator")
        procs.append(coord)
        _wait_for("the coordinator", lambda: "listening on" in _tail(coord), 60, procs)
        # a start line for both workers (start-up times vary by seconds, the run takes about one):
        # the coordinator is paused until both sent their JOIN, which then waits in its socket
        os.kill(coord.pid, signal.SIGSTOP)
        workers = [_spawn(["worker", toml, "--id", w], run, w) for w in ("w0", "w1")]
        procs.extend(workers)
        _wait_for("both JOINs", lambda: all("joining the coordinator" in _tail(w) for w in workers), 60, workers)
        os.kill(coord.pid, signal.SIGCONT)
        _wait_for(
            "a round with both workers",
            lambda: any(r["participants"] == 2 for w in ("w0", "w1") for r in _records(_log(run, w))),
            90,
            procs,
        )
        os.kill(coord.pid, signal.SIGKILL)
        coord.wait(timeout=10)
        rounds_at_kill = len(_records(_log(run, "w0")))
        coord2 = _spawn(["coordinator", toml, "--resume"], run, "coordinator2")
        procs.append(coord2)
        ready_s = _wait_for(
            "the restarted coordinator", lambda: "listening on" in _tail(coord2), 60, [coord2, *workers]
        )
        resumed_at = int(_tail(coord2).split("dilo coordinator: run 'elastic' at version ")[1].split(",")[0])
        t_ready = time.monotonic()
        _wait_for("a round after the restart", lambda: len(_records(_log(run, "w0"))) > rounds_at_kill, 60, [coord2])
        rejoin_s = time.monotonic() - t_ready
        for w in workers:
            _wait_ok(w, 90)
        final_version = status(addr, secret=None)["version"]
        _stop_coordinator(coord2)
    print(
        f"\ncoordinator SIGKILL after {rounds_at_kill} rounds: restarted (process up) after {ready_s:.2f} s at "
        f"version {resumed_at}; first round after the restart {rejoin_s:.2f} s later; final version {final_version}"
    )
    # the newest version the killed coordinator logged (after sending its RESULTs)
    closed = [line for line in _tail(coord, 100_000).splitlines() if "closed:" in line]
    killed_at = int(closed[-1].rsplit("version ", 1)[1]) if closed else 0
    print(f"the killed coordinator had reached version {killed_at}")
    # checkpoints are written behind the next round: at most the version being written is lost
    assert resumed_at >= killed_at - 1
    assert final_version >= 12 - 2  # the round in progress, and at most that version
    recs = [_records(_log(run, w)) for w in ("w0", "w1")]
    rounds = [[(x["step"], x["inner_steps"], x["reason"]) for x in r] for r in recs]
    for r in recs:
        # every worker trains its 120 steps and loses at most the round the crash cut; a worker
        # that lost it re-joins the round in progress (the coordinator hands it the steps left),
        # so shorter rounds follow a failed one until it is back in step (the last round may be
        # shorter too); rounds before the crash and after the catch-up are whole
        assert r[-1]["step"] == 120, rounds
        assert sum(x["reason"] == "round lost" for x in r) <= 1, rounds
        for prev, x in zip(r, r[1:-1]):
            behind = prev["reason"] or prev["inner_steps"] < 10
            assert x["inner_steps"] == 10 or behind, rounds
        assert r[0]["inner_steps"] == 10, rounds
    ckpt = run / "coordinator"
    final = tensor_digest(load_worker_state(ckpt, rounds_of(ckpt, "coordinator")[-1], "coordinator")["params"])
    # whoever finished last holds the final state; the other's last state is one it went through
    left = [line.split("worker ")[1].split()[0] for line in _tail(coord2, 100_000).splitlines() if " left (" in line]
    first, last = (recs[0], recs[1]) if left[0] == "w0" else (recs[1], recs[0])
    assert last[-1]["anchor_hash"] == final
    assert first[-1]["anchor_hash"] in {r["anchor_hash"] for r in last}
    val = json.loads((run / "summary.json").read_text())["val_loss"]

    # the same run without the crash (threads: the same algorithm, islands and seeds)
    from dilo.config import load

    cfg = load(toml, [f"--out_dir={tmp_path / 'ref'}"])
    ref_coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with _serving(ref_coord):
        ref, _ = _run_threads(_at(cfg, ref_coord.address), ["w0", "w1"])
    print(f"final validation loss {val:.4f}, uninterrupted {ref[0]['val_loss']:.4f}")
    assert abs(val - ref[0]["val_loss"]) < 0.1 * ref[0]["val_loss"]


# ==========================================================================================
# 6. wrong secret, missing secret, mismatched config


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_workers_with_the_wrong_secret_or_config_are_refused(tmp_path: Path, corpus_dir: Path) -> None:
    toml = str(_write_config(tmp_path, corpus_dir, steps=8, h=4, workers=2))
    from dilo.config import load

    cfg = load(toml)
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-coordinators-secret-0123")
    with (
        _serving(Coordinator(cfg, bind="tcp://127.0.0.1:0", secret=SECRET)) as guarded,
        _serving(Coordinator(cfg, bind="tcp://127.0.0.1:0")) as open_,
        _reaped([]) as procs,
    ):
        right = _env(DILO_SECRET=SECRET.decode())
        cases = {
            # name: (coordinator, extra args, env, words the error must contain)
            "wrong-secret": (guarded, [f"--membership.secret_file={wrong}"], _env(), ["authentication", "secret"]),
            "no-secret": (guarded, [], _env(), ["authentication", "requires a secret and this worker has none"]),
            "other-config": (guarded, ["--outer.lr=0.5"], right, ["configuration mismatch", "config"]),
            "unexpected-secret": (open_, [], right, ["authentication", "secret"]),
        }
        for name, (c, extra, env, _) in cases.items():
            args = ["worker", toml, "--id", name, f"--membership.address={c.address}", *extra]
            procs.append(_spawn(args, tmp_path, name, env))
        for p, (name, (_, _, _, words)) in zip(procs, cases.items()):
            p.wait(timeout=90)
            err = _tail(p)
            assert p.returncode == 2, f"{name}: exit {p.returncode}\n{err}"
            last = err.strip().splitlines()[-1]
            assert last.startswith("dilo: error: worker"), f"{name}: {last}"
            assert all(w in last for w in words), f"{name}: {last}"
            print(f"\n{name}: {last}")
        assert not guarded.members and not open_.members  # nobody got in
        assert guarded.rejected["auth"] >= 2 and guarded.rejected["config"] >= 1 and open_.rejected["auth"] >= 1


# ==========================================================================================
# 7. dilo status


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_dilo_status_shows_members_version_bytes_and_rejections(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _elastic_cfg(tmp_path, corpus_dir)
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET)
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0", secret=SECRET)
    mb = 1 << 24
    with _serving(coord):
        clients = [
            StarClient(
                _at(cfg, coord.address).membership,
                w,
                run=cfg.name,
                fingerprint=cfg.fingerprint(),
                secret=SECRET,
                max_message_bytes=mb,
            )
            for w in ("c0", "c1")
        ]
        try:
            for c in clients:
                c.join()
            bad = StarClient(
                _at(cfg, coord.address).membership,
                "c9",
                run="other",
                fingerprint="x",
                secret=SECRET,
                max_message_bytes=mb,
            )
            with pytest.raises(DiloError, match="run name mismatch"):
                bad.join()
            bad.close()
            cli = [sys.executable, "-m", "dilo.cli", "status", coord.address, "--secret-file", str(secret_file)]
            env = _env(DILO_LOG="WARNING")
            text = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
            as_json = subprocess.run([*cli, "--json"], env=env, capture_output=True, text=True, timeout=60)
            refused = subprocess.run(cli[:5], env=env, capture_output=True, text=True, timeout=60)
        finally:
            for c in clients:
                c.leave()
                c.close()
    assert text.returncode == 0, text.stderr
    print("\n" + text.stdout)
    out = text.stdout
    assert "run test: version 0, round 0" in out and "2 members" in out
    assert "rejected messages: {'run': 1}" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("c0", "c1"))]
    assert [r[0] for r in rows] == ["c0", "c1"] and all(int(r[-2].replace(",", "")) > 0 for r in rows)
    st_ = json.loads(as_json.stdout)
    assert [m["worker"] for m in st_["members"]] == ["c0", "c1"]
    assert st_["version"] == 0 and st_["rejected"] == {"run": 1}
    assert st_["bytes_in"] > 0 and st_["bytes_out"] > st_["bytes_in"]  # two WELCOMEs carry the parameters
    assert all(m["bytes_out"] > 0 and m["last_seen_s"] < 5 for m in st_["members"])
    assert refused.returncode == 2 and "--secret-file" in refused.stderr, refused.stderr
