"""The `dilo` command.

    dilo run CONFIG [--workers N] [--section.key=value ...]   N local workers on loopback (the main job)
    dilo config show CONFIG [--section.key=value ...]         the resolved configuration
    dilo config schema                                         JSON schema of every key, with help

`dilo run` is a small launcher: it validates the configuration, serves the rendezvous store
itself and starts N `python -m dilo.train` processes with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, the same environment torchrun gives. Ctrl+C asks every worker to finish the
current round and save a checkpoint; a second Ctrl+C kills them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

from dilo.config import load, schema
from dilo.errors import DiloError

log = logging.getLogger("dilo")


def setup_logging() -> None:
    level = os.environ.get("DILO_LOG", "WARNING").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def install_stop_handlers() -> threading.Event:
    """First SIGINT/SIGTERM: stop after the current round. Second SIGINT: abort now."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return stop


def _cmd_config(args: argparse.Namespace, rest: list[str]) -> int:
    if args.action == "schema":
        print(json.dumps(schema(), indent=2))
        return 0
    if not args.config:
        raise DiloError("dilo config show needs a CONFIG file")
    cfg = load(args.config, rest)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def _cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    import torch.distributed as dist

    cfg = load(args.config, rest)  # fails here, before any process or socket starts
    n = args.workers or cfg.workers
    if n < 1:
        raise DiloError(f"--workers must be at least 1, got {n}")
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    threads = max(1, (os.cpu_count() or 1) // n)
    base_env = dict(
        os.environ,
        WORLD_SIZE=str(n),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(store.port),
        DILO_STORE_HOSTED="1",
        DILO_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
    )
    print(f"dilo run: {n} workers, {cfg.outer.kind}, logs in {cfg.run_dir}", file=sys.stderr)
    procs = []
    for rank in range(n):
        env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n))
        procs.append(subprocess.Popen([sys.executable, "-m", "dilo.train", args.config, *rest], env=env))
    # a SIGTERM to the launcher (Slurm, a supervisor) behaves like Ctrl+C
    signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = 0
    failed = None
    while True:
        try:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, 130)]
            if bad and failed is None:
                failed = bad[0]
                print(
                    f"dilo run: worker {failed[0]} exited with code {failed[1]}; stopping the others", file=sys.stderr
                )
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.1)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        except KeyboardInterrupt:
            interrupted += 1
            if interrupted == 1:
                # the workers got the same SIGINT from the terminal; they stop after this round
                print("\ndilo run: stopping after the current round (Ctrl+C again to kill now)", file=sys.stderr)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            else:
                for p in procs:
                    p.kill()
    codes = [p.returncode for p in procs]
    if failed is not None:
        return 1
    if any(c == 130 for c in codes):
        return 130
    return 0 if all(c == 0 for c in codes) else 1


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dilo", description="Train PyTorch models across poorly connected islands.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train with N local worker processes on loopback")
    p_run.add_argument("config", help="TOML file, e.g. configs/quickstart.toml")
    p_run.add_argument("--workers", type=int, default=None, help="number of workers (default: the config's `workers`)")
    p_cfg = sub.add_parser("config", help="show the resolved configuration or its schema")
    p_cfg.add_argument("action", choices=["show", "schema"])
    p_cfg.add_argument("config", nargs="?", help="TOML file (for show)")
    args, rest = parser.parse_known_args(argv)
    setup_logging()
    try:
        if args.command == "run":
            return _cmd_run(args, rest)
        return _cmd_config(args, rest)
    except DiloError as e:
        print(f"dilo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
