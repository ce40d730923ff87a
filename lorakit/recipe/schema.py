"""The recipe: pydantic models of the YAML file, loading with line numbers, `extends`, `--set`.

`load_recipe(path, overrides)` is the only way in: it reads the YAML (keeping the line and column
of every key), follows `extends:` (deep merge, cycles detected), applies `--set key=value`
overrides (values parsed as YAML), validates the result against `Recipe`, and raises one
`RecipeError` listing every problem with its `file:line:col`.

Only pydantic and pyyaml are imported here: validation must stay fast (no torch).
"""

from __future__ import annotations

import difflib
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from lorakit.errors import LorakitError, Problem, RecipeError

# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------

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
    """Concatenate each batch into one row without padding (attention keeps the rows apart through
    position_ids; same loss as padded batches). auto = on for SFT on a CUDA GPU when not packing and
    batch_size > 1; off on CPU."""
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
    """Liger kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE): auto = on for CUDA when installed."""
    cuda_graphs: bool | Literal["auto"] = "auto"
    """Replay each checkpointed decoder layer as CUDA graphs (a few launches instead of ~250 a layer and step;
    same kernels, same math). Costs memory: the graphs keep a layer's working set in their own pool (8B shape,
    2x2048 tokens: +0.9 GiB allocated, +1.8 GiB reserved). auto = on CUDA, for SFT with the fused LoRA layer,
    in one process: batches of one shape in budget mode (memory_budget_gb) when every layer stays
    checkpointed and the graphs fit too, without a budget when, with the input embeddings in host memory
    (offload_embeddings), the estimated peak allocated memory stays within the run without graphs;
    padding-free batches on models of at most 9B parameters, each padded to one length (the 95th percentile of
    the batch totals; rows of pad tokens that no loss reads; 8B, 8 chat-length rows: 12% faster for +1.8 GiB,
    still 4.7 GiB under the plain stack, which pads each batch to its longest row). Other shapes and inputs fall
    back to plain checkpointing."""
    offload_embeddings: bool | Literal["auto"] = "auto"
    """Keep the input embedding table in host memory and copy each batch's rows to the GPU (8B: 1 GiB less GPU
    memory; same math). For SFT in one process, with untied, frozen, plain embeddings. auto = where it pays
    for CUDA graphs (cuda_graphs)."""
    expandable_segments: bool = True
    """CUDA only: the caching allocator grows segments in place instead of caching blocks of fixed sizes (less
    reserved memory for the same tensors; PYTORCH_CUDA_ALLOC_CONF, when set, wins). lorakit.speed.cuda_memory."""
    torch_compile: bool = False
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss: stop (keep the last good checkpoint) or skip the step and count it."""

    _auto_bool_values = field_validator("fused_lora", "liger", "cuda_graphs", "offload_embeddings",
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


# bitsandbytes' optimizers update plain tensors; FSDP2 shards parameters as DTensors, which they reject
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def fsdp_optimizer_problem(optimizer: str) -> str | None:
    """Why `optimizer` cannot run under FSDP, or None (one message for the recipe rule, the launcher check in
    train.py and estimate's --strategy fsdp warning)."""
    if optimizer in BNB_OPTIMIZERS:
        return f"{optimizer} (bitsandbytes) cannot update FSDP's sharded parameters; use adamw_torch or auto"
    return None


def resolved_optimizer(recipe: Recipe, device: str, strategy: str | None = None) -> str:
    """train.optimizer with `auto` resolved: bitsandbytes' paged 8-bit AdamW on CUDA (the QLoRA paper's), except
    under FSDP (see BNB_OPTIMIZERS), and torch's AdamW on CPU. `strategy` (the engine actually used, e.g. from
    `estimate --strategy` or the launcher) overrides distributed.strategy."""
    if recipe.train.optimizer != "auto":
        return recipe.train.optimizer
    if device != "cuda" or (strategy or recipe.distributed.strategy) == "fsdp":
        return "adamw_torch"
    return "paged_adamw_8bit"


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


def cross_field_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Rules that involve several fields: (dotted field, message) for each broken one."""
    problems: list[tuple[str, str]] = []
    lora, bits = recipe.lora, recipe.quantization.bits
    if recipe.method == "grpo" and recipe.grpo is None:
        problems.append(("method", "method grpo needs a `grpo:` section with `rewards:`"))
    if recipe.method == "sft" and recipe.grpo is not None:
        problems.append(("grpo", "a `grpo:` section is only used with `method: grpo` (method is sft)"))
    if lora.scale > 16:
        limit = 16 * (math.sqrt(lora.r) if lora.rslora else lora.r)
        problems.append(("lora.alpha", f"alpha {lora.resolved_alpha:g} with r {lora.r} scales the update by "
                         f"{lora.scale:g}; above 16 training diverges (use alpha <= {limit:g})"))
    if lora.init in ("pissa", "olora", "loftq") and bits in (4, 8):
        problems.append(("lora.init", f"init {lora.init} needs the full-precision base weights; "
                         "set quantization.bits: none (LoftQ quantizes by itself)"))
    if lora.dora and bits == 8:
        problems.append(("lora.dora", "peft's DoRA does not support 8-bit bitsandbytes layers; use bits 4 or none"))
    if recipe.data.packing and recipe.data.padding_free is True:
        problems.append(("data.padding_free", "packing and padding_free are alternatives; pick one"))
    if recipe.model.attn_implementation == "varlen" and (
            recipe.method != "sft" or (recipe.data.padding_free is False and not recipe.data.packing)):
        problems.append(("model.attn_implementation", "varlen attention is for flattened SFT batches (padding-free "
                         "or packed: it takes the rows' boundaries instead of a mask); use sdpa or auto"))
    if recipe.train.fused_lora is True and lora.dora:
        problems.append(("train.fused_lora", "the fused LoRA layer does not implement DoRA; "
                         "set train.fused_lora: auto or false"))
    if recipe.train.fused_lora is True and bits == 8:
        problems.append(("train.fused_lora", "the fused LoRA layer supports 4-bit and 16/32-bit bases, not 8-bit; "
                         "set train.fused_lora: auto or false"))
    t = recipe.train
    graphs_need = [  # (what rules CUDA graphs out, what they replay)
        (t.fused_lora is False, "the fused LoRA layer (train.fused_lora is false)"),
        (lora.dora, "the fused LoRA layer, which does not implement DoRA"),
        (t.gradient_checkpointing is False or t.gradient_checkpointing == 0,
         "checkpointed layers (train.gradient_checkpointing is off)"),
        (t.torch_compile, "layers as they are, not with train.torch_compile (untested together)"),
    ]
    why = next((what for ruled_out, what in graphs_need if ruled_out), None)
    if t.cuda_graphs is True and why:
        problems.append(("train.cuda_graphs", f"CUDA graphs replay {why}; set train.cuda_graphs: auto or false"))
    if t.offload_embeddings is True and recipe.method != "sft":
        problems.append(("train.offload_embeddings", "host-memory embeddings are for SFT (generation would copy "
                         "the rows of every new token); set train.offload_embeddings: auto or false"))
    elif t.offload_embeddings is True and any("embed" in m for m in lora.modules_to_save):
        problems.append(("train.offload_embeddings", "the input embeddings are trained (lora.modules_to_save); "
                         "set train.offload_embeddings: auto or false"))
    g = recipe.grpo
    if recipe.method == "grpo" and g is not None and g.generation_batch_size is not None:
        gen = g.generation_batch_size
        if gen % g.num_generations:
            problems.append(("grpo.generation_batch_size", f"{gen} must be a multiple of grpo.num_generations "
                             f"{g.num_generations} (whole groups of completions per prompt)"))
        elif gen % recipe.train.batch_size:
            problems.append(("grpo.generation_batch_size", f"{gen} must be a multiple of train.batch_size "
                             f"{recipe.train.batch_size} (completions per optimizer step)"))
    if recipe.method == "grpo" and recipe.data.packing:
        problems.append(("data.packing", "packing is for SFT; GRPO generates per prompt"))
    if recipe.distributed.strategy == "fsdp" and fsdp_optimizer_problem(recipe.train.optimizer):
        problems.append(("train.optimizer", fsdp_optimizer_problem(recipe.train.optimizer)))
    if recipe.train.precision == "fp16" and recipe.quantization.compute_dtype == "bf16":
        problems.append(("train.precision", "fp16 mixed precision with bf16 compute_dtype mixes formats; use bf16"))
    return problems


# ----------------------------------------------------------------------------------------------
# YAML with positions
# ----------------------------------------------------------------------------------------------

Pos = tuple[str, int | None, int | None]  # file, line, column (1-based)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also accepts 1e-4 style floats (YAML 1.1 needs a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _walk(node: yaml.Node, file: str, prefix: tuple, positions: dict[tuple, Pos]) -> Any:
    """Construct Python data from a composed node while recording every key's position."""
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for k_node, v_node in node.value:
            if not isinstance(k_node, yaml.ScalarNode):
                raise _YamlProblem(file, k_node.start_mark, "keys must be plain names")
            key = k_node.value
            if key in out:
                raise _YamlProblem(file, k_node.start_mark, f"duplicate key {key!r}")
            path = prefix + (key,)
            positions[path] = (file, k_node.start_mark.line + 1, k_node.start_mark.column + 1)
            out[key] = _walk(v_node, file, path, positions)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            path = prefix + (i,)
            positions[path] = (file, item.start_mark.line + 1, item.start_mark.column + 1)
            items.append(_walk(item, file, path, positions))
        return items
    loader = _Loader("")
    return loader.construct_object(node, deep=True)


class _YamlProblem(Exception):
    def __init__(self, file: str, mark: Any, message: str):
        self.problem = Problem("", message, file, mark.line + 1 if mark else None, mark.column + 1 if mark else None)


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, Pos]]:
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem("", f"recipe file not found: {shown}")]) from None
    except IsADirectoryError:
        raise RecipeError([Problem("", f"{shown} is a directory, not a recipe file")]) from None
    except UnicodeDecodeError as e:
        raise RecipeError([Problem("", f"not UTF-8 text (byte {e.start})", shown)]) from None
    except OSError as e:
        raise RecipeError([Problem("", f"cannot read {shown}: {e.strerror}")]) from None
    positions: dict[tuple, Pos] = {}
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is None:
            raise RecipeError([Problem("", "the recipe file is empty (start from `lorakit init`)", shown)])
        data = _walk(node, shown, (), positions)
    except _YamlProblem as e:
        raise RecipeError([e.problem]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        what = getattr(e, "problem", None) or str(e)
        raise RecipeError([Problem("", f"YAML syntax error: {what}", shown,
                                   mark.line + 1 if mark else None, mark.column + 1 if mark else None)]) from None
    if not isinstance(data, dict):
        raise RecipeError([Problem("", f"a recipe is a mapping of sections (got {type(data).__name__})", shown, 1, 1)])
    return data, positions


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[tuple, Pos]]:
    data, positions = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, positions
    f, line, col = positions[("extends",)]
    if not isinstance(parent, str) or not parent.strip():
        raise RecipeError([Problem("extends", f"expected a recipe file path (got {parent!r})", f, line, col)])
    parent_path = Path(parent) if Path(parent).is_absolute() else path.parent / parent
    if not parent_path.is_file():
        raise RecipeError([Problem("extends", f"file not found: {parent_path}", f, line, col)])
    chain = (*chain, path.resolve())
    if parent_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, parent_path.resolve()))
        raise RecipeError([Problem("extends", f"`extends` forms a cycle: {cycle}", f, line, col)])
    pdata, ppos = _load_with_extends(parent_path, chain)
    merged_pos = dict(ppos)
    merged_pos.update({k: v for k, v in positions.items() if k != ("extends",)})
    return _deep_merge(pdata, data), merged_pos


