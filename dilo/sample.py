"""`dilo sample`: continue a prompt with a trained checkpoint.

    dilo sample runs/NAME/checkpoints --prompt "def " --tokens 200 --temperature 0.8 --top-k 50 --seed 0

The checkpoint is found and loaded as by `dilo export` (see dilo/export.py; a LoRA run's model
with its adapters). Text goes in and out as bytes for byte-level data (data.tokenizer = "bytes";
invalid UTF-8 is shown as U+FFFD), else through the configured tokenizer. Sampling is plain
autoregressive decoding over the whole window (no KV cache: these are small models), cropped to
the model's context.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from dilo.config import RunConfig
from dilo.errors import ConfigError
from dilo.export import load_trained
from dilo.hf import _transformers

Codec = tuple[Callable[[str], list[int]], Callable[[list[int]], str]]


def text_codec(spec: str) -> Codec:
    """(encode, decode) for `data.tokenizer`: bytes, a tokenizer.json file or a tokenizer directory."""
    if spec == "bytes":
        return lambda text: list(text.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", errors="replace")
    tf = _transformers()
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json" if path.is_dir() else path))

    def encode(text: str) -> list[int]:
        return [int(i) for i in tok.encode(text, add_special_tokens=False)]

    def decode(ids: list[int]) -> str:
        return str(tok.decode(ids))

    return encode, decode


def context_of(model: nn.Module, cfg: RunConfig) -> int:
    """The longest window the model takes: its declared context, else the run's seq_len."""
    declared = getattr(model, "context", None)
    if isinstance(declared, int):
        return declared
    gpt_context = getattr(cfg.model, "context", None)
    return gpt_context if isinstance(gpt_context, int) else cfg.data.seq_len


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: list[int],
    num_tokens: int,
    *,
    context: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> list[int]:
    """`num_tokens` new ids after `ids`; temperature 0 is greedy, top_k 0 keeps every id."""
    generator = torch.Generator().manual_seed(seed)
    out = list(ids)
    for _ in range(num_tokens):
        x = torch.tensor([out[-context:]], dtype=torch.long)
        logits: Tensor = model(x)[0, -1].float()
        if temperature <= 0:
            out.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if 0 < top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        out.append(int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)))
    return out[len(ids) :]


def sample(
    ckpt: Path,
    prompt: str,
    num_tokens: int,
    *,
    config: str | None = None,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """The prompt's continuation by the checkpoint's model (the prompt itself not included)."""
    if num_tokens < 0 or top_k < 0 or temperature < 0:
        raise ConfigError("--tokens, --top-k and --temperature must not be negative")
    cfg, model = load_trained(ckpt, config)
    encode, decode = text_codec(cfg.data.tokenizer)
    ids = encode(prompt)
    if not ids:
        raise ConfigError("--prompt is empty (or encodes to no token): give at least one character")
    new = generate(
        model, ids, num_tokens, context=context_of(model, cfg), temperature=temperature, top_k=top_k, seed=seed
    )
    # decoded with the prompt, so that a tokenizer's spacing at the seam comes out right
    full, head = decode(ids + new), decode(ids)
    return full[len(head) :] if full.startswith(head) else decode(new)
