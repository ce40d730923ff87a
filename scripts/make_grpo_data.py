"""Generate the arithmetic prompt set of recipes/grpo-arithmetic.yaml (deterministic, no downloads).

Each row is a chat prompt asking for one addition or subtraction of small integers with the answer
inside <answer></answer> tags, and the `answer` column the `exact_answer` reward compares against:

  {"prompt": [{"role": "user", "content": "What is 37 + 48? Put the final answer in <answer></answer>."}],
   "answer": "85"}

The eval rows never repeat a training question. Usage:
  python scripts/make_grpo_data.py [--out data/grpo-arithmetic] [--train 2000] [--eval 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATES = [
    "What is {a} {op} {b}? Put the final answer in <answer></answer>.",
    "Compute {a} {op} {b}. Put the final answer in <answer></answer>.",
    "Calculate {a} {op} {b} and write only the result inside <answer></answer>.",
]


def question(rng: random.Random) -> tuple[int, str, int]:
    """One (a, op, b): additions of 1-2 digit numbers, or subtractions with a non-negative result."""
    op = rng.choice(["+", "+", "-"])
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


def make_rows(n: int, rng: random.Random, seen: set) -> list[dict]:
    """n rows whose questions are not in `seen` (which gains them)."""
    rows = []
    while len(rows) < n:
        a, op, b = question(rng)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        text = rng.choice(TEMPLATES).format(a=a, op=op, b=b)
        value = a + b if op == "+" else a - b
        rows.append({"prompt": [{"role": "user", "content": text}], "answer": str(value)})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/grpo-arithmetic")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    seen: set = set()
    eval_rows = make_rows(args.eval, rng, seen)
    train_rows = make_rows(args.train, rng, seen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
