"""`lorakit estimate`: a memory forecast for a recipe without its weights, and `run_plan`, the Plan a run
trains with.

Memory is a model of one training step of the run `lorakit train` does on that device (the levers
lorakit.speed.planning.plan picks: frozen dtype, fused LoRA, Liger, checkpointing; TRL's chunked LM head and
bf16 QLoRA adapters), term by term: weights in their storage format, adapter, gradients, optimizer
states (these three from estimate.params), activations saved for backward, loss buffers, runtime overhead;
for GRPO also the generation phase. The activation term follows what autograd saves in a transformers
decoder layer under bf16 autocast. `CONSTANTS` holds the few numbers fitted on a GPU run
(scripts/bench_estimate.py, bench/estimate.md); change them there, nowhere else.

No torch here: no model is loaded, only its config.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from lorakit import speed
from lorakit.errors import LorakitError
from lorakit.estimate.params import (
    DTYPE_BYTES,
    artifacts,
    count_params,
    optimizer_bytes,
    trainable_tensors,
    weight_storage,
)
from lorakit.model.shapes import ModelShape, check_checkpoint_layers, check_modules_to_save, check_targets, load_shape
from lorakit.recipe.loader import located
from lorakit.recipe.rules import resolved_optimizer
from lorakit.speed import Plan
from lorakit.speed.planning import TILED_MLP_CHUNK_TOKENS, generation_cache_tokens

GiB = 1024 ** 3
MiB = 1024 ** 2
OFFLOAD_RESIDENT_LAYERS = 2  # offloaded checkpoints on the GPU at once (lorakit.speed.host_checkpoints)


@dataclass(frozen=True)
class Constants:
    """Calibratable constants of the memory model, fitted with scripts/bench_estimate.py (source: bench/estimate.md)."""

    context_bytes: int = 768 * MiB
    """CUDA context + kernels loaded by torch/cuBLAS/bitsandbytes: device memory outside torch's allocator
    (measured, bench/estimate.md)."""
    workspace_bytes: int = 64 * MiB
    """cuBLAS/cuBLASLt workspaces and small buffers taken through torch's allocator."""
    fragmentation: float = 0.02
    """Reserved / allocated - 1 at the peak: the caching allocator's rounding and fragmentation."""
    logits_cached_bytes_per_elem: float = 3.0
    """Reserved but unallocated at the peak per (token x vocab): the caching allocator keeps the block of
    a freed fp32 logits-sized tensor that the loss's backward cannot reuse (fitted, bench/estimate.md)."""
    activation_factor: float = 1.0
    """Multiplier on the analytic activation bytes (saved tensors) per layer (fitted, bench/estimate.md)."""
    backward_factor: float = 1.0
    """Multiplier on the backward pass's transient gradient buffers of one layer."""
    logits_bytes_per_elem: float = 12.0
    """Bytes per (token x vocab) at the loss: fp32 log-softmax saved + its gradient + the input grad."""
    liger_logits_bytes_per_hidden: float = 16.0
    """With Liger's fused linear cross-entropy: bytes per (token x hidden) (chunked logits, input grad)."""
    fused_head_bytes_per_token: int = 32
    """TRL's chunked LM head: fp32 per-token outputs (log-prob, entropy, log-sum-exp), targets, mask."""


CONSTANTS = Constants()

# Common GPUs: usable memory (what the card reports), for --gpu.
GPUS: dict[str, int] = {
    "t4": 15 * GiB, "l4": 22 * GiB, "a10": 22 * GiB, "a10g": 22 * GiB, "rtx3090": 24 * GiB, "rtx4090": 24 * GiB,
    "rtx5090": 32 * GiB, "rtx4080": 16 * GiB, "rtx3060": 12 * GiB, "v100": 16 * GiB, "v100-32gb": 32 * GiB,
    "a100-40gb": 40 * GiB, "a100": 80 * GiB, "a100-80gb": 80 * GiB, "l40s": 45 * GiB, "a6000": 48 * GiB,
    "h100": 80 * GiB, "h100-80gb": 80 * GiB, "h100-94gb": 94 * GiB, "h200": 141 * GiB, "b200": 180 * GiB,
    "mi300x": 192 * GiB,
}

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024 ** 4}


