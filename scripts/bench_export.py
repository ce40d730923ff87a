"""Benchmark `lorakit export --format gguf` on an 8B-shaped random bf16 checkpoint with an adapter (CPU).

Creates, under --workdir, the same Llama-3.1-8B-shaped checkpoint and r=16 adapter as scripts/bench_merge.py
(its functions), plus a small byte-level tokenizer (Llama-3's split rule; the GGUF pads the vocabulary to
the model's 128256 rows), then exports the adapter merged on the fly to each --quant in a fresh subprocess,
recording its peak RSS (the child's own VmHWM, plus psutil polling), wall and CPU time. The checkpoint is
evicted from the page cache before each run. The goal: peak RSS near one tensor (the largest, the 128256 x
4096 embedding / head: 1.05 GB in bf16) plus the output buffer, not the model. Each output is checked with
gguf's reader (tensor count, types) and deleted before the next run.

    .venv/bin/python scripts/bench_export.py               # writes bench/export.json and bench/export.md
    .venv/bin/python scripts/bench_export.py --tiny        # a 2-layer model: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import LLAMA_8B, TINY, _vmhwm, machine, make_adapter, make_checkpoint, measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_tokenizer(path: Path, cfg: dict) -> None:
    """A byte-level BPE (Llama-3 split, 1000 tokens) whose BOS/EOS ids are the config's."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    specials = {cfg["bos_token_id"]: "<|begin_of_text|>", cfg["eos_token_id"]: "<|end_of_text|>"}
    if max(specials) >= tok.get_vocab_size():  # the 8B shape: specials at Llama-3's ids, past the trained vocabulary
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(tok.get_vocab_size(), min(specials))])
    tok.add_special_tokens([AddedToken(specials[i], special=True) for i in sorted(specials)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[cfg["bos_token_id"]],
                            eos_token=specials[cfg["eos_token_id"]]).save_pretrained(path)


def child_export(ckpt: str, adapter: str, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    from lorakit.export.gguf_writer import export_gguf

    quant = Path(out).stem
    report = export_gguf(adapter, out, base=ckpt, quant=quant)
    print("REPORT " + json.dumps(report), flush=True)
    print(f"PEAK {_vmhwm()}", flush=True)


def check(out: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(out)
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return {"tensors": len(reader.tensors), "types": kinds, "bytes": out.stat().st_size}


def render_md(doc: dict) -> str:
    def gib(n):
        return f"{n / 2**30:.2f} GiB"

    ck, largest = doc["checkpoint"], doc["largest_tensor_bytes"]
    rows = [
        "# GGUF export benchmark (CPU)", "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores, {gib(doc['machine']['ram_bytes'])} RAM "
        f"(load average at start {doc['machine']['load_avg_at_start'][0]:.1f})  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), "",
        f"Checkpoint: {'tiny (--tiny)' if 'tiny' in doc['command'] else 'Llama-3.1-8B'} shape, random bf16, "
        f"{gib(ck['bytes'])} in {ck['shards']} shards (largest {gib(ck['largest_shard_bytes'])}, largest tensor "
        f"{gib(largest)}); adapter r={doc['adapter']['r']} on {', '.join(doc['adapter']['targets'])}, merged on the "
        "fly. Each export runs in a fresh process with the checkpoint evicted from the page cache.", "",
        "| quant | result | file | peak RSS (VmHWM) | peak RSS / largest tensor | wall | CPU (user+sys) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for quant, r in doc["results"].items():
        ok = "ok" if r["exit_code"] == 0 else r.get("error", f"exit {r['exit_code']}")[:60]
        size = gib(r["file"]["bytes"]) if "file" in r else "-"
        rows.append(f"| {quant} | {ok} | {size} | {gib(r['peak_rss_bytes'])} | {r['peak_rss_bytes'] / largest:.2f}x | "
                    f"{r['wall_s']:.0f} s | {r['cpu_user_s'] + r['cpu_sys_s']:.0f} s |")
    return "\n".join(rows) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_export(*sys.argv[3:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lorakit-export-bench"))
    ap.add_argument("--quant", nargs="+", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script in seconds")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "export.json")
    ap.add_argument("--md", type=Path, default=ROOT / "bench" / "export.md")
    args = ap.parse_args()
    import importlib.metadata as md

    work, ckpt, adapter = args.workdir, args.workdir / "base", args.workdir / "adapter"
    cfg = TINY if args.tiny else LLAMA_8B
    doc = {"command": "python scripts/bench_export.py" + (" --tiny" if args.tiny else ""), "machine": machine(),
           "versions": {p: md.version(p) for p in ("torch", "transformers", "gguf", "safetensors", "lorakit")},
           "model_config": cfg, "largest_tensor_bytes": 2 * cfg["vocab_size"] * cfg["hidden_size"], "results": {}}
    try:
        print("creating the checkpoint", flush=True)
        t = time.perf_counter()
        doc["checkpoint"] = make_checkpoint(ckpt, cfg)
        make_tokenizer(ckpt, cfg)
        doc["adapter"] = make_adapter(adapter, ckpt, cfg)
        doc["checkpoint"]["create_s"] = round(time.perf_counter() - t, 1)
        for quant in args.quant:
            out = work / "out" / f"{quant}.gguf"
            out.parent.mkdir(parents=True, exist_ok=True)
            result = measure(f"export-{quant}", ckpt, adapter, out, script=__file__)  # main()'s --child
            if result["exit_code"] == 0:
                result["file"] = check(out)
            doc["results"][quant] = result
            if not args.keep:
                shutil.rmtree(work / "out", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    args.md.write_text(render_md(doc))
    print(render_md(doc))


if __name__ == "__main__":
    main()
