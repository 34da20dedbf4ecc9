"""The static outer step's cost, against torch's PeriodicModelAverager in the same run.

    .venv/bin/python scripts/bench_sync.py [--configs 10e6x2,10e6x4,100e6x2] [--rounds 12]

For each configuration (parameters x workers), each arm runs that many worker processes on
loopback with a model of about that many fp32 parameters (512 x 512 matrices; the elastic arms
a GPT of 512-wide blocks, which a coordinator can build) and reports the median seconds per
round, after two warm-up rounds, of what the training loop waits for:

- dilo DiLoCo, blocking, with the fp32, int8 and int4 codecs: the whole outer step (pseudo-
  gradient, finiteness check, exchange, outer Nesterov, reset, anchor digest);
- dilo DiLoCo with `outer.overlap`: the same step with the exchange behind the next round, with
  `--compute-s` seconds of emulated inner compute (a sleep, which releases the CPU like a GPU
  step would) between rounds, so that the exchange has something to hide behind;
- dilo elastic: the same DiLoCo step through a real coordinator (a thread of the parent
  process, its defaults: a checkpoint every version, in the background; message MACs on),
  fp32, blocking and with outer.overlap;
- torch.distributed.algorithms.model_averaging's PeriodicModelAverager (part of torch itself, so
  it runs in dilo's environment): one parameter average over the default group.

Writes scripts/results/sync.json and the "sync" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import machine, markdown_table, update_benchmarks_md, write_json  # noqa: E402

from dilo.config import CodecSpec, from_dict  # noqa: E402
from dilo.coordinator import Coordinator  # noqa: E402
from dilo.model import build_model as build_gpt  # noqa: E402
from dilo.outer.base import Tail  # noqa: E402
from dilo.outer.diloco import DiLoCo  # noqa: E402
from dilo.outer.star import StarDiLoCo  # noqa: E402
from dilo.transport.torch_dist import TorchDistTransport, connect_store  # noqa: E402
from dilo.transport.zmq_star import StarClient  # noqa: E402

WARMUP = 2
SECRET = b"bench-sync-secret-0123456789abcdef"


def build_model(params: int) -> nn.Module:
    d = 512
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d, d, bias=False) for _ in range(max(1, params // (d * d)))])


def perturb(model: nn.Module, rank: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * (rank + 1))


def dilo_arm(rank: int, size: int, port: int, params: int, codec: str, overlap: bool, rounds: int, compute_s: float):
    store = connect_store("127.0.0.1", port, rank, size, hosted=True)
    t = TorchDistTransport(store, rank, size)
    model = build_model(params)
    outer = DiLoCo(
        model, t, inner_steps=1, lr=0.7, momentum=0.9, nesterov=True, codec=CodecSpec(kind=codec), overlap=overlap
    )
    outer.start(model, resumed=False)
    waits = []
    for r in range(rounds):
        time.sleep(compute_s)
        perturb(model, rank)
        t0 = time.perf_counter()
        outer.sync(model, tail=Tail(1.0, True, False, 10, last=r == rounds - 1))
        waits.append(time.perf_counter() - t0)
    return waits[WARMUP:-1]  # the last round of an overlapped run exchanges in the round


def averager_arm(rank: int, size: int, port: int, params: int, rounds: int, compute_s: float):
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    model = build_model(params)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the averager averages only parameters that have a gradient
    averager = PeriodicModelAverager(period=1, warmup_steps=0)
    waits = []
    for _ in range(rounds):
        time.sleep(compute_s)
        perturb(model, rank)
        t0 = time.perf_counter()
        averager.average_parameters(model.parameters())
        waits.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return waits[WARMUP:-1]


def elastic_config(params: int, workers: int, port: int, overlap: bool):
    layers = max(1, round(params / (12 * 512 * 512)))
    return from_dict(
        {
            "name": "bench-sync",
            "out_dir": f"/tmp/dilo-bench-sync/{port}",
            "workers": workers,
            "model": {"n_layer": layers, "d_model": 512, "n_head": 8, "context": 64},
            "data": {"seq_len": 64},
            "outer": {"kind": "diloco", "inner_steps": 1, "lr": 0.7, "momentum": 0.9, "overlap": overlap},
            "membership": {"kind": "coordinator", "address": f"tcp://127.0.0.1:{port}", "start_quorum": workers,
                           "round_timeout_s": 120.0, "request_timeout_s": 120.0},
            "coordinator": {"bind": f"tcp://127.0.0.1:{port}"},
        }
    )  # fmt: skip


def elastic_arm(rank: int, size: int, port: int, params: int, overlap: bool, rounds: int, compute_s: float):
    cfg = elastic_config(params, size, port, overlap)
    model = build_gpt(cfg.model, cfg.seed)
    client = StarClient(cfg.membership, f"w{rank}", run=cfg.name, fingerprint=cfg.fingerprint(), secret=SECRET,
                        max_message_bytes=1 << 31)  # fmt: skip
    outer = StarDiLoCo(model, client, cfg)
    outer.join(model)
    waits = []
    try:
        for r in range(rounds):
            time.sleep(compute_s)
            perturb(model, rank)
            t0 = time.perf_counter()
            tail = Tail(1.0, True, False, 10, steps=1, inner_s=max(compute_s, 1e-3), last=r == rounds - 1)
            outer.sync(model, tail=tail)
            waits.append(time.perf_counter() - t0)
    finally:
        client.leave()
        client.close()
    return waits[WARMUP:-1]


def _entry(fn, rank, args, q) -> None:
    torch.set_num_threads(1)
    q.put((rank, fn(rank, *args)))


def run(fn, size: int, args: tuple, port: int) -> float:
    store, coord, stop, thread = None, None, None, None
    if fn is dilo_arm:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=True, wait_for_workers=False)
    if fn is elastic_arm:
        import threading

        coord = Coordinator(elastic_config(args[0], size, port, args[1]), secret=SECRET)
        stop = threading.Event()
        thread = threading.Thread(target=coord.serve, args=(stop,), daemon=True)
        thread.start()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, (size, port, *args), q)) for r in range(size)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1200) for _ in procs)
    for p in procs:
        p.join()
    if stop is not None and thread is not None:
        stop.set()
        thread.join(timeout=60)
    del store, coord
    return statistics.median(results[0])


def bench(n: int, w: int, rounds: int, compute_s: float, port: int) -> list[dict]:
    rows: dict[str, float] = {}
    rows["torch PeriodicModelAverager"] = run(averager_arm, w, (n, rounds, 0.0), port)
    for codec in ("none", "int8", "int4"):
        port += 1
        rows[f"dilo static, {'fp32' if codec == 'none' else codec}"] = run(
            dilo_arm, w, (n, codec, False, rounds, 0.0), port
        )
    port += 1
    rows["dilo elastic, fp32"] = run(elastic_arm, w, (n, False, rounds, 0.0), port)
    for kind, fn in (("static", dilo_arm), ("elastic", elastic_arm)):
        for overlap in (False, True):
            port += 1
            extra = (n, "none", overlap, rounds, compute_s) if fn is dilo_arm else (n, overlap, rounds, compute_s)
            name = f"dilo {kind}, fp32, {'outer.overlap' if overlap else 'blocking'}, with compute"
            rows[name] = run(fn, w, extra, port)
    base = rows["torch PeriodicModelAverager"]
    out = []
    for arm, s in rows.items():
        blocking = rows[f"dilo {'elastic' if 'elastic' in arm else 'static'}, fp32, blocking, with compute"]
        out.append({
            "params": n, "workers": w, "arm": arm, "s_per_round": round(s, 4), "vs_averager": round(s / base, 3),
            "vs_blocking_with_compute": round(s / blocking, 3) if "compute" in arm else None,
        })  # fmt: skip
        print(f"[bench] {n / 1e6:.0f}M x {w}: {arm}: {s:.4f} s", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="10e6x2,10e6x4,100e6x2", help="parameters x workers, comma-separated")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--compute-s", type=float, default=0.5)
    args = ap.parse_args()
    rows, port = [], 29600
    configs = [(int(float(c.split("x")[0])), int(c.split("x")[1])) for c in args.configs.split(",")]
    for n, w in configs:
        rows += bench(n, w, args.rounds, args.compute_s, port)
        port += 20
    result = {"machine": machine(), "rounds": args.rounds, "compute_s": args.compute_s, "arms": rows}
    write_json("sync", result)
    body = (
        f"`scripts/bench_sync.py`: worker processes on loopback (static arms over Gloo, elastic arms through a "
        f"coordinator with its defaults: a checkpoint every version, message MACs), median of "
        f"{args.rounds - WARMUP - 1} rounds: the seconds per round the training loop waits for the outer step, as "
        f"a ratio to torch's PeriodicModelAverager (one parameter average over Gloo) with the same parameters and "
        f'workers in the same run. The "with compute" arms sleep {args.compute_s} s between rounds as '
        "emulated compute, so that outer.overlap has something to hide behind.\n\n"
        + markdown_table(
            ["parameters", "workers", "arm", "s / round", "vs PeriodicModelAverager", "vs blocking, with compute"],
            [
                [
                    f"{r['params'] / 1e6:.0f}M",
                    str(r["workers"]),
                    r["arm"],
                    f"{r['s_per_round']:.4f}",
                    f"{r['vs_averager']:.2f}x",
                    "" if r["vs_blocking_with_compute"] is None else f"{r['vs_blocking_with_compute']:.3f}x",
                ]
                for r in rows
            ],
        )  # fmt: skip
    )
    update_benchmarks_md("sync", body)
    print(body)


if __name__ == "__main__":
    main()
