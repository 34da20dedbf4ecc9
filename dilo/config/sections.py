"""The plain sections of a run: model, data, inner loop, codec, heterogeneity, simulation,
logging and checkpoints (the outer strategies are in `outer.py`, the network in `network.py`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from dilo.config.base import Frozen

# ---------------------------------------------------------------------------------------------
# model


class GPTConfig(Frozen):
    kind: Literal["gpt"] = "gpt"
    """The built-in small GPT (dilo/model.py)."""
    vocab_size: int = Field(256, gt=1)
    """Vocabulary size; 256 for the byte-level corpora."""
    n_layer: int = Field(4, gt=0)
    """Number of transformer blocks."""
    n_head: int = Field(4, gt=0)
    """Attention heads per block; must divide d_model."""
    d_model: int = Field(128, gt=0)
    """Width of the residual stream."""
    context: int = Field(128, gt=0)
    """Longest sequence the position embedding covers; data.seq_len must not exceed it."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability inside the blocks (0 keeps runs deterministic and fast)."""
    tie_weights: bool = True
    """Share the token embedding with the output projection."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"n_head={self.n_head} must divide d_model={self.d_model}")
        return self


class ImportModelConfig(Frozen):
    kind: Literal["import"] = "import"
    """Any nn.Module, built by a function named by import path."""
    builder: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    """"package.module:function"; called as function(**kwargs) and must return an nn.Module
    whose forward follows `call`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the builder."""
    call: Literal["xy", "hf"] = "xy"
    """How dilo calls the module: xy: forward(x, y) returns the scalar loss (y is x shifted by one);
    hf: forward(input_ids=x, labels=x) returns an object with `.loss` (and `.logits`), the
    transformers convention (the model shifts the labels itself). Checked on one tiny batch at start."""


class HFModelConfig(Frozen):
    kind: Literal["hf"] = "hf"
    """A Hugging Face transformers causal LM (AutoModelForCausalLM); needs pip install 'dilo[hf]'."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Inline architecture for AutoConfig.for_model(**config), e.g. {model_type = "llama",
    hidden_size = 64, num_hidden_layers = 2, num_attention_heads = 4, vocab_size = 256}."""
    path: str = ""
    """A local model directory (config.json, and weights for `pretrained`); never downloaded."""
    pretrained: bool = False
    """With `path`: load its weights (from_pretrained); false: only its architecture, freshly
    initialised from the run's seed."""

    @model_validator(mode="after")
    def _one_source(self) -> HFModelConfig:
        if bool(self.config) == bool(self.path):
            raise ValueError(
                "model.kind='hf' needs exactly one of model.config (an inline architecture with model_type) "
                "and model.path (a local model directory)"
            )
        if self.config and not isinstance(self.config.get("model_type"), str):
            raise ValueError('model.config needs model_type, e.g. model_type = "llama" (or "gpt2", "qwen2", ...)')
        if self.pretrained and not self.path:
            raise ValueError("model.pretrained = true loads weights from model.path: set model.path")
        return self


ModelConfig = Annotated[GPTConfig | ImportModelConfig | HFModelConfig, Field(discriminator="kind")]


class LoraConfig(Frozen):
    """LoRA adapters (peft) on the model: the base weights are frozen, only the adapters train
    and only they are exchanged, so a round's bytes scale with the adapters, not the model."""

    r: int = Field(0, ge=0)
    """Adapter rank; 0 turns LoRA off."""
    alpha: int = Field(16, gt=0)
    """Scaling: the adapter's update is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names (suffixes) of the nn.Linear modules that get adapters: e.g. q_proj / v_proj in Llama
    and Qwen shapes, c_attn in GPT-2, qkv / proj in dilo's GPT."""


# ---------------------------------------------------------------------------------------------
# data