def parse_bytes(text: str | int) -> int:
    """'24GiB', '80GB', '24g', '1.5 TiB', 1234 -> bytes. GB/G are decimal, GiB binary; a size of no bytes is an
    error (no run fits it, and `lorakit estimate` would answer as if no budget had been given)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise LorakitError(f"--budget: cannot read {text!r} as a size", hint="write e.g. 24GiB, 80GB or 16000MiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise LorakitError(f"--budget: {text!r} is no memory at all", hint="write e.g. 24GiB, 80GB or 16000MiB")
    return n


def gpu_bytes(name: str) -> int:
    key = name.strip().lower().replace("_", "-").replace(" ", "")
    key = {"4090": "rtx4090", "3090": "rtx3090", "a100-80g": "a100-80gb", "a100-40g": "a100-40gb"}.get(key, key)
    if key not in GPUS:
        raise LorakitError(f"--gpu: unknown GPU {name!r}", hint=f"known: {', '.join(sorted(GPUS))}; or --budget 24GiB")
    return GPUS[key]


# ---------------------------------------------------------------------------------------------------
# Memory of one training step
# ---------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """The resolved knobs of a training run that decide its memory."""

    bits: int | None
    double_quant: bool
    weight_bytes: int  # bytes per unquantized weight as loaded (bf16: 2)
    act_bytes: int  # compute dtype (autocast) bytes
    optimizer: str
    attn: str  # sdpa | eager | flash_attention_2 | flex_attention | varlen (all but eager: q, k, v, out, lse)
    liger: bool
    dropout: float
    batch: int
    seq: int
    checkpointing: bool
    device: str
    frozen_bytes: int | None = None
    """Bytes per unquantized frozen weight of a 4/8-bit base (embeddings, norms, lm_head). None: 4, peft's
    prepare_model_for_kbit_training fp32 upcast (which also makes the residual stream fp32); 2: kept in the
    bf16 compute dtype, as lorakit does on CUDA (lorakit.speed.planning)."""
    fused_lora: bool = False
    """lorakit's fused LoRA layer (lorakit.speed.fused_lora): saves the dropout mask, not the dropped copy of x."""
    dropout_kernel: bool = False
    """The fused layer on CUDA draws its dropout mask inside Triton kernels (lorakit.speed.kernels.lora_dropout): no
    mask kept."""
    fused_lm_head: bool = False
    """TRL's chunked LM head (SFTTrainer / GRPOTrainer since TRL 1.16): no full logits are ever materialized."""
    checkpoint_layers: int | None = None
    """With checkpointing: None = every decoder layer, K = the first K layers (train.gradient_checkpointing: K)."""
    gen_batch: int = 0
    """GRPO: sequences generated at once (their KV cache is the generation phase's memory); 0 for SFT."""
    gen_seq: int = 0
    """GRPO: tokens each generated sequence's KV cache holds (0: `seq`); a static cache rounds them up
    (lorakit.speed.planning.generation_cache_tokens)."""
    cuda_graphs: bool = False
    """Checkpointed layers replayed as CUDA graphs (lorakit.speed.layer_graphs): a layer's recompute-and-backward
    working set lives in the graphs' own memory pool for the whole run, plus four hidden-state buffers."""
    offload_embeddings: bool = False
    """The input embeddings live in host memory (lorakit.speed.host_embedding; untied embeddings only)."""
    tiled_mlp: bool = False
    """Each layer's MLP runs over slices of TILED_MLP_CHUNK_TOKENS tokens (lorakit.speed.tiled_mlp): it keeps its
    input, and one slice's operands and gradients exist at a time."""
    offload_activations: bool = False
    """The checkpointed layers' inputs live in host memory (lorakit.speed.host_checkpoints): the GPU holds
    OFFLOAD_RESIDENT_LAYERS of them (one being recomputed, one fetched ahead) instead of one per layer."""


