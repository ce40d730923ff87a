"""The memory estimate per GPU of a multi-GPU run: DDP or FSDP over N GPUs.

`estimate.memory` models one training step on one device. Data parallelism keeps the micro-batch per
GPU (so activations, logits and the runtime overhead stay as they are) and changes the static terms:

- ddp  : every GPU holds a full replica (weights, adapter, gradients, optimizer states) plus DDP's
         gradient buckets: a flat copy of every trainable gradient that the all-reduce works on
         (gradient_as_bucket_view is off in the Trainer), i.e. gradient memory x2.
- fsdp : weights, adapter, gradients and optimizer states are sharded: each GPU holds 1/N of them.
         On top, the parameters FSDP all-gathers while it computes: the current and the prefetched
         decoder layer (reshard_after_forward), and the root unit (embeddings, lm_head, final norm),
         which FSDP2 keeps unsharded from its forward to its backward.

The difference is applied to the allocator's bytes (times the fragmentation factor) and, for a paged
optimizer (host-backed), to the peak directly, the way estimate.memory builds its peak. With a budget
the verdict (fits, largest micro-batch, checkpointing) is that of the strategy: the static difference
does not depend on the batch, so the single-GPU search runs against `budget - difference`.
NCCL's own communication buffers are not modelled (a few hundred MiB at most; to be calibrated on
GPUs with scripts/bench_train.py).
"""

from __future__ import annotations

from lorakit.errors import LorakitError
from lorakit.estimate.memory import CONSTANTS, estimate, gpu_bytes
from lorakit.recipe.rules import fsdp_optimizer_problem

STRATEGIES = ("single", "ddp", "fsdp")


def strategy_terms(result: dict, strategy: str, gpus: int) -> dict:
    """Per-GPU memory terms of `strategy` over `gpus` GPUs, from a single-device estimate result."""
    m, model = result["memory"], result["model"]
    n = max(1, int(gpus))
    weights, adapter, grads, opt = (m["weights_bytes"], m["adapter_bytes"], m["gradients_bytes"],
                                    m["optimizer_bytes"])
    paged = bool(m.get("optimizer_paged"))
    terms = {"weights_bytes": weights, "adapter_bytes": adapter, "gradients_bytes": grads,
             "optimizer_bytes": opt, "ddp_buckets_bytes": 0, "fsdp_gathered_bytes": 0}
    if strategy == "ddp" and n > 1:
        terms["ddp_buckets_bytes"] = grads
    elif strategy == "fsdp" and n > 1:
        terms.update(weights_bytes=_ceil(weights, n), adapter_bytes=_ceil(adapter, n),
                     gradients_bytes=_ceil(grads, n), optimizer_bytes=_ceil(opt, n))
        layer, root = _unit_bytes(m, model)
        # gathered = the full units minus the shard of them already counted in weights/N
        terms["fsdp_gathered_bytes"] = int((2 * layer + root) * (1 - 1 / n))
    # difference to the single-device numbers: allocator bytes, and the host-backed (paged) optimizer
    device_opt = 0 if paged else 1
    delta_alloc = ((terms["weights_bytes"] - weights) + (terms["adapter_bytes"] - adapter)
                   + (terms["gradients_bytes"] - grads) + device_opt * (terms["optimizer_bytes"] - opt)
                   + terms["ddp_buckets_bytes"] + terms["fsdp_gathered_bytes"])
    delta_paged = (1 - device_opt) * (terms["optimizer_bytes"] - opt)
    delta_reserved = int(delta_alloc * (1 + CONSTANTS.fragmentation))
    terms["delta_allocated_bytes"] = int(delta_alloc)
    terms["delta_peak_bytes"] = delta_reserved + int(delta_paged)
    terms["delta_reserved_bytes"] = delta_reserved
    return terms


