"""The MLP of each decoder layer run over slices of the sequence (train.tiled_mlp), for long rows.

Why: at long rows a layer's largest buffers are the MLP's: its [tokens x intermediate] operands saved for
backward and their gradients, about 3x what the rest of the layer holds per token. Here the MLP's forward runs
without grad a slice of CHUNK_TOKENS tokens at a time and keeps only its input; its backward runs each slice
again with grad and differentiates it at once, so no [tokens x intermediate] buffer is ever whole. The price is
one more forward of the MLP a step (the slice recomputed in backward), which is why `auto` keeps it for rows
where the memory decides whether the run fits at all.

Same math: the slices' rows are independent in an MLP; LoRA dropout draws the same masks again in backward (the
random state at the forward's start is restored and the slices run in the same order); autocast as in the
forward. The wrapper is installed on each layer's `mlp.forward` before the layer runs (a forward pre-hook), so
kernels patched onto the MLP after model loading (Liger's SwiGLU) are what the slices run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import get_device_states, set_device_states

from lorakit.speed.planning import TILED_MLP_CHUNK_TOKENS as CHUNK_TOKENS


def _by_slices(forward: Callable, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """`forward(x)` computed a slice of `chunk` tokens at a time (the rows of an MLP are independent)."""
    flat = x.reshape(1, -1, x.shape[-1])
    out = torch.cat([forward(s) for s in flat.split(chunk, dim=1)], dim=1)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: Callable, chunk: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.chunk, ctx.params_n = run, chunk, len(params)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.devices, ctx.device_rng = get_device_states(x)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            return _by_slices(run, x, chunk)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        x, *params = ctx.saved_tensors
        flat = x.detach().reshape(1, -1, x.shape[-1])
        g = grad.reshape(1, -1, grad.shape[-1])
        dx = torch.empty_like(flat)
        dparams: list[Any] = [None] * len(params)
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.cpu_rng)
            set_device_states(ctx.devices, ctx.device_rng)
            for start in range(0, flat.shape[1], ctx.chunk):
                s = slice(start, start + ctx.chunk)
                xs = flat[:, s].requires_grad_(True)
                with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                    y = ctx.run(xs)
                got = torch.autograd.grad(y, (xs, *params), g[:, s], allow_unused=True)
                dx[:, s] = got[0]
                for i, d in enumerate(got[1:]):
                    if d is not None:
                        dparams[i] = d if dparams[i] is None else dparams[i] + d
        return (None, None, dx.reshape(x.shape), *dparams)


def tiled(forward: Callable, module: Any, chunk: int = CHUNK_TOKENS) -> Callable:
    """`forward` (an MLP's) run by slices of `chunk` tokens where the input has more than `chunk` tokens (with
    grad through _Tiled, which keeps only the input); as it is otherwise."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= chunk:
            return forward(x)
        if not torch.is_grad_enabled():  # e.g. a checkpointed layer's first forward: slices, nothing kept
            return _by_slices(forward, x, chunk)
        params = [p for p in module.parameters() if p.requires_grad]
        return _Tiled.apply(forward, chunk, x, *params)

    run.lorakit_tiled = True
    return run


def enable(layers: list, chunk: int = CHUNK_TOKENS) -> int:
    """Tile the MLP (`.mlp`) of each of `layers` (transformers decoder layers). Returns how many have one."""
    n = 0
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue

        def ensure(module: Any, args: Any, mlp: Any = mlp) -> None:
            if not getattr(mlp.forward, "lorakit_tiled", False):  # also after a later patch of mlp.forward
                mlp.forward = tiled(mlp.forward, mlp, chunk)

        layer.register_forward_pre_hook(ensure)
        n += 1
    return n
