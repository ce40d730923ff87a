"""bitsandbytes 4-bit layers on a CPU: keep them trainable after an evaluation pass.

On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` repacks its weight *in place* the first time it
runs in eval mode on an input that needs no gradient (lorakit's eval loss or task metrics before training): the
weight becomes an inference-only layout and its `quant_state` is flagged `packing_format_for_cpu`. From then on
every forward, training's included, calls the `gemv_4bit` op directly instead of the autograd function, and that
op has no backward: the gradient stops at each quantized layer (torch warns "an autograd kernel was not
registered"), so every LoRA layer upstream of one (all of them, through o_proj / down_proj) gets a zero gradient
and the run trains nothing. Turning the repacking off keeps the layers on the differentiable path; eval runs on
bitsandbytes' ordinary CPU kernel instead. Every 4-bit base models.load_base loads gets the switch, so an adapter
reloaded on one gives the logits of the trained model (the repacked kernel's bf16 scales differ by ~1e-3).
"""

from __future__ import annotations

FLAG = "support_avx512bf16_for_cpu"  # bitsandbytes.nn.Linear4bit's switch for the inference repacking


def keep_4bit_layers_trainable(model) -> int:
    """Switch off bitsandbytes' in-place inference repacking on every 4-bit layer of `model`.

    Args:
        model: a model loaded with bitsandbytes 4-bit layers (any other model is left as it is).

    Returns:
        How many layers were switched off.
    """
    layers = [m for m in model.modules() if getattr(m, FLAG, False)]
    for m in layers:
        setattr(m, FLAG, False)
    return len(layers)
