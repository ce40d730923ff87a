"""lorakit.speed.planning: the levers keep the math (fused LoRA vs peft, padding-free vs padded), the plan resolves
them per device and memory budget, and train.py / models.py apply what the plan says."""

import dataclasses
import json

import pytest
import torch
from helpers import tiny_lora

from lorakit import speed
from lorakit.recipe.loader import validate_data
from lorakit.speed import checkpointing, fused_lora, planning

GIB = 2**30


def _tiny_llama(layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    return LlamaForCausalLM(cfg)


def _tiny_peft(fused: bool, p: float = 0.0, model=None, bits=None):
    return tiny_lora(model if model is not None else _tiny_llama(), p, fused, bits)


def _grads(pm, ids):
    pm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: q.grad.float() for n, q in pm.named_parameters() if q.grad is not None}


def recipe(**sections):
    doc = {"base_model": "llama-3.1-8b", "data": {"path": "d.jsonl", "max_length": 2048},
           "quantization": {"bits": 4}, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
           "train": {"batch_size": 2}}
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return validate_data(doc)


# ---- same math ------------------------------------------------------------------------------------


def _assert_same_math(ref, fused, ids, *, loss_rtol: float) -> None:
    """Same loss (relative) and, per LoRA tensor, gradients within 5% of their norm."""
    l0, g0 = _grads(ref, ids)
    l1, g1 = _grads(fused, ids)
    assert abs(l0 - l1) / l0 < loss_rtol
    assert g0.keys() == g1.keys() and len(g0) == 3 * 7 * 2
    for n in g0:
        assert (g0[n] - g1[n]).norm() <= 0.05 * g0[n].norm() + 1e-6, n


def test_fused_lora_matches_peft():
    ids = torch.randint(0, 300, (2, 12))
    ref, fused = _tiny_peft(False), _tiny_peft(True)
    assert type(fused.base_model.model.model.layers[0].mlp.down_proj).__name__ == "FusedLoraLinear"
    _assert_same_math(ref, fused, ids, loss_rtol=1e-3)


def test_fused_lora_4bit_matches_peft_4bit(tmp_path):
    """The class used on the GPU (bnb Linear4bit base) gives peft's loss and gradients (bnb runs on CPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_llama().save_pretrained(tmp_path / "m")
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=q, dtype=torch.bfloat16,
                                                    device_map={"": "cpu"})

    ids = torch.randint(0, 300, (2, 12))
    ref, fused = _tiny_peft(False, model=load(), bits=4), _tiny_peft(True, model=load(), bits=4)
    assert type(fused.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "FusedLoraLinear4bit"
    _assert_same_math(ref, fused, ids, loss_rtol=2e-3)


def _base_linear(bits):
    """A frozen 64 -> 96 base layer computing in bf16: torch's, or bitsandbytes' NF4 one."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=bits is None, dtype=torch.bfloat16).requires_grad_(False)
    if bits is None:
        return lin
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    return q.to("cpu")


def _lora_pass(fn, x, a, b, g, seed):
    """fn(x, a, b)'s output and the gradients of x, a and b for output gradient g, dropout drawn from `seed`."""
    xs, as_, bs = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    torch.manual_seed(seed)
    out = fn(xs, as_, bs)
    out.backward(g)
    return out.detach(), xs.grad, as_.grad, bs.grad


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_linear_is_the_base_layer_then_the_lora_delta(bits, p):
    """One autograd function for base + LoRA (the LoRA input gradient added into the base one in place) gives
    what the base layer followed by lora_delta gives, for a 16-bit and a 4-bit base, with and without dropout."""
    base = _base_linear(bits)
    torch.manual_seed(1)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    a, b = torch.randn(8, 64) * 0.1, torch.randn(96, 8) * 0.1  # LoRA weights in fp32, as peft keeps them
    g = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    assert fused_lora.linear_dtype(base, x) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _lora_pass(lambda xs, as_, bs: fused_lora.lora_delta(base(xs), xs, as_, bs, p, 2.0, True), x, a, b, g, 7)
        got = _lora_pass(lambda xs, as_, bs: fused_lora.lora_linear(base, xs, as_, bs, p, 2.0, True), x, a, b, g, 7)
    for w, o in zip(want, got):
        assert w.dtype == o.dtype and w.shape == o.shape
        assert torch.allclose(w.float(), o.float(), rtol=1e-2, atol=1e-2)
    if p > 0:  # the two agree because they drew the same mask, not because none was drawn
        plain = _lora_pass(lambda xs, as_, bs: fused_lora.lora_linear(base, xs, as_, bs, 0.0, 2.0, True), x, a, b, g, 7)
        assert not torch.allclose(plain[2], got[2])


def test_linear_dtype_leaves_what_it_cannot_compute_to_the_base_layer():
    x16 = torch.randn(2, 64, dtype=torch.bfloat16)
    assert fused_lora.linear_dtype(_base_linear(None), x16) == torch.bfloat16
    assert fused_lora.linear_dtype(_base_linear(None), x16.float()) is None  # fp32 input to a bf16 layer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_lora.linear_dtype(_base_linear(None), x16) == torch.bfloat16
        assert fused_lora.linear_dtype(torch.nn.Linear(64, 96).requires_grad_(False), x16.float()) is None
    assert fused_lora.linear_dtype(torch.nn.Linear(64, 96), x16.float()) is None  # a base weight that trains
    assert fused_lora.linear_dtype(_base_linear(4), x16) == torch.bfloat16
    assert fused_lora.linear_dtype(_base_linear(4), x16.float()) is None  # bnb would cast it to bf16 and back


