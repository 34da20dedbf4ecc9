"""Islands of several ranks: data parallelism inside an island, the outer step across islands.

Threads over real Gloo for the logic; true multi-process runs under torchrun (two "nodes" of two
ranks on this machine, islands = nodes) and with a coordinator (each torchrun launch joins as one
worker)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from dilo.config import RunConfig
from dilo.errors import ConfigError, DiloError
from dilo.metrics import read_jsonl
from dilo.model import build_model, params_of
from dilo.outer.base import SyncReport, Tail
from dilo.outer.island import IslandSync
from dilo.state import load_worker_state, rounds_of
from dilo.transport.torch_dist import TorchDistTransport
from dilo.worlds import Placement, StaticWorld
from tests.conftest import REPO, run_workers, tiny_config, train_threads, write_toml
from tests.test_launch import _env, _overrides

RANKS = ["worker0", "worker0.1", "worker1", "worker1.1"]


def _rounds(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run_dir / "logs" / f"{name}.jsonl") if r["event"] == "round"]


def _final(run_dir: Path, name: str) -> list[torch.Tensor]:
    ckpt = run_dir / "checkpoints"
    return load_worker_state(ckpt, rounds_of(ckpt, name)[-1], name)["params"]


def _islands(tmp_path: Path, corpus: Path, **kw: Any) -> RunConfig:
    transport = {"timeout_s": 20, "island_ranks": 2, **kw.pop("transport", {})}
    return tiny_config(tmp_path, corpus, transport=transport, **kw)


def test_two_islands_of_two_ranks_keep_bit_identical_anchors(tmp_path: Path, corpus_dir: Path) -> None:
    summaries = train_threads(_islands(tmp_path, corpus_dir, steps=16, checkpoint={"every": 2}), 4)
    assert all(s == summaries[0] for s in summaries)
    logs = {name: _rounds(tmp_path, name) for name in RANKS}
    assert [r["round"] for r in logs["worker0"]] == [1, 2, 3, 4]
    for rnd in range(4):
        assert len({log[rnd]["anchor_hash"] for log in logs.values()}) == 1, f"round {rnd + 1} diverged"
        assert all(log[rnd]["committed"] and log[rnd]["participants"] == 2 for log in logs.values())
    # only the lead ranks talk to the other island
    assert all(r["bytes_sent"] > 0 for r in logs["worker0"]) and all(r["bytes_sent"] == 0 for r in logs["worker0.1"])
    s = summaries[0]
    assert s["workers"] == 2 and s["tokens"] == 16 * 4 * (4 * 32)  # every rank trains on its own batches
    assert s["comm_reduction"] == pytest.approx(4.0, rel=0.01)  # H=4, counted per island
    assert s["val_loss"] < s["initial_val_loss"]
    first = _final(tmp_path, "worker0")
    for name in RANKS[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first, _final(tmp_path, name)))


def test_an_island_trains_like_one_rank_with_its_whole_batch(tmp_path: Path, corpus_dir: Path) -> None:
    """Data parallelism inside an island is exact: 2 ranks x batch 4 == 1 rank x batch 8."""
    common = {"steps": 8, "inner": {"optimizer": "sgd", "lr": 0.05, "warmup_steps": 0, "grad_clip": 0.0}}
    island = _islands(tmp_path / "island", corpus_dir, **common)
    alone = tiny_config(tmp_path / "alone", corpus_dir, data={"batch_size": 8}, **common)
    train_threads(island, 2)
    train_threads(alone, 1)
    a, b = _final(tmp_path / "island", "worker0"), _final(tmp_path / "alone", "worker0")
    start = params_of(build_model(alone.model, alone.seed))
    assert max(float((x - y.detach()).abs().max()) for x, y in zip(b, start)) > 1e-3  # it did train
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    tokens = [r["tokens"] for r in _rounds(tmp_path / "island", "worker0")]
    assert tokens == [r["tokens"] // 2 for r in _rounds(tmp_path / "alone", "worker0")]  # per rank


def test_island_resume_is_bit_identical(tmp_path: Path, corpus_dir: Path) -> None:
    full = _islands(tmp_path / "full", corpus_dir, steps=12, checkpoint={"every": 1})
    train_threads(full, 4)
    part = _islands(tmp_path / "part", corpus_dir, steps=12, checkpoint={"every": 1})
    assert train_threads(part, 4, max_rounds=1)[0]["stopped"]
    resumed = _islands(tmp_path / "part", corpus_dir, steps=12, checkpoint={"every": 1, "resume": True})
    assert train_threads(resumed, 4)[0]["steps"] == 12
    for name in RANKS:
        a, b = _rounds(tmp_path / "full", name), _rounds(tmp_path / "part", name)
        assert [r["anchor_hash"] for r in a] == [r["anchor_hash"] for r in b]
        assert [r["loss"] for r in a] == [r["loss"] for r in b]


class _Failing:
    """An outer strategy whose exchange blows up (a bug, or an unreachable coordinator)."""

    round_steps = 2

    def due(self, step: int) -> bool:
        return (step + 1) % 2 == 0

    def sync(self, model: torch.nn.Module, *, tail: Tail) -> SyncReport:
        raise RuntimeError("the coordinator is gone for good")


def _island_pair(fn: Any) -> list[Any]:
    """Run fn(rank, group) for the two ranks of one island (threads over real Gloo)."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    out: list[Any] = [None, None]

    def body(rank: int) -> None:
        try:
            client = dist.TCPStore("127.0.0.1", store.port, 2, is_master=False)
            out[rank] = fn(rank, TorchDistTransport(client, rank, 2, timeout_s=20))
        except BaseException as e:  # noqa: BLE001 - returned for the assertions
            out[rank] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "an island rank hung"
    return out


