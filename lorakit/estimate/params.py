"""Exact parameter counts of a LoRA run and the bytes they take, from the model's shape (model.shapes), never
its weights.

Parameters are counted the way peft counts them: LoRA adds r*(in+out) per adapted module, DoRA a magnitude
vector of out_features, `modules_to_save` a full trainable copy of the module, `bias: all|lora_only` unfreezes
biases. Bytes follow the storage formats: bitsandbytes' 4-bit and 8-bit weights with their block statistics,
each optimizer's states per trainable tensor, and the files a run writes (adapter, merged checkpoint).
"""

from __future__ import annotations

from lorakit.model.shapes import ModelShape

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------------------------------------------
# Parameters (exact, as peft counts them)
# ---------------------------------------------------------------------------------------------------


def _adapted_layers(shape: ModelShape, layers: list[int] | None) -> int:
    return len(set(layers)) if layers else shape.num_layers


def count_params(shape: ModelShape, lora, targets: list[str], modules_to_save: list[str]) -> dict:
    """Base, trainable and added parameters; a row per adapted module (peft's counting)."""
    r = lora.r
    n_layers = _adapted_layers(shape, lora.layers)
    rows, lora_params, added = [], 0, 0
    for name in targets:
        if name in shape.linears:
            i, o, _ = shape.linears[name]
            count = n_layers
        elif name == "lm_head":
            i, o, count = shape.hidden, shape.vocab, 0 if lora.layers else 1
        elif name == "embed_tokens":
            i, o, count = shape.vocab, shape.hidden, 0 if lora.layers else 1
        else:
            continue
        per = r * (i + o) + (o if lora.dora and name != "embed_tokens" else 0)
        rows.append({"module": name, "in_features": i, "out_features": o, "layers": count,
                     "params_per_layer": per, "count": per * count})
        lora_params += per * count
    added = lora_params
    bias_params = 0
    if lora.bias == "all":
        bias_params = shape.num_layers * shape.layer_biases
    elif lora.bias == "lora_only":
        bias_params = sum(shape.linears[t][1] * n_layers for t in targets if t in shape.linears and shape.linears[t][2])
    save_params = 0
    for name in modules_to_save:
        p = shape.module_params(name) * shape.module_count(name)
        save_params += p
        rows.append({"module": f"{name} (modules_to_save)", "in_features": None, "out_features": None,
                     "layers": shape.module_count(name), "params_per_layer": shape.module_params(name), "count": p})
    added += save_params
    trainable = lora_params + save_params + bias_params
    if bias_params:
        rows.append({"module": f"biases ({lora.bias})", "in_features": None, "out_features": None, "layers": None,
                     "params_per_layer": None, "count": bias_params})
    total = shape.total_params
    with_adapter = total + added
    return {"total": total, "trainable": trainable, "trainable_percent": round(100.0 * trainable / with_adapter, 6),
            "total_with_adapter": with_adapter, "lora": lora_params, "modules_to_save": save_params,
            "biases": bias_params, "by_module": rows}


# ---------------------------------------------------------------------------------------------------
# Storage of the base weights
# ---------------------------------------------------------------------------------------------------


