"""Loading a recipe: YAML with the line of every key, `extends`, `--set`, and validation errors at file:line.

`load_recipe(path, overrides)` is the only way in: it reads the YAML (keeping the line and column
of every key), follows `extends:` (deep merge, cycles detected), applies `--set key=value`
overrides (values parsed as YAML), validates the result against `Recipe` and the cross-field rules,
and raises one `RecipeError` listing every problem with its `file:line:col`. The helpers at the end
answer where things are: the recipe's directory, a path it names, the run directory, a field's line.

Only pydantic and pyyaml are imported here: validation must stay fast (no torch).
"""

from __future__ import annotations

import difflib
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lorakit.errors import LorakitError, Problem, RecipeError
from lorakit.recipe.rules import cross_field_problems
from lorakit.recipe.schema import Recipe

# ----------------------------------------------------------------------------------------------
# YAML with positions
# ----------------------------------------------------------------------------------------------

Pos = tuple[str, int | None, int | None]  # file, line, column (1-based)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also accepts 1e-4 style floats (YAML 1.1 needs a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _walk(node: yaml.Node, file: str, prefix: tuple, positions: dict[tuple, Pos]) -> Any:
    """Construct Python data from a composed node while recording every key's position."""
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for k_node, v_node in node.value:
            if not isinstance(k_node, yaml.ScalarNode):
                raise _YamlProblem(file, k_node.start_mark, "keys must be plain names")
            key = k_node.value
            if key in out:
                raise _YamlProblem(file, k_node.start_mark, f"duplicate key {key!r}")
            path = prefix + (key,)
            positions[path] = (file, k_node.start_mark.line + 1, k_node.start_mark.column + 1)
            out[key] = _walk(v_node, file, path, positions)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            path = prefix + (i,)
            positions[path] = (file, item.start_mark.line + 1, item.start_mark.column + 1)
            items.append(_walk(item, file, path, positions))
        return items
    loader = _Loader("")
    return loader.construct_object(node, deep=True)


class _YamlProblem(Exception):
    def __init__(self, file: str, mark: Any, message: str):
        self.problem = Problem("", message, file, mark.line + 1 if mark else None, mark.column + 1 if mark else None)


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, Pos]]:
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem("", f"recipe file not found: {shown}")]) from None
    except IsADirectoryError:
        raise RecipeError([Problem("", f"{shown} is a directory, not a recipe file")]) from None
    except UnicodeDecodeError as e:
        raise RecipeError([Problem("", f"not UTF-8 text (byte {e.start})", shown)]) from None
    except OSError as e:
        raise RecipeError([Problem("", f"cannot read {shown}: {e.strerror}")]) from None
    positions: dict[tuple, Pos] = {}
    try:
        node = yaml.compose(text, Loader=_Loader)
        if node is None:
            raise RecipeError([Problem("", "the recipe file is empty (start from `lorakit init`)", shown)])
        data = _walk(node, shown, (), positions)
    except _YamlProblem as e:
        raise RecipeError([e.problem]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        what = getattr(e, "problem", None) or str(e)
        raise RecipeError([Problem("", f"YAML syntax error: {what}", shown,
                                   mark.line + 1 if mark else None, mark.column + 1 if mark else None)]) from None
    if not isinstance(data, dict):
        raise RecipeError([Problem("", f"a recipe is a mapping of sections (got {type(data).__name__})", shown, 1, 1)])
    return data, positions


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[tuple, Pos]]:
    data, positions = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, positions
    f, line, col = positions[("extends",)]
    if not isinstance(parent, str) or not parent.strip():
        raise RecipeError([Problem("extends", f"expected a recipe file path (got {parent!r})", f, line, col)])
    parent_path = Path(parent) if Path(parent).is_absolute() else path.parent / parent
    if not parent_path.is_file():
        raise RecipeError([Problem("extends", f"file not found: {parent_path}", f, line, col)])
    chain = (*chain, path.resolve())
    if parent_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, parent_path.resolve()))
        raise RecipeError([Problem("extends", f"`extends` forms a cycle: {cycle}", f, line, col)])
    pdata, ppos = _load_with_extends(parent_path, chain)
    merged_pos = dict(ppos)
    merged_pos.update({k: v for k, v in positions.items() if k != ("extends",)})
    return _deep_merge(pdata, data), merged_pos


