"""Reward functions for GRPO and task metrics for evaluation: built-ins, user functions, a safety guard.

Every reward (and metric) has TRL's signature `fn(completions, **kwargs) -> list[float | None]`.
A completion is a string or a list of chat messages (`[{"role": "assistant", "content": ...}]`);
the dataset's other columns arrive as keyword lists (one value per completion), e.g. `answer=[...]`.
During evaluation, metrics get `reference=[...]` instead.

`load_reward(spec, base_dir)` turns a recipe's `RewardSpec` into a callable: a built-in name, a
`package.module:function`, or a `path/to/file.py:function` (relative to the recipe's directory; only
that file is loaded). The returned `Reward` binds `spec.args`, keeps a readable `__name__` (TRL logs
`rewards/<name>/mean`) and checks every result: a reward that raises, returns the wrong number of
values, or a value that is not a finite number fails the run (exit 1) naming the function and showing
the sample. `None` is allowed and means "not applicable to this sample" (TRL averages it out; a
completion where every reward is None gets zero advantage).

The total reward of a completion is `sum(weight_i * r_i)` over the rewards that are not None — TRL's
GRPOConfig.reward_weights computes it during training; `combine()` is the same sum for evaluation.
"""

from __future__ import annotations

import builtins  # `length` shadows min/max with its argument names
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import EXIT_INPUT, EXIT_RUNTIME, LorakitError

# ----------------------------------------------------------------------------------------------
# Helpers shared by the built-ins
# ----------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the content of its assistant messages."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for msg in completion:
        if not isinstance(msg, dict):
            parts.append(str(msg))
            continue
        if msg.get("role", "assistant") != "assistant":
            continue
        content = msg.get("content") or ""
        if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
            content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
        parts.append(str(content))
    return "\n".join(parts)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")
_LATEX_FRAC = re.compile(r"^\s*([-+])?\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}\s*$")


def _numbers_in(text: str) -> list[str]:
    return _NUMBER.findall(text)


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces allowed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The answer in a completion: the last `<answer>..</answer>`, else the last `\\boxed{}`, else the last number."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    nums = _numbers_in(text)
    return nums[-1] if nums else None


