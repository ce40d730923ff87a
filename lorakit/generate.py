"""`lorakit generate`: answer one prompt with a run's adapter on its base (or the base alone).

The base comes from the run's resolved recipe (recipe.yaml), resolved like `train` does (the demo
alias loads the cached conversion); the adapter loads with peft's PeftModel.from_pretrained from
RUN/adapter. The prompt goes through the chat template and is decoded greedily, so the answer is the
same every time and comparable with `--base-only`.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError


def _run_recipe(run_dir: Path):
    from lorakit.recipe.schema import load_recipe

    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise LorakitError(f"{run_dir}: no recipe.yaml; is this a run directory written by `lorakit train`?")
    return load_recipe(path)


def generate(run_dir: str | Path, prompt: str, *, base_only: bool = False, max_new_tokens: int = 128) -> str:
    """The greedy answer to `prompt` (a user message) from the run's adapter, or from the base alone."""
    from lorakit.model.load import load_for_inference, load_tokenizer, resolve_base_dir
    from lorakit.runtime.quiet import quiet_libraries
    from lorakit.train.evaluate import generate_batch
    from lorakit.train.run_dir import find_run_dir

    quiet_libraries()
    run = find_run_dir(run_dir)
    recipe = _run_recipe(run.path)
    m = recipe.model
    base_dir = resolve_base_dir(recipe.base_model, revision=m.revision, allow_pickle=m.allow_pickle)
    # the adapter dir carries the tokenizer the run trained with (incl. a chat-template override)
    tok_dir = run.adapter_dir if (run.adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = load_tokenizer(tok_dir, trust_remote_code=m.trust_remote_code)
    model = load_for_inference(base_dir, adapter_dir=None if base_only else run.adapter_dir,
                               trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)
    chat = [{"role": "user", "content": prompt}] if tokenizer.chat_template else prompt
    return generate_batch(model, tokenizer, [chat], max_new_tokens=max_new_tokens, batch_size=1)[0]
