"""Write a GGUF file (llama.cpp, Ollama, LM Studio) from a run, an adapter or a merged checkpoint.

Nothing is compiled: the `gguf` Python package writes the file and quantizes. The adapter is folded in on
the fly by lorakit.merge's streaming machinery (`plan_merge` / `merged_tensors`): each base tensor is read,
merged in fp32 where the adapter changes it, renamed with gguf's own table (`gguf.get_tensor_name_map`),
converted to the file's type and written, so resident memory stays near one tensor plus its converted
copy. The header (metadata, tokenizer, tensor infos) is written first from the shapes alone
(`GGUFWriter.add_tensor_info`), then the data tensor by tensor (`write_tensor_data`). The file is written
as `.OUT.tmp-PID` beside OUT and renamed when complete, with the Ollama Modelfile next to it.

Types (`quant`): f16 / bf16: every matrix in that type; q8_0: every matrix Q8_0; q4_0: the blocks'
matrices Q4_0, the token embeddings and the output head Q8_0 (gguf's Python quantizer has no Q6_K, which
llama.cpp's own Q4_0 files use for the head). 1-D tensors (norms, biases) and rope_freqs stay F32, as
llama.cpp's converter writes them; a matrix whose rows are not whole 32-value blocks falls back to F16.

Llama-family (llama, mistral) q/k projections are permuted from Hugging Face's rotary layout (two halves)
to llama.cpp's (interleaved pairs), as llama.cpp's convert_hf_to_gguf.py does; transformers' GGUF loader
undoes it. Qwen2 runs with llama.cpp's NEOX rotary layout: no permutation. Mistral is written as
llama.cpp's `llama` architecture, as its converter does. Llama-3 rope scaling becomes the `rope_freqs`
tensor (per-frequency divisors, computed with transformers' own llama3 rope function); linear and YaRN
scaling become rope.scaling.* keys.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lorakit.checkpoints.streaming import peak_rss
from lorakit.errors import EXIT_RUNTIME, LorakitError
from lorakit.export import ARCHITECTURES, QUANTS
from lorakit.export.gguf_vocab import add_tokenizer
from lorakit.export.modelfile import modelfile_path, render
from lorakit.export.tensor_types import QT, tensor_type
from lorakit.export.verify import verify_gguf
from lorakit.merge import merged_tensors, plan_checkpoint, plan_merge, tokenizer_dir

GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
PERMUTE_QK = ("llama", "mistral")
FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
SKIP_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved; llama.cpp computes them
QUANT_CHUNK_ELEMS = 1 << 22  # values quantized at a time (16 MiB of fp32)


@dataclass
class Spec:
    """One tensor of the file."""

    name: str  # GGUF name
    shape: tuple
    qtype: QT
    heads: int | None = None  # rotary permutation over this many heads (llama q/k)

    @property
    def byte_shape(self) -> tuple:
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)


def _permute(t, heads: int):
    """Hugging Face's rotary layout (two halves per head) -> llama.cpp's (interleaved pairs)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def convert(t, spec: Spec) -> np.ndarray:
    """The bytes of torch tensor `t` as `spec` stores it."""
    if spec.heads:
        t = _permute(t, spec.heads)
    if spec.qtype == QT.F32:
        return t.to(torch.float32).contiguous().numpy()
    if spec.qtype == QT.F16:
        return t.to(torch.float16).contiguous().numpy()
    if spec.qtype == QT.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    # Row chunks into one output buffer: no fp32 copy of the whole tensor (gguf.quants' own grouping would
    # also hold every group's output besides the result).
    rows = t.reshape(-1, t.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(tuple(rows.shape), spec.qtype), dtype=np.uint8)
    step = max(1, QUANT_CHUNK_ELEMS // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = gguf.quants.quantize(rows[i:i + step].to(torch.float32).numpy(), spec.qtype)
    return out.reshape(spec.byte_shape)


def _config(base_dir: Path):
    cfg = AutoConfig.from_pretrained(base_dir)
    if cfg.model_type not in ARCHITECTURES:
        raise LorakitError(f"{base_dir}: architecture {cfg.model_type!r} cannot be exported to GGUF by lorakit "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    return cfg


def _rope(cfg) -> dict:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    return rope


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_freqs(cfg):
    """llama.cpp's rope_freqs for Llama-3 rope scaling: default inverse frequencies / llama3 ones."""
    dim, theta = _head_dim(cfg), _rope(cfg)["rope_theta"]
    default = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    return (default / scaled).float()


def _metadata(w: gguf.GGUFWriter, cfg, raw: dict, quant: str, name: str) -> dict:
    """The architecture keys (llama.cpp's names); returns the rope settings written."""
    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = _rope(cfg)
    w.add_rope_freq_base(rope["rope_theta"])
    if GGUF_ARCH[cfg.model_type] == gguf.MODEL_ARCH.LLAMA:
        w.add_rope_dimension_count(_head_dim(cfg))
    if raw.get("head_dim"):
        w.add_key_length(raw["head_dim"])
        w.add_value_length(raw["head_dim"])
    kind = rope["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    elif kind not in ("default", "llama3"):
        raise LorakitError(f"rope type {kind!r} cannot be exported to GGUF by lorakit (default, llama3, linear, yarn)")
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPE[quant])
    if quant in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return rope


def _specs(mp, cfg, quant: str) -> tuple[list[Spec], dict[str, Spec]]:
    """The file's tensors in write order: extra ones first, then {planned name: spec} in plan order."""
    arch = GGUF_ARCH[cfg.model_type]
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    embeddings = {mp.layout.input_embed, mp.layout.output_embed}
    extra = []
    if _rope(cfg)["rope_type"] == "llama3":
        extra.append(Spec(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", (_head_dim(cfg) // 2,), QT.F32))
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    planned, unknown = {}, []
    for o in mp.tensors:
        if o.name.endswith(SKIP_SUFFIXES) or (mp.tied and o.module == mp.layout.output_embed):
            continue  # a tied head is the embedding matrix, which llama.cpp reads when output.weight is absent
        name = names.get_name(o.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(o.name)
            continue
        if o.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise LorakitError(f"{o.name}: a {o.dtype} tensor; GGUF export writes float checkpoints only")
        heads = None
        if cfg.model_type in PERMUTE_QK and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else kv_heads
        shape = tuple(o.src.shape)
        planned[o.name] = Spec(name, shape, tensor_type(shape, quant, o.module in embeddings), heads)
    if unknown:
        raise LorakitError(f"tensors gguf has no {gguf.MODEL_ARCH_NAMES[arch]} name for: {', '.join(unknown[:8])}"
                           + (f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""), exit_code=EXIT_RUNTIME)
    return extra, planned


def _plan(source: Path, base: str | None):
    """A merge plan for a run / adapter dir, or the tensors as they are for a merged checkpoint dir."""
    if not source.is_dir():
        raise LorakitError(f"{source}: no such directory",
                           hint="pass a run directory, an adapter directory or a merged checkpoint directory")
    adapter = (source / "adapter_config.json").is_file() or (source / "adapter" / "adapter_config.json").is_file()
    if not adapter and (source / "config.json").is_file():
        if base:
            raise LorakitError(f"--base: {source} is a full checkpoint, not an adapter; there is nothing to merge")
        return plan_checkpoint(source, dtype=None)
    return plan_merge(source, base=base, dtype=None)


def export_gguf(source: str | Path, out: str | Path, *, quant: str = "q8_0", base: str | None = None,
                verify: bool = False, overwrite: bool = False,
                progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write `source` (run dir, adapter dir or merged checkpoint) as a GGUF file at `out`, plus a Modelfile.

    Args:
        source: a run directory, a peft adapter directory or a merged (plain Hugging Face) checkpoint.
        out: the .gguf file to write.
        quant: f16, bf16, q8_0 or q4_0 (see the module docstring for which tensor gets which type).
        base: the base model of an adapter (default: the run's or the adapter's).
        verify: load the file back through transformers and compare logits and token ids (exit 1 if off).
        overwrite: replace an existing `out`.
        progress: called as progress(done_tensors, total_tensors, name) after each tensor.

    Returns:
        A report: source, base, out, modelfile, quant, architecture, tensors, bytes, tokenizer, seconds,
        peak_rss and, with verify, the comparison's numbers.
    """
    start = time.perf_counter()
    if quant not in QUANTS:
        raise LorakitError(f"--quant: expected one of {', '.join(QUANTS)} (got {quant!r})")
    out = Path(out).expanduser()
    if out.is_dir():
        raise LorakitError(f"--out {out}: a directory; name the .gguf file to write")
    if out.exists() and not overwrite:
        raise LorakitError(f"{out} already exists", hint="pass --overwrite to replace it, or choose another --out")
    mp = _plan(Path(source).expanduser(), base)
    cfg = _config(mp.base_dir)
    tok_dir = tokenizer_dir(mp)
    if tok_dir is None:
        raise LorakitError(f"no tokenizer in {source} or {mp.base_dir}", hint="a GGUF file carries its tokenizer")
    name = ((mp.src.recipe or {}).get("name") if mp.src else None) or mp.base_name
    extra, planned = _specs(mp, cfg, quant)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    mf = modelfile_path(out, overwrite)
    mf_tmp = mf.with_name(f".{mf.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[GGUF_ARCH[cfg.model_type]])
    merged = None
    try:
        rope = _metadata(writer, cfg, mp.layout.config, quant, name)
        vocab = add_tokenizer(writer, tok_dir, cfg.vocab_size)
        specs = [*extra, *planned.values()]
        for s in specs:
            writer.add_tensor_info(s.name, s.byte_shape, np.dtype(np.uint8), math.prod(s.byte_shape), raw_dtype=s.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if extra:
            writer.write_tensor_data(convert(rope_freqs(cfg), extra[0]))
        merged = merged_tensors(mp)
        done = len(extra)
        for o, t in merged:
            spec = planned.get(o.name)
            if spec is None:
                continue
            writer.write_tensor_data(convert(t, spec))
            del t
            done += 1
            if progress:
                progress(done, len(specs), spec.name)
        writer.flush()
        for fh in writer.fout or []:
            os.fsync(fh.fileno())
        writer.close()
        mf_tmp.write_text(render(out.name, vocab["chat_template"], vocab["eos"]), encoding="utf-8")
        os.replace(tmp, out)
        os.replace(mf_tmp, mf)
    except BaseException:
        if merged is not None:
            merged.close()
        writer.close()
        tmp.unlink(missing_ok=True)
        mf_tmp.unlink(missing_ok=True)
        raise
    report: dict[str, Any] = {
        "source": str(source), "base": mp.base_name, "base_dir": str(mp.base_dir), "out": str(out),
        "modelfile": str(mf), "quant": quant, "architecture": cfg.model_type,
        "gguf_architecture": gguf.MODEL_ARCH_NAMES[GGUF_ARCH[cfg.model_type]], "rope_type": rope["rope_type"],
        "tensors": len(specs), "bytes": out.stat().st_size, "tied_embeddings": mp.tied,
        "modules_merged": sum(1 for e in mp.edits.values() if e.A is not None),
        "tokenizer": {k: v for k, v in vocab.items() if k != "chat_template"} | {
            "chat_template": vocab["chat_template"] is not None},
        "seconds": round(time.perf_counter() - start, 3), "peak_rss": peak_rss(),
    }
    if verify:
        result = verify_gguf(out, mp, quant, tok_dir)
        report.update(result)
        report["seconds_with_verify"] = round(time.perf_counter() - start, 3)
        problems = []
        if result["max_logit_diff"] > result["tolerance"]:
            problems.append(f"logits differ from the merged model by {result['max_logit_diff']:.3g} "
                            f"(tolerance for {quant}: {result['tolerance']:.3g})")
        if result["tokenizer_mismatches"]:
            problems.append(f"the tokenizer read back gives other ids for {len(result['tokenizer_mismatches'])} "
                            f"text(s), e.g. {result['tokenizer_mismatches'][0]!r}")
        if problems:
            raise LorakitError(f"verify: {'; '.join(problems)}; the file is at {out}", exit_code=EXIT_RUNTIME)
    return report


