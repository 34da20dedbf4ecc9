"""Chaos: an elastic DiLoCo run under SIGKILLs, SIGSTOPs and a hostile flood, against the same run without faults.

    .venv/bin/python scripts/bench_chaos.py [--quick] [--workers 4] [--steps 8000] [--worker-kills 55]
                                            [--coordinator-kills 6] [--stops 2] [--flood-messages 120000]
                                            [--flood-rate 500] [--seed 0] [--keep]

Two elastic runs of one configuration and training seed (a 1-layer byte-level GPT of 25k
parameters on about 1 MB of the standard library's sources, H = 20, so that a round lasts a
fraction of a second): a `dilo coordinator` and `--workers` `dilo worker` processes (ids w0, w1,
..., data island i for wi), a shared secret in DILO_SECRET, coordinator.checkpoint_every = 1 and
checkpoint.every = 1 on the workers.

- fault-free: the baseline; nothing is killed and nothing else talks to the coordinator.
- chaos: the same, driven by a seeded random schedule. Its events sit at points of the run's
  progress (the workers' mean step / steps), drawn uniformly between 3% and 80% of it, so the
  schedule does not depend on the machine's speed; an event whose point is reached fires when its
  target is eligible (a worker up for --min-uptime s, a coordinator that has closed a round since
  it came back), and any event fires anyway when progress stalls for --stall-s:
  * --worker-kills SIGKILLs of workers; a --mid-push share of them is aimed at a worker that has
    pushed and waits for its RESULT (the coordinator's STATUS lists it in `pending`, asked just
    before the kill). Every killed worker is restarted at once with the same --id and
    --checkpoint.resume=true, so that it continues from its newest round checkpoint and every
    worker trains the same number of steps as in the fault-free run.
  * --coordinator-kills SIGKILLs of the coordinator, each restarted at once with --resume. The
    version it had reached is the larger of a STATUS asked just before the kill and the last
    "closed" line of its log; the version it resumed at is read off the new process's banner.
  * --stops SIGSTOPs of a worker for 1.75 x heartbeat_timeout_s (the coordinator must drop it from
    the view), then SIGCONT; never while the coordinator is down or restarting, and the coordinator
    is not killed while a worker is stopped (a resumed coordinator gives every old member a fresh
    heartbeat period, which would hide the stop).
  * a worker or coordinator that exits on its own is counted (with its stderr) and restarted
    (workers at most --max-crash-restarts times each, with --checkpoint.resume=true).
  * a hostile sender (a process of its own) flooding the coordinator from the start to the end of
    the run: malformed messages (random bytes, truncated or broken msgpack, wrong types, unknown
    types and versions, bad tensor descriptors, nesting, oversized headers and frame counts),
    spoofed ones (a member's worker id, unsigned or signed with a wrong secret, built from scratch
    or from a captured header) and replays. Worker w0 reaches the coordinator through a recording
    proxy (a ROUTER front end, a DEALER per client identity to the coordinator) that hands every
    JOIN and PUSH and some HEARTBEATs to the hostile sender, which replays them byte for byte from
    its own sockets (a PUSH at once, while its round may still be open, and all of them again
    later). The proxy connects its DEALER for a new client identity lazily, so a replay sent at once
    can reach the coordinator before the genuine message, as an attacker on the path could arrange.
    The hostile sender's sockets are replaced by new connections every few seconds. It sends at least
    --flood-rate messages per second and speeds up (to at most 3x) to reach --flood-messages by 90%
    of the progress. Every reply is classified; a replayed message answered with anything other
    than ERROR (WELCOME, ACK, RESULT, STATE, ...) is an accepted replay, a spoofed one so answered
    an accepted spoof.

Every process has a deadline (workers: --deadline-s after the run started and --finish-s after
the last chaos event; the coordinator 30 s after SIGTERM; the hostile sender and the proxy 10 s):
a process still running then is a hang; it gets SIGABRT first (PYTHONFAULTHANDLER=1 makes it dump
every thread's stack into its stderr, kept in the JSON) and then SIGKILL.

Reported for both runs, each figure next to the fault-free run's: hangs; versions lost per
coordinator restart (target <= 1); final validation loss of the coordinator's final parameters
(its newest checkpoint, evaluated here on --eval-batches validation batches) and its ratio to the
fault-free run's (target within 2%); replays and spoofs accepted (target 0); the coordinator's
rejected messages by code (STATUS `rejected`, summed over its processes); RSS growth of every
coordinator process (/proc/PID/status VmRSS: max minus the first sample once it listens);
"Traceback" in any worker's stderr (target 0; every excerpt is kept in the JSON) and in the
coordinator's; whether every surviving worker's final anchor hash (its last round record in
logs/worker-wK.jsonl) equals the coordinator's (hashed from its final checkpoint), and the
looser check of tests/test_elastic.py (the last worker to finish holds the coordinator's final
anchor, the others a state it went through: a version the coordinator had, from its checkpoints,
which are hashed here while they exist, with how many versions before the end each worker left);
the longest stretch without a new version and the rounds closed at their deadline.

Writes scripts/results/chaos.json, chaos.md, chaos.png (validation loss and coordinator version
against wall time for both runs, kills and stops marked) and the "chaos" section of BENCHMARKS.md.
About 6.5 minutes on 2 CPU cores with the defaults (the fault-free run about 1.5 minutes, the
chaos run about 5), 10 at most (the deadlines: 150 s and 400 s). --quick: 3 workers, a short run, a few events and a
small flood, about 2 minutes; it prints the tables and writes nothing under scripts/ (the artefacts
go to the work directory, which it keeps; --print-only does the same for a full run). --keep keeps
the work directory (every process's stderr, the runs' logs and checkpoints) and prints where it is.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import zmq

REPO = Path(__file__).resolve().parent.parent
SECRET = "chaos-benchmark-secret-0123456789abcdef"
WRONG_SECRET = b"not-the-secret-of-this-run-0123456789"
CORPUS_PACKAGES = ("json", "email", "collections", "concurrent", "logging", "urllib")
ACCEPTED = ("welcome", "ack", "result", "state")
"""Reply types that mean the coordinator took a message as genuine."""

# Hidden roles: the proxy and the hostile sender run as processes of this script.
_STOP = False


def _on_term(signum: int, frame: object) -> None:
    global _STOP
    _STOP = True


# =============================================================================================
# settings


@dataclass(frozen=True)
class Settings:
    workers: int
    steps: int
    inner_steps: int
    eval_every: int
    eval_batches: int
    worker_kills: int
    coordinator_kills: int
    stops: int
    mid_push: float
    flood_messages: int
    flood_rate: float
    flood_mix: tuple[float, float, float]
    min_uptime_s: float
    stall_s: float
    deadline_s: float
    baseline_deadline_s: float
    finish_s: float
    max_crash_restarts: int
    heartbeat_s: float
    heartbeat_timeout_s: float
    request_timeout_s: float
    round_timeout_s: float
    seed: int
    quick: bool
    print_only: bool

    @property
    def stop_s(self) -> float:
        return 1.75 * self.heartbeat_timeout_s


def parse_args(argv: list[str]) -> tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run: 3 workers, a few events, small flood")
    ap.add_argument("--workers", type=int, default=None, help="dilo worker processes (default 4; quick 3)")
    ap.add_argument("--steps", type=int, default=None, help="inner steps per worker (default 8000; quick 1200)")
    ap.add_argument("--inner-steps", type=int, default=20, help="H, inner steps per round")
    ap.add_argument("--worker-kills", type=int, default=None, help="worker SIGKILLs (default 55; quick 6)")
    ap.add_argument("--coordinator-kills", type=int, default=None, help="coordinator SIGKILLs (default 6; quick 1)")
    ap.add_argument("--stops", type=int, default=None, help="SIGSTOP/SIGCONT of a worker (default 2; quick 1)")
    ap.add_argument("--mid-push", type=float, default=0.5, help="share of worker kills aimed at a pending push")
    ap.add_argument("--flood-messages", type=int, default=None, help="hostile messages (default 120000; quick 15000)")
    ap.add_argument("--flood-rate", type=float, default=None, help="hostile messages per second, at least (500; 300)")
    ap.add_argument(
        "--flood-mix",
        default="0.4,0.3,0.3",
        help="shares of malformed, spoofed and replayed messages (default %(default)s)",
    )
    ap.add_argument("--min-uptime", type=float, default=4.0, help="a worker is killed only after this long up (s)")
    ap.add_argument("--stall-s", type=float, default=20.0, help="fire the next event anyway after this long stalled")
    ap.add_argument(
        "--deadline-s", type=float, default=None, help="the chaos run's deadline (default 400 s; quick 150)"
    )
    ap.add_argument(
        "--baseline-deadline-s", type=float, default=None, help="the fault-free run's (default 150; quick 90)"
    )
    ap.add_argument(
        "--max-crash-restarts", type=int, default=20, help="restarts of a worker that exited on its own, at most"
    )
    ap.add_argument("--finish-s", type=float, default=90.0, help="workers' deadline after the last chaos event (s)")
    ap.add_argument("--heartbeat-timeout", type=float, default=2.0, help="membership.heartbeat_timeout_s")
    ap.add_argument("--eval-batches", type=int, default=32, help="validation batches for the final losses")
    ap.add_argument("--seed", type=int, default=0, help="seed of the chaos schedule and of the hostile sender")
    ap.add_argument("--work-dir", default=None, help="where the runs live (default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (every stderr, log, checkpoint)")
    ap.add_argument(
        "--print-only", action="store_true", help="write the artefacts to the work directory, not under scripts/"
    )
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--role-args", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    q = a.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    mix = tuple(float(x) for x in a.flood_mix.split(","))
    if len(mix) != 3 or any(x < 0 for x in mix) or sum(mix) <= 0:
        ap.error(f"--flood-mix needs three shares >= 0 (malformed, spoofed, replayed), got {a.flood_mix!r}")
    s = Settings(
        workers=pick(a.workers, 4, 3),
        steps=pick(a.steps, 8000, 1200),
        inner_steps=a.inner_steps,
        eval_every=5,
        eval_batches=a.eval_batches,
        worker_kills=pick(a.worker_kills, 55, 6),
        coordinator_kills=pick(a.coordinator_kills, 6, 1),
        stops=pick(a.stops, 2, 1),
        mid_push=a.mid_push,
        flood_messages=pick(a.flood_messages, 120_000, 15_000),
        flood_rate=pick(a.flood_rate, 500.0, 300.0),
        flood_mix=(mix[0], mix[1], mix[2]),
        min_uptime_s=a.min_uptime,
        stall_s=a.stall_s,
        deadline_s=pick(a.deadline_s, 400.0, 150.0),
        baseline_deadline_s=pick(a.baseline_deadline_s, 150.0, 90.0),
        finish_s=a.finish_s,
        max_crash_restarts=a.max_crash_restarts,
        heartbeat_s=0.25,
        heartbeat_timeout_s=a.heartbeat_timeout,
        request_timeout_s=3.0,
        round_timeout_s=5.0,
        seed=a.seed,
        quick=q,
        print_only=a.print_only or q,
    )
    if s.workers < 2:
        ap.error("--workers must be at least 2")
    if s.steps < 10 * s.inner_steps:
        ap.error("--steps must be at least 10 rounds of --inner-steps")
    return s, a


# =============================================================================================
# processes


@dataclass
class Proc:
    """One child process: its own session, stderr in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    err: Path
    started: float
    cause: str = ""
    """Why we ended it: "chaos" (a scheduled SIGKILL), "deadline" (a hang), "stop" (SIGTERM at the end)."""
    ended: float | None = None
    code: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        if self.code is None:
            code = self.popen.poll()
            if code is not None:
                self.code, self.ended = code, time.monotonic()
        return self.code

    def send(self, sig: int) -> bool:
        if self.poll() is not None:
            return False
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def wait(self, timeout: float) -> bool:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self.poll()
        return True

    def stderr(self, limit: int = 0) -> str:
        try:
            text = self.err.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:] if limit else text


