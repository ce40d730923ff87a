"""Where training rows come from: a local file, a directory (the files of one split), a glob, or a hub dataset.

`.jsonl`, `.json`, `.csv` and `.parquet` files are read into lists of dicts that remember each row's `file:line`
so later errors can point at it; a hub dataset stays a `datasets.Dataset`. Every unreadable, empty or malformed
file becomes one `LorakitError` naming the file (and line) and the fix.
"""

from __future__ import annotations

import csv
import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, Features, Value
from datasets.exceptions import DatasetNotFoundError

from lorakit.errors import EXIT_RUNTIME, LorakitError
from lorakit.recipe.loader import recipe_dir, resolve_path

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_GLOB = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_EVAL_NAMES = ("eval", "validation", "valid", "val", "test", "dev")


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

    def rows_at(self, idx: list[int]):
        """(index, row) for each index in `idx`."""
        for i in idx:
            yield i, self.rows[i]


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
    pattern = Path(spec).expanduser()
    for base in ([Path()] if pattern.is_absolute() else [Path.cwd(), recipe_dir(recipe)]):
        found = sorted(Path(p) for p in glob.glob(str(base / pattern), recursive=True))
        found = [p for p in found if p.is_file() and p.suffix.lower() in SUFFIXES]
        if found:
            return found
    return []


def load_source(recipe, spec: str, *, split: str = "train", fld: str = "data.path") -> Source:
    """Rows from a local file, a directory (files of `split`), a glob, or a hub dataset id.

    Args:
        recipe: the recipe; relative paths are looked up from the working directory, then beside it.
        spec: a file, directory, glob or hub dataset id.
        split: which files of a directory (by file or folder name) or which hub split.
        fld: the recipe field that errors name (data.path or data.eval).

    Returns:
        A Source: the rows, a name for messages, and each local row's file:line.
    """
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


def eval_source(recipe, spec: str) -> Source:
    """The rows data.eval names when it is not a fraction: an eval file, or a split of data.path."""
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


__all__ = ["SUFFIXES", "Source", "eval_source", "load_source"]
