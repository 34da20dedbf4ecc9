"""The `dilo` command.

    dilo run CONFIG [--workers N] [--island-ranks K] [--a.b=c]  N local workers on loopback (the main job), each
                                                              an island of K data-parallel ranks
    dilo coordinator CONFIG [--resume] [overrides]            serve an elastic run (membership.kind=coordinator)
    dilo worker CONFIG [--id ID] [overrides]                  one elastic worker: join, train, leave
    dilo status ADDRESS                                       members, rounds, bytes of a running coordinator
    dilo sim CONFIG [--workers N] [overrides]                 k virtual workers in one process, virtual clock
    dilo merge CKPT... --out FILE [--variance-corrected]     average independently trained checkpoints
    dilo keys DIR                                             CURVE key pairs for encrypted ZeroMQ traffic
    dilo export CKPT --out DIR [--config CONFIG]              a checkpoint as a Hugging Face model directory
        [--adapter-only]                                      (LoRA adapters merged in, or the peft adapter alone)
    dilo sample CKPT --prompt TEXT [--tokens N ...]           continue a prompt with a checkpoint's model
    dilo data prepare INPUT... --out DIR [--train-bpe N]      pre-tokenize files into token shards
    dilo config show CONFIG [--section.key=value ...]         the resolved configuration
    dilo config schema                                         JSON schema of every key, with help

`dilo run` is a small launcher: it validates the configuration, serves the rendezvous store
itself and starts N `python -m dilo.train` processes with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, the same environment torchrun gives; with membership.kind = "coordinator" it
also starts a coordinator on loopback and the workers join it. Ctrl+C asks every worker to
finish the current round and save a checkpoint; a second Ctrl+C kills them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

from dilo.config import load, schema
from dilo.errors import ConfigError, DiloError
from dilo.process import apply_threads, install_stop_handlers, setup_logging

log = logging.getLogger("dilo")

OVERRIDES = (
    "Any configuration key can be set after the CONFIG file as --section.key=value, e.g. --steps=200, "
    "--outer.lr=0.5, --coordinator.bind=tcp://0.0.0.0:29600, --membership.address=tcp://HOST:29600 "
    "(`dilo config schema` lists every key)."
)


def _cmd_config(args: argparse.Namespace, rest: list[str]) -> int:
    if args.action == "schema":
        print(json.dumps(schema(), indent=2))
        return 0
    if not args.config:
        raise DiloError("dilo config show needs a CONFIG file")
    cfg = load(args.config, rest)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    k = args.island_ranks
    if k < 1:
        raise DiloError(f"--island-ranks must be at least 1, got {k}")
    # the config fails here, before any process or socket starts; a static world of islands is
    # checked with its island_ranks (transport.island_shard needs them), an elastic one without
    with_islands = [*rest, f"--transport.island_ranks={k}"]
    try:
        cfg = load(args.config, with_islands) if k > 1 else load(args.config, rest)
    except ConfigError as e:
        cfg = load(args.config, rest)
        if cfg.membership.kind != "coordinator":
            raise e from None
    elastic = cfg.membership.kind == "coordinator"
    if k > 1 and not elastic:
        rest = with_islands
    if k > 1 and cfg.outer.kind == "gossip":
        raise DiloError("--island-ranks: outer.kind='gossip' runs one rank per worker")
    n = args.workers or cfg.workers
    if n < 1:
        raise DiloError(f"--workers must be at least 1, got {n}")
    threads = max(1, (os.cpu_count() or 1) // (n * k))
    base_env = dict(os.environ, DILO_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    procs: list[subprocess.Popen[bytes]] = []
    stores: list[Any] = []
    coordinator: subprocess.Popen[bytes] | None = None
    try:
        if elastic:
            port = _free_port()
            addr = f"tcp://127.0.0.1:{port}"
            rest = [
                *rest,
                f"--coordinator.bind={addr}",
                f"--membership.address={addr}",
                f"--workers={n}",
                f"--membership.start_quorum={n}",
            ]
            # its own session: a Ctrl+C in the terminal stops the workers, which leave; the launcher
            # then stops the coordinator, which checkpoints
            coordinator = subprocess.Popen(
                [sys.executable, "-m", "dilo.cli", "coordinator", args.config, *rest],
                env=base_env,
                start_new_session=True,
            )
            procs.append(coordinator)
        else:
            if cfg.outer.kind == "gossip" and not cfg.membership.peers:
                # static gossip on loopback: one listening port per worker
                peers = ", ".join(f'"tcp://127.0.0.1:{_free_port()}"' for _ in range(n))
                rest = [*rest, f"--membership.peers=[{peers}]", f"--workers={n}"]
            # one world of n * k ranks, as torchrun would number them: island i holds ranks i*k .. i*k+k-1
            stores.append(_store(n * k))
            base_env.update(WORLD_SIZE=str(n * k), MASTER_ADDR="127.0.0.1", DILO_STORE_HOSTED="1")
            base_env.update(MASTER_PORT=str(stores[0].port))
        if elastic and k > 1:  # every island is a world of its own (one torchrun launch each)
            stores.extend(_store(k) for _ in range(n))
        islands = f" of {k} ranks each" if k > 1 else ""
        what = f"{cfg.outer.kind}, {cfg.membership.kind} membership, logs in {cfg.run_dir}"
        print(f"dilo run: {n} workers{islands}, {what}", file=sys.stderr)
        workers = []
        for island in range(n):
            for local in range(k):
                env = dict(base_env, DILO_WORKER_ID=f"w{island}", DILO_ISLAND=str(island))
                if elastic and k > 1:
                    env.update(RANK=str(local), WORLD_SIZE=str(k), LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(k))
                    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(stores[island].port), DILO_STORE_HOSTED="1")
                elif elastic:
                    env.update(RANK=str(island), LOCAL_RANK=str(island), LOCAL_WORLD_SIZE=str(n))
                else:
                    rank = island * k + local
                    env.update(RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n * k))
                quiet = elastic and (island or local)  # static worlds print from global rank 0 by themselves
                extra = ["--log.progress=false", "--log.plot=false"] if quiet else []
                cmd = [sys.executable, "-m", "dilo.train", args.config, *rest, *extra]
                workers.append(subprocess.Popen(cmd, env=env))
        procs.extend(workers)
        return _supervise(workers, procs, coordinator)
    finally:
        # whatever happened (a worker failed, the launcher was interrupted, an error in here), no
        # process outlives `dilo run`: the coordinator checkpoints on SIGTERM, stragglers are killed
        _stop(procs, coordinator)
        del stores


def _stop(procs: list[subprocess.Popen[bytes]], coordinator: subprocess.Popen[bytes] | None) -> None:
    for p in procs:
        if p.poll() is None and p is not coordinator:
            p.kill()
    if coordinator is not None and coordinator.poll() is None:
        coordinator.send_signal(signal.SIGTERM)
        try:
            coordinator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            coordinator.kill()
    for p in procs:
        p.wait()


def _store(world: int) -> Any:
    """A rendezvous store on loopback, served by the launcher (as torchrun's agent serves one)."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]  # public, but not re-exported

    return TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))


