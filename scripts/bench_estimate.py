"""GPU proof of `lorakit estimate`: train a few steps for a matrix of recipes, compare with the forecast.

Each config builds a random-initialized model of a real shape (from lorakit's offline known
configs; no download) directly on the GPU, quantizes its block Linears with bitsandbytes for 4-bit
configs (then `prepare_model_for_kbit_training`, as lorakit's loader does), attaches LoRA with peft,
and runs 3 optimizer steps of full-length random sequences under bf16 autocast. Its peak
`torch.cuda.max_memory_reserved/allocated` (from just before the first step) is compared with
`lorakit.estimate.estimate(recipe)` for the same recipe. Every config runs in its own subprocess.

    python scripts/bench_estimate.py --out DIR            # whole matrix -> DIR/estimate.json + logs
    python scripts/bench_estimate.py --only l1b-4bit-a    # some configs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

L1B, L8B, Q7B = "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B"

# name: (model, bits, r, seq, batch, checkpointing, extra recipe overrides)
MATRIX: dict[str, tuple] = {
    "l1b-4bit-r16-s2048-b4": (L1B, 4, 16, 2048, 4, False, {}),
    "l1b-4bit-r8-s512-b8": (L1B, 4, 8, 512, 8, False, {}),
    "l1b-bf16-r64-s1024-b4": (L1B, None, 64, 1024, 4, False, {}),
    "l1b-bf16-r16-s4096-b2-gc": (L1B, None, 16, 4096, 2, True, {}),
    "l1b-4bit-r16-s2048-b8-gc-paged8": (L1B, 4, 16, 2048, 8, True, {"optimizer": "paged_adamw_8bit"}),
    "l8b-4bit-r16-s2048-b2-gc": (L8B, 4, 16, 2048, 2, True, {}),
    "l8b-4bit-r64-s4096-b1-gc": (L8B, 4, 64, 4096, 1, True, {}),
    "l8b-4bit-r16-s1024-b2": (L8B, 4, 16, 1024, 2, False, {}),
    "l8b-bf16-r16-s2048-b4-gc": (L8B, None, 16, 2048, 4, True, {}),
    "l8b-bf16-r8-s512-b4": (L8B, None, 8, 512, 4, False, {}),
    "q7b-4bit-r32-s1024-b8-gc": (Q7B, 4, 32, 1024, 8, True, {}),
    "q7b-4bit-r16-s4096-b1": (Q7B, 4, 16, 4096, 1, False, {}),
    "q7b-bf16-r16-s2048-b2-gc": (Q7B, None, 16, 2048, 2, True, {}),
    "q7b-4bit-r16-s512-b4-attn-nodrop": (Q7B, 4, 16, 512, 4, False, {"targets": "attention", "dropout": 0.0}),
    # held out: not used to fit the constants (added after the calibration run)
    "l1b-4bit-r32-s1024-b2-gc": (L1B, 4, 32, 1024, 2, True, {}),
    "l8b-4bit-r16-s4096-b2-gc": (L8B, 4, 16, 4096, 2, True, {}),
    "q7b-bf16-r64-s1024-b2": (Q7B, None, 64, 1024, 2, False, {}),
    "l8b-4bit-r8-s2048-b1-qkv": (L8B, 4, 8, 2048, 1, False, {"targets": "qkv"}),
}
HELD_OUT = {"l1b-4bit-r32-s1024-b2-gc", "l8b-4bit-r16-s4096-b2-gc", "q7b-bf16-r64-s1024-b2", "l8b-4bit-r8-s2048-b1-qkv"}


def recipe_for(name: str):
    from lorakit.recipe import validate_data

    model, bits, r, seq, batch, gc, extra = MATRIX[name]
    data = {
        "name": name, "base_model": model,
        "quantization": {"bits": bits if bits else "none", "quant_type": "nf4", "double_quant": True,
                         "compute_dtype": "bf16"},
        "lora": {"r": r, "alpha": r, "dropout": extra.get("dropout", 0.05), "targets": extra.get("targets", "all-linear")},
        "data": {"path": "unused.jsonl", "max_length": seq},
        "train": {"batch_size": batch, "gradient_checkpointing": gc, "optimizer": extra.get("optimizer", "adamw_torch"),
                  "precision": "bf16", "liger": False},
        "model": {"dtype": "bf16", "attn_implementation": "sdpa"},
    }
    return validate_data(data)


def _quantize_blocks(model, double_quant: bool):
    """Swap every Linear inside the decoder blocks for a bitsandbytes NF4 Linear4bit (on the GPU)."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for pname, parent in list(layer.named_modules()):
            for cname, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                                        quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                               compress_statistics=double_quant, blocksize=64, module=new).to("cuda")
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, cname, new)
                del child
        torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True
    model.is_quantized = True


