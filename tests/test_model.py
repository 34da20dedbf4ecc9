"""Tests for dilo/model.py: the built-in GPT and build_model."""

from __future__ import annotations

import math
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from dilo.config import GPTConfig, ImportModelConfig
from dilo.errors import ConfigError
from dilo.model import GPT, build_model, num_params

TINY = GPTConfig(n_layer=2, n_head=2, d_model=32, context=16)


def _batch(seed: int = 0, b: int = 4, t: int = 16, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def test_forward_shapes_and_initial_loss() -> None:
    model = build_model(GPTConfig(), seed=0)
    x, y = _batch(t=128)
    logits = model(x)
    assert logits.shape == (4, 128, 256)
    loss = model(x, y)
    assert loss.ndim == 0
    # small init: the prediction is close to uniform over 256 bytes
    assert abs(loss.item() - math.log(256)) < 0.1
    assert model(x[:, :5]).shape == (4, 5, 256)  # shorter than context is fine


def test_sequence_longer_than_context_raises() -> None:
    model = build_model(TINY, seed=0)
    x, _ = _batch(t=17)
    with pytest.raises(ValueError, match="context=16"):
        model(x)


def test_tied_weights_share_storage_and_count_once() -> None:
    tied = build_model(TINY, seed=0)
    untied = build_model(TINY.model_copy(update={"tie_weights": False}), seed=0)
    assert isinstance(tied, GPT)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert num_params(untied) - num_params(tied) == 256 * 32
    # both uses of the shared tensor feed one gradient
    x, y = _batch()
    tied(x, y).backward()
    assert tied.tok_emb.weight.grad is not None


def test_gpt2_init_scales() -> None:
    model = build_model(GPTConfig(n_layer=8, d_model=256, n_head=4), seed=0)
    assert isinstance(model, GPT)
    fc = model.blocks[0].mlp.fc.weight
    proj = model.blocks[0].mlp.proj.weight
    assert abs(fc.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert torch.all(model.ln_f.weight == 1)


def test_build_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = build_model(TINY, seed=7), build_model(TINY, seed=7), build_model(TINY, seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["tok_emb.weight"], sc["tok_emb.weight"])


def test_build_in_threads_is_deterministic() -> None:
    ref = build_model(TINY, seed=3).state_dict()
    results: list[dict[str, torch.Tensor]] = [{} for _ in range(4)]

    def work(i: int) -> None:
        # other threads drawing from the global RNG must not change our weights
        torch.rand(1000)
        results[i] = build_model(TINY, seed=3).state_dict()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert all(torch.equal(ref[k], r[k]) for k in ref)


def test_adamw_steps_reduce_loss() -> None:
    model = build_model(TINY, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = _batch()
    first = model(x, y).item()
    for _ in range(20):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    assert model(x, y).item() < first - 0.5


@pytest.fixture
def builder_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Tiny(nn.Module):
                def __init__(self, width):
                    super().__init__()
                    self.emb = nn.Embedding(256, width)
                    self.out = nn.Linear(width, 256)

                def forward(self, x, y):
                    logits = self.out(self.emb(x))
                    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

            def build(width=8):
                return Tiny(width)

            def not_a_model():
                return 42

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models"


def test_import_builder(builder_module: str) -> None:
    cfg = ImportModelConfig(builder=f"{builder_module}:build", kwargs={"width": 12})
    before = torch.get_rng_state()
    a, b = build_model(cfg, seed=5), build_model(cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.emb.weight.shape == (256, 12)
    assert torch.equal(a.emb.weight, b.emb.weight)
    assert not torch.equal(a.emb.weight, build_model(cfg, seed=6).emb.weight)
    x, y = _batch()
    assert a(x, y).ndim == 0
    assert num_params(a) == 256 * 12 + 12 * 256 + 256


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_pkg_xyz.models:build", "cannot import module 'no_such_pkg_xyz.models'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}:not_a_model", "returned int, not a torch.nn.Module"),
        ("{mod}:NOT_CALLABLE", "not a callable"),
    ],
)
def test_bad_import_paths_raise_config_error(builder_module: str, target: str, message: str) -> None:
    path = target.format(mod=builder_module)
    with pytest.raises(ConfigError, match="model.builder") as info:
        build_model(ImportModelConfig(builder=path), seed=0)
    assert message in str(info.value)
    assert repr(path) in str(info.value)
