"""The wide robustness sweep (issue 24): every option of every command in the positions a user writes it, with
good, bad and missing values, and every recipe key with a value of the wrong type, through lorakit.cli.main in
this process (the real argument handling, quick): the right exit code, no traceback, and the error names the
option or the field. The commands that would load weights are only given arguments that fail before that."""

from __future__ import annotations

import json
import os
import typing

import pytest
import yaml
from pydantic import BaseModel

from lorakit.recipe.schema import Recipe


@pytest.fixture(autouse=True)
def _environ_kept():
    """main() sets library switches in os.environ (progress bars, verbosity) for its process: give them back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def place(tmp_path, monkeypatch, tiny_model_dir):
    """A folder with r.yaml (the tiny model, a data file) and RUN (a directory that is no run)."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                               {"role": "assistant", "content": "b"}]}) + "\n")
    doc = {"base_model": str(tiny_model_dir), "quantization": {"bits": "none"}, "data": {"path": "d.jsonl"},
           "lora": {"targets": ["q_proj"]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "RUN").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def cli(argv: list[str], capsys) -> tuple[int, str]:
    from lorakit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code or 0, out.out + out.err


# (argv, exit code, words the output must hold)
CASES = [
    # validate: options before / after the recipe, values missing or bad
    (["validate", "r.yaml", "--schema-only"], 0, "valid"),
    (["validate", "--schema-only", "r.yaml"], 0, "valid"),
    (["validate", "--set", "lora.r=8", "r.yaml", "--schema-only", "--json"], 0, '"ok": true'),
    (["validate", "-s", "lora.r=8", "--schema-only", "r.yaml"], 0, "valid"),
    (["validate", "r.yaml", "--set"], 2, "--set"),
    (["validate", "r.yaml", "--set", "lora.r"], 2, "lora.r"),
    (["validate", "r.yaml", "--set", "=3"], 2, "--set"),
    (["validate", "r.yaml", "--set", "lora.r=[1"], 2, "lora.r"),
    (["validate", "r.yaml", "--set", "nope.key=1"], 2, "nope"),
    (["validate", "r.yaml", "--schema-only=yes"], 2, "--schema-only"),
    (["validate"], 2, "RECIPE"),
    (["validate", "missing.yaml"], 2, "missing.yaml"),
    (["validate", "RUN"], 2, "RUN"),
    (["validate", "r.yaml", "extra"], 2, "extra"),
    (["validate", "r.yaml", "--nope"], 2, "--nope"),
    (["--json", "validate", "r.yaml"], 2, "--json"),
    (["--debug", "validate", "r.yaml", "--schema-only"], 0, "valid"),
    # train: every option, failing before any weight loads
    (["train", "r.yaml", "--gpus", "0"], 2, "--gpus"),
    (["train", "r.yaml", "--gpus", "two"], 2, "--gpus"),
    (["train", "r.yaml", "--gpus"], 2, "--gpus"),
    (["train", "--gpus", "0", "r.yaml"], 2, "--gpus"),
    (["train", "r.yaml", "--set", "lora.r=0"], 2, "lora.r"),
    (["train", "r.yaml", "--set", "lora.r=0", "--json"], 2, '"field": "lora.r"'),
    (["train", "--json", "--set", "lora.r=0", "r.yaml"], 2, '"field": "lora.r"'),
    (["train", "r.yaml", "--set"], 2, "--set"),
    (["train", "r.yaml", "--resume"], 2, "--resume"),  # nothing to resume yet
    (["train", "r.yaml", "--resume", "RUN"], 2, "no state.json"),
    (["train", "r.yaml", "--resume", "no-such-dir"], 2, "does not exist"),
    (["train", "--resume", "RUN", "r.yaml", "--json"], 2, '"exit_code": 2'),
    (["train", "r.yaml", "--resume", "--overwrite"], 2, "pass one of them"),
    (["train", "r.yaml", "--overwrite", "--resume", "--set", "lora.r=8"], 2, "pass one of them"),
    (["train", "r.yaml", "--overwrite=1"], 2, "--overwrite"),
    (["train"], 2, "RECIPE"),
    (["train", "--resume"], 2, "RECIPE"),
    (["train", "r.yaml", "--nope"], 2, "--nope"),
    # estimate
    (["estimate", "r.yaml", "--device", "cpu", "--json"], 0, '"params"'),
    (["estimate", "--device", "cpu", "r.yaml"], 0, "Parameters"),
    (["estimate", "r.yaml", "--device", "tpu"], 2, "--device"),
    (["estimate", "r.yaml", "--device"], 2, "--device"),
    (["estimate", "r.yaml", "--budget", "lots"], 2, "lots"),
    (["estimate", "r.yaml", "--budget", "-3GiB"], 2, "--budget"),
    (["estimate", "r.yaml", "--budget"], 2, "--budget"),
    (["estimate", "r.yaml", "--gpu", "no-such-gpu"], 2, "no-such-gpu"),
    (["estimate", "r.yaml", "--gpus", "0"], 2, "--gpus"),
    (["estimate", "r.yaml", "--gpus", "x"], 2, "--gpus"),
    (["estimate", "r.yaml", "--strategy", "zero3", "--gpus", "2"], 2, "zero3"),
    (["estimate", "r.yaml", "--strategy", "fsdp"], 2, "--gpus"),
    (["estimate", "r.yaml", "--set", "lora.r=x"], 2, "lora.r"),
    (["estimate", "r.yaml", "--json", "--device", "tpu"], 2, '"ok": false'),
    # merge
    (["merge", "RUN"], 2, "--out"),
    (["merge", "RUN", "--out"], 2, "--out"),
    (["merge", "RUN", "-o", "m", "--dtype", "fp8"], 2, "--dtype"),
    (["merge", "--dtype", "fp8", "RUN", "-o", "m"], 2, "--dtype"),
    (["merge", "RUN", "-o", "m"], 2, "RUN"),
    (["merge", "no-such-run", "-o", "m", "--verify", "--from-quantized", "--overwrite", "--json"], 2, '"ok": false'),
    (["merge", "RUN", "-o", "m", "--base"], 2, "--base"),
    (["merge", "RUN", "-o", "RUN"], 2, "RUN"),
    (["merge", "-o", "m"], 2, "--adapter"),  # neither a run nor --adapter
    # generate
    (["generate", "RUN"], 2, "--prompt"),
    (["generate", "RUN", "-p"], 2, "-p"),
    (["generate", "RUN", "-p", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens"),
    (["generate", "RUN", "-p", "hi", "--max-new-tokens", "many"], 2, "--max-new-tokens"),
    (["generate", "--prompt", "hi", "RUN", "--base-only"], 2, "RUN"),
    (["generate", "no-such-run", "-p", "hi"], 2, "no such run directory"),
    # init / schema / recipes
    (["init", "new.yaml", "--preset", "nope"], 2, "nope"),
    (["init", "--preset"], 2, "--preset"),
    (["init", "--preset", "quickstart", "new.yaml"], 0, "wrote new.yaml"),
    (["init", "r.yaml"], 2, "r.yaml"),
    (["init", "r.yaml", "--force", "--preset", "nope"], 2, "nope"),
    (["schema", "--out"], 2, "--out"),
    (["schema", "-o", "RUN"], 2, "RUN"),
    (["schema", "extra"], 2, "extra"),
    (["recipes", "--json", "extra"], 2, "extra"),
    (["recipes", "--json"], 0, '"name"'),
    (["nope"], 2, "nope"),
    (["--version"], 0, "lorakit"),
    (["--version", "validate"], 0, "lorakit"),
]


@pytest.mark.parametrize("argv,code,words", CASES, ids=[" ".join(a) for a, _, _ in CASES])
def test_every_option_in_every_position(place, capsys, argv, code, words):
    got, out = cli(argv, capsys)
    assert got == code, out[-2000:]
    assert "Traceback" not in out
    assert words.lower() in out.lower(), out[-2000:]
    assert "This is a bug" not in out  # a LorakitError or click's own message, never an unexpected exception


# ---- every recipe key, with a value of the wrong type ------------------------------------------------------


def _model(annotation):
    """The pydantic model a field holds (through Optional or a list), else None."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def recipe_keys(model=Recipe, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, a value of the wrong type for it): a mapping where a scalar or a list is expected, a list
    where a mapping is; every field of every section, and every section."""
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        origin = typing.get_origin(info.annotation)
        if info.annotation is typing.Any:
            continue
        out.append((key, [1, 2] if origin is dict else {"x": [1]}))
        sub = _model(info.annotation)
        if sub is not None:  # a section, or a list of them (grpo.rewards, evaluate.metrics): its first item
            out += recipe_keys(sub, key + (".0." if origin is list else "."))
    return out


KEYS = recipe_keys()


def test_the_key_sweep_covers_the_recipe():
    keys = {k for k, _ in KEYS}
    assert {"base_model", "lora.r", "lora.targets", "data.columns", "train.lr", "train.nan_policy", "grpo.beta",
            "evaluate.metrics", "evaluate.metrics.0.fn", "grpo.rewards.0.args", "output.save", "distributed.strategy",
            "model.revision"} <= keys
    assert len(keys) > 80


@pytest.mark.parametrize("key,value", KEYS, ids=[k for k, _ in KEYS])
def test_every_recipe_key_with_a_wrong_type(place, capsys, key, value):
    method = ["--set", "method=grpo", "--set", "grpo={rewards: [{fn: exact_answer}]}"] if key.startswith("grpo.") \
        else []
    if ".0." in key:  # an item of a list (--set cannot index one): written in the recipe file
        section, field = key.split(".0.")
        doc = yaml.safe_load((place / "r.yaml").read_text())
        doc.setdefault(section.split(".")[0], {})[section.split(".")[1]] = [{"fn": "json_match", field: value}]
        (place / "r.yaml").write_text(yaml.safe_dump(doc))
        set_ = ["--set", "grpo.num_generations=2"] if key.startswith("grpo.") else []
    else:
        set_ = ["--set", f"{key}={json.dumps(value)}"]
    if key.startswith("grpo.rewards.0"):
        method = ["--set", "method=grpo"]
    got, out = cli(["validate", "r.yaml", "--schema-only", "--json", *method, *set_], capsys)
    assert got == 2, out[-2000:]
    assert "Traceback" not in out
    doc = json.loads(out)
    fields = [p["field"] for p in doc["problems"]] or [doc["field"]]
    assert any(f == key or f.startswith(key + ".") for f in fields), (key, doc)
