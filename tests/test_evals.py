"""gptoss_jax.evals: strided perplexity against a direct computation, answer extraction and the Wilson interval
exactly, and the task loop (resume, output format) with a scripted generator and on a tiny random checkpoint."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax.checkpoint import load_model, write_random_checkpoint
from gptoss_jax.cli import main as cli_main
from gptoss_jax.evals import perplexity as ppl
from gptoss_jax.evals import tasks as T
from gptoss_jax.tokenizer import harmony_encoding

TEXT = ("The lighthouse stood at the end of a long stone pier, and for more than a century its lamp had turned "
        "through the night. Ships that passed the headland counted its flashes: three short, one long.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(gj.ModelConfig.tiny(), tmp_path_factory.mktemp("evals") / "tiny", progress=False)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint, dtype=jnp.float32)


def _log_softmax(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- perplexity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,window,stride", [(2, 4, 4), (10, 4, 2), (37, 8, 3), (37, 8, 8), (37, 64, 5), (9, 8, 1)])
def test_windows_score_every_token_once_with_enough_context(n, window, stride):
    ws = ppl.windows(n, window, stride)
    scored = [t for _, first, last in ws for t in range(first, last + 1)]
    assert scored == list(range(1, n))  # every target exactly once, in order
    for k, (begin, first, last) in enumerate(ws):
        assert last - begin <= window  # input tokens begin..last-1
        assert begin == k * stride
        if k > 0:
            assert first - begin >= window - stride + 1  # left context of the first new target
    if window >= n - 1:
        assert ws == [(0, 1, n - 1)]


@pytest.mark.parametrize("window,stride", [(0, 1), (4, 0), (4, 5), (4.0, 2)])
def test_windows_reject_bad_arguments(window, stride):
    with pytest.raises(ValueError):
        ppl.windows(10, window, stride)


def test_perplexity_matches_a_direct_computation(model):
    toks = gj.harmony.encode(TEXT)
    n = len(toks)
    assert n > 30
    lp = _log_softmax(model(np.asarray([toks]))[0])
    direct = -lp[np.arange(n - 1), toks[1:]].mean()

    # batch_size 1 both times: one compilation (the CPU compiles dominate this test's time)
    one = ppl.perplexity(model, [TEXT], window=n + 10, stride=n + 10, batch_size=1, progress=False)
    strided_long = ppl.perplexity(model, [toks], window=n, stride=7, batch_size=1, progress=False)
    assert one.tokens == strided_long.tokens == n - 1 and one.windows == strided_long.windows == 1
    np.testing.assert_allclose(one.nll, direct, rtol=2e-6)
    np.testing.assert_allclose(strided_long.nll, one.nll, rtol=1e-6)
    assert one.perplexity == pytest.approx(math.exp(direct), rel=1e-5)


@pytest.mark.slow  # reason: two more CPU compilations of the tiny forward (~20-40 s on 2 busy cores)
def test_short_strided_windows_match_per_window_forwards(model):
    toks = gj.harmony.encode(TEXT)
    n = len(toks)
    one = ppl.perplexity(model, [toks], window=n, stride=n, batch_size=3, progress=False)
    # Short windows: each window's own forward (padded to W at the end: causal, so the padding changes nothing
    # before it), scoring only its new targets.
    W, S = 12, 5
    nll = []
    for begin, first, last in ppl.windows(n, W, S):
        lw = _log_softmax(model(np.asarray([toks[begin:last] + [0] * (W - (last - begin))]))[0])
        nll += [-lw[t - 1 - begin, toks[t]] for t in range(first, last + 1)]
    strided = ppl.perplexity(model, [toks], window=W, stride=S, batch_size=3, progress=False)
    assert strided.tokens == n - 1 and strided.windows == len(ppl.windows(n, W, S)) > 3
    np.testing.assert_allclose(strided.nll, np.mean(nll), rtol=2e-6)
    assert abs(strided.nll - one.nll) > 1e-4  # less context does change the loss


def test_documents_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "meta": 1}\n')
    (tmp_path / "bad.jsonl").write_text('{"content": "one"}\n')
    assert ppl.load_documents(tmp_path / "a.txt") == ["one\n\ntwo"]
    assert ppl.load_documents(tmp_path / "a.jsonl") == ["one", "two"]
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        ppl.load_documents(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        ppl.load_documents(tmp_path / "missing.txt")


# ---- extraction, normalization, interval -----------------------------------------------------------------------
@pytest.mark.parametrize("text,letter", [
    ("B", "B"), (" (C) ", "C"), ("**D**", "D"), ("A.", "A"), ("The answer is B.", "B"), ("ANSWER: D", "D"),
    ("Answer: (C)", "C"), ("B) 42", "B"), ("I think it's C", "C"), ("A good answer is C", "C"), ("122", "C"),
    ("A or B", None), ("E", None), ("the answer is a prime", None), ("", None), (None, None), ("42", None)])
def test_extract_choice(text, letter):
    assert T.extract_choice(text, 4, ["132", "22", "122", "112"]) == letter


@pytest.mark.parametrize("text,number", [
    ("1,234.50", "1234.5"), ("-0.0", "0"), ("007", "7"), ("$5", "5"), ("12.", "12"), ("0.50", "0.5"),
    ("-3", "-3"), (122, "122"), (2.0, "2"), ("1e5", None), ("abc", None), ("12 apples", None)])
def test_parse_number(text, number):
    assert T.parse_number(text) == number


def test_exact_match_normalization():
    assert T.extract_number("The sum is 1,234.") == "1234"
    assert T.extract_number("x = 3, then -4.50") == "-4.5"
    assert T.extract_number("no digits") is None
    assert T.normalize_text("  Paris.\n") == "paris"
    assert T.normalize_text("**New   York**") == "new york"
    num = {"id": 1, "question": "q", "answer": "1,234"}
    word = {"id": 2, "question": "q", "answer": "Paris"}
    assert T.expected_answer(num) == "1234" and T.predict(num, "It is 1234.0") == "1234"
    assert T.expected_answer(word) == "paris" and T.predict(word, " PARIS. ") == "paris"
    assert T.predict(word, None) is None


def test_wilson_interval_exact():
    z2 = T.Z95**2
    assert T.wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2), abs=1e-15))
    assert T.wilson_interval(10, 10) == (pytest.approx(10 / (10 + z2), abs=1e-15), 1.0)
    lo, hi = T.wilson_interval(5, 10)  # the textbook example: [0.2366, 0.7634]
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634) and lo + hi == pytest.approx(1.0)
    lo, hi = T.wilson_interval(81, 263)  # Newcombe (1998) example 4: 0.2553 to 0.3662
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    p, n = 37 / 50, 50
    c = (p + z2 / (2 * n)) / (1 + z2 / n)
    h = T.Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    assert T.wilson_interval(37, 50) == (pytest.approx(c - h, abs=1e-15), pytest.approx(c + h, abs=1e-15))
    assert T.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        T.wilson_interval(11, 10)


def test_task_validation(tmp_path):
    assert T.check_item({"id": 3, "question": "q", "choices": ["x", "y"], "answer": 1})["answer"] == "B"
    assert T.check_item({"id": 3, "question": "q", "choices": ["x", "y"], "answer": "a"})["answer"] == "A"
    for bad in ({"question": "q", "answer": "1"}, {"id": 1, "question": "", "answer": "1"},
                {"id": 1, "question": "q", "choices": ["x", "y"], "answer": "C"},
                {"id": 1, "question": "q", "choices": ["x", "y"], "answer": 2},
                {"id": 1, "question": "q", "choices": "xy", "answer": "A"}):
        with pytest.raises(ValueError):
            T.check_item(bad)
    f = tmp_path / "dup.jsonl"
    f.write_text('{"id": 1, "question": "q", "answer": "1"}\n{"id": "1", "question": "r", "answer": "2"}\n')
    with pytest.raises(ValueError, match="dup.jsonl:2: duplicate id"):
        T.load_tasks(f)


# ---- the loop --------------------------------------------------------------------------------------------------
TASKS = [{"id": "mc-1", "question": "Pick two.", "choices": ["one", "two", "three"], "answer": "B"},
         {"id": "mc-2", "question": "Pick one.", "choices": ["one", "two", "three"], "answer": 0},
         {"id": "em-1", "question": "What is 59 + 63?", "answer": "122"},
         {"id": "em-2", "question": "What is 2 + 2?", "answer": 4},
         {"id": "em-3", "question": "Capital of France?", "answer": "Paris"}]
REPLIES = {"Pick two.": "The answer is B.", "Pick one.": "C", "59 + 63": "122", "2 + 2": "It is 5.",
           "France": "paris"}


def _scripted(calls):
    enc = harmony_encoding()

    def fake(prompts):
        calls.append(len(prompts))
        outs = []
        for p in prompts:
            text = gj.harmony.decode(p)
            assert text.endswith("<|start|>assistant") and "Reasoning: low" in text
            reply = next(v for k, v in REPLIES.items() if k in text)
            outs.append(enc.encode(f"<|channel|>analysis<|message|>thinking<|end|><|start|>assistant<|channel|>"
                                   f"final<|message|>{reply}<|return|>", allowed_special="all"))
        return outs

    return fake


def test_task_loop_scripted_and_resume(tmp_path):
    out = tmp_path / "res.jsonl"
    calls = []
    s = T.evaluate_tasks(None, TASKS[:3], out, generate_fn=_scripted(calls), batch_size=2, progress=False)
    assert calls == [2, 1]
    assert (s["n"], s["correct"], s["resumed"]) == (3, 2, 0)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["mc-1", "mc-2", "em-1"]
    assert rows[0] == {"id": "mc-1", "kind": "multiple_choice", "expected": "B", "prediction": "B", "correct": True,
                       "content": "The answer is B.", "reasoning": "thinking", "completion_tokens": rows[0][
                           "completion_tokens"], "finish_reason": "stop"}
    assert (rows[1]["expected"], rows[1]["prediction"], rows[1]["correct"]) == ("A", "C", False)
    assert (rows[2]["kind"], rows[2]["expected"], rows[2]["correct"]) == ("exact_match", "122", True)

    # A kill mid-append leaves a partial line: it is dropped, and only the missing ids run.
    with open(out, "a") as f:
        f.write('{"id": "em-2", "kind": "exa')
    calls.clear()
    s = T.evaluate_tasks(None, TASKS, out, generate_fn=_scripted(calls), batch_size=4, progress=False)
    assert calls == [2]
    assert (s["n"], s["correct"], s["resumed"], s["unanswered"]) == (5, 3, 3, 0)
    assert s["accuracy"] == 3 / 5 and s["ci95"] == list(T.wilson_interval(3, 5))
    assert s["by_kind"]["multiple_choice"]["correct"] == 1 and s["by_kind"]["exact_match"]["correct"] == 2
    assert [r["prediction"] for r in s["results"]] == ["B", "C", "122", "5", "paris"]
    assert len(out.read_text().splitlines()) == 5
    calls.clear()
    assert T.evaluate_tasks(None, TASKS, out, generate_fn=_scripted(calls), progress=False)["resumed"] == 5
    assert calls == []


def test_tasks_cli_on_a_tiny_checkpoint(checkpoint, tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    out = tmp_path / "res.jsonl"
    args = ["eval", "tasks", "--checkpoint", str(checkpoint), "--tasks", str(tasks), "--out", str(out),
            "--max-new-tokens", "3", "--batch-size", "4", "--limit", "3", "--no-progress"]
    assert cli_main(args) == 0
    assert "accuracy" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["mc-1", "mc-2", "em-1"]
    for r in rows:
        assert set(r) == {"id", "kind", "expected", "prediction", "correct", "content", "reasoning",
                          "completion_tokens", "finish_reason"}
        assert 1 <= r["completion_tokens"] <= 3 and isinstance(r["correct"], bool)
    summary = json.loads((tmp_path / "res.jsonl.summary.json").read_text())
    assert summary["n"] == 3 and summary["resumed"] == 0 and 0 <= summary["ci95"][0] <= summary["ci95"][1] <= 1
    assert cli_main(args) == 0  # everything read back, nothing generated
    assert json.loads((tmp_path / "res.jsonl.summary.json").read_text())["resumed"] == 3
    assert len(out.read_text().splitlines()) == 3

    # A successful `eval perplexity` runs in tests/test_bench_all.py (through bench_all.py); here the errors.
    data = tmp_path / "doc.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    assert cli_main(["eval", "perplexity", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nope.txt")]) == 2
    assert cli_main(["eval", "tasks", "--checkpoint", str(checkpoint), "--tasks", str(data), "--out",
                     str(tmp_path / "x.jsonl")]) == 2  # not a task file: one error line
