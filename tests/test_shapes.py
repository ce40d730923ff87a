"""Model shapes from config.json: offline table, local dirs, hub cache, targets; checked against transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lorakit.errors import LorakitError
from lorakit.model import registry
from lorakit.model.known_models import KNOWN_CONFIGS, known_config
from lorakit.model.shapes import check_targets, load_shape, shape_from_config
from lorakit.recipe.schema import LoraSection


def meta_model(cfg: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


def _distinct_configs():
    seen, out = set(), []
    for hub, cfg in KNOWN_CONFIGS.items():
        if id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(pytest.param(hub, id=hub))
    return out


@pytest.mark.parametrize("hub", _distinct_configs())
def test_known_shape_matches_transformers(hub):
    """Every known config: same Linear modules, dims, biases and total parameters as transformers builds."""
    cfg = known_config(hub)
    shape = shape_from_config(cfg)
    model = meta_model(cfg)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    import torch

    layer0 = {n.split(".")[-1]: m for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(layer0) == set(shape.linear_module_names())
    for name, mod in layer0.items():
        assert shape.linears[name] == (mod.in_features, mod.out_features, mod.bias is not None), name


def test_demo_alias_is_known_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    s = load_shape(registry.DEMO_ALIAS)
    assert (s.model_type, s.hidden, s.intermediate, s.num_layers, s.num_heads, s.num_kv_heads, s.vocab) == \
        ("llama", 576, 1536, 30, 9, 3, 49152)
    assert s.tie_word_embeddings
    assert s.total_params == 134_515_008


def test_every_alias_resolves(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for alias, hub in registry.ALIASES.items():
        assert load_shape(alias).num_layers > 0, alias
        assert load_shape(hub.upper()).total_params == load_shape(alias).total_params  # ids are case-insensitive


def test_published_sizes():
    """Totals agree with the sizes the model cards publish."""
    assert load_shape("meta-llama/Llama-3.1-8B").total_params == 8_030_261_248
    assert load_shape("Qwen/Qwen2.5-7B").total_params == 7_615_616_512
    assert load_shape("microsoft/Phi-3-mini-4k-instruct").total_params == 3_821_079_552
    assert load_shape("google/gemma-2-9b").total_params == 9_241_705_984


def test_local_directory(tmp_path):
    cfg = dict(known_config("Qwen/Qwen2.5-0.5B"), num_hidden_layers=3)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = load_shape(str(tmp_path))
    assert s.num_layers == 3 and s.linears["q_proj"] == (896, 896, True) and s.linears["o_proj"][2] is False
    assert s.source.endswith("config.json")


def test_local_directory_without_config(tmp_path):
    with pytest.raises(LorakitError, match="no config.json"):
        load_shape(str(tmp_path))


def test_hub_cache(monkeypatch, tmp_path):
    """An unknown hub id is read from the HF cache (HF_HUB_CACHE, then HF_HOME/hub)."""
    cfg = dict(known_config("meta-llama/Llama-3.2-1B"), num_hidden_layers=5)
    snap = tmp_path / "hf" / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert load_shape("acme/tiny").num_layers == 5
    assert load_shape("acme/tiny", revision="abc123").num_layers == 5
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert load_shape("acme/tiny").num_layers == 5


def test_unknown_offline_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LorakitError) as e:
        load_shape("acme/never-heard-of")
    assert "unknown offline" in e.value.message and e.value.field == "base_model"
    assert "hf download acme/never-heard-of config.json" in e.value.hint


def test_other_architecture_falls_back_to_meta_device(tmp_path):
    cfg = {"model_type": "stablelm", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    s = load_shape(str(tmp_path))
    assert s.total_params == sum(p.numel() for p in meta_model(cfg).parameters())
    assert "q_proj" in s.linear_module_names()


# ---------------------------------------------------------------------------------------------------- targets


def _lora(**kw) -> LoraSection:
    return LoraSection(**kw)


def test_all_linear_and_presets():
    llama, phi = load_shape("llama-3.2-1b"), load_shape("phi-3-mini-instruct")
    assert check_targets(llama, _lora(targets="all-linear")) == \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert check_targets(llama, _lora(targets="qkv")) == ["q_proj", "k_proj", "v_proj"]
    assert check_targets(phi, _lora(targets="qkv")) == ["qkv_proj"]
    assert check_targets(phi, _lora(targets="mlp")) == ["gate_up_proj", "down_proj"]
    assert check_targets(phi, _lora(targets="attention")) == ["qkv_proj", "o_proj"]


def test_explicit_targets_and_unknown_names():
    s = load_shape("llama-3.1-8b")
    assert check_targets(s, _lora(targets=["v_proj", "self_attn.q_proj", "lm_head"])) == ["v_proj", "q_proj", "lm_head"]
    with pytest.raises(LorakitError) as e:
        check_targets(s, _lora(targets=["q_proj", "query_key_value"]))
    assert e.value.field == "lora.targets"
    assert "'query_key_value'" in e.value.message and "gate_proj" in e.value.message
    with pytest.raises(LorakitError, match="qkv_proj"):
        check_targets(load_shape("phi-3-mini-instruct"), _lora(targets=["q_proj"]))


def test_layers_beyond_the_model():
    s = load_shape("llama-3.2-1b")  # 16 layers
    assert check_targets(s, _lora(layers=[0, 15]))
    with pytest.raises(LorakitError) as e:
        check_targets(s, _lora(layers=[3, 16, 40]))
    assert e.value.field == "lora.layers" and "[16, 40]" in e.value.message


def test_import_pulls_no_torch():
    code = ("import sys, lorakit.model.shapes, lorakit.estimate.memory, lorakit.model.known_models; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
