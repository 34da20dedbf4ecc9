"""`dilo merge`: average independently trained checkpoints into one model, optionally variance-corrected.

Each input is one worker's checkpoint pair written by dilo/state.py
(`<run>/checkpoints/worker<r>/round_NNNNNN.json` + `.safetensors`, or `round_NNNNNN/worker<r>.*` of
runs written before that layout; either file names the pair). The
models' parameters are averaged tensor by tensor; with --variance-corrected each tensor is then
rescaled around its mean to the inputs' mean variance (Tian et al., arXiv:2404.04616; see
dilo/outer/mixing.py), which keeps the merge of uncorrelated models from shrinking its weights.
Merging DiLoCo replicas that share an anchor does not need the correction.

    dilo merge runs/a/checkpoints/worker0/round_000010.json runs/b/checkpoints/worker0/round_000010.json \\
        --out merged.safetensors --variance-corrected --config configs/quickstart.toml

writes `merged.safetensors` (one tensor per parameter name) and `merged.json` (inputs and per-layer
std before and after). Without --config the tensors are named p0, p1, ... in `params_of` order.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TypedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from dilo import merge_methods as methods
from dilo.errors import DiloError
from dilo.outer.mixing import layer_std, variance_corrected_merge
from dilo.state import load_worker_state, locate

METHODS = ("mean", "fisher", "ties", "dare")


class MergeReport(TypedDict):
    """The JSON sidecar written next to a merged checkpoint."""

    inputs: list[str]
    method: str
    weights: list[float]
    layers: str
    density: float | None
    variance_corrected: bool
    conservative: float
    own: int | None
    eps: float
    layer_std_inputs: list[dict[str, float]]
    """Per input checkpoint: each layer's standard deviation."""
    layer_std_merged: dict[str, float]


def load_params(path: Path) -> list[Tensor]:
    """The `params` list of one checkpoint pair, named by either of its two files."""
    if path.suffix not in (".json", ".safetensors"):
        raise ValueError(f"{path}: expected a checkpoint file <who>/round_NNNNNN.json (or .safetensors)")
    sharded = path.with_suffix("").is_dir()  # a sharded island's: round_NNNNNN.json + its DCP directory
    for f in (path.with_suffix(".json"), path.with_suffix("" if sharded else ".safetensors")):
        if not f.exists():
            raise FileNotFoundError(
                f"{f}: no such file (a checkpoint is the pair round_NNNNNN.json + round_NNNNNN.safetensors "
                "in its writer's directory, or a sharded island's round_NNNNNN.json + round_NNNNNN/)"
            )
    ckpt_dir, round_idx, who = locate(path)
    try:
        state = load_worker_state(ckpt_dir, round_idx, who)
    except (SafetensorError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    params = state.get("params")
    if not isinstance(params, list) or not all(isinstance(t, Tensor) for t in params):
        raise ValueError(f"{path}: checkpoint holds no 'params' list of tensors")
    return params


def merge(
    paths: list[Path],
    out: Path,
    *,
    variance_corrected: bool = False,
    conservative: float = 0.0,
    own: int | None = None,
    names: list[str] | None = None,
    eps: float = 1e-4,
    weights: list[float] | None = None,
    method: str = "mean",
    base: list[Tensor] | None = None,
    density: float = 0.2,
    seed: int = 0,
    fishers: list[list[Tensor]] | None = None,
    layers: str = "",
) -> MergeReport:
    """Merge the checkpoints at `paths` into the safetensors file `out` plus a JSON sidecar; return the sidecar.

    Plain merging is the fp32 mean of every tensor. `variance_corrected` applies
    variance_corrected_merge (with `conservative` and `own`, the index in `paths` of the model to lean
    towards, and `eps`, the paper's 1e-4: small next to a layer's variance it restores the variance
    fully; for tiny-variance layers such as GPT-2's N(0, 0.02) init it restores only part of it).

    weights: one per model (the weighted mean; default equal). method (dilo/merge_methods.py):
    mean, fisher (`fishers`: each model's diagonal Fisher per tensor), ties or dare (`base`: the
    models' common starting point, `density`: the share of each task vector kept, `seed`: DARE's
    masks). layers: a regular expression of the parameter names to merge; the others are copied
    from the `own` model (the first without it).
    """
    if not paths:
        raise ValueError("merge needs at least one checkpoint")
    out = Path(out)
    if out.suffix == ".json":
        raise ValueError(f"--out {out}: the JSON sidecar takes that name; give the .safetensors path")
    if conservative and not variance_corrected:
        raise ValueError("--conservative only applies with --variance-corrected")
    paths = [Path(p) for p in paths]
    models = [load_params(p) for p in paths]
    first = models[0]
    for path, params in zip(paths[1:], models[1:]):
        if len(params) != len(first):
            raise ValueError(f"{path}: {len(params)} tensors, but {paths[0]} has {len(first)}")
        for i, (a, b) in enumerate(zip(first, params)):
            if a.shape != b.shape:
                label = names[i] if names is not None and i < len(names) else f"p{i}"
                raise ValueError(
                    f"{path}: tensor {i} ({label}) has shape {tuple(b.shape)}, but {paths[0]} has {tuple(a.shape)}"
                )
    if names is None:
        names = [f"p{i}" for i in range(len(first))]
    if len(names) != len(first):
        raise ValueError(f"the model config names {len(names)} parameters but the checkpoints hold {len(first)}")
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")

    weights = _check_method(method, weights, len(models), variance_corrected, base, fishers, first, density)
    if variance_corrected:
        merged = variance_corrected_merge(models, names, own=own, conservative=conservative, eps=eps)
    else:
        merged = [_merge_one(i, n, [m[i] for m in models], method, weights, base, fishers, density, seed).to(t.dtype)
                  for i, (n, t) in enumerate(zip(names, first))]  # fmt: skip
    if layers:  # only the matching tensors are merged; the rest stay the kept model's
        keep = models[own if own is not None else 0]
        pattern = re.compile(layers)
        chosen = [bool(pattern.search(n)) for n in names]
        if not any(chosen):
            raise ValueError(f"--layers {layers!r} matches no parameter name (names: {names[:4]}...)")
        merged = [m if c else k.clone() for m, k, c in zip(merged, keep, chosen)]

    report: MergeReport = {
        "inputs": [str(p) for p in paths],
        "method": method,
        "weights": weights,
        "layers": layers,
        "density": density if method in ("ties", "dare") else None,
        "variance_corrected": variance_corrected,
        "conservative": conservative,
        "own": own,
        "eps": eps,
        "layer_std_inputs": [layer_std(m, names) for m in models],
        "layer_std_merged": layer_std(merged, names),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in zip(names, merged)}, str(out))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return report


