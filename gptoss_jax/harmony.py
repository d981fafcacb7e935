"""Harmony, the chat format gpt-oss was trained on, through `openai-harmony` (never hand-built token sequences).

- `render_chat(messages, ...)`: OpenAI chat-completions messages -> the prompt tokens for the next assistant turn.
- `parse_completion(tokens)`: sampled tokens -> OpenAI-style assistant fields (content, reasoning_content, tool_calls).
- `StreamParser`: the same, token by token, yielding text deltas as they are decoded.
- `stop_tokens()`, `encode(text)`, `decode(tokens)`.

Parsing never raises on what a model samples: tokens that are not valid Harmony (a model with random weights, a
hallucinated user turn, text after `<|return|>`) degrade to plain text on the final channel from the point where
they stop making sense.
"""

from __future__ import annotations

import codecs
import datetime as _dt
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    SystemContent,
    ToolDescription,
)

from .tokenizer import harmony_encoding

__all__ = [
    "Delta",
    "StreamParser",
    "decode",
    "encode",
    "parse_completion",
    "render_chat",
    "stop_tokens",
    "to_conversation",
]

TOOL_NAMESPACE = "functions"
JSON_CONTENT_TYPE = "<|constrain|>json"  # openai-harmony renders this as " " + <|constrain|> (special) + "json"
MAX_HEADER_TOKENS = 64  # a real header ("<|channel|>commentary to=functions.NAME <|constrain|>json") is ~10-20

_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
_ROLES = ("system", "developer", "user", "assistant", "tool")
_CHANNELS = ("analysis", "commentary", "final")


@functools.cache
def _ids() -> dict[str, int]:
    enc = harmony_encoding()
    names = ("return", "call", "end", "start", "channel", "message", "constrain")
    return {n: enc.encode(f"<|{n}|>", allowed_special="all")[0] for n in names}


# ----------------------------------------------------------------------------------------------------------------
# Raw text
# ----------------------------------------------------------------------------------------------------------------


def stop_tokens() -> list[int]:
    """The tokens that end an assistant turn when sampling: <|return|> (200002) and <|call|> (200012)."""
    return list(harmony_encoding().stop_tokens_for_assistant_actions())


def encode(text: str) -> list[int]:
    """Plain text -> token ids. Text that looks like a special token ("<|end|>") is encoded as ordinary text, so
    this can never produce a control token."""
    if not isinstance(text, str):
        raise TypeError(f"encode() takes a str, got {type(text).__name__}")
    return list(harmony_encoding().encode(text, disallowed_special=()))


def decode(tokens: Iterable[int]) -> str:
    """Token ids -> text; special tokens appear as their names ("<|end|>"), invalid UTF-8 as U+FFFD."""
    ids = _as_ids(tokens)
    try:
        return harmony_encoding().decode(ids)
    except Exception as e:  # noqa: BLE001 - HarmonyError, OverflowError
        raise ValueError(f"cannot decode tokens: {e}") from None


def _as_ids(tokens: Any) -> list[int]:
    if hasattr(tokens, "tolist"):  # numpy / jax arrays
        tokens = tokens.tolist()
        if isinstance(tokens, int):
            tokens = [tokens]
    return [int(t) for t in tokens]


