"""Multiple-choice and exact-match evaluation over JSONL tasks, prompted through Harmony.

Each line of a task file is `{"id", "question", "choices"?: [...], "answer"}`:
- multiple choice (MMLU style) when `choices` is given: the choices are lettered A, B, C, ... and `answer` is a
  letter ("B") or a 0-based index (1); the reply's letter is extracted (`extract_choice`);
- exact match otherwise: `answer` is a string or a number; numbers compare as numbers (the reply's last number,
  "1,234" = "1234" = "1234.0"), other strings after case and whitespace normalization (`normalize_text`).

The question becomes a one-turn Harmony chat (`harmony.render_chat`, with the chosen reasoning effort), the
prompts are generated in batches (`generate.generate`, greedy by default, stopping at <|return|> / <|call|>) and
the answer is read from the final channel (`harmony.parse_completion(...)["content"]`). Each item's result is
appended to a JSONL file as soon as its batch is done; running again skips the ids already there (resume).
Accuracy comes with a 95% Wilson score interval.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gptoss_jax import harmony
from gptoss_jax.jsonl import records

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
Z95 = 1.959963984540054  # the standard normal's 0.975 quantile
MC_INSTRUCTION = "Answer with the letter of the correct choice only."
EXACT_INSTRUCTION = "Give only the final answer."

GenerateFn = Callable[[list[list[int]]], list[list[int]]]


# ---- task files ------------------------------------------------------------------------------------------------
def load_tasks(path: str | os.PathLike) -> list[dict]:
    """Read and check a task file; ids become strings and must be unique. Raises ValueError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such task file: {path}")
    items, seen = [], set()
    for where, item in records(path):
        items.append(check_item(item, where))
        if items[-1]["id"] in seen:
            raise ValueError(f"{where}: duplicate id {items[-1]['id']!r}")
        seen.add(items[-1]["id"])
    if not items:
        raise ValueError(f"{path}: no tasks")
    return items


def check_item(item: Any, where: str = "task") -> dict:
    """A validated copy of one task: id as a string; for multiple choice, `answer` as a letter."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key in ("id", "question", "answer"):
        if key not in item:
            raise ValueError(f"{where}: missing {key!r}")
    if not isinstance(item["question"], str) or not item["question"].strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    out = dict(item, id=str(item["id"]))
    choices = item.get("choices")
    if choices is None:
        if not isinstance(item["answer"], (str, int, float)) or isinstance(item["answer"], bool):
            raise ValueError(f"{where}: 'answer' must be a string or a number")
        return out
    if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: 'choices' must be a list of 2 to 26 strings")
    answer = item["answer"]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer index {answer} is outside the {len(choices)} choices")
        letter = LETTERS[answer]
    elif isinstance(answer, str) and answer.strip().upper() in LETTERS[: len(choices)] and answer.strip():
        letter = answer.strip().upper()
    else:
        raise ValueError(f"{where}: 'answer' must be a letter A-{LETTERS[len(choices) - 1]} or a 0-based index")
    out["answer"] = letter
    return out


def prompt_text(item: dict) -> str:
    """The user message for a task."""
    if item.get("choices") is None:
        return f"{item['question'].strip()}\n\n{EXACT_INSTRUCTION}"
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"])]
    return f"{item['question'].strip()}\n\n" + "\n".join(lines) + f"\n\n{MC_INSTRUCTION}"


def render_prompt(item: dict, reasoning_effort: str = "low", system: str | None = None) -> list[int]:
    """The Harmony prompt tokens for a task (ends in `<|start|>assistant`)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt_text(item)}]
    return harmony.render_chat(messages, reasoning_effort=reasoning_effort)


