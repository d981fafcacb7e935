"""Multi-host on one machine: two processes on 127.0.0.1, 4 CPU devices each, joined by `jax.distributed` with
gloo collectives (`gptoss_jax.distributed.initialize`). Each loads a small checkpoint onto a mesh over the 8
global devices (tensor=2 across the processes x expert=4 inside each), reading only its own devices' slices of
the files, runs the sharded forward pass (expert-parallel MoE) and gathers the logits, which must equal the
single-process logits. Bounded by timeouts; coordinator and gloo bound to loopback only. The mesh tier (`make
mesh`); the coordinator settings, in one process, are checked in tests/test_mesh_settings.py.
"""

import json
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj

pytestmark = pytest.mark.mesh

WORKER = textwrap.dedent('''
    import json, sys, time
    pid, port, ckpt, tokens_file = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    t0 = time.time()
    import jax, jax.numpy as jnp, numpy as np
    from gptoss_jax import distributed
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           bind_address=f"127.0.0.1:{port}", timeout_s=60)
    # gloo would pick its address from the host name: pin it to loopback (jax's CPU client takes no such
    # option, so its factory is replaced before the backend starts).
    from jax._src import distributed as jd, xla_bridge
    from jax._src.lib import _jax
    xla_bridge.register_backend_factory("cpu", lambda: xla_bridge.make_cpu_client(
        collectives=_jax.make_gloo_tcp_collectives(distributed_client=jd.global_state.client,
                                                   hostname="127.0.0.1")), priority=0, fail_quietly=False)
    from jax.experimental import multihost_utils
    import gptoss_jax as gj
    from gptoss_jax import expert_parallel
    from gptoss_jax.checkpoint.files import Reader
    read = {"bytes": 0}
    real_read_slice = Reader.read_slice
    def counting(self, name, index):
        x = real_read_slice(self, name, index)
        read["bytes"] += x.nbytes
        return x
    Reader.read_slice = counting
    ep_calls = [0]
    real_moe = expert_parallel.moe
    def moe(*a, **k):
        ep_calls[0] += 1
        return real_moe(*a, **k)
    expert_parallel.moe = moe
    mesh = gj.make_mesh(tensor=2, expert=4)
    model = gj.load_model(ckpt, jnp.float32, mesh=mesh, progress=False)
    logits = model(jnp.asarray(np.load(tokens_file)))
    full = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
    np.save(f"{tokens_file}.logits{pid}.npy", full)
    print("RESULT" + json.dumps({"process_count": jax.process_count(), "devices": jax.device_count(),
                                 "local_devices": jax.local_device_count(), "bytes_read": read["bytes"],
                                 "ep_calls": ep_calls[0], "seconds": time.time() - t0}))
''')


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, free_port, job_env, run_job):
    import dataclasses

    from gptoss_jax.checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("multihost")
    cfg = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, sliding_window=16)  # 2 layers, 4 experts
    write_random_checkpoint(cfg, root / "ckpt", "hf", seed=3, progress=False)
    tokens = np.random.default_rng(0).integers(0, 512, (4, 24)).astype(np.int32)
    np.save(root / "tokens.npy", tokens)
    file_bytes = sum(f.stat().st_size for f in (root / "ckpt").glob("*.safetensors"))

    port = str(free_port())
    # the single-process reference, computed while the two processes run
    ref, outs = run_job([[sys.executable, "-c", WORKER, str(i), port, str(root / "ckpt"), str(root / "tokens.npy")]
                         for i in range(2)], job_env(4), timeout=240,
                        meanwhile=lambda: np.asarray(gj.load_model(root / "ckpt", jnp.float32, progress=False)(tokens)))
    for code, out, err in outs:
        assert code == 0, err[-3000:]
    results = [json.loads(out.split("RESULT", 1)[1]) for _, out, _ in outs]
    logits = [np.load(root / f"tokens.npy.logits{i}.npy") for i in range(2)]
    return ref, logits, results, file_bytes


def test_two_processes_match_one(two_processes):
    ref, logits, results, _ = two_processes
    for r in results:
        assert (r["process_count"], r["devices"], r["local_devices"]) == (2, 8, 4)
        assert r["ep_calls"] > 0  # the MoE ran expert-parallel
    for full in logits:  # every process gathers the same, complete logits
        assert full.shape == ref.shape
        assert np.abs(full - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_each_process_reads_only_its_slices(two_processes):
    # tensor=2 spans the processes: each holds half of every tensor-split parameter (vocabulary, heads, expert
    # MLP width) and reads only that half; norms, router and biases of the hidden size are read whole.
    _, _, results, file_bytes = two_processes
    for r in results:
        assert 0.4 * file_bytes < r["bytes_read"] < 0.6 * file_bytes, (r["bytes_read"], file_bytes)
