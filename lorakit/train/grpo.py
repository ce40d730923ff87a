"""GRPO from a recipe: the `grpo:` section mapped onto TRL's GRPOConfig/GRPOTrainer.

`build_grpo_trainer` loads the rewards (lorakit.train.rewards), merges the common training options the
train step built with the GRPO options, drops prompts longer than `grpo.max_prompt_length` (TRL 1.x
no longer truncates prompts: GRPOConfig has no max_prompt_length) and returns a `trl.GRPOTrainer`.

What each logging step carries (TRL's own keys, plus one of ours):
  rewards/<name>/mean, rewards/<name>/std   per reward function (<name> = Reward.__name__)
  reward, reward_std                        the weighted total: sum(weight_i * r_i)
  frac_reward_zero_std, completions/mean_length, ..., kl (beta > 0), clip_ratio/*, entropy
  completions                               (ours, with grpo.log_completions) a few sampled
                                            {prompt, completion, rewards: {name: value}} dicts
TRL's own `log_completions` prints a rich table on stdout every logging step (which would break
`--json` output) and needs pandas, so it stays off; the sample above replaces it.

`evaluate_rewards` scores greedy completions of held-out prompts with the same rewards (the
before/after figure of a GRPO run); `held_out_rewards` runs it for a recipe, `reward_summary` and
`reward_curves` shape the run's summary.json `reward` section and the plot's reward panel.

GRPOConfig's own defaults differ from TrainingArguments (gradient checkpointing and bf16 on):
`grpo_config_kwargs` always sets both from lorakit's resolved options.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from lorakit.errors import LorakitError
from lorakit.recipe.loader import recipe_dir
from lorakit.speed import decode_graphs
from lorakit.train.evaluate import eos_ids, until_eos
from lorakit.train.grpo_trainer import trainer_class
from lorakit.train.rewards import Reward, combine, completion_text, load_rewards

log = logging.getLogger(__name__)

# The per-reward keys TRL 1.16 logs (GRPOTrainer._generate_and_score_completions) and the totals.
REWARD_MEAN_KEY = "rewards/{name}/mean"
REWARD_STD_KEY = "rewards/{name}/std"
TOTAL_REWARD_KEYS = ("reward", "reward_std")
COMPLETIONS_KEY = "completions"


def reward_metric_keys(names: Sequence[str]) -> list[str]:
    """The log keys of a GRPO run's reward curves, per reward function then the weighted total."""
    keys = []
    for n in names:
        keys += [REWARD_MEAN_KEY.format(name=n), REWARD_STD_KEY.format(name=n)]
    return [*keys, *TOTAL_REWARD_KEYS]


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def grpo_config_kwargs(recipe, training_args: dict, *, world_size: int | None = None) -> dict:
    """GRPOConfig keyword arguments: the common `training_args` plus the recipe's `grpo:` section.

    `training_args` may be the dict built for SFTConfig: keys GRPOConfig does not have are dropped.
    In GRPO `per_device_train_batch_size` counts completions. When `grpo.generation_batch_size` is
    not set, the generation batch is the smallest multiple of the optimizer batch that holds whole
    groups of `num_generations` completions.
    """
    from trl import GRPOConfig  # trl is slow to import: only when a GRPO run builds its trainer

    g = recipe.grpo
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    dropped = sorted(k for k in training_args if k not in known)
    if dropped:
        log.debug("GRPOConfig does not take %s; dropped", ", ".join(dropped))
    kw = {k: v for k, v in training_args.items() if k in known}
    world = world_size or _world_size()
    per_device = int(kw.get("per_device_train_batch_size", recipe.train.batch_size))
    accum = int(kw.get("gradient_accumulation_steps", recipe.train.grad_accum))
    kw["per_device_train_batch_size"] = per_device
    kw["gradient_accumulation_steps"] = accum
    step_batch = per_device * world
    G = g.num_generations
    if g.generation_batch_size is not None:
        gen = g.generation_batch_size
        if gen % step_batch:
            raise LorakitError(f"grpo.generation_batch_size {gen} must be a multiple of the batch per step "
                               f"(train.batch_size {per_device} x {world} processes = {step_batch})",
                               field="grpo.generation_batch_size")
        # whole groups of num_generations: a recipe rule (recipe.cross_field_problems)
    else:
        gen = math.lcm(step_batch * accum, G)
    kw.update(
        num_generations=G,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        beta=g.beta,
        loss_type=g.loss_type,
        epsilon=g.epsilon,
        generation_batch_size=gen,
        steps_per_generation=None,
        reward_weights=[float(s.weight) for s in g.rewards],
        log_completions=False,  # see the module docstring: our own sample goes into the logs instead
        remove_unused_columns=False,  # the dataset's other columns feed the rewards
    )
    # GRPOConfig turns gradient checkpointing and bf16 on by default (unlike TrainingArguments): state
    # lorakit's resolved choices under whichever names this transformers has (activation_checkpointing
    # is the newer name of gradient_checkpointing; transformers <= 5.17 knows only the old one).
    gc = training_args.get("activation_checkpointing", training_args.get("gradient_checkpointing"))
    gc_kwargs = training_args.get("activation_checkpointing_kwargs",
                                  training_args.get("gradient_checkpointing_kwargs"))
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in known:
            kw[name] = bool(gc)
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        if name in known:
            kw[name] = gc_kwargs if gc else None
    kw["bf16"] = bool(training_args.get("bf16", False))
    kw["fp16"] = bool(training_args.get("fp16", False))
    if "max_prompt_length" in known:  # older TRL releases still truncate prompts themselves
        kw["max_prompt_length"] = g.max_prompt_length
    eval_on = kw.get("eval_strategy", "no") not in ("no", None)
    if eval_on:
        eb = int(kw.get("per_device_eval_batch_size", per_device))
        need = G // math.gcd(G, world)
        kw["per_device_eval_batch_size"] = max(need, eb - eb % need)
    return kw


