"""Fold a LoRA adapter into its base model, one tensor at a time, and prove the result.

The usual path (load the whole model, `merge_and_unload`, `save_pretrained`) needs the full model in
memory. Here the base's safetensors shards are read tensor by tensor, each tensor the adapter touches
gets its update in fp32 (W + s·B@A with s = alpha/r, or alpha/sqrt(r) with rsLoRA; DoRA's magnitude
renormalization; modules_to_save replacements; a LoRA bias), is cast to the output dtype and is written
straight into the output shard. Resident memory stays near the largest single tensor plus the adapter:
  * each tensor is read with its own `safe_open` (an open file's mmap keeps every page read so far
    resident, so reading a whole shard through one handle costs a whole shard of RSS);
  * output shards are streamed: the safetensors header is computed up front from the base's shapes,
    then tensor bytes follow one by one (the format is an 8-byte length, a JSON header, raw bytes).
The checkpoint is written into `OUT.tmp-XXXX` beside OUT and renamed when complete (`write_checkpoint`,
which `lorakit unmerge` shares). A DoRA merge also writes its row norms ||W + s·B@A|| to
lorakit-dora-norms.st, the one thing `lorakit unmerge` cannot recover from the merged weights.

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

import json
import math
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import EXIT_RUNTIME, LorakitError

PREFIX = "base_model.model."
MAX_SHARD_BYTES = 5_000_000_000
BNB_BLOCKSIZE = 64
DTYPES = ("bf16", "fp16", "fp32")
DORA_NORMS_FILE = "lorakit-dora-norms.st"  # safetensors, named so that loaders globbing *.safetensors skip it
# Logit tolerance of verify: FP32_TOL plus ROUNDING_FACTOR times the logit change that rounding
# base+adapter's own weights to the output dtype causes (0 for fp32). A merged bf16/fp16 checkpoint is
# one such rounding of W + dW, so its difference is of that size; a wrong merge is far above it.
FP32_TOL = 1e-4
ROUNDING_FACTOR = 4.0
VERIFY_PROMPTS = ("The quick brown fox", "What is the capital of France?", "def add(a, b):")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
UNSUPPORTED = ("use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora", "trainable_token_indices",
               "target_parameters", "velora_config", "monteclora_config", "kasa_config", "mica")
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def tolerance(rounding_diff: float) -> float:
    """The largest acceptable logit difference, given the logit change of rounding to the output dtype."""
    return FP32_TOL + ROUNDING_FACTOR * rounding_diff


# ------------------------------------------------------------------------------------------------
# Source, adapter and base
# ------------------------------------------------------------------------------------------------

@dataclass
class Source:
    adapter_dir: Path
    run_dir: Path | None
    recipe: dict | None
    config: dict


def find_source(source: str | Path) -> Source:
    """A run directory (adapter/ + recipe.yaml) or an adapter directory."""
    src = Path(source).expanduser()
    if not src.is_dir():
        raise LorakitError(f"{src}: no such directory", hint="pass a run directory or an adapter directory")
    run_dir, adapter = None, src
    if not (src / "adapter_config.json").is_file() and (src / "adapter" / "adapter_config.json").is_file():
        run_dir, adapter = src, src / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise LorakitError(f"{src}: no adapter_config.json here or in {src / 'adapter'}",
                           hint="pass a run directory written by `lorakit train` or a peft adapter directory")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise LorakitError(f"{adapter}: no adapter_model.safetensors",
                           hint="lorakit merges safetensors adapters only (save with safe_serialization=True)")
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LorakitError(f"{adapter / 'adapter_config.json'}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LorakitError(f"{adapter}: peft_type {config.get('peft_type')!r} is not LoRA")
    bad = [k for k in UNSUPPORTED if config.get(k)]
    if bad:
        raise LorakitError(f"{adapter}: adapter options lorakit merge does not support: {', '.join(bad)}")
    return Source(adapter, run_dir, _read_recipe(run_dir), config)


def _read_recipe(run_dir: Path | None) -> dict | None:
    if run_dir is None or not (run_dir / "recipe.yaml").is_file():
        return None
    import yaml

    try:
        doc = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LorakitError(f"{run_dir / 'recipe.yaml'}: cannot read the resolved recipe ({e})") from None
    return doc if isinstance(doc, dict) else None


def resolve_base(base: str | None, src: Source) -> tuple[Path, str]:
    """The base directory and the name the user knows it by."""
    name = base or (src.recipe or {}).get("base_model") or src.config.get("base_model_name_or_path")
    if not name:
        raise LorakitError(f"{src.adapter_dir}: the adapter does not name its base model", hint="pass --base")
    path = Path(str(name)).expanduser()
    if not path.is_dir():
        try:
            from lorakit.model.load import resolve_base_dir
        except ImportError:
            raise LorakitError(f"base model {name!r}: not a local directory", hint="pass --base DIR") from None
        revision = ((src.recipe or {}).get("model") or {}).get("revision")
        path = Path(resolve_base_dir(str(name), revision=revision))
    if not (path / "config.json").is_file():
        raise LorakitError(f"base model {name!r}: {path} has no config.json", hint="pass --base DIR")
    return path, str(name)


@dataclass
class Edit:
    """What the adapter does to one module of the base."""

    A: Any = None  # lora_A (Linear) or lora_embedding_A
    B: Any = None
    bias: Any = None  # lora_B.bias
    magnitude: Any = None  # DoRA
    embedding: bool = False
    scale: float = 1.0
    replace: dict = field(default_factory=dict)  # "weight"/"bias" -> tensor (modules_to_save, base_layer)


_LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
    ".lora_embedding_A": "A", ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
}


def _classify(key: str) -> tuple[str, str]:
    """(module, role) of an adapter key; role is A/B/bias/magnitude/emb-A/emb-B or 'replace:<param>'."""
    k = key.removeprefix(PREFIX)
    k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
    for suffix, role in _LORA_SUFFIXES.items():
        if k.endswith(suffix):
            return k[: -len(suffix)], ("emb-" + role if "embedding" in suffix else role)
    module, _, param = k.rpartition(".")
    return module.removesuffix(".base_layer"), "replace:" + param


def _scale(module: str, cfg: dict, r_shape: int) -> float:
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg.get("r") or r_shape)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg.get("lora_alpha", r))
    if r != r_shape:
        r = r_shape  # the saved tensors are the truth; configs edited by hand can lie
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def parse_adapter(src: Source) -> dict[str, Edit]:
    """Module name (as in the base checkpoint) -> its Edit."""
    from safetensors.torch import load_file

    tensors = load_file(src.adapter_dir / "adapter_model.safetensors")
    edits: dict[str, Edit] = {}
    for key, t in tensors.items():
        module, role = _classify(key)
        e = edits.setdefault(module, Edit())
        if role.startswith("replace:"):
            e.replace[role.split(":", 1)[1]] = t
        else:
            e.embedding = e.embedding or role.startswith("emb-")
            setattr(e, role.removeprefix("emb-"), t)
    for module, e in edits.items():
        if (e.A is None) != (e.B is None):
            raise LorakitError(f"{src.adapter_dir}: {module} has lora_{'A' if e.A is not None else 'B'} "
                               "but not its pair; the adapter file is incomplete")
        if (e.bias is not None or e.magnitude is not None) and e.A is None:
            raise LorakitError(f"{src.adapter_dir}: {module} has a LoRA bias or magnitude but no lora_A/B")
        if e.A is not None:
            e.scale = _scale(module, src.config, e.A.shape[0])
    return edits


@dataclass
class BaseTensor:
    name: str
    file: Path
    shape: tuple
    dtype: str  # torch dtype name


def base_index(base_dir: Path) -> dict[str, BaseTensor]:
    """Every tensor of the base checkpoint, in shard order, from the safetensors headers only."""
    files = sorted(base_dir.glob("*.safetensors"))
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [base_dir / f for f in dict.fromkeys(weight_map.values())]
    if not files:
        raise LorakitError(f"{base_dir}: no .safetensors weights", hint="lorakit merges safetensors checkpoints only")
    out: dict[str, BaseTensor] = {}
    for f in files:
        header = _read_header(f)
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            out[name] = BaseTensor(name, f, tuple(meta["shape"]), _ST_DTYPES.get(meta["dtype"], meta["dtype"]))
    return out


def _read_header(path: Path) -> dict:
    """The safetensors header: an 8-byte little-endian length, then JSON."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise LorakitError(f"{path}: not a safetensors file", exit_code=EXIT_RUNTIME) from None
    header.pop("__metadata__", None)
    return header