SPAWNED: list[Proc] = []
"""Every process this script started, so that a failure anywhere still cleans them all up."""


def spawn(name: str, cmd: list[str], env: dict[str, str], err: Path) -> Proc:
    err.parent.mkdir(parents=True, exist_ok=True)
    with err.open("wb") as f:
        popen = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=f,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    p = Proc(name, popen, err, time.monotonic())
    SPAWNED.append(p)
    return p


def reap(p: Proc, why: str) -> dict[str, Any]:
    """End a process that missed its deadline: SIGABRT (a faulthandler stack dump), then SIGKILL."""
    p.cause = "deadline"
    p.send(signal.SIGCONT)
    p.send(signal.SIGABRT)
    if not p.wait(3.0):
        p.send(signal.SIGKILL)
        p.wait(10.0)
    text = p.stderr()
    at = text.rfind("Fatal Python error")
    return {
        "name": p.name,
        "pid": p.pid,
        "why": why,
        "up_s": round(time.monotonic() - p.started, 1),
        "stack": text[at : at + 8000] if at >= 0 else "",
        "stderr_tail": text[-3000:] if at < 0 else text[max(0, at - 2000) : at],
    }


def kill_everything() -> None:
    for p in SPAWNED:
        if p.poll() is None:
            p.send(signal.SIGCONT)
            p.send(signal.SIGKILL)
            p.wait(10.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        DILO_SECRET=SECRET,
        DILO_THREADS="1",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
        DILO_LOG="INFO",
    )
    env.update(extra)
    return env


# =============================================================================================
# the configuration


def make_corpus(root: Path) -> Path:
    """About 1 MB of the standard library's sources, read quickly by every (re)started worker."""
    out = root / "corpus"
    if out.is_dir():
        return out
    src = Path(sysconfig.get_paths()["stdlib"])
    for pkg in CORPUS_PACKAGES:
        for f in sorted((src / pkg).rglob("*.py")):
            dest = out / pkg / f.relative_to(src / pkg)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    return out


def write_config(path: Path, corpus: Path, s: Settings) -> Path:
    path.write_text(
        f"""# written by scripts/bench_chaos.py: the same file for the fault-free and the chaos run
name = "chaos"
workers = {s.workers}
steps = {s.steps}
seed = 0

[model]
n_layer = 1
n_head = 2
d_model = 32
context = 32

[data]
corpus = "text"
paths = [{json.dumps(str(corpus))}]
islands = "iid"
batch_size = 8
seq_len = 32
val_fraction = 0.1

[inner]
lr = 3e-3
warmup_steps = 20

[outer]
kind = "diloco"
inner_steps = {s.inner_steps}
lr = 1.0
momentum = 0.5
nesterov = true

[log]
progress = false
plot = false
eval_every = {s.eval_every}
eval_batches = 8

[checkpoint]
every = 1

[membership]
kind = "coordinator"
heartbeat_s = {s.heartbeat_s}
heartbeat_timeout_s = {s.heartbeat_timeout_s}
request_timeout_s = {s.request_timeout_s}
round_timeout_s = {s.round_timeout_s}
start_quorum = {s.workers}

[coordinator]
checkpoint_every = 1
"""
    )
    return path


# =============================================================================================
# the chaos schedule


@dataclass
class Event:
    at: float
    """Progress (mean worker step / steps) at which it is due."""
    action: str
    """kill_worker | kill_coordinator | stop_worker"""
    mid_push: bool = False


def schedule(s: Settings, rng: random.Random) -> list[Event]:
    """Worker kills uniform in [3%, 80%] of the progress; coordinator kills and stops one per
    equal stratum of it, so that they do not bunch up."""
    lo, hi = 0.03, 0.80

    def strata(n: int) -> list[float]:
        return [lo + (hi - lo) * (i + rng.random()) / n for i in range(n)]

    events = [
        Event(lo + (hi - lo) * rng.random(), "kill_worker", rng.random() < s.mid_push) for _ in range(s.worker_kills)
    ]
    events += [Event(p, "kill_coordinator") for p in strata(s.coordinator_kills)]
    events += [Event(p, "stop_worker") for p in strata(s.stops)]
    return sorted(events, key=lambda e: e.at)


# =============================================================================================
# watching a run


class LogTail:
    """The last step a worker logged, read incrementally from its JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.step = 0
        self.done = False
        self.partial = b""

    def update(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size < self.offset:  # rewritten from scratch (a worker restarted before its first checkpoint)
            self.offset, self.partial = 0, b""
        if size == self.offset:
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        self.offset = size
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if isinstance(r.get("step"), int):
                    self.step = max(self.step, r["step"])
                if r.get("event") == "end":
                    self.done = True


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def ask_status(address: str, timeout_s: float = 0.5) -> dict[str, Any] | None:
    """The coordinator's STATUS, or None when it does not answer in time (down, restarting, busy)."""
    from dilo.transport.zmq_star import status

    try:
        return status(address, secret=SECRET.encode(), timeout_s=timeout_s)
    except Exception:  # noqa: BLE001 - any failure means "no status now"; the run goes on
        return None


_CLOSED = re.compile(r"closed: \d+ contributions?, version (\d+)")
_BANNER = re.compile(r"at version (\d+), listening on")


def last_closed_version(text: str) -> int | None:
    found = _CLOSED.findall(text)
    return int(found[-1]) if found else None


@dataclass
class Coord:
    proc: Proc
    index: int
    resumed: bool
    listening_at: float | None = None
    start_version: int | None = None
    boot: str | None = None
    last_status: dict[str, Any] | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class Slot:
    """One worker id across its incarnations."""

    wid: str
    island: int
    proc: Proc | None = None
    incarnation: int = 0
    finished: bool = False
    given_up: bool = False
    crashes: int = 0
    restart_at: float | None = None
    stopped_until: float | None = None
    stop_record: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


# =============================================================================================
# one run


