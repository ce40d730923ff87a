"""Shared fixtures: tiny random models (built from a config, seconds) and a byte-level tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_model, chat_rows, modeling_modules_restored, write_jsonl

if not torch.cuda.is_available():
    # tests/test_lora_triton.py runs lorakit's Triton kernels in Triton's interpreter on a CPU; it must be on before
    # anything imports triton (bitsandbytes does). lorakit itself never runs the kernels on a CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped on a machine without it (CI), run by `-m gpu` on a GPU machine."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _unpatched_transformers():
    """Every test on a GPU machine starts from transformers' own Llama modules (Liger is applied only on CUDA)."""
    if not torch.cuda.is_available():
        yield
        return
    with modeling_modules_restored(("transformers.models.llama.modeling_llama",)):
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama-style model directory (untied embeddings)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama-style model with tied input/output embeddings."""
    path = tmp_path_factory.mktemp("tiny-llama-tied")
    build_tiny_model(path, tie=True)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory with a small chat dataset (train.jsonl, eval.jsonl)."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    write_jsonl(tmp_path / "eval.jsonl", chat_rows(4, offset=3))
    return tmp_path


@pytest.fixture
def bf16_gpu(monkeypatch):
    """Plan for "cuda" on this CPU machine: a bf16-capable GPU, no Liger."""
    import lorakit.runtime.device
    from lorakit.speed import planning

    monkeypatch.setattr(lorakit.runtime.device, "auto_dtype_name", lambda d: "bf16" if d == "cuda" else "fp32")
    monkeypatch.setattr(planning, "liger_available", lambda: False)
