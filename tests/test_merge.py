"""lorakit.merge: the streamed merge gives the same logits as base+adapter (peft), for every adapter kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.merge import merge_adapter

IDS = [[5, 17, 42, 99, 150, 7, 300, 12], [1, 2, 3, 4, 5, 6, 7, 8]]


def _load(path, dtype="float32", **kw):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kw).eval()


def _logits(model):
    import torch

    with torch.inference_mode():
        return torch.cat([model(torch.tensor([i])).logits[0].float() for i in IDS])


def make_adapter(base_dir: Path, out: Path, *, seed: int = 1, **lora_kw):
    """Save a peft adapter with random, non-trivial weights (every trainable tensor perturbed); return its logits."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kw.setdefault("r", 4)
    lora_kw.setdefault("lora_alpha", 8)
    model = get_peft_model(_load(base_dir), LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:  # lora A/B, DoRA magnitudes, modules_to_save copies, biases
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return _logits(model.eval())


@pytest.fixture(scope="module")
def bias_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with attention biases (for bias='all' and lora_bias)."""
    import torch
    from helpers import build_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-bias")
    tok = build_tokenizer(path)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return path


CASES = {
    "plain": dict(target_modules=["q_proj", "v_proj"]),
    "all-linear": dict(target_modules="all-linear"),
    "rslora": dict(target_modules=["q_proj", "down_proj"], r=8, lora_alpha=4, use_rslora=True),
    "dora": dict(target_modules="all-linear", use_dora=True),
    "modules_to_save": dict(target_modules=["k_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "embedding-lora": dict(target_modules=["embed_tokens", "o_proj"]),
    "layers-subset": dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "patterns": dict(target_modules=["q_proj", "gate_proj"], rank_pattern={"gate_proj": 2}, alpha_pattern={"q_proj": 3}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_merge_equals_base_plus_adapter(case, tiny_model_dir, tmp_path):
    ref = make_adapter(tiny_model_dir, tmp_path / "ad", **CASES[case])
    report = merge_adapter(tmp_path / "ad", tmp_path / "merged", dtype="fp32")
    got = _logits(_load(tmp_path / "merged"))
    base = _logits(_load(tiny_model_dir))
    assert (ref - base).abs().max() > 1e-3  # the adapter changes the model
    assert (got - ref).abs().max() < 1e-4
    assert report["modules_merged"] + report["modules_replaced"] > 0


@pytest.mark.parametrize("kw", [dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                dict(target_modules=["q_proj", "lm_head"]),
                                dict(target_modules=["gate_proj"], modules_to_save=["embed_tokens"])],
                         ids=["save-lm_head", "lora-lm_head", "save-embed_tokens"])
def test_tied_embeddings_are_untied_when_changed(kw, tiny_tied_model_dir, tmp_path):
    ref = make_adapter(tiny_tied_model_dir, tmp_path / "ad", **kw)
    report = merge_adapter(tmp_path / "ad", tmp_path / "merged", dtype="fp32")
    assert report["untied_embeddings"]
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    assert (_logits(_load(tmp_path / "merged")) - ref).abs().max() < 1e-4


def test_tied_embeddings_stay_tied_when_untouched(tiny_tied_model_dir, tmp_path):
    from safetensors import safe_open

    ref = make_adapter(tiny_tied_model_dir, tmp_path / "ad", target_modules=["q_proj"])
    report = merge_adapter(tmp_path / "ad", tmp_path / "merged", dtype="fp32")
    assert not report["untied_embeddings"]
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    assert (_logits(_load(tmp_path / "merged")) - ref).abs().max() < 1e-4


def test_biases_all_and_lora_bias(bias_model_dir, tmp_path):
    ref = make_adapter(bias_model_dir, tmp_path / "ad", target_modules=["q_proj", "down_proj"], bias="all",
                       lora_bias=True)
    merge_adapter(tmp_path / "ad", tmp_path / "merged", dtype="fp32")
    assert (_logits(_load(tmp_path / "merged")) - ref).abs().max() < 1e-4


def test_lora_bias_without_base_bias_is_refused(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, tmp_path / "ad", target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(LorakitError, match="lora_bias"):
        merge_adapter(tmp_path / "ad", tmp_path / "merged")


def test_bf16_is_the_fp32_merge_rounded(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    ref = make_adapter(tiny_model_dir, tmp_path / "ad", target_modules="all-linear", use_dora=True)
    merge_adapter(tmp_path / "ad", tmp_path / "m32", dtype="fp32")
    merge_adapter(tmp_path / "ad", tmp_path / "m16", dtype="bf16")
    w32, w16 = load_file(tmp_path / "m32" / "model.safetensors"), load_file(tmp_path / "m16" / "model.safetensors")
    assert all(w16[k].dtype == torch.bfloat16 and torch.equal(w16[k], w32[k].to(torch.bfloat16)) for k in w32)
    got = _logits(_load(tmp_path / "m16"))
    report = merge_adapter(tmp_path / "ad", tmp_path / "m16", dtype="bf16", verify=True, overwrite=True)
    assert 0 < report["rounding_logit_diff"] and 0 < report["max_logit_diff"] <= report["tolerance"]
    assert (got - ref).abs().max() > 1e-4  # bf16 rounding shows, and verify accepts it
    assert json.loads((tmp_path / "m16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_output_loads_and_generates_like_base_plus_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel

    make_adapter(tiny_model_dir, tmp_path / "ad", target_modules="all-linear", modules_to_save=["lm_head"])
    seen = []
    report = merge_adapter(tmp_path / "ad", tmp_path / "merged", dtype="fp32", max_shard_bytes=100_000,
                           progress=lambda done, total, name: seen.append((done, total)))
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert report["shards"] > 2 and len(set(index["weight_map"].values())) == report["shards"]
    assert seen[-1][0] == seen[-1][1] == report["bytes"]
    assert not list(tmp_path.glob("merged.tmp-*"))
    prompt = torch.tensor([IDS[0]])
    ref = PeftModel.from_pretrained(_load(tiny_model_dir), tmp_path / "ad").eval()
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False)
    got = _load(out).generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(want, got)


def _run_dir(tmp_path: Path, tiny_model_dir: Path, quant: dict) -> Path:
    import yaml

    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "adapter", target_modules=["q_proj", "gate_proj"])
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")  # the recipe's base_model wins
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    recipe = {"name": "demo", "base_model": str(tiny_model_dir), "quantization": {"bits": 4, **quant},
              "lora": {"r": 4, "alpha": 8}, "data": {"path": "x.jsonl"}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def test_from_quantized_matches_the_4bit_base_plus_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    run = _run_dir(tmp_path, tiny_model_dir, {"quant_type": "fp4", "double_quant": False})
    report = merge_adapter(run, tmp_path / "q", dtype="fp32", from_quantized=True, verify=True)
    merge_adapter(run, tmp_path / "plain", dtype="fp32")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                              bnb_4bit_compute_dtype=torch.float32)
    four_bit = _load(tiny_model_dir, quantization_config=qcfg, device_map="cpu")
    with torch.no_grad():  # the 4-bit model's own (CPU kernel) forward, then its weights dequantized exactly
        kernel = _logits(PeftModel.from_pretrained(four_bit, run / "adapter").eval())
    trained = _logits(PeftModel.from_pretrained(_load(tiny_model_dir, quantization_config=qcfg, device_map="cpu")
                                                .dequantize(), run / "adapter").eval())
    from_q, plain = _logits(_load(tmp_path / "q")), _logits(_load(tmp_path / "plain"))
    assert (from_q - trained).abs().max() < 1e-4 and report["max_logit_diff"] < 1e-4
    assert (plain - trained).abs().max() > 1e-2
    assert (from_q - kernel).abs().max() < (plain - kernel).abs().max() / 3
    card = (tmp_path / "q" / "README.md").read_text()
    assert str(tiny_model_dir) in card and "recipe.yaml" in card and "4-bit" in card


def test_run_dir_output_files(tiny_model_dir, tmp_path):
    run = _run_dir(tmp_path, tiny_model_dir, {})
    report = merge_adapter(run, tmp_path / "m", verify=True)
    out = tmp_path / "m"
    assert report["base"] == str(tiny_model_dir)
    assert report["max_logit_diff"] <= report["tolerance"]
    assert report["peak_rss"] > 0 and report["shards"] == 1
    assert {"config.json", "generation_config.json", "tokenizer.json", "README.md", "model.safetensors"} <= {
        p.name for p in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_verify_failure_is_a_runtime_error(tiny_model_dir, tmp_path, monkeypatch):
    from lorakit import merge

    make_adapter(tiny_model_dir, tmp_path / "ad", target_modules=["q_proj"])
    monkeypatch.setattr(merge, "FP32_TOL", -1.0)
    with pytest.raises(LorakitError, match="verify") as err:
        merge_adapter(tmp_path / "ad", tmp_path / "m", dtype="fp32", verify=True)
    assert err.value.exit_code == 1


def test_refuses_to_overwrite(tiny_model_dir, tmp_path):
    make_adapter(tiny_model_dir, tmp_path / "ad", target_modules=["q_proj"])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    with pytest.raises(LorakitError, match="already exists"):
        merge_adapter(tmp_path / "ad", tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").exists()
    merge_adapter(tmp_path / "ad", tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "keep.txt").exists() and (tmp_path / "m" / "model.safetensors").exists()


def test_input_errors(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="adapter_config.json"):
        merge_adapter(tmp_path / "empty", tmp_path / "m")
    make_adapter(tiny_model_dir, tmp_path / "ad", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(LorakitError, match="no-such-model"):
        merge_adapter(tmp_path / "ad", tmp_path / "m", base=str(tmp_path / "no-such-model"))
    with pytest.raises(LorakitError, match="dtype"):
        merge_adapter(tmp_path / "ad", tmp_path / "m", dtype="int3")

    path = tmp_path / "ad" / "adapter_model.safetensors"
    good = load_file(path)
    save_file({k.replace("layers.0.", "layers.7."): v for k, v in good.items()}, path)
    with pytest.raises(LorakitError, match=r"layers\.7\.self_attn\.q_proj"):
        merge_adapter(tmp_path / "ad", tmp_path / "m")

    bad = dict(good)
    bad["base_model.model.lm_head.weight"] = good["base_model.model.lm_head.weight"][:-3]
    save_file(bad, path)
    with pytest.raises(LorakitError, match="lm_head.weight"):
        merge_adapter(tmp_path / "ad", tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob("m.tmp-*"))