def activation_terms(shape: ModelShape, lora, targets: list[str], s: Setup) -> dict:
    """Bytes saved for backward per token: per layer (full) and per layer with checkpointing.

    What autograd keeps in a transformers decoder layer under bf16 autocast: the RMSNorm inputs (HF's norm
    keeps its fp32 upcast, Liger's its input as is), SDPA's q, k, v, output and fp32 logsumexp, the SwiGLU
    operands (HF: act input, act output and up; Liger: gate and up, the activation is recomputed), and
    LoRA's share: peft's dropout keeps the mask and the dropped copy of the input per module; lorakit's fused
    layer keeps the mask and the (shared) input itself; lora_A's output in both. bitsandbytes' 4-bit matmul
    keeps no input (its weight is frozen)."""
    a = s.act_bytes
    kbit = s.bits in (4, 8)
    upcast = kbit and _frozen_bytes(s) == 4
    # prepare_model_for_kbit_training leaves the residual stream in fp32
    resid = _frozen_bytes(s) if kbit else s.weight_bytes
    h, i_, nh, nkv, d = shape.hidden, shape.intermediate, shape.num_heads, shape.num_kv_heads, shape.head_dim
    n_norms = sum(1 for k in shape.norms if k not in ("q_norm", "k_norm"))
    norm_in = resid if s.liger else 4  # Liger's RMSNorm keeps its input; HF's keeps the fp32 upcast
    norms = norm_in * h * n_norms
    if "q_norm" in shape.norms:
        norms += 4 * d * (nh + nkv)
    attn = a * (2 * nh * d + 2 * nkv * d) + 4 * nh  # SDPA: q, k, v, out + fp32 logsumexp
    if s.attn == "eager":
        attn += a * 2 * nh * d + (4 + a) * nh * s.seq  # repeated k/v, fp32 softmax + its bf16 copy (seq^2)
    # bnb Linear4bit/8bit return their input's dtype: with the fp32 residual stream of a kbit-prepared
    # model the MLP intermediates are fp32
    mlp_bytes = 4 if upcast else a
    mlp = (2 if s.liger else 3) * mlp_bytes * i_  # SwiGLU operands (see above)
    adapted = set(targets)
    lora_saved = 0
    lora_mlp = 0  # the share of lora_saved inside the MLP (gone with tiling, which keeps the MLP's input instead)
    shared_inputs: set[str] = set()
    inputs = {"q_proj": ("attn_in", h), "k_proj": ("attn_in", h), "v_proj": ("attn_in", h), "qkv_proj": ("attn_in", h),
              "o_proj": ("attn_out", nh * d), "gate_proj": ("mlp_in", h), "up_proj": ("mlp_in", h),
              "gate_up_proj": ("mlp_in", h), "down_proj": ("mlp_mid", i_)}
    for name in shape.linears:
        if name not in adapted:
            continue
        before = lora_saved
        key, width = inputs.get(name, (name, shape.linears[name][0]))
        lora_saved += lora.r * a  # lora_A output, saved by lora_B
        if s.fused_lora:
            lora_saved += width if s.dropout > 0 and not s.dropout_kernel else 0  # the mask (a byte per element)
            if key not in shared_inputs:  # the input itself, once per distinct tensor
                shared_inputs.add(key)
                lora_saved += {"attn_in": resid, "mlp_in": resid, "mlp_mid": mlp_bytes}.get(key, a) * width
        elif s.dropout > 0:
            lora_saved += (1 + a) * width  # dropout mask + the dropped input (compute dtype)
        elif upcast:
            lora_saved += a * width  # autocast copy of the fp32 input, one per module
        elif key not in shared_inputs and key != "attn_out":  # attention output is already saved by SDPA
            shared_inputs.add(key)
            lora_saved += a * width
        if key in ("mlp_in", "mlp_mid"):
            lora_mlp += lora_saved - before
    layer = norms + attn + mlp + lora_saved
    ckpt = resid * h  # checkpointed layer keeps only its input hidden state
    # one layer's gradient buffers at their widest (the MLP): Liger's SwiGLU backward writes the two input
    # gradients in place of its saved operands
    mlp_backward = (2 if s.liger else 3) * mlp_bytes * i_
    backward = mlp_backward + 2 * resid * h
    return {"layer": layer, "checkpointed_layer": ckpt, "backward": backward, "final_norm": norm_in * h,
            "resid_bytes": resid, "mlp": mlp + lora_mlp, "mlp_input": resid * h, "mlp_backward": mlp_backward}


