"""`gptoss-jax serve --mesh tensor=2,expert=4` on 8 simulated CPU devices answers the official `openai` client
with the tokens one device gives: greedy, seeded sampling, and top-k (vLLM's extension, in `extra_body`), two
requests sharing the decode batch. Both servers run side by side in subprocesses from one tiny float32 checkpoint
(the real vocabulary: the chat goes through Harmony)."""

import concurrent.futures
import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.mesh
openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e '.[test]'")

REQUESTS = [
    ({"messages": [{"role": "user", "content": "Say hi."}], "temperature": 0}, {}),
    ({"messages": [{"role": "user", "content": "What is 48 + 79?"}], "temperature": 1.0, "seed": 3}, {}),
    ({"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0.8, "top_p": 0.9, "seed": 4},
     {"top_k": 20}),
]


def _serve(checkpoint, port: int, env: dict, *mesh: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptoss_jax.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), "--max-batch", "2", "--max-seq-len", "256", "--prefill-chunk",
                             "64", "--dtype", "float32", "--model-name", "tiny", *mesh],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _answers(port: int, proc: subprocess.Popen, deadline: float) -> list:
    while True:  # the server is up once /health answers (the model is loaded; steps compile on first use)
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the server did not start in time"
        time.sleep(1)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                           timeout=max(60.0, deadline - time.time()))

    def ask(request):
        body, extra = request
        r = client.chat.completions.create(model="tiny", max_tokens=8, extra_body=extra or None, **body)
        return r.choices[0].message.content, r.choices[0].message.model_extra.get("reasoning_content"), \
            r.choices[0].finish_reason, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two at a time: they share the decode batch
        return list(pool.map(ask, REQUESTS))


def test_serve_on_a_mesh_answers_one_devices_tokens(tmp_path, free_port, job_env):
    import jax.numpy as jnp

    import gptoss_jax as gj

    gj.save_checkpoint(gj.init_model(gj.ModelConfig.tiny(), seed=5, dtype=jnp.float32), tmp_path / "ckpt",
                       format="hf", progress=False)
    env = job_env(8)
    ports = free_port(), free_port()
    procs = [_serve(tmp_path / "ckpt", ports[0], env), _serve(tmp_path / "ckpt", ports[1], env, "--mesh",
                                                                 "tensor=2,expert=4")]
    try:
        deadline = time.time() + 900
        one, mesh = (_answers(port, proc, deadline) for port, proc in zip(ports, procs))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert all(tokens == 8 for *_, tokens in one)
    assert mesh == one
