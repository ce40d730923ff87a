"""Training speed levers, decided once from the recipe and applied by train.py / models.py.

Each lever keeps the math of the plain TRL + peft + bitsandbytes stack (same loss, same gradients up to
bf16 rounding) and is a recipe option:

- train.liger: Liger RMSNorm / SwiGLU / RoPE kernels (TRL's `use_liger_kernel`; TRL's own fused LM head
  already avoids the full logits).
- fused LoRA (on with liger/auto on CUDA): a LoRA layer class registered through peft's custom-module API
  whose forward is one autograd function: dropout -> x@A^T -> addmm(base, h, B^T, alpha=scale). It drops
  peft's defensive clone and the separate scale/add kernels, and saves the dropout mask instead of the
  dropped copy of x (the copy is rebuilt in backward from x, which is kept anyway).
- gradient checkpointing of only K of the N decoder layers, K chosen from a memory budget (budget mode).
- data.padding_free: flattened batches (TRL's padding_free; attention honours the sequence boundaries
  through position_ids).
- train.torch_compile: regional compile of the decoder layers.

Heavy imports live inside the functions.
"""

from __future__ import annotations

import importlib.util
from typing import Any

GIB = 1024**3


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def liger_available() -> bool:
    """liger-kernel is importable and has a GPU to run on (its kernels are Triton/CUDA only)."""
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()


def activation_bytes_per_layer(tokens: int, hidden: int, intermediate: int, *, liger: bool, fused_lora: bool) -> int:
    """Bytes a decoder layer keeps for backward when it is NOT checkpointed (bf16 activations, LoRA on
    all linears with dropout). Counted per token in bf16 elements of width `hidden` (h) and `intermediate` (i):
    fused LoRA + Liger ~ 12h + 7i bytes (H100, 8B shape, 2x2048 tokens: 0.50-0.57 GiB per layer measured,
    bench/train.md); plain peft ~ 21h + 13i (counted, not measured); Liger's SwiGLU saves ~2i."""
    per_h = 12 if fused_lora else 21
    per_i = 9 if fused_lora else 13
    if liger:
        per_i -= 2
    return int(tokens * (per_h * hidden + per_i * intermediate))


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


def _gc_setting(recipe: Any) -> Any:
    return getattr(recipe.train, "gradient_checkpointing", "auto")


def plan(recipe: Any, device: str = "cuda", estimate_result: dict | None = None, *,
         budget_bytes: int | None = None, free_bytes: int | None = None, shape: Any = None) -> dict:
    """Decide the levers for one run. Returns a plain dict (saved in the run directory, shown by the CLI).

    gradient_checkpointing: True -> all layers; False -> none; "auto" -> on CPU none, on CUDA the fewest
    layers that make the estimated peak fit min(budget_bytes, free_bytes * 0.9); an int K -> exactly K layers
    (the last N-K layers keep their activations).
    `estimate_result` is lorakit.estimate.estimate(...)'s dict; read keys: `peak_bytes_checkpointed`
    (peak with all layers checkpointed) and `tokens_per_micro_batch`; `shape` (lorakit.shapes.ModelShape) gives
    layers / hidden / intermediate sizes.
    """
    cuda = device == "cuda"
    train, data, lora, quant = recipe.train, recipe.data, recipe.lora, recipe.quantization
    bits = quant.resolved_bits(device)
    liger = train.liger
    if liger == "auto":
        liger = cuda and liger_available()
    fused_lora = bool(
        cuda and liger is not False
        and bits in (4, None)
        and not lora.dora and lora.bias == "none"
    )
    out: dict[str, Any] = {
        "device": device,
        "liger": bool(liger),
        "fused_lora": fused_lora,
        "padding_free": bool(data.padding_free),
        "torch_compile": bool(train.torch_compile),
        "frozen_dtype": "bf16" if cuda else None,
        "gradient_checkpointing": False,
        "checkpoint_layers": 0,
        "n_layers": None,
        "reason": "",
    }
    n_layers = getattr(shape, "num_layers", None) or getattr(shape, "num_hidden_layers", None)
    out["n_layers"] = n_layers
    gc = _gc_setting(recipe)
    if isinstance(gc, bool):
        out["gradient_checkpointing"] = gc
        out["checkpoint_layers"] = n_layers if gc else 0
        out["reason"] = "recipe"
        return out
    if isinstance(gc, int):
        out["gradient_checkpointing"] = gc > 0
        out["checkpoint_layers"] = gc
        out["reason"] = "recipe (layer count)"
        return out
    if not cuda:
        out["reason"] = "auto: CPU, no checkpointing"
        return out
    limits = [b for b in (budget_bytes, int(free_bytes * 0.9) if free_bytes else None) if b]
    est = estimate_result or {}
    base_peak = est.get("peak_bytes_checkpointed")
    if not limits or base_peak is None or shape is None or not n_layers:
        out.update(gradient_checkpointing=True, checkpoint_layers=n_layers, reason="auto: no estimate, all layers")
        return out
    tokens = est.get("tokens_per_micro_batch") or train.batch_size * data.max_length
    per_layer = activation_bytes_per_layer(
        tokens, shape.hidden_size, shape.intermediate_size, liger=bool(liger), fused_lora=fused_lora)
    k = checkpoint_layers_for_budget(n_layers, int(base_peak), per_layer, min(limits))
    if 0 < k < n_layers:
        # measured on H100 (bench/train.md): leaving 4 or 8 of 32 layers un-checkpointed gained nothing,
        # so a partial fit falls back to all layers; only "no checkpointing at all" pays.
        k = n_layers
    out.update(gradient_checkpointing=k > 0, checkpoint_layers=k,
               reason=f"auto: {k}/{n_layers} layers checkpointed to fit {min(limits) / GIB:.1f} GiB")
    return out


