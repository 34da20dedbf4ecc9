"""Hugging Face models in dilo (dilo/hf.py, dilo/export.py, dilo/sample.py), with the real
transformers package and tiny configs: kind = "hf" trains, seeds, loads from a directory and
exports; import builders declare their calling convention; `dilo sample` prints text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from dilo.config import HFModelConfig, RunConfig, from_dict
from dilo.errors import ConfigError
from dilo.export import export, load_trained, to_gpt2
from dilo.model import GPT, build_model, check_data_fits, params_of
from tests.conftest import TINY_LLAMA as LLAMA
from tests.conftest import tiny_config, train_threads, write_toml

transformers = pytest.importorskip("transformers")


def _with_model(cfg: RunConfig, model: dict[str, Any]) -> RunConfig:
    return from_dict({**cfg.model_dump(mode="json"), "model": model})


def _dilo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dilo.cli", *args], capture_output=True, text=True, timeout=120, env=env
    )


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (2, 17), generator=g)
    return w[:, :-1], w[:, 1:]


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> tuple[RunConfig, list[dict[str, Any]]]:
    """A tiny Llama trained with DiLoCo over 2 threaded workers (shared by the export and sample tests)."""
    run_dir = tmp_path_factory.mktemp("llama")
    cfg = _with_model(tiny_config(run_dir, corpus_dir, steps=16), {"kind": "hf", "config": LLAMA})
    return cfg, train_threads(cfg, 2)


def test_tiny_llama_trains_with_diloco(trained_llama: tuple[RunConfig, list[dict[str, Any]]]) -> None:
    cfg, summaries = trained_llama
    assert all(s == summaries[0] for s in summaries)
    start = json.loads((cfg.run_dir / "logs" / "worker0.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["config"]["model"]["kind"] == "hf"
    assert summaries[0]["rounds_committed"] == 4
    assert summaries[0]["val_loss"] < start["val_loss"] - 0.3  # learning, even this briefly


def test_same_seed_same_weights() -> None:
    cfg = HFModelConfig(config=LLAMA)
    a, b, c = build_model(cfg, 3), build_model(cfg, 3), build_model(cfg, 4)
    assert all(torch.equal(p, q) for p, q in zip(params_of(a), params_of(b)))
    assert not all(torch.equal(p, q) for p, q in zip(params_of(a), params_of(c)))
    x, y = _batch()
    loss = a(x, y)
    assert loss.ndim == 0 and a(x).shape == (2, 16, 256)
    # our own shift: the loss is the cross-entropy of the logits against y, not HF's labels=x loss
    logits = a(x)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()))


def test_export_loads_with_auto_model(trained_llama: tuple[RunConfig, list[dict[str, Any]]], tmp_path: Path) -> None:
    cfg, _ = trained_llama
    p = _dilo("export", str(cfg.run_dir / "checkpoints"), "--out", str(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    _, ours = load_trained(cfg.run_dir / "checkpoints")
    x, _ = _batch(1)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours(x))
    # and these are the trained weights, not a fresh initialisation
    fresh = build_model(cfg.model, cfg.seed)
    assert not torch.equal(params_of(fresh)[0], params_of(ours)[0])


def test_builtin_gpt_exports_as_gpt2(tmp_path: Path) -> None:
    from dilo.config import GPTConfig

    for tie in (True, False):
        gpt = GPT(
            GPTConfig(n_layer=2, n_head=2, d_model=32, context=32, tie_weights=tie), torch.Generator().manual_seed(0)
        )
        with torch.no_grad():  # non-trivial biases and norms, so that a mapping mix-up shows
            for p in gpt.parameters():
                p.add_(0.05 * torch.randn_like(p))
        gpt2 = to_gpt2(gpt).eval()
        gpt2.save_pretrained(str(tmp_path / f"gpt2-{tie}"))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"gpt2-{tie}"), local_files_only=True)
        x, _ = _batch(2)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, gpt.eval()(x), rtol=1e-4, atol=1e-4)


def test_pretrained_directory_loads_its_weights(tmp_path: Path) -> None:
    config = transformers.AutoConfig.for_model(**LLAMA)
    torch.manual_seed(123)
    saved = transformers.AutoModelForCausalLM.from_config(config)
    saved.save_pretrained(str(tmp_path / "llama"))
    loaded = build_model(HFModelConfig(path=str(tmp_path / "llama"), pretrained=True), seed=0)
    assert all(torch.equal(p, q) for p, q in zip(saved.parameters(), loaded.parameters()))
    fresh = build_model(HFModelConfig(path=str(tmp_path / "llama")), seed=0)  # the architecture only
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in saved.parameters()]
    assert not torch.equal(next(fresh.parameters()), next(saved.parameters()))


def test_vocab_below_the_data_is_a_config_error() -> None:
    from dilo.config import DataConfig

    model = build_model(HFModelConfig(config={**LLAMA, "vocab_size": 100}), seed=0)
    with pytest.raises(ConfigError, match="vocab_size is 100.*256 ids"):
        check_data_fits(model, DataConfig())
    with pytest.raises(ConfigError, match="seq_len=128 exceeds the model's 64 positions"):
        check_data_fits(build_model(HFModelConfig(config=LLAMA), seed=0), DataConfig())


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"kind": "hf"}, "exactly one of model.config"),
        ({"kind": "hf", "config": {"hidden_size": 8}}, "needs model_type"),
        ({"kind": "hf", "config": LLAMA, "pretrained": True}, "set model.path"),
    ],
)
def test_bad_hf_configs(model: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict({"model": model})


@pytest.fixture
def hf_style_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "hf_style.py").write_text(
        textwrap.dedent(
            """
            from types import SimpleNamespace

            import torch
            from torch import nn

            class HFStyle(nn.Module):
                def __init__(self, width):
                    super().__init__()
                    self.emb = nn.Embedding(256, width)
                    self.out = nn.Linear(width, 256)

                def forward(self, input_ids, labels=None):
                    logits = self.out(self.emb(input_ids))
                    loss = None
                    if labels is not None:  # the transformers convention: shift inside
                        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
                    return SimpleNamespace(loss=loss, logits=logits)

            def build(width=16):
                return HFStyle(width)

            class NoLoss(HFStyle):
                def forward(self, input_ids, labels=None):
                    return {"logits": self.out(self.emb(input_ids))}

            def no_loss():
                return NoLoss(8)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return "hf_style"


