"""Input embeddings kept in host memory (train.offload_embeddings).

Why: with a large vocabulary the input embedding table (vocab x hidden in bf16) is a sizeable share of a QLoRA
run's GPU memory, and training only reads the rows of the batch's tokens from it. Kept in host memory, the table
pays for CUDA graphs' memory pool (lorakit.speed.layer_graphs), so that the graphs run within the eager run's
memory.

How the rows get to the GPU: on CUDA with Triton the table is pinned and a kernel reads the batch's rows from it
over the host link (lorakit.speed.kernels.host_rows), ids and output on the GPU, so the step never waits for the GPU.
Otherwise the ids are copied to the host, the rows gathered there and copied back: that copy waits for the GPU to
finish the work queued before it, and the host's gather then leaves the GPU idle every step. A probe at set-up
checks the kernel against the host gather and falls back to it.

Same math: the same rows of the same table. Only for a frozen, plain `nn.Embedding` that the output layer does
not share (tied embeddings stay: the lm_head reads the whole table every step), in one process (DDP and FSDP
expect every parameter on the GPU), for SFT (generation would copy one token's rows per step).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch


def problem(model: Any) -> str | None:
    """Why the input embeddings of `model` (peft-wrapped or not) cannot live in host memory, or None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return "a distributed run (DDP, FSDP) keeps every parameter on its GPU"
    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding:  # e.g. Gemma's scaled embeddings: their own forward
        return f"the input embeddings are a {type(emb).__name__}, not a plain torch Embedding"
    out = model.get_output_embeddings()
    if out is not None and getattr(out, "weight", None) is emb.weight:
        return "the output layer shares the input embeddings (tied weights)"
    if emb.weight.requires_grad:
        return "the input embeddings are trained (lora.modules_to_save)"
    return None


class HostEmbedding(torch.nn.Module):
    """Stands in for a frozen nn.Embedding: the table in host memory, the rows of a batch copied to `device`.
    The table is a plain attribute, not a parameter: moving the model (`.to()`, the Trainer's placement) leaves
    it where it is; `weight` still reads it."""

    def __init__(self, emb: torch.nn.Embedding, device: Any):
        super().__init__()
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx
        self.table = emb.weight.detach().to("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current GPU, by index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.reads_host = False  # rows read from the pinned table by a GPU kernel (set by `use_kernel`)
        if self.device.type == "cuda":
            self.use_kernel()

    def use_kernel(self) -> None:
        """Pin the table and read rows with the Triton kernel, if it gives the host gather's rows here."""
        if importlib.util.find_spec("triton") is None:
            return
        try:
            pinned = self.table.pin_memory()
            ids = torch.tensor([0, self.num_embeddings - 1, self.num_embeddings // 2], device=self.device)
            got = _kernel_rows(pinned, ids, self.device)
            ok = torch.equal(got.cpu(), self.table[ids.cpu()])
        except Exception:  # noqa: BLE001 - no UVA, an old driver, a Triton that refuses host pointers
            return
        if ok:
            self.table, self.reads_host = pinned, True

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.reads_host and ids.device == self.device:
            return _kernel_rows(self.table, ids, self.device)
        rows = torch.nn.functional.embedding(ids.to(self.table.device), self.table, self.padding_idx)
        return rows.to(self.device)

    def extra_repr(self) -> str:
        how = "read by a GPU kernel" if self.reads_host else "copied"
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory, rows {how} to {self.device}"


def _kernel_rows(table: torch.Tensor, ids: torch.Tensor, device: Any) -> torch.Tensor:
    """Rows `ids` (on the GPU) of the pinned host `table`, gathered into GPU memory by
    lorakit.speed.kernels.host_rows."""
    import triton  # only where Triton is installed (use_kernel checks): CPU-only torch builds lack it

    from lorakit.speed.kernels.host_rows import gather_rows

    flat = ids.reshape(-1).contiguous()
    dim = table.shape[1]
    out = torch.empty(flat.numel(), dim, dtype=table.dtype, device=device)
    if flat.numel():
        # ids out of range fail like torch's embedding on the GPU (a device-side assert), without a host sync
        torch._assert_async(((flat >= 0) & (flat < table.shape[0])).all(), "embedding index out of range")
        block = min(1024, triton.next_power_of_2(dim))
        with torch.cuda.device(device):
            gather_rows[(flat.numel(), triton.cdiv(dim, block))](table, flat, out, table.shape[0], dim, BLOCK=block)
    return out.view(*ids.shape, dim)


def offload(model: Any) -> int:
    """Put the input embeddings of `model` (checked by `problem`) in host memory, rows copied to the device
    the table was on; returns the bytes freed there."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings()
    device = emb.weight.device
    freed = emb.weight.numel() * emb.weight.element_size()
    base.set_input_embeddings(HostEmbedding(emb, device))
    del emb
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the table's block back to the driver, not kept in the allocator's cache
    return int(freed)