# ----------------------------------------------------------------------------------------------------------------
# Chat messages -> prompt
# ----------------------------------------------------------------------------------------------------------------


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    reasoning_effort: str | ReasoningEffort = "medium",
    tools: Sequence[Mapping[str, Any]] | None = None,
    date: str | _dt.date | None = None,
) -> list[int]:
    """OpenAI chat-completions messages -> the Harmony prompt for the next assistant turn, ending in
    `<|start|>assistant`: exactly what openai-harmony's `render_conversation_for_completion(conv, Role.ASSISTANT)`
    renders for `to_conversation(...)` of the same arguments.

    - `system` and `developer` contents, wherever they appear, become the developer message's instructions (in
      order, joined by a blank line); `tools` (OpenAI function tools) become its function tools. No developer
      message when there are neither.
    - The system message carries the reasoning effort ("low" | "medium" | "high"), openai-harmony's default model
      identity and knowledge cutoff (2024-06), and `date` (YYYY-MM-DD) only when given.
    - `user` -> user message. Content is a string or a list of {"type": "text", "text": ...} parts (joined by
      newlines).
    - `assistant`: `reasoning_content` (or `reasoning`) -> analysis channel; `content` -> final channel, or the
      commentary channel (a preamble) when the message also has `tool_calls`; each tool call -> commentary channel
      to `functions.NAME`, content type `<|constrain|>json`, the arguments string as content.
    - `tool` -> from `functions.NAME` to the assistant on the commentary channel; NAME is `name`, or the name of the
      earlier tool call with this `tool_call_id`.
    - Analysis of completed earlier turns (everything before the last final message) is dropped, as Harmony
      prescribes; analysis of the ongoing turn (after the last final: reasoning before a tool call) is kept.

    Raises ValueError naming the message (`messages[i]`) or tool (`tools[j]`) and the field for bad input.
    """
    conv = to_conversation(messages, reasoning_effort=reasoning_effort, tools=tools, date=date)
    return list(harmony_encoding().render_conversation_for_completion(conv, Role.ASSISTANT))


def to_conversation(
    messages: Sequence[Mapping[str, Any]],
    *,
    reasoning_effort: str | ReasoningEffort = "medium",
    tools: Sequence[Mapping[str, Any]] | None = None,
    date: str | _dt.date | None = None,
    for_training: bool = False,
) -> Conversation:
    """The openai-harmony `Conversation` that `render_chat` renders (see there). `for_training` keeps the last
    turn's reasoning (everything after the last user message), which a prompt for the next turn drops."""
    system = SystemContent.new().with_reasoning_effort(_effort(reasoning_effort))
    system.conversation_start_date = None  # openai-harmony 0.0.8 sets none by default; never let a default leak in
    if date is not None:
        system = system.with_conversation_start_date(_date(date))
    function_tools = _tools(tools)

    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")

    instructions: list[str] = []
    body: list[Message] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name (the latest call with that id)
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}]: expected a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        where = f"messages[{i}] ({role})"
        if role in ("system", "developer"):
            instructions.append(_text(m, where, required=True))
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text(m, where, required=True)))
        elif role == "assistant":
            body.extend(_assistant(m, where, call_names))
        else:
            body.append(_tool_result(m, where, call_names))

    # Harmony: drop the chain of thought of every response that ended in a final message. openai-harmony 0.0.8
    # only drops analysis before the *first* final message, and only when the last assistant message is final, so
    # older turns' reasoning would survive in longer chats; drop it here and let the library drop nothing more.
    last_user = max([k for k, msg in enumerate(body) if msg.author.role == Role.USER], default=-1)
    finals = [k for k, msg in enumerate(body) if msg.author.role == Role.ASSISTANT and msg.channel == "final"
              and (not for_training or k < last_user)]
    if finals:
        body = [msg for k, msg in enumerate(body)
                if not (k < finals[-1] and msg.author.role == Role.ASSISTANT and msg.channel == "analysis")]

    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    if instructions or function_tools:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if function_tools:
            developer = developer.with_function_tools(function_tools)
        head.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return Conversation.from_messages(head + body)


def _effort(effort: Any) -> ReasoningEffort:
    if isinstance(effort, ReasoningEffort):
        return effort
    if isinstance(effort, str) and effort.lower() in _EFFORTS:
        return _EFFORTS[effort.lower()]
    raise ValueError(f"reasoning_effort must be 'low', 'medium' or 'high', got {effort!r}")


def _date(date: Any) -> str:
    if isinstance(date, _dt.datetime):
        return date.date().isoformat()
    if isinstance(date, _dt.date):
        return date.isoformat()
    if isinstance(date, str) and date.strip():
        return date.strip()
    raise ValueError(f"date must be a non-empty string (YYYY-MM-DD) or a datetime.date, got {date!r}")


