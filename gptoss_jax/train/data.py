"""Fine-tuning data: Harmony-rendered chats with an assistant-only loss mask, packed into fixed-length rows.

A JSONL line is one conversation, `{"messages": [...], "reasoning_effort"?: ..., "tools"?: [...]}`, in the
OpenAI-style format `gj.harmony.render_chat` takes. It is rendered with openai-harmony's training rendering (the
last final message ends in `<|return|>`); the conversation is the one inference would see (`to_conversation`:
the reasoning of earlier turns that ended in a final answer is dropped), so only the last turn's reasoning (after
the last user message, tool calls included) is trained. The loss covers exactly the tokens the model produces in an assistant turn: every assistant message's
channel header, content and end token (`<|end|>`, `<|return|>` or `<|call|>`), and the `<|start|>assistant` of an
assistant message that directly follows another (the model opens it itself); never the prompt.

Examples are packed into rows of `seq_len` (input, target) pairs; each example keeps its own positions (from 0)
and segment id (from 1; 0 = padding), and attention never crosses segments, so a packed row's loss equals its
examples' losses computed separately.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from openai_harmony import RenderConversationConfig, Role

from gptoss_jax import harmony
from gptoss_jax.jsonl import records
from gptoss_jax.tokenizer import harmony_encoding


@functools.cache
def _start_token() -> int:
    return harmony_encoding().encode("<|start|>", allowed_special="all")[0]


class DataError(ValueError):
    """The training data is malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]: token i is one the model must produce


@dataclasses.dataclass
class DataStats:
    examples: int = 0
    skipped_no_assistant: int = 0
    truncated: int = 0
    skipped_no_loss_after_truncation: int = 0

    def summary(self) -> str:
        parts = [f"{self.examples} examples"]
        if self.skipped_no_assistant:
            parts.append(f"{self.skipped_no_assistant} skipped (no assistant turn)")
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the sequence length")
        if self.skipped_no_loss_after_truncation:
            parts.append(f"{self.skipped_no_loss_after_truncation} skipped (no assistant token left after truncation)")
        return ", ".join(parts)


def render_example(record: dict, where: str = "example") -> Example | None:
    """A conversation record -> its training tokens and loss mask, or None if it has no assistant message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a 'messages' list, got {type(record).__name__}")
    unknown = set(record) - {"messages", "reasoning_effort", "tools"}
    if unknown:
        raise DataError(f"{where}: unknown field(s) {sorted(unknown)}; expected messages, reasoning_effort, tools")
    if "messages" not in record:
        raise DataError(f"{where}: missing 'messages'")
    try:
        conv = harmony.to_conversation(record["messages"], reasoning_effort=record.get("reasoning_effort", "medium"),
                                       tools=record.get("tools"), for_training=True)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    messages = conv.messages
    if not any(m.author.role == Role.ASSISTANT for m in messages):
        return None
    enc = harmony_encoding()
    # Our conversation already holds exactly the messages to train on; openai-harmony must drop no analysis.
    tokens = list(enc.render_conversation_for_training(conv, RenderConversationConfig(auto_drop_analysis=False)))
    # Every message starts with <|start|> (content never holds a control token), so these split the rendering.
    starts = [i for i, t in enumerate(tokens) if t == _start_token()] + [len(tokens)]
    if len(starts) - 1 != len(messages):
        raise AssertionError(f"{where}: {len(starts) - 1} rendered messages for {len(messages)} in the conversation")
    mask = np.zeros(len(tokens), bool)
    for k, msg in enumerate(messages):
        if msg.author.role == Role.ASSISTANT:
            follows_assistant = k > 0 and messages[k - 1].author.role == Role.ASSISTANT
            # <|start|> assistant header... <|message|> content <|end|>: the model writes all but the opening
            # <|start|>assistant, which it also writes when it directly follows its own message.
            mask[starts[k] + (0 if follows_assistant else 2) : starts[k + 1]] = True
    return Example(np.asarray(tokens, np.int32), mask)


def read_jsonl(path: str | Path, seq_len: int) -> tuple[list[Example], DataStats]:
    """Every usable example of a JSONL file; examples longer than seq_len + 1 tokens are truncated (counted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    stats, examples = DataStats(), []
    for where, record in records(path, DataError):
        ex = render_example(record, where)
        if ex is None:
            stats.skipped_no_assistant += 1
            continue
        if len(ex.tokens) > seq_len + 1:
            stats.truncated += 1
            ex = Example(ex.tokens[: seq_len + 1], ex.loss_mask[: seq_len + 1])
            if not ex.loss_mask[1:].any():
                stats.skipped_no_loss_after_truncation += 1
                continue
        examples.append(ex)
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"{path}: no usable examples ({stats.skipped_no_assistant} conversations without an "
                        "assistant turn)" if stats.skipped_no_assistant else f"{path}: the dataset is empty")
    return examples, stats


