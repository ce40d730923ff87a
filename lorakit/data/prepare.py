"""Training rows: load (local files or hub datasets), detect the format, tokenize and mask.

`prepare_sft` turns the recipe's data into pre-tokenized rows (`input_ids`, `completion_mask`) so that
masking (loss on assistant/completion tokens only) and truncation are ours, counted and testable; TRL's
SFTTrainer builds its labels from `completion_mask`. `prepare_grpo` gives TRL's GRPOTrainer a `prompt`
column plus every other column (rewards receive them as keyword lists).

Every user-fixable problem (missing or empty file, bad JSON line, wrong columns or row shapes, all rows
too long, mixed formats) becomes one `LorakitError` naming the file, line or row, and the fix.
"""

from __future__ import annotations

import glob
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import EXIT_RUNTIME, LorakitError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
EXPECTED = ("messages (chat: a list of {role, content}); instruction + output (+ input) [alpaca]; "
            "prompt + completion; text; prompt alone (GRPO)")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                "bot": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                "function": "tool", "observation": "tool", "ipython": "ipython"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
ANSWER_COLUMNS = ("answer", "reference", "solution", "completion", "output")
_GLOB = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_EVAL_NAMES = ("eval", "validation", "valid", "val", "test", "dev")


@dataclass
class Prepared:
    """What the trainers get: datasets ready for TRL, held-out generation examples, and a report."""

    train: Any  # datasets.Dataset: input_ids + completion_mask (SFT) or prompt + other columns (GRPO)
    eval: Any = None  # same columns, or None
    eval_examples: list[dict] = field(default_factory=list)  # {"prompt": messages | str, "reference": str}
    report: dict = field(default_factory=dict)