class Run:
    """Start, watch and (chaos) torment one elastic run; every process ends by its deadline."""

    def __init__(self, name: str, root: Path, toml: Path, s: Settings, chaos: bool) -> None:
        self.name, self.s, self.chaos = name, s, chaos
        self.toml = toml
        self.dir = root / name
        self.err = self.dir / "stderr"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.proxy_address = f"tcp://127.0.0.1:{free_port()}" if chaos else ""
        self.capture_address = f"tcp://127.0.0.1:{free_port()}" if chaos else ""
        self.progress_file = self.dir / "progress.json"
        self.rng = random.Random(s.seed * 7919 + 17)
        self.events: deque[Event] = deque(schedule(s, random.Random(s.seed)) if chaos else [])
        self.planned = len(self.events)
        self.done_events: list[dict[str, Any]] = []
        self.coord_kills: list[dict[str, Any]] = []
        self.coords: list[Coord] = []
        self.slots = [Slot(f"w{i}", i) for i in range(s.workers)]
        self.tails = {sl.wid: LogTail(self.dir / "logs" / f"worker-{sl.wid}.jsonl") for sl in self.slots}
        self.hangs: list[dict[str, Any]] = []
        self.unexpected: list[dict[str, Any]] = []
        self.versions: list[tuple[float, int]] = []
        self.stops: list[dict[str, Any]] = []
        self.helpers: dict[str, Proc] = {}
        self.t0 = 0.0
        self.wall0 = 0.0
        self.last_status_t = 0.0
        self.progress = 0.0
        self.progress_t = 0.0
        self.last_event_t = 0.0
        self.due_since: float | None = None
        self.chaos_done_t: float | None = None
        self.final_status: dict[str, Any] | None = None
        self.history: dict[tuple[int, str], float] = {}
        """(version, anchor hash) of every coordinator checkpoint seen while it existed -> when first seen."""
        self.history_rounds: set[int] = set()

    # ------------------------------------------------------------------------------- starting

    def _dilo(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dilo.cli", *args]

    def start_coordinator(self, resume: bool) -> Coord:
        i = len(self.coords)
        cmd = self._dilo(
            "coordinator",
            str(self.toml),
            *(["--resume"] if resume else []),
            f"--out_dir={self.dir}",
            f"--coordinator.bind={self.address}",
            f"--membership.address={self.address}",
        )
        c = Coord(spawn(f"coordinator.{i}", cmd, child_env(), self.err / f"coordinator.{i}.err"), i, resume)
        self.coords.append(c)
        return c

    def start_worker(self, sl: Slot) -> None:
        address = self.proxy_address if self.chaos and sl.island == 0 else self.address
        cmd = self._dilo(
            "worker",
            str(self.toml),
            "--id",
            sl.wid,
            f"--out_dir={self.dir}",
            f"--membership.address={address}",
            "--checkpoint.resume=true",
        )
        name = f"{sl.wid}.{sl.incarnation}"
        sl.proc = spawn(name, cmd, child_env(DILO_ISLAND=str(sl.island)), self.err / f"{name}.err")
        sl.incarnation += 1
        sl.restart_at = None

    def start_helpers(self) -> None:
        me = [sys.executable, str(Path(__file__).resolve())]
        from dilo.config import load

        cfg = load(str(self.toml), [f"--out_dir={self.dir}"])
        proxy = {"front": self.proxy_address, "back": self.address, "capture": self.capture_address}
        proxy["stats"] = str(self.dir / "proxy.json")
        self.helpers["proxy"] = spawn(
            "proxy", [*me, "--role", "proxy", "--role-args", json.dumps(proxy)], child_env(), self.err / "proxy.err"
        )
        flood = {
            "address": self.address,
            "capture": self.capture_address,
            "stats": str(self.dir / "flood.json"),
            "progress": str(self.progress_file),
            "seed": self.s.seed,
            "rate": self.s.flood_rate,
            "target": self.s.flood_messages,
            "mix": list(self.s.flood_mix),
            "run": cfg.name,
            "fp": cfg.fingerprint(),
            "members": [sl.wid for sl in self.slots],
        }
        self.helpers["flood"] = spawn(
            "flood", [*me, "--role", "flood", "--role-args", json.dumps(flood)], child_env(), self.err / "flood.err"
        )

    # ------------------------------------------------------------------------------- the loop

    def now(self) -> float:
        return time.monotonic() - self.t0

    def execute(self) -> dict[str, Any]:
        s = self.s
        self.t0, self.wall0 = time.monotonic(), time.time()
        print(
            f"[chaos] {self.name}: {s.workers} workers, {s.steps} steps, logs in {self.dir}",
            file=sys.stderr,
            flush=True,
        )
        self.start_coordinator(resume=False)
        if self.chaos:
            self.start_helpers()
        for sl in self.slots:
            self.start_worker(sl)
        deadline = s.deadline_s if self.chaos else s.baseline_deadline_s
        try:
            while True:
                self.tick()
                if all(sl.finished or sl.given_up for sl in self.slots):
                    break
                # workers: the run's deadline, and (chaos) --finish-s after the last event
                limit = deadline if self.chaos_done_t is None else min(deadline, self.chaos_done_t + s.finish_s)
                if self.now() > limit:
                    for sl in self.slots:
                        if sl.proc is not None and sl.proc.poll() is None:
                            self.hangs.append(reap(sl.proc, f"worker still running at the deadline ({limit:.0f} s)"))
                            self._record_exit(sl)
                    break
                time.sleep(0.05)
        finally:
            for sl in self.slots:  # never leave a stopped worker behind
                if sl.proc is not None and sl.stopped_until is not None:
                    sl.proc.send(signal.SIGCONT)
            self.shutdown()
        return self.result()

    def tick(self) -> None:
        now = self.now()
        self._watch_coordinator(now)
        self._watch_history(now)
        for tail in self.tails.values():
            tail.update()
        finished = [1.0 if sl.finished else min(1.0, self.tails[sl.wid].step / self.s.steps) for sl in self.slots]
        progress = sum(finished) / len(finished)
        if progress > self.progress:
            self.progress, self.progress_t = progress, now
        if self.chaos:
            with contextlib.suppress(OSError):
                tmp = self.progress_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"progress": self.progress}))
                tmp.replace(self.progress_file)
        for sl in self.slots:
            self._watch_worker(sl, now)
        if self.chaos and self.events:
            self._maybe_fire(now)
            if not self.events:
                self.chaos_done_t = now

    def _watch_coordinator(self, now: float) -> None:
        c = self.coords[-1]
        code = c.proc.poll()
        if code is not None and c.proc.cause != "chaos":
            if not c.proc.cause:  # it died on its own: record it and bring it back (resuming), like a supervisor
                c.proc.cause = "crashed"
                self.unexpected.append(
                    {"name": c.proc.name, "code": code, "t": round(now, 2), "stderr": c.proc.stderr(3000)}
                )
                print(f"[chaos] {self.name}: {c.proc.name} exited with {code} on its own", file=sys.stderr)
                if sum(1 for u in self.unexpected if u["name"].startswith("coordinator")) <= 5:
                    self.start_coordinator(resume=True)
            return
        if c.listening_at is None:
            m = _BANNER.search(c.proc.stderr(20000))
            if m:
                c.listening_at, c.start_version = now, int(m.group(1))
                if c.index > 0 and c.resumed and self.coord_kills and "resumed_version" not in self.coord_kills[-1]:
                    k = self.coord_kills[-1]
                    k["resumed_version"] = c.start_version
                    k["restart_s"] = round(now - k["t"], 2)
                    k["versions_lost"] = max(0, k["version_seen"] - c.start_version)
        kb = rss_kb(c.proc.pid)
        if kb is not None and c.listening_at is not None:
            c.rss.append((now, kb))
        if now - self.last_status_t >= 0.25:
            self.last_status_t = now
            st = ask_status(self.address)
            if st is not None:
                self._note_status(st, now)

    def _watch_history(self, now: float) -> None:
        """Hash every coordinator checkpoint while it exists (it keeps its newest two): the
        coordinator's own anchors, to check the workers' final anchors against."""
        from dilo.outer.base import tensor_digest
        from dilo.state import load_worker_state, rounds_of

        ckpt = self.dir / "coordinator"
        try:
            rounds = rounds_of(ckpt, "coordinator")
        except OSError:
            return
        for r in rounds:
            if r in self.history_rounds:
                continue
            try:  # it may be pruned (or rewritten after a restart) while we read it
                state = load_worker_state(ckpt, r, "coordinator")
                key = (int(state["version"]), tensor_digest(list(state["params"])))
            except Exception:  # noqa: BLE001 - a checkpoint gone before we read it is a gap in the history
                continue
            self.history_rounds.add(r)
            self.history.setdefault(key, round(now, 2))

    def _note_status(self, st: dict[str, Any], now: float) -> None:
        c = self.coords[-1]
        if c.boot is None and st.get("boot") not in {x.boot for x in self.coords[:-1]}:
            c.boot = st.get("boot")
        if st.get("boot") == c.boot:
            c.last_status = st
        if isinstance(st.get("version"), int):
            self.versions.append((now, st["version"]))

    def _watch_worker(self, sl: Slot, now: float) -> None:
        rec = sl.stop_record
        if sl.stopped_until is not None and rec is not None:
            st = self.coords[-1].last_status
            if st is not None and sl.wid not in [m.get("worker") for m in st.get("members", [])]:
                rec.setdefault("left_view_after_s", round(now - rec["t"], 2))
            if now >= sl.stopped_until and sl.proc is not None:
                sl.proc.send(signal.SIGCONT)
                sl.stopped_until = None
                rec["resumed_t"] = round(now, 2)
        elif rec is not None and "resumed_t" in rec and "back_in_view_after_s" not in rec:
            st = self.coords[-1].last_status
            if st is not None and sl.wid in [m.get("worker") for m in st.get("members", [])]:
                rec["back_in_view_after_s"] = round(now - rec["resumed_t"], 2)
        if sl.proc is None or sl.finished or sl.given_up:
            return
        if sl.proc.poll() is None:
            return
        if sl.restart_at is None:
            self._record_exit(sl)
            code, cause = sl.proc.code, sl.proc.cause
            if code == 0 and self.tails[sl.wid].path.is_file():
                self.tails[sl.wid].update()
                sl.finished = True
                return
            if cause == "chaos":
                sl.restart_at = now  # at once, same id
            else:
                sl.crashes += 1
                self.unexpected.append(
                    {"name": sl.proc.name, "code": code, "t": round(now, 2), "stderr": sl.proc.stderr(3000)}
                )
                print(f"[chaos] {self.name}: {sl.proc.name} exited with {code} on its own", file=sys.stderr)
                if sl.crashes > self.s.max_crash_restarts:
                    sl.given_up = True
                    return
                sl.restart_at = now + 1.0
        if sl.restart_at is not None and now >= sl.restart_at:
            self.start_worker(sl)

    def _record_exit(self, sl: Slot) -> None:
        p = sl.proc
        assert p is not None
        sl.history.append(
            {
                "name": p.name,
                "pid": p.pid,
                "start_s": round(p.started - self.t0, 2),
                "end_s": round((p.ended or time.monotonic()) - self.t0, 2),
                "code": p.code,
                "cause": p.cause,
            }
        )

    # ------------------------------------------------------------------------------- events

    def _eligible(self, now: float) -> list[Slot]:
        return [
            sl
            for sl in self.slots
            if sl.proc is not None
            and sl.proc.poll() is None
            and not sl.finished
            and sl.stopped_until is None
            and time.monotonic() - sl.proc.started >= self.s.min_uptime_s
        ]

    def _maybe_fire(self, now: float) -> None:
        ev = self.events[0]
        stalled = now - max(self.progress_t, self.last_event_t) > self.s.stall_s
        if (self.progress < ev.at and not stalled) or now - self.last_event_t < 0.5:
            return
        if self.due_since is None:
            self.due_since = now
        fired: dict[str, Any] | None
        if ev.action == "kill_coordinator":
            fired = self._kill_coordinator(now, stalled)
        elif ev.action == "kill_worker":
            fired = self._kill_worker(now, ev.mid_push, stalled)
        else:
            fired = self._stop_worker(now, stalled)
        if fired is None:
            return
        fired.update(action=ev.action, planned_at=round(ev.at, 4), progress=round(self.progress, 4), on_stall=stalled)
        fired["waited_s"] = round(now - self.due_since, 2)
        self.done_events.append(fired)
        self.events.popleft()
        self.due_since = None
        self.last_event_t = self.now()

    def _kill_worker(self, now: float, mid_push: bool, stalled: bool) -> dict[str, Any] | None:
        eligible = self._eligible(now)
        if not eligible:
            return None
        st = ask_status(self.address)
        pending = set(st.get("pending", [])) if st else set()
        targets = [sl for sl in eligible if sl.wid in pending]
        if mid_push and not targets and now - (self.due_since or now) < 3.0 and not stalled:
            return None  # wait a little for a worker that has pushed
        chosen = self.rng.choice(targets if mid_push and targets else eligible)
        assert chosen.proc is not None
        chosen.proc.cause = "chaos"
        was_pending = chosen.wid in pending
        chosen.proc.send(signal.SIGKILL)
        chosen.proc.wait(10.0)
        return {
            "t": round(now, 2),
            "target": chosen.proc.name,
            "pid": chosen.proc.pid,
            "up_s": round(time.monotonic() - chosen.proc.started, 2),
            "wanted_mid_push": mid_push,
            "mid_push": was_pending,
            "pending": sorted(pending),
            "version": st.get("version") if st else None,
        }

    def _stop_worker(self, now: float, stalled: bool) -> dict[str, Any] | None:
        eligible = self._eligible(now)
        if not eligible or not (stalled or self._coordinator_settled()):
            return None
        chosen = self.rng.choice(eligible)
        assert chosen.proc is not None
        chosen.proc.send(signal.SIGSTOP)
        chosen.stopped_until = now + self.s.stop_s
        record = {"t": round(now, 2), "target": chosen.proc.name, "pid": chosen.proc.pid, "stop_s": self.s.stop_s}
        chosen.stop_record = record
        self.stops.append(record)
        return dict(record)

    def _coordinator_settled(self) -> bool:
        """Up, and (if it came back from a kill) it has closed a round since: the workers re-joined."""
        c = self.coords[-1]
        if c.proc.poll() is not None or c.listening_at is None:
            return False
        if not c.resumed:
            return True
        seen = c.last_status.get("version") if c.last_status else None
        return seen is not None and c.start_version is not None and seen > c.start_version

    def _kill_coordinator(self, now: float, stalled: bool) -> dict[str, Any] | None:
        c = self.coords[-1]
        if c.proc.poll() is not None or c.listening_at is None:
            return None
        if any(sl.stopped_until is not None for sl in self.slots):
            return None  # a stopped worker must be seen to leave the view of the coordinator that runs now
        if not stalled and not self._coordinator_settled():
            return None
        st = ask_status(self.address)
        if st is not None and st.get("boot") == c.boot:
            c.last_status = st
        c.proc.cause = "chaos"
        c.proc.send(signal.SIGKILL)
        c.proc.wait(10.0)
        t = self.now()
        from_status = c.last_status.get("version") if c.last_status else None
        from_log = last_closed_version(c.proc.stderr())
        seen = max(v for v in (from_status, from_log, c.start_version, 0) if v is not None)
        record = {
            "t": round(t, 2),
            "target": c.proc.name,
            "pid": c.proc.pid,
            "version_seen": seen,
            "version_from_status": from_status,
            "version_from_log": from_log,
            "pending": (c.last_status or {}).get("pending"),
            "rejected": (c.last_status or {}).get("rejected"),
        }
        self.coord_kills.append(record)
        self.history_rounds = {r for r in self.history_rounds if r < seen - 2}
        self.start_coordinator(resume=True)
        return dict(record)

    # ------------------------------------------------------------------------------- the end

    def shutdown(self) -> None:
        flood = self.helpers.get("flood")
        if flood is not None:
            flood.cause = "stop"
            flood.send(signal.SIGTERM)
            if not flood.wait(10.0):
                self.hangs.append(reap(flood, "hostile sender still running 10 s after SIGTERM"))
        time.sleep(0.3)  # the last replies to the flood
        c = self.coords[-1]
        if c.proc.poll() is None:
            st = ask_status(self.address, timeout_s=3.0)
            if st is not None:
                self._note_status(st, self.now())
                self.final_status = st
            c.proc.cause = "stop"
            c.proc.send(signal.SIGTERM)
            if not c.proc.wait(30.0):
                self.hangs.append(reap(c.proc, "coordinator still running 30 s after SIGTERM"))
        proxy = self.helpers.get("proxy")
        if proxy is not None:
            proxy.cause = "stop"
            proxy.send(signal.SIGTERM)
            if not proxy.wait(10.0):
                self.hangs.append(reap(proxy, "proxy still running 10 s after SIGTERM"))
        for sl in self.slots:  # anything left (an exception in the loop): not a hang, but never left running
            if sl.proc is not None and sl.proc.poll() is None:
                sl.proc.send(signal.SIGCONT)
                sl.proc.send(signal.SIGKILL)
                sl.proc.wait(10.0)
                self._record_exit(sl)

    def result(self) -> dict[str, Any]:
        coords = []
        for c in self.coords:
            growth = None
            if c.rss:
                growth = (max(kb for _, kb in c.rss) - c.rss[0][1]) / 1024
            coords.append(
                {
                    "name": c.proc.name,
                    "pid": c.proc.pid,
                    "resumed": c.resumed,
                    "start_version": c.start_version,
                    "last_version": (c.last_status or {}).get("version"),
                    "exit_code": c.proc.code,
                    "cause": c.proc.cause,
                    "rss_start_mb": c.rss[0][1] / 1024 if c.rss else None,
                    "rss_max_mb": max(kb for _, kb in c.rss) / 1024 if c.rss else None,
                    "rss_growth_mb": growth,
                    "rss_samples": len(c.rss),
                    "rejected": (c.last_status or {}).get("rejected", {}),
                    "late": (c.last_status or {}).get("late"),
                }
            )
        return {
            "name": self.name,
            "address": self.address,
            "wall_s": self.now(),
            "wall0": self.wall0,
            "planned_events": self.planned,
            "events": self.done_events,
            "events_left": len(self.events),
            "coordinator_kills": self.coord_kills,
            "stops": self.stops,
            "coordinators": coords,
            "workers": {
                sl.wid: {"finished": sl.finished, "given_up": sl.given_up, "runs": sl.history} for sl in self.slots
            },
            "hangs": self.hangs,
            "unexpected_exits": self.unexpected,
            "versions": self.versions,
            "final_status": self.final_status,
            "coordinator_history": sorted([v, h, t] for (v, h), t in self.history.items()),
        }