def parse_override(text: str) -> tuple[list[str], Any]:
    """`lora.r=32` -> (["lora", "r"], 32); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError([Problem("--set", f"expected KEY=VALUE with a dotted key, e.g. lora.r=32 (got {text!r})")])
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError([Problem(key, f"--set value is not valid YAML: {getattr(e, 'problem', e)}", "--set")]) from None
    return key.split("."), value


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


# ----------------------------------------------------------------------------------------------
# Validation errors -> problems with positions
# ----------------------------------------------------------------------------------------------


def _position(positions: dict[tuple, Pos], loc: tuple, default_file: str) -> Pos:
    for n in range(len(loc), 0, -1):
        if loc[:n] in positions:
            return positions[loc[:n]]
    return (default_file, None, None)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of `loc`."""
    model: Any = Recipe
    for key in loc[:-1]:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for c in candidates:
            for cc in [c, *getattr(c, "__args__", ())]:
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        if nxt is None:
            return None
        model = nxt
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


# Names other tools (peft, TRL, transformers, Axolotl) use for our keys: suggested on unknown keys.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "use_rslora": "rslora", "use_dora": "dora", "init_lora_weights": "init", "layers_to_transform": "layers",
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "lr_scheduler_type": "scheduler",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "optim": "optimizer", "max_seq_length": "max_length",
    "sequence_len": "max_length", "load_in_4bit": "bits", "load_in_8bit": "bits", "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant", "bnb_4bit_compute_dtype": "compute_dtype", "output_dir": "dir",
    "model_name_or_path": "base_model", "base_model_id": "base_model", "dataset": "data", "datasets": "data",
    "training": "train", "peft": "lora", "bnb": "quantization",
}


