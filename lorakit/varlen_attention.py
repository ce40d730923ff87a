"""Variable-length attention for padding-free batches: torch's flash kernel with the rows' boundaries.

Why: a padding-free batch is one flattened row of several sequences. SDPA needs a per-row (block-diagonal)
mask for it and then cannot use its flash kernel; flex attention skips the masked blocks but builds a block
mask every step and runs a generic kernel. `torch.nn.attention.varlen.varlen_attn` takes the rows' cumulative
lengths instead of a mask and runs the flash kernel on each row. 8B shape, 8 rows of varied length a step, H200,
one call (bench/train_varlen.md): 5254 tok/s against 3176 with flex attention and 3243 for the padded baseline.

TRL's padding-free collator already computes the boundaries on the CPU (`cu_seq_lens_q`, `max_length_q`);
transformers passes them through the model to the attention function, so no step reads anything back from the
GPU. Registered under NAME through transformers' own extension points (AttentionInterface for the function,
AttentionMaskInterface with SDPA's masks), so every call without boundaries - padded batches, generation with a
cache - runs SDPA exactly as `attn_implementation="sdpa"` would.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any

NAME = "lorakit_varlen"
# model types whose attention is plain causal softmax attention (no sliding window in use, no logit softcapping,
# no attention sinks): what this function computes. Others keep flex attention or sdpa.
PLAIN_CAUSAL = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "granite", "smollm3"}
# how many calls ran which path since the process started (the run's summary reports them)
calls: Counter = Counter()


def available() -> bool:
    """torch has the varlen kernel and a GPU it runs on (flash attention: compute capability 8.0 or newer)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def fits(config: Any) -> bool:
    """This model's attention is what the varlen kernel computes: plain causal attention, head size <= 256, no
    attention dropout, no sliding window in use."""
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (getattr(config, "model_type", None) in PLAIN_CAUSAL and not window and head <= 256
            and not getattr(config, "attention_dropout", 0.0))


def register() -> None:
    """Make NAME a valid `attn_implementation` for transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention-function contract: query (B, H, L, D), key/value (B, H_kv, L, D) ->
    (output (B, L, H, D), None). With the rows' boundaries in kwargs (a padding-free batch: B == 1) the varlen
    kernel runs on a GPU, each row through SDPA on a CPU; otherwise SDPA with transformers' mask."""
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None or query.shape[0] != 1 or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        calls["sdpa"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, heads, D)
    if query.is_cuda:
        calls["varlen"] += 1
        out = _varlen(q, k, v, cu, int(max_len), scaling)
    else:
        calls["rows"] += 1
        out = _rows(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


def _varlen(q, k, v, cu, max_len: int, scale: float | None):
    """torch's varlen flash attention, causal, keys/values shared by groups of query heads."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    kw: dict[str, Any] = {"scale": scale}
    params = _varlen_params()
    if "window_size" in params:  # newer torch: (-1, 0) = causal
        kw["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        raise RuntimeError(f"torch {torch.__version__}: varlen_attn takes neither window_size nor is_causal")
    if q.shape[1] != k.shape[1] and "enable_gqa" in params:  # newer torch asks; torch 2.11 passes the grouped
        kw["enable_gqa"] = True  # heads to the flash kernel, which shares them (GPU test: 32 query heads on 8)
    cu = cu.to(device=q.device, dtype=torch.int32)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, max_len, max_len, **kw)


@functools.cache
def _varlen_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _rows(q, k, v, cu, scale: float | None):
    """The same attention one row at a time through SDPA (CPUs have no varlen kernel): the reference."""
    import torch
    import torch.nn.functional as F

    bounds = cu.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qq, kk, vv = (t[s:e].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale,
                                                   enable_gqa=qq.shape[0] != kk.shape[0]).transpose(0, 1))
    return torch.cat(outs)
