"""Variable-length attention for padding-free batches: torch's flash kernel with the rows' boundaries.

Why: a padding-free (or packed) batch is one flattened row of several sequences. SDPA needs a per-row
(block-diagonal) mask for it and then cannot use its flash kernel; flex attention skips the masked blocks but
builds a block mask every step and runs a generic kernel. `torch.nn.attention.varlen.varlen_attn` takes the
rows' cumulative lengths instead of a mask and runs the flash kernel on each row: faster than both the padded
batch and flex attention on rows of varied length (docs/speed.md).

TRL's padding-free collator computes the boundaries on the CPU (`cu_seq_lens_q`, `max_length_q`); transformers
passes them through the model to the attention function. Registered under NAME through transformers' own
extension points (AttentionInterface for the function, AttentionMaskInterface for the mask), so no library code
is patched. The mask function builds no mask for a batch without a 2D attention mask (the flattened rows: their
L x L mask would only be thrown away) and SDPA's mask otherwise, so every call without boundaries - padded
batches, generation with a cache - runs SDPA exactly as `attn_implementation="sdpa"` would. Flattened rows that
come without boundaries get them from `position_ids` (a read-back from the GPU, only on that path).
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "lorakit_varlen"
# model types whose attention is plain causal softmax attention (no sliding window in use, no logit softcapping,
# no attention sinks): what this function computes. Others keep flex attention or sdpa.
PLAIN_CAUSAL = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "granite", "smollm3"}
# how many calls ran which path in this process (lorakit.train.run reports the training's share in the run's summary)
calls: Counter = Counter()


@functools.cache
def available() -> bool:
    """torch has the varlen kernel and a GPU it runs on (flash attention: compute capability 8.0 or newer)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401 - newer torch releases only
    except ImportError:
        return False
    return True


def fits(config: Any) -> bool:
    """This model's attention is what the varlen kernel computes: plain causal softmax attention (a model type
    known for it, no sliding window in use, no attention dropout), head size <= 256."""
    window = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    windowed_layers = "sliding_attention" in (getattr(config, "layer_types", None) or ())
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (getattr(config, "model_type", None) in PLAIN_CAUSAL and not window and not windowed_layers
            and head <= 256 and not getattr(config, "attention_dropout", 0.0))


def register() -> None:
    """Make NAME a valid `attn_implementation` for transformers (idempotent)."""
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)


def mask(*args, attention_mask=None, **kwargs):
    """No mask without a 2D attention mask (flattened rows: `attention` keeps them apart by their boundaries;
    a single row: causal), else SDPA's mask for it (padded batches, generation)."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


# attention variants this function does not compute: a model passing them must not get here (lorakit.model.load checks
# `fits` before loading with NAME); a call with them fails loudly instead of attending differently
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux")


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """transformers' attention-function contract: query (B, H, L, D), key/value (B, H_kv, L, D) ->
    (output (B, L, H, D), None). Flattened rows (B == 1 with boundaries) run the varlen kernel on a GPU for
    16-bit inputs without dropout, else each row through SDPA; any other call runs SDPA with its mask."""
    used = [k for k in _UNSUPPORTED if kwargs.get(k) is not None]
    if used:
        raise RuntimeError(f"lorakit's varlen attention does not implement {', '.join(used)} "
                           f"({type(module).__name__}); use model.attn_implementation: sdpa")
    cu, max_len = _boundaries(query, kwargs) if attention_mask is None else (None, None)
    if cu is None:
        calls["sdpa"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, heads, D)
    if query.is_cuda and not dropout and _kernel_takes(q, k, v):
        calls["varlen"] += 1
        out = _varlen(q, k, v, cu, max_len, scaling)
    else:
        calls["rows"] += 1
        out = _rows(q, k, v, cu, scaling, dropout)
    return out.unsqueeze(0), None


def _boundaries(query, kwargs: dict):
    """(cumulative row lengths, longest row) of a flattened batch, or (None, None): from the collator's kwargs,
    else from position_ids restarting at 0 within one row."""
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if query.shape[0] != 1:
        return None, None
    if cu is not None and max_len is not None:
        return cu, int(max_len)
    pos = kwargs.get("position_ids")
    if pos is None or query.shape[2] == 1 or pos.shape[-1] != query.shape[2]:  # decoding steps: one token
        return None, None
    starts = (pos.reshape(-1) == 0).nonzero().flatten()
    if starts.numel() <= 1:
        return None, None  # one row: causal SDPA is the same
    cu = torch.cat([starts, starts.new_tensor([pos.shape[-1]])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _kernel_takes(q, k, v) -> bool:
    """The flash kernel runs here for these inputs: fp16/bf16 (one dtype) on a GPU that has it."""
    return q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype and available()


def _varlen(q, k, v, cu, max_len: int, scale: float | None):
    """torch's varlen flash attention, causal, keys/values shared by groups of query heads."""
    from torch.nn.attention.varlen import varlen_attn  # newer torch releases only (`available` checks)

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
    from torch.nn.attention.varlen import varlen_attn  # newer torch releases only (`available` checks)

    return frozenset(inspect.signature(varlen_attn).parameters)


def _rows(q, k, v, cu, scale: float | None, dropout: float = 0.0):
    """The same attention one row at a time through SDPA (CPUs, fp32 inputs, attention dropout)."""
    bounds = cu.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qq, kk, vv = (t[s:e].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, dropout_p=dropout, is_causal=True, scale=scale,
                                                   enable_gqa=qq.shape[0] != kk.shape[0]).transpose(0, 1))
    return torch.cat(outs)
