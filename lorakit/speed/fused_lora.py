"""The fused LoRA layer (train.fused_lora): a peft custom module whose forward is one autograd function.

dropout -> x@A^T -> addmm(base, h, B^T, alpha=scale): no defensive clone, no separate scale/add kernels, and the
dropout mask is saved instead of the dropped copy of x (rebuilt in backward from x, which the base layer keeps
anyway). On CUDA with Triton the dropout is drawn inside the x@A^T kernel and again in backward
(lorakit.speed.kernels.lora_dropout: no mask, no dropped copy, fewer kernels). In training the base layer's matmul
joins the same function (`lora_linear`): the base GEMMs add onto the LoRA parts in their epilogue instead of a
separate memory-bound pass over the output and the input gradient. The adapter saved is a plain peft adapter.
"""

from __future__ import annotations

from typing import Any

import bitsandbytes as bnb
import torch
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit
from peft.tuners.lora.layer import Linear as PeftLinear

from lorakit.speed import recompute_tail
from lorakit.speed.kernels import lora_dropout as lora_triton
from lorakit.speed.planning import Plan


def lora_delta(result: Any, x: Any, a_w: Any, b_w: Any, p: float, scale: float, training: bool) -> Any:
    """result + scale * dropout(x) @ A^T @ B^T as one autograd function (see module docstring)."""
    return _LoraDelta.apply(result, x, a_w, b_w, float(p) if training else 0.0, float(scale))


def lora_linear(base: Any, x: Any, a_w: Any, b_w: Any, p: float, scale: float, training: bool,
                skip: bool = False) -> Any:
    """base(x) + scale * dropout(x) @ A^T @ B^T as one autograd function, for a frozen base layer whose output
    dtype is x's (`linear_dtype`). Against base(x) followed by `lora_delta`: the LoRA parts come first and the base
    matmuls add onto them (cuBLAS reads them in its epilogue, inside a compute-bound GEMM) instead of a separate
    memory-bound pass over the output in forward and over the input gradient in backward. The backward
    dequantizes a 4-bit weight again, as bitsandbytes' own does: keeping the forward's copy inside a graphed
    recompute saves little time for a weight-sized share of the graphs' pool (docs/speed.md).
    `skip`: the output is not computed at all (a recompute that nothing reads: lorakit.speed.recompute_tail); its
    backward is the same."""
    return _LoraLinear.apply(x, a_w, b_w, base, float(p) if training else 0.0, float(scale), bool(skip))


def linear_dtype(base: Any, x: Any) -> Any:
    """The dtype base(x) computes in when `lora_linear` can stand in for it - a frozen bitsandbytes 4-bit layer
    computing in x's dtype, or a frozen torch Linear computing in x's dtype (under autocast: its dtype) - else
    None."""
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


def _down(ctx, x2, a_c, p):
    """h = dropout(x2) @ A^T: (h, mask or None); sets ctx.seed when the Triton kernels drew the mask."""
    ctx.seed = None
    kernel = p > 0 and x2.shape[0] > 0 and x2.stride(-1) == 1
    seeds = lora_triton.active_seeds() if p > 0 else None
    if kernel and lora_triton.available(x2.device.type, a_c.dtype, a_c.shape[0]):
        # dropout inside the matmul (lorakit.speed.kernels.lora_dropout): the mask comes from this seed, again in
        # backward (ctx keeps it; a checkpointed layer's recompute only rebuilds x). Under a CUDA
        # graph (lorakit.speed.layer_graphs) the seed lives in device memory, redrawn before each replay.
        ctx.seed = seeds.take() if seeds is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        return lora_triton.down_forward(x2, a_c, p, ctx.seed), None
    if seeds is not None:
        raise RuntimeError("LoRA dropout inside a CUDA graph needs the Triton dropout kernels")
    xd, mask = torch.native_dropout(x2, p, True) if p > 0 else (x2, None)
    return xd.to(a_c.dtype) @ a_c.t(), mask


def _lora_grads(ctx, g, x2, mask, a_w, b_w, h, need_x, need_a, need_b):
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
            h, mask = _down(ctx, x2, a_w.to(cdt), p)
            out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b_w.to(cdt).t(), alpha=scale)
        ctx.save_for_backward(x2, mask, a_w, b_w, h)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, mask, a_w, b_w, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(ctx.cdt)
        grad_x, grad_a, grad_b = _lora_grads(ctx, g, x2, mask, a_w, b_w, h, *ctx.needs_input_grad[1:4])
        grad_x = grad_x.view(ctx.xshape) if grad_x is not None else None
        return (grad if ctx.needs_input_grad[0] else None), grad_x, grad_a, grad_b, None, None


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a_w, b_w, base, p, scale, skip):
        cdt = x.dtype
        ctx.p, ctx.scale, ctx.base, ctx.xshape = p, scale, base, x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            h, mask = _down(ctx, x2, a_w.to(cdt), p)
            if skip:  # a recompute whose output nothing reads (lorakit.speed.recompute_tail)
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
        grad_x, grad_a, grad_b = _lora_grads(ctx, g, x2, mask, a_w, b_w, h, *ctx.needs_input_grad[:3])
        if grad_x is not None:  # the base layer's input gradient added onto the LoRA part
            grad_x = grad_x.addmm_(g, recompute_tail.weight_of(ctx.base, x2.dtype))
            grad_x = grad_x.view(ctx.xshape)
        return grad_x, grad_a, grad_b, None, None, None, None


def _fused_forward(self: Any, parent_forward: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
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
    drop = layer.lora_dropout[name]
    return drop.p if isinstance(drop, torch.nn.Dropout) else 0.0


class FusedLoraLinear4bit(PeftLinear4bit):
    lorakit_fused = True

    def forward(self, x, *args, **kwargs):
        return _fused_forward(self, super().forward, x, *args, **kwargs)


class FusedLoraLinear(PeftLinear):
    lorakit_fused = True

    def forward(self, x, *args, **kwargs):
        return _fused_forward(self, super().forward, x, *args, **kwargs)


def fused_lora_classes(bits: int | None) -> dict:
    """{base layer type: fused LoRA layer type} for peft's LoraConfig._register_custom_module (none for 8-bit)."""
    if bits == 4:
        return {bnb.nn.Linear4bit: FusedLoraLinear4bit}
    return {torch.nn.Linear: FusedLoraLinear} if bits is None else {}


def customize_lora_config(lora_config: Any, p: Plan, bits: int | None) -> Any:
    """Register the fused LoRA layers on a peft LoraConfig when the plan asks for them (call before
    get_peft_model). The adapter saved is a plain peft LoRA adapter."""
    if p.fused_lora:
        mapping = fused_lora_classes(bits)
        if mapping:
            lora_config._register_custom_module(mapping)
    return lora_config
