"""`dilo export`: a trained checkpoint as a Hugging Face model directory.

    dilo export runs/NAME/checkpoints/worker0/round_000008.safetensors --out hf_model/
    dilo export runs/NAME/checkpoints --out hf_model/        # the newest round of worker0
    dilo export CKPT --out hf_model/ --config configs/run.toml
    dilo export CKPT --out adapter/ --adapter-only     # a LoRA run's peft adapter alone

The model is rebuilt from the run's configuration (the "start" record of the worker's log,
`<run_dir>/logs/<worker>.jsonl`, or --config) and the checkpoint's parameters are loaded into it.
Then:

- model.kind = "hf" (and imported modules that are transformers models): `save_pretrained(DIR)`;
- the built-in GPT: a transformers GPT2LMHeadModel with the weights mapped one to one (dilo's GPT
  is GPT-2-shaped: fused qkv, 4x MLP, learned positions, pre-LayerNorm with eps 1e-5; its exact
  GELU is GPT-2's activation_function = "gelu"; nn.Linear weights are transposed into GPT-2's
  Conv1D layout), so the logits match;
- a LoRA run (lora.r > 0): the model is rebuilt with its adapters, as training builds it
  (dilo.adapters.build_run_model; the checkpoint holds the adapters, the base comes from the seed
  or model.path), and the adapters are merged into the base weights by peft's merge_and_unload
  before the above, so the directory holds a plain model (no peft needed) with the LoRA model's
  logits; with --adapter-only the peft adapter alone is written instead (adapter_config.json and
  adapter_model.safetensors, for PeftModel.from_pretrained over the base). With outer.local the
  exported adapters are the exporting worker's own;
- a configured tokenizer (data.tokenizer other than "bytes") is saved next to the weights.

`AutoModelForCausalLM.from_pretrained(DIR)` then loads it (and `AutoTokenizer.from_pretrained(DIR)`
the tokenizer). `load_trained` is shared with `dilo sample`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dilo.adapters import build_run_model
from dilo.config import LoraConfig, RunConfig, from_dict, load
from dilo.errors import ConfigError
from dilo.hf import HFCallAdapter, HFCausalLM, _transformers
from dilo.model import GPT, params_of
from dilo.state import ROUND_FILE, load_worker_state, locate, rounds_of

if TYPE_CHECKING:
    from peft import PeftModel


def find_checkpoint(path: Path) -> tuple[Path, int, str]:
    """(ckpt_dir, round, worker) of a checkpoint file, a worker's directory (its newest round), a
    checkpoints directory or a run directory (worker0's newest round)."""
    if path.is_file():
        try:
            return locate(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not path.is_dir():
        raise ConfigError(f"{path}: no such checkpoint file or directory")
    if any(ROUND_FILE.match(f.name) for f in path.iterdir()):
        ckpt_dir, who = path.parent, path.name  # a worker's own directory
    else:
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        workers = sorted(d.name for d in ckpt_dir.iterdir() if d.is_dir() and rounds_of(ckpt_dir, d.name))
        if not workers:
            raise ConfigError(
                f"{path}: no complete checkpoint in it (expected <worker>/round_NNNNNN.json + .safetensors)"
            )
        who = "worker0" if "worker0" in workers else workers[0]
    rounds = rounds_of(ckpt_dir, who)
    if not rounds:
        raise ConfigError(f"{ckpt_dir / who}: no complete checkpoint (round_NNNNNN.json + .safetensors)")
    return ckpt_dir, rounds[-1], who


def run_config(ckpt_dir: Path, who: str) -> RunConfig:
    """The configuration a worker ran with: the last start or resume record of its log."""
    log_path = ckpt_dir.parent / "logs" / f"{who}.jsonl"
    found: dict[str, Any] | None = None
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if record.get("event") in ("start", "resume") and isinstance(record.get("config"), dict):
                found = record["config"]
    if found is None:
        raise ConfigError(
            f"{log_path}: no start record with the run's config; pass the run's config as --config CONFIG"
        )
    return from_dict(found)


def load_trained(ckpt: Path, config: str | None = None) -> tuple[RunConfig, nn.Module]:
    """The run's configuration and its model (dilo's contract, eval mode) with the checkpoint's
    parameters and buffers loaded."""
    ckpt_dir, round_idx, who = find_checkpoint(ckpt)
    cfg = load(config) if config else run_config(ckpt_dir, who)
    model = build_run_model(cfg)  # as training built it: with the LoRA adapters when lora.r > 0
    state = load_worker_state(ckpt_dir, round_idx, who)
    params = params_of(model)
    if len(params) != len(state["params"]):
        raise ConfigError(
            f"{ckpt_dir / who} round {round_idx} holds {len(state['params'])} parameters, the configured model "
            f"{len(params)}: pass the run's own config as --config"
        )
    with torch.no_grad():
        for p, v in zip(params, state["params"]):
            if p.shape != v.shape:
                raise ConfigError(f"checkpoint tensor of shape {list(v.shape)} for a parameter of {list(p.shape)}")
            p.copy_(v)
        buffers = dict(model.named_buffers())
        for k, v in state.get("buffers", {}).items():
            if k in buffers:
                buffers[k].copy_(v)
    return cfg, model.eval()


def to_gpt2(model: GPT) -> nn.Module:
    """dilo's GPT as a transformers GPT2LMHeadModel with the same weights (and logits)."""
    tf = _transformers()
    c = model.cfg
    config = tf.GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.context,
        n_embd=c.d_model,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.d_model,
        activation_function="gelu",  # exact (erf) GELU, as F.gelu; GPT-2's default is the tanh approximation
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,  # dilo's GPT: dropout_p of scaled_dot_product_attention
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=c.tie_weights,
        bos_token_id=None,
        eos_token_id=None,
    )
    gpt2 = tf.GPT2LMHeadModel(config)
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs: dict[str, torch.Tensor] = {
        "transformer.wte.weight": ours["tok_emb.weight"],
        "transformer.wpe.weight": ours["pos_emb.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours["ln_f.bias"],
    }
    if not c.tie_weights:
        theirs["lm_head.weight"] = ours["lm_head.weight"]
    linear = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(c.n_layer):
        a, b = f"blocks.{i}", f"transformer.h.{i}"
        for ln_ours, ln_theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            theirs[f"{b}.{ln_theirs}.weight"] = ours[f"{a}.{ln_ours}.weight"]
            theirs[f"{b}.{ln_theirs}.bias"] = ours[f"{a}.{ln_ours}.bias"]
        for lin_ours, lin_theirs in linear.items():
            # GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in]
            theirs[f"{b}.{lin_theirs}.weight"] = ours[f"{a}.{lin_ours}.weight"].t()
            theirs[f"{b}.{lin_theirs}.bias"] = ours[f"{a}.{lin_ours}.bias"]
    target = dict(gpt2.named_parameters())
    missing = sorted(set(target) - set(theirs))
    assert not missing, f"GPT-2 parameters without a dilo counterpart: {missing}"
    with torch.no_grad():
        for name, value in theirs.items():
            target[name].copy_(value)
    module: nn.Module = gpt2
    return module


def hf_module(model: nn.Module) -> nn.Module:
    """The transformers model to save for `model`, or a ConfigError saying why there is none."""
    if isinstance(model, HFCausalLM):
        return model.hf
    if isinstance(model, GPT):
        return to_gpt2(model)
    inner = model.inner if isinstance(model, HFCallAdapter) else model
    if callable(getattr(inner, "save_pretrained", None)):
        return inner
    raise ConfigError(
        f"dilo export writes Hugging Face models; this run's model (model.kind='import', {type(inner).__name__}) "
        "has no save_pretrained: use model.kind = 'hf', or `dilo merge CKPT --out FILE --config CONFIG` for its "
        "tensors as one safetensors file"
    )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside dilo's wrappers (the transformers model of kind = "hf"), else `model`."""
    if isinstance(model, HFCausalLM):
        return model.hf
    return model.inner if isinstance(model, HFCallAdapter) else model


def _rewrap(model: nn.Module, inner: nn.Module) -> nn.Module:
    """`model`'s wrapper around a new inner module (the merged one)."""
    if isinstance(model, HFCausalLM):
        return HFCausalLM(inner)
    return HFCallAdapter(inner) if isinstance(model, HFCallAdapter) else inner


def to_peft(model: nn.Module, lora: LoraConfig) -> PeftModel:
    """A trained LoRA run's model (adapters injected by dilo.adapters.apply_lora) as a peft PeftModel
    over the same base weights, holding the same adapter values, so that peft's `merge_and_unload`
    and `save_pretrained` apply. `model` is taken apart in the process: use the result instead.

    Training injects the adapters without a PeftModel (so that parameter names stay the model's
    own); here the injected layers are unloaded (no merge), the base is wrapped by get_peft_model
    with the run's LoRA settings, and the trained adapter tensors are copied in by name."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = _unwrapped(model)
    trained = {name: p.detach().clone() for name, p in inner.named_parameters() if "lora_" in name}
    injected = [name for name, m in inner.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in injected:
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name)
        layer = parent.get_submodule(child)
        assert isinstance(layer, BaseTunerLayer)
        base = layer.get_base_layer()
        setattr(parent, child, base)
    if hasattr(inner, "peft_config"):
        del inner.peft_config  # left by inject_adapter_in_model; get_peft_model sets its own
    is_hf = callable(getattr(inner, "save_pretrained", None)) and not isinstance(inner, GPT)
    peft_cfg = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM" if is_hf else None,
    )
    with torch.random.fork_rng(devices=[]):  # the fresh adapters' draws are overwritten below anyway
        wrapped = peft.get_peft_model(inner, peft_cfg)
    assert isinstance(wrapped, peft.PeftModel)
    prefix = "base_model.model."
    target = {name.removeprefix(prefix): p for name, p in wrapped.named_parameters() if "lora_" in name}
    if set(target) != set(trained):
        raise ConfigError(
            f"the run's {len(trained)} LoRA tensors do not match peft's {len(target)} for lora = {lora}: "
            "pass the run's own config as --config"
        )
    with torch.no_grad():
        for name, value in trained.items():
            target[name].copy_(value)
    return wrapped


def merge_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    """The run's model with its LoRA adapters merged into the base weights (W + alpha/r * B A, by
    peft's merge_and_unload): a plain model with the same logits and no peft layers."""
    merged: nn.Module = to_peft(model, lora).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)  # the base was frozen for training; a plain model trains everything
    return _rewrap(model, merged).eval()


def save_tokenizer(spec: str, out: Path) -> bool:
    """Save the tokenizer `data.tokenizer` names into `out` (as AutoTokenizer reads it); False for bytes."""
    if spec == "bytes":
        return False
    tf = _transformers()
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        file = path / "tokenizer.json" if path.is_dir() else path
        tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(file))
    tok.save_pretrained(str(out))
    return True