def test_followers_stop_with_a_clear_error_when_the_lead_fails() -> None:
    cfg = RunConfig()

    def rank(r: int, group: TorchDistTransport) -> Any:
        model = build_model(cfg.model.model_copy(update={"n_layer": 1, "d_model": 32, "n_head": 2}), 0)
        island = IslandSync(model, group, _Failing() if r == 0 else None)
        assert [island.due(s) for s in range(4)] == [False, True, False, True]  # the lead decides
        return island.sync(model, tail=Tail(weight=1.0, contributes=True, stop=False, tokens=8))

    lead, follower = _island_pair(rank)
    assert isinstance(lead, RuntimeError) and "gone for good" in str(lead)
    assert isinstance(follower, DiloError) and "lead rank failed" in str(follower)


def test_follower_reports_the_leads_round() -> None:
    cfg = RunConfig()
    report = SyncReport(
        committed=False, participants=0, bytes_sent=5, bytes_recv=7, sync_s=0.1, stop=True, tokens=96,
        reason="no worker contributed", version=3, staleness=2, schedule_step=40,
    )  # fmt: skip

    class _Lead:
        round_steps = 3

        def due(self, step: int) -> bool:
            return True

        def sync(self, model: torch.nn.Module, *, tail: Tail) -> SyncReport:
            with torch.no_grad():
                for p in params_of(model):
                    p.fill_(0.5)  # the outer step's result
            return report

    def rank(r: int, group: TorchDistTransport) -> Any:
        model = build_model(cfg.model.model_copy(update={"n_layer": 1, "d_model": 32, "n_head": 2}), r)
        island = IslandSync(model, group, _Lead() if r == 0 else None)
        got = island.sync(model, tail=Tail(weight=1.0, contributes=True, stop=r == 1, tokens=8))
        return got, island.round_steps, all(bool((p == 0.5).all()) for p in params_of(model))

    (lead, lead_steps, lead_params), (follower, steps, params) = _island_pair(rank)
    assert lead is report and params and lead_params and steps == lead_steps == 3
    assert (follower.committed, follower.reason, follower.stop, follower.tokens) == (False, report.reason, True, 96)
    assert (follower.version, follower.staleness, follower.schedule_step) == (3, 2, 40)
    assert follower.bytes_sent == 0  # a follower sends nothing to other islands


def test_island_layout_is_checked(tmp_path: Path, corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for section, why in (
        ({"outer": {"kind": "ddp"}}, "islands do not apply"),
        ({"outer": {"kind": "gossip", "inner_steps": 4}}, "one rank per worker"),
        ({"membership": {"kind": "coordinator"}}, "form one island by themselves"),
    ):
        with pytest.raises(Exception, match=why):
            _islands(tmp_path, corpus_dir, **section)
    cfg = _islands(tmp_path, corpus_dir, transport={"island_ranks": 2})
    with pytest.raises(DiloError, match="does not divide the world of 3 ranks"):
        run_workers(lambda p: StaticWorld(cfg, Placement(p.rank, 3, port=p.port, hosted=True)), 1)
    node = _islands(tmp_path, corpus_dir, transport={"island_ranks": "node"})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    worlds = run_workers(lambda p: StaticWorld(node, p), 4)
    assert [(w.rank, w.local_rank, w.size) for w in worlds] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    for w in worlds:
        w.close(leaving=True)


# ---------------------------------------------------------------------------------------------
# real processes


def _run_all(cmds: list[list[str]]) -> None:
    """Start every command at once, wait for all, and fail with their output if one failed."""
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=200)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)