class _RowError(Exception):
    """A problem with one row; the caller adds where the row is."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass
class Source:
    """Rows from one place: a list of dicts (local files) or a datasets.Dataset (hub)."""

    rows: Any
    name: str  # what error messages call it
    locations: list[str] | None = None  # per row "file:line" when known

    def where(self, i: int) -> str:
        if self.locations is not None and i < len(self.locations):
            return self.locations[i]
        return f"{self.name} row {i + 1}"

    @property
    def columns(self) -> list[str]:
        if isinstance(self.rows, list):
            seen: dict[str, None] = {}
            for r in self.rows:
                seen.update(dict.fromkeys(r))
            return list(seen)
        return list(self.rows.column_names)

    def __len__(self) -> int:
        return len(self.rows)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise LorakitError(f"cannot read {path}: permission denied", field="data.path",
                           hint="check the file's permissions") from None
    except OSError as e:
        raise LorakitError(f"cannot read {path}: {e.strerror or e}", field="data.path") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise LorakitError(f"{path}:{line}: not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r})",
                           field="data.path", hint="save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
    if not text.strip():
        raise LorakitError(f"{path} is empty: no rows to train on", field="data.path",
                           hint="write one JSON object per line, e.g. {\"messages\": [...]}")
    return text


def _parse_jsonl(path: Path, text: str) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorakitError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})", field="data.path",
                               hint="each line of a .jsonl file must be one complete JSON object") from None
        if not isinstance(row, dict):
            raise LorakitError(f"{path}:{n}: a row must be a JSON object (got {type(row).__name__})",
                               field="data.path", hint='write rows like {"messages": [...]} or {"text": "..."}')
        rows.append(row)
        where.append(f"{path}:{n}")
    return rows, where


def _parse_json(path: Path, text: str) -> tuple[list[dict], list[str] | None]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name
            return _parse_jsonl(path, text)
        raise LorakitError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})",
                           field="data.path") from None
    if isinstance(doc, dict):
        lists = {k: v for k, v in doc.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(x, dict) for x in next(iter(lists.values()))):
            doc = next(iter(lists.values()))  # {"data": [rows]}
        elif lists and len(lists) == len(doc) and len({len(v) for v in lists.values()}) == 1:
            doc = [dict(zip(lists, vals)) for vals in zip(*lists.values())]  # {"col": [values]}
    if not isinstance(doc, list):
        raise LorakitError(f"{path}: expected a JSON list of row objects (got {type(doc).__name__})",
                           field="data.path", hint="use a list of objects, or JSON Lines (.jsonl)")
    for i, row in enumerate(doc):
        if not isinstance(row, dict):
            raise LorakitError(f"{path} row {i + 1}: a row must be a JSON object (got {type(row).__name__})",
                               field="data.path")
    if not doc:
        raise LorakitError(f"{path} holds no rows", field="data.path")
    return doc, None


def _read_tabular(path: Path, kind: str) -> list[dict]:
    import csv

    from datasets import Dataset, Features, Value

    if kind == "csv":
        text = _read_text(path)  # UTF-8 and emptiness, with a line number
        header = next(csv.reader(text.splitlines()[:1]), [])
        if len([x for x in text.splitlines() if x.strip()]) < 2:
            raise LorakitError(f"{path} holds a header but no rows", field="data.path")
    elif path.stat().st_size == 0:
        raise LorakitError(f"{path} is empty: no rows to train on", field="data.path")
    try:
        if kind == "csv":  # every cell is text ("5" stays "5"); only empty cells are missing
            features = Features({c: Value("string") for c in header}) if len(set(header)) == len(header) else None
            ds = Dataset.from_csv(str(path), keep_in_memory=True, features=features, keep_default_na=False,
                                  na_values=[""])
        else:
            ds = Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        while (e.__cause__ or e.__context__) is not None:  # the reader's own words, not the builder's
            e = e.__cause__ or e.__context__
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise LorakitError(f"cannot read {path} as {kind.upper()}: {first}", field="data.path",
                           hint=f"check that the file is a valid {kind.upper()} file") from None
    if len(ds) == 0:
        raise LorakitError(f"{path} holds no rows", field="data.path")
    return ds.to_list()


def _read_file(path: Path) -> Source:
    kind = path.suffix.lower().lstrip(".")
    if kind == "jsonl":
        rows, where = _parse_jsonl(path, _read_text(path))
    elif kind == "json":
        rows, where = _parse_json(path, _read_text(path))
    elif kind in ("csv", "parquet"):
        rows, where = _read_tabular(path, kind), None
        if kind == "csv":
            where = [f"{path}:{i + 2}" for i in range(len(rows))]  # line 1 is the header
    else:
        raise LorakitError(f"{path}: unsupported file type {path.suffix or '(none)'!r}", field="data.path",
                           hint=f"use one of {', '.join(SUFFIXES)}")
    if not rows:
        raise LorakitError(f"{path} holds no rows (only blank lines)", field="data.path")
    return Source(rows, str(path), where)


def _split_files(files: list[Path], split: str) -> list[Path]:
    """The files of a directory that belong to `split` (by file or folder name)."""
    def names(f: Path) -> list[str]:
        return [f.stem.lower(), f.parent.name.lower()]

    def matches(f: Path, s: str) -> bool:
        return any(n == s or n.startswith((s + "-", s + "_", s + ".")) for n in names(f))

    chosen = [f for f in files if matches(f, split.lower())]
    if chosen:
        return chosen
    if split == "train":  # a folder without split names: every file but obvious eval files
        return [f for f in files if not any(matches(f, e) for e in _EVAL_NAMES)] or files
    return []


def _not_found(spec: str, path: Path, fld: str) -> LorakitError:
    hint = "relative paths are looked up from the working directory, then beside the recipe"
    for folder, script in (("quickstart", "make_quickstart_data.py"), ("grpo-arithmetic", "make_grpo_data.py")):
        if f"data/{folder}" in spec.replace("\\", "/"):
            hint = f"generate it first: python scripts/{script}"
    return LorakitError(f"data file not found: {path}", field=fld, hint=hint)


def _combine(sources: list[Source], name: str) -> Source:
    if len(sources) == 1:
        return sources[0]
    rows, where = [], []
    for s in sources:
        rows += s.rows
        where += [s.where(i) for i in range(len(s.rows))]
    return Source(rows, name, where)


def _load_hub(spec: str, split: str, fld: str) -> Source:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        ds = datasets.load_dataset(spec, split=split)
    except DatasetNotFoundError:
        raise LorakitError(f"{fld} {spec!r} is not a local file or directory, and the hub has no dataset of that "
                           "name (or it is gated: set HF_TOKEN)", field=fld,
                           hint=f"give a local {'/'.join(SUFFIXES)} file, a directory of them, or a hub dataset id") \
            from None
    except (ConnectionError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise LorakitError(f"{fld} {spec!r} is not a local file or directory, and the Hugging Face Hub can't be "
                           f"reached to fetch it as a dataset ({reason})", field=fld, exit_code=EXIT_RUNTIME,
                           hint="check the path if you meant a local file; for a hub dataset connect to the network, "
                                "or download it once and set HF_DATASETS_OFFLINE=1 to use the local cache") from None
    except ValueError as e:
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        split_field = "data.split" if fld == "data.path" else fld
        raise LorakitError(f"hub dataset {spec!r}: {msg}", field=split_field if "split" in msg.lower() else fld) \
            from None
    except Exception as e:  # noqa: BLE001 - the hub loader raises many kinds
        msg = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise LorakitError(f"cannot load hub dataset {spec!r}: {msg}", field=fld, exit_code=EXIT_RUNTIME) from None
    if isinstance(ds, datasets.DatasetDict):  # pragma: no cover - split= always gives a Dataset
        ds = ds[split]
    if len(ds) == 0:
        raise LorakitError(f"hub dataset {spec!r} split {split!r} has no rows", field=fld)
    return Source(ds, f"{spec} [{split}]")


def _glob(recipe, spec: str) -> list[Path]:
    from lorakit.recipe.schema import recipe_dir

    pattern = Path(spec).expanduser()
    for base in ([Path()] if pattern.is_absolute() else [Path.cwd(), recipe_dir(recipe)]):
        found = sorted(Path(p) for p in glob.glob(str(base / pattern), recursive=True))
        found = [p for p in found if p.is_file() and p.suffix.lower() in SUFFIXES]
        if found:
            return found
    return []


def load_source(recipe, spec: str, *, split: str = "train", fld: str = "data.path") -> Source:
    """Rows from a local file, a directory (files of `split`), a glob, or a hub dataset id."""
    from lorakit.recipe.schema import resolve_path

    spec = str(spec).strip()
    if not spec:
        raise LorakitError("no data path given", field=fld)
    if _GLOB.search(spec):
        files = _glob(recipe, spec)
        if not files:
            raise LorakitError(f"no {'/'.join(SUFFIXES)} files match {spec!r}", field=fld)
        return _combine([_read_file(f) for f in files], spec)
    path = resolve_path(recipe, spec)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise LorakitError(f"directory {path} holds no {', '.join(SUFFIXES)} files", field=fld)
        chosen = _split_files(files, split)
        if not chosen:
            raise LorakitError(f"directory {path} has no files for split {split!r} "
                               f"(files: {', '.join(f.name for f in files[:10])})", field=fld,
                               hint=f"name the file {split}.jsonl, or point {fld} at the file")
        return _combine([_read_file(f) for f in chosen], str(path))
    if path.is_file():
        return _read_file(path)
    if path.exists():
        raise LorakitError(f"{path} is not a regular file", field=fld)
    looks_local = (Path(spec).suffix.lower() in SUFFIXES or spec.startswith((".", "/", "~")) or "\\" in spec
                   or spec.count("/") > 1 or not _HUB_ID.match(spec))
    if looks_local:
        raise _not_found(spec, path, fld)
    return _load_hub(spec, split, fld)


# ----------------------------------------------------------------------------------------------
# Columns and formats
# ----------------------------------------------------------------------------------------------


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
    """The format of `source` (auto-detected or checked) and the source (conversations -> messages)."""
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
        raise _RowError(f"{what} has no content")
    raise _RowError(f"{what} content must be a string (got {type(value).__name__})")


def normalize_messages(value: Any, what: str = "messages") -> list[dict]:
    """A validated list of {role, content} (ShareGPT from/value and role names accepted)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)  # CSV cells hold JSON text
        except json.JSONDecodeError:
            raise _RowError(f"{what} must be a list of {{role, content}} objects (got a string)") from None
    if value is None:
        raise _RowError(f"{what} is missing")
    if not isinstance(value, list):
        raise _RowError(f"{what} must be a list of {{role, content}} objects (got {type(value).__name__})")
    if not value:
        raise _RowError(f"{what} is an empty list")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise _RowError(f"{what}[{j}] must be an object with role and content (got {type(m).__name__})")
        role = m.get("role") if m.get("role") is not None else m.get("from")
        if not isinstance(role, str) or not role:
            raise _RowError(f"{what}[{j}] has no role (keys: {', '.join(map(str, m)) or 'none'})")
        mapped = ROLE_ALIASES.get(role.lower())
        if mapped is None:
            raise _RowError(f"{what}[{j}] has unknown role {role!r} (use system, user, assistant or tool)")
        raw = m.get("content") if m.get("content") is not None else m.get("value")
        msg = {k: v for k, v in m.items() if k not in ("role", "from", "content", "value") and v is not None}
        msg.update(role=mapped, content=_content(raw, f"{what}[{j}]"))
        out.append(msg)
    return out


