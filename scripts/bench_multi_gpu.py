# ruff: noqa: E501  (the GPU command in the docstring is one line, to copy as is)
"""Multi-GPU proof (issue 9): DDP scaling from one to two GPUs and an FSDP-QLoRA run whose losses match one GPU.

GPU command (kind nvidia-h200-x2, one call, carry [".gpu-wheels"]; results in $OUT and $OUT/bench):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 scripts/bench_multi_gpu.py --out $OUT --write-bench $OUT/bench

CPU check of the same code path (tiny model, two processes over gloo; fsdp runs as ddp on a CPU):

    .venv/bin/python scripts/bench_multi_gpu.py --tiny --out /tmp/lkmg

Every run is the real command line, `lorakit train RECIPE [--gpus 2] --json`, on a random-initialized checkpoint of
the Llama-3.1-8B shape saved in bf16 under /tmp/lkbench (no download), quantized at load (NF4, double quant):

- single: 1 GPU, 2 rows x 2048 tokens a step (lorakit's defaults: every layer checkpointed, Liger, fused LoRA).
- ddp: `--gpus 2`, the same 2 rows per GPU (4 a step). Scaling = its tokens/s over single's.
- fsdp_ref: 1 GPU, 2 rows a step, 4-bit weights stored as bf16 (quantization.quant_storage: bf16, what FSDP shards).
- fsdp: `--gpus 2` with distributed.strategy fsdp, 1 row per GPU: the same 2 rows a step as fsdp_ref, so the same
  losses are expected (same seed, same global batches).

tokens/s = the Trainer's non-padding tokens (summed over ranks) over the wall time of the steps after 4 warm-up steps,
from metrics.jsonl. Peak memory per GPU is each run's summary (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_train as bt  # noqa: E402  (shapes, tokenizer and rows shared with the single-GPU bench)

STEPS, WARMUP, LOSSES = 16, 4, 12
RUNS = [  # name, gpus, rows per GPU, extra recipe sections
    ("single", 1, 2, {}),
    ("ddp", 2, 2, {}),
    ("fsdp_ref", 1, 2, {"quantization": {"quant_storage": "bf16"}}),
    ("fsdp", 2, 1, {"quantization": {"quant_storage": "bf16"}, "distributed": {"strategy": "fsdp"}}),
]


def build(model: str, device: str) -> Path:
    """A bf16 random-init checkpoint of the shape (quantized by lorakit at load, as FSDP-QLoRA needs)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = bt.WORK / f"{model}-bf16-mg"
    if (out / "config.json").exists():
        return out
    cfg = LlamaConfig(**bt.SHAPES[model], bos_token_id=bt.EOS, eos_token_id=bt.EOS, pad_token_id=bt.PAD)
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    m.save_pretrained(tmp, max_shard_size="5GB")
    bt.tokenizer(bt.n_words(model)).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def write_data(model: str) -> Path:
    path = bt.WORK / f"data-{model}-mg.jsonl"
    if not path.exists():
        rows = bt.make_rows("fixed", 2 * 2 * STEPS, bt.n_words(model), bt.seq_len(model))
        path.write_text("".join(json.dumps({"text": " ".join(f"t{i}" for i in r[:-1])}) + "\n" for r in rows),
                        encoding="utf-8")
    return path


