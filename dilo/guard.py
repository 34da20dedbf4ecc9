"""What keeps a server fair under a flood: per-connection rate limits and summarised rejection logs.

    limiter = RateLimiter(rate=200.0, burst=400.0)
    if not limiter.allow(identity):      # over its budget: drop without a reply, count it
        rejects.count("rate")
    ...
    rejects.reject("auth", "bad MAC: wrong secret?")   # logged once per code, then in summaries
    rejects.flush()                                     # on the server's timer: one line per period

A flood of junk must cost the server little per message and nothing on disk: the limiter drops
excess messages before they are parsed, and the log writes the first rejection of each kind in
full and afterwards one summary line per period, however many arrive.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable


class RateLimiter:
    """A token bucket per key (a ZeroMQ routing id): `rate` messages per second, bursts of `burst`.
    At most `max_keys` buckets are kept; the least recently used is forgotten first (a forgotten
    key starts again with a full bucket, so an attacker gains nothing it could not get from a new
    connection)."""

    def __init__(
        self, rate: float, burst: float, *, max_keys: int = 16384, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def allow(self, key: bytes) -> bool:
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok


class RejectLog:
    """Counts rejected messages by code; logs the first of each code, then summaries every `period_s`."""

    def __init__(
        self, log: logging.Logger, *, period_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log = log
        self.period_s = period_s
        self.clock = clock
        self.total: Counter[str] = Counter()
        """Every rejection since start, by code (STATUS reports it)."""
        self._pending: Counter[str] = Counter()
        self._next = clock() + period_s

    def reject(self, code: str, message: str) -> None:
        if code not in self.total:
            self.log.warning("rejected a message (%s): %s (further rejections are summarised)", code, message)
        else:
            self._pending[code] += 1
            self.log.debug("rejected a message (%s): %s", code, message)
        self.total[code] += 1

    def count(self, code: str) -> None:
        """A rejection not worth a line of its own (dropped over the rate limit)."""
        self.total[code] += 1
        self._pending[code] += 1

    def flush(self, force: bool = False) -> None:
        now = self.clock()
        if not (force or now >= self._next):
            return
        self._next = now + self.period_s
        if self._pending:
            parts = ", ".join(f"{code} {n}" for code, n in self._pending.most_common())
            self.log.warning("rejected %d more messages in the last %.0f s: %s", sum(self._pending.values()),
                             self.period_s, parts)  # fmt: skip
            self._pending.clear()
