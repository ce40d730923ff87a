"""Fold a LoRA adapter into its base model, one tensor at a time, and prove the result.

The usual path (load the whole model, `merge_and_unload`, `save_pretrained`) needs the full model in
memory. Here the base's safetensors shards are read tensor by tensor (lorakit.checkpoints.streaming), each
tensor the adapter touches gets its update in fp32 (W + s·B@A with s = alpha/r, or alpha/sqrt(r) with rsLoRA;
DoRA's magnitude renormalization; modules_to_save replacements; a LoRA bias), is cast to the output dtype and
is written straight into the output shard, so resident memory stays near the largest single tensor plus the
adapter. A DoRA merge also writes its row norms ||W + s·B@A|| to lorakit-dora-norms.st, the one thing
`lorakit unmerge` cannot recover from the merged weights.

Tied embeddings: if the base ties lm_head to embed_tokens and the adapter changes either, both are
written and `tie_word_embeddings` is turned off, so the merged model computes what base+adapter did.

QLoRA semantics. An adapter trained on a 4-bit base learned a correction to the *dequantized* weights
Q(W), not to W. Default merge: W + ΔW into the original 16-bit base — the cleanest checkpoint, but it
differs from the trained model by W - Q(W) in every quantized layer. `from_quantized=True`: every
weight bitsandbytes quantized in training (each Linear except the output head) is first replaced by
dequantize(quantize(W)) with the run's quant_type / double_quant (blocksize 64), then the delta is
added: the merged model reproduces the 4-bit model that was trained, with that model's rounding.

`verify=True` loads base+adapter (peft) and then the merged checkpoint, both in fp32, one after the
other (about 4 bytes per parameter of RAM), runs a few fixed prompts and fails (exit 1) when the
largest logit difference is above 1e-4 (fp32) or, for bf16/fp16, 1e-4 + 4x the logit change that
rounding base+adapter's own weights to that dtype causes (measured on the same prompts). With
from_quantized the reference base is transformers' own 4-bit load of the base, dequantized.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.checkpoints.adapter import Edit, Source, find_source, parse_adapter, resolve_base
from lorakit.checkpoints.layout import BaseTensor, Layout, OutTensor, base_index, nbytes, plan_output, read_layout
from lorakit.checkpoints.streaming import (
    MAX_SHARD_BYTES,
    copy_tokenizer,
    find_tokenizer,
    peak_rss,
    read_ahead,
    write_checkpoint,
)
from lorakit.errors import EXIT_RUNTIME, LorakitError

BNB_BLOCKSIZE = 64
DTYPES = ("bf16", "fp16", "fp32")
DORA_NORMS_FILE = "lorakit-dora-norms.st"  # safetensors, named so that loaders globbing *.safetensors skip it
# Logit tolerance of verify: FP32_TOL plus ROUNDING_FACTOR times the logit change that rounding
# base+adapter's own weights to the output dtype causes (0 for fp32). A merged bf16/fp16 checkpoint is
# one such rounding of W + dW, so its difference is of that size; a wrong merge is far above it.
FP32_TOL = 1e-4
ROUNDING_FACTOR = 4.0
VERIFY_PROMPTS = ("The quick brown fox", "What is the capital of France?", "def add(a, b):")


def tolerance(rounding_diff: float) -> float:
    """The largest acceptable logit difference, given the logit change of rounding to the output dtype."""
    return FP32_TOL + ROUNDING_FACTOR * rounding_diff


# ------------------------------------------------------------------------------------------------
# The merge of one tensor
# ------------------------------------------------------------------------------------------------

def _qdq(w, qcfg: dict):
    """The weight as bitsandbytes' 4-bit layer saw it: dequantize(quantize(w))."""
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=BNB_BLOCKSIZE, quant_type=qcfg["quant_type"],
                                       compress_statistics=qcfg["double_quant"])
    return bnbf.dequantize_4bit(packed, state)


