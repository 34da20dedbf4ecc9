"""FedProx (outer.prox_mu): the proximal term's gradient in every inner step, against a naive loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dilo
from dilo.worlds import Placement
from tests.conftest import tiny_config


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_fedprox_adds_mu_times_the_drift_to_every_inner_gradient(tmp_path: Path, corpus_dir: Path, mu: float) -> None:
    """One FedAvg worker, H = 3, plain SGD: the parameters follow x <- x - lr (grad + mu (x - x_0)),
    with x_0 the round's starting point (the anchor), reset at every round."""
    cfg = tiny_config(tmp_path, corpus_dir, steps=9, outer={"kind": "fedavg", "inner_steps": 3, "prox_mu": mu})
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2)
    ref = [p.detach().clone() for p in model.parameters()]
    with dilo.init(cfg, placement=Placement(0, 1)) as world:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        outer = dilo.wrap(model, opt, world)
        outer.start()
        for step in range(9):
            x, y = _data(step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            outer.step()
        outer.close()
    x0 = [r.clone() for r in ref]
    for step in range(9):
        w = [r.clone().requires_grad_(True) for r in ref]
        x, y = _data(step)
        torch.nn.functional.mse_loss(x @ w[0].T + w[1], y).backward()
        ref = [r - 0.1 * (q.grad + mu * (r - a)) for r, q, a in zip(ref, w, x0)]
        if step % 3 == 2:  # the round ends: one worker's FedAvg keeps its parameters, the next round starts there
            x0 = [r.clone() for r in ref]
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)