def _text(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        raise _RowError(f"missing {key!r}")
    if not isinstance(v, str):
        raise _RowError(f"{key!r} must be a string (got {type(v).__name__})")
    return v


def _alpaca_user(row: dict) -> str:
    instruction, inp = _text(row, "instruction"), row.get("input")
    if inp is not None and not isinstance(inp, str):
        raise _RowError(f"'input' must be a string (got {type(inp).__name__})")
    return instruction + (f"\n\n{inp}" if inp and inp.strip() else "")


def _alpaca_prompt_text(row: dict) -> str:
    inp = row.get("input")
    block = f"### Input:\n{inp}\n\n" if isinstance(inp, str) and inp.strip() else ""
    return ALPACA_PROMPT.format(instruction=_text(row, "instruction"), input_block=block)


def _prompt_value(row: dict) -> list[dict] | str:
    v = row.get("prompt")
    if isinstance(v, str):
        return v
    if v is None:
        raise _RowError("missing 'prompt'")
    return normalize_messages(v, "prompt")


def _completion_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    msgs = normalize_messages(v, "completion")
    return "".join(m["content"] for m in msgs if m["role"] == "assistant")


# ----------------------------------------------------------------------------------------------
# Tokenizing and masking
# ----------------------------------------------------------------------------------------------


class Encoder:
    """Rows -> (input_ids, completion_mask) for one tokenizer."""

    def __init__(self, tokenizer, completion_only: bool = True):
        self.tok = tokenizer
        self.completion_only = completion_only
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(t, "special", False):
                special.add(int(i))
        self.special = special
        self.special_strings = sorted({tokenizer.convert_ids_to_tokens(i) for i in special} - {None}, key=len,
                                      reverse=True)

    # -- helpers ---------------------------------------------------------------------------------
    def ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def render(self, messages: list[dict], gen: bool = False) -> str:
        if not self.has_template:
            raise _RowError("the tokenizer has no chat template, so chat rows cannot be rendered "
                            "(set model.chat_template in the recipe)")
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - jinja raises on roles the template refuses
            raise _RowError(f"the chat template rejects this conversation: {str(e).splitlines()[0][:200]}") \
                from None

    def _trim(self, ids: list[int], start: int, end: int) -> int:
        """End of a turn's span without the whitespace the template writes after the end-of-turn token."""
        while end - 1 > start and ids[end - 1] not in self.special and not self.tok.decode([ids[end - 1]]).strip():
            end -= 1
        return end

    # -- chat ------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], first_target: int = 0) -> tuple[list[int], list[int]]:
        full = self.render(messages)
        ids = self.ids(full)
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_target]
        spans = self._token_spans(messages, targets, ids)
        if spans is None:
            spans = self._char_spans(messages, targets, full, ids)
        mask = [0] * len(ids)
        for s, e in spans:
            mask[s:e] = [1] * (e - s)
        if spans and self.eos is not None:
            s, e = spans[-1]
            if ids[e - 1] not in self.special:  # the template ends turns with no special token: add EOS
                ids.insert(e, self.eos)
                mask.insert(e, 1)
        if not self.completion_only:
            mask = [1] * len(ids)
        return ids, mask

    def _token_spans(self, messages, targets, ids) -> list[tuple[int, int]] | None:
        """Spans by rendering prefixes: [tokens of messages[:i] + generation prompt, tokens of messages[:i+1])."""
        spans = []
        for i in targets:
            try:
                before = self.ids(self.render(messages[:i], gen=True))
            except _RowError:
                return None
            upto = self.ids(self.render(messages[: i + 1]))
            if ids[: len(before)] != before or ids[: len(upto)] != upto or len(upto) <= len(before):
                return None
            if not self.tok.decode(ids[len(before):len(upto)]).lstrip().startswith(
                    messages[i]["content"].strip()[:16].lstrip()):
                return None  # the template ignores add_generation_prompt: the header would be in the span
            spans.append((len(before), self._trim(ids, len(before), len(upto))))
        return spans

    def _char_spans(self, messages, targets, full: str, ids: list[int]) -> list[tuple[int, int]]:
        """Fallback: find each assistant content in the rendered text, map characters to tokens."""
        try:
            offsets = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except Exception:  # noqa: BLE001 - slow tokenizers have no offsets
            raise _RowError("cannot locate the assistant turns in the chat template's output "
                            "(use a fast tokenizer or set data.completion_only: false)") from None
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            content = m["content"]
            at = full.find(content, cursor) if content else -1
            if at < 0:
                if i in targets:
                    raise _RowError(f"cannot locate assistant turn {i} in the chat template's output "
                                    "(set data.completion_only: false to train on every token)")
                continue
            cursor = at + len(content)
            if i not in targets:
                continue
            end = cursor
            rest = full[end:]
            stripped = rest.lstrip(" ")
            for sp in self.special_strings:
                if sp and stripped.startswith(sp):
                    end += len(rest) - len(stripped) + len(sp)
                    break
            toks = [k for k, (a, b) in enumerate(offsets) if a < end and b > at]
            if toks:
                spans.append((toks[0], toks[-1] + 1))
        return spans

    # -- other formats ---------------------------------------------------------------------------
    def prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        p = self.ids(prompt, special=True)
        c = self.ids(completion)
        if self.eos is not None and (not c or c[-1] != self.eos):
            c.append(self.eos)
        mask = [0] * len(p) + [1] * len(c) if self.completion_only else [1] * (len(p) + len(c))
        return p + c, mask

    def text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.ids(text, special=True)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return ids, [1] * len(ids)

    def encode(self, row: dict, fmt: str) -> tuple[list[int], list[int]]:
        if fmt == "messages":
            return self.chat(normalize_messages(row.get("messages")))
        if fmt == "alpaca":
            output = _text(row, "output")
            if self.has_template:
                return self.chat([{"role": "user", "content": _alpaca_user(row)},
                                  {"role": "assistant", "content": output}])
            return self.prompt_completion(_alpaca_prompt_text(row), output)
        if fmt == "prompt_completion":
            prompt, completion = _prompt_value(row), row.get("completion")
            if completion is None:
                raise _RowError("missing 'completion'")
            if isinstance(prompt, list):
                if isinstance(completion, str):
                    completion = [{"role": "assistant", "content": completion}]
                else:
                    completion = normalize_messages(completion, "completion")
                return self.chat(prompt + completion, first_target=len(prompt))
            if not isinstance(completion, str):
                raise _RowError("the prompt is a string, so the completion must be a string too "
                                f"(got {type(completion).__name__})")
            return self.prompt_completion(prompt, completion)
        if fmt == "text":
            return self.text(_text(row, "text"))
        raise _RowError("format prompt has no completion to learn from; it is for method: grpo "
                        "(for SFT use messages, alpaca, prompt_completion or text)")


