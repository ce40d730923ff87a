"""The recipe schema: defaults, every section, cross-field rules, overrides, extends, error positions."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lorakit.errors import RecipeError
from lorakit.recipe.loader import json_schema, load_recipe, parse_override, to_resolved_yaml, validate_data
from lorakit.recipe.schema import Recipe

MINIMAL = "base_model: smollm2-135m-instruct\ndata: {path: data/train.jsonl}\n"


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def problems(exc: RecipeError) -> dict[str, tuple[int | None, str]]:
    return {p.field: (p.line, p.message) for p in exc.problems}


def test_minimal_recipe_resolves_every_default(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.method == "sft" and r.grpo is None
    assert r.quantization.bits == "auto"
    assert r.quantization.resolved_bits("cuda") == 4 and r.quantization.resolved_bits("cpu") is None
    assert (r.quantization.quant_type, r.quantization.double_quant) == ("nf4", True)
    assert r.lora.r == 16 and r.lora.resolved_alpha == 32 and r.lora.targets == "all-linear"
    assert r.lora.scale == pytest.approx(2.0)
    assert r.train.lr == 2e-4 and r.train.seed == 42 and r.train.max_steps is None
    assert r.data.max_length == 1024 and r.data.completion_only is True
    assert r.output.save == "adapter" and r.model.trust_remote_code is False and r.model.allow_pickle is False
    resolved = to_resolved_yaml(r)
    assert "trust_remote_code: false" in resolved and "double_quant: true" in resolved


def test_public_shape_from_the_issue(tmp_path):
    r = load_recipe(write(tmp_path, """\
        base_model: smollm2-135m-instruct
        quantization: {bits: 4, quant_type: nf4, double_quant: true, compute_dtype: auto}
        lora: {r: 16, alpha: 32, dropout: 0.05, targets: all-linear, rslora: false, dora: false}
        method: sft
        data: {path: data/quickstart.jsonl, format: auto, max_length: 512}
        train: {max_steps: 60, epochs: 1, lr: 2.0e-4, batch_size: 4, grad_accum: 1, seed: 42}
        output: {dir: runs/quickstart, save: adapter}
    """))
    assert r.quantization.bits == 4 and r.train.max_steps == 60 and r.data.max_length == 512


@pytest.mark.parametrize("given,expected", [("none", "none"), (None, "none"), (8, 8), ("4", 4), ("auto", "auto")])
def test_quantization_bits_spellings(tmp_path, given, expected):
    r = validate_data({"base_model": "x", "data": {"path": "d.jsonl"}, "quantization": {"bits": given}})
    assert r.quantization.bits == expected


def test_rslora_scale_and_exponent_floats(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "lora: {r: 64, alpha: 16, rslora: true}\ntrain: {lr: 1e-4}\n"))
    assert r.lora.scale == pytest.approx(16 / 8)
    assert r.train.lr == pytest.approx(1e-4)  # YAML 1.1 would read "1e-4" as a string


def test_errors_name_field_line_and_column_all_at_once(tmp_path):
    path = write(tmp_path, """\
        base_model: smollm2-135m-instruct
        quantization: {bits: 3}
        lora:
          r: -1
          rsloar: true
        data: {path: d.jsonl}
        train: {batch_size: four}
    """)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    got = problems(e.value)
    assert set(got) == {"quantization.bits", "lora.r", "lora.rsloar", "train.batch_size"}
    assert got["quantization.bits"][0] == 2
    assert got["lora.r"][0] == 4 and "greater than 0" in got["lora.r"][1]
    assert got["lora.rsloar"][0] == 5 and "did you mean 'rslora'" in got["lora.rsloar"][1]
    assert got["train.batch_size"][0] == 7 and "'four'" in got["train.batch_size"][1]
    rendered = e.value.render()
    assert f"{path}:4:3  lora.r:" in rendered


def test_unknown_top_level_key_suggests(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL + "trian: {lr: 1.0e-4}\n"))
    (p,) = e.value.problems
    assert p.field == "trian" and "did you mean 'train'" in p.message and p.line == 3


def test_missing_required_fields(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "lora: {r: 8}\n"))
    assert {"base_model", "data"} <= set(problems(e.value))
    assert "required" in problems(e.value)["data"][1]


def test_yaml_syntax_error_has_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "base_model: x\ndata: {path: [unclosed\n"))
    (p,) = e.value.problems
    assert "YAML syntax error" in p.message and p.line is not None and p.line >= 2


def test_duplicate_keys_are_errors(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL + "base_model: other\n"))
    assert "duplicate key 'base_model'" in e.value.problems[0].message
    assert e.value.problems[0].line == 3


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_not_a_mapping(tmp_path, text):
    with pytest.raises(RecipeError):
        load_recipe(write(tmp_path, text))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RecipeError, match="1 problem"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path)
    assert "directory" in e.value.problems[0].message


def test_not_utf8(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"base_model: \xff\xfe\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "UTF-8" in e.value.problems[0].message


# ---- cross-field rules ------------------------------------------------------------------------

CROSS = [
    ({"method": "grpo"}, "method", "grpo:"),
    ({"grpo": {"rewards": [{"fn": "exact_answer"}]}}, "grpo", "only used with `method: grpo`"),
    ({"lora": {"r": 4, "alpha": 128}}, "lora.alpha", "diverges"),
    ({"lora": {"init": "pissa"}, "quantization": {"bits": 4}}, "lora.init", "full-precision"),
    ({"lora": {"init": "loftq"}, "quantization": {"bits": 8}}, "lora.init", "full-precision"),
    ({"lora": {"dora": True}, "quantization": {"bits": 8}}, "lora.dora", "8-bit"),
    ({"data": {"path": "d.jsonl", "packing": True, "padding_free": True}}, "data.padding_free", "pick one"),
    ({"method": "grpo", "grpo": {"rewards": [{"fn": "exact_answer"}]}, "data": {"path": "d.jsonl", "packing": True}},
     "data.packing", "GRPO"),
    ({"train": {"precision": "fp16"}, "quantization": {"compute_dtype": "bf16"}}, "train.precision", "bf16"),
    ({"train": {"optimizer": "adamw_8bit"}, "distributed": {"strategy": "fsdp"}}, "train.optimizer", "FSDP"),
]


def test_auto_optimizer_follows_device_and_strategy():
    """bitsandbytes' paged 8-bit AdamW on a GPU, except under FSDP, whose sharded (DTensor) parameters it
    cannot update (measured: `optimizer_update_8bit_blockwise got mixed torch.Tensor and DTensor` on 2 H200s)."""
    from lorakit.recipe.rules import resolved_optimizer

    base = {"base_model": "x", "data": {"path": "d.jsonl"}}
    assert resolved_optimizer(validate_data(base), "cuda") == "paged_adamw_8bit"
    assert resolved_optimizer(validate_data(base), "cpu") == "adamw_torch"
    fsdp = validate_data({**base, "distributed": {"strategy": "fsdp"}})
    assert resolved_optimizer(fsdp, "cuda") == "adamw_torch"
    chosen = validate_data({**base, "train": {"optimizer": "adafactor"}, "distributed": {"strategy": "fsdp"}})
    assert resolved_optimizer(chosen, "cuda") == "adafactor"


@pytest.mark.parametrize("extra,field,text", CROSS)
def test_cross_field_rules(extra, field, text):
    data = {"base_model": "x", "data": {"path": "d.jsonl"}, **extra}
    with pytest.raises(RecipeError) as e:
        validate_data(data)
    got = problems(e.value)
    assert field in got and text in got[field][1]


def test_cross_field_rule_points_at_line(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL + "quantization: {bits: 8}\nlora:\n  dora: true\n"))
    assert problems(e.value)["lora.dora"][0] == 5


def test_allowed_combinations_pass():
    validate_data({"base_model": "x", "data": {"path": "d"}, "lora": {"dora": True, "rslora": True},
                   "quantization": {"bits": 4}})
    validate_data({"base_model": "x", "data": {"path": "d"}, "lora": {"init": "pissa"}, "quantization": {"bits": "none"}})
    r = validate_data({"base_model": "x", "data": {"path": "d"}, "method": "grpo",
                       "grpo": {"rewards": [{"fn": "exact_answer", "weight": 1.0}, {"fn": "rewards.py:mine", "weight": 0.5}],
                                "num_generations": 8, "max_completion_length": 128}})
    assert [s.weight for s in r.grpo.rewards] == [1.0, 0.5]


@pytest.mark.parametrize("section,value,fragment", [
    ("lora", {"targets": []}, "adapts nothing"),
    ("lora", {"targets": "everything"}, "all-linear"),
    ("lora", {"layers": [-1]}, "start at 0"),
    ("lora", {"dropout": 1.0}, "less than 1"),
    ("data", {"path": "d", "eval": 1.5}, "between 0 and 1"),
    ("train", {"lr": 0}, "greater than 0"),
    ("grpo", {"rewards": []}, "at least one reward"),
    ("grpo", {"rewards": [{"fn": "mod:"}]}, "module:function"),
    ("grpo", {"rewards": [{"fn": "exact_answer"}], "num_generations": 1}, "greater than or equal to 2"),
])
def test_field_rules(section, value, fragment):
    data = {"base_model": "x", "data": {"path": "d"}, section: value}
    if section == "grpo":
        data["method"] = "grpo"
    with pytest.raises(RecipeError) as e:
        validate_data(data)
    assert any(fragment in p.message for p in e.value.problems), e.value.render()


# ---- overrides ---------------------------------------------------------------------------------

def test_set_overrides_are_typed_yaml(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), ["lora.r=32", "train.lr=1e-4", "lora.targets=[q_proj,v_proj]",
                                                "quantization.bits=none", "output.save=both"])
    assert r.lora.r == 32 and r.train.lr == pytest.approx(1e-4)
    assert r.lora.targets == ["q_proj", "v_proj"] and r.quantization.bits == "none" and r.output.save == "both"


def test_set_errors_point_at_the_override(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL), ["lora.r=abc", "lora.rank=3"])
    rendered = e.value.render()
    assert "--set lora.r=abc  lora.r:" in rendered
    assert "--set lora.rank=3  lora.rank: unknown key 'rank'" in rendered


@pytest.mark.parametrize("bad", ["lora.r", "=3", "lora..r=3", "lora.r=[1,"])
def test_malformed_set(bad):
    with pytest.raises(RecipeError):
        parse_override(bad)


# ---- extends -----------------------------------------------------------------------------------

def test_extends_deep_merges_and_child_wins(tmp_path):
    write(tmp_path, MINIMAL + "lora: {r: 8, alpha: 16, dropout: 0.1}\ntrain: {lr: 1.0e-4}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nlora: {r: 32, alpha: 64}\n", "child.yaml")
    r = load_recipe(child)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.train.lr) == (32, 64, 0.1, 1e-4)
    assert r.base_model == "smollm2-135m-instruct"


def test_extends_errors_point_into_the_right_file(tmp_path):
    write(tmp_path, MINIMAL + "lora: {r: 0}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\ntrain: {lr: -1}\n", "child.yaml")
    with pytest.raises(RecipeError) as e:
        load_recipe(child)
    by_field = {p.field: p for p in e.value.problems}
    assert by_field["lora.r"].file.endswith("base.yaml") and by_field["lora.r"].line == 3
    assert by_field["train.lr"].file.endswith("child.yaml") and by_field["train.lr"].line == 2


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path, "extends: b.yaml\n" + MINIMAL, "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError) as e:
        load_recipe(tmp_path / "a.yaml")
    assert "cycle" in e.value.problems[0].message


def test_extends_missing_parent(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, "extends: nowhere.yaml\n" + MINIMAL))
    assert e.value.problems[0].field == "extends" and e.value.problems[0].line == 1


# ---- schema ------------------------------------------------------------------------------------

def test_json_schema_covers_sections_and_forbids_extras():
    s = json_schema()
    assert {"base_model", "lora", "quantization", "data", "train", "grpo", "output", "extends"} <= set(s["properties"])
    lora = s["$defs"]["LoraSection"]
    assert lora["additionalProperties"] is False
    assert "rank" in lora["properties"]["r"]["description"].lower()
    json.dumps(s)


def test_resolved_yaml_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "lora: {targets: [q_proj]}\n"))
    again = load_recipe(write(tmp_path, to_resolved_yaml(r), "resolved.yaml"))
    assert again.model_dump() == r.model_dump()
    assert isinstance(again, Recipe)


def test_relative_base_model_resolves_beside_the_recipe_like_data_paths(tmp_path, tiny_model_dir, monkeypatch):
    """`base_model: ./tiny-model` is found from the working dir, else beside the recipe (as data paths are):
    validate passes from another directory and the run's recipe.yaml names the directory absolutely.
    Aliases and hub ids name no directory and stay as written."""
    import shutil

    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.model.load import resolve_base_dir

    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "tiny-model")
    (project / "train.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    path = write(project, "base_model: ./tiny-model\ndata: {path: train.jsonl}\nlora: {targets: [q_proj]}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    result = CliRunner().invoke(app, ["validate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["base_model"] == str(project / "tiny-model")
    r = load_recipe(path)
    assert r.base_model == str(project / "tiny-model") and "tiny-model" in to_resolved_yaml(r)
    assert resolve_base_dir(r.base_model) == project / "tiny-model"

    shutil.copytree(tiny_model_dir, elsewhere / "tiny-model")  # the working dir comes first, as for data
    assert load_recipe(path).base_model == "./tiny-model"
    for name in ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert load_recipe(path, [f"base_model={name}"]).base_model == name


# ---- speed levers (train.gradient_checkpointing / memory_budget_gb / fused_lora, data.padding_free) --------

@pytest.mark.parametrize("given,expected", [("auto", "auto"), (True, True), (False, False), (0, 0), (12, 12),
                                            ("12", 12), ("off", False), ("true", True)])
def test_gradient_checkpointing_accepts_auto_bool_or_a_layer_count(given, expected):
    r = validate_data({"base_model": "x", "data": {"path": "d"}, "train": {"gradient_checkpointing": given}})
    got = r.train.gradient_checkpointing
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("section,value,fld,fragment", [
    ("train", {"gradient_checkpointing": -2}, "train.gradient_checkpointing", "0 or more"),
    ("train", {"gradient_checkpointing": "sometimes"}, "train.gradient_checkpointing",
     "expected auto, true, false or a number of layers"),
    ("train", {"gradient_checkpointing": 2.5}, "train.gradient_checkpointing", "number of layers"),
    ("train", {"memory_budget_gb": 0}, "train.memory_budget_gb", "greater than 0"),
    ("train", {"memory_budget_gb": "lots"}, "train.memory_budget_gb", "number"),
    ("train", {"fused_lora": "maybe"}, "train.fused_lora", "auto"),
    ("data", {"path": "d", "padding_free": "sometimes"}, "data.padding_free", "auto"),
])
def test_speed_lever_fields_reject_bad_values(section, value, fld, fragment):
    with pytest.raises(RecipeError) as e:
        validate_data({"base_model": "x", "data": {"path": "d"}, section: value})
    got = problems(e.value)
    assert fld in got and fragment in got[fld][1], e.value.render()


def test_speed_lever_defaults_and_cross_field_rules(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert (r.train.gradient_checkpointing, r.train.memory_budget_gb, r.train.fused_lora, r.train.liger,
            r.data.padding_free) == ("auto", None, "auto", "auto", "auto")
    # auto padding_free goes with packing (it resolves to off); an explicit true does not
    validate_data({"base_model": "x", "data": {"path": "d", "packing": True}})
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, MINIMAL + "lora: {dora: true}\ntrain: {fused_lora: true}\n"))
    assert problems(e.value)["train.fused_lora"][0] == 4  # the line of `train:` (flow mapping)
    assert "DoRA" in problems(e.value)["train.fused_lora"][1]
    with pytest.raises(RecipeError) as e:
        validate_data({"base_model": "x", "data": {"path": "d"}, "quantization": {"bits": 8},
                       "train": {"fused_lora": True}})
    assert "not 8-bit" in problems(e.value)["train.fused_lora"][1]
    validate_data({"base_model": "x", "data": {"path": "d"}, "lora": {"dora": True}, "train": {"fused_lora": "auto"}})


def test_speed_lever_fields_in_the_json_schema_and_resolved_yaml(tmp_path):
    s = json_schema()
    train, data = s["$defs"]["TrainSection"]["properties"], s["$defs"]["DataSection"]["properties"]
    assert {"gradient_checkpointing", "memory_budget_gb", "fused_lora", "liger"} <= set(train)
    assert "padding_free" in data and "budget" in train["memory_budget_gb"]["description"].lower()
    kinds = {x.get("type") or x.get("const") for x in train["gradient_checkpointing"]["anyOf"]}
    assert {"boolean", "integer"} <= kinds
    r = load_recipe(write(tmp_path, MINIMAL + "train: {gradient_checkpointing: 20, memory_budget_gb: 22.5}\n"))
    again = load_recipe(write(tmp_path, to_resolved_yaml(r), "resolved.yaml"))
    assert (again.train.gradient_checkpointing, again.train.memory_budget_gb) == (20, 22.5)
