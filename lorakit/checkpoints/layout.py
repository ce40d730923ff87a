"""What a checkpoint directory holds, read without its weights: every tensor from the safetensors headers
(`base_index`), the architecture's layout from the model built on the meta device (`read_layout`: tied
embeddings, the quantizable Linears), and the output tensors a merge writes from them (`plan_output`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.checkpoints.adapter import Edit
from lorakit.errors import EXIT_RUNTIME, LorakitError

ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1}


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
            out[name] = BaseTensor(name, f, tuple(meta["shape"]), ST_DTYPES.get(meta["dtype"], meta["dtype"]))
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


def nbytes(o: OutTensor) -> int:
    return math.prod(o.src.shape) * _ITEMSIZE[o.dtype]