def test_import_builder_with_hf_call_trains(tmp_path: Path, corpus_dir: Path, hf_style_module: str) -> None:
    model = {"kind": "import", "builder": f"{hf_style_module}:build", "call": "hf"}
    cfg = _with_model(tiny_config(tmp_path, corpus_dir, steps=16), model)
    s = train_threads(cfg, 2)[0]
    start = json.loads((tmp_path / "logs" / "worker0.jsonl").read_text().splitlines()[0])
    assert s["rounds_committed"] == 4 and s["val_loss"] < start["val_loss"] - 0.3


@pytest.mark.parametrize(
    ("builder", "call", "needles"),
    [
        ("build", "xy", ["model.call='xy'", "returned a SimpleNamespace", "set model.call = 'hf'"]),
        ("no_loss", "hf", ["model.call='hf'", "no tensor .loss", "set model.call = 'xy'"]),
    ],
)
def test_a_forward_that_does_not_fit_is_an_error_line(
    tmp_path: Path, corpus_dir: Path, hf_style_module: str, builder: str, call: str, needles: list[str]
) -> None:
    model = {"kind": "import", "builder": f"{hf_style_module}:{builder}", "call": call}
    toml = write_toml(_with_model(tiny_config(tmp_path, corpus_dir), model), tmp_path / "run.toml")
    p = subprocess.run(
        [sys.executable, "-m", "dilo.train", str(toml)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = next((x for x in p.stderr.splitlines() if x.startswith("dilo: error:")), "")
    for needle in needles:
        assert needle in line, (needle, line)


def test_sample_prints_text(trained_llama: tuple[RunConfig, list[dict[str, Any]]]) -> None:
    from dilo.sample import sample

    cfg, _ = trained_llama
    ckpt = sorted((cfg.run_dir / "checkpoints" / "worker0").glob("round_*.safetensors"))[-1]
    p = _dilo("sample", str(ckpt), "--prompt", "def ", "--tokens", "40", "--seed", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("def ") and len(p.stdout) > len("def ") + 5
    assert p.stdout == "def " + sample(ckpt, "def ", 40, seed=1) + "\n"  # seeded
    greedy = sample(cfg.run_dir, "def ", 10, temperature=0)
    assert greedy == sample(cfg.run_dir, "def ", 10, temperature=0, seed=5)


def test_export_of_a_plain_import_model_names_the_alternative(
    tmp_path: Path, corpus_dir: Path, hf_style_module: str
) -> None:
    model = {"kind": "import", "builder": f"{hf_style_module}:build", "call": "hf"}
    cfg = _with_model(tiny_config(tmp_path, corpus_dir, steps=4, outer={"kind": "diloco", "inner_steps": 4}), model)
    train_threads(cfg, 1)
    with pytest.raises(ConfigError, match="dilo merge"):
        export(tmp_path / "checkpoints", tmp_path / "out")


def test_training_refuses_a_vocab_below_the_bytes(tmp_path: Path, corpus_dir: Path) -> None:
    cfg = _with_model(tiny_config(tmp_path, corpus_dir), {"kind": "hf", "config": {**LLAMA, "vocab_size": 100}})
    with pytest.raises(ConfigError, match="vocab_size is 100 but the byte-level data"):
        train_threads(cfg, 1)


def test_export_and_sample_with_a_tokenizer(tmp_path: Path, corpus_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [f.read_text() for f in sorted((corpus_dir / "json").glob("*.py"))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    model = {"kind": "hf", "config": {**LLAMA, "vocab_size": vocab}}
    cfg = tiny_config(tmp_path, corpus_dir, steps=4, data={"tokenizer": str(tmp_path / "tokenizer.json")})
    train_threads(_with_model(cfg, model), 1)
    written = export(tmp_path / "checkpoints", tmp_path / "hf")
    assert "tokenizer" in written
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert loaded.encode("import json", add_special_tokens=False) == tok.encode("import json").ids

    from dilo.sample import sample

    text = sample(tmp_path / "checkpoints", "def ", 8, seed=0)
    assert isinstance(text, str) and text


def test_a_trained_builtin_gpt_exports_with_the_same_logits(tmp_path: Path, corpus_dir: Path) -> None:
    train_threads(tiny_config(tmp_path, corpus_dir, steps=4), 1)
    (tmp_path / "logs" / "worker0.jsonl").rename(tmp_path / "moved.jsonl")
    with pytest.raises(ConfigError, match="--config CONFIG"):  # no log with the run's config
        export(tmp_path / "checkpoints", tmp_path / "hf")
    toml = write_toml(tiny_config(tmp_path, corpus_dir, steps=4), tmp_path / "run.toml")
    assert export(tmp_path / "checkpoints" / "worker0", tmp_path / "hf", config=str(toml))[0].startswith("GPT2LMHead")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    _, ours = load_trained(tmp_path / "checkpoints", config=str(toml))
    x, _ = _batch(3)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours(x), rtol=1e-4, atol=1e-4)


def test_transformers_is_imported_only_for_hf_models(monkeypatch: pytest.MonkeyPatch) -> None:
    code = (
        "import sys, dilo.config, dilo.model, dilo.cli\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "from dilo.config import load\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"pip install 'dilo\[hf\]'"):
        build_model(HFModelConfig(config=LLAMA), seed=0)
