"""CURVE key files for encrypted ZeroMQ links between workers and the coordinator.

CURVE encrypts every frame and proves the server's identity to the client (a client that has
the wrong server key never completes the handshake). It does not check who the client is:
any client may connect, so pair it with the shared secret of `dilo.wire` to keep strangers out.

    server_key, client_key = generate(Path("keys"))   # once; copy client.* and server.pub to workers
    apply_server(router, Path("keys/server.key"))      # before router.bind(...)
    apply_client(dealer, Path("keys/client.key"), Path("keys/server.pub"))  # before connect

A `.key` file holds two z85 lines, public then secret, and is readable by its owner only; a
`.pub` file holds the public line alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zmq

from dilo.errors import ConfigError

_Z85_KEY_LEN = 40


def curve_available() -> bool:
    """Whether this libzmq was built with CURVE (libsodium or tweetnacl)."""
    return bool(zmq.has("curve"))


def _require_curve() -> None:
    if not curve_available():
        raise ConfigError(
            f"libzmq {zmq.zmq_version()} has no CURVE support: install a pyzmq wheel (bundled libzmq has it) "
            "or drop transport key files and rely on the shared secret"
        )


def generate(directory: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write server.key/server.pub and client.key/client.pub in `directory`.

    Returns the paths of server.key and client.key. Refuses to replace existing files unless
    `overwrite`, since a new server key locks out every worker holding the old server.pub.
    """
    _require_curve()
    directory = Path(directory)
    names = ("server.key", "server.pub", "client.key", "client.pub")
    if not overwrite:
        for name in names:
            if (directory / name).exists():
                raise ConfigError(f"{directory / name} exists; pass overwrite=True to replace the keys")
    directory.mkdir(parents=True, exist_ok=True)
    for role in ("server", "client"):
        public, secret = zmq.curve_keypair()
        _write(directory / f"{role}.key", public + b"\n" + secret + b"\n", 0o600)
        _write(directory / f"{role}.pub", public + b"\n", 0o644)
    return directory / "server.key", directory / "client.key"


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_CREAT with the final mode: the secret is never readable by others, even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, data)
    finally:
        os.close(fd)


def _lines(path: Path, what: str) -> list[bytes]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from e
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    for line in lines:
        if len(line) != _Z85_KEY_LEN:
            raise ConfigError(
                f"{path} is not a dilo key file: expected {_Z85_KEY_LEN}-character z85 lines; "
                "create keys with `dilo.keys.generate`"
            )
    return lines


def load_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `.key` file; checks that they belong together."""
    lines = _lines(path, "key file")
    if len(lines) != 2:
        raise ConfigError(f"{path} holds {len(lines)} keys, expected 2 (public, secret): is it a .pub file?")
    public, secret = lines
    _require_curve()
    try:
        derived = zmq.curve_public(secret)
    except Exception as e:  # zmq raises ZMQError or ValueError on a malformed z85 key
        raise ConfigError(f"{path}: the secret key is not valid z85: {e}") from e
    if derived != public:
        raise ConfigError(f"{path}: the public key does not match the secret key; regenerate the pair")
    return public, secret


def load_public(path: Path) -> bytes:
    """The z85 public key from a `.pub` file."""
    lines = _lines(path, "public key file")
    if len(lines) != 1:
        raise ConfigError(f"{path} holds {len(lines)} keys, expected 1: pass the .pub file, never the .key file")
    return lines[0]


def apply_server(socket: zmq.Socket[Any], secret_key_path: Path) -> None:
    """Make `socket` a CURVE server; call before bind."""
    public, secret = load_pair(secret_key_path)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def apply_client(socket: zmq.Socket[Any], client_key_path: Path, server_public_path: Path) -> None:
    """Make `socket` a CURVE client of the server whose public key is in server_public_path; call before connect."""
    public, secret = load_pair(client_key_path)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = load_public(server_public_path)