def _check_method(
    method: str, weights: list[float] | None, n: int, variance_corrected: bool,
    base: list[Tensor] | None, fishers: list[list[Tensor]] | None, first: list[Tensor], density: float,
) -> list[float]:  # fmt: skip
    """The weights (validated), after the method's own checks."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n or not all(w > 0 for w in weights):
        raise ValueError(f"--weights needs one positive weight per checkpoint ({n}), got {weights}")
    if variance_corrected and (method != "mean" or len(set(weights)) > 1):
        raise ValueError("--variance-corrected rescales the plain mean: drop --method and --weights")
    if method in ("ties", "dare"):
        if base is None:
            raise ValueError(f"--method {method} merges task vectors: give the models' common start as --base CKPT")
        if len(base) != len(first) or any(a.shape != b.shape for a, b in zip(base, first)):
            raise ValueError("--base holds other tensors than the checkpoints: another model?")
        if not 0 < density <= 1:
            raise ValueError(f"--density {density} must lie in (0, 1]")
    if method == "fisher" and (fishers is None or len(fishers) != n):
        raise ValueError("--method fisher needs each model's Fisher information: pass --config (and its data)")
    return weights


def _merge_one(
    i: int, name: str, tensors: list[Tensor], method: str, weights: list[float], base: list[Tensor] | None,
    fishers: list[list[Tensor]] | None, density: float, seed: int,
) -> Tensor:  # fmt: skip
    ts = [t.to(torch.float32) for t in tensors]
    if method == "fisher":
        assert fishers is not None
        return methods.fisher_mean(ts, [f[i] for f in fishers], weights)
    if method == "ties":
        assert base is not None
        return methods.ties(base[i].float(), ts, weights, density=density)
    if method == "dare":
        assert base is not None
        return methods.dare(base[i].float(), ts, weights, density=density, seed=seed, name=name)
    return methods.weighted_mean(ts, weights)


def diagonal_fisher(cfg_path: str, models: list[list[Tensor]], batches: int) -> list[list[Tensor]]:
    """Each model's empirical diagonal Fisher information (the mean squared gradient of its loss)
    over `batches` validation batches of the config's data: one pass per checkpoint."""
    from dilo.adapters import build_run_model
    from dilo.config import load
    from dilo.data import load_validation
    from dilo.model import model_vocab_size, params_of

    cfg = load(cfg_path)
    model = build_run_model(cfg)
    val = load_validation(cfg.data, cfg.seed, batches, vocab_size=model_vocab_size(model))
    out = []
    for params in models:
        mine = params_of(model)
        with torch.no_grad():
            for p, v in zip(mine, params):
                p.copy_(v)
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in mine]
        for x, y in val:
            model.zero_grad(set_to_none=True)
            model(x, y).backward()
            for f, p in zip(fisher, mine):
                if p.grad is not None:
                    f.add_(p.grad.float().square())
        out.append([f / max(1, len(val)) for f in fisher])
    return out