# ---- answer extraction -----------------------------------------------------------------------------------------
def extract_choice(text: str | None, n_choices: int, choices: Sequence[str] | None = None) -> str | None:
    """The letter a reply chose among the first n_choices letters, or None when it cannot be told.

    In order: the reply is just a letter ("B", "(B)", "B.", "**B**"); an "answer: B" / "answer is (B)" statement
    (the last one); a line that starts with a letter and a delimiter ("B) 42"); the reply equals one choice's text;
    exactly one distinct standalone letter in the reply. Otherwise None (ambiguous or no letter)."""
    if not text:
        return None
    valid = LETTERS[:n_choices]
    s = text.strip()
    m = re.fullmatch(r"[\s*_(\[]*([A-Z])[\s*_)\].:]*", s)
    if m and m.group(1) in valid:
        return m.group(1)
    found = re.findall(rf"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*[*_(\[]*\s*([{valid}])\b", s)
    if found:
        return found[-1]
    m = re.search(rf"(?m)^\s*[*_(\[]*([{valid}])[)\].:]", s)
    if m:
        return m.group(1)
    if choices:
        norm = normalize_text(s)
        hits = [LETTERS[i] for i, c in enumerate(choices[:n_choices]) if normalize_text(c) == norm]
        if len(hits) == 1:
            return hits[0]
    letters = set(re.findall(rf"(?<![\w'])([{valid}])(?![\w'])", s))
    if len(letters) == 1:
        return letters.pop()
    return None


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def normalize_text(text: str | None) -> str:
    """Lower case, whitespace collapsed, outer quotes/markup and one trailing period removed."""
    if text is None:
        return ""
    s = " ".join(str(text).split()).lower()
    s = s.strip("*_`\"' ")
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def parse_number(text: Any) -> str | None:
    """The canonical form of a number ("1,234.50" -> "1234.5", "-7.0" -> "-7"), or None if text is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        text = repr(text)
    s = str(text).strip().replace(" ", "").lstrip("$").rstrip(".")
    if not re.fullmatch(_NUMBER.pattern, s):
        return None
    return _canonical(s)


def _canonical(s: str) -> str:
    s = s.replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    sign = "-" if s.startswith("-") else ""
    s = s.lstrip("+-")
    if s.startswith("."):
        s = "0" + s
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return "0" if s == "0" else sign + s


def extract_number(text: str | None) -> str | None:
    """The last number in a reply, canonical ("The sum is 1,234." -> "1234"), or None."""
    if not text:
        return None
    found = _NUMBER.findall(text)
    return _canonical(found[-1]) if found else None


def expected_answer(item: dict) -> str:
    """What a correct prediction equals: the letter (multiple choice), the canonical number, or the normalized
    text."""
    if item.get("choices") is not None:
        return item["answer"]
    number = parse_number(item["answer"])
    return number if number is not None else normalize_text(str(item["answer"]))


def predict(item: dict, content: str | None) -> str | None:
    """The prediction read from the final channel's text, comparable with `expected_answer(item)`."""
    if item.get("choices") is not None:
        return extract_choice(content, len(item["choices"]), item["choices"])
    if parse_number(item["answer"]) is not None:
        return extract_number(content)
    return normalize_text(content) if content else None


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% with the default z); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, n={n}], got {correct}")
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    hi = 1.0 if correct == n else min(1.0, center + half)
    return lo, hi


