"""NCCL paths. They need CUDA; run with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and NCCL"),
]

REPO = Path(__file__).resolve().parent.parent


def _hashes(run_dir: Path, rank: int | str) -> list[str]:
    name = rank if isinstance(rank, str) else f"worker{rank}"
    lines = (run_dir / "logs" / f"{name}.jsonl").read_text().splitlines()
    return [r["anchor_hash"] for r in map(json.loads, lines) if r["event"] == "round"]


@pytest.mark.parametrize("kind", ["diloco", "ddp"])
def test_nccl_workers_under_torchrun(tmp_path: Path, kind: str) -> None:
    n = min(2, torch.cuda.device_count())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={n}",
        "-m",
        "dilo.train",
        str(REPO / "configs" / "quickstart.toml"),
        "--steps=40",
        "--inner.warmup_steps=5",
        f"--outer.kind={kind}",
        "--transport.backend=nccl",
        "--log.progress=false",
        "--log.plot=false",
        f"--out_dir={tmp_path}",
    ]
    if kind == "diloco":
        cmd.append("--outer.inner_steps=10")
    else:
        cmd.append("--sync_every_ddp_eval=10")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_committed"] == 4 and summary["val_loss"] < summary["initial_val_loss"]
    for rank in range(1, n):
        assert _hashes(tmp_path, rank) == _hashes(tmp_path, 0)


def test_nccl_transport_all_reduce_in_threads() -> None:
    """One process, one GPU, world of 1: the NCCL group builds and reduces CUDA tensors."""
    import torch.distributed as dist

    from dilo.transport.torch_dist import TorchDistTransport

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    t = TorchDistTransport(store, 0, 1, backend="nccl", timeout_s=60)
    x = torch.arange(8, dtype=torch.float32, device="cuda")
    t.all_reduce_([x])
    assert torch.equal(x.cpu(), torch.arange(8, dtype=torch.float32))


def test_async_workers_train_on_cuda_through_the_coordinator(tmp_path: Path) -> None:
    """`dilo run` with outer.kind = async: a coordinator on the CPU, two workers on the GPU (sharing
    it when there is one), parameters and pseudo-gradients crossing between them."""
    cmd = [
        sys.executable,
        "-m",
        "dilo.cli",
        "run",
        str(REPO / "configs" / "quickstart.toml"),
        "--workers=2",
        "--steps=60",
        "--inner.warmup_steps=5",
        "--membership.kind=coordinator",
        "--outer.kind=async",
        "--outer.inner_steps=10",
        "--outer.lr=0.5",
        "--heterogeneity.slowdown=[1, 2]",
        "--transport.backend=nccl",
        "--log.progress=false",
        "--log.plot=false",
        f"--out_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == "async" and summary["val_loss"] < summary["initial_val_loss"]
    ends = []
    for w in ("w0", "w1"):
        recs = [json.loads(x) for x in (tmp_path / "logs" / f"worker-{w}.jsonl").read_text().splitlines()]
        assert all(r["staleness"] >= 0 for r in recs if r["event"] == "round")
        ends.append(next(r for r in recs if r["event"] == "end"))
    assert sum(e["steps"] for e in ends) == 120  # the world's budget: steps * workers


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="an island of 2 NCCL ranks needs 2 GPUs (NCCL refuses two ranks on one)"
)
def test_nccl_island_of_two_ranks_under_torchrun(tmp_path: Path) -> None:
    """One torchrun of 2 GPU ranks as one island (transport.island_ranks=node), 2 islands: the
    second island is a second torchrun node on the same machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = torch.cuda.device_count() // 2
    base = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc-per-node={min(n, 2)}",
            "--master-addr=127.0.0.1", f"--master-port={port}"]  # fmt: skip
    train = ["-m", "dilo.train", str(REPO / "configs" / "quickstart.toml"), "--steps=40", "--inner.warmup_steps=5",
             "--outer.inner_steps=10", "--transport.backend=nccl", "--transport.island_ranks=node",
             "--log.progress=false", "--log.plot=false", f"--out_dir={tmp_path}"]  # fmt: skip
    procs = []
    for node in range(2):
        # each "node" sees its own GPUs, as two machines would
        gpus = ",".join(str(g) for g in range(node * n, node * n + min(n, 2)))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus)
        procs.append(
            subprocess.Popen([*base, f"--node-rank={node}", *train], env=env, stderr=subprocess.PIPE, text=True)
        )
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["rounds_committed"] == 4
    names = [f"worker{i}" + (f".{r}" if r else "") for i in range(2) for r in range(min(n, 2))]
    hashes = {name: _hashes(tmp_path, name) for name in names}
    assert all(h == hashes["worker0"] for h in hashes.values())


def test_offloaded_anchor_lives_in_pinned_host_memory_and_agrees() -> None:
    """outer.offload: the anchor (and so the outer momentum and pseudo-gradient) in pinned host
    memory while the model trains on the GPU; the outer step gives the on-device anchor's values
    (within fp32 rounding: the host's SGD and the GPU's may fuse multiply-adds differently)."""
    import torch.distributed as dist

    from dilo.model import params_of
    from dilo.outer.base import Tail
    from dilo.outer.diloco import DiLoCo
    from dilo.transport.torch_dist import TorchDistTransport

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    t = TorchDistTransport(store, 0, 1, backend="nccl", timeout_s=60)
    anchors = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
        outer = DiLoCo(model, t, inner_steps=1, lr=0.7, momentum=0.9, nesterov=True, offload=offload)
        outer.start(model, resumed=False)
        assert (outer.anchor.flat.device.type == "cpu") == offload
        assert outer.anchor.flat.is_pinned() == offload
        for _ in range(3):
            with torch.no_grad():
                for p in params_of(model):
                    p.add_(0.01 * torch.randn_like(p))
            outer.sync(model, tail=Tail(weight=1.0, contributes=True, stop=False, tokens=1))
        anchors.append(outer.anchor.flat.cpu().clone())
        assert next(model.parameters()).device.type == "cuda"
    torch.testing.assert_close(anchors[1], anchors[0], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="2 islands of 2 NCCL ranks need 4 GPUs")
def test_fsdp_islands_over_nccl(tmp_path: Path) -> None:
    """transport.island_shard = 'fsdp' over NCCL: 2 islands of 2 GPU ranks, bf16 compute over fp32
    master shards, every rank exchanging its shard; every round commits with one island-wide hash
    on every rank, and the sharded (DCP) checkpoint resumes on the same layout."""
    cmd = [sys.executable, "-m", "dilo.cli", "run", str(REPO / "configs" / "quickstart.toml"), "--workers=2",
           "--island-ranks=2", "--transport.island_shard=fsdp", "--transport.backend=nccl", "--steps=40",
           "--inner.warmup_steps=5", "--outer.inner_steps=10", "--inner.precision=bf16", "--checkpoint.every=1",
           "--log.progress=false", "--log.plot=false", f"--out_dir={tmp_path}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds_committed"] == 4 and summary["val_loss"] < summary["initial_val_loss"]
    names = ["worker0", "worker0.1", "worker1", "worker1.1"]
    assert all(_hashes(tmp_path, n) == _hashes(tmp_path, "worker0") for n in names)
    assert (tmp_path / "checkpoints" / "worker0" / "round_000004.json").is_file()
    proc = subprocess.run([*cmd, "--steps=50", "--checkpoint.resume=true"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "summary.json").read_text())["rounds_committed"] == 5