def _supervise(
    workers: list[subprocess.Popen[bytes]],
    procs: list[subprocess.Popen[bytes]],
    coordinator: subprocess.Popen[bytes] | None = None,
) -> int:
    """Wait for the workers; on a failure (a worker's, or the coordinator's) stop the rest; Ctrl+C
    once: stop after the round."""
    # a SIGTERM to the launcher (Slurm, a supervisor) behaves like Ctrl+C
    signal.signal(signal.SIGTERM, _raise_interrupt)
    interrupted = 0
    failed = None
    while True:
        try:
            codes = [p.poll() for p in workers]
            bad = [(f"worker {i}", c) for i, c in enumerate(codes) if c not in (None, 0, 130)]
            if coordinator is not None and coordinator.poll() not in (None, 0) and not interrupted:
                bad.append(("the coordinator", coordinator.returncode))
            if bad and failed is None:
                failed = bad[0]
                print(f"dilo run: {failed[0]} exited with code {failed[1]}; stopping the others", file=sys.stderr)
                for p in workers:
                    if p.poll() is None:
                        p.terminate()
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and any(p.poll() is None for p in workers):
                    time.sleep(0.1)
                for p in workers:
                    if p.poll() is None:
                        p.kill()
            if all(p.poll() is not None for p in workers):  # every worker is done (or failed, said above)
                break
            time.sleep(0.1)
        except KeyboardInterrupt:
            interrupted += 1
            if interrupted == 1:
                # the workers got the same SIGINT from the terminal; they stop after this round
                print("\ndilo run: stopping after the current round (Ctrl+C again to kill now)", file=sys.stderr)
                for p in workers:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            else:
                for p in procs:
                    p.kill()
    codes = [p.returncode for p in workers]
    if failed is not None:
        return 1
    if any(c == 130 for c in codes):
        return 130
    return 0 if all(c == 0 for c in codes) else 1