# =============================================================================================
# reading a finished run


_TRACEBACK = "Traceback (most recent call last):"


def tracebacks(paths: list[Path]) -> list[dict[str, Any]]:
    """Every traceback in these stderr files: the file, the excerpt (up to its exception line)."""
    out = []
    for path in sorted(paths):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines):
            if _TRACEBACK not in line:
                continue
            j = i + 1
            while j < len(lines) and j - i < 80 and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            excerpt = lines[max(0, i - 2) : j + 1]
            out.append(
                {"file": path.name, "line": i + 1, "error": lines[j] if j < len(lines) else "", "excerpt": excerpt}
            )
    return out


def analyse(run: dict[str, Any], run_dir: Path, toml: Path, s: Settings) -> dict[str, Any]:
    """Final loss and anchors, tracebacks, stalls and deadline closes of one run."""
    err = run_dir / "stderr"
    worker_err = [p for p in err.glob("w*.err")]
    coord_err = [p for p in err.glob("coordinator.*.err")]
    out: dict[str, Any] = {
        "worker_tracebacks": tracebacks(worker_err),
        "coordinator_tracebacks": tracebacks(coord_err),
        "helper_tracebacks": tracebacks([p for p in err.glob("*.err") if p.name.startswith(("flood", "proxy"))]),
    }
    closes = 0
    for p in coord_err:
        with contextlib.suppress(OSError):
            closes += p.read_text(errors="replace").count("closes at its deadline")
    out["rounds_closed_at_deadline"] = closes
    # the longest stretch without a new version, while workers ran
    versions = run["versions"]
    stall, last_v, last_t = 0.0, None, None
    for t, v in versions:
        if last_v is None or v != last_v:
            if last_t is not None:
                stall = max(stall, t - last_t)
            last_v, last_t = v, t
    if last_t is not None and versions:
        stall = max(stall, versions[-1][0] - last_t)
    out["max_version_stall_s"] = stall
    out["final_version"] = versions[-1][1] if versions else None

    # every worker's rounds: val-loss points on the wall clock, final anchors
    wall0 = run["wall0"]
    points, finals = [], {}
    for sl in run["workers"]:
        recs = read_jsonl(run_dir / "logs" / f"worker-{sl}.jsonl")
        rounds = [r for r in recs if r.get("event") == "round"]
        points += [
            {"t": r["time"] - wall0, "val_loss": r["val_loss"], "worker": sl}
            for r in rounds
            if r.get("val_loss") is not None and isinstance(r.get("time"), (int, float))
        ]
        end = next((r for r in reversed(recs) if r.get("event") == "end"), None)
        seen = {r.get("anchor_hash") for r in rounds} | {
            (r.get("joined") or {}).get("anchor_hash") for r in recs if r.get("event") in ("start", "resume")
        }
        finals[sl] = {
            "finished": bool(run["workers"][sl]["finished"]) and end is not None,
            "steps": end.get("steps") if end else (rounds[-1]["step"] if rounds else 0),
            "round_records": len(rounds),
            "rounds_committed": sum(1 for r in rounds if r.get("committed")),
            "rounds_lost": sum(1 for r in rounds if r.get("reason") == "round lost"),
            "final_anchor": rounds[-1].get("anchor_hash") if rounds else None,
            "final_time": rounds[-1].get("time") if rounds else None,
            "final_val_loss": next((r["val_loss"] for r in reversed(rounds) if r.get("val_loss") is not None), None),
            "anchors_seen": sorted(h for h in seen if h),
        }
    out["curve"] = sorted(points, key=lambda p: p["t"])
    history: dict[str, int] = {}
    for v, h, _ in run["coordinator_history"]:
        history.setdefault(h, v)

    # the coordinator's final state, evaluated here
    coord = final_state(toml, run_dir, s)
    out["coordinator_final"] = coord
    surviving = {w: f for w, f in finals.items() if f["finished"]}
    hash_c = coord.get("anchor_hash")
    final_v = coord.get("version")
    if hash_c is not None and final_v is not None:
        history.setdefault(hash_c, final_v)
    for f in finals.values():
        f["equals_coordinator"] = hash_c is not None and f["final_anchor"] == hash_c
        # the coordinator's version with that anchor: how many versions before the end it finished
        v = history.get(f["final_anchor"] or "")
        f["coordinator_version"] = v
        f["versions_before_end"] = final_v - v if v is not None and final_v is not None else None
    last = max(surviving, key=lambda w: surviving[w]["final_time"] or 0.0) if surviving else None
    seen_versions = {v for v, _, _ in run["coordinator_history"]}
    out["anchors"] = {
        "coordinator": hash_c,
        "surviving": sorted(surviving),
        "equal": sum(f["equals_coordinator"] for f in surviving.values()),
        "all_equal": bool(surviving) and all(f["equals_coordinator"] for f in surviving.values()),
        "last_finisher": last,
        # tests/test_elastic.py: the last to finish holds the coordinator's final anchor, the others a state
        # it went through; here "went through" is checked against the coordinator's own checkpoints
        # (hashed while they existed) and the last finisher's round log
        "consistent": bool(last)
        and surviving[last]["equals_coordinator"]
        and all(
            f["coordinator_version"] is not None or f["final_anchor"] in surviving[last]["anchors_seen"]
            for f in surviving.values()
        ),
        "unmatched": sorted(
            w
            for w, f in surviving.items()
            if f["coordinator_version"] is None and f["final_anchor"] not in surviving[last]["anchors_seen"]
        )
        if last
        else [],
        "history_versions_seen": len(seen_versions),
        "history_coverage": len(seen_versions) / (final_v + 1) if final_v is not None else None,
    }
    for f in finals.values():
        f.pop("anchors_seen")
    out["workers"] = finals
    return out


