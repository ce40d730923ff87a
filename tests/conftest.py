"""Shared fixtures: tiny random models (built from a config, seconds) and a byte-level tokenizer."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # tests/test_lora_triton.py runs lorakit's Triton kernels in Triton's interpreter on a CPU; it must be on before
    # anything imports triton (bitsandbytes does). lorakit itself never runs the kernels on a CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


@pytest.fixture(autouse=True)
def _unpatched_transformers():
    """Every test on a GPU machine starts from transformers' own Llama modules (Liger is applied only on CUDA)."""
    if not torch.cuda.is_available():
        yield
        return
    with modeling_modules_restored(("transformers.models.llama.modeling_llama",)):
        yield


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
    import torch
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama-style model directory (untied embeddings)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama-style model with tied input/output embeddings."""
    path = tmp_path_factory.mktemp("tiny-llama-tied")
    build_tiny_model(path, tie=True)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_lora(model, p: float = 0.0, fused: bool = True, bits=None):
    """peft LoRA (r=8, all-linear, dropout p) on `model`, with lorakit's fused layer when `fused`; lora_B drawn
    instead of zero so that gradients reach lora_A too."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit import speed

    lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules="all-linear", task_type="CAUSAL_LM")
    speed.customize_lora_config(lc, {"fused_lora": fused}, bits)
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


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory with a small chat dataset (train.jsonl, eval.jsonl)."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    write_jsonl(tmp_path / "eval.jsonl", chat_rows(4, offset=3))
    return tmp_path


@pytest.fixture
def bf16_gpu(monkeypatch):
    """Plan for "cuda" on this CPU machine: a bf16-capable GPU, no Liger."""
    import lorakit.models
    from lorakit import speed

    monkeypatch.setattr(lorakit.models, "auto_dtype_name", lambda device: "bf16" if device == "cuda" else "fp32")
    monkeypatch.setattr(speed, "liger_available", lambda: False)
