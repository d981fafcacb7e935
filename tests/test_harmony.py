"""gptoss_jax.harmony against openai-harmony: every expected prompt is built independently with the openai_harmony
API (Conversation.from_messages + render_conversation_for_completion), every parsed completion is rendered by it."""

import numpy as np
import pytest
from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

from gptoss_jax import harmony
from gptoss_jax.tokenizer import harmony_encoding

RETURN, CALL, END = 200002, 200012, 200007

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
    },
    "required": ["location"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather.",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time."}},
]


@pytest.fixture(scope="module")
def enc():
    return harmony_encoding()


def system(effort=ReasoningEffort.MEDIUM, date=None):
    content = SystemContent.new().with_reasoning_effort(effort)
    if date is not None:
        content = content.with_conversation_start_date(date)
    return Message.from_role_and_content(Role.SYSTEM, content)


def user(text):
    return Message.from_role_and_content(Role.USER, text)


def assistant(text, channel):
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def call(name, arguments):
    return (Message.from_role_and_content(Role.ASSISTANT, arguments).with_channel("commentary")
            .with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))


def tool_result(name, text):
    return (Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
            .with_channel("commentary").with_recipient("assistant"))


def weather_tools():
    return [ToolDescription.new("get_weather", "Current weather.", parameters=WEATHER_PARAMS),
            ToolDescription.new("get_time", "Current time.")]


def expected(enc, messages):
    return enc.render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT)


def stream(tokens):
    parser = harmony.StreamParser()
    deltas = []
    for t in tokens:
        deltas += parser.feed(t)
    deltas += parser.close()
    return deltas, parser.finish()


def joined(deltas, field):
    return "".join(d.text for d in deltas if d.field == field)


# -- render_chat ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("effort,level", [("low", ReasoningEffort.LOW), ("medium", ReasoningEffort.MEDIUM),
                                          ("HIGH", ReasoningEffort.HIGH), (ReasoningEffort.LOW, ReasoningEffort.LOW)])
def test_effort_levels(enc, effort, level):
    got = harmony.render_chat([{"role": "user", "content": "What is 2 + 2?"}], reasoning_effort=effort)
    assert got == expected(enc, [system(level), user("What is 2 + 2?")])
    assert f"Reasoning: {level.value.lower()}" in harmony.decode(got)
    assert got[-2:] == [200006, enc.encode("assistant")[0]]  # ends in <|start|>assistant


def test_date_only_when_given(enc):
    msgs = [{"role": "user", "content": "hi"}]
    without = harmony.render_chat(msgs)
    assert without == expected(enc, [system(), user("hi")])
    assert "Current date" not in harmony.decode(without)
    assert "Knowledge cutoff: 2024-06" in harmony.decode(without)  # openai-harmony's default
    dated = harmony.render_chat(msgs, date="2025-06-28")
    assert dated == expected(enc, [system(date="2025-06-28"), user("hi")])
    assert "Current date: 2025-06-28" in harmony.decode(dated)
    import datetime

    assert harmony.render_chat(msgs, date=datetime.date(2025, 6, 28)) == dated


def test_no_developer_message_without_instructions_or_tools(enc):
    got = harmony.render_chat([{"role": "user", "content": "hi"}], tools=[])
    assert got == expected(enc, [system(), user("hi")])
    assert "developer" not in harmony.decode(got)


def test_system_and_developer_become_instructions(enc):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "hi"}]
    developer = DeveloperContent.new().with_instructions("Be terse.\n\nAnswer in French.")
    want = expected(enc, [system(), Message.from_role_and_content(Role.DEVELOPER, developer), user("hi")])
    assert harmony.render_chat(msgs) == want


def test_tools(enc):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    developer = DeveloperContent.new().with_function_tools(weather_tools())
    got = harmony.render_chat(msgs, tools=TOOLS, reasoning_effort="high", date="2025-01-02")
    want = expected(enc, [system(ReasoningEffort.HIGH, "2025-01-02"),
                          Message.from_role_and_content(Role.DEVELOPER, developer), user("Weather in Paris?")])
    assert got == want
    text = harmony.decode(got)
    assert "namespace functions" in text and "type get_time = () => any;" in text
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    # with instructions as well
    msgs = [{"role": "system", "content": "Be terse."}] + msgs
    developer = DeveloperContent.new().with_instructions("Be terse.").with_function_tools(weather_tools())
    want = expected(enc, [system(), Message.from_role_and_content(Role.DEVELOPER, developer),
                          user("Weather in Paris?")])
    assert harmony.render_chat(msgs, tools=TOOLS) == want