def final_state(toml: Path, run_dir: Path, s: Settings) -> dict[str, Any]:
    """The coordinator's newest checkpoint: version, anchor hash, validation loss on --eval-batches."""
    try:
        import torch

        from dilo.config import load
        from dilo.data import load_validation
        from dilo.inner import evaluate
        from dilo.model import build_model, params_of
        from dilo.outer.base import tensor_digest
        from dilo.state import load_worker_state, rounds_of

        cfg = load(str(toml), [f"--out_dir={run_dir}"])
        ckpt = run_dir / "coordinator"
        rounds = rounds_of(ckpt, "coordinator")
        if not rounds:
            return {"error": f"no coordinator checkpoint in {ckpt}"}
        state = load_worker_state(ckpt, rounds[-1], "coordinator")
        model = build_model(cfg.model, cfg.seed)
        with torch.no_grad():
            for p, v in zip(params_of(model), state["params"]):
                p.copy_(v)
        total, n = evaluate(model, load_validation(cfg.data, cfg.seed, s.eval_batches), cfg.inner.precision)
        return {
            "version": int(state["version"]),
            "anchor_hash": tensor_digest(list(state["params"])),
            "val_loss": total / n,
            "eval_batches": n,
        }
    except Exception as e:  # noqa: BLE001 - reported, not hidden: the rest of the report still stands
        return {"error": f"{type(e).__name__}: {e}"}


# =============================================================================================
# the report


def summarise(s: Settings, base: dict[str, Any], chaos: dict[str, Any], flood: dict[str, Any]) -> dict[str, Any]:
    kills = [e for e in chaos["run"]["events"] if e["action"] == "kill_worker"]
    restarts = chaos["run"]["coordinator_kills"]
    lost = [k.get("versions_lost") for k in restarts]
    b_loss = base["analysis"]["coordinator_final"].get("val_loss")
    c_loss = chaos["analysis"]["coordinator_final"].get("val_loss")
    ratio = c_loss / b_loss if b_loss and c_loss is not None else None
    replies = flood.get("replies", {})
    replay_cats = [c for c in replies if c.startswith("replay.")]
    accepted_replays = {c: _answered(replies[c]) for c in replay_cats}
    n_replays = sum(sum(v.values()) for v in accepted_replays.values())
    spoof_accepted = _answered(replies.get("spoofed", {}))
    malformed_accepted = _answered(replies.get("malformed", {}))
    rejected: Counter[str] = Counter()
    for c in chaos["run"]["coordinators"]:
        rejected.update(c["rejected"] or {})
    base_rejected: Counter[str] = Counter()
    for c in base["run"]["coordinators"]:
        base_rejected.update(c["rejected"] or {})

    def rss(run: dict[str, Any]) -> float | None:
        g = [c["rss_growth_mb"] for c in run["coordinators"] if c["rss_growth_mb"] is not None]
        return max(g) if g else None

    anchors = chaos["analysis"]["anchors"]
    wt = chaos["analysis"]["worker_tracebacks"]
    sent = int(flood.get("sent_total", 0))
    targets = {
        "hangs": {"value": len(chaos["run"]["hangs"]), "baseline": len(base["run"]["hangs"]), "target": "0"},
        "worker_kills": {"value": len(kills), "target": ">= 50"},
        "mid_push_kills": {"value": sum(1 for k in kills if k["mid_push"]), "target": "some"},
        "coordinator_kills": {"value": len(restarts), "target": ">= 5"},
        "sigstops": {"value": len(chaos["run"]["stops"]), "target": ">= 1"},
        "hostile_messages": {"value": sent, "target": ">= 100000"},
        "max_versions_lost_per_restart": {
            "value": max((x for x in lost if x is not None), default=None),
            "each": lost,
            "target": "<= 1",
        },
        "final_val_loss_ratio": {"value": ratio, "chaos": c_loss, "baseline": b_loss, "target": "within 2%"},
        "replays_accepted": {"value": n_replays, "by_type": accepted_replays, "target": "0"},
        "spoofs_accepted": {"value": sum(spoof_accepted.values()), "by_type": spoof_accepted, "target": "0"},
        "malformed_accepted": {"value": sum(malformed_accepted.values()), "by_type": malformed_accepted, "target": "0"},
        "coordinator_rss_growth_mb": {"value": rss(chaos["run"]), "baseline": rss(base["run"]), "target": "-"},
        "worker_tracebacks": {
            "value": len(wt),
            "baseline": len(base["analysis"]["worker_tracebacks"]),
            "target": "0",
        },
        "coordinator_tracebacks": {
            "value": len(chaos["analysis"]["coordinator_tracebacks"]),
            "baseline": len(base["analysis"]["coordinator_tracebacks"]),
            "target": "0",
        },
        "anchors_equal": {
            "value": anchors["all_equal"],
            "equal": f"{anchors['equal']}/{len(anchors['surviving'])}",
            "baseline": base["analysis"]["anchors"]["all_equal"],
            "target": "all",
        },
        "anchors_consistent": {
            "value": anchors["consistent"],
            "baseline": base["analysis"]["anchors"]["consistent"],
            "target": "true",
        },
        "unexpected_exits": {
            "value": len(chaos["run"]["unexpected_exits"]),
            "baseline": len(base["run"]["unexpected_exits"]),
            "target": "0",
        },
    }
    met = {
        "hangs": targets["hangs"]["value"] == 0 and targets["hangs"]["baseline"] == 0,
        "worker_kills": len(kills) >= 50,
        "mid_push_kills": targets["mid_push_kills"]["value"] > 0,
        "coordinator_kills": len(restarts) >= 5,
        "sigstops": len(chaos["run"]["stops"]) >= 1,
        "hostile_messages": sent >= 100_000,
        "max_versions_lost_per_restart": bool(lost) and all(x is not None and x <= 1 for x in lost),
        "final_val_loss_ratio": ratio is not None and abs(ratio - 1) <= 0.02,
        "replays_accepted": n_replays == 0 and bool(replay_cats),
        "spoofs_accepted": targets["spoofs_accepted"]["value"] == 0,
        "malformed_accepted": targets["malformed_accepted"]["value"] == 0,
        "coordinator_rss_growth_mb": None,
        "worker_tracebacks": len(wt) == 0 and targets["worker_tracebacks"]["baseline"] == 0,
        "coordinator_tracebacks": targets["coordinator_tracebacks"]["value"] == 0,
        "anchors_equal": bool(anchors["all_equal"]),
        "anchors_consistent": bool(anchors["consistent"]),
        "unexpected_exits": targets["unexpected_exits"]["value"] == 0,
    }
    for k, v in met.items():
        targets[k]["met"] = v
    return {"targets": targets, "rejected": dict(rejected), "baseline_rejected": dict(base_rejected)}


