"""Constrained decoding for `response_format` (json_object, json_schema) and a named `tool_choice`.

Invalid output is made impossible by masking, before each sampled token, every token that cannot continue a valid
completion. Two levels:

1. Harmony. The completion is forced into the shape
   `[<|channel|>analysis<|message|> TEXT <|end|><|start|>assistant] <|channel|>final<|message|> JSON <|return|>`
   (for a named tool: `[analysis ...<|start|>assistant] to=functions.NAME<|channel|>commentary <|constrain|>json
   <|message|> JSON <|call|>`). The reasoning may use at most half of max_tokens (none when max_tokens < 64);
   then `<|end|>` and the header are forced.
2. JSON. A byte-level pushdown automaton, built from the schema (or "any JSON object" for json_object), accepts
   exactly the compact JSON texts (no whitespace between tokens) that the schema allows. A token is allowed when
   the automaton accepts all its bytes. Masks are computed over the 201,088-token vocabulary from per-token byte
   strings decoded once: inside a free string every token without a quote, backslash or control byte is allowed
   at once (a precomputed mask) and only the few thousand others are run through the automaton; elsewhere only
   the tokens whose first byte the automaton accepts are candidates (compact JSON: no whitespace outside
   strings). Masks are memoised by automaton state. When the tokens left are just enough to close the JSON (its
   shortest completion, tokenized, plus a margin of 16 tokens), only that completion is allowed, so the answer
   always parses unless max_tokens is smaller than the Harmony header plus the shortest valid JSON.

Schema subset (anything else is rejected with a 400 naming the keyword): type (one or a list), properties
(every property is emitted, in the schema's order, so `required` always holds), required, additionalProperties
(an object without properties is free-form unless it is false), items, enum, const, anyOf / oneOf (as any of),
$ref to #/$defs or #/definitions (not recursive), nullable; annotations (title, description, default, examples,
$schema, $id, strict) are ignored. Strings are free (escapes allowed); numbers are JSON numbers; integers have
no fraction or exponent.
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from typing import Any

import numpy as np

from gptoss_jax import harmony
from gptoss_jax.tokenizer import harmony_encoding

ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "strict", "$comment"}
SUPPORTED = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf", "oneOf",
             "$ref", "$defs", "definitions", "nullable"} | ANNOTATIONS
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


CLOSE_MARGIN = 16  # tokens


class SchemaError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Schema -> nodes
# ---------------------------------------------------------------------------------------------------------------
# A node is a hashable tuple:
#   ("any",)                      any JSON value
#   ("lit", bytes)                exactly these bytes (enum / const members, booleans, null)
#   ("string",) ("number",) ("integer",)
#   ("object", ((name, node), ...))   the properties, in order, all emitted
#   ("object_any",)               any object
#   ("array", node)
#   ("union", (node, ...))


def _dump(v) -> bytes:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False).encode()


def compile_schema(schema: dict, root: dict | None = None, seen: tuple = ()) -> tuple:
    """The automaton node of a JSON schema (the supported subset; SchemaError otherwise)."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return ("any",)
    if not isinstance(schema, dict):
        raise SchemaError(f"expected a schema object, got {schema!r}")
    unknown = sorted(set(schema) - SUPPORTED)
    if unknown:
        raise SchemaError(f"unsupported schema keyword(s) {unknown} (supported: {sorted(SUPPORTED - ANNOTATIONS)})")
    if "$ref" in schema:
        ref = schema["$ref"]
        if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
            raise SchemaError(f"only local $ref to #/$defs/... or #/definitions/... are supported, got {ref!r}")
        if ref in seen:
            raise SchemaError(f"recursive $ref {ref!r} is not supported")
        section, name = ref[2:].split("/", 1)
        target = (root.get(section) or {}).get(name)
        if target is None:
            raise SchemaError(f"$ref {ref!r} points nowhere")
        return compile_schema(target, root, seen + (ref,))
    if "const" in schema:
        return ("lit", _dump(schema["const"]))
    if "enum" in schema:
        if not isinstance(schema["enum"], list) or not schema["enum"]:
            raise SchemaError("enum must be a non-empty list")
        return _union([("lit", _dump(v)) for v in schema["enum"]])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            if not isinstance(schema[key], list) or not schema[key]:
                raise SchemaError(f"{key} must be a non-empty list")
            return _union([compile_schema(s, root, seen) for s in schema[key]])
    types = schema.get("type")
    if types is None:
        types = ["object"] if "properties" in schema else (["array"] if "items" in schema else list(TYPES))
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
        raise SchemaError(f"type must be one of {TYPES} or a list of them, got {schema.get('type')!r}")
    if schema.get("nullable") and "null" not in types:
        types = [*types, "null"]
    nodes = []
    for t in types:
        if t == "object":
            props = schema.get("properties")
            if props is None:
                nodes.append(("lit", b"{}") if schema.get("additionalProperties") is False else ("object_any",))
            else:
                if not isinstance(props, dict):
                    raise SchemaError("properties must be an object")
                nodes.append(("object", tuple((k, compile_schema(v, root, seen)) for k, v in props.items())))
        elif t == "array":
            nodes.append(("array", compile_schema(schema.get("items", True), root, seen)))
        elif t == "boolean":
            nodes.append(_union([("lit", b"true"), ("lit", b"false")]))
        elif t == "null":
            nodes.append(("lit", b"null"))
        else:
            nodes.append((t,))
    if set(types) >= set(TYPES) - {"integer"}:
        return ("any",)
    return _union(nodes)


