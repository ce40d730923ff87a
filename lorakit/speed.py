"""Training speed levers, decided once from the recipe (`plan`) and applied by models.py / train.py.

Each lever keeps the math of the plain TRL + peft + bitsandbytes stack (same loss, same gradients up to
bf16 rounding) and is a recipe option; `plan` resolves their `auto` values for a device:

- train.liger: Liger RMSNorm / SwiGLU / RoPE kernels (TRL's `use_liger_kernel`; TRL's own fused LM head
  already avoids the full logits, so Liger's fused cross-entropy is not used).
- train.fused_lora: a LoRA layer class registered through peft's custom-module API whose forward is one
  autograd function: dropout -> x@A^T -> addmm(base, h, B^T, alpha=scale). It drops peft's defensive clone
  and the separate scale/add kernels, and saves the dropout mask instead of the dropped copy of x (rebuilt
  in backward from x, which the base layer keeps anyway). On CUDA with Triton the dropout is drawn inside
  the x@A^T kernel and again in backward (lorakit.lora_triton: no mask, no dropped copy, fewer kernels;
  8B shape, H200: 6824 vs 6242 tok/s and -0.26 GiB, bench/train.md). In training the base layer's matmul joins
  that function too (`lora_linear`): the base GEMMs add onto the LoRA parts in their epilogue (8B fixed rows,
  H200: 418 -> 398 ms a step, bench/train_keep_weights.md). The adapter saved is a plain peft adapter.
- train.gradient_checkpointing / train.memory_budget_gb: every layer (default on CUDA, the plain stack's
  memory), none, the first K layers, or - in budget mode - the fastest setting whose estimated peak fits.
- data.padding_free: flattened batches (TRL's padding_free; attention keeps rows apart through
  position_ids); rows come truncated to data.max_length from data.prepare_sft. With CUDA graphs each batch is
  padded to one length (lorakit.graph_length) so that the graphs replay every batch.
- model.attn_implementation: auto = varlen attention for padding-free batches on CUDA, else sdpa. Padding-free
  batches carry a per-row (block-diagonal) mask; SDPA cannot use its flash kernel with a mask and computes the
  whole square of the flattened row; flex attention skips the masked blocks (8B, varied lengths, H200:
  5651 vs 3793 tok/s, bench/train.md); varlen attention (lorakit.varlen_attention) runs torch's flash kernel
  on the rows' boundaries, with no mask at all. Models whose attention it does not fit keep flex (models.py).
- Not a switch but the build path: on CUDA a 4-bit base with bf16 compute keeps its unquantized frozen
  weights (embeddings, norms, lm_head) in bf16, as TRL does, instead of peft's
  `prepare_model_for_kbit_training` fp32 upcast (which makes the residual stream fp32: ~25% slower and
  +3.6 GiB at the 8B shape, bench/train.md). Under bf16 autocast the matmuls ran in bf16 either way.

Heavy imports live inside the functions.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lorakit import lora_triton, recompute_tail

GIB = 1024**3

# Measured on an H100 (bench/train.md, 8B shape, 2x2048 tokens): leaving 4 or 8 of 32 layers un-checkpointed
# gained nothing over checkpointing every layer (7306 / 7620 vs 7701 tok/s), only no checkpointing at all
# paid (~1.4x). So budget mode picks "none" or "all", never a partial count (a recipe may still ask for K).
PARTIAL_CHECKPOINTING_PAYS = False


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def liger_available() -> bool:
    """liger-kernel is importable and has a GPU to run on (its kernels are Triton/CUDA only)."""
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return False
    import torch

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
    kernel's; `sixteen_bit`), sdpa otherwise. At load (models.attn_implementation) a model whose attention
    varlen does not fit falls back to flex attention, then to sdpa."""
    a = recipe.model.attn_implementation
    if a != "auto":
        return a
    flattened = padding_free or recipe.data.packing
    return "varlen" if device == "cuda" and flattened and recipe.method == "sft" and sixteen_bit else "sdpa"