def export(ckpt: Path, out: Path, config: str | None = None, *, adapter_only: bool = False) -> list[str]:
    """Write the checkpoint's model (and tokenizer) to `out`; returns what was written, for the log.

    A LoRA run (lora.r > 0) is written with its adapters merged into the base weights, a plain
    model; `adapter_only` writes the peft adapter alone instead (adapter_config.json and the
    adapter's weights, for PeftModel.from_pretrained over the base model)."""
    cfg, model = load_trained(ckpt, config)
    lora = cfg.lora.r > 0
    if adapter_only:
        if not lora:
            raise ConfigError("--adapter-only: this run trained no LoRA adapters (lora.r = 0); export it without")
        if isinstance(_unwrapped(model), GPT):
            raise ConfigError(
                "--adapter-only: the built-in GPT is exported as a GPT-2 model that no adapter of its layers fits; "
                "export it without --adapter-only (the adapters are merged), or train model.kind = 'hf'"
            )
        module: nn.Module = to_peft(model, cfg.lora)
        written = [f"LoRA adapter (r={cfg.lora.r}, {', '.join(cfg.lora.target_modules)}) and its config"]
    else:
        if lora:
            model = merge_lora(model, cfg.lora)
        module = hf_module(model)
        written = [f"{type(module).__name__} weights and config" + (" (LoRA merged)" if lora else "")]
    out.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(out))  # type: ignore[operator]  # a transformers PreTrainedModel or a PeftModel
    if save_tokenizer(cfg.data.tokenizer, out):
        written.append("tokenizer")
    return written