def eval_example(row: dict, fmt: str, has_template: bool) -> dict | None:
    """{"prompt", "reference"} for generation metrics, or None when the row has no answer."""
    if fmt == "messages":
        msgs = normalize_messages(row.get("messages"))
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if not last:
            return None
        return {"prompt": msgs[:last], "reference": msgs[last]["content"]}
    if fmt == "alpaca":
        prompt = [{"role": "user", "content": _alpaca_user(row)}] if has_template else _alpaca_prompt_text(row)
        return {"prompt": prompt, "reference": _text(row, "output")}
    if fmt in ("prompt_completion", "prompt"):
        prompt = _prompt_value(row)
        ref = row.get("completion")
        if ref is None:
            ref = next((row[c] for c in ANSWER_COLUMNS if row.get(c) is not None), None)
        if ref is None:
            return None
        return {"prompt": prompt, "reference": _completion_text(ref) if isinstance(ref, (str, list)) else str(ref)}
    return None


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def _rows(source: Source, idx: list[int]):
    for i in idx:
        yield i, source.rows[i]


def _sources(recipe, method: str) -> tuple[str, Source, list[int], Source | None, list[int]]:
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
        ev = _eval_source(recipe, d.eval.strip())
        ev = rename_columns(ev, d.columns)
        _, ev = detect_format(ev, fmt, method)
        ev_idx = list(range(len(ev)))
    if d.max_rows is not None:
        train_idx = train_idx[: d.max_rows]
    return fmt, train, train_idx, ev, ev_idx


