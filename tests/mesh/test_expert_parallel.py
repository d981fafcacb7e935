"""The MoE on a mesh (`gptoss_jax.expert_parallel`), on 8 simulated CPU devices: each layout the block can take
(tokens gathered over fsdp with the experts in place, the experts gathered instead, psum over expert and tensor,
reduce-scatter over fsdp) gives one device's output and gradients. The whole model on meshes: test_sharding.py."""

import textwrap

import pytest

pytestmark = pytest.mark.mesh

MOE_SCRIPT = textwrap.dedent('''
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import gptoss_jax as gj
    from gptoss_jax import expert_parallel
    from gptoss_jax.model import MoE
    from gptoss_jax.sharding import variable_shardings

    # 8 experts, so that they divide over fsdp=8 and over expert x fsdp. Wide experts (F = 512) make a layer's
    # weights outweigh a few tokens' routed rows (tokens move) but not 32 tokens' (weights move); every device
    # gets more than forms.ROWWISE_MAX_ROWS rows, so XLA:CPU's row-by-row form (slow to compile) stays out.
    cfg = dataclasses.replace(gj.ModelConfig.tiny(), num_experts=8, experts_per_token=3, intermediate_size=512)
    moe = MoE(cfg, jnp.float32, "dense", nnx.Rngs(2))
    rng = np.random.default_rng(0)
    layouts = []
    real_layout = expert_parallel.layout
    def recording_layout(*args, **kwargs):
        lay = real_layout(*args, **kwargs)
        layouts.append([list(lay.experts), list(lay.tokens), lay.tensor_parallel])
        return lay
    expert_parallel.layout = recording_layout
    def run(moe, x, grads):  # the output and d(sum(out * probe)) / d(x, every expert weight)
        out = np.asarray(nnx.jit(lambda m, x: m(x))(moe, x))
        if not grads:
            return out, None, {}
        probe = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
        gm, gx = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) * probe), argnums=(0, 1)))(moe, x)
        return out, np.asarray(gx), {"/".join(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(gm)}
    def rel(a, b):
        return float(np.abs(a - b).max() / max(1e-30, np.abs(b).max()))
    out = {}
    # gradients where the tokens move (new transposes: all-gather <-> reduce-scatter); the weights-moved layout's
    # gradients are those of test_sharding's training step
    for sizes, T, grads in (({"fsdp": 8}, 4, True), ({"fsdp": 8}, 32, False),
                            ({"data": 2, "fsdp": 2, "expert": 2}, 8, True),
                            ({"data": 2, "fsdp": 2, "expert": 2}, 32, False),
                            ({"fsdp": 2, "tensor": 2, "expert": 2}, 4, True)):
        x = jnp.asarray(rng.normal(size=(8, T, cfg.hidden_size)), jnp.float32)
        ref, ref_gx, ref_g = run(moe, x, grads)
        mesh = gj.make_mesh(**sizes)
        graphdef, state = nnx.split(moe)
        placed = dict(variable_shardings(moe, mesh))
        state = nnx.from_flat_state([(p, v.replace(jax.device_put(v.get_value(), placed[p])))
                                     for p, v in nnx.to_flat_state(state)])
        layouts.clear()
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        got, gx, g = run(nnx.merge(graphdef, state), jax.device_put(x, batch), grads)
        out[json.dumps([sizes, T])] = {
            "layouts": layouts[:1], "err": rel(got, ref),
            "grad_err": max([rel(gx, ref_gx)] + [rel(g[p], r) for p, r in ref_g.items()]) if grads else None}
    print("RESULT" + json.dumps(out))
''')


@pytest.mark.parametrize("case, layout", [
    ('[{"fsdp": 8}, 4]', [["fsdp"], ["fsdp"], False]),  # decode-sized: the 32 tokens move, the experts stay
    ('[{"fsdp": 8}, 32]', [[], [], False]),  # 256 tokens' rows outweigh the experts: those are gathered
    ('[{"data": 2, "fsdp": 2, "expert": 2}, 8]', [["expert", "fsdp"], ["fsdp"], False]),
    ('[{"data": 2, "fsdp": 2, "expert": 2}, 32]', [["expert"], [], False]),
    ('[{"fsdp": 2, "tensor": 2, "expert": 2}, 4]', [["expert", "fsdp"], ["fsdp"], True]),
])
def test_moe_layouts_equal_one_device(moe_results, case, layout):
    """Each way of laying the MoE out (tokens gathered over fsdp with the experts in place, or the experts
    gathered; psum over expert and tensor; reduce-scatter over fsdp) gives one device's output and gradients."""
    r = moe_results[case]
    assert r["layouts"] == [layout]
    assert r["err"] <= 1e-6
    assert r["grad_err"] is None or r["grad_err"] <= 1e-5


@pytest.fixture(scope="module")
def moe_results(run_8_devices):
    return run_8_devices(MOE_SCRIPT)
