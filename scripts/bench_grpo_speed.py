# ruff: noqa: E501  (the GPU command in the docstring is one line, to copy as is)
"""GRPO speed and memory: the plain TRL GRPOTrainer recipe against `lorakit train` on the same recipe (issue 26).

GPU command (one call on one H100, carry [".gpu-wheels"], ~7 minutes; results in $OUT and $OUT/bench; add
LKBENCH_COMMIT=<commit> to the exports, which the files record: the device's copy of .git can be stale):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 scripts/bench_grpo_speed.py --out $OUT --write-bench $OUT/bench

CPU smoke test (tiny shapes, 2 steps each; the same code paths and files; a few minutes on 2 busy CPUs):

    .venv/bin/python scripts/bench_grpo_speed.py --tiny --device cpu --out /tmp/lkg --write-bench /tmp/lkg/bench

One process tree: the parent builds random-initialized checkpoints of real shapes (saved bf16; workload b re-saved
NF4 double-quant, as scripts/bench_train.py does; no downloads) with a word-level tokenizer, writes the prompts and
the reward file, records `lorakit estimate`'s forecast, then runs each side in its own child process (clean peak):

- plain: TRL's GRPOTrainer as its docs write it: AutoModelForCausalLM (BitsAndBytesConfig nf4 + double quant + bf16
  compute where the workload is QLoRA), GRPOTrainer(peft_config=LoraConfig(...), args=GRPOConfig(...)) with TRL's
  defaults except the workload's settings below (the recipe's values, spelled as GRPOConfig fields).
- lorakit: `lorakit train` (lorakit.train.run.run_training, in process) on the equivalent recipe, lorakit's defaults.
- lk_no_generation_graphs / lk_no_fused_lora / lk_no_liger (only when named in --only; the last two on workload b):
  lorakit with grpo.generation_graphs / train.fused_lora / train.liger false: what each lever is worth.

Workloads (random weights: speed and memory only; 8 prompts x 8 generations = 64 completions a step, one generate
call a step, one optimizer step of 64 completions, lr constant, seed 42 on both sides):
- b: Llama-3.1-8B shape, NF4 double-quant base, LoRA r=16 alpha=32 dropout 0.05 all-linear, prompts of 64-128
  tokens, 256 completion tokens, temperature 1.0, beta 0.04 (the reference = the base with the adapter disabled:
  a log-prob pass per step), paged 8-bit AdamW; checkpointing and the speed levers: each side's default.
- a: SmolLM2-135M shape (the shipped recipes/grpo-arithmetic.yaml's sizes: bf16 base, r=32 alpha=64 dropout 0,
  96 completion tokens, temperature 0.7, beta 0, adamw_torch, no checkpointing, no Liger), prompts of 64-128 tokens.
Both sides generate to the same lengths: the checkpoint's eos id is the vocabulary size (an id the LM head cannot
produce: no completion ends early; TRL takes its eos ids from the tokenizer and the generation config) and the
reward is random per completion (Python's random.Random(0), so both sides draw the same sequence; a constant reward
would give zero advantages and nothing to learn, which lorakit reports as a failed run).

Measured per run (in the child; timers patched onto the trainer instance, identical on both sides): wall seconds per
optimizer step (after --warmup steps, between the Trainer's step-end callbacks with a device sync), split into
generation (GRPOTrainer._generate: tokenize + generate), scoring (the log-prob passes without gradient: reference,
old policy), reward (GRPOTrainer._calculate_rewards) and the rest (the training forward, backward, optimizer, logging),
generated tokens per second of generation, peak GPU memory allocated / reserved (torch's counters in the process,
load included; also per phase), the mean reward each step. Results are written after every run (a timeout still
leaves data): OUT/grpo_speed.json, OUT/grpo_speed.md, OUT/log.txt; --write-bench DIR copies the first two.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import SHAPES, PlainConsole, sh, stamp, versions  # noqa: E402  (the scripts folder is on the path now)

WORK = Path(os.environ.get("LKGRPO_DIR", "/tmp/lkgrpo"))
PAD, UNK = 0, 1
SHAPES = {**SHAPES, "smol": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                                 rope_theta=100000.0, max_position_embeddings=8192, head_dim=64)}

# name: shape, base, LoRA, GRPO and optimizer settings of both sides; `gc`: None = each side's default
WORKLOADS = {
    "b": dict(title="Llama-3.1-8B shape, NF4 QLoRA", shape="8b", bits=4, r=16, alpha=32, dropout=0.05,
              prompts=(64, 128), completion=256, temperature=1.0, beta=0.04, lr=1e-5, optim="paged_adamw_8bit",
              gc=None, liger=None, prompts_per_step=8, generations=8),
    "a": dict(title="SmolLM2-135M shape, bf16 LoRA (the shipped recipe's sizes)", shape="smol", bits=None, r=32,
              alpha=64, dropout=0.0, prompts=(64, 128), completion=96, temperature=0.7, beta=0.0, lr=1e-4,
              optim="adamw_torch", gc=False, liger=False, prompts_per_step=8, generations=8),
}
TINY = dict(shape="tiny", prompts=(8, 16), completion=16, prompts_per_step=2, generations=4)
ORDER = [("b", "plain"), ("b", "lorakit"), ("a", "plain"), ("a", "lorakit"), ("b", "lk_no_generation_graphs"),
         ("a", "lk_no_generation_graphs"), ("b", "lk_no_fused_lora"), ("b", "lk_no_liger")]
# diagnostic sides (--only): lorakit with one lever off, {side: (section, key, value)}: what each lever is worth
ONE_OFF = {"lk_no_fused_lora": ("train", "fused_lora", False), "lk_no_liger": ("train", "liger", False),
           "lk_no_generation_graphs": ("grpo", "generation_graphs", False)}
# rough wall seconds on an H100 (imports, load, per step): what is skipped when it cannot finish before the deadline
COST = {"8b": {"build": 50, "load": 35, "step": 32}, "smol": {"build": 15, "load": 25, "step": 6},
        "tiny": {"build": 30, "load": 40, "step": 10}}
REWARD = '''"""Random per completion (length-independent); the same draws on both sides (a fresh Random(0) per load)."""
import random

_rng = random.Random(0)


def random_reward(completions, **kwargs):
    return [_rng.random() for _ in completions]
'''


def workload(name: str, tiny: bool) -> dict:
    w = {**WORKLOADS[name], **(TINY if tiny else {}), "name": name}
    if tiny:
        w["title"] = f"the tiny smoke-test model at the sizes of {w['title']}"
    return w


def model_dir(w: dict) -> Path:
    return WORK / f"{w['shape']}-{'nf4' if w['bits'] == 4 else 'bf16'}"


def data_file(w: dict) -> Path:
    return WORK / f"prompts-{w['shape']}-{w['prompts'][0]}-{w['prompts'][1]}.jsonl"


def n_words(shape: str) -> int:
    return min(SHAPES[shape]["vocab_size"], 32000)


# ----------------------------------------------------------------------------------------------
# checkpoint, tokenizer, data
# ----------------------------------------------------------------------------------------------


def tokenizer(vocab: int):
    """Word-level: "t123" is id 123 for every id the model can emit; eos is id `vocab`, which it cannot."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<unk>": UNK, **{f"t{i}": i for i in range(2, vocab)}, "<eos>": vocab}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build(w: dict, device: str) -> None:
    """Random-init checkpoint of the shape, bf16 on disk (NF4 double-quant re-saved where w['bits'] == 4)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    out = model_dir(w)
    if (out / "config.json").exists():
        return
    t = time.time()
    s = SHAPES[w["shape"]]
    cfg = LlamaConfig(**s, bos_token_id=None, eos_token_id=s["vocab_size"], pad_token_id=PAD)
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    d16 = out.with_name(out.name + ".bf16") if w["bits"] == 4 else tmp
    for d in (tmp, d16):
        shutil.rmtree(d, ignore_errors=True)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.generation_config.eos_token_id = s["vocab_size"]
    m.save_pretrained(d16, max_shard_size="5GB")
    del m
    print(f"saved bf16 in {time.time() - t:.1f}s", flush=True)
    if w["bits"] == 4:
        if device == "cuda":
            torch.cuda.empty_cache()
        compute = torch.bfloat16 if device == "cuda" else torch.float32
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
        m = AutoModelForCausalLM.from_pretrained(d16, quantization_config=q, dtype=compute,
                                                 device_map={"": 0} if device == "cuda" else {"": "cpu"})
        m.save_pretrained(tmp)
        shutil.rmtree(d16, ignore_errors=True)
        print(f"saved nf4 in {time.time() - t:.1f}s", flush=True)
    tokenizer(s["vocab_size"]).save_pretrained(tmp)
    os.replace(tmp, out)


def write_inputs(w: dict, steps: int) -> None:
    """Prompts (log-uniform-free: uniform lengths in w['prompts'], random words) and the reward file."""
    import numpy as np

    (WORK / "reward_random.py").write_text(REWARD, encoding="utf-8")
    path = data_file(w)
    if path.exists():
        return
    rng = np.random.default_rng(0)
    lo, hi = w["prompts"]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(max(64, 4 * steps * w["prompts_per_step"])):
            ids = rng.integers(3, n_words(w["shape"]), size=int(rng.integers(lo, hi + 1)))
            f.write(json.dumps({"prompt": " ".join(f"t{i}" for i in ids)}) + "\n")


def recipe_for(w: dict, steps: int, device: str, side: str = "lorakit"):
    """The lorakit recipe of workload `w` (also what `lorakit estimate` forecasts); a diagnostic `side` (ONE_OFF)
    turns one lever off."""
    import yaml

    from lorakit.recipe.loader import load_recipe

    cuda = device == "cuda"
    g = w["prompts_per_step"] * w["generations"]
    train = {"max_steps": steps, "lr": w["lr"], "scheduler": "constant", "warmup_ratio": 0.0, "batch_size": g,
             "grad_accum": 1, "logging_steps": 1, "seed": 42, "optimizer": w["optim"] if cuda else "adamw_torch"}
    if w["gc"] is not None:
        train["gradient_checkpointing"] = w["gc"]
    if w["liger"] is not None:
        train["liger"] = w["liger"]
    grpo_over = {}
    if side in ONE_OFF:
        section, key, value = ONE_OFF[side]
        (train if section == "train" else grpo_over)[key] = value
    doc = {"name": f"grpo-speed-{w['name']}", "base_model": str(model_dir(w)), "method": "grpo",
           "quantization": ({"bits": 4, "quant_type": "nf4", "double_quant": True} if w["bits"] == 4
                            else {"bits": "none"}),
           "lora": {"r": w["r"], "alpha": w["alpha"], "dropout": w["dropout"], "targets": "all-linear"},
           "data": {"path": str(data_file(w)), "format": "prompt"},
           "grpo": {"rewards": [{"fn": "reward_random.py:random_reward"}], "num_generations": w["generations"],
                    "max_prompt_length": w["prompts"][1], "max_completion_length": w["completion"],
                    "temperature": w["temperature"], "top_p": 1.0, "beta": w["beta"], "loss_type": "dapo",
                    "epsilon": 0.2, "generation_batch_size": g, "log_completions": False, **grpo_over},
           "train": train, "output": {"dir": str(WORK / "runs" / f"{side}-{w['name']}")}}
    path = WORK / f"recipe-{w['name']}-{side}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return load_recipe(path)


def forecast(w: dict, steps: int) -> dict:
    """`lorakit estimate`'s memory forecast for the lorakit recipe on CUDA (GiB), or the error."""
    try:
        from lorakit.estimate.memory import estimate

        e = estimate(recipe_for(w, steps, "cuda"), device="cuda")
        m = e.get("memory") or {}
        g = 2**30
        return {k: round(m[k] / g, 2) for k in ("peak_bytes", "allocated_peak_bytes", "reserved_peak_bytes")
                if m.get(k) is not None} | {
            "phase": m.get("peak_phase") or m.get("phase"), "memory": m}
    except Exception as e:  # noqa: BLE001 - the runs still measure
        return {"error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------------------------
# children: the measurement probe and the two sides
# ----------------------------------------------------------------------------------------------


def install_probe(device: str, on_step=None) -> dict:
    """Patch transformers.Trainer.train so that the trainer it runs (either side's GRPOTrainer) is timed: its
    generation, no-grad log-prob and reward calls (wrapped on the instance, so a subclass's overrides count too),
    each optimizer step (a callback, which then calls `on_step()`), and the peak memory of each phase. Returns the
    record it fills."""
    import torch
    import transformers
    from transformers import TrainerCallback

    cuda = device == "cuda"
    rec: dict = {"steps": [], "rewards": [], "phase_peaks": {}, "cur": None, "t": None}

    def zero() -> dict:
        return {"generation_s": 0.0, "scoring_s": 0.0, "reward_s": 0.0, "tokens": 0}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def mark(phase: str) -> None:  # the peak since the last mark belongs to `phase`
        if cuda:
            pk = rec["phase_peaks"].setdefault(phase, [0.0, 0.0])
            pk[0] = max(pk[0], torch.cuda.max_memory_allocated() / 2**30)
            pk[1] = max(pk[1], torch.cuda.max_memory_reserved() / 2**30)
            torch.cuda.reset_peak_memory_stats()

    def timed(key: str, fn, when=None):
        @functools.wraps(fn)
        def inner(*a, **k):
            if when is not None and not when():
                return fn(*a, **k)
            sync()
            mark("train")
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            rec["cur"][f"{key}_s"] += time.perf_counter() - t
            mark(key)
            if key == "generation":  # (prompt_ids, completion_ids, ...)
                rec["cur"]["tokens"] += sum(len(c) for c in out[1])
            return out
        return inner

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            sync()
            mark("train")
            t = time.perf_counter()
            rec["steps"].append({"step": state.global_step, "wall_s": t - rec["t"], **rec["cur"]})
            rec["cur"], rec["t"] = zero(), t
            if on_step is not None:
                on_step()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                rec["rewards"].append({"step": state.global_step, "reward": float(logs["reward"]),
                                       "mean_length": logs.get("completions/mean_length")})

    orig = transformers.Trainer.train

    def train(self, *a, **k):
        for name, key, when in (("_generate", "generation", None),
                                ("_get_per_token_logps_and_entropies", "scoring", lambda: not torch.is_grad_enabled()),
                                ("_calculate_rewards", "reward", None)):
            if hasattr(self, name):
                setattr(self, name, timed(key, getattr(self, name), when))
        self.add_callback(Clock())
        sync()
        mark("load")
        rec["cur"], rec["t"] = zero(), time.perf_counter()
        return orig(self, *a, **k)

    transformers.Trainer.train = train
    return rec


def plain(w: dict, steps: int, device: str) -> dict:
    """TRL's GRPOTrainer as its docs write it, with the workload's settings."""
    import importlib.util

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import GRPOConfig, GRPOTrainer

    cuda = device == "cuda"
    set_seed(42)
    dtype = torch.bfloat16 if cuda else torch.float32
    kw = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
          } if w["bits"] == 4 else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir(w), dtype=dtype, device_map={"": 0 if cuda else "cpu"}, **kw)
    spec = importlib.util.spec_from_file_location("reward_random", WORK / "reward_random.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = w["prompts_per_step"] * w["generations"]
    extra = {} if w["gc"] is None else {"gradient_checkpointing": w["gc"]}
    if w["liger"] is not None:
        extra["use_liger_kernel"] = w["liger"]
    args = GRPOConfig(output_dir=str(WORK / "runs" / f"plain-{w['name']}"), max_steps=steps, learning_rate=w["lr"],
                      lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=g,
                      gradient_accumulation_steps=1, num_generations=w["generations"], generation_batch_size=g,
                      max_completion_length=w["completion"], temperature=w["temperature"], top_p=1.0, beta=w["beta"],
                      loss_type="dapo", epsilon=0.2, optim=w["optim"] if cuda else "adamw_torch", logging_steps=1,
                      seed=42, data_seed=42, bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no",
                      disable_tqdm=True, **extra)
    trainer = GRPOTrainer(model=model, reward_funcs=[mod.random_reward], args=args,
                          train_dataset=load_dataset("json", data_files=str(data_file(w)), split="train"),
                          processing_class=AutoTokenizer.from_pretrained(model_dir(w)),
                          peft_config=LoraConfig(r=w["r"], lora_alpha=w["alpha"], lora_dropout=w["dropout"],
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    return {"gradient_checkpointing": bool(args.gradient_checkpointing), "liger": bool(args.use_liger_kernel)}


def lorakit(w: dict, steps: int, device: str, side: str = "lorakit") -> dict:
    """`lorakit train` on the same recipe (a diagnostic side: with one lever off): lorakit.train.run.run_training,
    in this process."""
    from lorakit.train.run import run_training

    summary = run_training(recipe_for(w, steps, device, side), overwrite=True, console=PlainConsole())
    o = summary["options"]
    return {"options": o, "gradient_checkpointing": o.get("gradient_checkpointing"), "liger": o.get("liger"),
            "levers": ", ".join([k for k in ("fused_lora", "dropout_kernel", "cuda_graphs", "offload_embeddings",
                                             "expandable_segments") if o.get(k)]
                                + ([f"frozen {o['frozen_dtype']}"] if o.get("frozen_dtype") else []))}


def child(args) -> None:
    import torch

    w = workload(args.workload, args.tiny)
    res: dict = {"workload": w["name"], "side": args.side, "steps": args.steps,
                 "expected_tokens_per_step": w["prompts_per_step"] * w["generations"] * w["completion"]}

    def dump() -> None:  # after every step too: a child killed by the deadline still leaves its steps
        if args.device == "cuda":
            pk = list(rec["phase_peaks"].values()) + [[torch.cuda.max_memory_allocated() / 2**30,
                                                       torch.cuda.max_memory_reserved() / 2**30]]
            res.update(peak_alloc_gib=max(p[0] for p in pk), peak_reserved_gib=max(p[1] for p in pk),
                       phase_peaks_gib={k: [round(x, 2) for x in v] for k, v in rec["phase_peaks"].items()})
        else:
            import resource

            res["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        res.update(step_log=rec["steps"], rewards=rec["rewards"])
        tmp = Path(args.result + ".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, args.result)

    rec = install_probe(args.device, dump)
    if args.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    try:
        if args.side == "plain":
            res.update(plain(w, args.steps, args.device))
        else:
            res.update(lorakit(w, args.steps, args.device, args.side))
    except BaseException as e:  # noqa: BLE001 - keep what the run measured before it failed
        res["run_error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-3000:]
    dump()


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------


def summarize(r: dict, warmup: int) -> dict:
    """Means over the steps after the warm-up: seconds per step and per phase, generated tokens per second."""
    timed = [s for s in r.get("step_log") or [] if s["step"] > warmup]
    if not timed:
        r.setdefault("error", "no timed steps")
        return r
    n = len(timed)
    tot = {k: sum(s[k] for s in timed) for k in ("wall_s", "generation_s", "scoring_s", "reward_s", "tokens")}
    r.update(timed_steps=n, step_s=tot["wall_s"] / n, generation_s=tot["generation_s"] / n,
             scoring_s=tot["scoring_s"] / n, reward_s=tot["reward_s"] / n,
             train_s=(tot["wall_s"] - tot["generation_s"] - tot["scoring_s"] - tot["reward_s"]) / n,
             tokens_per_step=tot["tokens"] / n, full_length=tot["tokens"] == n * r["expected_tokens_per_step"],
             gen_tokens_per_s=tot["tokens"] / tot["generation_s"] if tot["generation_s"] else None)
    return r


COLS = [("step_s", "s/step", 2), ("generation_s", "generation s", 2), ("scoring_s", "scoring s", 2),
        ("reward_s", "reward s", 3), ("train_s", "fwd+bwd+opt s", 2), ("tokens_per_step", "tokens/step", 0),
        ("gen_tokens_per_s", "gen tok/s", 0), ("peak_alloc_gib", "peak alloc GiB", 2),
        ("peak_reserved_gib", "peak reserved GiB", 2)]


def _f(x, d=2) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def table(results: list[dict]) -> str:
    head = "| workload | side | " + " | ".join(c[1] for c in COLS) + " | mean reward per step | notes |"
    lines = [head, "|" + "---|" * (len(COLS) + 4)]
    for r in results:
        rw = ", ".join(f"{x['reward']:.3f}" for x in r.get("rewards") or [])
        notes = [x for x in (r.get("error"), r.get("run_error")) if x]
        if r.get("full_length") is False:
            notes.append(f"EARLY EOS: {r['tokens_per_step']:.0f} of {r['expected_tokens_per_step']} tokens a step")
        if "gradient_checkpointing" in r:
            notes.append(f"checkpointing {r['gradient_checkpointing']}, liger {r['liger']}")
        if r.get("levers"):
            notes.append(r["levers"])
        if r.get("max_rss_gib"):
            notes.append(f"max RSS {r['max_rss_gib']:.2f} GiB")
        note = "; ".join(notes)
        lines.append(f"| {r['workload']} | {r['side']} | " + " | ".join(_f(r.get(k), d) for k, _, d in COLS)
                     + f" | {rw or '-'} | {note} |")
        p = next((x for x in results if x["workload"] == r["workload"] and x["side"] == "plain"), None)
        if r["side"] != "plain" and p is not None and "step_s" in r and "step_s" in p:
            ratio = [(r.get(k) / p[k]) if r.get(k) is not None and p.get(k) else None for k, _, _ in COLS]
            lines.append(f"| {r['workload']} | **{r['side']}/plain** | " + " | ".join(
                "-" if x is None else f"**{x:.2f}x**" for x in ratio) + " | | |")
    return "\n".join(lines)


def estimate_lines(results: list[dict], forecasts: dict) -> str:
    lines = []
    for name, f in forecasts.items():
        r = next((x for x in results if x["workload"] == name and x["side"] == "lorakit"), {})
        if "error" in f:
            lines.append(f"- {name}: estimate failed: {f['error']}")
            continue
        parts = []
        for key, what, measured in (("allocated_peak_bytes", "allocated", r.get("peak_alloc_gib")),
                                    ("reserved_peak_bytes", "reserved", r.get("peak_reserved_gib")),
                                    ("peak_bytes", "device total (reserved + CUDA context)", None)):
            if f.get(key) is not None:
                vs = f" vs measured {measured:.2f} GiB = **{f[key] / measured:.2f}x**" if measured else ""
                parts.append(f"{what} {f[key]:.2f} GiB{vs}")
        phase = f" (peak phase: {f['phase']})" if f.get("phase") else ""
        lines.append(f"- {name}: forecast " + "; ".join(parts) + phase)
    return "\n".join(lines)


def write(out: Path, bench: str | None, info: dict, results: list[dict], forecasts: dict) -> None:
    doc = {"info": info, "forecasts": forecasts, "results": results}
    v = info["versions"]
    gpu = info.get("gpu") or "CPU (smoke test: the numbers mean nothing)"
    desc = "\n".join(f"- **{k}**: {w['title']}: " + ", ".join(
        f"{x}={w[x]}" for x in ("shape", "bits", "r", "alpha", "dropout", "prompts", "completion", "temperature",
                                "beta", "lr", "optim", "gc", "liger", "prompts_per_step", "generations"))
        for k, w in info["workloads"].items())
    md = f"""# GRPO speed: `lorakit train` vs the plain TRL GRPOTrainer recipe (issue 26)

Date: {info['date']}. Machine: {gpu}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']},
trl {v['trl']}, bitsandbytes {v['bitsandbytes']}, liger-kernel {v['liger-kernel']}, lorakit at {info.get('commit')}.
Script: `scripts/bench_grpo_speed.py` (one call, a child process per run). Raw: `grpo_speed.json`.
Command: `{info['command']}`

Workloads (random weights: speed and memory only; gc/liger None = each side's default):
{desc}

Same lengths on both sides: the checkpoint's eos id is the vocabulary size, which the LM head cannot emit (no
completion ends early: tokens/step = completions x max length), and the reward is random per completion
(random.Random(0) on both sides). Each run: {info['steps']} optimizer steps, the first {info['warmup']} not timed.
Seconds are means per optimizer step; generation = GRPOTrainer._generate, scoring = its log-prob passes without
gradient (reference, old policy), reward = _calculate_rewards, fwd+bwd+opt = the rest of the step (training
forward, backward, optimizer, logging). gen tok/s = generated tokens / generation seconds. Peaks: torch's max
allocated / reserved in the run's process, load included (by phase in the JSON: `phase_peaks_gib`).

{table(results)}

## `lorakit estimate` (lorakit.estimate.memory.estimate(recipe, device="cuda")) vs lorakit's measured peak
{estimate_lines(results, forecasts)}
"""
    out.mkdir(parents=True, exist_ok=True)
    (out / "grpo_speed.json").write_text(json.dumps(doc, indent=1))
    (out / "grpo_speed.md").write_text(md)
    if bench:
        Path(bench).mkdir(parents=True, exist_ok=True)
        for name in ("grpo_speed.json", "grpo_speed.md"):
            shutil.copyfile(out / name, Path(bench) / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out", help="results and log")
    ap.add_argument("--write-bench", default=None, metavar="DIR", help="also copy grpo_speed.{json,md} into DIR")
    ap.add_argument("--workloads", default="b,a", help="comma list of workloads (b: 8B shape, a: 135M shape)")
    ap.add_argument("--only", default="plain,lorakit", help="comma list of sides")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps a run (default 4; 2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=1, help="steps not timed")
    ap.add_argument("--deadline", type=float, default=480,
                    help="seconds: skip what would run past it (a device call may run 600 s, installs included)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and sizes (CPU smoke test)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--child", choices=["build", "run"])
    ap.add_argument("--workload"), ap.add_argument("--side"), ap.add_argument("--result")
    args = ap.parse_args()
    args.steps = args.steps or (2 if args.tiny else 4)
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.child == "build":
        return build(workload(args.workload, args.tiny), args.device)
    if args.child == "run":
        return child(args)

    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)] + (
        ["--tiny"] if args.tiny else [])
    names = args.workloads.split(",")
    info = {**stamp(), "versions": versions(), "device": args.device, "steps": args.steps, "warmup": args.warmup,
            "command": "python3 scripts/bench_grpo_speed.py " + " ".join(sys.argv[1:]),
            "workloads": {n: workload(n, args.tiny) for n in names}}
    results: list[dict] = []
    forecasts: dict = {}
    built: dict = {}
    for name, side in [p for p in ORDER if p[0] in names and p[1] in args.only.split(",")]:
        w = workload(name, args.tiny)
        cost = COST[w["shape"]]
        run_cost = cost["load"] + args.steps * cost["step"]
        left = args.deadline - (time.time() - start)
        if model_dir(w) not in built:
            need = 0 if (model_dir(w) / "config.json").exists() else cost["build"]
            if left < need + run_cost:
                built[model_dir(w)] = "skipped (deadline)"
            else:
                rc, dt = sh(me + ["--child", "build", "--workload", name] + common, log, min(left - 10, 4 * cost["build"]))
                built[model_dir(w)] = rc
                print(f"build {name}: rc={rc} {dt:.0f}s", flush=True)
            if built[model_dir(w)] == 0:
                write_inputs(w, args.steps)
                forecasts[name] = forecast(w, args.steps)
                print(f"estimate {name}: {({k: v for k, v in forecasts[name].items() if k != 'memory'})}", flush=True)
        res = {"workload": name, "side": side, "steps": args.steps}
        left = args.deadline - (time.time() - start)
        if built[model_dir(w)] != 0:
            res["error"] = f"model not built ({built[model_dir(w)]})"
        elif left < run_cost:
            res["error"] = "skipped (deadline)"
        else:
            rf = WORK / f"res-{name}-{side}.json"
            rf.unlink(missing_ok=True)
            rc, dt = sh(me + ["--child", "run", "--workload", name, "--side", side, "--result", str(rf)] + common,
                        log, min(left - 5, 3 * run_cost))
            res = summarize(json.loads(rf.read_text()), args.warmup) if rf.exists() else {**res, "error": f"rc={rc}"}
            if rc != 0 and rf.exists():
                res["error"] = f"rc={rc} after {len(res.get('step_log') or [])} steps"
            res["wall_s"] = round(dt, 1)
        info["gpu"] = info.get("gpu") or res.get("gpu")
        results.append(res)
        print(f"{name}/{side}: " + json.dumps({k: v for k, v in res.items() if k not in (
            "step_log", "traceback", "options", "rewards")}), flush=True)
        write(out, args.write_bench, info, results, forecasts)
    write(out, args.write_bench, info, results, forecasts)
    print(table(results), flush=True)
    print(estimate_lines(results, forecasts), flush=True)
    print(f"total {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