def merge_one(w, o: OutTensor, edit: Edit | None, fan_in_fan_out: bool, qcfg: dict | None, norms: dict | None = None):
    """The merged tensor for `o`, in its output dtype (fp32 arithmetic when anything changes).

    A DoRA module's row norms ||W + s·B@A|| go into `norms[module]`: the merged weight alone fixes each
    row's direction and length but not that norm, which `lorakit unmerge` needs to take the delta off again."""
    import torch

    out_dtype = getattr(torch, o.dtype)
    replaced = edit is not None and o.param in edit.replace
    if replaced:
        w = edit.replace[o.param]  # modules_to_save / saved base layer: the adapter's tensor wins
    elif qcfg is not None and o.param == "weight" and o.module in qcfg["modules"]:
        w = _qdq(w, qcfg)
    if edit is None or edit.A is None or o.param not in ("weight", "bias"):
        return w.to(out_dtype)
    if o.param == "bias":
        if edit.bias is None:
            return w.to(out_dtype)
        return (w.float() + edit.bias.float() * edit.scale).to(out_dtype)
    w = w.float()
    if fan_in_fan_out and not edit.embedding:
        w = w.T
    A, B = edit.A.float(), edit.B.float()
    delta = (B @ A).T if edit.embedding else B @ A  # Embedding: [num_embeddings, dim]
    w = w + edit.scale * delta
    if edit.magnitude is not None:  # DoRA, as peft's merge: m / ||W + s·B@A|| per output row (column for Embedding)
        norm = torch.linalg.norm(w, dim=0 if edit.embedding else 1)
        if norms is not None:
            norms[o.module] = norm.contiguous()
        factor = edit.magnitude.float() / norm
        w = w * (factor.view(1, -1) if edit.embedding else factor.view(-1, 1))
    if fan_in_fan_out and not edit.embedding:
        w = w.T
    return w.contiguous().to(out_dtype)


def _check_bias_edits(plan: list[OutTensor], edits: dict[str, Edit]) -> None:
    have_bias = {o.module for o in plan if o.param == "bias"}
    missing = sorted(m for m, e in edits.items() if e.bias is not None and m not in have_bias)
    if missing:
        raise LorakitError(f"the adapter has a LoRA bias (lora_bias=True) for modules without a bias in the base: "
                           f"{', '.join(missing[:8])}", hint="such an adapter cannot be merged into this base")


def _quant_config(src: Source, layout: Layout, base: dict[str, BaseTensor]) -> dict:
    q = (src.recipe or {}).get("quantization") or {}
    quant_type = q.get("quant_type", "nf4")
    return {"quant_type": quant_type, "double_quant": bool(q.get("double_quant", True)),
            "modules": {m for m in layout.linear if f"{m}.weight" in base}}


# ------------------------------------------------------------------------------------------------
# Files beside the weights
# ------------------------------------------------------------------------------------------------

