"""GRPO through TRL on a tiny random model: config mapping, reward inputs, logged metrics, failures."""

from __future__ import annotations

import math
import re
import textwrap
from types import SimpleNamespace

import pytest
import yaml

from lorakit.errors import LorakitError
from lorakit.recipe.loader import load_recipe

RECORDER = textwrap.dedent("""
    CALLS = []

    def record(completions, prompts, completion_ids, answer, difficulty, **kwargs):
        CALLS.append({"n": len(completions), "prompts": list(prompts), "answer": list(answer),
                      "difficulty": list(difficulty), "ids": [len(i) for i in completion_ids],
                      "keys": sorted(kwargs), "kind": type(completions[0]).__name__})
        # varied rewards so the groups have a non-zero std (a real policy-gradient step)
        return [float(len(c[0]["content"]) % 3) for c in completions]

    def explode(completions, **kwargs):
        raise RuntimeError("reward service down")
""")


def write_recipe(tmp_path, model_dir, **grpo) -> object:
    (tmp_path / "my_rewards.py").write_text(RECORDER)
    section = {"rewards": [{"fn": "my_rewards.py:record", "weight": 1.0},
                           {"fn": "exact_answer", "weight": 0.5}],
               "num_generations": 2, "max_completion_length": 8, "max_prompt_length": 64}
    section.update(grpo)
    data = {"name": "tiny-grpo", "base_model": str(model_dir), "method": "grpo",
            "data": {"path": "unused.jsonl", "format": "prompt"},
            "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "seed": 0},
            "grpo": section}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe(path)


def rows(n=4):
    return [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1),
             "difficulty": f"d{i}"} for i in range(n)]


def training_args(tmp_path, **over):
    args = {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
            "learning_rate": 1e-3, "logging_steps": 1, "report_to": [], "bf16": False,
            "gradient_checkpointing": False, "save_strategy": "no", "seed": 0, "use_cpu": True, "disable_tqdm": True,
            "max_length": 128, "packing": False}  # SFT-only keys: dropped for GRPOConfig
    args.update(over)
    return args


@pytest.fixture
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model, tok


def prepared(n=4):
    from datasets import Dataset

    return SimpleNamespace(train=Dataset.from_list(rows(n)), eval=None)


class LogRecorder:
    def __new__(cls):
        from transformers import TrainerCallback

        class _Rec(TrainerCallback):
            def __init__(self):
                self.logs = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.logs.append(dict(logs))

        return _Rec()


# ---------------------------------------------------------------- config mapping (no model)


def test_config_maps_every_grpo_field(tmp_path):
    from trl import GRPOConfig

    from lorakit.train.grpo import grpo_config_kwargs

    recipe = write_recipe(tmp_path, "tiny", num_generations=4, max_completion_length=16, temperature=0.7,
                          top_p=0.9, beta=0.04, loss_type="dr_grpo", epsilon=0.3, log_completions=True)
    kw = grpo_config_kwargs(recipe, training_args(tmp_path), world_size=1)
    assert "max_length" not in kw and "packing" not in kw
    cfg = GRPOConfig(**kw)
    assert (cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.top_p) == (4, 16, 0.7, 0.9)
    assert (cfg.beta, cfg.loss_type, cfg.epsilon) == (0.04, "dr_grpo", 0.3)
    assert cfg.reward_weights == [1.0, 0.5]
    assert cfg.remove_unused_columns is False and cfg.log_completions is False  # our sample replaces TRL's table
    assert cfg.generation_batch_size == 4 and cfg.steps_per_generation == 1
    # TRL 1.16 dropped max_prompt_length: lorakit filters prompts itself
    assert not hasattr(cfg, "max_prompt_length")


@pytest.mark.parametrize("batch, accum, gens, expected", [(4, 1, 8, 8), (6, 1, 4, 12), (2, 2, 2, 4), (3, 2, 4, 12)])
def test_default_generation_batch_holds_whole_groups(tmp_path, batch, accum, gens, expected):
    from trl import GRPOConfig

    from lorakit.train.grpo import grpo_config_kwargs

    recipe = write_recipe(tmp_path, "tiny", num_generations=gens)
    kw = grpo_config_kwargs(recipe, training_args(tmp_path, per_device_train_batch_size=batch,
                                                  gradient_accumulation_steps=accum), world_size=1)
    cfg = GRPOConfig(**kw)  # TRL accepts it: divisible by the step batch and by num_generations
    assert cfg.generation_batch_size == expected


@pytest.mark.parametrize("gen, message", [(6, "multiple of train.batch_size 4"),
                                          (8, "multiple of grpo.num_generations 3")])
