"""The recipe's sections as pydantic models: every key, its type, default and docstring.

The docstrings are what `lorakit schema` gives editors, so they state behaviour and reasons. Rules between
fields live in lorakit.recipe.rules, reading the YAML in lorakit.recipe.loader. Only pydantic is imported
here: validation must stay fast (no torch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
TargetPreset = Literal["all-linear", "attention", "mlp", "qkv"]


_TRUE, _FALSE = {"true", "on", "yes"}, {"false", "off", "no"}


def _auto_or_bool(v: Any) -> Any:
    """auto, true or false (YAML spellings too); anything else is an error that says so."""
    if isinstance(v, bool) or v == "auto":
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE | {"auto"}:
        w = v.strip().lower()
        return "auto" if w == "auto" else w in _TRUE
    raise ValueError(f"expected auto, true or false (got {v!r})")


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelSection(Section):
    """How the base model is loaded (the model itself is `base_model`)."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model."""
    dtype: Dtype = "auto"
    """Dtype of the unquantized weights: auto = bf16 on a GPU that has it, else fp32 on CPU."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Off unless you trust the repository."""
    allow_pickle: bool = False
    """Allow .bin/.pt weights (pickle). Off: weights load from safetensors only."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention", "varlen"] = "auto"
    """Attention kernel: auto = varlen for padding-free or packed SFT batches on a GPU with 16-bit compute (torch's
    flash kernel given the rows' boundaries; flex_attention where the model's attention is not plain causal),
    else sdpa. varlen asked for turns padding-free batches on."""
    chat_template: str | None = None
    """A Jinja chat template (or a path to a .jinja file) replacing the tokenizer's."""


class QuantizationSection(Section):
    """bitsandbytes quantization of the frozen base weights."""

    bits: Literal[4, 8, "none", "auto"] = "auto"
    """4 (QLoRA), 8, none (16/32-bit base), or auto (4 on a CUDA GPU, none on CPU)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the 4-bit block constants too (saves ~0.4 bit per parameter)."""
    compute_dtype: Dtype = "auto"
    """Dtype of the matmuls on dequantized weights: auto = bf16 on GPU, fp32 on CPU."""
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = "uint8"
    """Storage dtype of packed 4-bit weights; FSDP-QLoRA needs it equal to the compute dtype."""

    @field_validator("bits", mode="before")
    @classmethod
    def _none_is_none(cls, v: Any) -> Any:
        if v is None or v is False or (isinstance(v, str) and v.lower() in {"none", "null", "no", "off"}):
            return "none"
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        return v

    def resolved_bits(self, device: str) -> int | None:
        """The bit width actually used on `device` ("cuda" or "cpu")."""
        if self.bits == "auto":
            return 4 if device == "cuda" else None
        return None if self.bits == "none" else int(self.bits)


