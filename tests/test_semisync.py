"""Semi-synchronous coordinator rounds (membership.backup_workers, membership.late_weight), in the
simulator's virtual time (the real coordinator and workers, an injected clock and links)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dilo.metrics import read_jsonl
from dilo.sim import simulate
from tests.conftest import tiny_config


def _rounds(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run_dir / "logs" / f"{name}.jsonl") if r["event"] == "round"]


def _run(tmp_path: Path, corpus_dir: Path, **membership: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    cfg = tiny_config(
        tmp_path,
        corpus_dir,
        workers=4,
        steps=16,
        heterogeneity={"slowdown": [1, 1, 1, 4]},
        membership={"kind": "coordinator", "heartbeat_timeout_s": 30.0, "round_timeout_s": 60.0, **membership},
        sim={"step_s": 0.5},
    )
    result = simulate(cfg, timeout_s=180)
    return result, _rounds(tmp_path, "worker-sim0")


def test_backup_workers_close_rounds_without_the_slowest(tmp_path: Path, corpus_dir: Path) -> None:
    """4 workers, one 4x slower: waiting for everyone, each round takes the slow worker's 8 s of
    compute; with one backup worker a round closes on the 3 fast ones (2 s of compute) and the
    slow worker's pushes come late. With late_weight they are folded into the open round."""
    sync, sync_rounds = _run(tmp_path / "sync", corpus_dir)
    semi, semi_rounds = _run(tmp_path / "semi", corpus_dir, backup_workers=1)
    folded, folded_rounds = _run(tmp_path / "folded", corpus_dir, backup_workers=1, late_weight=0.5)
    assert all(r["participants"] == 4 for r in sync_rounds)
    assert all(r["round_s"] > 7.5 for r in sync_rounds)  # virtual seconds: 4 steps x 0.5 s x 4
    assert all(r["participants"] == 3 and r["round_s"] < 4.0 for r in semi_rounds[1:])
    assert semi_rounds[-1]["wall_s"] < 0.5 * sync_rounds[-1]["wall_s"]
    # the slow worker's updates: dropped, or counted (a round with a fourth, discounted contribution)
    assert all(r["participants"] <= 3 for r in semi_rounds[1:])
    assert any(r["participants"] == 4 for r in folded_rounds[1:])
    assert folded["coordinator"]["late_folded"] > 0 and semi["coordinator"]["late_folded"] == 0


def test_compass_schedule_makes_workers_of_different_speeds_arrive_together(tmp_path: Path, corpus_dir: Path) -> None:
    """membership.schedule = compass: once its speed is measured, the 4x slower worker is handed a
    quarter of the steps, so rounds close with all 4 workers in about the fast workers' time."""
    sync, sync_rounds = _run(tmp_path / "sync", corpus_dir)
    compass, rounds = _run(tmp_path / "compass", corpus_dir, schedule="compass")
    later = rounds[2:]  # the first round measures the speeds
    assert later and all(r["participants"] == 4 and r["round_s"] < 4.0 for r in later)
    slow = _rounds(tmp_path / "compass", "worker-sim3")
    steps = [slow[0]["step"]] + [b["step"] - a["step"] for a, b in zip(slow, slow[1:])]
    assert steps == [4, 1, 1, 1]  # a full round while its speed is unknown, then a quarter of one
    assert len(slow) == len(rounds) == 4  # the run lasts as many rounds for everyone
    assert rounds[-1]["wall_s"] < 0.6 * sync_rounds[-1]["wall_s"]


def test_fedau_estimates_the_mean_interval_between_participations() -> None:
    """Members present every round, every 2nd and every 4th: their weights become the mean
    interval between their participations (1, 2, 4), each interval capped."""
    from dilo.coordinator.sync import Participation

    p = Participation(cap=3)
    members = {"always", "half", "quarter"}
    for r in range(1, 17):
        present = ["always"] + (["half"] if r % 2 == 0 else []) + (["quarter"] if r % 4 == 0 else [])
        p.seen(r, present, members)
    assert p.weights() == {"always": 1.0, "half": 2.0, "quarter": 3.0}  # 4 capped at 3
    twin = Participation(cap=3)
    twin.load_state_dict(p.state_dict())
    assert twin.weights() == p.weights()


