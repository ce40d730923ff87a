"""Generate the arithmetic prompt set of recipes/grpo-arithmetic.yaml (deterministic, no downloads).

Each row is a chat prompt asking for one addition or subtraction with the answer inside
<answer></answer> tags, and the `answer` column the `exact_answer` reward compares against:

  {"prompt": [{"role": "user", "content": "What is 37 + 48? Give just the number inside <answer></answer>."}],
   "answer": "85"}

A question uses operands up to 20 with probability --easy (0.5), else up to 99; only 610 distinct
small questions exist, so the default set holds about 100 of them in eval and 500 in train. The mix
matters for GRPO: a group of completions of one prompt only teaches something when their rewards
differ, and
SmolLM2-135M-Instruct gets small sums right some of the time but two-digit sums almost never
(measured on 8 prompts x 4 samples at temperature 0.7: 10/16 right for one-digit operands, 0/16 for
two-digit ones). Subtractions never go below zero. The eval rows never repeat a training question.

Usage:
  python scripts/make_grpo_data.py [--out data/grpo-arithmetic] [--train 2000] [--eval 200] [--easy 0.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TEMPLATES = [
    "What is {a} {op} {b}? Give just the number inside <answer></answer>.",
    "Compute {a} {op} {b}. Reply with only the result in answer tags, for example: <answer>7</answer>",
    "{a} {op} {b} = ? Write only the result inside <answer></answer>.",
]


def question(rng: random.Random, easy: float = 0.5) -> tuple[int, str, int]:
    """One (a, op, b): with probability `easy` operands 1-20, else 1-99; subtractions stay >= 0."""
    op = rng.choice(["+", "+", "-"])
    top = 20 if rng.random() < easy else 99
    a, b = rng.randint(1, top), rng.randint(1, top)
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


def make_rows(n: int, rng: random.Random, seen: set, easy: float = 0.5) -> list[dict]:
    """n rows whose questions are not in `seen` (which gains them)."""
    rows = []
    while len(rows) < n:
        a, op, b = question(rng, easy)
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
    ap.add_argument("--easy", type=float, default=0.5, help="fraction of questions with operands up to 20")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 <= args.easy <= 1:
        ap.error("--easy must be between 0 and 1")
    rng = random.Random(args.seed)
    seen: set = set()
    eval_rows = make_rows(args.eval, rng, seen, args.easy)
    train_rows = make_rows(args.train, rng, seen, args.easy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