def bytes_4bit(n: int, double_quant: bool, blocksize: int = 64) -> int:
    """bitsandbytes Params4bit: packed nibbles + absmax per block (double quant: 8-bit absmax per block,
    fp32 absmax per 256 of those, a 256-entry fp32 code and an offset), + the 16-value 4-bit code."""
    blocks = -(-n // blocksize)
    packed = (n + 1) // 2
    if double_quant:
        absmax = blocks + 4 * (-(-blocks // 256)) + 256 * 4 + 4
    else:
        absmax = 4 * blocks
    return packed + absmax + 16 * 4


def bytes_8bit(i: int, o: int) -> int:
    """LLM.int8 Int8Params: int8 weight + one fp32 scale per output row."""
    return i * o + 4 * o


def weight_storage(shape: ModelShape, bits: int | None, *, dtype_bytes: int, unquantized_bytes: int,
                   double_quant: bool = True) -> dict:
    """Bytes of the base weights as stored on the device, and which tensors stay unquantized."""
    quantized = 0
    n = shape.num_layers
    for i, o, _ in shape.linears.values():
        w = i * o
        if bits == 4:
            quantized += n * bytes_4bit(w, double_quant)
        elif bits == 8:
            quantized += n * bytes_8bit(i, o)
    if bits in (4, 8):
        unq_params = shape.total_params - n * shape.layer_linear_weights
        unq = unq_params * unquantized_bytes
        kept = ["embed_tokens", "norms"] + ([] if shape.tie_word_embeddings else ["lm_head"])
        if shape.layer_biases:
            kept.append("biases")
        return {"quantized_bytes": quantized, "unquantized_bytes": unq, "unquantized_params": unq_params,
                "unquantized_dtype": {4: "fp32", 2: "bf16"}.get(unquantized_bytes, "fp32"),
                "unquantized": kept, "total_bytes": quantized + unq}
    return {"quantized_bytes": 0, "unquantized_bytes": shape.total_params * dtype_bytes,
            "unquantized_params": shape.total_params, "unquantized_dtype": {4: "fp32", 2: "bf16"}[dtype_bytes],
            "unquantized": ["all"], "total_bytes": shape.total_params * dtype_bytes}


# ---------------------------------------------------------------------------------------------------
# Optimizer states and the files a run writes
# ---------------------------------------------------------------------------------------------------


def optimizer_bytes(trainable_tensors: list[int], optimizer: str, param_bytes: int = 4) -> int:
    """State bytes for the given trainable tensor sizes (torch's AdamW keeps its two states in the
    parameters' dtype; bitsandbytes' 32-bit states are fp32)."""
    total = 0
    for n in trainable_tensors:
        if optimizer in ("adamw_torch", "adamw_torch_fused"):
            total += 2 * param_bytes * n
        elif optimizer == "paged_adamw_32bit":
            total += 8 * n
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            # bitsandbytes keeps tensors under 4096 elements in 32-bit; 8-bit states carry an fp32 absmax per 256
            total += 8 * n if n < 4096 else 2 * n + 2 * 4 * (-(-n // 256))
        elif optimizer == "adafactor":
            total += 4 * n  # factored second moment is smaller for matrices; bound by one fp32 state
        elif optimizer == "sgd":
            total += 0
    return total


def trainable_tensors(shape: ModelShape, lora, targets: list[str], modules_to_save: list[str]) -> list[int]:
    """The element count of every trainable tensor (LoRA A and B, DoRA magnitudes, modules_to_save copies)."""
    n_layers = _adapted_layers(shape, lora.layers)
    out: list[int] = []
    for name in targets:
        if name in shape.linears:
            i, o, _ = shape.linears[name]
            k = n_layers
        else:
            i, o = (shape.hidden, shape.vocab) if name == "lm_head" else (shape.vocab, shape.hidden)
            k = 0 if lora.layers else 1
        out += [lora.r * i, lora.r * o] * k
        if lora.dora:
            out += [o] * k
    for name in modules_to_save:
        out += [shape.module_params(name)] * shape.module_count(name)
    return out


def artifacts(shape: ModelShape, params: dict, merged_dtype: str, adapter_param_bytes: int = 4) -> dict:
    """Adapter file (safetensors, the trained weights in their training dtype: bf16 for a 4/8-bit base under
    TRL, else fp32) and merged checkpoint sizes; `lorakit unmerge` writes the merged size again, `lorakit
    extract` at this rank (and `compose --method cat`, per input adapter) writes the LoRA weights in fp32."""
    adapter = (params["lora"] + params["modules_to_save"] + params["biases"]) * adapter_param_bytes
    merged = shape.total_params * DTYPE_BYTES[merged_dtype]
    return {"adapter_bytes": int(adapter), "merged_bytes": int(merged), "unmerged_bytes": int(merged),
            "extracted_adapter_bytes": int(params["lora"] * 4)}
