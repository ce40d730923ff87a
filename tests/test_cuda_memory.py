"""lorakit.speed.cuda_memory: train.expandable_segments turns the allocator setting on for a CUDA run, leaves a
PYTORCH_CUDA_ALLOC_CONF the user set alone, and does nothing without a GPU."""

import pytest
import torch

from lorakit.speed import cuda_memory


@pytest.fixture
def settings(monkeypatch):
    """What the run asked the allocator for, on a machine that claims a GPU."""
    asked = []
    monkeypatch.delenv(cuda_memory.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", asked.append)
    return asked


def test_on_by_request(settings):
    assert cuda_memory.use_expandable_segments(True) is True
    assert settings == ["expandable_segments:True"]


def test_off_by_request(settings):
    assert cuda_memory.use_expandable_segments(False) is False
    assert settings == []


@pytest.mark.parametrize("env,on", [("expandable_segments:True", True), ("max_split_size_mb:128", False),
                                    ("garbage_collection_threshold:0.6, expandable_segments: true", True)])
def test_the_users_setting_wins(settings, monkeypatch, env, on):
    monkeypatch.setenv(cuda_memory.ENV, env)
    assert cuda_memory.use_expandable_segments(True) is on
    assert cuda_memory.use_expandable_segments(False) is on
    assert settings == []


def test_nothing_without_a_gpu(settings, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_memory.use_expandable_segments(True) is False
    assert settings == []


def test_a_torch_without_the_setting_keeps_its_allocator(settings, monkeypatch):
    def refuse(_):
        raise RuntimeError("unknown allocator option")

    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", refuse)
    assert cuda_memory.use_expandable_segments(True) is False


def test_the_recipe_field_defaults_on_and_names_itself_when_wrong():
    from lorakit.errors import RecipeError
    from lorakit.recipe.loader import validate_data

    doc = {"base_model": "llama-3.1-8b", "data": {"path": "d.jsonl"}}
    assert validate_data(doc).train.expandable_segments is True
    with pytest.raises(RecipeError) as e:
        validate_data({**doc, "train": {"expandable_segments": "sometimes"}})
    assert [p.field for p in e.value.problems] == ["train.expandable_segments"]