class DataConfig(Frozen):
    corpus: Literal["stdlib", "text", "tokens", "hf", "import"] = "stdlib"
    """stdlib: the .py sources of the running Python's standard library (no download);
    text: UTF-8 files, directories or globs in `paths`, read as bytes;
    tokens: .bin token files in `paths` (uint16, or as the directory's meta.json says), read by memmap;
    hf: local json/jsonl/parquet/text/arrow files in `paths`, read with the datasets library;
    import: a torch Dataset of token-id sequences returned by `builder`."""
    paths: list[str] = Field(default_factory=list)
    """Files, directories or glob patterns for the text, tokens and hf corpora."""
    tokenizer: str = "bytes"
    """bytes (ids 0..255), a tokenizer.json file or a Hugging Face tokenizer directory (local
    files only); its vocabulary must fit model.vocab_size."""
    format: Literal["auto", "json", "parquet", "text", "arrow", "csv"] = "auto"
    """hf: the datasets loader; auto picks it from each file's extension (.jsonl/.json, .parquet,
    .arrow, .csv, anything else text)."""
    text_field: str = "text"
    """hf: the column that holds each document's text."""
    island_column: str | None = None
    """hf with islands = "by_column": the column whose distinct values (e.g. a language) each go
    whole to one island."""
    builder: str | None = None
    """import: "pkg.module:function" returning a torch Dataset or IterableDataset of token-id
    sequences (1-D int tensors or lists)."""
    eos_id: int | None = Field(None, ge=0)
    """Id appended after every document of the hf and import corpora (and of a tokenizer's
    documents); default: the tokenizer's EOS token, 0 for bytes, none for import."""
    islands: Literal["iid", "by_source", "by_column"] = "iid"
    """iid: every worker sees the same distribution; by_source: whole files (stdlib: whole
    top-level packages) per worker, the non-IID case; by_column (hf): whole values of
    `island_column` per worker."""
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    """Share held out for validation: whole files, chosen by a stable hash of their path
    (tokens: the tail of each file)."""
    batch_size: int = Field(16, gt=0)
    """Sequences per micro-batch on each worker."""
    seq_len: int = Field(128, gt=0)
    """Tokens per sequence."""

    @model_validator(mode="after")
    def _corpus_keys(self) -> DataConfig:
        if self.islands == "by_column" and (self.corpus != "hf" or not self.island_column):
            raise ValueError('data.islands="by_column" needs data.corpus="hf" and data.island_column (e.g. "lang")')
        if self.island_column and self.islands != "by_column":
            raise ValueError('data.island_column is only read with data.islands="by_column"; set both or neither')
        if (self.corpus == "import") != (self.builder is not None):
            raise ValueError('data.corpus="import" and data.builder ("pkg.module:function") go together')
        return self


# ---------------------------------------------------------------------------------------------
# inner loop


class InnerConfig(Frozen):
    optimizer: Literal["adamw", "sgd", "muon", "lion"] = "adamw"
    """Inner optimizer: AdamW (DiLoCo's); SGD (exactness tests against DDP); muon (MuLoCo:
    torch.optim.Muon on the hidden weight matrices, AdamW on embeddings, the output head, biases
    and norms, one lr; torch >= 2.9, whole-model islands); lion (Chen et al.: the sign of an
    interpolated momentum, betas as its (beta1, beta2); a 3-10x lower lr and higher weight_decay
    than AdamW's)."""
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0)
    """muon: Muon's (Nesterov) momentum."""
    muon_exclude: str = "lm_head|head"
    """muon: regular expression (re.search on parameter names) of 2-D weights left to AdamW besides
    the embeddings, e.g. the output head."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak inner learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW decoupled weight decay (ignored by SGD)."""
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """SGD momentum (ignored by AdamW)."""
    warmup_steps: int = Field(100, ge=0)
    """Linear warmup from 0 to lr, then cosine decay over the rest of the run."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine decays to lr * min_lr_ratio at the last step."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """bf16 runs forward and backward under bf16 autocast (on the CPU and on CUDA); parameters,
    optimizer state, anchors and pseudo-gradients stay fp32. auto: bf16 where the device has bf16
    arithmetic in hardware (CUDA GPUs from Ampere on; CPUs with AVX512-BF16 / AMX, arm64 BF16),
    fp32 elsewhere: emulated bf16 on other CPUs is many times slower than fp32."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them: less memory for a longer step (Hugging Face models: gradient_checkpointing_enable)."""
    compile: bool = False
    """Run the forward and backward through torch.compile (worth it on a GPU; the first steps
    compile)."""

    @model_validator(mode="after")
    def _betas_in_range(self) -> InnerConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas} must both lie in [0, 1)")
        try:
            re.compile(self.muon_exclude)
        except re.error as e:
            raise ValueError(f"muon_exclude {self.muon_exclude!r} is not a valid regular expression: {e}") from None
        if self.optimizer == "muon":
            import torch

            if not hasattr(torch.optim, "Muon"):
                raise ValueError(
                    f"optimizer='muon' needs torch.optim.Muon (torch >= 2.9), not torch {torch.__version__}"
                )
        return self


# ---------------------------------------------------------------------------------------------
# codec


CodecKind = Literal[
    "none", "fp16", "bf16", "int8", "int4", "int2", "ternary", "topk", "dct", "randomk", "sign", "powersgd"
]


