"""A test helper run under torchrun: one island of the launched ranks resumes a sharded island's
checkpoint through the training path (`world.checkpoints(...).load`, `outer.load_state_dict`),
then writes every resumed tensor at full size (parameters, AdamW's moments, the outer anchor and
momentum, gathered from the shards) for the test to compare across layouts.

    python -m torch.distributed.run --nproc-per-node=3 tests/sharded_probe.py CONFIG CKPT_DIR ROUND OUT
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import dilo
from dilo.adapters import build_run_model
from dilo.config import load
from dilo.inner import InnerLoop
from dilo.worlds import Placement, StaticWorld


def full(t: Any) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(config: str, ckpt_dir: str, round_idx: str, out: str) -> None:
    placement = Placement.from_env()
    k = placement.size
    cfg = load(config, ["--workers=1", f"--transport.island_ranks={k}", "--transport.island_shard=fsdp"])
    world = StaticWorld(cfg, placement)
    try:
        model = world.shard(build_run_model(cfg))
        inner = InnerLoop(model, cfg.inner, total_steps=cfg.steps)
        outer = dilo.wrap(model, inner.optimizer, world)
        # the saved run's island 0: a one-island world reads it under its own name
        state = world.checkpoints(Path(ckpt_dir)).load(int(round_idx))
        outer.load_state_dict(state)
        strategy = outer.strategy.state_dict()
        got = {
            "params": [full(p.detach()) for p in model.parameters()],
            "moments": {
                f"{i}.{k}": full(v)
                for i, s in inner.optimizer.state_dict()["state"].items()
                for k, v in s.items()
                if k != "step"
            },
            "anchor": {n: full(t) for n, t in strategy["anchor"].items()},
            "momentum": {n: full(t) for n, t in strategy["sharded"]["momentum_buffer"].items()},
            "rounds": outer.rounds,
        }
        if placement.rank == 0:
            torch.save(got, out)
    finally:
        world.close(leaving=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