def _tools(tools: Any) -> list[ToolDescription]:
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of OpenAI function-tool dicts, got {type(tools).__name__}")
    out: list[ToolDescription] = []
    seen: set[str] = set()
    for j, tool in enumerate(tools):
        where = f"tools[{j}]"
        if not isinstance(tool, Mapping):
            raise ValueError(f"{where}: expected a dict like {{'type': 'function', 'function': {{...}}}}, "
                             f"got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise ValueError(f"{where}.type: only 'function' tools are supported, got {tool.get('type')!r}")
        if "function" in tool:
            fn, fwhere = tool["function"], f"{where}.function"
        elif "name" in tool:  # the flat (Responses API) spelling
            fn, fwhere = tool, where
        else:
            raise ValueError(f"{where}.function: missing")
        if not isinstance(fn, Mapping):
            raise ValueError(f"{fwhere}: expected a dict, got {type(fn).__name__}")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
            raise ValueError(f"{fwhere}.name: expected a non-empty name without spaces, got {name!r}")
        if name in seen:
            raise ValueError(f"{fwhere}.name: duplicate tool name {name!r}")
        seen.add(name)
        description = fn.get("description")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise ValueError(f"{fwhere}.description: expected a string, got {type(description).__name__}")
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ValueError(f"{fwhere}.parameters: expected a JSON-schema dict, got {type(parameters).__name__}")
        out.append(ToolDescription.new(name, description,
                                        parameters=None if parameters is None else dict(parameters)))
    return out


def _text(m: Mapping[str, Any], where: str, *, required: bool, field: str = "content") -> str | None:
    content = m.get(field)
    if content is None:
        if required:
            raise ValueError(f"{where}.{field}: missing")
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, Mapping)):
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"{where}.{field}[{k}]: only {{'type': 'text', 'text': str}} parts are supported, "
                                 f"got {kind!r}")
        return "\n".join(texts)
    raise ValueError(f"{where}.{field}: expected a string or a list of text parts, got {type(content).__name__}")


def _assistant(m: Mapping[str, Any], where: str, call_names: dict[str, str]) -> list[Message]:
    field = "reasoning_content" if m.get("reasoning_content") is not None else "reasoning"
    reasoning = _text(m, where, required=False, field=field)
    content = _text(m, where, required=False)
    calls = m.get("tool_calls") or []
    if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
        raise ValueError(f"{where}.tool_calls: expected a list, got {type(calls).__name__}")
    if reasoning is None and content is None and not calls:
        raise ValueError(f"{where}.content: missing (an assistant message needs content, reasoning_content or "
                         f"tool_calls)")
    out = []
    if reasoning:
        out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
    if content is not None:
        if not calls:
            out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("final"))
        elif content:  # content beside tool calls is a preamble: commentary without a recipient
            out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("commentary"))
    for k, call in enumerate(calls):
        cwhere = f"{where}.tool_calls[{k}]"
        if not isinstance(call, Mapping):
            raise ValueError(f"{cwhere}: expected a dict, got {type(call).__name__}")
        if call.get("type", "function") != "function":
            raise ValueError(f"{cwhere}.type: only 'function' calls are supported, got {call.get('type')!r}")
        fn = call.get("function")
        if not isinstance(fn, Mapping):
            raise ValueError(f"{cwhere}.function: expected a dict with name and arguments, got {fn!r}")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
            raise ValueError(f"{cwhere}.function.name: expected a non-empty name without spaces, got {name!r}")
        arguments = fn.get("arguments")
        if isinstance(arguments, (Mapping, list)):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise ValueError(f"{cwhere}.function.arguments: expected a JSON string, got {arguments!r}")
        call_id = call.get("id")
        if call_id is not None:
            if not isinstance(call_id, str):
                raise ValueError(f"{cwhere}.id: expected a string, got {call_id!r}")
            call_names[call_id] = name
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, arguments)
            .with_channel("commentary")
            .with_recipient(_recipient(name))
            .with_content_type(JSON_CONTENT_TYPE)
        )
    return out