@dataclass
class Layout:
    """What the architecture says about the checkpoint: tied embeddings and the quantizable Linears."""

    tied: bool
    input_embed: str | None
    output_embed: str | None
    linear: set[str]
    config: dict
    modules: list[str] = field(default_factory=list)  # every module name, in the model's own order


def read_layout(base_dir: Path) -> Layout:
    """Module names from the model built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    cfg = AutoConfig.from_pretrained(base_dir)
    tied = bool(getattr(cfg.get_text_config(), "tie_word_embeddings", False) or config.get("tie_word_embeddings"))
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # e.g. a trust_remote_code architecture transformers cannot build
        raise LorakitError(f"{base_dir}: transformers cannot build this architecture ({e})",
                           exit_code=EXIT_RUNTIME) from None
    names = {id(m): n for n, m in model.named_modules()}
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not outp}
    return Layout(tied, names.get(id(inp)), names.get(id(outp)) if outp is not None else None, linear, config,
                  [n for n, _ in model.named_modules()])


# ------------------------------------------------------------------------------------------------
# The merge itself
# ------------------------------------------------------------------------------------------------

@dataclass
class OutTensor:
    name: str  # key in the merged checkpoint
    src: BaseTensor  # the base tensor it starts from
    module: str
    param: str
    dtype: str


def plan_output(base: dict[str, BaseTensor], edits: dict[str, Edit], layout: Layout,
                dtype: str | None) -> tuple[list[OutTensor], bool]:
    """The output tensors in order, and whether the embeddings get untied. dtype None: float tensors keep
    the base's dtype, those of modules the adapter changes come in fp32 (for a caller that rounds them itself)."""
    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", None: None}[dtype]
    emb, head = layout.input_embed, layout.output_embed
    untie = bool(layout.tied and emb and head and (emb in edits or head in edits))
    head_missing = head is not None and f"{head}.weight" not in base
    plan = []
    for t in base.values():
        module, _, param = t.name.rpartition(".")
        out_dtype = t.dtype
        if t.dtype in ("float32", "float16", "bfloat16", "float64"):
            out_dtype = torch_dtype or ("float32" if module in edits else t.dtype)
        plan.append(OutTensor(t.name, t, module, param, out_dtype))
        if untie and head_missing and module == emb and param == "weight":
            plan.append(OutTensor(f"{head}.weight", t, head, "weight", out_dtype))
    known = {(o.module, o.param) for o in plan}
    if layout.tied and head_missing and head:
        known |= {(head, "weight")}  # a tied head reads the embedding's tensor
    unknown = sorted(m for m, e in edits.items()
                     if (m, "weight") not in known or any((m, p) not in known for p in e.replace))
    if unknown:
        raise LorakitError(f"the adapter changes modules the base does not have: {', '.join(unknown[:8])}"
                           + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""),
                           hint="is --base the model this adapter was trained on?")
    return plan, untie


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


