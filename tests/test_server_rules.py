"""Server update rules of asynchronous local SGD (dilo/outer/server.py) against torch.optim and naive references."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor

from dilo.config import from_dict
from dilo.outer.server import (
    DelayedNesterov,
    FedAsync,
    FedBuff,
    NesterovPerPush,
    ServerRule,
    build_rule,
    dylu_steps,
    staleness_weight,
)

SHAPES = [(3, 4), (5,), (2, 2, 2)]
LR, MU = 0.7, 0.9


def _params(seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _pushes(n: int, seed: int = 1) -> list[list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[0.1 * torch.randn(s, generator=g) for s in SHAPES] for _ in range(n)]


def _clone(ts: list[Tensor]) -> list[Tensor]:
    return [t.clone() for t in ts]


def _close(a: list[Tensor], b: list[Tensor], atol: float = 1e-6) -> bool:
    return all(torch.allclose(x, y, rtol=0, atol=atol) for x, y in zip(a, b))


def _mean(gs: list[list[Tensor]]) -> list[Tensor]:
    return [sum(ts) / len(ts) for ts in zip(*gs)]


class _TorchSGD:
    """torch.optim.SGD applied with p.grad = g: the reference for every momentum step."""

    def __init__(self, params: list[Tensor], *, lr: float, momentum: float, nesterov: bool) -> None:
        self.ps = [torch.nn.Parameter(p.clone()) for p in params]
        self.opt = torch.optim.SGD(self.ps, lr=lr, momentum=momentum, nesterov=nesterov)

    def step(self, g: list[Tensor]) -> None:
        for p, x in zip(self.ps, g):
            p.grad = x.clone()
        self.opt.step()

    @property
    def params(self) -> list[Tensor]:
        return [p.detach() for p in self.ps]


def _naive_alg3(
    theta: list[Tensor], pushes: list[list[Tensor]], *, lr: float, beta: float, n: int, c: float
) -> list[list[Tensor]]:
    """Liu et al. Alg. 3 as written in docs/ALGORITHMS.md §3.1 (global t, float64); params after each push."""
    theta = [x.double() for x in theta]
    m = [torch.zeros_like(x) for x in theta]
    delta = [torch.zeros_like(x) for x in theta]
    out = []
    for t, g in enumerate(pushes):
        g = [x.double() for x in g]
        delta = [d + x for d, x in zip(delta, g)]
        if (t + 1) % n == 0:
            m = [beta * mi + d / n for mi, d in zip(m, delta)]
            theta = [p - lr * ((1 - c * n + c) * beta * mi + x / n) for p, mi, x in zip(theta, m, g)]
            delta = [torch.zeros_like(x) for x in theta]
        else:
            theta = [p - lr * (c * beta * mi + x / n) for p, mi, x in zip(theta, m, g)]
        out.append([p.float() for p in theta])
    return out


# ---------------------------------------------------------------------------------------------
# staleness and DyLU


def test_staleness_weight_values() -> None:
    assert staleness_weight("constant", 7, 0.5, 4) == 1.0
    assert staleness_weight("poly", 0, 0.5, 4) == 1.0
    assert staleness_weight("poly", 3, 0.5, 4) == pytest.approx(0.5)
    assert staleness_weight("poly", 7, 1.0, 4) == pytest.approx(0.125)
    assert staleness_weight("hinge", 4, 0.5, 4) == 1.0
    assert staleness_weight("hinge", 6, 0.5, 4) == pytest.approx(0.5)
    assert staleness_weight("hinge", 10, 10.0, 4) == pytest.approx(1 / 61)
    with pytest.raises(ValueError, match="linear"):
        staleness_weight("linear", 1, 0.5, 4)
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight("poly", -1, 0.5, 4)


@pytest.mark.parametrize("cls", [NesterovPerPush, DelayedNesterov])
def test_poly_staleness_scales_the_push(cls: type) -> None:
    kw = {"lr": LR, "momentum": MU} | ({"buffer": 2, "workers": 2} if cls is DelayedNesterov else {})
    a, b = _params(), _params()
    stale = cls(a, staleness="poly", staleness_a=0.5, **kw)
    fresh = cls(b, **kw)
    for g in _pushes(4):  # DelayedNesterov: two milestones and two plain pushes
        stale.push(g, staleness=3)
        fresh.push([0.5 * x for x in g], staleness=0)
        assert _close(a, b, atol=1e-7)
    assert _close(stale.momentum_buf, fresh.momentum_buf, atol=1e-7)


def test_dylu_steps() -> None:
    assert dylu_steps({"a": 4.0, "b": 2.0, "c": 1.0, "d": 0.3}, 10) == {"a": 10, "b": 5, "c": 2, "d": 1}
    assert dylu_steps({"a": 3.0, "b": 0.0, "c": float("nan"), "d": -1.0}, 50) == {"a": 50, "b": 50, "c": 50, "d": 50}
    assert dylu_steps({"a": 1000.0, "b": 1e-3}, 7) == {"a": 7, "b": 1}
    assert dylu_steps({"a": 0.1, "b": 0.1 / 3}, 30) == {"a": 30, "b": 10}
    assert dylu_steps({}, 10) == {}
    with pytest.raises(ValueError, match="inner_steps"):
        dylu_steps({"a": 1.0}, 0)


# ---------------------------------------------------------------------------------------------
# Nesterov per push and Delayed Nesterov


def test_nesterov_per_push_equals_torch_sgd() -> None:
    params = _params()
    rule = NesterovPerPush(params, lr=LR, momentum=MU)
    ref = _TorchSGD(params, lr=LR, momentum=MU, nesterov=True)
    for g in _pushes(6):
        assert rule.push(g, staleness=0) is True
        ref.step(g)
        assert _close(params, ref.params)
    assert rule.pushes == 6


def test_delayed_nesterov_buffer_one_is_nesterov_per_push() -> None:
    a, b = _params(), _params()
    dn = DelayedNesterov(a, lr=LR, momentum=MU, buffer=1, workers=4, activation=0.0)
    nes = NesterovPerPush(b, lr=LR, momentum=MU)
    for g in _pushes(6):
        dn.push(g, staleness=0)
        nes.push(g, staleness=0)
        assert _close(a, b, atol=1e-6)


def test_delayed_nesterov_is_one_nesterov_step_per_buffer() -> None:
    n = 4
    params = _params()
    pushes = _pushes(2 * n)
    rule = DelayedNesterov(params, lr=LR, momentum=MU, buffer=n, workers=2)
    ref = _TorchSGD(params, lr=LR, momentum=MU, nesterov=True)
    for i, g in enumerate(pushes):
        before = _clone(params)
        m_before = _clone(rule.momentum_buf)
        rule.push(g, staleness=0)
        if (i + 1) % n == 0:
            ref.step(_mean(pushes[i + 1 - n : i + 1]))
            assert _close(params, ref.params)
            assert not _close(rule.momentum_buf, m_before)
        else:  # plain SGD step of lr / N, momentum untouched
            assert _close(params, [p - LR / n * x for p, x in zip(before, g)])
            assert _close(rule.momentum_buf, m_before, atol=0)
    assert rule.pushes == 2 * n and rule.since == 0


@pytest.mark.parametrize("c", [0.0, 0.1, 0.25])
def test_delayed_nesterov_matches_naive_algorithm_3(c: float) -> None:
    params = _params()
    pushes = _pushes(10)
    expected = _naive_alg3(params, pushes, lr=LR, beta=MU, n=4, c=c)
    rule = DelayedNesterov(params, lr=LR, momentum=MU, buffer=4, workers=4, activation=c)
    for g, want in zip(pushes, expected):
        rule.push(g, staleness=0)
        assert _close(params, want, atol=1e-5)


def test_delayed_nesterov_activation_is_capped_at_one_over_n() -> None:
    rule = DelayedNesterov(_params(), lr=LR, momentum=MU, buffer=0, workers=2, activation=0.5)
    assert rule.c == 0.5
    rule.set_workers(4)
    assert rule.buffer_size == 4 and rule.c == 0.25


def test_set_workers_changes_milestone_spacing() -> None:
    params = _params()
    pushes = _pushes(5)
    rule = DelayedNesterov(params, lr=LR, momentum=MU, buffer=0, workers=2)
    ref = _TorchSGD(params, lr=LR, momentum=MU, nesterov=True)
    zero = [torch.zeros(s) for s in SHAPES]

    rule.push(pushes[0], staleness=0)
    assert _close(rule.momentum_buf, zero, atol=0) and rule.since == 1
    rule.push(pushes[1], staleness=0)  # N = 2: milestone
    ref.step(_mean(pushes[0:2]))
    assert _close(params, ref.params) and rule.since == 0

    rule.set_workers(3)
    assert rule.buffer_size == 3
    m_after_first = _clone(rule.momentum_buf)
    for g in pushes[2:4]:
        rule.push(g, staleness=0)
        assert _close(rule.momentum_buf, m_after_first, atol=0)
    rule.push(pushes[4], staleness=0)  # N = 3: milestone on the third push
    ref.step(_mean(pushes[2:5]))
    assert _close(params, ref.params) and rule.since == 0


def test_shrinking_buffer_closes_it_on_the_next_push() -> None:
    pushes = _pushes(3)
    rule = DelayedNesterov(_params(), lr=LR, momentum=MU, buffer=0, workers=4)
    rule.push(pushes[0], staleness=0)
    rule.push(pushes[1], staleness=0)
    rule.set_workers(2)  # two pushes already buffered: the next one is a milestone
    rule.push(pushes[2], staleness=0)
    assert rule.since == 0
    assert _close(rule.momentum_buf, _mean(pushes))  # m was 0: it takes the mean of the 3 buffered pushes


# ---------------------------------------------------------------------------------------------
# FedBuff and FedAsync


def test_fedbuff_weighted_mean_then_sgd_momentum() -> None:
    params = _params()
    p0 = _clone(params)
    pushes = _pushes(6)
    rule = FedBuff(params, lr=LR, momentum=MU, buffer=3, workers=5, staleness="hinge", staleness_a=0.5, staleness_b=1)
    # hinge (a=0.5, b=1): s(0) = 1, s(3) = 1 / (0.5 * 2 + 1) = 0.5, s(1) = 1; weights 1, 2, 3 -> s*w = 1, 1, 3
    got = [rule.push(g, staleness=t, weight=w) for g, t, w in zip(pushes[:3], [0, 3, 1], [1.0, 2.0, 3.0])]
    assert got == [False, False, True]
    mean1 = [(a + b + 3 * c) / 5 for a, b, c in zip(*pushes[:3])]
    p1 = [p - LR * m for p, m in zip(p0, mean1)]
    assert _close(params, p1)
    # second buffer: momentum carries over, m2 = mu * mean1 + mean2
    got = [rule.push(g, staleness=0) for g in pushes[3:]]
    assert got == [False, False, True]
    mean2 = _mean(pushes[3:])
    p2 = [p - LR * (MU * m1 + m2) for p, m1, m2 in zip(p1, mean1, mean2)]
    assert _close(params, p2)
    ref = _TorchSGD(p0, lr=LR, momentum=MU, nesterov=False)
    ref.step(mean1)
    ref.step(mean2)
    assert _close(params, ref.params)
    assert rule.flushes == 2 and rule.count == 0


def test_fedbuff_without_momentum_and_zero_weight_pushes() -> None:
    params = _params()
    p0 = _clone(params)
    pushes = _pushes(3)
    rule = FedBuff(params, lr=LR, momentum=0.0, buffer=0, workers=2)
    assert rule.push(pushes[0], staleness=0) is False
    assert rule.push(pushes[1], staleness=0, weight=0.0) is False  # skipped: not counted
    assert rule.count == 1 and _close(params, p0, atol=0)
    assert rule.push(pushes[2], staleness=0) is True
    assert _close(params, [p - LR * (a + b) / 2 for p, a, b in zip(p0, pushes[0], pushes[2])])
    with pytest.raises(ValueError, match="weight"):
        rule.push(pushes[0], staleness=0, weight=-1.0)


def test_fedbuff_set_workers_changes_k() -> None:
    rule = FedBuff(_params(), lr=LR, momentum=MU, buffer=0, workers=3)
    rule.set_workers(1)
    assert rule.buffer_size == 1
    assert rule.push(_pushes(1)[0], staleness=0) is True


def test_fedasync_mixes_base_minus_g() -> None:
    params = _params()
    rule = FedAsync(params, alpha=0.6, staleness="poly", staleness_a=0.5)
    assert rule.needs_base
    pushes = _pushes(2)
    base = _clone(params)
    x0 = _clone(params)
    assert rule.push(pushes[0], staleness=0, base=base) is True  # a = 0.6
    x1 = [0.4 * x + 0.6 * (b - g) for x, b, g in zip(x0, base, pushes[0])]
    assert _close(params, x1)
    rule.push(pushes[1], staleness=3, base=base)  # stale worker, still from base: a = 0.6 * 0.5
    x2 = [0.7 * x + 0.3 * (b - g) for x, b, g in zip(x1, base, pushes[1])]
    assert _close(params, x2)
    with pytest.raises(ValueError, match="base"):
        rule.push(pushes[0], staleness=0)
    with pytest.raises(ValueError, match="base"):
        rule.push(pushes[0], staleness=0, base=base[:2])


# ---------------------------------------------------------------------------------------------
# state, build_rule, validation


def _only_tensors_and_ints(obj: object) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _only_tensors_and_ints(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_only_tensors_and_ints(v) for v in obj)
    return isinstance(obj, (Tensor, int)) and not isinstance(obj, bool)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: DelayedNesterov(p, lr=LR, momentum=MU, buffer=4, workers=4, activation=0.1),
        lambda p: DelayedNesterov(p, lr=LR, momentum=MU, buffer=0, workers=3, staleness="poly"),
        lambda p: FedBuff(p, lr=LR, momentum=MU, buffer=3, workers=3, staleness="hinge", staleness_b=1),
        lambda p: NesterovPerPush(p, lr=LR, momentum=MU),
    ],
)
def test_state_round_trip_mid_buffer(make) -> None:
    pushes = _pushes(11)
    stale = [0, 2, 1, 3, 0, 5, 1, 0, 2, 4, 1]
    a = _params()
    rule = make(a)
    for g, t in zip(pushes[:5], stale):
        rule.push(g, staleness=t, weight=1.5)
    state = rule.state_dict()
    assert _only_tensors_and_ints(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    b = _clone(a)
    copy = make(b)
    copy.load_state_dict(torch.load(buf, weights_only=True))
    for g, t in zip(pushes[5:], stale[5:]):
        assert rule.push(g, staleness=t, weight=1.5) == copy.push(g, staleness=t, weight=1.5)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert rule.state_dict().keys() == copy.state_dict().keys()
    with pytest.raises(ValueError, match="keys"):
        copy.load_state_dict({"pushes": 1})


def test_load_state_rejects_wrong_shapes() -> None:
    rule = DelayedNesterov(_params(), lr=LR, momentum=MU, buffer=2, workers=2)
    state = rule.state_dict()
    state["delta"] = [torch.zeros(1) for _ in SHAPES]
    with pytest.raises(ValueError, match="shape"):
        rule.load_state_dict(state)


def _async_cfg(**outer):
    return from_dict({"outer": {"kind": "async", **outer}, "membership": {"kind": "coordinator"}}).outer


@pytest.mark.parametrize(
    ("update", "cls"),
    [
        ("nesterov", NesterovPerPush),
        ("delayed_nesterov", DelayedNesterov),
        ("fedbuff", FedBuff),
        ("fedasync", FedAsync),
    ],
)
def test_build_rule_maps_update(update: str, cls: type) -> None:
    cfg = _async_cfg(update=update, lr=0.3, momentum=0.5, staleness="hinge", staleness_a=2.0, staleness_b=3, alpha=0.4)
    rule = build_rule(cfg, _params(), workers=3)
    assert type(rule) is cls and isinstance(rule, ServerRule)
    assert rule.name == update and rule.needs_base == (update == "fedasync")
    assert (rule.staleness, rule.staleness_a, rule.staleness_b) == ("hinge", 2.0, 3)
    if update == "fedasync":
        assert rule.alpha == 0.4
    else:
        assert (rule.lr, rule.momentum) == (0.3, 0.5)
    if update in ("delayed_nesterov", "fedbuff"):
        assert rule.buffer_size == 3


def test_build_rule_passes_buffer_and_activation() -> None:
    rule = build_rule(_async_cfg(buffer=8, activation=0.1), _params(), workers=3)
    assert isinstance(rule, DelayedNesterov)
    assert rule.buffer_size == 8 and rule.c == pytest.approx(0.1)
    rule.set_workers(5)
    assert rule.buffer_size == 8
    assert build_rule(_async_cfg(), _params(), workers=2).name == "delayed_nesterov"  # the default


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda p: NesterovPerPush(p, lr=0.0, momentum=MU), "lr"),
        (lambda p: NesterovPerPush(p, lr=LR, momentum=1.0), "momentum"),
        (lambda p: NesterovPerPush(p, lr=LR, momentum=-0.1), "momentum"),
        (lambda p: NesterovPerPush(p, lr=LR, momentum=MU, staleness="linear"), "staleness"),
        (lambda p: NesterovPerPush(p, lr=LR, momentum=MU, staleness_a=-1.0), "staleness_a"),
        (lambda p: NesterovPerPush(p, lr=LR, momentum=MU, staleness_b=-1), "staleness_b"),
        (lambda p: DelayedNesterov(p, lr=LR, momentum=MU, buffer=-1, workers=2), "buffer"),
        (lambda p: DelayedNesterov(p, lr=LR, momentum=MU, buffer=0, workers=0), "workers"),
        (lambda p: DelayedNesterov(p, lr=LR, momentum=MU, buffer=2, workers=2, activation=1.5), "activation"),
        (lambda p: FedBuff(p, lr=-1.0, momentum=MU, buffer=2, workers=2), "lr"),
        (lambda p: FedBuff(p, lr=LR, momentum=MU, buffer=-2, workers=2), "buffer"),
        (lambda p: FedAsync(p, alpha=0.0), "alpha"),
        (lambda p: FedAsync(p, alpha=1.5), "alpha"),
        (lambda p: FedAsync([x.double() for x in p], alpha=0.5), "params"),
    ],
)
def test_constructor_validation(make, arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        make(_params())


def test_push_validation() -> None:
    params = _params()
    rule = DelayedNesterov(params, lr=LR, momentum=MU, buffer=2, workers=2)
    g = _pushes(1)[0]
    with pytest.raises(ValueError, match="tensors"):
        rule.push(g[:2], staleness=0)
    with pytest.raises(ValueError, match="shape"):
        rule.push([g[0].T, g[1], g[2]], staleness=0)
    with pytest.raises(ValueError, match="staleness"):
        rule.push(g, staleness=-1)
    with pytest.raises(ValueError, match="workers"):
        rule.set_workers(0)
    assert rule.pushes == 0 and rule.since == 0  # nothing was applied
    assert all(torch.equal(p, q) for p, q in zip(params, _params()))