def _tool_result(m: Mapping[str, Any], where: str, call_names: dict[str, str]) -> Message:
    text = _text(m, where, required=True)
    name, call_id = m.get("name"), m.get("tool_call_id")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"{where}.name: expected a non-empty string, got {name!r}")
    if call_id is not None:
        if not isinstance(call_id, str) or call_id not in call_names:
            known = ", ".join(repr(k) for k in call_names) or "none"
            raise ValueError(f"{where}.tool_call_id: {call_id!r} matches no earlier assistant tool call "
                             f"(known ids: {known})")
        name = name or call_names[call_id]
    elif name is None:
        raise ValueError(f"{where}.tool_call_id: missing (a tool message needs tool_call_id or name)")
    return (
        Message.from_author_and_content(Author.new(Role.TOOL, _recipient(name)), text)
        .with_channel("commentary")
        .with_recipient("assistant")
    )


def _recipient(name: str) -> str:
    return name if name.startswith(TOOL_NAMESPACE + ".") else f"{TOOL_NAMESPACE}.{name}"


# ----------------------------------------------------------------------------------------------------------------
# Completion tokens -> assistant fields
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """A piece of streamed text. `channel` is "analysis" | "commentary" | "final"; `recipient` is set
    ("functions.NAME") for tool-call arguments, with `tool_call_id` the id `finish()` gives that call (a tool call's
    first delta has text "" and arrives as soon as its header is parsed)."""

    channel: str
    text: str
    recipient: str | None = None
    tool_call_id: str | None = None

    @property
    def field(self) -> str:
        """Where the text goes in an OpenAI message: "tool_calls" (arguments), "reasoning_content" or "content"."""
        if self.recipient is not None:
            return "tool_calls"
        return "reasoning_content" if self.channel == "analysis" else "content"


def parse_completion(tokens: Iterable[int], *, call_id_prefix: str = "call_") -> dict[str, Any]:
    """Sampled tokens (what followed the prompt's `<|start|>assistant`, with or without the trailing stop token)
    -> {"role": "assistant", "content", "reasoning_content", "tool_calls", "finish_reason"}.

    - `content`: the final channel's text, with any preamble (commentary without a recipient) before it; None if
      there is none. Tokens that are not valid Harmony are decoded and appended here as plain text.
    - `reasoning_content`: the analysis channel's text, or None.
    - `tool_calls`: [{"id": f"{call_id_prefix}{k}", "type": "function", "function": {"name", "arguments"}}] for
      the k-th message addressed to a recipient (`functions.NAME` gives NAME).
    - `finish_reason`: "tool_calls" when there are tool calls, "stop" when the tokens end in <|return|>, else None
      (the caller knows whether it hit a length limit).

    Never raises on token content; the messages come from openai-harmony's `parse_messages_from_completion_tokens`.
    """
    parser = StreamParser(call_id_prefix=call_id_prefix)
    for t in _as_ids(tokens):
        parser.feed(t)
    return parser.finish()


