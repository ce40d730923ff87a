"""Row formats: detect which one a dataset holds, and turn its rows into what a step needs.

The formats are messages (chat; ShareGPT's conversations/from/value accepted), alpaca (instruction + output
(+ input)), prompt + completion, text, and prompt alone (GRPO). A row that breaks its format raises `RowError`;
the caller adds where the row is.
"""

from __future__ import annotations

import json
from typing import Any

from lorakit.data.sources import Source
from lorakit.errors import LorakitError

EXPECTED = ("messages (chat: a list of {role, content}); instruction + output (+ input) [alpaca]; "
            "prompt + completion; text; prompt alone (GRPO)")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                "function": "tool", "observation": "tool", "ipython": "ipython"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
ANSWER_COLUMNS = ("answer", "reference", "solution", "completion", "output")


class RowError(Exception):
    """A problem with one row; the caller adds where the row is."""


def rename_columns(source: Source, mapping: dict[str, str]) -> Source:
    """Apply data.columns ({old: new}) to every row."""
    if not mapping:
        return source
    cols = source.columns
    missing = [k for k in mapping if k not in cols]
    if missing:
        raise LorakitError(f"data.columns renames {', '.join(map(repr, missing))}, but {source.name} has no such "
                           f"column (columns: {', '.join(cols) or 'none'})", field="data.columns")
    clash = [v for k, v in mapping.items() if v in cols and v not in mapping and k != v]
    if clash:
        raise LorakitError(f"data.columns renames onto {', '.join(map(repr, clash))}, which {source.name} already "
                           f"has (columns: {', '.join(cols)})", field="data.columns",
                           hint="drop or rename the existing column too")
    if isinstance(source.rows, list):
        rows = [{mapping.get(k, k): v for k, v in r.items()} for r in source.rows]
        return Source(rows, source.name, source.locations)
    return Source(source.rows.rename_columns({k: v for k, v in mapping.items() if k != v}), source.name)


def _present(row: dict) -> set[str]:
    return {k for k, v in row.items() if v is not None}


def _row_format(keys: set[str], method: str) -> str | None:
    has_pc = {"prompt", "completion"} <= keys
    order = [("messages", "messages" in keys), ("alpaca", {"instruction", "output"} <= keys),
             ("prompt_completion", has_pc), ("text", "text" in keys), ("prompt", "prompt" in keys)]
    if method == "grpo":  # a prompt column is what GRPO wants first
        order = [("prompt_completion", has_pc), ("prompt", "prompt" in keys), *order[:2], order[3]]
    return next((name for name, ok in order if ok), None)


def detect_format(source: Source, fmt: str, method: str = "sft") -> tuple[str, Source]:
    """The format of `source` (auto-detected or checked) and the source (conversations -> messages).

    Args:
        source: the rows.
        fmt: data.format: "auto" to detect it from the columns, or the format to check the columns against.
        method: "sft" or "grpo"; GRPO prefers a prompt column when a row could be read either way.

    Returns:
        (the format's name, the source with conversations renamed to messages where detection did so).
    """
    cols = source.columns
    if fmt == "auto" and "messages" not in cols and "conversations" in cols:
        source = rename_columns(source, {"conversations": "messages"})
        cols = source.columns
    if fmt != "auto":
        need = {"messages": ["messages"], "alpaca": ["instruction", "output"], "text": ["text"],
                "prompt_completion": ["prompt", "completion"], "prompt": ["prompt"]}[fmt]
        absent = [c for c in need if c not in cols]
        if fmt == "prompt" and absent and any(c in cols for c in ("messages", "instruction")):
            absent = []  # GRPO builds the prompt from messages / alpaca rows
        if absent:
            raise LorakitError(f"data.format is {fmt}, but {source.name} has no {', '.join(absent)} column "
                               f"(columns: {', '.join(cols) or 'none'})", field="data.format",
                               hint="rename columns with data.columns (e.g. {conversations: messages}) "
                                    "or set data.format: auto")
        return fmt, source
    if isinstance(source.rows, list):
        kinds: dict[str | None, list[int]] = {}
        for i, row in enumerate(source.rows):
            kinds.setdefault(_row_format(_present(row), method), []).append(i)
    else:
        kinds = {_row_format(set(cols), method): [0]}
    if None in kinds:
        i = kinds[None][0]
        found = sorted(_present(source.rows[i])) if isinstance(source.rows, list) else cols
        raise LorakitError(f"{source.where(i)}: cannot tell the data format from the columns "
                           f"(found: {', '.join(found) or 'none'}; expected: {EXPECTED})", field="data.format",
                           hint="rename columns with data.columns, e.g. {conversations: messages}, "
                                "or name data.format")
    if len(kinds) > 1:
        parts = [f"{len(ix)} row(s) look like {k} (first: {source.where(ix[0])})" for k, ix in kinds.items()]
        raise LorakitError(f"mixed formats in {source.name}: " + "; ".join(parts), field="data.format",
                           hint="give every row the same columns (one format per dataset)")
    return next(iter(kinds)), source


def _content(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):  # [{type: text, text: ...}]
        texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    if value is None:
        raise RowError(f"{what} has no content")
    raise RowError(f"{what} content must be a string (got {type(value).__name__})")