def generation_bytes(shape: ModelShape, s: Setup) -> int:
    """GRPO's generation phase: the KV cache of `gen_batch` sequences at full length (prompt + completion,
    the compute dtype) and the fp32 logits and probabilities of the position being sampled."""
    if not s.gen_batch:
        return 0
    kv = s.gen_batch * (s.gen_seq or s.seq) * shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * s.act_bytes
    return int(kv + s.gen_batch * shape.vocab * 4 * 2)


def scoring_bytes(shape: ModelShape, s: Setup, c: Constants, t: dict) -> int:
    """GRPO's scoring phase: per-token log-probs of the generation batch without grad (the policy's, and the
    reference's with the adapter disabled), in micro-batches of the training batch: one layer's transient working
    set (nothing is kept between layers), the residual stream, and the LM head's tile and per-token outputs."""
    tokens = s.batch * s.seq
    _, head = loss_terms(shape, s, c)
    return int(tokens * (t["layer"] + 2 * t["resid_bytes"] * shape.hidden) + head)


def loss_terms(shape: ModelShape, s: Setup, c: Constants) -> tuple[int, int]:
    """(bytes saved for backward at the LM head, transient bytes while the loss is computed / differentiated).

    TRL's chunked LM head keeps the valid hidden states (compute dtype) and a few fp32 numbers per token, and
    works in [4096 tokens x 32768 vocab] tiles; its backward builds an fp32 gradient of the hidden states.
    The full-logits path (older TRL / plain transformers) keeps log-softmax-sized fp32 buffers."""
    tokens = s.batch * s.seq
    if s.fused_lm_head:
        saved = tokens * (s.act_bytes * shape.hidden + c.fused_head_bytes_per_token)
        tile = min(tokens, 4096) * min(shape.vocab, 32768) * s.act_bytes
        transient = tile + tokens * shape.hidden * (4 + s.act_bytes)
        return int(saved), int(transient)
    if s.liger:
        return 0, int(tokens * shape.hidden * c.liger_logits_bytes_per_hidden)
    return 0, int(tokens * shape.vocab * c.logits_bytes_per_elem)