def test_list_of_parts_content(enc):
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    developer = DeveloperContent.new().with_instructions("Be terse.")
    want = expected(enc, [system(), Message.from_role_and_content(Role.DEVELOPER, developer), user("Hello\nworld")])
    assert harmony.render_chat(msgs) == want


def test_earlier_reasoning_is_dropped(enc):
    msgs = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "reasoning_content": "Simple arithmetic.", "content": "4"},
            {"role": "user", "content": "And 3 + 5?"}]
    got = harmony.render_chat(msgs)
    # openai-harmony itself drops the analysis that precedes the (first) final message
    full = [system(), user("What is 2 + 2?"), assistant("Simple arithmetic.", "analysis"), assistant("4", "final"),
            user("And 3 + 5?")]
    assert got == expected(enc, full)
    assert got == expected(enc, [m for m in full if m.channel != "analysis"])
    assert "Simple arithmetic" not in harmony.decode(got)


def test_reasoning_of_all_completed_turns_is_dropped(enc):
    # openai-harmony 0.0.8 would keep "think 2" (it only drops analysis before the first final message);
    # Harmony prescribes dropping every completed turn's chain of thought.
    msgs = [{"role": "user", "content": "q1"},
            {"role": "assistant", "reasoning_content": "think 1", "content": "a1"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "reasoning_content": "think 2", "content": "a2"},
            {"role": "user", "content": "q3"}]
    got = harmony.render_chat(msgs)
    assert got == expected(enc, [system(), user("q1"), assistant("a1", "final"), user("q2"),
                                 assistant("a2", "final"), user("q3")])
    assert "think" not in harmony.decode(got)


def test_tool_call_and_result_then_next_completion(enc):
    call_msg = {"id": "call_abc", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "reasoning_content": "Need the weather tool.", "content": None,
             "tool_calls": [call_msg]},
            {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 21}'}]
    developer = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_function_tools(
        weather_tools()))
    want = expected(enc, [system(), developer, user("Weather in Paris?"),
                          assistant("Need the weather tool.", "analysis"),
                          call("get_weather", '{"location": "Paris"}'),
                          tool_result("get_weather", '{"temp": 21}')])
    got = harmony.render_chat(msgs, tools=TOOLS)
    assert got == want
    text = harmony.decode(got)
    assert "Need the weather tool." in text  # the ongoing turn's reasoning stays
    assert ' <|constrain|>json<|message|>{"location": "Paris"}<|call|>' in text
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>" in text
    # `name` on the tool message works as well, with or without the id
    named = msgs[:2] + [{"role": "tool", "name": "get_weather", "content": '{"temp": 21}'}]
    assert harmony.render_chat(named, tools=TOOLS) == want