def test_fedau_weights_a_worker_that_misses_rounds_up(tmp_path: Path, corpus_dir: Path) -> None:
    """A 4x slower worker with one backup worker misses rounds (its pushes come late); with
    membership.participation = fedau its weight grows to the mean interval between the rounds it
    made, while the always-present workers keep weight 1."""
    result, rounds = _run(tmp_path, corpus_dir, backup_workers=1, participation="fedau")
    weights = result["coordinator"]["participation_weights"]
    assert weights["sim0"] == weights["sim1"] == weights["sim2"] == 1.0
    assert weights["sim3"] > 1.0


def test_backup_workers_tuned_from_arrival_times(tmp_path: Path, corpus_dir: Path) -> None:
    """backup_workers = "auto": once the arrival times show one member 4x slower than the median,
    rounds stop waiting for it (and never leave out the three that arrive together)."""
    _, rounds = _run(tmp_path, corpus_dir, backup_workers="auto")
    assert all(r["participants"] >= 3 for r in rounds)
    assert [r["participants"] for r in rounds[:2]] == [4, 4]  # waited for while nothing was measured
    assert all(r["participants"] == 3 and r["round_s"] < 4.0 for r in rounds[3:])


def test_fedau_weights_are_the_rounds_weights_in_a_real_coordinator(tmp_path: Path, corpus_dir: Path) -> None:
    """An in-process coordinator (encoded, validated messages), 3 members, one backup worker (a
    round closes on 2 pushes, the third comes late and is dropped): a, b | a, c | c, b. Before the
    third round c's interval is 2 and b's 1, so its mean is (2 d_c + d_b) / 3 with weights from
    FedAU's estimate; every anchor is outer Nesterov on that weighted mean, as computed here."""
    import torch

    from dilo import wire
    from dilo.coordinator import Coordinator
    from dilo.outer.star import StarCodec
    from tests.test_async import DirectClient

    cfg = tiny_config(
        tmp_path, corpus_dir, workers=3, outer={"kind": "diloco", "inner_steps": 4, "lr": 0.7, "momentum": 0.9},
        membership={"kind": "coordinator", "backup_workers": 1, "participation": "fedau", "round_timeout_s": 600,
                    "heartbeat_timeout_s": 600},
    )  # fmt: skip
    coord = Coordinator(cfg, inproc=True)
    star = StarCodec(coord.names, [p.shape for p in coord.params], cfg.codec, seed=cfg.seed)
    clients = {w: DirectClient(coord, w) for w in "abc"}
    for c in clients.values():
        c.join()
    coord.outbox.clear()
    anchor = [p.detach().clone().double() for p in coord.params]
    momentum = [torch.zeros_like(a) for a in anchor]
    g = torch.Generator().manual_seed(3)
    for pushers, late, weights in (("ab", "c", (1.0, 1.0)), ("ac", "b", (1.0, 1.0)), ("cb", "a", (2.0, 1.0))):
        deltas = []
        for w in pushers:
            d = [torch.randn(p.shape, generator=g) * 1e-2 for p in coord.params]
            deltas.append(d)
            body = {"weight": 1.0, "contributes": True, "stop": False, "tokens": 128, "steps": 4, "inner_s": 1.0}
            msg_tensors = star.encode_push(d, 0, 1, contributes=True)
            msg = wire.Message(type=wire.MsgType.PUSH, worker=w, base=coord.version, body=body, tensors=msg_tensors)
            clients[w].send(msg)
        stale = wire.Message(type=wire.MsgType.PUSH, worker=late, base=coord.version - 1, body=body,
                             tensors=star.encode_push(deltas[0], 0, 1, contributes=True))  # fmt: skip
        clients[late].send(stale)  # late: dropped (late_weight 0), the worker catches up
        coord.outbox.clear()
        mean = [sum(wt * d[i].double() for wt, d in zip(weights, deltas)) / sum(weights) for i in range(len(anchor))]
        momentum = [0.9 * m + x for m, x in zip(momentum, mean)]
        anchor = [a - 0.7 * (x + 0.9 * m) for a, x, m in zip(anchor, mean, momentum)]
        for p, a in zip(coord.params, anchor):
            torch.testing.assert_close(p.detach(), a.float(), rtol=1e-5, atol=1e-6)
    # after the third round: b's intervals 1 and 2, c's 2 and 1; a has taken part in every round it could
    assert coord.status()["participation_weights"] == {"a": 1.0, "b": 1.5, "c": 1.5}
