"""The Responses API (`POST /v1/responses`), the shape OpenAI's own gpt-oss server offers: `input` (a string or a
list of message / function_call / function_call_output / reasoning items), `instructions`, `reasoning.effort`,
function `tools`, `max_output_tokens`, `temperature`, `top_p`, `text.format`, `stream` (typed SSE events).
Stateless: `previous_response_id` and `store` are not supported."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from gptoss_jax import harmony
from gptoss_jax.server.chat import (
    BadRequest,
    ChatJob,
    Output,
    _bool,
    _job,
    check_model,
    check_response_format,
    check_sampling,
    check_tools,
    new_id,
)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for k, p in enumerate(content):
            if isinstance(p, Mapping) and p.get("type") in ("input_text", "output_text", "text", "reasoning_text") \
                    and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise BadRequest(f"{where}[{k}]: only text parts are supported", where, "invalid_value")
        return "\n".join(parts)
    raise BadRequest(f"{where} must be a string or a list of text parts", where, "invalid_type")


def to_messages(input: Any, instructions: Any) -> list[dict]:
    messages: list[dict] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string", "instructions", "invalid_type")
        messages.append({"role": "developer", "content": instructions})
    if isinstance(input, str):
        if not input:
            raise BadRequest("'input' is empty", "input", "empty_string")
        return messages + [{"role": "user", "content": input}]
    if input is None:
        raise BadRequest("'input' is required", "input", "missing_required_parameter")
    if not isinstance(input, list) or not input:
        raise BadRequest("'input' must be a string or a non-empty list of items", "input", "invalid_value")
    pending: dict | None = None  # the assistant message collecting reasoning and function calls

    def assistant() -> dict:
        nonlocal pending
        if pending is None:
            pending = {"role": "assistant", "content": None, "tool_calls": []}
            messages.append(pending)
        return pending

    for i, item in enumerate(input):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise BadRequest(f"{where} must be an object", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise BadRequest(f"{where}.role: unknown role {role!r}", f"{where}.role", "invalid_value")
            text = _text_of(item.get("content"), f"{where}.content")
            if role == "assistant":
                a = assistant()
                a["content"] = (a["content"] or "") + text
                pending = None
            else:
                messages.append({"role": role, "content": text})
                pending = None
        elif kind == "reasoning":
            text = _text_of(item.get("content") or [], f"{where}.content")
            assistant()["reasoning_content"] = text
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments"), item.get("call_id") or item.get("id")
            if not isinstance(name, str) or not isinstance(args, str) or not isinstance(call_id, str):
                raise BadRequest(f"{where}: a function_call needs string name, arguments and call_id", where,
                                 "invalid_value")
            assistant()["tool_calls"].append({"id": call_id, "type": "function",
                                              "function": {"name": name, "arguments": args}})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not isinstance(output, str):
                raise BadRequest(f"{where}: a function_call_output needs string call_id and output", where,
                                 "invalid_value")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
            pending = None
        else:
            raise BadRequest(f"{where}.type: unsupported item type {kind!r}", f"{where}.type", "invalid_value")
    for m in messages:
        if m.get("role") == "assistant" and not m.get("tool_calls"):
            m.pop("tool_calls", None)
    return messages


def prepare(body: Any, engine, *, served_model: str) -> tuple[ChatJob, dict]:
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object", None, "invalid_type")
    model = check_model(body, served_model)
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            raise BadRequest(f"'{name}' is not supported: this server is stateless; send the whole input", name,
                             "unsupported_parameter")
    messages = to_messages(body.get("input"), body.get("instructions"))
    reasoning = body.get("reasoning") or {}
    if not isinstance(reasoning, Mapping):
        raise BadRequest("'reasoning' must be an object", "reasoning", "invalid_type")
    effort = reasoning.get("effort") or "medium"
    if effort not in ("low", "medium", "high"):
        raise BadRequest(f"'reasoning.effort' must be 'low', 'medium' or 'high', got {effort!r}", "reasoning.effort",
                         "invalid_value")
    sampling = check_sampling(body, max_tokens_names=("max_output_tokens",))
    tools, forced = check_tools(body.get("tools"), body.get("tool_choice"))
    text = body.get("text") or {}
    fmt, schema = check_response_format(text.get("format") if isinstance(text, Mapping) else None, "text.format")
    try:
        prompt = harmony.render_chat(messages, reasoning_effort=effort, tools=tools)
    except ValueError as e:
        raise BadRequest(str(e), "tools" if str(e).startswith("tools") else "input", "invalid_value") from None
    job = _job(prompt, sampling, engine, model=model, stop=[], stream=_bool(body, "stream"), include_usage=True,
               fmt=fmt, schema=schema, forced_tool=forced, max_tokens_param="max_output_tokens")
    meta = {"id": new_id("resp"), "created_at": int(time.time()), "instructions": body.get("instructions"),
            "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
            "reasoning": {"effort": effort, "summary": None}, "max_output_tokens": sampling["max_tokens"],
            "temperature": job.sampling.temperature, "top_p": job.sampling.top_p,
            "text": {"format": {"type": fmt} if fmt != "json_schema" else text.get("format")},
            "metadata": body.get("metadata") or {}}
    return job, meta


def _items(meta: dict, out: Output) -> list[dict]:
    items = []
    reasoning = "".join(out.reasoning)
    if reasoning:
        items.append({"type": "reasoning", "id": f"rs_{meta['id'][5:]}", "summary": [],
                      "content": [{"type": "reasoning_text", "text": reasoning}], "status": "completed"})
    for c in out.calls:
        items.append({"type": "function_call", "id": f"fc_{c['id']}", "call_id": c["id"], "name": c["name"],
                      "arguments": c["arguments"], "status": "completed"})
    if out.content or not out.calls:
        items.append(_message_item(meta, out.content, "completed"))
    return items


def _message_item(meta: dict, text: str, status: str) -> dict:
    return {"type": "message", "id": f"msg_{meta['id'][5:]}", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def response_object(job: ChatJob, meta: dict, out: Output | None, reason: str | None, *,
                    status: str | None = None) -> dict:
    items = _items(meta, out) if out is not None else []
    if status is None:
        status = "incomplete" if reason == "length" else "completed"
    n = out.n_tokens if out is not None else 0
    return {
        "id": meta["id"], "object": "response", "created_at": meta["created_at"], "status": status,
        "model": job.model, "output": items, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": meta["instructions"], "max_output_tokens": meta["max_output_tokens"],
        "metadata": meta["metadata"], "parallel_tool_calls": False, "previous_response_id": None,
        "reasoning": meta["reasoning"], "store": False, "temperature": meta["temperature"], "text": meta["text"],
        "tool_choice": meta["tool_choice"], "tools": meta["tools"], "top_p": meta["top_p"], "truncation": "disabled",
        "usage": None if out is None else {
            "input_tokens": len(job.prompt), "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(job.prompt) + n},
    }


async def sse(job: ChatJob, meta: dict, events: AsyncIterator[tuple], req) -> AsyncIterator[str]:
    """Typed streaming events: response.created, .in_progress, output_item.added/done, content_part.added/done,
    output_text.delta/done, reasoning_text.delta/done, function_call_arguments.delta/done, response.completed
    (or .incomplete)."""
    seq = 0

    def ev(type_: str, **data) -> str:
        nonlocal seq
        payload = {"type": type_, "sequence_number": seq, **data}
        seq += 1
        return f"event: {type_}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    yield ev("response.created", response=response_object(job, meta, None, None, status="in_progress"))
    yield ev("response.in_progress", response=response_object(job, meta, None, None, status="in_progress"))
    out = Output([])
    index = -1
    current: tuple[str, Any] | None = None  # ("reasoning" | "message" | "call", call index)
    texts: dict = {}

    def open_item(kind: str, key: Any, delta: dict) -> list[str]:
        nonlocal index, current
        evs = close_item()
        index += 1
        current = (kind, key)
        if kind == "reasoning":
            item = {"type": "reasoning", "id": f"rs_{meta['id'][5:]}", "summary": [], "content": [],
                    "status": "in_progress"}
        elif kind == "message":
            item = _message_item(meta, "", "in_progress")
            item["content"] = []
        else:
            c = delta
            item = {"type": "function_call", "id": f"fc_{c['id']}", "call_id": c["id"], "name": c["name"],
                    "arguments": "", "status": "in_progress"}
        texts[(kind, key)] = ""
        evs.append(ev("response.output_item.added", output_index=index, item=item))
        if kind in ("reasoning", "message"):
            part = {"type": "reasoning_text" if kind == "reasoning" else "output_text", "text": ""}
            if kind == "message":
                part["annotations"] = []
            evs.append(ev("response.content_part.added", output_index=index, item_id=item["id"], content_index=0,
                          part=part))
        return evs

    def close_item() -> list[str]:
        nonlocal current
        if current is None:
            return []
        kind, key = current
        text = texts[current]
        current = None
        if kind == "reasoning":
            item_id = f"rs_{meta['id'][5:]}"
            part = {"type": "reasoning_text", "text": text}
            item = {"type": "reasoning", "id": item_id, "summary": [], "content": [part], "status": "completed"}
            return [ev("response.reasoning_text.done", output_index=index, item_id=item_id, content_index=0,
                       text=text),
                    ev("response.content_part.done", output_index=index, item_id=item_id, content_index=0,
                       part=part),
                    ev("response.output_item.done", output_index=index, item=item)]
        if kind == "message":
            item = _message_item(meta, text, "completed")
            part = item["content"][0]
            return [ev("response.output_text.done", output_index=index, item_id=item["id"], content_index=0,
                       text=text, logprobs=[]),
                    ev("response.content_part.done", output_index=index, item_id=item["id"], content_index=0,
                       part=part),
                    ev("response.output_item.done", output_index=index, item=item)]
        c = out.calls[key]
        item = {"type": "function_call", "id": f"fc_{c['id']}", "call_id": c["id"], "name": c["name"],
                "arguments": c["arguments"], "status": "completed"}
        return [ev("response.function_call_arguments.done", output_index=index, item_id=item["id"],
                   arguments=c["arguments"]),
                ev("response.output_item.done", output_index=index, item=item)]

    reason = None
    async for kind, value, err in events:
        if kind == "token":
            deltas = out.feed(value)
        else:
            if err:
                yield ev("error", code="server_error", message=err, param=None)
                return
            reason = value
            deltas = out.close()
        for d in deltas:
            if "reasoning_content" in d:
                if current is None or current[0] != "reasoning":
                    for e in open_item("reasoning", None, d):
                        yield e
                texts[current] += d["reasoning_content"]
                yield ev("response.reasoning_text.delta", output_index=index, item_id=f"rs_{meta['id'][5:]}",
                         content_index=0, delta=d["reasoning_content"])
            elif "content" in d:
                if current is None or current[0] != "message":
                    for e in open_item("message", None, d):
                        yield e
                texts[current] += d["content"]
                yield ev("response.output_text.delta", output_index=index, item_id=f"msg_{meta['id'][5:]}",
                         content_index=0, delta=d["content"], logprobs=[])
            else:
                c = d["tool_call"]
                if "id" in c:
                    for e in open_item("call", c["index"], c):
                        yield e
                if c["arguments"]:
                    texts[current] += c["arguments"]
                    yield ev("response.function_call_arguments.delta", output_index=index,
                             item_id=f"fc_{out.calls[c['index']]['id']}", delta=c["arguments"])
    if reason == "cancelled":
        return
    for e in close_item():
        yield e
    final = response_object(job, meta, out, reason)
    yield ev("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
