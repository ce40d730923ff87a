"""`lorakit unmerge`: the base back from a merged checkpoint, streamed tensor by tensor like merge.

Each weight the adapter changed becomes W = M - s·B@A in fp32 (fan_in_fan_out, Embedding orientation and a
LoRA bias handled as merge does), then is cast back to the checkpoint's dtype; every other tensor is copied.
DoRA merged M = m·V/||V|| row by row, with V = W + s·B@A: the merged weights fix each row's direction but not
||V||, so the row norms that `lorakit merge` kept beside the checkpoint (lorakit-dora-norms.st) give V = M·||V||/m,
then W = V - s·B@A. Tensors the adapter replaced (modules_to_save) no longer exist in the merged checkpoint and
are read from --base. A merge into the 4-bit-rounded base (--from-quantized) gives back that rounded base;
an untied head stays untied (it computes what the tied base did).

--verify reads the real base (--base) beside each output tensor and checks every element against the rounding
that merge and unmerge can cause: |U - W| <= eps·(|V| + |W|) + 16·eps32·max|s·B@A| (eps of the checkpoint's
dtype; V the pre-rounding merged value); a wrong adapter or base leaves deltas far above that.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lorakit.adapters.compose import compose
from lorakit.checkpoints.adapter import Edit, find_source, parse_adapter
from lorakit.checkpoints.layout import OutTensor, base_index, nbytes, read_layout
from lorakit.checkpoints.streaming import TOKENIZER_FILES, peak_rss, read_tensor, write_checkpoint
from lorakit.errors import EXIT_RUNTIME, LorakitError
from lorakit.merge import DORA_NORMS_FILE
from lorakit.runtime.atomic import atomic_write_json

_COPIED = ("config.json", "generation_config.json", *TOKENIZER_FILES)


def _delta(edit: Edit, fan_in_fan_out: bool):
    """s·B@A in the weight's orientation (fp32)."""
    d = edit.scale * (edit.B.float() @ edit.A.float())
    return d.T if edit.embedding or fan_in_fan_out else d


def unmerge_one(m, o: OutTensor, edit: Edit | None, fan_in_fan_out: bool, norms: dict) -> tuple[Any, Any, Any]:
    """(unmerged tensor in o.dtype, V = the merged value before rounding (fp32) or None, delta or None)."""
    dtype = getattr(torch, o.dtype)
    if edit is None or edit.A is None or o.param not in ("weight", "bias") or (o.param == "bias" and edit.bias is None):
        return m.to(dtype), None, None
    if o.param == "bias":
        d = edit.bias.float() * edit.scale
        return (m.float() - d).to(dtype), m.float(), d
    v, d = m.float(), _delta(edit, fan_in_fan_out)
    if edit.magnitude is not None:  # V = M·||V||/m per output row (per column of an Embedding's weight)
        if o.module not in norms:
            raise LorakitError(f"{o.module}: a DoRA module, and the merged checkpoint has no row norms for it "
                               f"({DORA_NORMS_FILE}, written by `lorakit merge`)",
                               hint="the merged weights alone do not determine the base for DoRA; unmerge "
                                    "checkpoints merged by lorakit")
        factor = norms[o.module].float() / edit.magnitude.float()
        emb_cols = edit.embedding or fan_in_fan_out
        v = v * (factor.view(1, -1) if emb_cols else factor.view(-1, 1))
    return (v - d).to(dtype), v, d


