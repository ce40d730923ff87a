"""Builders the tests share: a tiny model and tokenizer on disk, rows, a LoRA on a model (fixtures are in
conftest.py)."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    '{"city": "Berlin", "date": "2024-05-01"}',
    "One two three four five six seven eight nine ten 0123456789",
    "system user assistant You are a helpful assistant.",
]


@contextlib.contextmanager
def modeling_modules_restored(preload: tuple = ()):
    """transformers' modeling modules (those imported by then, and `preload`) as they were on entry, again on exit.
    Why: on a GPU, TRL's use_liger_kernel has Liger replace classes and functions in them for the whole process
    (modeling_llama.LlamaRMSNorm -> LigerRMSNorm, ...); a later test's tiny CPU model would then run Liger's Triton
    kernels on CPU tensors. One model per process, as `lorakit train` runs, never sees this."""
    for name in preload:
        importlib.import_module(name)
    mods = [m for n, m in list(sys.modules.items())
            if m is not None and n.startswith("transformers.models.") and ".modeling_" in n]
    saved = [(m, dict(vars(m))) for m in mods]
    try:
        yield
    finally:
        for m, before in saved:
            for k, v in before.items():
                if vars(m).get(k) is not v:
                    setattr(m, k, v)


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer (vocab ~400) with a ChatML template, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def build_tiny_model(path: Path, *, arch: str = "llama", tie: bool = False, vocab_size: int | None = None):
    """A 2-layer, hidden-64 random causal LM of `arch` saved (safetensors) with the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer(path)
    vocab = vocab_size or len(tok)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "phi3":
        common.pop("num_key_value_heads")
    cfg = AutoConfig.for_model(arch, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config.save_pretrained(path)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_lora(model, p: float = 0.0, fused: bool = True, bits=None):
    """peft LoRA (r=8, all-linear, dropout p) on `model`, with lorakit's fused layer when `fused`; lora_B drawn
    instead of zero so that gradients reach lora_A too."""
    from peft import LoraConfig, get_peft_model

    from lorakit.speed import Plan, fused_lora

    lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules="all-linear", task_type="CAUSAL_LM")
    fused_lora.customize_lora_config(lc, Plan(fused_lora=fused), bits)
    torch.manual_seed(1)
    pm = get_peft_model(model, lc)
    for name, prm in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(prm, std=0.05)
    return pm


NAMES = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"]


CITIES = ["Paris", "Berlin", "Oslo", "Rome"]


def chat_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        name, city = NAMES[i % len(NAMES)], CITIES[i % len(CITIES)]
        rows.append({"messages": [
            {"role": "user", "content": f"{name} lives in {city}."},
            {"role": "assistant", "content": json.dumps({"name": name, "city": city})}]})
    return rows
