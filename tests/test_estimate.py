"""`estimate`: parameter counts equal peft's on meta-device models; storage bytes; the memory model's logic."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from lorakit.errors import LorakitError
from lorakit.estimate.memory import CONSTANTS, Setup, estimate, gpu_bytes, memory, parse_bytes
from lorakit.estimate.params import bytes_4bit, count_params
from lorakit.model.known_models import known_config
from lorakit.model.shapes import check_modules_to_save, check_targets, shape_from_config
from lorakit.recipe.loader import validate_data
from lorakit.recipe.schema import LoraSection

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)
ARCHS = {
    "llama": {"model_type": "llama", **SMALL, "tie_word_embeddings": False},
    "llama-tied-bias": {"model_type": "llama", **SMALL, "tie_word_embeddings": True, "attention_bias": True,
                        "mlp_bias": True},
    "qwen2": {"model_type": "qwen2", **SMALL, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", **SMALL, "head_dim": 32, "tie_word_embeddings": False},
    "mistral": {"model_type": "mistral", **SMALL, "head_dim": 16},
    "gemma2": {"model_type": "gemma2", **SMALL, "head_dim": 32},
    "gemma3_text": {"model_type": "gemma3_text", **SMALL, "head_dim": 32},
    "phi3": {"model_type": "phi3", **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"},
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}
OPTIONS = {
    "all-linear": dict(targets="all-linear"),
    "qv-r4": dict(r=4, targets=["q_proj", "v_proj"]),
    "attention-dora": dict(targets="attention", dora=True),
    "mlp-layers": dict(targets="mlp", layers=[0, 2]),
    "save-lm_head": dict(targets="qkv", modules_to_save=["lm_head"]),
    "save-embed-bias-all": dict(targets="all-linear", modules_to_save=["embed_tokens"], bias="all"),
    "bias-lora_only-layers": dict(targets="qkv", bias="lora_only", layers=[1]),
}


def meta_model(cfg: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(conf)


def peft_counts(cfg: dict, lora: LoraSection, targets: list[str]) -> tuple[int, int, int]:
    """(base total, peft trainable, peft all params) for the LoRA config on a meta-device model."""
    from peft import LoraConfig, get_peft_model

    model = meta_model(cfg)
    base = sum(p.numel() for p in model.parameters())
    conf = LoraConfig(r=lora.r, lora_alpha=lora.resolved_alpha, target_modules=targets, use_dora=lora.dora,
                      bias=lora.bias, modules_to_save=list(lora.modules_to_save) or None,
                      layers_to_transform=lora.layers, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, conf)
    trainable, total = peft_model.get_nb_trainable_parameters()
    return base, trainable, total


def ours(cfg: dict, lora: LoraSection) -> tuple[dict, list[str]]:
    shape = shape_from_config(cfg)
    targets = check_targets(shape, lora)
    return count_params(shape, lora, targets, check_modules_to_save(shape, list(lora.modules_to_save))), targets


def _cases():
    """Every architecture x option; bias options only where the architecture has biases."""
    for arch, cfg in ARCHS.items():
        for opt, kw in OPTIONS.items():
            if kw.get("bias", "none") == "none" or shape_from_config(cfg).layer_biases:
                yield pytest.param(arch, opt, id=f"{arch}-{opt}")


@pytest.mark.parametrize(("arch", "opt"), list(_cases()))
def test_counts_equal_peft(arch, opt):
    cfg, lora = ARCHS[arch], LoraSection(**OPTIONS[opt])
    if arch == "phi3" and opt == "qv-r4":  # Phi-3 fuses q/k/v into qkv_proj
        with pytest.raises(LorakitError, match="qkv_proj"):
            ours(cfg, lora)
        return
    params, targets = ours(cfg, lora)
    base, trainable, total = peft_counts(cfg, lora, targets)
    assert params["total"] == base
    assert params["trainable"] == trainable
    assert params["total_with_adapter"] == total
    assert params["trainable_percent"] == pytest.approx(100 * trainable / total, abs=1e-5)


@pytest.mark.parametrize("opt", ["all-linear", "attention-dora", "save-lm_head"])
def test_counts_equal_peft_real_llama_31_8b(opt):
    cfg, lora = known_config("meta-llama/Llama-3.1-8B"), LoraSection(r=16, **OPTIONS[opt])
    params, targets = ours(cfg, lora)
    base, trainable, total = peft_counts(cfg, lora, targets)
    assert (params["total"], params["trainable"], params["total_with_adapter"]) == (base, trainable, total)
    if opt == "all-linear":
        assert trainable == 41_943_040  # the well-known r=16 all-linear count for Llama-3.1-8B


def test_per_module_rows():
    params, _ = ours(known_config("meta-llama/Llama-3.1-8B"), LoraSection(r=8, targets=["q_proj", "k_proj"]))
    rows = {r["module"]: r for r in params["by_module"]}
    assert rows["q_proj"]["in_features"] == 4096 and rows["q_proj"]["out_features"] == 4096
    assert rows["k_proj"]["out_features"] == 1024 and rows["k_proj"]["layers"] == 32
    assert rows["k_proj"]["count"] == 8 * (4096 + 1024) * 32
    assert sum(r["count"] for r in params["by_module"]) == params["trainable"]


# ------------------------------------------------------------------------------------------------ storage


def test_4bit_bytes_match_bitsandbytes():
    """Packed weights + absmax (double-quantized: uint8 absmax, fp32 per 256, code, offset) + the 4-bit code."""
    import bitsandbytes.functional as F
    import torch

    for n_rows, double in ((64, True), (96, False), (33, True)):
        w = torch.randn(n_rows, 4096, dtype=torch.bfloat16)
        packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
        nbytes = packed.numel() * packed.element_size() + qs.absmax.numel() * qs.absmax.element_size()
        nbytes += qs.code.numel() * qs.code.element_size()
        if double:
            s2 = qs.state2
            nbytes += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size() + 4
        assert bytes_4bit(w.numel(), double) == nbytes


def _recipe(**over):
    data = {"name": "t", "base_model": "meta-llama/Llama-3.1-8B", "data": {"path": "x.jsonl", "max_length": 2048},
            "quantization": {"bits": 4}, "lora": {"r": 16, "targets": "all-linear"},
            "train": {"batch_size": 2, "optimizer": "adamw_torch", "liger": False}}
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return validate_data(data)


def test_4bit_weights_of_llama_8b():
    m = estimate(_recipe())["memory"]
    # 6.98e9 linear weights at ~0.5 byte + embeddings/lm_head/norms (1.05e9 params), which lorakit keeps in
    # bf16 on CUDA with bf16 compute (speed.plan's frozen_dtype) ...
    assert m["weights"]["unquantized_bytes"] == (8_030_261_248 - 6_979_321_856) * 2
    assert m["weights"]["unquantized_dtype"] == "bf16"
    assert 3.55e9 < m["weights"]["quantized_bytes"] < 3.65e9
    # ... and in fp32 after peft's prepare_model_for_kbit_training otherwise (fp16 compute)
    fp16 = estimate(_recipe(quantization__compute_dtype="fp16"))["memory"]
    assert fp16["weights"]["unquantized_bytes"] == (8_030_261_248 - 6_979_321_856) * 4
    assert "lm_head" in m["weights"]["unquantized"] and "embed_tokens" in m["weights"]["unquantized"]
    bf16 = estimate(_recipe(quantization__bits="none"))["memory"]
    assert bf16["weights_bytes"] == 8_030_261_248 * 2


# ------------------------------------------------------------------------------------------------ memory


def test_json_shape_and_ints():
    r = estimate(_recipe())
    json.dumps(r)
    assert isinstance(r["params"]["total"], int) and isinstance(r["params"]["trainable_percent"], float)
    for key in ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
                "logits_bytes", "overhead_bytes", "peak_bytes"):
        assert isinstance(r["memory"][key], int) and r["memory"][key] >= 0, key
    assert isinstance(r["artifacts"]["adapter_bytes"], int) and isinstance(r["artifacts"]["merged_bytes"], int)
    # TRL casts the adapter of a 4-bit base to bf16 (and so saves it); a 16-bit base's adapter stays fp32
    assert r["artifacts"]["adapter_bytes"] == r["params"]["trainable"] * 2
    r16 = estimate(_recipe(quantization__bits="none"))
    assert r16["artifacts"]["adapter_bytes"] == r16["params"]["trainable"] * 4
    assert r["artifacts"]["merged_bytes"] == 8_030_261_248 * 2
    assert r["artifacts"]["unmerged_bytes"] == r["artifacts"]["merged_bytes"]
    # extract and compose write fp32 LoRA weights: twice the bf16 adapter a 4-bit run saves
    assert r["artifacts"]["extracted_adapter_bytes"] == 2 * r["artifacts"]["adapter_bytes"]
    m = r["memory"]  # the breakdown adds up to the peak
    assert m["peak_bytes"] == sum(m[k] for k in ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes",
                                                 "activations_bytes", "logits_bytes", "overhead_bytes"))


def test_memory_terms_respond_to_the_recipe():
    def peak(**kw):
        return estimate(_recipe(**kw))["memory"]

    base = peak(train__gradient_checkpointing=False)
    assert peak(train__gradient_checkpointing=True)["activations_bytes"] < base["activations_bytes"] / 5
    assert peak(train__gradient_checkpointing=False, train__batch_size=4)["activations_bytes"] == \
        pytest.approx(2 * base["activations_bytes"], rel=0.02)
    # Liger's RMSNorm keeps its bf16 input (not an fp32 upcast) and its SwiGLU two operands (not three)
    assert peak(train__gradient_checkpointing=False, train__liger=True)["activations_bytes"] < \
        0.9 * base["activations_bytes"]
    # lorakit's fused LoRA keeps dropout masks, not dropped copies of each input
    assert peak(train__gradient_checkpointing=False, train__fused_lora=True)["activations_bytes"] < \
        0.95 * peak(train__gradient_checkpointing=False, train__fused_lora=False)["activations_bytes"]
    # on CUDA the fused layer draws its dropout mask inside its kernels (lorakit.speed.kernels.lora_dropout): none is kept, so
    # dropout costs no activation memory there; on a CPU (torch's dropout) the mask is a byte per input element
    fused = dict(train__gradient_checkpointing=False, train__fused_lora=True)
    assert peak(**fused, lora__dropout=0.05)["activations_bytes"] == \
        peak(**fused, lora__dropout=0.0)["activations_bytes"]
    cpu = {p: estimate(_recipe(**fused, lora__dropout=p), device="cpu")["memory"]["activations_bytes"]
           for p in (0.0, 0.05)}
    assert cpu[0.05] > cpu[0.0]
    # ... and ranks above the kernels' reach keep torch's dropout (and its mask) on CUDA too
    assert peak(**fused, lora__dropout=0.05, lora__r=128)["activations_bytes"] > \
        peak(**fused, lora__dropout=0.0, lora__r=128)["activations_bytes"]
    # checkpointing the first 16 of 32 layers lands between none and all
    k16 = peak(train__gradient_checkpointing=16)["activations_bytes"]
    assert peak(train__gradient_checkpointing=True)["activations_bytes"] < k16 < base["activations_bytes"]
    # torch's AdamW keeps two states in the adapter's dtype (bf16 under TRL for a 4-bit base): 4 bytes a
    # parameter; the 8-bit one about 2
    assert base["optimizer_bytes"] == 4 * estimate(_recipe())["params"]["trainable"]
    assert peak(train__optimizer="adamw_8bit")["optimizer_bytes"] < base["optimizer_bytes"] / 1.9
    assert peak(train__optimizer="sgd")["optimizer_bytes"] == 0
    eager = peak(model__attn_implementation="eager", train__gradient_checkpointing=False)
    assert eager["activations_bytes"] > base["activations_bytes"]
    dora = peak(lora__dora=True)
    assert dora["adapter_bytes"] > peak()["adapter_bytes"]


def test_budget_verdict():
    r = estimate(_recipe(train__gradient_checkpointing="auto"), gpu="rtx4090")
    v = r["verdict"]
    assert v["budget_bytes"] == 24 * 2**30 and v["fits"] and v["needs_checkpointing"]
    assert r["setup"]["gradient_checkpointing"] is True  # lorakit train's default on CUDA: every layer
    # what train.memory_budget_gb: 24 would choose: 28 GiB without checkpointing does not fit
    assert r["verdict"]["with_memory_budget"]["gradient_checkpointing"] is True
    assert v["max_batch_with_checkpointing"] >= 2 > v["max_batch_without_checkpointing"] - 1 or \
        v["max_batch_with_checkpointing"] > v["max_batch_without_checkpointing"]
    # max_batch is the largest that fits: one more does not (planned as the run would: checkpointing, and the
    # CUDA graphs that padding-free batches get on this model)
    fit = estimate(_recipe(train__gradient_checkpointing="auto", train__batch_size=v["max_batch_with_checkpointing"]))
    over = estimate(_recipe(train__gradient_checkpointing="auto",
                            train__batch_size=v["max_batch_with_checkpointing"] + 1))
    assert fit["setup"]["cuda_graphs"] is over["setup"]["cuda_graphs"] is r["setup"]["cuda_graphs"] is True
    assert fit["memory"]["peak_bytes"] <= v["budget_bytes"] < over["memory"]["peak_bytes"]
    small = estimate(_recipe(quantization__bits="none"), budget_bytes=parse_bytes("16GiB"))["verdict"]
    assert not small["fits"] and small["max_batch_with_checkpointing"] == 0


def test_auto_checkpointing_off_when_it_fits():
    """The breakdown is that of the run `lorakit train` would do: every layer checkpointed by default, the
    budget mode's choice (none, when it fits) with train.memory_budget_gb; the verdict says what a budget allows."""
    r = estimate(_recipe(base_model="llama-3.2-1b", train__gradient_checkpointing="auto", data__max_length=512),
                 gpu="a100-80gb")
    assert r["setup"]["gradient_checkpointing"] is True and not r["verdict"]["needs_checkpointing"]
    assert r["verdict"]["with_memory_budget"]["checkpoint_layers"] == 0
    budget = estimate(_recipe(base_model="llama-3.2-1b", train__gradient_checkpointing="auto", data__max_length=512,
                              train__memory_budget_gb=80))
    assert budget["setup"]["gradient_checkpointing"] is False
    assert budget["memory"]["peak_bytes"] == budget["peak_bytes_uncheckpointed"] > r["memory"]["peak_bytes"]