def to_number(value: Any) -> float | None:
    """A number from an answer string ('1,234', '$5', '3/4', '\\frac{1}{2}', '12%'), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if value is None:
        return None
    s = str(value).strip().strip("$").replace("\\!", "").replace("\\,", "").strip()
    s = s.removeprefix("\\$").removesuffix("\\%").removesuffix("%").strip()
    m = _LATEX_FRAC.match(s) or _FRACTION.match(s)
    if m:
        groups = m.groups()
        sign = -1.0 if len(groups) == 3 and groups[0] == "-" else 1.0
        num, den = (to_number(g) for g in groups[-2:])
        return None if num is None or not den else sign * num / den
    s = s.replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def _normalize(s: Any) -> str:
    return " ".join(str(s).split()).casefold()


def _column(kwargs: dict, column: str, fn: str, n: int) -> list:
    if column not in kwargs:
        given = sorted(k for k in kwargs if k not in _TRL_KWARGS)
        raise KeyError(f"{fn} needs the dataset column {column!r} (columns given: {', '.join(given) or 'none'}); "
                       f"add it to the data or set args.column")
    values = kwargs[column]
    return list(values) if isinstance(values, (list, tuple)) else [values] * n


_TRL_KWARGS = {"prompts", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}

# ----------------------------------------------------------------------------------------------
# Built-in rewards and metrics
# ----------------------------------------------------------------------------------------------


def exact_answer(completions: list, *, column: str = "answer", rel_tol: float = 1e-6, abs_tol: float = 1e-9,
                 **kwargs) -> list[float]:
    """1.0 when the extracted answer equals the `column` value, else 0.0.

    The answer is the last `<answer>..</answer>`, else the last `\\boxed{..}`, else the last number of
    the completion. Numbers compare with `math.isclose(rel_tol, abs_tol)`; other answers compare as
    strings (case and surrounding/inner whitespace ignored).
    """
    refs = _column(kwargs, column, "exact_answer", len(completions))
    out = []
    for completion, ref in zip(completions, refs):
        got = extract_answer(completion_text(completion))
        if got is None:
            out.append(0.0)
            continue
        a, b = to_number(got), to_number(ref)
        if a is not None and b is not None:
            out.append(1.0 if math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol) else 0.0)
        else:
            out.append(1.0 if _normalize(got) == _normalize(ref) else 0.0)
    return out


def format_regex(completions: list, *, pattern: str, match: str = "search", **kwargs) -> list[float]:
    """1.0 when the completion matches `pattern`, else 0.0.

    `match: search` (default) finds the pattern anywhere; `match: fullmatch` needs the whole completion
    (surrounding whitespace stripped) to match. The pattern is compiled with DOTALL (`.` crosses lines);
    use inline flags such as `(?i)` for more.
    """
    rx = _compile(pattern)
    test = rx.fullmatch if match == "fullmatch" else rx.search
    return [1.0 if test(completion_text(c).strip() if match == "fullmatch" else completion_text(c)) else 0.0
            for c in completions]


def length(completions: list, *, target: float | None = None, min: float | None = None,
           max: float | None = None, unit: str = "tokens", tolerance: float | None = None,
           penalty: bool = False, completion_ids: list | None = None, **kwargs) -> list[float]:
    """A reward for completions of the right length, in [0, 1] (or [-1, 0] with `penalty: true`).

    The wanted range is [min, max] (either may be left out) or exactly `target`. Inside it the reward
    is 1; outside it falls linearly with the distance `d` to the range: `1 - min(1, d / tolerance)`,
    where `tolerance` defaults to target, else max, else min. `penalty: true` subtracts 1 (0 inside,
    down to -1), for adding to another reward. `unit`: tokens (the generated token ids, GRPO only),
    words or chars.
    """
    lo, hi = (target, target) if target is not None else (min or 0.0, max if max is not None else math.inf)
    tol = tolerance or target or (max if max is not None else None) or min
    if tol is None or tol <= 0:
        raise ValueError("length needs a target, min or max (and a positive tolerance)")
    if unit == "tokens":
        if completion_ids is None:
            raise ValueError("unit tokens needs the generated token ids (only during GRPO); use unit words or chars")
        sizes = [len(ids) for ids in completion_ids]
    elif unit == "words":
        sizes = [len(completion_text(c).split()) for c in completions]
    else:
        sizes = [len(completion_text(c)) for c in completions]
    out = []
    for n in sizes:
        d = lo - n if n < lo else (n - hi if n > hi else 0.0)
        r = 1.0 - builtins.min(1.0, d / tol)
        out.append(r - 1.0 if penalty else r)
    return out


def _parse_json(text: str) -> tuple[bool, Any]:
    s = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, re.DOTALL)
    if fence:
        s = fence.group(1)
    try:
        return True, json.loads(s)
    except (ValueError, TypeError):
        return False, None


def valid_json(completions: list, *, required_keys: Sequence[str] | None = None, **kwargs) -> list[float]:
    """1.0 when the completion (optionally inside a ```json fence) parses as JSON, else 0.0.

    With `required_keys`, the value must also be an object holding every one of those keys.
    """
    out = []
    for c in completions:
        ok, value = _parse_json(completion_text(c))
        if ok and required_keys:
            ok = isinstance(value, dict) and all(k in value for k in required_keys)
        out.append(1.0 if ok else 0.0)
    return out


def exact_match(completions: list, *, column: str = "reference", **kwargs) -> list[float]:
    """Metric: 1.0 when the completion equals the reference after stripping surrounding whitespace."""
    refs = _column(kwargs, column, "exact_match", len(completions))
    return [1.0 if completion_text(c).strip() == str(r).strip() else 0.0 for c, r in zip(completions, refs)]


def json_match(completions: list, *, column: str = "reference", **kwargs) -> list[float]:
    """Metric: 1.0 when completion and reference both parse as JSON and are equal (key order ignored)."""
    refs = _column(kwargs, column, "json_match", len(completions))
    out = []
    for c, r in zip(completions, refs):
        ok_c, vc = _parse_json(completion_text(c))
        ok_r, vr = (True, r) if isinstance(r, (dict, list)) else _parse_json(str(r))
        out.append(1.0 if ok_c and ok_r and vc == vr else 0.0)
    return out


BUILTINS: dict[str, Callable[..., list]] = {
    "exact_answer": exact_answer,
    "format_regex": format_regex,
    "length": length,
    "valid_json": valid_json,
    "exact_match": exact_match,
    "json_match": json_match,
}


def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.DOTALL)


def _check_builtin_args(name: str, args: dict) -> None:
    """Argument problems a built-in can report before training starts (ValueError with the message)."""
    if name == "format_regex":
        if "pattern" not in args:
            raise ValueError("format_regex needs args.pattern (a regular expression)")
        try:
            _compile(args["pattern"])
        except (re.error, TypeError) as e:
            raise ValueError(f"args.pattern is not a valid regular expression: {e}") from None
        if args.get("match", "search") not in ("search", "fullmatch"):
            raise ValueError(f"args.match must be search or fullmatch (got {args['match']!r})")
    if name == "length":
        if all(args.get(k) is None for k in ("target", "min", "max")):
            raise ValueError("length needs args.target, args.min or args.max")
        if args.get("unit", "tokens") not in ("tokens", "words", "chars"):
            raise ValueError(f"args.unit must be tokens, words or chars (got {args['unit']!r})")


# ----------------------------------------------------------------------------------------------
# The guard: a named, argument-bound, checked reward
# ----------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class Reward:
    """A reward/metric function with its args bound, a display name, and checked results.

    `__name__` is what TRL logs (`rewards/<__name__>/mean`). `last` holds the latest call's
    (prompts, completions, values) for the completion samples in the run's metrics.
    """

    def __init__(self, fn: Callable, name: str, args: dict | None = None, *, source: str | None = None):
        self.fn = fn
        self.__name__ = name
        self.args = dict(args or {})
        self.source = source or name
        self.last: tuple[list, list, list] | None = None

    def __repr__(self) -> str:
        return f"Reward({self.__name__!r}, source={self.source!r}, args={self.args!r})"

    def _sample(self, i: int, completions: list, kwargs: dict) -> str:
        lines = []
        prompts = kwargs.get("prompts")
        if prompts is not None and i < len(prompts):
            lines.append(f"  prompt: {_short(prompts[i])}")
        lines.append(f"  completion: {_short(completions[i]) if i < len(completions) else '(none)'}")
        for key, values in kwargs.items():
            if key in _TRL_KWARGS or not isinstance(values, (list, tuple)) or i >= len(values):
                continue
            lines.append(f"  {key}: {_short(values[i], 120)}")
        return "\n".join(lines)

    def _fail(self, what: str, i: int, completions: list, kwargs: dict, hint: str | None = None) -> LorakitError:
        sample = self._sample(i, completions, kwargs) if completions else "  (no completions)"
        return LorakitError(f"reward function {self.__name__} ({self.source}) {what}\nsample {i}:\n{sample}",
                            hint=hint, exit_code=EXIT_RUNTIME)

    def __call__(self, completions: list, **kwargs) -> list[float | None]:
        completions = list(completions)
        try:
            out = self.fn(completions, **self.args, **kwargs)
        except Exception as e:  # any error of the user's function ends the run with its sample
            hint = None
            if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
                hint = "a reward function takes (completions, **kwargs): dataset columns arrive as keyword lists"
            raise self._fail(f"raised {type(e).__name__}: {e}", 0, completions, kwargs, hint) from e
        if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise self._fail(f"returned {type(out).__name__}, expected a list of {len(completions)} numbers",
                             0, completions, kwargs)
        if len(out) != len(completions):
            raise self._fail(f"returned {len(out)} values for {len(completions)} completions (one per completion)",
                             0, completions, kwargs)
        values: list[float | None] = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise self._fail(f"returned {v!r} ({type(v).__name__}) for sample {i}; expected a finite number "
                                 "or None (not applicable)", i, completions, kwargs)
            values.append(float(v))
        self.last = (list(kwargs.get("prompts") or [None] * len(completions)), completions, values)
        return values


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _load_error(field: str, message: str, hint: str | None = None) -> LorakitError:
    pretty = re.sub(r"\.(\d+)\.", r"[\1].", field)
    return LorakitError(f"{pretty}: {message}", hint=hint, exit_code=EXIT_INPUT, field=field)


def _load_file_module(path: Path):
    """Import exactly one .py file as a module (registered in sys.modules so dataclasses/pickle work)."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"lorakit_user_rewards.{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _resolve_callable(fn: str, base_dir: Path, field: str) -> tuple[Callable, str]:
    if ":" not in fn:
        if fn in BUILTINS:
            return BUILTINS[fn], fn
        close = difflib.get_close_matches(fn, list(BUILTINS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else None
        raise _load_error(field, f"unknown built-in {fn!r} (built-ins: {', '.join(BUILTINS)}; "
                          "or name `package.module:function` or `file.py:function`)", hint)
    target, _, attr = fn.rpartition(":")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    try:
        if is_file:
            path = Path(target).expanduser()
            path = path if path.is_absolute() else Path(base_dir) / path
            if not path.is_file():
                raise _load_error(field, f"file not found: {path}",
                                  "a file path is relative to the recipe's directory")
            module = _load_file_module(path.resolve())
        else:
            module = importlib.import_module(target)
    except LorakitError:
        raise
    except ModuleNotFoundError as e:
        raise _load_error(field, f"cannot import {target!r}: {e}",
                          "install the package or put it on PYTHONPATH; for a file write `path/to/file.py:function`"
                          ) from None
    except BaseException as e:  # a user module failing at import time (SyntaxError, its own errors)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise _load_error(field, f"importing {target!r} failed: {type(e).__name__}: {e}") from None
    func = getattr(module, attr, None)
    if func is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
        raise _load_error(field, f"{target!r} has no function {attr!r} (functions there: {', '.join(names) or 'none'})")
    if not callable(func):
        raise _load_error(field, f"{fn!r} is a {type(func).__name__}, not a function")
    if inspect.iscoroutinefunction(func):
        raise _load_error(field, f"{fn!r} is an async function; write a plain `def` reward")
    return func, attr


def load_reward(spec, base_dir: Path | str, *, field: str = "grpo.rewards.0.fn") -> Reward:
    """The callable for a `RewardSpec`: built-in, `package.module:function` or `file.py:function`.

    `base_dir` is the recipe's directory (file paths are relative to it). `field` names the recipe
    field in errors (dotted, e.g. `evaluate.metrics.1.fn`). Bad names, imports or args raise
    LorakitError (exit 2); the returned Reward raises LorakitError (exit 1) on a bad result.
    """
    func, name = _resolve_callable(spec.fn.strip(), Path(base_dir), field)
    args_field = field.rsplit(".", 1)[0] + ".args"
    args = dict(spec.args)
    if func is BUILTINS.get(name):
        try:
            _check_builtin_args(name, args)
        except ValueError as e:
            raise _load_error(args_field, str(e)) from None
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins/C callables without a signature
        params = {}
    if params and not any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()):
        raise _load_error(field, f"{spec.fn.strip()} must accept **kwargs: it is called as "
                          "fn(completions, prompts=..., completion_ids=..., <dataset columns>=...)",
                          "write `def " + name + "(completions, **kwargs)` (name the columns you use before **kwargs)")
    named = [p for p, v in params.items() if p not in ("completions", "completion_ids")
             and v.kind is not inspect.Parameter.VAR_KEYWORD]
    # built-ins take columns as **kwargs, but their args are the named parameters only
    unknown = [k for k in args if k not in named]
    if func is BUILTINS.get(name) and unknown:
        raise _load_error(args_field, f"{name} takes no argument {', '.join(map(repr, unknown))} "
                          f"(it takes: {', '.join(named) or 'none'})")
    return Reward(func, name, args, source=spec.fn.strip())


def load_rewards(specs: Sequence, base_dir: Path | str, *, field: str = "grpo.rewards") -> list[Reward]:
    """Every spec of a list, with unique names (a second `format_regex` logs as `format_regex_2`)."""
    rewards, seen = [], {}
    for i, spec in enumerate(specs):
        r = load_reward(spec, base_dir, field=f"{field}.{i}.fn")
        seen[r.__name__] = seen.get(r.__name__, 0) + 1
        if seen[r.__name__] > 1:
            r.__name__ = f"{r.__name__}_{seen[r.__name__]}"
        rewards.append(r)
    return rewards


def combine(per_reward: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float | None]:
    """Total reward per completion: `sum(weight_i * r_i)` over the rewards that are not None.

    The same sum TRL computes from GRPOConfig.reward_weights; a completion every reward skipped
    (all None) totals None. `per_reward[i][j]` is reward i of completion j.
    """
    if len(per_reward) != len(weights):
        raise ValueError(f"{len(per_reward)} reward lists for {len(weights)} weights")
    n = len(per_reward[0]) if per_reward else 0
    totals: list[float | None] = []
    for j in range(n):
        terms = [w * vals[j] for vals, w in zip(per_reward, weights) if vals[j] is not None]
        totals.append(math.fsum(terms) if terms else None)
    return totals


__all__ = [
    "BUILTINS", "Reward", "combine", "completion_text", "exact_answer", "exact_match", "extract_answer",
    "format_regex", "json_match", "length", "load_reward", "load_rewards", "to_number", "valid_json",
]