def _union(nodes: list) -> tuple:
    flat = []
    for n in nodes:
        flat.extend(n[1] if n[0] == "union" else [n])
    return flat[0] if len(flat) == 1 else ("union", tuple(flat))


# ---------------------------------------------------------------------------------------------------------------
# The byte automaton. A state is a tuple of frames (the top is last); feed() returns the set of next states.
# Frames: ("value", node) | ("lit", bytes, i) | ("str",) | ("esc",) | ("hex", n) | ("num", phase, integer)
#         ("obj", phase) (free object: "first" | "key" | "colon" | "next") | ("arr", node, phase) ("first"|"next")
# ---------------------------------------------------------------------------------------------------------------

DIGITS = frozenset(b"0123456789")
# number phases: "-" after minus, "0" after a leading zero, "int", "dot", "frac", "e", "esign", "exp"
NUM_FINAL = {"0", "int", "frac", "exp"}


def _expand(frames: tuple, node: tuple) -> list[tuple]:
    """Replace a ("value", node) on top by the frames that start each alternative of node."""
    kind = node[0]
    if kind == "union":
        out = []
        for n in node[1]:
            out.extend(_expand(frames, n))
        return out
    if kind == "lit":
        return [frames + (("lit", node[1], 0),)]
    if kind == "any":
        return [frames + (("anyvalue",),)]
    if kind == "object":
        seq = []
        for i, (name, child) in enumerate(node[1]):
            seq.append(("lit", (b"{" if i == 0 else b",") + _dump(name) + b":", 0))
            seq.append(("value", child))
        seq.append(("lit", b"}" if node[1] else b"{}", 0))
        return [frames + tuple(reversed(seq))]
    return [frames + (("start", node),)]