def normalize_messages(value: Any, what: str = "messages") -> list[dict]:
    """A validated list of {role, content} (ShareGPT from/value and role names accepted)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells hold JSON text
        except json.JSONDecodeError:
            raise RowError(f"{what} must be a list of {{role, content}} objects (got a string)") from None
    if value is None:
        raise RowError(f"{what} is missing")
    if not isinstance(value, list):
        raise RowError(f"{what} must be a list of {{role, content}} objects (got {type(value).__name__})")
    if not value:
        raise RowError(f"{what} is an empty list")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowError(f"{what}[{j}] must be an object with role and content (got {type(m).__name__})")
        role = m.get("role") if m.get("role") is not None else m.get("from")
        if not isinstance(role, str) or not role:
            raise RowError(f"{what}[{j}] has no role (keys: {', '.join(map(str, m)) or 'none'})")
        mapped = ROLE_ALIASES.get(role.lower())
        if mapped is None:
            raise RowError(f"{what}[{j}] has unknown role {role!r} (use system, user, assistant or tool)")
        raw = m.get("content") if m.get("content") is not None else m.get("value")
        msg = {k: v for k, v in m.items() if k not in ("role", "from", "content", "value") and v is not None}
        msg.update(role=mapped, content=_content(raw, f"{what}[{j}]"))
        out.append(msg)
    return out


def string_field(row: dict, key: str) -> str:
    """The string in column `key`."""
    v = row.get(key)
    if v is None:
        raise RowError(f"missing {key!r}")
    if not isinstance(v, str):
        raise RowError(f"{key!r} must be a string (got {type(v).__name__})")
    return v


def alpaca_user(row: dict) -> str:
    """An alpaca row's user turn: the instruction, then the input if any."""
    instruction, inp = string_field(row, "instruction"), row.get("input")
    if inp is not None and not isinstance(inp, str):
        raise RowError(f"'input' must be a string (got {type(inp).__name__})")
    return instruction + (f"\n\n{inp}" if inp and inp.strip() else "")


def alpaca_prompt_text(row: dict) -> str:
    """An alpaca row's prompt as plain text, for tokenizers without a chat template."""
    inp = row.get("input")
    block = f"### Input:\n{inp}\n\n" if isinstance(inp, str) and inp.strip() else ""
    return ALPACA_PROMPT.format(instruction=string_field(row, "instruction"), input_block=block)


def prompt_value(row: dict) -> list[dict] | str:
    """The prompt column: a string, or chat messages."""
    v = row.get("prompt")
    if isinstance(v, str):
        return v
    if v is None:
        raise RowError("missing 'prompt'")
    return normalize_messages(v, "prompt")


def completion_text(v: Any) -> str:
    """A completion as text (the assistant turns' content when it is messages)."""
    if isinstance(v, str):
        return v
    msgs = normalize_messages(v, "completion")
    return "".join(m["content"] for m in msgs if m["role"] == "assistant")


def eval_example(row: dict, fmt: str, has_template: bool) -> dict | None:
    """{"prompt", "reference"} for generation metrics, or None when the row has no answer."""
    if fmt == "messages":
        msgs = normalize_messages(row.get("messages"))
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if not last:
            return None
        return {"prompt": msgs[:last], "reference": msgs[last]["content"]}
    if fmt == "alpaca":
        prompt = [{"role": "user", "content": alpaca_user(row)}] if has_template else alpaca_prompt_text(row)
        return {"prompt": prompt, "reference": string_field(row, "output")}
    if fmt in ("prompt_completion", "prompt"):
        prompt = prompt_value(row)
        ref = row.get("completion")
        if ref is None:
            ref = next((row[c] for c in ANSWER_COLUMNS if row.get(c) is not None), None)
        if ref is None:
            return None
        return {"prompt": prompt, "reference": completion_text(ref) if isinstance(ref, (str, list)) else str(ref)}
    return None


def grpo_row(row: dict, fmt: str, has_template: bool) -> dict:
    """A row with a `prompt` (messages or text) and every other column; an `answer` where one is implied."""
    out = dict(row)
    if fmt in ("prompt", "prompt_completion") and row.get("prompt") is not None:
        out["prompt"] = prompt_value(row)
        if fmt == "prompt_completion" and "answer" not in row:
            out["answer"] = completion_text(row.get("completion"))
        return out
    if fmt == "messages" or (fmt == "prompt" and row.get("messages") is not None):
        msgs = normalize_messages(row.get("messages"))
        out.pop("messages", None)
        if msgs[-1]["role"] == "assistant":
            if len(msgs) == 1:
                raise RowError("messages hold only an assistant turn: no prompt")
            if out.get("answer") is None:
                out["answer"] = msgs[-1]["content"]
            msgs = msgs[:-1]
        out["prompt"] = msgs
        return out
    if fmt == "alpaca" or (fmt == "prompt" and row.get("instruction") is not None):
        user = alpaca_user(row)
        out["prompt"] = [{"role": "user", "content": user}] if has_template else alpaca_prompt_text(row)
        for k in ("instruction", "input"):
            out.pop(k, None)
        if out.get("answer") is None and row.get("output") is not None:
            out["answer"] = out.pop("output")
        return out
    if fmt == "text":
        raise RowError("plain text rows have no prompt; GRPO needs a prompt (or messages) column")
    raise RowError("missing 'prompt'")


__all__ = ["ANSWER_COLUMNS", "RowError", "alpaca_prompt_text", "alpaca_user", "completion_text", "detect_format",
           "eval_example", "grpo_row", "normalize_messages", "prompt_value", "rename_columns", "string_field"]
