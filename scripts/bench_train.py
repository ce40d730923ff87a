# ruff: noqa: E501  (the GPU command in the docstring is one line, to copy as is)
"""`lorakit train` vs the plain TRL + peft + bitsandbytes stack written as their docs show, and vs Unsloth, on one GPU
(issues 7, 25).

GPU command (carry [".gpu-wheels", ".uns-wheels"]; results in $OUT and $OUT/bench). Unsloth pins older trl/datasets,
so its packages go to their own dir, put first on PYTHONPATH for its runs only (`--unsloth-site`; without it they
are skipped). The whole plan does not fit one 10-minute call: one call per group of workloads, each workload's
lorakit and Unsloth runs in the same call (~8 minutes each; bench files of the last call only). Add
LKBENCH_COMMIT=<commit> to the exports: the files record it (the device's copy of .git can be stale):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-wheels/*.whl && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/usite .uns-wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 scripts/bench_train.py --models 8b --workloads fixed --only baseline,lorakit,unsloth,lk_no_dropout,unsloth_no_dropout --unsloth-site /tmp/usite --out $OUT --write-bench $OUT/bench

    ... --models 8b --workloads varied,long16k --only lorakit,unsloth --unsloth-site /tmp/usite --out $OUT --write-bench $OUT/bench
    ... --models 8b --workloads long32k --only lorakit,unsloth --unsloth-site /tmp/usite --out $OUT --write-bench $OUT/bench

The longest row that trains (--max-context; OUT/max_context.json and .md; one call per run, each ~8 minutes; a
later call can go on from an earlier one's bounds with --bisect LO,HI):

    ... && python3 scripts/bench_train.py --max-context --only lorakit --probe-start 65536 --out $OUT
    ... && python3 scripts/bench_train.py --max-context --only unsloth --probe-start 65536 --unsloth-site /tmp/usite --out $OUT

--max-context probes, for each run, single rows of growing length (--probe-start, doubled until a probe fails, then
bisected to --resolution tokens, 8192), each in its own child training 2 optimizer steps (so that the optimizer's
states exist at the peak), on a model of the 8B width with --probe-layers layers (2; a full 32-layer step at 300k
tokens takes minutes: attention is quadratic) plus a "ballast" GPU tensor allocated before the model loads: the
missing layers' bytes, each layer's NF4 weights as saved (the safetensors headers of layer 0: packed weights, scales,
norms) plus its LoRA weights and gradients in fp32 (computed; the paged optimizer's states are outside torch's
allocator). Valid only where a layer's GPU memory does not grow with the row (its checkpoint offloaded to host
memory): each probe's peak, per-step memory and the run's options are in the JSON to check that. A probe that runs
out of memory (torch.OutOfMemoryError in its result or its log) is a failed length, never a crash of the parent.

Where a step's time goes (torch.profiler over the last 2 steps of each run; tables in $OUT/prof, no bench files):

    ... && python3 scripts/bench_train.py --models 8b --only baseline,lorakit,lk_flex --out $OUT --profile $OUT/prof

Where the host waits for the GPU (torch's sync debug mode over two steps after the warm-up; $OUT/sync/sync-*.txt):

    ... && python3 scripts/bench_train.py --models 1b --workloads varied --only lorakit --out $OUT --sync-report $OUT/sync

A code change beside the code before it, in the same call (an untracked folder in the checkout travels to the device):

    mkdir bench-prev && git archive HEAD lorakit | tar -x -C bench-prev
    ... && python3 scripts/bench_train.py --models 8b --workloads fixed --only baseline,lorakit,lorakit@prev --prev-code bench-prev --out $OUT --write-bench $OUT/bench

After editing this script's text: `python3 scripts/bench_train.py --render bench` rewrites bench/train.md from bench/train.json.

CPU smoke test (tiny model; a few minutes on 2 busy CPUs, mostly imports; the same code paths and files):

    .venv/bin/python scripts/bench_train.py --tiny --device cpu --out /tmp/lkb --write-bench /tmp/lkb/bench

CPU smoke test of --max-context (tiny model, lorakit only): ... --tiny --device cpu --max-context --only lorakit
--probe-start 64 --probe-max 256 --resolution 32 --out /tmp/lkb

One process tree: the parent measures the bf16 matmul rate, builds random-initialized checkpoints of real shapes
(Llama-3.1-8B, then Llama-3.2-1B; saved bf16, re-saved NF4 double-quant under /tmp/lkbench, no downloads) and a
word-level tokenizer, writes the data files, then runs each variant in its own child process (clean peak memory):

- baseline: the TRL docs' QLoRA recipe: BitsAndBytesConfig(nf4, double quant, bf16 compute), sdpa,
  SFTTrainer(peft_config=LoraConfig(r=16, alpha=32, dropout=0.05, all-linear), SFTConfig(gradient_checkpointing=True,
  bf16=True, optim=paged_adamw_8bit)); batches padded by TRL's collator.
- baseline_peft: the same after peft's `prepare_model_for_kbit_training(model)` (the peft docs' QLoRA recipe).
- lorakit: `lorakit.train.run.run_training` (what `lorakit train` runs) on the equivalent recipe with lorakit's defaults
  (on CUDA: Liger, fused LoRA, bf16 frozen weights, padding-free batches, every layer checkpointed; for batches of
  one shape CUDA graphs with the input embeddings in host memory).
- lorakit_budget: the same recipe with train.memory_budget_gb (budget mode: the fastest setting that fits).
- lorakit_k16: an explicit gradient_checkpointing: 16 (partial checkpointing, to re-check that it does not pay).
- lk_flex / lk_sdpa: lorakit with padding-free batches and flex attention (the per-row mask without the L x L work)
  or sdpa (the L x L square): the attention kernels before varlen attention, lorakit's default for such batches.
- lk_compile: train.torch_compile on; lk_no_dropout: lora.dropout 0 (what dropout costs; not the same recipe);
  lk_graphs / lk_no_graphs: train.cuda_graphs true / false (lorakit/speed/layer_graphs.py; true keeps the embeddings on
  the GPU); lk_adamw_fused:
  train.optimizer adamw_torch_fused (fp32 optimizer states; the default is paged 8-bit AdamW);
  lk_no_padding_free / lk_no_liger / lk_no_fused_lora: one lever off. X@prev: X with the code of --prev-code.
  lk_offload: train.offload_activations true (each checkpointed layer's input in pinned host memory);
  lk_offload_tiled: that and train.tiled_mlp true (auto turns both on only where a run would not fit otherwise).
- unsloth: Unsloth's recipe as its docs show, in a child with `import unsloth` first: FastLanguageModel.from_pretrained
  (the same NF4 checkpoint, load_in_4bit, bf16, max_seq_length = the workload's rows), get_peft_model(r=16, alpha=32,
  dropout 0.05, the 7 linears, use_gradient_checkpointing="unsloth", random_state=42), TRL's SFTConfig/SFTTrainer
  as Unsloth patches them, with the baseline's hyper-parameters set explicitly (Unsloth's config defaults differ:
  gradient accumulation 2, weight decay 0.001, warm-up 10%, seed 3407); its own batching and kernel choices stay and
  are recorded. unsloth_no_dropout: lora_dropout 0 (Unsloth's fast LoRA path), beside lk_no_dropout. Each lorakit
  run is reported against Unsloth's run of the same workload: tok/s ratio (vs unsloth) and peak allocated ratio
  (mem vs unsloth, lorakit / Unsloth: <= 1.00 means lorakit holds no more).

Workloads: fixed (2 rows x 2048 tokens a step), varied (8 rows a step, log-normal lengths, median 450 tokens),
long16k / long32k (1 row x 16384 / 32768 tokens a step, rows made like the fixed ones; 8 steps, 3 of them warm-up:
a step takes seconds); lorakit's data.max_length and Unsloth's max_seq_length are the workload's row length.
Both sides see the same token ids in the same order (same seed and data_seed). Measured per run: non-padding tokens/s
over the steps after 4 warm-up steps (3 for the long rows; from the Trainer's own `num_input_tokens_seen`, counted the same way for both,
and the wall time of its per-step log events), peak GPU memory allocated / reserved in the process (torch's
counters, load included), the first 20 losses, and the ratio to the physical limit: tokens/s x FLOPs per token
against the measured bf16 matmul rate. Results are written after every variant (a timeout still leaves data):
OUT/train.json, OUT/train.md, OUT/log.txt, and with --write-bench DIR the bench files DIR/train.json, DIR/train.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a run named "X@prev" imports lorakit from --prev-code DIR (the code before a change, measured beside it)
sys.path.insert(0, os.environ.get("LKBENCH_CODE") or str(ROOT))

WORK = Path(os.environ.get("LKBENCH_DIR", "/tmp/lkbench"))
WARMUP = 4
LOSSES = 20
PROFILED_STEPS = 3  # --profile: a warm-up step and 2 recorded steps, run after the timed steps
MARKER = "<!-- previous runs below: kept by scripts/bench_train.py -->"

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
NAMES = {"8b": "Llama-3.1-8B shape", "1b": "Llama-3.2-1B shape", "tiny": "tiny Llama (CPU smoke test)"}
# rows a step x tokens a row; the tiny model (CPU smoke test) runs each at 1/32 of the length
WORKLOADS = {"fixed": (2, 2048), "varied": (8, 2048), "long16k": (1, 16384), "long32k": (1, 32768)}
LONG_WARMUP = 3  # long rows run 8 steps (a 32k step takes seconds): 3 warm-up steps, 5 timed
PROBE_STEPS = 2  # --max-context: two optimizer steps, so that the optimizer's states exist at the peak
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Most important first - each 8B workload's lorakit and Unsloth runs, then the plain stack - so that a timeout still
# leaves the headline numbers. (model, workload, run, steps)
PLAN = [
    ("8b", "fixed", "baseline", 20), ("8b", "fixed", "lorakit", 20), ("8b", "fixed", "lk_offload", 20),
    ("8b", "fixed", "unsloth", 20),
    ("8b", "fixed", "lk_no_dropout", 12), ("8b", "fixed", "unsloth_no_dropout", 12),
    # varied: 30 steps (25 timed), the batches' lengths and the host's delays vary from step to step
    ("8b", "varied", "lorakit", 30), ("8b", "varied", "unsloth", 30),
    ("8b", "long16k", "lorakit", 8), ("8b", "long16k", "lk_offload", 8), ("8b", "long16k", "unsloth", 8),
    ("8b", "long32k", "lorakit", 8), ("8b", "long32k", "lk_offload", 8), ("8b", "long32k", "lk_offload_tiled", 8),
    ("8b", "long32k", "unsloth", 8), ("8b", "varied", "lk_offload", 30), ("8b", "varied", "lk_no_graphs", 30),
    ("8b", "varied", "baseline", 30),
    ("1b", "fixed", "baseline", 20), ("1b", "fixed", "lorakit", 20),
    ("1b", "varied", "baseline", 30), ("1b", "varied", "lorakit", 30),
    ("8b", "varied", "lk_flex", 12), ("8b", "fixed", "lorakit_budget", 12), ("8b", "fixed", "baseline_peft", 12),
    ("1b", "fixed", "lorakit_budget", 12), ("8b", "fixed", "lorakit_k16", 12),
    ("8b", "fixed", "lk_no_padding_free", 12), ("8b", "fixed", "lk_no_liger", 12),
    ("8b", "fixed", "lk_no_fused_lora", 12), ("8b", "fixed", "lk_flex", 12),
    ("8b", "fixed", "lk_compile", 12), ("8b", "fixed", "lk_graphs", 20),
    ("8b", "varied", "lk_sdpa", 12), ("8b", "fixed", "lk_adamw_fused", 20), ("1b", "fixed", "lk_adamw_fused", 20),
    ("1b", "fixed", "lk_graphs", 20), ("1b", "fixed", "lk_no_liger", 12), ("1b", "fixed", "lk_no_fused_lora", 12),
    ("1b", "varied", "lk_no_graphs", 30), ("8b", "varied", "lk_graphs", 30),
]
MAX_STEPS = max(p[3] for p in PLAN if p[1] in ("fixed", "varied"))
# rough wall seconds of a child on an H100 (imports, load, steps; measured 2026-12-06 plus ~25%): used to skip what
# cannot finish in time; the long workloads' 8 steps by workload; Unsloth's runs add UNSLOTH_COST (its imports and
# patching)
COST = {"8b": {"build": 60, 30: 55, 20: 50, 16: 45, 12: 40, "long16k": 60, "long32k": 85},
        "1b": {"build": 30, 30: 32, 20: 30, 16: 29, 12: 28, "long16k": 45, "long32k": 60},
        "tiny": {"build": 30, 30: 45, 20: 40, 16: 40, 12: 40, "long16k": 40, "long32k": 40}}
UNSLOTH_COST = 25


def stamp() -> dict:
    """The date and the code of a run: LKBENCH_COMMIT where set (the device's copy of .git can be stale, so the GPU
    command should name the commit it carries: `LKBENCH_COMMIT=abc1234 python3 scripts/...`), else git's HEAD."""
    code = os.environ.get("LKBENCH_COMMIT")
    if not code:
        try:
            code = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001 - the device's copy may not be a git checkout
            code = None
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": code}


