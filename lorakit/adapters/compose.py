"""`lorakit compose`: one adapter from several adapters of the same base, from the adapter tensors alone.

No base weights are read: every method works module by module on the LoRA factors, with each adapter's
scale s (alpha/r, or alpha/sqrt(r) with rsLoRA) and weight w folded in, so the result has lora_alpha = r
(scale 1) and mixes rsLoRA and plain adapters freely. The methods are peft's `add_weighted_adapter`'s:
  cat        A = [w1·s1·A1; w2·s2·A2; ...], B = [B1 B2 ...]: B@A is exactly Σ wi·si·Bi@Ai, rank = Σ ranks.
  svd        that sum truncated to --rank (default: the largest input rank) by its SVD, computed through QR
             of the stacked factors (no out×in matrix is formed); the energy kept per module is reported.
  linear, ties, dare_ties
             the A's and the B's mixed separately with weights ±sqrt(|wi·si|) by peft's own merge_utils;
             they mix factors elementwise, so every adapter must adapt the same modules with the same rank.
dare_ties draws its random masks module by module in the base model's module order (peft's order) when the
base's config can be found, from torch's generator seeded with --seed, so it repeats peft's draws.
Modules of different ranks are zero-padded to one rank (as peft does), so the config needs no rank_pattern.
Refused, with the adapter named: DoRA (its update depends on the base weights through ||W + s·B@A||, so it
is no delta that adds to another), adapters of different bases, one module replaced (modules_to_save) by two
adapters, LoRA biases except for cat and svd (peft has no rule for them).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.checkpoints.adapter import PREFIX, Edit, Source, find_source, parse_adapter, resolve_base
from lorakit.checkpoints.layout import read_layout
from lorakit.checkpoints.streaming import copy_tokenizer, replace_dir
from lorakit.errors import LorakitError
from lorakit.merge import merge_adapter

METHODS = ("linear", "cat", "svd", "ties", "dare_ties")
_FACTOR_METHODS = ("linear", "ties", "dare_ties")  # mix A's and B's elementwise: same modules and ranks


@dataclass
class Part:
    """One input adapter: where it is, its weight and its parsed modules."""

    src: Source
    weight: float
    edits: dict[str, Edit]

    @property
    def name(self) -> str:
        return str(self.src.run_dir or self.src.adapter_dir)


def parse_weighted(spec: str) -> tuple[str, float]:
    """`DIR[:WEIGHT]` -> (DIR, WEIGHT); WEIGHT defaults to 1 (a DIR with a colon and no weight stays whole)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def parse_weights(text: str | None, n: int) -> list[float]:
    """`0.7,0.3` -> [0.7, 0.3], checked against the number of adapters (all 1.0 when not given)."""
    if text is None:
        return [1.0] * n
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise LorakitError(f"--weights: expected comma-separated numbers (got {text!r})") from None
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise LorakitError(f"--weights: {len(weights)} weight(s) for {n} adapter(s); give one finite number each")
    return weights


def _base_name(src: Source) -> str | None:
    return (src.recipe or {}).get("base_model") or src.config.get("base_model_name_or_path")


def _same_base(parts: list[Part]) -> None:
    def key(name: str) -> str:
        p = Path(name).expanduser()
        return str(p.resolve()) if p.exists() else name

    named = [(p, _base_name(p.src)) for p in parts]
    known = [(p, n) for p, n in named if n]
    for p, n in known[1:]:
        if key(n) != key(known[0][1]):
            raise LorakitError(f"the adapters are for different bases: {known[0][0].name} is for {known[0][1]!r}, "
                               f"{p.name} for {n!r}", hint="compose adapters trained on the same base model")
    shapes: dict[str, tuple] = {}
    for p in parts:
        for module, e in p.edits.items():
            if e.A is None:
                continue
            shape = (e.B.shape[0], e.A.shape[1])
            if shapes.setdefault(module, shape) != shape:
                raise LorakitError(f"the adapters are for different bases: {module} is {shapes[module]} in one and "
                                   f"{shape} in {p.name}", hint="compose adapters trained on the same base model")


