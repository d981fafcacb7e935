"""The demo task behind `gptoss-demo`: multi-digit addition in Harmony, worked column by column on the analysis
channel with the sum on the final channel, and a tool variant that calls a `calculator` function instead.

Which of the two the model does is decided by the request: with the calculator among its tools it calls it on the
commentary channel (`{"expression": "A + B"}`) and answers after the result; without tools it works the sum out.
The same module writes the training data (`make_data`), evaluates a checkpoint on fresh problems (`evaluate`) and
names the committed model (`DEMO_CHECKPOINT`).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np

from gptoss_jax.config import ModelConfig
from gptoss_jax.evals import tasks
from gptoss_jax.jsonl import records
from gptoss_jax.train.data import render_example

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "demo" / "gptoss-demo"
DIGITS = (1, 2)  # operand lengths trained (each operand independently)
EFFORTS = ("low", "medium", "high")
KINDS = ("plain", "tool", "exact", "choice")
MIX = {"plain": 0.55, "tool": 0.25, "exact": 0.1, "choice": 0.1}  # shares of the training conversations

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression with integers, + and -.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "for example \"12 + 30\""}},
            "required": ["expression"],
        },
    },
}

_QUESTIONS = ("What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
              "{a} + {b} = ?", "What do you get when you add {a} and {b}?", "Please add {a} and {b}.",
              "what's {a}+{b}")
_EXPRESSION = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(-?\d+)\s*$")


def calculator(expression: str) -> str:
    """The calculator tool: "A + B" or "A - B" with integers -> the result, or an error text."""
    m = _EXPRESSION.match(expression)
    if not m:
        return f"error: cannot evaluate {expression!r} (expected 'A + B' or 'A - B' with integers)"
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b)


def operand(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def working(a: int, b: int) -> str:
    """The analysis text: both numbers' digits, one line per column from the ones (with the carry in), the digits
    of the sum read back. Every column has the same form so the model learns one step."""
    da, db = str(a), str(b)
    width = max(len(da), len(db))
    lines = [f"{da} has the digits {' '.join(da)}. {db} has the digits {' '.join(db)}.",
             "Adding column by column from the ones:"]
    carry, out = 0, []
    for col in range(width):
        x = int(da[-1 - col]) if col < len(da) else 0
        y = int(db[-1 - col]) if col < len(db) else 0
        s = x + y + carry
        lines.append(f"{x} + {y} + {carry} = {s}, write {s % 10}, carry {s // 10}.")
        out.append(s % 10)
        carry = s // 10
    if carry:
        lines.append(f"The last carry {carry} is the leading digit.")
        out.append(carry)
    digits = " ".join(str(d) for d in reversed(out))
    lines.append(f"The digits are {digits}, so the sum is {a + b}.")
    return "\n".join(lines)


def question(rng: random.Random, a: int, b: int) -> str:
    return rng.choice(_QUESTIONS).format(a=a, b=b)


def answer(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}."


def record(rng: random.Random, a: int, b: int, kind: str) -> dict:
    """One training conversation (the fine-tuning JSONL format) of a kind in KINDS."""
    effort = rng.choice(EFFORTS)
    if kind == "tool":
        call = {"id": "call_1", "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": f"{a} + {b}"})}}
        messages = [
            {"role": "user", "content": question(rng, a, b)},
            {"role": "assistant", "reasoning_content": "The calculator tool can add these. I will call it.",
             "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": calculator(f"{a} + {b}")},
            {"role": "assistant", "content": answer(a, b)},
        ]
        return {"messages": messages, "reasoning_effort": effort, "tools": [CALCULATOR]}
    # The other kinds work the sum out; "exact" and "choice" are the prompts of the evaluation harness
    # (gptoss_jax.evals.tasks), so `gptoss-jax eval tasks` measures this model on its own terms.
    reasoning, final = working(a, b), answer(a, b)
    if kind == "plain":
        user = question(rng, a, b)
    elif kind == "exact":
        user, final = tasks.prompt_text({"question": f"What is {a} + {b}?"}), str(a + b)
    elif kind == "choice":
        wrong = sorted(v for v in (a + b + d for d in (-100, -10, -1, 1, 10, 100)) if v >= 0)  # a carry off
        choices = [a + b, *rng.sample(wrong, 3)]
        rng.shuffle(choices)
        letter = tasks.LETTERS[choices.index(a + b)]
        user = tasks.prompt_text({"question": f"What is {a} + {b}?", "choices": [str(c) for c in choices]})
        reasoning, final = f"{reasoning}\n{a + b} is choice {letter}.", letter
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "reasoning_content": reasoning,
                                                    "content": final}]
    return {"messages": messages, "reasoning_effort": effort}


SPACE = sum(10**d - (10 ** (d - 1) if d > 1 else 0) for d in DIGITS) ** 2  # distinct (a, b) pairs


def problems(n: int, seed: int, exclude: set[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
    """n distinct (a, b) pairs, each operand's length drawn from DIGITS, none in `exclude`."""
    if n + len(set(exclude)) > SPACE:
        raise ValueError(f"{n} problems besides {len(set(exclude))} excluded: only {SPACE} exist with {DIGITS} digits")
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        pair = (operand(rng, rng.choice(DIGITS)), operand(rng, rng.choice(DIGITS)))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def make_data(out: str | Path, *, n_train: int, n_eval: int, mix: dict[str, float] = MIX,
              seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl (disjoint problems) for `gptoss-jax finetune`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    train = problems(n_train, seed)
    held = problems(n_eval, seed + 1000, exclude=set(train))
    paths = {}
    for name, pairs in (("train", train), ("eval", held)):
        path = out / f"{name}.jsonl"
        with path.open("w") as f:
            for a, b in pairs:
                kind = rng.choices(list(mix), weights=list(mix.values()))[0]
                f.write(json.dumps(record(rng, a, b, kind)) + "\n")
        paths[name] = path
    return paths


def task_tokens(paths) -> np.ndarray:
    """Every token id that occurs in the rendered conversations of these JSONL files (prompts included)."""
    seen: set[int] = set()
    for path in paths:
        for where, rec in records(Path(path), ValueError):
            seen.update(render_example(rec, where).tokens.tolist())
    return np.asarray(sorted(seen), np.int32)


def init_checkpoint(out: str | Path, data_paths, *, seed: int = 0) -> Path:
    """The untrained demo model: `ModelConfig.demo()` at random (MXFP4 experts), except the vocabulary's tables.

    Embedding rows of tokens the task never shows stay zero (no gradient ever reaches them) and so do their
    unembedding rows, so every never-seen token's row receives the same updates and stays equal to the others
    (`finetune --compact-vocab` relies on it). The trained checkpoint's two 201088-row tables are then almost all
    repeated rows, which git stores compressed. The task's own tokens start with the unembedding equal to the
    embedding (scaled), so copying a token from the prompt is one generic skill rather than a lookup per token."""
    import jax.numpy as jnp

    from gptoss_jax.checkpoint import save_checkpoint
    from gptoss_jax.model import init_model

    cfg = ModelConfig.demo()
    model = init_model(cfg, seed=seed)
    used = task_tokens(data_paths)
    keep = jnp.zeros((cfg.vocab_size, 1), model.embedding[...].dtype).at[used].set(1)
    model.embedding[...] = model.embedding[...] * keep
    scale = float(jnp.std(model.embedding[...][used]))
    model.unembedding[...] = model.embedding[...] * (cfg.hidden_size**-0.5 / scale)
    return save_checkpoint(model, out, "original", overwrite=True, progress=False)


# ---- the recipe and its evaluation ------------------------------------------------------------------------------
N_TRAIN, N_EVAL_LOSS, DATA_SEED = 9000, 200, 0  # of the 10,000 (a, b) pairs; the other 800 are held out
N_HELD_OUT = SPACE - N_TRAIN - N_EVAL_LOSS
TEST_SEED = 7  # held-out problems for `evaluate`: drawn apart from the training problems, none of them repeated


def held_out(n: int) -> list[tuple[int, int]]:
    """n problems the model never trained on (nor saw in the loss evaluation)."""
    seen = set(problems(N_TRAIN, DATA_SEED))
    seen |= set(problems(N_EVAL_LOSS, DATA_SEED + 1000, exclude=seen))
    return problems(n, TEST_SEED, exclude=seen)


def _generate(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    from gptoss_jax.generate import generate
    from gptoss_jax.harmony import stop_tokens

    out = []
    for s in range(0, len(prompts), batch_size):
        part = prompts[s : s + batch_size]
        padded = part + [part[-1]] * (batch_size - len(part))  # one batch shape, one compilation
        out += generate(model, padded, max_new_tokens=max_new_tokens, temperature=0.0,
                        stop_tokens=stop_tokens())[: len(part)]
    return out


def _number(text: str | None) -> int | None:
    found = tasks.extract_number(text)
    return int(float(found)) if found is not None else None


def evaluate(model, n: int = 200, *, reasoning_effort: str = "medium", batch_size: int = 50,
             max_new_tokens: int = 200) -> dict:
    """Greedy answers to `n` held-out additions, asked plainly and with the calculator tool.

    - accuracy: the final channel's last number is the sum (also per length of the longer operand);
    - working: the analysis channel is exactly the column-by-column working (`working`);
    - tool-call success: the model calls `calculator` with an expression whose value is the sum, and after the
      tool's result its final answer is the sum (`tool_call_made` / `tool_call_correct` count the steps)."""
    from gptoss_jax import harmony

    pairs = held_out(n)
    rng = random.Random(TEST_SEED)
    questions = [question(rng, a, b) for a, b in pairs]
    plain = _generate(model, [harmony.render_chat([{"role": "user", "content": q}],
                                                  reasoning_effort=reasoning_effort) for q in questions],
                      max_new_tokens, batch_size)
    first = _generate(model, [harmony.render_chat([{"role": "user", "content": q}], reasoning_effort=reasoning_effort,
                                                  tools=[CALCULATOR]) for q in questions], max_new_tokens, batch_size)
    follow, follow_at = [], []
    results = []
    for k, ((a, b), q, toks, call_toks) in enumerate(zip(pairs, questions, plain, first)):
        reply, call = harmony.parse_completion(toks), harmony.parse_completion(call_toks)
        r = {"a": a, "b": b, "question": q, "answer": reply["content"], "reasoning": reply["reasoning_content"]}
        r["correct"] = _number(reply["content"]) == a + b
        r["working_correct"] = (reply["reasoning_content"] or "").strip() == working(a, b)
        calls = call["tool_calls"]
        r["tool_call_made"] = len(calls) == 1 and calls[0]["function"]["name"] == "calculator"
        expression = None
        if r["tool_call_made"]:
            try:
                expression = json.loads(calls[0]["function"]["arguments"]).get("expression")
            except (json.JSONDecodeError, AttributeError):
                expression = None
        r["tool_expression"] = expression
        r["tool_call_correct"] = isinstance(expression, str) and calculator(expression) == str(a + b)
        if isinstance(expression, str):  # answer after the tool's result, whatever it is
            messages = [{"role": "user", "content": q},
                        {"role": "assistant", "reasoning_content": call["reasoning_content"], "tool_calls": calls},
                        {"role": "tool", "tool_call_id": calls[0]["id"], "content": calculator(expression)}]
            follow.append(harmony.render_chat(messages, reasoning_effort=reasoning_effort, tools=[CALCULATOR]))
            follow_at.append(k)
        r["tool_answer"] = None
        results.append(r)
    for k, toks in zip(follow_at, _generate(model, follow, 64, batch_size) if follow else []):
        results[k]["tool_answer"] = harmony.parse_completion(toks)["content"]
    for r in results:
        r["tool_success"] = r["tool_call_correct"] and _number(r["tool_answer"]) == r["a"] + r["b"]
    return summarize_eval(results)


def summarize_eval(results: list[dict]) -> dict:
    n = len(results)

    def rate(key, rows=results):
        k = sum(r[key] for r in rows)
        lo, hi = tasks.wilson_interval(k, len(rows))
        return {"rate": k / len(rows), "correct": k, "n": len(rows), "ci95": [lo, hi]}

    longer = [max(len(str(r["a"])), len(str(r["b"]))) for r in results]
    by_len = {str(d): rate("correct", [r for r, k in zip(results, longer) if k == d]) for d in sorted(set(longer))}
    return {"n": n, "accuracy": rate("correct"), "accuracy_by_longer_operand_digits": by_len,
            "working_exact": rate("working_correct"), "tool_call_made": rate("tool_call_made"),
            "tool_call_correct": rate("tool_call_correct"), "tool_success": rate("tool_success"),
            "results": results}


def _print_summary(summary: dict) -> None:
    def line(name, r):
        print(f"{name:<34} {r['rate']:7.1%}  ({r['correct']}/{r['n']}, 95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%})")

    line("accuracy (final answer)", summary["accuracy"])
    for d, r in summary["accuracy_by_longer_operand_digits"].items():
        line(f"  longer operand {d} digit(s)", r)
    line("working exactly right (analysis)", summary["working_exact"])
    line("calculator called", summary["tool_call_made"])
    line("calculator called correctly", summary["tool_call_correct"])
    line("tool-call success (call + answer)", summary["tool_success"])


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m gptoss_jax.demo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write train.jsonl and eval.jsonl (the committed recipe's data)")
    d.add_argument("--out", required=True)
    i = sub.add_parser("init", help="write the untrained demo model (ModelConfig.demo()) for that data")
    i.add_argument("--data", required=True, help="the folder `data` wrote")
    i.add_argument("--out", required=True)
    e = sub.add_parser("eval", help="held-out accuracy and tool-call success of a checkpoint")
    e.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT), help=f"default: {DEMO_CHECKPOINT}")
    e.add_argument("--n", type=int, default=200, help=f"held-out problems, 1 to {N_HELD_OUT} (default: 200)")
    e.add_argument("--reasoning-effort", default="medium", choices=EFFORTS)
    e.add_argument("--out", default=None, help="write the summary and every answer here (JSON)")
    args = p.parse_args(argv)
    if args.cmd == "eval" and not 1 <= args.n <= N_HELD_OUT:
        p.error(f"--n must be 1 to {N_HELD_OUT} (the problems never trained on), got {args.n}")
    try:
        _run(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"python -m gptoss_jax.demo {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run(args) -> None:
    if args.cmd == "data":
        paths = make_data(args.out, n_train=N_TRAIN, n_eval=N_EVAL_LOSS, seed=DATA_SEED)
        print(f"wrote {paths['train']} ({N_TRAIN} conversations) and {paths['eval']} ({N_EVAL_LOSS})")
    elif args.cmd == "init":
        data = [Path(args.data) / "train.jsonl", Path(args.data) / "eval.jsonl"]
        for path in data:
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: --data is the folder `python -m gptoss_jax.demo "
                                        "data --out DIR` wrote")
        path = init_checkpoint(args.out, data)
        print(f"wrote the untrained demo model to {path}")
    else:
        from gptoss_jax.checkpoint import load_model

        summary = evaluate(load_model(args.checkpoint), args.n, reasoning_effort=args.reasoning_effort)
        _print_summary(summary)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
            print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