def cost_of(model: str, workload: str, run: str, steps: int) -> float:
    c = COST[model.split("-")[0]]
    return c.get(workload, c.get(steps, c[30])) + (UNSLOTH_COST if run.startswith("unsloth") else 0)


def shape(model: str) -> dict:
    """The config of a model name: a SHAPES key, or "KEY-Nl" (--max-context's probe model: KEY's width with N
    layers and a position table long enough for any probe, so that no library rescales RoPE)."""
    base, _, layers = model.partition("-")
    s = dict(SHAPES[base])
    if layers:
        s.update(num_hidden_layers=int(layers.removesuffix("l")), max_position_embeddings=1 << 21)
    return s


def seq_len(model: str, workload: str) -> int:
    """Tokens a row (the longest, for varied). "lenN" (--max-context's probes): N tokens."""
    if workload.startswith("len"):
        return int(workload[3:])
    return WORKLOADS[workload][1] // (32 if model == "tiny" else 1)


def batch_size(workload: str) -> int:
    return 1 if workload.startswith("len") else WORKLOADS[workload][0]


def warmup(workload: str) -> int:
    """Steps left out of the timing: fewer for the long rows' short runs."""
    return WARMUP if workload in ("fixed", "varied") else LONG_WARMUP


def n_words(model: str) -> int:
    return min(shape(model)["vocab_size"], 32000)


def model_dir(model: str) -> Path:
    return WORK / f"{model}-nf4"


def data_file(model: str, workload: str) -> Path:
    return WORK / f"data-{model}-{workload}.jsonl"


def data_rows(model: str, workload: str) -> list[list[int]]:
    """The rows of a workload: enough for the longest run; shorter runs see the same first batches (the sampler's
    order depends only on the seed and the row count), so every run's losses compare step by step."""
    if workload.startswith("len"):
        steps = PROBE_STEPS
    else:
        steps = MAX_STEPS if workload in ("fixed", "varied") else max(p[3] for p in PLAN if p[1] == workload)
    kind = "varied" if workload == "varied" else "fixed"  # the long workloads' rows are fixed ones, longer
    return make_rows(kind, batch_size(workload) * steps, n_words(model), seq_len(model, workload))


# ----------------------------------------------------------------------------------------------
# data and tokenizer: word-level, so that "t123 t45" is exactly the ids [123, 45] (+ eos) for both sides
# ----------------------------------------------------------------------------------------------

PAD, UNK, EOS = 0, 1, 2