def load_parts(adapters: list[str | Path], weights: list[float], method: str) -> list[Part]:
    """Read and check the adapters for `method`; errors name the adapter and module at fault."""
    if method not in METHODS:
        raise LorakitError(f"--method: expected one of {', '.join(METHODS)} (got {method!r})")
    if not adapters:
        raise LorakitError("compose: no adapters given")
    parts = []
    for path, weight in zip(adapters, weights, strict=True):
        src = find_source(path)
        if src.config.get("use_dora"):
            raise LorakitError(f"{path}: a DoRA adapter (use_dora) cannot be composed: its update m·(W + s·B@A)/"
                               "||W + s·B@A|| depends on the base weights, so it does not add to another adapter",
                               hint="merge it into the base with `lorakit merge` instead")
        parts.append(Part(src, weight, parse_adapter(src)))
    _same_base(parts)
    if len({bool(p.src.config.get("fan_in_fan_out")) for p in parts}) > 1:
        raise LorakitError("the adapters disagree on fan_in_fan_out (the orientation of their weights)")
    if method in _FACTOR_METHODS:
        _same_modules(parts, method)
    if method not in ("cat", "svd"):
        with_bias = [p.name for p in parts if any(e.bias is not None for e in p.edits.values())]
        if with_bias:
            raise LorakitError(f"{with_bias[0]}: LoRA biases (lora_bias) are composed by cat and svd only")
    owner: dict[tuple[str, str], str] = {}
    for p in parts:
        for module, e in p.edits.items():
            for param in e.replace:
                if owner.setdefault((module, param), p.name) != p.name:
                    raise LorakitError(f"{module}.{param} is replaced (modules_to_save) by both "
                                       f"{owner[(module, param)]} and {p.name}; such replacements cannot be mixed")
    return parts


def _same_modules(parts: list[Part], method: str) -> None:
    first = parts[0]
    mods0 = {m: e.A.shape[0] for m, e in first.edits.items() if e.A is not None}
    for p in parts[1:]:
        mods = {m: e.A.shape[0] for m, e in p.edits.items() if e.A is not None}
        only0, only = sorted(set(mods0) - set(mods)), sorted(set(mods) - set(mods0))
        if only0 or only:
            has, lacks, mods_ = (first, p, only0) if only0 else (p, first, only)
            which = f"{has.name} adapts {', '.join(mods_[:4])}{' ...' if len(mods_) > 4 else ''}, {lacks.name} does not"
            raise LorakitError(f"--method {method} mixes the adapters' A and B factors module by module, so they must "
                               f"adapt the same modules: {which}", hint="use --method cat (exact) or svd")
        ranks = [m for m in mods if mods[m] != mods0[m]]
        if ranks:
            raise LorakitError(f"--method {method} needs equal ranks: {ranks[0]} has rank {mods0[ranks[0]]} in "
                               f"{first.name} and {mods[ranks[0]]} in {p.name}", hint="use --method cat or svd")


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _module_order(parts: list[Part], modules: set[str], base: str | None) -> list[str]:
    """The modules in the base model's order (peft's), or in natural order when the base is not at hand."""
    try:
        order = read_layout(resolve_base(base, parts[0].src)[0]).modules
    except LorakitError:
        order = []
    rank = {m: i for i, m in enumerate(order)}
    return sorted(modules, key=lambda m: (rank.get(m, len(rank)), _natural(m)))


def svd_truncate(A, B, rank: int):
    """(A', B', energy kept) with B'@A' the best rank-`rank` approximation of B@A (B' = U·S, A' = Vh).

    QR of the two thin factors reduces the SVD to one of a (rank_B x rank_A) core, exact to fp32 rounding."""
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    total = float((s * s).sum())
    energy = float((s[:k] * s[:k]).sum()) / total if total > 0 else 1.0
    return vh[:k] @ qa.T, (qb @ u[:, :k]) * s[:k], energy