def parse_override(text: str) -> tuple[list[str], Any]:
    """`lora.r=32` -> (["lora", "r"], 32); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError([Problem("--set", f"expected KEY=VALUE with a dotted key, e.g. lora.r=32 (got {text!r})")])
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        what = getattr(e, "problem", e)
        raise RecipeError([Problem(key, f"--set value is not valid YAML: {what}", "--set")]) from None
    return key.split("."), value


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


# ----------------------------------------------------------------------------------------------
# Validation errors -> problems with positions
# ----------------------------------------------------------------------------------------------


def _position(positions: dict[tuple, Pos], loc: tuple, default_file: str) -> Pos:
    for n in range(len(loc), 0, -1):
        if loc[:n] in positions:
            return positions[loc[:n]]
    return (default_file, None, None)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of `loc`."""
    model: Any = Recipe
    for key in loc[:-1]:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for c in candidates:
            for cc in [c, *getattr(c, "__args__", ())]:
                if isinstance(cc, type) and issubclass(cc, BaseModel):
                    nxt = cc
        if nxt is None:
            return None
        model = nxt
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


# Names other tools (peft, TRL, transformers, Axolotl) use for our keys: suggested on unknown keys.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
    "use_rslora": "rslora", "use_dora": "dora", "init_lora_weights": "init", "layers_to_transform": "layers",
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "lr_scheduler_type": "scheduler",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "optim": "optimizer", "max_seq_length": "max_length",
    "sequence_len": "max_length", "load_in_4bit": "bits", "load_in_8bit": "bits", "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant", "bnb_4bit_compute_dtype": "compute_dtype", "output_dir": "dir",
    "model_name_or_path": "base_model", "base_model_id": "base_model", "dataset": "data", "datasets": "data",
    "training": "train", "peft": "lora", "bnb": "quantization",
}


def _describe(err: dict) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    given = err.get("input")
    if kind == "extra_forbidden" and loc:
        model = _model_at(loc)
        names = list(model.model_fields) if model else []
        hint = [SYNONYMS[str(loc[-1])]] if SYNONYMS.get(str(loc[-1])) in names else \
            difflib.get_close_matches(str(loc[-1]), names, n=1)
        msg = f"unknown key {loc[-1]!r}"
        if hint:
            msg += f" (did you mean {hint[0]!r}?)"
        elif names:
            msg += f" (allowed: {', '.join(names)})"
        return msg
    if kind == "missing":
        return "required, but not given"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if given is not None and not isinstance(given, (dict, list)) and "(got" not in msg:
        msg += f" (got {given!r})"
    return msg


_UNION_TAG = re.compile(r"^(?:[a-z-]+\[.*\]|str|int|float|bool|none|list|literal)$")


def _user_loc(loc: tuple, keep_last: bool) -> tuple:
    """Drop pydantic's union-branch tags (e.g. 'list[str]') from an error location; keep user keys."""
    head, tail = (loc[:-1], loc[-1:]) if keep_last and loc else (loc, ())
    return tuple(x for x in head if not (isinstance(x, str) and _UNION_TAG.match(x))) + tail