def test_preamble_and_parallel_calls_after_a_completed_turn(enc):
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location":"A"}'}},
             {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "reasoning_content": "greet", "content": "Hello!"},
            {"role": "user", "content": "Weather and time in A?"},
            {"role": "assistant", "reasoning_content": "two tools", "content": "Checking both.", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "noon"}]
    developer = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_function_tools(
        weather_tools()))
    want = expected(enc, [system(), developer, user("hi"), assistant("Hello!", "final"),
                          user("Weather and time in A?"), assistant("two tools", "analysis"),
                          assistant("Checking both.", "commentary"),
                          call("get_weather", '{"location":"A"}'), call("get_time", "{}"),
                          tool_result("get_weather", "sunny"), tool_result("get_time", "noon")])
    got = harmony.render_chat(msgs, tools=TOOLS)
    assert got == want
    assert "greet" not in harmony.decode(got) and "two tools" in harmony.decode(got)


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("msgs,kwargs,match", [
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], {}, r"messages\[1\]\.role"),
    ([{"role": "user"}], {}, r"messages\[0\] \(user\)\.content: missing"),
    ([{"role": "assistant"}], {}, r"messages\[0\] \(assistant\)\.content: missing"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], {}, r"messages\[0\].*content\[0\]"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "x"}], {},
     r"messages\[1\] \(tool\)\.tool_call_id: 'nope'"),
    ([{"role": "tool", "content": "x"}], {}, r"messages\[0\] \(tool\)\.tool_call_id: missing"),
    ([{"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}], {},
     r"messages\[0\] \(assistant\)\.tool_calls\[0\]\.function\.name"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}], {},
     r"messages\[0\] \(assistant\)\.tool_calls\[0\]\.function\.arguments"),
    (["hi"], {}, r"messages\[0\]: expected a dict"),
    ("hi", {}, r"messages must be a list"),
    ([{"role": "user", "content": "hi"}], {"reasoning_effort": "extreme"}, r"reasoning_effort"),
    ([{"role": "user", "content": "hi"}], {"date": 20250101}, r"date"),
    ([{"role": "user", "content": "hi"}], {"tools": [{"type": "function", "function": {"description": "d"}}]},
     r"tools\[0\]\.function\.name"),
    ([{"role": "user", "content": "hi"}], {"tools": [{"type": "retrieval"}]}, r"tools\[0\]\.type"),
    ([{"role": "user", "content": "hi"}], {"tools": [TOOLS[0], TOOLS[0]]}, r"tools\[1\]\.function\.name: duplicate"),
    ([{"role": "user", "content": "hi"}],
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, r"tools\[0\]\.function\.par"),
])
def test_bad_input(msgs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        harmony.render_chat(msgs, **kwargs)


# -- parsing -------------------------------------------------------------------------------------------------


def completion(enc, prompt_messages, reply_messages):
    """What the model samples after the prompt, rendered by openai-harmony (analysis kept, final -> <|return|>)."""
    prompt = enc.render_conversation_for_completion(Conversation.from_messages(prompt_messages), Role.ASSISTANT)
    full = enc.render_conversation_for_training(Conversation.from_messages(prompt_messages + reply_messages),
                                                RenderConversationConfig(auto_drop_analysis=False))
    assert full[:len(prompt)] == prompt
    return full[len(prompt):]


def test_parse_analysis_and_final(enc):
    reasoning, answer = "User asks 2+2. Easy: 4 — “done”.", "2 + 2 = **4**. 𝔸𝔹 ✓"
    tokens = completion(enc, [system(), user("2+2?")], [assistant(reasoning, "analysis"), assistant(answer, "final")])
    assert tokens[-1] == RETURN
    want = {"role": "assistant", "content": answer, "reasoning_content": reasoning, "tool_calls": [],
            "finish_reason": "stop"}
    assert harmony.parse_completion(tokens) == want
    assert harmony.parse_completion(np.asarray(tokens)) == want
    assert harmony.parse_completion(tokens[:-1]) == {**want, "finish_reason": None}  # no stop token
    for toks in (tokens, tokens[:-1]):
        deltas, result = stream(toks)
        assert result == harmony.parse_completion(toks)
        assert joined(deltas, "content") == answer and joined(deltas, "reasoning_content") == reasoning
        assert {d.channel for d in deltas} == {"analysis", "final"}
        assert all(d.text and "\ufffd" not in d.text for d in deltas)  # multi-token characters held back whole


def test_parse_tool_call(enc):
    args = '{"location": "Paris", "unit": "celsius"}'
    tokens = completion(enc, [system(), user("Weather?")],
                        [assistant("Use the tool.", "analysis"), call("get_weather", args)])
    assert tokens[-1] == CALL
    result = harmony.parse_completion(tokens)
    assert result == {"role": "assistant", "content": None, "reasoning_content": "Use the tool.",
                      "tool_calls": [{"id": "call_0", "type": "function",
                                      "function": {"name": "get_weather", "arguments": args}}],
                      "finish_reason": "tool_calls"}
    deltas, streamed = stream(tokens)
    assert streamed == result
    calls = [d for d in deltas if d.field == "tool_calls"]
    assert calls[0].text == "" and {(d.recipient, d.tool_call_id, d.channel) for d in calls} == {
        ("functions.get_weather", "call_0", "commentary")}
    assert "".join(d.text for d in calls) == args
    # the order the model itself writes (channel before recipient) parses the same
    model_order = enc.encode("<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant<|channel|>"
                             f"commentary to=functions.get_weather <|constrain|>json<|message|>{args}<|call|>",
                             allowed_special="all")
    assert harmony.parse_completion(model_order) == result
    # the parsed message goes back into the next prompt as openai-harmony renders it
    msgs = [{"role": "user", "content": "Weather?"}, result,
            {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}]
    developer = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_function_tools(
        weather_tools()))
    assert harmony.render_chat(msgs, tools=TOOLS) == expected(
        enc, [system(), developer, user("Weather?"), assistant("Use the tool.", "analysis"),
              call("get_weather", args), tool_result("get_weather", "sunny")])


