"""The run's model as the outer step sees it: LoRA adapters (peft) and parameters that stay local.

    model = build_run_model(cfg)           # cfg.model, with cfg.lora's adapters when lora.r > 0
    view = shared_view(model, cfg.outer)   # what the outer step averages: trainable, not outer.local

With LoRA (`[lora] r = 8`, `target_modules = ["q_proj", "v_proj"]`) the base weights are frozen
(`requires_grad = False`), so the inner optimizer trains only the adapters and only they are
exchanged: a round's bytes scale with the adapters, not the model. `outer.local` (a regular
expression on parameter names, e.g. "lora_B" as in FedSA-LoRA) keeps some trainable parameters on
the worker: they train, are checkpointed, but are never sent nor averaged.

Every worker, and the coordinator that holds the global adapters, builds the same model from the
same seed, so the frozen weights agree without ever being sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from dilo.config import DDPConfig, LoraConfig, OuterConfig, RunConfig
from dilo.errors import ConfigError
from dilo.model import build_model, param_names, params_of


def build_run_model(cfg: RunConfig) -> nn.Module:
    """cfg.model built from cfg.seed, with LoRA adapters when cfg.lora.r > 0."""
    model = build_model(cfg.model, cfg.seed)
    if cfg.lora.r > 0:
        apply_lora(model, cfg.lora, seed=cfg.seed)
    return model


def apply_lora(model: nn.Module, cfg: LoraConfig, *, seed: int) -> None:
    """Inject LoRA adapters into `model` in place (peft) and freeze everything else. The adapters'
    random initialisation is seeded (the global RNG is forked, so the caller's state is kept)."""
    try:
        from peft import LoraConfig as PeftLora
        from peft import inject_adapter_in_model
    except ImportError:
        raise ConfigError("lora.r > 0 needs the peft package: pip install 'dilo[hf]'") from None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        raise ConfigError(
            f"lora.target_modules {missing} name no nn.Linear of this model; its linear layers are "
            f"{sorted(names)}: pick from those"
        )
    peft_cfg = PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


class ParamView(nn.Module):
    """Some parameters of a model under their own names. It holds references, never copies: a
    strategy that reads or writes `view.parameters()` reads or writes the model's own tensors."""

    def __init__(self, pairs: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self._shared = pairs

    def named_parameters(  # the model's own names, each parameter once
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self._shared

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for _, p in self._shared:
            yield p


class SharedView(ParamView):
    """The parameters of `model` that the outer step exchanges: trainable (`params_of`) and not
    matching `local`."""

    def __init__(self, model: nn.Module, local: str) -> None:
        keep = re.compile(local) if local else None
        pairs = list(zip(param_names(model), params_of(model)))
        super().__init__([(n, p) for n, p in pairs if keep is None or not keep.search(n)])
        if not self._shared:
            raise ConfigError(f"outer.local={local!r} keeps every trainable parameter local: nothing is left to share")


def share_owners(numels: list[int], shares: int) -> list[int]:
    """Which of `shares` ranks owns each parameter: largest first, each to the least loaded rank
    (ties to the lowest rank), so every rank gets about 1/shares of the elements. The same on every
    rank (it depends on the shapes only)."""
    load = [0] * shares
    owner = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        r = min(range(shares), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += numels[i]
    return owner


def share_view(model: nn.Module, shares: int, rank: int) -> ParamView:
    """The parameters of `model` (a full model or a SharedView) that `rank` of `shares` exchanges."""
    pairs = list(zip(param_names(model), params_of(model)))
    owner = share_owners([p.numel() for _, p in pairs], shares)
    mine = [pair for pair, o in zip(pairs, owner) if o == rank]
    if not mine:
        raise ConfigError(
            f"transport.island_wire='all': rank {rank} of {shares} owns no parameter (the model has only "
            f"{len(pairs)}): set transport.island_wire='lead'"
        )
    return ParamView(mine)


def shared_view(model: nn.Module, outer: OuterConfig) -> nn.Module:
    """`model` itself when every trainable parameter is exchanged, else its SharedView."""
    local = "" if isinstance(outer, DDPConfig) else outer.local
    return SharedView(model, local) if local else model
