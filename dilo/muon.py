"""Muon for the inner steps (inner.optimizer = "muon"; MuLoCo, Thérien et al. 2025): torch's Muon
on the hidden weight matrices, AdamW on everything else, as one torch optimizer.

    opt = build_muon(model, cfg.inner)     # MuonWithAdamW
    opt.step()                             # Muon's groups, then AdamW's

Muon orthogonalises each matrix's momentum by a few Newton-Schulz iterations (torch.optim.Muon,
torch >= 2.9) and takes inner.lr through "match_rms_adamw" (an update of AdamW's RMS), so one
learning rate and schedule serve both. Embeddings, the output head (inner.muon_exclude), biases
and norm gains are not matrices Muon is meant for: they get AdamW, as in the Muon and MuLoCo
papers. Both optimizers share this object's param_groups and state, so checkpoints, the learning
rate schedule and the outer loop's step hook see one optimizer.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from dilo.config import InnerConfig
from dilo.errors import ConfigError


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over `matrices` and torch.optim.AdamW over `adamw_groups`, one optimizer."""

    def __init__(self, matrices: list[nn.Parameter], adamw_groups: list[dict[str, Any]], cfg: InnerConfig) -> None:
        if not hasattr(torch.optim, "Muon"):  # torch < 2.9 (the config check says so first)
            raise ConfigError(
                f"inner.optimizer='muon' needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}"
            )
        self._muon = torch.optim.Muon(
            matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )  # fmt: skip
        self._adamw = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=cfg.betas, foreach=True)
        self._n_muon = len(self._muon.param_groups)
        super().__init__([*self._muon.param_groups, *self._adamw.param_groups], {})
        self._link()

    def _link(self) -> None:
        """The two optimizers work on this object's groups and state (after a load too)."""
        self._muon.param_groups = self.param_groups[: self._n_muon]
        self._adamw.param_groups = self.param_groups[self._n_muon :]
        self._muon.state = self.state
        self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self._muon.step()  # type: ignore[no-untyped-call]
        self._adamw.step()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()


def build_muon(model: nn.Module, cfg: InnerConfig) -> MuonWithAdamW:
    """Muon on the trainable 2-D weights but embeddings and inner.muon_exclude; AdamW (decaying
    matrices, not biases and norm gains) on the rest."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    exclude = re.compile(cfg.muon_exclude) if cfg.muon_exclude else None
    matrices: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_hidden = p.dim() == 2 and id(p) not in embeddings and not (exclude and exclude.search(name))
        (matrices if is_hidden else rest).append(p)
    if not matrices:
        raise ConfigError(
            "inner.optimizer='muon' found no weight matrix for Muon (all embeddings, excluded by "
            f"inner.muon_exclude={cfg.muon_exclude!r}, or not 2-D): use adamw"
        )
    from dilo.inner import decay_groups

    return MuonWithAdamW(matrices, decay_groups(rest, cfg.weight_decay), cfg)