def run_one(name: str, steps: int = 3) -> dict:
    """Build, train `steps` steps, measure; returns the result row (printed as JSON by the child)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorakit.estimate import estimate
    from lorakit.shapes import load_config

    recipe = recipe_for(name)
    est = estimate(recipe, device="cuda")
    model_id, bits, r, seq, batch, gc, extra = MATRIX[name]
    cfg_dict, _ = load_config(model_id)
    cfg = AutoConfig.for_model(cfg_dict["model_type"], **{k: v for k, v in cfg_dict.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    if bits == 4:
        _quantize_blocks(model, double_quant=True)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    lcfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=recipe.lora.dropout, target_modules=est["targets"],
                      task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lcfg)
    if gc:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_name = recipe.train.optimizer
    if opt_name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(trainable, lr=1e-5)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-5)
    n_trainable, n_all = model.get_nb_trainable_parameters()
    build_s = time.time() - t0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    static_alloc = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device="cuda").manual_seed(0)
    losses, step_peaks = [], []
    t1 = time.time()
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step_peaks.append(torch.cuda.max_memory_allocated())
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    measured = {"max_reserved": torch.cuda.max_memory_reserved(), "max_allocated": torch.cuda.max_memory_allocated(),
                "static_allocated": static_alloc, "reserved_now": torch.cuda.memory_reserved(),
                "device_used": total - free, "context": (total - free) - torch.cuda.memory_reserved(),
                "step_peaks_allocated": step_peaks}
    m = est["memory"]
    return {
        "name": name, "held_out": name in HELD_OUT, "model": model_id, "bits": bits or 16, "r": r, "seq": seq, "batch": batch,
        "checkpointing": gc, "optimizer": opt_name, "targets": est["targets"], "dropout": recipe.lora.dropout,
        "params": {"estimate_trainable": est["params"]["trainable"], "peft_trainable": n_trainable,
                   "estimate_total_with_adapter": est["params"]["total_with_adapter"], "peft_all": n_all},
        "estimate": {k: m[k] for k in ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes",
                                       "activations_bytes", "logits_bytes", "overhead_bytes", "peak_bytes",
                                       "allocated_peak_bytes", "reserved_peak_bytes")},
        "measured": measured,
        "error_reserved": (m["reserved_peak_bytes"] - measured["max_reserved"]) / measured["max_reserved"],
        "error_allocated": (m["allocated_peak_bytes"] - measured["max_allocated"]) / measured["max_allocated"],
        "losses": losses, "build_s": round(build_s, 1), "train_s": round(time.time() - t1, 1),
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"missing ({e})"
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_total_bytes"] = torch.cuda.mem_get_info()[1]
    except Exception:  # noqa: BLE001
        pass
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def markdown(doc: dict) -> str:
    """The results table (what bench/estimate.md holds below its method section)."""
    s = doc["summary"]
    lines = [f"Machine: {doc['versions'].get('gpu', '?')}; torch {doc['versions'].get('torch')}, transformers "
             f"{doc['versions'].get('transformers')}, peft {doc['versions'].get('peft')}, bitsandbytes "
             f"{doc['versions'].get('bitsandbytes')}. Command: `{doc['command']}`.", "",
             f"**{s['measured']} of {s['configs']} configs measured; |error| vs peak reserved: max "
             f"{100 * (s['max_abs_error_reserved'] or 0):.1f}%, median {100 * (s['median_abs_error_reserved'] or 0):.1f}%; "
             f"vs peak allocated: median {100 * (s['median_abs_error_allocated'] or 0):.1f}%. Trainable counts equal "
             f"peft's: {s['params_exact']}.**", "",
             "| config | base | r | seq x batch | ckpt | optimizer | est. reserved GiB | measured reserved GiB | error | "
             "est. allocated GiB | measured allocated GiB | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | | | | | {r['error']} | | | |")
            continue
        e, m = r["estimate"], r["measured"]
        name = r["name"] + (" (held out)" if r.get("held_out") else "")
        lines.append(f"| {name} | {r['bits']}-bit | {r['r']} | {r['seq']} x {r['batch']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['optimizer']} | {_gib(e['reserved_peak_bytes'])} | "
                     f"{_gib(m['max_reserved'])} | {100 * r['error_reserved']:+.1f}% | {_gib(e['allocated_peak_bytes'])} | "
                     f"{_gib(m['max_allocated'])} | {100 * r['error_allocated']:+.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help="print the markdown table of an estimate.json and exit")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting configs after this many seconds")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text(encoding="utf-8"))), end="")
        return 0
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(MATRIX)
    rows, start = [], time.time()
    log = open(out / "bench_log.txt", "a", encoding="utf-8")
    for name in names:
        if time.time() - start > args.budget_s:
            rows.append({"name": name, "error": "skipped: time budget"})
            continue
        t = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                               timeout=max(30.0, args.budget_s + 60 - (time.time() - start)))
            log.write(f"===== {name}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}\n")
            res = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(res[-1][7:]) if res else {"name": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        except subprocess.TimeoutExpired:
            row = {"name": name, "error": "timeout"}
        row["wall_s"] = round(time.time() - t, 1)
        rows.append(row)
        msg = (f"{name}: est {row['estimate']['reserved_peak_bytes'] / 2**30:.2f} GiB, measured reserved "
               f"{row['measured']['max_reserved'] / 2**30:.2f} GiB, alloc {row['measured']['max_allocated'] / 2**30:.2f}"
               f" GiB, err {100 * row['error_reserved']:+.1f}% ({row['wall_s']}s)") if "error" not in row else \
            f"{name}: ERROR {row['error']}"
        print(msg, flush=True)
    ok = [r for r in rows if "error" not in r]
    errs = [abs(r["error_reserved"]) for r in ok]
    summary = {"configs": len(rows), "measured": len(ok),
               "max_abs_error_reserved": max(errs) if errs else None,
               "median_abs_error_reserved": statistics.median(errs) if errs else None,
               "median_abs_error_allocated": statistics.median(abs(r["error_allocated"]) for r in ok) if ok else None,
               "params_exact": all(r["params"]["estimate_trainable"] == r["params"]["peft_trainable"] for r in ok)}
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.node(),
           "versions": versions(), "summary": summary, "results": rows}
    (out / "estimate.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    (out / "estimate_table.md").write_text(markdown(doc), encoding="utf-8")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