def _cmd_coordinator(args: argparse.Namespace, rest: list[str]) -> int:
    from dilo import wire
    from dilo.coordinator import Coordinator

    cfg = load(args.config, rest)
    secret = wire.load_secret(file=cfg.membership.secret_file or None)
    coord = Coordinator(cfg, resume=args.resume, secret=secret)
    stop = install_stop_handlers()
    print(
        f"dilo coordinator: run {cfg.name!r} at version {coord.version}, listening on {cfg.coordinator.bind}; "
        f"workers connect with --membership.address={coord.address}"
        + (" (MAC on)" if secret else "")
        + (" (CURVE on)" if cfg.membership.curve_dir else ""),
        file=sys.stderr,
        flush=True,
    )
    coord.serve(stop)
    print(f"dilo coordinator: stopped at version {coord.version}; checkpoint in {coord.ckpt_dir}", file=sys.stderr)
    return 0


def _cmd_worker(args: argparse.Namespace, rest: list[str]) -> int:
    import dilo
    from dilo.train import train

    cfg = load(args.config, [*rest, "--membership.kind=coordinator"])
    stop = install_stop_handlers()
    apply_threads()
    # a torchrun launch of several ranks is one island; a gossip worker finds its peers via the tracker
    world = dilo.init(cfg, worker_id=args.id)
    summary = train(cfg, world, stop=stop)
    return 130 if summary["stopped"] else 0


def _cmd_status(args: argparse.Namespace, rest: list[str]) -> int:
    from dilo import wire
    from dilo.transport.zmq_star import status

    st = status(args.address, secret=wire.load_secret(file=args.secret_file), curve_dir=args.curve_dir or "")
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(
        f"run {st['run']}: version {st['version']}, round {st['round']}, epoch {st['epoch']}, "
        f"{len(st['members'])} members, in {st['bytes_in']:,} B, out {st['bytes_out']:,} B, late pushes {st['late']} "
        f"({st.get('late_folded', 0)} folded into later rounds)"
    )
    print(f"rejected messages: {st['rejected'] or 'none'}")
    print(f"{'worker':<24}{'last heard':>12}{'pushes':>8}{'bytes in':>16}{'bytes out':>16}{'steps/s':>10}")
    speeds = {m["worker"]: m["steps_per_s"] for m in st["members"] if m.get("steps_per_s")}
    # the slowest worker holds every synchronous round back: name it (only when there is a choice)
    slowest = min(speeds, key=lambda w: speeds[w]) if len(speeds) > 1 else None
    for m in st["members"]:
        speed = f"{speeds[m['worker']]:>10.2f}" if m["worker"] in speeds else f"{'-':>10}"
        mark = "  <- slowest" if m["worker"] == slowest else ""
        print(
            f"{m['worker']:<24}{m['last_seen_s']:>10.1f} s{m['pushes']:>8}{m['bytes_in']:>16,}{m['bytes_out']:>16,}"
            f"{speed}{mark}"
        )
    return 0


def _cmd_sim(args: argparse.Namespace, rest: list[str]) -> int:
    from dilo.sim import format_result, simulate

    overrides = [*rest, *([f"--workers={args.workers}"] if args.workers else [])]
    cfg = load(args.config, overrides)
    result = simulate(cfg)
    print(format_result(result, cfg.run_dir), file=sys.stderr)
    return 0


def _cmd_merge(args: argparse.Namespace, rest: list[str]) -> int:
    from dilo.merge import main as merge_main

    return merge_main(rest)


