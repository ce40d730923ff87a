"""Training rows for a run: `prepare_sft` and `prepare_grpo`, the train/eval split, and the report.

`prepare_sft` turns the recipe's data into pre-tokenized rows (`input_ids`, `completion_mask`; see
lorakit.data.encode). `prepare_grpo` gives TRL's GRPOTrainer a `prompt` column plus every other column (rewards
receive them as keyword lists). Loading is lorakit.data.sources, formats lorakit.data.formats.

Every user-fixable problem (missing or empty file, bad JSON line, wrong columns or row shapes, all rows too long,
mixed formats) becomes one `LorakitError` naming the file, line or row, and the fix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from lorakit.data.encode import Encoder, all_dropped_error, encode_rows
from lorakit.data.formats import ANSWER_COLUMNS, RowError, detect_format, eval_example, grpo_row, rename_columns
from lorakit.data.sources import Source, eval_source, load_source
from lorakit.errors import LorakitError


@dataclass
class Prepared:
    """What the trainers get: datasets ready for TRL, held-out generation examples, and a report."""

    train: Any  # datasets.Dataset: input_ids + completion_mask (SFT) or prompt + other columns (GRPO)
    eval: Any = None  # same columns, or None
    eval_examples: list[dict] = field(default_factory=list)  # {"prompt": messages | str, "reference": str}
    report: dict = field(default_factory=dict)


def _train_and_eval(recipe, method: str) -> tuple[str, Source, list[int], Source | None, list[int]]:
    """(format, train source, train row indices, eval source, eval row indices)."""
    d = recipe.data
    train = rename_columns(load_source(recipe, d.path, split=d.split), d.columns)
    fmt, train = detect_format(train, d.format, method)
    n = len(train)
    train_idx, ev, ev_idx = list(range(n)), None, []
    if isinstance(d.eval, float):
        n_eval = max(1, round(d.eval * n))
        if n_eval >= n:
            raise LorakitError(f"data.eval {d.eval} of {n} rows leaves no training rows", field="data.eval",
                               hint="use a smaller fraction, or a separate eval file")
        order = list(range(n))
        random.Random(recipe.train.seed).shuffle(order)
        ev, ev_idx, train_idx = train, sorted(order[:n_eval]), sorted(order[n_eval:])
    elif isinstance(d.eval, str) and d.eval.strip():
        ev = eval_source(recipe, d.eval.strip())
        ev = rename_columns(ev, d.columns)
        _, ev = detect_format(ev, fmt, method)
        ev_idx = list(range(len(ev)))
    if d.max_rows is not None:
        train_idx = train_idx[: d.max_rows]
    return fmt, train, train_idx, ev, ev_idx


def prepare_sft(recipe, tokenizer) -> Prepared:
    """Tokenized, masked train (and eval) rows for TRL's SFTTrainer, held-out examples, and a report.

    Args:
        recipe: the recipe; its data section says where the rows are, their format, split and lengths.
        tokenizer: the run's tokenizer (its chat template renders chat rows).

    Returns:
        Prepared: `input_ids` + `completion_mask` datasets, eval examples for generation metrics, and the report
        (rows, tokens, loss tokens, rows truncated and dropped and why).
    """
    d = recipe.data
    fmt, train, train_idx, ev, ev_idx = _train_and_eval(recipe, "sft")
    if fmt == "prompt":
        raise LorakitError(f"{train.name} holds prompts only (format prompt): SFT needs a completion to learn; "
                           "format prompt is for method: grpo", field="data.format",
                           hint="add a completion column (prompt + completion), or use method: grpo")
    enc = Encoder(tokenizer, completion_only=d.completion_only)
    res = encode_rows(train, train_idx, fmt, enc, d.max_length, d.too_long)
    if not res["input_ids"]:  # every label would be -100: the data, not the length, when no row was too long
        cut = res["dropped"]["too_long"] or res["dropped"]["completion_cut"]
        raise all_dropped_error(res, train, d.max_length, d.too_long, "data.max_length" if cut else "data.path")
    train_ds = Dataset.from_dict({"input_ids": res["input_ids"], "completion_mask": res["completion_mask"]})
    eval_ds, examples, ev_res = None, [], None
    if ev is not None:
        ev_res = encode_rows(ev, ev_idx, fmt, enc, d.max_length, d.too_long)
        if ev_res["input_ids"]:
            eval_ds = Dataset.from_dict({"input_ids": ev_res["input_ids"],
                                         "completion_mask": ev_res["completion_mask"]})
        for _, row in ev.rows_at(ev_res["kept"]):
            try:
                ex = eval_example(row, fmt, enc.has_template)
            except RowError:
                ex = None
            if ex is not None:
                examples.append(ex)
    report = {
        "format": fmt,
        "source": train.name,
        "source_rows": len(train),
        "rows": len(train_ds),
        "eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "truncated": res["truncated"],
        "dropped": sum(res["dropped"].values()),
        "dropped_reasons": res["dropped"],
        "eval_truncated": ev_res["truncated"] if ev_res else 0,
        "eval_dropped": sum(ev_res["dropped"].values()) if ev_res else 0,
        "tokens": sum(len(x) for x in res["input_ids"]),
        "loss_tokens": sum(sum(m) for m in res["completion_mask"]),
        "max_length": d.max_length,
        "too_long": d.too_long,
        "completion_only": d.completion_only,
        "packing": d.packing,  # done by TRL
        "eval_examples": len(examples),
    }
    return Prepared(train=train_ds, eval=eval_ds, eval_examples=examples, report=report)


def _grpo_dataset(source: Source, idx: list[int], fmt: str, has_template: bool):
    rows = []
    for i, row in source.rows_at(idx):
        try:
            rows.append(grpo_row(row, fmt, has_template))
        except RowError as e:
            raise LorakitError(f"{source.where(i)}: {e}", field="data.path") from None
    try:
        return Dataset.from_list(rows), rows
    except Exception as e:  # noqa: BLE001 - pyarrow refuses columns of mixed types
        raise LorakitError(f"{source.name}: the columns do not have one type across rows "
                           f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})", field="data.path",
                           hint="give each column the same type in every row (e.g. answers all strings)") from None


def prepare_grpo(recipe, tokenizer) -> Prepared:
    """A `prompt` column (chat messages or text) plus the other columns, for TRL's GRPOTrainer.

    Args:
        recipe: the recipe; its data section says where the rows are and their format.
        tokenizer: the run's tokenizer; with a chat template, alpaca rows become chat prompts.

    Returns:
        Prepared: train (and eval) datasets whose other columns reach the rewards as keyword lists, eval
        examples where a row holds an answer, and the report.
    """
    fmt, train, train_idx, ev, ev_idx = _train_and_eval(recipe, "grpo")
    if fmt == "text":
        raise LorakitError(f"{train.name} holds plain text (format text): GRPO needs prompts",
                           field="data.format", hint="give a prompt column (and e.g. an answer column for rewards)")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    train_ds, _ = _grpo_dataset(train, train_idx, fmt, has_template)
    eval_ds, examples = None, []
    if ev is not None and ev_idx:
        eval_ds, ev_rows = _grpo_dataset(ev, ev_idx, fmt, has_template)
        for row in ev_rows:
            ref = next((row[c] for c in ANSWER_COLUMNS if row.get(c) is not None), None)
            if ref is not None:
                examples.append({"prompt": row["prompt"], "reference": ref if isinstance(ref, str) else str(ref)})
    report = {
        "format": fmt, "source": train.name, "source_rows": len(train), "rows": len(train_ds),
        "eval_rows": len(eval_ds) if eval_ds is not None else 0, "truncated": 0, "dropped": 0,
        "tokens": None, "loss_tokens": None, "max_length": recipe.data.max_length,
        "columns": list(train_ds.column_names), "eval_examples": len(examples),
    }
    return Prepared(train=train_ds, eval=eval_ds, eval_examples=examples, report=report)


__all__ = ["Prepared", "prepare_grpo", "prepare_sft"]