def test_fused_lora_dropout_trains_and_saves_plain_adapter(tmp_path):
    ids = torch.randint(0, 300, (2, 12))
    pm = _tiny_peft(True, p=0.3)
    loss, g = _grads(pm, ids)
    assert all(torch.isfinite(v).all() for v in g.values()) and any(v.abs().sum() > 0 for v in g.values())
    pm.save_pretrained(tmp_path / "ad")
    from peft import PeftModel

    again = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "ad")  # a plain peft adapter
    assert type(again.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_fused_lora_generates_like_peft():
    ref, fused = _tiny_peft(False), _tiny_peft(True)
    ids = torch.randint(0, 300, (1, 6))
    with torch.no_grad():
        a = ref.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        b = fused.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_padding_free_loss_equals_padded_loss(attn):
    """TRL's padding-free collator + position_ids keeps rows apart (transformers builds a per-row mask): same
    loss as padded batches, with sdpa (lorakit's default) and flex attention (model.attn_implementation)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = _tiny_llama(2).eval()
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in (5, 11, 8)]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert flat["input_ids"].shape == (1, 24) and "attention_mask" not in flat
    with torch.no_grad():  # use_cache=False as in training (TRL's compute_loss): a cache turns off the
        # packed-sequence detection of transformers' masks
        lp = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                   labels=padded["labels"], use_cache=False).loss
        lf = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"],
                   use_cache=False).loss
        crossed = model(input_ids=flat["input_ids"], labels=flat["labels"], use_cache=False).loss  # no boundaries
    assert abs(lp.item() - lf.item()) < 1e-5 * lp.item()
    assert abs(lp.item() - crossed.item()) > 1e-4 * lp.item()  # the check can tell


# ---- checkpointing ---------------------------------------------------------------------------------


def test_selective_checkpointing_sets_first_k_layers():
    pm = _tiny_peft(True)
    assert checkpointing.set_checkpointing(pm, 2) == 2
    flags = [layer.gradient_checkpointing for layer in checkpointing.decoder_layers(pm.get_base_model())]
    assert flags == [True, True, False]
    assert checkpointing.set_checkpointing(pm, None) == 3
    assert checkpointing.set_checkpointing(pm, 0) == 0


def test_partial_checkpointing_keeps_gradients():
    ids = torch.randint(0, 300, (2, 12))
    ref, part = _tiny_peft(True), _tiny_peft(True)
    assert checkpointing.apply_to_model(part, speed.Plan(**{"gradient_checkpointing": True, "checkpoint_layers": 2})) == \
        {"checkpoint_layers": 2}
    l0, g0 = _grads(ref, ids)
    l1, g1 = _grads(part, ids)
    assert l0 == pytest.approx(l1, rel=1e-6)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-3, atol=1e-6), n


def test_apply_to_model_rejects_more_layers_than_the_model_has():
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError, match="3 decoder layers; got 5") as e:
        checkpointing.apply_to_model(_tiny_peft(False), speed.Plan(**{"gradient_checkpointing": True, "checkpoint_layers": 5}))
    assert e.value.field == "train.gradient_checkpointing"


@pytest.mark.parametrize("budget,expect", [(10, 32), (12, 32 - 4), (100, 0), (13.9, 32 - 7)])
def test_checkpoint_layers_for_budget(budget, expect):
    assert planning.checkpoint_layers_for_budget(32, 10 * GIB, GIB // 2, int(budget * GIB)) == expect


# ---- the plan ----------------------------------------------------------------------------------------


def test_plan_on_cpu_keeps_todays_behaviour():
    p = speed.plan(recipe(), "cpu")
    assert p.liger is False and p.fused_lora is False and p.padding_free is False
    assert p.gradient_checkpointing is False and p.checkpoint_layers == 0 and p.frozen_dtype is None


def test_plan_on_cuda_defaults_to_the_fast_path_at_baseline_memory(bf16_gpu):
    p = speed.plan(recipe(), "cuda")
    assert p.fused_lora is True and p.padding_free is True and p.frozen_dtype == "bf16"
    assert p.gradient_checkpointing is True and p.checkpoint_layers is None  # every layer, no budget
    assert (p).trainer_checkpointing
    # LoRA dropout in Triton kernels: with the fused layer, dropout > 0, 16-bit compute and a rank they cover
    assert p.dropout_kernel is True and speed.plan(recipe(), "cpu").dropout_kernel is False
    for lora in ({"dropout": 0.0}, {"r": 128}, {"dora": True}):
        assert speed.plan(recipe(lora=lora), "cuda").dropout_kernel is False, lora
    assert speed.plan(recipe(train={"precision": "fp32"}, quantization={"compute_dtype": "fp32"}),
                      "cuda").dropout_kernel is False
    # the levers follow the recipe
    assert speed.plan(recipe(lora={"dora": True}), "cuda").fused_lora is False
    assert speed.plan(recipe(quantization={"bits": 8}), "cuda").fused_lora is False
    assert speed.plan(recipe(quantization={"bits": 8}), "cuda").frozen_dtype is None
    assert speed.plan(recipe(quantization={"compute_dtype": "fp16"}, train={"precision": "fp16"}),
                      "cuda").frozen_dtype is None
    assert speed.plan(recipe(data={"path": "d", "packing": True}), "cuda").padding_free is False
    assert speed.plan(recipe(train={"batch_size": 1}), "cuda").padding_free is False
    off = speed.plan(recipe(train={"fused_lora": False, "gradient_checkpointing": False},
                            data={"path": "d", "padding_free": False}), "cuda")
    assert (off.fused_lora, off.padding_free, off.gradient_checkpointing) == (False, False, False)
    k = speed.plan(recipe(train={"gradient_checkpointing": 8}), "cuda")
    assert k.checkpoint_layers == 8 and not (k).trainer_checkpointing


EST = {"peak_bytes_checkpointed": 10 * GIB, "peak_bytes_uncheckpointed": 10 * GIB + 32 * 0.7 * GIB,
       "model": {"num_layers": 32}}


@pytest.mark.parametrize("budget_gb,layers", [(40, 0), (28, None), (12, None), (8, None)])
def test_budget_mode_picks_the_fastest_setting_that_fits(bf16_gpu, budget_gb, layers):
    """No checkpointing when its estimated peak fits; a partial fit falls back to every layer (measured: no
    faster, bench/train.md)."""
    p = speed.plan(recipe(train={"memory_budget_gb": budget_gb}), "cuda", EST)
    assert p.checkpoint_layers == layers and p.gradient_checkpointing is (layers is None)
    assert p.memory_budget_bytes == budget_gb * GIB
    assert p.estimated_peak_bytes == {"all_layers": 10 * GIB, "no_layers": int(10 * GIB + 32 * 0.7 * GIB)}
    assert p.checkpointing_reason.startswith("budget:")


def test_budget_mode_without_an_estimate_checkpoints_every_layer(bf16_gpu):
    p = speed.plan(recipe(train={"memory_budget_gb": 80}), "cuda", {"error": "memory estimate failed (x)"})
    assert p.checkpoint_layers is None and "memory estimate failed" in p.checkpointing_reason
    # an explicit setting wins over the budget
    assert speed.plan(recipe(train={"memory_budget_gb": 80, "gradient_checkpointing": True}), "cuda",
                      EST).checkpoint_layers is None


def test_plan_for_run_uses_the_estimate(bf16_gpu):
    """The estimate (config only, offline) gives the peaks: 40 GiB fits the 8B shape without checkpointing
    at 2x2048 tokens, 16 GiB does not."""
    from lorakit.estimate.memory import estimate

    est = estimate(recipe(train={"cuda_graphs": False}), device="cuda")
    assert est["tokens_per_micro_batch"] == 4096
    # the breakdown is the run's (every layer checkpointed, here without CUDA graphs); measured 7.7 GiB reserved
    # (bench/estimate.md)
    assert 7 * GIB < est["peak_bytes_checkpointed"] == est["memory"]["peak_bytes"] < 10 * GIB
    assert est["peak_bytes_uncheckpointed"] > est["peak_bytes_checkpointed"]
    from lorakit.estimate.memory import run_plan

    assert run_plan(recipe(train={"memory_budget_gb": 40}), "cuda").checkpoint_layers == 0
    assert run_plan(recipe(train={"memory_budget_gb": 16}), "cuda").checkpoint_layers is None
    assert run_plan(recipe(), "cpu").checkpoint_layers == 0


def test_sft_kwargs_padding_free_drops_max_length():
    assert planning.sft_config_kwargs(speed.Plan(**{"padding_free": True})) == {"padding_free": True, "max_length": None}
    assert planning.sft_config_kwargs(speed.Plan(**{"padding_free": False})) == {"padding_free": False}


def test_describe_levers():
    line = speed.describe(speed.Plan(**{"liger": True, "fused_lora": True, "dropout_kernel": True, "padding_free": False,
                                  "frozen_dtype": "bf16", "gradient_checkpointing": True, "checkpoint_layers": None,
                                  "checkpointing_reason": "auto"}))
    assert line == ("speed: liger, fused LoRA, LoRA dropout kernel, frozen weights bf16; "
                    "gradient checkpointing every layer (auto)")


# ---- train.py maps the plan onto the trainer ------------------------------------------------------------


def test_run_options_and_plan_cpu_vs_cuda(bf16_gpu):
    from lorakit.train.args import run_options

    assert run_options(recipe(), "cpu") == {"precision": "fp32", "optimizer": "adamw_torch"}
    cpu = speed.plan(recipe(), "cpu")
    assert not cpu.gradient_checkpointing and not cpu.liger and not cpu.fused_lora and not cpu.padding_free
    assert run_options(recipe(), "cuda") == {"precision": "bf16", "optimizer": "paged_adamw_8bit"}
    gpu = speed.plan(recipe(), "cuda")
    assert gpu.gradient_checkpointing and gpu.fused_lora and gpu.padding_free and gpu.checkpoint_layers is None
    json.dumps(gpu.as_dict())  # goes into summary.json


@pytest.mark.parametrize("gc,trainer_flag", [("auto", True), (True, True), (False, False), (4, False)])
def test_training_args_name_the_checkpointing_field_this_transformers_has(bf16_gpu, tmp_path, gc, trainer_flag):
    import dataclasses

    from transformers import TrainingArguments

    from lorakit.train.args import run_options, training_args
    from lorakit.train.run_dir import RunDir

    r = recipe(train={"gradient_checkpointing": gc, "cuda_graphs": False})  # graphs: the model checkpoints itself
    args = training_args(r, RunDir(tmp_path / "r"), "cuda", speed.plan(r, "cuda"), run_options(r, "cuda"),
                         has_eval=False)
    flag, kwargs = checkpointing.checkpointing_arg_names()
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert flag in fields and kwargs in fields
    assert args[flag] is trainer_flag
    assert (args[kwargs] == {"use_reentrant": False}) is trainer_flag
    assert not ({"activation_checkpointing", "gradient_checkpointing"} - {flag}) & set(args)


def test_sft_config_padding_free_on_cpu_when_asked(tmp_path):
    from lorakit.train.args import run_options, sft_config, training_args
    from lorakit.train.run_dir import RunDir

    def config(r):
        plan = speed.plan(r, "cpu")
        common = training_args(r, RunDir(tmp_path / "r"), "cpu", plan, run_options(r, "cpu"), has_eval=False)
        return sft_config(r, common, ["input_ids"], plan)

    cfg = config(recipe(quantization={"bits": "none"}, data={"path": "d", "padding_free": True, "max_length": 64}))
    assert cfg.padding_free is True and cfg.max_length is None
    cfg = config(recipe(quantization={"bits": "none"}, data={"path": "d", "max_length": 64}))
    assert cfg.padding_free is False and cfg.max_length == 64 and cfg.gradient_checkpointing is False


# ---- end to end on CPU: every lever switched on by the recipe ---------------------------------------------


def test_run_training_with_every_lever_on(tmp_path, monkeypatch, tiny_model_dir):
    import yaml
    from helpers import write_jsonl

    from lorakit.recipe.loader import load_recipe
    from lorakit.train.run import run_training

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * (1 + i % 3)}
                                           for i in range(8)])
    doc = {"name": "levers", "base_model": str(tiny_model_dir), "quantization": {"bits": "none"},
           "lora": {"r": 4, "dropout": 0.1},
           "data": {"path": "train.jsonl", "max_length": 24, "padding_free": True},
           "train": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "fused_lora": True,
                     "gradient_checkpointing": 1},
           "output": {"dir": "runs/levers"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    summary = run_training(load_recipe(tmp_path / "r.yaml"))
    opts = summary["options"]
    assert opts["fused_lora"] and opts["padding_free"] and opts["checkpoint_layers"] == 1
    assert summary["steps"] == 2 and summary["loss"]["first"] > 0
    assert summary["tokens"] > 0
    cfg = json.loads((tmp_path / "runs/levers/adapter/adapter_config.json").read_text())  # a plain peft adapter
    assert cfg["r"] == 4 and {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("Fused" in json.dumps(v) for v in cfg.values())


def test_padding_waste_and_the_auto_rule():
    from lorakit.speed.padding import PADDING_FREE_MIN_WASTE, padding_free_worth_it, padding_waste

    assert padding_waste([2048] * 16, 2) == 0.0
    assert not padding_free_worth_it([2048] * 16, 2)
    # one long row per batch of four short ones: most of each padded batch is padding
    assert padding_waste([100, 100, 100, 1000] * 8, 4, seed=0) > 0.3
    varied = [int(300 * 1.5 ** (i % 7)) for i in range(64)]
    assert padding_free_worth_it(varied, 8) and padding_waste(varied, 8) >= PADDING_FREE_MIN_WASTE
    assert padding_waste(varied, 1) == 0.0  # one row a batch never pads


def test_auto_padding_free_is_settled_by_the_data(tmp_path, bf16_gpu):
    import yaml

    from lorakit.recipe.loader import load_recipe
    from lorakit.train.run import _settled

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"base_model": "smollm2-135m-instruct", "data": {"path": "x.jsonl"},
                                 "train": {"batch_size": 4, "cuda_graphs": False}}))
    recipe = load_recipe(p)
    same = speed.plan(recipe, "cuda", lengths=[64] * 32)
    assert same.padding_free is False and any("padding-free off" in n for n in same.notes)
    assert same.attn_implementation == "sdpa"  # auto attention follows: no per-row mask to skip
    settled = _settled(recipe, same)
    assert settled.data.padding_free is False
    assert settled._source == recipe._source  # still knows its file (errors, resume hints)
    kept = speed.plan(recipe, "cuda", lengths=[8, 64] * 16)
    assert kept.padding_free is True and kept.attn_implementation == "varlen" and not kept.notes
    assert _settled(recipe, kept).data.padding_free == "auto"


def test_the_auto_levers_settle_on_the_tokenized_rows_lengths():
    from types import SimpleNamespace

    from datasets import Dataset

    from lorakit.train.run import _row_lengths

    rows = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]], "labels": [[1, 2, 3], [4], [5, 6]]})
    assert _row_lengths(SimpleNamespace(train=rows)) == [3, 1, 2]
    assert _row_lengths(SimpleNamespace(train=Dataset.from_dict({"messages": [[], []]}))) == []  # not tokenized


def test_auto_attention_is_varlen_for_padding_free_batches_on_cuda(bf16_gpu):
    assert speed.plan(recipe(), "cuda").attn_implementation == "varlen"
    assert speed.plan(recipe(), "cpu").attn_implementation == "sdpa"
    assert speed.plan(recipe(train={"batch_size": 1}), "cuda").attn_implementation == "sdpa"  # no padding-free
    assert speed.plan(recipe(data={"path": "d", "padding_free": False}), "cuda").attn_implementation == "sdpa"
    for chosen in ("sdpa", "eager"):  # the recipe's own choice is kept
        assert speed.plan(recipe(model={"attn_implementation": chosen}), "cuda").attn_implementation == chosen
    assert "varlen attention" in speed.describe(speed.plan(recipe(), "cuda"))
    grpo = recipe(method="grpo", grpo={"rewards": [{"fn": "exact_answer"}]}, data={"path": "d", "padding_free": True})
    assert speed.plan(grpo, "cuda").attn_implementation == "sdpa"  # GRPO does not flatten its batches


def test_auto_flex_falls_back_to_sdpa_for_a_class_without_it(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    from lorakit.model.load import attn_implementation

    llama, gpt2 = tmp_path / "llama", tmp_path / "gpt2"
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(llama)
    GPT2Config(n_layer=1).save_pretrained(gpt2)
    flex = speed.Plan(attn_implementation="flex_attention")
    assert attn_implementation(recipe(), llama, flex) == "flex_attention"
    assert attn_implementation(recipe(), gpt2, flex) == "sdpa"  # GPT-2 has no flex attention in transformers
    assert attn_implementation(recipe(), tmp_path / "missing", flex) == "sdpa"
    assert attn_implementation(recipe(model={"trust_remote_code": True}), llama, flex) == "sdpa"  # remote class
    asked = recipe(model={"attn_implementation": "flex_attention"})  # asked for: kept (the load says if it fails)
    assert attn_implementation(asked, gpt2, flex) == "flex_attention"
    assert attn_implementation(recipe(), llama, None) == "sdpa"


# ---- CUDA graphs (lorakit.speed.layer_graphs) ----------------------------------------------------------------


EST_GRAPHS = {**EST, "peak_bytes_checkpointed_graphs": 11 * GIB}
FIXED = {"path": "d.jsonl", "max_length": 2048, "padding_free": False}


def test_cuda_graphs_only_where_a_memory_budget_leaves_room_for_them(bf16_gpu):
    """The graphs keep a layer's working set in their own pool (more than the plain stack's peak): `auto`
    turns them on only in budget mode, when every layer stays checkpointed and their estimated peak fits."""
    assert speed.plan(recipe(data=FIXED), "cuda").cuda_graphs is False  # no budget: the plain stack's memory
    p = speed.plan(recipe(data=FIXED, train={"memory_budget_gb": 12}), "cuda", EST_GRAPHS)
    assert p.cuda_graphs is True and p.checkpoint_layers is None and not (p).trainer_checkpointing
    assert "CUDA graphs fit too (11.0 GiB)" in p.checkpointing_reason
    assert "CUDA graphs per layer" in speed.describe(p)
    assert speed.plan(recipe(data=FIXED, train={"memory_budget_gb": 10.5}), "cuda",
                      EST_GRAPHS).cuda_graphs is False  # checkpointing fits, the graphs do not
    for off in (recipe(train={"memory_budget_gb": 12}), recipe(data=FIXED, train={"memory_budget_gb": 12,
                                                                                  "cuda_graphs": False})):
        assert "CUDA graphs" not in speed.plan(off, "cuda", EST_GRAPHS).checkpointing_reason  # only when on
    assert speed.plan(recipe(data=FIXED, train={"memory_budget_gb": 40}), "cuda",
                      EST_GRAPHS).cuda_graphs is False  # no checkpointing at all is faster: nothing to replay
    budget = {"memory_budget_gb": 12}
    for other in (recipe(train=budget), recipe(data=FIXED, train=budget, lora={"r": 128}),  # padding-free;
                  recipe(data=FIXED, train={**budget, "fused_lora": False})):  # torch's dropout; no fused layer
        assert speed.plan(other, "cuda", EST_GRAPHS).cuda_graphs is False
    assert speed.plan(recipe(data=FIXED, train=budget, lora={"r": 128, "dropout": 0.0}), "cuda",
                      EST_GRAPHS).cuda_graphs is True  # no dropout: nothing to redraw
    assert speed.plan(recipe(data=FIXED, train=budget), "cpu", EST_GRAPHS).cuda_graphs is False
    # asked for: on wherever they hold, budget or not
    forced = speed.plan(recipe(data=FIXED, train={"cuda_graphs": True}), "cuda")
    assert forced.cuda_graphs is True and not (forced).trainer_checkpointing
    cpu = speed.plan(recipe(train={"cuda_graphs": True}), "cpu")
    assert cpu.cuda_graphs is False and "cuda_graphs: true does not hold here" in cpu.checkpointing_reason
    assert "does not hold" in speed.describe(speed.plan(recipe(data=FIXED, lora={"r": 128},
                                                                      train={"cuda_graphs": True}), "cuda"))


def test_auto_cuda_graphs_are_settled_by_the_data(bf16_gpu, tmp_path):
    """Rows of one length make batches of one shape; rows of many lengths would need a graph per shape."""
    import yaml

    from lorakit.recipe.loader import load_recipe
    from lorakit.train.run import _settled

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"base_model": "llama-3.1-8b", "data": FIXED,
                                 "train": {"batch_size": 2, "memory_budget_gb": 12}}))
    r = load_recipe(p)
    assert speed.plan(r, "cuda", EST_GRAPHS).cuda_graphs is True
    one = speed.plan(r, "cuda", EST_GRAPHS, lengths=[64] * 8)
    many = speed.plan(r, "cuda", EST_GRAPHS, lengths=[64, 60] * 4)
    assert one.cuda_graphs and not many.cuda_graphs
    # only a changed choice is written into the resolved recipe
    assert _settled(r, one).train.cuda_graphs == "auto" and _settled(r, many).train.cuda_graphs is False
    assert _settled(r, many)._source == r._source
    # no checkpointing of the Trainer's own under graphs
    assert not one.trainer_checkpointing and many.trainer_checkpointing


@pytest.mark.parametrize("train,extra,needle", [
    ({"fused_lora": False}, {}, "fused LoRA layer (train.fused_lora is false)"),
    ({"gradient_checkpointing": False}, {}, "checkpointed layers"),
    ({"gradient_checkpointing": 0}, {}, "checkpointed layers"),
    ({}, {"lora": {"dora": True}}, "does not implement DoRA"),
    ({"torch_compile": True}, {}, "not with train.torch_compile"),
])
def test_cuda_graphs_true_where_they_cannot_replay_is_a_recipe_error(tmp_path, train, extra, needle):
    import yaml

    from lorakit.errors import RecipeError
    from lorakit.recipe.loader import load_recipe

    doc = {"base_model": "llama-3.1-8b", "data": {"path": "d"}, "train": {"cuda_graphs": True, **train}, **extra}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    (problem,) = [q for q in e.value.problems if q.field == "train.cuda_graphs"]
    assert needle in problem.message and problem.line is not None


def test_estimate_counts_the_graphs_pool(bf16_gpu):
    """Measured on the H200 (bench/train.md, 8B, 2x2048, checkpoints on the GPU): 8.12 GiB allocated with graphs
    against 7.24 without; the estimate adds a layer's working set and four hidden-state buffers."""
    from lorakit.estimate.memory import estimate

    on_gpu = {"offload_activations": False}
    plain = estimate(recipe(data=FIXED, train={"cuda_graphs": False, **on_gpu}), device="cuda")
    graphs = estimate(recipe(data=FIXED, train={"cuda_graphs": True, "offload_embeddings": False, **on_gpu}),
                      device="cuda")
    assert plain["setup"]["cuda_graphs"] is False and graphs["setup"]["cuda_graphs"] is True
    assert plain["memory"]["cuda_graphs_bytes"] == 0
    extra = graphs["memory"]["allocated_peak_bytes"] - plain["memory"]["allocated_peak_bytes"]
    assert 0.3 * GIB < extra < 1.2 * GIB and graphs["memory"]["cuda_graphs_bytes"] > extra
    assert graphs["peak_bytes_checkpointed_graphs"] == plain["peak_bytes_checkpointed_graphs"]
    assert graphs["memory"]["allocated_peak_bytes"] == pytest.approx(8.12 * GIB, rel=0.1)
    # reserved, with the embeddings in host memory as auto does: 7.97 GiB measured (eleventh session, expandable
    # segments; bench/train_keep_weights.md call 7). The estimate stays above it: it still counts the regular pool
    # caching the eager warm-up steps' working set beside the graphs'
    default = estimate(recipe(data=FIXED, train={"cuda_graphs": True, "offload_embeddings": True, **on_gpu}),
                       device="cuda")
    assert 7.97 * GIB <= default["memory"]["reserved_peak_bytes"] <= 1.1 * 7.97 * GIB


