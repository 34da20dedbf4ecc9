"""`dilo export` and `dilo sample` of runs trained with LoRA adapters (dilo/export.py): the adapters
are merged into the base weights (peft's merge_and_unload) and a plain transformers model is
written, or with --adapter-only the peft adapter alone; tiny Llamas from an inline config."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import torch

from dilo.config import RunConfig, from_dict
from dilo.errors import ConfigError
from dilo.export import export, load_trained
from dilo.model import build_model
from tests.conftest import TINY_LLAMA as LLAMA
from tests.conftest import tiny_config, train_threads

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
# merged weights compute x (W + s B A)^T where the LoRA model computes x W^T + s (x A^T) B^T: the same
# sums in another order, so fp32 rounding differs a little (seen: ~1e-7 on logits of ~0.5)
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _dilo(*args: str) -> subprocess.CompletedProcess[str]:
    """`dilo ARGS` in this process (the command-line path is tested as a subprocess in
    test_hf_models; here a new interpreter would re-import torch, transformers and peft each time)."""
    from dilo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = int(e.code or 0)
    return subprocess.CompletedProcess(["dilo", *args], code, out.getvalue(), err.getvalue())


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))


def _error_line(p: subprocess.CompletedProcess[str]) -> str:
    return next((x for x in p.stderr.splitlines() if x.startswith("dilo: error:")), "")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> tuple[RunConfig, Path]:
    """A tiny "pre-trained" Llama saved as a model directory, fine-tuned with LoRA adapters over 2
    threaded workers (model.path = that directory, pretrained = true)."""
    root = tmp_path_factory.mktemp("lora-export")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        base = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**LLAMA))
    base.save_pretrained(str(root / "base"))
    raw = tiny_config(root / "run", corpus_dir, steps=8, lora=LORA).model_dump(mode="json")
    cfg = from_dict({**raw, "model": {"kind": "hf", "path": str(root / "base"), "pretrained": True}})
    train_threads(cfg, 2)
    return cfg, root / "base"


def test_a_lora_run_exports_merged_as_a_plain_model(lora_run: tuple[RunConfig, Path], tmp_path: Path) -> None:
    cfg, base_dir = lora_run
    p = _dilo("export", str(cfg.run_dir / "checkpoints"), "--out", str(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LoRA merged" in p.stderr
    names = {f.name for f in (tmp_path / "hf").iterdir()}
    assert "config.json" in names and "adapter_config.json" not in names
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in k for k in hf.state_dict())  # the adapters are in the weights, no peft layer left
    _, ours = load_trained(cfg.run_dir / "checkpoints")  # the LoRA model itself: base + injected adapters
    assert any("lora_" in n for n, _ in ours.named_parameters())
    x = _batch(1)
    with torch.no_grad():
        merged, lora = hf(input_ids=x).logits, ours(x)
        torch.testing.assert_close(merged, lora, **TOL)
        # and the adapters did change the model: the base alone is far from it
        plain = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True)
        assert (plain(input_ids=x).logits - lora).abs().max() > 100 * TOL["atol"]


def test_adapter_only_loads_over_the_base_with_peft(lora_run: tuple[RunConfig, Path], tmp_path: Path) -> None:
    cfg, base_dir = lora_run
    p = _dilo("export", str(cfg.run_dir), "--out", str(tmp_path / "adapter"), "--adapter-only")
    assert p.returncode == 0, p.stderr[-3000:]
    names = {f.name for f in (tmp_path / "adapter").iterdir()}
    assert "adapter_config.json" in names and "adapter_model.safetensors" in names
    assert "model.safetensors" not in names  # the adapter alone, not the base
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == LORA["r"] and saved["lora_alpha"] == LORA["alpha"]
    assert sorted(saved["target_modules"]) == sorted(LORA["target_modules"])
    assert saved["base_model_name_or_path"] == str(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    _, ours = load_trained(cfg.run_dir / "checkpoints")
    x = _batch(2)
    with torch.no_grad():
        # the same layers computing the same sums: equal up to rounding
        torch.testing.assert_close(loaded(input_ids=x).logits, ours(x), rtol=1e-5, atol=1e-6)


def test_sample_of_a_lora_run_prints_text(lora_run: tuple[RunConfig, Path]) -> None:
    from dilo.sample import sample

    cfg, _ = lora_run
    p = _dilo("sample", str(cfg.run_dir / "checkpoints"), "--prompt", "def ", "--tokens", "30", "--seed", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("def ") and len(p.stdout) > len("def ") + 5
    assert p.stdout == "def " + sample(cfg.run_dir / "checkpoints", "def ", 30, seed=1) + "\n"


def test_adapter_only_without_lora_is_an_error_line(tmp_path: Path, corpus_dir: Path) -> None:
    train_threads(tiny_config(tmp_path, corpus_dir, steps=4), 1)
    p = _dilo("export", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "out"), "--adapter-only")
    assert p.returncode == 2
    assert "--adapter-only" in _error_line(p) and "lora.r = 0" in _error_line(p), p.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_builtin_gpt_with_lora_exports_merged_as_gpt2(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = tiny_config(tmp_path, corpus_dir, steps=8, lora={"r": 2, "target_modules": ["qkv", "proj"]})
    train_threads(cfg, 1)
    assert export(tmp_path / "checkpoints", tmp_path / "hf")[0] == "GPT2LMHeadModel weights and config (LoRA merged)"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    _, ours = load_trained(tmp_path / "checkpoints")
    x = _batch(3)[:, :32]
    with torch.no_grad():
        merged, lora = hf(input_ids=x).logits, ours(x)
        torch.testing.assert_close(merged, lora, rtol=1e-4, atol=1e-4)  # GPT-2's own kernels, as in test_hf_models
        base = build_model(cfg.model, cfg.seed).eval()
        assert (base(x) - lora).abs().max() > 1e-2  # the merged adapters are there
    # no GPT-2 adapter fits dilo's layers: --adapter-only says what to do instead
    with pytest.raises(ConfigError, match="without --adapter-only"):
        export(tmp_path / "checkpoints", tmp_path / "adapter", adapter_only=True)
