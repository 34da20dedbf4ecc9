"""The static outer step's cost, against torch's PeriodicModelAverager in the same run.

    .venv/bin/python scripts/bench_sync.py [--params 10e6] [--workers 2] [--rounds 12]

Each arm runs `--workers` processes over Gloo on loopback with a model of `--params` fp32
parameters (512 x 512 matrices) and reports the median seconds per round, after two warm-up
rounds, of what the training loop waits for:

- dilo DiLoCo, blocking, with the fp32, int8 and int4 codecs: the whole outer step (pseudo-
  gradient, finiteness check, exchange, outer Nesterov, reset, anchor digest);
- dilo DiLoCo with `outer.overlap`: the same step with the exchange behind the next round, with
  `--compute-s` seconds of emulated inner compute (a sleep, which releases the CPU like a GPU
  step would) between rounds, so that the exchange has something to hide behind;
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

from dilo.config import CodecSpec  # noqa: E402
from dilo.outer.base import Tail  # noqa: E402
from dilo.outer.diloco import DiLoCo  # noqa: E402
from dilo.transport.torch_dist import TorchDistTransport, connect_store  # noqa: E402

WARMUP = 2


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


def _entry(fn, rank, args, q) -> None:
    torch.set_num_threads(1)
    q.put((rank, fn(rank, *args)))


def run(fn, size: int, args: tuple, port: int) -> float:
    store = None
    if fn is dilo_arm:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(fn, r, (size, port, *args), q)) for r in range(size)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    del store
    return statistics.median(results[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=10e6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--compute-s", type=float, default=0.5)
    args = ap.parse_args()
    n, w, rounds = int(args.params), args.workers, args.rounds
    port = 29600
    rows: dict[str, float] = {}
    rows["torch PeriodicModelAverager"] = run(averager_arm, w, (n, rounds, 0.0), port)
    for codec in ("none", "int8", "int4"):
        port += 1
        rows[f"dilo static, {'fp32' if codec == 'none' else codec}"] = run(
            dilo_arm, w, (n, codec, False, rounds, 0.0), port
        )
    port += 1
    rows["dilo static, fp32, blocking, with compute"] = run(
        dilo_arm, w, (n, "none", False, rounds, args.compute_s), port
    )
    port += 1
    rows["dilo static, fp32, outer.overlap, with compute"] = run(
        dilo_arm, w, (n, "none", True, rounds, args.compute_s), port
    )
    base = rows["torch PeriodicModelAverager"]
    blocking = rows["dilo static, fp32, blocking, with compute"]
    table = [
        {
            "arm": arm,
            "s_per_round": round(s, 4),
            "vs_averager": round(s / base, 3),
            "vs_blocking_with_compute": round(s / blocking, 3) if "compute" in arm else None,
        }
        for arm, s in rows.items()
    ]
    real = sum(p.numel() for p in build_model(n).parameters())
    result = {"machine": machine(), "params": real, "workers": w, "rounds": rounds, "compute_s": args.compute_s,
              "arms": table}  # fmt: skip
    write_json("sync", result)
    body = (
        f"`scripts/bench_sync.py`: {w} processes over Gloo on loopback, {real / 1e6:.1f}M fp32 parameters, "
        f"median of {rounds - WARMUP - 1} rounds: the seconds per round the training loop waits for the outer "
        f"step, as a ratio to torch's PeriodicModelAverager (one parameter average) in the same run. The "
        f"overlap arms sleep {args.compute_s} s between rounds as emulated compute.\n\n"
        + markdown_table(
            ["arm", "s / round", "vs PeriodicModelAverager", "vs blocking, with compute"],
            [
                [
                    r["arm"],
                    f"{r['s_per_round']:.4f}",
                    f"{r['vs_averager']:.2f}x",
                    "" if r["vs_blocking_with_compute"] is None else f"{r['vs_blocking_with_compute']:.3f}x",
                ]
                for r in table
            ],
        )  # fmt: skip
    )
    update_benchmarks_md("sync", body)
    print(body)


if __name__ == "__main__":
    main()
