"""GPU proof of `lorakit estimate`: train a few steps for a matrix of recipes, compare with the forecast.

Each config builds a random-initialized model of a real shape (from lorakit's offline known configs; no
download) directly on the GPU, quantizes its block Linears with bitsandbytes for 4-bit configs (what
`from_pretrained(quantization_config=...)` stores), then goes through lorakit's own training path:
`model.load.attach_adapter` (LoRA, fused LoRA layers, frozen dtype per the speed Plan) and `_build_trainer`
with `train.training_args` (TRL's SFTTrainer, Liger kernels, checkpointing, optimizer) for 3 optimizer steps
of full-length rows. Only the weights' loading differs from `lorakit train`. The peak
`torch.cuda.max_memory_reserved/allocated` (from just before the first step) is compared with
`lorakit.estimate.memory.estimate(recipe)` for the same recipe. Every config runs in its own subprocess; several
run at once (`--jobs`: memory is measured per process, so only their speed is shared).

    python scripts/bench_estimate.py --out DIR            # whole matrix -> DIR/estimate.json + logs
    python scripts/bench_estimate.py --only l1b-4bit-r8-s512-b8   # some configs
    python scripts/bench_estimate.py --smoke              # the same code path on the CPU, tiny model
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
sys.path.insert(0, str(ROOT / "scripts"))

L1B, L8B, Q7B = "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B"
TINY = "tiny-llama"  # --smoke: a 2-layer Llama on the CPU
TINY_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256,
               "tie_word_embeddings": False}

# name: (model, bits, r, seq, batch, checkpointing, extra recipe overrides); optimizer: lorakit's default
# (paged_adamw_8bit on CUDA) unless named. Ordered by what matters most: a deadline skips the tail.
ADAMW = {"optimizer": "adamw_torch"}
MATRIX: dict[str, tuple] = {
    "l8b-4bit-r16-s2048-b2-gc": (L8B, 4, 16, 2048, 2, True, {}),
    "l8b-4bit-r16-s2048-b2": (L8B, 4, 16, 2048, 2, False, {}),
    "l8b-4bit-r64-s4096-b1-gc": (L8B, 4, 64, 4096, 1, True, ADAMW),
    "q7b-4bit-r32-s1024-b8-gc": (Q7B, 4, 32, 1024, 8, True, {}),
    "q7b-4bit-r16-s4096-b1": (Q7B, 4, 16, 4096, 1, False, ADAMW),
    "l1b-4bit-r16-s2048-b4": (L1B, 4, 16, 2048, 4, False, {}),
    "l1b-4bit-r8-s512-b8": (L1B, 4, 8, 512, 8, False, ADAMW),
    "l8b-bf16-r16-s2048-b4-gc": (L8B, None, 16, 2048, 4, True, {}),
    "l1b-bf16-r64-s1024-b4": (L1B, None, 64, 1024, 4, False, ADAMW),
    "q7b-bf16-r16-s2048-b2-gc": (Q7B, None, 16, 2048, 2, True, {}),
    "l1b-4bit-r32-s1024-b2-gc": (L1B, 4, 32, 1024, 2, True, {}),
    "l8b-4bit-r8-s2048-b1-qkv": (L8B, 4, 8, 2048, 1, False, {"targets": "qkv"}),
    "q7b-4bit-r16-s512-b4-attn-nodrop": (Q7B, 4, 16, 512, 4, False, {"targets": "attention", "dropout": 0.0}),
    "l8b-4bit-r16-s4096-b2-gc": (L8B, 4, 16, 4096, 2, True, {}),
    "q7b-bf16-r64-s1024-b2": (Q7B, None, 64, 1024, 2, False, ADAMW),
    "l1b-bf16-r16-s4096-b2-gc": (L1B, None, 16, 4096, 2, True, {}),
    "l8b-4bit-r16-s2048-b2-k16": (L8B, 4, 16, 2048, 2, 16, {}),
    "l8b-bf16-r8-s512-b4": (L8B, None, 8, 512, 4, False, ADAMW),
}
# confirmation: configs first run after the memory model was revised on the matrix's measurements
CONFIRM: dict[str, tuple] = {
    "c-l8b-4bit-r32-s2048-b4-gc": (L8B, 4, 32, 2048, 4, True, ADAMW),
    "c-q7b-4bit-r64-s2048-b2-gc": (Q7B, 4, 64, 2048, 2, True, {}),
    "c-l1b-4bit-r16-s1024-b8-k8": (L1B, 4, 16, 1024, 8, 8, {}),
    "c-q7b-4bit-r8-s1024-b2": (Q7B, 4, 8, 1024, 2, False, ADAMW),
}
MATRIX.update(CONFIRM)
SMOKE = {"tiny-4bit-gc": (TINY, 4, 8, 64, 2, True, {}), "tiny-fp32": (TINY, None, 8, 64, 2, False, {})}
MATRIX.update(SMOKE)
# not used when the constants were set (they came from the earlier lorakit runs of bench/train.md)
HELD_OUT = set(CONFIRM)


def recipe_for(name: str, out_dir: str = "unused-run", tiny_dir: str | None = None, liger: bool | None = None):
    """The recipe of a config, as a user would write it: lorakit's defaults for everything not named.
    Rows are full-length, so padding-free is off (what `lorakit train` settles for such data)."""
    from lorakit.recipe.loader import validate_data

    model, bits, r, seq, batch, gc, extra = MATRIX[name]
    data = {
        "name": name, "base_model": tiny_dir if model == TINY else model,
        "quantization": {"bits": bits if bits else "none", "quant_type": "nf4", "double_quant": True},
        "lora": {"r": r, "alpha": r, "dropout": extra.get("dropout", 0.05), "targets": extra.get("targets", "all-linear")},
        "data": {"path": "unused.jsonl", "max_length": seq, "padding_free": False},
        "train": {"batch_size": batch, "gradient_checkpointing": gc, "optimizer": extra.get("optimizer", "auto"),
                  "max_steps": 3, "lr": 1e-5, "logging_steps": 1, "report_to": "none",
                  **({"fused_lora": True} if model == TINY else {}), **({} if liger is None else {"liger": liger})},
        "output": {"dir": out_dir},
    }
    return validate_data(data)


def _quantize_blocks(model, double_quant: bool, device: str):
    """Swap every Linear inside the decoder blocks for a bitsandbytes NF4 Linear4bit (bf16 compute), as
    transformers' bitsandbytes quantizer stores them."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for _, parent in list(layer.named_modules()):
            for cname, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                                        quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                               compress_statistics=double_quant, blocksize=64, module=new).to(device)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, cname, new)
                del child
        if device == "cuda":
            torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True  # what peft's bitsandbytes dispatch reads


