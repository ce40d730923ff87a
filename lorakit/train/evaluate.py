"""Task metrics by greedy generation on held-out examples, before and after training.

`generate_batch` answers a list of prompts (chat messages or plain strings) greedily, in batches with
left padding. `task_metrics` scores those answers with the recipe's metric functions (loaded through
lorakit.train.rewards, called with `reference=[...]`) and returns {metric: mean} plus a few samples.
"""

from __future__ import annotations

from typing import Any

import torch

from lorakit.train.rewards import load_rewards


def render_prompt(tokenizer, prompt: Any) -> str:
    """The text the model sees: the chat template with a generation prompt, or the string as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the model's (as TRL does)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def until_eos(ids: list[int], eos) -> list[int]:
    """Generated ids up to and including the first end-of-sequence token (TRL's completion_ids)."""
    for j, t in enumerate(ids):
        if t in eos:
            return ids[: j + 1]
    return ids


def generate_batch(model, tokenizer, prompts: list, *, max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy completions (text after the prompt, special tokens removed) for each prompt."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    device = next(model.parameters()).device
    was_training = model.training
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    out: list[str] = []
    eos = eos_ids(model, tokenizer)
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i:i + batch_size]
                # the chat template already carries its special tokens
                enc = tokenizer(chunk, return_tensors="pt", padding=True,
                                add_special_tokens=isinstance(prompts[i], str))
                enc = {k: v.to(device) for k, v in enc.items()}
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos or None,
                                     use_cache=True, temperature=None, top_p=None, top_k=None)
                new = gen[:, enc["input_ids"].shape[1]:]
                out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()
    return out


def task_metrics(model, tokenizer, examples: list[dict], metric_specs: list, base_dir, *,
                 max_new_tokens: int = 64, n_samples: int = 3, batch_size: int = 16) -> dict:
    """{"metrics": {name: mean}, "n": rows, "samples": [{prompt, reference, completion, scores}]}."""
    metrics = load_rewards(metric_specs, base_dir, field="evaluate.metrics")
    prompts = [ex["prompt"] for ex in examples]
    refs = [ex.get("reference") for ex in examples]
    completions = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores: dict[str, list] = {}
    for metric in metrics:
        scores[metric.__name__] = metric(completions, prompts=prompts, reference=refs)
    means = {}
    for name, values in scores.items():
        vals = [v for v in values if v is not None]
        means[name] = sum(vals) / len(vals) if vals else None
    samples = []
    for i in range(min(n_samples, len(examples))):
        prompt = prompts[i]
        shown = prompt if isinstance(prompt, str) else next(
            (m.get("content") for m in reversed(list(prompt)) if m.get("role") == "user"), str(prompt))
        samples.append({"prompt": shown, "reference": refs[i], "completion": completions[i],
                        "scores": {k: v[i] for k, v in scores.items()}})
    return {"metrics": means, "n": len(examples), "samples": samples}
