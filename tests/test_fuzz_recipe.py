"""Fuzzing the recipe loader: random and mutated recipes end in a Recipe or a clean RecipeError.

Never an uncaught exception, never a problem without a message, and every reported line exists in
the file that was read.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lorakit.errors import RecipeError
from lorakit.recipe.loader import load_recipe
from lorakit.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes").glob("*.yaml"))]
KEYS = ["base_model", "lora", "r", "alpha", "targets", "quantization", "bits", "data", "path", "train", "lr",
        "method", "grpo", "rewards", "fn", "output", "save", "max_length", "extends", "evaluate", "rslora"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["nf4", "all-linear", "sft", "grpo", "none", "4", "1e-4"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6),
                                                                       inner, max_size=4)), max_leaves=12)
SETTINGS = settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck))


def _check(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        n_lines = max(1, len(text.splitlines()) + 1)
        try:
            recipe = load_recipe(path)
        except RecipeError as e:
            assert e.problems, "a RecipeError lists at least one problem"
            for p in e.problems:
                assert p.message
                if p.file == str(path) and p.line is not None:
                    assert 1 <= p.line <= n_lines
            assert e.render()
        else:
            assert isinstance(recipe, Recipe)


def _dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=8))
def test_random_mappings(doc):
    _check(_dump(doc))


@st.composite
def mutated(draw):
    doc = copy.deepcopy(draw(st.sampled_from(SHIPPED)))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(sorted(doc)))
        target = doc if not isinstance(doc[section], dict) or not doc[section] else doc[section]
        key = draw(st.sampled_from(sorted(target)))
        action = draw(st.sampled_from(["delete", "replace", "add", "retype"]))
        if action == "delete":
            del target[key]
        elif action == "replace":
            target[key] = draw(values)
        elif action == "add":
            target[draw(st.text(min_size=1, max_size=8))] = draw(scalars)
        else:
            target[key] = [target[key]] if not isinstance(target[key], list) else {"x": target[key]}
        if not doc:
            break
    return doc


@SETTINGS
@given(mutated())
def test_mutated_shipped_recipes(doc):
    _check(_dump(doc))


@SETTINGS
@given(st.sampled_from([_dump(d) for d in SHIPPED]), st.integers(0, 2000), st.text(max_size=6))
def test_corrupted_yaml_text(text, position, junk):
    i = position % (len(text) + 1)
    _check(text[:i] + junk + text[i + len(junk):])


# ----------------------------------------------------------------------------------------------
# --set overrides, and whole recipes through `validate` (files, model shape, targets, functions)
# ----------------------------------------------------------------------------------------------

BAD = ROOT / "tests" / "bad_inputs"
OVERRIDE_KEYS = ["lora.r", "lora.alpha", "lora.targets", "lora.layers", "train.lr", "train.max_steps",
                 "quantization.bits", "data.path", "data.eval", "data.format", "method", "grpo.rewards",
                 "output.save", "extends", "model.allow_pickle", "evaluate.metrics", "lora", "train", "x.y.z"]
QUICKSTART = (ROOT / "recipes" / "quickstart.yaml").read_text(encoding="utf-8")


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(OVERRIDE_KEYS) | st.text(max_size=10),
                          st.sampled_from(["=", "==", ":", ""]), st.text(max_size=12) | scalars.map(str)),
                max_size=3))
def test_random_set_overrides(sets):
    """`--set KEY=VALUE` strings, well-formed or not, end in a Recipe or a clean RecipeError/LorakitError."""
    from lorakit.errors import LorakitError

    overrides = [f"{k}{sep}{v}" for k, sep, v in sets]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.yaml"
        path.write_text(QUICKSTART, encoding="utf-8")
        try:
            recipe = load_recipe(path, overrides)
        except LorakitError as e:
            assert e.message and e.exit_code == 2 and e.render()
        else:
            assert isinstance(recipe, Recipe)


def _valid_base() -> dict:
    return {"name": "fuzz", "base_model": str(BAD / "models" / "llama-shape"),
            "data": {"path": str(BAD / "data" / "chat.jsonl")},
            "lora": {"r": 8, "targets": ["q_proj", "v_proj"]}}


PARTS = {
    "base_model": st.sampled_from([str(BAD / "models" / m) for m in
                                   ("llama-shape", "no-config", "unknown-arch", "remote-code", "broken-config",
                                    "pickle-only", "missing")] + ["smollm2-135m-instruct", "org/unknown-xyz", ""]),
    "data": st.fixed_dictionaries({}, optional={
        "path": st.sampled_from([str(p) for p in sorted((BAD / "data").iterdir())] + ["missing.jsonl", "a/b"]),
        "eval": st.sampled_from([0.1, 0.5, str(BAD / "data" / "chat.jsonl"), "missing-eval.jsonl", 3]),
        "format": st.sampled_from(["auto", "messages", "alpaca", "text", "prompt", "weird"])}),
    "lora": st.fixed_dictionaries({}, optional={
        "targets": st.sampled_from(["all-linear", "attention", "mlp", ["q_proj"], ["c_attn"], ["lm_head"], []]),
        "layers": st.lists(st.integers(-2, 4), max_size=3), "r": st.integers(-1, 64)}),
    "method": st.sampled_from(["sft", "grpo"]),
    "grpo": st.fixed_dictionaries({"rewards": st.lists(st.fixed_dictionaries({"fn": st.sampled_from(
        ["exact_answer", "nope", f"{BAD}/rewards/raising.py:score", f"{BAD}/rewards/broken_import.py:score",
         f"{BAD}/rewards/syntax_error.py:score", f"{BAD}/rewards/raising.py:NOT_A_FUNCTION", "os:system",
         "json:loads"])}), max_size=2)}),
    "evaluate": st.fixed_dictionaries({}, optional={"metrics": st.lists(st.fixed_dictionaries({"fn": st.sampled_from(
        ["json_match", "exact_answer", f"{BAD}/rewards/raising.py:metric", "missing.py:f"])}), max_size=2)}),
    "model": st.fixed_dictionaries({}, optional={"trust_remote_code": st.booleans(), "allow_pickle": st.booleans()}),
}


@st.composite
def validate_cases(draw):
    doc = _valid_base()
    for key in draw(st.lists(st.sampled_from(sorted(PARTS)), unique=True, max_size=4)):
        value = draw(PARTS[key])
        doc[key] = {**doc[key], **value} if isinstance(doc.get(key), dict) and isinstance(value, dict) else value
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(validate_cases())
def test_recipes_through_validate(doc):
    """validate's checks beyond the schema (files, config.json, targets, reward imports): success or a clean
    LorakitError with its exit code, never another exception."""
    from lorakit.errors import LorakitError
    from lorakit.validate import validate_recipe

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.yaml"
        path.write_text(_dump(doc), encoding="utf-8")
        try:
            report = validate_recipe(load_recipe(path))
        except LorakitError as e:
            assert e.message and e.exit_code in (1, 2) and e.render()
            event(f"error {e.exit_code}")
        else:
            assert report["ok"] and report["targets"]
            event("valid")
