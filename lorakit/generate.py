"""`lorakit generate`: answer one prompt with a run's adapter on its base (or the base alone).

The base comes from the run's resolved recipe (recipe.yaml), resolved like `train` does (the demo
alias loads the cached conversion); the adapter loads with peft's PeftModel.from_pretrained from
RUN/adapter. The prompt goes through the chat template and is decoded greedily, so the answer is the
same every time and comparable with `--base-only`.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from lorakit.checkpoints.adapter import find_source
from lorakit.errors import LorakitError
from lorakit.model.load import load_for_inference, load_tokenizer, resolve_base_dir
from lorakit.recipe.loader import load_recipe
from lorakit.runtime.quiet import quiet_libraries
from lorakit.train.evaluate import generate_batch
from lorakit.train.run_dir import find_run_dir


def _run_recipe(run_dir: Path):
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise LorakitError(f"{run_dir}: no recipe.yaml; is this a run directory written by `lorakit train`?")
    return load_recipe(path)


def generate(run_dir: str | Path, prompt: str, *, base_only: bool = False, max_new_tokens: int = 128) -> str:
    """The greedy answer to `prompt` (a user message) from the run's adapter, or from the base alone.

    Args:
        run_dir: a run directory written by `lorakit train` (its recipe.yaml names the base).
        prompt: the user message (chat-templated when the tokenizer has a template).
        base_only: answer with the base model alone, without the adapter.
        max_new_tokens: the answer's length limit.

    Returns:
        The decoded answer.
    """
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


def generate_many(base_or_run: str | Path, adapters: list[str | Path], prompt: str, *, base_only: bool = False,
                  max_new_tokens: int = 128) -> list[tuple[str, str]]:
    """One base loaded once; each adapter's greedy answer in turn (peft load_adapter / set_adapter).

    Args:
        base_or_run: a run directory (its recipe names the base) or a base model (directory, alias or hub id).
        adapters: adapter or run directories of that base.
        prompt: the user message (chat-templated when the tokenizer has a template).
        base_only: also answer with the base alone (first, with the adapters disabled).
        max_new_tokens: the answers' length limit.

    Returns:
        (label, answer) pairs: "base" first with base_only, then each adapter's path.
    """
    quiet_libraries()
    path = Path(base_or_run).expanduser()
    trust, pickle = False, False
    if (path / "recipe.yaml").is_file():
        recipe = _run_recipe(path)
        m = recipe.model
        trust, pickle = m.trust_remote_code, m.allow_pickle
        base_dir = resolve_base_dir(recipe.base_model, revision=m.revision, allow_pickle=pickle)
    else:
        base_dir = resolve_base_dir(str(base_or_run))
    dirs = [find_source(a).adapter_dir for a in adapters]
    tok_dir = next((d for d in dirs if (d / "tokenizer_config.json").is_file()), base_dir)
    tokenizer = load_tokenizer(tok_dir, trust_remote_code=trust)
    model = load_for_inference(base_dir, adapter_dir=None, trust_remote_code=trust, allow_pickle=pickle)
    names = [f"adapter{i}" for i in range(len(dirs))]
    model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        model.load_adapter(str(d), adapter_name=name)
    model.eval()
    chat = [{"role": "user", "content": prompt}] if tokenizer.chat_template else prompt

    def answer() -> str:
        return generate_batch(model, tokenizer, [chat], max_new_tokens=max_new_tokens, batch_size=1)[0]

    answers = []
    if base_only:
        with model.disable_adapter():
            answers.append(("base", answer()))
    for name, a in zip(names, adapters):
        model.set_adapter(name)
        answers.append((str(a), answer()))
    return answers
