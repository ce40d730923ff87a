"""Input embeddings kept in host memory (train.offload_embeddings).

Why: on Llama-3.1-8B the input embedding table is 1 GiB of bf16 (128256 x 4096), 13% of a QLoRA run's GPU
memory, and training only reads the rows of the batch's tokens from it: 32 MiB for 2 x 2048 tokens. Kept in host
memory, the rows are gathered there and copied to the GPU each step (a millisecond or two); the gigabyte pays for
CUDA graphs' memory pool (lorakit.layer_graphs), so that the graphs run within the eager run's memory.

Same math: the same rows of the same table. Only for a frozen, plain `nn.Embedding` that the output layer does
not share (tied embeddings stay: the lm_head reads the whole table every step), in one process (DDP and FSDP
expect every parameter on the GPU), for SFT (generation would copy one token's rows per step).
"""

from __future__ import annotations

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

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(ids.to(self.table.device), self.table, self.padding_idx)
        return rows.to(self.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory, rows copied to {self.device}"


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
