"""The Slurm scripts in launch/slurm/, on a real Slurm: munge, slurmctld and two slurmd daemons
("nodes" n1 and n2) started on this machine from the distribution's packages.

Skipped, with the reason, when not root or when Slurm cannot be installed (apt-get).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_config, write_toml

pytestmark = pytest.mark.slow

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _have_slurm() -> str | None:
    """None when Slurm is ready to start; otherwise why not."""
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd and munged needs root"
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    proc = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-500:]}"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    why = _have_slurm()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    ctld_port = _free_port()
    node_ports = [_free_port(), _free_port()]
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text(
        f"""ClusterName=dilotest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={node_ports[0]} CPUs=1 RealMemory=8000
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={node_ports[1]} CPUs=1 RealMemory=8000
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for sub in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(sub, "munge", "munge")
    munged = subprocess.Popen(["/usr/sbin/munged", "--foreground"], user="munge", group="munge")
    time.sleep(0.5)
    procs = [subprocess.Popen(["/usr/sbin/slurmctld", "-D"], env=env)]
    procs += [subprocess.Popen(["/usr/sbin/slurmd", "-D", "-N", n], env=env) for n in ("n1", "n2")]
    try:
        deadline = time.monotonic() + 60
        while True:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], env=env, capture_output=True, text=True).stdout
            if out.split()[:2] == ["idle", "2"]:
                break
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-1500:] for p in (d / "log").glob("*.log"))
                pytest.fail(f"Slurm did not come up: sinfo says {out!r}\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
        munged.terminate()
        for p in [*procs, munged]:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=5)


def _submit(env: dict[str, str], args: list[str], timeout: float = 240) -> str:
    """sbatch, wait until the job ends, return its state."""
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
        state = next((w.split("=")[1] for w in info.split() if w.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} still running after {timeout:.0f} s")


def _env_for_jobs(env: dict[str, str]) -> dict[str, str]:
    return {**env, "DILO_PYTHON": sys.executable, "DILO_LOG": "INFO", "OMP_NUM_THREADS": "1"}


def test_static_diloco_across_two_nodes(slurm: dict[str, str], tmp_path: Path, corpus_dir: Path) -> None:
    """One torchrun per node with two ranks each: two islands (the nodes) of two ranks."""
    cfg = tiny_config(tmp_path / "run", corpus_dir, steps=12)
    toml = write_toml(cfg, tmp_path / "diloco.toml")
    out = tmp_path / "job.out"
    state = _submit(
        {**_env_for_jobs(slurm), "DILO_RANKS_PER_NODE": "2", "DILO_PORT": str(_free_port())},
        [
            "--nodes=2",
            "--ntasks-per-node=1",
            f"--output={out}",
            "launch/slurm/diloco.sbatch",
            str(toml),
        ],
    )
    text = out.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "dilo: node 0 on n1 starts 2 ranks" in text and "dilo: node 1 on n2 starts 2 ranks" in text
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["rounds_committed"] == 3
    hashes = []
    for name in ("worker0", "worker0.1", "worker1", "worker1.1"):
        recs = [json.loads(x) for x in (tmp_path / "run" / "logs" / f"{name}.jsonl").read_text().splitlines()]
        rounds = [x for x in recs if x["event"] == "round"]
        assert all(x["participants"] == 2 for x in rounds)  # two islands, not four workers
        hashes.append([x["anchor_hash"] for x in rounds])
    assert len(hashes[0]) == 3 and all(h == hashes[0] for h in hashes)


def test_elastic_coordinator_and_workers_across_two_nodes(
    slurm: dict[str, str], tmp_path: Path, corpus_dir: Path
) -> None:
    cfg = tiny_config(
        tmp_path / "run",
        corpus_dir,
        steps=12,
        membership={"kind": "coordinator", "heartbeat_s": 0.2, "heartbeat_timeout_s": 5.0, "round_timeout_s": 60},
    )
    toml = write_toml(cfg, tmp_path / "elastic.toml")
    out = tmp_path / "job.out"
    env = {**_env_for_jobs(slurm), "DILO_COORDINATOR_PORT": str(_free_port())}
    state = _submit(
        env, ["--nodes=2", "--ntasks-per-node=1", f"--output={out}", "launch/slurm/elastic.sbatch", str(toml)]
    )
    text = out.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "on n1" in text and "on n2" in text and "dilo: coordinator at tcp://127.0.0.1:" in text
    logs = sorted((tmp_path / "run" / "logs").glob("worker-*.jsonl"))
    assert len(logs) == 2
    rounds = [[json.loads(x) for x in p.read_text().splitlines() if '"round"' in x] for p in logs]
    assert [r["anchor_hash"] for r in rounds[0]] == [r["anchor_hash"] for r in rounds[1]]
    assert all(r["participants"] == 2 for rs in rounds for r in rs)
    assert (tmp_path / "run" / "coordinator").is_dir()  # the coordinator checkpointed on its way out
