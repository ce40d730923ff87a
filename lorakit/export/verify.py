"""`lorakit export --verify`: load the written GGUF back through transformers and compare it with the source.

Logits. The reference is the merged model in fp32 (base + adapter through peft, `merge_and_unload`; or the
merged checkpoint itself), run on a few fixed prompts. The file stores each tensor rounded to its type, so
the tolerance is measured the same way `lorakit merge --verify` measures it: every weight of the reference
is rounded to the type the export gives it (f16/bf16 casts, Q8_0/Q4_0 through gguf's own quantize and
dequantize), the logits' largest change from that rounding is taken, and the file may differ from the
reference by at most 1e-4 + 4x that change. A correct file lands near the rounded reference (same rounding,
other arithmetic order); a wrong name, permutation or metadata value lands far outside, for every type.

transformers' GGUF loader does not read rope scaling back for llama-family files (llama.cpp stores Llama-3's
as the rope_freqs tensor), so a source with rope scaling is loaded with the source's rope settings put into
the config read from the file.

Tokenizer. The tokenizer read back from the file must give the same ids as the source tokenizer on a fixed
set of texts (spaces, digits, accents, CJK, emoji, code, and a chat rendered with the chat template).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lorakit.export.tensor_types import tensor_type
from lorakit.merge import _logits, _prompt_ids, tolerance

TEXTS = (
    "Hello world! How are you today?",
    "The year 2024 had 366 days; 3.14159 and 1,000,000.",
    "  two leading spaces,\ttabs\nand\n\nnewlines   ",
    "naïve café – Ünïcödé, 東京タワー, emoji 🚀🦙",
    "def add(a, b):\n    return a + b  # sum\n",
)


def _reference(mp):
    """The merged model in fp32, from the base and the adapter (peft) or the checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(mp.base_dir, dtype=torch.float32, use_safetensors=True)
    if mp.src is not None:
        model = PeftModel.from_pretrained(model, mp.src.adapter_dir).merge_and_unload()
    return model.eval()


def _round_to_file_types(model, mp, quant: str) -> None:
    """Round every weight of `model` in place as the export stores it."""
    embeddings = {f"{mp.layout.input_embed}.weight", f"{mp.layout.output_embed}.weight"}
    with torch.no_grad():
        for name, p in model.named_parameters():
            qtype = tensor_type(tuple(p.shape), quant, name in embeddings)
            if qtype == gguf.GGMLQuantizationType.F16:
                p.copy_(p.half().float())
            elif qtype == gguf.GGMLQuantizationType.BF16:
                p.copy_(p.bfloat16().float())
            elif qtype != gguf.GGMLQuantizationType.F32:
                q = gguf.quants.quantize(p.detach().numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype)).reshape(p.shape))


def _tokenizer_mismatches(out: Path, tok_dir: Path) -> list[str]:
    src = AutoTokenizer.from_pretrained(tok_dir)
    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    texts = list(TEXTS)
    if src.chat_template:
        chat = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[1]}]
        texts.append(src.apply_chat_template(chat, tokenize=False, add_generation_prompt=False))
    return [t for t in texts if src(t)["input_ids"] != back(t)["input_ids"]]


def verify_gguf(out: Path, mp, quant: str, tok_dir: Path) -> dict:
    """Compare the GGUF file `out` with the source of merge plan `mp`; returns the numbers (see module doc).

    Args:
        out: the written .gguf file.
        mp: the lorakit.merge.MergePlan the file was written from.
        quant: the file's --quant.
        tok_dir: the directory of the source tokenizer.

    Returns:
        max_logit_diff, max_abs_logit, rounding_logit_diff, tolerance, tokenizer_mismatches (texts).
    """
    ref_model = _reference(mp)
    prompts = _prompt_ids(tok_dir, ref_model.get_input_embeddings().weight.shape[0])
    ref = _logits(ref_model, prompts)
    _round_to_file_types(ref_model, mp, quant)
    rounding = max(float((a - b).abs().max()) for a, b in zip(ref, _logits(ref_model, prompts)))
    source_rope = ref_model.config.rope_parameters
    del ref_model

    config = AutoConfig.from_pretrained(out.parent, gguf_file=out.name)
    if source_rope.get("rope_type", "default") != "default":
        config.rope_parameters = dict(source_rope)
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, config=config,
                                                dtype=torch.float32).eval()
    got = _logits(back, prompts)
    del back
    diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    return {"max_logit_diff": diff, "max_abs_logit": max(float(r.abs().max()) for r in ref),
            "rounding_logit_diff": rounding, "tolerance": tolerance(rounding),
            "tokenizer_mismatches": _tokenizer_mismatches(out, tok_dir)}
