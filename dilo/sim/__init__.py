"""The simulator: k virtual workers in one process, on a virtual clock.

    dilo sim configs/async.toml [--workers=16] [--sim.step_s=0.1] [overrides]

Each virtual worker is a thread running the real worker loop (dilo/train.py) in the real worlds
(dilo/worlds/: their transport, coordinator link and clock are injected) with the real strategy:
DiLoCo, FedAvg and DDP over an in-process transport with the collectives of torch.distributed
(dilo/sim/links.py), or elastic DiLoCo and the asynchronous rules through an in-process
coordinator (dilo/coordinator/, the same server `dilo coordinator` runs, without its socket;
messages are encoded and validated by dilo/wire.py as on the network). Gossip is not simulated.
Logs, checkpoints and summaries are written exactly as in a real run, with virtual seconds where a
real run has wall seconds, so the same reports and plots apply.

Only the clock is simulated. A scheduler runs one thread at a time, always the one furthest
behind in virtual time (ties: the lowest worker index), so a run is deterministic for a given
seed and config, whatever the machine's load:

- an inner step costs `sim.step_s * heterogeneity.slowdown[w]` virtual seconds, times a log-normal
  noise of sigma `sim.jitter` drawn from a per-worker seeded stream;
- a collective finishes when the last worker arrives plus its bytes over `sim.bandwidth_mbps`
  and `sim.latency_ms`; a message to or from the coordinator arrives after its own bytes' time;
- `sim.events` makes workers join late, leave (finish their round, then LEAVE) or crash (stop dead;
  the coordinator drops them after `membership.heartbeat_timeout_s` of virtual silence); a worker
  that left may join again (a fresh process: it takes the run's current state and appends to its log).

Validation, logging and checkpoints cost no virtual time.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any

import torch

from dilo.config import GossipConfig, RunConfig
from dilo.coordinator import Coordinator
from dilo.errors import ConfigError, DiloError
from dilo.sim.clock import Deadlock, Scheduler, VirtualClock
from dilo.sim.links import Hub, LocalStarClient, Network, Post, SimTransport
from dilo.worlds import ElasticWorld, Placement, StaticWorld, World

log = logging.getLogger("dilo.sim")

__all__ = ["format_result", "simulate"]


def simulate(cfg: RunConfig, *, timeout_s: float | None = None) -> dict[str, Any]:
    """Run cfg.workers virtual workers to the end; write logs and `sim.json`; return its content."""
    from dilo.train import train

    if cfg.checkpoint.resume:
        raise ConfigError("dilo sim starts from scratch: drop checkpoint.resume")
    if cfg.transport.island_ranks != 1:
        raise ConfigError("dilo sim runs one rank per virtual worker: drop transport.island_ranks")
    if isinstance(cfg.outer, GossipConfig):
        raise ConfigError(
            "dilo sim runs DiLoCo, FedAvg, DDP and async; gossip talks over real sockets: try it with "
            "`dilo run configs/gossip.toml` on loopback"
        )
    if getattr(cfg.outer, "overlap", False):
        raise ConfigError(
            "dilo sim does not model outer.overlap (its exchange runs on a background thread of a real "
            "process group): set outer.overlap=false, or run it with `dilo run`"
        )
    if getattr(cfg.outer, "streaming", False):
        raise ConfigError(
            "dilo sim does not model Streaming DiLoCo (its fragments are exchanged on a background thread "
            "of a real process group): set outer.fragments=1 and outer.fragment_delay=0, or use `dilo run`"
        )
    cfg = cfg.model_copy(update={"log": cfg.log.model_copy(update={"progress": False})})
    n = cfg.workers
    sched = Scheduler()
    net = Network(cfg.sim.bandwidth_mbps, cfg.sim.latency_ms)
    elastic = cfg.membership.kind == "coordinator"
    coord: Coordinator | None = None
    post: Post | None = None
    hub: Hub | None = None
    if elastic:
        coord = Coordinator(cfg, inproc=True, clock=lambda: sched.now)
        post = Post(sched, coord, net)
        sched.on_crash = lambda w: post.alive.discard(f"sim{w}")  # it stops heartbeating
    else:
        hub = Hub(sched, n, net)
    sessions = {w: _sessions(cfg, w) for w in range(n)}
    for e in cfg.sim.events:
        if e.action == "crash":
            sched.crash_at[e.worker] = min(e.at_s, sched.crash_at.get(e.worker, math.inf))
    stops = {w: [threading.Event() for _ in sessions[w]] for w in range(n)}
    summaries: dict[int, dict[str, Any]] = {}
    cpu = torch.device("cpu")

    def worker(w: int) -> None:
        clock = VirtualClock(
            sched, cfg.sim.step_s * cfg.heterogeneity.slowdown_of(w), cfg.sim.jitter, cfg.seed * 7919 + w
        )
        for k, (joins, _) in enumerate(sessions[w]):
            if k:  # away since it left; it comes back as a new process would, and joins the run as it is now
                sched.advance(max(0.0, joins - sched.vt[w]))
            summaries[w] = session(w, clock, stops[w][k])

    def session(w: int, clock: VirtualClock, stop: threading.Event) -> dict[str, Any]:
        world: World
        if post is not None:  # the real elastic world, its coordinator link and clock injected
            link = post

            def connect(cfg: RunConfig, worker_id: str, max_bytes: int, body: dict[str, Any]) -> LocalStarClient:
                return LocalStarClient(
                    link, cfg.membership, worker_id, run=cfg.name, fingerprint=cfg.fingerprint(), thread=w
                )

            world = ElasticWorld(cfg, f"sim{w}", connect=connect, clock=clock, device=cpu)
        else:  # the real static world over the in-process collectives
            assert hub is not None
            world = StaticWorld(cfg, Placement(w, n), transport=SimTransport(hub, w), clock=clock, device=cpu)
        return train(cfg, world, stop=stop)

    for w in range(n):
        for (_, leaves), stop in zip(sessions[w], stops[w]):
            if leaves is not None:
                sched.at(leaves, functools.partial(_set, stop))
        sched.spawn(w, functools.partial(worker, w), at=sessions[w][0][0])
    t0 = time.perf_counter()
    sched.run(timeout_s=timeout_s)
    errors = {w: e for w, e in sched.errors.items() if not isinstance(e, Deadlock)}
    if errors:
        w, err = min(errors.items())
        raise DiloError(f"virtual worker {w} failed: {type(err).__name__}: {err}") from err
    if sched.deadlock is not None:
        raise sched.deadlock
    result = {
        "name": cfg.name,
        "strategy": cfg.outer.kind,
        "update": getattr(cfg.outer, "update", None),
        "workers": n,
        "virtual_s": max(sched.vt.values(), default=0.0),
        "real_s": time.perf_counter() - t0,
        "crashed": sorted(w for w in sched.crash_at if w not in summaries),
        "summaries": {str(w): s for w, s in sorted(summaries.items())},
        "coordinator": coord.status() if coord is not None else None,
    }
    out = cfg.run_dir / "sim.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def _sessions(cfg: RunConfig, w: int) -> list[tuple[float, float | None]]:
    """Worker w's stays in the run from sim.events: (joins at, leaves at or None), in time order.
    A worker is there from 0 unless its first event is a join; it may leave and join again."""
    events = sorted((e for e in cfg.sim.events if e.worker == w), key=lambda e: e.at_s)
    out: list[tuple[float, float | None]] = []
    joins: float | None = None if events and events[0].action == "join" else 0.0
    for e in events:
        if e.action == "join":
            if joins is not None:
                raise ConfigError(
                    f"sim.events: worker {w} joins at {e.at_s:g} s while it is in the run: give it a leave before"
                )
            joins = e.at_s
        elif joins is None:
            raise ConfigError(f"sim.events: worker {w} is not in the run at {e.at_s:g} s, so it cannot {e.action}")
        elif e.action == "leave":
            out.append((joins, e.at_s))
            joins = None
        else:  # crash: it stops dead, for good
            if e is not events[-1]:
                raise ConfigError(f"sim.events: worker {w} crashes at {e.at_s:g} s and does not come back")
            out.append((joins, None))
            joins = None
    if joins is not None:
        out.append((joins, None))
    return out


def _set(event: threading.Event, t: float) -> None:
    event.set()


def format_result(result: dict[str, Any], run_dir: Path) -> str:
    vals = [s.get("val_loss") for s in result["summaries"].values() if s.get("val_loss") is not None]
    lines = [
        f"dilo sim: {result['strategy']}{' / ' + result['update'] if result['update'] else ''}, "
        f"{result['workers']} virtual workers",
        f"  virtual time {result['virtual_s']:.1f} s in {result['real_s']:.1f} s of real time",
        f"  final validation loss {min(vals):.4f} (best worker), {max(vals):.4f} (worst)" if vals else "",
        f"  logs in {run_dir / 'logs'}, summary in {run_dir / 'sim.json'}",
    ]
    return "\n".join(x for x in lines if x)
