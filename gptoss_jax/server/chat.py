"""Chat-completions requests -> engine requests, and sampled tokens -> OpenAI chat-completion objects.

Shared by the HTTP server (`api.py`) and offline batch inference (`batch.py`). Every check of a request raises
`BadRequest` (a ValueError) naming the parameter, which the server turns into an HTTP 400 with an OpenAI-style
error object.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from gptoss_jax import harmony
from gptoss_jax.engine import Constraint, Engine, GenRequest, Sampling

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(ValueError):
    """An invalid request: HTTP 400 with {"error": {"message", "type": "invalid_request_error", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def to_dict(self) -> dict:
        return error_object(self.message, param=self.param, code=self.code)


def error_object(message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------------
# Request checking
# ---------------------------------------------------------------------------------------------------------------


def _number(body: Mapping, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BadRequest(f"'{name}' must be a number, got {v!r}", name, "invalid_type")
    if v > hi or v < lo or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise BadRequest(f"'{name}' must be in {bracket}{lo}, {hi}], got {v!r}", name, "invalid_value")
    return float(v)


def _int(body: Mapping, name: str, lo: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"'{name}' must be an integer, got {v!r}", name, "invalid_type")
    if lo is not None and v < lo:
        raise BadRequest(f"'{name}' must be at least {lo}, got {v}", name, "invalid_value")
    return v


def _bool(body: Mapping, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequest(f"'{name}' must be a boolean, got {v!r}", name, "invalid_type")
    return v


def _unsupported(body: Mapping, name: str, neutral: Callable[[Any], bool]) -> None:
    v = body.get(name)
    if v is not None and not neutral(v):
        raise BadRequest(f"'{name}' is not supported by this server (got {v!r})", name, "unsupported_parameter")


@dataclasses.dataclass
class ChatJob:
    """A checked chat-completions request, ready for the engine."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool
    model: str
    constraint_factory: Callable[[], Constraint | None] | None = None
    response_format: str = "text"  # text | json_object | json_schema
    schema: dict | None = None

    def request(self, **callbacks) -> GenRequest:
        constraint = self.constraint_factory() if self.constraint_factory is not None else None
        return GenRequest(self.prompt, self.max_tokens, self.sampling, stop_tokens=tuple(harmony.stop_tokens()),
                          constraint=constraint,
                          **callbacks)


def check_model(body: Mapping, served: str) -> str:
    model = body.get("model")
    if model is None:
        return served
    if not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {model!r}", "model", "invalid_type")
    if model != served:
        raise BadRequest(f"The model '{model}' does not exist; this server serves '{served}'", "model",
                         "model_not_found", status=404)
    return model


def check_sampling(body: Mapping, *, max_tokens_names=("max_completion_tokens", "max_tokens")) -> dict:
    """{"sampling": Sampling, "max_tokens": int | None} from the body's fields. `top_k` is not in OpenAI's API;
    it is accepted as vLLM and SGLang accept it (the `openai` client sends it in `extra_body`), 0 or -1 = off."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:  # the nucleus of mass 0 is the most likely token alone
        temperature, top_p = 0.0, 1.0
    top_k = max(_int(body, "top_k", lo=-1) or 0, 0)
    seed = _int(body, "seed")
    if seed is None:
        seed = secrets.randbits(32)
    max_tokens = None
    for name in max_tokens_names:
        v = _int(body, name, lo=1)
        if v is not None:
            max_tokens = v
            break
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed % (1 << 32))
    return {"sampling": sampling, "max_tokens": max_tokens}


def check_messages(messages: Any, param: str = "messages") -> list:
    if messages is None:
        raise BadRequest(f"'{param}' is required", param, "missing_required_parameter")
    if not isinstance(messages, list):
        raise BadRequest(f"'{param}' must be a list of messages, got {type(messages).__name__}", param,
                         "invalid_type")
    if not messages:
        raise BadRequest(f"'{param}' must contain at least one message", param, "empty_array")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise BadRequest(f"{param}[{i}] must be an object, got {type(m).__name__}", f"{param}[{i}]",
                             "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequest(f"{param}[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})",
                             f"{param}[{i}].role", "invalid_value")
    return messages


def check_stop(body: Mapping) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of non-empty strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP:
        raise BadRequest(f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}", "stop", "invalid_value")
    return stop


def check_tools(tools: Any, tool_choice: Any) -> tuple[list | None, tuple[str, Any] | None]:
    """The tools to render and the forced function (name, parameters schema) when tool_choice names one."""
    if tools is not None and not isinstance(tools, list):
        raise BadRequest(f"'tools' must be a list, got {type(tools).__name__}", "tools", "invalid_type")
    forced = None
    if tool_choice is None or tool_choice == "auto":
        pass
    elif tool_choice == "none":
        tools = None  # the model is not told about tools, so it cannot call them
    elif tool_choice == "required":
        raise BadRequest("tool_choice 'required' is not supported by this server (use 'auto' or name a function)",
                         "tool_choice", "unsupported_value")
    elif isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function") if "function" in tool_choice else tool_choice
        name = fn.get("name") if isinstance(fn, Mapping) else None
        fns = {(t.get("function") or t).get("name"): (t.get("function") or t) for t in tools or []
               if isinstance(t, Mapping)}
        if not isinstance(name, str) or name not in fns:
            raise BadRequest(f"tool_choice names function {name!r}, which is not among the tools {list(fns)}",
                             "tool_choice", "invalid_value")
        forced = (name, fns[name].get("parameters") if isinstance(fns[name], Mapping) else None)
    else:
        raise BadRequest(f"'tool_choice' must be 'auto', 'none' or a function, got {tool_choice!r}", "tool_choice",
                         "invalid_value")
    return tools or None, forced


def check_response_format(fmt: Any, param: str = "response_format") -> tuple[str, dict | None]:
    if fmt is None:
        return "text", None
    if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest(f"'{param}' must be {{'type': 'text' | 'json_object' | 'json_schema', ...}}, got {fmt!r}",
                         param, "invalid_value")
    kind = fmt["type"]
    if kind != "json_schema":
        return kind, None
    spec = fmt.get("json_schema", fmt)  # chat: {"json_schema": {"name", "schema"}}; responses: flat
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise BadRequest(f"{param}.json_schema.schema must be a JSON-schema object", f"{param}.json_schema",
                         "invalid_value")
    from gptoss_jax.server.constrained import SchemaError, compile_schema

    try:
        compile_schema(dict(schema))
    except SchemaError as e:
        raise BadRequest(f"{param}.json_schema.schema: {e}", f"{param}.json_schema", "invalid_value") from None
    return kind, dict(schema)


def prepare_chat(body: Any, engine: Engine, *, served_model: str) -> ChatJob:
    """Check a chat-completions request body and render its prompt; raises BadRequest."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object", None, "invalid_type")
    model = check_model(body, served_model)
    messages = check_messages(body.get("messages"))
    n = _int(body, "n", lo=1)
    if n not in (None, 1):
        raise BadRequest("only n=1 is supported", "n", "unsupported_value")
    _unsupported(body, "logprobs", lambda v: v is False)
    _unsupported(body, "top_logprobs", lambda v: v == 0)
    _unsupported(body, "frequency_penalty", lambda v: v == 0)
    _unsupported(body, "presence_penalty", lambda v: v == 0)
    _unsupported(body, "logit_bias", lambda v: v == {})
    sampling = check_sampling(body)
    stop = check_stop(body)
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, Mapping):
        raise BadRequest("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _bool(opts or {}, "include_usage")
    effort = body.get("reasoning_effort") or "medium"
    if effort not in ("low", "medium", "high"):
        raise BadRequest(f"'reasoning_effort' must be 'low', 'medium' or 'high', got {effort!r}", "reasoning_effort",
                         "invalid_value")
    tools, forced_tool = check_tools(body.get("tools"), body.get("tool_choice"))
    fmt, schema = check_response_format(body.get("response_format"))
    try:
        prompt = harmony.render_chat(messages, reasoning_effort=effort, tools=tools)
    except ValueError as e:
        param = "tools" if str(e).startswith("tools") else "messages"
        raise BadRequest(str(e), param, "invalid_value") from None
    return _job(prompt, sampling, engine, model=model, stop=stop, stream=stream, include_usage=include_usage,
                fmt=fmt, schema=schema, forced_tool=forced_tool)


def _job(prompt, sampling, engine: Engine, *, model, stop, stream, include_usage, fmt, schema, forced_tool,
         max_tokens_param: str = "max_tokens") -> ChatJob:
    max_tokens = sampling["max_tokens"]
    room = engine.max_seq_len - len(prompt)
    if max_tokens is None:
        if room < 1:
            raise BadRequest(f"the prompt is {len(prompt)} tokens, which fills this server's context of "
                             f"{engine.max_seq_len} tokens", "messages", "context_length_exceeded")
        max_tokens = room
    elif max_tokens > room:
        raise BadRequest(f"the prompt ({len(prompt)} tokens) plus {max_tokens_param} ({max_tokens}) is "
                         f"{len(prompt) + max_tokens} tokens, more than this server's context of "
                         f"{engine.max_seq_len} tokens", max_tokens_param, "context_length_exceeded")
    factory = None
    if forced_tool is not None:  # the answer is a call: its arguments follow the tool's parameters schema
        from gptoss_jax.server.constrained import SchemaError, constraint_factory

        name, params = forced_tool
        try:
            factory = constraint_factory("json_schema", params, forced_tool=name, max_tokens=max_tokens)
        except (SchemaError, TypeError):  # a schema outside the supported subset: any JSON object
            factory = constraint_factory("json_object", None, forced_tool=name, max_tokens=max_tokens)
    elif fmt != "text":
        from gptoss_jax.server.constrained import constraint_factory

        factory = constraint_factory(fmt, schema, forced_tool=None, max_tokens=max_tokens)
    return ChatJob(prompt, max_tokens, sampling["sampling"], stop, stream, include_usage, model, factory, fmt,
                   schema)


# ---------------------------------------------------------------------------------------------------------------
# Tokens -> output
# ---------------------------------------------------------------------------------------------------------------


class Output:
    """Accumulates a request's tokens: Harmony-parsed text deltas by field, stop sequences applied to the answer
    (content), held back while they could still be the start of a stop sequence. `feed(token)` returns the
    deltas ready to send: dicts with one of "reasoning_content", "content" or a "tool_call" (index, id, name,
    arguments piece). `stopped` turns True when a stop sequence was seen (the caller cancels the request)."""

    def __init__(self, stop: list[str] = ()):
        self.parser = harmony.StreamParser()
        self.stop = list(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.content = ""  # all content text seen (before truncation at a stop sequence)
        self.sent_content = 0
        self.reasoning: list[str] = []
        self.calls: list[dict] = []  # {"id", "name", "arguments"}
        self._call_index: dict[str, int] = {}
        self.stopped = False
        self.n_tokens = 0

    def feed(self, token: int) -> list[dict]:
        self.n_tokens += 1
        if self.stopped:
            return []
        return self._deltas(self.parser.feed(token))

    def close(self) -> list[dict]:
        out = [] if self.stopped else self._deltas(self.parser.close())
        if not self.stopped and self.sent_content < len(self.content):  # flush what was held back
            out.append({"content": self.content[self.sent_content:]})
            self.sent_content = len(self.content)
        return out

    def _deltas(self, deltas) -> list[dict]:
        out: list[dict] = []
        for d in deltas:
            if d.field == "reasoning_content":
                if d.text:
                    self.reasoning.append(d.text)
                    out.append({"reasoning_content": d.text})
            elif d.field == "tool_calls":
                name = d.recipient
                if name.startswith(harmony.TOOL_NAMESPACE + "."):
                    name = name[len(harmony.TOOL_NAMESPACE) + 1:]
                if d.tool_call_id not in self._call_index:
                    self._call_index[d.tool_call_id] = len(self.calls)
                    self.calls.append({"id": d.tool_call_id, "name": name, "arguments": ""})
                    out.append({"tool_call": {"index": len(self.calls) - 1, "id": d.tool_call_id, "name": name,
                                              "arguments": d.text}})
                    self.calls[-1]["arguments"] += d.text
                elif d.text:
                    k = self._call_index[d.tool_call_id]
                    self.calls[k]["arguments"] += d.text
                    out.append({"tool_call": {"index": k, "arguments": d.text}})
            elif d.text:
                self.content += d.text
                out.extend(self._content_ready())
                if self.stopped:
                    break
        return out

    def _content_ready(self) -> list[dict]:
        for s in self.stop:
            i = self.content.find(s, max(0, self.sent_content - len(s)))
            if i >= 0:
                self.content = self.content[:i]
                self.stopped = True
                break
        end = len(self.content) if self.stopped else max(self.sent_content, len(self.content) - self.hold)
        if end > self.sent_content:
            piece = self.content[self.sent_content:end]
            self.sent_content = end
            return [{"content": piece}]
        return []

    def message(self) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content if (self.content or not self.calls)
                               else None, "reasoning_content": "".join(self.reasoning) or None}
        if self.calls:
            msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.calls]
        return msg

    def finish_reason(self, engine_reason: str | None) -> str:
        if self.calls:
            return "tool_calls"
        if self.stopped or engine_reason == "stop":
            return "stop"
        return "length" if engine_reason == "length" else (engine_reason or "stop")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(job: ChatJob, out: Output, engine_reason: str | None, *, id: str | None = None,
                      created: int | None = None) -> dict:
    return {
        "id": id or new_id("chatcmpl"),
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": job.model,
        "system_fingerprint": "gptoss-jax",
        "choices": [{"index": 0, "message": out.message(), "logprobs": None,
                     "finish_reason": out.finish_reason(engine_reason)}],
        "usage": usage(len(job.prompt), out.n_tokens),
    }


def chunk_object(job: ChatJob, id: str, created: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": job.model,
            "system_fingerprint": "gptoss-jax",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def delta_to_openai(d: dict) -> dict:
    """An `Output` delta -> an OpenAI chunk delta."""
    if "tool_call" in d:
        c = d["tool_call"]
        call: dict[str, Any] = {"index": c["index"], "function": {"arguments": c["arguments"]}}
        if "id" in c:
            call.update(id=c["id"], type="function")
            call["function"]["name"] = c["name"]
        return {"tool_calls": [call]}
    return d


def output_request(job: ChatJob):
    """(Output, engine request) for a checked job: every sampled token feeds the Output, and the request stops
    once a stop string has been seen."""
    out = Output(job.stop)
    req = job.request()

    def on_token(t):
        out.feed(t)
        if out.stopped:
            req.cancel()

    req.on_token = on_token
    return out, req


def run_chat(engine: Engine, job: ChatJob, timeout: float | None = None) -> dict:
    """Run one checked request to completion (blocking) and return the chat.completion object."""
    out, req = output_request(job)
    engine.generate(req, timeout)
    if req.error:
        raise RuntimeError(req.error)
    out.close()
    return completion_object(job, out, req.finish_reason)