# ---- input embeddings in host memory (lorakit.speed.host_embedding): what pays for the graphs' pool --------------

EST_OFFLOAD = {**EST, "allocated_bytes_checkpointed": int(7.7 * GIB),
               "allocated_bytes_graphs_offloaded": int(7.3 * GIB)}


def test_graphs_without_a_budget_where_host_embeddings_pay_for_their_pool(bf16_gpu):
    """No budget: graphs (and the embeddings in host memory) when, with the table off the GPU, the graphs'
    estimated peak allocated memory is within the run's without graphs; never otherwise."""
    p = speed.plan(recipe(data=FIXED), "cuda", EST_OFFLOAD)
    assert p.cuda_graphs is True and p.offload_embeddings is True and not (p).trainer_checkpointing
    assert "paid for by the input embeddings in host memory (estimated peak allocated 7.3 GiB, without " \
           "graphs 7.7 GiB)" in p.checkpointing_reason
    assert "input embeddings in host memory" in speed.describe(p)
    over = {**EST_OFFLOAD, "allocated_bytes_graphs_offloaded": int(7.8 * GIB)}
    tied = {**EST_OFFLOAD, "allocated_bytes_graphs_offloaded": None}
    for r, est in ((recipe(data=FIXED), over), (recipe(data=FIXED), tied),
                   (recipe(data=FIXED, train={"offload_embeddings": False}), EST_OFFLOAD),
                   (recipe(train={}), EST_OFFLOAD),  # padding-free batches: no graphs, so the table stays
                   (recipe(data=FIXED, method="grpo", grpo={"rewards": [{"fn": "length"}]}), EST_OFFLOAD)):
        q = speed.plan(r, "cuda", est)
        assert q.cuda_graphs is False and q.offload_embeddings is False
    forced = speed.plan(recipe(data=FIXED, train={"cuda_graphs": True}), "cuda", EST_OFFLOAD)
    assert forced.cuda_graphs is True and forced.offload_embeddings is False  # asked for; memory is theirs
    asked = speed.plan(recipe(train={"offload_embeddings": True}), "cuda", EST_OFFLOAD)
    assert asked.offload_embeddings is True and asked.offload_embeddings_required is True
    budget = speed.plan(recipe(data=FIXED, train={"memory_budget_gb": 12}), "cuda", {**EST_GRAPHS, **EST_OFFLOAD})
    assert budget.cuda_graphs is True and budget.offload_embeddings is False  # the budget holds them