def test_bad_generation_batch_size_names_the_field(tmp_path, gen, message):
    """A recipe rule: validate and estimate report it with its line, before anything runs."""
    with pytest.raises(LorakitError) as e:
        write_recipe(tmp_path, "tiny", num_generations=3, generation_batch_size=gen)
    problem = e.value.problems[0]
    assert problem.field == "grpo.generation_batch_size" and message in problem.message and problem.line


def test_generation_batch_must_fill_every_process(tmp_path):
    """What the recipe cannot know: the number of processes multiplies the batch per step."""
    from lorakit.train.grpo import grpo_config_kwargs

    recipe = write_recipe(tmp_path, "tiny", num_generations=4, generation_batch_size=8)
    assert grpo_config_kwargs(recipe, training_args(tmp_path, per_device_train_batch_size=4), world_size=2)
    with pytest.raises(LorakitError) as e:
        grpo_config_kwargs(recipe, training_args(tmp_path, per_device_train_batch_size=4), world_size=3)
    assert "multiple of the batch per step" in e.value.message and e.value.field == "grpo.generation_batch_size"


def test_eval_batch_is_rounded_to_whole_groups(tmp_path):
    from lorakit.train.grpo import grpo_config_kwargs

    recipe = write_recipe(tmp_path, "tiny", num_generations=4)
    kw = grpo_config_kwargs(recipe, training_args(tmp_path, eval_strategy="steps", eval_steps=1,
                                                  per_device_eval_batch_size=6), world_size=1)
    assert kw["per_device_eval_batch_size"] == 4


def test_reward_metric_keys():
    from lorakit.train.grpo import reward_metric_keys

    assert reward_metric_keys(["exact_answer"]) == ["rewards/exact_answer/mean", "rewards/exact_answer/std",
                                                     "reward", "reward_std"]


