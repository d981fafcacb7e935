"""Sharding on 8 simulated CPU devices (a subprocess: the device count is fixed when jax starts).

For each mesh the issue names, the model initialised sharded has the values of the single-device one, its
parameters are split as the logical-axis table says, the forward pass gives the same float32 logits and greedy
generation the same tokens (the MoE expert-parallel wherever the mesh has expert > 1); a checkpoint loaded onto
the mesh (each device's slices read from the files) holds exactly the values of the single-device load, sharded
alike; and `gptoss-jax plan`'s per-device figures equal the real shards' bytes. One fine-tuning step on the same
meshes: tests/mesh/test_sharded_training.py (its own file, so the two subprocesses run side by side). Gradients of
every parameter through the expert-parallel MoE are compared in the slow tier. The mesh tier (`make mesh`); `partition_spec` on
its own: tests/test_mesh_settings.py.
"""

import textwrap

import pytest

pytestmark = pytest.mark.mesh

SCRIPT = textwrap.dedent('''
    import dataclasses, json, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import gptoss_jax as gj
    from gptoss_jax import expert_parallel
    from gptoss_jax.kvcache import KVCache
    from gptoss_jax.plan import cache_length, plan

    ep_calls = [0]
    real_moe = expert_parallel.moe
    def counting_moe(*args, **kwargs):
        ep_calls[0] += 1
        return real_moe(*args, **kwargs)
    expert_parallel.moe = counting_moe

    cfg = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, num_hidden_layers=3, sliding_window=16)
    # Long enough that every device's share of the MoE's routed rows exceeds forms.ROWWISE_MAX_ROWS (64): the CPU's
    # row-by-row decode form unrolls one product per row and would take a minute to compile under expert
    # parallelism with the batch split 4 ways.
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 40)), jnp.int32)
    single = gj.init_model(cfg, seed=1, dtype=jnp.float32)
    ref = np.asarray(single(tokens))
    ref_values = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(single))}
    prompts = [list(range(3, 40)), list(range(40, 49))]  # ragged; prefilled in one 64-token chunk
    ref_tokens = gj.generate(single, prompts, max_new_tokens=6, temperature=0)
    ckpt = tempfile.mkdtemp()
    gj.save_checkpoint(single, ckpt + "/hf", format="hf")
    unsharded = gj.load_model(ckpt + "/hf", jnp.float32, progress=False)
    ref_loaded = np.asarray(unsharded(tokens))
    unsharded_values = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(unsharded))}
    out = {}
    for sizes in ({"fsdp": 8}, {"tensor": 2, "expert": 4}, {"data": 2, "fsdp": 2, "expert": 2}):
        mesh = gj.make_mesh(**sizes)
        model = gj.init_model(cfg, seed=1, dtype=jnp.float32, mesh=mesh)
        flat = nnx.to_flat_state(nnx.state(model))
        # jitted initialisation may round differently from eager in the last bit (fused multiply-adds)
        param_err = max(float(np.abs(np.asarray(v.get_value(), np.float64) - ref_values[p]).max()
                              / max(1e-30, np.abs(ref_values[p]).max())) for p, v in flat)
        specs = {"/".join(p): [list(a) if isinstance(a, tuple) else a for a in v.get_value().sharding.spec]
                 for p, v in flat}
        ep_calls[0] = 0
        logits = np.asarray(model(tokens))
        expert_parallel_forward = ep_calls[0] > 0
        # the real bytes on each device against `plan` on the same mesh sizes (float32, 2 x 300 tokens)
        per_device = [sum(v.get_value().addressable_shards[d].data.nbytes for _, v in flat) for d in range(8)]
        cache = KVCache.create_sharded(cfg, 2, cache_length(cfg, 300), jnp.float32, mesh)
        cache_bytes = [sum(a.addressable_shards[d].data.nbytes for a in jax.tree.leaves(cache)) for d in range(8)]
        planned = plan(cfg, sizes, batch=2, seq_len=300, dtype=jnp.float32)
        loaded = gj.load_model(ckpt + "/hf", jnp.float32, mesh=mesh, progress=False)
        loaded_specs = {"/".join(p): [list(a) if isinstance(a, tuple) else a for a in v.get_value().sharding.spec]
                        for p, v in nnx.to_flat_state(nnx.state(loaded))}
        loaded_equal = all(np.array_equal(np.asarray(v.get_value()), unsharded_values[p])
                           for p, v in nnx.to_flat_state(nnx.state(loaded)))
        out[json.dumps(sizes)] = {"param_err": param_err, "specs": specs, "loaded_specs_match": loaded_specs == specs,
                                  "loaded_equal": loaded_equal, "expert_parallel": expert_parallel_forward,
                                  "per_device": per_device, "plan_params": planned.params,
                                  "cache_bytes": cache_bytes, "plan_cache": planned.kv_cache,
                                  "max_err": float(np.abs(logits - ref).max()), "scale": float(np.abs(ref).max()),
                                  "loaded_err": float(np.abs(np.asarray(loaded(tokens)) - ref_loaded).max()),
                                  "same_greedy": gj.generate(model, prompts, max_new_tokens=6, temperature=0)
                                  == ref_tokens}
    print("RESULT" + json.dumps(out))
''')


