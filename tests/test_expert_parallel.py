"""The MoE on a mesh (`gptoss_jax.expert_parallel`), on 8 simulated CPU devices: each layout the block can take
(tokens gathered over fsdp with the experts in place, the experts gathered instead, psum over expert and tensor,
reduce-scatter over fsdp) gives one device's output and gradients. The whole model on meshes: test_sharding.py."""

import textwrap

import pytest

MOE_SCRIPT = textwrap.dedent('''
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import gptoss_jax as gj
    from gptoss_jax import expert_parallel
    from gptoss_jax.model import MoE
    from gptoss_jax.sharding import variable_shardings

    # 8 experts, so that they divide over fsdp=8 and over expert x fsdp; hidden 64 splits over fsdp too
    cfg = dataclasses.replace(gj.ModelConfig.tiny(), num_experts=8, experts_per_token=3)
    moe = MoE(cfg, jnp.float32, "dense", nnx.Rngs(2))
    rng = np.random.default_rng(0)
    layouts = []
    real_layout = expert_parallel.layout
    def recording_layout(*args, **kwargs):
        lay = real_layout(*args, **kwargs)
        layouts.append([list(lay.experts), list(lay.tokens), lay.tensor_parallel])
        return lay
    expert_parallel.layout = recording_layout
    def run(moe, x):  # the block's output and d(sum(out * probe)) / d(x, every expert weight)
        probe = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
        def loss(moe, x):
            return jnp.sum(moe(x) * probe)
        out = nnx.jit(lambda m, x: m(x))(moe, x)
        gm, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(moe, x)
        flat = {"/".join(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(gm)}
        return np.asarray(out), np.asarray(gx), flat
    out = {}
    for sizes, T in (({"fsdp": 8}, 1), ({"fsdp": 8}, 64), ({"data": 2, "fsdp": 2, "expert": 2}, 1),
                     ({"data": 2, "fsdp": 2, "expert": 2}, 64), ({"fsdp": 2, "tensor": 2, "expert": 2}, 2)):
        x = jnp.asarray(rng.normal(size=(8, T, cfg.hidden_size)), jnp.float32)
        ref, ref_gx, ref_g = run(moe, x)
        mesh = gj.make_mesh(**sizes)
        graphdef, state = nnx.split(moe)
        placed = dict(variable_shardings(moe, mesh))
        state = nnx.from_flat_state([(p, v.replace(jax.device_put(v.get_value(), placed[p])))
                                     for p, v in nnx.to_flat_state(state)])
        sharded = nnx.merge(graphdef, state)
        layouts.clear()
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        got, gx, g = run(sharded, jax.device_put(x, batch))
        out[json.dumps([sizes, T])] = {
            "layouts": layouts[:1], "err": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "grad_err": max([float(np.abs(gx - ref_gx).max() / np.abs(ref_gx).max())]
                            + [float(np.abs(g[p] - r).max() / max(1e-30, np.abs(r).max())) for p, r in ref_g.items()])}
    print("RESULT" + json.dumps(out))
''')


@pytest.mark.parametrize("case, layout", [
    ('[{"fsdp": 8}, 1]', [["fsdp"], ["fsdp"], False]),  # decode: the 8 tokens move, the experts stay
    ('[{"fsdp": 8}, 64]', [[], [], False]),  # 512 tokens' rows outweigh the experts: those are gathered
    ('[{"data": 2, "fsdp": 2, "expert": 2}, 1]', [["expert", "fsdp"], ["fsdp"], False]),
    ('[{"data": 2, "fsdp": 2, "expert": 2}, 64]', [["expert"], [], False]),
    ('[{"fsdp": 2, "tensor": 2, "expert": 2}, 2]', [["expert", "fsdp"], ["fsdp"], True]),
])
def test_moe_layouts_equal_one_device(moe_results, case, layout):
    """Each way of laying the MoE out (tokens gathered over fsdp with the experts in place, or the experts
    gathered; psum over expert and tensor; reduce-scatter over fsdp) gives one device's output and gradients."""
    r = moe_results[case]
    assert r["layouts"] == [layout]
    assert r["err"] <= 1e-6
    assert r["grad_err"] <= 1e-5


@pytest.fixture(scope="module")
def moe_results(run_8_devices):
    return run_8_devices(MOE_SCRIPT)
