"""The demo task (gptoss_jax.demo): its data, its untrained model, and the committed demo model's answers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from safetensors.numpy import load_file

from gptoss_jax import demo, harmony
from gptoss_jax.evals import tasks
from gptoss_jax.train.data import read_jsonl, render_example


def test_working_is_the_column_addition():
    text = demo.working(4567, 89)
    assert text.splitlines() == [
        "4567 has the digits 4 5 6 7. 89 has the digits 8 9.",
        "Adding column by column from the ones:",
        "7 + 9 + 0 = 16, write 6, carry 1.",
        "6 + 8 + 1 = 15, write 5, carry 1.",
        "5 + 0 + 1 = 6, write 6, carry 0.",
        "4 + 0 + 0 = 4, write 4, carry 0.",
        "The digits are 4 6 5 6, so the sum is 4656.",
    ]
    assert demo.working(95, 7).splitlines()[-2:] == ["The last carry 1 is the leading digit.",
                                                      "The digits are 1 0 2, so the sum is 102."]


@pytest.mark.parametrize("expression, value", [("345 + 678", "1023"), (" 12-30 ", "-18"), ("7 * 3", None)])
def test_calculator(expression, value):
    out = demo.calculator(expression)
    assert out == value if value is not None else out.startswith("error: cannot evaluate '7 * 3'")


def test_each_kind_renders_with_the_loss_on_the_answer():
    rng = random.Random(0)
    for kind in demo.KINDS:
        rec = demo.record(rng, 345, 678, kind)
        ex = render_example(rec)
        trained = harmony.decode(ex.tokens[ex.loss_mask].tolist())
        prompt = harmony.decode(ex.tokens[~ex.loss_mask].tolist())
        assert "1023" in trained and ("1023" in prompt) == (kind in ("tool", "choice"))  # tool result, choices
        assert ("<|call|>" in trained) == (kind == "tool")
        if kind == "choice":
            letter = trained.rsplit("<|message|>", 1)[1].removesuffix("<|return|>")
            assert f"\n{letter}. 1023\n" in rec["messages"][0]["content"]
        if kind == "exact":
            assert rec["messages"][0]["content"].endswith(tasks.EXACT_INSTRUCTION)
            assert rec["messages"][-1]["content"] == "1023"
    with pytest.raises(ValueError, match="kind must be one of"):
        demo.record(rng, 1, 2, "subtract")


def test_data_files_and_held_out_problems(tmp_path):
    paths = demo.make_data(tmp_path, n_train=40, n_eval=10, seed=3)
    train, _ = read_jsonl(paths["train"], 512)
    assert len(train) == 40
    asked = [json.loads(line)["messages"][0]["content"] for line in paths["eval"].read_text().splitlines()]
    assert len(asked) == 10 and not set(asked) & {json.loads(line)["messages"][0]["content"]
                                                  for line in paths["train"].read_text().splitlines()}
    problems = demo.problems(500, 1)
    assert len(set(problems)) == 500
    assert all(len(str(x)) in demo.DIGITS for p in problems for x in p)
    held = demo.held_out(50)
    assert not set(held) & set(demo.problems(demo.N_TRAIN, demo.DATA_SEED))


def test_untrained_model_keeps_unseen_rows_compressible(tmp_path):
    paths = demo.make_data(tmp_path / "data", n_train=20, n_eval=4)
    out = demo.init_checkpoint(tmp_path / "init", list(paths.values()))
    tensors = load_file(out / "model.safetensors")
    used = demo.task_tokens(paths.values())
    embed = tensors["embedding.weight"].astype(np.float32)
    assert np.abs(embed[used]).min(axis=1).max() > 0 and np.count_nonzero(np.abs(embed[used]).sum(axis=1)) == len(used)
    unused = np.setdiff1d(np.arange(embed.shape[0]), used)
    assert not embed[unused].any()
    unembed = tensors["unembedding.weight"].astype(np.float32)
    assert not unembed[unused].any()  # tied (all zero): `finetune --compact-vocab` relies on it
    ratio = unembed[used] / np.where(embed[used] == 0, np.nan, embed[used])  # used rows: the embedding, scaled
    assert np.nanstd(ratio) < 0.02 * abs(np.nanmean(ratio))


@pytest.fixture(scope="module")
def demo_model():
    if not (demo.DEMO_CHECKPOINT / "config.json").is_file():
        pytest.fail(f"the committed demo model is missing at {demo.DEMO_CHECKPOINT}")
    import gptoss_jax as gj

    return gj.load_model(demo.DEMO_CHECKPOINT)


@pytest.mark.demo
def test_committed_demo_model_answers_in_harmony(demo_model):
    """16 held-out problems (never trained on), greedy: every reply has its analysis and final channels and a
    calculator call when the tool is offered, and some sums, workings and calls are right. The model is right on
    ~28% of problems (demo/eval.json, 200 problems): these floors catch a broken model, not that figure, because
    greedy paths of an undertrained model move with the batch's shapes."""
    summary = demo.evaluate(demo_model, 16, batch_size=16)
    assert all(r["answer"] and r["reasoning"] for r in summary["results"])
    assert summary["tool_call_made"]["correct"] == 16
    for key in ("accuracy", "working_exact", "tool_call_correct"):
        assert summary[key]["correct"] >= 1, key


@pytest.mark.demo
def test_generate_defaults_to_the_demo_model(demo_model, capsys):
    from gptoss_jax.cli import main

    assert main(["generate", "--prompt", "What is 48 + 79?", "--temperature", "0", "--max-new-tokens", "200"]) == 0
    out, err = capsys.readouterr()
    assert "no --checkpoint: the demo model gptoss-demo" in err
    assert "48 has the digits 4 8." in out and "48 + 79 = " in out.strip().splitlines()[-1]


def test_a_missing_demo_model_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from gptoss_jax.cli import main

    monkeypatch.setattr(demo, "DEMO_CHECKPOINT", tmp_path / "gptoss-demo")
    assert main(["chat"]) == 2
    err = capsys.readouterr().err
    assert f"the demo model is not at {tmp_path / 'gptoss-demo'}" in err and "make demo-model" in err
