"""The server tests' fixtures: a session-wide tiny model (the real vocabulary: the chat goes through Harmony),
engine and live server (one compile for all), and `force_tokens` to make the random model emit known tokens."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

CONTEXT = 512
MAX_BATCH = 8  # 16 concurrent streams then also exercise the queue and slot reuse
MODEL_NAME = "tiny-test"


@pytest.fixture(scope="session")
def engine():
    import jax.numpy as jnp

    import gptoss_jax as gj
    from gptoss_jax.engine import Engine

    model = gj.init_model(gj.ModelConfig.tiny(), seed=0, dtype=jnp.float32)
    # One prefill chunk size (32) whatever the prompt; decode_buckets=False: every step runs all 8 slots, one
    # compiled decode step (test_decode_buckets covers the sizes).
    eng = Engine(model, max_batch=MAX_BATCH, max_seq_len=CONTEXT, max_queue=16, prefill_chunk=32,
                 model_name=MODEL_NAME, decode_buckets=False).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def server(engine):
    """(base_url, app) of a uvicorn server on a free loopback port, in a background thread."""
    import uvicorn

    from gptoss_jax.server.api import create_app

    app = create_app(engine, max_body_bytes=64 * 1024)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


class ForcedTokens:
    """A constraint that forces a fixed token sequence, then leaves the model free: makes a random model emit
    known Harmony (a tool call, a stop sequence)."""

    def __init__(self, tokens: Sequence[int], vocab_size: int):
        self.tokens, self.vocab_size, self.i = [int(t) for t in tokens], vocab_size, 0

    def allowed(self) -> np.ndarray | None:
        if self.i >= len(self.tokens):
            return None
        mask = np.zeros(self.vocab_size, bool)
        mask[self.tokens[self.i]] = True
        return mask

    def advance(self, token: int) -> None:
        self.i += 1


@pytest.fixture
def force_tokens(engine):
    """`with force_tokens(make):` every request submitted to the engine meanwhile without a constraint gets
    `ForcedTokens(make(request))`."""

    @contextlib.contextmanager
    def forcing(make):
        submit = engine.submit

        def forced(req):
            if req.constraint is None:
                req.constraint = ForcedTokens(make(req), engine.vocab_size)
            return submit(req)

        engine.submit = forced
        try:
            yield
        finally:
            del engine.submit

    return forcing