def recipe(name: str, model: str, base: Path, data: Path, rows: int, extra: dict, out: Path, device: str) -> Path:
    import yaml

    doc = {"name": f"mg-{name}", "base_model": str(base),
           "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, **extra.get("quantization", {})},
           "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"},
           "data": {"path": str(data), "format": "text", "max_length": bt.seq_len(model)},
           "train": {"max_steps": STEPS if device == "cuda" else 6, "lr": 2.0e-4, "scheduler": "constant",
                     "warmup_ratio": 0.0, "batch_size": rows, "grad_accum": 1, "logging_steps": 1, "seed": 42},
           "output": {"dir": str(out / "runs" / name)}}
    if "distributed" in extra:
        doc["distributed"] = extra["distributed"]
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def run(name: str, gpus: int, path: Path, out: Path, device: str) -> dict:
    """`lorakit train` as a user runs it; the row of this run."""
    lorakit = [sys.executable, "-m", "lorakit", "train", str(path), "--overwrite", "--json"]
    if gpus > 1:
        lorakit += ["--gpus", str(gpus)]
    env = {**os.environ, "CI": "true"}
    if device == "cuda" and gpus == 1:
        env["CUDA_VISIBLE_DEVICES"] = "0"
    t = time.time()
    p = subprocess.run(lorakit, capture_output=True, text=True, env=env, timeout=900)
    (out / f"{name}.log").write_text(p.stdout[-20000:] + "\n----- stderr\n" + p.stderr[-20000:], encoding="utf-8")
    row: dict = {"name": name, "gpus": gpus, "exit_code": p.returncode, "wall_s": round(time.time() - t, 1)}
    if p.returncode != 0:
        row["error"] = (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    summary = json.loads(p.stdout)
    events = [json.loads(x) for x in Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if "loss" in e and "num_input_tokens_seen" in e]
    w = min(WARMUP, len(steps) - 2)
    a, b = steps[w], steps[-1]
    row.update(tokens_per_s=(b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) / max(1e-9, b["time"] - a["time"]),
               losses=[e["loss"] for e in steps][:LOSSES], distributed=summary.get("distributed"),
               peak_memory=summary.get("peak_memory"), options=summary.get("options"))
    return row


def derive(rows: dict) -> dict:
    out: dict = {}
    s, d = rows.get("single", {}), rows.get("ddp", {})
    if s.get("tokens_per_s") and d.get("tokens_per_s"):
        out["ddp_scaling"] = d["tokens_per_s"] / s["tokens_per_s"]
    r, f = rows.get("fsdp_ref", {}), rows.get("fsdp", {})
    if r.get("losses") and f.get("losses"):
        out["fsdp_loss_max_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(r["losses"], f["losses"]))
        out["fsdp_loss_steps_compared"] = min(len(r["losses"]), len(f["losses"]))
    return out


def markdown(doc: dict) -> str:
    d = doc["derived"]
    lines = ["# Multi-GPU: DDP scaling and FSDP-QLoRA losses (`scripts/bench_multi_gpu.py`)", "",
             f"Machine: {doc['machine']}; versions: {doc['versions']}.", f"Command: `{doc['command']}`.", "",
             f"- DDP scaling 1 -> 2 GPUs: **{d.get('ddp_scaling', float('nan')):.2f}x** tokens/s (target >= 1.8x)",
             f"- FSDP-QLoRA vs one GPU, same global batches: first {d.get('fsdp_loss_steps_compared', 0)} losses agree "
             f"within **{100 * d.get('fsdp_loss_max_rel_diff', float('nan')):.3f}%** relative", "",
             "| run | GPUs | rows/GPU | strategy | tok/s | peak alloc GiB (rank 0) | first losses | exit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        pm = (r.get("peak_memory") or {}).get("max_allocated_bytes")
        lines.append(f"| {r['name']} | {r['gpus']} | {r['rows_per_gpu']} | {(r.get('distributed') or {}).get('strategy', '-')} | "
                     f"{r.get('tokens_per_s', 0):.0f} | {pm / 2**30 if pm else float('nan'):.2f} | "
                     f"{', '.join(f'{x:.4f}' for x in (r.get('losses') or [])[:5])} | {r.get('error', r['exit_code'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--write-bench", default=None, metavar="DIR")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (two processes over gloo)")
    ap.add_argument("--only", default=None, help="comma list of runs")
    args = ap.parse_args()
    unknown = set(args.only.split(",")) - {r[0] for r in RUNS} if args.only else set()
    if unknown:
        ap.error(f"--only: unknown run(s) {', '.join(sorted(unknown))} (known: {', '.join(r[0] for r in RUNS)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.tiny else "cuda"
    model = "tiny" if args.tiny else "8b"
    bt.WORK.mkdir(parents=True, exist_ok=True)
    base, data = build(model, device), write_data(model)
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": "", "versions": bt.versions(),
           "results": [], "derived": {}}
    if device == "cuda":
        import torch

        doc["machine"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        doc["machine"] = f"CPU, {os.cpu_count()} cores (gloo)"
    keep = set(args.only.split(",")) if args.only else None
    rows: dict = {}
    for name, gpus, per_gpu, extra in RUNS:
        if keep and name not in keep:
            continue
        row = run(name, gpus, recipe(name, model, base, data, per_gpu, extra, out, device), out, device)
        row["rows_per_gpu"] = per_gpu
        rows[name] = row
        doc["results"].append(row)
        doc["derived"] = derive(rows)
        print(json.dumps({k: row.get(k) for k in ("name", "exit_code", "tokens_per_s", "error")}), flush=True)
        for target in [out] + ([Path(args.write_bench)] if args.write_bench else []):
            target.mkdir(parents=True, exist_ok=True)
            (target / "multi_gpu.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
            (target / "multi_gpu.md").write_text(markdown(doc), encoding="utf-8")
    print(json.dumps(doc["derived"]), flush=True)


if __name__ == "__main__":
    main()