class StreamParser:
    """Incremental `parse_completion`: `feed(token)` -> list of `Delta`s, `close()` -> the last deltas (if any) at
    the end of the stream, `finish()` -> the dict `parse_completion` returns for all tokens fed. Concatenating the
    deltas' texts per field gives that dict's texts. Never raises on token content."""

    def __init__(self, *, call_id_prefix: str = "call_"):
        self._enc = harmony_encoding()
        self._ids = _ids()
        self._stop = {self._ids["return"], self._ids["call"], self._ids["end"]}  # end a message for the parser
        self._parser = StreamableParser(self._enc, Role.ASSISTANT)
        self._prefix = call_id_prefix
        self._tokens: list[int] = []
        self._state = "header"  # "start" (expect <|start|>) | "header" | "content"
        self._header: list[int] = []  # the pending header's tokens (from its <|start|>, if it has one)
        self._first = True  # the pending header is the role-implied first one (no <|start|>)
        self._msg_start = 0  # index of the first token of the pending message
        self._current: tuple[str, str | None, str | None] | None = None  # (channel, recipient, call id)
        self._streamed: list[str] = []  # text streamed for the current message
        self._n_calls = 0
        self._plain = False  # degraded: everything from here on is plain text
        self._kept: list[Message] = []  # messages parsed before degrading
        self._plain_text: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._closed = False
        self._result: dict[str, Any] | None = None

    # -- feeding ---------------------------------------------------------------------------------------------

    def feed(self, token: int) -> list[Delta]:
        """Consume one sampled token; returns the text deltas it completes (often one, sometimes none)."""
        if self._closed:
            raise RuntimeError("StreamParser: feed() after close()/finish()")
        try:
            token = int(token)
        except (TypeError, ValueError):
            raise TypeError(f"StreamParser.feed takes an int token id, got {token!r}") from None
        self._tokens.append(token)
        if self._plain:
            return self._plain_deltas([token])
        state = self._state
        if state == "header" and token != self._ids["message"]:
            self._header.append(token)
            if not self._plausible_header():
                return self._degrade(self._msg_start)
        try:
            self._parser.process(token)
        except Exception:  # noqa: BLE001 - HarmonyError, OverflowError: not Harmony any more
            return self._degrade(self._msg_start if state != "content" else len(self._tokens) - 1)
        if state == "start":  # the parser accepted the token, so it was <|start|>
            self._state, self._header, self._first = "header", [token], False
            return []
        if state == "header":
            if token != self._ids["message"]:
                return []
            return self._begin_content()
        if token in self._stop:
            return self._end_message()
        delta = self._parser.last_content_delta
        return self._content_delta(delta) if delta else []

    def close(self) -> list[Delta]:
        """End of stream: returns any text still held back (an incomplete UTF-8 sequence, a truncated message)."""
        if self._closed:
            return []
        self._closed = True
        if self._plain:
            tail = self._utf8.decode(b"", final=True)
            return self._plain_emit(tail)
        if self._state == "content":
            try:
                self._parser.process_eos()
            except Exception:  # noqa: BLE001 - cannot happen in the content state; stay safe
                return []
            return self._end_message()
        # "start": clean end. "header": an incomplete but plausible header (cut off by a length limit): dropped.
        return []

    def finish(self) -> dict[str, Any]:
        """`close()`s the stream and returns the parsed assistant fields (see `parse_completion`)."""
        self.close()
        if self._result is None:
            self._result = self._build()
        return dict(self._result)

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    # -- internals -------------------------------------------------------------------------------------------

    def _plausible_header(self) -> bool:
        """Whether the pending header can still become a real assistant header; a model with random weights fails
        this on its first token or so, which turns its output into plain text at once instead of at the end."""
        body = self._header if self._first else self._header[1:]
        if len(body) > MAX_HEADER_TOKENS:
            return False
        allowed = (self._ids["channel"], self._ids["constrain"])
        try:
            if any(t not in allowed and self._enc.is_special_token(t) for t in body):
                return False
            text = self._enc.decode(body)
        except Exception:  # noqa: BLE001 - ids outside the vocabulary
            return False
        if "\n" in text:
            return False
        if self._first:  # the model continues "<|start|>assistant" with "<|channel|>..." or " to=..."
            s = text.lstrip(" ")
            return any(s.startswith(p) or p.startswith(s) for p in ("<|channel|>", "to="))
        return text.startswith("assistant") or "assistant".startswith(text)

    def _begin_content(self) -> list[Delta]:
        p = self._parser
        if p.current_role != Role.ASSISTANT:  # a hallucinated user/system/tool turn: not ours to parse
            return self._degrade(self._msg_start)
        recipient = p.current_recipient
        channel = _channel(p.current_channel, recipient)
        call_id = None
        if recipient is not None:
            call_id = f"{self._prefix}{self._n_calls}"
            self._n_calls += 1
        self._state, self._header = "content", []
        self._current = (channel, recipient, call_id)
        self._streamed = []
        return [Delta(channel, "", recipient, call_id)] if recipient is not None else []

    def _content_delta(self, text: str) -> list[Delta]:
        channel, recipient, call_id = self._current
        self._streamed.append(text)
        return [Delta(channel, text, recipient, call_id)]

    def _end_message(self) -> list[Delta]:
        """The current message is complete: emit whatever the parser's final text has beyond what was streamed
        (an undecodable tail becomes U+FFFD only now)."""
        out: list[Delta] = []
        try:
            msg = self._parser.messages[-1]
            text = _message_text(msg)
        except Exception:  # noqa: BLE001
            text = None
        streamed = "".join(self._streamed)
        if text is not None and text.startswith(streamed) and len(text) > len(streamed):
            out = self._content_delta(text[len(streamed):])
        self._state, self._header, self._first = "start", [], False
        self._msg_start = len(self._tokens)
        self._current = None
        self._streamed = []
        return out

    def _degrade(self, start: int) -> list[Delta]:
        """Not valid Harmony from token `start` on: keep the messages parsed so far (and the text already streamed
        for a message cut short), and turn every token from `start` on into plain text on the final channel."""
        kept: list[Message] = []
        try:
            kept = [m for m in self._parser.messages if m.author.role == Role.ASSISTANT]
        except Exception:  # noqa: BLE001
            pass
        if self._state == "content" and self._current is not None and self._streamed:
            channel, recipient, _ = self._current
            partial = Message.from_role_and_content(Role.ASSISTANT, "".join(self._streamed)).with_channel(channel)
            if recipient is not None:
                partial = partial.with_recipient(recipient)
            kept.append(partial)
        self._kept = kept
        self._plain = True
        self._state, self._header, self._current, self._streamed = "plain", [], None, []
        return self._plain_deltas(self._tokens[start:])

    def _plain_deltas(self, tokens: list[int]) -> list[Delta]:
        data = bytearray()
        for t in tokens:
            if t in (self._ids["return"], self._ids["call"]):
                continue  # sampling stops here; never shown as text
            try:
                data += self._enc.decode([t], errors="surrogateescape").encode("utf-8", "surrogateescape")
            except Exception:  # noqa: BLE001 - an id outside the vocabulary
                data += "\ufffd".encode()
        return self._plain_emit(self._utf8.decode(bytes(data)))

    def _plain_emit(self, text: str) -> list[Delta]:
        if not text:
            return []
        self._plain_text.append(text)
        return [Delta("final", text, None, None)]

    def _build(self) -> dict[str, Any]:
        if self._plain:
            messages = self._kept
        elif self._state == "header" and self._header:
            # a truncated header at the end: the library parse would fail on it; use what the stream parsed
            messages = self._parser.messages
        else:
            try:
                messages = harmony_encoding().parse_messages_from_completion_tokens(self._tokens, Role.ASSISTANT)
            except Exception:  # noqa: BLE001 - should not happen: the stream parsed the same tokens
                messages = self._parser.messages
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for msg in messages:
            if msg.author.role != Role.ASSISTANT:
                continue
            text = _message_text(msg)
            if msg.recipient is not None:
                name = msg.recipient
                if name.startswith(TOOL_NAMESPACE + "."):
                    name = name[len(TOOL_NAMESPACE) + 1:]
                calls.append({"id": f"{self._prefix}{len(calls)}", "type": "function",
                              "function": {"name": name, "arguments": text}})
            elif _channel(msg.channel, None) == "analysis":
                reasoning.append(text)
            else:
                content.append(text)
        content.extend(self._plain_text)
        last = self._tokens[-1] if self._tokens else None
        if calls:
            finish_reason = "tool_calls"
        elif last == self._ids["return"]:
            finish_reason = "stop"
        else:
            finish_reason = None
        return {
            "role": "assistant",
            "content": "".join(content) if content else None,
            "reasoning_content": "".join(reasoning) if reasoning else None,
            "tool_calls": calls,
            "finish_reason": finish_reason,
        }


def _channel(channel: str | None, recipient: str | None) -> str:
    if channel in _CHANNELS:
        return channel
    return "commentary" if recipient is not None else "final"


def _message_text(msg: Message) -> str:
    return "".join(getattr(c, "text", "") for c in msg.content)