def feed(state: tuple, b: int) -> list[tuple]:
    if not state:
        return []
    top, rest = state[-1], state[:-1]
    kind = top[0]
    if kind == "value":
        return [s2 for s in _expand(rest, top[1]) for s2 in feed(s, b)]
    if kind == "lit":
        text, i = top[1], top[2]
        if text[i] != b:
            return []
        return [rest if i + 1 == len(text) else rest + (("lit", text, i + 1),)]
    if kind == "anyvalue" or kind == "start":
        node = top[1] if kind == "start" else ("any",)
        t = node[0]
        if b == ord('"') and t in ("any", "string"):
            return [rest + (("str",),)]
        if (b == ord("-") or b in DIGITS) and t in ("any", "number", "integer"):
            return [rest + (("num", "-" if b == ord("-") else ("0" if b == ord("0") else "int"),
                             t == "integer"),)]
        if b == ord("{") and t in ("any", "object_any"):
            return [rest + (("obj", "first"),)]
        if b == ord("[") and t in ("any", "array"):
            return [rest + (("arr", ("any",) if t == "any" else node[1], "first"),)]
        if t == "any":
            for word in (b"true", b"false", b"null"):
                if b == word[0]:
                    return [rest + (("lit", word, 1),)]
        return []
    if kind == "str":
        if b == ord('"'):
            return [rest]
        if b == ord("\\"):
            return [rest + (top, ("esc",))]
        if b < 0x20:
            return []
        return [state]
    if kind == "esc":
        if b == ord("u"):
            return [rest + (("hex", 4),)]
        return [rest] if b in b'"\\/bfnrt' else []
    if kind == "hex":
        if b not in b"0123456789abcdefABCDEF":
            return []
        return [rest] if top[1] == 1 else [rest + (("hex", top[1] - 1),)]
    if kind == "num":
        phase, integer = top[1], top[2]
        nxt = None
        if phase == "-":
            nxt = "0" if b == ord("0") else ("int" if b in DIGITS else None)
        elif phase in ("0", "int"):
            if b in DIGITS and phase == "int":
                nxt = "int"
            elif b == ord(".") and not integer:
                nxt = "dot"
            elif b in b"eE" and not integer:
                nxt = "e"
        elif phase in ("dot", "frac"):
            nxt = "frac" if b in DIGITS else (("e" if b in b"eE" else None) if phase == "frac" else None)
        elif phase == "e":
            nxt = "esign" if b in b"+-" else ("exp" if b in DIGITS else None)
        elif phase in ("esign", "exp"):
            nxt = "exp" if b in DIGITS else None
        if nxt is not None:
            return [rest + (("num", nxt, integer),)]
        return feed(rest, b) if phase in NUM_FINAL else []
    if kind == "obj":
        phase = top[1]
        if phase in ("first", "next") and b == ord('"'):
            return [rest + (("obj", "colon"), ("str",))]
        if phase == "first" and b == ord("}"):
            return [rest]
        if phase == "colon" and b == ord(":"):
            return [rest + (("obj", "after"), ("anyvalue",))]
        if phase == "after":
            if b == ord(","):
                return [rest + (("obj", "next"),)]
            if b == ord("}"):
                return [rest]
        return []
    if kind == "arr":
        node, phase = top[1], top[2]
        if phase == "first" and b == ord("]"):
            return [rest]
        if phase in ("first", "next"):
            return [s2 for s2 in feed(rest + (("arr", node, "after"), ("value", node)), b)]
        if phase == "after":
            if b == ord(","):
                return [rest + (("arr", node, "next"),)]
            if b == ord("]"):
                return [rest]
        return []
    raise AssertionError(kind)


def accepting(states) -> bool:
    """Whether the JSON may end here (a state set, or one state)."""
    if isinstance(states, frozenset):
        return any(accepting(s) for s in states)
    state = states
    return not state or (len(state) == 1 and state[0][0] == "num" and state[0][1] in NUM_FINAL)


def _min_value(node: tuple) -> bytes:
    k = node[0]
    if k == "union":
        return min((_min_value(n) for n in node[1]), key=len)
    if k == "lit":
        return node[1]
    if k in ("any", "number", "integer"):
        return b"0"
    if k == "string":
        return b'""'
    if k == "object_any":
        return b"{}"
    if k == "array":
        return b"[]"
    if k == "object":
        return b"{" + b",".join(_dump(n) + b":" + _min_value(c) for n, c in node[1]) + b"}"
    raise AssertionError(k)


