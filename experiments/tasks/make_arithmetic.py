"""Write experiments/tasks/arithmetic.jsonl: 50 addition questions (exact match), 2- to 4-digit operands, from a
fixed seed, so the file is the same on every machine. Also writes experiments/tasks/arithmetic_mc.jsonl: 20 of
them as 4-way multiple choice (the distractors are the sum off by a carry).

usage: python experiments/tasks/make_arithmetic.py [--n 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def questions(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        digits = 2 + i % 3  # 2, 3, 4 digits in turn
        a, b = (rng.randrange(10 ** (digits - 1), 10**digits) for _ in range(2))
        out.append({"id": f"add-{i:03d}", "question": f"What is {a} + {b}?", "answer": str(a + b)})
    return out


def multiple_choice(items: list[dict], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    out = []
    for item in items[:n]:
        right = int(item["answer"])
        wrong = set()
        while len(wrong) < 3:
            w = right + rng.choice([-100, -10, -1, 1, 10, 100])
            if w != right and w > 0:
                wrong.add(w)
        choices = [right, *sorted(wrong)]
        rng.shuffle(choices)
        out.append({"id": item["id"].replace("add", "add-mc"), "question": item["question"],
                    "choices": [str(c) for c in choices], "answer": "ABCD"[choices.index(right)]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args(argv)
    items = questions(args.n, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "arithmetic.jsonl").write_text("".join(json.dumps(q) + "\n" for q in items))
    mc = multiple_choice(items, 20, args.seed)
    (out / "arithmetic_mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in mc))
    print(f"wrote {len(items)} questions to {out / 'arithmetic.jsonl'} and {len(mc)} to {out / 'arithmetic_mc.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
