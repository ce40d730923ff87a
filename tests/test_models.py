"""models.py on tiny random models: LoRA config from the recipe, reload equality, counts, errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml

from lorakit.errors import LorakitError
from lorakit.recipe.loader import load_recipe


def make_recipe(tmp_path: Path, base: Path, **sections) -> object:
    doc = {"name": "t", "base_model": str(base), "data": {"path": "x.jsonl"},
           "quantization": {"bits": "none"}, "lora": {"r": 4, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return load_recipe(path)


def _randomize_lora(model, seed: int = 1) -> None:
    """LoRA B starts at zero (a no-op adapter); give it values so reload checks mean something."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("opts", [
    {"r": 4, "alpha": 8, "rslora": False, "dora": False},
    {"r": 8, "alpha": 4, "rslora": True, "dora": True, "layers": [1]},
])
def test_adapter_config_matches_recipe(tmp_path, tiny_model_dir, opts):
    from lorakit.model.load import load_for_training

    recipe = make_recipe(tmp_path, tiny_model_dir, lora=opts)
    model, _, _ = load_for_training(recipe, "cpu")
    model.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == opts["r"]
    assert cfg["lora_alpha"] == opts["alpha"]
    assert cfg["use_rslora"] is opts["rslora"]
    assert cfg["use_dora"] is opts["dora"]
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == opts.get("layers")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    if opts.get("layers"):
        adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_A" in n}
        assert adapted == {"1"}