def test_estimate_follows_lorakits_levers():
    """The breakdown models the levers lorakit.speed.planning.plan turns on for the run (fused LoRA, frozen bf16 weights,
    TRL's chunked LM head): no logits of tokens x vocab are ever counted."""
    from lorakit.speed.planning import plan

    r = estimate(_recipe())
    p = plan(_recipe(), "cuda", compute_dtype="bf16", liger_ok=False)
    assert (r["setup"]["fused_lora"], r["setup"]["frozen_dtype"]) == (p.fused_lora, p.frozen_dtype) == (True, "bf16")
    assert r["setup"]["fused_lm_head"] is True
    assert r["memory"]["logits_bytes"] < 4096 * 128_256 * 2  # less than one bf16 copy of the logits


def test_parse_bytes_and_gpus():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 TiB") == int(1.5 * 2**40)
    assert parse_bytes("512mib") == 512 * 2**20
    with pytest.raises(LorakitError):
        parse_bytes("lots")
    with pytest.raises(LorakitError) as zero:
        parse_bytes("0GiB")
    assert zero.value.message.startswith("--budget: '0GiB'")
    assert gpu_bytes("RTX4090") == 24 * 2**30 and gpu_bytes("a100-40gb") == 40 * 2**30
    with pytest.raises(LorakitError) as e:
        gpu_bytes("voodoo2")
    assert "rtx4090" in e.value.hint