def _write_side_files(tmp: Path, base_dir: Path, base_name: str, src: Source, layout: Layout, dtype: str,
                      untie: bool, from_quantized: bool, shards: list[tuple[str, list[OutTensor]]]) -> None:
    from lorakit.runtime.atomic import atomic_write_json, atomic_write_text

    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    config = dict(layout.config)
    config.pop("quantization_config", None)
    config["dtype"] = torch_dtype
    config["torch_dtype"] = torch_dtype
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    atomic_write_json(tmp / "config.json", config)
    if len(shards) > 1:
        weight_map = {o.name: fname for fname, ts in shards for o in ts}
        total = sum(nbytes(o) for _, ts in shards for o in ts)
        atomic_write_json(tmp / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", tmp / "generation_config.json")
    copy_tokenizer(tmp, _tokenizer_candidates(src, base_dir))
    atomic_write_text(tmp / "README.md", _model_card(base_name, src, dtype, from_quantized))


def _tokenizer_candidates(src: Source | None, base_dir: Path) -> list[Path]:
    """Where a merged model's tokenizer comes from, first match wins: the run (it may override the chat
    template), its adapter, else the base."""
    if src is None:
        return [base_dir]
    return [d for d in (src.run_dir, src.run_dir and src.run_dir / "tokenizer", src.adapter_dir, base_dir) if d]



def _model_card(base_name: str, src: Source, dtype: str, from_quantized: bool) -> str:
    from lorakit import __version__

    cfg = src.config
    recipe = src.recipe or {}
    lines = [
        "---", f"base_model: {base_name}", "library_name: transformers", "tags: [lorakit, lora, merged]", "---", "",
        f"# {recipe.get('name', src.adapter_dir.name)} (merged)", "",
        f"The LoRA adapter `{src.adapter_dir}` folded into `{base_name}` by lorakit {__version__}.", "",
        f"- base model: `{base_name}`",
        f"- adapter: r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}, targets={cfg.get('target_modules')}"
        + (", rsLoRA" if cfg.get("use_rslora") else "") + (", DoRA" if cfg.get("use_dora") else ""),
        f"- recipe: `{src.run_dir / 'recipe.yaml'}`" if src.run_dir and src.recipe else "- recipe: none (adapter only)",
        f"- dtype: {dtype}",
        "- merged into: " + ("the 4-bit-rounded base weights (dequantize(quantize(W)))" if from_quantized
                            else "the original base weights"),
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------

def _prompt_ids(out_dir: Path, vocab: int) -> list[list[int]]:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out_dir)
        ids = [tok(p)["input_ids"] for p in VERIFY_PROMPTS]
        if all(ids) and max(max(i) for i in ids) < vocab:
            return ids
    except Exception:  # no tokenizer: fixed token ids still compare the two models
        pass
    return [[(7 * i + 3 * j) % vocab for j in range(12)] for i in range(len(VERIFY_PROMPTS))]


def _logits(model, prompts: list[list[int]]) -> list:
    import torch

    with torch.inference_mode():
        return [model(torch.tensor([p])).logits[0].float() for p in prompts]


def verify_merged(out_dir: Path, base_dir: Path, adapter_dir: Path, dtype: str, qcfg: dict | None = None) -> dict:
    """Largest |logit| difference between the merged checkpoint and base+adapter (both run in fp32).

    With `qcfg` (from_quantized) the reference base is loaded 4-bit by transformers and dequantized.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32, "use_safetensors": True}  # merge reads safetensors only
    if qcfg is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=qcfg["quant_type"], bnb_4bit_use_double_quant=qcfg["double_quant"],
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if qcfg is not None:  # transformers' own 4-bit rounding, run exactly (bnb's CPU 4-bit matmul rounds further)
        base_model = base_model.dequantize()
    ref_model = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    prompts = _prompt_ids(out_dir, ref_model.get_input_embeddings().weight.shape[0])
    ref = _logits(ref_model, prompts)
    rounding = 0.0
    if dtype != "fp32":  # the same model with every float weight rounded to the output dtype
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        with torch.no_grad():
            for p in ref_model.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(low).float())
        rounding = max(float((a - b).abs().max()) for a, b in zip(ref, _logits(ref_model, prompts)))
    del ref_model
    merged = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, use_safetensors=True).eval()
    got = _logits(merged, prompts)
    del merged
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    return {"max_logit_diff": diff, "max_abs_logit": max(float(r.abs().max()) for r in ref),
            "rounding_logit_diff": rounding, "tolerance": tolerance(rounding)}


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

@dataclass
class MergePlan:
    """A merge worked out from the headers and the adapter, before any base weight is read."""

    src: Source | None  # None: a plain checkpoint, nothing to merge
    base_dir: Path
    base_name: str
    layout: Layout
    tensors: list[OutTensor]  # the output tensors, in order
    untie: bool  # the base ties its embeddings and the adapter changes them: both are written
    edits: dict[str, Edit]
    qcfg: dict | None = None  # from_quantized: how the base was quantized in training

    @property
    def tied(self) -> bool:
        """Whether the output ties lm_head to the input embeddings (and stores only the latter)."""
        return self.layout.tied and not self.untie


def plan_merge(source: str | Path, *, base: str | None = None, dtype: str | None = "bf16",
               from_quantized: bool = False) -> MergePlan:
    """Plan folding the adapter of `source` (run dir or adapter dir) into its base.

    Args:
        source: a run directory (adapter/ + recipe.yaml) or a peft adapter directory.
        base: the base model (default: the run's or the adapter's).
        dtype: bf16/fp16/fp32 for every float tensor, or None: as the base, fp32 where the adapter changes it.
        from_quantized: merge into the 4-bit-rounded base weights the adapter was trained on.

    Returns:
        The plan; `merged_tensors(plan)` produces its tensors.
    """
    src = find_source(source)
    base_dir, base_name = resolve_base(base, src)
    edits = parse_adapter(src)
    index = base_index(base_dir)
    layout = read_layout(base_dir)
    tensors, untie = plan_output(index, edits, layout, dtype)
    _check_bias_edits(tensors, edits)
    qcfg = _quant_config(src, layout, index) if from_quantized else None
    return MergePlan(src, base_dir, base_name, layout, tensors, untie, edits, qcfg)


def plan_checkpoint(path: str | Path, *, dtype: str | None = None) -> MergePlan:
    """The same plan for a plain (already merged) checkpoint directory: its tensors as they are."""
    path = Path(path).expanduser()
    tensors, _ = plan_output(base_index(path), {}, layout := read_layout(path), dtype)
    return MergePlan(None, path, path.name, layout, tensors, False, {})


def _merge_fn(plan: MergePlan, norms: dict | None = None) -> Callable[[Any, OutTensor], Any]:
    """transform(base tensor, o) -> the merged tensor, for `write_checkpoint` and `merged_tensors`."""
    fan_in_fan_out = bool(plan.src and plan.src.config.get("fan_in_fan_out"))
    return lambda w, o: merge_one(w, o, plan.edits.get(o.module), fan_in_fan_out, plan.qcfg, norms)


def merged_tensors(plan: MergePlan) -> Iterator[tuple[OutTensor, Any]]:
    """Yield (output tensor, merged torch tensor) in plan order; the next base tensor is read meanwhile.

    Resident memory: the tensor yielded, the one being read and the arithmetic of one merge."""
    transform = _merge_fn(plan)
    reads = read_ahead(plan.tensors)
    try:
        for o in plan.tensors:
            name, w = next(reads)
            assert name == o.name, (name, o.name)
            t = transform(w, o)
            del w
            yield o, t
    finally:
        reads.close()


def tokenizer_dir(plan: MergePlan) -> Path | None:
    """Where the output's tokenizer comes from: the run (it may override the chat template), else the base."""
    return find_tokenizer(_tokenizer_candidates(plan.src, plan.base_dir))


def merge_adapter(source: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "bf16",
                  verify: bool = False, overwrite: bool = False, from_quantized: bool = False,
                  progress: Callable[[int, int, str], None] | None = None,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Merge the adapter of `source` (run dir or adapter dir) into its base; write a checkpoint to `out`.

    `progress(done_bytes, total_bytes, tensor_name)` is called after each tensor is written.
    Returns a report: base, adapter, out, dtype, shards, bytes, tensors, modules_merged, untied, seconds,
    peak_rss (this process's peak, bytes) and, with verify, max_logit_diff and tolerance.
    """
    start = time.perf_counter()
    if dtype not in DTYPES:
        raise LorakitError(f"dtype: expected one of {', '.join(DTYPES)} (got {dtype!r})")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise LorakitError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    mp = plan_merge(source, base=base, dtype=dtype, from_quantized=from_quantized)
    src, base_dir, base_name, plan, edits, untie, qcfg = (mp.src, mp.base_dir, mp.base_name, mp.tensors, mp.edits,
                                                          mp.untie, mp.qcfg)
    if out.resolve() in (base_dir.resolve(), src.adapter_dir.resolve(), (src.run_dir or base_dir).resolve()):
        raise LorakitError(f"{out}: the output directory must not be the base, run or adapter directory")
    norms: dict[str, Any] = {}  # DoRA modules' row norms ||W + s·B@A||, kept for `lorakit unmerge`

    def side_files(tmp: Path, named: list) -> None:
        _write_side_files(tmp, base_dir, base_name, src, mp.layout, dtype, untie, from_quantized, named)
        if norms:
            from safetensors.torch import save_file

            save_file(norms, tmp / DORA_NORMS_FILE, metadata={"format": "pt"})

    named = write_checkpoint(plan, out, _merge_fn(mp, norms), side_files, max_shard_bytes=max_shard_bytes,
                             progress=progress)
    total = sum(nbytes(o) for o in plan)
    report = {
        "base": base_name, "base_dir": str(base_dir), "adapter": str(src.adapter_dir), "out": str(out),
        "dtype": dtype, "from_quantized": from_quantized, "shards": len(named), "bytes": total,
        "tensors": len(plan), "modules_merged": sum(1 for e in edits.values() if e.A is not None),
        "modules_replaced": sum(1 for e in edits.values() if e.replace), "untied_embeddings": untie,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss": peak_rss(),
    }
    if verify:
        result = verify_merged(out, base_dir, src.adapter_dir, dtype, qcfg)
        report.update(result)
        report["seconds_with_verify"] = round(time.perf_counter() - start, 3)
        if result["max_logit_diff"] > result["tolerance"]:
            raise LorakitError(f"verify: merged logits differ from base+adapter by {result['max_logit_diff']:.3g} "
                               f"(tolerance for {dtype}: {result['tolerance']:.3g}); the merged checkpoint is at {out}",
                               hint="check that --base is the model the adapter was trained on", exit_code=EXIT_RUNTIME)
    return report


