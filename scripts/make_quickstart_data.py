"""Generate the quickstart dataset (deterministic, seeded, nothing downloaded or copied).

The skill: read one short sentence and answer with strict one-line JSON, keys in a fixed order and the
date normalized to ISO 8601 -- something SmolLM2-135M-Instruct does not do out of the box, and that the
`json_match` metric checks exactly:

  user:      Extract: On March 12, 2024, Maria Lopez arrived in Lisbon.
  assistant: {"name": "Maria Lopez", "city": "Lisbon", "date": "2024-03-12"}

Rows are in the `messages` format; eval rows never repeat a training (name, city, date). Usage:
  python scripts/make_quickstart_data.py [--out data/quickstart] [--train 400] [--eval 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Maria", "John", "Aisha", "Kenji", "Lena", "Omar", "Sofia", "Lucas", "Priya", "Noah", "Elena", "Ivan",
         "Chloe", "Mateo", "Hana", "David", "Zara", "Felix", "Nina", "Arjun", "Emma", "Yusuf", "Clara", "Leo"]
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Berg", "Haddad", "Rossi", "Silva", "Patel", "Brown", "Novak",
        "Petrov", "Martin", "Garcia", "Kim", "Cohen", "Ali", "Weber", "Moreau", "Singh", "Jones", "Demir"]
CITIES = ["Lisbon", "Paris", "Berlin", "Tokyo", "Madrid", "Cairo", "Oslo", "Rome", "Dublin", "Vienna", "Prague",
          "Lima", "Seoul", "Toronto", "Nairobi", "Athens", "Warsaw", "Boston", "Denver", "Sydney", "Mumbai", "Milan"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
TEMPLATES = [
    "{name} flew to {city} on {date}.",
    "On {date}, {name} arrived in {city}.",
    "{name} moved to {city} on {date}.",
    "{name} will visit {city} on {date}.",
    "On {date} {name} landed in {city}.",
    "{name} gave a talk in {city} on {date}.",
]
PROMPT = "Extract: {sentence}"


def spoken_date(rng: random.Random, year: int, month: int, day: int) -> str:
    """The date as people write it: '12 March 2024' or 'March 12, 2024'."""
    name = MONTHS[month - 1]
    return f"{day} {name} {year}" if rng.random() < 0.5 else f"{name} {day}, {year}"


def make_row(rng: random.Random, key: tuple[str, str, int, int, int]) -> dict:
    name, city, year, month, day = key
    sentence = rng.choice(TEMPLATES).format(name=name, city=city, date=spoken_date(rng, year, month, day))
    answer = json.dumps({"name": name, "city": city, "date": f"{year:04d}-{month:02d}-{day:02d}"})
    return {"messages": [{"role": "user", "content": PROMPT.format(sentence=sentence)},
                         {"role": "assistant", "content": answer}]}


def make_rows(n: int, rng: random.Random, seen: set) -> list[dict]:
    """n rows whose (name, city, date) is not in `seen` (which gains them)."""
    rows = []
    while len(rows) < n:
        key = (f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES), rng.randint(2015, 2029),
               rng.randint(1, 12), rng.randint(1, 28))
        if key in seen:
            continue
        seen.add(key)
        rows.append(make_row(rng, key))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/quickstart", help="output directory (train.jsonl, eval.jsonl)")
    ap.add_argument("--train", type=int, default=400, help="training rows")
    ap.add_argument("--eval", type=int, default=64, help="held-out rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    seen: set = set()
    train = make_rows(args.train, rng, seen)
    held_out = make_rows(args.eval, rng, seen)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    print(f"wrote {len(train)} train rows to {out / 'train.jsonl'} and {len(held_out)} eval rows to "
          f"{out / 'eval.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