def _same_anchors_every_round(run_dir: Path, names: list[str], *, rounds: int, islands: int) -> str:
    """Every rank logged the same anchor in every round, with `islands` participants; the last anchor."""
    logs = {name: _rounds(run_dir, name) for name in names}
    hashes = [[r["anchor_hash"] for r in log] for log in logs.values()]
    assert len(hashes[0]) == rounds and all(h == hashes[0] for h in hashes), hashes
    assert all(r["participants"] == islands for log in logs.values() for r in log)
    return hashes[0][-1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_two_nodes_of_two_ranks(tmp_path: Path, corpus_dir: Path) -> None:
    """Two torchrun launches (--nnodes 2, two ranks each), islands = nodes: every rank ends every
    round on bit-identical anchors."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2",
              "--master-addr=127.0.0.1", f"--master-port={port}"]  # fmt: skip
    train = ["-m", "dilo.train", str(REPO / "configs" / "quickstart.toml"), *_overrides(tmp_path, corpus_dir)]
    _run_all([[*common, f"--node-rank={n}", *train, "--transport.island_ranks=node"] for n in range(2)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["rounds_committed"] == 4
    _same_anchors_every_round(tmp_path, RANKS, rounds=4, islands=2)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_each_torchrun_launch_joins_the_coordinator_as_one_worker(tmp_path: Path, corpus_dir: Path) -> None:
    from dilo.coordinator import Coordinator
    from dilo.transport.zmq_star import status
    from tests.test_elastic import _serving

    cfg = tiny_config(
        tmp_path,
        corpus_dir,
        workers=2,
        steps=16,
        membership={"kind": "coordinator", "heartbeat_s": 0.3, "heartbeat_timeout_s": 5.0, "start_quorum": 2},
    )
    toml = write_toml(cfg, tmp_path / "elastic.toml")
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with _serving(coord):
        worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                  "-m", "dilo.cli", "worker", str(toml), f"--membership.address={coord.address}"]  # fmt: skip
        _run_all([[*worker, "--id", f"isl{i}"] for i in range(2)])
        final = status(coord.address, secret=None)
    assert final["version"] == 4
    names = ["worker-isl0", "worker-isl0.1", "worker-isl1", "worker-isl1.1"]
    last = _same_anchors_every_round(tmp_path, names, rounds=4, islands=2)  # two workers, not four
    assert last == coord.anchor_hash()


def test_followers_hear_when_the_lead_cannot_join(tmp_path: Path, corpus_dir: Path) -> None:
    """With a coordinator, the lead rank joins for the island; if it cannot, its followers stop
    with a clear error at once instead of waiting for a collective's timeout."""
    from dilo.worlds import ElasticWorld

    cfg = tiny_config(tmp_path, corpus_dir, workers=2, membership={"kind": "coordinator"})

    class _Unreachable:
        round_steps = 4

        def start(self, model: torch.nn.Module, *, resumed: bool) -> Any:
            raise DiloError("no coordinator at tcp://127.0.0.1:1 after 3 tries")

    def rank(p: Placement) -> Any:
        world = ElasticWorld(cfg, "isl7" if p.rank == 0 else "ignored", island=p)
        model = build_model(cfg.model, 0)
        outer = IslandSync(model, world.group, _Unreachable() if p.rank == 0 else None)  # type: ignore[arg-type]
        try:
            outer.start(model, resumed=False)
        except DiloError as e:
            return world.worker_id, world.log_name, world.rank, str(e)
        finally:
            world.close(leaving=False)
        return None

    (lead_id, lead_log, island, lead_err), (follower_id, follower_log, follower_island, follower_err) = run_workers(
        rank, 2
    )
    assert lead_id == follower_id == "isl7" and island == follower_island == 7 % 2  # the island is one worker
    assert (lead_log, follower_log) == ("worker-isl7", "worker-isl7.1")
    assert "no coordinator" in lead_err and "lead rank could not start" in follower_err


def test_every_rank_on_the_wire_gives_the_lead_only_anchors(tmp_path: Path, corpus_dir: Path) -> None:
    """transport.island_wire='all': each rank of an island exchanges its share of the parameters
    with the same rank of the other island; the anchors are the lead-only exchange's, bit for bit,
    and each rank sends about half of what the lead sends alone."""
    runs = {wire: tmp_path / wire for wire in ("lead", "all")}
    for wire, run in runs.items():
        train_threads(_islands(run, corpus_dir, steps=8, transport={"island_wire": wire}), 4)
    for name in RANKS:
        assert all(torch.equal(a, b) for a, b in zip(_final(runs["lead"], name), _final(runs["all"], name))), name
    lead = sum(r["bytes_sent"] for r in _rounds(runs["lead"], "worker0"))
    shares = [sum(r["bytes_sent"] for r in _rounds(runs["all"], f"worker0{s}")) for s in ("", ".1")]
    assert sum(shares) == pytest.approx(lead, rel=0.05)  # the same payload, split
    assert all(0.35 * lead < s < 0.65 * lead for s in shares), (lead, shares)
    hashes = {name: [r["anchor_hash"] for r in _rounds(runs["all"], name)] for name in RANKS}
    assert all(h == hashes["worker0"] for h in hashes.values())


def test_island_wire_all_refuses_streaming(tmp_path: Path, corpus_dir: Path) -> None:
    streaming = {"kind": "diloco", "inner_steps": 4, "fragments": 2, "fragment_delay": 1}
    with pytest.raises(ConfigError, match="island_wire='lead'"):
        _islands(tmp_path, corpus_dir, transport={"island_wire": "all"}, outer=streaming)
