"""inner.activation_checkpointing and inner.compile change how a step is computed, not what it
computes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dilo.inner import InnerLoop
from dilo.model import build_model, params_of
from tests.conftest import tiny_config


def _grads_after_a_step(
    cfg: object, batch: tuple[torch.Tensor, torch.Tensor], calls: list[int] | None = None
) -> list[torch.Tensor]:
    model = build_model(cfg.model, 0)  # type: ignore[attr-defined]
    inner = InnerLoop(model, cfg.inner, total_steps=4)  # type: ignore[attr-defined]
    if calls is not None:  # how often the first block's attention starts: twice per step when recomputed
        attn = next(m for name, m in model.named_modules() if name.endswith("attn"))
        attn.register_forward_pre_hook(lambda *_: calls.append(1))
    captured: list[torch.Tensor] = []

    def hook(m: torch.nn.Module) -> None:
        captured.extend(p.grad.detach().clone() for p in params_of(m) if p.grad is not None)

    inner.step(lambda: batch, grad_hook=hook)
    return captured


def test_activation_checkpointing_gives_the_same_gradients(tmp_path: Path, corpus_dir: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 16), generator=g)
    batch = (x, torch.roll(x, -1, dims=1))
    plain = tiny_config(tmp_path, corpus_dir)
    ckpt = tiny_config(tmp_path, corpus_dir, inner={"activation_checkpointing": True, "warmup_steps": 2})
    plain_calls: list[int] = []
    ckpt_calls: list[int] = []
    a, b = _grads_after_a_step(plain, batch, plain_calls), _grads_after_a_step(ckpt, batch, ckpt_calls)
    assert (len(plain_calls), len(ckpt_calls)) == (1, 2)  # the activations were recomputed
    assert len(a) == len(b) > 0
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_needs_a_layer_stack(tmp_path: Path, corpus_dir: Path) -> None:
    from dilo.errors import ConfigError
    from dilo.inner import checkpoint_blocks

    with pytest.raises(ConfigError, match="nn.ModuleList"):
        checkpoint_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_steps_match_eager_steps(tmp_path: Path, corpus_dir: Path) -> None:
    try:
        torch.compile(torch.nn.Linear(2, 2))(torch.zeros(1, 2))  # a compiler is available here
    except Exception as e:  # noqa: BLE001 - no C compiler / backend on this machine
        pytest.skip(f"torch.compile does not run here: {type(e).__name__}")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 16), generator=g)
    batch = (x, torch.roll(x, -1, dims=1))
    eager = tiny_config(tmp_path, corpus_dir)
    compiled = tiny_config(tmp_path, corpus_dir, inner={"compile": True, "warmup_steps": 2})
    for u, v in zip(_grads_after_a_step(eager, batch), _grads_after_a_step(compiled, batch)):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_rounds_log_tokens_per_second_and_mfu(tmp_path: Path, corpus_dir: Path) -> None:
    from dilo.metrics import read_jsonl
    from tests.conftest import train_threads

    cfg = tiny_config(tmp_path, corpus_dir, steps=8, log={"peak_tflops": 1.0})
    train_threads(cfg, 1)
    rounds = [r for r in read_jsonl(tmp_path / "logs" / "worker0.jsonl") if r["event"] == "round"]
    n = sum(p.numel() for p in build_model(cfg.model, 0).parameters())
    for r in rounds:
        assert r["tokens_per_s"] == pytest.approx(4 * 4 * 32 / r["inner_s"])  # 4 steps of 4 x 32 tokens
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * 6 * n / 1e12)


@pytest.fixture
def cpu_flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Pretend to be a CPU with the given feature flags and architecture."""
    from dilo import inner

    def pretend(flags: set[str], machine: str = "x86_64") -> None:
        monkeypatch.setattr(inner, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(inner.platform, "machine", lambda: machine)
        inner.native_bf16.cache_clear()
        inner.resolve_precision.cache_clear()

    yield pretend
    inner.native_bf16.cache_clear()
    inner.resolve_precision.cache_clear()


@pytest.mark.parametrize(
    ("flags", "machine", "expected"),
    [
        ({"avx", "avx2", "fma"}, "x86_64", "fp32"),  # AVX2 only: bf16 would be emulated
        ({"avx512f", "avx512_bf16"}, "x86_64", "bf16"),
        ({"amx_tile", "amx_bf16"}, "x86_64", "bf16"),
        ({"fp", "asimd", "bf16"}, "aarch64", "bf16"),
        ({"fp", "asimd"}, "aarch64", "fp32"),
        (set(), "x86_64", "fp32"),  # no /proc/cpuinfo (macOS): fp32
    ],
)
def test_auto_precision_picks_bf16_only_where_it_is_native(
    cpu_flags: Any, flags: set[str], machine: str, expected: str
) -> None:
    from dilo.inner import resolve_precision

    cpu_flags(flags, machine)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32"  # an explicit choice is kept


def test_explicit_bf16_without_native_support_warns_and_is_kept(
    cpu_flags: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from dilo.inner import autocast, resolve_precision

    cpu_flags({"avx2"})
    with caplog.at_level("WARNING", logger="dilo.inner"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    assert "precision = 'auto'" in caplog.text
    with autocast("bf16", "cpu")():
        assert torch.is_autocast_enabled("cpu")
    with autocast("auto", "cpu")():
        assert not torch.is_autocast_enabled("cpu")


def test_the_start_record_names_the_precision_in_use(tmp_path: Path, corpus_dir: Path, cpu_flags: Any) -> None:
    from dilo.metrics import read_jsonl
    from tests.conftest import train_threads

    cpu_flags({"avx2"})
    cfg = tiny_config(tmp_path, corpus_dir, steps=4, inner={"precision": "auto", "warmup_steps": 2})
    train_threads(cfg, 1)
    start = next(r for r in read_jsonl(tmp_path / "logs" / "worker0.jsonl") if r["event"] == "start")
    assert start["precision"] == "fp32"
