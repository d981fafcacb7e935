"""Fixtures several test files share. Tests import no other test module: what two files need lives here.

- `tiny_config`, `tiny_tokens`: the tiny architecture with a 512-token vocabulary (ModelConfig.tiny() keeps the real
  201,088 rows, whose embedding and unembedding would dominate every compile and checkpoint write); use the full
  vocabulary only where Harmony's token ids (up to 200,018) or the vocabulary itself is under test.
- `run_8_devices`: a script in a subprocess with 8 simulated CPU devices (the mesh tier, tests/mesh/).
- `free_port`, `job_env`, `run_job`: a multi-process job on loopback, bounded by one deadline, every process
  killed if the test stops early.
- `write_echo_data`: a small learnable chat task in the fine-tuning JSONL format.
"""

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Tests run on CPU (a GPU/TPU would change float32 matmul precision); set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

TINY_VOCAB = 512


def pytest_configure(config):
    """JAX's persistent compilation cache for the whole run, in .pytest_cache/d/jax-cache (`--cache-clear` or
    `rm -rf .pytest_cache` empties it): the tests' time is almost all XLA compiles of tiny models, and the same
    step recurs across test files, both xdist workers and the subprocesses the tests start (they inherit these
    variables). Set here, in the controller before it starts the workers and before any jax import; a
    JAX_COMPILATION_CACHE_DIR already set (CI's own cache, or none: set it empty) wins. The key covers jax's
    version, the computation and the compile options, so an entry is never reused for other code."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # an xdist worker inherits the controller's environment
    if config.cache is not None:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(config.cache.mkdir("jax-cache"))
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


# The files whose compiles take longest, longest first: `make test` (--dist loadfile --no-loadscope-reorder) hands
# whole files to the workers in collection order, so these start first and the short files fill in around them
# (xdist's own order, by test count, would leave a long file with few tests to run alone at the end).
SLOW_FILES = ["server/test_server.py", "test_generate.py", "test_finetune_cli.py", "test_kernels_model.py",
              "test_kernels_attention.py", "test_cpu_forms.py", "test_cli_generate.py", "test_train_step.py",
              "test_train_vocab.py", "test_kernels_moe.py", "server/test_batch_infer.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    here = Path(__file__).parent

    def key(item):
        try:
            name = Path(item.fspath).relative_to(here).as_posix()
        except ValueError:
            return len(SLOW_FILES)
        return rank.get(name, len(SLOW_FILES))

    items.sort(key=key)  # stable: the other files, and the tests in each file, keep their order


@pytest.fixture(scope="session")
def tiny_config():
    """ModelConfig.tiny() with a 512-token vocabulary, 3 layers (sliding, full, sliding) and a 16-token window:
    40 tokens cross the band and are no multiple of any kernel block."""
    import gptoss_jax as gj

    return dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=TINY_VOCAB, num_hidden_layers=3, sliding_window=16)


@pytest.fixture(scope="session")
def tiny_tokens():
    """Two rows of 40 random token ids below TINY_VOCAB (numpy int32, seed 0)."""
    import numpy as np

    return np.random.default_rng(0).integers(0, TINY_VOCAB, (2, 40)).astype(np.int32)


def _run_8_devices(script: str, *args: str, timeout: int = 600):
    """Run a Python `script` in a subprocess with 8 simulated CPU devices (the device count is fixed when jax
    starts); it prints "RESULT" and then JSON, which is returned."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.split("RESULT", 1)[1])


@pytest.fixture(scope="session")
def run_8_devices():
    """`run_8_devices(script, *args, timeout=600)`: see `_run_8_devices`."""
    return _run_8_devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """`free_port()`: a TCP port free on 127.0.0.1 now (for a coordinator)."""
    return _free_port


def _job_env(devices: int) -> dict:
    """This process's environment for one process of a job: `devices` simulated CPU devices, and none of the
    coordinator variables a caller's shell may hold (the job's flags decide)."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    for name in ("GPTOSS_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "GPTOSS_NUM_PROCESSES",
                 "GPTOSS_PROCESS_ID"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def job_env():
    """`job_env(devices)`: see `_job_env`."""
    return _job_env


def _run_job(commands: list[list[str]], env: dict, timeout: float, meanwhile=None):
    """Start every command (one process each), call `meanwhile()` while they run, then wait for all of them
    within `timeout` seconds of the start. Whatever happens (a failed `meanwhile`, a timeout), no process
    outlives the call. Returns (meanwhile's result, [(returncode, stdout, stderr)] in command order)."""
    deadline = time.time() + timeout
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    outs = []
    try:
        during = meanwhile() if meanwhile is not None else None
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.time()))
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return during, outs


@pytest.fixture(scope="session")
def run_job():
    """`run_job(commands, env, timeout, meanwhile=None)`: see `_run_job`."""
    return _run_job


WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "ocean"]


def _write_echo_data(path: Path, n: int, seed: int) -> None:
    """A learnable task: the assistant reasons 'echo W' and answers W."""
    rng = random.Random(seed)
    with Path(path).open("w") as f:
        for _ in range(n):
            w = rng.choice(WORDS)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {w}"},
                                             {"role": "assistant", "reasoning_content": f"echo {w}",
                                              "content": w}]}) + "\n")


@pytest.fixture(scope="session")
def write_echo_data():
    """`write_echo_data(path, n, seed)`: see `_write_echo_data`."""
    return _write_echo_data
