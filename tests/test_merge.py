"""`dilo merge`: checkpoints written by dilo/state.py merge into a mean (or variance-corrected) model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dilo.config import GPTConfig
from dilo.merge import main, merge
from dilo.model import build_model, param_names, params_of
from dilo.state import save_worker_state

CFG = GPTConfig(n_layer=1, d_model=32, n_head=2, context=32)


def _save(ckpt_dir: Path, round_idx: int, who: str, seed: int, cfg: GPTConfig = CFG) -> tuple[Path, list[torch.Tensor]]:
    params = [p.detach().clone() for p in params_of(build_model(cfg, seed))]
    return save_worker_state(ckpt_dir, round_idx, who, {"params": params, "inner": {"step": 7}}), params


@pytest.fixture
def ckpts(tmp_path: Path) -> tuple[list[Path], list[list[torch.Tensor]]]:
    a, pa = _save(tmp_path / "run_a" / "checkpoints", 10, "worker0", seed=1)
    b, pb = _save(tmp_path / "run_b" / "checkpoints", 12, "worker1", seed=2)
    c, pc = _save(tmp_path / "run_b" / "checkpoints", 12, "worker2", seed=3)
    return [a, b.with_suffix(".safetensors"), c], [pa, pb, pc]  # either file of a pair names it


def test_plain_merge_is_the_mean(ckpts: tuple[list[Path], list[list[torch.Tensor]]], tmp_path: Path) -> None:
    paths, params = ckpts
    out = tmp_path / "out" / "merged.safetensors"
    report = merge(paths, out)
    merged = load_file(str(out))
    assert set(merged) == {f"p{i}" for i in range(len(params[0]))}
    for i in range(len(params[0])):
        torch.testing.assert_close(merged[f"p{i}"], torch.stack([p[i] for p in params]).mean(0))
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar == report
    assert sidecar["inputs"] == [str(p) for p in paths] and sidecar["variance_corrected"] is False
    assert len(sidecar["layer_std_inputs"]) == 3
    # independent inits: the mean of 3 has about 1/sqrt(3) of the std of each input
    ratio = sidecar["layer_std_merged"]["p0"] / sidecar["layer_std_inputs"][0]["p0"]
    assert ratio == pytest.approx(3**-0.5, rel=0.05)


def test_variance_corrected_merge_keeps_std(ckpts: tuple[list[Path], list[list[torch.Tensor]]], tmp_path: Path) -> None:
    paths, params = ckpts
    names = param_names(build_model(CFG, 0))
    out = tmp_path / "vc.safetensors"
    # eps far below the N(0, 0.02) init variance (4e-4), so the variance is restored in full
    report = merge(paths, out, variance_corrected=True, names=names, eps=1e-12)
    merged = load_file(str(out))
    assert set(merged) == set(names) and report["variance_corrected"] is True
    matrices = [i for i, p in enumerate(params[0]) if p.ndim == 2]
    assert len(matrices) >= 4
    for i in matrices:
        name = names[i]
        mean_var = sum(float(p[i].double().var()) for p in params) / len(params)
        assert float(merged[name].double().var()) == pytest.approx(mean_var, rel=1e-3)
        mean_std = sum(s[name] for s in report["layer_std_inputs"]) / 3
        assert report["layer_std_merged"][name] == pytest.approx(mean_std, rel=0.02)
        plain = torch.stack([p[i] for p in params]).mean(0)
        assert float(merged[name].mean()) == pytest.approx(float(plain.mean()), abs=1e-6)
    # LayerNorm gains are all ones in every input: zero variance, nothing to rescale
    torch.testing.assert_close(merged["ln_f.weight"], torch.ones(32))

    # with the paper's eps = 1e-4 the correction is partial at this init scale
    default = merge(paths, tmp_path / "vc_default.safetensors", variance_corrected=True, names=names)
    emb = names.index("tok_emb.weight")
    target = sum(float(p[emb].double().var()) for p in params) / 3
    shrunk = float(torch.stack([p[emb] for p in params]).mean(0).double().var())
    expected = (target + 1e-4) * shrunk / (shrunk + 1e-4)
    assert default["layer_std_merged"]["tok_emb.weight"] ** 2 == pytest.approx(expected, rel=1e-3)


def test_conservative_merge_leans_to_own(ckpts: tuple[list[Path], list[list[torch.Tensor]]], tmp_path: Path) -> None:
    paths, params = ckpts
    out = tmp_path / "cons.safetensors"
    merge(paths, out, variance_corrected=True, conservative=1.0, own=1)
    merged = load_file(str(out))
    for i, p in enumerate(params[1]):
        torch.testing.assert_close(merged[f"p{i}"], p, rtol=1e-5, atol=1e-6)  # c = 1: the own model itself
    with pytest.raises(ValueError, match="--variance-corrected"):
        merge(paths, out, conservative=0.5, own=0)


def test_main_reports_shape_mismatch_and_missing_file(
    ckpts: tuple[list[Path], list[list[torch.Tensor]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths, _ = ckpts
    wide, _ = _save(tmp_path / "wide" / "checkpoints", 1, "worker0", seed=4, cfg=CFG.model_copy(update={"d_model": 64}))
    out = tmp_path / "x.safetensors"
    assert main([str(paths[0]), str(wide), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(wide) in err and "shape (256, 64)" in err and "(256, 32)" in err
    assert not out.exists()

    missing = tmp_path / "run_a" / "checkpoints" / "worker9" / "round_000010.json"
    assert main([str(paths[0]), str(missing), "--out", str(out)]) == 2
    assert "worker9/round_000010.json: no such file" in capsys.readouterr().err

    stray = tmp_path / "loose" / "worker0.json"
    stray.parent.mkdir()
    for suffix in (".json", ".safetensors"):
        stray.with_suffix(suffix).write_bytes(paths[0].with_suffix(suffix).read_bytes())
    assert main([str(paths[0]), str(stray), "--out", str(out)]) == 2
    assert "round_NNNNNN" in capsys.readouterr().err


def test_main_with_config_names_tensors(
    ckpts: tuple[list[Path], list[list[torch.Tensor]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths, params = ckpts
    config = tmp_path / "run.toml"
    config.write_text(
        "[model]\nn_layer = 1\nn_head = 2\nd_model = 32\ncontext = 32\n\n"
        f'[data]\ncorpus = "text"\npaths = ["{tmp_path}"]\nseq_len = 32\n'
    )
    out = tmp_path / "named.safetensors"
    args = [*map(str, paths[:2]), "--out", str(out), "--variance-corrected", "--config", str(config)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "tok_emb.weight" in err and "merged std" in err
    merged = load_file(str(out))
    assert set(merged) == set(param_names(build_model(CFG, 0)))
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["variance_corrected"] is True and len(sidecar["inputs"]) == 2

    # a config whose model does not match the checkpoints is a clear error, not a crash
    config.write_text(config.read_text().replace("n_layer = 1", "n_layer = 2"))
    assert main(args) == 2
    assert "parameters but the checkpoints hold" in capsys.readouterr().err


def test_merges_checkpoints_of_the_previous_layout(
    ckpts: tuple[list[Path], list[list[torch.Tensor]]], tmp_path: Path
) -> None:
    """Runs written before per-writer directories (checkpoints/round_NNNNNN/<who>.*) still merge."""
    paths, _ = ckpts
    old = tmp_path / "old_run" / "checkpoints" / "round_000010" / "worker0.json"
    old.parent.mkdir(parents=True)
    for suffix in (".json", ".safetensors"):
        old.with_suffix(suffix).write_bytes(paths[0].with_suffix(suffix).read_bytes())
    merge([old.with_suffix(".safetensors"), paths[2]], tmp_path / "old.safetensors")
    merge([paths[0], paths[2]], tmp_path / "new.safetensors")
    a, b = load_file(str(tmp_path / "old.safetensors")), load_file(str(tmp_path / "new.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
