"""No third-party log line reaches the user's terminal (issue 24): `lorakit train` (4-bit, with an eval set),
`merge`, `generate` and `estimate` in their own processes on the tiny model; `--debug` lets the libraries talk.
`noise` is also used by the resume and quickstart tests on their outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import chat_rows, write_jsonl

ENV = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

KNOWN = [  # messages libraries print that were seen in lorakit's output
    r"Failed to load CPU gemm_4bit_forward", r"kernels-community", r"autograd kernel was not registered",
    r"Writing model shards", r"Loading checkpoint shards",
]
GENERIC = [
    r"^\S+\.py:\d+: \w*(Warning|Error)\b",  # the warnings module's format: path.py:12: UserWarning: ...
    r"^\s*[\w.]*(Warning|Deprecation)\w*: ",  # a bare SomeWarning: line
    r"^\s*warnings\.warn\(",
    r"^(torch|transformers|peft|trl|bitsandbytes|accelerate|datasets|huggingface_hub|liger_kernel)[\w.]*\s*[:\-]",
    r"^(WARNING|INFO|DEBUG)\b", r"Traceback \(most recent call last\)", r"\d+it/s\]|it/s\]",
]


def noise(text: str) -> list[str]:
    """The lines of `text` that a library printed (KNOWN messages, or the shapes of warnings and log lines)."""
    pats = [re.compile(p) for p in KNOWN + GENERIC]
    return [line for line in text.splitlines() if any(p.search(line) for p in pats)]


def test_noise_finds_what_libraries_print():
    assert noise("/x/torch/autograd/graph.py:979: UserWarning: bitsandbytes::gemv_4bit: an autograd kernel ...")
    assert noise("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    assert noise("FutureWarning: `foo` is deprecated") and noise("transformers.modeling_utils: something")
    assert not noise("step=1/3 loss=6.0396 lr=0.00e+00 tok/s=1834 eta=0s\neval loss before: 6.0361\n"
                     "warning: data.eval has 2 rows")


def _lorakit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_commands_print_no_library_noise(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    write_jsonl(tmp_path / "eval.jsonl", chat_rows(2, offset=3))
    doc = {"name": "q", "base_model": str(tiny_model_dir), "quantization": {"bits": 4},
           "lora": {"r": 4, "targets": ["q_proj", "v_proj"]},
           "data": {"path": "train.jsonl", "eval": "eval.jsonl", "max_length": 64},
           "train": {"max_steps": 2, "lr": 1e-3, "warmup_ratio": 0.0, "batch_size": 4, "logging_steps": 1},
           "evaluate": {"metrics": []}, "output": {"dir": "runs/q"}}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(doc))
    outputs = {
        "train": _lorakit(tmp_path, "train", "q.yaml"),
        "merge": _lorakit(tmp_path, "merge", "runs/q", "--out", "merged"),
        "generate": _lorakit(tmp_path, "generate", "runs/q", "-p", "hi", "--max-new-tokens", "4"),
        "estimate": _lorakit(tmp_path, "estimate", "q.yaml", "--device", "cpu"),
    }
    for name, done in outputs.items():
        assert not noise(done.stdout + "\n" + done.stderr), (name, noise(done.stdout + "\n" + done.stderr))
    assert "finished 2 steps" in outputs["train"].stdout

    debug = _lorakit(tmp_path, "--debug", "merge", "runs/q", "--out", "merged2")
    try:
        import kernels  # noqa: F401 - with it installed bitsandbytes has nothing to say
    except ImportError:
        assert "Failed to load CPU gemm_4bit_forward" in debug.stderr  # --debug keeps the libraries' messages
    else:
        pytest.skip("the `kernels` package is installed: bitsandbytes logs nothing to compare with")