def _names_from_config(path: str) -> list[str]:
    from dilo.config import load
    from dilo.model import build_model, param_names

    cfg = load(path)
    return param_names(build_model(cfg.model, cfg.seed))


def _print_table(report: MergeReport) -> None:
    merged = report["layer_std_merged"]
    width = max([len(n) for n in merged] + [5])
    print(f"{'layer':<{width}}  {'inputs std (mean)':>17}  {'merged std':>10}  {'ratio':>6}", file=sys.stderr)
    for name, std in merged.items():
        before = sum(s[name] for s in report["layer_std_inputs"]) / len(report["layer_std_inputs"])
        ratio = f"{std / before:6.3f}" if before > 0 else f"{'-':>6}"
        print(f"{name:<{width}}  {before:17.6g}  {std:10.6g}  {ratio}", file=sys.stderr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dilo merge", description="Average independently trained checkpoints into one model."
    )
    parser.add_argument(
        "ckpts", nargs="+", type=Path, help="checkpoint files worker<r>/round_NNNNNN.json (or .safetensors)"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="merged .safetensors file; a .json sidecar goes next to it"
    )
    parser.add_argument(
        "--variance-corrected",
        action="store_true",
        help="rescale each merged tensor to the inputs' mean variance (for uncorrelated models)",
    )
    parser.add_argument(
        "--conservative",
        type=float,
        default=0.0,
        help="c in [0, 1]: lean the merge and its target variance towards the --own model by c",
    )
    parser.add_argument("--own", type=int, default=None, help="index among CKPT of the model --conservative leans to")
    parser.add_argument("--eps", type=float, default=1e-4, help="epsilon of the variance ratio (paper: 1e-4)")
    parser.add_argument("--config", default=None, help="run config whose model gives the parameter names")
    parser.add_argument("--weights", default=None, help="comma-separated weight per CKPT (default: equal)")
    parser.add_argument(
        "--method", default="mean", choices=METHODS,
        help="mean; fisher (Fisher-weighted, needs --config); ties / dare (task vectors from --base)",
    )  # fmt: skip
    parser.add_argument("--base", type=Path, default=None, help="ties / dare: the models' common starting checkpoint")
    parser.add_argument("--density", type=float, default=0.2, help="ties / dare: share of each task vector kept")
    parser.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks")
    parser.add_argument("--fisher-batches", type=int, default=4, help="fisher: validation batches per checkpoint")
    parser.add_argument(
        "--layers", default="", help="regular expression of the parameter names to merge (others: --own's)"
    )
    args = parser.parse_args(argv)
    try:
        names = _names_from_config(args.config) if args.config else None
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
        fishers = None
        if args.method == "fisher":
            if not args.config:
                raise ValueError("--method fisher computes each model's Fisher information: pass --config")
            fishers = diagonal_fisher(args.config, [load_params(p) for p in args.ckpts], args.fisher_batches)
        report = merge(
            args.ckpts,
            args.out,
            variance_corrected=args.variance_corrected,
            conservative=args.conservative,
            own=args.own,
            names=names,
            eps=args.eps,
            weights=weights,
            method=args.method,
            base=load_params(args.base) if args.base else None,
            density=args.density,
            seed=args.seed,
            fishers=fishers,
            layers=args.layers,
        )
    except (ValueError, FileNotFoundError, DiloError) as e:
        print(f"dilo merge: {e}", file=sys.stderr)
        return 2
    _print_table(report)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)
    return 0