def test_estimate_plans_graphs_and_host_embeddings_for_the_8b_shape(bf16_gpu):
    """Llama-3.1-8B at 2 x 2048 (untied 1 GiB table): the default plans graphs with the table in host memory,
    and the estimate's weights drop by the table; Llama-3.2-1B ties its embeddings: neither."""
    from lorakit.estimate.memory import estimate

    auto = estimate(recipe(data=FIXED), device="cuda")
    eager = estimate(recipe(data=FIXED, train={"cuda_graphs": False}), device="cuda")
    assert auto["setup"]["cuda_graphs"] is True and auto["setup"]["offload_embeddings"] is True
    assert eager["memory"]["weights_bytes"] - auto["memory"]["weights_bytes"] == 128256 * 4096 * 2
    assert auto["memory"]["allocated_peak_bytes"] <= eager["memory"]["allocated_peak_bytes"]
    assert auto["allocated_bytes_graphs_offloaded"] == auto["memory"]["allocated_peak_bytes"]
    small = estimate(recipe(base_model="meta-llama/Llama-3.2-1B", data=FIXED), device="cuda")
    assert small["setup"]["cuda_graphs"] is False and small["setup"]["offload_embeddings"] is False
    assert small["allocated_bytes_graphs_offloaded"] is None


def test_host_embedding_gives_the_same_logits_and_frees_the_table():
    from lorakit.speed import host_embedding

    model = _tiny_llama()
    ids = torch.randint(0, 300, (2, 11))
    ids[0, 0] = 0
    want = model(input_ids=ids).logits
    pm = _tiny_peft(True, model=model)
    assert host_embedding.problem(pm) is None
    table = pm.get_input_embeddings().weight
    assert host_embedding.offload(pm) == table.numel() * table.element_size()
    emb = pm.get_input_embeddings()
    assert isinstance(emb, host_embedding.HostEmbedding) and emb.weight.device.type == "cpu"
    assert not emb.weight.requires_grad and "in host memory" in repr(emb)
    assert all(p is not emb.weight for p in pm.parameters())  # not a parameter: moving the model leaves it
    pm.to(torch.float64).to(torch.float32)
    assert emb.weight.device.type == "cpu" and emb.weight.dtype == torch.float32
    with torch.no_grad(), pm.disable_adapter():
        assert torch.equal(pm(input_ids=ids).logits, want)
    pm(input_ids=ids, labels=ids).loss.backward()  # trains through it: LoRA gets gradients, the table none
    assert emb.weight.grad is None
    assert all(p.grad is not None for n, p in pm.named_parameters() if "lora_A" in n)


