# ruff: noqa: E501  (the GPU command in the docstring is one line, to copy as is)
"""Does a CUDA graph of the decoding step pay for GRPO's generation? An experiment before any library code (issue 26).

GRPO's step is mostly generation (bench/grpo_speed.md: ~80% on the 8B shape), and transformers' eager `generate`
launches every kernel of every layer from Python for each token. transformers compiles the decoding step only for
quantizers it marks compileable, which bitsandbytes' 4-bit is not, so TRL's `cache_implementation: static` alone
gives a static cache and no graph. This script times, on one NF4 + LoRA model and the same prompts:

- eager: `model.generate` as TRL calls it (sampling, the dynamic cache), every completion to full length;
- static: the same with `cache_implementation="static"`;
- graphed: a static cache (transformers' StaticCache), the prompt run eagerly, then each decoding step replayed
  from one CUDA graph captured once (inputs copied into static buffers; the mask is a 4-D bool tensor kept here,
  so that transformers builds none inside the graph; sampling outside the graph).

Checks: greedy tokens of `graphed` against eager `generate` (the first --check tokens); full-length completions.
The model runs in eval mode (no LoRA dropout: a captured dropout would replay one mask), which TRL's generation
does not; the experiment measures the launches, not the dropout.

GPU command (carry [".gpu-wheels"]; ~3 minutes, the 8B build included):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 scripts/bench_decode_graphs.py --out $OUT

CPU smoke test (tiny model, no graph: the replay is a direct call; checks the cache, mask and positions):

    .venv/bin/python scripts/bench_decode_graphs.py --tiny --device cpu --out /tmp/lkdg

Writes OUT/decode_graphs.json and OUT/decode_graphs.md (add LKBENCH_COMMIT=<commit> to the exports).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import PAD, build, model_dir, shape, stamp, versions  # noqa: E402


class GraphedDecoder:
    """Sampling over a static KV cache with each one-token decoding step replayed from a CUDA graph.

    Args:
        model: a causal LM (peft-wrapped or not) in eval mode.
        batch: rows decoded together.
        max_len: prompt + completion tokens the cache holds.
        graphs: capture a CUDA graph (else each step is a direct call: the CPU smoke test).
    """

    def __init__(self, model, batch: int, max_len: int, graphs: bool):
        import torch
        from transformers import StaticCache

        self.model, self.batch, self.max_len, self.graphs = model, batch, max_len, graphs
        self.device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        d = self.device
        self.tok = torch.full((batch, 1), PAD, dtype=torch.long, device=d)
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device=d)
        self.mask = torch.zeros((batch, 1, 1, max_len), dtype=torch.bool, device=d)
        self.logits = None
        self.graph = None
        self.mask[..., 0] = True  # the warm-up rows attend to something (no NaN written into the cache)
        self._step()  # allocates the cache's tensors (lazily, on the first update) before any capture
        if graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()

    def _step(self):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=self.tok, position_ids=self.pos, attention_mask=self.mask,
                             past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1]

    def generate(self, ids, attn, new_tokens: int, temperature: float, greedy: bool = False):
        """Completions of `new_tokens` tokens for left-padded prompts `ids` [batch, P] with mask `attn`."""
        import torch

        b, p = ids.shape
        assert b == self.batch and p + new_tokens <= self.max_len
        self.cache.reset()
        valid = attn.bool()
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones((p, p), dtype=torch.bool, device=self.device).tril()
        full = torch.zeros((b, 1, p, self.max_len), dtype=torch.bool, device=self.device)
        full[:, :, :, :p] = causal[None, None] & valid[:, None, None, :]
        # a pad query sees itself: no row is all masked (sdpa would give NaN there, and NaN values in the cache
        # poison later rows through 0 x NaN even where the mask hides them)
        full[:, :, :, :p] |= torch.eye(p, dtype=torch.bool, device=self.device)[None, None]
        with torch.no_grad():
            logits = self.model(input_ids=ids, position_ids=pos, attention_mask=full, past_key_values=self.cache,
                                use_cache=True).logits[:, -1]
        self.mask.zero_()
        self.mask[:, 0, 0, :p] = valid
        self.pos.copy_(pos[:, -1:])
        out = []
        for t in range(new_tokens):
            nxt = logits.argmax(-1) if greedy else torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1)[:, 0]
            out.append(nxt)
            if t == new_tokens - 1:
                break
            self.tok.copy_(nxt[:, None])
            self.pos.add_(1)
            self.mask[:, 0, 0, p + t] = True
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            logits = self.logits
        return torch.stack(out, 1)


def load(model: str, device: str):
    """The NF4 checkpoint with a LoRA adapter (r=16 on the 7 linears, B non-zero so that it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.model.bnb_cpu import keep_4bit_layers_trainable

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(model_dir(model), dtype=dtype, device_map={"": 0 if device == "cuda" else "cpu"})
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(m, cfg)
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    pm.eval()
    keep_4bit_layers_trainable(m)  # bitsandbytes' CPU repacking breaks on these shapes (lorakit.model.bnb_cpu)
    m.generation_config.eos_token_id = m.config.vocab_size  # an id the head cannot produce: full-length completions
    m.generation_config.pad_token_id = PAD
    return pm


def prompts(batch: int, lo: int, hi: int, vocab: int, device: str):
    """Left-padded prompts of lo..hi random tokens (ids, mask)."""
    import torch

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(lo, hi + 1, (batch,), generator=g)
    p = int(lens.max())
    ids = torch.full((batch, p), PAD, dtype=torch.long)
    attn = torch.zeros((batch, p), dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        ids[i, p - n:] = torch.randint(3, min(vocab, 32000), (n,), generator=g)
        attn[i, p - n:] = 1
    return ids.to(device), attn.to(device)


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--batch", type=int, default=64, help="completions decoded together (8 prompts x 8)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--check", type=int, default=16, help="greedy tokens compared with eager generate")
    ap.add_argument("--repeats", type=int, default=2, help="timed generate calls per way (after one warm-up)")
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = "tiny" if args.tiny else "8b"
    if args.tiny:
        args.batch, args.new_tokens, args.check, args.repeats = min(args.batch, 4), min(args.new_tokens, 12), min(args.check, 6), 1
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.time()
    build(name, device)
    pm = load(name, device)
    lo, hi = (64, 128) if not args.tiny else (4, 8)
    ids, attn = prompts(args.batch, lo, hi, shape(name)["vocab_size"], device)
    p = ids.shape[1]
    res: dict = {"build_and_load_s": round(time.time() - t0, 1), "prompt_tokens": p, "batch": args.batch,
                 "new_tokens": args.new_tokens}

    def hf(static: bool, greedy: bool = False, n: int | None = None):
        kw = dict(do_sample=not greedy, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=n or args.new_tokens,
                  min_new_tokens=n or args.new_tokens, pad_token_id=PAD, eos_token_id=shape(name)["vocab_size"])
        if static:
            kw["cache_implementation"] = "static"
        with torch.no_grad():
            return pm.generate(input_ids=ids, attention_mask=attn, **kw)[:, p:]

    t = time.time()
    dec = GraphedDecoder(pm, args.batch, p + args.new_tokens, graphs=device == "cuda")
    res["capture_s"] = round(time.time() - t, 2)
    ref = hf(False, greedy=True, n=args.check)
    mine = dec.generate(ids, attn, args.check, 1.0, greedy=True)
    res["greedy_match"] = float((ref == mine).float().mean())
    res["greedy_first_token_match"] = float((ref[:, 0] == mine[:, 0]).float().mean())
    ways = {"eager": lambda: hf(False), "static": lambda: hf(True),
            "graphed": lambda: dec.generate(ids, attn, args.new_tokens, 1.0)}
    for way, fn in ways.items():
        try:
            fn()  # warm-up
            secs = []
            for _ in range(args.repeats):
                out, s = timed(fn, sync)
                secs.append(s)
            n = out.shape[0] * out.shape[1]
            res[way] = {"seconds": round(min(secs), 3), "tokens": n, "tokens_per_s": round(n / min(secs), 1),
                        "full_length": out.shape[1] == args.new_tokens}
        except Exception as e:  # noqa: BLE001 - keep the other ways' figures
            res[way] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(way, res[way], flush=True)
    if device == "cuda":
        res["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    e = res.get("eager", {}).get("seconds")
    for way in ("static", "graphed"):
        if e and res.get(way, {}).get("seconds"):
            res[way]["eager_over_this"] = round(e / res[way]["seconds"], 2)
    info = {**stamp(), "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "model": name, "versions": versions(), "command": "python3 scripts/bench_decode_graphs.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_graphs.json").write_text(json.dumps({"info": info, "result": res}, indent=1))
    rows = "\n".join(f"| {w} | {_f(res.get(w), 'seconds')} | {_f(res.get(w), 'tokens_per_s')} | "
                     f"{_f(res.get(w), 'eager_over_this')} | {res.get(w, {}).get('error', '')} |" for w in ways)
    (out / "decode_graphs.md").write_text(
        f"# A CUDA graph of the decoding step (issue 26)\n\n{info['date']} · {info['gpu'] or device} · lorakit at "
        f"{info['commit']} · `{info['command']}`\n\n{name} shape, NF4 + LoRA r=16 (eval mode), {args.batch} rows, "
        f"prompts of {lo}-{hi} tokens left-padded to {p}, {args.new_tokens} new tokens, sampling at temperature 1; "
        f"best of {args.repeats} calls after a warm-up. Graph capture {res['capture_s']} s (once). Greedy tokens "
        f"equal to eager generate's: {res['greedy_match']:.0%} of {args.check} x {args.batch} (first token "
        f"{res['greedy_first_token_match']:.0%}).\n\n| way | seconds | tokens/s | eager / this | error |\n"
        f"|---|---|---|---|---|\n{rows}\n")


def _f(d, k):
    v = (d or {}).get(k)
    return "-" if v is None else str(v)


if __name__ == "__main__":
    main()