class LoraSection(Section):
    """The LoRA adapter, mapped one to one onto peft's LoraConfig."""

    r: int = Field(16, gt=0, le=4096)
    """Rank of the update matrices."""
    alpha: float | None = Field(None, gt=0)
    """Scaling numerator; the update is scaled by alpha/r (alpha/sqrt(r) with rslora). Default: 2*r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""
    targets: TargetPreset | list[str] = "all-linear"
    """Modules to adapt: a list of names, `all-linear`, or a preset: attention, mlp, qkv."""
    rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(r)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): adds a trainable magnitude vector per adapted module."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train."""
    init: Literal["default", "gaussian", "pissa", "olora", "loftq", "orthogonal"] = "default"
    """Initialization of the adapter weights (peft's init_lora_weights)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)."""
    layers: list[int] | None = None
    """Only adapt these layer indices (peft's layers_to_transform); default all layers."""

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list adapts nothing; name modules, or use all-linear")
            if any(not isinstance(t, str) or not t.strip() for t in v):
                raise ValueError("module names must be non-empty strings")
        return v

    @field_validator("layers")
    @classmethod
    def _layers_non_negative(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("an empty list adapts no layer; leave it out to adapt all layers")
            bad = [i for i in v if i < 0]
            if bad:
                raise ValueError(f"layer indices start at 0 (got {bad})")
        return v

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r

    @property
    def scale(self) -> float:
        """The factor peft multiplies B@A by."""
        return self.resolved_alpha / (math.sqrt(self.r) if self.rslora else self.r)


class DataSection(Section):
    """Where the training rows come from and how they become tokens."""

    path: str
    """A local file (.jsonl, .json, .csv, .parquet), a directory of them, or a hub dataset id."""
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text", "prompt"] = "auto"
    """Row format; auto detects it from the columns."""
    split: str = "train"
    """Split of a hub dataset (or a directory) to train on."""
    eval: float | str | None = None
    """Held-out evaluation rows: a fraction (0-1) of the data, a file path, or a split name."""
    max_length: int = Field(1024, gt=0)
    """Maximum tokens per example."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """What to do with rows longer than max_length."""
    completion_only: bool = True
    """Compute the loss on assistant/completion tokens only (prompt tokens are masked)."""
    packing: bool = False
    """Pack several rows into each max_length sequence."""
    padding_free: bool | Literal["auto"] = "auto"
    """Concatenate each batch into one row without padding (attention keeps the rows apart through their
    boundaries; same loss as padded batches). auto = on for SFT on a CUDA GPU with batch_size > 1 when not
    packing, kept once the rows are read only where padded batches would waste at least 15% of their tokens
    (on rows of similar length attention per row costs more than the little padding saved); off on CPU.
    model.attn_implementation: varlen turns it on (it needs the rows' boundaries)."""
    max_rows: int | None = Field(None, gt=0)
    """Use at most this many training rows."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Rename columns before format detection, e.g. {conversations: messages}."""

    _padding_free_value = field_validator("padding_free", mode="before")(_auto_or_bool)

    @field_validator("eval")
    @classmethod
    def _eval_fraction(cls, v: Any) -> Any:
        if isinstance(v, float) and not (0 < v < 1):
            raise ValueError(f"a fraction must be between 0 and 1 (got {v})")
        return v


class TrainSection(Section):
    """Optimization; mapped onto TRL's SFTConfig / GRPOConfig."""

    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps (overrides epochs)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training rows (when max_steps is not set)."""
    lr: float = Field(2e-4, gt=0, lt=1)
    """Peak learning rate."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of steps spent warming up."""
    batch_size: int = Field(4, gt=0)
    """Micro-batch per device."""
    grad_accum: int = Field(1, gt=0)
    """Gradient accumulation steps."""
    gradient_checkpointing: bool | int | Literal["auto"] = "auto"
    """Recompute activations in backward: true = every decoder layer, false = none, a number K = the
    first K layers only. auto = on CPU none; on CUDA every layer (the plain stack's memory), or with
    memory_budget_gb the fastest setting whose estimated peak fits the budget."""
    memory_budget_gb: float | None = Field(None, gt=0)
    """Budget mode (CUDA): GPU memory this run may use, in GiB (2^30 bytes, as nvidia-smi shows). With
    gradient_checkpointing: auto the fastest setting that fits is chosen from the memory estimate."""
    fused_lora: bool | Literal["auto"] = "auto"
    """LoRA update as one fused autograd function (same math as peft, fewer kernels and saved tensors; the
    adapter saved is plain peft). auto = on CUDA for plain LoRA (not DoRA) on a 4-bit or 16-bit base."""
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
        "adafactor", "sgd", "auto",
    ] = "auto"
    """Optimizer: auto = paged_adamw_8bit on CUDA (adamw_torch under distributed.strategy fsdp), adamw_torch on
    CPU."""
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision: auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    """Evaluate every N steps (default: only before and after training)."""
    save_steps: int | None = Field(None, gt=0)
    """Save a checkpoint every N steps (resume picks up the latest)."""
    save_total_limit: int = Field(2, gt=0)
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"
    liger: bool | Literal["auto"] = "auto"
    """Liger's RMSNorm, SwiGLU and RoPE kernels (TRL's use_liger_kernel; the loss goes through TRL's chunked LM
    head, which never builds the full logits). auto = on for CUDA when liger-kernel and Triton are installed."""
    cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay each checkpointed decoder layer as CUDA graphs: a few launches instead of hundreds a layer and
    step, so the GPU stops waiting on the host; same kernels, same math. Costs memory: the graphs keep one
    layer's working set in their own pool. auto = on CUDA, for SFT in one process, with every layer
    checkpointed, the fused LoRA layer, LoRA dropout in its kernels (or none) and no torch_compile: batches of
    one shape in budget mode (memory_budget_gb) when the graphs' estimated peak fits the budget, without a
    budget when, with the input embeddings in host memory (offload_embeddings), the estimated peak allocated
    memory stays within the run without graphs; padding-free batches on models of at most 9B parameters
    (larger ones are bound more by the GPU, where the padding's compute would cost more than the launches
    saved), each padded to one length (the 95th percentile of the batch totals, with rows of pad tokens that no
    loss reads) and within the budget if one is set. Other shapes and inputs fall back to plain checkpointing."""
    offload_activations: bool | Literal["auto"] = "auto"
    """Keep each checkpointed decoder layer's input in pinned host memory between the forward and its recompute
    (copied on a side stream, brought back one layer ahead): the GPU holds a couple of layers' checkpoints
    instead of one per layer (same math). Needs gradient checkpointing. auto = on CUDA in one process with every
    layer checkpointed, for models whose layers are large enough to hide the copies, while the pinned copies take
    at most 75% of the host's available memory: for SFT always, for GRPO where the run would not fit the GPU (or
    memory_budget_gb) otherwise."""
    tiled_mlp: bool | Literal["auto"] = "auto"
    """Run each decoder layer's MLP over slices of 8192 tokens, keeping only its input for backward and
    recomputing one slice at a time there: no [tokens x intermediate] buffer is ever whole, for one more MLP
    forward a step (same math). auto = on CUDA for SFT runs that would not fit the GPU (or memory_budget_gb)
    with whole MLPs."""
    offload_embeddings: bool | Literal["auto"] = "auto"
    """Keep the input embedding table in host memory and copy each batch's rows to the GPU (the table's GPU
    memory freed; same math). For SFT in one process, with untied, frozen, plain embeddings. auto = exactly
    where the memory it frees pays for CUDA graphs (cuda_graphs)."""
    expandable_segments: bool = True
    """CUDA only: the caching allocator grows segments in place instead of caching blocks of fixed sizes (less
    reserved memory for the same tensors; PYTORCH_CUDA_ALLOC_CONF, when set, wins). lorakit.speed.cuda_memory."""
    torch_compile: bool = False
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss: stop (keep the last good checkpoint) or skip the step and count it."""

    _auto_bool_values = field_validator("fused_lora", "liger", "cuda_graphs", "offload_activations", "tiled_mlp",
                                        "offload_embeddings",
                                        mode="before")(_auto_or_bool)

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_value(cls, v: Any) -> Any:
        if isinstance(v, bool) or v == "auto":
            return v
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        if isinstance(v, int):
            if v < 0:
                raise ValueError(f"a number of layers to checkpoint is 0 or more (got {v})")
            return v
        raise ValueError(f"expected auto, true, false or a number of layers to checkpoint (got {v!r})")


