"""Shared pieces of the benchmark scripts: run one arm with `dilo run`, read its results,
write the JSON / markdown / plot artefacts and update a section of BENCHMARKS.md.

Every benchmark reports each figure as a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "scripts" / "results"


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d"),
    }


def run_arm(
    name: str, config: Path, workers: int, overrides: list[str], out_root: Path, cache: Path | None = None
) -> dict[str, Any]:
    """Run `dilo run CONFIG --workers N overrides`; return its summary plus worker 0's round log.

    With `cache`, an arm already run with the same name and overrides is read back instead of run
    again (so an interrupted benchmark can continue)."""
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"arm name {name!r} must be letters, digits, '.', '-' or '_' (it names the run)")
    digest = hashlib.sha256(json.dumps([str(config), workers, overrides]).encode()).hexdigest()[:12]
    key = cache / f"{name}-{digest}.json" if cache else None
    if key is not None and key.exists():
        return json.loads(key.read_text())
    out_dir = out_root / name
    cmd = [
        sys.executable,
        "-m",
        "dilo.cli",
        "run",
        str(config),
        "--workers",
        str(workers),
        *overrides,
        f"--out_dir={out_dir}",
        f"--name={name}",
        "--log.progress=false",
        "--log.plot=false",
    ]
    print(f"[bench] {name}: {' '.join(overrides)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"arm {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["process_wall_s"] = time.perf_counter() - t0
    # rank 0's log: worker0 (static), worker-w0 (elastic, ids from dilo run), worker-rank0 (static gossip)
    log = next(
        (out_dir / "logs" / f"{n}.jsonl" for n in ("worker0", "worker-w0", "worker-rank0")
         if (out_dir / "logs" / f"{n}.jsonl").exists()),
        out_dir / "logs" / "worker0.jsonl",
    )  # fmt: skip
    records = [json.loads(x) for x in log.read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    curve = [(0, 0, start.get("val_loss"))] + [
        (r["global_tokens"], r["cum_bytes_sent"], r["val_loss"])
        for r in records
        if r["event"] == "round" and r.get("val_loss") is not None
    ]
    print(
        f"[bench] {name}: val {summary['val_loss']:.4f}, sent {summary['bytes_sent_per_worker'] / 1e6:.1f} MB, "
        f"{summary['wall_s']:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    result = {"name": name, "overrides": overrides, "summary": summary, "curve": curve}
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(json.dumps(result))
    return result


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def update_benchmarks_md(section: str, body: str) -> None:
    """Replace (or append) the block between <!-- section:start --> and <!-- section:end -->."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# dilo benchmarks\n"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path
