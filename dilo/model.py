"""The built-in small GPT, and building any model named by the config.

`GPT` is a decoder-only transformer in the GPT-2 mould (pre-LayerNorm blocks, causal
self-attention through `scaled_dot_product_attention`, a 4x GELU MLP, learned positions, a
final LayerNorm and an output head tied to the token embedding). It is sized for CPU runs and
tests; anything larger comes in as a Hugging Face model (`HFModelConfig`, kind = "hf") or
through an import builder (`ImportModelConfig`); see dilo/hf.py for both.

    model = build_model(cfg.model, seed=cfg.seed)   # same seed -> bit-identical weights
    loss = model(x, y)                              # x, y: int64 [B, T]; scalar mean cross-entropy
    logits = model(x)                               # [B, T, vocab]
    print(num_params(model))

The contract for every model, built-in or imported: `model(x, y)` returns the scalar loss.
`build_model` makes it hold: a Hugging Face model comes wrapped (`HFCausalLM`), an import
builder declares its calling convention (`call = "xy"` or `"hf"`), which `check_call` probes on
one tiny batch before training.

Seeding. Workers may be threads of one process, and threads share torch's global RNG, so the
built-in GPT never touches it: it is created on the meta device and initialised from a private
`torch.Generator`. An imported builder or a Hugging Face model can only be seeded through the
global RNG; that is done under a process-wide lock inside `torch.random.fork_rng`, so the
caller's RNG state comes back unchanged, but a thread drawing random numbers concurrently
(dropout, say) can still perturb it.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dilo.config import DataConfig, GPTConfig, HFModelConfig, ImportModelConfig
from dilo.errors import ConfigError

# Serialises builders that must seed the global RNG (see the module docstring).
_GLOBAL_RNG_LOCK = threading.Lock()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=2)
        # [B, T, D] -> [B, H, T, D/H], the layout scaled_dot_product_attention expects
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        out: Tensor = self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return out


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.drop(self.proj(F.gelu(self.fc(x))))
        return out


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


class GPT(nn.Module):
    """Decoder-only transformer over `cfg.vocab_size` tokens and at most `cfg.context` positions.

    `generator` seeds the initialisation without touching the global RNG; None draws from the
    global RNG like any torch module.
    """

    def __init__(self, cfg: GPTConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # Built on the meta device so that the default per-layer initialisers (which draw from
        # the global RNG) never run; reset_parameters then draws from `generator` alone.
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.d_model)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.to_empty(device="cpu")
        if cfg.tie_weights:
            # tied after to_empty: materialising would otherwise split the shared tensor in two
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, residual projections scaled by
        1/sqrt(2 * n_layer) because each block adds two of them to the residual stream."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.cfg.tie_weights:
                    continue  # it is tok_emb.weight, initialised below as an embedding
                std = resid_std if name.endswith(".proj") else 0.02
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, 0.02, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """x, y: int64 [B, T]. Returns the mean cross-entropy when y is given, else logits [B, T, V]."""
        seq_len = x.shape[1]
        if seq_len > self.cfg.context:
            raise ValueError(f"sequence length {seq_len} exceeds model.context={self.cfg.context}")
        pos = torch.arange(seq_len, device=x.device)
        h = self.drop(self.tok_emb(x) + self.pos_emb(pos))
        for block in self.blocks:
            h = block(h)
        logits: Tensor = self.lm_head(self.ln_f(h))
        if y is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def build_model(cfg: GPTConfig | ImportModelConfig | HFModelConfig, seed: int) -> nn.Module:
    """Build the configured model on CPU; the same cfg and seed give bit-identical weights.

    A transformers model (kind = "hf") or an imported module with call = "hf" comes wrapped so
    that dilo's contract holds (`model(x, y)` -> scalar loss; see dilo/hf.py). `check_call`
    checks an imported module's forward before dilo's loop calls it (a coordinator, or the
    caller's own loop, may hold a module whose forward has another signature)."""
    if isinstance(cfg, GPTConfig):
        return GPT(cfg, generator=torch.Generator().manual_seed(seed))
    if isinstance(cfg, HFModelConfig):
        from dilo.hf import build_hf  # transformers only for kind = "hf"

        return _seeded(lambda: build_hf(cfg), seed)
    builder = _import_builder(cfg.builder)
    model = _seeded(lambda: builder(**cfg.kwargs), seed)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.builder={cfg.builder!r} returned {type(model).__name__}, not a torch.nn.Module; "
            "the builder must return a module whose forward(x, y) gives the scalar loss"
        )
    if cfg.call == "hf":
        from dilo.hf import HFCallAdapter

        model = HFCallAdapter(model)
    return model