def _prompt_text(prompt: Any, tokenizer) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def fit_prompts(dataset, tokenizer, max_prompt_length: int):
    """(dataset without the prompts longer than max_prompt_length tokens, number dropped)."""
    if dataset is None:
        return None, 0

    texts = [_prompt_text(p, tokenizer) for p in dataset["prompt"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    if len(keep) == len(lengths):
        return dataset, 0
    return dataset.select(keep), len(lengths) - len(keep)


def _prompt_preview(prompt: Any, limit: int = 400) -> str:
    if isinstance(prompt, str):
        text = prompt
    else:
        users = [m.get("content", "") for m in (prompt or []) if isinstance(m, dict) and m.get("role") == "user"]
        text = str(users[-1]) if users else str(prompt)
    return text if len(text) <= limit else text[:limit] + "..."


def completion_samples(rewards: Sequence[Reward], k: int = 4) -> list[dict]:
    """Up to k {prompt, completion, rewards} of the latest scored batch (from each Reward.last)."""
    if not rewards or rewards[0].last is None:
        return []
    prompts, completions, _ = rewards[0].last
    rows = []
    for i in range(min(k, len(completions))):
        scores = {}
        for r in rewards:
            if r.last is not None and i < len(r.last[2]):
                scores[r.__name__] = r.last[2][i]
        rows.append({"prompt": _prompt_preview(prompts[i]), "completion": completion_text(completions[i]),
                     "rewards": scores})
    return rows


def completion_log_callback(rewards: Sequence[Reward], k: int = 4):
    """A TrainerCallback adding `completions` (a sample of the latest batch) to each training log.

    Put it before callbacks that read `logs` (the trainer's default printers run before it and never
    see the list; trainer_state.json's log_history does not keep it).
    """
    class CompletionLogCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or not any(key.startswith("rewards/") for key in logs):
                return
            sample = completion_samples(rewards, k)
            if sample:
                logs[COMPLETIONS_KEY] = sample
                for r in rewards:
                    r.last = None

    return CompletionLogCallback()


def check_rewards(recipe) -> list[Reward]:
    """The recipe's reward functions, resolved (file, import, arguments); `lorakit train` calls this
    before it loads weights or writes the run directory, so a bad reward spec leaves nothing behind."""
    if recipe.grpo is None:
        raise LorakitError("method grpo needs a `grpo:` section with `rewards:`", field="method")
    return load_rewards(recipe.grpo.rewards, recipe_dir(recipe), field="grpo.rewards")


def build_grpo_trainer(recipe, model, tokenizer, prepared, training_args: dict, callbacks=None, *,
                       generation_graphs: bool = False):
    """A trl.GRPOTrainer for `recipe` (method grpo) on `model` (already carrying its LoRA adapter).

    Args:
        recipe: the validated recipe (method grpo).
        model: the model with its LoRA adapter.
        tokenizer: the tokenizer (TRL's processing class).
        prepared: `prepared.train` (and optional `prepared.eval`) hold a `prompt` column (text or chat messages)
            plus the columns the rewards read.
        training_args: the common TrainingArguments options.
        callbacks: TrainerCallbacks to add.
        generation_graphs: sample through lorakit.speed.decode_graphs (the Plan's `generation_graphs`).

    Returns:
        The trainer (lorakit.train.grpo_trainer's subclass of trl.GRPOTrainer).
    """
    from trl import GRPOConfig  # trl is slow to import: only when a GRPO run builds its trainer

    rewards = check_rewards(recipe)
    g = recipe.grpo
    kwargs = grpo_config_kwargs(recipe, training_args)
    try:
        config = GRPOConfig(**kwargs)
    except ValueError as e:  # TRL's own consistency checks
        raise LorakitError(f"the GRPO settings do not fit together: {e}", field="grpo") from None

    train = prepared.train
    if "prompt" not in train.column_names:
        raise LorakitError(f"GRPO data needs a `prompt` column (columns: {', '.join(train.column_names)})",
                           field="data.path")
    train, dropped = fit_prompts(train, tokenizer, g.max_prompt_length)
    if dropped:
        log.warning("dropped %d of %d training prompts longer than grpo.max_prompt_length=%d tokens",
                    dropped, dropped + len(train), g.max_prompt_length)
    if len(train) == 0:
        raise LorakitError(f"every training prompt is longer than grpo.max_prompt_length={g.max_prompt_length} "
                           "tokens", field="grpo.max_prompt_length")
    eval_ds = getattr(prepared, "eval", None)
    if eval_ds is not None:
        eval_ds, _ = fit_prompts(eval_ds, tokenizer, g.max_prompt_length)

    extra = [completion_log_callback(rewards)] if g.log_completions else []
    trainer = trainer_class(generation_graphs)(
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=train,
        eval_dataset=eval_ds if eval_ds is not None and len(eval_ds) else None,
        processing_class=tokenizer,
        callbacks=[*extra, *(callbacks or [])],
    )
    return trainer


def evaluate_rewards(model, tokenizer, rows, rewards: Sequence[Reward], weights: Sequence[float] | None = None, *,
                     max_new_tokens: int = 128, batch_size: int = 16, samples: int = 4,
                     generation_graphs: bool = False) -> dict:
    """Mean reward of greedy completions for `rows` (dicts or a Dataset with `prompt` + reward columns).

    Args:
        model: the model to generate with (put in eval mode for the call).
        tokenizer: its tokenizer (left padding for the call).
        rows: dicts or a Dataset with `prompt` and the columns the rewards read.
        rewards: the reward functions; weights: their weights (default 1 each).
        max_new_tokens: tokens generated at most per completion.
        batch_size: prompts generated together.
        samples: prompt/completion pairs returned for the report.
        generation_graphs: decode through lorakit.speed.decode_graphs (the run's Plan) instead of `generate`.

    Returns:
        {"n", "reward" (mean weighted total), "rewards": {name: mean}, "samples": [...]}.
    """
    rows = [dict(r) for r in rows]
    weights = list(weights) if weights is not None else [1.0] * len(rewards)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = eos_ids(model, tokenizer)
    per_reward: list[list] = [[] for _ in rewards]
    completions_all: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            texts = [_prompt_text(r["prompt"], tokenizer) for r in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                if generation_graphs and eos:
                    generated = decode_graphs.generate(
                        model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                        eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id).tolist()
                else:
                    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos or None,
                                         temperature=None, top_p=None, top_k=None)
                    generated = out[:, enc["input_ids"].shape[1]:].tolist()
            completion_ids = [until_eos(ids, eos) for ids in generated]
            completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            if not isinstance(batch[0]["prompt"], str):
                completions_fmt: list = [[{"role": "assistant", "content": c}] for c in completions]
            else:
                completions_fmt = completions
            columns = {k: [r[k] for r in batch] for k in batch[0] if k not in ("prompt", "completion")}
            for i, fn in enumerate(rewards):
                per_reward[i] += fn(completions_fmt, prompts=[r["prompt"] for r in batch],
                                    completion_ids=completion_ids, **columns)
            completions_all += completions
    finally:
        tokenizer.padding_side = side
        model.train(was_training)

    totals = [t for t in combine(per_reward, weights) if t is not None]

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    return {
        "n": len(rows),
        "reward": mean(totals),
        "rewards": {fn.__name__: mean(v) for fn, v in zip(rewards, per_reward)},
        "samples": [{"prompt": _prompt_preview(r["prompt"]), "completion": c}
                    for r, c in zip(rows[:samples], completions_all[:samples])],
    }


def held_out_rewards(recipe, model, tokenizer, eval_ds, *, batch_size: int = 32,
                     generation_graphs: bool = False) -> dict | None:
    """evaluate_rewards on the first `evaluate.samples` held-out prompts with the recipe's rewards.

    Completions get `evaluate.max_new_tokens` tokens; prompts longer than grpo.max_prompt_length are
    left out as in training; `generation_graphs`: the run's Plan decides how they are decoded. None when there
    are no held-out prompts.
    """
    if eval_ds is None or len(eval_ds) == 0:
        return None
    g = recipe.grpo
    eval_ds, _ = fit_prompts(eval_ds, tokenizer, g.max_prompt_length)
    n = min(len(eval_ds), recipe.evaluate.samples)
    if n == 0:
        return None
    rewards = load_rewards(g.rewards, recipe_dir(recipe), field="grpo.rewards")
    return evaluate_rewards(model, tokenizer, eval_ds.select(range(n)), rewards, [s.weight for s in g.rewards],
                            max_new_tokens=recipe.evaluate.max_new_tokens, batch_size=batch_size,
                            generation_graphs=generation_graphs)


def reward_curves(history: Sequence[dict]) -> dict[str, list[tuple[int, float]]]:
    """Training reward per logged step: {"total": [(step, reward)], <name>: [(step, mean)], ...}.

    `history` is the trainer's log_history (or metrics.jsonl rows): TRL's `reward` is the weighted
    total, `rewards/<name>/mean` the mean of one reward function over the step's completions.
    """
    curves: dict[str, list[tuple[int, float]]] = {"total": []}
    for h in history:
        if "step" not in h or "reward" not in h:
            continue
        curves["total"].append((int(h["step"]), float(h["reward"])))
        for key, value in h.items():
            if key.startswith("rewards/") and key.endswith("/mean"):
                curves.setdefault(key[len("rewards/"):-len("/mean")], []).append((int(h["step"]), float(value)))
    return curves


def reward_summary(before: dict | None, after: dict | None, history: Sequence[dict]) -> dict:
    """The `reward` section of a GRPO run's summary.json.

    before/after: `evaluate_rewards` results on the held-out prompts (None without eval rows).
    {"n", "before": {"total", <name>...}, "after": {...}, "change": {after - before},
     "train": {"first", "last", "steps"} (logged training reward), "samples_before", "samples_after"}
    """

    def flat(r):
        return None if r is None else {"total": r["reward"], **r["rewards"]}

    b, a = flat(before), flat(after)
    change = None
    if b is not None and a is not None:
        change = {k: (a[k] - b[k]) if a.get(k) is not None and b.get(k) is not None else None for k in b}
    total = reward_curves(history)["total"]
    return {
        "n": (after or before or {}).get("n"),
        "before": b, "after": a, "change": change,
        "train": {"first": total[0][1] if total else None, "last": total[-1][1] if total else None,
                  "steps": len(total)},
        "samples_before": (before or {}).get("samples", []),
        "samples_after": (after or {}).get("samples", []),
    }


__all__ = [
    "build_grpo_trainer", "check_rewards", "completion_log_callback", "completion_samples", "evaluate_rewards",
    "fit_prompts", "grpo_config_kwargs", "held_out_rewards", "reward_curves", "reward_metric_keys", "reward_summary",
]
