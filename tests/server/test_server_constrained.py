"""The JSON constraint of response_format on its own (no model): random walks through its token masks always
end in valid Harmony carrying JSON that the schema accepts, within max_tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptoss_jax import harmony
from gptoss_jax.server.constrained import JsonConstraint, SchemaError, compile_schema, validate

SCHEMAS = [
    {"type": "object"},
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                      "score": {"type": "number"}, "ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", 3]}},
                                      "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}}},
    {"$defs": {"P": {"type": "object", "properties": {"x": {"type": "number"}}}},
     "type": "array", "items": {"$ref": "#/$defs/P"}},
    {"type": "object", "properties": {"nested": {"type": "object", "properties": {
        "deep": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}}}}},
]


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
@pytest.mark.parametrize("max_tokens", [40, 120])
def test_random_walks_give_valid_json(k, max_tokens):
    schema = SCHEMAS[k]
    rng = np.random.default_rng(k * 1000 + max_tokens)
    for _ in range(3):
        c = JsonConstraint(compile_schema(schema), max_tokens=max_tokens, vocab_size=201088)
        tokens = []
        while len(tokens) < max_tokens:
            allowed = np.flatnonzero(c.allowed())
            t = int(rng.choice(allowed))
            c.advance(t)
            tokens.append(t)
            if t == c.stop:
                break
        assert tokens[-1] == c.stop  # finished in time
        parsed = harmony.parse_completion(tokens)
        value = json.loads(parsed["content"])
        assert validate(value, schema)
        if max_tokens >= 64:  # room to reason first: the analysis channel is allowed, then forced to end
            assert parsed["finish_reason"] == "stop"


def test_validate_and_unsupported_keywords():
    s = SCHEMAS[1]
    assert validate({"name": "x", "age": 1, "score": -1.5e3, "ok": True, "tags": ["a", 3], "note": None}, s)
    assert not validate({"name": "x", "age": 1.5, "score": 0, "ok": True, "tags": [], "note": None}, s)
    assert validate("a\"\\\u00e9", {"type": "string"})
    for bad in ({"type": "string", "pattern": "x"}, {"type": "strin"}, {"$ref": "#/$defs/missing"},
                {"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, {"enum": []}):
        with pytest.raises(SchemaError):
            compile_schema(bad)
