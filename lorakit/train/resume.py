"""What `lorakit train RECIPE --resume [RUN_DIR]` may continue, and with which recipe changes.

A resumed run continues from the run's latest complete checkpoint with the recipe given now. The recipe may
differ from the run's (RUN/recipe.yaml) only where the difference cannot make the checkpoint mean something
else: how long to train (train.max_steps, train.epochs), what is logged, evaluated, saved and written
(logging/eval/save steps, report_to, nan_policy, evaluate.*, output.*), and the speed levers (precision,
checkpointing, kernels, attention, padding-free, CUDA graphs, distributed). A change to the model, the adapter
or the data, or to the optimisation the checkpoint's optimizer and schedule were built for, is refused with the
fields named (`REFUSED`): the checkpoint would be loaded into another model, the data position would point into
other rows, or (the learning rate) the Trainer would silently keep the checkpoint's value.

A finished run may be continued when the recipe now asks for more steps (or epochs) than its last checkpoint
holds: `--resume --set train.max_steps=800` extends a 400-step run. The learning-rate schedule is planned for the
new length from the checkpoint on, so with a constant schedule the result equals an uninterrupted run of the new
length; with a decaying one the steps before the checkpoint followed the old length's schedule.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lorakit.errors import LorakitError
from lorakit.recipe.loader import to_resolved_yaml
from lorakit.train.run_dir import FINISHED, RunDir

# sections (whole) and fields that must not change on resume; everything else may
REFUSED = (
    "base_model", "method", "model.revision", "model.dtype", "model.chat_template", "model.trust_remote_code",
    "quantization", "lora", "grpo", "data",
    "train.lr", "train.scheduler", "train.warmup_ratio", "train.batch_size", "train.grad_accum", "train.optimizer",
    "train.weight_decay", "train.max_grad_norm", "train.seed",
)
ALLOWED_IN_REFUSED = ("data.padding_free", "grpo.log_completions")  # speed / logging inside refused sections


def _flat(doc, prefix: str = "") -> dict:
    if not isinstance(doc, dict):
        return {prefix: doc}
    out = {}
    for k, v in doc.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _refused(key: str) -> bool:
    if any(key == a or key.startswith(a + ".") for a in ALLOWED_IN_REFUSED):
        return False
    return any(key == r or key.startswith(r + ".") for r in REFUSED)


def changed_fields(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field, run's value, recipe's value) for each refused field that differs, in the recipe's order."""
    a, b = _flat(old), _flat(new)
    return [(k, a.get(k), b.get(k)) for k in dict.fromkeys([*b, *a]) if _refused(k) and a.get(k) != b.get(k)]


def check_resume(run: RunDir, checkpoint: Path, recipe) -> None:
    """Raise (exit 2) when `recipe` may not continue `run` from `checkpoint` (see the module docstring).

    Args:
        run: the run directory being resumed (its recipe.yaml is the run's resolved recipe).
        checkpoint: the complete checkpoint the run continues from.
        recipe: the recipe given now (with its --set overrides).
    """
    try:
        old = yaml.safe_load(run.recipe_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        old = None
    if isinstance(old, dict):
        diffs = changed_fields(old, yaml.safe_load(to_resolved_yaml(recipe)))
        if diffs:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:8])
            raise LorakitError(
                f"--resume: the recipe changes what the run in {run.path} was trained with ({shown})",
                field=diffs[0][0],
                hint="a resumed run may change only how long it trains (train.max_steps, train.epochs), logging, "
                     "evaluation, saving and speed settings; put the old value back, or start a new run "
                     "(--overwrite, or another output.dir)")
    if run.state == FINISHED:
        _check_more_to_do(run, checkpoint, recipe)


def _check_more_to_do(run: RunDir, checkpoint: Path, recipe) -> None:
    try:
        done = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        done = {}
    step, epoch = int(done.get("global_step") or 0), float(done.get("epoch") or 0.0)
    t = recipe.train
    more = t.max_steps > step if t.max_steps else t.epochs > epoch + 1e-9
    if not more:
        target = f"train.max_steps={t.max_steps}" if t.max_steps else f"train.epochs={t.epochs:g}"
        raise LorakitError(
            f"--resume: the run in {run.path} already finished ({step} steps, {epoch:g} epochs; the recipe asks for "
            f"{target})", field="train.max_steps" if t.max_steps else "train.epochs",
            hint=f"to train it further, ask for more: --resume --set train.max_steps={step * 2}; "
                 "to train it again from the start, --overwrite")