def _combine(method: str, items: list[tuple[Edit, float]], rank: int, density: float | None):
    """(A, B, bias, energy) of one module from its (edit, weight) pairs, in fp32."""
    scaled = [w * e.scale for e, w in items]
    bias = None
    if any(e.bias is not None for e, _ in items):
        bias = sum(e.bias.float() * s for (e, _), s in zip(items, scaled) if e.bias is not None)
    if method in ("cat", "svd"):
        A = torch.cat([e.A.float() * s for (e, _), s in zip(items, scaled)], dim=0)
        B = torch.cat([e.B.float() for e, _ in items], dim=1)
        if method == "cat":
            return A, B, bias, None
        A, B, kept = svd_truncate(A, B, rank)
        return A, B, bias, kept
    mix = {"linear": lambda t, w: merge_utils.task_arithmetic(t, w),
           "ties": lambda t, w: merge_utils.ties(t, w, density, "total"),
           "dare_ties": lambda t, w: merge_utils.dare_ties(t, w, density, "total")}[method]
    wa = torch.tensor([math.copysign(math.sqrt(abs(s)), s) for s in scaled])
    wb = torch.tensor([math.sqrt(abs(s)) for s in scaled])
    return mix([e.A.float() for e, _ in items], wa), mix([e.B.float() for e, _ in items], wb), None, None


def _targets(configs: list[dict], modules: list[str]) -> dict:
    """target_modules (and layer selection) that match exactly the composed modules."""
    keys = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
    if len({json.dumps([c.get(k) for k in keys], sort_keys=True) for c in configs}) == 1:
        return {k: configs[0].get(k) for k in keys}
    out = dict.fromkeys(keys)
    if all(isinstance(c.get("target_modules"), list) and not any(c.get(k) for k in keys[1:]) for c in configs):
        out["target_modules"] = sorted(set().union(*(c["target_modules"] for c in configs)))
    else:  # peft full-matches a string against each module's name
        out["target_modules"] = "(" + "|".join(re.escape(m) for m in modules) + ")"
    return out