def test_modeling_modules_are_restored_after_a_library_patches_them():
    """What keeps the test above on plain Llama modules on a GPU machine, after an earlier test's run had TRL apply
    Liger to the whole process (conftest's autouse fixture)."""
    from helpers import modeling_modules_restored
    from transformers.models.llama import modeling_llama

    norm, rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    with modeling_modules_restored():
        modeling_llama.LlamaRMSNorm = torch.nn.Identity  # in kind what apply_liger_kernel_to_llama does
        modeling_llama.apply_rotary_pos_emb = None
        assert type(_tiny_llama().model.norm) is torch.nn.Identity
    assert modeling_llama.LlamaRMSNorm is norm and modeling_llama.apply_rotary_pos_emb is rope
    assert type(_tiny_llama().model.norm) is norm


@pytest.mark.gpu
def test_host_embedding_kernel_reads_pinned_rows_without_a_sync():
    """On CUDA the rows come from the pinned table through the Triton kernel: the same rows as torch's embedding,
    and no host synchronization (torch's sync debug mode raises on one)."""
    from lorakit.speed.host_embedding import HostEmbedding

    emb = torch.nn.Embedding(1000, 96, dtype=torch.bfloat16)  # 96: a width that is not a power of two
    host = HostEmbedding(emb, "cuda")
    assert host.reads_host and host.table.is_pinned() and "read by a GPU kernel" in repr(host)
    ids = torch.randint(0, 1000, (3, 257), device="cuda")
    ids[0, 0], ids[1, 1] = 0, 999
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = host(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.device.type == "cuda" and got.shape == (3, 257, 96)
    assert torch.equal(got.cpu(), torch.nn.functional.embedding(ids.cpu(), emb.weight.detach()))
    assert host(ids[:0]).shape == (0, 257, 96)


def test_host_embedding_on_the_cpu_path_keeps_an_unpinned_table():
    from lorakit.speed.host_embedding import HostEmbedding

    emb = torch.nn.Embedding(50, 8)
    host = HostEmbedding(emb, "cpu")
    assert not host.reads_host and "copied" in repr(host)
    ids = torch.tensor([[1, 49, 0]])
    assert torch.equal(host(ids), emb(ids))


def test_host_embedding_refuses_tied_trained_and_scaled_tables():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.speed import host_embedding

    tied = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                        tie_word_embeddings=True))
    assert "tied" in host_embedding.problem(tied)
    trained = _tiny_llama(1)
    trained.get_input_embeddings().weight.requires_grad_(True)
    assert "trained" in host_embedding.problem(trained)

    class Scaled(torch.nn.Embedding):
        pass

    scaled = _tiny_llama(1)
    scaled.set_input_embeddings(Scaled(300, 64))
    assert "Scaled, not a plain torch Embedding" in host_embedding.problem(scaled)