class RewardSpec(Section):
    """One reward (or metric) function and its weight."""

    fn: str
    """A built-in name (exact_answer, format_regex, length, valid_json, exact_match, json_match) or
    `package.module:function` or `path/to/file.py:function`."""
    weight: float = 1.0
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments bound to the function (e.g. {pattern: '...'} for format_regex)."""

    @field_validator("fn")
    @classmethod
    def _fn_shape(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("name a built-in reward or `module:function` / `file.py:function`")
        if ":" in v:
            mod, _, func = v.rpartition(":")
            if not mod or not func.isidentifier():
                raise ValueError(f"expected `module:function` or `file.py:function` (got {v!r})")
        return v


class GrpoSection(Section):
    """GRPO options, mapped onto TRL's GRPOConfig."""

    rewards: list[RewardSpec]
    """Reward functions with weights; the reward of a completion is their weighted sum."""
    num_generations: int = Field(8, ge=2)
    """Completions sampled per prompt (the group)."""
    max_prompt_length: int = Field(256, gt=0)
    max_completion_length: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.0, ge=0)
    """KL coefficient against the reference (the base without adapter)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    epsilon: float = Field(0.2, gt=0)
    """Clipping range of the ratio."""
    generation_batch_size: int | None = Field(None, gt=0)
    log_completions: bool = True
    generation_graphs: bool | Literal["auto"] = "auto"
    """Sample the completions over a static KV cache, each decoding step replayed as one CUDA graph, instead of
    through transformers' eager generate (which launches every kernel of every layer from Python per token); same
    sampling settings, and the policy samples in eval mode (no LoRA dropout), as TRL's vLLM path does. Settings
    the sampler does not implement (beams, repetition penalty, ...) and FSDP keep transformers' generate. auto = on
    CUDA, except under FSDP; true also runs the static-cache loop on a CPU, without graphs."""

    _generation_graphs_value = field_validator("generation_graphs", mode="before")(_auto_or_bool)

    @field_validator("rewards")
    @classmethod
    def _some_rewards(cls, v: list) -> list:
        if not v:
            raise ValueError("GRPO needs at least one reward function")
        return v


class EvaluateSection(Section):
    """Task metrics computed by generation on held-out rows, before and after training."""

    metrics: list[RewardSpec] = Field(default_factory=list)
    """Metric functions (same names and loading as rewards), scored against the reference answer."""
    samples: int = Field(32, gt=0)
    """Held-out rows to generate for."""
    max_new_tokens: int = Field(64, gt=0)


class OutputSection(Section):
    """Where and what to write."""

    dir: str = "runs/{name}"
    """Run directory; {name} is the recipe's name."""
    save: Literal["adapter", "merged", "both", "gguf"] = "adapter"
    """gguf: also write RUN/gguf/model.gguf and its Ollama Modelfile (lorakit export)."""
    merged_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    gguf_quant: Literal["f16", "bf16", "q8_0", "q4_0"] = "q8_0"
    """The GGUF's type with save: gguf (q8_0: near-lossless at about half the size of f16)."""


class DistributedSection(Section):
    """Multi-GPU strategy, used under accelerate/torchrun."""

    strategy: Literal["ddp", "fsdp"] = "ddp"


class Recipe(Section):
    """A complete, validated recipe. Every default is resolved."""

    _source_dir: Path | None = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)
    _positions: dict | None = PrivateAttr(default=None)

    name: str = "run"
    """A name for the run (used in the output dir)."""
    base_model: str
    """An alias (see `lorakit recipes`), a local directory or a hub model id."""
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    method: Literal["sft", "grpo"] = "sft"
    grpo: GrpoSection | None = None
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    output: OutputSection = Field(default_factory=OutputSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    @field_validator("base_model")
    @classmethod
    def _base_model_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name an alias, a local directory or a hub id")
        return v.strip()
