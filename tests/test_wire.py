"""The wire protocol: round trips, every validation failure as a WireError, MACs, caps, CURVE keys."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dilo import keys
from dilo.errors import ConfigError, ProtocolError
from dilo.wire import (
    DTYPES,
    PROTOCOL_VERSION,
    Limits,
    Message,
    MsgType,
    WireError,
    check_finite,
    check_shapes,
    decode,
    encode,
    load_secret,
)

SECRET = b"0123456789abcdef-test-secret"
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "i8": torch.randint(-128, 128, (2, 3), dtype=torch.int8, generator=g),
        "packed": torch.randint(0, 256, (7,), dtype=torch.uint8, generator=g),  # e.g. two int4 per byte
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "mask": torch.tensor([True, False, True]),
        "f16": torch.randn(2, 2, generator=g).half(),
        "f64": torch.randn(3, generator=g).double(),
        "i16": torch.arange(4, dtype=torch.int16),
        "i32": torch.arange(4, dtype=torch.int32),
        "i64": torch.arange(4, dtype=torch.int64),
    }


def sample(tensors: bool = True, **kw: Any) -> Message:
    fields: dict[str, Any] = {
        "body": {"steps": 500, "loss": 2.25, "tags": ["a", None, True], "nested": {"x": b"\x00\x01"}},
        "seq": 7,
        "base": 3,
        "run": "run-1",
        "fp": "abc123",
        **kw,
    }
    return Message(MsgType.PUSH, "w0", tensors=sample_tensors() if tensors else {}, **fields)


def assert_same(a: Message, b: Message) -> None:
    assert (a.type, a.worker, a.body, a.seq, a.base, a.run, a.fp) == (
        b.type,
        b.worker,
        b.body,
        b.seq,
        b.base,
        b.run,
        b.fp,
    )
    assert list(a.tensors) == list(b.tensors)
    for name, t in a.tensors.items():
        u = b.tensors[name]
        assert (u.dtype, u.shape) == (t.dtype, t.shape), name
        assert torch.equal(u, t), name


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(WireError) as info:
        fn()
    assert isinstance(info.value, ProtocolError)
    assert info.value.code != "bad_message", f"decode hit an unexpected exception: {info.value}"
    return info.value.code


def rewrite(frames: list[Any], fn: Callable[[dict[str, Any]], None], secret: bytes | None = None) -> list[Any]:
    """Edit the header map of an encoded message, re-signing it when a secret is given."""
    header_bytes, _ = msgpack.unpackb(bytes(frames[0]))
    raw = msgpack.unpackb(header_bytes)
    fn(raw)
    header_bytes = msgpack.packb(raw, use_bin_type=True)
    mac = None
    if secret is not None:  # the MAC as the protocol defines it: keyed BLAKE3, key derived from the secret
        import blake3

        key = blake3.blake3(secret, derive_key_context="dilo wire 2026-12 message authentication").digest()
        h = blake3.blake3(header_bytes, key=key)
        for f in frames[1:]:
            h.update(f)
        mac = h.digest()
    return [msgpack.packb([header_bytes, mac], use_bin_type=True), *frames[1:]]


# ---------------------------------------------------------------- round trips


@pytest.mark.filterwarnings("error")  # e.g. torch's warning about tensors over read-only buffers
@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "hmac"])
@pytest.mark.parametrize("with_tensors", [False, True], ids=["bare", "tensors"])
@pytest.mark.parametrize("mtype", list(MsgType), ids=lambda t: t.value)
def test_round_trip_every_type(mtype: MsgType, with_tensors: bool, secret: bytes | None) -> None:
    msg = sample(with_tensors)
    msg.type = mtype
    frames = encode(msg, secret)
    assert len(frames) == 1 + len(msg.tensors)
    assert_same(msg, decode(frames, secret=secret, expect_run="run-1", expect_fp="abc123"))
    # bytes frames are read-only: decode copies them, so the tensors are still safe to write
    out = decode([bytes(f) for f in frames], secret=secret)
    assert_same(msg, out)
    for t in out.tensors.values():
        t.zero_()


def test_encode_is_zero_copy() -> None:
    t = torch.arange(1024, dtype=torch.float32)
    frames = encode(Message(MsgType.STATE, "c", tensors={"p": t}))
    assert isinstance(frames[1], memoryview)
    t[0] = 42.0  # same memory: the frame sees the write
    assert torch.frombuffer(bytearray(frames[1][:4]), dtype=torch.float32).item() == 42.0


def test_encode_rejects_bad_input() -> None:
    assert code_of(
        lambda: encode(Message(MsgType.PUSH, "w", tensors={"c": torch.zeros(2, dtype=torch.complex64)}))
    ) == ("dtype")
    assert code_of(lambda: encode(Message(MsgType.PUSH, "w", body={"x": object()}))) == "bad_header"
    assert code_of(lambda: encode(Message(MsgType.PUSH, "w", seq=-1))) == "bad_header"
    assert Message("join", "w").type is MsgType.JOIN  # type: ignore[arg-type]


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


def dealer_router(
    ctx: zmq.Context[zmq.Socket[bytes]],
    setup_router: Callable[[zmq.Socket[bytes]], None] = lambda s: None,
    setup_dealer: Callable[[zmq.Socket[bytes]], None] = lambda s: None,
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.linger = 0
    setup_router(router)
    setup_dealer(dealer)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return router, dealer


def exchange(
    router: zmq.Socket[bytes], dealer: zmq.Socket[bytes], secret: bytes | None, timeout_ms: int = 5000
) -> None:
    big = torch.randn(256, 1024)  # 1 MiB: above pyzmq's copy threshold, so really zero-copy
    push = sample(tensors=True)
    push.tensors["big"] = big
    dealer.send_multipart(encode(push, secret), copy=False)
    assert router.poll(timeout_ms), "no message reached the router"
    ident, *frames = router.recv_multipart(copy=False)
    got = decode(frames, secret=secret, expect_run="run-1", expect_fp="abc123")
    assert_same(push, got)
    # received without a copy: the tensor lives in the zmq frame
    assert got.tensors["big"].data_ptr() == torch.frombuffer(frames[-1].buffer, dtype=torch.uint8).data_ptr()
    reply = Message(MsgType.RESULT, "coord", body={"next_h": 500}, tensors={"p": got.tensors["big"] * 2}, run="run-1")
    router.send_multipart([ident, *encode(reply, secret)], copy=False)
    assert dealer.poll(timeout_ms), "no reply reached the dealer"
    assert_same(reply, decode(dealer.recv_multipart(copy=False), secret=secret))


@pytest.mark.parametrize("secret", [None, SECRET], ids=["plain", "hmac"])
def test_dealer_router_zero_copy(ctx: zmq.Context[zmq.Socket[bytes]], secret: bytes | None) -> None:
    exchange(*dealer_router(ctx), secret)


# ---------------------------------------------------------------- specific failures


def test_hmac_failures() -> None:
    frames = encode(sample(), SECRET)
    with pytest.raises(WireError, match="bad MAC: wrong secret") as e:
        decode(frames, secret=b"another-secret-of-16+bytes")
    assert e.value.code == "auth"
    with pytest.raises(WireError, match="set DILO_SECRET or membership.secret_file") as e:
        decode(encode(sample()), secret=SECRET)
    assert e.value.code == "auth"
    with pytest.raises(WireError, match="authenticated but no secret is configured") as e:
        decode(frames)
    assert e.value.code == "auth"
    # any tensor byte flipped after signing
    tampered = [*frames[:1], bytearray(frames[1]), *frames[2:]]
    tampered[1][0] ^= 1
    assert code_of(lambda: decode(tampered, secret=SECRET)) == "auth"


def test_version_run_fp_messages() -> None:
    frames = encode(sample())
    with pytest.raises(WireError, match=f"protocol version 99, expected {PROTOCOL_VERSION}"):
        decode(rewrite(frames, lambda h: h.update(v=99)))
    with pytest.raises(WireError, match="'run-1'.*'other'") as e:
        decode(frames, expect_run="other")
    assert e.value.code == "run"
    with pytest.raises(WireError, match="'abc123'.*'zzz'.*configs differ") as e:
        decode(frames, expect_fp="zzz")
    assert e.value.code == "config"
    with pytest.raises(WireError, match="seq") as e:
        decode(rewrite(frames, lambda h: h.update(seq="7")))
    assert e.value.code == "bad_header"
    assert code_of(lambda: decode(rewrite(frames, lambda h: h.update(extra=1)))) == "bad_header"
    dup = rewrite(frames, lambda h: h["tensors"].__setitem__(1, {**h["tensors"][0]}))
    assert code_of(lambda: decode(dup)) == "bad_header"


def test_bool_bytes_must_be_zero_or_one() -> None:
    frames = encode(Message(MsgType.PUSH, "w", tensors={"mask": torch.tensor([True, False])}))
    assert code_of(lambda: decode([frames[0], b"\x01\x02"])) == "dtype"


def test_limits_checked_before_parsing() -> None:
    # The header frame is garbage: only the size check can have produced "size".
    big = memoryview(bytearray(100 * 2**20))
    assert code_of(lambda: decode([b"\xc1garbage", big], limits=Limits(max_frame_bytes=2**20))) == "size"
    assert code_of(lambda: decode([b"\xc1" * 100], limits=Limits(max_header_bytes=50))) == "size"
    assert code_of(lambda: decode([b"\xc1", b"x" * 60, b"y" * 60], limits=Limits(max_total_bytes=100))) == "size"
    assert code_of(lambda: decode([b"\xc1"] * 6, limits=Limits(max_frames=4))) == "size"
    assert code_of(lambda: decode([])) == "frames"


def test_check_finite_and_shapes() -> None:
    msg = sample()
    check_finite(msg)
    check_shapes(msg, {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in msg.tensors.items()})
    msg.tensors["bf16"][2] = float("inf")
    with pytest.raises(WireError, match="'bf16'") as e:
        check_finite(msg)
    assert e.value.code == "nonfinite"
    with pytest.raises(WireError, match=r"'p'.*expected \(2,\) float32, got \(3,\) float32"):
        check_shapes(Message(MsgType.PUSH, "w", tensors={"p": torch.zeros(3)}), {"p": ((2,), "float32")})
    with pytest.raises(WireError, match="float32, got .* bfloat16"):
        check_shapes(Message(MsgType.PUSH, "w", tensors={"p": torch.zeros(2).bfloat16()}), {"p": ((2,), "float32")})
    with pytest.raises(WireError, match="missing"):
        check_shapes(Message(MsgType.PUSH, "w"), {"p": ((2,), "float32")})
    with pytest.raises(WireError, match="unexpected tensors"):
        check_shapes(
            Message(MsgType.PUSH, "w", tensors={"p": torch.zeros(2), "q": torch.zeros(1)}), {"p": ((2,), "float32")}
        )


def test_error_pickles() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(WireError("auth", "bad MAC: wrong secret?")))
    assert (e.code, e.message, str(e)) == ("auth", "bad MAC: wrong secret?", "bad MAC: wrong secret?")


# ---------------------------------------------------------------- fuzzing


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_fuzz_random_frames(frames: list[bytes]) -> None:
    code_of(lambda: decode(frames))


@FUZZ
@given(st.data())
def test_fuzz_truncated_header(data: st.DataObject) -> None:
    frames = encode(sample(), SECRET)
    cut = data.draw(st.integers(0, len(frames[0]) - 1))
    assert code_of(lambda: decode([frames[0][:cut], *frames[1:]], secret=SECRET)) == "bad_header"


@FUZZ
@given(st.data())
def test_fuzz_flipped_envelope_byte(data: st.DataObject) -> None:
    """With a secret, no single corrupted envelope byte gets through."""
    frames = encode(sample(), SECRET)
    env = bytearray(frames[0])
    at = data.draw(st.integers(0, len(env) - 1))
    env[at] ^= data.draw(st.integers(1, 255))
    assert code_of(lambda: decode([env, *frames[1:]], secret=SECRET)) in (
        "auth",
        "bad_header",
        "version",
        "dtype",
        "shape",
    )


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def pack_header(raw: Any, mac: Any = None) -> bytes:
    return msgpack.packb([msgpack.packb(raw, use_bin_type=True), mac], use_bin_type=True)


@FUZZ
@given(st.dictionaries(st.text(max_size=8), plain, max_size=8) | plain)
def test_fuzz_random_maps(raw: Any) -> None:
    assert code_of(lambda: decode([pack_header(raw)])) in ("bad_header", "version")


@FUZZ
@given(
    st.fixed_dictionaries(
        {k: plain for k in ("v", "type", "run", "worker", "seq", "base", "fp", "body", "tensors")},
        optional={"extra": plain},
    )
)
def test_fuzz_header_fields(raw: dict[str, Any]) -> None:
    """Random values under the real keys: either a valid bare message or a WireError."""
    try:
        msg = decode([pack_header(raw)])
    except WireError as e:
        assert e.code in ("bad_header", "version", "dtype", "shape", "frames")
    else:
        assert msg.worker == raw["worker"] and msg.tensors == {}


MUTATIONS = ("grow", "shrink", "drop", "extra", "dtype", "bad_dtype", "shape", "neg_shape", "huge", "version", "run")
NAMES = list(sample_tensors())


@FUZZ
@given(st.sampled_from(MUTATIONS), st.sampled_from(NAMES), st.booleans())
def test_fuzz_mutated_valid_message(kind: str, name: str, signed: bool) -> None:
    """Each mutation of a valid message fails with the code that names it (re-signed, so it
    passes the MAC, except frame edits, which the MAC catches first)."""
    secret = SECRET if signed else None
    frames = [bytes(x) for x in encode(sample(), secret)]
    i = NAMES.index(name)
    empty = sample_tensors()[name].numel() == 0

    def edit(fn: Callable[[dict[str, Any]], object]) -> list[Any]:
        return rewrite(frames, fn, secret)

    def desc(h: dict[str, Any]) -> dict[str, Any]:
        d: dict[str, Any] = h["tensors"][i]
        return d

    if kind == "grow":
        frames[1 + i] += b"\x00" * 8
        bad, code = frames, "auth" if signed else "shape"
    elif kind == "shrink":
        frames[1 + i] = frames[1 + i][:-1] if frames[1 + i] else b"\x00"
        bad, code = frames, "auth" if signed else "shape"
    elif kind == "drop":
        bad, code = rewrite(frames[:-1], lambda h: None, secret), "frames"
    elif kind == "extra":
        bad, code = rewrite([*frames, b"\x00" * 4], lambda h: None, secret), "frames"
    elif kind == "dtype":  # another itemsize: the frame no longer matches, unless it is empty
        new = "int8" if sample_tensors()[name].element_size() > 1 else "float64"
        bad, code = edit(lambda h: desc(h).update(dtype=new)), None if empty else "shape"
    elif kind == "bad_dtype":
        bad, code = edit(lambda h: desc(h).update(dtype="complex64")), "dtype"
    elif kind == "shape":  # one more dim of 9: nine times the bytes, unless it is empty
        bad, code = edit(lambda h: desc(h).update(shape=[*desc(h)["shape"], 9])), None if empty else "shape"
    elif kind == "neg_shape":
        bad, code = edit(lambda h: desc(h).update(shape=[*desc(h)["shape"], -1])), "shape"
    elif kind == "huge":
        bad, code = edit(lambda h: desc(h).update(shape=[2**40, 2**20], nbytes=2**62)), "shape"
    elif kind == "version":
        bad, code = edit(lambda h: h.update(v=PROTOCOL_VERSION + 1)), "version"
    else:
        bad, code = edit(lambda h: h.update(run="other")), "run"
    if code is None:
        decode(bad, secret=secret, expect_run="run-1", expect_fp="abc123")
    else:
        assert code_of(lambda: decode(bad, secret=secret, expect_run="run-1", expect_fp="abc123")) == code


@FUZZ
@given(st.lists(st.floats(width=32), min_size=1, max_size=20), st.sampled_from(["float32", "bfloat16", "float16"]))
def test_fuzz_check_finite(values: list[float], dtype: str) -> None:
    t = torch.tensor(values, dtype=torch.float32).to(DTYPES[dtype])
    msg = decode(encode(Message(MsgType.PUSH, "w", tensors={"delta": t})))
    if bool(torch.isfinite(t).all()):
        check_finite(msg)
    else:
        with pytest.raises(WireError, match="'delta'") as e:
            check_finite(msg)
        assert e.value.code == "nonfinite"


@FUZZ
@given(st.integers(0, 40))
def test_fuzz_too_many_frames(extra: int) -> None:
    frames = encode(sample()) + [b"\x00"] * extra
    limits = Limits(max_frames=len(sample().tensors) + 20)
    code = code_of(lambda: decode(frames, limits=limits)) if extra else None
    if extra > 20:
        assert code == "size"
    elif extra:
        assert code == "frames"


# ---------------------------------------------------------------- secrets and keys


def test_load_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DILO_SECRET", raising=False)
    assert load_secret() is None
    monkeypatch.setenv("DILO_SECRET", "s" * 16)
    assert load_secret() == b"s" * 16
    f = tmp_path / "secret"
    f.write_text("  from-the-file-0123456789 \n")
    assert load_secret(file=str(f)) == b"from-the-file-0123456789"  # the file wins over the env var
    monkeypatch.setenv("DILO_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret()
    monkeypatch.setenv("DILO_SECRET", "")
    with pytest.raises(ConfigError, match="empty"):
        load_secret()
    f.write_text("\n")
    with pytest.raises(ConfigError, match=f"{f}.*empty"):
        load_secret(file=str(f))
    with pytest.raises(ConfigError, match="missing"):
        load_secret(file=str(tmp_path / "missing"))


def test_keys_generate_and_load(tmp_path: Path) -> None:
    if not keys.curve_available():
        pytest.skip("libzmq built without CURVE")
    server_key, client_key = keys.generate(tmp_path / "k")
    assert (server_key.name, client_key.name) == ("server.key", "client.key")
    public, secret = keys.load_pair(server_key)
    assert keys.load_public(tmp_path / "k" / "server.pub") == public
    assert zmq.curve_public(secret) == public
    assert stat.S_IMODE(os.stat(server_key).st_mode) == 0o600
    with pytest.raises(ConfigError, match="server.key exists"):
        keys.generate(tmp_path / "k")
    keys.generate(tmp_path / "k", overwrite=True)
    assert keys.load_pair(server_key) != (public, secret)
    with pytest.raises(ConfigError, match="expected 2"):
        keys.load_pair(tmp_path / "k" / "server.pub")
    with pytest.raises(ConfigError, match="expected 1"):
        keys.load_public(server_key)
    with pytest.raises(ConfigError, match="nope"):
        keys.load_pair(tmp_path / "nope")
    (tmp_path / "junk").write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a dilo key file"):
        keys.load_public(tmp_path / "junk")


def test_curve_exchange(tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    if not keys.curve_available():
        pytest.skip("libzmq built without CURVE")
    keys.generate(tmp_path)
    router, dealer = dealer_router(
        ctx,
        lambda s: keys.apply_server(s, tmp_path / "server.key"),
        lambda s: keys.apply_client(s, tmp_path / "client.key", tmp_path / "server.pub"),
    )
    exchange(router, dealer, SECRET)


def test_curve_wrong_server_key_gets_nothing(tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    if not keys.curve_available():
        pytest.skip("libzmq built without CURVE")
    keys.generate(tmp_path / "a")
    keys.generate(tmp_path / "b")
    router, dealer = dealer_router(
        ctx,
        lambda s: keys.apply_server(s, tmp_path / "a" / "server.key"),
        lambda s: keys.apply_client(s, tmp_path / "a" / "client.key", tmp_path / "b" / "server.pub"),
    )
    dealer.send_multipart(encode(Message(MsgType.HEARTBEAT, "w0")))
    assert router.poll(300) == 0, "the handshake must fail, so nothing reaches the server"
    assert dealer.poll(300) == 0
