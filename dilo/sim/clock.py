"""The simulator's scheduler and virtual clock: one thread at a time, in virtual-time order."""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from dilo.errors import DiloError

log = logging.getLogger("dilo.sim")


class Crashed(BaseException):
    """Raised inside a virtual worker at its crash time; BaseException so that no handler in the
    worker loop mistakes it for an error it could recover from."""


class Deadlock(DiloError):
    """Every virtual worker waits and nothing is scheduled to wake any of them."""


# ---------------------------------------------------------------------------------------------
# scheduler


class Scheduler:
    """Runs threads one at a time in virtual-time order; timers run in between, in time order."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.vt: dict[int, float] = {}
        self.state: dict[int, str] = {}  # pending | ready | blocked | done
        self.crash_at: dict[int, float] = {}
        self.running: int | None = None
        self.now = 0.0
        """The virtual time of whatever runs now (a worker or a timer)."""
        self._timers: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._local = threading.local()
        self._threads: list[threading.Thread] = []
        self.errors: dict[int, BaseException] = {}
        self.finished = threading.Event()
        self.on_crash: Callable[[int], None] = lambda w: None

    # ----------------------------------------------------------------- called by the driver

    def spawn(self, w: int, fn: Callable[[], Any], at: float = 0.0) -> None:
        """Worker w starts running fn at virtual time `at`."""
        self.vt[w] = at
        self.state[w] = "ready"
        t = threading.Thread(target=self._body, args=(w, fn), name=f"sim-worker{w}", daemon=True)
        self._threads.append(t)

    def run(self, timeout_s: float | None = None) -> None:
        for t in self._threads:
            t.start()
        with self.cv:
            self._dispatch()
            if not self.cv.wait_for(self.finished.is_set, timeout=timeout_s):
                raise DiloError(f"the simulation did not finish within {timeout_s} s of real time")
        for t in self._threads:
            t.join(timeout=5)
        if self.deadlock is not None:
            raise self.deadlock

    deadlock: Deadlock | None = None

    # ----------------------------------------------------------------- called by workers

    @property
    def me(self) -> int:
        return int(self._local.w)

    def at(self, t: float, fn: Callable[[float], None]) -> None:
        """Run fn(t) at virtual time t (never before the present)."""
        heapq.heappush(self._timers, (max(t, self.now), next(self._seq), fn))

    def advance(self, dt: float) -> None:
        """The calling worker spends dt virtual seconds; others may run meanwhile."""
        with self.cv:
            self.vt[self.me] += dt
            self._yield()

    def block(self) -> None:
        """The calling worker waits until someone calls wake() for it."""
        with self.cv:
            self.state[self.me] = "blocked"
            self._yield()

    def wake(self, w: int, at: float) -> None:
        if self.state.get(w) == "blocked":
            self.state[w] = "ready"
            self.vt[w] = max(self.vt[w], at)

    # ----------------------------------------------------------------- internals

    def _body(self, w: int, fn: Callable[[], Any]) -> None:
        self._local.w = w
        with self.cv:
            self.cv.wait_for(lambda: self.running == w)
        try:
            self._check_crash(w)
            fn()
        except Crashed:
            log.info("virtual worker %d crashed at %.1f s", w, self.vt[w])
            with self.cv:
                self.on_crash(w)
        except BaseException as e:  # noqa: BLE001 - reported by the driver
            self.errors[w] = e
        finally:
            with self.cv:
                self.state[w] = "done"
                self._dispatch()

    def _yield(self) -> None:
        w = self.me
        self._dispatch()
        self.cv.wait_for(lambda: self.running == w)
        self._check_crash(w)

    def _check_crash(self, w: int) -> None:
        if w in self.crash_at and self.vt[w] >= self.crash_at[w]:
            raise Crashed()

    def _dispatch(self) -> None:
        """Pick what runs next (with self.cv held): due timers first, then the worker furthest behind."""
        while True:
            ready = [(self.vt[w], w) for w, s in self.state.items() if s == "ready"]
            nxt = min(ready) if ready else None
            live = nxt is not None or any(s == "blocked" for s in self.state.values())
            if live and self._timers and (nxt is None or self._timers[0][0] <= nxt[0]):
                t, _, fn = heapq.heappop(self._timers)
                self.now = t
                fn(t)
                continue
            if nxt is None:
                if any(s == "blocked" for s in self.state.values()):
                    waiting = sorted(w for w, s in self.state.items() if s == "blocked")
                    self.deadlock = Deadlock(f"virtual workers {waiting} wait and nothing will wake them")
                    for w in waiting:
                        self.errors.setdefault(w, self.deadlock)
                        self.state[w] = "done"
                self.running = None
                self.finished.set()
                self.cv.notify_all()
                return
            self.now, self.running = nxt
            self.cv.notify_all()
            return


class VirtualClock:
    """A worker's clock: inner steps cost virtual time, charged before the step's compute so that a
    DDP gradient all-reduce inside the step sees the right arrival times."""

    def __init__(self, sched: Scheduler, step_s: float, jitter: float, seed: int) -> None:
        self.sched = sched
        self.step_s = step_s
        self.jitter = jitter
        self.rng = random.Random(seed)

    def now(self) -> float:
        return self.sched.vt[self.sched.me]

    def step_begin(self) -> None:
        noise = self.rng.lognormvariate(0.0, self.jitter) if self.jitter > 0 else 1.0
        self.sched.advance(self.step_s * noise)

    def step_done(self, elapsed_s: float) -> None:
        """The step's virtual cost was charged by step_begin."""
