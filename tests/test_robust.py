"""Byzantine-robust aggregation ([aggregate]): each rule against the naive reference, over real
Gloo (workers as threads, one of them hostile) and inside the coordinator's round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dilo.config import AggregateConfig
from dilo.errors import ConfigError
from dilo.outer import reference
from dilo.outer.aggregate import RobustMean
from dilo.outer.base import Tail, params_of
from dilo.outer.diloco import DiLoCo
from dilo.outer.robust import build_aggregator
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from tests.conftest import run_workers, tiny_config
from tests.test_outer import _drift, _model

RULES = [
    ("median", {}),
    ("trimmed_mean", {"trim": 1}),
    ("centered_clip", {"tau": 0.5, "iterations": 3}),
    ("krum", {"byzantine": 1}),
    ("multikrum", {"byzantine": 1, "select": 2}),
]


def _vectors(n: int, d: int = 40, *, attacker: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    base = torch.randn(d, generator=g)
    vs = [base + 0.1 * torch.randn(d, generator=g) for _ in range(n)]
    if attacker:
        vs[-1] = -10 * vs[-1]
    return vs


@pytest.mark.parametrize(("kind", "kw"), RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("n", [5, 6])
def test_each_rule_matches_the_naive_reference(kind: str, kw: dict[str, Any], n: int) -> None:
    vectors = _vectors(n)
    agg = build_aggregator(AggregateConfig(kind=kind, **kw))  # type: ignore[arg-type]
    assert agg is not None
    got = agg(vectors, [1.0] * n)
    torch.testing.assert_close(got, reference.robust_aggregate(kind, vectors, **kw), rtol=1e-5, atol=1e-6)
    honest = torch.stack(vectors[:-1]).mean(0)
    plain = torch.stack(vectors).mean(0)
    assert float((got - honest).norm()) < 0.5 * float((plain - honest).norm())  # the attacker moves it far less


def test_norm_clipping_bounds_each_vector_before_the_rule() -> None:
    vectors = _vectors(4)
    agg = build_aggregator(AggregateConfig(kind="mean", clip_norm=1.0))
    assert agg is not None and build_aggregator(AggregateConfig()) is None  # the plain mean needs no vectors
    clipped = [v * min(1.0, 1.0 / float(v.norm())) for v in vectors]
    torch.testing.assert_close(agg(vectors, [1.0] * 4), torch.stack(clipped).mean(0), rtol=1e-5, atol=1e-6)


def test_too_few_contributors_fall_back_to_the_median() -> None:
    vectors = _vectors(3)
    agg = build_aggregator(AggregateConfig(kind="krum", byzantine=1))  # needs 5
    assert agg is not None
    torch.testing.assert_close(agg(vectors, [1.0] * 3), reference.robust_aggregate("median", vectors))


def _worker(world: Any, kind: str, kw: dict[str, Any], rounds: int = 3) -> Any:
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)
    model = _model()
    agg = build_aggregator(AggregateConfig(kind=kind, **kw))  # type: ignore[arg-type]
    outer = DiLoCo(model, t, inner_steps=1, lr=1.0, aggregator=agg)  # FedAvg: anchor - aggregate
    ends = []
    for r in range(rounds):
        with torch.no_grad():
            for i, p in enumerate(params_of(model)):
                p.sub_(_drift(world.rank, 10 * r + i, p.shape) + 0.05)  # honest workers agree on a direction
                if world.rank == world.size - 1:  # hostile: its pseudo-gradient scaled by -10
                    anchor = outer.anchor.params[i]
                    p.copy_(anchor + 10 * (anchor - p))
        ends.append([p.detach().clone() for p in params_of(model)])
        report = outer.sync(model, tail=Tail(weight=1.0, contributes=True, stop=False, tokens=1))
        assert report.committed
    return ends, [a.detach().clone() for a in outer.anchor.params], t.counter.recv, report.extra


@pytest.mark.parametrize(("kind", "kw"), [RULES[0], RULES[2], RULES[4]], ids=["median", "centered_clip", "multikrum"])
def test_robust_rules_over_gloo_with_a_hostile_worker(kind: str, kw: dict[str, Any]) -> None:
    """5 workers, the last sending its pseudo-gradient x -10: every worker ends on the same bits,
    those of the reference rule applied round by round; and the exchange all-gathers (bytes)."""
    n = 5
    out = run_workers(lambda w: _worker(w, kind, kw), n)
    for _, anchor, _, _ in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[0][1], anchor))
    norms = out[0][3]["member_norms"]  # the round log's per-member statistics: the hostile one stands out
    assert set(out[0][3]["member_cosines"]) == set(norms) == {f"worker{i}" for i in range(n)}
    assert norms["worker4"] > 5 * max(norms[f"worker{i}"] for i in range(4))
    ref = [p.detach().clone() for p in params_of(_model())]
    for r in range(3):
        deltas = [[a - p for a, p in zip(ref, ends[r])] for ends, _, _, _ in out]
        flat = [torch.cat([d.reshape(-1) for d in ds]) for ds in deltas]
        agg = reference.robust_aggregate(kind, flat, **kw)
        ref = [a - g.view_as(a) for a, g in zip(ref, torch.split(agg, [a.numel() for a in ref]))]
    for a, b in zip(out[0][1], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    plain = run_workers(lambda w: _worker(w, "mean", {}), n)
    assert out[0][2] > 1.5 * plain[0][2]  # (n - 1) payloads received instead of an all-reduce's ~2 (n - 1) / n


def test_the_coordinators_robust_mean_and_its_member_statistics() -> None:
    """The coordinator's round under the median: the reference aggregate, split by groups, and the
    hostile member stands out by its cosine to it (the honest ones point along it)."""
    vectors = _vectors(5)
    agg = build_aggregator(AggregateConfig(kind="median"))
    assert agg is not None
    mean = RobustMean([30, 10], agg)
    for i, v in enumerate(vectors):
        mean.add(f"w{i}", 1.0, [v[:30].clone(), v[30:].clone()])
    stats = mean.stats()
    got = torch.cat(mean.mean())
    torch.testing.assert_close(got, reference.robust_aggregate("median", vectors), rtol=1e-6, atol=1e-6)
    assert stats["w4"]["cos"] < 0 and all(stats[f"w{i}"]["cos"] > 0.9 for i in range(4))
    mean.reset()
    assert not mean.members


def test_a_coordinator_run_under_trimmed_mean(tmp_path: Path, corpus_dir: Path) -> None:
    """Elastic DiLoCo with aggregate.kind = trimmed_mean: both workers end on the coordinator's
    parameters (two contributors are fewer than the rule needs: the median, i.e. their mean)."""
    from dilo.coordinator import Coordinator
    from dilo.outer.base import tensor_digest
    from tests.test_elastic import _at, _elastic_cfg, _run_threads, _serving

    cfg = _elastic_cfg(tmp_path, corpus_dir, workers=2, steps=8, aggregate={"kind": "trimmed_mean", "trim": 1})
    coord = Coordinator(cfg, bind="tcp://127.0.0.1:0")
    with _serving(coord):
        summaries, worlds = _run_threads(_at(cfg, coord.address), ["w0", "w1"])
        final = tensor_digest(coord.params)
    assert coord.version == 2 and all(w.outer.anchor.digest() == final for w in worlds)
    assert all(s["val_loss"] < s["initial_val_loss"] for s in summaries)


@pytest.mark.parametrize(
    ("sections", "needle"),
    [
        ({"aggregate": {"kind": "krum", "byzantine": 1}, "workers": 4}, "needs at least 5 workers"),
        ({"aggregate": {"kind": "median"}, "codec": {"kind": "powersgd"}, "workers": 3}, "PowerSGD only ever sums"),
        ({"aggregate": {"kind": "krum"}, "workers": 6, "outer": {"kind": "ddp"}}, "DiLoCo / FedAvg rounds"),
    ],
    ids=["too-few", "powersgd", "ddp"],
)
def test_aggregate_config_is_validated(tmp_path: Path, corpus_dir: Path, sections: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        tiny_config(tmp_path, corpus_dir, **sections)


def test_a_hostile_worker_in_the_simulator(tmp_path: Path, corpus_dir: Path) -> None:
    """heterogeneity.hostile = [4] (x -10 every round) among 5 simulated workers: the plain mean ends
    far above the clean run's validation loss, the median next to it."""
    from dilo.sim import simulate

    def run(name: str, **sections: Any) -> float:
        cfg = tiny_config(tmp_path / name, corpus_dir, workers=5, steps=24, **sections)
        simulate(cfg, timeout_s=300)
        from dilo.metrics import read_jsonl

        ends = [r for r in read_jsonl(tmp_path / name / "logs" / "worker0.jsonl") if r["event"] == "end"]
        return float(ends[0]["val_loss"])

    clean = run("clean")
    attacked = run("mean", heterogeneity={"hostile": [4]})
    robust = run("median", heterogeneity={"hostile": [4]}, aggregate={"kind": "median"})
    assert attacked > clean + 0.5 and abs(robust - clean) < 0.1 * clean, (clean, attacked, robust)


