"""Padding-free batches: whether they pay (`data.padding_free: auto`), and one length to pad them to so that CUDA
graphs can replay their layers (train.cuda_graphs).

Padding-free batches cost a little on rows of one length (attention then runs per document) and pay on rows of
varied length: `auto` keeps them where padded batches would waste at least PADDING_FREE_MIN_WASTE of their tokens.

A padding-free batch is one flattened row whose length changes with every batch, and a CUDA graph replays one shape;
eager, such steps wait on the host launching kernels. So each flattened batch is padded up to one length - the
QUANTILE of the run's batch totals - and the layers replay as graphs; the few longer batches run eager.

Same math: the padding is a fixed number of extra rows (pad tokens, labels -100, their own positions and
boundaries), so attention keeps them apart from the real rows, no loss term reads them, and the Trainer's
token count (tokens that are not the pad token) leaves them out. What it costs is their compute, which on a
host-bound model the GPU had idle time for.
"""

from __future__ import annotations

import math
import random
from typing import Any

QUANTILE = 0.95  # batches up to this quantile of the totals replay graphs; longer ones run eager
MULTIPLE = 64  # the length is rounded up to a multiple of this (tensor-core friendly shapes)



PADDING_FREE_MIN_WASTE = 0.15  # padded batches wasting less than this stay padded under `auto`


def padding_waste(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Fraction of a padded batch's tokens that would be padding, over one shuffled pass of the rows."""
    if not lengths or batch_size <= 1:
        return 0.0
    order = list(lengths)
    random.Random(seed).shuffle(order)
    padded = sum(max(order[i:i + batch_size]) * len(order[i:i + batch_size]) for i in range(0, len(order), batch_size))
    return 1.0 - sum(order) / padded if padded else 0.0


def padding_free_worth_it(lengths: list[int], batch_size: int, seed: int = 0) -> bool:
    """`data.padding_free: auto` after the data is known: on only when padded batches would waste enough."""
    return padding_waste(lengths, batch_size, seed) >= PADDING_FREE_MIN_WASTE


def graph_length(lengths: list[int], batch_size: int, seed: int = 0, passes: int = 8) -> int:
    """The flattened length to pad batches to: QUANTILE of the batch totals over `passes` shuffled passes of
    the rows (the Trainer's order is shuffled too), rounded up to MULTIPLE."""
    if not lengths:
        raise ValueError("graph_length needs the rows' lengths")
    rng = random.Random(seed)
    totals = []
    order = list(lengths)
    for _ in range(passes):
        rng.shuffle(order)
        totals += [sum(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    totals.sort()
    q = totals[min(len(totals) - 1, math.ceil(QUANTILE * len(totals)) - 1)]
    return -(-q // MULTIPLE) * MULTIPLE


def pad_rows(length: int, max_row: int) -> int:
    """How many pad rows every padded batch carries: enough that none is longer than `max_row` (the attention
    kernel's longest row) for any batch, so that the boundaries' shape is the same for all."""
    return max(1, -(-length // max_row))


def pad_batch(batch: dict, length: int, max_row: int, pad_id: int) -> dict:
    """A padding-free batch (input_ids (1, T), labels, position_ids, cu_seq_lens_*, max_length_*, seq_idx)
    padded to `length` with `pad_rows` rows of pad tokens, each of 1 to `max_row` tokens; unchanged if too long
    for that (over `length` minus one token a pad row) or not flattened."""
    import torch  # torch-free at import: the planner and the estimate read this module

    ids = batch.get("input_ids")
    pos = batch.get("position_ids")
    n = pad_rows(length, max_row)
    if ids is None or pos is None or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] > length - n:
        return batch
    T = ids.shape[1]
    extra = length - T
    sizes = []
    for i in range(n):  # the first rows as long as they may be, every row at least one token
        sizes.append(min(max_row, extra - sum(sizes) - (n - 1 - i)))
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_full((1, extra), pad_id)], dim=1)
    out["position_ids"] = torch.cat([pos, torch.cat([torch.arange(s, dtype=pos.dtype) for s in sizes])[None]], dim=1)
    if "labels" in batch:
        out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, extra), -100)], dim=1)
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:
        ends = (T + torch.tensor(sizes).cumsum(0)).to(cu.dtype)
        cu = torch.cat([cu, ends])
        for k in ("cu_seq_lens_q", "cu_seq_lens_k"):
            if k in batch:
                out[k] = cu
        for k in ("max_length_q", "max_length_k"):
            if k in batch:
                out[k] = max_row
    if "seq_idx" in batch:
        rows = batch["cu_seq_lens_q"].numel() - 1 if "cu_seq_lens_q" in batch else int(batch["seq_idx"].max()) + 1
        idx = torch.repeat_interleave(torch.arange(rows, rows + n, dtype=batch["seq_idx"].dtype),
                                      torch.tensor(sizes))
        out["seq_idx"] = torch.cat([batch["seq_idx"], idx[None]], dim=1)
    for k, v in batch.items():  # any other per-token column (e.g. a completion mask), not replaced above: zeros
        if out[k] is v and isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape == ids.shape:
            out[k] = torch.cat([v, v.new_zeros((1, extra))], dim=1)
    return out


class GraphLengthCollator:
    """Wraps the Trainer's padding-free collator: each batch it makes, padded to `length` (pad_batch); counts
    the batches padded, those longer than `length` and the pad tokens added (for the run's summary)."""

    def __init__(self, collate: Any, length: int, max_row: int, pad_id: int):
        self.collate, self.length, self.max_row, self.pad_id = collate, length, max_row, pad_id
        self.padded = self.longer = self.pad_tokens = 0

    def __call__(self, examples: list) -> dict:
        batch = self.collate(examples)
        out = pad_batch(batch, self.length, self.max_row, self.pad_id)
        if out is batch:
            self.longer += 1
        else:
            self.padded += 1
            self.pad_tokens += out["input_ids"].shape[1] - batch["input_ids"].shape[1]
        return out
