"""`dilo merge --weights / --method fisher|ties|dare / --layers`: each method against a naive
element-by-element version, through the command and its checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dilo import merge_methods as methods
from dilo.merge import main, merge
from tests.test_merge import CFG, _save


def _models(tmp_path: Path) -> tuple[list[Path], list[list[torch.Tensor]], Path, list[torch.Tensor]]:
    base_path, base = _save(tmp_path / "base" / "checkpoints", 1, "worker0", seed=0)
    paths, models = [], []
    for i in range(3):  # fine-tuned copies of the base: base + a sparse-ish task vector
        g = torch.Generator().manual_seed(10 + i)
        params = [b + 0.1 * torch.randn(b.shape, generator=g) * (torch.rand(b.shape, generator=g) < 0.3) for b in base]
        from dilo.state import save_worker_state

        paths.append(save_worker_state(tmp_path / f"ft{i}" / "checkpoints", 2, "worker0", {"params": params}))
        models.append(params)
    return paths, models, base_path, base


def test_weighted_mean_and_layer_subsets(tmp_path: Path) -> None:
    paths, models, _, _ = _models(tmp_path)
    out = tmp_path / "w.safetensors"
    report = merge(paths, out, weights=[1.0, 2.0, 5.0], layers=r"^p[01]$", own=2)
    merged = load_file(str(out))
    for i in range(len(models[0])):
        if i in (0, 1):
            want = (models[0][i] + 2 * models[1][i] + 5 * models[2][i]) / 8
            torch.testing.assert_close(merged[f"p{i}"], want, rtol=1e-6, atol=1e-7)
        else:  # outside --layers: the --own model's tensor, untouched
            assert torch.equal(merged[f"p{i}"], models[2][i])
    assert report["weights"] == [1.0, 2.0, 5.0] and report["layers"] == r"^p[01]$"


def _naive_ties(base: torch.Tensor, ts: list[torch.Tensor], ws: list[float], density: float) -> torch.Tensor:
    tasks = [(t - base).reshape(-1).tolist() for t in ts]
    k = max(1, round(density * len(tasks[0])))
    thresholds = [sorted((abs(x) for x in task), reverse=True)[k - 1] for task in tasks]
    out = []
    for j, b in enumerate(base.reshape(-1).tolist()):
        kept = [task[j] if abs(task[j]) >= th else 0.0 for task, th in zip(tasks, thresholds)]
        total = sum(w * x for w, x in zip(ws, kept))
        sign = (total > 0) - (total < 0)
        agree = [(w, x) for w, x in zip(ws, kept) if x != 0 and ((x > 0) - (x < 0)) == sign]
        out.append(b + (sum(w * x for w, x in agree) / sum(w for w, _ in agree) if agree else 0.0))
    return torch.tensor(out).reshape(base.shape)


def test_ties_matches_a_naive_version(tmp_path: Path) -> None:
    paths, models, base_path, base = _models(tmp_path)
    out = tmp_path / "ties.safetensors"
    merge(paths, out, method="ties", base=base, density=0.2, weights=[1.0, 1.0, 2.0])
    merged = load_file(str(out))
    for i in (0, 3):  # the embedding and a small tensor
        want = _naive_ties(base[i], [m[i] for m in models], [1.0, 1.0, 2.0], 0.2)
        torch.testing.assert_close(merged[f"p{i}"], want, rtol=1e-5, atol=1e-6)


def test_dare_keeps_the_expected_task_vector(tmp_path: Path) -> None:
    """DARE's drop-and-rescale is unbiased: over many seeds its mean approaches the plain mean of
    the task vectors; one seed keeps about `density` of the entries, rescaled by 1 / density."""
    base = torch.zeros(4000)
    ts = [torch.full((4000,), 1.0), torch.full((4000,), 3.0)]
    one = methods.dare(base, ts, [1.0, 1.0], density=0.25, seed=0, name="p0")
    values = set(one.unique().tolist())
    assert values <= {0.0, 2.0, 6.0, 8.0}  # (kept1 * 4 + kept3 * 12) / 2
    many = torch.stack([methods.dare(base, ts, [1.0, 1.0], density=0.25, seed=s, name="p0") for s in range(40)])
    assert float(many.mean()) == pytest.approx(2.0, rel=0.02)
    assert torch.equal(one, methods.dare(base, ts, [1.0, 1.0], density=0.25, seed=0, name="p0"))  # seeded


def test_fisher_mean_follows_the_sure_model() -> None:
    a, b = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    fa, fb = torch.tensor([100.0, 1.0]), torch.tensor([1.0, 100.0])
    got = methods.fisher_mean([a, b], [fa, fb], [1.0, 1.0])
    torch.testing.assert_close(got, torch.tensor([1 / 101, 100 / 101]), rtol=1e-5, atol=1e-7)


def test_fisher_merge_through_the_command(tmp_path: Path) -> None:
    """--method fisher with --config: one pass over validation batches per checkpoint; the merged
    tensors lie between the inputs, and differ from the plain mean."""
    paths, models, _, _ = _models(tmp_path)
    config = tmp_path / "run.toml"
    config.write_text(
        f"[model]\nn_layer = {CFG.n_layer}\nn_head = {CFG.n_head}\nd_model = {CFG.d_model}\ncontext = {CFG.context}\n\n"
        f'[data]\ncorpus = "text"\npaths = ["{Path(__file__).parent}"]\nseq_len = 32\n'
    )
    out = tmp_path / "fisher.safetensors"
    args = [*map(str, paths), "--out", str(out), "--method", "fisher", "--config", str(config), "--fisher-batches", "2"]
    assert main(args) == 0
    merged = load_file(str(out))
    from dilo.model import build_model, param_names

    got = merged[param_names(build_model(CFG, 0))[0]]
    stack = torch.stack([m[0] for m in models])
    assert bool((got >= stack.min(0).values - 1e-6).all()) and bool((got <= stack.max(0).values + 1e-6).all())
    assert not torch.allclose(got, stack.mean(0))
    assert json.loads(out.with_suffix(".json").read_text())["method"] == "fisher"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--method", "ties"], "--base CKPT"),
        (["--weights", "1,2"], "one positive weight per checkpoint"),
        (["--method", "fisher"], "pass --config"),
        (["--layers", "nomatch"], "matches no parameter"),
    ],
)
def test_merge_options_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    paths, _, _, _ = _models(tmp_path)
    assert main([*map(str, paths), "--out", str(tmp_path / "x.safetensors"), *extra]) == 2
    assert needle in capsys.readouterr().err
