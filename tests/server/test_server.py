"""The OpenAI-compatible server, through the official `openai` client against a live server on a loopback port
(tiny random model, float32): models, chat completions (plain and streamed), tool calls, continuous batching of
16 concurrent streams, disconnects, bad input, API keys, a full queue, the Responses API, response_format."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")

from gptoss_jax import harmony  # noqa: E402
from gptoss_jax.engine import Engine, GenRequest, Sampling  # noqa: E402

MODEL_NAME, CONTEXT, MAX_BATCH = "tiny-test", 512, 8  # the engine fixture's (conftest.py)
MSG = [{"role": "user", "content": "Say hi."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(server):
    base, _ = server
    # timeout: a hang guard only (a first request waits for the steps to compile)
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=900)


def _post(server, path, body=None, *, content=None, headers=None):
    base, _ = server
    return httpx.post(base + path, json=body if content is None else None, content=content, headers=headers,
                      timeout=120)


def test_health_and_models(server, client):
    r = httpx.get(server[0] + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["max_batch"] == MAX_BATCH
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_chat_completion_and_stream_agree(client, server):
    kw = dict(model=MODEL_NAME, messages=MSG, max_tokens=6, temperature=1.0, seed=11)
    done = client.chat.completions.create(**kw)
    choice = done.choices[0]
    assert done.object == "chat.completion" and done.model == MODEL_NAME
    assert choice.finish_reason == "length"  # random weights never sample <|return|> in 6 tokens
    assert done.usage.completion_tokens == 6
    assert done.usage.prompt_tokens == len(harmony.render_chat(MSG))
    assert isinstance(choice.message.content, str) and choice.message.content

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    # The raw event stream: `data: {...}` lines ending with `data: [DONE]`; another seed, other tokens.
    body = {"model": MODEL_NAME, "messages": MSG, "max_tokens": 6, "stream": True, "seed": 12}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=900) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    other = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                    for line in lines[:-1] if json.loads(line[6:])["choices"])
    assert other != choice.message.content


def _tool_call_tokens(name: str, args: str) -> list[int]:
    from gptoss_jax.tokenizer import harmony_encoding

    enc = harmony_encoding()
    text = f" to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>{args}<|call|>"
    return list(enc.encode(text, allowed_special="all"))


def test_tool_call_rendered_and_parsed(client, force_tokens):
    """The tools reach the prompt (developer message), and a scripted Harmony tool call from the model comes
    back as OpenAI tool_calls, whole and streamed."""
    args = '{"city":"Paris"}'
    seen_prompts = []

    def script(req):
        seen_prompts.append(harmony.decode(req.prompt))
        return _tool_call_tokens("get_weather", args)

    with force_tokens(script):
        kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Weather in Paris?"}],
                  tools=[WEATHER_TOOL], max_tokens=64, temperature=1.0, seed=0)
        done = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "get_weather" in seen_prompts[0] and "Current weather in a city" in seen_prompts[0]
    assert "<|start|>developer" in seen_prompts[0]
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # The call and its result go back into the next prompt.
    follow = harmony.render_chat([*kw["messages"], choice.message.model_dump(exclude_none=True),
                                  {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
                                 tools=[WEATHER_TOOL])
    assert "functions.get_weather to=assistant" in harmony.decode(follow)


def test_stop_sequences_cut_the_answer(client, force_tokens):
    from gptoss_jax.tokenizer import harmony_encoding

    script = harmony_encoding().encode("<|channel|>final<|message|>Hello STOP world<|return|>", allowed_special="all")
    with force_tokens(lambda req: script):
        kw = dict(model=MODEL_NAME, messages=MSG, max_tokens=20, stop=["STOP", "zzz"])
        done = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True))
        plain = client.chat.completions.create(**{**kw, "stop": None})
    assert done.choices[0].message.content == "Hello " and done.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert plain.choices[0].message.content == "Hello STOP world" and plain.choices[0].finish_reason == "stop"


def test_named_tool_choice_gives_valid_arguments(client):
    done = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=30, seed=3)
    [call] = done.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}  # the tool's parameters schema
    assert done.choices[0].finish_reason == "tool_calls"


def test_sixteen_concurrent_streams_are_unmixed(server, engine):
    """16 streams at once (8 requests, each twice) on 8 slots: 8 share the decode batch while 8 wait and join as
    slots free up. Every stream equals its twin and, for a sample, the same request run alone."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    bodies = [{"model": MODEL_NAME, "messages": [{"role": "user", "content": f"{w} {rng.integers(1000)}"}],
               "max_tokens": 6, "temperature": 1.0, "seed": int(i)} for i, w in enumerate(words)]
    bodies = bodies + bodies
    aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)
    engine.max_active_seen = 0

    async def one(body):
        stream = await aclient.chat.completions.create(**body, stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_at_once():
        return await asyncio.gather(*(one(b) for b in bodies))

    results = asyncio.run(all_at_once())
    assert engine.max_active_seen == MAX_BATCH  # they shared decode steps (and the rest queued)
    assert all(reason == "length" for _, reason in results)
    assert results[:8] == results[8:]
    assert len({text for text, _ in results[:8]}) == 8
    for i in (5,):  # alone, through the engine, same seed: the same tokens
        alone = engine.generate(GenRequest(harmony.render_chat(bodies[i]["messages"]), 6, Sampling(1.0, seed=i)))
        assert harmony.parse_completion(alone.tokens)["content"] == results[i][0]


def test_disconnected_stream_frees_its_slot(server, engine):
    body = {"model": MODEL_NAME, "messages": MSG, "max_tokens": CONTEXT - 200, "stream": True, "temperature": 0}
    steps = engine.steps
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=60) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(4)]  # role chunk + a few tokens
        assert got[0].startswith("data: ")
        assert engine.active == 1
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    assert engine.steps - steps < CONTEXT - 200  # cancelled long before max_tokens


