"""A checkpointed layer's recompute without the last linear's base matmul, whose output nothing reads.

Why: under gradient checkpointing the backward pass runs each decoder layer's forward again to rebuild what
its backward needs. The layer's last linear (mlp.down_proj in Llama-style layers) feeds only the residual add,
whose backward needs no values: the recompute computes that matmul - 2 x tokens x intermediate x hidden FLOPs a
layer, a few percent of a step - and nobody reads the result. Its backward needs only the weight
(grad_x = grad @ W), which the placeholder below keeps.

How: lorakit.speed.layer_graphs captures a layer's recompute-and-backward graph inside `skipping(module)`; there the
fused LoRA layer (lorakit.speed.planning) calls `unread_output` instead of its base layer: an autograd function whose
forward allocates the output without computing it and whose backward is the base layer's own (bitsandbytes'
`grad @ dequantize_4bit(W)`, or `grad @ W`). LoRA's part still runs: its backward reads dropout(x) @ A^T.

Same math, checked rather than assumed: before capturing, `verify` runs the layer's recompute and backward
twice, as it is and with the skipped output filled with NaN, and keeps the skip only if every gradient agrees.
A layer whose last linear feeds a norm (Gemma's post-feedforward norm saves its input) fails the check and
recomputes in full.
"""

from __future__ import annotations

import contextlib
from typing import Any

import bitsandbytes.functional as F
import torch

_SKIPPED: list = []  # (module whose base output is not computed, value to fill it with or None), innermost last


@contextlib.contextmanager
def skipping(module: Any, fill: float | None = None):
    """Inside this block `module`'s base matmul is not computed (its output filled with `fill`, if given)."""
    _SKIPPED.append((module, fill))
    try:
        yield
    finally:
        _SKIPPED.pop()


def skips(module: Any) -> bool:
    return bool(_SKIPPED) and _SKIPPED[-1][0] is module


def fill() -> float | None:
    """What the skipped output is filled with (None: left as allocated)."""
    return _SKIPPED[-1][1] if _SKIPPED else None


def last_lora_module(run: Any) -> Any:
    """The last LoRA layer (peft, with lorakit's fused forward) that `run()` calls, or None."""
    order: list = []

    def note(mod, _args, _out):
        order.append(mod)

    handles = [torch.nn.modules.module.register_module_forward_hook(note)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    loras = [m for m in order if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    last = loras[-1] if loras else None
    return last if getattr(last, "lorakit_fused", False) else None


def unread_output(base: Any, x: Any) -> Any:
    """What `base(x)` returns for autograd - shape, dtype and backward - without computing its value."""
    return _UnreadOutput.apply(x, base, fill())


def _out_dtype(base: Any, x: Any) -> Any:
    if _is_4bit(base):  # bitsandbytes computes in compute_dtype and casts back to the input's dtype
        return x.dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return base.weight.dtype


def _is_4bit(base: Any) -> bool:
    return hasattr(getattr(base, "weight", None), "quant_state")


def weight_of(base: Any, dtype: Any) -> Any:
    """The base layer's weight (out x in) in `dtype`: a 4-bit one dequantized as bitsandbytes' own matmul does."""
    if _is_4bit(base):
        w = base.weight
        return F.dequantize_4bit(w.data.view(-1, 1), w.quant_state).to(dtype)
    return base.weight.to(dtype)


def _grad_input(base: Any, grad: Any) -> Any:
    """The base layer's input gradient as its own backward computes it."""
    return torch.matmul(grad, weight_of(base, grad.dtype))


class _UnreadOutput(torch.autograd.Function):
    """Forward: an uncomputed output of base(x)'s shape and dtype (filled with `fill`, if given); backward: the
    base layer's own input gradient."""

    @staticmethod
    def forward(ctx, x, base, fill):
        ctx.base, ctx.x_dtype = base, x.dtype
        out = torch.empty((*x.shape[:-1], base.out_features), dtype=_out_dtype(base, x), device=x.device)
        return out.fill_(fill) if fill is not None else out

    @staticmethod
    def backward(ctx, grad):
        return _grad_input(ctx.base, grad).to(ctx.x_dtype), None, None


def verify(module: Any, grads: Any, rtol: float = 1e-2) -> bool:
    """True when `grads()` - the layer's recompute and backward, a tuple of gradients - gives the same result
    with `module`'s output left as NaN as in full: nothing read it."""
    want = grads()
    with skipping(module, fill=float("nan")):
        got = grads()
    for a, b in zip(want, got):
        if (a is None) != (b is None):
            return False
        if a is None:
            continue
        if not bool(torch.isfinite(b).all()):
            return False
        if float((a.float() - b.float()).norm()) > rtol * float(a.float().norm()) + 1e-12:
            return False
    return True
