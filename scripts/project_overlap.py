"""A projection (not a measurement): compute utilization of blocking DiLoCo, outer.overlap and
Streaming DiLoCo for 1B and 10B parameters over 100 Mbit/s and 1 Gbit/s links.

    .venv/bin/python scripts/project_overlap.py [--workers 4] [--inner-steps 100] [--step-s-1b 1.9]

Nothing here trains. The link is the simulator's (dilo/sim/links.py `Network`: latency plus
bytes over the link speed), applied to the ring all-reduce each outer step runs: every worker
sends 2 (W - 1) / W of the payload (dilo/transport/base.py `ring_all_reduce_bytes`) over
2 (W - 1) hops of latency. The payload is fp32 (4 bytes per parameter) or int4 (half a byte
plus a bf16 scale per 128 values). Compute per inner step is an assumption: --step-s-1b seconds
for the 1B model (default 1.9 s: 1M tokens per step, 6 N FLOPs per token, an 8-GPU island at
3.2 PFLOP/s sustained), ten times that for 10B. Per round of H steps:

- blocking:   the loop waits for the whole exchange:     util = H t / (H t + T)
- overlap:    round t's exchange runs during round t + 1: util = H t / (H t + max(0, T - H t))
- streaming:  P fragments, each exchanged in 1/P of the bytes and waited for tau steps after
              it was sent:  util = H t / (H t + P max(0, T_frag - tau t))

where T is the exchange's time. Writes scripts/results/projection.json and the "projection"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import markdown_table, update_benchmarks_md, write_json  # noqa: E402

from dilo.sim.links import Network  # noqa: E402
from dilo.transport.base import ring_all_reduce_bytes  # noqa: E402

LATENCY_MS = 50.0
LINKS = {"100 Mbit/s": 100.0, "1 Gbit/s": 1000.0}
MODELS = {"1B": 1e9, "10B": 1e10}
CODECS = {"fp32": 4.0, "int4": 0.5 + 2 / 128}


def exchange_s(net: Network, payload_bytes: float, workers: int) -> float:
    """One ring all-reduce of payload_bytes: the bytes each worker sends, 2 (W - 1) hops of latency."""
    sent = ring_all_reduce_bytes(int(payload_bytes), workers)
    return net.cost(sent) + (2 * (workers - 1) - 1) * net.latency_s


def project(
    params: float, bytes_per_param: float, mbps: float, workers: int, h: int, step_s: float, fragments: int, tau: int
) -> dict[str, float]:
    net = Network(mbps, LATENCY_MS)
    compute = h * step_s
    whole = exchange_s(net, params * bytes_per_param, workers)
    frag = exchange_s(net, params * bytes_per_param / fragments, workers)
    return {
        "exchange_s": whole,
        "fragment_exchange_s": frag,
        "round_compute_s": compute,
        "blocking": compute / (compute + whole),
        "overlap": compute / (compute + max(0.0, whole - compute)),
        "streaming": compute / (compute + fragments * max(0.0, frag - tau * step_s)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--inner-steps", type=int, default=100)
    ap.add_argument("--step-s-1b", type=float, default=1.9)
    ap.add_argument("--fragments", type=int, default=4)
    ap.add_argument("--tau", type=int, default=5)
    ap.add_argument("--print-only", action="store_true")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for model, n in MODELS.items():
        step_s = args.step_s_1b * n / 1e9
        for link, mbps in LINKS.items():
            for codec, bpp in CODECS.items():
                p = project(n, bpp, mbps, args.workers, args.inner_steps, step_s, args.fragments, args.tau)
                rows.append({"model": model, "link": link, "codec": codec, "step_s": step_s, **p})
    table = markdown_table(
        ["model", "link", "codec", "exchange", "round compute", "blocking", "overlap", "streaming",
         "overlap vs blocking", "streaming vs blocking"],
        [
            [r["model"], r["link"], r["codec"], f"{r['exchange_s']:.0f} s", f"{r['round_compute_s']:.0f} s",
             f"{r['blocking']:.1%}", f"{r['overlap']:.1%}", f"{r['streaming']:.1%}",
             f"{r['overlap'] / r['blocking']:.2f}x", f"{r['streaming'] / r['blocking']:.2f}x"]
            for r in rows
        ],
    )  # fmt: skip
    body = (
        "## Projection: overlap and streaming at 1B and 10B parameters\n\n"
        f"`scripts/project_overlap.py` — a projection, not a measurement: the simulator's link model "
        f"(latency {LATENCY_MS:.0f} ms plus bytes over the link speed) applied to one ring all-reduce per outer "
        f"step among {args.workers} workers, H = {args.inner_steps}, an assumed {args.step_s_1b} s per inner step "
        f"at 1B (10x at 10B); streaming with {args.fragments} fragments and tau = {args.tau} steps. Utilization is "
        "inner compute over the loop's time.\n\n"
        + table
        + "\n\nReading: overlap hides the exchange completely as long as it is shorter than a round's compute; "
        "streaming hides it while one fragment's exchange fits in tau steps, so on the slowest link it needs "
        "the 4-bit payload (or a larger tau) to pay off, and where a fragment does not fit it waits P times "
        "per round."
    )
    print(body)
    if not args.print_only:
        settings = {k: getattr(args, k) for k in ("workers", "inner_steps", "step_s_1b", "fragments", "tau")}
        write_json("projection", {"kind": "projection", "latency_ms": LATENCY_MS, **settings, "rows": rows})
        update_benchmarks_md("projection", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
