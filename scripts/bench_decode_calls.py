# ruff: noqa: E501  (the GPU command in the docstring is one line, to copy as is)
"""Microseconds a call of the layers one GRPO decoding step runs, lorakit's against plain peft's (issue 26).

In bench/grpo_speed.md lorakit's generation ran slower than the plain TRL recipe's, and a decoding step of 64
completions is a few small matmuls a layer: the host's time per call decides it. This times, at decode shape
(64 rows of one token, the 8B width, bf16 autocast, no grad, train mode as in TRL's generation), one call of:

- lora_peft / lora_fused: a 4096 x 4096 NF4 linear with a LoRA adapter (r=16, dropout 0.05), peft's layer and
  lorakit's fused layer (lorakit.speed.fused_lora); also lora_fused_eval / lora_peft_eval (dropout off);
- norm_hf / norm_liger: transformers' LlamaRMSNorm and Liger's (what train.liger patches in).

GPU command (carry [".gpu-wheels"]; ~30 s after the install; one line, to copy as is):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-wheels/bitsandbytes*.whl .gpu-wheels/liger*.whl && PYTHONPATH=/tmp/site:$PWD python3 scripts/bench_decode_calls.py --out $OUT

CPU smoke test: .venv/bin/python scripts/bench_decode_calls.py --device cpu --calls 5 --out /tmp/lkd
Writes OUT/decode_calls.json and OUT/decode_calls.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_call_us(fn, calls: int, sync) -> float:
    """Mean wall microseconds of `fn()` over `calls` calls after a warm-up, the device synced at both ends."""
    for _ in range(max(3, calls // 10)):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) / calls * 1e6


def lora_layer(fused: bool, device: str, hidden: int, dtype):
    """A peft LoRA model around one NF4 linear; with `fused`, lorakit's fused LoRA layer (as train registers it)."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    from lorakit.speed.fused_lora import customize_lora_config
    from lorakit.speed.planning import Plan

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(hidden, hidden, bias=False, compute_dtype=dtype, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    m = One()
    m.proj.weight = bnb.nn.Params4bit(torch.randn(hidden, hidden, dtype=dtype) * 0.02, requires_grad=False,
                                      quant_type="nf4")
    m = m.to(device)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["proj"])
    if fused:
        customize_lora_config(cfg, Plan(fused_lora=True), bits=4)
    pm = get_peft_model(m, cfg)
    torch.nn.init.normal_(pm.base_model.model.proj.lora_B["default"].weight, std=0.02)
    return pm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=64, help="completions decoded together (one token each)")
    ap.add_argument("--hidden", type=int, default=4096)
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = torch.bfloat16
    x = torch.randn(args.rows, 1, args.hidden, device=device, dtype=dtype)
    results: dict = {}

    def timed(name, fn):
        with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype):
            results[name] = round(per_call_us(fn, args.calls, sync), 1)
        print(f"{name}: {results[name]} us", flush=True)

    for fused in (False, True):
        pm = lora_layer(fused, device, args.hidden, dtype)
        name = "lora_fused" if fused else "lora_peft"
        results[name + "_class"] = type(pm.base_model.model.proj).__name__
        pm.train()
        timed(name, lambda pm=pm: pm(x))
        pm.eval()
        timed(name + "_eval", lambda pm=pm: pm(x))
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(args.hidden).to(device, dtype)
    timed("norm_hf", lambda: norm(x))
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        liger = LigerRMSNorm(args.hidden).to(device, dtype)
        timed("norm_liger", lambda: liger(x))
    except Exception as e:  # noqa: BLE001 - no Liger / no Triton on this machine
        results["norm_liger"] = f"not run: {type(e).__name__}: {e}"[:200]
    import peft
    import transformers

    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "rows": args.rows,
            "hidden": args.hidden, "calls": args.calls,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__},
            "command": "python3 scripts/bench_decode_calls.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_calls.json").write_text(json.dumps({"info": info, "us_per_call": results}, indent=1))
    rows = "\n".join(f"| {k} | {v} |" for k, v in results.items())
    (out / "decode_calls.md").write_text(
        f"# Microseconds a call at decode shape (issue 26)\n\n{info['date']} · {info['gpu'] or device} · "
        f"{info['versions']} · `{info['command']}`\n\n{args.rows} rows x 1 token x {args.hidden}, bf16 autocast, no "
        f"grad; LoRA r=16 dropout 0.05 on an NF4 linear; mean of {args.calls} calls, synced at both ends.\n\n"
        f"| call | us |\n|---|---|\n{rows}\n")


if __name__ == "__main__":
    main()
