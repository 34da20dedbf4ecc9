"""Outer steps over real Gloo (workers as threads) against the naive references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dilo.outer import reference
from dilo.outer.base import Tail, params_of
from dilo.outer.diloco import DiLoCo
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from tests.conftest import run_workers


def _model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _drift(rank: int, round_idx: int, shape: torch.Size) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + round_idx)
    return 0.1 * torch.randn(shape, generator=g)


def _diloco_worker(
    world, rounds: int, weights: list[float], nan_rank: int | None, lr: float, momentum: float, nesterov: bool
):
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)
    model = _model()
    outer = DiLoCo(model, t, inner_steps=1, lr=lr, momentum=momentum, nesterov=nesterov)
    reports, ends = [], []
    for r in range(rounds):
        with torch.no_grad():
            for i, p in enumerate(params_of(model)):
                p.sub_(_drift(world.rank, 10 * r + i, p.shape))
                if world.rank == nan_rank and r == 0 and i == 0:
                    p[0] = float("nan")
        ends.append([p.detach().clone() for p in params_of(model)])
        reports.append(
            outer.sync(model, tail=Tail(weight=weights[world.rank], contributes=True, stop=False, tokens=10))
        )
    return (
        reports,
        ends,
        [a.detach().clone() for a in outer.anchor.params],
        [p.detach().clone() for p in params_of(model)],
    )


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize(
    ("lr", "momentum", "nesterov"), [(0.7, 0.9, True), (1.0, 0.0, False)], ids=["diloco", "fedavg"]
)
def test_diloco_matches_reference_and_is_bit_identical(n: int, lr: float, momentum: float, nesterov: bool) -> None:
    rounds = 3
    out = run_workers(lambda w: _diloco_worker(w, rounds, [1.0] * n, None, lr, momentum, nesterov), n)
    anchors = [o[2] for o in out]
    for other in anchors[1:]:  # every worker ends with the same bits
        assert all(torch.equal(a, b) for a, b in zip(anchors[0], other))
    for o in out:  # params were reset to the new anchor
        assert all(torch.equal(a, p) for a, p in zip(o[2], o[3]))
    ref = [p.detach().clone() for p in params_of(_model())]
    buf = None
    for r in range(rounds):
        ref, buf = reference.diloco_round(ref, [o[1][r] for o in out], buf, lr=lr, momentum=momentum, nesterov=nesterov)
    for a, b in zip(anchors[0], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(rep.committed and rep.participants == n and rep.tokens == 10 * n for o in out for rep in o[0])


def test_pseudo_gradient_sign_descends() -> None:
    """One worker, outer SGD lr 1: the new anchor is exactly where the worker went (old - (old - new))."""

    def worker(world):
        store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
        t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)
        model = _model()
        outer = DiLoCo(model, t, inner_steps=1, lr=1.0)
        with torch.no_grad():
            for p in params_of(model):
                p.add_(0.25)
        end = [p.detach().clone() for p in params_of(model)]
        delta = outer.anchor.pseudo_grad(params_of(model))
        outer.sync(model, tail=Tail(1.0, True, False, 1))
        return end, delta, outer.anchor.params

    end, delta, anchor = run_workers(worker, 1)[0]
    for d in delta:  # old minus new: the worker moved +0.25, so the pseudo-gradient is -0.25
        torch.testing.assert_close(d, torch.full_like(d, -0.25))
    assert all(torch.equal(a.detach(), e) for a, e in zip(anchor, end))


def test_mean_divides_by_contributors_and_token_weights() -> None:
    n, weights = 4, [1.0, 2.0, 3.0, 4.0]
    out = run_workers(lambda w: _diloco_worker(w, 2, weights, 2, 0.7, 0.9, True), n)
    rep0 = out[0][0][0]
    assert rep0.committed and rep0.participants == 3  # rank 2 sent NaN and was left out
    assert out[0][0][1].participants == 4
    ref = [p.detach().clone() for p in params_of(_model())]
    keep = [0, 1, 3]
    ref, buf = reference.diloco_round(
        ref, [out[r][1][0] for r in keep], None, lr=0.7, momentum=0.9, nesterov=True, weights=[weights[r] for r in keep]
    )
    ref, buf = reference.diloco_round(
        ref, [o[1][1] for o in out], buf, lr=0.7, momentum=0.9, nesterov=True, weights=weights
    )
    for a, b in zip(out[0][2], ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(math.isfinite(float(a.sum())) for a in out[2][2])


def test_round_with_no_contributor_is_skipped() -> None:
    def worker(world):
        store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
        t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)
        model = _model()
        outer = DiLoCo(model, t, inner_steps=1, lr=0.7, momentum=0.9, nesterov=True)
        before = [a.detach().clone() for a in outer.anchor.params]
        with torch.no_grad():
            params_of(model)[0].add_(1.0)
        rep = outer.sync(model, tail=Tail(1.0, contributes=False, stop=world.rank == 1, tokens=5))
        return rep, before, outer.anchor.params, params_of(model)

    for rep, before, anchor, params in run_workers(worker, 2):
        assert not rep.committed and rep.reason == "no worker contributed" and rep.stop and rep.tokens == 10
        assert all(torch.equal(b, a.detach()) and torch.equal(b, p.detach()) for b, a, p in zip(before, anchor, params))


def test_nesterov_without_momentum_is_rejected() -> None:
    with pytest.raises(ValueError, match="needs momentum > 0"):
        DiLoCo(_model(), transport=None, inner_steps=1, lr=0.7, momentum=0.0, nesterov=True)  # type: ignore[arg-type]
