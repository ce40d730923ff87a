"""The run's speed plan: which levers are on, decided once from the recipe, the device, the memory estimate and
the rows' lengths, as one frozen `Plan` that model loading, the trainer, the estimate and summary.json all read.

Each lever keeps the math of the plain TRL + peft + bitsandbytes stack (same loss, same gradients up to bf16
rounding) and is a recipe option whose `auto` value `plan` resolves (docs/speed.md describes each):

- train.liger: Liger's RMSNorm / SwiGLU / RoPE kernels (TRL's `use_liger_kernel`).
- train.fused_lora: one autograd function per LoRA layer (lorakit.speed.fused_lora), with LoRA dropout drawn
  inside its Triton kernels where they cover the rank and dtype (`dropout_kernel`).
- train.gradient_checkpointing / train.memory_budget_gb: every layer (default on CUDA: the plain stack's
  memory), none, the first K layers, or - in budget mode - the fastest setting whose estimated peak fits.
- data.padding_free: flattened batches where padded ones would waste enough (lorakit.speed.padding).
- model.attn_implementation: varlen attention for flattened batches on CUDA (lorakit.speed.varlen_attention),
  else sdpa.
- train.offload_activations / train.tiled_mlp: the checkpointed layers' inputs in pinned host memory, copied
  on a side stream (lorakit.speed.host_checkpoints), and each layer's MLP over slices of the sequence
  (lorakit.speed.tiled_mlp): under `auto` offloading for SFT where the layers are large enough to hide the
  copies (and for GRPO where the run would not fit otherwise), the tiled MLP where the run would not fit the GPU
  or the budget otherwise.
- train.cuda_graphs / train.offload_embeddings: the checkpointed layers replayed as CUDA graphs where they hold,
  pay and fit (lorakit.speed.layer_graphs), paid for by the input embeddings in host memory where needed.
- grpo.generation_graphs: GRPO's completions sampled over a static KV cache with the decoding step replayed as
  a CUDA graph (lorakit.speed.decode_graphs), on CUDA except under FSDP.
- Not a switch but the build path: on CUDA a 4-bit base with bf16 compute keeps its frozen unquantized weights
  in bf16 (`frozen_dtype`), as TRL does, instead of peft's fp32 upcast (an fp32 residual stream is slower and
  larger).

This module imports neither torch nor the model code: the estimate plans for a GPU this machine may not have.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from lorakit.runtime.device import run_dtype_name
from lorakit.runtime.distributed import launched
from lorakit.speed.kernels import lora_dropout
from lorakit.speed.padding import QUANTILE, graph_length, padding_free_worth_it, padding_waste

GIB = 1024**3

# Leaving some of the layers un-checkpointed was measured to gain nothing over checkpointing every layer; only no
# checkpointing at all paid. So budget mode picks "none" or "all", never a partial count (a recipe may still ask).
PARTIAL_CHECKPOINTING_PAYS = False

# Padding-free batches replay graphs, padded to one length, on models up to this size (measured to pay on the 1B
# and 8B shapes). Larger models are more bound by the GPU, where the padding's compute would cost more than the
# host's launches: not measured, they stay eager.
PADDED_GRAPHS_MAX_PARAMS = 9_000_000_000

# Offloaded checkpoints cost a copy of tokens x hidden to the host and back per layer, on a side stream beside
# the layer's compute (2 x layer params FLOPs per token forward, three passes a step). At a host link of
# ~25 GB/s against ~400 TFLOP/s of bf16 matmuls the forward alone hides the copy where a layer has at least this
# many parameters per unit of hidden size (a 1B or 8B Llama: ~30k / ~53k; SmolLM2-135M: ~6k, launch-bound).
OFFLOAD_MIN_LAYER_PARAMS_PER_HIDDEN = 16_000
# train.tiled_mlp: slices of this many tokens (full-speed matmuls, small beside long rows).
TILED_MLP_CHUNK_TOKENS = 8192
# The share of the host's available memory offloaded checkpoints may pin.
OFFLOAD_MAX_HOST_SHARE = 0.75
# grpo.generation_graphs: the static KV cache holds prompt + completion tokens rounded up to a multiple of this.
GENERATION_CACHE_ROUND = 64


@dataclasses.dataclass(frozen=True)
class Plan:
    """The speed levers of one run. Computed once (`plan`), never changed; summary.json records `as_dict()`.

    checkpoint_layers: None = every decoder layer, 0 = none, K = the first K layers. The estimated_* figures and
    the *_fit flags are the memory estimate's, where a choice read them. graph_length / graph_max_row: the length
    padding-free batches are padded to for CUDA graphs, and the longest pad row. `notes`: what the data changed,
    for the console. `settled`: recipe values the data decided under `auto` ((section, key, value) triples), which
    the resolved recipe records."""

    liger: bool = False
    fused_lora: bool = False
    dropout_kernel: bool = False
    padding_free: bool = False
    attn_implementation: str = "sdpa"
    frozen_dtype: str | None = None
    gradient_checkpointing: bool = False
    checkpoint_layers: int | None = None
    memory_budget_bytes: int | None = None
    checkpointing_reason: str = ""
    model_params: int | None = None
    cuda_graphs: bool = False
    offload_activations: bool = False
    tiled_mlp: bool = False
    offload_embeddings: bool = False
    offload_embeddings_required: bool = False
    cuda_graphs_fit: bool = False
    cuda_graphs_fit_offloaded: bool = False
    estimated_peak_bytes: dict | None = None
    estimated_allocated_bytes: dict | None = None
    graph_length: int | None = None
    graph_max_row: int | None = None
    expandable_segments: bool = False
    generation_graphs: bool = False
    notes: tuple[str, ...] = ()
    settled: tuple[tuple[str, str, Any], ...] = ()

    @property
    def trainer_checkpointing(self) -> bool:
        """Whether the Trainer itself checkpoints (every layer); partial checkpointing, CUDA graphs and offloaded
        checkpoints are set on the model (lorakit.speed.checkpointing.apply_to_model)."""
        return (self.gradient_checkpointing and self.checkpoint_layers is None and not self.cuda_graphs
                and not self.offload_activations)

    def as_dict(self) -> dict:
        """The plan for summary.json (notes and settled values are in the console and the resolved recipe)."""
        d = dataclasses.asdict(self)
        del d["notes"], d["settled"]
        return d


# ----------------------------------------------------------------------------------------------
# Single decisions
# ----------------------------------------------------------------------------------------------


def generation_graphs(recipe: Any, device: str) -> bool:
    """`grpo.generation_graphs`: GRPO only; `auto` = on CUDA except under FSDP (whose sharded weights TRL gathers
    per generate call); `true` anywhere (a CPU runs the same loop without graphs)."""
    if recipe.method != "grpo" or recipe.grpo is None:
        return False
    g = recipe.grpo.generation_graphs
    if g == "auto":
        return device == "cuda" and recipe.distributed.strategy != "fsdp"
    return bool(g)


def generation_cache_tokens(tokens: int) -> int:
    """Tokens a sequence's static KV cache holds under grpo.generation_graphs for `tokens` prompt + completion
    tokens (lorakit.speed.decode_graphs sizes it so, the estimate counts it so)."""
    return -(-tokens // GENERATION_CACHE_ROUND) * GENERATION_CACHE_ROUND


def liger_available() -> bool:
    """liger-kernel is importable and has a GPU to run on (its kernels are Triton/CUDA only)."""
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return False
    import torch  # only to probe the GPU; the estimate passes liger_ok instead

    return torch.cuda.is_available()


def checkpoint_layers_for_budget(n_layers: int, base_peak_bytes: int, per_layer_bytes: int, budget_bytes: int) -> int:
    """Fewest layers to checkpoint so that the peak fits `budget_bytes`.

    `base_peak_bytes` is the peak with every layer checkpointed; each layer left un-checkpointed adds
    `per_layer_bytes` (its activations minus the one hidden-state input checkpointing keeps)."""
    if per_layer_bytes <= 0:
        return 0
    spare = budget_bytes - base_peak_bytes
    if spare <= 0:
        return n_layers
    free_layers = min(n_layers, int(spare // per_layer_bytes))
    return n_layers - free_layers


def fused_lora_supported(recipe: Any, bits: int | None) -> bool:
    """The fused layer covers plain LoRA (any rank, alpha, rslora, dropout, init) on a 4-bit or 16/32-bit base."""
    return bits in (4, None) and not recipe.lora.dora


def attention(recipe: Any, device: str, padding_free: bool, sixteen_bit: bool = True) -> str:
    """model.attn_implementation with `auto` resolved: varlen attention for flattened SFT batches (padding-free,
    or packed: TRL packs through its padding-free collator) on CUDA whose attention inputs are 16-bit (the flash
    kernel's; `sixteen_bit`), sdpa otherwise. At load (lorakit.model.load.attn_implementation) a model whose
    attention varlen does not fit falls back to flex attention, then to sdpa."""
    a = recipe.model.attn_implementation
    if a != "auto":
        return a
    flattened = padding_free or recipe.data.packing
    return "varlen" if device == "cuda" and flattened and recipe.method == "sft" and sixteen_bit else "sdpa"


def cuda_graphs_hold(recipe: Any, p: dict, device: str) -> bool:
    """CUDA graphs can replay the checkpointed layers of plan `p`: CUDA, checkpointing on, the fused LoRA layer
    (no autocast cast cache in a layer), LoRA dropout inside the Triton kernels or none (torch's dropout
    cannot be drawn again inside a replay), and no torch.compile (untested together)."""
    return (device == "cuda" and bool(p.get("gradient_checkpointing")) and bool(p.get("fused_lora"))
            and (recipe.lora.dropout == 0 or bool(p.get("dropout_kernel"))) and not recipe.train.torch_compile)


def padded_graphs_pay(p: dict) -> bool:
    """Padding-free batches padded to one length for CUDA graphs pay in plan `p`: a model of at most
    PADDED_GRAPHS_MAX_PARAMS parameters (known from the estimate: `model_params`)."""
    n = p.get("model_params")
    return bool(p.get("padding_free")) and n is not None and n <= PADDED_GRAPHS_MAX_PARAMS


def cuda_graphs_auto(recipe: Any, p: dict, device: str, one_shape: bool | None = None) -> bool:
    """`train.cuda_graphs: auto`: where graphs hold (cuda_graphs_hold) and pay - one process, SFT (GRPO's lengths
    vary) - and fit. Batches of one shape: in budget mode when every layer stays checkpointed and the graphs'
    estimated peak fits the budget (`cuda_graphs_fit`), without a budget when the input embeddings can move to
    host memory and, with them there, the graphs' estimated peak allocated memory is within the run's without
    graphs (`cuda_graphs_fit_offloaded`). Padding-free batches (a new shape every batch) on a model where that
    pays (`padded_graphs_pay`): padded to one length, without a budget or where the graphs' estimated peak fits it.
    `one_shape`: whether the data's rows all have one length (None: not known)."""
    if not (cuda_graphs_hold(recipe, p, device) and not launched() and recipe.method == "sft"):
        return False
    if p.get("padding_free"):
        return padded_graphs_pay(p) and (p.get("memory_budget_bytes") is None or bool(p.get("cuda_graphs_fit")))
    fits = bool(p.get("cuda_graphs_fit")) or (bool(p.get("cuda_graphs_fit_offloaded"))
                                              and recipe.train.offload_embeddings is not False)
    return fits and one_shape is not False


def auto_graphs_reason(p: dict) -> str:
    """What the checkpointing reason adds when `auto` turned CUDA graphs on in plan `p`."""
    if p.get("padding_free"):
        return "; CUDA graphs for padding-free batches padded to one length"
    if p.get("cuda_graphs_fit"):
        return f"; CUDA graphs fit too ({p['estimated_peak_bytes']['all_layers_graphs'] / GIB:.1f} GiB)"
    a = p["estimated_allocated_bytes"]
    return (f"; CUDA graphs, paid for by the input embeddings in host memory (estimated peak allocated "
            f"{a['graphs_offloaded'] / GIB:.1f} GiB, without graphs {a['all_layers'] / GIB:.1f} GiB)")


def host_available_bytes() -> int | None:
    """The host memory available now (Linux: /proc/meminfo MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def offload_activations(recipe: Any, p: dict, est: dict | None, device: str, host_bytes: float | None = None,
                        limit_bytes: int | None = None) -> tuple[bool, str]:
    """`train.offload_activations` resolved for plan `p`, with the reason for `auto`: the recipe's true/false, or
    under auto on CUDA in one process with every layer checkpointed, where the model's layers hide the copies
    (OFFLOAD_MIN_LAYER_PARAMS_PER_HIDDEN, from `est`'s model summary) and the pinned copies of a step (`est`'s
    `host_checkpoints_bytes_offloaded`) take at most OFFLOAD_MAX_HOST_SHARE of the host's available memory
    (`host_bytes`; None: read it; float("inf"): no limit). SFT runs then offload whether or not they would fit
    without it: measured beside the layer inputs on the GPU (bench/train.md), the copies cost SFT steps a few
    percent at most while the peak falls by all but two layers' inputs, the largest activation term. GRPO runs
    offload only where they would not fit `limit_bytes` (the budget or the GPU's memory) with the layer inputs on
    the GPU (`est`'s `peak_bytes_layer_inputs_on_gpu`): their steps with offloading are not measured yet."""
    v = recipe.train.offload_activations
    if v is True and not p.get("gradient_checkpointing"):  # checkpointing auto resolved off (a CPU)
        return False, "off: no layer is checkpointed here (set train.gradient_checkpointing: true)"
    if v != "auto":
        return bool(v), "recipe"
    est = est or {}
    model = est.get("model")
    if device != "cuda" or launched() or not (p.get("gradient_checkpointing") and p.get("checkpoint_layers") is None):
        return False, ""
    on_gpu = est.get("peak_bytes_layer_inputs_on_gpu")
    needed = limit_bytes is not None and on_gpu is not None and on_gpu > limit_bytes
    if recipe.method != "sft" and not needed:
        return False, ""  # fits as it is (or not known): the copies are not needed
    if not model or not model.get("num_layers") or not model.get("hidden") or not model.get("total_params"):
        return False, "auto: off (the model's shape is not known)"
    layers, hidden = model["num_layers"], model["hidden"]
    embed = model["vocab"] * hidden * (1 if model.get("tie_word_embeddings") else 2)
    per_layer = (model["total_params"] - embed) / layers
    if per_layer / hidden < OFFLOAD_MIN_LAYER_PARAMS_PER_HIDDEN:
        return False, "auto: off (the layers are too small to hide the copies)"
    pinned = est.get("host_checkpoints_bytes_offloaded") or 0
    host = host_available_bytes() if host_bytes is None else host_bytes
    if host is not None and pinned > OFFLOAD_MAX_HOST_SHARE * host:
        return False, (f"auto: off ({pinned / GIB:.1f} GiB of checkpoints > {OFFLOAD_MAX_HOST_SHARE:.0%} of the "
                       f"host's {host / GIB:.1f} GiB free)")
    if needed:
        return True, (f"auto: on (estimated {on_gpu / GIB:.1f} GiB with the layer inputs on the GPU > "
                      f"{limit_bytes / GIB:.1f} GiB)")
    return True, "auto: on (the layers' compute hides the copies)"


def tiled_mlp(recipe: Any, p: dict, est: dict | None, device: str, limit_bytes: int | None = None) -> bool:
    """`train.tiled_mlp` resolved: the recipe's true/false, or under auto for CUDA SFT runs that would not fit
    `limit_bytes` with whole MLPs (the estimate `est`'s peak with the layer inputs where plan `p` keeps them)."""
    v = recipe.train.tiled_mlp
    if v != "auto":
        return bool(v)
    key = "peak_bytes_offloaded" if p.get("offload_activations") else "peak_bytes_layer_inputs_on_gpu"
    whole = (est or {}).get(key)
    return (device == "cuda" and recipe.method == "sft" and limit_bytes is not None and whole is not None
            and whole > limit_bytes)


def offload_embeddings(recipe: Any, p: dict) -> bool:
    """`train.offload_embeddings` resolved for plan `p`: the recipe's true/false, or under auto exactly when
    the CUDA graphs of `p` were chosen on the condition that the embeddings leave the GPU."""
    v = recipe.train.offload_embeddings
    if v != "auto":
        return bool(v)
    return (recipe.train.cuda_graphs == "auto" and bool(p.get("cuda_graphs")) and not p.get("cuda_graphs_fit")
            and bool(p.get("cuda_graphs_fit_offloaded")) and not p.get("padding_free"))


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


def plan(recipe: Any, device: str = "cuda", estimate_result: dict | None = None, *,
         budget_bytes: int | None = None, compute_dtype: str | None = None, liger_ok: bool | None = None,
         lengths: list[int] | None = None, expandable_segments: bool = False,
         host_bytes: float | None = None, device_bytes: int | None = None) -> Plan:
    """Decide the speed levers of one run.

    Args:
        recipe: the validated Recipe.
        device: "cuda" or "cpu": the device the run trains on.
        estimate_result: lorakit.estimate's result, where a choice depends on memory (budget mode, CUDA graphs'
            fit; keys `peak_bytes_*`, `allocated_bytes_*`, `model` {num_layers, total_params}, or `error`).
        budget_bytes: the memory budget; defaults to train.memory_budget_gb.
        compute_dtype: the run's compute dtype name ("bf16", ...); None: as this machine's GPU resolves it
            (the estimate passes the dtype of the GPU it plans for).
        liger_ok: whether Liger can run; None: probe this machine.
        lengths: the training rows' token counts once the data is prepared (an empty list: not tokenized before
            training); None: not known (the estimate).
        expandable_segments: whether the CUDA allocator grows segments in place for this run (recorded only).
        host_bytes: the host memory available to pin offloaded checkpoints; None: this machine's now;
            float("inf"): not a limit (planning for a machine whose memory is not known).
        device_bytes: the memory of the GPU the run trains on, where known: the tiled MLP (and for GRPO the
            offloaded layer inputs) are turned on under `auto` where the run would not fit it (or the budget)
            otherwise.

    Returns:
        The Plan.
    """
    p = _levers(recipe, device, estimate_result, budget_bytes=budget_bytes, compute_dtype=compute_dtype,
                liger_ok=liger_ok)
    notes: list[str] = []
    settled: list[tuple[str, str, Any]] = []
    if lengths and _settles_padding_free_off(recipe, p, lengths):
        waste = padding_waste(lengths, recipe.train.batch_size, recipe.train.seed)
        notes.append(f"speed: padding-free off (padded batches would waste only {100 * waste:.0f}% of tokens)")
        settled.append(("data", "padding_free", False))
        # unflattened rows: `auto` attention is sdpa whatever the dtype (attention's `flattened` is false)
        p.update(padding_free=False, attn_implementation=attention(recipe, device, False))
    graphs = recipe.train.cuda_graphs
    one_shape = len(set(lengths)) == 1 if lengths else None
    if graphs == "auto":
        p["cuda_graphs"] = cuda_graphs_auto(recipe, p, device, one_shape)
        if lengths is not None and p["cuda_graphs"] != cuda_graphs_auto(recipe, p, device):
            settled.append(("train", "cuda_graphs", p["cuda_graphs"]))  # the rows decided it
    else:
        p["cuda_graphs"] = bool(graphs) and cuda_graphs_hold(recipe, p, device)
    if p["cuda_graphs"] and p["padding_free"] and lengths is not None:
        if not lengths:  # not tokenized before training: no length to pad to, and a graph per shape would not pay
            p["cuda_graphs"] = False
            notes.append("speed: CUDA graphs off (padding-free batches, row lengths unknown before training)")
            settled.append(("train", "cuda_graphs", False))
        else:
            p["graph_length"] = graph_length(lengths, recipe.train.batch_size, recipe.train.seed)
            p["graph_max_row"] = max(recipe.data.max_length, *lengths)  # no pad row longer than the longest row
            notes.append(f"speed: padding-free batches padded to {p['graph_length']} tokens for CUDA graphs "
                         f"({QUANTILE:.0%} of batches fit; longer ones run without)")
    limit = p.get("memory_budget_bytes") or device_bytes
    p["offload_activations"], why = offload_activations(recipe, p, estimate_result, device, host_bytes, limit)
    if p["offload_activations"] and recipe.train.offload_activations == "auto":
        p["checkpointing_reason"] += "; layer inputs in host memory"
    elif "host" in why:  # the one case a user may not expect: the host's memory ruled it out
        notes.append(f"speed: layer inputs stay on the GPU{why[len('auto: off'):]}")
    elif why.startswith("off:"):  # asked for, and nothing to offload
        notes.append(f"speed: train.offload_activations is {why}")
    p["tiled_mlp"] = tiled_mlp(recipe, p, estimate_result, device, limit)
    p["offload_embeddings"] = offload_embeddings(recipe, p)
    p["offload_embeddings_required"] = recipe.train.offload_embeddings is True
    p["generation_graphs"] = generation_graphs(recipe, device)
    if graphs == "auto" and p["cuda_graphs"]:
        p["checkpointing_reason"] += auto_graphs_reason(p)
    elif graphs is True and not p["cuda_graphs"]:
        p["checkpointing_reason"] += ("; train.cuda_graphs: true does not hold here (it needs CUDA, checkpointed "
                                      "layers, the fused LoRA layer and LoRA dropout in its kernels or none)")
    return Plan(**p, expandable_segments=expandable_segments, notes=tuple(notes), settled=tuple(settled))


def _settles_padding_free_off(recipe: Any, p: dict, lengths: list[int]) -> bool:
    """`data.padding_free: auto` chose padding-free before the rows were known: off when padded batches of these
    rows would waste too little (an explicit varlen attention keeps it: it needs the flattened rows)."""
    return (recipe.method == "sft" and recipe.data.padding_free == "auto" and p["padding_free"]
            and recipe.model.attn_implementation != "varlen"
            and not padding_free_worth_it(lengths, recipe.train.batch_size, recipe.train.seed))


def _levers(recipe: Any, device: str, estimate_result: dict | None, *, budget_bytes: int | None,
            compute_dtype: str | None, liger_ok: bool | None) -> dict:
    """The levers before CUDA graphs and the rows' lengths: a dict of Plan fields."""
    cuda = device == "cuda"
    train, data = recipe.train, recipe.data
    bits = recipe.quantization.resolved_bits(device)
    liger = train.liger
    if liger == "auto":
        liger = cuda and (liger_available() if liger_ok is None else liger_ok)
    fused = train.fused_lora
    if fused == "auto":
        fused = cuda and fused_lora_supported(recipe, bits) and recipe.distributed.strategy != "fsdp"
    padding_free = data.padding_free
    if padding_free == "auto":  # an explicit varlen attention needs the flattened rows' boundaries, anywhere
        padding_free = recipe.method == "sft" and not data.packing and (
            (cuda and train.batch_size > 1) or recipe.model.attn_implementation == "varlen")
    cdt = (compute_dtype or run_dtype_name(recipe, device)) if cuda else None
    frozen = "bf16" if cuda and bits == 4 and cdt == "bf16" else None
    # attention inputs stay 16-bit where the residual stream does: frozen weights kept bf16, or a 16-bit base
    sixteen_bit = cdt in ("bf16", "fp16") and (frozen is not None or bits is None)
    # the fused layer's dropout inside Triton kernels (CUDA builds of torch bring Triton)
    dropout_kernel = bool(fused) and cuda and recipe.lora.dropout > 0 and lora_dropout.covers(
        recipe.lora.r, 2 if cdt in ("bf16", "fp16") else 4)
    out: dict[str, Any] = {
        "liger": bool(liger), "fused_lora": bool(fused), "dropout_kernel": dropout_kernel,
        "padding_free": bool(padding_free),
        "attn_implementation": attention(recipe, device, bool(padding_free), sixteen_bit),
        "frozen_dtype": frozen, "gradient_checkpointing": False, "checkpoint_layers": 0,
        "memory_budget_bytes": None, "checkpointing_reason": "",
    }
    n_params = ((estimate_result or {}).get("model") or {}).get("total_params")
    if n_params is not None:
        out["model_params"] = int(n_params)
    gc = train.gradient_checkpointing
    if gc is True or gc is False:
        out.update(gradient_checkpointing=gc, checkpoint_layers=None if gc else 0, checkpointing_reason="recipe")
        return out
    if isinstance(gc, int):
        out.update(gradient_checkpointing=gc > 0, checkpoint_layers=gc,
                   checkpointing_reason=f"recipe: the first {gc} layers")
        return out
    if not cuda:
        out["checkpointing_reason"] = "auto: none on CPU"
        return out
    if budget_bytes is None and train.memory_budget_gb is not None:
        budget_bytes = int(train.memory_budget_gb * GIB)
    out["gradient_checkpointing"], out["checkpoint_layers"] = True, None
    est = estimate_result or {}
    if budget_bytes is None:
        out["checkpointing_reason"] = ("auto: every layer (the plain stack's memory); "
                                       "set train.memory_budget_gb to trade memory for speed")
        eager, offloaded = est.get("allocated_bytes_checkpointed"), est.get("allocated_bytes_graphs_offloaded")
        if eager is not None and offloaded is not None and offloaded <= eager:
            out["cuda_graphs_fit_offloaded"] = True
            out["estimated_allocated_bytes"] = {"all_layers": int(eager), "graphs_offloaded": int(offloaded)}
        return out
    out["memory_budget_bytes"] = int(budget_bytes)
    n_layers = (est.get("model") or {}).get("num_layers")
    base_peak, peak_none = est.get("peak_bytes_checkpointed"), est.get("peak_bytes_uncheckpointed")
    if base_peak is None or peak_none is None or not n_layers:
        why = est.get("error") or "no memory estimate"
        out["checkpointing_reason"] = f"budget: {why}; every layer checkpointed"
        return out
    per_layer = (int(peak_none) - int(base_peak)) / n_layers  # each layer left un-checkpointed adds this
    k = checkpoint_layers_for_budget(n_layers, int(base_peak), int(per_layer), int(budget_bytes))
    out["estimated_peak_bytes"] = {"all_layers": int(base_peak), "no_layers": int(peak_none)}
    if 0 < k < n_layers and not PARTIAL_CHECKPOINTING_PAYS:
        k = n_layers
    budget_gib = budget_bytes / GIB
    if k == 0:
        out.update(gradient_checkpointing=False, checkpoint_layers=0,
                   checkpointing_reason=f"budget: none (estimated peak {peak_none / GIB:.1f} GiB fits "
                                        f"{budget_gib:.1f} GiB)")
    elif k >= n_layers:
        fits = "" if base_peak <= budget_bytes else " (estimated peak exceeds the budget even so)"
        out["checkpointing_reason"] = (f"budget: every layer (estimated {base_peak / GIB:.1f} GiB; without "
                                       f"checkpointing {peak_none / GIB:.1f} GiB > {budget_gib:.1f} GiB){fits}")
        graphs_peak = est.get("peak_bytes_checkpointed_graphs")
        if graphs_peak is not None and graphs_peak <= budget_bytes:
            out["cuda_graphs_fit"] = True  # plan() says so in the reason when it turns them on
            out["estimated_peak_bytes"]["all_layers_graphs"] = int(graphs_peak)
    else:
        out.update(checkpoint_layers=k, checkpointing_reason=f"budget: the first {k} of {n_layers} layers "
                                                              f"fit {budget_gib:.1f} GiB")
    return out


def needs_estimate(recipe: Any, device: str) -> bool:
    """Whether `plan` reads the memory estimate for this recipe on `device`: CUDA with checkpointing `auto`, and
    a budget to choose within, CUDA graphs `auto` to fit or activation offloading `auto` to decide (from the
    model's shape)."""
    wants_graphs = recipe.train.cuda_graphs == "auto" and recipe.method == "sft"
    return device == "cuda" and recipe.train.gradient_checkpointing == "auto" and bool(
        recipe.train.memory_budget_gb or wants_graphs or recipe.train.offload_activations == "auto")


def describe(p: Plan) -> str:
    """One line for the console: which levers are on and why checkpointing is what it is."""
    k = p.checkpoint_layers
    gc = ("every layer" if k is None else f"first {k} layers") if p.gradient_checkpointing else "off"
    on = [name for flag, name in ((p.liger, "liger"), (p.fused_lora, "fused LoRA"),
                                  (p.dropout_kernel, "LoRA dropout kernel"), (p.padding_free, "padding-free"),
                                  (p.cuda_graphs, "CUDA graphs per layer")) if flag]
    attn = {"flex_attention": "flex attention", "varlen": "varlen attention"}.get(p.attn_implementation)
    if attn:
        on.append(attn)
    if p.frozen_dtype:
        on.append(f"frozen weights {p.frozen_dtype}")
    if p.offload_activations:
        on.append("layer inputs in host memory")
    if p.tiled_mlp:
        on.append("tiled MLP")
    if p.offload_embeddings:
        on.append("input embeddings in host memory")
    if p.expandable_segments:
        on.append("expandable segments")
    if p.generation_graphs:
        on.append("generation over a static cache with CUDA graphs")
    why = p.checkpointing_reason
    return f"speed: {', '.join(on) or 'no levers'}; gradient checkpointing {gc}" + (f" ({why})" if why else "")


def sft_config_kwargs(p: Plan) -> dict:
    """SFT-only keyword arguments for TRL's SFTConfig from plan `p`."""
    kw: dict[str, Any] = {"padding_free": p.padding_free}
    if p.padding_free:
        # TRL refuses padding_free + max_length without packing: rows come already truncated
        # (lorakit.data truncates to data.max_length), so the trainer gets max_length=None.
        kw["max_length"] = None
    return kw
