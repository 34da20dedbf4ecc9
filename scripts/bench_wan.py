"""WAN emulation: DDP against DiLoCo (H=50) and DiLoCo + int4 over slow, distant links.

    sudo .venv/bin/python scripts/bench_wan.py [--steps 200] [--inner-steps 50] [--only 1gbit|100mbit|lan]
                                               [--arms ddp,diloco,diloco+int4] [--no-lan] [--quick]
                                               [--print-only] [--model.d_model=256 ...]

Four workers, each a real `python -m dilo.train` process in its own network namespace
(dilo/testing/netns.py: hosts on a bridge, every host's uplink shaped with `tc tbf`, 50 ms one-way
latency added to every TCP connection between hosts, so a round trip takes 100 ms more), a
static torch.distributed world over Gloo. Links:

- 1gbit:   1 Gbit/s uplinks, 50 ms one way;
- 100mbit: 100 Mbit/s uplinks, 50 ms one way;
- lan:     the same namespaces, no shaping and no latency (DDP only, a reference).

Arms on each link, all with the quickstart configuration (configs/quickstart.toml: the 2-layer
byte-level GPT on the stdlib corpus), the same steps and the same data:

- ddp:          gradients all-reduced every step (it evaluates every 50 steps, like a round);
- diloco:       DiLoCo, H = 50 inner steps per round, fp32 pseudo-gradients;
- diloco+int4:  the same, pseudo-gradients in 4-bit blockwise absmax (codec.kind = int4).

Validation loss is measured every round (every 50 steps). Per arm: compute utilization (the
summary's train_utilization: inner seconds / (wall - evaluation) seconds of the training loop,
summed over the workers: the share of training time spent computing rather than waiting for the
network or for a slower worker; evaluations, the same work in every arm, are left out, and the
table also gives inner / wall with them; start-up and rendezvous are not counted), time to a fixed
validation loss, bytes sent per worker and the final validation loss. The fixed loss of a link is
the highest final validation loss among its arms, so that every arm reaches it; an arm's time to
it is read off worker 0's round log (wall seconds at each evaluation, the initial evaluation at
0 s) with linear interpolation between two evaluations. Every figure is also given as a ratio to
DDP on the same link, measured in the same run. Target of the issue: DiLoCo + int4 keeps at
least 90% compute utilization at 100 Mbit/s.

About 20 minutes on 2 CPU cores with the defaults (200 steps: DDP about 4.5 minutes per WAN link,
each DiLoCo arm about 2, the LAN reference 1). Needs root (network namespaces, tc, iptables).
Finished arms are cached in .bench-cache/wan (keyed by the link and the overrides), so an
interrupted run continues where it stopped. Writes
scripts/results/wan.json, wan.md, wan.png and the "wan" section of BENCHMARKS.md. Arguments of
the form --section.key=value are passed to every arm as dilo overrides.

--quick: a smoke test of the pipeline (tiny model, 20 steps, H = 10, every link), a few minutes;
it prints the tables and writes nothing under scripts/ (like --print-only: the artefacts go to a
temporary directory, and no cache is read or written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import REPO, RESULTS, machine, markdown_table, update_benchmarks_md

sys.path.insert(0, str(REPO))

from dilo.testing import netns  # noqa: E402

CONFIG = REPO / "configs" / "quickstart.toml"
WORKERS = 4
LATENCY_MS = 50.0
LINKS: dict[str, tuple[str, float]] = {  # name: (tc rate, one-way latency in ms)
    "1gbit": ("1gbit", LATENCY_MS),
    "100mbit": ("100mbit", LATENCY_MS),
    "lan": ("", 0.0),
}
ARMS = ("ddp", "diloco", "diloco+int4")
TARGET_LINK, TARGET_ARM, TARGET_UTIL = "100mbit", "diloco+int4", 0.90
QUICK = [  # a tiny model for --quick
    "--model.n_layer=1",
    "--model.d_model=64",
    "--model.context=64",
    "--data.seq_len=64",
    "--data.batch_size=8",
    "--log.eval_batches=4",
]
COMMON = ["--log.progress=false", "--log.plot=false", "--checkpoint.every=0", "--transport.backend=gloo"]


def arm_overrides(arm: str, steps: int, inner_steps: int, extra: list[str]) -> list[str]:
    base = [f"--steps={steps}", f"--inner.warmup_steps={min(40, max(1, steps // 5))}", "--log.eval_every=1"]
    if arm == "ddp":
        strategy = ["--outer.kind=ddp", f"--sync_every_ddp_eval={inner_steps}"]
    elif arm == "diloco":
        strategy = ["--outer.kind=diloco", f"--outer.inner_steps={inner_steps}"]
    elif arm == "diloco+int4":
        strategy = ["--outer.kind=diloco", f"--outer.inner_steps={inner_steps}", "--codec.kind=int4"]
    else:
        raise ValueError(f"unknown arm {arm!r}")
    return [*base, *strategy, *extra]


# ---------------------------------------------------------------------------------------------
# running one arm: 4 processes, one per namespace


def run_arm(
    link: str, arm: str, overrides: list[str], out: Path, cache: Path | None, timeout_s: float
) -> dict[str, Any]:
    """Run one arm on one emulated link; its summary and worker 0's round log (read back from the
    cache when the same arm already ran)."""
    rate, latency_ms = LINKS[link]
    digest = hashlib.sha256(json.dumps([str(CONFIG), WORKERS, rate, latency_ms, overrides]).encode()).hexdigest()
    key = cache / f"{link}-{arm}-{digest[:12]}.json" if cache else None
    if key is not None and key.exists():
        print(f"[bench] {link} {arm}: cached", file=sys.stderr, flush=True)
        return json.loads(key.read_text())
    name = f"{link}-{arm}".replace("+", "-")
    run_dir = out / name
    err_dir = out / f"{name}-stderr"
    err_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "dilo.train",
        str(CONFIG),
        *overrides,
        *COMMON,
        f"--out_dir={run_dir}",
        f"--name={name}",
    ]
    print(f"[bench] {link} {arm}: {' '.join(overrides)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with netns.Hosts(WORKERS, rate=rate, latency_ms=latency_ms, log_dir=err_dir) as hosts:
        procs = []
        for i in range(WORKERS):
            env = {
                **os.environ,
                "RANK": str(i),
                "WORLD_SIZE": str(WORKERS),
                "LOCAL_RANK": "0",
                "MASTER_ADDR": hosts.addr[0],
                "MASTER_PORT": "29500",
                "GLOO_SOCKET_IFNAME": "eth0",
                "DILO_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            }
            env.pop("DILO_STORE_HOSTED", None)  # rank 0 serves the rendezvous store
            procs.append(hosts.spawn(i, cmd, env=env, name=f"rank{i}"))
        _wait(procs, timeout_s, f"{link} {arm}", err_dir)
    process_wall_s = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(x) for x in (run_dir / "logs" / "worker0.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    rounds = [r for r in records if r["event"] == "round"]
    curve = [{"wall_s": 0.0, "step": 0, "val_loss": start["val_loss"], "cum_bytes_sent": 0}] + [
        {"wall_s": r["wall_s"], "step": r["step"], "val_loss": r["val_loss"], "cum_bytes_sent": r["cum_bytes_sent"]}
        for r in rounds
        if r.get("val_loss") is not None
    ]
    sync_s = sum(r["sync_s"] for r in rounds)
    inner_s = sum(r["inner_s"] for r in rounds)
    result = {
        "link": link,
        "arm": arm,
        "rate": rate,
        "latency_ms": latency_ms,
        "overrides": overrides,
        "summary": summary,
        "curve": curve,
        "process_wall_s": process_wall_s,
        "setup_s": start.get("setup_s"),
        "num_params": start.get("num_params"),
        # worker 0's own split of a step: compute, and communication (DDP: the gradient all-reduce)
        "inner_ms_per_step": 1e3 * inner_s / max(1, summary["steps"]),
        "sync_ms_per_step": 1e3 * sync_s / max(1, summary["steps"]),
        "sync_s": sync_s,
    }
    print(
        f"[bench] {link} {arm}: val {summary['val_loss']:.4f}, utilization {summary['train_utilization']:.1%} "
        f"({summary['utilization']:.1%} with evaluations), "
        f"sent {summary['bytes_sent_per_worker'] / 1e6:.1f} MB/worker, wall {summary['wall_s']:.0f} s "
        f"({process_wall_s:.0f} s with start-up); per step {result['inner_ms_per_step']:.0f} ms compute, "
        f"{result['sync_ms_per_step']:.0f} ms sync",
        file=sys.stderr,
        flush=True,
    )
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(json.dumps(result))
    return result


def _wait(procs: list[Any], timeout_s: float, what: str, err_dir: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed or time.monotonic() > deadline:
            why = (
                f"ranks {failed} exited with {[codes[i] for i in failed]}" if failed else f"timeout ({timeout_s:.0f} s)"
            )
            tails = []
            for path in sorted(err_dir.glob("*.err")):
                lines = path.read_text(errors="replace").splitlines()
                tails.append(f"--- {path.name} (last 25 lines)\n" + "\n".join(lines[-25:]))
            print("\n".join(tails), file=sys.stderr, flush=True)
            raise RuntimeError(f"{what}: {why}; logs in {err_dir}")
        if all(c == 0 for c in codes):
            return
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# reading the results


def time_to(curve: list[dict[str, Any]], target: float) -> float | None:
    """Wall seconds at which the validation loss first reaches target, interpolated linearly
    between the two evaluations around the crossing."""
    prev = None
    for p in curve:
        if p["val_loss"] is not None and p["val_loss"] <= target:
            if prev is None or prev["val_loss"] <= p["val_loss"]:
                return p["wall_s"]
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev["wall_s"] + frac * (p["wall_s"] - prev["wall_s"])
        prev = p
    return None


def link_rows(results: dict[str, dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    """The link's target loss and one row per arm, every figure also as a ratio to DDP."""
    base = results["ddp"]["summary"]
    target = max(r["summary"]["val_loss"] for r in results.values())
    base_reach = time_to(results["ddp"]["curve"], target)
    rows = []
    for arm, res in results.items():
        s = res["summary"]
        reach = time_to(res["curve"], target)
        sent = s["bytes_sent_per_worker"]
        rows.append(
            {
                "arm": arm,
                "utilization": s["train_utilization"],
                "utilization_vs_ddp": s["train_utilization"] / base["train_utilization"]
                if base["train_utilization"]
                else None,
                "utilization_with_eval": s["utilization"],
                "eval_s": s["eval_s"],
                "time_to_target_s": reach,
                "time_to_target_vs_ddp": reach / base_reach if reach is not None and base_reach else None,
                "bytes_sent_per_worker": sent,
                "bytes_fewer_than_ddp": base["bytes_sent_per_worker"] / sent if sent else None,
                "val_loss": s["val_loss"],
                "val_loss_vs_ddp": s["val_loss"] / base["val_loss"],
                "wall_s": s["wall_s"],
                "wall_vs_ddp": s["wall_s"] / base["wall_s"],
                "sync_s": res["sync_s"],
                "inner_ms_per_step": res["inner_ms_per_step"],
                "sync_ms_per_step": res["sync_ms_per_step"],
                "steps": s["steps"],
                "rounds": s["rounds"],
                "tokens": s["tokens"],
                "process_wall_s": res["process_wall_s"],
            }
        )
    return target, rows


