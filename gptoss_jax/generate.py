"""Batched generation: `gj.generate` submits its prompts together to the inference engine and drives it.

Prompts are right-padded; every row keeps its own positions and length, so a padded batch computes exactly what
each prompt computes alone. Shapes are bucketed (prefill chunk and cache length) so neither a new prompt length nor
a new token recompiles, and the cache buffers are donated to each step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from gptoss_jax.engine import PREFILL_CHUNK, Engine, GenRequest, Sampling, bucket, check_request
from gptoss_jax.model import Transformer


def stream(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           sampling: Sampling = Sampling(), stop_tokens: Sequence[int] = (),
           prefill_chunk: int = PREFILL_CHUNK) -> Iterator[list[int | None]]:
    """Yield, per decoding step, one new token per row (None for rows that have stopped)."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    context = model.config.max_position_embeddings
    prompts = [check_request(p, max_new_tokens, vocab_size=model.config.vocab_size, context=context,
                             name=f"prompt {b}", max_name="max_new_tokens") for b, p in enumerate(prompts)]
    needed = max(len(p) for p in prompts) + max_new_tokens
    # One slot per prompt, every slot in every step: one compiled decode however the rows finish.
    engine = Engine(model, max_batch=len(prompts), max_seq_len=min(bucket(needed, 128), context), max_queue=0,
                    prefill_chunk=prefill_chunk, decode_buckets=False)
    stops = tuple(int(t) for t in stop_tokens)
    reqs = [engine.submit(GenRequest(p, max_new_tokens, sampling, stops)) for p in prompts]
    sent = 0
    while not all(r.finished for r in reqs):
        engine.step()
        longest = max(len(r.tokens) for r in reqs)  # the rows advance together
        for i in range(sent, longest):
            yield [r.tokens[i] if i < len(r.tokens) else None for r in reqs]
        sent = longest


def generate(model: Transformer, prompt_tokens, max_new_tokens: int = 128, temperature: float = 1.0,
             top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None, top_k: int = 0,
             on_token: Callable[[list[int | None]], None] | None = None):
    """New tokens after each prompt (ending with the stop token if one was sampled).

    A list of ints returns a list of ints; a list of lists returns a list of lists. temperature=0 is greedy.
    `on_token`, if given, receives each step's tokens as they are produced (None for stopped rows).
    """
    single = len(prompt_tokens) > 0 and not isinstance(prompt_tokens[0], (list, tuple, np.ndarray))
    prompts = [prompt_tokens] if single else prompt_tokens
    outs: list[list[int]] = [[] for _ in prompts]
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    for step in stream(model, prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                       stop_tokens=stop_tokens or ()):
        if on_token is not None:
            on_token(step)
        for out, t in zip(outs, step):
            if t is not None:
                out.append(t)
    return outs[0] if single else outs
