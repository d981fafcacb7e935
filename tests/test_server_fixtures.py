"""Shared fixtures (no tests): a session-wide tiny model, engine and live server for the server and batch tests
(one compile for all). Imported by tests/test_server.py and tests/test_batch_infer.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest

CONTEXT = 512
MAX_BATCH = 8  # 16 concurrent streams then also exercise the queue and slot reuse
MODEL_NAME = "tiny-test"


@pytest.fixture(scope="session")
def engine():
    import jax.numpy as jnp

    import gptoss_jax as gj
    from gptoss_jax.server.engine import Engine

    model = gj.init_model(gj.ModelConfig.tiny(), seed=0, dtype=jnp.float32)
    # prefill_chunk=1: prompts go through the shared decode step, one compiled function for everything (a
    # multi-token prefill chunk takes XLA:CPU ~30 s to compile even for the tiny model).
    # decode_buckets=False: every step runs all 8 slots, one compiled step (test_decode_buckets covers the sizes).
    eng = Engine(model, max_batch=MAX_BATCH, max_seq_len=CONTEXT, max_queue=16, prefill_chunk=1,
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