def _describe(err: dict) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    given = err.get("input")
    if kind == "extra_forbidden" and loc:
        model = _model_at(loc)
        names = list(model.model_fields) if model else []
        hint = [SYNONYMS[str(loc[-1])]] if SYNONYMS.get(str(loc[-1])) in names else \
            difflib.get_close_matches(str(loc[-1]), names, n=1)
        msg = f"unknown key {loc[-1]!r}"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        elif names:
            msg += f" (allowed: {', '.join(names)})"
        return msg
    if kind == "missing":
        return "required, but not given"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if given is not None and not isinstance(given, (dict, list)) and "(got" not in msg:
        msg += f" (got {given!r})"
    return msg


_UNION_TAG = re.compile(r"^(?:[a-z-]+\[.*\]|str|int|float|bool|none|list|literal)$")


def _user_loc(loc: tuple, keep_last: bool) -> tuple:
    """Drop pydantic's union-branch tags (e.g. 'list[str]') from an error location; keep user keys."""
    head, tail = (loc[:-1], loc[-1:]) if keep_last and loc else (loc, ())
    return tuple(x for x in head if not (isinstance(x, str) and _UNION_TAG.match(x))) + tail


def _problems_from(error: ValidationError, positions: dict[tuple, Pos], default_file: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    # a union of alternatives (e.g. targets: preset | list) reports one error per branch:
    # keep one message per field, the first is the most specific after our ordering.
    for err in error.errors():
        loc = _user_loc(tuple(err["loc"]), keep_last=err["type"] == "extra_forbidden")
        dotted = ".".join(str(x) for x in loc)
        if any(dotted == d for d, _ in seen):
            continue
        msg = _describe({**err, "loc": loc})
        seen.add((dotted, msg))
        f, line, col = _position(positions, loc, default_file)
        problems.append(Problem(dotted, msg, f, line, col))
    return problems


def validate_data(data: dict, positions: dict[tuple, Pos] | None = None, source: str = "<recipe>") -> Recipe:
    """Validate an already-parsed recipe mapping."""
    positions = positions or {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_problems_from(e, positions, source), source=source) from None
    cross = cross_field_problems(recipe)
    if cross:
        raise RecipeError([Problem(fld, text, *_position(positions, tuple(fld.split(".")), source))
                           for fld, text in cross], source=source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override and validate a recipe file. Raises RecipeError with every problem."""
    path = Path(path)
    data, positions = _load_with_extends(path)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
        positions[tuple(keys)] = (f"--set {text}", None, None)
    recipe = validate_data(data, positions, str(path))
    recipe._source_dir = path.resolve().parent
    recipe._positions = positions
    recipe._source = str(path)
    _locate_base_model(recipe)
    return recipe


def _locate_base_model(recipe: Recipe) -> None:
    """A relative `base_model` directory resolves like a data path (working dir first, then beside the
    recipe); one found beside the recipe is written absolute, so the run's recipe.yaml finds it from
    anywhere. Aliases and hub ids name no such path and stay as written."""
    given = Path(recipe.base_model).expanduser()
    try:
        found = resolve_path(recipe, recipe.base_model)
    except OSError:  # a name no file system takes (too long): the loaders report it
        return
    if found != given:
        recipe.base_model = str(found)


@contextmanager
def located(recipe: Recipe):
    """Add the recipe file and line to a LorakitError raised about one of its fields.

    Code that checks a recipe beyond its schema (files, model shape, targets) raises
    `LorakitError(..., field="lora.targets")`; inside this block the error gains `file:line:col`.
    """
    try:
        yield
    except LorakitError as e:
        if e.field and not e.problems:
            loc = tuple(int(k) if k.isdigit() else k for k in e.field.split("."))
            f, line, col = _position(recipe._positions or {}, loc, recipe._source or "<recipe>")
            e.problems = [Problem(e.field, e.message, f, line, col)]
            e.message = f"{recipe._source or 'recipe'}: problem in the recipe"
        raise


def recipe_dir(recipe: Recipe) -> Path:
    """Directory of the recipe file (relative data paths and a relative base_model directory resolve
    against the working dir first, then this)."""
    return recipe._source_dir or Path.cwd()


def resolve_path(recipe: Recipe, p: str) -> Path:
    """A path named in the recipe: as given if it exists from the working dir, else relative to the recipe."""
    cand = Path(p).expanduser()
    if cand.is_absolute() or cand.exists():
        return cand
    beside = recipe_dir(recipe) / cand
    return beside if beside.exists() else cand


def output_dir(recipe: Recipe) -> Path:
    return Path(recipe.output.dir.replace("{name}", recipe.name))


def to_resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default written out, as YAML (saved in the run directory)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def json_schema() -> dict:
    """JSON Schema of the recipe, for editors' YAML language servers."""
    schema = Recipe.model_json_schema()
    schema["properties"]["extends"] = {"type": "string", "description": "Another recipe file to start from (deep merge)."}
    schema["title"] = "lorakit recipe"
    return schema


__all__ = [
    "Recipe", "ModelSection", "QuantizationSection", "LoraSection", "DataSection", "TrainSection",
    "GrpoSection", "RewardSpec", "EvaluateSection", "OutputSection", "DistributedSection",
    "load_recipe", "validate_data", "cross_field_problems", "parse_override", "output_dir", "resolve_path", "to_resolved_yaml",
    "json_schema", "located",
]