def completion(state: tuple) -> bytes:
    """The shortest bytes that finish the JSON from `state` (one valid completion)."""
    out = b""
    for top in reversed(state):
        k = top[0]
        if k == "value":
            out += _min_value(top[1])
        elif k == "start":
            out += _min_value(top[1])
        elif k == "anyvalue":
            out += b"0"
        elif k == "lit":
            out += top[1][top[2]:]
        elif k == "str":
            out += b'"'
        elif k == "esc":
            out += b"n"
        elif k == "hex":
            out += b"0" * top[1]
        elif k == "num":
            out += {"-": b"0", "dot": b"0", "e": b"0", "esign": b"0"}.get(top[1], b"")
        elif k == "obj":
            out += {"first": b"}", "next": b'"":0}', "colon": b":0}", "after": b"}"}[top[1]]
        elif k == "arr":
            out += {"first": b"]", "next": b"0]", "after": b"]"}[top[2]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The vocabulary, once
# ---------------------------------------------------------------------------------------------------------------


class Vocab:
    """Per-token byte strings and the precomputed candidate sets (built once per process, ~1 s)."""

    def __init__(self):
        enc = harmony_encoding()
        self.size = enc.n_vocab if hasattr(enc, "n_vocab") else 201088
        ids = harmony._ids()
        self.ids = ids
        special_from = 199998
        self.bytes: list[bytes] = []
        for t in range(special_from):
            try:
                self.bytes.append(enc.decode([t], errors="surrogateescape").encode("utf-8", "surrogateescape"))
            except Exception:  # noqa: BLE001 - an unused id
                self.bytes.append(b"")
        n = len(self.bytes)
        plain = np.zeros(max(self.size, 201088), bool)
        self.string_special: list[int] = []  # tokens with a quote, backslash or control byte
        self.by_first: dict[int, list[int]] = {}
        for t, bs in enumerate(self.bytes):
            if not bs:
                continue
            if all(c >= 0x20 and c not in (0x22, 0x5C) for c in bs):
                plain[t] = True
            else:
                self.string_special.append(t)
            self.by_first.setdefault(bs[0], []).append(t)
        self.plain = plain[: max(self.size, n)]
        self.vocab_size = len(self.plain)
        self.single = {}  # byte -> the single-byte token
        for t, bs in enumerate(self.bytes):
            if len(bs) == 1 and bs[0] not in self.single:
                self.single[bs[0]] = t

    def encode(self, text: str) -> list[int]:
        return list(harmony_encoding().encode(text, allowed_special="all"))


@functools.cache
def vocab() -> Vocab:
    return Vocab()


def _run(states: frozenset, data: bytes) -> frozenset:
    for b in data:
        states = frozenset(s2 for s in states for s2 in feed(s, b))
        if not states:
            break
    return states


class JsonMasker:
    """Allowed-token masks for the JSON automaton, memoised by state set."""

    def __init__(self, v: Vocab, vocab_size: int):
        self.v = v
        self.vocab_size = vocab_size
        self.cache: OrderedDict = OrderedDict()

    def mask(self, states: frozenset) -> np.ndarray:
        hit = self.cache.get(states)
        if hit is not None:
            self.cache.move_to_end(states)
            return hit
        v = self.v
        out = np.zeros(self.vocab_size, bool)
        in_free_string = all(s and s[-1][0] == "str" for s in states)
        if in_free_string:
            out[: len(v.plain)] = v.plain[: self.vocab_size]
            candidates = v.string_special
        else:
            firsts = {b for b in v.by_first if any(feed(s, b) for s in states)}
            candidates = [t for b in firsts for t in v.by_first[b]]
        for t in candidates:
            if _run(states, v.bytes[t]):
                out[t] = True
        if len(self.cache) > 4096:
            self.cache.popitem(last=False)
        self.cache[states] = out
        return out


# ---------------------------------------------------------------------------------------------------------------
# The Harmony-level constraint
# ---------------------------------------------------------------------------------------------------------------


class JsonConstraint:
    """See the module docstring. One per request; used from the engine thread."""

    def __init__(self, node: tuple, *, max_tokens: int, vocab_size: int, tool: str | None = None):
        self.v = vocab()
        self.vocab_size = vocab_size
        ids = self.v.ids
        self.end, self.stop = ids["end"], (ids["call"] if tool else ids["return"])
        if tool:
            header = self.v.encode(f" to=functions.{tool}<|channel|>commentary <|constrain|>json<|message|>")
            again = self.v.encode(f"<|start|>assistant to=functions.{tool}<|channel|>commentary "
                                  f"<|constrain|>json<|message|>")
        else:
            header = self.v.encode("<|channel|>final<|message|>")
            again = self.v.encode("<|start|>assistant<|channel|>final<|message|>")
        analysis = self.v.encode("<|channel|>analysis<|message|>")
        self.reasoning_budget = max_tokens // 2 if max_tokens >= 64 else 0
        self.max_tokens = max_tokens
        self.choices = [header] + ([analysis] if self.reasoning_budget else [])  # forced-prefix alternatives
        self.again = again
        self.prefix: list[int] = []
        self.phase = "header"  # header | analysis | again | json | done
        self.states = frozenset({(("value", node),)})
        self.masker = JsonMasker(self.v, vocab_size)
        self.n = 0  # tokens sampled
        self.n_reasoning = 0
        self.closing: bytes | None = None  # the forced completion, once the budget is down to it

    def _one(self, t: int) -> np.ndarray:
        m = np.zeros(self.vocab_size, bool)
        m[t] = True
        return m

    def allowed(self) -> np.ndarray:
        if self.phase in ("header", "again"):
            seqs = self.choices if self.phase == "header" else [self.again]
            nxt = {s[len(self.prefix)] for s in seqs if s[: len(self.prefix)] == self.prefix}
            m = np.zeros(self.vocab_size, bool)
            m[list(nxt)] = True
            return m
        if self.phase == "analysis":
            if self.n_reasoning >= self.reasoning_budget:
                return self._one(self.end)
            m = np.zeros(self.vocab_size, bool)
            m[: len(self._nonempty_mask)] = self._nonempty_mask
            m[self.end] = True
            return m
        if self.phase == "done":
            return self._one(self.stop)
        # json
        left = self.max_tokens - self.n
        if accepting(self.states) and any(not s for s in self.states):
            return self._one(self.stop)
        if self.closing is None:
            closing = min((completion(s) for s in self.states), key=len)
            tokens = harmony.encode(closing.decode("utf-8", "replace"))
            # Close with a margin: one token can open several levels at once.
            if left <= len(tokens) + 1 + CLOSE_MARGIN:
                self.closing = tokens
        if self.closing is not None:
            if not self.closing:
                return self._one(self.stop)
            return self._one(self.closing[0])
        m = self.masker.mask(self.states).copy()
        if accepting(self.states):
            m[self.stop] = True
        return m

    @functools.cached_property
    def _nonempty_mask(self) -> np.ndarray:
        return np.array([bool(b) for b in self.v.bytes], bool)

    def advance(self, token: int) -> None:
        self.n += 1
        if self.phase in ("header", "again"):
            self.prefix.append(token)
            seqs = self.choices if self.phase == "header" else [self.again]
            done = [s for s in seqs if s == self.prefix]
            if done:
                self.phase = "analysis" if (self.phase == "header" and done[0] is not self.choices[0]) else "json"
                self.prefix = []
            return
        if self.phase == "analysis":
            if token == self.end:
                self.phase = "again"
            else:
                self.n_reasoning += 1
            return
        if self.phase == "json":
            if token == self.stop:
                self.phase = "done"
                return
            data = self.v.bytes[token] if token < len(self.v.bytes) else b""
            self.states = _run(self.states, data)
            if self.closing is not None:
                self.closing = self.closing[1:]


def constraint_factory(fmt: str, schema: dict | None, *, forced_tool: str | None, max_tokens: int):
    """A callable making a fresh constraint per request (None for plain text without a forced tool)."""
    if fmt == "json_schema" and isinstance(schema, dict):
        node = compile_schema(schema)
    elif fmt in ("json_object", "json_schema") or forced_tool is not None:
        node = ("object_any",)
    else:
        return None
    vocab_size = vocab().vocab_size
    return lambda: JsonConstraint(node, max_tokens=max_tokens, vocab_size=vocab_size, tool=forced_tool)


def validate(value: Any, schema: dict, root: dict | None = None) -> bool:
    """Whether a parsed JSON value is accepted by the automaton of `schema` (for tests and checks)."""
    return accepting(_run(frozenset({(("value", compile_schema(schema)),)}), _dump(value)))