def _shards(plan: list[OutTensor], cap: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for o in plan:
        n = nbytes(o)
        if shards[-1] and size + n > cap:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += n
    return shards


_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def nbytes(o: OutTensor) -> int:
    return math.prod(o.src.shape) * _ITEMSIZE[o.dtype]


def _write_shard(path: Path, tensors: list[OutTensor], produce: Callable[[OutTensor], Any]) -> int:
    """Stream one safetensors file: the header from known shapes, then each tensor as it is produced."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for o in tensors:
        n = nbytes(o)
        header[o.name] = {"dtype": _ST_NAMES[o.dtype], "shape": list(o.src.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for o in tensors:
            t = produce(o)
            if tuple(t.shape) != tuple(o.src.shape):
                raise LorakitError(f"{o.name}: the adapter's tensor has shape {tuple(t.shape)}, the base's "
                                   f"{tuple(o.src.shape)}", hint="is --base the model this adapter was trained on?")
            assert t.dtype == getattr(torch, o.dtype), (o.name, t.dtype, o.dtype)
            fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t
        fh.flush()
        os.fsync(fh.fileno())
    return offset


def read_tensor(t: BaseTensor):
    """One tensor through its own safe_open, so the file's mapping (and its resident pages) closes at once."""
    from safetensors import safe_open

    with safe_open(t.file, framework="pt") as fh:
        return fh.get_tensor(t.name)


def _read_ahead(tensors: list[OutTensor]) -> Iterator[tuple[str, Any]]:
    """Yield (name, base tensor) in order while a worker thread already reads the next one from disk.

    Reading overlaps the merge arithmetic and the writing of the previous tensor (disk reads and writes
    were each waiting on the other); at most two base tensors are resident at a time."""
    from concurrent.futures import ThreadPoolExecutor

    if not tensors:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-merge-read") as pool:
        pending = pool.submit(read_tensor, tensors[0].src)
        for i, o in enumerate(tensors):
            w = pending.result()
            pending = pool.submit(read_tensor, tensors[i + 1].src) if i + 1 < len(tensors) else None
            yield o.name, w
            del w
        if pending is not None:
            pending.result()


def peak_rss() -> int:
    """This process's peak resident memory (Linux VmHWM: unlike ru_maxrss, not inherited across fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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


def find_tokenizer(candidates: list[Path]) -> Path | None:
    """The first directory of `candidates` that holds a tokenizer, or None."""
    return next((d for d in candidates if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()),
                None)


def copy_tokenizer(tmp: Path, candidates: list[Path]) -> None:
    """Copy the tokenizer files of the first of `candidates` that has a tokenizer into `tmp`."""
    if (d := find_tokenizer(candidates)) is not None:
        for name in TOKENIZER_FILES:
            if (d / name).is_file():
                shutil.copy2(d / name, tmp / name)


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
    reads = _read_ahead(plan.tensors)
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


def write_checkpoint(plan: list[OutTensor], out: Path, transform: Callable[[Any, OutTensor], Any],
                     side_files: Callable[[Path, list], None], *, max_shard_bytes: int = MAX_SHARD_BYTES,
                     progress: Callable[[int, int, str], None] | None = None) -> list[tuple[str, list[OutTensor]]]:
    """Stream the checkpoint `plan` describes into `out`, tensor by tensor.

    Each source tensor is read ahead on a worker thread, `transform(tensor, o)` gives the output tensor
    (in `o.dtype`), shards of at most `max_shard_bytes` are written one by one into `OUT.tmp-XXXX`,
    `side_files(tmp, shards)` adds the files beside the weights, and the directory is renamed into place
    (removed on any failure). Shared by merge and unmerge.

    Returns:
        The shards as (file name, tensors).
    """
    groups = _shards(plan, max_shard_bytes)
    named = [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else "model.safetensors", g)
             for i, g in enumerate(groups)]
    total = sum(nbytes(o) for o in plan)
    done = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    reads = _read_ahead([o for _, g in named for o in g])
    try:
        for fname, tensors in named:
            def produce(o: OutTensor) -> Any:
                nonlocal done
                name, w = next(reads)
                assert name == o.name, (name, o.name)
                t = transform(w, o)
                del w
                done += nbytes(o)
                if progress:
                    progress(done, total, o.name)
                return t

            _write_shard(tmp / fname, tensors, produce)
        side_files(tmp, named)
        replace_dir(tmp, out)
    except BaseException:
        reads.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return named


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished checkpoint into place; an existing `out` (overwrite) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
