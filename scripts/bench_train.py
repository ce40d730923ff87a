"""Baseline (plain TRL + peft + bitsandbytes, as their docs show) vs lorakit's speed levers, on one GPU.

One call, one process tree: the parent builds random-init checkpoints of real shapes (saved bf16, then
4-bit NF4 double-quant, under /tmp), measures the bf16 matmul rate, then runs each variant in its own child
process (clean peak-memory numbers) and prints a table. Results: OUT/train.json, OUT/train.md, logs.

    python scripts/bench_train.py --out $OUT --models 8b --workloads fixed --variants baseline,liger,...
    python scripts/bench_train.py --tiny --out /tmp/b   # CPU smoke test with a tiny model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
               max_position_embeddings=131072,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=131072, head_dim=64,
               rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}

# name -> levers. "kbit_prep": peft's prepare_model_for_kbit_training (docs' QLoRA recipe, fp32 upcast)
VARIANTS = {
    "baseline": dict(kbit_prep=True, gc="all"),
    "base_trl_liger": dict(kbit_prep=True, gc="all", liger=True),
    "frozen_bf16": dict(gc="all"),
    "bf16_liger": dict(gc="all", liger=True),
    "bf16_fusedlora": dict(gc="all", fused=True),
    "lk": dict(gc="all", liger=True, fused=True),
    "lk_compile": dict(gc="all", liger=True, fused=True, compile=True),
    "lk_sac_attn": dict(gc="all", liger=True, fused=True, sac=True),
    "lk_off": dict(gc=0, liger=True, fused=True),
    "lk_k28": dict(gc=28, liger=True, fused=True),
    "lk_k24": dict(gc=24, liger=True, fused=True),
    "lk_k16": dict(gc=16, liger=True, fused=True),
    "base_pad": dict(kbit_prep=True, gc="all"),
    "lk_pf": dict(gc="all", liger=True, fused=True, padding_free=True),
}


def sh(cmd, log, timeout):
    t = time.time()
    with open(log, "a") as f:
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            rc = r.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - t


# ----------------------------------------------------------------------------------------------
# child: build checkpoints
# ----------------------------------------------------------------------------------------------


def build(model_key: str, tiny: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d16, d4 = Path(f"/tmp/lkbench/{model_key}-bf16"), Path(f"/tmp/lkbench/{model_key}-nf4")
    if (d4 / "config.json").exists():
        return
    t = time.time()
    cfg = LlamaConfig(**SHAPES[model_key], dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(dev):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(d16, max_shard_size="4GB")
    del m
    print(f"saved bf16 {time.time() - t:.1f}s", flush=True)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(d16, quantization_config=q, dtype=torch.bfloat16,
                                             device_map={"": 0} if dev == "cuda" else None)
    m.save_pretrained(d4)
    print(f"saved nf4 {time.time() - t:.1f}s", flush=True)


def matmul_rate() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            a @ b
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 10 / 1e3)
    ts.sort()
    return {"bf16_matmul_tflops": 2 * n**3 / ts[len(ts) // 2] / 1e12, "gpu": torch.cuda.get_device_name()}


# ----------------------------------------------------------------------------------------------
# child: one variant
# ----------------------------------------------------------------------------------------------


def make_rows(workload: str, n_rows: int, vocab: int, seq: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        if workload == "fixed":
            n = seq
        else:  # chat-like: log-normal, median ~450 tokens
            n = int(min(seq, max(32, rng.lognormal(math.log(450), 0.6))))
        motif = rng.integers(5, min(vocab, 32000), size=int(rng.integers(8, 64)))
        rows.append(list(np.resize(motif, n).astype(int)))
    return rows


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "<eos>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def variant(args) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorakit import speed

    v = VARIANTS[args.variant]
    cuda = torch.cuda.is_available()
    tiny = args.model == "tiny"
    seq = 64 if tiny else 2048
    fixed = args.workload == "fixed"
    bs = 2 if fixed else 8
    steps = args.steps
    prof_steps = 2 if args.profile else 0
    total = steps + prof_steps
    shape = SHAPES[args.model]
    rows = make_rows(args.workload, bs * (steps + 2), shape["vocab_size"], seq)  # same data order with or without profiling
    ds = Dataset.from_dict({"input_ids": rows})

    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(f"/tmp/lkbench/{args.model}-nf4", dtype=torch.bfloat16,
                                                 device_map={"": 0} if cuda else None,
                                                 attn_implementation="sdpa")
    load_s = time.time() - t0
    lc = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    p = {"liger": v.get("liger", False), "fused_lora": v.get("fused", False),
         "padding_free": v.get("padding_free", False), "torch_compile": v.get("compile", False),
         "frozen_dtype": None if v.get("kbit_prep") else "bf16"}
    gc = v["gc"]
    p["gradient_checkpointing"] = gc != 0
    p["checkpoint_layers"] = None if gc == "all" else gc
    if v.get("kbit_prep"):
        # the docs' QLoRA recipe: prepare_model_for_kbit_training, then the trainer wraps with peft
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_config, cfg_kw = lc, {"gradient_checkpointing": True,
                                   "gradient_checkpointing_kwargs": {"use_reentrant": False},
                                   "use_liger_kernel": p["liger"], "padding_free": p["padding_free"]}
    else:
        speed.customize_lora_config(lc, p, 4)
        model = get_peft_model(model, lc)
        for n_, prm in model.named_parameters():  # TRL casts QLoRA adapters to bf16: do the same
            if prm.requires_grad:
                prm.data = prm.data.to(torch.bfloat16)
        done = speed.apply_to_model(model, p)
        print("applied", done, flush=True)
        peft_config, cfg_kw = None, speed.sft_config_kwargs(p)
        if v.get("sac"):
            from trl.models.selective_activation_checkpointing import enable_selective_activation_checkpointing

            base = model.get_base_model()
            enable_selective_activation_checkpointing(base)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cuda:
        cfg_kw["use_liger_kernel"] = False

    times, toks = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            if args.profile and state.global_step == steps:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t_prof = time.perf_counter()
            if args.profile and state.global_step == total:
                wall = time.perf_counter() - self.t_prof
                self.prof.__exit__(None, None, None)
                report_profile(self.prof, wall, prof_steps, args.out_dir, args.variant)

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **kw):
            am = inputs.get("attention_mask")
            toks.append(int(am.sum()) if am is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *a, **kw)

    cfg = SFTConfig(output_dir=f"/tmp/lkbench/run-{args.variant}", max_steps=total, per_device_train_batch_size=bs,
                    learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                    save_strategy="no", report_to="none", bf16=cuda, use_cpu=not cuda, seed=42,
                    dataloader_num_workers=0, disable_tqdm=True, **{"max_length": seq, **cfg_kw})
    trainer = CountingTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer(),
                              peft_config=peft_config, callbacks=[Clock()])
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.time()
    trainer.train()
    wall = time.time() - t1
    warm = 3
    # times[i] = end of step i+1; tokens counted per step
    span = times[steps - 1] - times[warm - 1]
    tok = sum(toks[warm:steps])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h][:20]
    res = {
        "variant": args.variant, "model": args.model, "workload": args.workload, "levers": v,
        "tokens_per_s": tok / span, "step_ms": 1e3 * span / (steps - warm), "tokens_per_step": tok / (steps - warm),
        "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "losses": losses, "load_s": load_s, "train_wall_s": wall,
    }
    with open(args.result, "w") as f:
        json.dump(res, f)
    print("RESULT", json.dumps(res), flush=True)


def report_profile(prof, wall: float, n_steps: int, out_dir: str, name: str) -> None:
    ev = prof.key_averages()
    cuda_ev = [e for e in ev if getattr(e, "device_time_total", 0) > 0 and e.device_type.name == "CUDA"]
    busy = sum(e.device_time_total for e in cuda_ev) / 1e6
    lines = [f"profile: {n_steps} steps, wall {wall:.3f}s, GPU kernel time {busy:.3f}s "
             f"({100 * busy / wall:.0f}% busy), kernels launched {sum(e.count for e in cuda_ev)}"]
    groups: dict[str, float] = {}
    for e in cuda_ev:
        k = e.key.lower()
        g = ("gemm" if any(s in k for s in ("gemm", "cutlass", "sm90", "xmma", "matmul")) else
             "attention" if any(s in k for s in ("flash", "fmha", "attention", "efficient")) else
             "nf4 dequant" if any(s in k for s in ("dequant", "kdequantize", "4bit")) else
             "triton" if "triton" in k else
             "copy/cast" if any(s in k for s in ("copy", "cast", "memcpy")) else
             "dropout/rng" if any(s in k for s in ("dropout", "bernoulli", "philox", "fused_dropout")) else
             "elementwise" if any(s in k for s in ("elementwise", "vectorized", "reduce")) else "other")
        groups[g] = groups.get(g, 0) + e.device_time_total / 1e6
    lines.append("by group: " + ", ".join(f"{k} {v / n_steps * 1e3:.0f} ms/step" for k, v in
                                          sorted(groups.items(), key=lambda x: -x[1])))
    lines.append(ev.table(sort_by="device_time_total", row_limit=25, max_name_column_width=70))
    Path(out_dir, f"profile-{name}.txt").write_text("\n".join(lines))
    print("\n".join(lines[:2]), flush=True)


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------


def flops_per_token(key: str, seq: float, gc_frac: float) -> float:
    """2*P forward + 2*P backward (activation grads only: the base is frozen, LoRA weight grads ~0) +
    2*P*gc_frac recompute, P = matmul params (all linears + lm_head); attention 4*L*s_eff*d (fwd, causal
    average s_eff = seq/2) x (1 fwd + 2 bwd + gc_frac recompute)."""
    s = SHAPES[key]
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = s.get("head_dim", h // s["num_attention_heads"])
    kv = s["num_key_value_heads"] * hd
    p_layer = h * h * 2 + 2 * h * kv + 3 * h * i
    P = L * p_layer + h * V
    att = 4 * L * (seq / 2) * h
    return 2 * P * (2 + gc_frac) - 2 * h * V * gc_frac + att * (3 + gc_frac)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench")
    ap.add_argument("--models", default="8b")
    ap.add_argument("--workloads", default="fixed")
    ap.add_argument("--variants", default="baseline,lk")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=540, help="seconds: skip variants that would pass it")
    ap.add_argument("--per-variant", type=float, default=150)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--profile", default="baseline", help="variants to profile (comma list)")
    ap.add_argument("--child", choices=["build", "variant", "rate"])
    ap.add_argument("--model"), ap.add_argument("--workload"), ap.add_argument("--variant")
    ap.add_argument("--result"), ap.add_argument("--out-dir")
    args = ap.parse_args()
    if args.child == "build":
        return build(args.model, args.model == "tiny")
    if args.child == "rate":
        Path(args.result).write_text(json.dumps(matmul_rate()))
        return
    if args.child == "variant":
        args.profile = args.variant in (args.profile or "").split(",")
        return variant(args)

    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    py = sys.executable
    me = [py, str(Path(__file__).resolve())]
    info = {"versions": versions()}
    if not args.tiny:
        sh(me + ["--child", "rate", "--result", "/tmp/lkbench_rate.json"], log, 60)
        try:
            info.update(json.loads(Path("/tmp/lkbench_rate.json").read_text()))
        except Exception:
            pass
    print("info", info, flush=True)
    models = ["tiny"] if args.tiny else args.models.split(",")
    results = []
    for mk in models:
        rc, dt = sh(me + ["--child", "build", "--model", mk], log, 300)
        print(f"build {mk}: rc={rc} {dt:.0f}s", flush=True)
        for wl in args.workloads.split(","):
            for vn in args.variants.split(","):
                if wl == "fixed" and vn in ("base_pad", "lk_pf"):
                    continue
                if wl == "varied" and vn not in ("base_pad", "lk_pf", "lk"):
                    continue
                left = args.deadline - (time.time() - start)
                if left < 40:
                    print(f"skip {mk}/{wl}/{vn}: deadline", flush=True)
                    continue
                rf = f"/tmp/lkbench/res-{mk}-{wl}-{vn}.json"
                Path(rf).unlink(missing_ok=True)
                cmd = me + ["--child", "variant", "--model", mk, "--workload", wl, "--variant", vn, "--result", rf,
                            "--steps", str(args.steps), "--profile", args.profile, "--out-dir", str(out)]
                with open(log, "a") as f:
                    f.write(f"\n===== {mk} {wl} {vn}\n")
                rc, dt = sh(cmd, log, min(args.per_variant, left - 5))
                if os.path.exists(rf):
                    r = json.loads(Path(rf).read_text())
                else:
                    r = {"variant": vn, "model": mk, "workload": wl, "error": f"rc={rc}"}
                r["wall_s"] = dt
                results.append(r)
                print(row(r), flush=True)
                write(out, info, results)
    write(out, info, results)
    print(Path(out / "train.md").read_text())


def row(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['workload']} | {r['variant']} | FAILED {r['error']} |"
    f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    return (f"| {r['model']} | {r['workload']} | {r['variant']} | {r['tokens_per_s']:.0f} | {r.get('speedup', '')} "
            f"| {f(r['step_ms'], 0)} | {f(r['peak_alloc_gib'])} | {f(r['peak_reserved_gib'])} "
            f"| {r.get('loss_maxrel', '')} | {r.get('mfu', '')} |")


def write(out: Path, info: dict, results: list) -> None:
    base = {(r["model"], r["workload"]): r for r in results
            if r["variant"] in ("baseline", "base_pad") and "error" not in r}
    rate = info.get("bf16_matmul_tflops")
    for r in results:
        if "error" in r:
            continue
        b = base.get((r["model"], r["workload"]))
        if b:
            r["speedup"] = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x"
            if r["losses"] and b["losses"]:
                n = min(len(r["losses"]), len(b["losses"]))
                r["loss_maxrel"] = f"{max(abs(x - y) / abs(y) for x, y in zip(r['losses'][:n], b['losses'][:n])):.4f}"
        gc = r["levers"].get("gc")
        L = SHAPES[r["model"]]["num_hidden_layers"]
        frac = 1.0 if gc == "all" else (gc or 0) / L
        seq = 2048 if r["workload"] == "fixed" else 450
        fpt = flops_per_token(r["model"], seq, frac)
        r["gflop_per_token"] = fpt / 1e9
        if rate:
            r["mfu"] = f"{r['tokens_per_s'] * fpt / 1e12 / rate:.2f}"
    (out / "train.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    hdr = ("| model | workload | variant | tok/s | vs base | step ms | peak alloc GiB | peak reserved GiB "
           "| loss max rel diff (20 steps) | ratio to matmul limit |\n|---|---|---|---|---|---|---|---|---|---|\n")
    (out / "train.md").write_text(f"{json.dumps(info)}\n\n" + hdr + "\n".join(row(r) for r in results) + "\n")


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for p in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "accelerate"):
        try:
            out[p] = version(p)
        except Exception:
            out[p] = None
    return out


if __name__ == "__main__":
    main()
