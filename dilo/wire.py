"""The dilo ZeroMQ wire protocol: one message is a multipart frame list `[envelope, *tensors]`.

The envelope is `msgpack([header_bytes, mac])`: `header_bytes` is a packed msgpack map that a
pydantic `Header` validates (version, type, run, worker, seq, base version, config fingerprint,
a type-specific body and one descriptor per tensor), and `mac` is a keyed BLAKE3 MAC over
`header_bytes` followed by every tensor frame, or nil when no secret is configured (the key is
derived from the secret with BLAKE3's key derivation; keyed BLAKE3 is a PRF, and hashes at about
3 GB/s per core against HMAC-SHA256's 1 GB/s, so a joiner's state is not held up by its MAC). Signing the
packed bytes, not a re-packed map, means sender and receiver never disagree on a canonical form.
Tensor frames are the raw bytes of each tensor, sent and received without copies.

    frames = encode(Message(MsgType.PUSH, "w0", body={"steps": 500}, tensors={"delta": d}), secret)
    sock.send_multipart(frames, copy=False)
    msg = decode(sock.recv_multipart(copy=False), secret=secret, expect_run=run, expect_fp=fp)
    check_shapes(msg, {"delta": ((n,), "float32")}); check_finite(msg)

`decode` raises only `WireError` (a `ProtocolError` with a short `code`) whatever the bytes, so
a coordinator can answer any bad message with `ERROR(code, message)` and keep running. Size
caps are checked before anything is parsed; set `sock.maxmsgsize` as well so libzmq drops an
oversized frame before it is even allocated.

Zero-copy sends keep a reference to the tensors' memory until libzmq has written them: do not
modify a sent tensor in place until the send completed (or send a clone), or the peer receives
torn data and a bad MAC.
"""

from __future__ import annotations

import hmac
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import blake3
import msgpack  # untyped: ignore_missing_imports in pyproject.toml
import torch
import zmq
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dilo.errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 3
"""2: sessions (the `sid` header field, HELLO / CHALLENGE; dilo/session.py). 3: keyed BLAKE3 MACs."""
_KEY_CONTEXT = "dilo wire 2026-12 message authentication"

_DTYPE_LIST = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in _DTYPE_LIST}
"""The dtypes a tensor frame may have, by wire name."""
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_NDIM = 32
_MAX_BODY_DEPTH = 32
_MIN_SECRET_BYTES = 16

# What a frame may be: bytes from a test or a copying recv, zmq.Frame from recv(copy=False).
FrameLike = bytes | bytearray | memoryview | zmq.Frame


class MsgType(str, Enum):
    HELLO = "hello"
    CHALLENGE = "challenge"
    JOIN = "join"
    WELCOME = "welcome"
    HEARTBEAT = "heartbeat"
    ACK = "ack"
    PUSH = "push"
    RESULT = "result"
    PULL = "pull"
    STATE = "state"
    GOSSIP = "gossip"
    LEAVE = "leave"
    BYE = "bye"
    STATUS = "status"
    STATUS_REPLY = "status_reply"
    ERROR = "error"


class WireError(ProtocolError):
    """A message failed validation; `code` is a short machine string sent back in ERROR.

    Codes: size, frames, bad_header, version, auth, run, config, shape, dtype, nonfinite,
    bad_message (an unexpected failure while rebuilding; never expected, kept so decode
    raises nothing else).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # both in args so the error pickles across processes
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message  # the message alone: it travels in ERROR bodies next to the code


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 64 * 1024
    max_frame_bytes: int = 2 * 1024**3
    """Any single tensor frame."""
    max_total_bytes: int = 4 * 1024**3
    """All frames of one message, envelope included."""
    max_frames: int = 4096
    """Tensor frames, envelope not counted."""


Dim = Annotated[StrictInt, Field(ge=0, lt=2**62)]


class TensorDesc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr
    dtype: StrictStr
    shape: list[Dim] = Field(max_length=_MAX_NDIM)
    nbytes: Annotated[StrictInt, Field(ge=0)]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {sorted(DTYPES)}")
        return v


class Header(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: StrictInt
    type: MsgType
    run: Annotated[StrictStr, Field(max_length=256)]
    worker: Annotated[StrictStr, Field(max_length=128)]
    sid: Annotated[StrictStr, Field(max_length=128)] = ""
    """The sender's session (dilo/session.py); empty in HELLO, STATUS and their replies."""
    seq: Annotated[StrictInt, Field(ge=0, lt=2**63)]
    """Unique within a session: a replayed message repeats one and is refused."""
    base: Annotated[StrictInt, Field(ge=-1, lt=2**63)]
    """Version the sender's state is based on; -1 when it has none."""
    fp: Annotated[StrictStr, Field(max_length=128)]
    """Config fingerprint; may be empty."""
    body: dict[str, Any]
    tensors: list[TensorDesc]

    @field_validator("body")
    @classmethod
    def _plain_body(cls, v: dict[str, Any]) -> dict[str, Any]:
        _check_plain(v, "body", 0)
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> Header:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tensor names in {names[:16]}")
        return self