class CodecSpec(Frozen):
    kind: CodecKind = "none"
    """How pseudo-gradients are encoded on the wire: none (fp32), fp16, bf16, int8 / int4
    (blockwise absmax), int2 (4 levels per block, 2 bits), ternary (TernGrad: stochastic
    {-1, 0, +1} x a scale per block, 1.6 bits), topk, dct (top-k of each chunk's DCT
    coefficients, DeMo / SparseLoCo), randomk (shared mask per round), sign (1 bit + a scale per
    block), powersgd (rank-r factors)."""
    block: int = Field(128, gt=0)
    """int8 / int4 / int2 / ternary / sign: values per scale."""
    stochastic: bool = False
    """int8 / int4 / int2: stochastic rounding (unbiased) with a per-worker random stream (ternary
    is always stochastic)."""
    clip: float = Field(2.5, ge=0.0)
    """ternary: clip each block to +-clip x its RMS before scaling (TernGrad's c = 2.5; what is cut
    goes to error feedback); 0: no clipping."""
    fraction: float = Field(0.01, gt=0.0, le=1.0)
    """topk / randomk: share of the values sent; dct: share of each chunk's coefficients."""
    chunk: int = Field(0, ge=0, le=65536)
    """topk: 0 picks the top values of the whole vector (int32 indices); > 0 picks them per chunk of
    this many values (16-bit indices within the chunk). dct: the transform's length (0: 64; 2 to
    4096; 8-bit indices up to 256)."""
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """topk / dct (sparsifiers, with error feedback): Deep Gradient Compression's momentum
    correction: a velocity u <- momentum u + delta per worker accumulates into the residual, and is
    cleared where values were sent. It is momentum on the worker's side of the compressor: with it,
    outer.momentum = 0 avoids applying momentum twice. 0: off."""
    warmup_rounds: int = Field(0, ge=0)
    """topk: DGC's sparsity warm-up: the density starts at 25% and falls 4x per round until it
    reaches fraction, for at most this many rounds (then fraction). 0: fraction from the start."""
    values: Literal["bf16", "int2"] = "bf16"
    """dct: how the kept coefficients are sent: bf16, or int2 (4 levels and a bf16 scale per chunk,
    SparseLoCo's 2-bit values)."""
    rank: int = Field(4, gt=0)
    """powersgd: rank r of the factors."""
    warm_start: bool = True
    """powersgd: start each round's power iteration from the previous round's Q (orthonormalised;
    the paper's warm start) instead of a fresh random one, so the factors track the pseudo-gradients'
    dominant subspace over rounds. Static worlds, kept in checkpoints."""
    min_compression: float = Field(2.0, ge=1.0)
    """powersgd: a matrix is factorised only if (n + m) * r * min_compression < n * m; smaller
    tensors go uncompressed."""
    error_feedback: bool | None = None
    """Keep what was not sent and add it to the next round's pseudo-gradient. Default: on for
    int2, topk, dct, randomk, sign and powersgd, off otherwise (ternary: its error is as large as
    its signal, so a residual would grow instead of being paid back)."""

    @model_validator(mode="after")
    def _codec_options(self) -> Self:
        if self.momentum > 0 and (self.kind not in ("topk", "dct") or not self.feedback):
            raise ValueError(
                f"codec.momentum is DGC's momentum correction of a sparsifier's error feedback: it needs "
                f"codec.kind = 'topk' or 'dct' with error feedback on (kind is {self.kind!r})"
            )
        if self.warmup_rounds and self.kind != "topk":
            raise ValueError(f"codec.warmup_rounds is top-k's sparsity warm-up; codec.kind is {self.kind!r}")
        if self.kind == "dct" and self.chunk not in range(2, 4097) and self.chunk != 0:
            raise ValueError(f"codec.chunk={self.chunk}: the DCT's chunk length must be 2 to 4096 (0: 64)")
        return self

    @property
    def feedback(self) -> bool:
        if self.error_feedback is not None:
            return self.error_feedback
        return self.kind in ("int2", "topk", "dct", "randomk", "sign", "powersgd")


class CodecOverride(CodecSpec):
    pattern: str
    """Regular expression matched (re.search) against parameter names, e.g. "emb|ln|norm"; the
    first matching override decides a parameter's codec."""

    @model_validator(mode="after")
    def _valid_regex(self) -> CodecOverride:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        if self.kind == "powersgd":
            raise ValueError("powersgd cannot be a per-parameter override; set it as codec.kind")
        return self


