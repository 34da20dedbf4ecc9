"""LoRA adapters (peft) and parameters that stay local: only the adapters train and travel, and
`outer.local` tensors are never averaged."""

from __future__ import annotations

from pathlib import Path

import torch

from dilo.adapters import build_run_model
from dilo.model import param_names, params_of
from dilo.state import load_worker_state, rounds_of
from tests.conftest import tiny_config, train_threads


def _final(run_dir: Path, worker: str) -> dict[str, torch.Tensor]:
    """A worker's final trainable tensors by name (the checkpoint holds params_of's order)."""
    ckpt = run_dir / "checkpoints"
    state = load_worker_state(ckpt, rounds_of(ckpt, worker)[-1], worker)
    return state["params"]


def test_lora_trains_and_exchanges_only_the_adapters(tmp_path: Path, corpus_dir: Path) -> None:
    full = tiny_config(tmp_path / "full", corpus_dir, workers=2, steps=8)
    lora = tiny_config(tmp_path / "lora", corpus_dir, workers=2, steps=8, lora={"r": 2, "target_modules": ["qkv"]})
    model = build_run_model(lora)
    names = param_names(model)
    assert names and all("lora_" in n for n in names)  # the base is frozen
    adapters = sum(p.numel() for p in params_of(model))
    everything = sum(p.numel() for p in build_run_model(full).parameters())
    s_full = train_threads(full, 2)[0]
    s_lora = train_threads(lora, 2)[0]
    assert s_lora["val_loss"] < s_lora["initial_val_loss"]  # the adapters learn
    ratio = s_lora["bytes_sent_per_worker"] / s_full["bytes_sent_per_worker"]
    # bytes scale with the adapters (plus the same small tail per round in both runs)
    assert ratio < 2 * adapters / everything + 0.01, (ratio, adapters / everything)
    # checkpoints hold the trainable tensors only: the adapters (the base is rebuilt from the seed)
    for w in ("worker0", "worker1"):
        assert len(_final(tmp_path / "lora", w)) == len(names)


def test_outer_local_tensors_stay_on_their_worker(tmp_path: Path, corpus_dir: Path) -> None:
    """FedSA-LoRA: the B matrices stay local (different per worker), the A matrices are averaged
    (equal on every worker after each round)."""
    cfg = tiny_config(tmp_path, corpus_dir, workers=2, steps=8, lora={"r": 2, "target_modules": ["qkv"]},
                      outer={"kind": "diloco", "inner_steps": 4, "local": "lora_B"})  # fmt: skip
    names = param_names(build_run_model(cfg))
    train_threads(cfg, 2)
    w0, w1 = (dict(zip(names, _final(tmp_path, w))) for w in ("worker0", "worker1"))
    shared = [n for n in names if "lora_A" in n]
    local = [n for n in names if "lora_B" in n]
    assert shared and local
    assert all(torch.equal(w0[n], w1[n]) for n in shared)
    assert all(not torch.equal(w0[n], w1[n]) for n in local)  # trained, never averaged


def test_the_coordinator_holds_only_the_shared_adapters(tmp_path: Path, corpus_dir: Path) -> None:
    from dilo.coordinator import Coordinator

    cfg = tiny_config(tmp_path, corpus_dir, workers=2, lora={"r": 2, "target_modules": ["qkv"]},
                      outer={"kind": "diloco", "inner_steps": 4, "local": "lora_B"},
                      membership={"kind": "coordinator"})  # fmt: skip
    coord = Coordinator(cfg, inproc=True)
    names = param_names(build_run_model(cfg))
    assert len(coord.params) == len([n for n in names if "lora_A" in n]) > 0