def _check_plain(x: Any, where: str, depth: int) -> None:
    """Body values must survive msgpack unchanged, so the receiver sees what the sender meant."""
    if depth > _MAX_BODY_DEPTH:
        raise ValueError(f"{where} is nested deeper than {_MAX_BODY_DEPTH}")
    if x is None or isinstance(x, (bool, float, str, bytes)):
        return
    if isinstance(x, int):
        if not -(2**63) <= x < 2**64:
            raise ValueError(f"{where}: integer {x} does not fit in 64 bits")
        return
    if isinstance(x, (list, tuple)):
        for i, item in enumerate(x):
            _check_plain(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(x, dict):
        for k, item in x.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string")
            _check_plain(item, f"{where}.{k}", depth + 1)
        return
    raise ValueError(f"{where}: {type(x).__name__} is not a msgpack scalar, list or dict")


@dataclass
class Message:
    type: MsgType
    worker: str
    body: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    """Name -> CPU tensor; the frames follow this order."""
    seq: int = 0
    base: int = -1
    run: str = ""
    fp: str = ""
    sid: str = ""

    def __post_init__(self) -> None:
        self.type = MsgType(self.type)


def _tensor_bytes(t: torch.Tensor) -> memoryview | bytes:
    """A flat byte view over the tensor's own storage (the view keeps the tensor alive)."""
    if t.numel() == 0:
        return b""
    # numpy has no bfloat16, so every dtype goes through a uint8 view of the same memory
    # (the ignore: numpy's type annotations declare the buffer protocol only from Python 3.12 on).
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode(msg: Message, secret: bytes | None = None) -> list[bytes | memoryview]:
    """[envelope, *frames] ready for `send_multipart(copy=False)`; tensors are not copied
    unless they are not contiguous CPU tensors."""
    descs: list[dict[str, Any]] = []
    frames: list[bytes | memoryview] = []
    for name, t in msg.tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise WireError("dtype", f"tensor {name!r} has dtype {t.dtype}, not one of {sorted(DTYPES)}")
        t = t.detach().cpu().contiguous()
        descs.append({"name": name, "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "nbytes": t.nbytes})
        frames.append(_tensor_bytes(t))
    raw = {
        "v": PROTOCOL_VERSION,
        "type": MsgType(msg.type).value,
        "run": msg.run,
        "worker": msg.worker,
        "sid": msg.sid,
        "seq": msg.seq,
        "base": msg.base,
        "fp": msg.fp,
        "body": msg.body,
        "tensors": descs,
    }
    try:
        Header.model_validate(raw)  # fail at the sender, where the bug is, not at the coordinator
    except ValidationError as e:
        raise WireError("bad_header", f"cannot encode {msg.type.value}: {_fields(e)}") from e
    header_bytes = msgpack.packb(raw, use_bin_type=True)
    mac = _mac(secret, header_bytes, frames) if secret is not None else None
    return [msgpack.packb([header_bytes, mac], use_bin_type=True), *frames]


def _mac(secret: bytes, header_bytes: bytes, frames: Sequence[bytes | memoryview]) -> bytes:
    h = blake3.blake3(header_bytes, key=_key(secret))
    for f in frames:
        h.update(f)
    return h.digest()


_KEYS: dict[bytes, bytes] = {}


def _key(secret: bytes) -> bytes:
    """The 32-byte MAC key of a secret (derived once per secret)."""
    key = _KEYS.get(secret)
    if key is None:
        key = _KEYS[secret] = blake3.blake3(secret, derive_key_context=_KEY_CONTEXT).digest()
    return key


def _view(f: FrameLike) -> memoryview:
    """A flat unsigned-byte view of any frame, without copying."""
    mv = f.buffer if isinstance(f, zmq.Frame) else memoryview(f)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")  # raises on non-contiguous buffers, which decode reports
    return mv


def decode(
    frames: Sequence[FrameLike],
    *,
    secret: bytes | None = None,
    limits: Limits = Limits(),  # noqa: B008 - frozen, so sharing the default is safe
    expect_run: str | None = None,
    expect_fp: str | None = None,
) -> Message:
    """Validate frames and rebuild the message; raises only `WireError`.

    Checks, in order: frame count and sizes (before parsing), envelope and header msgpack,
    protocol version, header fields, MAC, run id, config fingerprint, frame count against
    descriptors, each frame's length against its shape and dtype.
    """
    try:
        return _decode(frames, secret, limits, expect_run, expect_fp)
    except WireError:
        raise
    except Exception as e:  # a bug here must not take the coordinator down with it
        raise WireError("bad_message", f"could not decode message: {type(e).__name__}: {e}") from e


def _decode(
    frames: Sequence[FrameLike], secret: bytes | None, limits: Limits, expect_run: str | None, expect_fp: str | None
) -> Message:
    if len(frames) == 0:
        raise WireError("frames", "empty message: expected an envelope frame")
    if len(frames) - 1 > limits.max_frames:
        raise WireError("size", f"{len(frames) - 1} tensor frames, more than max_frames={limits.max_frames}")
    try:
        views = [_view(f) for f in frames]
    except (TypeError, ValueError) as e:
        raise WireError("frames", f"a frame is not a contiguous byte buffer: {e}") from e
    if views[0].nbytes > limits.max_header_bytes:
        raise WireError(
            "size", f"header of {views[0].nbytes} bytes, more than max_header_bytes={limits.max_header_bytes}"
        )
    for i, mv in enumerate(views[1:]):
        if mv.nbytes > limits.max_frame_bytes:
            raise WireError(
                "size", f"frame {i} has {mv.nbytes} bytes, more than max_frame_bytes={limits.max_frame_bytes}"
            )
    total = sum(mv.nbytes for mv in views)
    if total > limits.max_total_bytes:
        raise WireError("size", f"message of {total} bytes, more than max_total_bytes={limits.max_total_bytes}")

    header_bytes, mac, raw = _parse(views[0])
    v = raw.get("v")
    # Before the field checks: a newer peer's header may have fields this version does not know.
    if isinstance(v, int) and not isinstance(v, bool) and v != PROTOCOL_VERSION:
        raise WireError("version", f"protocol version {v}, expected {PROTOCOL_VERSION}: upgrade dilo on both ends")
    try:
        header = Header.model_validate(raw)
    except ValidationError as e:
        raise WireError(_code_of(e), f"invalid header: {_fields(e)}") from e

    if secret is not None:
        if mac is None:
            raise WireError(
                "auth",
                "message is not authenticated but this coordinator requires a secret: "
                "set DILO_SECRET or membership.secret_file",
            )
        if not hmac.compare_digest(_mac(secret, header_bytes, views[1:]), mac):
            raise WireError("auth", "bad MAC: wrong secret?")
    elif mac is not None:
        raise WireError("auth", "message is authenticated but no secret is configured here")

    if expect_run is not None and header.run != expect_run:
        raise WireError("run", f"message is for run {header.run!r}, this is run {expect_run!r}")
    if expect_fp is not None and header.fp != expect_fp:
        raise WireError(
            "config",
            f"config fingerprint {header.fp!r} differs from ours {expect_fp!r}: the configs differ; "
            "start every process with the same config",
        )
    if len(views) - 1 != len(header.tensors):
        raise WireError("frames", f"{len(views) - 1} tensor frames for {len(header.tensors)} tensor descriptors")

    tensors = {d.name: _rebuild(d, mv) for d, mv in zip(header.tensors, views[1:])}
    return Message(
        header.type, header.worker, header.body, tensors, header.seq, header.base, header.run, header.fp, header.sid
    )


def _parse(envelope: memoryview) -> tuple[bytes, bytes | None, dict[str, Any]]:
    try:
        outer = msgpack.unpackb(envelope, raw=False, strict_map_key=True)
        if not (isinstance(outer, list) and len(outer) == 2 and isinstance(outer[0], bytes)):
            raise ValueError("envelope is not [header bytes, mac]")
        header_bytes, mac = outer
        if mac is not None and not isinstance(mac, bytes):
            raise ValueError("mac is neither bytes nor nil")
        raw = msgpack.unpackb(header_bytes, raw=False, strict_map_key=True)
        if not isinstance(raw, dict):
            raise ValueError(f"header is a {type(raw).__name__}, not a map")
    except Exception as e:  # msgpack raises many types on garbage; all mean the same here
        raise WireError("bad_header", f"cannot parse header: {type(e).__name__}: {e}") from e
    return header_bytes, mac, raw


def _fields(e: ValidationError) -> str:
    # Built from loc and msg only: pydantic's default text echoes inputs, which may be huge.
    errs = e.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'header'}: {err['msg']}" for err in errs[:5]]
    more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
    return "; ".join(parts) + more


def _code_of(e: ValidationError) -> str:
    """dtype/shape codes when only tensor descriptors are wrong, so the reply says what to fix."""
    locs = [err["loc"] for err in e.errors(include_url=False, include_input=False)]
    if all(len(loc) >= 3 and loc[0] == "tensors" and loc[2] == "dtype" for loc in locs):
        return "dtype"
    if all(len(loc) >= 3 and loc[0] == "tensors" and loc[2] in ("shape", "nbytes") for loc in locs):
        return "shape"
    return "bad_header"


def _rebuild(d: TensorDesc, mv: memoryview) -> torch.Tensor:
    dtype = DTYPES[d.dtype]
    itemsize = dtype.itemsize
    want = math.prod(d.shape) * itemsize
    if not (mv.nbytes == d.nbytes == want):
        raise WireError(
            "shape",
            f"tensor {d.name!r}: frame of {mv.nbytes} bytes, descriptor says {d.nbytes}, "
            f"shape {d.shape} of {d.dtype} needs {want}",
        )
    if want == 0:
        return torch.empty(d.shape, dtype=dtype)
    buf: memoryview | bytearray = mv
    # torch.frombuffer shares memory: a read-only buffer (bytes) would give a tensor whose writes
    # are undefined, and a misaligned one is slow or unsafe for some kernels, so copy those.
    if mv.readonly or torch.frombuffer(mv, dtype=torch.uint8).data_ptr() % itemsize:
        buf = bytearray(mv)
    as_bytes = torch.frombuffer(buf, dtype=torch.uint8)
    # torch assumes a bool byte is 0 or 1; any other value makes kernels disagree on its truth.
    if dtype == torch.bool and int(as_bytes.max()) > 1:
        raise WireError("dtype", f"tensor {d.name!r}: bool bytes must be 0 or 1")
    return as_bytes.view(dtype).reshape(d.shape)


def check_finite(msg: Message) -> None:
    """Raise WireError("nonfinite") naming the first floating tensor holding NaN or Inf."""
    for name, t in msg.tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        # NaN and Inf reach the extremes; much faster than isfinite(t).all() on large tensors.
        lo, hi = torch.aminmax(t.detach())
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise WireError("nonfinite", f"tensor {name!r} from {msg.worker!r} holds NaN or Inf")


def check_shapes(msg: Message, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Every expected tensor present with that (shape, dtype name), and nothing else."""
    extra = sorted(set(msg.tensors) - set(expected))
    if extra:
        raise WireError("shape", f"unexpected tensors {extra} from {msg.worker!r}; expected only {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        t = msg.tensors.get(name)
        if t is None:
            raise WireError("shape", f"tensor {name!r} missing from {msg.worker!r}: expected {tuple(shape)} {dtype}")
        got = (tuple(t.shape), _DTYPE_NAMES.get(t.dtype, str(t.dtype)))
        if got != (tuple(shape), dtype):
            code = "shape" if got[0] != tuple(shape) else "dtype"
            raise WireError(
                code, f"tensor {name!r} from {msg.worker!r}: expected {tuple(shape)} {dtype}, got {got[0]} {got[1]}"
            )


def load_secret(env: str = "DILO_SECRET", file: str | None = None) -> bytes | None:
    """The shared secret: the stripped content of `file` if given, else `$env`, else None."""
    if file is not None:
        try:
            secret = Path(file).read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"cannot read secret file {file}: {e.strerror or e}") from e
        if not secret:
            raise ConfigError(f"secret file {file} is empty: write at least {_MIN_SECRET_BYTES} bytes to it")
        where = f"secret file {file}"
    else:
        value = os.environ.get(env)
        if value is None:
            return None
        # An empty value is usually an unset shell variable; running unauthenticated by accident is worse.
        secret = value.strip().encode()
        if not secret:
            raise ConfigError(f"{env} is set but empty: unset it or set it to at least {_MIN_SECRET_BYTES} bytes")
        where = f"${env}"
    if len(secret) < _MIN_SECRET_BYTES:
        raise ConfigError(
            f"{where} holds {len(secret)} bytes; a secret needs at least {_MIN_SECRET_BYTES} "
            "(e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return secret
