"""Benchmark `lorakit unmerge` and `lorakit extract` on an 8B-shaped random bf16 checkpoint (CPU): peak RSS and time.

Makes, under --workdir, the Llama-3.1-8B-shaped random checkpoint and r=16 all-linear adapter of
scripts/bench_merge.py (~16 GB, <= 5 GB shards), merges them with `lorakit merge` (bf16), then runs in a
fresh process each, with the checkpoints evicted from the page cache first (as the merge bench does):
  unmerge   lorakit.adapters.unmerge.unmerge(merged, adapter)  -> the base again (streamed)
  extract   lorakit.adapters.extract.extract(base, merged, rank=16)  -> the adapter again (randomized SVD)
and records each child's own peak RSS (VmHWM), wall and CPU time. The unmerged base is compared with the
real one (max |diff| of a few tensors, against bf16 rounding), and the extracted adapter's per-module error
is reported (the delta is rank 16, so rank 16 recovers it up to bf16 rounding of the merged weights).
Everything under the workdir is deleted at the end unless --keep.

    .venv/bin/python scripts/bench_adapters.py           # writes bench/adapters.json and bench/adapters.md
    .venv/bin/python scripts/bench_adapters.py --tiny    # a 2-layer smoke test of this script (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge as bm  # noqa: E402  (the checkpoint, adapter, eviction and machine description)

ROOT = bm.ROOT


def child(kind: str, *args: str) -> None:
    sys.path.insert(0, str(ROOT))
    if kind == "merge":
        from lorakit.merge import merge_adapter as run

        report = run(args[1], args[2], base=args[0], dtype="bf16")
    elif kind == "unmerge":
        from lorakit.adapters.unmerge import unmerge as run

        report = run(args[0], args[1], args[2])
    else:
        from lorakit.adapters.extract import extract as run

        report = run(args[0], args[1], args[2], rank=16)
        report = {k: v for k, v in report.items() if not isinstance(v, dict)}  # per-module tables stay out
    print("REPORT " + json.dumps(report), flush=True)
    print(f"PEAK {bm._vmhwm()}", flush=True)


def measure(kind: str, evict: list[Path], *args: Path) -> dict:
    os.sync()
    for d in evict:
        bm._evict(d)
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    peaks = [int(ln[5:]) for ln in output.splitlines() if ln.startswith("PEAK ")]
    result = {"exit_code": rc, "wall_s": round(wall, 1), "peak_rss_bytes": peaks[0] if peaks else None,
              "cpu_user_s": round(usage.ru_utime, 1), "cpu_sys_s": round(usage.ru_stime, 1)}
    if rc != 0:
        result["error"] = "killed by SIGKILL (out of memory)" if rc == -9 else output.strip()[-2000:]
    for line in output.splitlines():
        if line.startswith("REPORT "):
            result["report"] = json.loads(line[7:])
    print(f"  {kind}: rc={rc} wall={wall:.1f}s peak_rss={(result['peak_rss_bytes'] or 0) / 2**30:.2f} GiB", flush=True)
    return result


def compare_base(cfg: dict, ckpt: Path, unmerged: Path) -> dict:
    names = bm.compare_names(cfg)
    a, b = bm.read_tensors(unmerged, names), bm.read_tensors(ckpt, names)
    return {n: {"max_abs_diff": float((a[n].float() - b[n].float()).abs().max()),
                "max_abs_base": float(b[n].float().abs().max())} for n in names}


def render_md(doc: dict) -> str:
    def gib(n):
        return f"{n / 2**30:.2f} GiB" if n is not None else "n/a"

    ck, r, m = doc["checkpoint"], doc["results"], doc["machine"]
    rows = ["# Unmerge and extract benchmark (CPU)", "", f"Command: `{doc['command']}`  ",
            f"Machine: {m['cpu']}, {m['cores']} cores, {gib(m['ram_bytes'])} RAM "
            f"(load average at start {m['load_avg_at_start'][0]:.1f})  ",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), "",
            f"Checkpoint: {'tiny' if 'tiny' in doc['command'] else 'Llama-3.1-8B'} shape, random bf16, "
            f"{gib(ck['bytes'])} in {ck['shards']} shards; largest tensor {gib(doc['largest_tensor_bytes'])} (bf16). "
            "Adapter r=16 on every linear layer, merged in bf16 first. Each command runs in a fresh process, "
            "checkpoints evicted from the page cache.", "",
            "| | peak RSS | peak RSS / largest tensor | wall | CPU (user+sys) | result |",
            "|---|---:|---:|---:|---:|---|"]
    for kind in ("merge", "unmerge", "extract"):
        x = r[kind]
        ratio = f"{x['peak_rss_bytes'] / doc['largest_tensor_bytes']:.2f}x" if x["peak_rss_bytes"] else "n/a"
        status = "ok" if x["exit_code"] == 0 else x.get("error", "")[:60]
        rows.append(f"| {kind} | {gib(x['peak_rss_bytes'])} | {ratio} | {x['wall_s']:.0f} s | "
                    f"{x['cpu_user_s'] + x['cpu_sys_s']:.0f} s | {status} |")
    if doc.get("unmerged_vs_base"):
        rows += ["", "Unmerged vs the real base (bf16 rounding of merge and unmerge: up to ~2^-8 of the values):", "",
                 "| tensor | max abs diff | max abs base |", "|---|---:|---:|"]
        rows += [f"| {k} | {v['max_abs_diff']:.3g} | {v['max_abs_base']:.3g} |"
                 for k, v in doc["unmerged_vs_base"].items()]
    rep = r["extract"].get("report")
    if rep:
        rows += ["", f"Extract at rank 16: max relative error {rep['max_relative_error']:.3g}, min energy kept "
                 f"{rep['min_energy_kept']:.6f} over {rep['modules']} modules (what rank 16 misses is the bf16 "
                 "rounding of the merged weights, full rank)."]
    return "\n".join(rows) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], *sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lorakit-adapters-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script in seconds")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "adapters.json")
    ap.add_argument("--md", type=Path, default=ROOT / "bench" / "adapters.md")
    args = ap.parse_args()
    work = args.workdir
    ckpt, adapter, merged = work / "base", work / "adapter", work / "merged"
    cfg = bm.TINY if args.tiny else bm.LLAMA_8B
    doc = {"command": "python scripts/bench_adapters.py" + (" --tiny" if args.tiny else ""), "machine": bm.machine(),
           "versions": bm.versions(), "model_config": cfg,
           "largest_tensor_bytes": 2 * max(bm._numel(s) for _, s in bm.all_shapes(cfg))}
    try:
        print("creating the checkpoint", flush=True)
        doc["checkpoint"] = bm.make_checkpoint(ckpt, cfg)
        doc["adapter"] = bm.make_adapter(adapter, ckpt, cfg)
        results = {"merge": measure("merge", [ckpt], ckpt, adapter, merged)}
        results["unmerge"] = measure("unmerge", [merged], merged, adapter, work / "unmerged")
        if results["unmerge"]["exit_code"] == 0:
            doc["unmerged_vs_base"] = compare_base(cfg, ckpt, work / "unmerged")
        shutil.rmtree(work / "unmerged", ignore_errors=True)  # free the disk before extract reads two checkpoints
        results["extract"] = measure("extract", [ckpt, merged], ckpt, merged, work / "extracted")
        doc["results"] = results
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    args.md.write_text(render_md(doc))
    print(render_md(doc))


if __name__ == "__main__":
    main()
