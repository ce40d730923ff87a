"""A run that learns nothing fails (issue 24): lorakit.train.learning_guard's checks on a tiny model, and the CPU
4-bit + eval run that used to train nothing (lorakit.model.bnb_cpu)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from test_train import make_recipe

from lorakit.errors import EXIT_RUNTIME, LorakitError
from lorakit.train.run_dir import RunDir


def _fails(recipe) -> LorakitError:
    from lorakit.train.run import run_training

    with pytest.raises(LorakitError) as e:
        run_training(recipe)
    assert e.value.exit_code == EXIT_RUNTIME
    run = RunDir(recipe.output.dir)
    assert run.state == "failed" and not run.adapter_dir.exists() and not run.summary_file.exists()
    assert "a learning rate of 0" in e.value.hint and "every label masked" in e.value.hint
    assert "frozen adapter" in e.value.hint and "autograd" in e.value.hint
    return e.value


def test_learning_rate_zero_for_the_whole_run_fails(workdir, tiny_model_dir):
    recipe = make_recipe(workdir, tiny_model_dir, evaluate={"metrics": []})
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"lr": 0.0})})  # past validation
    e = _fails(recipe)
    assert e.message == "the run learned nothing: the learning rate was 0 at every one of the 3 step(s)"


def test_every_label_masked_fails_after_the_first_steps(workdir, tiny_model_dir, monkeypatch):
    """Rows whose only completion token is the first one: no position has a label once shifted (the data check
    drops such rows; here they get past it), so every gradient is zero."""
    from lorakit.data import prepare as data

    prepare = data.prepare_sft

    def masked(recipe, tok):
        p = prepare(recipe, tok)
        p.train = p.train.map(lambda r: {"completion_mask": [1] + [0] * (len(r["completion_mask"]) - 1)})
        return p

    monkeypatch.setattr(data, "prepare_sft", masked)
    recipe = make_recipe(workdir, tiny_model_dir, train={"max_steps": 8}, evaluate={"metrics": []})
    e = _fails(recipe)
    assert "every gradient of the adapter was zero (or missing) in the first 3 optimizer step(s)" in e.message
    assert RunDir(recipe.output.dir).read_state()["step"] == 3  # stopped there, not after 8


def test_frozen_adapter_fails_before_training(workdir, tiny_model_dir, monkeypatch):
    from lorakit.model import load as models

    attach = models.attach_adapter

    def frozen(*a, **k):
        model, info = attach(*a, **k)
        for p in model.parameters():
            p.requires_grad_(False)
        return model, info

    monkeypatch.setattr(models, "attach_adapter", frozen)
    e = _fails(make_recipe(workdir, tiny_model_dir, evaluate={"metrics": []}))
    assert "the adapter is frozen" in e.message


def test_gradient_cut_before_the_adapter_fails(workdir, tiny_model_dir, monkeypatch):
    """A layer whose output carries no gradient back (what a kernel without autograd does) between the loss and
    every adapter layer."""
    from lorakit.model import load as models

    attach = models.attach_adapter

    def cut(*a, **k):
        model, info = attach(*a, **k)
        for name, mod in model.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                mod.register_forward_hook(lambda m, i, o: o.detach().requires_grad_())
        return model, info

    monkeypatch.setattr(models, "attach_adapter", cut)
    e = _fails(make_recipe(workdir, tiny_model_dir, evaluate={"metrics": []}))
    assert "every gradient of the adapter was zero" in e.message


def _qlora_with_eval(workdir, tiny_model_dir):
    return make_recipe(workdir, tiny_model_dir, quantization={"bits": 4}, evaluate={"metrics": []},
                       train={"max_steps": 3, "warmup_ratio": 0.0})


def test_cpu_qlora_with_an_eval_set_trains(workdir, tiny_model_dir):
    """The eval pass before training used to turn bitsandbytes' 4-bit layers inference-only on CPUs with
    AVX512-BF16 (lorakit.model.bnb_cpu): every lora_B stayed 0 and the eval loss did not move."""
    from lorakit.train.run import run_training

    summary = run_training(_qlora_with_eval(workdir, tiny_model_dir))
    assert summary["options"]["bits"] == 4
    adapter = load_file(RunDir(summary["run_dir"]).adapter_dir / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())
    assert summary["eval_loss"]["after"] != summary["eval_loss"]["before"]


def test_cpu_qlora_repacking_is_what_the_guard_catches(workdir, tiny_model_dir, monkeypatch):
    """Without lorakit.model.bnb_cpu's switch (on a CPU whose bitsandbytes repacks 4-bit weights for inference) the
    run learns nothing, and the guard says so instead of writing a zero adapter."""
    from bitsandbytes.functional import has_avx512bf16

    from lorakit.model import load as models

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16")
    monkeypatch.setattr(models, "keep_4bit_layers_trainable", lambda model: 0)
    e = _fails(_qlora_with_eval(workdir, tiny_model_dir))
    assert "every gradient of the adapter was zero" in e.message


def test_run_that_learns_passes_the_guard_with_warmup(workdir, tiny_model_dir):
    """Warmup makes the first step's learning rate 0: no false alarm."""
    from lorakit.train.run import run_training

    summary = run_training(make_recipe(workdir, tiny_model_dir, train={"warmup_ratio": 0.5},
                                       evaluate={"metrics": []}))
    assert summary["state"] == "finished"
    assert json.loads((workdir / "runs" / "tiny" / "state.json").read_text())["state"] == "finished"