def unmerge(merged: str | Path, adapter: str | Path, out: str | Path, *, base: str | Path | None = None,
            verify: bool = False, overwrite: bool = False, weight: float = 1.0) -> dict:
    """Write the base model back from `merged` (a checkpoint with `adapter` folded in) to `out`.

    Args:
        merged: the merged checkpoint directory.
        adapter: the adapter (or run) directory that was merged; with `weight` as it was merged.
        out: the output directory (replaced only when complete, and only with `overwrite`).
        base: the real base directory: the source of replaced (modules_to_save) tensors, and what --verify
            compares with.
        verify: compare every output tensor with `base` (exit 1 if above the rounding bound).
        overwrite: replace an existing `out`.
        weight: the adapter's weight in the merge.

    Returns:
        A report: merged, adapter, out, tensors, modules_unmerged, bytes, seconds, peak_rss and, with verify,
        max_abs_diff, worst_bound_ratio (<= 1 passes) and worst_tensor.
    """
    start = time.perf_counter()
    merged, out = Path(merged).expanduser(), Path(out).expanduser()
    if not (merged / "config.json").is_file():
        raise LorakitError(f"{merged}: not a model directory (no config.json)")
    if out.exists() and not overwrite:
        raise LorakitError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    src = find_source(adapter)
    if out.resolve() in (merged.resolve(), src.adapter_dir.resolve()):
        raise LorakitError(f"{out}: the output directory must not be the merged or adapter directory")
    if verify and base is None:
        raise LorakitError("--verify compares with the real base: pass --base")
    edits = parse_adapter(src)
    if weight != 1.0:
        if any(e.magnitude is not None for e in edits.values()):
            raise LorakitError(f"{adapter}: a DoRA adapter is merged with weight 1 only")
        for e in edits.values():
            e.scale *= weight
    index = base_index(merged)
    base_idx = base_index(Path(base).expanduser()) if base is not None else {}
    plan = [OutTensor(t.name, t, *t.name.rpartition(".")[::2], t.dtype) for t in index.values()]
    have = {(o.module, o.param) for o in plan}
    missing = sorted(m for m, e in edits.items() if e.A is not None and (m, "weight") not in have)
    if missing:
        raise LorakitError(f"the adapter changes modules the merged checkpoint does not have: {', '.join(missing[:8])}",
                           hint="is this the adapter that was merged into it?")
    replaced = [f"{m}.{p}" for m, e in edits.items() for p in e.replace]
    if replaced and not all(n in base_idx for n in replaced):
        raise LorakitError(f"the adapter replaced {', '.join(replaced[:4])} (modules_to_save); the merged checkpoint "
                           "no longer has the base's own", hint="pass --base DIR to take them from the real base")
    norms = load_file(merged / DORA_NORMS_FILE) if (merged / DORA_NORMS_FILE).is_file() else {}
    fan = bool(src.config.get("fan_in_fan_out"))
    head = read_layout(merged).output_embed if verify else None
    emb = read_layout(Path(base)).input_embed if verify else None
    check = {"max_abs_diff": 0.0, "worst_bound_ratio": 0.0, "worst_tensor": None}

    def reference(name: str):
        if name in base_idx:
            return read_tensor(base_idx[name])
        if head and name == f"{head}.weight" and f"{emb}.weight" in base_idx:  # merge untied a tied head
            return read_tensor(base_idx[f"{emb}.weight"])
        raise LorakitError(f"verify: {name} is in the unmerged checkpoint but not in the base {base}",
                           exit_code=EXIT_RUNTIME)

    def transform(m, o: OutTensor):
        edit = edits.get(o.module)
        if edit is not None and o.param in edit.replace:
            return read_tensor(base_idx[o.name]).to(getattr(torch, o.dtype))
        u, v, d = unmerge_one(m, o, edit, fan, norms)
        if verify:
            w = reference(o.name).float()
            if w.shape != u.shape:
                raise LorakitError(f"verify: {o.name} has shape {tuple(w.shape)} in the base, {tuple(u.shape)} here",
                                   exit_code=EXIT_RUNTIME)
            err = (u.float() - w).abs()
            v = m.float() if v is None else v
            eps = torch.finfo(u.dtype).eps if u.is_floating_point() else 0.0
            floor = 16 * torch.finfo(torch.float32).eps * (float(d.abs().max()) if d is not None else 0.0)
            ratio = float((err / (eps * (v.abs() + w.abs()) + floor + 1e-30)).max()) if err.numel() else 0.0
            check["max_abs_diff"] = max(check["max_abs_diff"], float(err.max()) if err.numel() else 0.0)
            if ratio > check["worst_bound_ratio"]:
                check.update(worst_bound_ratio=ratio, worst_tensor=o.name)
        return u

    def side_files(tmp: Path, named: list) -> None:
        for name in _COPIED:
            if (merged / name).is_file():
                shutil.copy2(merged / name, tmp / name)
        if len(named) > 1:
            atomic_write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(nbytes(o) for _, ts in named for o in ts)},
                "weight_map": {o.name: fname for fname, ts in named for o in ts}})

    named = write_checkpoint(plan, out, transform, side_files)
    report = {"merged": str(merged), "adapter": str(src.adapter_dir), "out": str(out), "tensors": len(plan),
              "shards": len(named), "modules_unmerged": sum(1 for e in edits.values() if e.A is not None),
              "bytes": sum(nbytes(o) for o in plan), "seconds": round(time.perf_counter() - start, 3),
              "peak_rss": peak_rss()}
    if verify:
        report.update(check)
        if check["worst_bound_ratio"] > 1:
            raise LorakitError(f"verify: {check['worst_tensor']} differs from the base by more than rounding "
                               f"({check['worst_bound_ratio']:.3g}x the bound); the unmerged checkpoint is at {out}",
                               hint="is this the adapter (and weight) that was merged, and --base its base?",
                               exit_code=EXIT_RUNTIME)
    return report


def unmerge_weighted(merged: str | Path, adapters: list[tuple[str | Path, float]], out: str | Path, **kw) -> dict:
    """unmerge for `lorakit merge --adapter A:w --adapter B:v`: several adapters come off as their cat composition.

    Args:
        merged: the merged checkpoint directory.
        adapters: (adapter or run directory, weight) pairs, as they were merged.
        out: the output directory.
        kw: as `unmerge` (base, verify, overwrite).

    Returns:
        unmerge's report, with adapters and weights.
    """
    if len(adapters) == 1:
        return unmerge(merged, adapters[0][0], out, weight=adapters[0][1], **kw)
    with tempfile.TemporaryDirectory(prefix="lorakit-compose-") as d:
        compose([a for a, _ in adapters], Path(d) / "adapter", weights=[w for _, w in adapters], method="cat")
        report = unmerge(merged, Path(d) / "adapter", out, **kw)
    report.update(adapter=None, adapters=[str(a) for a, _ in adapters], weights=[w for _, w in adapters])
    return report
