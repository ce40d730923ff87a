"""`lorakit extract`: a LoRA adapter approximating a fine-tuned model's change, T - B, module by module.

For every target Linear, D = T.weight - B.weight (fp32) is replaced by its best rank-R approximation (Eckart-
Young): the truncated SVD D ≈ U·S·Vh, saved as lora_B = U·sqrt(S), lora_A = sqrt(S)·Vh with lora_alpha = r (scale
1). The SVD is exact (torch.linalg.svd) when the matrix's smaller side is at most EXACT_MAX_SIDE, else randomized
(torch.svd_lowrank with R + OVERSAMPLE columns and NITER power iterations), whose error is measured, not assumed.
The two checkpoints are read one tensor at a time (each through its own safe_open, as merge does), so memory
stays near two tensors and one SVD. Reported per module: the relative error ||D - D_R|| / ||D|| (Frobenius) and
the energy kept ||D_R||² / ||D||². Other tensors that differ (norms, embeddings, an untargeted head) cannot go
into a LoRA adapter: they are listed. `--verify` loads B + the adapter and T (fp32, one after the other) and
reports the largest logit difference, beside the difference between B and T themselves.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from lorakit.checkpoints.adapter import PREFIX
from lorakit.checkpoints.layout import base_index, read_layout
from lorakit.checkpoints.streaming import copy_tokenizer, peak_rss, read_tensor, replace_dir, tensors_equal
from lorakit.errors import LorakitError
from lorakit.merge import _logits, _prompt_ids

EXACT_MAX_SIDE = 1024
OVERSAMPLE = 16
NITER = 4


def low_rank(D, rank: int):
    """(A, B, relative error, energy kept) of the best rank-`rank` approximation B@A of D (fp32)."""
    k = min(rank, *D.shape)
    if min(D.shape) <= EXACT_MAX_SIDE:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    else:
        U, S, V = torch.svd_lowrank(D, q=min(k + OVERSAMPLE, *D.shape), niter=NITER)
        Vh = V.T
    root = S[:k].sqrt()
    B, A = U[:, :k] * root, root[:, None] * Vh[:k]
    total = float(D.pow(2).sum())
    err = float((D - B @ A).pow(2).sum())
    if k < rank:  # a matrix smaller than the rank: exact, padded with zeros to the adapter's rank
        A, B = torch.nn.functional.pad(A, (0, 0, 0, rank - k)), torch.nn.functional.pad(B, (0, rank - k))
    if total == 0:
        return A, B, 0.0, 1.0
    return A.contiguous(), B.contiguous(), (err / total) ** 0.5, 1 - err / total


def _targets(layout, targets: list[str] | None) -> list[str]:
    if not targets or targets == ["all-linear"]:
        return sorted(layout.linear, key=layout.modules.index)
    chosen = [m for m in layout.modules if m in layout.linear and m.rsplit(".", 1)[-1] in targets]
    unknown = [t for t in targets if not any(m.rsplit(".", 1)[-1] == t for m in chosen)]
    if unknown:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in layout.linear})
        raise LorakitError(f"--targets: no Linear module named {', '.join(unknown)} in this model",
                           hint=f"its Linear modules: {', '.join(leaves)}")
    return chosen


def extract(base: str | Path, tuned: str | Path, out: str | Path, *, rank: int, targets: list[str] | None = None,
            verify: bool = False, overwrite: bool = False) -> dict:
    """Write a LoRA adapter for `base` approximating `tuned` - `base` at `rank`.

    Args:
        base: the base model directory (safetensors).
        tuned: the fine-tuned model directory (same architecture and tensor names).
        out: the adapter directory (adapter_config.json + adapter_model.safetensors, fp32).
        rank: the LoRA rank.
        targets: Linear module names (q_proj, ...) or None / ["all-linear"]: every Linear but the output head.
        verify: compare logits of base + adapter with tuned.
        overwrite: replace an existing `out`.

    Returns:
        A report: out, rank, modules, relative_error and energy_kept per module (and their worst), not_extracted
        (other tensors that differ), bytes, seconds, peak_rss and, with verify, max_logit_diff and
        base_vs_tuned_logit_diff.
    """
    start = time.perf_counter()
    if rank < 1:
        raise LorakitError(f"--rank: expected a positive rank (got {rank})")
    base, tuned, out = Path(base).expanduser(), Path(tuned).expanduser(), Path(out).expanduser()
    for name, d in (("--base", base), ("--tuned", tuned)):
        if not (d / "config.json").is_file():
            raise LorakitError(f"{name} {d}: not a model directory (no config.json)")
    if out.exists() and not overwrite:
        raise LorakitError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    b_idx, t_idx = base_index(base), base_index(tuned)
    layout = read_layout(base)
    modules = _targets(layout, targets)
    for name in (f"{m}.weight" for m in modules):
        if name not in b_idx or name not in t_idx or b_idx[name].shape != t_idx[name].shape:
            raise LorakitError(f"{name}: {'missing from ' + str(tuned) if name not in t_idx else 'shapes differ'}; "
                               "--tuned must be a fine-tune of --base (same architecture)")
    tensors, rel, energy = {}, {}, {}
    for m in modules:
        D = read_tensor(t_idx[f"{m}.weight"]).float()
        D -= read_tensor(b_idx[f"{m}.weight"]).float()
        A, B, rel[m], energy[m] = low_rank(D, rank)
        del D
        tensors[f"{PREFIX}{m}.lora_A.weight"], tensors[f"{PREFIX}{m}.lora_B.weight"] = A, B
    names = {f"{m}.weight" for m in modules}
    not_extracted = sorted(n for n in t_idx if n not in names and
                           (n not in b_idx or not tensors_equal(t_idx[n], b_idx[n])))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
                        base_model_name_or_path=str(base), task_type="CAUSAL_LM")
    if targets and targets != ["all-linear"]:
        config.target_modules = "(" + "|".join(m.replace(".", r"\.") for m in modules) + ")"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        copy_tokenizer(tmp, [tuned, base])
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = {"out": str(out), "rank": rank, "modules": len(modules),
              "max_relative_error": max(rel.values(), default=0.0),
              "min_energy_kept": min(energy.values(), default=1.0),
              "relative_error": {m: round(v, 6) for m, v in rel.items()},
              "energy_kept": {m: round(v, 6) for m, v in energy.items()}, "not_extracted": not_extracted,
              "bytes": (out / "adapter_model.safetensors").stat().st_size,
              "seconds": round(time.perf_counter() - start, 3), "peak_rss": peak_rss()}
    if verify:
        report.update(verify_extracted(base, tuned, out))
    return report


def verify_extracted(base: Path, tuned: Path, adapter: Path) -> dict:
    """Largest |logit| difference of base + adapter vs tuned, and of base vs tuned (fp32, fixed prompts)."""
    def load(d):
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, use_safetensors=True).eval()

    model = load(tuned)
    prompts = _prompt_ids(tuned, model.get_input_embeddings().weight.shape[0])
    want = _logits(model, prompts)
    del model
    model = load(base)
    plain = _logits(model, prompts)
    got = _logits(PeftModel.from_pretrained(model, adapter).eval(), prompts)
    del model

    def diff(xs):
        return max(float((a - b).abs().max()) for a, b in zip(xs, want))

    return {"max_logit_diff": diff(got), "base_vs_tuned_logit_diff": diff(plain),
            "max_abs_logit": max(float(w.abs().max()) for w in want)}