def _problems_from(error: ValidationError, positions: dict[tuple, Pos], default_file: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    # a union of alternatives (e.g. targets: preset | list) reports one error per branch:
    # keep one message per field, the first is the most specific after our ordering.
    for err in error.errors():
        loc = _user_loc(tuple(err["loc"]), keep_last=err["type"] == "extra_forbidden")
        dotted = ".".join(str(x) for x in loc)
        if any(dotted == d for d, _ in seen):
            continue
        msg = _describe({**err, "loc": loc})
        seen.add((dotted, msg))
        f, line, col = _position(positions, loc, default_file)
        problems.append(Problem(dotted, msg, f, line, col))
    return problems


def validate_data(data: dict, positions: dict[tuple, Pos] | None = None, source: str = "<recipe>") -> Recipe:
    """Validate an already-parsed recipe mapping: the schema, then the cross-field rules.

    Args:
        data: the recipe as plain Python data.
        positions: (file, line, column) of each key path, for the errors; none known by default.
        source: the name errors give when a key has no position.

    Returns:
        The validated Recipe.
    """
    positions = positions or {}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_problems_from(e, positions, source), source=source) from None
    cross = cross_field_problems(recipe)
    if cross:
        raise RecipeError([Problem(fld, text, *_position(positions, tuple(fld.split(".")), source))
                           for fld, text in cross], source=source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, merge, override and validate a recipe file.

    Args:
        path: the recipe's YAML file; `extends:` paths resolve beside it.
        overrides: `--set` texts, `dotted.key=value` (the value parsed as YAML), applied in order.

    Returns:
        The validated Recipe, which remembers its file and the line of every key (for `located`).

    Raises:
        RecipeError: every problem found, each with its field and file:line:col.
    """
    path = Path(path)
    data, positions = _load_with_extends(path)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
        positions[tuple(keys)] = (f"--set {text}", None, None)
    recipe = validate_data(data, positions, str(path))
    recipe._source_dir = path.resolve().parent
    recipe._positions = positions
    recipe._source = str(path)
    _locate_base_model(recipe)
    return recipe


def _locate_base_model(recipe: Recipe) -> None:
    """A relative `base_model` directory resolves like a data path (working dir first, then beside the
    recipe); one found beside the recipe is written absolute, so the run's recipe.yaml finds it from
    anywhere. Aliases and hub ids name no such path and stay as written."""
    given = Path(recipe.base_model).expanduser()
    try:
        found = resolve_path(recipe, recipe.base_model)
    except OSError:  # a name no file system takes (too long): the loaders report it
        return
    if found != given:
        recipe.base_model = str(found)


@contextmanager
def located(recipe: Recipe):
    """Add the recipe file and line to a LorakitError raised about one of its fields.

    Code that checks a recipe beyond its schema (files, model shape, targets) raises
    `LorakitError(..., field="lora.targets")`; inside this block the error gains `file:line:col`.
    """
    try:
        yield
    except LorakitError as e:
        if e.field and not e.problems:
            loc = tuple(int(k) if k.isdigit() else k for k in e.field.split("."))
            f, line, col = _position(recipe._positions or {}, loc, recipe._source or "<recipe>")
            e.problems = [Problem(e.field, e.message, f, line, col)]
            e.message = f"{recipe._source or 'recipe'}: problem in the recipe"
        raise


def recipe_dir(recipe: Recipe) -> Path:
    """Directory of the recipe file (relative data paths and a relative base_model directory resolve
    against the working dir first, then this)."""
    return recipe._source_dir or Path.cwd()


def resolve_path(recipe: Recipe, p: str) -> Path:
    """A path named in the recipe: as given if it exists from the working dir, else relative to the recipe."""
    cand = Path(p).expanduser()
    if cand.is_absolute() or cand.exists():
        return cand
    beside = recipe_dir(recipe) / cand
    return beside if beside.exists() else cand


def output_dir(recipe: Recipe) -> Path:
    """The run directory: output.dir with {name} replaced by the recipe's name."""
    return Path(recipe.output.dir.replace("{name}", recipe.name))


def to_resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default written out, as YAML (saved in the run directory)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def json_schema() -> dict:
    """JSON Schema of the recipe, for editors' YAML language servers."""
    schema = Recipe.model_json_schema()
    schema["properties"]["extends"] = {"type": "string",
                                       "description": "Another recipe file to start from (deep merge)."}
    schema["title"] = "lorakit recipe"
    return schema