# ---- the loop --------------------------------------------------------------------------------------------------
def read_results(path: str | os.PathLike) -> list[dict]:
    """Per-item results already in an output file. A last line cut short by a kill is dropped from the file."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # an interrupted append: keep only complete lines
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    out = []
    for i, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg}); not a results file?") from None
    return out


def summarize(results: Sequence[dict]) -> dict:
    """Accuracy, its 95% Wilson interval and counts, overall and per kind (multiple_choice / exact_match)."""
    def one(rs):
        n, k = len(rs), sum(bool(r["correct"]) for r in rs)
        lo, hi = wilson_interval(k, n)
        return {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "ci95": [lo, hi],
                "unanswered": sum(r["prediction"] is None for r in rs)}

    out = one(results)
    kinds = sorted({r["kind"] for r in results})
    if len(kinds) > 1:
        out["by_kind"] = {kd: one([r for r in results if r["kind"] == kd]) for kd in kinds}
    return out


def evaluate_tasks(model, tasks: str | os.PathLike | Sequence[dict], out: str | os.PathLike | None = None, *,
                   reasoning_effort: str = "low", max_new_tokens: int = 256, batch_size: int = 8,
                   temperature: float = 0.0, seed: int = 0, system: str | None = None,
                   generate_fn: GenerateFn | None = None, progress: bool = True, limit: int | None = None,
                   prior: Sequence[dict] | None = None) -> dict:
    """Evaluate `model` on the tasks; returns `summarize(...)` of every task's result plus "results" (per item, in
    task order) and the settings. With `out`, results are appended there per batch and ids already in it are not
    run again. `prior`: the results already known, instead of those read from `out` (a multi-process job: process
    0's file, on every process). `generate_fn(prompts) -> completions` replaces the model's generation (tests,
    other engines); `model` may then be None (as it may when every task already has a result)."""
    items = load_tasks(tasks) if isinstance(tasks, (str, os.PathLike)) else [
        check_item(t, f"tasks[{i}]") for i, t in enumerate(tasks)]
    if limit is not None:
        items = items[:limit]
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if prior is None:
        prior = read_results(out) if out is not None else []
    done = {r["id"]: r for r in prior}
    todo = [it for it in items if it["id"] not in done]
    if generate_fn is None and todo:
        if model is None:
            raise ValueError("give a model or a generate_fn")
        generate_fn = _model_generate(model, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                      batch_size=batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="tasks", unit="item")
    fh = None
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fh = open(out, "a", encoding="utf-8")
    try:
        for s in range(0, len(todo), batch_size):
            part = todo[s : s + batch_size]
            prompts = [render_prompt(it, reasoning_effort, system) for it in part]
            completions = generate_fn(prompts)
            if len(completions) != len(part):
                raise ValueError(f"generate_fn returned {len(completions)} completions for {len(part)} prompts")
            for it, toks in zip(part, completions):
                r = _result(it, toks, max_new_tokens)
                done[it["id"]] = r
                if fh is not None:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            if fh is not None:
                fh.flush()
            if bar is not None:
                bar.update(len(part))
                k = sum(done[i["id"]]["correct"] for i in items if i["id"] in done)
                bar.set_postfix(acc=f"{k / max(1, sum(i['id'] in done for i in items)):.3f}")
    finally:
        if fh is not None:
            fh.close()
        if bar is not None:
            bar.close()
    results = [done[it["id"]] for it in items]
    summary = summarize(results)
    summary.update(reasoning_effort=reasoning_effort, max_new_tokens=max_new_tokens, temperature=temperature,
                   resumed=len(items) - len(todo), results=results)
    return summary


def _result(item: dict, tokens: Sequence[int], max_new_tokens: int) -> dict:
    tokens = [int(t) for t in tokens]
    reply = harmony.parse_completion(tokens)
    content = reply["content"]
    prediction = predict(item, content)
    expected = expected_answer(item)
    finish = reply["finish_reason"] or ("length" if len(tokens) >= max_new_tokens else None)
    return {"id": item["id"], "kind": "multiple_choice" if item.get("choices") is not None else "exact_match",
            "expected": expected, "prediction": prediction,
            "correct": prediction is not None and prediction == expected,
            "content": content, "reasoning": reply["reasoning_content"], "completion_tokens": len(tokens),
            "finish_reason": finish}


def _model_generate(model, *, max_new_tokens: int, temperature: float, seed: int, batch_size: int) -> GenerateFn:
    from gptoss_jax.generate import generate

    stops = harmony.stop_tokens()

    def run(prompts):
        # A short last batch is padded with copies of its last prompt: one batch shape, one compilation. Rows
        # are independent (each row samples with its own key), so the copies change nothing.
        n = len(prompts)
        padded = list(prompts) + [prompts[-1]] * (batch_size - n)
        return generate(model, padded, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                        stop_tokens=stops)[:n]

    return run
