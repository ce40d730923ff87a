"""Rules that involve several recipe fields, and values derived from them (the optimizer `auto` picks).

`cross_field_problems` runs after the schema validated each field alone; lorakit.recipe.loader reports what it
finds with the fields' file:line.
"""

from __future__ import annotations

import math

from lorakit.recipe.schema import Recipe

# bitsandbytes' optimizers update plain tensors; FSDP2 shards parameters as DTensors, which they reject
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def fsdp_optimizer_problem(optimizer: str) -> str | None:
    """Why `optimizer` cannot run under FSDP, or None (one message for the recipe rule, the check in
    lorakit.train.args and estimate's --strategy fsdp warning)."""
    if optimizer in BNB_OPTIMIZERS:
        return f"{optimizer} (bitsandbytes) cannot update FSDP's sharded parameters; use adamw_torch or auto"
    return None


def resolved_optimizer(recipe: Recipe, device: str, strategy: str | None = None) -> str:
    """train.optimizer with `auto` resolved: bitsandbytes' paged 8-bit AdamW on CUDA (the QLoRA paper's), except
    under FSDP (see BNB_OPTIMIZERS), and torch's AdamW on CPU. `strategy` (the engine actually used, e.g. from
    `estimate --strategy` or the launcher) overrides distributed.strategy."""
    if recipe.train.optimizer != "auto":
        return recipe.train.optimizer
    if device != "cuda" or (strategy or recipe.distributed.strategy) == "fsdp":
        return "adamw_torch"
    return "paged_adamw_8bit"


def cross_field_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Rules that involve several fields: (dotted field, message) for each broken one."""
    problems: list[tuple[str, str]] = []
    lora, bits = recipe.lora, recipe.quantization.bits
    if recipe.method == "grpo" and recipe.grpo is None:
        problems.append(("method", "method grpo needs a `grpo:` section with `rewards:`"))
    if recipe.method == "sft" and recipe.grpo is not None:
        problems.append(("grpo", "a `grpo:` section is only used with `method: grpo` (method is sft)"))
    if lora.scale > 16:
        limit = 16 * (math.sqrt(lora.r) if lora.rslora else lora.r)
        problems.append(("lora.alpha", f"alpha {lora.resolved_alpha:g} with r {lora.r} scales the update by "
                         f"{lora.scale:g}; above 16 training diverges (use alpha <= {limit:g})"))
    if lora.init in ("pissa", "olora", "loftq") and bits in (4, 8):
        problems.append(("lora.init", f"init {lora.init} needs the full-precision base weights; "
                         "set quantization.bits: none (LoftQ quantizes by itself)"))
    if lora.dora and bits == 8:
        problems.append(("lora.dora", "peft's DoRA does not support 8-bit bitsandbytes layers; use bits 4 or none"))
    if recipe.data.packing and recipe.data.padding_free is True:
        problems.append(("data.padding_free", "packing and padding_free are alternatives; pick one"))
    if recipe.model.attn_implementation == "varlen" and (
            recipe.method != "sft" or (recipe.data.padding_free is False and not recipe.data.packing)):
        problems.append(("model.attn_implementation", "varlen attention is for flattened SFT batches (padding-free "
                         "or packed: it takes the rows' boundaries instead of a mask); use sdpa or auto"))
    if recipe.train.fused_lora is True and lora.dora:
        problems.append(("train.fused_lora", "the fused LoRA layer does not implement DoRA; "
                         "set train.fused_lora: auto or false"))
    if recipe.train.fused_lora is True and bits == 8:
        problems.append(("train.fused_lora", "the fused LoRA layer supports 4-bit and 16/32-bit bases, not 8-bit; "
                         "set train.fused_lora: auto or false"))
    t = recipe.train
    graphs_need = [  # (what rules CUDA graphs out, what they replay)
        (t.fused_lora is False, "the fused LoRA layer (train.fused_lora is false)"),
        (lora.dora, "the fused LoRA layer, which does not implement DoRA"),
        (t.gradient_checkpointing is False or t.gradient_checkpointing == 0,
         "checkpointed layers (train.gradient_checkpointing is off)"),
        (t.torch_compile, "layers as they are, not with train.torch_compile (untested together)"),
    ]
    why = next((what for ruled_out, what in graphs_need if ruled_out), None)
    if t.cuda_graphs is True and why:
        problems.append(("train.cuda_graphs", f"CUDA graphs replay {why}; set train.cuda_graphs: auto or false"))
    if t.offload_activations is True and (t.gradient_checkpointing is False or t.gradient_checkpointing == 0):
        problems.append(("train.offload_activations", "offloading keeps checkpointed layers' inputs in host memory, "
                         "and train.gradient_checkpointing is off; set train.offload_activations: auto or false"))
    if t.offload_embeddings is True and recipe.method != "sft":
        problems.append(("train.offload_embeddings", "host-memory embeddings are for SFT (generation would copy "
                         "the rows of every new token); set train.offload_embeddings: auto or false"))
    elif t.offload_embeddings is True and any("embed" in m for m in lora.modules_to_save):
        problems.append(("train.offload_embeddings", "the input embeddings are trained (lora.modules_to_save); "
                         "set train.offload_embeddings: auto or false"))
    g = recipe.grpo
    if recipe.method == "grpo" and g is not None and g.generation_batch_size is not None:
        gen = g.generation_batch_size
        if gen % g.num_generations:
            problems.append(("grpo.generation_batch_size", f"{gen} must be a multiple of grpo.num_generations "
                             f"{g.num_generations} (whole groups of completions per prompt)"))
        elif gen % recipe.train.batch_size:
            problems.append(("grpo.generation_batch_size", f"{gen} must be a multiple of train.batch_size "
                             f"{recipe.train.batch_size} (completions per optimizer step)"))
    if recipe.method == "grpo" and recipe.data.packing:
        problems.append(("data.packing", "packing is for SFT; GRPO generates per prompt"))
    if recipe.distributed.strategy == "fsdp" and fsdp_optimizer_problem(recipe.train.optimizer):
        problems.append(("train.optimizer", fsdp_optimizer_problem(recipe.train.optimizer)))
    if recipe.train.precision == "fp16" and recipe.quantization.compute_dtype == "bf16":
        problems.append(("train.precision", "fp16 mixed precision with bf16 compute_dtype mixes formats; use bf16"))
    return problems