def sft_config_kwargs(p: dict) -> dict:
    """Keyword arguments for TRL's SFTConfig. Checkpointing is switched on by `apply_to_model` (per layer),
    so the Trainer is told it is off (otherwise it re-enables every layer when training starts)."""
    kw: dict[str, Any] = {
        "use_liger_kernel": bool(p.get("liger")),
        "padding_free": bool(p.get("padding_free")),
        "gradient_checkpointing": False,
    }
    if kw["padding_free"]:
        # TRL refuses padding_free + max_length without packing: rows must come already truncated
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
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
        return 0
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < k
    return k


def keep_frozen_in(model: Any, dtype: Any) -> int:
    """Cast frozen floating-point parameters kept in fp32 (embeddings, norms, lm_head after
    peft's prepare_model_for_kbit_training) back to `dtype`. Under bf16 autocast the matmuls already ran in
    bf16; this saves the memory and the per-step casts. Returns the number of bytes saved."""
    import torch

    saved = 0
    for prm in model.parameters():
        if not prm.requires_grad and prm.dtype == torch.float32 and prm.__class__.__name__ != "Params4bit":
            saved += prm.numel() * (4 - torch.empty((), dtype=dtype).element_size())
            prm.data = prm.data.to(dtype)
    return saved


def compile_layers(model: Any) -> int:
    """Regional torch.compile: each decoder layer compiled on its own (one graph reused by all layers)."""
    layers = decoder_layers(_unwrap(model))
    for layer in layers:
        layer.compile()
    return len(layers)


def apply_to_model(model: Any, p: dict) -> dict:
    """Apply the model-side levers of plan `p` to a (peft-wrapped) model. Call after get_peft_model and
    before building the trainer. Returns what was done."""
    import torch

    done: dict[str, Any] = {}
    if p.get("frozen_dtype") == "bf16":
        done["frozen_bf16_bytes_saved"] = keep_frozen_in(model, torch.bfloat16)
    n = p.get("checkpoint_layers") if p.get("gradient_checkpointing") else 0
    done["checkpoint_layers"] = set_checkpointing(model, n)
    if p.get("torch_compile"):
        done["compiled_layers"] = compile_layers(model)
    return done


# ----------------------------------------------------------------------------------------------
# Fused LoRA layer (peft custom module)
# ----------------------------------------------------------------------------------------------


def lora_delta(result: Any, x: Any, a_w: Any, b_w: Any, p: float, scale: float, training: bool) -> Any:
    """result + scale * dropout(x) @ A^T @ B^T as one autograd function (see module docstring)."""
    return _lora_fn().apply(result, x, a_w, b_w, float(p) if training else 0.0, float(scale))


_FN = None


def _lora_fn():
    global _FN
    if _FN is not None:
        return _FN
    import torch

    class _LoraDelta(torch.autograd.Function):
        @staticmethod
        def forward(ctx, result, x, a_w, b_w, p, scale):
            cdt = result.dtype
            with torch.autocast(device_type=x.device.type, enabled=False):
                x2 = x.reshape(-1, x.shape[-1])
                if p > 0:
                    xd, mask = torch.native_dropout(x2, p, True)
                else:
                    xd, mask = x2, None
                a_c, b_c = a_w.to(cdt), b_w.to(cdt)
                h = xd.to(cdt) @ a_c.t()
                out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b_c.t(), alpha=scale)
            ctx.save_for_backward(x2, mask, a_w, b_w, h)
            ctx.p, ctx.scale, ctx.cdt, ctx.xshape = p, scale, cdt, x.shape
            return out.view(result.shape)

        @staticmethod
        def backward(ctx, grad):
            x2, mask, a_w, b_w, h = ctx.saved_tensors
            cdt, scale, p = ctx.cdt, ctx.scale, ctx.p
            g = grad.reshape(-1, grad.shape[-1]).to(cdt)
            a_c, b_c = a_w.to(cdt), b_w.to(cdt)
            grad_h = (g @ b_c) * scale
            grad_b = grad_a = grad_x = None
            if ctx.needs_input_grad[3]:
                grad_b = ((h.t() @ g) * scale).t().to(b_w.dtype)
            if ctx.needs_input_grad[2]:
                xd = torch.ops.aten.native_dropout_backward(x2, mask, 1.0 / (1.0 - p)) if mask is not None else x2
                grad_a = (grad_h.t() @ xd.to(cdt)).to(a_w.dtype)
            if ctx.needs_input_grad[1]:
                gxd = grad_h @ a_c
                if mask is not None:
                    gxd = torch.ops.aten.native_dropout_backward(gxd, mask, 1.0 / (1.0 - p))
                grad_x = gxd.to(x2.dtype).view(ctx.xshape)
            grad_result = grad if ctx.needs_input_grad[0] else None
            return grad_result, grad_x, grad_a, grad_b, None, None

    _FN = _LoraDelta
    return _FN


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
    result = self.base_layer(x, *args, **kwargs)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        drop = self.lora_dropout[name]
        p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
        if not torch.is_autocast_enabled(x.device.type) and result.dtype != self.lora_A[name].weight.dtype:
            # outside autocast peft computes in the adapter dtype: keep that path
            return parent_forward(x, *args, **kwargs)
        result = lora_delta(result, x, self.lora_A[name].weight, self.lora_B[name].weight,
                            p, self.scaling[name], self.training)
    return result


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
            def forward(self, x, *args, **kwargs):
                return _fused_forward(self, super().forward, x, *args, **kwargs)

        mapping = {bnb.nn.Linear4bit: FusedLoraLinear4bit}
    elif bits is None:
        from peft.tuners.lora.layer import Linear as PeftLinear

        class FusedLoraLinear(PeftLinear):
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
