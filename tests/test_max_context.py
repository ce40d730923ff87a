"""lorakit.estimate.max_context (`lorakit estimate --max-context`): the longest row at batch 1 whose forecast fits,
to RESOLUTION tokens, from the same plan and memory model `lorakit train` uses."""

import json

import pytest

from lorakit.errors import LorakitError
from lorakit.estimate.max_context import RESOLUTION, at_length, longest_row
from lorakit.estimate.memory import GPUS, estimate
from lorakit.recipe.loader import validate_data

GIB = 1024**3


def _recipe(**train):
    return validate_data({"base_model": "llama-3.1-8b", "data": {"path": "d.jsonl", "max_length": 2048},
                          "quantization": {"bits": 4}, "lora": {"r": 16, "alpha": 32},
                          "train": {"batch_size": 2, **train}})


def _peak(recipe, tokens: int, gpu: int) -> int:
    return estimate(at_length(recipe, tokens), device="cuda", device_bytes=gpu)["memory"]["peak_bytes"]


def test_the_longest_row_fits_and_one_step_longer_does_not():
    r = _recipe()
    got = longest_row(r, budget_bytes=24 * GIB)
    n = got["max_context"]
    assert n % RESOLUTION == 0 and n > 8 * RESOLUTION and got["limited_by"] == "memory"
    assert got["peak_bytes"] == _peak(r, n, 24 * GIB) <= 24 * GIB < _peak(r, n + RESOLUTION, 24 * GIB)
    assert got["setup"]["batch_size"] == 1 and got["setup"]["seq_len"] == n


def test_offloaded_checkpoints_lengthen_the_longest_row():
    on = longest_row(_recipe(), budget_bytes=GPUS["h100"])
    off = longest_row(_recipe(offload_activations=False), budget_bytes=GPUS["h100"])
    assert on["setup"]["offload_activations"] and not off["setup"]["offload_activations"]
    assert on["max_context"] > 1.5 * off["max_context"]


def test_nothing_fits_a_budget_below_the_weights():
    assert longest_row(_recipe(), budget_bytes=2 * GIB) == {"max_context": 0, "budget_bytes": 2 * GIB,
                                                           "limited_by": "memory"}


def test_grpo_recipes_are_refused():
    r = validate_data({"base_model": "llama-3.1-8b", "method": "grpo", "data": {"path": "d.jsonl"},
                       "grpo": {"rewards": [{"fn": "builtin:length"}]}})
    with pytest.raises(LorakitError) as e:
        longest_row(r, budget_bytes=GPUS["h100"])
    assert e.value.field == "--max-context"


def test_the_cli_answers_for_a_named_gpu_and_needs_one_without_a_local_gpu(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lorakit.cli import app

    p = tmp_path / "r.yaml"
    p.write_text("base_model: llama-3.1-8b\ndata: {path: d.jsonl}\nquantization: {bits: 4}\n")
    ok = CliRunner().invoke(app, ["estimate", str(p), "--max-context", "--gpu", "l4", "--json"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.output)
    assert doc["gpu"] == "l4" and doc["budget_bytes"] == GPUS["l4"] and doc["max_context"] > 0
    text = CliRunner().invoke(app, ["estimate", str(p), "--max-context", "--budget", "24GiB"])
    assert text.exit_code == 0 and f"{doc['max_context']:,} tokens" not in text.output
    assert "Longest row at batch 1 on a 24.00 GiB budget" in text.output
    monkeypatch.setattr("lorakit.runtime.device.local_gpu", lambda: None)
    none = CliRunner().invoke(app, ["estimate", str(p), "--max-context"])
    assert none.exit_code == 2 and "--gpu" in none.output and "Traceback" not in none.output
