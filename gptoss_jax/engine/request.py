"""A generation request and the one validation of what it asks for."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from gptoss_jax.engine.sampling import Sampling

FinishCallback = Callable[[str | None, str | None], None]


class Constraint(Protocol):
    """Per-request token constraint, consulted before each sampled token."""

    def allowed(self) -> np.ndarray | None:
        """bool [vocab]: the tokens allowed next, or None for no constraint."""

    def advance(self, token: int) -> None:
        """The token that was sampled."""


@dataclasses.dataclass
class GenRequest:
    """One generation. `on_token(token)` is called for every sampled token, in order; `on_finish(reason, error)`
    once at the end: reason "stop" (a stop token was sampled; it was passed to on_token), "length"
    (max_tokens), "cancelled", or None with an error message."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop_tokens: tuple[int, ...] = ()
    constraint: Constraint | None = None
    on_token: Callable[[int], None] | None = None
    on_finish: FinishCallback | None = None
    # engine-owned state
    id: int = -1
    tokens: list[int] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the engine's next step."""
        self.cancelled = True


def check_request(prompt: Sequence[int], max_tokens, *, vocab_size: int, context: int, name: str = "the prompt",
                  max_name: str = "max_tokens") -> list[int]:
    """The prompt as a list of ints, or a ValueError naming what is wrong: an empty prompt, token ids outside the
    vocabulary, max_tokens not an integer >= 1, or more tokens than `context` in all."""
    try:
        tokens = [int(t) for t in prompt]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integer token ids") from None
    if not tokens:
        raise ValueError(f"{name} is empty")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} has token ids outside [0, {vocab_size}): {bad[:5]}")
    if isinstance(max_tokens, bool) or not (isinstance(max_tokens, (int, np.integer)) and max_tokens >= 1):
        raise ValueError(f"{max_name} must be an integer >= 1, got {max_tokens!r}")
    if len(tokens) + max_tokens > context:
        raise ValueError(f"{name} ({len(tokens)} tokens) plus {max_name} ({max_tokens}) is "
                         f"{len(tokens) + max_tokens} tokens, more than the context of {context} tokens")
    return tokens
