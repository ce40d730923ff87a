"""generate.py: the adapter on its base vs the base alone, from a run directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorakit.errors import LorakitError


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir) -> Path:
    """A finished-looking run directory whose adapter is far from a no-op (random, large LoRA B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    run.mkdir()
    recipe = {"name": "g", "base_model": str(tiny_model_dir), "data": {"path": "x.jsonl"}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(run / "adapter")
    return run


def test_adapter_changes_the_answer_and_base_only_matches_the_base(run_dir, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.generate import generate

    with_adapter = generate(run_dir, "What is the capital of France?", max_new_tokens=12)
    base = generate(run_dir, "What is the capital of France?", base_only=True, max_new_tokens=12)
    assert isinstance(with_adapter, str) and isinstance(base, str)
    assert with_adapter != base

    # --base-only is exactly the base model's greedy answer to the chat-templated prompt
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert base == expected
    # deterministic
    assert generate(run_dir, "What is the capital of France?", max_new_tokens=12) == with_adapter


def test_not_a_run_dir(tmp_path):
    from lorakit.generate import generate

    with pytest.raises(LorakitError, match="no finished adapter"):
        generate(tmp_path, "hi")
    with pytest.raises(LorakitError, match="no such run directory"):
        generate(tmp_path / "missing", "hi")
