"""Rich rendering of an `estimate` result: parameters, per-module table, memory breakdown, verdict."""

from __future__ import annotations

from rich.table import Table


def human(n: float | None) -> str:
    """Bytes as a short binary size (1.50 GiB)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def _params_table(result: dict) -> Table:
    p, m = result["params"], result["model"]
    t = Table(title=f"Parameters: {result['base_model']} ({m['architecture']}, {m['num_layers']} layers)",
              show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("base total", f"{p['total']:,}")
    t.add_row("trainable", f"{p['trainable']:,}")
    t.add_row("trainable %", f"{p['trainable_percent']:.4f}%")
    t.add_row("targets", ", ".join(result["targets"]))
    return t


def _modules_table(result: dict) -> Table:
    t = Table(title="Trainable parameters by module", title_justify="left")
    for col, just in (("module", "left"), ("in x out", "right"), ("layers", "right"), ("count", "right")):
        t.add_column(col, justify=just)
    for row in result["params"]["by_module"]:
        dims = f"{row['in_features']} x {row['out_features']}" if row.get("in_features") else "-"
        t.add_row(row["module"], dims, str(row["layers"] if row["layers"] is not None else "-"), f"{row['count']:,}")
    return t


_LEVERS = (("liger", "liger"), ("fused_lora", "fused LoRA"), ("lora_dropout_kernel", "LoRA dropout kernel"),
           ("fused_lm_head", "chunked LM head"), ("cuda_graphs", "CUDA graphs"),
           ("offload_embeddings", "input embeddings in host memory"),
           ("offload_activations", "layer inputs in host memory"), ("tiled_mlp", "tiled MLP"))


def levers(setup: dict) -> list[str]:
    """The names of the levers an estimate's `setup` has on, as the memory table's title shows them."""
    on = [name for key, name in _LEVERS if setup.get(key)]
    return on + ([f"frozen {setup['frozen_dtype']}"] if setup.get("frozen_dtype") else [])


def _memory_table(result: dict) -> Table:
    m, s = result["memory"], result["setup"]
    bits = f"{s['bits']}-bit" if s["bits"] else "16/32-bit"
    k = s.get("checkpoint_layers")
    gc = ("on" if k is None else f"first {k} layers") if s["gradient_checkpointing"] else "off"
    on = levers(s)
    st = result.get("strategy")
    where = (f"per GPU, {st['name'].upper()} over {st['gpus']} GPUs" if st else f"on one {s['device']} device")
    seq = f"{s['seq_len']} (prompt + completion at most)" if s.get("method") == "grpo" else s["seq_len"]
    t = Table(title=(f"Memory {where}: {bits} base, batch {s['batch_size']} x seq {seq}, "
                     f"checkpointing {gc}, {s['optimizer']}, {s['attention']}"
                     + "".join(f", {x}" for x in on)), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    w = m["weights"]
    shard = f"1/{st['gpus']} shard" if st and st["name"] == "fsdp" else ""
    t.add_row("weights", human(m["weights_bytes"]),
              shard or (f"quantized {human(w['quantized_bytes'])} + {w['unquantized_dtype']} "
                        f"{'/'.join(w['unquantized'])} {human(w['unquantized_bytes'])}"
                        + (" less the input embeddings (host memory)" if s.get("offload_embeddings") else "")))
    t.add_row("adapter", human(m["adapter_bytes"]), ", ".join(x for x in (s.get("adapter_dtype", "fp32"), shard) if x))
    t.add_row("gradients", human(m["gradients_bytes"]), shard)
    if m.get("ddp_buckets_bytes"):
        t.add_row("DDP gradient buckets", human(m["ddp_buckets_bytes"]), "a flat copy of the gradients for all-reduce")
    if m.get("fsdp_gathered_bytes"):
        t.add_row("FSDP gathered params", human(m["fsdp_gathered_bytes"]),
                  "current + prefetched layer, root unit (embeddings, lm_head)")
    t.add_row("optimizer states", human(m["optimizer_bytes"]),
              ", ".join(x for x in ("paged (host-backed)" if m["optimizer_paged"] else "", shard) if x))
    t.add_row("activations", human(m["activations_bytes"]),
              f"{human(m['activations_per_token_per_layer'])}/token/layer"
              + (f", {human(m['checkpointed_per_token_per_layer'])} checkpointed"
                 + (" (in host memory but two layers)" if s.get("offload_activations") else "")
                 if s["gradient_checkpointing"] else ""))
    if m.get("cuda_graphs_bytes"):
        t.add_row("of which CUDA graphs", human(m["cuda_graphs_bytes"]),
                  "a layer's working set in the graphs' pool + 4 hidden-state buffers")
    t.add_row("logits + loss", human(m["logits_bytes"]), "")
    if m.get("generation_bytes"):
        t.add_row("generation (GRPO)", human(m["generation_bytes"]),
                  f"KV cache of {s['generation_batch']} sequences")
        ph = m.get("phases_bytes") or {}
        t.add_row("GRPO phases (allocated)", ", ".join(f"{k} {human(v)}" for k, v in ph.items()),
                  f"the peak is {m.get('peak_phase')}")
    t.add_row("runtime overhead", human(m["overhead_bytes"]), "CUDA context, workspaces, allocator cache")
    t.add_row("peak", human(m["peak_bytes"]), f"torch reserved {human(m['reserved_peak_bytes'])}, allocated "
              f"{human(m['allocated_peak_bytes'])}", style="bold")
    a = result["artifacts"]
    t.add_row("adapter file", human(a["adapter_bytes"]), "")
    t.add_row("merged checkpoint", human(a["merged_bytes"]), "and `lorakit unmerge`'s output")
    t.add_row("extracted / composed adapter", human(a["extracted_adapter_bytes"]),
              "fp32 at this rank; compose --method cat: this per input adapter")
    return t


def _verdict_lines(v: dict) -> list[str]:
    where = v.get("gpu") or human(v["budget_bytes"])
    lines = [f"[bold green]fits[/] on {where} (headroom {human(v['headroom_bytes'])})" if v["fits"] else
             f"[bold red]does not fit[/] on {where} (over by {human(-v['headroom_bytes'])})"]
    lines.append(f"largest micro-batch: {v['max_batch_without_checkpointing']} without checkpointing, "
                 f"{v['max_batch_with_checkpointing']} with")
    lines.append("gradient checkpointing: " + ("needed" if v["needs_checkpointing"] else "not needed"))
    if "max_seq_len_at_batch_1" in v:
        lines.append(f"longest sequence at batch 1 (checkpointing on): {v['max_seq_len_at_batch_1']}")
    mb = v.get("with_memory_budget")
    if mb:
        lines.append(f"with train.memory_budget_gb = {v['budget_bytes'] / 2**30:.0f}: {mb['checkpointing_reason']}")
    return lines


def render(result: dict, console) -> None:
    """Print the estimate for people."""
    console.print(_params_table(result))
    console.print(_modules_table(result))
    console.print(_memory_table(result))
    st = result.get("strategy")
    if st:
        peak, alone = human(result["memory"]["peak_bytes"]), human(st["single_gpu"]["peak_bytes"])
        console.print(f"{st['name'].upper()} on {st['gpus']} GPUs: peak per GPU {peak} (one GPU alone: {alone}); "
                      f"global batch {st['global_batch']} = {st['per_gpu_micro_batch']} per GPU x "
                      f"{st['grad_accum']} grad_accum x {st['gpus']} GPUs", highlight=False)
        for warning in st["warnings"]:
            console.print(f"[yellow]warning[/] {warning}", highlight=False)
    if result.get("verdict"):
        for line in _verdict_lines(result["verdict"]):
            console.print(line)