def _answered(replies: dict[str, int]) -> dict[str, int]:
    """Replies other than ERROR (and other than an unreadable one): the message was taken as genuine."""
    return {k: n for k, n in replies.items() if not k.startswith("error") and k != "undecodable"}


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(
    s: Settings, base: dict[str, Any], chaos: dict[str, Any], flood: dict[str, Any], summ: dict[str, Any]
) -> str:
    from benchlib import markdown_table

    t = summ["targets"]
    br, cr = base["run"], chaos["run"]
    ba, ca = base["analysis"], chaos["analysis"]
    met = {True: "met", False: "**missed**", None: "-"}

    def row(label: str, key: str, chaos_v: str, base_v: str = "-") -> list[str]:
        return [label, chaos_v, base_v, t[key]["target"], met[t[key]["met"]]]

    kills = [e for e in cr["events"] if e["action"] == "kill_worker"]
    lost = t["max_versions_lost_per_restart"]["each"]
    rows = [
        row("hangs (processes past their deadline)", "hangs", fmt(t["hangs"]["value"]), fmt(t["hangs"]["baseline"])),
        row("worker SIGKILLs (restarted with the same --id)", "worker_kills", fmt(len(kills))),
        row("... of them mid-push (in STATUS pending)", "mid_push_kills", fmt(t["mid_push_kills"]["value"])),
        row("coordinator SIGKILLs (restarted with --resume)", "coordinator_kills", fmt(len(cr["coordinator_kills"]))),
        row(
            f"SIGSTOPs of {s.stop_s:.1f} s (heartbeat timeout {s.heartbeat_timeout_s:.1f} s)",
            "sigstops",
            fmt(len(cr["stops"])) + f" ({sum('left_view_after_s' in x for x in cr['stops'])} left the view)",
        ),
        row("hostile messages sent", "hostile_messages", fmt(t["hostile_messages"]["value"])),
        row(
            "versions lost per coordinator restart (max; each)",
            "max_versions_lost_per_restart",
            f"{fmt(t['max_versions_lost_per_restart']['value'])} ({', '.join(fmt(x) for x in lost) or '-'})",
        ),
        row(
            "final validation loss (vs fault-free)",
            "final_val_loss_ratio",
            f"{fmt(t['final_val_loss_ratio']['chaos'])} ({fmt(t['final_val_loss_ratio']['value'], 3)}x)",
            fmt(t["final_val_loss_ratio"]["baseline"]),
        ),
        row("replays accepted", "replays_accepted", fmt(t["replays_accepted"]["value"])),
        row("spoofs accepted", "spoofs_accepted", fmt(t["spoofs_accepted"]["value"])),
        row("malformed messages accepted", "malformed_accepted", fmt(t["malformed_accepted"]["value"])),
        row(
            "coordinator RSS growth, worst process (MB)",
            "coordinator_rss_growth_mb",
            fmt(t["coordinator_rss_growth_mb"]["value"], 1),
            fmt(t["coordinator_rss_growth_mb"]["baseline"], 1),
        ),
        row(
            "worker tracebacks",
            "worker_tracebacks",
            fmt(t["worker_tracebacks"]["value"]),
            fmt(t["worker_tracebacks"]["baseline"]),
        ),
        row(
            "coordinator tracebacks",
            "coordinator_tracebacks",
            fmt(t["coordinator_tracebacks"]["value"]),
            fmt(t["coordinator_tracebacks"]["baseline"]),
        ),
        row(
            "surviving workers' final anchors = coordinator's",
            "anchors_equal",
            t["anchors_equal"]["equal"],
            f"{ba['anchors']['equal']}/{len(ba['anchors']['surviving'])}",
        ),
        row(
            "final anchors on the coordinator's path (last finisher's = its final, others' = a version it had)",
            "anchors_consistent",
            fmt(t["anchors_consistent"]["value"]),
            fmt(t["anchors_consistent"]["baseline"]),
        ),
        row(
            "workers that exited on their own (crashes)",
            "unexpected_exits",
            fmt(t["unexpected_exits"]["value"]),
            fmt(t["unexpected_exits"]["baseline"]),
        ),
    ]
    header = ["", "chaos run", "fault-free run", "target", ""]
    info = [
        ["wall time (s)", fmt(cr["wall_s"], 0), fmt(br["wall_s"], 0)],
        ["final version", fmt(ca["coordinator_final"].get("version")), fmt(ba["coordinator_final"].get("version"))],
        [
            "longest stretch without a new version (s)",
            fmt(ca["max_version_stall_s"], 1),
            fmt(ba["max_version_stall_s"], 1),
        ],
        ["rounds closed at their deadline", fmt(ca["rounds_closed_at_deadline"]), fmt(ba["rounds_closed_at_deadline"])],
        [
            "rounds lost by workers (sum)",
            fmt(sum(w["rounds_lost"] for w in ca["workers"].values())),
            fmt(sum(w["rounds_lost"] for w in ba["workers"].values())),
        ],
        ["coordinator's rejected messages by code", _codes(summ["rejected"]), _codes(summ["baseline_rejected"])],
    ]
    replies = flood.get("replies", {})
    sent = flood.get("sent", {})
    flood_rows = [
        [cat, fmt(sum(sent.get(cat, {}).values())), _codes(replies.get(cat, {}))]
        for cat in sorted(set(sent) | set(replies))
    ]
    when = time.strftime("%Y-%m-%d")
    lines = [
        f"{s.workers} `dilo worker` processes and a `dilo coordinator` on 2 CPU cores, {s.steps} steps per worker, "
        f"H = {s.inner_steps}, a 1-layer GPT of 25k parameters, DILO_SECRET set, coordinator and worker checkpoints "
        f"every round; heartbeat timeout {s.heartbeat_timeout_s} s, round deadline {s.round_timeout_s} s. The chaos "
        f"run (schedule seed {s.seed}) against the fault-free run of the same config and training seed, {when}.",
        "",
        markdown_table(header, rows),
        "",
        markdown_table(["", "chaos run", "fault-free run"], info),
        "",
        "Hostile sender, by kind of message: sent, and the coordinator's replies (ERROR codes as error:CODE; "
        "no reply: dropped, rate-limited or lost with a killed coordinator):",
        "",
        markdown_table(["kind", "sent", "replies"], flood_rows),
    ]
    return "\n".join(lines)


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def plot(path: Path, base: dict[str, Any], chaos: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    for data, color, label in ((base, "tab:blue", "fault-free"), (chaos, "tab:red", "chaos")):
        pts = data["analysis"]["curve"]
        ax1.plot([p["t"] for p in pts], [p["val_loss"] for p in pts], ".", ms=3, color=color, alpha=0.6, label=label)
        fin = data["analysis"]["coordinator_final"].get("val_loss")
        if fin is not None:
            ax1.axhline(fin, color=color, lw=0.8, ls=":")
        v = data["run"]["versions"]
        ax2.plot([x[0] for x in v], [x[1] for x in v], "-", lw=1, color=color, label=label)
    events = chaos["run"]["events"]
    for ax in (ax1, ax2):
        for e in events:
            if e["action"] == "kill_worker":
                ax.axvline(e["t"], color="darkred" if e["mid_push"] else "salmon", lw=0.6, alpha=0.7)
            elif e["action"] == "kill_coordinator":
                ax.axvline(e["t"], color="black", lw=1.4, ls="--")
        for st in chaos["run"]["stops"]:
            ax.axvspan(st["t"], st.get("resumed_t", st["t"] + st["stop_s"]), color="orange", alpha=0.3)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    marks = [
        Line2D([], [], color="darkred", lw=0.8, label="worker SIGKILL, mid-push"),
        Line2D([], [], color="salmon", lw=0.8, label="worker SIGKILL"),
        Line2D([], [], color="black", lw=1.4, ls="--", label="coordinator SIGKILL"),
        Patch(color="orange", alpha=0.3, label="worker SIGSTOP"),
    ]
    h, _ = ax1.get_legend_handles_labels()
    ax1.legend(handles=h + marks, fontsize=8, loc="upper right")
    ax1.set_ylabel("validation loss (every worker's evaluations)")
    ax1.set_ylim(top=min(4.0, ax1.get_ylim()[1]))
    ax2.set_ylabel("coordinator version")
    ax2.set_xlabel("wall time since the coordinator started (s)")
    ax2.legend(fontsize=8, loc="lower right")
    n = base["analysis"]["coordinator_final"].get("eval_batches", "?")
    fig.suptitle(
        f"elastic DiLoCo under chaos (dotted: the coordinator's final parameters on {n} validation batches;"
        " dots: the workers' own evaluations on the config's eval_batches)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =============================================================================================
# the recording proxy (a process of its own)


def _peek(envelope: bytes) -> dict[str, Any] | None:
    """The header map of a message, unverified (None if it does not parse)."""
    try:
        outer = msgpack.unpackb(envelope, raw=False)
        header = msgpack.unpackb(outer[0], raw=False)
        return header if isinstance(header, dict) else None
    except Exception:  # noqa: BLE001 - anything that does not parse is just not recorded
        return None


def proxy_main(cfg: dict[str, Any]) -> None:
    """ROUTER front end for one worker, a DEALER per client identity to the coordinator; hands
    captured JOINs, PUSHes (and a few HEARTBEATs) to the hostile sender over a PUSH socket."""
    signal.signal(signal.SIGTERM, _on_term)
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    front.setsockopt(zmq.LINGER, 0)
    front.bind(cfg["front"])
    tap = ctx.socket(zmq.PUSH)
    tap.setsockopt(zmq.LINGER, 0)
    tap.setsockopt(zmq.SNDHWM, 200)
    tap.bind(cfg["capture"])
    backs: dict[bytes, zmq.Socket] = {}
    by_sock: dict[zmq.Socket, bytes] = {}
    last_used: dict[bytes, float] = {}
    stats: Counter[str] = Counter()
    last_hb = 0.0
    last_write = 0.0
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    try:
        while not _STOP:
            for sock, _ in poller.poll(100):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    now = time.monotonic()
                    if sock is front:
                        ident, msg = frames[0], frames[1:]
                        back = backs.get(ident)
                        if back is None:
                            back = ctx.socket(zmq.DEALER)
                            back.setsockopt(zmq.LINGER, 0)
                            back.connect(cfg["back"])
                            backs[ident], by_sock[back] = back, ident
                            poller.register(back, zmq.POLLIN)
                            stats["connections"] += 1
                        last_used[ident] = now
                        try:
                            back.send_multipart(msg, zmq.NOBLOCK)
                            stats["forwarded"] += 1
                        except zmq.Again:
                            stats["dropped"] += 1
                        header = _peek(msg[0]) if msg else None
                        kind = str(header.get("type")) if header else "unparsed"
                        stats[f"seen.{kind}"] += 1
                        if kind == "heartbeat" and now - last_hb < 0.5:
                            continue
                        if kind in ("join", "heartbeat", "push"):
                            last_hb = now if kind == "heartbeat" else last_hb
                            with contextlib.suppress(zmq.Again):
                                tap.send_multipart([kind.encode(), *msg], zmq.NOBLOCK)
                                stats[f"captured.{kind}"] += 1
                    else:
                        ident = by_sock[sock]
                        last_used[ident] = now
                        front.send_multipart([ident, *frames])
                        stats["replies"] += 1
            now = time.monotonic()
            if now - last_write > 1.0:
                last_write = now
                for ident in [i for i, t in last_used.items() if now - t > 120]:
                    sock = backs.pop(ident)
                    poller.unregister(sock)
                    del by_sock[sock], last_used[ident]
                    sock.close(0)
                _write_json_atomic(Path(cfg["stats"]), dict(stats))
    finally:
        _write_json_atomic(Path(cfg["stats"]), dict(stats))
        for sock in [front, tap, *backs.values()]:
            sock.close(0)
        ctx.term()


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(path)


# =============================================================================================
# the hostile sender (a process of its own)


def _sign(header: dict[str, Any] | bytes, frames: list[bytes], key: bytes | None) -> list[bytes]:
    """An envelope like dilo/wire.py's: msgpack([header bytes, HMAC-SHA256 over header + frames or nil])."""
    hb = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
    mac = None
    if key is not None:
        h = hmac.new(key, hb, sha256)
        for f in frames:
            h.update(f)
        mac = h.digest()
    return [msgpack.packb([hb, mac], use_bin_type=True), *frames]


class Hostile:
    """Builds malformed, spoofed and replayed messages."""

    def __init__(self, cfg: dict[str, Any], rng: random.Random) -> None:
        self.rng = rng
        self.run, self.fp = cfg["run"], cfg["fp"]
        self.members: list[str] = cfg["members"]
        self.captured: dict[str, deque[list[bytes]]] = {k: deque(maxlen=24) for k in ("join", "heartbeat", "push")}
        self.template: dict[str, Any] | None = None
        """A real header (from a capture): spoofs from scratch carry its fields, e.g. a session id."""
        self.seq = 1

    def header(self, kind: str, worker: str, /, **over: Any) -> dict[str, Any]:
        base = dict(self.template) if self.template else {}
        base.update(
            v=base.get("v", 1),
            type=kind,
            run=self.run,
            worker=worker,
            seq=self.seq,
            base=0,
            fp=self.fp,
            body={},
            tensors=[],
        )
        self.seq += 1
        base.update(over)
        return base

    def add_capture(self, kind: str, frames: list[bytes]) -> None:
        self.captured[kind].append(frames)
        h = _peek(frames[0])
        if h is not None:
            self.template = {k: v for k, v in h.items() if k not in ("body", "tensors")}

    # ------------------------------------------------------------------------------- malformed

    def malformed(self) -> tuple[str, list[bytes]]:
        r = self.rng
        kind = r.choices(
            [
                "random_bytes",
                "random_frames",
                "truncated",
                "not_an_envelope",
                "header_not_a_map",
                "header_garbage",
                "mac_wrong_type",
                "wrong_types",
                "unknown_type",
                "bad_version",
                "bad_descriptors",
                "frame_mismatch",
                "deep_body",
                "huge_ints",
                "oversized_header",
                "too_many_frames",
            ],
            weights=[10, 6, 8, 5, 5, 5, 3, 10, 5, 4, 6, 5, 3, 3, 0.3, 0.1],
        )[0]
        w = r.choice(self.members)
        if kind == "random_bytes":
            return kind, [r.randbytes(r.randint(0, 512))]
        if kind == "random_frames":
            return kind, [r.randbytes(r.randint(0, 256)) for _ in range(r.randint(2, 8))]
        if kind == "truncated":
            env = _sign(self.header("heartbeat", w), [], None)[0]
            return kind, [env[: r.randint(1, len(env) - 1)]]
        if kind == "not_an_envelope":
            return kind, [msgpack.packb(r.choice([42, "join", {"type": "join"}, [1, 2, 3], None, True, 1.5]))]
        if kind == "header_not_a_map":
            return kind, [msgpack.packb([msgpack.packb(r.choice([[1, 2], "x", 7, None])), None])]
        if kind == "header_garbage":
            return kind, [msgpack.packb([r.randbytes(r.randint(1, 64)), r.randbytes(32)])]
        if kind == "mac_wrong_type":
            return kind, [msgpack.packb([msgpack.packb(self.header("heartbeat", w)), r.choice([12345, "mac", [1]])])]
        if kind == "wrong_types":
            field_, value = r.choice(
                [
                    ("v", "1"),
                    ("seq", -5),
                    ("worker", 123),
                    ("base", "x"),
                    ("body", [1, 2]),
                    ("tensors", "none"),
                    ("type", 7),
                    ("run", None),
                    ("fp", 3.5),
                    ("seq", 2**64 - 1),
                    ("seq", 1.5),
                ]
            )
            return kind, _sign(self.header("push", w, **{field_: value}), [], r.choice([None, r.randbytes(32)]))
        if kind == "unknown_type":
            return kind, _sign(self.header(r.choice(["frobnicate", "JOIN", "", "welcome2"]), w), [], None)
        if kind == "bad_version":
            return kind, _sign(self.header("join", w, v=r.choice([0, 2, 99, -1])), [], None)
        if kind == "bad_descriptors":
            desc = r.choice(
                [
                    {"name": "x", "dtype": "complex128", "shape": [2], "nbytes": 32},
                    {"name": "x", "dtype": "float32", "shape": [-1], "nbytes": 4},
                    {"name": "x", "dtype": "float32", "shape": [2**40, 2**40], "nbytes": 8},
                    {"name": "x", "dtype": "float32", "shape": [2], "nbytes": 8, "extra": 1},
                    {"name": 5, "dtype": "float32", "shape": [2], "nbytes": 8},
                ]
            )
            return kind, _sign(self.header("push", w, tensors=[desc]), [b"\0" * 8], None)
        if kind == "frame_mismatch":
            desc = [{"name": f"t{i}", "dtype": "float32", "shape": [4], "nbytes": 16} for i in range(3)]
            return kind, _sign(self.header("push", w, tensors=desc), [b"\0" * 16], None)
        if kind == "deep_body":
            body: Any = 0
            for _ in range(40):
                body = {"a": body}
            return kind, _sign(self.header("join", w, body=body), [], None)
        if kind == "huge_ints":
            return kind, _sign(self.header("push", w, body={"tokens": 2**63 - 1, "weight": 1e308}), [], None)
        if kind == "oversized_header":
            return kind, _sign(self.header("join", w, body={"pad": "x" * 70_000}), [], None)
        return kind, [_sign(self.header("heartbeat", w), [], None)[0], *([b""] * 4100)]  # too_many_frames

    # ------------------------------------------------------------------------------- spoofed

    def spoofed(self) -> tuple[str, list[bytes]]:
        r = self.rng
        key = r.choice([None, WRONG_SECRET])
        signed = "unsigned" if key is None else "wrong_secret"
        caps = [c for c in self.captured.values() if c]
        if caps and r.random() < 0.5:
            frames = r.choice(r.choice(caps))
            outer = msgpack.unpackb(frames[0], raw=False)
            return f"captured_{signed}", _sign(outer[0], list(frames[1:]), key)
        kind = r.choice(["join", "heartbeat", "push", "pull", "leave"])
        w = r.choice(self.members)
        body = {"weight": 1.0, "contributes": False, "stop": False, "tokens": 0} if kind == "push" else {}
        return f"{kind}_{signed}", _sign(self.header(kind, w, body=body), [], key)

    def replay(self) -> tuple[str, list[bytes]] | None:
        kinds = [k for k, c in self.captured.items() if c]
        if not kinds:
            return None
        weights = {"join": 3, "heartbeat": 5, "push": 2}
        kind = self.rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        return kind, list(self.rng.choice(self.captured[kind]))


def flood_main(cfg: dict[str, Any]) -> None:
    """Flood the coordinator until SIGTERM; count what was sent and every reply, by kind."""
    signal.signal(signal.SIGTERM, _on_term)
    rng = random.Random(cfg["seed"] * 104729 + 3)
    hostile = Hostile(cfg, rng)
    ctx = zmq.Context()
    tap = ctx.socket(zmq.PULL)
    tap.setsockopt(zmq.LINGER, 0)
    tap.connect(cfg["capture"])
    cats = ["malformed", "spoofed", "replay.join", "replay.heartbeat", "replay.push"]
    sent: dict[str, Counter[str]] = {c: Counter() for c in cats}
    replies: dict[str, Counter[str]] = {c: Counter() for c in cats}
    hwm: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    opened = 0

    def new_socket() -> zmq.Socket:
        nonlocal opened
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(cfg["address"])
        opened += 1
        return sock

    live: dict[str, zmq.Socket] = {c: new_socket() for c in cats}
    rotate_at = {c: time.monotonic() + rng.uniform(3, 8) for c in cats}
    retiring: list[tuple[float, str, zmq.Socket]] = []
    t_start = time.monotonic()
    attempts = 0
    credit = 0.0
    progress = 0.0
    last_progress_read = last_write = last_send = t_start

    def send(cat: str, kind: str, frames: list[bytes]) -> None:
        try:
            live[cat].send_multipart(frames, zmq.NOBLOCK)
            sent[cat][kind] += 1
        except zmq.Again:
            hwm[cat] += 1

    def classify(cat: str, frames: list[bytes], now: float) -> None:
        header = _peek(frames[0]) if frames else None
        if header is None:
            label = "undecodable"
        elif header.get("type") == "error":
            body = header.get("body") if isinstance(header.get("body"), dict) else {}
            label = f"error:{body.get('code')}"
        else:
            label = str(header.get("type"))
        replies[cat][label] += 1
        if not label.startswith("error") and len(examples) < 20:
            examples.append({"t": round(now - t_start, 2), "kind": cat, "reply": label})

    def drain(now: float) -> None:
        for cat, sock in [*live.items(), *[(c, s) for _, c, s in retiring]]:
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                classify(cat, frames, now)

    def stats(now: float) -> dict[str, Any]:
        return {
            "elapsed_s": now - t_start,
            "sent": {c: dict(v) for c, v in sent.items()},
            "sent_total": sum(sum(v.values()) for v in sent.values()),
            "hwm_dropped": dict(hwm),
            "replies": {c: dict(v) for c, v in replies.items()},
            "replies_total": sum(sum(v.values()) for v in replies.values()),
            "captured": {k: len(v) for k, v in hostile.captured.items()},
            "non_error_examples": examples,
            "sockets_opened": opened,
            "progress": progress,
        }

    try:
        while not _STOP:
            now = time.monotonic()
            while True:  # captures from the proxy: a PUSH or JOIN is replayed at once
                try:
                    cap = tap.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                kind, frames = cap[0].decode(), cap[1:]
                hostile.add_capture(kind, frames)
                if kind in ("push", "join"):
                    send(f"replay.{kind}", "immediate", list(frames))
            if now - last_progress_read > 0.5:
                last_progress_read = now
                with contextlib.suppress(OSError, ValueError):
                    progress = float(json.loads(Path(cfg["progress"]).read_text())["progress"])
            # at least `rate` per second all along; up to 2x more while behind the target for this progress
            dt, last_send = now - last_send, now
            behind = cfg["target"] * min(1.0, progress / 0.9) - attempts
            credit += cfg["rate"] * dt + min(max(0.0, behind), 2 * cfg["rate"] * dt)
            n = int(credit)
            credit -= n
            for _ in range(n):
                attempts += 1
                pick = rng.choices(["malformed", "spoofed", "replay"], weights=cfg["mix"])[0]
                try:
                    if pick == "replay":
                        got = hostile.replay()
                        if got is not None:
                            send(f"replay.{got[0]}", "later", got[1])
                            continue
                        pick = "malformed"  # nothing captured yet
                    kind, frames = hostile.malformed() if pick == "malformed" else hostile.spoofed()
                except Exception as e:  # noqa: BLE001 - a builder bug must not end the flood; counted
                    hwm[f"builder_error:{type(e).__name__}"] += 1
                    continue
                send(pick, kind, frames)
            drain(now)
            for cat in cats:  # fresh connections every few seconds (per-connection limits, peer tables)
                if now >= rotate_at[cat]:
                    retiring.append((now + 2.0, cat, live[cat]))
                    live[cat] = new_socket()
                    rotate_at[cat] = now + rng.uniform(3, 8)
            for item in [x for x in retiring if x[0] <= now]:
                retiring.remove(item)
                item[2].close(0)
            if now - last_write > 1.0:
                last_write = now
                _write_json_atomic(Path(cfg["stats"]), stats(now))
            if n <= 0:
                time.sleep(0.002)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            drain(time.monotonic())
            time.sleep(0.02)
    finally:
        _write_json_atomic(Path(cfg["stats"]), stats(time.monotonic()))
        for sock in [tap, *live.values(), *[s for _, _, s in retiring]]:
            sock.close(0)
        ctx.term()


# =============================================================================================
# main


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    s, args = parse_args(sys.argv[1:])
    if args.role:
        roles = {"proxy": proxy_main, "flood": flood_main}
        roles[args.role](json.loads(args.role_args))
        return
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from benchlib import RESULTS, machine, update_benchmarks_md, write_json

    signal.signal(signal.SIGTERM, _interrupt)
    root = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dilo-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    keep = args.keep or s.print_only
    t_start = time.monotonic()
    try:
        toml = write_config(root / "chaos.toml", make_corpus(root), s)
        runs: dict[str, dict[str, Any]] = {}
        for name, chaos in (("fault-free", False), ("chaos", True)):
            run = Run(name, root, toml, s, chaos)
            record = run.execute()
            runs[name] = {"run": record, "analysis": analyse(record, run.dir, toml, s)}
            a = runs[name]["analysis"]
            print(
                f"[chaos] {name}: {record['wall_s']:.0f} s, final version {a['coordinator_final'].get('version')}, "
                f"val {fmt(a['coordinator_final'].get('val_loss'))}, {len(record['events'])} events, "
                f"{len(record['hangs'])} hangs",
                file=sys.stderr,
                flush=True,
            )
        flood_path = root / "chaos" / "flood.json"
        flood = json.loads(flood_path.read_text()) if flood_path.is_file() else {}
        proxy_path = root / "chaos" / "proxy.json"
        proxy = json.loads(proxy_path.read_text()) if proxy_path.is_file() else {}
        base, chaos_run = runs["fault-free"], runs["chaos"]
        summ = summarise(s, base, chaos_run, flood)
        md = markdown(s, base, chaos_run, flood, summ)
        payload = {
            "machine": machine(),
            "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
            "benchmark_s": time.monotonic() - t_start,
            **summ,
            "fault_free": base,
            "chaos": chaos_run,
            "flood": flood,
            "proxy": proxy,
        }
        if s.print_only:
            out = root
            (out / "chaos.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
            (out / "chaos.md").write_text(md + "\n")
            plot(out / "chaos.png", base, chaos_run)
        else:
            write_json("chaos", json.loads(json.dumps(payload, default=str)))
            (RESULTS / "chaos.md").write_text(md + "\n")
            plot(RESULTS / "chaos.png", base, chaos_run)
            update_benchmarks_md(
                "chaos",
                "## Chaos: an elastic run under kills, stops and a hostile flood (`scripts/bench_chaos.py`)\n\n"
                + md
                + "\n\n![chaos](scripts/results/chaos.png)\n\nRaw results (with every traceback excerpt, hang stack "
                "and event): `scripts/results/chaos.json`.",
            )
        print(md)
        print(f"\n[chaos] {time.monotonic() - t_start:.0f} s in all", file=sys.stderr)
        if s.print_only:
            print(f"[chaos] artefacts in {root} (chaos.json, .md, .png)", file=sys.stderr)
    finally:
        kill_everything()
        if keep:
            print(f"[chaos] work directory kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process was ended on the way out (main's finally)
        print("[chaos] interrupted; every process it started has been killed", file=sys.stderr)
        sys.exit(130)
