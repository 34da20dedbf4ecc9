"""Hugging Face models behind dilo's contract: `model(x, y) -> loss`, `model(x) -> logits`.

Two ways in:

- `[model] kind = "hf"`: a transformers causal LM (AutoModelForCausalLM), from an inline
  architecture (`config = {model_type = "llama", ...}` -> `AutoConfig.for_model(**config)`) or a
  local directory (`path = DIR`; `pretrained = true` loads its weights, false only its
  architecture). `build_hf` returns an `HFCausalLM` around it.
- `[model] kind = "import"` with `call = "hf"`: the builder's module follows the transformers
  calling convention (`forward(input_ids=..., labels=...)` returning an object with `.loss`);
  `HFCallAdapter` turns it into dilo's. `call = "xy"` (the default) is dilo's own convention.

`probe_call` (through `dilo.model.check_call`, when training starts) runs one tiny batch
(1 x 8 zeros), so a forward that does not fit fails at once with a ConfigError naming
`model.call` and what came back.

Why HFCausalLM computes the loss itself: dilo's y is already x shifted by one; passing labels
would make transformers shift once more. It takes the logits and the mean cross-entropy against
y, exactly as dilo's GPT does. `HFCallAdapter` cannot see the logits of every module, so it keeps
the convention the module declares: labels = input_ids, shifted inside the model (the last target
of each row, y[:, -1], is not scored).

transformers is imported here only, and only when one of these is built: `import dilo.config`
stays free of it (and of torch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dilo.config import HFModelConfig
from dilo.errors import ConfigError

INSTALL_HINT = "pip install 'dilo[hf]'"


def _transformers() -> Any:
    """The transformers module, or a ConfigError that says how to install it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never reach for the hub
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model.kind='hf' needs the transformers package: {INSTALL_HINT}") from None
    module: Any = transformers  # partly typed: kept Any at this one boundary
    module.utils.logging.disable_progress_bar()  # no "Loading weights" bars in dilo's output
    return module


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of logits [B, T, V] against targets y [B, T] (fp32, as dilo's GPT)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


class HFCausalLM(nn.Module):
    """A transformers causal LM as dilo sees it: `model(x, y)` is the mean cross-entropy of its
    logits against y (already shifted), `model(x)` the logits [B, T, V].

    `hf` is the transformers model itself (`model.hf.save_pretrained(DIR)` exports it); parameter
    names carry the prefix "hf." (e.g. hf.model.embed_tokens.weight)."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf
        config = getattr(hf, "config", None)
        self.vocab_size = int(hf.get_input_embeddings().num_embeddings)  # type: ignore[operator]
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.context: int | None = int(positions) if positions else None

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.hf(input_ids=x, use_cache=False)
        logits: Tensor = out.logits
        return logits if y is None else cross_entropy(logits, y)


class HFCallAdapter(nn.Module):
    """A module with the transformers calling convention (`forward(input_ids=, labels=)` returning
    `.loss`), seen through dilo's: `model(x, y)` is its loss with labels = x (it shifts them
    itself), `model(x)` its `.logits`."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            return _field(self.inner(input_ids=x), "logits")
        return _field(self.inner(input_ids=x, labels=x), "loss")


def _field(out: object, name: str) -> Tensor:
    value = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
    if not isinstance(value, Tensor):
        raise TypeError(f"the forward returned {_describe(out)}, which has no tensor .{name}")
    return value


def _describe(out: object) -> str:
    if isinstance(out, Tensor):
        return f"a tensor of shape {list(out.shape)}"
    return f"a {type(out).__name__}"


def probe_call(model: nn.Module, call: str, what: str) -> None:
    """Run `model(x, y)` on one batch of 1 x 8 zeros and check that it is a scalar loss; raise a
    ConfigError naming `model.call` and what came back when it is not. `what` names the model."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(1, 8, dtype=torch.long, device=device)
    fix = (
        "set model.call = 'hf' if its forward takes input_ids= and labels= and returns an object with .loss"
        if call == "xy"
        else "set model.call = 'xy' if its forward(x, y) returns the scalar loss"
    )
    expected = (
        "forward(x, y) -> scalar loss" if call == "xy" else "forward(input_ids=x, labels=x) -> an object with .loss"
    )
    training = model.training
    model.eval()  # no batch-norm statistics or dropout from the probe
    try:
        with torch.no_grad():
            out = model(x, x)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is reported the same way
        raise ConfigError(
            f"{what} with model.call={call!r} ({expected}) failed on a 1 x 8 batch: {type(e).__name__}: {e}; {fix}"
        ) from None
    finally:
        model.train(training)
    if not (isinstance(out, Tensor) and out.numel() == 1 and out.dtype.is_floating_point):
        raise ConfigError(
            f"{what} with model.call={call!r} ({expected}) returned {_describe(out)}, not a scalar loss; {fix}"
        )


def build_hf(cfg: HFModelConfig) -> HFCausalLM:
    """The transformers model of `cfg` wrapped as `HFCausalLM` (seed it from the caller: the
    initialisation draws from torch's global RNG). Weights are fp32, as dilo's optimizers expect."""
    tf = _transformers()
    try:
        if cfg.config:
            config = tf.AutoConfig.for_model(**cfg.config)
        else:
            config = tf.AutoConfig.from_pretrained(cfg.path, local_files_only=True)
    except (ValueError, TypeError, OSError) as e:
        source = f"model.path={cfg.path!r}" if cfg.path else "model.config"
        raise ConfigError(f"{source}: not a transformers model configuration ({e})") from None
    try:
        if cfg.pretrained:
            hf = tf.AutoModelForCausalLM.from_pretrained(cfg.path, local_files_only=True, dtype=torch.float32)
        else:
            hf = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, OSError) as e:
        what = f"model.path={cfg.path!r}" if cfg.path else f"model.config model_type={cfg.config['model_type']!r}"
        raise ConfigError(f"{what}: transformers cannot build a causal LM from it ({e})") from None
    return HFCausalLM(hf)