@dataclasses.dataclass(frozen=True)
class Rows:
    """Packed rows, each [R, L]: inputs, targets, weights (1 where the target is trained), segment ids, positions."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    @staticmethod
    def zeros(rows: int, seq_len: int) -> Rows:
        """Padding rows: token 0, weight 0, segment 0."""
        return Rows(*(np.zeros((rows, seq_len), np.float32 if f.name == "weights" else np.int32)
                      for f in dataclasses.fields(Rows)))

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, idx) -> Rows:
        return Rows(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        return Rows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Rows)))


def pack(examples: Sequence[Example], seq_len: int) -> Rows:
    """Pack examples, in the given order, into rows of seq_len (input, target) pairs: an example of n tokens takes
    n - 1 slots; a row is closed when the next example does not fit."""
    rows: list[list[Example]] = [[]]
    used = 0
    for ex in examples:
        n = len(ex.tokens) - 1
        if n > seq_len:
            raise ValueError(f"an example of {n + 1} tokens does not fit seq_len {seq_len} (truncate it first)")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += n
    out = Rows.zeros(len(rows), seq_len)
    for r, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row, 1):
            n = len(ex.tokens) - 1
            sl = slice(at, at + n)
            out.inputs[r, sl] = ex.tokens[:-1]
            out.targets[r, sl] = ex.tokens[1:]
            out.weights[r, sl] = ex.loss_mask[1:]
            out.segment_ids[r, sl] = s
            out.positions[r, sl] = np.arange(n)
            at += n
    return out


class RowStream:
    """The endless, deterministic stream of packed rows: epoch e shuffles the examples with (seed, e), packs them,
    and yields the rows in order. A position is (epoch, row within the epoch), so a resumed run continues exactly."""

    def __init__(self, examples: Sequence[Example], seq_len: int, seed: int):
        self.examples, self.seq_len, self.seed = list(examples), seq_len, seed
        self._epoch: tuple[int, Rows] | None = None

    def epoch_rows(self, epoch: int) -> Rows:
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._epoch = (epoch, pack([self.examples[i] for i in order], self.seq_len))
        return self._epoch[1]

    def take(self, n: int, position: tuple[int, int]) -> tuple[Rows, tuple[int, int]]:
        """The next n rows from `position`, and the position after them."""
        epoch, row = position
        parts = []
        while n:
            rows = self.epoch_rows(epoch)
            k = min(n, len(rows) - row)
            parts.append(rows[row : row + k])
            n -= k
            row += k
            if row == len(rows):
                epoch, row = epoch + 1, 0
        return Rows.concat(parts), (epoch, row)


def batches(stream: RowStream, batch_size: int, grad_accum: int, position: tuple[int, int], *,
            process_index: int = 0, process_count: int = 1) -> Iterator[tuple[Rows, tuple[int, int]]]:
    """Global batches of grad_accum x batch_size rows (as [grad_accum, batch_size, L]), this process's share of
    each (rows split evenly over processes along the batch), with the stream position after each."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} must divide evenly over {process_count} processes")
    share = batch_size // process_count
    while True:
        rows, position = stream.take(grad_accum * batch_size, position)
        mine = rows[np.concatenate([np.arange(a * batch_size + process_index * share,
                                              a * batch_size + (process_index + 1) * share)
                                    for a in range(grad_accum)])]
        yield Rows(*(getattr(mine, f.name).reshape(grad_accum, share, -1) for f in dataclasses.fields(Rows))), \
            position