def test_apply_to_model_drops_auto_graphs_when_the_table_must_stay_and_refuses_an_asked_offload():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.errors import LorakitError
    from lorakit.speed import layer_graphs
    from lorakit.speed.layer_graphs import EagerRecorder

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    p = speed.Plan(gradient_checkpointing=True, checkpoint_layers=None, cuda_graphs=True, offload_embeddings=True,
                   offload_embeddings_required=False)
    pm = _tiny_peft(True, model=LlamaForCausalLM(cfg))
    done = checkpointing.apply_to_model(pm, p, EagerRecorder())
    assert "tied" in done["not_offloaded"]  # the plan stays as decided; what the load did is reported
    # the Trainer was told the model checkpoints (graphs planned): every layer is checkpointed there, eagerly
    assert done["checkpoint_layers"] == 2 and layer_graphs.find(pm) is None
    assert all(layer.gradient_checkpointing for layer in checkpointing.decoder_layers(pm.get_base_model()))
    with pytest.raises(LorakitError) as e:
        checkpointing.apply_to_model(_tiny_peft(True, model=LlamaForCausalLM(cfg)),
                                     dataclasses.replace(p, offload_embeddings_required=True), EagerRecorder())
    assert e.value.field == "train.offload_embeddings" and "tied" in e.value.message


