"""`gptoss-jax finetune` end to end: the loss falls on a learnable task, a run killed with SIGKILL resumes to the
same numbers as an uninterrupted one, bad input and a mismatched run folder give clear errors, and export works.

Every run here trains in the compact vocabulary (`--compact-vocab`, gptoss_jax.train.vocab: the same losses as the
full 201,088 tokens when the unseen tokens' unembedding rows are tied, as the starting checkpoint's are here), so
a run's compile and its checkpoints hold ~70 vocabulary rows, not 201,088: the run folder, resume, divergence and
export do not depend on the vocabulary's size. Fine-tuning in the full vocabulary, through the same trainer, runs
in notebooks/04_finetune.ipynb (e2e tier, resumed too) and tests/test_finetune_parity.py (parity tier)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, write_echo_data):
    import jax.numpy as jnp

    import gptoss_jax as gj
    from gptoss_jax.checkpoint import write_random_checkpoint
    from gptoss_jax.config import ModelConfig
    from gptoss_jax.train.data import read_jsonl
    from gptoss_jax.train.vocab import CompactVocab

    root = tmp_path_factory.mktemp("finetune")
    write_echo_data(root / "train.jsonl", 48, 0)
    write_echo_data(root / "eval.jsonl", 6, 1)
    # a random tiny checkpoint whose unembedding rows of the tokens the data never shows are all equal
    write_random_checkpoint(ModelConfig.tiny(), root / "random", progress=False)
    model = gj.load_model(root / "random", jnp.float32, progress=False)
    used = np.asarray(CompactVocab.of([ex.tokens for name in ("train.jsonl", "eval.jsonl")
                                       for ex in read_jsonl(root / name, 128)[0]], model.config.vocab_size).used)
    unemb = np.asarray(model.unembedding[...])
    tied = np.broadcast_to(unemb[0], unemb.shape).copy()
    tied[used] = unemb[used]
    model.unembedding[...] = jnp.asarray(tied)
    gj.save_checkpoint(model, root / "ckpt", format="original", progress=False)
    # the runs share the session's compilation cache (tests/conftest.py), or one of their own
    env = {"JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1", **os.environ, "JAX_PLATFORMS": "cpu"}
    if not env["JAX_COMPILATION_CACHE_DIR"]:
        env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax-cache")
    return root, env


def _cmd(root: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "gptoss_jax.cli", "finetune", "--checkpoint", str(root / "ckpt"),
            "--data", str(root / "train.jsonl"), "--eval-data", str(root / "eval.jsonl"), "--out", str(out),
            "--steps", str(STEPS), "--save-every", "2", "--eval-every", "4", "--batch-size", "4", "--seq-len", "128",
            "--lr", "3e-3", "--warmup", "1", "--dtype", "float32", "--compact-vocab", "--no-progress", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    root, env = setup
    out = root / "run-a"
    subprocess.run(_cmd(root, out, "--tensorboard"), env=env, check=True, capture_output=True, timeout=600)
    return _metrics(out)


def test_loss_falls_and_metrics_are_logged(setup, uninterrupted):
    m = uninterrupted
    assert list((setup[0] / "run-a" / "tensorboard").glob("events.out.tfevents.*"))
    assert [x["step"] for x in m] == list(range(1, STEPS + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"):
        assert all(key in x for x in m), key
    assert "eval_loss" in m[3] and "eval_loss" in m[7] and "eval_loss" not in m[0]
    assert m[-1]["loss"] < 0.6 * m[0]["loss"], [x["loss"] for x in m]
    assert m[-1]["eval_loss"] < m[3]["eval_loss"]
    assert m[0]["lr"] == 0.0 and m[1]["lr"] == pytest.approx(3e-3)  # warmup, then cosine decay
    assert m[-1]["tokens_seen"] == sum(x["tokens"] for x in m)


def test_sigkill_then_resume_gives_the_same_run(setup, uninterrupted):
    root, env = setup
    out = root / "run-b"
    proc = subprocess.Popen(_cmd(root, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    try:
        while not (out / "checkpoints" / "4").exists():  # orbax renames a checkpoint into place once complete
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(_cmd(root, out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming at step" in done.stdout
    resumed = _metrics(out)
    assert [x["step"] for x in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(uninterrupted, resumed):
        for key in ("loss", "lr", "grad_norm", "tokens_seen", "eval_loss"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))


def test_export_from_the_run(setup, uninterrupted, tmp_path):
    root, env = setup
    from gptoss_jax.cli import main

    assert main(["convert", "--checkpoint", str(root / "run-a"), "--out", str(tmp_path / "hf"), "--format", "hf",
                 "--experts", "bf16"]) == 0
    assert main(["convert", "--checkpoint", str(root / "run-a"), "--out", str(tmp_path / "orig"),
                 "--format", "original"]) == 0
    import jax.numpy as jnp

    import gptoss_jax as gj
    from gptoss_jax.train.trainer import load_run
    from gptoss_jax.train.vocab import CompactVocab

    trained = load_run(root / "run-a", jnp.float32)  # in the run's compact vocabulary
    vocab = CompactVocab.load(root / "run-a")
    assert trained.config.vocab_size == vocab.size
    exported = gj.load_model(tmp_path / "hf", jnp.float32, progress=False)
    assert exported.config.vocab_size == vocab.full_size
    tokens = np.asarray(vocab.used)[None, :35]
    full, compact = np.asarray(exported(tokens)), np.asarray(trained(vocab.encode(tokens)))
    unseen = np.setdiff1d(np.arange(vocab.full_size), vocab.used)
    # bf16 experts in the HF layout: the exported model is the trained one rounded to bf16; the tokens the run
    # saw have its logits, every other token the tied row's
    np.testing.assert_allclose(full[..., list(vocab.used)], compact[..., :-1], atol=0.15, rtol=0.05)
    some_unseen = full[..., unseen[::997]]
    np.testing.assert_allclose(some_unseen, np.broadcast_to(compact[..., -1:], some_unseen.shape), atol=0.15,
                               rtol=0.05)
    reloaded = gj.load_model(tmp_path / "orig", jnp.float32, progress=False)
    assert reloaded.config == dataclasses.replace(trained.config, vocab_size=vocab.full_size)


def test_a_different_configuration_in_out_is_refused(setup, uninterrupted, capsys):
    root, _ = setup
    from gptoss_jax.cli import main

    args = _cmd(root, root / "run-a")[3:]
    args[args.index("--lr") + 1] = "1e-4"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different configuration (lr: run has 0.003, now 0.0001)" in err


def test_bad_data_names_file_and_line(setup, tmp_path, capsys):
    root, _ = setup
    from gptoss_jax.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text((root / "train.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    args = _cmd(root, tmp_path / "out")[3:]
    args[args.index("--data") + 1] = str(bad)
    assert main(args) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_a_diverging_run_stops_with_the_last_good_checkpoint(setup):
    root, env = setup
    out = root / "run-nan"
    cmd = _cmd(root, out)
    for flag, value in (("--lr", "1e12"), ("--warmup", "0"), ("--save-every", "1"), ("--steps", "6")):
        cmd[cmd.index(flag) + 1] = value
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "stopping; the newest good checkpoint is step" in done.stderr
    good = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    logged = _metrics(out)
    assert good and good[-1] == len(logged) and all(np.isfinite(x["loss"]) for x in logged)
