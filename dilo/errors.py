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
