"""The `gptoss-jax` command line, run in-process through `gptoss_jax.cli.main`."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors.numpy can read bf16 tensors)
import numpy as np
import pytest
from safetensors.numpy import load_file

import gptoss_jax as gj
from gptoss_jax.cli import main

TINY = ["--preset", "tiny", "--set", "vocab_size=512"]
PROMPT = "x=1"  # o200k ids 87, 28, 16: inside the tiny vocabulary
RANK_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d\.\d{4})\s+(['\"].*['\"])$")


def run(argv, capsys):
    """(exit code, stdout, stderr) of `gptoss-jax argv`."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def inits(tmp_path_factory):
    """`init` in both formats, once: {"original", "hf"} -> (folder, stdout). capsys is function-scoped, so the
    output is captured by hand."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("cli")
    out = {}
    for fmt in ("original", "hf"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            code = main(["init", *TINY, "--format", fmt, "--seed", "3", "--out", str(root / fmt)])
        assert code == 0
        out[fmt] = (root / fmt, buf.getvalue())
    return out


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_init_writes_a_checkpoint(inits, fmt):
    folder, stdout = inits[fmt]
    assert f"{fmt} layout" in stdout and str(folder) in stdout and "parameters" in stdout
    layout = gj.find_layout(folder)
    assert layout.format == fmt and layout.experts == "mxfp4"
    assert layout.config.vocab_size == 512
    assert layout.config == dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512)


def test_init_same_seed_same_weights_in_both_layouts(inits):
    a = load_file(inits["hf"][0] / "model.safetensors")
    assert a["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    b = load_file(inits["original"][0] / "model.safetensors")
    np.testing.assert_array_equal(a["lm_head.weight"], b["unembedding.weight"])


def test_init_overwrite(tmp_path, capsys):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    code, out, err = run(["init", *TINY, "--out", str(dest), "--overwrite"], capsys)
    assert code == 0
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]


def test_convert(inits, tmp_path, capsys):
    src = inits["original"][0]
    dest = tmp_path / "hf"
    code, out, err = run(["convert", "--checkpoint", str(src), "--out", str(dest), "--format", "hf"], capsys)
    assert code == 0
    assert "original layout" in out and "hf layout" in out and str(dest) in out
    converted, direct = load_file(dest / "model.safetensors"), load_file(inits["hf"][0] / "model.safetensors")
    assert sorted(converted) == sorted(direct)
    for name in direct:
        assert converted[name].tobytes() == direct[name].tobytes(), name
    assert json.loads((dest / "config.json").read_text()) == json.loads((inits["hf"][0] / "config.json").read_text())


def test_convert_to_bf16_experts(inits, tmp_path, capsys):
    dest = tmp_path / "hfb"
    code, out, err = run(["convert", "--checkpoint", str(inits["hf"][0]), "--out", str(dest), "--format", "hf",
                          "--experts", "bf16"], capsys)
    assert code == 0 and "bf16 experts" in out
    layout = gj.find_layout(dest)
    assert layout.format == "hf" and layout.experts == "dense"


def _rank_lines(out: str):
    lines = out.splitlines()
    assert lines[0] == f"prompt: {PROMPT!r} (3 tokens)"
    assert lines[1].split() == ["rank", "token", "id", "probability", "text"]
    return [RANK_LINE.match(line) for line in lines[2:]], lines[2:]


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_next_token(inits, capsys, fmt):
    folder = inits[fmt][0]
    code, out, err = run(["next-token", "--checkpoint", str(folder), "--prompt", PROMPT, "--dtype", "float32"],
                         capsys)
    assert code == 0, err
    matches, lines = _rank_lines(out)
    assert len(lines) == 5 and all(matches), lines
    ranks = [int(m.group(1)) for m in matches]
    ids = [int(m.group(2)) for m in matches]
    probs = [float(m.group(3)) for m in matches]
    assert ranks == [1, 2, 3, 4, 5]
    assert len(set(ids)) == 5 and all(0 <= t < 512 for t in ids)
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    # The same ranking as the library's forward pass.
    model = gj.load_model(folder, dtype=jnp.float32, progress=False)
    p = np.asarray(jax.nn.softmax(model(np.asarray([[87, 28, 16]]))[0, -1]))
    assert ids == list(np.argsort(-p)[:5])
    np.testing.assert_allclose(probs, p[ids], atol=6e-5)


def test_next_token_top_k(inits, capsys):
    code, out, err = run(["next-token", "--checkpoint", str(inits["original"][0]), "--prompt", PROMPT,
                          "--top-k", "3"], capsys)
    assert code == 0
    matches, lines = _rank_lines(out)
    assert len(lines) == 3 and all(matches)


# ---- --help ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    ([], ["init", "convert", "next-token", "gptoss-jax"]),
    (["init"], ["--preset", "--out", "--format", "--seed", "--set", "KEY=VALUE", "--overwrite"]),
    (["convert"], ["--checkpoint", "--out", "--format", "--experts", "--overwrite", "bf16"]),
    (["next-token"], ["--checkpoint", "--prompt", "--top-k", "--dtype", "float32"]),
])
def test_help(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gptoss-jax")
    for w in words:
        assert w in out


# ---- bad input ---------------------------------------------------------------------------------------------------
def _one_line_error(err: str, command: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"gptoss-jax {command}: error: ")
    return lines[0]


@pytest.mark.parametrize("command, extra", [
    ("next-token", ["--prompt", PROMPT]),
    ("convert", ["--out", "OUT", "--format", "hf"]),
])
def test_nonexistent_checkpoint(tmp_path, capsys, command, extra):
    missing = tmp_path / "missing"
    extra = [str(tmp_path / "out") if a == "OUT" else a for a in extra]
    code, out, err = run([command, "--checkpoint", str(missing), *extra], capsys)
    assert code == 2
    line = _one_line_error(err, command)
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, words", [
    ("nosuchfield=1", ["--set nosuchfield", "not a ModelConfig field"]),
    ("vocab_size=lots", ["--set vocab_size=lots", "must be a number"]),
    ("hidden_size=48", ["hidden_size (48)", "multiple of 32"]),
])
def test_init_bad_override(tmp_path, capsys, override, words):
    code, out, err = run(["init", *TINY, "--set", override, "--out", str(tmp_path / "x")], capsys)
    assert code == 2
    line = _one_line_error(err, "init")
    for w in words:
        assert w in line
    assert not (tmp_path / "x").exists()


def test_init_into_non_empty_folder(tmp_path, capsys):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    code, out, err = run(["init", *TINY, "--out", str(dest)], capsys)
    assert code == 2
    line = _one_line_error(err, "init")
    assert str(dest) in line and "--overwrite" in line
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and (dest / "keep.txt").read_text() == "mine"


def test_convert_into_non_empty_folder(inits, tmp_path, capsys):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    code, out, err = run(["convert", "--checkpoint", str(inits["hf"][0]), "--out", str(dest), "--format",
                          "original"], capsys)
    assert code == 2 and "--overwrite" in _one_line_error(err, "convert")
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_convert_bf16_into_original_is_refused(inits, tmp_path, capsys):
    code, out, err = run(["convert", "--checkpoint", str(inits["hf"][0]), "--out", str(tmp_path / "o"),
                          "--format", "original", "--experts", "bf16"], capsys)
    assert code == 2 and "MXFP4" in _one_line_error(err, "convert")
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint(inits, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(inits["original"][0], tmp_path / "bad")
    (folder / "config.json").write_text("{")
    code, out, err = run(["next-token", "--checkpoint", str(folder), "--prompt", PROMPT], capsys)
    assert code == 2 and "not valid JSON" in _one_line_error(err, "next-token")


@pytest.mark.parametrize("top_k", ["0", "-1"])
def test_next_token_bad_top_k(inits, capsys, top_k):
    code, out, err = run(["next-token", "--checkpoint", str(inits["original"][0]), "--prompt", PROMPT,
                          "--top-k", top_k], capsys)
    assert code == 2 and "--top-k" in _one_line_error(err, "next-token")


def test_next_token_prompt_outside_the_vocabulary(inits, capsys):
    code, out, err = run(["next-token", "--checkpoint", str(inits["original"][0]), "--prompt", "hello world"],
                         capsys)
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]  # (after the loading progress bar)
    assert last.startswith("gptoss-jax next-token: error: ") and "[0, 512)" in last


def test_missing_required_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["init"])
    assert info.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [(["--no-transformers"], "matplotlib"), ([], "transformers")])
def test_bench_without_its_extra_says_so_before_measuring(monkeypatch, capsys, argv, named):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("matplotlib", "transformers") else real(name, *a))
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and "gptoss-jax[bench]" in err and err.startswith("error:")