def _default_candidates() -> list[CodecSpec]:
    return [CodecSpec(kind="int8"), CodecSpec(kind="int4"), CodecSpec(kind="int2")]


class CodecConfig(CodecSpec):
    overrides: list[CodecOverride] = Field(default_factory=list)
    """Per-parameter codecs, e.g. [[codec.overrides]] pattern = "emb|ln" kind = "fp16"."""
    adapt_every: int = Field(0, ge=0)
    """Adaptive per-parameter compression (L-GreCo): every this many rounds, measure each of
    codec.adapt_candidates on each parameter's pseudo-gradient (errors summed over the workers) and
    give every parameter the codec that makes the total bytes least while the total squared error
    stays within codec.adapt_error of the pseudo-gradient's; the plan is in each round's log
    (codec_plan) and the checkpoints. A new plan restarts the error feedback. Static DiLoCo /
    FedAvg. 0: off (codec.kind and codec.overrides decide)."""
    adapt_error: float = Field(0.05, gt=0.0)
    """Adaptive compression: the error budget, as a share of the pseudo-gradient's squared norm."""
    adapt_candidates: list[CodecSpec] = Field(default_factory=_default_candidates)
    """Adaptive compression: the codecs to choose from, e.g. [[codec.adapt_candidates]] kind =
    "int4" (each with its own settings; not powersgd)."""

    @model_validator(mode="after")
    def _check_adaptive(self) -> Self:
        if self.adapt_every:
            if self.overrides:
                raise ValueError("codec.adapt_every chooses every parameter's codec: drop codec.overrides")
            if not self.adapt_candidates or any(c.kind == "powersgd" for c in self.adapt_candidates):
                raise ValueError("codec.adapt_candidates must list codecs other than powersgd")
        return self


# ---------------------------------------------------------------------------------------------
# heterogeneity, simulation, logging, checkpoints


class AggregateConfig(Frozen):
    kind: Literal["mean", "median", "trimmed_mean", "centered_clip", "krum", "multikrum"] = "mean"
    """How a round combines its pseudo-gradients (DiLoCo, FedAvg; static or coordinator). mean:
    the weighted mean. The robust rules count every contributor once, whatever its weight:
    median (coordinate-wise), trimmed_mean (drop `trim` from each end per coordinate),
    centered_clip (`iterations` of clipping to radius `tau` around the estimate, from the median),
    krum / multikrum (the vector(s) closest to their N - byzantine - 2 nearest others; multikrum
    averages the `select` best). They need every vector: a static world all-gathers the payloads
    instead of all-reducing them, a coordinator keeps the round's pushes."""
    clip_norm: float = Field(0.0, ge=0.0)
    """> 0: scale each pseudo-gradient down to at most this norm before aggregating (with any kind)."""
    trim: int = Field(1, ge=0)
    """trimmed_mean: values dropped from each end, per coordinate (fewer than half the contributors)."""
    tau: float = Field(1.0, gt=0.0)
    """centered_clip: the clipping radius around the current estimate."""
    iterations: int = Field(3, ge=1)
    """centered_clip: clipping iterations."""
    byzantine: int = Field(1, ge=0)
    """krum / multikrum: faulty contributors tolerated (needs more than 2 * byzantine + 2 contributors)."""
    select: int = Field(2, ge=1)
    """multikrum: how many of the best-scored vectors are averaged."""

    @property
    def robust(self) -> bool:
        """Every contributor's vector is needed (not only their sum)."""
        return self.kind != "mean" or self.clip_norm > 0

    def fewest(self) -> int:
        """The fewest contributors the rule is defined for."""
        if self.kind == "trimmed_mean":
            return 2 * self.trim + 1
        if self.kind in ("krum", "multikrum"):
            return 2 * self.byzantine + 3
        return 1