def test_data_of_one_length_settles_graphs_and_host_embeddings_on(bf16_gpu, tmp_path):
    """Padding-free is planned for batches of several rows and settled off on rows of one length: then the
    batches have one shape, and the graphs (with the table in host memory) are settled on, said in the reason."""
    import yaml

    from lorakit.recipe.loader import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"base_model": "llama-3.1-8b", "data": {"path": "d.jsonl", "max_length": 2048},
                                 "train": {"batch_size": 2}}))
    r = load_recipe(p)
    planned = speed.plan(r, "cuda", EST_OFFLOAD)
    assert planned.padding_free is True and planned.cuda_graphs is False and planned.offload_embeddings is False
    levers = speed.plan(r, "cuda", EST_OFFLOAD, lengths=[2048] * 8)
    assert levers.padding_free is False and levers.cuda_graphs is True and levers.offload_embeddings is True
    assert "paid for by the input embeddings in host memory" in speed.describe(levers)


def test_generation_graphs_for_grpo_on_cuda_unless_fsdp(bf16_gpu):
    def grpo(**g):
        return recipe(method="grpo", grpo={"rewards": [{"fn": "exact_answer"}], **g})

    assert speed.plan(grpo(), "cuda").generation_graphs
    assert "CUDA graphs" in speed.describe(speed.plan(grpo(), "cuda"))
    assert not speed.plan(grpo(), "cpu").generation_graphs
    assert not speed.plan(grpo(generation_graphs=False), "cuda").generation_graphs
    assert speed.plan(grpo(generation_graphs=True), "cpu").generation_graphs  # the static-cache loop, no graphs
    assert not speed.plan(recipe(method="grpo", grpo={"rewards": [{"fn": "exact_answer"}]},
                                 distributed={"strategy": "fsdp"}), "cuda").generation_graphs
    assert not speed.plan(recipe(), "cuda").generation_graphs  # SFT generates nothing
