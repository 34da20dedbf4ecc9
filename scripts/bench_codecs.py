"""Codec throughput, compression ratio and error on one large fp32 tensor of N(0, 1) values.

    python scripts/bench_codecs.py [--mb 64] [--repeats 5]

Throughput is GB/s of fp32 input, best of `repeats`, and is also given as a ratio to torch.clone
of the same tensor timed in the same run (so numbers from different machines compare). PowerSGD
runs on a [n / 4096, 4096] matrix view of the same data (4096 x 4096 at 64 MB), one worker: encode
is both passes, decode is the reconstruction. Writes scripts/results/codecs.json and codecs.md.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from benchlib import RESULTS, machine, markdown_table, write_json

from dilo.compress import (
    BFloat16,
    BlockQuant,
    Codec,
    Context,
    DCTTopK,
    ErrorFeedback,
    Float16,
    Identity,
    Int2,
    PowerSGD,
    RandomK,
    Sign,
    Ternary,
    TopK,
)

CTX = Context(seed=0, round=1, rank=0, part=0)

COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("codec", lambda r: r["name"]),
    ("encode GB/s", lambda r: f"{r['encode_gbs']:.2f}"),
    ("decode GB/s", lambda r: f"{r['decode_gbs']:.2f}"),
    ("encode / clone", lambda r: f"{r['encode_vs_clone']:.2f}"),
    ("decode / clone", lambda r: f"{r['decode_vs_clone']:.2f}"),
    ("enc+dec / clone", lambda r: f"{r['roundtrip_vs_clone']:.2f}"),
    ("compression", lambda r: f"{r['compression']:.1f}x"),
    ("rel. error", lambda r: f"{r['rel_error']:.3g}"),
]


def best(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocator, thread pool
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def flat_codec(codec: Codec, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    e = codec.encode(x, CTX)
    x_hat = codec.decode(e)
    return {
        "encode_s": best(lambda: codec.encode(x, CTX), repeats),
        "decode_s": best(lambda: codec.decode(e), repeats),
        "nbytes": e.nbytes,
        "rel_error": float((x - x_hat).norm() / x.norm()),
    }


def powersgd(ps: PowerSGD, x: torch.Tensor, repeats: int) -> dict[str, Any]:
    m = x.view(-1, 4096)
    shapes = [m.shape]

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        p = ps.first_pass([m], CTX)
        return p, ps.second_pass([m], p)

    p, q = encode()
    ps.keep(q, shapes)  # warm start: the timed rounds start from a kept Q
    p, q = encode()
    (m_hat,) = ps.decode(p, q, 1.0, shapes)
    return {
        "encode_s": best(encode, repeats),
        "decode_s": best(lambda: ps.decode(p, q, 1.0, shapes), repeats),
        "nbytes": 4 * (p.numel() + q.numel()),
        "rel_error": float((m - m_hat).norm() / m.norm()),
        "matrix": list(m.shape),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=64, help="size of the fp32 tensor in MiB")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (best is kept)")
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    n = args.mb * 2**20 // 4
    n -= n % 4096  # the PowerSGD view needs whole rows
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    clone_s = best(lambda: x.clone(), args.repeats)
    gb = 4 * n / 1e9

    arms: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (name, lambda c=codec: flat_codec(c, x, args.repeats))
        for name, codec in [
            ("none (fp32)", Identity()),
            ("fp16", Float16()),
            ("bf16", BFloat16()),
            ("int8", BlockQuant(8, 128)),
            ("int4", BlockQuant(4, 128)),
            ("int8 stochastic", BlockQuant(8, 128, stochastic=True)),
            ("topk 10%", TopK(0.1)),
            ("topk 10% chunk 4096", TopK(0.1, chunk=4096)),
            ("topk 1%", TopK(0.01)),
            ("topk 1% chunk 4096", TopK(0.01, chunk=4096)),
            ("randomk 1%", RandomK(0.01)),
            ("sign", Sign(128)),
            ("int2", Int2(128)),
            ("int2 stochastic", Int2(128, stochastic=True)),
            ("ternary", Ternary(128)),
            ("dct 3% chunk 64", DCTTopK(0.03, chunk=64)),
            ("dct 3% chunk 64 int2 values", DCTTopK(0.03, chunk=64, values="int2")),
            ("topk 1% chunk 4096 + DGC momentum", ErrorFeedback(TopK(0.01, chunk=4096), momentum=0.9)),
        ]
    ]
    arms.append(("powersgd r=4", lambda: powersgd(PowerSGD(rank=4), x, args.repeats)))
    arms.append(("powersgd r=4 warm start", lambda: powersgd(PowerSGD(rank=4, warm_start=True), x, args.repeats)))

    rows: list[dict[str, Any]] = []
    for name, run in arms:
        r = run()
        r.update(
            name=name,
            encode_gbs=gb / r["encode_s"],
            decode_gbs=gb / r["decode_s"],
            encode_vs_clone=clone_s / r["encode_s"],
            decode_vs_clone=clone_s / r["decode_s"],
            roundtrip_vs_clone=clone_s / (r["encode_s"] + r["decode_s"]),
            compression=4 * n / r["nbytes"],
        )
        rows.append(r)
        print(f"[bench] {name}: encode {r['encode_s'] * 1e3:.1f} ms, decode {r['decode_s'] * 1e3:.1f} ms", flush=True)

    table = markdown_table([h for h, _ in COLUMNS], [[fmt(r) for _, fmt in COLUMNS] for r in rows])
    note = (
        f"{args.mb} MiB fp32 N(0, 1) tensor, torch {torch.__version__}, {threads} threads; torch.clone "
        f"{gb / clone_s:.2f} GB/s. Ratios > 1 are faster than a copy. fp32 encode is only the NaN/Inf check "
        "and its decode returns the payload itself."
    )
    meta = {"threads": threads, "mb": args.mb, "numel": n, "repeats": args.repeats, "clone_s": clone_s}
    write_json("codecs", {**machine(), **meta, "clone_gbs": gb / clone_s, "rows": rows})
    (RESULTS / "codecs.md").write_text(note + "\n\n" + table + "\n")
    print(note + "\n\n" + table)


if __name__ == "__main__":
    main()
