"""Offline batch inference (`gptoss-jax batch`): records in, completions or errors out, resume after an
interruption."""

from __future__ import annotations

import json

from gptoss_jax.server.batch import done_ids, run_batch


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def _read(path):
    return {json.dumps(r["recordId"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_batch_records_errors_and_resume(tmp_path, engine):
    msg = lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 3, "seed": 1}  # noqa: E731
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [
        {"recordId": "a", "modelInput": msg("one")},
        {"recordId": 2, "modelInput": msg("two")},
        {"recordId": "bad-role", "modelInput": {"messages": [{"role": "robot", "content": "x"}]}},
        {"recordId": "too-long", "modelInput": {**msg("x"), "max_tokens": 10**6}},
        "{torn json",
        {"recordId": "a", "modelInput": msg("dup")},
    ])
    counts = run_batch(engine, inp, out, served_model=engine.model_name, progress=False)
    assert counts == {"done": 2, "errors": 4, "skipped": 0}
    got = _read(out)
    for rid in ('"a"', "2"):
        completion = got[rid]["modelOutput"]
        assert completion["object"] == "chat.completion" and completion["usage"]["completion_tokens"] == 3
        assert completion["choices"][0]["finish_reason"] == "length"
    assert got['"bad-role"']["error"]["param"] == "messages[0].role"
    assert got['"too-long"']["error"]["code"] == "context_length_exceeded"
    assert "invalid JSON" in got["null"]["error"]["message"]
    assert len(out.read_text().splitlines()) == 6  # the duplicate "a" got its own error line

    # Interrupted run: a torn last line and a record not yet done. The rerun cuts the torn line, skips what
    # is done and runs the rest; the same seed gives the same completion as before.
    first_a = got['"a"']["modelOutput"]["choices"][0]["message"]["content"]
    kept = [line for line in out.read_text().splitlines() if json.loads(line)["recordId"] != "a"]
    out.write_text("\n".join(kept) + '\n{"recordId": "a", "modelOu')
    assert '"a"' not in done_ids(out) and out.read_text().endswith("\n")
    _write(inp, [{"recordId": "a", "modelInput": msg("one")}, {"recordId": 2, "modelInput": msg("two")}])
    counts = run_batch(engine, inp, out, served_model=engine.model_name, progress=False)
    assert counts == {"done": 1, "errors": 0, "skipped": 1}
    assert _read(out)['"a"']["modelOutput"]["choices"][0]["message"]["content"] == first_a


def test_batch_cli_arguments(tmp_path):
    """The `batch` subcommand's parser (registered in gptoss_jax.cli); a missing input fails before any
    model is loaded, with the error the CLI prints as one line."""
    import argparse

    import pytest

    from gptoss_jax.server.cli import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["batch", "--checkpoint", str(tmp_path), "--input", str(tmp_path / "none.jsonl"),
                              "--output", str(tmp_path / "o.jsonl"), "--max-batch", "4"])
    assert args.max_batch == 4 and args.prefill_chunk == 512
    with pytest.raises(FileNotFoundError, match="no such file"):
        args.func(args)
    serve = parser.parse_args(["serve", "--checkpoint", "x"])
    assert serve.host == "127.0.0.1" and serve.port == 8000 and serve.api_key is None
