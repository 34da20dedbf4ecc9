"""Your own model, data and training loop, with dilo's outer step (DiLoCo + int8 by default).

Two workers under torchrun (a static world over torch.distributed):

    torchrun --nproc-per-node 2 examples/own_loop.py

The same script, as two workers of a `dilo coordinator` (they may come and go):

    PYTHONPATH=examples dilo coordinator examples/own_loop.toml --membership.kind=coordinator \\
        --coordinator.bind=tcp://127.0.0.1:29600
    python examples/own_loop.py --coordinator tcp://127.0.0.1:29600 --id w0
    python examples/own_loop.py --coordinator tcp://127.0.0.1:29600 --id w1

Stop with Ctrl+C or --stop-after ROUNDS; --checkpoint DIR saves at every round boundary and
--resume continues from there, bit for bit. The model is a plain `nn.Module`, the data a plain
`DataLoader`; only `dilo.init`, `dilo.wrap`, `outer.start()` and `outer.step()` are dilo's.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dilo

CONFIG = Path(__file__).with_suffix(".toml")
_SEEDING = threading.Lock()


def build_model(width: int = 64) -> nn.Module:
    """A small classifier; `dilo coordinator` calls this too (model.builder in the TOML)."""
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 4))


def dataset(seed: int = 0, n: int = 4096) -> TensorDataset:
    """Points labelled by a fixed random teacher network: a task that needs a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.randn(16, 4, generator=g)
    y = (torch.tanh(x @ teacher) + 0.3 * torch.randn(n, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


class Shard:
    """This worker's share of the data as an endless stream of shuffled batches, with a position
    that a checkpoint can hold (epoch, batches taken) so that a resumed run sees the same batches."""

    def __init__(self, data: TensorDataset, rank: int, size: int, *, batch_size: int, seed: int) -> None:
        self.data = TensorDataset(*(t[rank::size] for t in data.tensors))
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.taken = 0, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            order = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            loader = DataLoader(self.data, batch_size=self.batch_size, shuffle=True, generator=order, drop_last=True)
            for i, batch in enumerate(loader):
                if i < self.taken:
                    continue  # resuming inside an epoch: skip what was trained on
                self.taken = i + 1
                yield batch[0], batch[1]
            self.epoch, self.taken = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])


def train(
    world: dilo.World, *, checkpoint: Path | None = None, resume: bool = False, stop_after: int | None = None
) -> dict[str, Any]:
    """The whole training loop of one worker; returns its final loss and parameters' hash."""
    with _SEEDING:  # the same initial parameters in every run (workers may be threads of one process)
        torch.manual_seed(world.cfg.seed)
        model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    outer = dilo.wrap(model, optimizer, world)  # the config's outer step and codec
    data = Shard(dataset(world.cfg.seed), world.rank, world.size, batch_size=32, seed=world.cfg.seed + world.rank)
    path = checkpoint / f"{world.log_name}.pt" if checkpoint is not None else None
    if resume and path is not None and path.exists():
        state = torch.load(path, weights_only=True)
        outer.load_state_dict(state["outer"])
        data.load_state_dict(state["data"])
    outer.start()  # rank 0's parameters (static), or the coordinator's (elastic)
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()  # DDP / islands: gradients are averaged just before, by dilo's hook
        optimizer.zero_grad()
        report = outer.step(loss=loss.item(), tokens=len(y))
        if report is not None:  # a round ended: the parameters are the new anchor
            print(
                f"{world.log_name}: round {report.round} step {report.step} loss {report.loss:.4f} "
                f"committed={report.committed} sent {report.sync.bytes_sent} B",
                file=sys.stderr,
                flush=True,
            )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"outer": outer.state_dict(), "data": data.state_dict()}, path)
            if stop_after is not None and report.round >= stop_after:
                break
        if outer.done:
            break
    outer.close()
    with torch.no_grad():
        everything = dataset(world.cfg.seed).tensors
        final = float(F.cross_entropy(model(everything[0]), everything[1]))
    digest = dilo.tensor_digest([p.detach() for p in model.parameters()])
    return {"loss": final, "anchor": digest, "steps": outer.steps, "rounds": outer.rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinator", help="tcp://HOST:PORT of a `dilo coordinator` (default: a static world)")
    parser.add_argument("--id", help="this worker's id with a coordinator (default: host and pid)")
    parser.add_argument("--checkpoint", type=Path, help="directory for round checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--stop-after", type=int, help="stop after this many rounds (with --checkpoint: resumable)")
    args, overrides = parser.parse_known_args(argv)
    if args.coordinator:
        overrides += ["--membership.kind=coordinator", f"--membership.address={args.coordinator}"]
    try:
        with dilo.init(CONFIG, overrides=overrides, worker_id=args.id) as world:
            result = train(world, checkpoint=args.checkpoint, resume=args.resume, stop_after=args.stop_after)
    except dilo.DiloError as e:
        print(f"dilo: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(f"{world.log_name}: done {result}\n")  # one write: ranks share the terminal
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