def memory(shape: ModelShape, lora, targets: list[str], modules_to_save: list[str], params: dict, s: Setup,
           c: Constants | None = None) -> dict:
    """Breakdown of device memory for one training step (bytes)."""
    c = c or CONSTANTS
    kbit = s.bits in (4, 8)
    unq_bytes = _frozen_bytes(s) if kbit else s.weight_bytes
    store = weight_storage(shape, s.bits, dtype_bytes=s.weight_bytes, unquantized_bytes=unq_bytes,
                           double_quant=s.double_quant)
    weights = store["total_bytes"]
    if s.offload_embeddings and not shape.tie_word_embeddings:
        weights -= shape.vocab * shape.hidden * unq_bytes
    tb = _trainable_bytes(s)
    save_bytes = params["modules_to_save"] * (tb if kbit else unq_bytes)
    lora_bytes = params["lora"] * tb
    adapter = lora_bytes + save_bytes + (params["biases"] * 0)
    gradients = lora_bytes + save_bytes + params["biases"] * (tb if kbit else unq_bytes)
    opt = optimizer_bytes(trainable_tensors(shape, lora, targets, modules_to_save), s.optimizer, tb)
    if params["biases"]:
        opt += optimizer_bytes([params["biases"]], s.optimizer, tb)
    paged = s.optimizer.startswith("paged_")

    tokens = s.batch * s.seq
    t = activation_terms(shape, lora, targets, s)
    n = shape.num_layers
    layer_per_token, backward_per_token, tile = t["layer"], t["backward"], 0
    if s.tiled_mlp:  # the MLP keeps only its input; one slice's operands and gradients exist at a time
        layer_per_token += t["mlp_input"] - t["mlp"]
        backward_per_token -= t["mlp_backward"]
        tile = min(tokens, TILED_MLP_CHUNK_TOKENS) * (t["mlp"] + t["mlp_backward"])
    full_layer = layer_per_token * c.activation_factor
    k = (n if s.checkpoint_layers is None else max(0, min(n, s.checkpoint_layers))) if s.checkpointing else 0
    kept = min(k, OFFLOAD_RESIDENT_LAYERS) if s.offload_activations else k  # checkpoints on the GPU
    saved_per_token = kept * t["checkpointed_layer"] + (n - k) * full_layer + t["final_norm"]
    head_saved, logits = loss_terms(shape, s, c)
    saved = tokens * saved_per_token + head_saved
    if kbit and unq_bytes == 4:  # autocast casts the fp32 lm_head to bf16 and keeps the copy for backward
        logits += shape.vocab * shape.hidden * s.act_bytes
    dequant = max(i * o for i, o, _ in shape.linears.values()) * s.act_bytes if s.bits == 4 else 0
    backward = (tokens * backward_per_token + tile) * c.backward_factor
    # the peak is either at the loss (everything saved + the loss buffers) or, with checkpointing, while the
    # last checkpointed layer (layer k-1) is recomputed and differentiated: by then the layers after it have
    # freed what they saved, and the first k keep only their inputs
    at_recompute = tokens * (kept * t["checkpointed_layer"] + full_layer) + backward if k else 0
    peak_act = max(saved + logits, at_recompute)
    graphs = 0
    if s.cuda_graphs and k:  # the layer's working set moves into the graphs' pool, which every phase keeps
        graphs = tokens * full_layer + backward + 4 * tokens * shape.hidden * s.act_bytes
        peak_act = max(saved + logits, tokens * kept * t["checkpointed_layer"]) + graphs
    activations = int(peak_act - logits)
    static = weights + adapter + gradients + (0 if paged else opt)
    allocated = int(static + peak_act + dequant + c.workspace_bytes)
    generation = generation_bytes(shape, s)
    phases = {}
    if generation:  # GRPO: generation, scoring (log-probs without grad) and training; the largest is the peak
        held = weights + adapter + (0 if paged else opt) + dequant + c.workspace_bytes
        phases = {"generation": int(held + generation), "scoring": int(held + scoring_bytes(shape, s, c, t)),
                  "training": allocated}
        allocated = max(phases.values())
    full_logits = not (s.liger or s.fused_lm_head)
    cached = tokens * shape.vocab * c.logits_cached_bytes_per_elem if full_logits else 0
    # with graphs the regular pool still caches the working set of the eager warm-up steps beside the graphs'
    # pool
    reserved = int(allocated * (1 + c.fragmentation) + cached + graphs)
    overhead = c.context_bytes + c.workspace_bytes + (reserved - allocated)
    peak = reserved + c.context_bytes + (opt if paged else 0)
    return {
        "weights_bytes": int(weights), "adapter_bytes": int(adapter), "gradients_bytes": int(gradients),
        "optimizer_bytes": int(opt), "activations_bytes": int(activations + dequant),
        "logits_bytes": int(logits), "overhead_bytes": int(overhead), "peak_bytes": int(peak),
        "allocated_peak_bytes": allocated, "reserved_peak_bytes": reserved, "generation_bytes": int(generation),
        "phases_bytes": phases, "peak_phase": max(phases, key=phases.get) if phases else "training",
        "cuda_graphs_bytes": int(graphs),
        "host_checkpoints_bytes": int(tokens * k * t["checkpointed_layer"]) if s.offload_activations else 0,
        "activations_per_token_per_layer": int(full_layer), "checkpointed_per_token_per_layer":
            int(t["checkpointed_layer"]), "optimizer_paged": paged,
        "weights": {"quantized_bytes": int(store["quantized_bytes"]),
                    "unquantized_bytes": int(store["unquantized_bytes"]),
                    "unquantized": store["unquantized"], "unquantized_dtype": store["unquantized_dtype"]},
    }


# ---------------------------------------------------------------------------------------------------
# Recipe -> result
# ---------------------------------------------------------------------------------------------------


def _trainable_bytes(s: Setup) -> int:
    """Bytes per trainable parameter: TRL's SFT/GRPO trainers cast the adapter of a 4/8-bit base to bf16
    (the QLoRA paper's recipe); on a 16/32-bit base peft keeps it in fp32."""
    return 2 if s.bits in (4, 8) else 4


def _frozen_bytes(s: Setup) -> int:
    return 4 if s.frozen_bytes is None else s.frozen_bytes