def test_robust_gossip_mixing_leaves_the_farthest_peers_out() -> None:
    """outer.nearest (MoNNA-style): the received peers farthest from this worker's parameters are
    dropped from the mix, by Euclidean distance (ties by id); the rest are mixed as before."""
    from dilo.outer import mixing

    own = [torch.zeros(3), torch.zeros(2)]
    got = {
        "a": [torch.full((3,), 0.1), torch.zeros(2)],
        "b": [torch.full((3,), -0.2), torch.zeros(2)],
        "evil": [torch.full((3,), 50.0), torch.full((2,), -50.0)],
    }
    assert mixing.farthest(own, got, 1) == ["evil"] and mixing.farthest(own, got, 2) == ["evil", "b"]
    kept = {p: v for p, v in got.items() if p not in mixing.farthest(own, got, 1)}
    weights = {"me": 0.25, "a": 0.25, "b": 0.25, "evil": 0.25}
    mixed = mixing.mix(own, kept, weights, "me")  # the weights of those left renormalised
    torch.testing.assert_close(mixed[0], torch.full((3,), (0.1 - 0.2) / 3))


def test_robust_gossip_mixing_is_validated(tmp_path: Path, corpus_dir: Path) -> None:
    with pytest.raises(ConfigError, match="push-sum"):
        tiny_config(tmp_path, corpus_dir, outer={"kind": "gossip", "nearest": 1, "push_sum": True})
    with pytest.raises(ConfigError, match="outer.nearest"):
        tiny_config(tmp_path, corpus_dir, outer={"kind": "gossip", "nearest": 1}, codec={"kind": "int8"})
