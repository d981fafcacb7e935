"""Offline batch inference: `gptoss-jax batch --checkpoint DIR --input IN.jsonl --output OUT.jsonl`.

Each input line is `{"recordId": ..., "modelInput": <chat-completions request body>}`; each output line is
`{"recordId": ..., "modelOutput": <chat.completion object>}` or `{"recordId": ..., "error": {"message", "type",
"param", "code"}}`. All records run through one continuous-batching engine (`max_batch` at a time); results are
appended to OUT as they finish (so OUT's order is completion order) and flushed line by line. A rerun skips the
records whose recordId is already in OUT (a torn last line from an interruption is cut off first), so an
interrupted job resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gptoss_jax.server.chat import BadRequest, completion_object, error_object, output_request, prepare_chat
from gptoss_jax.engine import Engine, QueueFull


def _records(path: Path) -> Iterator[tuple[int, Any, Any]]:
    """(line number, recordId, modelInput or an error message)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, f"line {n}: invalid JSON ({e})"
                continue
            if not isinstance(rec, dict) or "recordId" not in rec:
                yield n, None, f"line {n}: expected an object with recordId and modelInput"
                continue
            yield n, rec["recordId"], rec.get("modelInput")


def done_ids(out: Path) -> set:
    """The recordIds already in OUT; a torn last line (no newline or invalid JSON) is truncated away."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything up to the last complete line
    ids = set()
    good = 0
    for line in data[:keep].splitlines(keepends=True):
        try:
            ids.add(json.dumps(json.loads(line)["recordId"]))
            good += len(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    if good < len(data):
        with open(out, "r+b") as f:
            f.truncate(good)
    return ids


def run_batch(engine: Engine, input_path: str | os.PathLike, output_path: str | os.PathLike, *,
              served_model: str | None = None, progress: bool = True) -> dict:
    """Run every record of `input_path` not yet in `output_path`; returns counts {"done", "errors", "skipped"}."""
    from tqdm.auto import tqdm

    inp, out = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise FileNotFoundError(f"no input file {inp}")
    served = served_model or engine.model_name
    finished = done_ids(out)
    records = list(_records(inp))
    seen: set = set()
    todo = []
    skipped = 0
    for n, rid, body in records:
        key = json.dumps(rid)
        if rid is None:  # an unreadable line: body is the error message
            todo.append((None, None, body))
            continue
        if key in finished:
            skipped += 1
            continue
        if key in seen:
            todo.append((rid, None, f"line {n}: duplicate recordId {rid!r}"))
            continue
        seen.add(key)
        todo.append((rid, body, None))
    lock = threading.Lock()
    counts = {"done": 0, "errors": 0, "skipped": skipped}
    bar = tqdm(total=len(todo), desc="batch", unit="rec", disable=not progress)
    with open(out, "a", encoding="utf-8") as f:
        def write(rec: dict, error: bool) -> None:
            with lock:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                counts["errors" if error else "done"] += 1
                bar.update(1)

        pending = []
        for rid, body, err in todo:
            if err is not None:
                write({"recordId": rid, "error": error_object(err)["error"]}, True)
                continue
            try:
                job = prepare_chat(body, engine, served_model=served)
                if job.stream:
                    raise BadRequest("stream is not supported in batch records", "stream", "unsupported_value")
            except BadRequest as e:
                write({"recordId": rid, "error": e.to_dict()["error"]}, True)
                continue
            pending.append(_submit(engine, job, rid, write))
        for req in pending:
            req.done.wait()
    bar.close()
    return counts


def _submit(engine: Engine, job, rid, write):
    out, req = output_request(job)

    def on_finish(reason, error):
        if error:
            write({"recordId": rid, "error": error_object(error, type="server_error")["error"]}, True)
            return
        out.close()
        write({"recordId": rid, "modelOutput": completion_object(job, out, reason)}, False)

    req.on_finish = on_finish
    while True:  # the engine's queue is bounded: wait for room
        try:
            return engine.submit(req)
        except QueueFull:
            threading.Event().wait(0.05)