GRAD_SCRIPT = textwrap.dedent('''
    import dataclasses, json
    import jax.numpy as jnp, numpy as np
    from flax import nnx
    import gptoss_jax as gj

    cfg = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, num_hidden_layers=3, sliding_window=16)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 40)), jnp.int32)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(4, 40, 512)), jnp.float32)
    grad = nnx.jit(nnx.grad(lambda m, t: jnp.sum(m.forward(t) * probe)))
    def grads(mesh=None):  # dense experts: the expert weights are trainable parameters too
        model = gj.init_model(cfg, seed=1, dtype=jnp.float32, experts="dense", mesh=mesh)
        return {"/".join(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grad(model, tokens))}
    ref = grads()
    out = {}
    for sizes in ({"tensor": 2, "expert": 4}, {"data": 2, "fsdp": 2, "expert": 2}):
        g = grads(gj.make_mesh(**sizes))
        out[json.dumps(sizes)] = {p: float(np.abs(g[p] - r).max() / max(1e-30, np.abs(r).max()))
                                  for p, r in ref.items()}
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def results(run_8_devices):
    return run_8_devices(SCRIPT)


@pytest.mark.slow  # reason: one more 8-device subprocess with three backward-pass compiles (~60 s on 2 cores)
def test_expert_parallel_gradients_equal_single_device(run_8_devices):
    """d(sum(logits * probe)) / d(every parameter), experts included, through the expert-parallel shard_map
    (all-gathers over fsdp, psum over expert and tensor, the bias kept on one tensor shard)."""
    for mesh, errs in run_8_devices(GRAD_SCRIPT).items():
        assert "blocks/mlp/mlp1/weight" in errs and "blocks/mlp/mlp2_b" in errs
        worst = max(errs, key=errs.get)
        assert errs[worst] <= 1e-5, (mesh, worst, errs[worst])  # relative to each gradient's largest entry


MESHES = ['{"fsdp": 8}', '{"tensor": 2, "expert": 4}', '{"data": 2, "fsdp": 2, "expert": 2}']


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_model_equals_single_device(results, mesh):
    r = results[mesh]
    assert r["param_err"] <= 1e-6
    assert r["max_err"] <= 1e-5 * max(1.0, r["scale"])
    assert r["same_greedy"]  # KV-cached generation with a cache sharded over the same mesh
    # loaded from a checkpoint onto the mesh: sharded alike, the logits of the same checkpoint loaded unsharded
    assert r["loaded_specs_match"]
    assert r["loaded_equal"]  # read slice by slice, bit for bit the values of the unsharded load
    assert r["loaded_err"] <= 1e-5 * max(1.0, r["scale"])


@pytest.mark.parametrize("mesh", MESHES)
def test_moe_runs_per_device_on_every_mesh(results, mesh):
    """Kernels cannot be split by the compiler: on any mesh the MoE runs inside expert_parallel's shard_map
    (expert-parallel where the mesh has experts, FSDP / tensor-parallel otherwise)."""
    assert results[mesh]["expert_parallel"]


@pytest.mark.parametrize("mesh", MESHES)
def test_plan_figures_equal_the_real_shards(results, mesh):
    r = results[mesh]
    assert r["per_device"] == [r["plan_params"]] * 8  # every device holds exactly what `plan` says
    assert r["cache_bytes"] == [r["plan_cache"]] * 8


# Expected PartitionSpecs per kind of parameter (tiny: hidden 64, 4 heads x 64, 2 kv heads, 4 experts, 128-wide
# expert MLP, vocabulary 512, 3 stacked layers); a mesh axis that does not divide a dimension is left out.
EXPECTED = {
    '{"fsdp": 8}': {"embedding": [None, "fsdp"], "blocks/attn/qkv_w": [None, None, "fsdp"],
                    "blocks/mlp/mlp1/blocks": [None, None, None, "fsdp"], "blocks/mlp/mlp1/scales": [None, None, None, None],
                    "blocks/attn/sinks": [None, None]},
    '{"tensor": 2, "expert": 4}': {"embedding": ["tensor", None], "blocks/attn/qkv_w": [None, "tensor", None],
                                   "blocks/attn/out_w": [None, None, "tensor"], "blocks/attn/sinks": [None, "tensor"],
                                   "blocks/mlp/mlp1/blocks": [None, "expert", "tensor", None],
                                   "blocks/mlp/mlp2/scales": [None, "expert", None, "tensor"],
                                   "blocks/mlp/gate_w": [None, "expert", None]},
    '{"data": 2, "fsdp": 2, "expert": 2}': {"embedding": [None, "fsdp"],
                                            # whole experts per device: over expert, then fsdp
                                            "blocks/mlp/mlp1/blocks": [None, ["expert", "fsdp"], None, None],
                                            "blocks/mlp/mlp1_b": [None, ["expert", "fsdp"], None]},
}


@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_are_sharded_as_the_table_says(results, mesh):
    specs = results[mesh]["specs"]
    for path, want in EXPECTED[mesh].items():
        got = specs[path] + [None] * (len(want) - len(specs[path]))  # PartitionSpec drops trailing Nones
        assert got == want, (path, got, want)