def tokenizer(words: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<unk>": UNK, "<eos>": EOS, **{f"t{i}": i for i in range(3, words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_rows(workload: str, n_rows: int, words: int, seq: int, seed: int = 0) -> list[list[int]]:
    """Token ids of each row, ending in eos. fixed: `seq` tokens; varied: log-normal, median ~22% of seq
    (450 of 2048), sigma 0.6, clipped to [32, seq]. Each row repeats a random motif (learnable: the loss falls)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        if workload == "fixed":
            n = seq
        else:
            n = int(min(seq, max(min(32, seq), rng.lognormal(math.log(seq * 450 / 2048), 0.6))))
        motif = rng.integers(3, words, size=int(rng.integers(8, 64)))
        rows.append([int(x) for x in np.resize(motif, n - 1)] + [EOS])
    return rows


def write_data(model: str, workload: str) -> list[list[int]]:
    rows = data_rows(model, workload)
    path = data_file(model, workload)
    if not path.exists():
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"text": " ".join(f"t{i}" for i in r[:-1])}) + "\n")
    return rows


def check_same_tokens(model: str, workload: str, rows: list[list[int]], device: str) -> str:
    """lorakit's data preparation turns the text file into exactly the baseline's token ids: "same" or why not."""
    from lorakit.data.prepare import prepare_sft

    recipe = lorakit_recipe(model, workload, "lorakit", MAX_STEPS, device, WORK / "check")
    prepared = prepare_sft(recipe, tokenizer(n_words(model)))
    got = list(prepared.train["input_ids"])
    if got == rows:
        return "same"
    bad = next((i for i, (a, b) in enumerate(zip(got, rows)) if a != b), "count")
    return f"DIFFERENT: lorakit's tokens differ from the baseline's (row {bad}); losses do not compare"


# ----------------------------------------------------------------------------------------------
# children
# ----------------------------------------------------------------------------------------------


def build(model: str, device: str) -> None:
    """Random-init checkpoint of the real shape: bf16 on disk, then loaded with bnb NF4 double-quant and re-saved."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    d16, d4 = WORK / f"{model}-bf16", model_dir(model)
    if (d4 / "config.json").exists():
        return
    t = time.time()
    cfg = LlamaConfig(**shape(model), bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(d16, max_shard_size="5GB")
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"saved bf16 in {time.time() - t:.1f}s", flush=True)
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute)
    m = AutoModelForCausalLM.from_pretrained(d16, quantization_config=q, dtype=compute,
                                             device_map={"": 0} if device == "cuda" else {"": "cpu"})
    tmp = d4.with_name(d4.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    m.save_pretrained(tmp)
    tokenizer(n_words(model)).save_pretrained(tmp)
    os.replace(tmp, d4)
    shutil.rmtree(d16, ignore_errors=True)
    print(f"saved nf4 in {time.time() - t:.1f}s", flush=True)


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
    return {"bf16_matmul_tflops": 2 * n**3 / ts[len(ts) // 2] / 1e12, "gpu": torch.cuda.get_device_name(),
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}


def _peak(device: str) -> dict:
    import torch

    if device != "cuda":
        import resource

        return {"peak_alloc_gib": None, "peak_reserved_gib": None,
                "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def baseline(args) -> dict:
    """The docs' QLoRA recipe, step for step; only the seeds and the token counting are set explicitly so that
    both sides see the same data in the same order and count tokens the same way."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    cuda = args.device == "cuda"
    set_seed(42)
    rows = data_rows(args.model, args.workload)
    dtype = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir(args.model), quantization_config=bnb, dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0} if cuda else {"": "cpu"})
    if args.run == "baseline_peft":
        model = prepare_model_for_kbit_training(model)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    events: list[dict] = []
    cfg = SFTConfig(output_dir=str(WORK / f"run-{args.run}"), max_steps=args.steps,
                    per_device_train_batch_size=batch_size(args.workload), learning_rate=2e-4,
                    lr_scheduler_type="constant", warmup_steps=0, optim="paged_adamw_8bit" if cuda else "adamw_torch",
                    gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda, max_length=seq_len(args.model, args.workload),
                    logging_steps=logging_steps(), save_strategy="no", report_to="none", seed=42, data_seed=42,
                    include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=tokenizer(n_words(args.model)), peft_config=peft_config,
                         callbacks=[clock(events)])
    trainer.train()
    return {"events": events, "checkpointing": "every layer", "gc_fraction": 1.0, **_peak(args.device)}


def clock(events: list):
    """A Trainer callback that appends each logged step (time, tokens seen, loss) to `events`: measurement only."""
    from transformers import TrainerCallback  # in the child, after `import unsloth` where Unsloth runs

    class Clock(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                events.append({"step": state.global_step, "time": time.time(),
                               "tokens": state.num_input_tokens_seen, "loss": float(logs["loss"])})

    return Clock()


def unsloth(args) -> dict:
    """Unsloth's QLoRA recipe as its docs show (FastLanguageModel, get_peft_model with its own gradient
    checkpointing, TRL's SFTTrainer as Unsloth patches it), with the baseline's hyper-parameters set explicitly:
    Unsloth's config defaults differ (gradient accumulation 2, weight decay 0.001, warm-up 10%, seed 3407).
    Its own choices stay (padding-free or padded batches, embeddings' placement, kernels): the result records them.
    The parent runs this with Unsloth's site dir first on PYTHONPATH, offline, in a scratch directory."""
    import torch
    import unsloth as _unsloth  # before transformers and trl: it patches them on import  # noqa: F401
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    set_seed(42)
    cuda = args.device == "cuda"  # always, but for a CPU stand-in of Unsloth's API (the script's own smoke test)
    seq = seq_len(args.model, args.workload)
    model, tok = FastLanguageModel.from_pretrained(model_name=str(model_dir(args.model)), max_seq_length=seq,
                                                   dtype=torch.bfloat16, load_in_4bit=True)
    dropout = 0.0 if args.run.split("@")[0] == "unsloth_no_dropout" else 0.05
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=dropout,
                                             target_modules=LLAMA_LINEARS, bias="none",
                                             use_gradient_checkpointing="unsloth", random_state=42)
    events: list[dict] = []
    cfg = SFTConfig(output_dir=str(WORK / f"run-{args.run}"), max_steps=args.steps,
                    per_device_train_batch_size=batch_size(args.workload), gradient_accumulation_steps=1,
                    learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    optim="paged_adamw_8bit" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
                    max_length=seq, logging_steps=logging_steps(),
                    save_strategy="no", report_to="none", seed=42, data_seed=42,
                    include_num_input_tokens_seen="non_padding", disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_dict({"input_ids": data_rows(
        args.model, args.workload)}), processing_class=tok, callbacks=[clock(events)])
    out: dict = {}
    try:
        trainer.train()
    except BaseException as e:  # noqa: BLE001 - keep what the run measured before it failed (an OOM: its peak)
        out["run_error"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc()[-2000:]
    # what Unsloth made of the settings (read after training: an override anywhere on the way shows)
    settings = {k: getattr(trainer.args, k, None) for k in (
        "per_device_train_batch_size", "gradient_accumulation_steps", "padding_free", "packing", "max_length",
        "optim", "weight_decay", "warmup_steps", "learning_rate", "bf16", "gradient_checkpointing")}
    settings = {k: v if isinstance(v, (int, float, type(None))) else str(getattr(v, "value", v))
                for k, v in settings.items()}
    out["options"] = {"trainer_args": settings,
                      "unsloth_gradient_checkpointing": str(getattr(model, "_unsloth_gradient_checkpointing", None)),
                      "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    overrides = [f"{k} {settings[k]} (asked {want})" for k, want in (("gradient_accumulation_steps", 1),
                 ("per_device_train_batch_size", batch_size(args.workload))) if settings[k] != want]
    out["levers"] = ", ".join(["OVERRIDDEN: " + "; ".join(overrides)] * bool(overrides) + [
        "padding-free" if settings["padding_free"] else "padded batches"] + ["packing"] * bool(settings["packing"])
        + [f"Unsloth gradient checkpointing ({out['options']['unsloth_gradient_checkpointing']})"])
    out.update(events=events, checkpointing="every layer", gc_fraction=1.0, versions=versions(), **_peak(args.device))
    return out


class PlainConsole:
    """What run_training prints to (a rich Console otherwise): plain lines on stdout."""

    is_terminal = False

    def print(self, text, **kw):
        print(text, flush=True)


def lorakit_recipe(model: str, workload: str, run: str, steps: int, device: str, runs: Path):
    import yaml

    try:
        from lorakit.recipe.loader import load_recipe
    except ImportError:  # --prev-code from before recipe/loader.py
        try:
            from lorakit.recipe.schema import load_recipe
        except ImportError:  # --prev-code from before the subpackage layout
            from lorakit.recipe import load_recipe

    cuda = device == "cuda"
    tag, run = run.replace("@", "-"), run.split("@")[0]  # X@prev: variant X (run with older code)
    train = {"max_steps": steps, "lr": 2.0e-4, "scheduler": "constant", "warmup_ratio": 0.0,
             "batch_size": batch_size(workload), "grad_accum": 1, "logging_steps": logging_steps(), "seed": 42,
             "optimizer": "paged_adamw_8bit" if cuda else "adamw_torch"}
    data = {"path": str(data_file(model, workload)), "format": "text", "max_length": seq_len(model, workload)}
    if run == "lorakit_budget":
        train["memory_budget_gb"] = float(os.environ.get("LKBENCH_BUDGET_GB", "40"))
    if run == "lorakit_k16":
        train["gradient_checkpointing"] = 16
    # one lever off at a time (diagnostics: --only lorakit,lk_no_padding_free,...)
    if run == "lk_no_padding_free":
        data["padding_free"] = False
    if run == "lk_no_liger":
        train["liger"] = False
    if run == "lk_no_fused_lora":
        train["fused_lora"] = False
    if run == "lk_compile":
        train["torch_compile"] = True
    if run == "lk_adamw_fused":  # torch's fused AdamW (fp32 states, one launch) instead of paged 8-bit AdamW
        train["optimizer"] = "adamw_torch_fused"
    if run in ("lk_graphs", "lk_no_graphs"):
        train["cuda_graphs"] = run == "lk_graphs"
    if run in ("lk_offload", "lk_offload_tiled"):  # the memory levers that auto keeps for runs that would not fit
        train["offload_activations"] = True
        train["tiled_mlp"] = run == "lk_offload_tiled"
    attn = "auto"  # lorakit's default: varlen attention for padding-free batches on CUDA, else sdpa
    if run in ("lk_flex", "lk_sdpa"):  # padding-free with flex attention (masked blocks skipped) or sdpa (the L x L
        attn = run.removeprefix("lk_").replace("flex", "flex_attention")  # square): what varlen replaced
        data["padding_free"] = True
    if not cuda:  # CPU smoke test: switch on what auto leaves off on a CPU, to run those code paths
        train["fused_lora"] = True
        train["gradient_checkpointing"] = {"lorakit": True, "lorakit_budget": False}.get(run, 2)
        data["padding_free"] = workload == "varied"
    doc = {"name": f"bench-{model}-{workload}-{tag}", "base_model": str(model_dir(model)),
           "model": {"attn_implementation": attn},
           "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True},
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0 if run == "lk_no_dropout" else 0.05, "targets": "all-linear"},
           "data": data, "train": train, "output": {"dir": str(runs / f"{model}-{workload}-{tag}")}}
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{model}-{workload}-{tag}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return load_recipe(path)


def lorakit(args) -> dict:
    """`lorakit train` on the equivalent recipe: lorakit.train.run.run_training, in this process."""
    try:
        from lorakit.train.run import run_training
    except ImportError:  # --prev-code from before the subpackage layout
        from lorakit.train import run_training

    recipe = lorakit_recipe(args.model, args.workload, args.run, args.steps, args.device, WORK / "runs")
    out: dict = {"recipe": recipe.model_dump(mode="json")}
    with contextlib.suppress(Exception):  # `lorakit estimate`'s forecast of this run, beside what it measures
        from lorakit.estimate.memory import estimate

        m = estimate(recipe, device=args.device)["memory"]
        out["estimate_gib"] = {k: round(m[k + "_bytes"] / 2**30, 3) for k in ("reserved_peak", "allocated_peak")}
    try:
        summary = run_training(recipe, overwrite=True, console=PlainConsole())
        out["options"] = summary["options"]
        if "cuda_graphs" in summary:
            out["cuda_graphs"] = summary["cuda_graphs"]
        if "attention_calls" in summary:  # which path varlen attention's calls took (varlen kernel, rows, sdpa)
            out["attention_calls"] = summary["attention_calls"]
    except BaseException as e:  # noqa: BLE001 - keep what the run measured before it failed
        out["lorakit_error"] = out["run_error"] = f"{type(e).__name__}: {e}"[:2000]
        out["traceback"] = traceback.format_exc()[-2000:]
    run_dir = Path(recipe.output.dir)
    events = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            d = json.loads(line)
            if "loss" in d and "step" in d:
                events.append({"step": d["step"], "time": d["time"], "tokens": d.get("num_input_tokens_seen"),
                               "loss": float(d["loss"])})
    o = out.get("options") or {}  # none where the run failed before training (e.g. out of memory at load)
    k = o.get("checkpoint_layers")
    n = shape(args.model)["num_hidden_layers"]
    if not o.get("gradient_checkpointing"):
        out["checkpointing"], out["gc_fraction"] = "none", 0.0
    elif k is None:
        out["checkpointing"], out["gc_fraction"] = "every layer", 1.0
    else:
        out["checkpointing"], out["gc_fraction"] = f"first {k} of {n} layers", min(1.0, k / n)
    on = [name for key, name in (("liger", "Liger"), ("fused_lora", "fused LoRA"), ("dropout_kernel", "dropout kernel"),
                                 ("padding_free", "padding-free"), ("cuda_graphs", "CUDA graphs"),
                                 ("offload_embeddings", "embeddings in host memory"),
                                 ("offload_activations", "checkpoints in host memory"), ("tiled_mlp", "tiled MLP"),
                                 ("expandable_segments", "expandable segments")) if o.get(key)]
    on += [{"flex_attention": "flex attention", "varlen": "varlen attention"}.get(o.get("attn_implementation"), "")]
    on = [x for x in on if x]
    out["levers"] = ", ".join(on + ([f"frozen {o['frozen_dtype']}"] if o.get("frozen_dtype") else []))
    out["events"] = events
    out.update(_peak(args.device))
    return out


def memory_by_step(device: str) -> list:
    """GPU memory after each optimizer step (allocated, reserved, and their peaks so far, GiB): where a run's
    peak comes from (e.g. the step that captures CUDA graphs). Filled by a global optimizer hook."""
    if device != "cuda":
        return []
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    log: list = []
    g = 2**30
    register_optimizer_step_post_hook(lambda *_: log.append(
        [round(torch.cuda.memory_allocated() / g, 3), round(torch.cuda.memory_reserved() / g, 3),
         round(torch.cuda.max_memory_allocated() / g, 3), round(torch.cuda.max_memory_reserved() / g, 3)]))
    return log


def sync_report(path: Path, first: int, last: int) -> None:
    """From optimizer step `first` to `last`: where the host waited for the GPU (torch's sync debug mode, each
    synchronizing call's Python stack counted) -> `path` (text). A wait inside a step serialises host and GPU."""
    import collections
    import traceback
    import warnings

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen: collections.Counter = collections.Counter()
    steps = [0]

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
        seen[(str(message)[:120], "\n".join(f"    {f.filename}:{f.lineno} {f.name}" for f in frames[-12:]))] += 1

    def hook(*_):
        steps[0] += 1
        if steps[0] == first:
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
        elif steps[0] == last:
            torch.cuda.set_sync_debug_mode(0)
            lines = [f"{n} x {m}\n{stack}" for (m, stack), n in seen.most_common()]
            path.write_text(f"synchronizing calls in optimizer steps {first}..{last}: {sum(seen.values())}\n\n"
                            + "\n\n".join(lines) + "\n")

    register_optimizer_step_post_hook(hook)


def child(args) -> None:
    fn = {"baseline": baseline, "unsloth": unsloth}.get(args.run.split("_")[0].split("@")[0], lorakit)
    if fn is unsloth:
        import unsloth as _unsloth  # before anything imports transformers, peft or trl  # noqa: F401
    ballast = None
    if int(os.environ.get("LKBENCH_BALLAST", "0")) and args.device == "cuda":  # --max-context: the missing layers
        import torch

        gpu = int(os.environ["LKBENCH_BALLAST"])
        if os.environ.get("LKBENCH_GPU_GIB"):  # a larger card stands in for one of --gpu-gib GiB
            gpu += max(0, torch.cuda.get_device_properties(0).total_memory - int(float(os.environ["LKBENCH_GPU_GIB"]) * 2**30))
        ballast = torch.empty(gpu, dtype=torch.uint8, device="cuda")  # noqa: F841
        # the host memory the missing layers' offloaded inputs would take (both tools offload them at long rows),
        # touched so that it is really taken (lorakit's plan reads the host's available memory)
        host = int(os.environ.get("LKBENCH_HOST_BALLAST", "0"))
        host_ballast = torch.ones(host, dtype=torch.uint8) if host else None  # noqa: F841
    mem_log = memory_by_step(args.device)
    w = warmup(args.workload)
    if os.environ.get("LKBENCH_SYNC_REPORT") and args.device == "cuda":
        sync_report(Path(os.environ["LKBENCH_SYNC_REPORT"]) / f"sync-{args.model}-{args.workload}-"
                    f"{args.run.replace('@', '-')}.txt", w + 1, w + 3)
    prof = os.environ.get("LKBENCH_PROFILE")
    steps = args.steps
    if prof:  # PROFILED_STEPS more steps after the timed ones (measure() stops at `steps`)
        args.steps += PROFILED_STEPS
        with profiled(Path(prof) / f"profile-{args.model}-{args.workload}-{args.run.replace('@', '-')}.txt", args.steps, args.device):
            out = fn(args)
    else:
        out = fn(args)
    res = {"model": args.model, "workload": args.workload, "run": args.run, "steps": steps, **out,
           "memory_by_step": mem_log}
    Path(args.result).write_text(json.dumps(res))


@contextlib.contextmanager
def profiled(path: Path, steps: int, device: str):
    """torch.profiler over the last 2 optimizer steps of a run (stepped by a global optimizer hook, so the same
    for the baseline and lorakit): where a step's time goes, written as tables to `path`."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    stamps: list[float] = []
    prof = profile(activities=acts, schedule=schedule(wait=max(0, steps - 3), warmup=1, active=2, repeat=1))

    # a step as consecutive ranges in the trace (trace_gaps charges idle time to the range open at the launch):
    # lk.between_steps (optimizer done -> model forward: scheduler, zero_grad, callbacks, logging, next batch),
    # lk.model_forward, lk.loss_backward (loss, metrics, backward, clip), then torch's Optimizer.step range
    phase: list = []

    def enter(name: str | None) -> None:
        if phase:
            phase.pop().__exit__(None, None, None)
        if name:
            phase.append(torch.autograd.profiler.record_function(name).__enter__())

    def pre(mod, _args):
        if type(mod).__name__.endswith("ForCausalLM"):
            enter("lk.model_forward")

    def post(mod, _args, _out):
        if type(mod).__name__.endswith("ForCausalLM"):
            enter("lk.loss_backward")

    hooks: list = []

    def step(*_):
        enter(None)
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if len(stamps) == steps - 2:  # the profiler's warm-up step begins: annotate from here on
            hooks.extend([torch.nn.modules.module.register_module_forward_pre_hook(pre),
                          torch.nn.modules.module.register_module_forward_hook(post),
                          register_optimizer_step_pre_hook(lambda *_: enter(None))])
        prof.step()
        if hooks:
            enter("lk.between_steps")

    prof.start()
    hook = register_optimizer_step_post_hook(step)
    try:
        yield
    finally:
        hook.remove()
        for h in hooks:
            h.remove()
        enter(None)
        prof.stop()
        gaps = ""
        path.parent.mkdir(parents=True, exist_ok=True)
        if device == "cuda":
            import gzip

            import trace_gaps

            trace = path.with_suffix(".trace.json")
            prof.export_chrome_trace(str(trace))
            try:
                gaps = "\n## where the GPU idles (scripts/trace_gaps.py)\n" + trace_gaps.analyze_file(trace)
            except Exception as e:  # noqa: BLE001 - the tables below and the run's figures still count
                gaps = f"\ntrace_gaps failed: {type(e).__name__}: {e}\n"
            if trace.stat().st_size < 200e6:  # kept gzipped for a closer look (chrome://tracing, perfetto)
                with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
                    g.write(f.read())
            trace.unlink()
        ka = prof.key_averages()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        # kernels only (device events that are not user annotations), as torch's own "Self CUDA time total": CPU-side
        # ranges and the GPU-side copies of annotations (ProfilerStep*, Optimizer.step#...) span their kernels
        from torch.autograd import DeviceType

        busy_us = sum(e.self_device_time_total for e in ka if e.device_type == DeviceType.CUDA
                      and not getattr(e, "is_user_annotation", False)) if device == "cuda" else None
        wall_us = (stamps[-1] - stamps[-3]) * 1e6 if len(stamps) >= 3 else None
        head = [f"# {path.stem}: the last 2 optimizer steps", f"wall per step: {wall_us / 2 / 1e3:.1f} ms"
                if wall_us else "wall: n/a"]
        if busy_us is not None and wall_us:
            head.append(f"GPU kernel time per step: {busy_us / 2 / 1e3:.1f} ms ({100 * busy_us / wall_us:.0f}% of wall)")
        path.write_text("\n".join(head) + "\n" + gaps + f"\n\n## by {key}\n"
                        + ka.table(sort_by=key, row_limit=30, max_name_column_width=60)
                        + "\n## by self CPU time\n" + ka.table(sort_by="self_cpu_time_total", row_limit=20,
                                                                  max_name_column_width=60), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------


def flops_per_token(model: str, seq: float, gc_frac: float) -> float:
    """~6P with full checkpointing: 2P forward + 2P backward (activation gradients only: the base is frozen, LoRA's
    weight gradients are ~0.3% of it) + 2P*gc_frac recompute, P = matmul weights (all linears + lm_head; lm_head is
    never recomputed); attention 4*L*(s/2)*h per token (causal, mean context s/2) x (1 fwd + 2 bwd + gc_frac)."""
    s = shape(model)
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = s.get("head_dim", h // s["num_attention_heads"])
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    p_layer = h * q * 2 + 2 * h * kv + 3 * h * i
    P = L * p_layer + h * V
    att = 4 * L * (seq / 2) * q
    return 2 * P * (2 + gc_frac) - 2 * h * V * gc_frac + att * (3 + gc_frac)


def logging_steps() -> int:
    """Both sides log every N steps (--logging-steps; 1 = every step, timed step by step)."""
    return int(os.environ.get("LKBENCH_LOGGING_STEPS", "1"))


def _logging(info: dict) -> str:
    n = info.get("logging_steps", 1)
    return ("both sides log every step" if n == 1 else
            f"both sides log every {n} steps, TRL's and lorakit's default: timed from the first logged step after the "
            f"warm-up to the last; the losses compared are {n}-step means")


def measure(res: dict) -> None:
    """tokens/s etc. from the log events: from the first logged step at or after the warm-up to the last."""
    ev = sorted((e for e in res.get("events") or [] if e["step"] <= res["steps"]), key=lambda e: e["step"])
    res["losses"] = [round(e["loss"], 5) for e in ev][:LOSSES]
    n = warmup(res["workload"])
    w = next((e for e in ev if e["step"] >= n), None)
    last = ev[-1] if ev else None
    if not w or not last or last["step"] <= n or w["tokens"] is None or last["tokens"] is None:
        res.setdefault("error", "too few logged steps")
        return
    span = last["time"] - w["time"]
    tok = last["tokens"] - w["tokens"]
    steps = last["step"] - w["step"]
    res.update(timed_steps=steps, tokens_per_s=tok / span, step_ms=1e3 * span / steps, tokens_per_step=tok / steps)


def unsloth_env(args, run: str) -> dict | str | None:
    """An Unsloth run's environment (its site dir first on the path, offline, no statistics), or why it cannot run;
    None for the other runs. The child runs in WORK/uns-cwd: Unsloth writes unsloth_compiled_cache/ there."""
    if not run.startswith("unsloth"):
        return None
    if args.device != "cuda":
        return "skipped: Unsloth needs CUDA"
    if not args.unsloth_site or not (Path(args.unsloth_site) / "unsloth").is_dir():
        return "skipped: needs --unsloth-site DIR (a dir with Unsloth's packages installed; see the docstring)"
    (WORK / "uns-cwd").mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(args.unsloth_site).resolve())] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}


def sh(cmd: list[str], log: Path, timeout: float, env: dict | None = None,
       cwd: Path | None = None) -> tuple[object, float]:
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n===== {' '.join(cmd[2:])}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(1, timeout), cwd=cwd,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.time() - t


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for p in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "accelerate", "datasets",
              "triton", "matplotlib", "rich", "typer", "unsloth", "unsloth_zoo"):
        try:
            out[p] = version(p)
        except Exception:  # noqa: BLE001
            out[p] = None
    return out


def previous_runs() -> tuple[str, dict | None]:
    """The committed bench/train.md / .json from before this run, kept below the new figures."""
    md_path, js_path = ROOT / "bench" / "train.md", ROOT / "bench" / "train.json"
    md = md_path.read_text(encoding="utf-8") if md_path.exists() else ""
    js = json.loads(js_path.read_text(encoding="utf-8")) if js_path.exists() else None
    if MARKER in md:  # the last run goes below the marker, above the runs before it
        top, _, older = md.partition(MARKER)
        title, _, body = top.strip().partition("\n")
        md = ("## Previous run: " + title.lstrip("# ").strip() + "\n" + body.replace("\n## ", "\n### ")).strip()
        md += "\n\n" + older.strip()
        prev = (js or {}).get("previous_runs") or {}
        last = {k: v for k, v in (js or {}).items() if k != "previous_runs"}
        js = {f"run {len(prev) + 1}": last, **prev} if last else prev
    elif md:  # the phase-1 run (levers one by one, before lorakit train used them)
        title, _, body = md.partition("\n")
        md = ("## Previous run: " + title.lstrip("# ").strip() + "\n" + body.replace("\n## ", "\n### ")).strip()
        js = {"phase 1": js} if js else None
    return md, js


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out", help="results, log")
    ap.add_argument("--write-bench", default=None, metavar="DIR", help="also write DIR/train.json and DIR/train.md")
    ap.add_argument("--models", default="8b,1b")
    ap.add_argument("--only", default=None, help="comma list of runs to keep (e.g. baseline,lorakit)")
    ap.add_argument("--workloads", default="fixed,varied,long16k,long32k", help="comma list of workloads to keep")
    ap.add_argument("--deadline", type=float, default=520,
                    help="seconds: skip what would run past it (a device call may run 600 s, installs included)")
    ap.add_argument("--budget-gb", type=float, default=40, help="train.memory_budget_gb of lorakit_budget")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--logging-steps", type=int, default=1,
                    help="both sides log every N steps (TRL's and lorakit's default is 10); timing runs from the first "
                         "logged step after the warm-up to the last, losses are then N-step means")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="profile 2 extra steps after each run's timed steps into DIR/profile-*.txt (tables and where "
                         "the GPU idles, scripts/trace_gaps.py)")
    ap.add_argument("--sync-report", default=None, metavar="DIR",
                    help="write DIR/sync-*.txt: the calls that made the host wait for the GPU in two steps after the "
                         "warm-up, with their Python stacks (torch's sync debug mode)")
    ap.add_argument("--prev-code", default=None, metavar="DIR",
                    help="runs named X@prev (e.g. --only baseline,lorakit,lorakit@prev) run variant X with the "
                         "lorakit package found in DIR (e.g. a `git worktree` of the commit before a change)")
    ap.add_argument("--render", default=None, metavar="DIR",
                    help="rewrite DIR/train.md from DIR/train.json (e.g. bench) with this script's text; runs nothing")
    ap.add_argument("--unsloth-site", default=None, metavar="DIR",
                    help="Unsloth's packages (pip install --target DIR): its runs put DIR first on PYTHONPATH; "
                         "without it they are skipped")
    ap.add_argument("--max-context", action="store_true",
                    help="instead of the plan: the longest single row that trains for lorakit and unsloth (or "
                         "--only), written to OUT/max_context.json and .md")
    ap.add_argument("--probe-layers", type=int, default=2, help="--max-context: layers of the probe model")
    ap.add_argument("--probe-start", type=int, default=32768, help="--max-context: first row length, then doubled")
    ap.add_argument("--gpu-gib", type=float, default=None,
                    help="--max-context: hold the rest of a larger GPU so that it fits like one of this many GiB")
    ap.add_argument("--probe-max", type=int, default=1 << 20, help="--max-context: longest row tried")
    ap.add_argument("--resolution", type=int, default=8192, help="--max-context: bisect to this many tokens")
    ap.add_argument("--bisect", default=None, metavar="LO,HI",
                    help="--max-context: skip the upward probes; LO tokens trained and HI did not (an earlier call)")
    ap.add_argument("--probe-timeout", type=float, default=300, help="--max-context: seconds a probe may run")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--child", choices=["build", "variant", "rate"])
    ap.add_argument("--model"), ap.add_argument("--workload"), ap.add_argument("--run")
    ap.add_argument("--steps", type=int), ap.add_argument("--result")
    args = ap.parse_args()
    if args.logging_steps < 1:
        ap.error(f"--logging-steps {args.logging_steps}: must be 1 or more")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.child == "build":
        return build(args.model, args.device)
    if args.child == "rate":
        Path(args.result).write_text(json.dumps(matmul_rate()))
        return
    if args.child == "variant":
        return child(args)

    if args.render:  # the markdown again from the JSON (after a change to this text; the figures are the JSON's)
        d = Path(args.render)
        if not (d / "train.json").is_file() or not (d / "train.md").is_file():
            ap.error(f"--render {d}: needs {d}/train.json and {d}/train.md")
        doc = json.loads((d / "train.json").read_text(encoding="utf-8"))
        prev_md = (d / "train.md").read_text(encoding="utf-8").partition(MARKER)[2].strip()
        return write(d, None, doc["info"], doc["results"], prev_md, doc.get("previous_runs"))
    if args.sync_report:
        Path(args.sync_report).mkdir(parents=True, exist_ok=True)
        os.environ["LKBENCH_SYNC_REPORT"] = str(Path(args.sync_report).resolve())
    if args.profile:
        os.environ["LKBENCH_PROFILE"] = str(Path(args.profile).resolve())
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    os.environ["LKBENCH_BUDGET_GB"] = str(args.budget_gb)
    os.environ["LKBENCH_LOGGING_STEPS"] = str(args.logging_steps)
    me = [sys.executable, str(Path(__file__).resolve())]
    dev = ["--device", args.device]
    if args.max_context:
        full = SHAPES["tiny" if args.tiny else "8b"]["num_hidden_layers"]
        if not 1 <= args.probe_layers <= full:
            ap.error(f"--probe-layers {args.probe_layers}: must be 1..{full}")
        if args.resolution < 1 or args.probe_start < args.resolution:
            ap.error("--resolution must be 1 or more and --probe-start at least --resolution")
        if args.bisect:
            try:
                args.bisect = tuple(int(x) for x in args.bisect.split(","))
                assert len(args.bisect) == 2 and 0 <= args.bisect[0] < args.bisect[1]
            except (ValueError, AssertionError):
                ap.error(f"--bisect {args.bisect}: must be LO,HI with 0 <= LO < HI (tokens)")
        return max_context(args, me, log, out, start)
    info: dict = {**stamp(), "versions": versions(), "device": args.device, "warmup_steps": {"fixed, varied": WARMUP, "long": LONG_WARMUP}, "budget_gb": args.budget_gb,
                  "logging_steps": args.logging_steps,
                  "command": "python3 scripts/bench_train.py " + " ".join(sys.argv[1:])}
    if args.device == "cuda":
        rate_file = WORK / "rate.json"
        rc, _ = sh(me + ["--child", "rate", "--result", str(rate_file)] + dev, log, 90)
        if rate_file.exists():
            info.update(json.loads(rate_file.read_text()))
    print("info", json.dumps(info), flush=True)
    prev_md, prev_js = previous_runs()
    models = ["tiny"] if args.tiny else args.models.split(",")
    plan = [(("tiny" if args.tiny else m), w, r, s) for m, w, r, s in PLAN
            if (args.tiny and m == "8b") or (not args.tiny and m in models)]
    if args.only:
        only = args.only.split(",")
        plan = [q for p in plan for q in (p, (*p[:2], p[2] + "@prev", p[3]))
                if q[2] in only]
        if any(r.endswith("@prev") for r in only) and not (args.prev_code and (Path(args.prev_code) / "lorakit").is_dir()):
            ap.error("runs named X@prev need --prev-code DIR with DIR/lorakit")
    plan = [p for p in plan if p[1] in args.workloads.split(",")]
    built: dict[str, object] = {}
    checked: dict[tuple[str, str], str] = {}
    results: list[dict] = []
    for model, workload, run, steps in plan:
        cost = COST[model]
        need = cost_of(model, workload, run, steps)
        if model not in built:
            left = args.deadline - (time.time() - start)
            if left < (0 if (model_dir(model) / "config.json").exists() else cost["build"]) + need:
                built[model] = "skipped (deadline)"
            else:
                rc, dt = sh(me + ["--child", "build", "--model", model] + dev, log, min(left - 10, 4 * cost["build"]))
                built[model] = rc
                print(f"build {model}: rc={rc} {dt:.0f}s", flush=True)
        res = {"model": model, "workload": workload, "run": run, "steps": steps}
        left = args.deadline - (time.time() - start)
        uns_env = unsloth_env(args, run)
        if built[model] != 0:
            res["error"] = f"model not built ({built[model]})"
        elif isinstance(uns_env, str):
            res["error"] = uns_env
        elif left < need:
            res["error"] = "skipped (deadline)"
        else:
            rows = write_data(model, workload)
            if (model, workload) not in checked:
                try:
                    checked[(model, workload)] = check_same_tokens(model, workload, rows, args.device)
                except Exception as e:  # noqa: BLE001 - the runs still measure speed and memory
                    checked[(model, workload)] = f"check failed: {type(e).__name__}: {e}"
                info.setdefault("token_check", {})[f"{model}/{workload}"] = checked[(model, workload)]
                print(f"tokens {model}/{workload}: {checked[(model, workload)]}", flush=True)
            rf = WORK / f"res-{model}-{workload}-{run}.json"
            rf.unlink(missing_ok=True)
            cmd = me + ["--child", "variant", "--model", model, "--workload", workload, "--run", run,
                        "--steps", str(steps), "--result", str(rf)] + dev
            env = {"LKBENCH_CODE": str(Path(args.prev_code).resolve())} if run.endswith("@prev") else {}
            rc, dt = sh(cmd, log, min(left - 5, 3 * need), {**env, **(uns_env or {})}, uns_env and WORK / "uns-cwd")
            if rf.exists():
                res = json.loads(rf.read_text())
                measure(res)
            else:
                res["error"] = f"rc={rc}"
            res["wall_s"] = round(dt, 1)
        results.append(res)
        print(row(derive(info, results, res)), flush=True)
        write(out, args.write_bench, info, results, prev_md, prev_js)
    write(out, args.write_bench, info, results, prev_md, prev_js)
    print(table(info, results), flush=True)
    print(f"total {time.time() - start:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------
# --max-context: the longest row that trains, on a model of the full width with fewer layers plus a ballast
# ----------------------------------------------------------------------------------------------


def layer_bytes(model: str) -> int:
    """Bytes of one decoder layer's weights as saved: the tensors named model.layers.0.* in the checkpoint's
    safetensors headers (NF4 packed weights, their double-quantized scales and code tables, the norms; not the
    quant-state JSON blobs, which stay on the host). The GPU holds the same tensors after loading."""
    total = 0
    for f in model_dir(model).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name.startswith("model.layers.0.") and not name.endswith("bitsandbytes__nf4"):
                total += t["data_offsets"][1] - t["data_offsets"][0]
    return total


def lora_bytes(model: str) -> int:
    """A layer's LoRA state that lives in torch's allocator: r=16 A and B of the 7 linears, weights and gradients
    in fp32 (8 bytes a parameter; the paged 8-bit optimizer's states are managed memory, outside torch's counters)."""
    s = shape(model)
    h, i = s["hidden_size"], s["intermediate_size"]
    hd = s.get("head_dim", h // s["num_attention_heads"])
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    return 16 * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)) * 8


def is_oom(text: str) -> bool:
    return "OutOfMemoryError" in text or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def probe(args, me: list[str], log: Path, model: str, run: str, length: int, ballast: int, timeout: float) -> dict:
    """One child: `run` trains PROBE_STEPS steps of one row of `length` tokens, with `ballast` bytes held on the GPU.
    outcome: ok (every step logged), oom (torch's OutOfMemoryError, in the result or the child's log), timeout,
    or error (anything else; not read as a memory limit)."""
    workload = f"len{length}"
    write_data(model, workload)
    rf = WORK / f"probe-{model}-{run}-{length}.json"
    rf.unlink(missing_ok=True)
    uns = unsloth_env(args, run)
    if isinstance(uns, str):
        return {"length": length, "outcome": "error", "error": uns}
    pos = log.stat().st_size if log.exists() else 0
    cmd = me + ["--child", "variant", "--model", model, "--workload", workload, "--run", run, "--steps",
                str(PROBE_STEPS), "--result", str(rf), "--device", args.device]
    shape = SHAPES[model.split("-")[0]]  # the probe model "8b-2l": the 8B shape with 2 layers
    host = (shape["num_hidden_layers"] - args.probe_layers) * length * shape["hidden_size"] * 2
    gib = {"LKBENCH_GPU_GIB": str(args.gpu_gib)} if args.gpu_gib else {}
    rc, dt = sh(cmd, log, timeout, {"LKBENCH_BALLAST": str(ballast), "LKBENCH_HOST_BALLAST": str(host), **gib,
                                    **(uns or {})}, uns and WORK / "uns-cwd")
    with open(log, "rb") as f:
        f.seek(pos)
        tail = f.read().decode("utf-8", "replace")
    res = json.loads(rf.read_text()) if rf.exists() else {}
    err = res.get("run_error") or ""
    done = max((e["step"] for e in res.get("events") or []), default=0)
    if rc == "timeout":
        outcome = "timeout"
    elif is_oom(err) or (not res and is_oom(tail)):
        outcome = "oom"
    elif err or rc != 0 or done < PROBE_STEPS:
        outcome = "error"
    else:
        outcome = "ok"
    if outcome != "ok" and not err:
        err = f"rc={rc}, {done} steps; log: " + " | ".join(tail.strip().splitlines()[-3:])
    ev = sorted(res.get("events") or [], key=lambda e: e["step"])
    return {"length": length, "outcome": outcome, "error": err[:600] or None, "wall_s": round(dt, 1),
            "step_s": round(ev[-1]["time"] - ev[-2]["time"], 2) if len(ev) >= 2 else None,
            "peak_alloc_gib": res.get("peak_alloc_gib"), "peak_reserved_gib": res.get("peak_reserved_gib"),
            "max_rss_gib": res.get("max_rss_gib"), "memory_by_step": res.get("memory_by_step"),
            "levers": res.get("levers"), "options": res.get("options")}


def max_context(args, me: list[str], log: Path, out: Path, start: float) -> None:
    """For each run (lorakit, unsloth): the longest single row that trains, probing upward by doubling from
    --probe-start until a probe fails, then bisecting to --resolution tokens, within the deadline (an equal share of
    what is left for each run). Written after every probe: OUT/max_context.json and OUT/max_context.md."""
    base = "tiny" if args.tiny else "8b"
    full, n = SHAPES[base]["num_hidden_layers"], args.probe_layers
    model = f"{base}-{n}l"
    info: dict = {**stamp(), "versions": versions(), "device": args.device, "shape": NAMES[base], "probe_layers": n, "full_layers": full,
                  "probe_steps": PROBE_STEPS, "resolution": args.resolution, "gpu_gib": args.gpu_gib,
                  "command": "python3 scripts/bench_train.py " + " ".join(sys.argv[1:])}
    if args.device == "cuda":
        rate_file = WORK / "rate.json"
        sh(me + ["--child", "rate", "--result", str(rate_file), "--device", args.device], log, 90)
        if rate_file.exists():
            info.update(json.loads(rate_file.read_text()))
    rc, dt = sh(me + ["--child", "build", "--model", model, "--device", args.device], log,
                min(args.deadline - (time.time() - start) - 10, 300))
    doc: dict = {"info": info, "runs": {}}
    if rc != 0:
        info["error"] = f"probe model not built (rc={rc})"
        return write_max_context(out, doc)
    per_layer, per_lora = layer_bytes(model), lora_bytes(model)
    ballast = (full - n) * (per_layer + per_lora)
    info.update(layer_weight_bytes=per_layer, layer_lora_bytes=per_lora, ballast_bytes=ballast,
                ballast_from="weights: the sizes of layer 0's tensors in the probe checkpoint's safetensors "
                             "headers; LoRA: r=16 A and B of 7 linears, fp32 weights and gradients (computed)")
    runs = (args.only or "lorakit,unsloth").split(",")
    for k, run in enumerate(runs):
        doc["runs"][run] = {"probes": [], "longest_ok": None, "shortest_failed": None}
        end = time.time() + (args.deadline - (time.time() - start)) / (len(runs) - k)
        search(args, me, log, out, doc, model, run, ballast, end)
    write_max_context(out, doc)


def search(args, me: list[str], log: Path, out: Path, doc: dict, model: str, run: str, ballast: int,
           end: float) -> None:
    """Probe `run` upward by doubling until a probe fails, then bisect; fills doc["runs"][run]."""
    r = doc["runs"][run]

    def step(length: int) -> bool:
        left = end - time.time()
        if left < (90 if run.startswith("unsloth") else 45):
            r["stopped"] = "deadline"
            return False
        p = probe(args, me, log, model, run, length, ballast, min(left, args.probe_timeout))
        r["probes"].append(p)
        print(f"max-context {run} {length}: {p['outcome']} peak alloc {p.get('peak_alloc_gib')} GiB "
              f"{p.get('wall_s')}s {p.get('error') or ''}", flush=True)
        if p["outcome"] == "ok":
            r["longest_ok"] = max(r["longest_ok"] or 0, length)
        else:
            r["shortest_failed"] = min(r["shortest_failed"] or length, length)
            if p["outcome"] == "error" and not r["longest_ok"]:  # a broken setup, not a length limit
                r["stopped"] = f"error before any length trained ({length} tokens)"
        write_max_context(out, doc)
        return "stopped" not in r

    if args.bisect:  # bounds from an earlier call: LO trained, HI did not
        r["longest_ok"], r["shortest_failed"] = args.bisect
        r["bounds_given"] = list(args.bisect)
    length = args.probe_start
    while length <= args.probe_max and r["shortest_failed"] is None and step(length):
        length *= 2
    if r["shortest_failed"] is None and "stopped" not in r:
        r["stopped"] = f"no failure up to --probe-max {args.probe_max}"
    while r["shortest_failed"] is not None and "stopped" not in r:
        lo, hi = r["longest_ok"] or 0, r["shortest_failed"]
        mid = (lo + hi) // 2 // args.resolution * args.resolution
        if hi - lo <= args.resolution or not lo < mid < hi or not step(mid):
            break
    if any(p["outcome"] not in ("ok", "oom") for p in r["probes"]):
        r["note"] = "a probe failed for another reason than memory (timeout or error): see its row"


def write_max_context(out: Path, doc: dict) -> None:
    info = doc["info"]
    gib = 2**30
    lines = [f"# Longest row that trains: lorakit vs Unsloth (batch 1, {info['shape']})",
             "", f"Machine: {info.get('gpu', 'CPU (smoke test: numbers mean nothing)')}; "
             f"command: `{info.get('command')}`.",
             f"Each probe: one child process training {info['probe_steps']} optimizer steps on one row of the given "
             f"length (random tokens of a repeated motif), NF4 double-quant base, LoRA r=16 alpha=32 dropout 0.05 on "
             f"the 7 linears, paged 8-bit AdamW; probed upward by doubling until a probe fails, then bisected to "
             f"{info['resolution']} tokens.",
             f"Model: the full width with {info['probe_layers']} of {info['full_layers']} layers, plus a ballast "
             f"allocated on the GPU before loading: {info.get('ballast_bytes', 0) / gib:.2f} GiB = "
             f"{info['full_layers'] - info['probe_layers']} missing layers x ({info.get('layer_weight_bytes', 0) / 2**20:.2f}"
             f" MiB of NF4 weights + {info.get('layer_lora_bytes', 0) / 2**20:.2f} MiB of LoRA state; "
             f"{info.get('ballast_from', '-')}). Valid only where a layer's GPU memory "
             f"does not grow with the row (its checkpoint in host memory): check the peaks and options in "
             f"max_context.json. Peaks include the ballast. Host memory: the missing layers' offloaded inputs "
             f"(layers x tokens x hidden x 2 bytes) are held too."
             + (f" The GPU is held down to {info['gpu_gib']:.0f} GiB (the rest of the card taken before loading)."
                if info.get("gpu_gib") else ""), ""]
    if info.get("error"):
        lines += [f"Error: {info['error']}", ""]
    lines += ["| run | longest row that trains | shortest that failed | note |", "|---|---|---|---|"]
    for run, r in doc["runs"].items():
        lines.append(f"| {run} | {r['longest_ok'] or '-'} | {r['shortest_failed'] or '-'} "
                     f"| {'; '.join(x for x in (r.get('stopped'), r.get('note')) if x) or '-'} |")
    lines += ["", "| run | row tokens | outcome | peak alloc GiB | peak reserved GiB | step s | wall s | levers / error |",
              "|---|---|---|---|---|---|---|---|"]
    for run, r in doc["runs"].items():
        for p in r["probes"]:
            lines.append(f"| {run} | {p['length']} | {p['outcome']} | {_f(p.get('peak_alloc_gib'))} "
                         f"| {_f(p.get('peak_reserved_gib'))} | {_f(p.get('step_s'))} | {_f(p.get('wall_s'), 0)} "
                         f"| {(p.get('error') or p.get('levers') or '-').replace('|', '/')[:300]} |")
    (out / "max_context.json").write_text(json.dumps(doc, indent=1))
    (out / "max_context.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def derive(info: dict, results: list[dict], r: dict) -> dict:
    """Speed-ups against the baselines of the same model and workload, loss agreement, ratio to the limit; for
    lorakit's runs the speed and peak allocated memory against Unsloth's (lk_no_dropout: unsloth_no_dropout's)."""
    if "tokens_per_s" not in r:
        return r
    for base in ("baseline", "baseline_peft"):
        b = next((x for x in results if x["run"] == base and x["model"] == r["model"]
                  and x["workload"] == r["workload"] and "tokens_per_s" in x), None)
        if b is not None:
            r[f"vs_{base}"] = r["tokens_per_s"] / b["tokens_per_s"]
            n = min(len(r["losses"]), len(b["losses"]))  # same data order: comparable step by step
            if n and base == "baseline" and r["run"] != base:
                r["loss_max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in zip(r["losses"][:n], b["losses"][:n]))
                r["loss_steps_compared"] = n
    if r["run"].startswith(("lorakit", "lk_")):
        ref = "unsloth_no_dropout" if r["run"].split("@")[0] == "lk_no_dropout" else "unsloth"
        u = next((x for x in results if x["run"] == ref and x["model"] == r["model"]
                  and x["workload"] == r["workload"] and "tokens_per_s" in x), None)
        if u is not None:
            r["vs_unsloth"] = r["tokens_per_s"] / u["tokens_per_s"]
            if r.get("peak_alloc_gib") and u.get("peak_alloc_gib"):  # <= 1: lorakit holds no more than Unsloth
                r["mem_vs_unsloth"] = r["peak_alloc_gib"] / u["peak_alloc_gib"]
    full = seq_len(r["model"], r["workload"])
    rows_seq = r.get("tokens_per_step", 0) / batch_size("varied") if r["workload"] == "varied" else full
    fpt = flops_per_token(r["model"], rows_seq or full, r.get("gc_fraction", 1.0))
    r["gflop_per_token"] = fpt / 1e9
    if info.get("bf16_matmul_tflops"):
        r["ratio_to_limit"] = r["tokens_per_s"] * fpt / 1e12 / info["bf16_matmul_tflops"]
    return r


def _f(x, d=2, suffix=""):
    return "-" if x is None else f"{x:.{d}f}{suffix}"


HEADER = ("| model | workload | run | tok/s | vs baseline | vs baseline_peft | vs unsloth | step ms | peak alloc GiB "
          "| mem vs unsloth | peak reserved GiB | estimate (vs reserved) | loss max rel diff | ratio to limit "
          "| checkpointing; levers |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _estimate(r: dict) -> str:
    """`lorakit estimate`'s reserved peak for a lorakit run and its error against the measured one."""
    e, m = (r.get("estimate_gib") or {}).get("reserved_peak"), r.get("peak_reserved_gib")
    return "-" if not e or not m else f"{e:.2f} ({100 * (e / m - 1):+.0f}%)"


def row(r: dict) -> str:
    if "tokens_per_s" not in r:
        return f"| {r['model']} | {r['workload']} | {r['run']} | {r.get('error', 'failed')} | | | | | | | | | | | |"
    loss = (f"{r['loss_max_rel_diff']:.4f} ({r['loss_steps_compared']} steps)" if "loss_max_rel_diff" in r else "-")
    err = " (run error: see JSON)" if r.get("run_error") or r.get("lorakit_error") else ""
    return (f"| {r['model']} | {r['workload']} | {r['run']}{err} | {r['tokens_per_s']:.0f} "
            f"| {_f(r.get('vs_baseline'), 2, 'x')} | {_f(r.get('vs_baseline_peft'), 2, 'x')} "
            f"| {_f(r.get('vs_unsloth'), 2, 'x')} | {r['step_ms']:.0f} | {_f(r.get('peak_alloc_gib'))} "
            f"| {_f(r.get('mem_vs_unsloth'), 2, 'x')} | {_f(r.get('peak_reserved_gib'))} | {_estimate(r)} | {loss} "
            f"| {_f(r.get('ratio_to_limit'))} | {r.get('checkpointing', '-')}"
            f"{'; ' + r['levers'] if r.get('levers') else ''} |")


def table(info: dict, results: list[dict]) -> str:
    return HEADER + "\n" + "\n".join(row(derive(info, results, r)) for r in results)


def budget_table(results: list[dict]) -> str:
    lines = ["| model | run | train.memory_budget_gb | checkpointing chosen | tok/s | peak alloc GiB | "
             "peak reserved GiB |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r["workload"] != "fixed" or not r["run"].startswith("lorakit") or "tokens_per_s" not in r:
            continue
        budget_bytes = (r.get("options") or {}).get("memory_budget_bytes")
        budget = round(budget_bytes / 2**30, 2) if budget_bytes else None
        reason = (r.get("options") or {}).get("checkpointing_reason", "")
        lines.append(f"| {r['model']} | {r['run']} | {budget if budget else '- (default)'} | {r['checkpointing']}"
                     f" ({reason}) | {r['tokens_per_s']:.0f} | {_f(r.get('peak_alloc_gib'))} "
                     f"| {_f(r.get('peak_reserved_gib'))} |")
    return "\n".join(lines)


def losses_block(results: list[dict]) -> str:
    out = []
    for r in results:
        if r["workload"] == "fixed" and r["run"] in ("baseline", "lorakit", "unsloth") and r.get("losses"):
            out.append(f"- {r['model']} {r['run']}: " + ", ".join(f"{x:.4f}" for x in r["losses"]))
    return "\n".join(out)


def write(out: Path, bench: str | None, info: dict, results: list[dict], prev_md: str, prev_js) -> None:
    for r in results:
        derive(info, results, r)
    slim = [{k: v for k, v in r.items() if k not in ("events", "recipe")} | (
        {"events": r["events"]} if r.get("events") else {}) for r in results]
    doc = {"info": info, "results": slim, "previous_runs": prev_js}
    v = info["versions"]
    gpu = info.get("gpu", "CPU (smoke test: numbers mean nothing)")
    rate = info.get("bf16_matmul_tflops")
    uv = next((r["versions"] for r in results if r.get("versions")), None)  # an Unsloth child's own stack
    uv = ", ".join(f"{k} {uv.get(k)}" for k in ("unsloth", "unsloth_zoo", "trl", "datasets", "transformers")) if uv else "-"
    md = f"""# Training speed: `lorakit train` vs plain TRL + peft + bitsandbytes and Unsloth (issues 7, 25)

{f"Date: {info['date']}, lorakit at {info.get('commit')}. " if info.get('date') else ''}Machine: {gpu}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, trl {v['trl']},
bitsandbytes {v['bitsandbytes']}, liger-kernel {v['liger-kernel']}, accelerate {v['accelerate']}.
Unsloth's runs (their own site dir, `--unsloth-site`): {uv}.
Measured bf16 matmul rate (8192^3, median of 5): {f'**{rate:.0f} TFLOP/s**' if rate else 'n/a'}.
Script: `scripts/bench_train.py` (one call, one process tree: a child process per run). Raw: `bench/train.json`.
Command: `{info.get('command', 'n/a')}`{chr(10) + 'Note: ' + info['note'] if info.get('note') else ''}

Runs (random-init models of real shapes, NF4 double-quant base, bf16 compute, LoRA r=16 alpha=32 dropout 0.05
all-linear, sdpa, paged_adamw_8bit, lr 2e-4 constant, seed 42, same token ids in the same order on both sides):
- **baseline**: the TRL docs' QLoRA recipe (SFTTrainer with peft_config, gradient_checkpointing=True, bf16), padded
  batches; **baseline_peft**: the same after peft's `prepare_model_for_kbit_training` (the peft docs' recipe).
- **lorakit**: `lorakit train` (lorakit.train.run.run_training) on the equivalent recipe, defaults: on CUDA Liger kernels,
  fused LoRA (with LoRA dropout drawn inside the matmul: lorakit/speed/kernels/lora_dropout.py), frozen weights kept bf16,
  padding-free batches with varlen attention (torch's flash kernel given the rows' boundaries:
  lorakit/speed/varlen_attention.py) where padding would waste >= 15% (the varied rows), every layer checkpointed (the
  baseline's memory); batches of one shape (the fixed rows): the checkpointed layers replayed as CUDA graphs
  (lorakit/speed/layer_graphs.py; the recompute skips the base matmul of a layer's last linear, whose output nothing
  reads: lorakit/speed/recompute_tail.py), their memory pool paid for by the input embeddings kept in host memory
  (lorakit/speed/host_embedding.py: rows read from the pinned table by a GPU kernel), where the estimate says that stays
  within the run without graphs; the padding-free batches (the varied rows) replayed as CUDA graphs too, each
  padded to one length, the 95th percentile of the run's batch totals, with rows of pad tokens no loss reads and
  the token count leaves out (lorakit/speed/padding.py; longer batches run eager); the bitsandbytes 8-bit AdamW update without a sync per tensor and with the tensors
  of whole 256-element blocks updated by one call (lorakit/speed/adamw8bit.py), and a Trainer step that does not read the GPU
  between backward and optimizer (lorakit/train/sft_trainer.py); in training the fused LoRA function holds the base
  matmul too (the base GEMMs add onto the LoRA parts: `lora_linear` in lorakit/speed/fused_lora.py), and the CUDA allocator
  grows segments in place (`train.expandable_segments`, lorakit/speed/cuda_memory.py).
- **lorakit_budget**: the same with `train.memory_budget_gb: {info.get('budget_gb')}` (budget mode picks the fastest
  checkpointing whose estimated peak fits); **lorakit_k16**: `gradient_checkpointing: 16` (partial, for reference);
  **lk_flex** / **lk_sdpa**: padding-free batches with flex attention / sdpa forced (`model.attn_implementation`; what
  varlen attention replaced);
  **lk_compile**: `train.torch_compile: true`; **lk_no_dropout**: `lora.dropout: 0` (what dropout costs: not the
  same recipe); **lk_graphs** / **lk_no_graphs**: `train.cuda_graphs: true` / `false` (checkpointed layers replayed
  as CUDA graphs, lorakit/speed/layer_graphs.py; asked for, they keep the embeddings on the GPU); **lk_adamw_fused**:
  `train.optimizer: adamw_torch_fused`; **lk_offload** / **lk_offload_tiled**: `train.offload_activations: true`
  (each checkpointed layer's input in pinned host memory) / and `train.tiled_mlp: true` (auto turns them on only where
  a run would not fit otherwise); **X@prev**: run X with the lorakit package of `--prev-code` (the code
  before a change, beside it).
- **unsloth**: Unsloth's recipe as its docs show: `FastLanguageModel.from_pretrained(load_in_4bit=True, dtype=bf16,
  max_seq_length=the row length)` on the same checkpoint, `get_peft_model(r=16, lora_alpha=32, lora_dropout=0.05,
  the 7 linears, use_gradient_checkpointing="unsloth")`, the SFTTrainer/SFTConfig Unsloth patches, with the
  baseline's hyper-parameters set explicitly (its defaults differ: gradient accumulation 2, weight decay 0.001,
  warm-up 10%); its own choices of batching and kernels stay (levers column; an override of batch size or gradient
  accumulation is flagged there). **unsloth_no_dropout**: `lora_dropout=0` (Unsloth's fast LoRA path), beside
  lk_no_dropout. vs unsloth / mem vs unsloth: a lorakit run's tok/s and peak allocated memory over Unsloth's run of
  the same workload (lk_no_dropout: over unsloth_no_dropout; mem <= 1.00: lorakit holds no more).

Workloads: fixed = 2 rows x {WORKLOADS['fixed'][1]} tokens a step; varied = 8 rows a step, log-normal lengths (median
450, sigma 0.6, 32..2048); long16k / long32k = 1 row of 16384 / 32768 tokens a step (8 steps). tok/s = non-padding
tokens (the Trainer's `num_input_tokens_seen`: the tokens each side really trained) over the steps after {WARMUP}
warm-up steps ({LONG_WARMUP} for the long rows), timed by the log events ({_logging(info)}). Peak = torch's max allocated / reserved in the run's
process (load included). Loss max rel diff: first {LOSSES} losses (fewer for shorter runs) against the baseline of
the same model and workload. Ratio to limit = tok/s x FLOPs/token / measured matmul rate, FLOPs/token ~ 6 x matmul
params with full checkpointing (2P fwd + 2P activation-gradient bwd + 2P recompute) + causal attention.
Token check (lorakit's data preparation of the text file vs the baseline's token ids): {info.get('token_check')}.

{HEADER}
{chr(10).join(row(r) for r in results)}

## lorakit default vs budget mode (fixed length)
{budget_table(results)}

## First losses (fixed length, same seed)
{losses_block(results)}

{MARKER}

{prev_md}
"""
    (out / "train.json").write_text(json.dumps(doc, indent=1))
    (out / "train.md").write_text(md)
    if bench:
        Path(bench).mkdir(parents=True, exist_ok=True)
        (Path(bench) / "train.json").write_text(json.dumps(doc, indent=1))
        (Path(bench) / "train.md").write_text(md)


if __name__ == "__main__":
    main()