BAD = [
    ("invalid JSON", b"{not json", "invalid_json"),
    ("not an object", [1, 2], "invalid_type"),
    ("missing messages", {"model": MODEL_NAME}, "missing_required_parameter"),
    ("empty messages", {"messages": []}, "empty_array"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value"),
    ("message without content", {"messages": [{"role": "user"}]}, "invalid_value"),
    ("max_tokens beyond context", {"messages": MSG, "max_tokens": CONTEXT}, "context_length_exceeded"),
    ("max_tokens 0", {"messages": MSG, "max_tokens": 0}, "invalid_value"),
    ("max_tokens a string", {"messages": MSG, "max_tokens": "10"}, "invalid_type"),
    ("negative temperature", {"messages": MSG, "temperature": -0.5}, "invalid_value"),
    ("temperature too high", {"messages": MSG, "temperature": 2.5}, "invalid_value"),
    ("top_p above 1", {"messages": MSG, "top_p": 1.5}, "invalid_value"),
    ("n = 2", {"messages": MSG, "n": 2}, "unsupported_value"),
    ("stream not a bool", {"messages": MSG, "stream": "yes"}, "invalid_type"),
    ("too many stops", {"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "invalid_value"),
    ("bad reasoning effort", {"messages": MSG, "reasoning_effort": "max"}, "invalid_value"),
    ("bad tools", {"messages": MSG, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "invalid_value"),
    ("bad response_format", {"messages": MSG, "response_format": {"type": "xml"}}, "invalid_value"),
    ("unsupported schema keyword", {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "a+"}}}}, "invalid_value"),
    ("logprobs", {"messages": MSG, "logprobs": True}, "unsupported_parameter"),
    ("oversize body", {"messages": [{"role": "user", "content": "x" * 70000}]}, "request_too_large"),
]


@pytest.mark.parametrize("what,body,code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_400_with_openai_error(server, what, body, code):
    r = _post(server, "/v1/chat/completions", content=body) if isinstance(body, bytes) else \
        _post(server, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == code and err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_bad_input_through_the_client_and_engine_survives(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=2)
    assert e.value.status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=MSG, max_tokens=2)
    ok = client.chat.completions.create(model=MODEL_NAME, messages=MSG, max_tokens=1)
    assert ok.usage.completion_tokens == 1


def test_unknown_path_is_an_openai_404(server):
    r = httpx.get(server[0] + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_key_is_enforced(engine):
    from fastapi.testclient import TestClient

    from gptoss_jax.server.api import create_app

    http = TestClient(create_app(engine, api_key="sekret"))
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer nope"}).json()["error"]["code"] == \
        "invalid_api_key"
    assert http.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert http.get("/health").status_code == 200  # health checks need no key
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=http, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url="http://testserver/v1", api_key="sekret", http_client=http, max_retries=0)
    assert good.chat.completions.create(model=MODEL_NAME, messages=MSG, max_tokens=1).choices[0].message


def test_full_queue_gets_503_with_retry_after(engine):
    """An engine whose loop is not running keeps its queue: once full, the API answers 503 + Retry-After."""
    from fastapi.testclient import TestClient

    from gptoss_jax.server.api import create_app

    idle = Engine(engine.model, max_batch=1, max_seq_len=64, max_queue=0, model_name=MODEL_NAME)  # not started
    idle.submit(GenRequest([1, 2, 3], 2))  # takes the one free slot's place in the queue
    r = TestClient(create_app(idle)).post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"


def test_responses_api(client):
    r = client.responses.create(model=MODEL_NAME, input="Say hi.", instructions="Be brief.",
                                reasoning={"effort": "low"}, max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[-1].type == "message"
    text = r.output_text
    events = list(client.responses.create(model=MODEL_NAME, input="Say hi.", instructions="Be brief.",
                                          reasoning={"effort": "low"}, max_output_tokens=5, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.incomplete"
    assert "response.output_item.added" in kinds and "response.output_item.done" in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_api_function_call_roundtrip(client, force_tokens):
    with force_tokens(lambda req: _tool_call_tokens("get_weather", '{"city":"Oslo"}')):
        tool = {"type": "function", **WEATHER_TOOL["function"]}
        r = client.responses.create(model=MODEL_NAME, input="Weather in Oslo?", tools=[tool], max_output_tokens=40)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    r2 = client.responses.create(model=MODEL_NAME, tools=[tool], max_output_tokens=1, input=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "rain"}])
    assert r2.usage.input_tokens > r.usage.input_tokens


def test_response_format_json_object_and_schema(client):
    from gptoss_jax.server.constrained import validate

    done = client.chat.completions.create(model=MODEL_NAME, messages=MSG, max_tokens=40, seed=5,
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(done.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}}}, "required": ["name", "age"]}
    done = client.chat.completions.create(
        model=MODEL_NAME, messages=MSG, max_tokens=60, seed=6,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(done.choices[0].message.content)
    assert set(value) == {"name", "age", "ok", "tags"} and isinstance(value["age"], int)
    assert validate(value, schema)


def test_decode_buckets_give_the_same_tokens(engine):
    """An engine that decodes only its busy slots (rounded up to a power of two) samples what the all-slots
    engine samples: one request alone (1 row), then two at once (2 rows) and a third queued into a freed slot."""
    prompts = [[200006, 1428, 200008, 3 + i, 17, 200007, 200006, 173781] for i in range(3)]
    with Engine(engine.model, max_batch=2, max_seq_len=CONTEXT, prefill_chunk=32, model_name=MODEL_NAME) as eng:
        alone = eng.generate(GenRequest(prompts[0], 5, Sampling(1.0, seed=7)), timeout=120)
        reqs = [eng.submit(GenRequest(p, 5 + i, Sampling(1.0, seed=i))) for i, p in enumerate(prompts)]
        for r in reqs:
            assert r.done.wait(120)
        assert eng.max_active_seen == 2
    assert alone.tokens == engine.generate(GenRequest(prompts[0], 5, Sampling(1.0, seed=7))).tokens
    for i, r in enumerate(reqs):
        assert r.tokens == engine.generate(GenRequest(prompts[i], 5 + i, Sampling(1.0, seed=i))).tokens
