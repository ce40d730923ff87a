"""Benchmark `lorakit merge` against peft's merge_and_unload on an 8B-shaped random bf16 checkpoint (CPU).

Creates, under --workdir (default /tmp), a Llama-3.1-8B-shaped checkpoint with random weights (~16 GB,
shards of <= 5 GB like the hub's, written shard by shard) and an r=16 adapter on every linear layer,
then runs each merge in a fresh subprocess and records its peak RSS (the child's own VmHWM, plus
psutil polling) and wall time:
  baseline  AutoModelForCausalLM.from_pretrained(bf16) + PeftModel.from_pretrained + merge_and_unload
            + save_pretrained(max_shard_size=5GB)
  lorakit   lorakit.merge.merge_adapter(dtype=bf16)
Before each run the checkpoint's pages are evicted from the page cache (posix_fadvise DONTNEED), so
both start cold. A few merged tensors of the two outputs are compared. Everything under the workdir
is deleted at the end unless --keep.

    .venv/bin/python scripts/bench_merge.py            # writes bench/merge.json and bench/merge.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"})
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_CAP = 5_000_000_000
TINY = dict(LLAMA_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, bos_token_id=1, eos_token_id=2)  # --tiny: a smoke test of this script


def compare_names(cfg: dict) -> tuple[str, ...]:
    last = cfg["num_hidden_layers"] - 1
    return ("model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.mlp.down_proj.weight",
            "model.layers.0.self_attn.k_proj.weight", "lm_head.weight")


def _layer_shapes(cfg: dict, i: int) -> list[tuple[str, tuple]]:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    p = f"model.layers.{i}."
    return [(p + "input_layernorm.weight", (h,)), (p + "mlp.down_proj.weight", (h, f)),
            (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
            (p + "post_attention_layernorm.weight", (h,)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)), (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (kv, h))]


def all_shapes(cfg: dict) -> list[tuple[str, tuple]]:
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        shapes += _layer_shapes(cfg, i)
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_checkpoint(path: Path, cfg: dict) -> dict:
    """Random bf16 weights written shard by shard: at most one shard (<= 5 GB) in memory."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**cfg, dtype="bfloat16").save_pretrained(path)
    GenerationConfig(bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"]).save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    groups: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in all_shapes(cfg):
        n = 2 * _numel(shape)
        if groups[-1] and size + n > SHARD_CAP:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape in group:
            t = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else \
                (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            shard[name] = t
            weight_map[name] = fname
            total += 2 * t.numel()
        save_file(shard, path / fname, metadata={"format": "pt"})
        del shard
        print(f"  wrote {fname}", flush=True)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return {"bytes": total, "shards": len(groups),
            "largest_shard_bytes": max(f.stat().st_size for f in path.glob("*.safetensors"))}


def make_adapter(path: Path, ckpt: Path, cfg: dict, r: int = 16) -> dict:
    """An r=16 LoRA on every linear layer of every block, fp32 (as peft saves trained adapters)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in _layer_shapes(cfg, i):
            module = name.rsplit(".", 1)[0]
            if module.rsplit(".", 1)[1] in TARGETS:
                out_f, in_f = shape
                tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / in_f ** 0.5
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 1e-3
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), base_model_name_or_path=str(ckpt),
               task_type="CAUSAL_LM").save_pretrained(path)
    return {"r": r, "alpha": 2 * r, "targets": list(TARGETS), "params": sum(t.numel() for t in tensors.values()),
            "bytes": (path / "adapter_model.safetensors").stat().st_size}


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ------------------------------------------------------------------------------------------------
# Children
# ------------------------------------------------------------------------------------------------

def child_baseline(ckpt: str, adapter: str, out: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, max_shard_size="5GB")
    print(f"PEAK {_vmhwm()}", flush=True)


def _vmhwm() -> int:
    """The process's own peak RSS. ru_maxrss from wait4 is not: Linux carries the forking parent's peak
    across fork+exec into it (this script's parent held a 5 GB shard while creating the checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_lorakit(ckpt: str, adapter: str, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    from lorakit.merge import merge_adapter

    report = merge_adapter(adapter, out, base=ckpt, dtype="bf16")
    print("REPORT " + json.dumps(report), flush=True)
    print(f"PEAK {_vmhwm()}", flush=True)


def _evict(path: Path) -> None:
    """Drop the checkpoint's pages from the page cache, so each run reads it cold."""
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(kind: str, ckpt: Path, adapter: Path, out: Path, script: str = __file__) -> dict:
    """Run one merge (`script --child kind ...`) in a fresh interpreter; peak RSS = the child's VmHWM (also
    polled with psutil). scripts/bench_export.py measures its exports with it too."""
    import psutil

    os.sync()
    _evict(ckpt)
    cmd = [sys.executable, script, "--child", kind, str(ckpt), str(adapter), str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    polled = {"max": 0}
    stop = threading.Event()

    def poll():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                polled["max"] = max(polled["max"], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    threading.Thread(target=poll, daemon=True).start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    rc = proc.returncode
    peaks = [int(ln[5:]) for ln in output.splitlines() if ln.startswith("PEAK ")]
    result = {"command": " ".join(cmd[1:]), "exit_code": rc, "wall_s": round(wall, 1),
              "peak_rss_bytes": peaks[0] if peaks else max(polled["max"], 0), "peak_rss_source":
              "child's VmHWM" if peaks else "psutil polling every 50 ms (the child died before reporting)",
              "peak_rss_polled_bytes": polled["max"],
              "ru_maxrss_bytes_includes_parent": usage.ru_maxrss * 1024,
              "cpu_user_s": round(usage.ru_utime, 1), "cpu_sys_s": round(usage.ru_stime, 1)}
    if rc != 0:
        result["error"] = "killed by SIGKILL (out of memory)" if rc == -9 else output.strip()[-2000:]
    for line in output.splitlines():
        if line.startswith("REPORT "):
            result["report"] = json.loads(line[7:])
    print(f"  {kind}: rc={rc} wall={wall:.1f}s peak_rss={result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return result


def read_tensors(out: Path, names: tuple[str, ...]) -> dict:
    from safetensors import safe_open

    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())["weight_map"] if index_file.exists() else {}
    got = {}
    for name in names:
        with safe_open(out / index.get(name, "model.safetensors"), "pt") as f:
            got[name] = f.get_tensor(name)
    return got


def compare(a: dict, b: dict) -> dict:
    res = {}
    for name in a:
        x, y = a[name].float(), b[name].float()
        res[name] = {"max_abs_diff": float((x - y).abs().max()), "equal_fraction": float((x == y).float().mean())}
    return res


# ------------------------------------------------------------------------------------------------

def machine() -> dict:
    import psutil

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg()}


def versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "peft", "safetensors", "lorakit")}


def render_md(doc: dict) -> str:
    b, lk = doc["results"]["baseline"], doc["results"]["lorakit"]

    def gib(n):
        return f"{n / 2**30:.2f} GiB"

    def ok(r):
        return "ok" if r["exit_code"] == 0 else r.get("error", f"exit {r['exit_code']}")[:60]

    ck = doc["checkpoint"]
    rows = [
        "# Merge benchmark: lorakit vs peft merge_and_unload (CPU)", "",
        f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
        f"{gib(doc['machine']['ram_bytes'])} RAM, no GPU (load average at start {doc['machine']['load_avg_at_start'][0]:.1f}: "
        "the machine is shared with other jobs)  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), "",
        f"Checkpoint: {'tiny (--tiny)' if 'tiny' in doc['command'] else 'Llama-3.1-8B'} shape, random bf16, {gib(ck['bytes'])} in {ck['shards']} shards "
        f"(largest {gib(ck['largest_shard_bytes'])}); adapter r={doc['adapter']['r']} on "
        f"{', '.join(doc['adapter']['targets'])} ({doc['adapter']['params'] / 1e6:.1f}M params, fp32). "
        "Each merge runs in a fresh process with the checkpoint evicted from the page cache.", "",
        "| | peft merge_and_unload | lorakit merge |", "|---|---:|---:|",
        f"| result | {ok(b)} | {ok(lk)} |",
        f"| peak RSS (VmHWM) | {gib(b['peak_rss_bytes'])} | {gib(lk['peak_rss_bytes'])} |",
        f"| peak RSS / largest shard | {b['peak_rss_bytes'] / ck['largest_shard_bytes']:.2f}x | "
        f"{lk['peak_rss_bytes'] / ck['largest_shard_bytes']:.2f}x |",
        f"| wall time | {b['wall_s']:.0f} s | {lk['wall_s']:.0f} s |",
        f"| CPU time (user+sys) | {b['cpu_user_s'] + b['cpu_sys_s']:.0f} s | {lk['cpu_user_s'] + lk['cpu_sys_s']:.0f} s |",
        "", "Targets: lorakit peak RSS < 2x the largest shard: "
        + ("met" if lk["peak_rss_bytes"] < 2 * ck["largest_shard_bytes"] else "NOT met")
        + "; lorakit wall time <= baseline: " + ("met" if b["exit_code"] != 0 or lk["wall_s"] <= b["wall_s"] else "NOT met") + ".",
    ]
    if doc.get("outputs_compared"):
        rows += ["", "Merged tensors, lorakit vs peft (peft adds a bf16-rounded delta to the bf16 weight, lorakit "
                 "rounds W + delta once from fp32, so they may differ by one bf16 ulp):", "",
                 "| tensor | max abs diff | equal elements |", "|---|---:|---:|"]
        rows += [f"| {k} | {v['max_abs_diff']:.3g} | {v['equal_fraction']:.4f} |" for k, v in doc["outputs_compared"].items()]
    return "\n".join(rows) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        {"baseline": child_baseline, "lorakit": child_lorakit}[sys.argv[2]](*sys.argv[3:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lorakit-merge-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script in seconds")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "merge.json")
    ap.add_argument("--md", type=Path, default=ROOT / "bench" / "merge.md")
    args = ap.parse_args()
    work, ckpt, adapter = args.workdir, args.workdir / "base", args.workdir / "adapter"
    cfg = TINY if args.tiny else LLAMA_8B
    doc = {"command": "python scripts/bench_merge.py" + (" --tiny" if args.tiny else ""), "machine": machine(),
           "versions": versions(), "model_config": cfg}
    try:
        print("creating the checkpoint", flush=True)
        t = time.perf_counter()
        doc["checkpoint"] = make_checkpoint(ckpt, cfg)
        doc["adapter"] = make_adapter(adapter, ckpt, cfg)
        doc["checkpoint"]["create_s"] = round(time.perf_counter() - t, 1)
        results = {"baseline": measure("baseline", ckpt, adapter, work / "out-baseline")}
        ref = read_tensors(work / "out-baseline", compare_names(cfg)) if results["baseline"]["exit_code"] == 0 else None
        shutil.rmtree(work / "out-baseline", ignore_errors=True)  # free the disk before the second 16 GB
        results["lorakit"] = measure("lorakit", ckpt, adapter, work / "out-lorakit")
        if ref is not None and results["lorakit"]["exit_code"] == 0:
            doc["outputs_compared"] = compare(read_tensors(work / "out-lorakit", compare_names(cfg)), ref)
        doc["results"] = results
        doc["targets"] = {
            "lorakit_peak_rss_over_largest_shard": round(results["lorakit"]["peak_rss_bytes"]
                                                         / doc["checkpoint"]["largest_shard_bytes"], 3),
            "lorakit_wall_over_baseline": round(results["lorakit"]["wall_s"] / results["baseline"]["wall_s"], 3),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    args.md.write_text(render_md(doc))
    print(render_md(doc))


if __name__ == "__main__":
    main()