def test_all_linear_and_presets(tmp_path, tiny_model_dir):
    from lorakit.model.load import load_for_training

    model, _, info = load_for_training(make_recipe(tmp_path, tiny_model_dir, lora={"targets": "all-linear"}), "cpu")
    assert set(info["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head.lora" in n for n, _ in model.named_parameters())
    _, _, info = load_for_training(make_recipe(tmp_path, tiny_model_dir, lora={"targets": "mlp"}), "cpu")
    assert set(info["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}


def test_preset_filters_to_fused_names(tmp_path):
    from helpers import build_tiny_model

    from lorakit.model.load import load_for_training

    build_tiny_model(tmp_path / "phi3", arch="phi3")
    _, _, info = load_for_training(make_recipe(tmp_path, tmp_path / "phi3", lora={"targets": "attention"}), "cpu")
    assert set(info["target_modules"]) == {"qkv_proj", "o_proj"}


def test_trainable_count_is_peft_count(tmp_path, tiny_model_dir):
    from lorakit.model.load import describe_params, load_for_training

    model, _, info = load_for_training(make_recipe(tmp_path, tiny_model_dir), "cpu")
    assert (info["trainable_params"], info["total_params"]) == model.get_nb_trainable_parameters()
    # by hand: r * (in + out) per adapted module; q: 64->64, v: 64->32 (2 kv heads of 16), 2 layers
    assert info["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))
    assert describe_params(info).startswith(f"trainable: {info['trainable_params']:,} / total: ")


def test_bad_targets_list_the_real_names(tmp_path, tiny_model_dir):
    from lorakit.model.load import load_for_training

    recipe = make_recipe(tmp_path, tiny_model_dir, lora={"targets": ["q_proj", "query_key_value"]})
    with pytest.raises(LorakitError) as e:
        load_for_training(recipe, "cpu")
    assert e.value.field == "lora.targets"
    assert "query_key_value" in e.value.message
    for real in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        assert real in e.value.message


def test_layers_out_of_range(tmp_path, tiny_model_dir):
    from lorakit.model.load import load_for_training

    with pytest.raises(LorakitError, match="2 layers") as e:
        load_for_training(make_recipe(tmp_path, tiny_model_dir, lora={"layers": [0, 5]}), "cpu")
    assert e.value.field == "lora.layers"


@pytest.mark.parametrize("fused", [False, True], ids=["peft", "fused"])
@pytest.mark.parametrize("bits", ["none", 4])
def test_saved_adapter_reloads_to_same_logits(tmp_path, tiny_model_dir, bits, fused):
    """The saved adapter, reloaded with plain peft, gives the logits of the model in memory. With
    train.fused_lora (lorakit.speed.planning's layer class) the saved adapter is still plain peft."""
    import torch
    from peft import PeftModel

    from lorakit.model.load import load_base, load_for_training

    recipe = make_recipe(tmp_path, tiny_model_dir, quantization={"bits": bits},
                         lora={"targets": "all-linear", "dropout": 0.1}, train={"fused_lora": fused})
    model, _, info = load_for_training(recipe, "cpu")
    assert info["bits"] == (None if bits == "none" else 4)
    assert info.get("fused_lora_modules", 0) == (2 * 7 if fused else 0)
    _randomize_lora(model)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    base = load_base(recipe, "cpu", tiny_model_dir, None if bits == "none" else 4)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert not any(type(m).__name__.startswith("FusedLora") for m in reloaded.modules())
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    assert (before - after).abs().max().item() < 1e-5
    if bits == 4:
        assert any(type(m).__name__ == "Linear4bit" for m in reloaded.modules())


def test_chat_template_override(tmp_path, tiny_model_dir):
    from lorakit.model.load import load_for_training

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    _, tok, _ = load_for_training(make_recipe(tmp_path, tiny_model_dir, model={"chat_template": template}), "cpu")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user] hi\n"


def test_local_dir_errors(tmp_path, tiny_model_dir):
    from lorakit.model.load import resolve_base_dir

    assert resolve_base_dir(str(tiny_model_dir)) == tiny_model_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LorakitError, match="config.json"):
        resolve_base_dir(str(empty))
    (empty / "config.json").write_text("{}")
    (empty / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(LorakitError, match="pickle") as e:
        resolve_base_dir(str(empty))
    assert "allow_pickle" in e.value.hint
    assert resolve_base_dir(str(empty), allow_pickle=True) == empty
    with pytest.raises(LorakitError, match="not found"):
        resolve_base_dir(str(tmp_path / "missing"))


def test_hub_id_offline_names_what_was_tried(tmp_path, monkeypatch):
    from lorakit.model.load import resolve_base_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(LorakitError) as e:
        resolve_base_dir("llama-3.2-1b")
    assert e.value.field == "base_model"
    assert "meta-llama/Llama-3.2-1B" in e.value.message
    assert "cache" in e.value.message and "HF_HUB_OFFLINE" in e.value.message


def test_demo_conversion_runs_once_under_a_lock(tmp_path, monkeypatch):
    """Two concurrent first uses convert once; the result appears atomically (tmp dir + rename)."""
    import lorakit.model.load as models

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        out.mkdir(parents=True)
        assert not models.demo_model_dir().exists()  # nothing visible at the final name while writing
        threading.Event().wait(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(models, "demo_gguf_path", lambda: Path("demo.gguf"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.resolve_base_dir("smollm2-135m-instruct")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "cache" / "models" / "smollm2-135m-instruct"] * 2
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")] == \
        ["smollm2-135m-instruct"]


def test_demo_gguf_ships_in_the_package():
    from lorakit.model.load import demo_gguf_path

    path = demo_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_levers_on_the_model_build(tmp_path, tiny_model_dir):
    """CPU default: no fused layers, peft's k-bit preparation as before; frozen_dtype bf16 (the CUDA plan) keeps
    the unquantized frozen weights in bf16 instead of peft's fp32 upcast; a first-K count is set per layer."""
    import torch

    from lorakit.model.load import load_for_training
    from lorakit.speed.checkpointing import decoder_layers

    recipe = make_recipe(tmp_path, tiny_model_dir, quantization={"bits": 4, "compute_dtype": "bf16"},
                         lora={"targets": "all-linear"})
    model, _, info = load_for_training(recipe, "cpu")
    assert info["fused_lora_modules"] == 0 and "checkpoint_layers" not in info
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.float32  # peft's upcast, as before

    from lorakit.speed import Plan

    plan = Plan(frozen_dtype="bf16", fused_lora=True, gradient_checkpointing=True, checkpoint_layers=1)
    model, _, info = load_for_training(recipe, "cpu", plan)
    base = model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16
    assert info["fused_lora_modules"] == 2 * 7 and info["checkpoint_layers"] == 1
    assert [layer.gradient_checkpointing for layer in decoder_layers(base)] == [True, False]


def test_too_many_checkpointed_layers_is_a_recipe_error(tmp_path, tiny_model_dir):
    from lorakit.model.load import load_for_training

    recipe = make_recipe(tmp_path, tiny_model_dir, train={"gradient_checkpointing": 3})
    with pytest.raises(LorakitError, match="2 decoder layers; got 3") as e:
        load_for_training(recipe, "cpu")
    assert e.value.field == "train.gradient_checkpointing"