def _eval_source(recipe, spec: str) -> Source:
    from lorakit.recipe.schema import resolve_path

    d = recipe.data
    if _GLOB.search(spec) or resolve_path(recipe, spec).exists() or Path(spec).suffix.lower() in SUFFIXES:
        return load_source(recipe, spec, split="train", fld="data.eval")
    train_path = resolve_path(recipe, d.path)
    if train_path.is_dir():
        return load_source(recipe, d.path, split=spec, fld="data.eval")
    if train_path.exists() or _GLOB.search(d.path):
        raise LorakitError(f"data.eval {spec!r} is not a file, and data.path is a single file without splits",
                           field="data.eval", hint="give a fraction (e.g. 0.1) or an eval file path")
    return load_source(recipe, d.path, split=spec, fld="data.eval")


# ----------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------


def _encode_all(source: Source, idx: list[int], fmt: str, enc: Encoder, max_length: int, too_long: str) -> dict:
    ids_out, mask_out, kept = [], [], []
    dropped = {"too_long": 0, "completion_cut": 0, "no_target": 0}
    truncated = 0
    for i, row in _rows(source, idx):
        try:
            ids, mask = enc.encode(row, fmt)
        except _RowError as e:
            raise LorakitError(f"{source.where(i)}: {e}", field="data.path",
                               hint="fix or remove the row (every row needs the same shape)") from None
        if not any(mask[1:]):  # the first token is never a label (each token predicts the next)
            dropped["no_target"] += 1
            continue
        if len(ids) > max_length:
            if too_long == "drop":
                dropped["too_long"] += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask[1:]):
                dropped["completion_cut"] += 1
                continue
            truncated += 1
        ids_out.append(ids)
        mask_out.append(mask)
        kept.append(i)
    return {"input_ids": ids_out, "completion_mask": mask_out, "kept": kept, "truncated": truncated,
            "dropped": dropped, "seen": len(idx)}


