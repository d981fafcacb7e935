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
    """16 held-out problems (never trained on), greedy, in one batch: every reply has its analysis and final
    channels; the sums, the column working, the calculator calls and the answers after the tool's result are right.
    demo/eval.json measures 100% on 200 such problems; one miss in 16 is allowed because greedy paths can move with
    the batch's shapes."""
    summary = demo.evaluate(demo_model, 16, batch_size=16)
    assert all(r["answer"] and r["reasoning"] for r in summary["results"])
    assert summary["tool_call_made"]["correct"] == 16
    for key in ("accuracy", "working_exact", "tool_call_correct", "tool_success"):
        assert summary[key]["correct"] >= 15, (key, summary[key])


@pytest.mark.demo
def test_generate_defaults_to_the_demo_model(demo_model, capsys):
    """What `make demo` prints on a fresh clone: the worked answer, right."""
    from gptoss_jax.cli import main

    assert main(["generate", "--prompt", "What is 48 + 79?", "--temperature", "0", "--max-new-tokens", "200"]) == 0
    out, err = capsys.readouterr()
    assert "no --checkpoint: the demo model gptoss-demo" in err
    assert "48 has the digits 4 8. 79 has the digits 7 9." in out and "so the sum is 127." in out
    assert out.strip().splitlines()[-1] == "48 + 79 = 127."


def test_a_missing_demo_model_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from gptoss_jax.cli import main

    monkeypatch.setattr(demo, "DEMO_CHECKPOINT", tmp_path / "gptoss-demo")
    assert main(["chat"]) == 2
    err = capsys.readouterr().err
    assert f"the demo model is not at {tmp_path / 'gptoss-demo'}" in err and "make demo-model" in err


@pytest.mark.demo
def test_the_demo_recipe_end_to_end_at_a_small_size(tmp_path):
    """`make demo-model`'s commands at a small size: data, the untrained model, `finetune --compact-vocab`, the
    export. The export holds the full vocabulary, and its full-softmax loss on the evaluation data is the run's
    compact-vocabulary eval loss (up to the export's bf16 rounding)."""
    import jax.numpy as jnp
    from flax import nnx

    import gptoss_jax as gj
    from gptoss_jax.cli import main
    from gptoss_jax.train.data import pack
    from gptoss_jax.train.step import make_eval_step
    from gptoss_jax.train.trainer import evaluate

    paths = demo.make_data(tmp_path / "data", n_train=24, n_eval=6)
    init = demo.init_checkpoint(tmp_path / "init", list(paths.values()))
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["finetune", "--checkpoint", str(init), "--data", str(paths["train"]), "--eval-data",
                 str(paths["eval"]), "--out", str(run), "--compact-vocab", "--steps", "4", "--batch-size", "2",
                 "--seq-len", "512", "--lr", "3e-3", "--warmup", "1", "--dtype", "float32", "--remat", "none",
                 "--eval-every", "4", "--no-progress"]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert main(["convert", "--checkpoint", str(run), "--out", str(out), "--format", "hf", "--experts", "bf16"]) == 0

    model = gj.load_model(out, dtype=jnp.float32, experts="dense")
    assert model.config.vocab_size == gj.ModelConfig.demo().vocab_size
    unembed = np.asarray(model.unembedding[...])
    unused = np.setdiff1d(np.arange(unembed.shape[0]), demo.task_tokens(paths.values()))
    assert unembed[unused[0]].any() and (unembed[unused] == unembed[unused[0]]).all()  # trained, still tied
    graphdef, params = nnx.split(model)
    full_loss = evaluate(make_eval_step(graphdef), params, pack(read_jsonl(paths["eval"], 512)[0], 512), 2)
    assert full_loss == pytest.approx(metrics[-1]["eval_loss"], rel=2e-2)


def test_demo_command_errors_name_the_problem(tmp_path, capsys):
    assert demo.N_HELD_OUT == 800
    for n in ("0", "801"):
        with pytest.raises(SystemExit) as e:
            demo.main(["eval", "--n", n])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"--n must be 1 to 800 (the problems never trained on), got {n}" in err
    assert demo.main(["init", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "init")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nowhere' / 'train.jsonl'} does not exist" in err and "gptoss_jax.demo data" in err
    assert demo.main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert f"demo eval: error: {tmp_path} is neither" in capsys.readouterr().err