def _plan(recipe, device: str, estimate_result: dict | None = None, budget_bytes: int | None = None,
          lengths: list[int] | None = None, host_bytes: float | None = float("inf"),
          device_bytes: int | None = None) -> Plan:
    """The speed plan for a run on `device`, planned without probing this machine: a CUDA target is taken to be
    bf16-capable, with Liger where liger-kernel is installed. `estimate_result` / `budget_bytes`: budget mode's
    inputs; `host_bytes`: the host memory offloaded checkpoints may use (see lorakit.speed.planning; by default not
    a limit: the GPU machine's memory is not this one's); `device_bytes`: the GPU's memory, where known."""
    if device != "cuda":
        return speed.plan(recipe, device, lengths=lengths)
    q = recipe.quantization.compute_dtype
    return speed.plan(recipe, device, estimate_result, budget_bytes=budget_bytes,
                      compute_dtype="bf16" if q == "auto" else q, liger_ok=_liger_installed(), lengths=lengths,
                      host_bytes=host_bytes, device_bytes=device_bytes)


def run_plan(recipe, device: str, *, lengths: list[int] | None = None, expandable_segments: bool = False,
             device_bytes: int | None = None) -> Plan:
    """The Plan `lorakit train` runs with: decided by lorakit.speed.planning from this module's memory figures where
    a choice depends on memory (budget mode, CUDA graphs' fit), the same figures `lorakit estimate` shows.

    Args:
        recipe: the validated Recipe.
        device: the device this machine trains on.
        lengths: the training rows' token counts (see lorakit.speed.planning.plan).
        expandable_segments: whether the CUDA allocator grows segments in place (recorded in the Plan).
        device_bytes: the memory of this machine's GPU (what the run must fit).

    Returns:
        The run's Plan.
    """
    est = None
    if speed.needs_estimate(recipe, device):
        try:
            est = estimate(recipe, device=device, host_bytes=None, device_bytes=device_bytes)
        except LorakitError as e:  # the model load reports recipe problems with their lines; here: fall back
            est = {"error": f"memory estimate failed ({e.message})"}
    return speed.plan(recipe, device, est, lengths=lengths, expandable_segments=expandable_segments,
                      device_bytes=device_bytes)


def _setup(recipe, device: str, levers: Plan) -> Setup:
    """The memory-deciding knobs of `lorakit train` for this recipe on `device` (speed.plan's levers)."""
    q, t = recipe.quantization, recipe.train
    bits = q.resolved_bits(device)
    cuda = device == "cuda"
    wdt = recipe.model.dtype if recipe.model.dtype != "auto" else ("bf16" if cuda else "fp32")
    prec = t.precision if t.precision != "auto" else ("bf16" if cuda else "fp32")
    if bits:
        cdt = q.compute_dtype if q.compute_dtype != "auto" else ("bf16" if cuda else "fp32")
        act = DTYPE_BYTES[cdt] if prec == "fp32" else DTYPE_BYTES[prec]
    else:
        act = DTYPE_BYTES[prec]
    opt = resolved_optimizer(recipe, device)
    attn = levers.attn_implementation
    return Setup(bits=bits, double_quant=q.double_quant, weight_bytes=DTYPE_BYTES[wdt], act_bytes=act,
                 optimizer=opt, attn=attn, liger=levers.liger, dropout=recipe.lora.dropout,
                 batch=t.batch_size, seq=_seq_len(recipe),
                 checkpointing=levers.gradient_checkpointing, device=device,
                 frozen_bytes=2 if levers.frozen_dtype == "bf16" else None,
                 fused_lora=levers.fused_lora,
                 dropout_kernel=levers.dropout_kernel,
                 fused_lm_head=_trl_fused_lm_head(),
                 checkpoint_layers=levers.checkpoint_layers, gen_batch=_gen_batch(recipe),
                 gen_seq=generation_cache_tokens(_seq_len(recipe)) if levers.generation_graphs else 0,
                 cuda_graphs=levers.cuda_graphs,
                 offload_embeddings=levers.offload_embeddings,
                 offload_activations=levers.offload_activations,
                 tiled_mlp=levers.tiled_mlp)


def _seq_len(recipe) -> int:
    """Tokens per row at most: data.max_length for SFT; prompt + completion at their limits for GRPO (an upper
    bound: real completions often stop early)."""
    if recipe.method == "grpo":
        return recipe.grpo.max_prompt_length + recipe.grpo.max_completion_length
    return recipe.data.max_length


