"""Gossip mixing math: graphs are doubly stochastic, mixing and push-sum reach the exact mean,
variance correction hits its target variance."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dilo.outer.mixing import (
    TOPOLOGIES,
    PushSum,
    consensus_distance,
    graph,
    in_peers,
    is_rescaled,
    layer_std,
    metropolis_hastings,
    mix,
    out_peers,
    to_matrix,
    variance_corrected_merge,
    weighted_variance_corrected,
)

ID_SETS = [[f"w{i}" for i in range(n)] for n in range(1, 10)] + [
    ["zeta", "alpha", "mu"],
    ["w10", "w2", "w1", "w0"],
    ["b", "a", "d", "c", "f", "e", "g"],
]


def _check_doubly_stochastic(w: dict[str, dict[str, float]], members: list[str]) -> torch.Tensor:
    assert sorted(w) == sorted(members)
    m = to_matrix(w, sorted(members))
    assert (m >= 0).all()
    torch.testing.assert_close(m.sum(1), torch.ones(len(members), dtype=torch.float64))
    torch.testing.assert_close(m.sum(0), torch.ones(len(members), dtype=torch.float64))
    return m


def _models(n: int, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, generator=g), torch.randn(2, 2, generator=g)] for _ in range(n)]


def _mean(models: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack([m[i].double() for m in models]).mean(0) for i in range(len(models[0]))]


# ---------------------------------------------------------------------------------------------
# graphs


@pytest.mark.parametrize("kind", TOPOLOGIES)
@pytest.mark.parametrize("members", ID_SETS, ids=lambda m: f"n{len(m)}-{m[0]}")
def test_graph_is_doubly_stochastic_and_deterministic(kind: str, members: list[str]) -> None:
    for round_idx in range(4):
        w = graph(kind, members, round_idx, seed=7)
        _check_doubly_stochastic(w, members)
        assert w == graph(kind, list(reversed(members)), round_idx, seed=7)  # input order does not matter
        for node in members:
            assert node in w[node]
            for peer in in_peers(w, node):
                assert node in out_peers(w, peer)


def test_graph_shapes() -> None:
    ids = [f"w{i}" for i in range(8)]
    assert graph("ring", ["a", "b"], 0) == {"a": {"a": 0.5, "b": 0.5}, "b": {"a": 0.5, "b": 0.5}}
    assert in_peers(graph("ring", ids, 0), "w0") == ["w1", "w7"]
    # exponential: w0 receives from 0 - 1, 0 - 2, 0 - 4 (mod 8), i.e. w7, w6, w4; weight 1/4 each
    exp = graph("exponential", ids, 0)
    assert in_peers(exp, "w0") == ["w4", "w6", "w7"]
    assert out_peers(exp, "w0") == ["w1", "w2", "w4"]
    assert exp["w0"]["w0"] == pytest.approx(0.25)
    # one peer per round, cycling through 2^0, 2^1, 2^2
    assert [in_peers(graph("one_peer_exponential", ids, k), "w0") for k in range(4)] == [["w7"], ["w6"], ["w4"], ["w7"]]
    # for n = 2^t, t consecutive one-peer rounds multiply to exact averaging
    prod = torch.eye(8, dtype=torch.float64)
    for k in range(3):
        prod = to_matrix(graph("one_peer_exponential", ids, k), ids) @ prod
    torch.testing.assert_close(prod, torch.full((8, 8), 1 / 8, dtype=torch.float64))
    assert graph("fully_connected", ["x"], 3) == {"x": {"x": 1.0}}


def test_graph_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="ring, exponential"):
        graph("star", ["a", "b"], 0)
    with pytest.raises(ValueError, match="unique"):
        graph("ring", ["a", "b", "a"], 0)
    with pytest.raises(ValueError, match="at least one"):
        graph("ring", [], 0)


@pytest.mark.parametrize("n", [2, 5, 8, 9])
def test_random_pairs_is_a_matching_that_changes(n: int) -> None:
    ids = [f"w{i}" for i in range(n)]
    rounds = [graph("random_pairs", ids, k, seed=3) for k in range(12)]
    for w in rounds:
        alone = [m for m in ids if w[m] == {m: 1.0}]
        assert len(alone) == n % 2
        for m in ids:
            if m in alone:
                continue
            (peer,) = in_peers(w, m)
            assert w[m] == {m: 0.5, peer: 0.5} and in_peers(w, peer) == [m]
    if n > 2:
        assert len({repr(w) for w in rounds}) > 1
        assert graph("random_pairs", ids, 0, seed=3) != graph("random_pairs", ids, 0, seed=4)


# ---------------------------------------------------------------------------------------------
# mixing


def _gossip_until_consensus(models: list[list[torch.Tensor]], weights_of_round, max_rounds: int) -> int:
    ids = [f"w{i}" for i in range(len(models))]
    target = _mean(models)
    state = dict(zip(ids, models))
    for k in range(max_rounds):
        w = weights_of_round(ids, k)
        new = {me: mix(state[me], {p: state[p] for p in in_peers(w, me)}, w[me], me) for me in ids}
        before, after = _mean(list(state.values())), _mean(list(new.values()))
        for a, b in zip(before, after):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=0)  # the mean is kept every round
        state = new
        if all(torch.allclose(t.double(), c, atol=1e-5, rtol=0) for m in state.values() for t, c in zip(m, target)):
            return k
    raise AssertionError(f"no consensus within {max_rounds} rounds")


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 10),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["ring", "exponential", "one_peer_exponential", "random_pairs", "random_graph"]),
)
def test_mix_converges_to_exact_mean(n: int, seed: int, kind: str) -> None:
    _gossip_until_consensus(_models(n, seed), lambda ids, k: graph(kind, ids, k, seed=seed), max_rounds=400)


@st.composite
def connected_graphs(draw: st.DrawFn) -> dict[str, set[str]]:
    n = draw(st.integers(2, 9))
    ids = [f"n{i}" for i in range(n)]
    adj: dict[str, set[str]] = {i: set() for i in ids}
    for i in range(1, n):  # a random spanning tree keeps it connected
        j = draw(st.integers(0, i - 1))
        adj[ids[i]].add(ids[j])
        adj[ids[j]].add(ids[i])
    for a, b in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=12)):
        if a != b:
            adj[ids[a]].add(ids[b])
            adj[ids[b]].add(ids[a])
    return adj


@settings(max_examples=30, deadline=None)
@given(adj=connected_graphs(), seed=st.integers(0, 2**31 - 1))
def test_metropolis_hastings(adj: dict[str, set[str]], seed: int) -> None:
    w = metropolis_hastings(adj)
    ids = sorted(adj)
    m = _check_doubly_stochastic(w, ids)
    torch.testing.assert_close(m, m.T, rtol=0, atol=0)
    assert all(in_peers(w, i) == sorted(adj[i]) for i in ids)
    models = _models(len(ids), seed)
    _gossip_until_consensus(models, lambda _ids, _k: {f"w{i}": _rename(w[a], ids) for i, a in enumerate(ids)}, 2000)


def _rename(row: dict[str, float], ids: list[str]) -> dict[str, float]:
    return {f"w{ids.index(p)}": v for p, v in row.items()}


def test_metropolis_hastings_rejects_asymmetry() -> None:
    with pytest.raises(ValueError, match="not symmetric"):
        metropolis_hastings({"a": {"b"}, "b": set()})
    with pytest.raises(ValueError, match="own neighbour"):
        metropolis_hastings({"a": {"a"}})
    w = metropolis_hastings({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}})
    assert w["a"] == {"a": pytest.approx(2 / 3), "b": pytest.approx(1 / 3)}
    assert w["b"] == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3), "c": pytest.approx(1 / 3)}


def test_mix_with_missing_peer_renormalises() -> None:
    own = [torch.tensor([0.0, 3.0])]
    received = {"b": [torch.tensor([6.0, 0.0])]}  # "c" timed out
    out = mix(own, received, {"a": 0.25, "b": 0.25, "c": 0.5}, "a")
    torch.testing.assert_close(out[0], torch.tensor([3.0, 1.5]))
    assert out[0] is not own[0] and own[0].tolist() == [0.0, 3.0]
    # nothing with weight arrived: our own model, unchanged
    torch.testing.assert_close(mix(own, {}, {"a": 0.0, "c": 1.0}, "a")[0], own[0])
    # extra senders without a weight are ignored
    torch.testing.assert_close(mix(own, {"z": [torch.ones(2)]}, {"a": 1.0}, "a")[0], own[0])
    with pytest.raises(ValueError, match="shape"):
        mix(own, {"b": [torch.zeros(3)]}, {"a": 0.5, "b": 0.5}, "a")


def test_mix_keeps_dtype_and_is_order_independent() -> None:
    own = [torch.tensor([1.0, 2.0], dtype=torch.bfloat16)]
    received = {"c": [torch.tensor([3.0, 4.0], dtype=torch.bfloat16)], "b": [torch.tensor([5.0, 6.0])]}
    w = {"a": 0.5, "b": 0.25, "c": 0.25}
    out = mix(own, received, w, "a")
    assert out[0].dtype == torch.bfloat16
    torch.testing.assert_close(out[0].float(), torch.tensor([2.5, 3.5]))
    assert torch.equal(out[0], mix(own, dict(reversed(list(received.items()))), w, "a")[0])


# ---------------------------------------------------------------------------------------------
# push-sum


def _push_sum_rounds(models: list[list[torch.Tensor]], out_of_round, max_rounds: int) -> None:
    n = len(models)
    nodes = [PushSum(m) for m in models]
    target = _mean(models)
    mass_x = [sum(ps.x[i].double().sum() for ps in nodes) for i in range(len(models[0]))]
    for k in range(max_rounds):
        inbox: list[list[tuple[list[torch.Tensor], float]]] = [[] for _ in range(n)]
        for i, ps in enumerate(nodes):
            peers = out_of_round(i, k)
            part = ps.share([str(p) for p in peers])
            for p in peers:
                inbox[p].append(part)
        for ps, parts in zip(nodes, inbox):
            ps.absorb(parts)
        assert sum(ps.weight for ps in nodes) == pytest.approx(n, rel=1e-12, abs=0)
        for i, total in enumerate(mass_x):
            torch.testing.assert_close(sum(ps.x[i].double().sum() for ps in nodes), total, atol=1e-5, rtol=1e-6)
        z = [ps.debiased() for ps in nodes]
        if all(torch.allclose(t.double(), c, atol=1e-5, rtol=0) for m in z for t, c in zip(m, target)):
            return
    raise AssertionError(f"push-sum did not converge within {max_rounds} rounds")


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_push_sum_one_peer_time_varying(n: int, seed: int) -> None:
    hops = (n - 1).bit_length()
    _push_sum_rounds(_models(n, seed), lambda i, k: [(i + (1 << (k % hops))) % n], max_rounds=400)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 8), seed=st.integers(0, 2**31 - 1))
def test_push_sum_random_directed_graph(n: int, seed: int) -> None:
    rng = random.Random(seed)
    out = [{(i + 1) % n} for i in range(n)]  # a directed cycle makes it strongly connected
    for _ in range(rng.randrange(0, 2 * n)):
        a, b = rng.randrange(n), rng.randrange(n)
        if a != b:
            out[a].add(b)
    # not doubly stochastic: in-degrees differ, only the senders conserve mass
    _push_sum_rounds(_models(n, seed), lambda i, k: sorted(out[i]), max_rounds=1500)


def test_push_sum_split_reset_and_state() -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, generator=g), torch.randn(2, 3, generator=g)]
    ps = PushSum(params)
    ps.share(["a", "b"])  # w = 1/3 now: the ratio stays the model
    for z, p in zip(ps.debiased(), params):
        torch.testing.assert_close(z, p)
    x_before, w_before = [t.clone() for t in ps.x], ps.weight
    x_half, w_half = ps.split_for_joiner()
    assert ps.weight + w_half == w_before
    for a, b, before in zip(ps.x, x_half, x_before):
        assert torch.equal(a + b, before)
    joiner = PushSum.from_mass(x_half, w_half)
    for a, b in zip(joiner.debiased(), ps.debiased()):
        torch.testing.assert_close(a, b)
    trained = [p + 1 for p in params]
    ps.reset(trained)
    assert ps.weight == w_half
    for z, p in zip(ps.debiased(), trained):
        torch.testing.assert_close(z, p)
    other = PushSum([torch.zeros(4), torch.zeros(2, 3)])
    other.load_state_dict(ps.state_dict())
    assert other.weight == ps.weight and all(torch.equal(a, b) for a, b in zip(other.x, ps.x))
    with pytest.raises(ValueError, match="positive"):
        PushSum(params, weight=0.0)


# ---------------------------------------------------------------------------------------------
# variance correction


NAMES = ["w", "b", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "scale", "gain"]


def _vc_models(n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        [
            torch.randn(64, 32, generator=g) * (1 + i),
            torch.randn(32, generator=g) * 0.5,
            torch.randn(8, generator=g),
            torch.rand(8, generator=g) + 0.5,
            torch.tensor(10 * (i + 1)),
            torch.randn(1, generator=g),
            1 + 0.1 * torch.randn(16, generator=g),
        ]
        for i in range(n)
    ]


def test_is_rescaled() -> None:
    assert is_rescaled("h.0.attn.weight", torch.zeros(3, 3)) and is_rescaled("ln.weight", torch.ones(4))
    assert not is_rescaled("bn.running_var", torch.ones(4))
    assert not is_rescaled("bn.num_batches_tracked", torch.tensor(3))
    assert not is_rescaled("scale", torch.ones(1)) and not is_rescaled("t", torch.tensor(2.0))


def test_variance_corrected_merge_hits_target_and_skips_statistics() -> None:
    models = _vc_models(3)
    before = [[t.clone() for t in m] for m in models]
    out = variance_corrected_merge(models, NAMES)
    exact = variance_corrected_merge(models, NAMES, eps=0.0)
    for m, b in zip(models, before):
        assert all(torch.equal(x, y) for x, y in zip(m, b))  # inputs untouched
    for i, name in enumerate(NAMES):
        stack = torch.stack([m[i].double() for m in models])
        plain = stack.mean(0)
        if name in ("bn.running_mean", "bn.running_var", "scale"):
            torch.testing.assert_close(out[i].double(), plain)
            continue
        if name == "bn.num_batches_tracked":
            assert out[i].dtype == torch.int64 and int(out[i]) == 20
            continue
        target = float(torch.stack([x.var() for x in stack]).mean())
        shrunk = float(plain.var())
        assert shrunk < 0.9 * target  # plain averaging shrank it
        # Var(out) = s^2 Var(plain) with s^2 = (target + eps) / (Var(plain) + eps), eps = 1e-4
        expected = (target + 1e-4) * shrunk / (shrunk + 1e-4)
        assert float(out[i].double().var()) == pytest.approx(expected, rel=1e-3)
        assert float(exact[i].double().var()) == pytest.approx(target, rel=1e-3)
        assert float(out[i].mean()) == pytest.approx(float(plain.mean()), abs=1e-5)


def test_variance_corrected_merge_conservative() -> None:
    models = _vc_models(4, seed=1)
    c = 0.3
    out = variance_corrected_merge(models, NAMES, own=2, conservative=c)
    w = [m[0].double() for m in models]
    blend = c * w[2] + (1 - c) * torch.stack(w).mean(0)
    target = c * w[2].var() + (1 - c) * torch.stack([x.var() for x in w]).mean()
    assert float(out[0].double().var()) == pytest.approx(float(target), rel=1e-3)
    assert float(out[0].mean()) == pytest.approx(float(blend.mean()), abs=1e-5)
    # the rescale is affine around the mean: shape of the blend is kept
    corr = torch.corrcoef(torch.stack([out[0].double().flatten(), blend.flatten()]))[0, 1]
    assert float(corr) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="own="):
        variance_corrected_merge(models, NAMES, conservative=0.5)


def test_plain_average_of_independent_models_shrinks_variance() -> None:
    g = torch.Generator().manual_seed(5)
    n = 8
    models = [[torch.randn(256, 256, generator=g)] for _ in range(n)]
    plain = torch.stack([m[0] for m in models]).mean(0)
    assert float(plain.var()) == pytest.approx(1 / n, rel=0.05)
    corrected = variance_corrected_merge(models, ["w"])[0]
    assert float(corrected.var()) == pytest.approx(1.0, rel=0.01)


def test_weighted_variance_corrected() -> None:
    models = _vc_models(3, seed=2)
    own, received = models[0], {"b": models[1]}  # "c" timed out
    weights = {"a": 0.2, "b": 0.6, "c": 0.2}
    out = weighted_variance_corrected(own, received, weights, "a", NAMES)
    mixed = mix(own, received, weights, "a")
    wa, wb = 0.25, 0.75  # renormalised over a and b
    target = wa * own[0].double().var() + wb * models[1][0].double().var()
    assert float(out[0].double().var()) == pytest.approx(float(target), rel=1e-3)
    assert float(out[0].mean()) == pytest.approx(float(mixed[0].mean()), abs=1e-5)
    torch.testing.assert_close(out[2], mixed[2])  # running_mean only mixed


# ---------------------------------------------------------------------------------------------
# diagnostics


def test_consensus_distance_and_layer_std() -> None:
    m = [torch.randn(5), torch.randn(2, 2)]
    assert consensus_distance([m, [t.clone() for t in m], [t.clone() for t in m]]) == 0.0
    a = [torch.tensor([0.0, 0.0]), torch.tensor([0.0])]
    b = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    assert consensus_distance([a, b]) == pytest.approx(2.5)  # each is (1.5, 0, 2) from the mean
    stds = layer_std([torch.tensor([1.0, 2.0, 3.0]), torch.tensor(7.0), torch.tensor([[1.0, 1.0]])], ["x", "s", "y"])
    assert stds == {"x": pytest.approx(1.0), "y": 0.0}


def test_random_graph_is_irregular_symmetric_and_changes() -> None:
    ids = [f"w{i}" for i in range(9)]
    rounds = [graph("random_graph", ids, k, seed=1) for k in range(6)]
    assert len({json.dumps(w, sort_keys=True) for w in rounds}) > 1
    for w in rounds:
        degrees = {len([p for p in w[m] if p != m and w[m][p] > 0]) for m in ids}
        assert all(w[a].get(b, 0.0) == pytest.approx(w[b].get(a, 0.0)) for a in ids for b in ids)
        assert min(degrees) >= 1  # everyone links to someone
    assert any(len({len(w[m]) for m in ids}) > 1 for w in rounds)  # some round has unequal degrees