def compose(adapters: list[str | Path], out: str | Path, *, weights: list[float] | None = None, method: str = "svd",
            rank: int | None = None, density: float | None = None, seed: int = 0, base: str | None = None,
            overwrite: bool = False) -> dict:
    """Write one peft adapter combining `adapters` (same base) with `weights` by `method`.

    Args:
        adapters: adapter or run directories.
        out: the new adapter directory (adapter_config.json + adapter_model.safetensors, fp32 weights).
        weights: one per adapter (default 1.0 each); negative weights subtract.
        method: linear, cat, svd, ties or dare_ties (peft's add_weighted_adapter).
        rank: svd only: the rank kept (default the largest input rank).
        density: ties and dare_ties only (required): the fraction of entries kept, in (0, 1].
        seed: dare_ties: torch's seed before the random masks are drawn.
        base: the base model (for dare_ties' module order; default: the adapters' own).
        overwrite: replace an existing `out`.

    Returns:
        A report: out, method, adapters, weights, rank, modules and, for svd, energy_kept per module.
    """
    start = time.perf_counter()
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise LorakitError(f"--weights: {len(weights)} weight(s) for {len(adapters)} adapter(s)")
    if method in ("ties", "dare_ties"):
        if density is None or not 0 < density <= 1:
            raise LorakitError(f"--density: {method} needs a density in (0, 1], the fraction of entries kept "
                               f"(got {density})")
    elif density is not None:
        raise LorakitError(f"--density applies to ties and dare_ties only (not {method})")
    if rank is not None and method != "svd":
        raise LorakitError(f"--rank applies to --method svd only (not {method})")
    if rank is not None and rank < 1:
        raise LorakitError(f"--rank: expected a positive rank (got {rank})")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise LorakitError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    parts = load_parts(adapters, weights, method)
    if any(out.resolve() in (p.src.adapter_dir.resolve(), (p.src.run_dir or p.src.adapter_dir).resolve())
           for p in parts):
        raise LorakitError(f"{out}: the output directory must not be one of the input adapters")

    lora_modules = {m for p in parts for m, e in p.edits.items() if e.A is not None}
    order = _module_order(parts, lora_modules, base) if method == "dare_ties" else sorted(lora_modules, key=_natural)
    ranks = {m: [p.edits[m].A.shape[0] for p in parts if m in p.edits and p.edits[m].A is not None] for m in order}
    if method == "cat":  # rank = the sum of the ranks (per module; smaller sums are zero-padded)
        new_rank = max((sum(r) for r in ranks.values()), default=1)
    else:
        new_rank = rank or max((max(r) for r in ranks.values()), default=1)
    torch.manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    for m in order:
        items = [(p.edits[m], p.weight) for p in parts if m in p.edits and p.edits[m].A is not None]
        A, B, bias, kept = _combine(method, items, new_rank, density)
        pad = new_rank - A.shape[0]
        A, B = torch.nn.functional.pad(A, (0, 0, 0, pad)), torch.nn.functional.pad(B, (0, pad))
        emb = items[0][0].embedding
        tensors[f"{PREFIX}{m}.lora_embedding_A" if emb else f"{PREFIX}{m}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{m}.lora_embedding_B" if emb else f"{PREFIX}{m}.lora_B.weight"] = B.contiguous()
        if bias is not None:
            tensors[f"{PREFIX}{m}.lora_B.bias"] = bias.contiguous()
        if kept is not None:
            energy[m] = round(kept, 6)
    saved = []  # modules_to_save / saved base layers: carried over unchanged, keys as the adapter has them
    for p in parts:
        if any(e.replace for e in p.edits.values()):
            with safe_open(p.src.adapter_dir / "adapter_model.safetensors", framework="pt") as fh:
                for key in fh.keys():
                    if ".lora_" not in key:
                        tensors[key] = fh.get_tensor(key)
            saved += p.src.config.get("modules_to_save") or []

    config = dict(parts[0].src.config)
    config.update(_targets([p.src.config for p in parts], order), r=new_rank, lora_alpha=new_rank, use_rslora=False,
                  use_dora=False, rank_pattern={}, alpha_pattern={}, init_lora_weights=True, inference_mode=True,
                  lora_bias=any(k.endswith(".lora_B.bias") for k in tensors),
                  modules_to_save=sorted(set(saved)) or None, base_model_name_or_path=_base_name(parts[0].src))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        src0 = parts[0].src
        copy_tokenizer(tmp, [d for d in (src0.adapter_dir, src0.run_dir) if d is not None])
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = {"out": str(out), "method": method, "adapters": [p.name for p in parts], "weights": weights,
              "rank": new_rank, "modules": len(order), "bytes": (out / "adapter_model.safetensors").stat().st_size,
              "seconds": round(time.perf_counter() - start, 3)}
    if method == "svd":
        report["min_energy_kept"] = min(energy.values(), default=1.0)
        report["energy_kept"] = energy
    return report


def merge_weighted(adapters: list[tuple[str | Path, float]], out: str | Path, *, base: str | None = None,
                   **merge_kwargs) -> dict:
    """`lorakit merge --adapter A:0.7 --adapter B:0.3`: fold several weighted adapters into the base at once.

    One adapter of weight 1 is a plain merge. Otherwise the adapters are composed by cat (exactly Σ wi·si·Bi@Ai,
    fp32) into a temporary run directory beside the first one's recipe, which is then merged and streamed as
    any adapter is (so --verify compares against base + that sum).

    Args:
        adapters: (adapter or run directory, weight) pairs.
        out: the merged checkpoint directory.
        base: the base model (default: the first adapter's).
        merge_kwargs: as lorakit.merge.merge_adapter (dtype, verify, overwrite, from_quantized, ...).

    Returns:
        merge_adapter's report, with adapters and weights.
    """
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        return merge_adapter(adapters[0][0], out, base=base, **merge_kwargs)
    first = find_source(adapters[0][0])
    base_dir, _ = resolve_base(base, first)
    with tempfile.TemporaryDirectory(prefix="lorakit-compose-") as d:
        if first.run_dir is not None and (first.run_dir / "recipe.yaml").is_file():  # the run's quantization
            shutil.copy2(first.run_dir / "recipe.yaml", Path(d) / "recipe.yaml")
        compose([a for a, _ in adapters], Path(d) / "adapter", weights=[w for _, w in adapters], method="cat")
        report = merge_adapter(d, out, base=str(base_dir), **merge_kwargs)
    report.update(adapter=None, adapters=[str(a) for a, _ in adapters], weights=[w for _, w in adapters])
    return report