T = TypeVar("T")


def _seeded(make: Callable[[], T], seed: int) -> T:
    """make() with torch's global RNG seeded, under a process-wide lock, the caller's RNG kept."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return make()


def _import_builder(path: str) -> Callable[..., object]:
    module_name, _, attr_path = path.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"model.builder={path!r}: cannot import module {module_name!r} ({e}); "
            "check the spelling and that the package is installed or on PYTHONPATH"
        ) from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(
                f"model.builder={path!r}: {getattr(obj, '__name__', module_name)!r} has no attribute {attr!r}; "
                "write 'package.module:function'"
            )
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"model.builder={path!r} names a {type(obj).__name__}, not a callable that builds a model")
    return obj


def num_params(model: nn.Module) -> int:
    """Number of distinct parameters; a tied weight counts once."""
    return sum(p.numel() for p in model.parameters())


def params_of(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters, each once (tied weights appear once), in a fixed order."""
    seen: set[int] = set()
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def param_names(model: nn.Module) -> list[str]:
    """Names of the tensors `params_of` returns, in the same order (a tied weight under its first name)."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(name)
    return out


def model_vocab_size(model: nn.Module) -> int | None:
    """The number of token ids `model` accepts: its `vocab_size` (a Hugging Face model, see
    dilo/hf.py), else the size of its first nn.Embedding (the token embedding of most imported
    language models), or None if it has none."""
    declared = getattr(model, "vocab_size", None)
    if isinstance(declared, int):
        return declared
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return int(m.num_embeddings)
    return None


def check_call(model: nn.Module, cfg: GPTConfig | ImportModelConfig | HFModelConfig, seed: int) -> None:
    """Raise a ConfigError that says what to fix when an imported module's forward does not follow
    its declared `model.call` (one batch of 1 x 8 zeros, on the model's device). dilo's training
    loop calls this before the model's first forward; a coordinator never does."""
    if isinstance(cfg, ImportModelConfig):
        from dilo.hf import probe_call

        call, what = cfg.call, f"model.builder={cfg.builder!r}"
        # under the lock and a forked RNG: a forward drawing random numbers must not move the caller's RNG
        _seeded(lambda: probe_call(model, call, what), seed)


def check_data_fits(model: nn.Module, data: DataConfig) -> None:
    """Raise ConfigError, naming both numbers, when the data's vocabulary or sequence length does
    not fit the model: byte-level data (data.tokenizer = "bytes") needs 256 ids. The vocabulary
    of a tokenizer or a token corpus is checked against the model when the data loads."""
    vocab = model_vocab_size(model)
    byte_level = data.tokenizer == "bytes" and data.corpus in ("stdlib", "text", "hf")  # not token ids
    if byte_level and vocab is not None and vocab < 256:
        raise ConfigError(
            f"the model's vocab_size is {vocab} but the byte-level data (data.tokenizer = 'bytes') has 256 ids; "
            "set the model's vocab_size to at least 256 (model.vocab_size, or vocab_size in model.config)"
        )
    context = getattr(model, "context", None)
    if isinstance(context, int) and data.seq_len > context:
        raise ConfigError(
            f"data.seq_len={data.seq_len} exceeds the model's {context} positions (max_position_embeddings); "
            "lower data.seq_len or raise max_position_embeddings in model.config"
        )
