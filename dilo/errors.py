"""dilo's exception hierarchy.

- `ConfigError` (also a `ValueError`): bad user input, raised before any process or socket
  starts; the message names the key and says what to write instead.
- `TransportError` and its subclasses: the network failed. Transports raise only these;
  outer strategies turn them into `SyncReport(committed=False, ...)` and training goes on.
- `ProtocolError`: a wire message failed validation.
- `DataError`: a corpus or path cannot be read or is empty.
"""

from __future__ import annotations


class DiloError(Exception):
    """Base class of every error dilo raises on purpose."""


class ConfigError(DiloError, ValueError):
    """A configuration value, file or command-line flag is wrong; the message says how to fix it."""


class DataError(DiloError, ValueError):
    """A corpus is missing, empty or unreadable; the message names the path."""


class TransportError(DiloError):
    """Moving tensors between workers failed."""


class PeerLost(TransportError):
    """A peer died or closed its connection during an exchange."""


class SyncTimeout(TransportError):
    """An exchange did not finish within its deadline."""


class ProtocolError(DiloError):
    """A wire message is malformed, unauthenticated or inconsistent with this run."""


class IslandLost(TransportError):
    """A rank of this worker's island died (its collectives failed): the island stops as a whole;
    the other islands go on (with a coordinator) and the island rejoins when relaunched."""


_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator", "Broken pipe")


def island_lost(e: BaseException, who: str) -> IslandLost | None:
    """The IslandLost that a collective's RuntimeError inside a training step means (a dead rank
    of the island, seen by Gloo or NCCL), or None for any other error."""
    text = str(e)
    if not isinstance(e, RuntimeError) or not any(marker in text for marker in _LOST_PEER):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return IslandLost(
        f"{who}: a rank of this island was lost ({first[:200]}); the island stops, and joins again when it is "
        "relaunched (the other islands train on without it)"
    )