def run_one(name: str, device: str = "cuda") -> dict:
    """Build, train 3 steps through lorakit's trainer, measure; returns the result row (printed by the child)."""
    import tempfile
    from types import SimpleNamespace

    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    from lorakit import speed
    from lorakit.estimate.memory import estimate
    from lorakit.model.load import attach_adapter
    from lorakit.model.shapes import load_config
    from lorakit.train.args import run_options, training_args
    from lorakit.train.run import _build_trainer
    from lorakit.train.run_dir import RunDir

    cuda = device == "cuda"
    tmp = tempfile.mkdtemp(prefix="lk-est-")
    Path(tmp, "tiny").mkdir()
    Path(tmp, "tiny", "config.json").write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    recipe = recipe_for(name, out_dir=f"{tmp}/run", tiny_dir=f"{tmp}/tiny")
    est = estimate(recipe, device="cuda")
    model_id, bits, r, seq, batch, gc, extra = MATRIX[name]
    cfg_dict = dict(TINY_CONFIG) if model_id == TINY else load_config(model_id)[0]
    cfg = AutoConfig.for_model(cfg_dict["model_type"], **{k: v for k, v in cfg_dict.items() if k != "model_type"})
    cfg.use_cache = False
    torch.manual_seed(0)
    t0 = time.time()
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.requires_grad_(False)
    if bits == 4:
        _quantize_blocks(model, double_quant=True, device=device)
    levers = speed.plan(recipe, device, compute_dtype="bf16" if cuda else None)
    model, info = attach_adapter(recipe, model, device, bits, levers)
    n_trainable, n_all = model.get_nb_trainable_parameters()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, cfg.vocab_size, (batch * 3, seq), generator=g).tolist()
    prepared = SimpleNamespace(train=Dataset.from_dict({"input_ids": rows, "completion_mask": [[1] * seq] * len(rows)}),
                               eval=None)
    build_s = time.time() - t0
    peaks: dict = {"step_allocated": []}

    class Peak(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                peaks["static_allocated"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                peaks["step_allocated"].append(torch.cuda.max_memory_allocated())

    common = training_args(recipe, RunDir(f"{tmp}/run"), device, levers, run_options(recipe, device), has_eval=False)
    from bench_train import tokenizer  # the word-level tokenizer of the training bench

    trainer = _build_trainer(recipe, model, tokenizer(min(cfg.vocab_size, 1000)), prepared, common, [Peak()], levers)
    t1 = time.time()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    measured = {}
    if cuda:
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        measured = {"max_reserved": torch.cuda.max_memory_reserved(), "max_allocated": torch.cuda.max_memory_allocated(),
                    "static_allocated": peaks.get("static_allocated"), "reserved_now": torch.cuda.memory_reserved(),
                    "device_used": total - free, "context": (total - free) - torch.cuda.memory_reserved(),
                    "step_peaks_allocated": peaks["step_allocated"]}
    m = est["memory"]
    row = {
        "name": name, "held_out": name in HELD_OUT, "model": model_id, "bits": bits or 16, "r": r, "seq": seq,
        "batch": batch, "checkpointing": gc, "optimizer": recipe.train.optimizer, "targets": est["targets"],
        "dropout": recipe.lora.dropout,
        "levers": {k: getattr(levers, k) for k in ("liger", "fused_lora", "frozen_dtype", "gradient_checkpointing")},
        "estimate_setup": est["setup"], "fused_lora_modules": info["fused_lora_modules"],
        "params": {"estimate_trainable": est["params"]["trainable"], "peft_trainable": n_trainable,
                   "estimate_total_with_adapter": est["params"]["total_with_adapter"], "peft_all": n_all},
        "estimate": {k: m[k] for k in _ESTIMATE_KEYS},
        "measured": measured, "losses": losses, "build_s": round(build_s, 1), "train_s": round(time.time() - t1, 1),
    }
    if cuda:
        row["error_reserved"] = (m["reserved_peak_bytes"] - measured["max_reserved"]) / measured["max_reserved"]
        row["error_allocated"] = (m["allocated_peak_bytes"] - measured["max_allocated"]) / measured["max_allocated"]
    return row


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for mod, dist in (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"),
                      ("bitsandbytes", "bitsandbytes"), ("trl", "trl"), ("liger_kernel", "liger-kernel")):
        try:
            out[mod] = version(dist)
        except PackageNotFoundError:
            out[mod] = "missing"
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_total_bytes"] = torch.cuda.mem_get_info()[1]
    except Exception:  # noqa: BLE001
        pass
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _ckpt(gc) -> str:
    return "on" if gc is True else "off" if gc is False else f"{gc} layers"


def markdown(doc: dict) -> str:
    """The results table (what bench/estimate.md holds below its method section)."""
    s = doc["summary"]
    lines = [f"Machine: {doc['versions'].get('gpu', '?')}; torch {doc['versions'].get('torch')}, transformers "
             f"{doc['versions'].get('transformers')}, peft {doc['versions'].get('peft')}, bitsandbytes "
             f"{doc['versions'].get('bitsandbytes')}, trl {doc['versions'].get('trl')}, liger-kernel "
             f"{doc['versions'].get('liger_kernel')}. Command: `{doc['command']}`.", "",
             f"**{s['measured']} of {s['configs']} configs measured; |error| vs peak reserved: max "
             f"{100 * (s['max_abs_error_reserved'] or 0):.1f}%, median {100 * (s['median_abs_error_reserved'] or 0):.1f}%; "
             f"vs peak allocated: median {100 * (s['median_abs_error_allocated'] or 0):.1f}%. Trainable counts equal "
             f"peft's: {s['params_exact']}.**", "",
             "| config | base | r | seq x batch | ckpt | optimizer | est. reserved GiB | measured reserved GiB | error | "
             "est. allocated GiB | measured allocated GiB | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        if "error_reserved" not in r:
            lines.append(f"| {r['name']} | | | | | | | | {r.get('error', 'no CUDA measurement')} | | | |")
            continue
        e, m = r["estimate"], r["measured"]
        name = r["name"] + (" (held out)" if r.get("held_out") else "")
        lines.append(f"| {name} | {r['bits']}-bit | {r['r']} | {r['seq']} x {r['batch']} | "
                     f"{_ckpt(r['checkpointing'])} | {r['estimate_setup']['optimizer']} | {_gib(e['reserved_peak_bytes'])} | "
                     f"{_gib(m['max_reserved'])} | {100 * r['error_reserved']:+.1f}% | {_gib(e['allocated_peak_bytes'])} | "
                     f"{_gib(m['max_allocated'])} | {100 * r['error_allocated']:+.1f}% |")
    return "\n".join(lines) + "\n"


_ESTIMATE_KEYS = ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
                  "logits_bytes", "overhead_bytes", "peak_bytes", "allocated_peak_bytes", "reserved_peak_bytes")


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error_reserved" in r]
    errs = [abs(r["error_reserved"]) for r in ok]
    return {"configs": len(rows), "measured": len(ok),
            "max_abs_error_reserved": max(errs) if errs else None,
            "median_abs_error_reserved": statistics.median(errs) if errs else None,
            "median_abs_error_allocated": statistics.median(abs(r["error_allocated"]) for r in ok) if ok else None,
            "params_exact": all(r["params"]["estimate_trainable"] == r["params"]["peft_trainable"]
                                for r in rows if "params" in r),
            "levers_match": all(r["levers"]["liger"] == r["estimate_setup"]["liger"]
                                and r["levers"]["fused_lora"] == r["estimate_setup"]["fused_lora"]
                                for r in rows if "levers" in r)}


def rescore(doc: dict, note: str) -> dict:
    """The same measurements against the estimate of the current code (for a revised memory model; the
    recipe gets the Liger setting the run had, so the plan is the GPU's). The run's own estimate is kept
    as `estimate_at_run`."""
    from lorakit.estimate.memory import estimate

    for r in doc["results"]:
        if "error_reserved" not in r:
            continue
        est = estimate(recipe_for(r["name"], liger=r["levers"]["liger"]), device="cuda")
        r.setdefault("estimate_at_run", r["estimate"])
        r["estimate"] = {k: est["memory"][k] for k in _ESTIMATE_KEYS}
        r["estimate_setup"] = est["setup"]
        m = r["measured"]
        r["error_reserved"] = (r["estimate"]["reserved_peak_bytes"] - m["max_reserved"]) / m["max_reserved"]
        r["error_allocated"] = (r["estimate"]["allocated_peak_bytes"] - m["max_allocated"]) / m["max_allocated"]
        r["held_out"] = False
    doc.setdefault("summary_at_run", doc["summary"])
    doc["summary"] = summarize(doc["results"])
    doc["rescored"] = note
    return doc


def _child(name: str, device: str, timeout: float) -> tuple[dict, str]:
    """Run one config in a fresh process; (result row, log text)."""
    t = time.time()
    try:
        p = subprocess.run([sys.executable, __file__, "--one", name, "--device", device], capture_output=True,
                           text=True, timeout=max(10.0, timeout))
        log = f"===== {name}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}\n"
        res = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        row = json.loads(res[-1][7:]) if res else {"name": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    except subprocess.TimeoutExpired:
        row, log = {"name": name, "error": "timeout (deadline)"}, f"===== {name}\ntimeout\n"
    row["wall_s"] = round(time.time() - t, 1)
    return row, log


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['name']}: ERROR {row['error']}"
    if "error_reserved" not in row:
        return f"{row['name']}: ok (no CUDA: losses {row['losses']}, trainable {row['params']})"
    return (f"{row['name']}: est {row['estimate']['reserved_peak_bytes'] / 2**30:.2f} GiB, measured reserved "
            f"{row['measured']['max_reserved'] / 2**30:.2f} GiB, alloc {row['measured']['max_allocated'] / 2**30:.2f}"
            f" GiB, err {100 * row['error_reserved']:+.1f}% ({row['wall_s']}s)")


def main() -> int:
    from concurrent.futures import ThreadPoolExecutor

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="the tiny configs on the CPU (checks the code path)")
    ap.add_argument("--jobs", type=int, default=4, help="configs run at once (memory is measured per process)")
    ap.add_argument("--table", default=None, help="print the markdown table of an estimate.json and exit")
    ap.add_argument("--rescore", nargs=2, metavar=("IN_JSON", "OUT_JSON"), default=None,
                    help="score a run's measurements against the current estimate (no GPU needed)")
    ap.add_argument("--note", default="", help="with --rescore: why (kept in the JSON)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop everything after this many seconds")
    args = ap.parse_args()
    for given in [args.table, *(args.rescore or [])[:1]]:
        if given and not Path(given).is_file():
            ap.error(f"{given}: no such file (an estimate.json written by this script)")
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text(encoding="utf-8"))), end="")
        return 0
    if args.rescore:
        doc = rescore(json.loads(Path(args.rescore[0]).read_text(encoding="utf-8")), args.note)
        Path(args.rescore[1]).write_text(json.dumps(doc, indent=2), encoding="utf-8")
        print(markdown(doc), end="")
        return 0
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.device)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    names = list(SMOKE) if args.smoke else (args.only or [n for n in MATRIX if n not in SMOKE])
    if args.only == ["confirm"]:
        names = list(CONFIRM)
    unknown = [n for n in names if n not in MATRIX]
    if unknown:
        ap.error(f"--only: unknown config(s) {', '.join(unknown)} (known: confirm, {', '.join(MATRIX)})")
    start = time.time()
    log = open(out / "bench_log.txt", "a", encoding="utf-8")

    def one(name: str) -> dict:
        left = args.budget_s - (time.time() - start)
        if left < 20:
            return {"name": name, "error": "skipped: time budget"}
        row, text = _child(name, device, left)
        log.write(text)
        log.flush()
        with open(out / "partial.jsonl", "a", encoding="utf-8") as f:  # survives a killed parent
            f.write(json.dumps(row) + "\n")
        print(_line(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(one, names))
    summary = summarize(rows)
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.node(),
           "versions": versions(), "summary": summary, "results": rows}
    (out / "estimate.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    (out / "estimate_table.md").write_text(markdown(doc), encoding="utf-8")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