def _all_dropped(res: dict, source: Source, max_length: int, too_long: str, fld: str) -> LorakitError:
    d = res["dropped"]
    why = []
    if d["too_long"]:
        why.append(f"{d['too_long']} longer than max_length={max_length} (too_long: drop)")
    if d["completion_cut"]:
        why.append(f"{d['completion_cut']} whose completion starts after token {max_length} (truncated away)")
    if d["no_target"]:
        why.append(f"{d['no_target']} with no assistant/completion tokens to learn")
    hint = (f"raise data.max_length (now {max_length})" + (" or set data.too_long: truncate" if too_long == "drop"
                                                           else "")) if d["too_long"] or d["completion_cut"] \
        else "add assistant turns / completions, or set data.completion_only: false"
    return LorakitError(f"every one of the {res['seen']} rows of {source.name} was dropped: " + "; ".join(why),
                        field=fld, hint=hint)


def prepare_sft(recipe, tokenizer) -> Prepared:
    """Tokenized, masked train (and eval) rows for TRL's SFTTrainer, held-out examples, and a report."""
    from datasets import Dataset

    d = recipe.data
    fmt, train, train_idx, ev, ev_idx = _sources(recipe, "sft")
    if fmt == "prompt":
        raise LorakitError(f"{train.name} holds prompts only (format prompt): SFT needs a completion to learn; "
                           "format prompt is for method: grpo", field="data.format",
                           hint="add a completion column (prompt + completion), or use method: grpo")
    enc = Encoder(tokenizer, completion_only=d.completion_only)
    res = _encode_all(train, train_idx, fmt, enc, d.max_length, d.too_long)
    if not res["input_ids"]:  # every label would be -100: the data, not the length, when no row was too long
        cut = res["dropped"]["too_long"] or res["dropped"]["completion_cut"]
        raise _all_dropped(res, train, d.max_length, d.too_long, "data.max_length" if cut else "data.path")
    train_ds = Dataset.from_dict({"input_ids": res["input_ids"], "completion_mask": res["completion_mask"]})
    eval_ds, examples, ev_res = None, [], None
    if ev is not None:
        ev_res = _encode_all(ev, ev_idx, fmt, enc, d.max_length, d.too_long)
        if ev_res["input_ids"]:
            eval_ds = Dataset.from_dict({"input_ids": ev_res["input_ids"],
                                         "completion_mask": ev_res["completion_mask"]})
        for _, row in _rows(ev, ev_res["kept"]):
            try:
                ex = eval_example(row, fmt, enc.has_template)
            except _RowError:
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


