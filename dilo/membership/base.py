"""The current view of the world: an epoch that grows with every join and leave, and its members."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class View:
    epoch: int
    """Bumps on every join and leave."""
    peers: tuple[str, ...]
    """Stable worker ids, sorted."""
    me: str

    @property
    def rank(self) -> int:
        return self.peers.index(self.me) if self.me in self.peers else -1

    @property
    def size(self) -> int:
        return len(self.peers)
