"""Fuzzing the recipe loader: random and mutated recipes end in a Recipe or a clean RecipeError.

Never an uncaught exception, never a problem without a message, and every reported line exists in
the file that was read.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.errors import RecipeError
from lorakit.recipe import Recipe, load_recipe

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