def _cmd_keys(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from dilo import keys

    written = keys.generate(Path(args.dir), overwrite=args.force)
    print(
        f"dilo keys: wrote {', '.join(str(p) for p in written)} (give workers client.key and server.pub; "
        f"set membership.curve_dir)"
    )
    return 0


def _cmd_data(args: argparse.Namespace, rest: list[str]) -> int:
    from dilo.data.prepare import main as data_main

    return data_main(rest)


def _cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from dilo.export import export

    written = export(Path(args.ckpt), Path(args.out), config=args.config, adapter_only=args.adapter_only)
    print(f"dilo export: wrote {' and '.join(written)} to {args.out}", file=sys.stderr)
    return 0


def _cmd_sample(args: argparse.Namespace, rest: list[str]) -> int:
    from pathlib import Path

    from dilo.sample import sample

    text = sample(
        Path(args.ckpt),
        args.prompt,
        args.tokens,
        config=args.config,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(args.prompt + text)
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dilo", description="Train PyTorch models across poorly connected islands.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="train with N local worker processes on loopback", epilog=OVERRIDES)
    p_run.add_argument("config", help="TOML file, e.g. configs/quickstart.toml")
    p_run.add_argument("--workers", type=int, default=None, help="number of workers (default: the config's `workers`)")
    p_run.add_argument(
        "--island-ranks",
        type=int,
        default=1,
        help="ranks per worker: each worker is an island of this many data-parallel ranks (default 1)",
    )
    p_co = sub.add_parser("coordinator", help="serve an elastic run", epilog=OVERRIDES)
    p_co.add_argument("config")
    p_co.add_argument("--resume", action="store_true", help="restart from the newest coordinator checkpoint")
    p_wk = sub.add_parser("worker", help="one elastic worker that joins a coordinator", epilog=OVERRIDES)
    p_wk.add_argument("config")
    p_wk.add_argument("--id", default=None, help="stable worker id (default: membership.worker_id, DILO_WORKER_ID)")
    p_st = sub.add_parser("status", help="ask a running coordinator how it is doing")
    p_st.add_argument("address", help="tcp://HOST:PORT")
    p_st.add_argument("--secret-file", default=None)
    p_st.add_argument("--curve-dir", default=None)
    p_st.add_argument("--json", action="store_true")
    p_sim = sub.add_parser("sim", help="simulate N virtual workers in one process on a virtual clock", epilog=OVERRIDES)
    p_sim.add_argument("config")
    p_sim.add_argument("--workers", type=int, default=None, help="virtual workers (default: the config's `workers`)")
    sub.add_parser(
        "merge", help="average checkpoints of independently trained models (dilo merge --help)", add_help=False
    )
    p_keys = sub.add_parser("keys", help="generate CURVE key pairs")
    p_keys.add_argument("dir")
    p_keys.add_argument("--force", action="store_true", help="overwrite existing key files")
    sub.add_parser("data", help="prepare token shards (dilo data prepare --help)", add_help=False)
    ckpt_help = "checkpoint file <run>/checkpoints/worker0/round_N.safetensors, or a checkpoints or run directory"
    config_help = "the run's TOML config (default: the one in the run's logs)"
    p_exp = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory")
    p_exp.add_argument("ckpt", help=ckpt_help)
    p_exp.add_argument("--out", required=True, help="output directory (AutoModelForCausalLM.from_pretrained reads it)")
    p_exp.add_argument("--config", default=None, help=config_help)
    p_exp.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA run: write only the peft adapter (PeftModel.from_pretrained over the base model reads it); "
        "by default its adapters are merged into the base weights and a plain model is written",
    )
    p_smp = sub.add_parser("sample", help="continue a prompt with a checkpoint's model")
    p_smp.add_argument("ckpt", help=ckpt_help)
    p_smp.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p_smp.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    p_smp.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p_smp.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest; 0: all (default 50)")
    p_smp.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p_smp.add_argument("--config", default=None, help=config_help)
    p_cfg = sub.add_parser("config", help="show the resolved configuration or its schema", epilog=OVERRIDES)
    p_cfg.add_argument("action", choices=["show", "schema"])
    p_cfg.add_argument("config", nargs="?", help="TOML file (for show)")
    args, rest = parser.parse_known_args(argv)
    try:
        setup_logging()
        takes_overrides = ["run", "coordinator", "worker", "sim", "merge", "data"]
        if args.command == "config" and args.action == "show":
            takes_overrides.append("config")
        if rest and args.command not in takes_overrides:
            raise DiloError(f"dilo {args.command}: unknown arguments {' '.join(rest)} (see dilo {args.command} --help)")
        handlers = {
            "run": _cmd_run,
            "coordinator": _cmd_coordinator,
            "worker": _cmd_worker,
            "status": _cmd_status,
            "keys": _cmd_keys,
            "sim": _cmd_sim,
            "merge": _cmd_merge,
            "export": _cmd_export,
            "sample": _cmd_sample,
            "config": _cmd_config,
            "data": _cmd_data,
        }
        return handlers[args.command](args, rest)
    except DiloError as e:
        print(f"dilo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