def test_fit_prompts_drops_long_prompts(tiny_model_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from lorakit.train.grpo import fit_prompts

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = Dataset.from_list([{"prompt": "short"}, {"prompt": "long " * 200}, {"prompt": "fine"}])
    kept, dropped = fit_prompts(text, tok, 32)
    assert dropped == 1 and kept["prompt"] == ["short", "fine"]
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": c}]} for c in ("hi", "long " * 200)])
    kept, dropped = fit_prompts(chat, tok, 32)
    assert dropped == 1 and kept["prompt"][0][0]["content"] == "hi"
    assert fit_prompts(chat, tok, 10_000) == (chat, 0)


# ---------------------------------------------------------------- training on the tiny model


def test_grpo_trains_and_rewards_get_the_columns(tmp_path, tiny_model_dir, lora_model):
    from trl import GRPOTrainer

    from lorakit.train.grpo import build_grpo_trainer

    recipe = write_recipe(tmp_path, tiny_model_dir)
    model, tok = lora_model
    rec = LogRecorder()
    trainer = build_grpo_trainer(recipe, model, tok, prepared(4), training_args(tmp_path), [rec])
    assert isinstance(trainer, GRPOTrainer)
    assert trainer.reward_func_names == ["record", "exact_answer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()

    calls = trainer.reward_funcs[0].fn.__globals__["CALLS"]
    assert len(calls) == 2  # one scored generation batch per step
    by_answer = {r["answer"]: r for r in rows(4)}
    for call in calls:
        # 2 prompts x 2 generations, every column one value per completion, groups consecutive
        assert call["n"] == 4 and len(call["answer"]) == 4 and len(call["prompts"]) == 4
        assert call["answer"][0] == call["answer"][1] and call["answer"][2] == call["answer"][3]
        for p, a, d in zip(call["prompts"], call["answer"], call["difficulty"]):
            assert by_answer[a]["prompt"] == p and by_answer[a]["difficulty"] == d
        assert all(0 < n <= 8 for n in call["ids"])  # max_completion_length
        assert call["kind"] == "list"  # chat prompts give chat completions
        assert {"trainer_state", "log_extra", "log_metric"} <= set(call["keys"])

    steps = [log for log in rec.logs if "rewards/record/mean" in log]
    assert len(steps) == 2
    for log in steps:
        for key in ("rewards/record/mean", "rewards/record/std", "rewards/exact_answer/mean",
                    "rewards/exact_answer/std", "reward", "reward_std"):
            assert isinstance(log[key], float)
        # reward = sum(weight_i * mean_i), weights 1.0 and 0.5
        assert math.isclose(log["reward"], log["rewards/record/mean"] + 0.5 * log["rewards/exact_answer/mean"],
                            rel_tol=1e-5, abs_tol=1e-6)
        sample = log["completions"]
        assert 0 < len(sample) <= 4
        assert set(sample[0]) == {"prompt", "completion", "rewards"}
        assert set(sample[0]["rewards"]) == {"record", "exact_answer"}
        assert sample[0]["prompt"].startswith("What is ")
    assert any(not p.equal(before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_raising_reward_stops_training_with_the_sample(tmp_path, tiny_model_dir, lora_model):
    from lorakit.train.grpo import build_grpo_trainer

    recipe = write_recipe(tmp_path, tiny_model_dir, rewards=[{"fn": "my_rewards.py:explode"}])
    model, tok = lora_model
    trainer = build_grpo_trainer(recipe, model, tok, prepared(4), training_args(tmp_path, max_steps=1), [])
    with pytest.raises(LorakitError) as e:
        trainer.train()
    msg = e.value.message
    assert "reward function explode (my_rewards.py:explode) raised RuntimeError: reward service down" in msg
    assert "prompt: " in msg and "What is" in msg and "answer: " in msg
    assert e.value.exit_code == 1


def test_bad_reward_fails_before_training(tmp_path, tiny_model_dir, lora_model):
    from lorakit.train.grpo import build_grpo_trainer

    recipe = write_recipe(tmp_path, tiny_model_dir, rewards=[{"fn": "exact_answer"}, {"fn": "my_rewards.py:nope"}])
    model, tok = lora_model
    with pytest.raises(LorakitError) as e:
        build_grpo_trainer(recipe, model, tok, prepared(4), training_args(tmp_path), [])
    assert e.value.field == "grpo.rewards.1.fn" and "has no function 'nope'" in e.value.message


@pytest.mark.parametrize("reward, field, words", [
    ({"fn": "nosuchfile.py:f"}, "grpo.rewards.1.fn", "file not found"),
    ({"fn": "exact_answer", "args": {"bogus": 1}}, "grpo.rewards.1.args", "bogus"),
], ids=["missing-file", "unknown-arg"])
def test_bad_reward_leaves_no_run_directory(tmp_path, tiny_model_dir, monkeypatch, reward, field, words):
    """`lorakit train` resolves the reward functions before the run directory exists (and before the
    weights load): a bad one is exit 2 naming its field, and nothing is written."""
    import json

    from typer.testing import CliRunner

    from lorakit.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(4)))
    doc = {"name": "bad-reward", "base_model": str(tiny_model_dir), "method": "grpo",
           "quantization": {"bits": "none"}, "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
           "data": {"path": "train.jsonl", "format": "prompt"},
           "grpo": {"rewards": [{"fn": "exact_answer"}, reward], "num_generations": 2, "max_completion_length": 8},
           "train": {"max_steps": 1, "batch_size": 2}, "output": {"dir": "runs/bad-reward"}}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(doc))
    result = CliRunner().invoke(app, ["train", "grpo.yaml", "--json"])
    assert result.exit_code == 2, result.output[-2000:]
    err = json.loads(result.stdout)
    assert err["problems"][0]["field"] == field and words in err["problems"][0]["message"]
    assert not (tmp_path / "runs").exists()
    assert "loading" not in result.stderr  # found before any weight was loaded


def test_all_prompts_too_long_is_an_error(tmp_path, tiny_model_dir, lora_model):
    from lorakit.train.grpo import build_grpo_trainer

    recipe = write_recipe(tmp_path, tiny_model_dir, max_prompt_length=3)
    model, tok = lora_model
    with pytest.raises(LorakitError) as e:
        build_grpo_trainer(recipe, model, tok, prepared(4), training_args(tmp_path), [])
    assert e.value.field == "grpo.max_prompt_length"


def test_evaluate_rewards_scores_held_out_prompts(tmp_path, tiny_model_dir, lora_model):
    from lorakit.train.grpo import evaluate_rewards
    from lorakit.train.rewards import load_rewards

    recipe = write_recipe(tmp_path, tiny_model_dir)
    rewards = load_rewards(recipe.grpo.rewards, tmp_path)
    model, tok = lora_model
    side = tok.padding_side
    result = evaluate_rewards(model, tok, rows(3), rewards, [1.0, 0.5], max_new_tokens=4, batch_size=2)
    assert result["n"] == 3 and set(result["rewards"]) == {"record", "exact_answer"}
    r = result["rewards"]
    assert math.isclose(result["reward"], r["record"] + 0.5 * r["exact_answer"], rel_tol=1e-6)
    calls = rewards[0].fn.__globals__["CALLS"]
    assert [c["n"] for c in calls[-2:]] == [2, 1] and calls[-1]["answer"] == ["3"]
    assert all(0 < n <= 4 for c in calls[-2:] for n in c["ids"])
    assert len(result["samples"]) == 3 and tok.padding_side == side
    # decoded through lorakit's sampler (grpo.generation_graphs): the same greedy completions, the same scores
    again = evaluate_rewards(model, tok, rows(3), rewards, [1.0, 0.5], max_new_tokens=4, batch_size=2,
                             generation_graphs=True)
    assert again["samples"] == result["samples"] and again["rewards"] == result["rewards"]
    assert calls[-1]["ids"] == calls[-3]["ids"]


def test_gradient_checkpointing_and_bf16_follow_lorakit_not_trl_defaults(tmp_path):
    """GRPOConfig defaults both to on; the recipe's resolved options decide (old and new field names)."""
    from trl import GRPOConfig

    from lorakit.train.grpo import grpo_config_kwargs

    recipe = write_recipe(tmp_path, "tiny")
    base = training_args(tmp_path)
    for key in ("gradient_checkpointing", "bf16"):
        base.pop(key)
    off = GRPOConfig(**grpo_config_kwargs(recipe, {**base, "activation_checkpointing": False}, world_size=1))
    assert off.gradient_checkpointing is False and off.bf16 is False and off.fp16 is False
    on = GRPOConfig(**grpo_config_kwargs(recipe, {**base, "gradient_checkpointing": True,
                                                  "gradient_checkpointing_kwargs": {"use_reentrant": False}},
                                         world_size=1))
    assert on.gradient_checkpointing is True and on.gradient_checkpointing_kwargs == {"use_reentrant": False}


def test_reward_summary_and_curves():
    from lorakit.train.grpo import reward_curves, reward_summary

    history = [{"step": 1, "loss": 0.0, "reward": 0.5, "rewards/a/mean": 0.25, "rewards/a/std": 0.1},
               {"step": 1, "train_runtime": 1.0},
               {"step": 2, "loss": 0.0, "reward": 0.75, "rewards/a/mean": 0.5, "rewards/a/std": 0.1}]
    assert reward_curves(history) == {"total": [(1, 0.5), (2, 0.75)], "a": [(1, 0.25), (2, 0.5)]}
    before = {"n": 3, "reward": 0.2, "rewards": {"a": 0.1, "b": None}, "samples": [{"prompt": "p", "completion": "x"}]}
    after = {"n": 3, "reward": 0.5, "rewards": {"a": 0.4, "b": 0.2}, "samples": []}
    s = reward_summary(before, after, history)
    assert s["n"] == 3 and s["before"] == {"total": 0.2, "a": 0.1, "b": None}
    assert s["change"]["total"] == pytest.approx(0.3) and s["change"]["a"] == pytest.approx(0.3)
    assert s["change"]["b"] is None
    assert s["train"] == {"first": 0.5, "last": 0.75, "steps": 2}
    assert s["samples_before"][0]["completion"] == "x"
    assert reward_summary(None, None, [])["before"] is None


# ---------------------------------------------------------------- `lorakit train` end to end


@pytest.mark.slow
def test_lorakit_train_grpo_subprocess(tmp_path, tiny_model_dir):
    """The real CLI on a GRPO recipe: run directory, held-out reward before/after, per-step reward logs."""
    import json
    import os
    import subprocess
    import sys

    from lorakit.train.grpo import reward_metric_keys

    data = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[:8]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[8:]))
    doc = {"name": "tiny-grpo", "base_model": str(tiny_model_dir), "method": "grpo",
           "quantization": {"bits": "none"}, "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
           "data": {"path": "train.jsonl", "eval": "eval.jsonl", "format": "prompt"},
           "grpo": {"rewards": [{"fn": "exact_answer", "weight": 1.0},
                                {"fn": "format_regex", "weight": 0.5, "args": {"pattern": r"\d"}}],
                    "num_generations": 2, "max_completion_length": 8, "max_prompt_length": 64},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "logging_steps": 1, "seed": 0},
           "evaluate": {"samples": 3, "max_new_tokens": 8}, "output": {"dir": "runs/tiny-grpo"}}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(doc))
    p = subprocess.run([sys.executable, "-m", "lorakit", "train", "grpo.yaml", "--json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "true"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "held-out reward before (3 prompts" in p.stderr and "held-out reward (3 prompts): " in p.stderr
    assert re.search(r"^step=2/2 loss=\S+ reward=-?\d+\.\d{4} lr=", p.stderr, re.M), p.stderr[-2000:]

    run = tmp_path / "runs" / "tiny-grpo"
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (run / "adapter" / "tokenizer_config.json").is_file()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["method"] == "grpo"
    assert json.loads((run / "state.json").read_text())["state"] == "finished"

    summary = json.loads((run / "summary.json").read_text())
    assert json.loads(p.stdout)["reward"] == summary["reward"]  # --json prints the same summary
    assert summary["method"] == "grpo" and summary["steps"] == 2
    assert summary["options"]["gradient_checkpointing"] is False  # CPU: off, whatever GRPOConfig defaults to
    reward = summary["reward"]
    names = {"total", "exact_answer", "format_regex"}
    assert reward["n"] == 3 and set(reward["before"]) == set(reward["after"]) == set(reward["change"]) == names
    for key in names:
        assert 0.0 <= reward["before"][key] <= 1.5 and 0.0 <= reward["after"][key] <= 1.5
        assert reward["change"][key] == pytest.approx(reward["after"][key] - reward["before"][key])
    b = reward["before"]
    assert b["total"] == pytest.approx(b["exact_answer"] + 0.5 * b["format_regex"])
    assert reward["train"]["steps"] == 2 and len(reward["samples_after"]) == 3

    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "reward" in x]
    assert [x["step"] for x in steps] == [1, 2]
    for x in steps:
        for key in reward_metric_keys(["exact_answer", "format_regex"]):
            assert isinstance(x[key], float), key
        assert x["reward"] == pytest.approx(x["rewards/exact_answer/mean"] + 0.5 * x["rewards/format_regex/mean"],
                                            abs=1e-6)
        sample = x["completions"]
        assert 0 < len(sample) <= 4 and sample[0]["prompt"].startswith("What is ")
        assert set(sample[0]["rewards"]) == {"exact_answer", "format_regex"}


def test_generation_through_lorakits_sampler_gives_trls_completions(tmp_path, tiny_model_dir, lora_model,
                                                                    monkeypatch):
    """grpo.generation_graphs: the same completions as TRL's generate for the same seed (the tiny adapter has no
    dropout, so eval and train mode sample alike), each cut after its first eos, through decode_graphs."""
    import torch

    from lorakit.speed import decode_graphs
    from lorakit.train.grpo import build_grpo_trainer

    recipe = write_recipe(tmp_path, tiny_model_dir, max_completion_length=12)
    model, tok = lora_model
    calls = []
    real = decode_graphs.generate
    monkeypatch.setattr(decode_graphs, "generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    prompt_ids = [tok(f"What is {i} + 1?")["input_ids"] for i in range(3) for _ in range(2)]
    got = {}
    for graphs in (False, True):
        trainer = build_grpo_trainer(recipe, model, tok, prepared(4), training_args(tmp_path),
                                     generation_graphs=graphs)
        eos = set(trainer.eos_token_ids)
        trainer.eos_token_ids = sorted(eos | {3, 5, 7})  # some rows end early
        torch.manual_seed(0)
        got[graphs], logprobs = trainer._generate_single_turn(prompt_ids, None, {}, 2)
        assert logprobs is None
    assert len(calls) == 1 and calls[0]["max_new_tokens"] == 12
    assert got[True] == got[False]
    ends = [c for c in got[True] if len(c) < 12]
    assert ends and all(c[-1] in {3, 5, 7} | eos for c in ends)
    assert model.training  # the model is back in train mode after sampling in eval mode


def test_settings_the_sampler_lacks_keep_trls_generate(tmp_path, tiny_model_dir, lora_model, monkeypatch, caplog):
    from lorakit.speed import decode_graphs
    from lorakit.train.grpo import build_grpo_trainer

    recipe = write_recipe(tmp_path, tiny_model_dir, max_completion_length=6)
    model, tok = lora_model
    calls = []
    monkeypatch.setattr(decode_graphs, "generate", lambda *a, **k: calls.append(k))
    trainer = build_grpo_trainer(recipe, model, tok, prepared(4), training_args(tmp_path), generation_graphs=True)
    trainer.generation_config.repetition_penalty = 1.3  # e.g. GRPOConfig(repetition_penalty=1.3)
    prompt_ids = [tok(f"What is {i} + 1?")["input_ids"] for i in range(2)]
    with caplog.at_level("WARNING", logger="lorakit.train.grpo_trainer"):
        for _ in range(2):
            completions, _ = trainer._generate_single_turn(prompt_ids, None, {}, 2)
            assert len(completions) == 2 and all(0 < len(c) <= 6 for c in completions)
    assert calls == []
    said = [r.getMessage() for r in caplog.records if "repetition_penalty" in r.getMessage()]
    assert len(said) == 1  # said once, not every step