def test_parse_preamble_and_two_calls(enc):
    tokens = completion(enc, [system(), user("q")], [assistant("plan", "analysis"),
                                                     assistant("Checking.", "commentary"),
                                                     call("get_weather", "{}"), call("get_time", "{}")])
    result = harmony.parse_completion(tokens, call_id_prefix="call_x")
    assert result["content"] == "Checking." and result["reasoning_content"] == "plan"
    assert [(c["id"], c["function"]["name"]) for c in result["tool_calls"]] == [("call_x0", "get_weather"),
                                                                                  ("call_x1", "get_time")]


def test_truncated_completions(enc):
    tokens = completion(enc, [system(), user("q")], [assistant("thinking", "analysis"), assistant("𝔸𝔹", "final")])
    cut = tokens[:-2]  # ends inside the last character
    deltas, result = stream(cut)
    assert result["content"].endswith("\ufffd") and joined(deltas, "content") == result["content"]
    assert result == harmony.parse_completion(cut)
    header_cut = tokens[:tokens.index(200006) + 3]  # "...<|end|><|start|>assistant<|channel|>": dropped
    assert harmony.parse_completion(header_cut) == {"role": "assistant", "content": None,
                                                    "reasoning_content": "thinking", "tool_calls": [],
                                                    "finish_reason": None}
    assert harmony.parse_completion([]) == {"role": "assistant", "content": None, "reasoning_content": None,
                                            "tool_calls": [], "finish_reason": None}


@pytest.mark.parametrize("seed", range(5))
def test_random_tokens_degrade_to_plain_text(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 200000, size=int(rng.integers(1, 300))).tolist()
    result = harmony.parse_completion(tokens)
    assert result["content"] == harmony.decode(tokens)
    assert result["reasoning_content"] is None and result["tool_calls"] == []
    deltas, streamed = stream(tokens)
    assert streamed == result
    assert {d.channel for d in deltas} == {"final"} and joined(deltas, "content") == result["content"]
    # the whole id range, specials and ids outside the vocabulary included: never raises
    wild = rng.integers(-5, 202000, size=200).tolist() + [RETURN]
    assert isinstance(harmony.parse_completion(wild), dict)
    deltas, streamed = stream(wild)
    assert streamed == harmony.parse_completion(wild)


def test_invalid_after_valid_keeps_what_parsed(enc):
    tokens = enc.encode("<|channel|>analysis<|message|>hmm<|end|><|start|>user<|message|>hi<|end|>",
                        allowed_special="all")
    result = harmony.parse_completion(tokens)
    assert result["reasoning_content"] == "hmm"
    assert result["content"] == "<|start|>user<|message|>hi<|end|>"  # a hallucinated user turn, as text
    deltas, streamed = stream(tokens)
    assert streamed == result and joined(deltas, "content") == result["content"]
    tokens = enc.encode("<|channel|>final<|message|>Hi<|return|> and more", allowed_special="all")
    assert harmony.parse_completion(tokens)["content"] == "Hi and more"


# -- raw text ------------------------------------------------------------------------------------------------


def test_stop_tokens():
    assert set(harmony.stop_tokens()) == {RETURN, CALL}


def test_encode_decode():
    text = "Hello <|end|> wörld 𝔸"
    tokens = harmony.encode(text)
    assert harmony.decode(tokens) == text
    assert all(t < 199998 for t in tokens)  # special-token text stays text
    assert harmony.decode([200006, 200005]) == "<|start|><|channel|>"
    with pytest.raises(TypeError):
        harmony.encode(b"bytes")