def test_unknown_target_raises_with_line(tmp_path):
    from lorakit.recipe.loader import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text("base_model: llama-3.2-1b\ndata: {path: x.jsonl}\nlora:\n  targets: [q_proj, wq]\n")
    with pytest.raises(LorakitError) as e:
        estimate(load_recipe(p))
    assert e.value.problems and e.value.problems[0].field == "lora.targets" and e.value.problems[0].line == 4


def test_memory_accepts_constants():
    from dataclasses import replace

    shape = shape_from_config(known_config("meta-llama/Llama-3.2-1B"))
    lora = LoraSection()
    targets = check_targets(shape, lora)
    params = count_params(shape, lora, targets, [])
    s = Setup(bits=4, double_quant=True, weight_bytes=2, act_bytes=2, optimizer="adamw_torch", attn="sdpa",
              liger=False, dropout=0.05, batch=1, seq=1024, checkpointing=False, device="cuda")
    a = memory(shape, lora, targets, [], params, s)
    b = memory(shape, lora, targets, [], params, s, replace(CONSTANTS, activation_factor=2.0))
    assert b["activations_bytes"] > 1.9 * a["activations_bytes"]


def test_render(tmp_path):
    from rich.console import Console

    from lorakit.estimate.view import render

    console = Console(record=True, width=140)
    render(estimate(_recipe(), gpu="rtx4090"), console)
    text = " ".join(console.export_text().split())  # rich wraps long lines
    assert "41,943,040" in text and "q_proj" in text and "4096 x 14336" in text
    assert "peak" in text and "fits" in text and "GiB" in text
    assert "fused LoRA" in text and "bf16" in text and "memory_budget_gb" in text