def _ceil(x: int, n: int) -> int:
    return -(-int(x) // n)


def _unit_bytes(m: dict, model: dict) -> tuple[int, int]:
    """(bytes of one decoder layer's weights, bytes of the root unit: embeddings + lm_head + norms)."""
    w = m["weights"]
    layers = max(1, int(model["num_layers"]))
    if w["quantized_bytes"]:  # k-bit: the layers' linears are quantized, the rest stays unquantized
        return int(w["quantized_bytes"] // layers), int(w["unquantized_bytes"])
    total = max(1, int(model["total_params"]))
    per_param = w["unquantized_bytes"] / total
    root_params = model["vocab"] * model["hidden"] * (1 if model["tie_word_embeddings"] else 2)
    root_params = min(root_params, total)
    return int((total - root_params) * per_param / layers), int(root_params * per_param)


def apply_strategy(result: dict, strategy: str, gpus: int, *, budget_bytes: int | None = None,
                   grad_accum: int = 1, terms: dict | None = None, warnings: list[str] | None = None) -> dict:
    """`result` with its memory replaced by the per-GPU numbers of `strategy`; the single-GPU memory
    kept under result["strategy"]["single_gpu"]."""
    terms = terms or strategy_terms(result, strategy, gpus)
    single = dict(result["memory"])
    mem = dict(single)
    for key in ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes"):
        mem[key] = terms[key]
    mem["ddp_buckets_bytes"] = terms["ddp_buckets_bytes"]
    mem["fsdp_gathered_bytes"] = terms["fsdp_gathered_bytes"]
    mem["allocated_peak_bytes"] = single["allocated_peak_bytes"] + terms["delta_allocated_bytes"]
    mem["reserved_peak_bytes"] = single["reserved_peak_bytes"] + terms["delta_reserved_bytes"]
    mem["overhead_bytes"] = single["overhead_bytes"] + terms["delta_reserved_bytes"] - terms["delta_allocated_bytes"]
    mem["peak_bytes"] = single["peak_bytes"] + terms["delta_peak_bytes"]
    out = dict(result)
    out["memory"] = mem
    setup = result["setup"]
    out["strategy"] = {
        "name": strategy, "gpus": int(gpus),
        "per_gpu_micro_batch": setup["batch_size"],
        "grad_accum": int(grad_accum),
        "global_batch": setup["batch_size"] * int(grad_accum) * int(gpus),
        "delta_peak_bytes": terms["delta_peak_bytes"],
        "single_gpu": single,
        "warnings": list(warnings or []),
    }
    if out.get("verdict") and budget_bytes is not None:
        verdict = dict(out["verdict"])
        verdict["budget_bytes"] = int(budget_bytes)
        verdict["headroom_bytes"] = int(budget_bytes - mem["peak_bytes"])
        verdict["fits"] = mem["peak_bytes"] <= budget_bytes
        out["verdict"] = verdict
    return out


def estimate_with_strategy(recipe, *, device: str = "cuda", budget_bytes: int | None = None,
                           gpu: str | None = None, strategy: str | None = None,
                           gpus: int | None = None) -> dict:
    """`estimate.estimate`, per GPU of a `strategy` run over `gpus` GPUs (single device without --gpus).

    The strategy defaults to the recipe's `distributed.strategy` once more than one GPU is asked for.
    """
    if strategy is not None and strategy not in ("ddp", "fsdp"):
        raise LorakitError(f"--strategy: expected ddp or fsdp (got {strategy!r})")
    if gpus is not None and gpus < 1:
        raise LorakitError(f"--gpus: expected a number of GPUs >= 1 (got {gpus})")
    if strategy is not None and not gpus:
        raise LorakitError("--strategy needs --gpus N (the number of GPUs it spreads over)",
                           hint="e.g. --gpus 2 --strategy fsdp")
    if not gpus or gpus == 1:
        result = estimate(recipe, device=device, budget_bytes=budget_bytes, gpu=gpu)
        result["strategy"] = None
        return result
    strategy = strategy or recipe.distributed.strategy
    if strategy != recipe.distributed.strategy:  # what the run would resolve under it (e.g. FSDP's optimizer)
        distributed = recipe.distributed.model_copy(update={"strategy": strategy})
        recipe = recipe.model_copy(update={"distributed": distributed})
    if gpu and budget_bytes is None:
        budget_bytes = gpu_bytes(gpu)
    base = estimate(recipe, device=device)
    terms = strategy_terms(base, strategy, gpus)
    warnings = _warnings(recipe, strategy, device)
    if budget_bytes is None:
        result = base
    else:
        # the static difference does not depend on the batch: search the single-GPU model against
        # the budget less the difference
        result = estimate(recipe, device=device, budget_bytes=budget_bytes - terms["delta_peak_bytes"], gpu=None)
        result["verdict"]["gpu"] = gpu
    return apply_strategy(result, strategy, gpus, budget_bytes=budget_bytes, grad_accum=recipe.train.grad_accum,
                          terms=terms, warnings=warnings)


def _warnings(recipe, strategy: str, device: str) -> list[str]:
    out = []
    q = recipe.quantization
    bits = q.resolved_bits(device)
    if strategy == "fsdp" and bits == 4 and q.quant_storage == "uint8":
        out.append("FSDP cannot shard 4-bit weights stored as uint8 next to bf16 ones: set "
                   "quantization.quant_storage: bf16 (the compute dtype)")
    if strategy == "fsdp" and bits == 8:
        out.append("FSDP does not shard 8-bit (LLM.int8) weights: use 4-bit with quant_storage: bf16, or ddp")
    if strategy == "fsdp" and fsdp_optimizer_problem(recipe.train.optimizer):
        out.append(f"train.optimizer {fsdp_optimizer_problem(recipe.train.optimizer)}")
    return out


__all__ = ["STRATEGIES", "apply_strategy", "estimate_with_strategy", "strategy_terms"]
