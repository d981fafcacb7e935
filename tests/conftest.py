import json
import os
import subprocess
import sys

import pytest

# Tests run on CPU (a GPU/TPU would change float32 matmul precision); set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


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