def link_table(rows: list[dict[str, Any]]) -> str:
    def x(v: float | None, digits: int = 2) -> str:
        return "-" if v is None else f"{v:.{digits}f}x"

    table = [
        [
            r["arm"],
            f"{r['utilization']:.1%}",
            f"{r['utilization_with_eval']:.1%}",
            "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.0f} s",
            x(r["time_to_target_vs_ddp"]),
            f"{r['bytes_sent_per_worker'] / 1e6:.1f} MB",
            x(r["bytes_fewer_than_ddp"], 1),
            f"{r['val_loss']:.4f} ({r['val_loss_vs_ddp']:.3f}x)",
            f"{r['wall_s']:.0f} s ({r['wall_vs_ddp']:.2f}x)",
            f"{r['inner_ms_per_step']:.0f} / {r['sync_ms_per_step']:.0f}",
        ]
        for r in rows
    ]
    header = [
        "arm",
        "compute utilization",
        "with evaluations",
        "time to target",
        "vs DDP",
        "bytes sent / worker",
        "fewer than DDP",
        "final val loss (vs DDP)",
        "wall (vs DDP)",
        "ms / step: compute / sync",
    ]
    return markdown_table(header, table)


def report(
    measured: dict[str, dict[str, dict[str, Any]]], settings: dict[str, Any], print_only: bool, out: Path
) -> None:
    links: dict[str, Any] = {}
    md = [
        f"{WORKERS} workers, one network namespace each (dilo/testing/netns.py: `tc tbf` on every uplink, "
        f"{LATENCY_MS:.0f} ms one-way latency added to every TCP connection), a static Gloo world. "
        f"{settings['steps']} steps per worker, H = {settings['inner_steps']}, "
        f"{settings['num_params']:,} parameters ({settings['model']}), validation every {settings['inner_steps']} "
        "steps. Compute utilization: inner seconds / (wall - evaluation) seconds of the training loop, i.e. the "
        "share of training time spent computing rather than waiting for the network or a slower worker "
        "(next column: inner / wall, evaluations included). "
        "Target: the highest final validation loss of the link's arms; time to it interpolated between "
        "evaluations. Ratios: against DDP on the same link, same run.",
        "",
    ]
    for link, results in measured.items():
        if "ddp" not in results:
            continue
        target, rows = link_rows(results)
        rate, latency = LINKS[link]
        links[link] = {
            "rate": rate or None,
            "latency_ms": latency,
            "target_val_loss": target,
            "arms": rows,
            "curves": {arm: res["curve"] for arm, res in results.items()},
        }
        title = "no shaping, no added latency" if link == "lan" else f"{_rate(rate)} uplinks, {latency:.0f} ms one way"
        md += [f"### {link}: {title}; target val loss {target:.4f}", "", link_table(rows), ""]
    util = (links.get(TARGET_LINK) or {}).get("arms", [])
    row = next((r for r in util if r["arm"] == TARGET_ARM), None)
    hit = None if row is None else row["utilization"]
    met = None if hit is None else hit >= TARGET_UTIL
    verdict = f"Target ({TARGET_ARM} keeps >= {TARGET_UTIL:.0%} compute utilization at 100 Mbit/s): " + (
        "not measured in this run."
        if row is None
        else f"{'met' if met else 'NOT met'} ({hit:.1%}; {row['utilization_with_eval']:.1%} with evaluations counted "
        "as idle time)."
    )
    md += [verdict, "", *readings(links)]
    payload = {"machine": machine(), "settings": settings, "links": links, "target_met": met}
    text = "\n".join(md)
    print(text)
    if print_only:
        (out / "wan.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        plot(links, out / "wan.png")
        print(f"[bench] print-only: artefacts in {out}", file=sys.stderr)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "wan.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    (RESULTS / "wan.md").write_text(text + "\n")
    plot(links, RESULTS / "wan.png")
    update_benchmarks_md(
        "wan",
        "## WAN emulation: DDP against DiLoCo over shaped links\n\n" + text + "\n\n![wan](scripts/results/wan.png)",
    )


def _rate(rate: str) -> str:
    m = re.fullmatch(r"(\d+)([kmg])bit", rate)
    return f"{m.group(1)} {m.group(2).upper()}bit/s" if m else rate


def readings(links: dict[str, Any]) -> list[str]:
    """What the tables say, computed from them."""
    out = []
    wan = {k: {r["arm"]: r for r in v["arms"]} for k, v in links.items() if k != "lan"}
    for link, arms in wan.items():
        d = arms.get("ddp")
        if d:
            out.append(
                f"- {link}: DDP waits {d['sync_ms_per_step']:.0f} ms per step for its all-reduce, "
                f"{d['sync_ms_per_step'] / d['inner_ms_per_step']:.1f}x its {d['inner_ms_per_step']:.0f} ms of compute."
            )
        for arm in ("diloco", "diloco+int4"):
            r = arms.get(arm)
            if r and r["time_to_target_vs_ddp"]:
                out.append(
                    f"- {link}: {arm} reaches the target loss in {r['time_to_target_vs_ddp']:.2f}x DDP's time and "
                    f"sends {r['bytes_fewer_than_ddp']:.0f}x fewer bytes; its sync costs "
                    f"{r['sync_ms_per_step'] * r['steps'] / max(1, r['rounds']) / 1e3:.2f} s per round of "
                    f"{r['inner_ms_per_step'] * r['steps'] / max(1, r['rounds']) / 1e3:.1f} s of compute."
                )
    if "1gbit" in wan and "100mbit" in wan and "ddp" in wan["1gbit"] and "ddp" in wan["100mbit"]:
        fast, slow = wan["1gbit"]["ddp"]["sync_ms_per_step"], wan["100mbit"]["ddp"]["sync_ms_per_step"]
        out.append(
            f"- Ten times the bandwidth cuts DDP's per-step sync by only {100 * (1 - fast / slow):.0f}% "
            f"({slow:.0f} -> {fast:.0f} ms): with this model the all-reduce is bound by latency (a ring all-reduce "
            f"crosses the link 2(W-1) = {2 * (WORKERS - 1)} times) more than by bandwidth."
        )
    return out


def plot(links: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    styles = dict(zip(LINKS, ("-", "--", ":")))
    names = list(links)
    width = 0.8 / len(ARMS)
    labelled: set[str] = set()
    for i, link in enumerate(names):
        rows = [r for r in links[link]["arms"] if r["arm"] in ARMS]
        for j, row in enumerate(rows):
            arm = row["arm"]
            x = i + (j - (len(rows) - 1) / 2) * width
            bars = ax0.bar([x], [100 * row["utilization"]], width, color=colors[arm],
                           label=None if arm in labelled else arm)  # fmt: skip
            ax0.bar_label(bars, fmt="%.0f", fontsize=8)
            labelled.add(arm)
    ax0.axhline(100 * TARGET_UTIL, color="gray", lw=0.8, ls="--", label=f"target {TARGET_UTIL:.0%}")
    ax0.set_xticks(range(len(names)), names)
    ax0.set_ylabel("compute utilization (%)")
    ax0.set_ylim(0, 115)
    ax0.legend(loc="upper left", fontsize=8, ncol=2)
    for link in names:
        for arm, curve in links[link]["curves"].items():
            pts = [p for p in curve if p["val_loss"] is not None]
            ax1.plot(
                [p["wall_s"] for p in pts],
                [p["val_loss"] for p in pts],
                ".",
                ls=styles[link],
                color=colors[arm],
                ms=4,
                lw=1.2,
                label=f"{arm}, {link}",
            )
        if len(links[link]["curves"]) > 1:
            ax1.axhline(links[link]["target_val_loss"], color="gray", lw=0.7, ls=styles[link])
    ax1.set_xlabel("wall seconds (training loop); gray: each link's target loss")
    ax1.set_ylabel("validation loss")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax0.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{WORKERS} workers on emulated links ({LATENCY_MS:.0f} ms one way)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="inner steps per worker in every arm (default 200)")
    ap.add_argument("--inner-steps", type=int, default=None, help="H of the DiLoCo arms and DDP's eval period (50)")
    ap.add_argument("--only", choices=list(LINKS), default=None, help="run one link only")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    ap.add_argument("--no-lan", action="store_true", help="skip the LAN reference (DDP without shaping)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke test; writes nothing under scripts/")
    ap.add_argument("--print-only", action="store_true", help="write artefacts to a temp dir, not scripts/results")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one arm may take")
    ap.add_argument("--cache", default=str(REPO / ".bench-cache" / "wan"))
    args, extra = ap.parse_known_args()
    bad = [a for a in extra if not re.fullmatch(r"--[\w]+(\.[\w]+)*=.*", a)]
    if bad:
        ap.error(f"unrecognised arguments {bad}; dilo overrides look like --section.key=value")
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        ap.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    if "ddp" not in arms:
        ap.error("every figure is a ratio to DDP on the same link: keep ddp in --arms")
    for why in (netns.available(), netns.latency_available()):
        if why is not None:
            print(f"bench_wan: cannot emulate the links here: {why}", file=sys.stderr)
            return 2

    steps = args.steps or (20 if args.quick else 200)
    inner_steps = args.inner_steps or (10 if args.quick else 50)
    if steps < inner_steps:
        ap.error(f"--steps={steps} gives no DiLoCo round of H={inner_steps}")
    print_only = args.quick or args.print_only
    extra = [*(QUICK if args.quick else []), *extra]
    cache = None if print_only else Path(args.cache)
    plan = [(link, arm) for link in LINKS for arm in arms if args.only in (None, link)]
    plan = [(link, arm) for link, arm in plan if link != "lan" or (arm == "ddp" and not args.no_lan)]

    if not plan:
        ap.error("nothing to run: --only lan needs the LAN reference (drop --no-lan)")
    model = "tiny model (--quick)" if args.quick else "quickstart model" + (" with overrides" if extra else "")

    out = Path(tempfile.mkdtemp(prefix="dilo-wan-"))
    ok = False
    try:
        measured: dict[str, dict[str, dict[str, Any]]] = {}
        t0 = time.perf_counter()
        for link, arm in plan:
            res = run_arm(link, arm, arm_overrides(arm, steps, inner_steps, extra), out, cache, args.timeout)
            measured.setdefault(link, {})[arm] = res
        any_res = next(iter(next(iter(measured.values())).values()))
        settings = {
            "workers": WORKERS,
            "config": str(CONFIG.relative_to(REPO)),
            "steps": steps,
            "inner_steps": inner_steps,
            "latency_ms": LATENCY_MS,
            "links": {k: {"rate": v[0] or None, "latency_ms": v[1]} for k, v in LINKS.items() if k in measured},
            "extra_overrides": extra,
            "model": model,
            "num_params": any_res["num_params"],
            "bench_s": time.perf_counter() - t0,
            "arms_s": sum(res["process_wall_s"] for arms_ in measured.values() for res in arms_.values()),
        }
        report(measured, settings, print_only, out if print_only else RESULTS)
        print(
            f"[bench] {len(plan)} arms in {settings['bench_s']:.0f} s "
            f"({settings['arms_s']:.0f} s of measured runs, cached ones included)",
            file=sys.stderr,
        )
        ok = True
    finally:
        if ok and not print_only:
            shutil.rmtree(out, ignore_errors=True)
        elif not ok:
            print(f"[bench] run directories kept in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
