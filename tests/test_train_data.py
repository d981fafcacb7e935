"""Fine-tuning data: the assistant-only loss mask against openai-harmony's own rendering, packing, bad input."""

import json

import numpy as np
import pytest
from openai_harmony import Role

from gptoss_jax import harmony
from gptoss_jax.tokenizer import harmony_encoding
from gptoss_jax.train.data import DataError, Example, RowStream, batches, pack, read_jsonl, render_example

TOOLS = [{"type": "function", "function": {"name": "calc", "description": "evaluate",
                                           "parameters": {"type": "object", "properties": {"e": {"type": "string"}}}}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"e":"2+2"}'}}
RECORD = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "reasoning_content": "old thoughts", "content": "hello"},
    {"role": "user", "content": "add 2+2"},
    {"role": "assistant", "reasoning_content": "need the tool", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "4"},
    {"role": "assistant", "reasoning_content": "the tool said 4", "content": "It is 4."},
], "tools": TOOLS, "reasoning_effort": "low"}


def _spans(ex: Example) -> list[str]:
    """The decoded text of each maximal run of masked tokens."""
    out, cur = [], None
    for t, m in zip(ex.tokens.tolist(), ex.loss_mask):
        if m and cur is None:
            cur = []
        if m:
            cur.append(t)
        elif cur is not None:
            out.append(harmony.decode(cur))
            cur = None
    if cur is not None:
        out.append(harmony.decode(cur))
    return out


def test_mask_covers_exactly_what_the_assistant_writes():
    ex = render_example(RECORD)
    assert _spans(ex) == [
        "<|channel|>final<|message|>hello<|end|>",  # the earlier turn's reasoning is dropped, as at inference
        "<|channel|>analysis<|message|>need the tool<|end|>"
        "<|start|>assistant to=functions.calc<|channel|>commentary <|constrain|>json<|message|>{\"e\":\"2+2\"}<|call|>",
        "<|channel|>analysis<|message|>the tool said 4<|end|><|start|>assistant<|channel|>final<|message|>It is 4."
        "<|return|>",
    ]


def test_tokens_and_mask_match_harmony_rendering_token_by_token():
    """The tokens are openai-harmony's training rendering; the mask, checked token by token, is True exactly on the
    assistant messages' tokens after the opening `<|start|>assistant` of each assistant run."""
    enc = harmony_encoding()
    ex = render_example(RECORD)
    conv = harmony.to_conversation(RECORD["messages"], tools=TOOLS, reasoning_effort="low", for_training=True)
    from openai_harmony import RenderConversationConfig

    tokens = enc.render_conversation_for_training(conv, RenderConversationConfig(auto_drop_analysis=False))
    assert ex.tokens.tolist() == list(tokens)
    # Independently: walk the messages, re-render each in the conversation by prefix differences.
    expected = []
    prev = []
    for k, msg in enumerate(conv.messages):
        whole = conv.messages[: k + 1]
        from openai_harmony import Conversation

        rendered = list(enc.render_conversation(Conversation.from_messages(whole),
                                                RenderConversationConfig(auto_drop_analysis=False)))
        if k == len(conv.messages) - 1:
            rendered = list(tokens)
        own = rendered[len(prev):]
        trained = msg.author.role == Role.ASSISTANT
        skip = 0 if (k and conv.messages[k - 1].author.role == Role.ASSISTANT) else 2
        expected += [False] * (skip if trained else len(own)) + [True] * (len(own) - skip if trained else 0)
        prev = rendered
    assert ex.loss_mask.tolist() == expected
    stops = set(harmony.stop_tokens()) | {enc.encode("<|end|>", allowed_special="all")[0]}
    ends = [t for t, m in zip(ex.tokens.tolist(), ex.loss_mask) if m and t in stops]
    assert len(ends) == 5  # hello<|end|>, analysis<|end|>, <|call|>, analysis<|end|>, <|return|>


def test_no_assistant_is_skipped_and_counted(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n" + json.dumps(RECORD) + "\n\n")
    examples, stats = read_jsonl(f, 4096)
    assert stats.examples == 1 and stats.skipped_no_assistant == 1 and len(examples) == 1


def test_long_examples_are_truncated_and_counted(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(RECORD) + "\n")
    full = len(render_example(RECORD).tokens)
    examples, stats = read_jsonl(f, full - 10)
    assert stats.truncated == 1 and len(examples[0].tokens) == full - 9


@pytest.mark.parametrize("line, expect", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "d.jsonl:2: messages[0].role: unknown role 'wizard'"),
    ('{"msgs": []}', "d.jsonl:2: unknown field(s) ['msgs']"),
    ('[1, 2]', "d.jsonl:2: expected a JSON object"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, expect):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(RECORD) + "\n" + line + "\n")
    with pytest.raises(DataError, match=expect.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        read_jsonl(f, 4096)


def test_empty_dataset(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        read_jsonl(f, 64)
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl", 64)


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Example(rng.integers(0, 1000, n).astype(np.int32), rng.random(n) < 0.5) for n in lengths]


def test_pack_layout():
    exs = _examples([5, 4, 7, 9])
    rows = pack(exs, 10)
    # 4 + 3 slots fit a row; 6 starts the next; 8 the next
    assert len(rows) == 3
    np.testing.assert_array_equal(rows.segment_ids[0], [1, 1, 1, 1, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows.positions[0], [0, 1, 2, 3, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(rows.inputs[0, :4], exs[0].tokens[:-1])
    np.testing.assert_array_equal(rows.targets[0, 4:7], exs[1].tokens[1:])
    np.testing.assert_array_equal(rows.weights[1, :6], exs[2].loss_mask[1:])
    assert rows.weights[0, 7:].sum() == 0


def test_stream_is_deterministic_and_resumable():
    exs = _examples([5, 4, 7, 9, 3, 6, 8, 2], seed=1)
    it = batches(RowStream(exs, 10, seed=3), 2, 1, (0, 0))
    first = [next(it) for _ in range(5)]  # crosses epochs (8 examples pack into ~5 rows an epoch)
    assert first[-1][1][0] >= 1
    again = batches(RowStream(exs, 10, seed=3), 2, 1, (0, 0))
    np.testing.assert_array_equal(next(again)[0].inputs, first[0][0].inputs)
    resumed = batches(RowStream(exs, 10, seed=3), 2, 1, first[1][1])  # from the position after two batches
    for (r, _), (q, _) in zip(first[2:], [next(resumed) for _ in range(3)]):
        np.testing.assert_array_equal(r.inputs, q.inputs)
    other = next(batches(RowStream(exs, 10, seed=4), 2, 1, (0, 0)))[0]
    assert not np.array_equal(other.inputs, first[0][0].inputs)


def test_processes_split_the_global_batch():
    exs = _examples([5] * 16)
    whole = next(batches(RowStream(exs, 10, 0), 4, 2, (0, 0)))[0]
    parts = [next(batches(RowStream(exs, 10, 0), 4, 2, (0, 0), process_index=p, process_count=2))[0]
             for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([p.inputs for p in parts], axis=1), whole.inputs)
    assert whole.inputs.shape == (2, 4, 10)
