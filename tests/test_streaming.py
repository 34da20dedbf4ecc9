"""Streaming DiLoCo over real Gloo, against the naive reference (dilo/outer/reference.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dilo.config import CodecSpec
from dilo.errors import ConfigError
from dilo.metrics import read_jsonl
from dilo.model import param_names
from dilo.outer import reference
from dilo.outer.base import Tail, params_of
from dilo.outer.streaming import StreamingDiLoCo, fragment_of
from dilo.state import load_worker_state, rounds_of
from dilo.transport.torch_dist import TorchDistTransport, connect_store
from tests.conftest import run_workers, tiny_config, train_threads, write_toml
from tests.test_outer import _drift
from tests.test_overlap import _same_final_anchor
from tests.test_train import _rounds

H, P = 4, 2
OUTER = {"lr": 0.7, "momentum": 0.9, "nesterov": True}


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
        self.head = nn.Linear(4, 2)


def _model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = _Blocks()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def _move(s: int, rank: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """One inner step that depends on where the worker is, so that delays and mixing change the outcome."""
    return [0.3 * (p - _drift(rank, s % 7, p.shape)) for p in params]


def _train(
    world, steps: int, delay: int, *, codec=None, stop_at: int | None = None, mixing: float = 0.5, ask: int = -1
):
    """A worker for `steps` inner steps; stop_at: checkpoint there and go on from a fresh strategy;
    ask: rank 0 asks every worker to stop at this step (the loop ends at the agreed stop)."""
    store = connect_store(world.host, world.port, world.rank, world.size, hosted=True)
    t = TorchDistTransport(store, world.rank, world.size, timeout_s=30)

    def build(model):
        return StreamingDiLoCo(model, t, inner_steps=H, fragments=P, delay=delay, mixing=mixing, codec=codec, **OUTER)

    model = _model()
    outer = build(model)
    outer.start(model, resumed=False)
    reports = []
    for s in range(steps):
        with torch.no_grad():
            params = params_of(model)
            for p, m in zip(params, _move(s, world.rank, [p.detach().clone() for p in params])):
                p.sub_(m)
        last = s == steps - 1
        if outer.due(s) or last:
            stop = world.rank == 0 and s >= ask >= 0
            tail = Tail(weight=1.0, contributes=True, stop=stop, tokens=10, last=last)
            reports.append(outer.sync(model, tail=tail))
            if reports[-1].stop:
                break
        if s == stop_at:  # resume from what a checkpoint holds, with a fresh model and strategy
            state = {k: v for k, v in outer.state_dict().items()}
            saved = [p.detach().clone() for p in params_of(model)]
            model = _model()
            with torch.no_grad():
                for p, v in zip(params_of(model), saved):
                    p.copy_(v)
            outer = build(model)
            outer.load_state_dict(state)
            outer.start(model, resumed=True)
    anchor = [a.detach().clone() for a in outer.anchor.params]
    return reports, anchor, [p.detach().clone() for p in params_of(model)], outer.order


def _check_bit_identical(out) -> list[torch.Tensor]:
    anchors = [o[1] for o in out]
    for other in anchors[1:]:
        assert all(torch.equal(a, b) for a, b in zip(anchors[0], other))
    order = out[0][3]
    for o in out:  # the run ends on the anchor
        assert all(torch.equal(a, o[2][i]) for a, i in zip(o[1], order))
    unordered = [torch.empty(0)] * len(order)
    for a, i in zip(anchors[0], order):
        unordered[i] = a
    return unordered


def _reference(n: int, steps: int, delay: int, mixing: float = 0.5) -> list[torch.Tensor]:
    model = _model()
    start = [p.detach().clone() for p in params_of(model)]
    fragment = fragment_of(param_names(model), P, "strided")
    ref, _ = reference.streaming_diloco(
        start, fragment, _move, steps, n, inner_steps=H, fragments=P, delay=delay, alpha=mixing, **OUTER
    )
    return ref


@pytest.mark.parametrize(
    ("n", "steps", "delay"),
    [(2, 12, 1), (3, 13, 1), (2, 11, 0)],
    ids=["ends-on-a-send", "ends-on-an-apply", "no-delay"],
)
def test_streaming_matches_the_reference_and_is_bit_identical(n: int, steps: int, delay: int) -> None:
    out = run_workers(lambda w: _train(w, steps, delay), n)
    anchor = _check_bit_identical(out)
    for a, b in zip(anchor, _reference(n, steps, delay)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    reports = out[0][0]
    assert all(r.committed for r in reports)
    assert sum(r.tokens for r in reports) == 10 * n * len(reports)  # every call's tokens reported once
    assert "final exchange" in reports[-1].reason


def test_the_reference_is_not_blocking_diloco() -> None:
    """Delay and mixing change the outcome: the test above could not pass by accident."""
    delayed, at_once = _reference(2, 12, 1), _reference(2, 12, 0)
    assert not all(torch.allclose(a, b) for a, b in zip(delayed, at_once))
    unmixed = _reference(2, 12, 1, mixing=0.0)
    assert not all(torch.allclose(a, b) for a, b in zip(delayed, unmixed))


def test_streaming_resumes_bit_identically_from_a_fragment_in_flight() -> None:
    whole = run_workers(lambda w: _train(w, 14, 1), 2)
    resumed = run_workers(lambda w: _train(w, 14, 1, stop_at=5), 2)  # step 6 sends a fragment
    assert all(torch.equal(a, b) for a, b in zip(whole[0][1], resumed[0][1]))


@pytest.mark.parametrize("delay", [0, 1])
def test_an_agreed_stop_ends_every_worker_on_the_anchor(delay: int) -> None:
    out = run_workers(lambda w: _train(w, 40, delay, ask=6), 3)
    _check_bit_identical(out)
    calls = [len(o[0]) for o in out]
    assert len(set(calls)) == 1 and calls[0] < 20  # the same call, long before the step limit
    assert "final exchange" in out[1][0][-1].reason


@pytest.mark.parametrize("kind", ["int4", "topk"])
def test_streaming_with_a_codec_keeps_bit_identical_anchors(kind: str) -> None:
    codec = CodecSpec(kind=kind, block=8, fraction=0.25)
    out = run_workers(lambda w: _train(w, 12, 1, codec=codec), 2)
    anchor = _check_bit_identical(out)
    start = [p.detach() for p in params_of(_model())]
    assert not all(torch.equal(a, b) for a, b in zip(anchor, start))
    sent = sum(r.bytes_sent for r in out[0][0])
    fp32 = run_workers(lambda w: _train(w, 12, 1), 2)
    assert sent < sum(r.bytes_sent for r in fp32[0][0])


def test_fragments_are_whole_blocks() -> None:
    names = ["embed.w", "blocks.0.a", "blocks.0.b", "blocks.1.a", "blocks.2.a", "blocks.3.a", "norm.w", "head.w"]
    assert fragment_of(names, 2, "strided") == [0, 0, 0, 1, 0, 1, 1, 1]
    assert fragment_of(names, 2, "sequential") == [0, 0, 0, 0, 1, 1, 1, 1]
    hf = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.1.mlp.w", "lm_head.weight"]
    assert fragment_of(hf, 2, "strided") == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="outer.fragments=5"):
        fragment_of(names, 5, "strided")


def test_streaming_config_is_validated(tmp_path: Path, corpus_dir: Path) -> None:
    def outer(**kw):
        return {"kind": "diloco", "inner_steps": 4, **kw}

    with pytest.raises(ConfigError, match="multiple of outer.fragments"):
        tiny_config(tmp_path, corpus_dir, outer=outer(fragments=3))
    with pytest.raises(ConfigError, match="fragment_delay=2 must be below"):
        tiny_config(tmp_path, corpus_dir, outer=outer(fragments=2, fragment_delay=2))
    with pytest.raises(ConfigError, match="choose one"):
        tiny_config(tmp_path, corpus_dir, outer=outer(fragments=2, overlap=True))
    with pytest.raises(ConfigError, match="membership.kind='static'"):
        tiny_config(tmp_path, corpus_dir, outer=outer(fragments=2), membership={"kind": "coordinator"})


def _streaming_config(tmp_path: Path, corpus_dir: Path, **kw):
    model = {"n_layer": 2, "n_head": 2, "d_model": 32, "context": 32}
    outer = {"kind": "diloco", "inner_steps": 4, "fragments": 2, "fragment_delay": 1, "lr": 0.4}
    return tiny_config(tmp_path, corpus_dir, model=model, outer=outer, codec={"kind": "int4", "block": 32}, **kw)


def test_streaming_trains_in_the_loop(tmp_path: Path, corpus_dir: Path) -> None:
    """The real loop, 4-bit fragments (workers as threads, the exchange on its own Gloo group)."""
    summaries = train_threads(_streaming_config(tmp_path, corpus_dir), 2)
    tokens = 2 * 12 * 4 * 32
    assert summaries[0]["tokens"] == tokens
    rounds = _rounds(tmp_path, 0)
    assert rounds[-1]["global_tokens"] == tokens  # what the exchanges reported: every token once
    assert summaries[0]["val_loss"] < rounds[0]["val_loss"]
    # sends at steps 2, 4, ...; applies one step later; the last step exchanges every fragment
    assert [r["step"] for r in rounds] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    _same_final_anchor(tmp_path, 2)


def test_streaming_trains_processes(tmp_path: Path, corpus_dir: Path) -> None:
    """Two real processes through `dilo run`: every worker ends on one anchor."""
    toml = write_toml(_streaming_config(tmp_path, corpus_dir), tmp_path / "streaming.toml")
    run = subprocess.run(
        [sys.executable, "-m", "dilo.cli", "run", str(toml), "--workers=2"], capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    _same_final_anchor(tmp_path, 2)


def test_streaming_islands_of_two_ranks(tmp_path: Path, corpus_dir: Path) -> None:
    """2 islands x 2 ranks: the lead ranks stream the fragments, each island follows its lead."""
    train_threads(_streaming_config(tmp_path, corpus_dir, transport={"timeout_s": 20, "island_ranks": 2}), 4)
    names = ["worker0", "worker0.1", "worker1", "worker1.1"]
    logs = {n: [r for r in read_jsonl(tmp_path / "logs" / f"{n}.jsonl") if r["event"] == "round"] for n in names}
    for i in range(len(logs["worker0"])):
        assert len({log[i]["anchor_hash"] for log in logs.values()}) == 1
    ckpt = tmp_path / "checkpoints"
    finals = [load_worker_state(ckpt, rounds_of(ckpt, n)[-1], n)["params"] for n in names]
    assert all(torch.equal(a, b) for f in finals[1:] for a, b in zip(finals[0], f))