def _compute_dtype(recipe: Any, device: str, bits: int | None) -> str:
    from lorakit.models import compute_dtype_name, weights_dtype_name

    return compute_dtype_name(recipe, device) if bits else weights_dtype_name(recipe, device)


def cuda_graphs_hold(recipe: Any, p: dict, device: str) -> bool:
    """CUDA graphs can replay the checkpointed layers of plan `p`: CUDA, checkpointing on, the fused LoRA layer
    (no autocast cast cache in a layer), LoRA dropout inside the Triton kernels or none (torch's dropout
    cannot be drawn again inside a replay), and no torch.compile (untested together)."""
    return (device == "cuda" and bool(p.get("gradient_checkpointing")) and bool(p.get("fused_lora"))
            and (recipe.lora.dropout == 0 or bool(p.get("dropout_kernel"))) and not recipe.train.torch_compile)


# Padding-free batches replay graphs, padded to one length (lorakit.graph_length), on models up to this size:
# measured to pay on the 1B and 8B shapes (8 chat-length rows a step, H200, bench/train_graph_length.md: 294 -> 230
# and 645 -> 574 ms a step; eager, the 1B step's kernels were busy 74 ms of 411). Larger models are more bound by
# the GPU, where the padding's compute would cost more than the host's launches: not measured, they stay eager.
PADDED_GRAPHS_MAX_PARAMS = 9_000_000_000


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
    graphs (`cuda_graphs_fit_offloaded`: on the 8B shape at 2x2048 the pool holds 1.2 GiB, the table is 1 GiB,
    and lorakit's eager run is 0.5 GiB under the plain stack's peak). Padding-free batches (a new shape every
    batch) on a model where that pays (`padded_graphs_pay`): padded to one length, without a budget or where the
    graphs' estimated peak fits it (8B, 8 chat-length rows: 10.1 GiB allocated against 8.3 eager; the plain
    stack, which pads every batch to its longest row, 14.8).
    `one_shape`: whether the data's rows all have one length (None: not known yet; train.py settles it on the
    data)."""
    from lorakit.distributed import launched

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


def offload_embeddings(recipe: Any, p: dict) -> bool:
    """`train.offload_embeddings` resolved for plan `p`: the recipe's true/false, or under auto exactly when
    the CUDA graphs of `p` were chosen on the condition that the embeddings leave the GPU."""
    v = recipe.train.offload_embeddings
    if v != "auto":
        return bool(v)
    return (recipe.train.cuda_graphs == "auto" and bool(p.get("cuda_graphs")) and not p.get("cuda_graphs_fit")
            and bool(p.get("cuda_graphs_fit_offloaded")) and not p.get("padding_free"))


def plan(recipe: Any, device: str = "cuda", estimate_result: dict | None = None, *,
         budget_bytes: int | None = None, compute_dtype: str | None = None, liger_ok: bool | None = None) -> dict:
    """Decide the levers for one run (see `_plan`); `cuda_graphs` follows from the others."""
    out = _plan(recipe, device, estimate_result, budget_bytes=budget_bytes, compute_dtype=compute_dtype,
                liger_ok=liger_ok)
    graphs = recipe.train.cuda_graphs
    out["cuda_graphs"] = (cuda_graphs_auto(recipe, out, device) if graphs == "auto"
                          else bool(graphs) and cuda_graphs_hold(recipe, out, device))
    out["offload_embeddings"] = offload_embeddings(recipe, out)
    out["offload_embeddings_required"] = recipe.train.offload_embeddings is True
    if graphs == "auto" and out["cuda_graphs"]:
        out["checkpointing_reason"] += auto_graphs_reason(out)
    elif graphs is True and not out["cuda_graphs"]:
        out["checkpointing_reason"] += ("; train.cuda_graphs: true does not hold here (it needs CUDA, checkpointed "
                                        "layers, the fused LoRA layer and LoRA dropout in its kernels or none)")
    return out


def _plan(recipe: Any, device: str = "cuda", estimate_result: dict | None = None, *,
          budget_bytes: int | None = None, compute_dtype: str | None = None, liger_ok: bool | None = None) -> dict:
    """Decide the levers for one run. Returns a plain dict (in summary.json under `options`).

    `estimate_result` is lorakit.estimate.estimate(...)'s dict (only budget mode reads it: keys
    `peak_bytes_checkpointed`, `peak_bytes_uncheckpointed` and `model` {num_layers});
    `budget_bytes` defaults to train.memory_budget_gb. `compute_dtype` / `liger_ok` stand in for probing
    this machine's GPU (the estimate plans for a GPU it does not have).

    checkpoint_layers: None = every decoder layer (the Trainer's own checkpointing), 0 = none, K = the first K
    layers (set on the model by `apply_to_model`, the Trainer is told it is off).
    """
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
    cdt = compute_dtype or (_compute_dtype(recipe, device, bits) if cuda else None)
    frozen = "bf16" if cuda and bits == 4 and cdt == "bf16" else None
    # attention inputs stay 16-bit where the residual stream does: frozen weights kept bf16, or a 16-bit base
    sixteen_bit = cdt in ("bf16", "fp16") and (frozen is not None or bits is None)
    # the fused layer's dropout inside Triton kernels (lorakit.lora_triton; CUDA builds of torch bring Triton)
    dropout_kernel = bool(fused) and cuda and recipe.lora.dropout > 0 and lora_triton.covers(
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


def plan_for_run(recipe: Any, device: str) -> dict:
    """`plan` with the memory estimate it needs (CUDA, checkpointing auto: budget mode and CUDA graphs' fit;
    config files, no weights)."""
    est = None
    wants_graphs = recipe.train.cuda_graphs == "auto" and recipe.method == "sft"
    if device == "cuda" and recipe.train.gradient_checkpointing == "auto" and (
            recipe.train.memory_budget_gb or wants_graphs):
        from lorakit.errors import LorakitError
        from lorakit.estimate import estimate

        try:
            est = estimate(recipe, device=device)
        except LorakitError as e:  # the model load reports recipe problems with their lines; here: fall back
            est = {"error": f"memory estimate failed ({e.message})"}
    return plan(recipe, device, est)


def describe_levers(p: dict) -> str:
    """One line for the console: which levers are on and why checkpointing is what it is."""
    k = p.get("checkpoint_layers")
    gc = ("every layer" if k is None else f"first {k} layers") if p.get("gradient_checkpointing") else "off"
    on = [name for key, name in (("liger", "liger"), ("fused_lora", "fused LoRA"),
                                 ("dropout_kernel", "LoRA dropout kernel"), ("padding_free", "padding-free"),
                                 ("cuda_graphs", "CUDA graphs per layer")) if p.get(key)]
    attn = {"flex_attention": "flex attention", "varlen": "varlen attention"}.get(p.get("attn_implementation"))
    if attn:
        on.append(attn)
    if p.get("frozen_dtype"):
        on.append(f"frozen weights {p['frozen_dtype']}")
    if p.get("offload_embeddings"):
        on.append("input embeddings in host memory")
    if p.get("expandable_segments"):
        on.append("expandable segments")
    why = p.get("checkpointing_reason") or ""
    return f"speed: {', '.join(on) or 'no levers'}; gradient checkpointing {gc}" + (f" ({why})" if why else "")


def checkpointing_arg_names() -> tuple[str, str]:
    """(flag, kwargs) field names of transformers' TrainingArguments: `activation_checkpointing*` in recent
    releases (the old names are deprecated aliases there), `gradient_checkpointing*` before."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        return "activation_checkpointing", "activation_checkpointing_kwargs"
    return "gradient_checkpointing", "gradient_checkpointing_kwargs"


def trainer_checkpointing(p: dict) -> bool:
    """Whether the Trainer itself checkpoints (every layer); partial checkpointing and CUDA graphs are set on the
    model (apply_to_model)."""
    return bool(p.get("gradient_checkpointing")) and p.get("checkpoint_layers") is None and not p.get("cuda_graphs")


def sft_config_kwargs(p: dict) -> dict:
    """SFT-only keyword arguments for TRL's SFTConfig from plan `p`."""
    kw: dict[str, Any] = {"padding_free": bool(p.get("padding_free"))}
    if kw["padding_free"]:
        # TRL refuses padding_free + max_length without packing: rows come already truncated
        # (data.prepare_sft truncates to data.max_length), so the trainer gets max_length=None.
        kw["max_length"] = None
    return kw


# ----------------------------------------------------------------------------------------------
# Model-side levers
# ----------------------------------------------------------------------------------------------


def decoder_layers(model: Any) -> list:
    """The repeated decoder blocks (transformers' GradientCheckpointingLayer instances), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_checkpointing(model: Any, checkpoint_layers: int | None) -> int:
    """Checkpoint the first `checkpoint_layers` decoder layers (None = all), keep the activations of the rest.
    Returns the number of layers checkpointed."""
    base = _unwrap(model)
    layers = decoder_layers(base)
    k = len(layers) if checkpoint_layers is None else max(0, min(int(checkpoint_layers), len(layers)))
    if k == 0:
        on = getattr(base, "is_activation_checkpointing", None)
        if on is None:
            on = getattr(base, "is_gradient_checkpointing", False)
        if on:
            disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            disable()
        return 0
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < k
    return k


def apply_to_model(model: Any, p: dict, recorder: Any = None) -> dict:
    """Apply the model-side levers of plan `p` to a (peft-wrapped) model: partial gradient checkpointing
    (every-layer checkpointing is the Trainer's) and CUDA graphs for the checkpointed layers
    (lorakit.layer_graphs; `recorder` stands in for the GPU's graph capture in tests). Call after
    get_peft_model. Returns what was done."""
    done: dict[str, Any] = {}
    k = p.get("checkpoint_layers")
    if p.get("gradient_checkpointing") and k is not None:
        n = len(decoder_layers(_unwrap(model)))
        if k > n:
            from lorakit.errors import LorakitError

            raise LorakitError(f"train.gradient_checkpointing: the model has {n} decoder layers; got {k}",
                               field="train.gradient_checkpointing",
                               hint=f"use a number from 0 to {n}, or true for every layer")
    # planned graphs: the Trainer (its arguments planned from the recipe) leaves checkpointing to the model
    planned_graphs = graphs = bool(p.get("cuda_graphs"))
    if p.get("offload_embeddings"):
        from lorakit import host_embedding

        why = host_embedding.problem(model)
        if why is None:
            done["offloaded_embedding_bytes"] = host_embedding.offload(model)
        elif p.get("offload_embeddings_required"):
            from lorakit.errors import LorakitError

            raise LorakitError(why, field="train.offload_embeddings",
                               hint="set train.offload_embeddings: auto or false")
        else:  # auto: the graphs were chosen on the condition that the embeddings leave the GPU; plain
            # checkpointing of every layer instead, set here
            p["offload_embeddings"] = graphs = p["cuda_graphs"] = False
            done["not_offloaded"] = why
    if p.get("gradient_checkpointing") and (k is not None or planned_graphs):  # else the Trainer checkpoints
        done["checkpoint_layers"] = set_checkpointing(model, k)
        if graphs:
            from lorakit import layer_graphs

            layer_graphs.enable(decoder_layers(_unwrap(model)), recorder)
    return done


# ----------------------------------------------------------------------------------------------
# Fused LoRA layer (peft custom module)
# ----------------------------------------------------------------------------------------------


def lora_delta(result: Any, x: Any, a_w: Any, b_w: Any, p: float, scale: float, training: bool) -> Any:
    """result + scale * dropout(x) @ A^T @ B^T as one autograd function (see module docstring)."""
    return _fns()[0].apply(result, x, a_w, b_w, float(p) if training else 0.0, float(scale))


def lora_linear(base: Any, x: Any, a_w: Any, b_w: Any, p: float, scale: float, training: bool,
                skip: bool = False) -> Any:
    """base(x) + scale * dropout(x) @ A^T @ B^T as one autograd function, for a frozen base layer whose output
    dtype is x's (`linear_dtype`). Against base(x) followed by `lora_delta`: the LoRA parts come first and the base
    matmuls add onto them (cuBLAS reads them in its epilogue, inside a compute-bound GEMM) instead of a separate
    memory-bound pass over the output in forward and over the input gradient in backward. The backward
    dequantizes a 4-bit weight again, as bitsandbytes' own does: keeping the forward's copy inside a graphed
    recompute saved 1% of the 8B step for 0.31 GiB of pool (bench/train_keep_weights.md, call 7).
    `skip`: the output is not computed at all (a recompute that nothing reads: lorakit.recompute_tail); its
    backward is the same."""
    return _fns()[1].apply(x, a_w, b_w, base, float(p) if training else 0.0, float(scale), bool(skip))


def linear_dtype(base: Any, x: Any) -> Any:
    """The dtype base(x) computes in when `lora_linear` can stand in for it - a frozen bitsandbytes 4-bit layer
    computing in x's dtype, or a frozen torch Linear computing in x's dtype (under autocast: its dtype) - else
    None."""
    import torch

    w = getattr(base, "weight", None)
    bias = getattr(base, "bias", None)
    if w is None or w.requires_grad or (bias is not None and bias.requires_grad):
        return None
    if hasattr(w, "quant_state"):
        ok = w.quant_state is not None and getattr(base, "compute_dtype", None) == x.dtype
        return x.dtype if ok else None
    if type(base) is torch.nn.Linear:
        dev = x.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w.dtype
        return cdt if x.dtype == cdt else None
    return None


_FNS: tuple = ()


def _fns() -> tuple:
    """(_LoraDelta, _LoraLinear), defined on first use (importing this module does not import torch)."""
    global _FNS
    if _FNS:
        return _FNS
    import torch

    def down(ctx, x2, a_c, p):
        """h = dropout(x2) @ A^T: (h, mask or None); sets ctx.seed when the Triton kernels drew the mask."""
        ctx.seed = None
        kernel = p > 0 and x2.shape[0] > 0 and x2.stride(-1) == 1
        seeds = lora_triton.active_seeds() if p > 0 else None
        if kernel and lora_triton.available(x2.device.type, a_c.dtype, a_c.shape[0]):
            # dropout inside the matmul (lorakit.lora_triton): the mask comes from this seed, again in
            # backward (ctx keeps it; a checkpointed layer's recompute only rebuilds x). Under a CUDA
            # graph (lorakit.layer_graphs) the seed lives in device memory, redrawn before each replay.
            ctx.seed = seeds.take() if seeds is not None else int(torch.randint(0, 2**31 - 1, (1,)))
            return lora_triton.down_forward(x2, a_c, p, ctx.seed), None
        if seeds is not None:
            raise RuntimeError("LoRA dropout inside a CUDA graph needs the Triton dropout kernels")
        xd, mask = torch.native_dropout(x2, p, True) if p > 0 else (x2, None)
        return xd.to(a_c.dtype) @ a_c.t(), mask

    def lora_grads(ctx, g, x2, mask, a_w, b_w, h, need_x, need_a, need_b):
        """(grad of x2, of A, of B; None where not needed) of scale * down(x2) @ B^T for the output gradient g
        (in the compute dtype)."""
        p, a_c = ctx.p, a_w.to(g.dtype)
        grad_h = (g @ b_w.to(g.dtype)) * ctx.scale
        grad_b = ((h.t() @ g) * ctx.scale).t().to(b_w.dtype) if need_b else None
        if ctx.seed is not None:
            gx, ga = lora_triton.down_backward(x2, a_c, grad_h, p, ctx.seed, need_x)
            return gx, (ga.to(a_w.dtype) if need_a else None), grad_b
        grad_a = grad_x = None
        if need_a:
            xd = torch.ops.aten.native_dropout_backward(x2, mask, 1.0 / (1.0 - p)) if mask is not None else x2
            grad_a = (grad_h.t() @ xd.to(a_c.dtype)).to(a_w.dtype)
        if need_x:
            gxd = grad_h @ a_c
            if mask is not None:
                gxd = torch.ops.aten.native_dropout_backward(gxd, mask, 1.0 / (1.0 - p))
            grad_x = gxd.to(x2.dtype)
        return grad_x, grad_a, grad_b

    class _LoraDelta(torch.autograd.Function):
        @staticmethod
        def forward(ctx, result, x, a_w, b_w, p, scale):
            cdt = result.dtype
            ctx.p, ctx.scale, ctx.cdt, ctx.xshape = p, scale, cdt, x.shape
            with torch.autocast(device_type=x.device.type, enabled=False):
                x2 = x.reshape(-1, x.shape[-1])
                h, mask = down(ctx, x2, a_w.to(cdt), p)
                out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b_w.to(cdt).t(), alpha=scale)
            ctx.save_for_backward(x2, mask, a_w, b_w, h)
            return out.view(result.shape)

        @staticmethod
        def backward(ctx, grad):
            x2, mask, a_w, b_w, h = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1]).to(ctx.cdt)
            grad_x, grad_a, grad_b = lora_grads(ctx, g, x2, mask, a_w, b_w, h, *ctx.needs_input_grad[1:4])
            grad_x = grad_x.view(ctx.xshape) if grad_x is not None else None
            return (grad if ctx.needs_input_grad[0] else None), grad_x, grad_a, grad_b, None, None

    class _LoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a_w, b_w, base, p, scale, skip):
            cdt = x.dtype
            ctx.p, ctx.scale, ctx.base, ctx.xshape = p, scale, base, x.shape
            with torch.autocast(device_type=x.device.type, enabled=False):
                x2 = x.reshape(-1, x.shape[-1])
                h, mask = down(ctx, x2, a_w.to(cdt), p)
                if skip:  # a recompute whose output nothing reads (lorakit.recompute_tail)
                    fill = recompute_tail.fill()
                    out = x2.new_empty((x2.shape[0], base.out_features))
                    if fill is not None:
                        out.fill_(fill)
                else:  # the LoRA part (+ bias) first, then the base matmul adds onto it
                    b_t = b_w.to(cdt).t()
                    if base.bias is not None:
                        out = torch.addmm(base.bias.to(cdt), h, b_t, alpha=scale)
                    else:
                        out = x2.new_empty((x2.shape[0], base.out_features))
                        torch.addmm(out, h, b_t, beta=0, alpha=scale, out=out)
                    out.addmm_(x2, recompute_tail.weight_of(base, cdt).t())
            ctx.save_for_backward(x2, mask, a_w, b_w, h)
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x2, mask, a_w, b_w, h = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            grad_x, grad_a, grad_b = lora_grads(ctx, g, x2, mask, a_w, b_w, h, *ctx.needs_input_grad[:3])
            if grad_x is not None:  # the base layer's input gradient added onto the LoRA part
                grad_x = grad_x.addmm_(g, recompute_tail.weight_of(ctx.base, x2.dtype))
                grad_x = grad_x.view(ctx.xshape)
            return grad_x, grad_a, grad_b, None, None, None, None

    _FNS = (_LoraDelta, _LoraLinear)
    return _FNS


def _fused_forward(self: Any, parent_forward: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    plain = (
        not self.disable_adapters and not self.merged and kwargs.get("adapter_names") is None
        and not any(a in self.lora_variant for a in self.active_adapters)
        and not any(self.lora_B[a].bias is not None for a in self.active_adapters if a in self.lora_B)
    )
    if not plain:
        return parent_forward(x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    skip = recompute_tail.skips(self) and not args and not kwargs
    names = [n for n in self.active_adapters if n in self.lora_A]
    if len(names) == 1 and not args and not kwargs and (skip or torch.is_grad_enabled()):
        # training: base and LoRA in one autograd function (lora_linear), where it computes as the base layer does
        name, dev = names[0], x.device.type
        a_w = self.lora_A[name].weight
        cdt = linear_dtype(self.base_layer, x)
        if cdt is not None and (torch.is_autocast_enabled(dev) or a_w.dtype == cdt):
            return lora_linear(self.base_layer, x, a_w, self.lora_B[name].weight, _dropout_p(self, name),
                               self.scaling[name], self.training, skip=skip)
    if skip:
        result = recompute_tail.unread_output(self.base_layer, x)  # a recompute that never reads it
    else:
        result = self.base_layer(x, *args, **kwargs)
    for name in names:
        if not torch.is_autocast_enabled(x.device.type) and result.dtype != self.lora_A[name].weight.dtype:
            # outside autocast peft computes in the adapter dtype: keep that path
            return parent_forward(x, *args, **kwargs)
        result = lora_delta(result, x, self.lora_A[name].weight, self.lora_B[name].weight,
                            _dropout_p(self, name), self.scaling[name], self.training)
    return result


def _dropout_p(layer: Any, name: str) -> float:
    """The adapter's LoRA dropout probability (peft puts an Identity where it is 0)."""
    import torch

    drop = layer.lora_dropout[name]
    return drop.p if isinstance(drop, torch.nn.Dropout) else 0.0


_CLASSES: dict = {}


def fused_lora_classes(bits: int | None) -> dict:
    """{base layer type: fused LoRA layer type} for peft's LoraConfig._register_custom_module."""
    if bits in _CLASSES:
        return _CLASSES[bits]
    import torch

    if bits == 4:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

        class FusedLoraLinear4bit(PeftLinear4bit):
            lorakit_fused = True

            def forward(self, x, *args, **kwargs):
                return _fused_forward(self, super().forward, x, *args, **kwargs)

        mapping = {bnb.nn.Linear4bit: FusedLoraLinear4bit}
    elif bits is None:
        from peft.tuners.lora.layer import Linear as PeftLinear

        class FusedLoraLinear(PeftLinear):
            lorakit_fused = True

            def forward(self, x, *args, **kwargs):
                return _fused_forward(self, super().forward, x, *args, **kwargs)

        mapping = {torch.nn.Linear: FusedLoraLinear}
    else:
        mapping = {}
    _CLASSES[bits] = mapping
    return mapping


def customize_lora_config(lora_config: Any, p: dict, bits: int | None) -> Any:
    """Register the fused LoRA layers on a peft LoraConfig when the plan asks for them (call before
    get_peft_model). The adapter saved is a plain peft LoRA adapter."""
    if p.get("fused_lora"):
        mapping = fused_lora_classes(bits)
        if mapping:
            lora_config._register_custom_module(mapping)
    return lora_config


# Padding-free batches cost ~12% on rows of one length (8B, H200: 6112 vs 6919 tok/s, bench/train_diagnostics.md:
# attention then runs per document) and pay ~2x on chat-like lengths; `auto` keeps them where padding is real.
PADDING_FREE_MIN_WASTE = 0.15


def padding_waste(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Fraction of a padded batch's tokens that would be padding, over one shuffled pass of the rows."""
    import random

    if not lengths or batch_size <= 1:
        return 0.0
    order = list(lengths)
    random.Random(seed).shuffle(order)
    padded = sum(max(order[i:i + batch_size]) * len(order[i:i + batch_size]) for i in range(0, len(order), batch_size))
    return 1.0 - sum(order) / padded if padded else 0.0


def padding_free_worth_it(lengths: list[int], batch_size: int, seed: int = 0) -> bool:
    """`data.padding_free: auto` after the data is known: on only when padded batches would waste enough."""
    return padding_waste(lengths, batch_size, seed) >= PADDING_FREE_MIN_WASTE