# ----------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------


def grpo_row(row: dict, fmt: str, has_template: bool) -> dict:
    """A row with a `prompt` (messages or text) and every other column; an `answer` where one is implied."""
    out = dict(row)
    if fmt in ("prompt", "prompt_completion") and row.get("prompt") is not None:
        out["prompt"] = _prompt_value(row)
        if fmt == "prompt_completion" and "answer" not in row:
            out["answer"] = _completion_text(row.get("completion"))
        return out
    if fmt == "messages" or (fmt == "prompt" and row.get("messages") is not None):
        msgs = normalize_messages(row.get("messages"))
        out.pop("messages", None)
        if msgs[-1]["role"] == "assistant":
            if len(msgs) == 1:
                raise _RowError("messages hold only an assistant turn: no prompt")
            if out.get("answer") is None:
                out["answer"] = msgs[-1]["content"]
            msgs = msgs[:-1]
        out["prompt"] = msgs
        return out
    if fmt == "alpaca" or (fmt == "prompt" and row.get("instruction") is not None):
        user = _alpaca_user(row)
        out["prompt"] = [{"role": "user", "content": user}] if has_template else _alpaca_prompt_text(row)
        for k in ("instruction", "input"):
            out.pop(k, None)
        if out.get("answer") is None and row.get("output") is not None:
            out["answer"] = out.pop("output")
        return out
    if fmt == "text":
        raise _RowError("plain text rows have no prompt; GRPO needs a prompt (or messages) column")
    raise _RowError("missing 'prompt'")


def _grpo_dataset(source: Source, idx: list[int], fmt: str, has_template: bool):
    from datasets import Dataset

    rows = []
    for i, row in _rows(source, idx):
        try:
            rows.append(grpo_row(row, fmt, has_template))
        except _RowError as e:
            raise LorakitError(f"{source.where(i)}: {e}", field="data.path") from None
    try:
        return Dataset.from_list(rows), rows
    except Exception as e:  # noqa: BLE001 - pyarrow refuses columns of mixed types
        raise LorakitError(f"{source.name}: the columns do not have one type across rows "
                           f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})", field="data.path",
                           hint="give each column the same type in every row (e.g. answers all strings)") from None


def prepare_grpo(recipe, tokenizer) -> Prepared:
    """A `prompt` column (chat messages or text) plus the other columns, for TRL's GRPOTrainer."""
    fmt, train, train_idx, ev, ev_idx = _sources(recipe, "grpo")
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


__all__ = [
    "Encoder",
    "Prepared",
    "Source",
    "detect_format",
    "eval_example",
    "grpo_row",
    "load_source",
    "normalize_messages",
    "prepare_grpo",
    "prepare_sft",
    "rename_columns",
]
