"""`gptoss-jax generate` and `chat` in-process on a tiny random checkpoint with the full Harmony vocabulary."""

import io

import pytest

from gptoss_jax.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    assert main(["init", "--preset", "tiny", "--out", str(root / "tiny")]) == 0
    assert main(["init", "--preset", "tiny", "--out", str(root / "short"), "--set", "initial_context_length=64",
                 "--set", "rope_scaling_factor=1"]) == 0
    return root


def run(argv, capsys, stdin=None, monkeypatch=None):
    capsys.readouterr()
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_chat_streams_the_reply_and_is_seeded(ckpt, capsys):
    argv = ["generate", "--checkpoint", str(ckpt / "tiny"), "--prompt", "What is 2+2?", "--max-new-tokens", "12",
            "--seed", "4"]
    code, out, err = run(argv, capsys)
    assert code == 0 and out.strip()
    assert "[answer]" in out  # random weights emit no valid Harmony: it degrades to plain answer text
    assert run(argv, capsys)[1] == out  # same seed, same text
    assert run(argv[:-1] + ["5"], capsys)[1] != out


def test_generate_raw_continues_the_prompt(ckpt, capsys):
    code, out, _ = run(["generate", "--checkpoint", str(ckpt / "tiny"), "--prompt", "Once upon a time", "--raw",
                        "--max-new-tokens", "6", "--temperature", "0"], capsys)
    assert code == 0 and out.startswith("Once upon a time") and len(out.strip()) > len("Once upon a time")


def test_chat_keeps_the_conversation_until_eof(ckpt, capsys, monkeypatch):
    code, out, _ = run(["chat", "--checkpoint", str(ckpt / "tiny"), "--max-new-tokens", "4", "--reasoning-effort",
                        "low"], capsys, stdin="hello\n/reset\nhi again\n", monkeypatch=monkeypatch)
    assert code == 0
    assert out.count("[answer]") == 2 and "(conversation cleared)" in out


@pytest.mark.parametrize("extra, words", [
    (["--max-new-tokens", "0"], "max-new-tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-3"], "top_k"),
])
def test_generate_bad_sampling_values(ckpt, capsys, extra, words):
    code, out, err = run(["generate", "--checkpoint", str(ckpt / "tiny"), "--prompt", "hi", *extra], capsys)
    assert code == 2 and words in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_generate_prompt_longer_than_the_context(ckpt, capsys):
    code, _, err = run(["generate", "--checkpoint", str(ckpt / "short"), "--prompt", "hi"], capsys)
    assert code == 2 and "more than the context of 64 tokens" in err


def test_generate_empty_prompt(ckpt, capsys):
    code, _, err = run(["generate", "--checkpoint", str(ckpt / "tiny"), "--prompt", ""], capsys)
    assert code == 2 and "--prompt is empty" in err


@pytest.mark.parametrize("command, words", [
    ("generate", ["--raw", "--max-new-tokens", "--temperature", "--top-p", "--seed", "--reasoning-effort"]),
    ("chat", ["--reasoning-effort", "--system", "--max-new-tokens", "/reset"]),
])
def test_help(command, words, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(w in out for w in words)
