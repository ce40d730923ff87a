"""`lorakit validate`: everything that can be checked about a recipe without loading weights.

Schema problems are caught by `load_recipe`; here come the checks that need the outside world:
data files exist, the base model's config is known (offline table, local dir or hub cache), the
target modules exist in that architecture, and named reward/metric functions can be found.
"""

from __future__ import annotations

import re
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.model import shapes
from lorakit.recipe.loader import located, recipe_dir, resolve_path
from lorakit.recipe.schema import Recipe
from lorakit.train.rewards import load_reward

DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_local(path: str) -> bool:
    """A data path that names a local file or directory rather than a hub dataset id."""
    p = Path(path)
    return (p.suffix.lower() in DATA_SUFFIXES or path.startswith((".", "/", "~"))
            or any(ch in path for ch in "*?") or not _HUB_ID.match(path))


def _check_data_path(recipe: Recipe, value: str, field: str) -> str:
    if not looks_local(value):
        return f"{field}: {value} (a hub dataset id; not checked offline)"
    p = resolve_path(recipe, value)
    if any(ch in value for ch in "*?"):
        matches = list(p.parent.glob(p.name)) if p.parent.exists() else []
        if not matches:
            raise LorakitError(f"no file matches {value!r}", field=field)
        return f"{field}: {len(matches)} files match {value}"
    if not p.exists():
        raise LorakitError(f"file not found: {value} (looked in {Path.cwd()} and {recipe_dir(recipe)})", field=field,
                           hint="generate it first (see the recipe's comments) or fix the path")
    return f"{field}: {p}"


def _check_functions(recipe: Recipe) -> list[str]:
    found = []
    specs = []
    if recipe.grpo:
        specs += [(f"grpo.rewards.{i}.fn", s) for i, s in enumerate(recipe.grpo.rewards)]
    specs += [(f"evaluate.metrics.{i}.fn", s) for i, s in enumerate(recipe.evaluate.metrics)]
    for field, spec in specs:
        try:
            load_reward(spec, recipe_dir(recipe), field=field)
        except LorakitError as e:
            e.field = e.field or field
            raise
        found.append(f"{field}: {spec.fn}")
    return found


def warnings_for(recipe: Recipe) -> list[str]:
    """Legal but suspicious settings."""
    out = []
    if recipe.model.trust_remote_code:
        out.append(f"model.trust_remote_code is on: code from {recipe.base_model} will run on this machine")
    if recipe.model.allow_pickle:
        out.append("model.allow_pickle is on: pickle weight files can run code when loaded")
    if recipe.train.lr > 2e-3:
        out.append(f"train.lr {recipe.train.lr:g} is high for LoRA (typical 1e-4 to 1e-3)")
    ratio = recipe.lora.resolved_alpha / recipe.lora.r
    if not recipe.lora.rslora and (ratio < 0.5 or ratio > 4):
        out.append(f"lora.alpha/r = {ratio:g}; usual values are 1 to 2")
    return out


def validate_recipe(recipe: Recipe) -> dict:
    """Run every offline check; raise LorakitError (with the recipe line) on the first failure.

    Args:
        recipe: a loaded lorakit.recipe.schema.Recipe (its schema is already checked).

    Returns:
        {"ok": True, "recipe", "base_model", "targets" (the resolved target modules), "checks" (one line per
        check passed), "warnings" (legal but suspicious settings)}.
    """
    checks: list[str] = []
    with located(recipe):
        checks.append(_check_data_path(recipe, recipe.data.path, "data.path"))
        if isinstance(recipe.data.eval, str) and looks_local(recipe.data.eval) and Path(recipe.data.eval).suffix:
            checks.append(_check_data_path(recipe, recipe.data.eval, "data.eval"))
        try:
            shape = shapes.load_shape(recipe.base_model, revision=recipe.model.revision,
                                      trust_remote_code=recipe.model.trust_remote_code)
        except LorakitError as e:
            e.field = e.field or "base_model"
            raise
        checks.append(f"base_model: {recipe.base_model} ({shape.model_type}, {shape.num_layers} layers)")
        try:
            targets = shapes.check_targets(shape, recipe.lora)
        except LorakitError as e:
            e.field = e.field or "lora.targets"
            raise
        checks.append(f"lora.targets: {', '.join(targets)}")
        shapes.check_checkpoint_layers(shape, recipe.train)
        checks += _check_functions(recipe)
    return {"ok": True, "recipe": recipe._source, "base_model": recipe.base_model, "targets": targets,
            "checks": checks, "warnings": warnings_for(recipe)}
