"""The container files, checked statically (no docker engine runs here), and the compose topology
run as local processes: a coordinator and workers that share one environment (as replicas of
`docker compose --scale` do) and still each get their own data island (DILO_ISLAND=auto)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dilo import wire
from dilo.config import load
from dilo.coordinator import Coordinator
from tests.conftest import REPO, tiny_config, write_toml
from tests.test_async import DirectClient
from tests.test_elastic import FAST, _env, _reaped, _serving, _spawn, _wait_ok

COMPOSE = REPO / "launch" / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


def _defaults(text: str) -> str:
    """${VAR:-default} -> default, $$ -> $ (what compose does with an empty environment)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text).replace("$$", "$")


def _subcommands() -> set[str]:
    """The subcommands `dilo --help` lists."""
    out = subprocess.run([sys.executable, "-m", "dilo.cli", "--help"], capture_output=True, text=True, cwd=REPO).stdout
    return set(re.search(r"\{([\w,]+)\}", out).group(1).split(","))


def test_compose_file_describes_a_valid_elastic_run() -> None:
    spec = yaml.safe_load(_defaults(COMPOSE.read_text()))
    services = spec["services"]
    assert set(services) == {"coordinator", "worker", "worker-wan"}
    assert (COMPOSE.parent / services["worker"]["build"]["context"] / "Dockerfile").is_file()
    known = _subcommands()
    for name, svc in services.items():
        if name == "worker-wan":
            command = svc["entrypoint"][-1]
            assert "tc qdisc add dev eth0 root netem delay" in command and "NET_ADMIN" in svc["cap_add"]
            assert svc["profiles"] == ["wan"]
            args = command.split("exec dilo ")[1].replace('"$DILO_CONFIG"', svc["environment"]["DILO_CONFIG"]).split()
        else:
            args = svc["command"]
        sub, config, *overrides = args
        assert sub in known
        cfg = load(REPO / config, overrides)  # the config and every override validate
        assert cfg.membership.kind == "coordinator"
        if sub == "worker":
            assert svc["environment"]["DILO_ISLAND"] == "auto"
            assert cfg.membership.address == "tcp://coordinator:29600"
            assert svc["depends_on"] == ["coordinator"]
        else:
            assert cfg.coordinator.bind == "tcp://0.0.0.0:29600"
    assert "runs" in spec["volumes"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian's) is not installed")
def test_docker_compose_validates_the_file() -> None:
    proc = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "--profile", "wan", "config", "-q"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_dockerfile_builds_both_variants_from_files_that_exist() -> None:
    lines = [x.strip() for x in DOCKERFILE.read_text().splitlines() if x.strip() and not x.startswith("#")]
    joined = " ".join(lines).replace("\\ ", " ")
    instructions = [x.split()[0] for x in lines if x.split()[0].isupper()]
    assert set(instructions) <= {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "EXPOSE", "ENTRYPOINT", "CMD"}
    assert "ARG VARIANT=cpu" in lines
    stages = re.findall(r"FROM (\S+)(?: AS (\S+))?", joined)
    assert {s for _, s in stages if s} == {"base-cpu", "base-cuda"}
    assert stages[-1][0] == "base-${VARIANT}"
    assert "download.pytorch.org/whl/cpu" in joined and "download.pytorch.org/whl/cu" in joined
    for src in re.findall(r"COPY (.+?) \S+(?= |$)", joined):
        for path in src.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
    assert 'ENTRYPOINT ["dilo"]' in lines
    cmd = json.loads(next(x for x in lines if x.startswith("CMD"))[4:])
    assert cmd[0] in _subcommands()
    load(REPO / cmd[1])
    # the context it copies is small: no virtual environment or run directory goes in
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignore)


def test_auto_islands_are_handed_out_lowest_free_first(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, workers=3, membership=FAST)
    coord = Coordinator(cfg, inproc=True)

    def join(worker: str, island: Any = "auto") -> wire.Message:
        body = {} if island is None else {"island": island}
        client = DirectClient(coord, worker)
        assert client.session.accept_challenge(client.request(client.session.hello(worker), stamped=True))
        join = client.session.opening(wire.Message(type=wire.MsgType.JOIN, worker=worker, body=body))
        try:
            return client.request(join, stamped=True)
        except wire.WireError as e:
            return wire.Message(type=wire.MsgType.ERROR, worker="coordinator", body={"code": e.code})

    assert [join(w).body["island"] for w in ("a", "b", "c")] == [0, 1, 2]
    assert join("d").body["island"] == 0  # more workers than islands: the least used
    assert join("b").body["island"] == 1  # a re-join keeps its island
    assert "island" not in join("e", None).body  # a worker with its own island is not given one
    coord._remove("a")
    assert join("f").body["island"] == 0  # each island is held once again; the lowest wins
    bad = join("g", 7)
    assert bad.type == wire.MsgType.ERROR and bad.body["code"] == "bad_body"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_compose_topology_as_local_processes(tmp_path: Path, corpus_dir: Path) -> None:
    """What `docker compose up --scale worker=3` starts: one coordinator, three workers with the
    same command and environment. Each ends up on its own island and they train together."""
    cfg = tiny_config(
        tmp_path, corpus_dir, workers=3, steps=12, membership={**FAST, "start_quorum": 3},
        coordinator={"bind": "tcp://127.0.0.1:0"},
    )  # fmt: skip
    toml = write_toml(cfg, tmp_path / "compose.toml")
    coord = Coordinator(load(toml), bind="tcp://127.0.0.1:0")
    env = _env(DILO_ISLAND="auto")
    with _serving(coord), _reaped([]) as procs:
        for i in range(3):  # the same arguments for every replica, as --scale gives them
            procs.append(_spawn(["worker", str(toml), f"--membership.address={coord.address}"], tmp_path, f"r{i}", env))
        for p in procs:
            _wait_ok(p, 90)
    starts = [json.loads(p.read_text().splitlines()[0]) for p in sorted((tmp_path / "logs").glob("worker-*.jsonl"))]
    assert sorted(s["joined"]["island"] for s in starts) == [0, 1, 2]
    assert coord.version == 3