def test_cli_estimate_is_fast(tmp_path):
    """`lorakit estimate` answers in under 2 s for a known architecture (best of two runs).

    Measured as the child's CPU seconds, which other jobs on the machine do not inflate; wall time gets a
    load-tolerant bound."""
    import resource

    p = tmp_path / "r.yaml"
    p.write_text("base_model: meta-llama/Llama-3.1-8B\ndata: {path: x.jsonl, max_length: 2048}\n")
    best_cpu = best_wall = 99.0
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "lorakit", "estimate", str(p), "--json", "--gpu", "rtx4090"],
                             capture_output=True, text=True)
        best_wall = min(best_wall, time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best_cpu = min(best_cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["params"]["total"] == 8_030_261_248
    assert best_cpu < 2.0, f"estimate used {best_cpu:.2f} CPU seconds"
    assert best_wall < 6.0, f"estimate took {best_wall:.2f}s"


def test_grpo_estimate_uses_prompt_plus_completion_and_the_generation_phase():
    """GRPO rows are prompt + completion (at their limits: an upper bound), not data.max_length; generation
    holds a KV cache per generated sequence, and the peak is the larger of the two phases."""
    def grpo(**g):
        return _recipe(method="grpo", data={"path": "x.jsonl", "max_length": 4096}, train={"batch_size": 8},
                       grpo={"rewards": [{"fn": "exact_answer"}], "max_prompt_length": 200,
                             "max_completion_length": 56, **g})

    r = estimate(grpo())
    assert r["setup"]["seq_len"] == 256 and r["tokens_per_micro_batch"] == 8 * 256
    assert r["setup"]["generation_batch"] == 8
    assert estimate(grpo(max_completion_length=312))["setup"]["seq_len"] == 512
    small, big = r["memory"], estimate(grpo(generation_batch_size=512))["memory"]
    # Llama-3.1-8B: 32 layers x 2 x 8 kv heads x 128 x bf16 = 128 KiB per token of KV cache
    assert big["generation_bytes"] - small["generation_bytes"] == (512 - 8) * (256 * 128 * 1024 + 128_256 * 8)
    assert big["peak_bytes"] > small["peak_bytes"]  # 512 x 256 tokens of cache outgrow the training step
    # each phase is reported, and the allocated peak is the largest: training here, generation with 512 sequences
    assert set(small["phases_bytes"]) == {"generation", "scoring", "training"}
    assert small["peak_phase"] == "training" and big["peak_phase"] == "generation"
    for m in (small, big):
        assert m["allocated_peak_bytes"] == max(m["phases_bytes"].values()) == m["phases_bytes"][m["peak_phase"]]
        assert m["phases_bytes"]["scoring"] < m["phases_bytes"]["training"]  # nothing kept for a backward
    sft = estimate(_recipe())
    assert sft["memory"]["generation_bytes"] == 0 and sft["setup"]["generation_batch"] == 0
    assert sft["memory"]["phases_bytes"] == {} and sft["memory"]["peak_phase"] == "training"


def test_grpo_generation_over_a_static_cache_counts_its_rounded_length():
    """grpo.generation_graphs (on by default on CUDA) sizes the KV cache at prompt + completion rounded up to 64
    tokens, as lorakit.speed.decode_graphs allocates it; transformers' dynamic cache holds exactly the tokens."""
    def grpo(graphs):
        return _recipe(method="grpo", data={"path": "x.jsonl"}, train={"batch_size": 8},
                       grpo={"rewards": [{"fn": "exact_answer"}], "max_prompt_length": 200,
                             "max_completion_length": 60, "generation_graphs": graphs})

    static, dynamic = estimate(grpo("auto"))["memory"], estimate(grpo(False))["memory"]
    per_token = 128 * 1024  # Llama-3.1-8B: 32 layers x 2 x 8 kv heads x 128 x bf16
    assert static["generation_bytes"] - dynamic["generation_bytes"] == 8 * (320 - 260) * per_token


def test_more_checkpointed_layers_than_the_model_has_is_an_input_error():
    """The same shape check as validate: `lorakit train` would otherwise fail only after loading the weights."""
    with pytest.raises(LorakitError) as e:
        estimate(_recipe(train__gradient_checkpointing=33))
    problem = e.value.problems[0]
    assert problem.field == "train.gradient_checkpointing" and "32 decoder layers" in problem.message
    assert estimate(_recipe(train__gradient_checkpointing=32))["setup"]["checkpoint_layers"] == 32