def _gen_batch(recipe) -> int:
    """GRPO: completions generated per generate call (grpo.generation_batch_size, else one step's batch)."""
    if recipe.method != "grpo":
        return 0
    return recipe.grpo.generation_batch_size or recipe.train.batch_size * recipe.train.grad_accum


def _trl_fused_lm_head() -> bool:
    """TRL >= 1.16 trains through its chunked LM head (no full logits); read from the installed metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in version("trl").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return True  # the version pyproject pins
    return (major, minor) >= (1, 16)


def _liger_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("liger_kernel") is not None


def _fits(shape, lora, targets, mts, params, base: Setup, budget: int) -> dict:
    """Verdict for a budget: fits as is, largest micro-batch / seq, whether checkpointing is needed."""
    def peak(**kw) -> int:
        return memory(shape, lora, targets, mts, params, Setup(**{**asdict(base), **kw}))["peak_bytes"]

    def largest(gc: bool, limit: int = 1024) -> int:
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if peak(batch=mid, checkpointing=gc) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    out = {"budget_bytes": int(budget), "fits": peak() <= budget, "headroom_bytes": int(budget - peak())}
    b_no, b_gc = largest(False), largest(True)
    out["max_batch_without_checkpointing"] = b_no
    out["max_batch_with_checkpointing"] = b_gc
    out["max_batch"] = b_gc if base.checkpointing else b_no
    out["needs_checkpointing"] = peak(checkpointing=False) > budget
    if b_gc == 0:
        seq = base.seq
        while seq > 16 and peak(batch=1, seq=seq, checkpointing=True) > budget:
            seq //= 2
        out["max_seq_len_at_batch_1"] = seq if peak(batch=1, seq=seq, checkpointing=True) <= budget else 0
    return out


def estimate(recipe, *, device: str = "cuda", budget_bytes: int | None = None, gpu: str | None = None,
             host_bytes: float | None = float("inf"), device_bytes: int | None = None) -> dict:
    """Parameters, memory breakdown, artifacts and (with a budget) a verdict for `recipe` on `device`;
    `host_bytes`: the host memory offloaded checkpoints may use (None: this machine's; default: no limit);
    `device_bytes`: the GPU's memory, the run planned to fit it (default: the budget's, or `gpu`'s)."""
    with located(recipe):
        shape = load_shape(recipe.base_model, revision=recipe.model.revision,
                           trust_remote_code=recipe.model.trust_remote_code)
        targets = check_targets(shape, recipe.lora)
        mts = check_modules_to_save(shape, list(recipe.lora.modules_to_save))
        check_checkpoint_layers(shape, recipe.train)
    if gpu and budget_bytes is None:
        budget_bytes = gpu_bytes(gpu)
    device_bytes = device_bytes or budget_bytes
    params = count_params(shape, recipe.lora, targets, mts)
    levers = _plan(recipe, device, {"model": shape.summary()}, host_bytes=host_bytes)  # without memory figures
    s = _setup(recipe, device, levers)

    def peak_with(key: str = "peak_bytes", **kw) -> int:
        kw = {"offload_embeddings": False, **kw}
        return memory(shape, recipe.lora, targets, mts, params, Setup(**{**asdict(s), **kw}))[key]

    # the two ends budget mode (train.memory_budget_gb) chooses between; with a budget, its choice
    peaks = {gc: peak_with(checkpointing=gc, checkpoint_layers=None, cuda_graphs=False) for gc in (True, False)}
    graphs_peak = peak_with(checkpointing=True, checkpoint_layers=None, cuda_graphs=True)
    # without a budget: CUDA graphs where, with the input embeddings in host memory, their peak allocated
    # memory stays within the eager run's (speed.plan)
    alloc = "allocated_peak_bytes"
    shape_info = {"model": shape.summary(), "peak_bytes_checkpointed": peaks[True],
                  "peak_bytes_uncheckpointed": peaks[False], "peak_bytes_checkpointed_graphs": graphs_peak,
                  "allocated_bytes_checkpointed": peak_with(alloc, checkpointing=True, checkpoint_layers=None,
                                                            cuda_graphs=False),
                  "allocated_bytes_graphs_offloaded": None if shape.tie_word_embeddings else peak_with(
                      alloc, checkpointing=True, checkpoint_layers=None, cuda_graphs=True, offload_embeddings=True),
                  # what offloaded layer inputs and the tiled MLP are turned on for: the run not fitting otherwise
                  "peak_bytes_layer_inputs_on_gpu": peak_with(checkpointing=True, checkpoint_layers=None,
                                                              cuda_graphs=False, offload_activations=False,
                                                              tiled_mlp=False),
                  "peak_bytes_offloaded": peak_with(checkpointing=True, checkpoint_layers=None, cuda_graphs=False,
                                                    offload_activations=True, tiled_mlp=False),
                  "host_checkpoints_bytes_offloaded": peak_with("host_checkpoints_bytes", checkpointing=True,
                                                                checkpoint_layers=None, offload_activations=True)}
    if device == "cuda" and recipe.train.gradient_checkpointing == "auto":
        levers = _plan(recipe, device, shape_info, host_bytes=host_bytes,  # budget, graphs, offloading:
                       device_bytes=device_bytes)  # chosen from these peaks
        s = _setup(recipe, device, levers)
    verdict = None
    if budget_bytes is not None:
        verdict = _fits(shape, recipe.lora, targets, mts, params, s, budget_bytes)
        verdict["gpu"] = gpu
        if device == "cuda" and recipe.train.gradient_checkpointing == "auto":
            # what `train.memory_budget_gb` set to this budget would choose (the fastest setting that fits)
            choice = _plan(recipe, device, shape_info, budget_bytes, host_bytes=host_bytes)
            verdict["with_memory_budget"] = {k: getattr(choice, k) for k in (
                "gradient_checkpointing", "checkpoint_layers", "checkpointing_reason")}
    mem = memory(shape, recipe.lora, targets, mts, params, s)
    return {
        "base_model": recipe.base_model, "model": shape.summary(), "targets": targets,
        "params": params, "memory": mem,
        "setup": {"device": device, "bits": s.bits, "double_quant": s.double_quant, "optimizer": s.optimizer,
                  "attention": s.attn, "liger": s.liger, "batch_size": s.batch, "seq_len": s.seq,
                  "gradient_checkpointing": s.checkpointing, "checkpoint_layers": s.checkpoint_layers,
                  "checkpointing_reason": levers.checkpointing_reason, "fused_lora": s.fused_lora,
                  "lora_dropout_kernel": s.dropout_kernel, "cuda_graphs": s.cuda_graphs,
                  "offload_embeddings": s.offload_embeddings, "offload_activations": s.offload_activations,
                  "tiled_mlp": s.tiled_mlp, "fused_lm_head": s.fused_lm_head, "frozen_dtype": levers.frozen_dtype,
                  "adapter_dtype": {2: "bf16", 4: "fp32"}[_trainable_bytes(s)],
                  "compute_dtype_bytes": s.act_bytes, "lora_r": recipe.lora.r, "lora_dropout": recipe.lora.dropout,
                  "method": recipe.method, "generation_batch": s.gen_batch},
        "artifacts": artifacts(shape, params, recipe.output.merged_dtype, _trainable_bytes(s)),
        "verdict": verdict, "constants": asdict(CONSTANTS),
        "tokens_per_micro_batch": s.batch * s.seq,
        "peak_bytes_checkpointed": int(peaks[True]),
        "peak_bytes_uncheckpointed": int(peaks[False]),
        "peak_bytes_checkpointed_graphs": int(graphs_peak),
        "allocated_bytes_checkpointed": shape_info["allocated_bytes_checkpointed"],
        "allocated_bytes_graphs_offloaded": shape_info["allocated_bytes_graphs_offloaded"],
        "peak_bytes_layer_inputs_on_gpu": shape_info["peak_bytes_layer_inputs_on_gpu"],
        "peak_bytes_offloaded": shape_info["peak_bytes_offloaded"],
        "host_checkpoints_bytes_offloaded": shape_info["host_checkpoints_bytes_offloaded"],
    }


__all__ = [
    "CONSTANTS",
    "GPUS",
    "Constants",
    "Setup",
    "estimate",
    "gpu_bytes",
    "memory",
    "parse_bytes",
    "run_plan",
]