class HeterogeneityConfig(Frozen):
    slowdown: list[float] = Field(default_factory=list)
    """Per island (worker rank or DILO_ISLAND): make that worker this many times slower, by
    sleeping (factor - 1) times each measured inner step (`dilo sim`: scales its virtual step
    time). Islands past the end of the list run at full speed. E.g. [1, 1, 2, 4]."""
    max_steps: list[int] = Field(default_factory=list)
    """Per island: the most inner steps that worker runs before it leaves (0 or past the end of
    the list: no limit of its own)."""
    hostile: list[int] = Field(default_factory=list)
    """Islands whose worker sends a wrong (but finite) pseudo-gradient every round, to test robust
    aggregation ([aggregate]) against it: static DiLoCo / FedAvg. E.g. [7]."""
    attack: Literal["scale", "random"] = "scale"
    """hostile: what the worker sends instead of its pseudo-gradient: scale (it times attack_scale)
    or random (Gaussian noise of attack_scale times its norm)."""
    attack_scale: float = -10.0
    """hostile: the factor of the scaled attack, or the norm ratio of the random one."""

    def attack_of(self, island: int) -> Callable[[Any], None] | None:
        """What a hostile island's worker does to its flat pseudo-gradient, in place; None for the others."""
        if island not in self.hostile:
            return None
        import torch

        scale, kind = self.attack_scale, self.attack

        def attack(delta: Any) -> None:
            if kind == "scale":
                delta.mul_(scale)
            else:
                norm = float(torch.linalg.vector_norm(delta))
                noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(island), dtype=delta.dtype)
                delta.copy_(noise * (abs(scale) * norm / max(float(torch.linalg.vector_norm(noise)), 1e-30)))

        return attack

    @model_validator(mode="after")
    def _positive(self) -> HeterogeneityConfig:
        if any(not f >= 1.0 for f in self.slowdown):
            raise ValueError(f"slowdown={self.slowdown}: every factor must be >= 1 (1 = full speed)")
        if any(n < 0 for n in self.max_steps):
            raise ValueError(f"max_steps={self.max_steps}: every budget must be >= 0 (0 = no limit)")
        return self

    def slowdown_of(self, island: int) -> float:
        return self.slowdown[island] if island < len(self.slowdown) else 1.0

    def max_steps_of(self, island: int) -> int:
        return self.max_steps[island] if island < len(self.max_steps) else 0


class SimEvent(Frozen):
    at_s: float = Field(ge=0.0)
    """Virtual time of the event, in seconds."""
    worker: int = Field(ge=0)
    """Virtual worker index (0 .. workers-1)."""
    action: Literal["join", "leave", "crash"]
    """join: the worker starts here (it is absent before), or comes back after a leave (a fresh
    process: it takes the run's current state); leave: it finishes its round and leaves; crash: it
    stops dead, without a word (the coordinator drops it after heartbeat_timeout_s), for good."""


class SimConfig(Frozen):
    step_s: float = Field(0.1, gt=0.0)
    """Virtual seconds of one inner step of a full-speed worker."""
    jitter: float = Field(0.0, ge=0.0, le=2.0)
    """Log-normal sigma of per-step time noise (0: every step takes exactly step_s * slowdown)."""
    bandwidth_mbps: float = Field(1000.0, gt=0.0)
    """Link speed of every worker, megabits per second, for the virtual cost of messages."""
    latency_ms: float = Field(0.0, ge=0.0)
    """One-way latency added to every exchange."""
    events: list[SimEvent] = Field(default_factory=list)
    """Join, leave and crash schedule; needs membership.kind = "coordinator"."""


class LogConfig(Frozen):
    eval_every: int = Field(1, ge=0)
    """Evaluate validation loss every this many rounds (DDP: every inner_steps-equivalent of
    50 steps); 0 evaluates only at the end."""
    eval_batches: int = Field(16, gt=0)
    """Validation batches, split across the workers."""
    progress: bool = True
    """Show a live progress bar on worker 0."""
    plot: bool = True
    """Write loss plots (PNG) next to the logs at the end of the run."""
    peak_tflops: float = Field(0.0, ge=0.0)
    """The accelerator's peak dense TFLOP/s at the training precision (e.g. 989 for an H100 /
    H200 in bf16); with it each round logs its model FLOPs utilization (`mfu`: 6 x parameters x
    tokens/s over the peak). 0: not logged."""
    tensorboard: bool = False
    """Also write TensorBoard event files, one run per worker: out_dir/tensorboard/<worker>/
    (`tensorboard --logdir out_dir/tensorboard`); needs pip install 'dilo[tensorboard]'."""
    wandb: bool = False
    """Also log to Weights & Biases, one W&B run per worker, files under out_dir/wandb/; needs
    pip install 'dilo[wandb]'."""
    wandb_project: str = Field("dilo", min_length=1)
    """The W&B project of the runs."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """"offline" writes the runs to disk only (`wandb sync` uploads them later); "online" needs a
    login (WANDB_API_KEY)."""
    wandb_group: str | None = None
    """The W&B group that gathers the workers' runs; None: the run's name."""


class CheckpointConfig(Frozen):
    every: int = Field(0, ge=0)
    """Save a checkpoint every this many rounds; 0 saves only at the end and on Ctrl+C."""
    resume: bool = False
    """Continue from the newest checkpoint in out_dir/checkpoints."""
