"""One fine-tuning step on 8 simulated CPU devices (a subprocess: the device count is fixed when jax starts): on each
mesh of tests/mesh/test_sharding.py, one AdamW step of every parameter (dense experts) on packed rows, the batch
split over the mesh's batch axes, gives one device's loss, gradient norm and updated parameters, which stay
sharded. The mesh tier (`make mesh`)."""

import textwrap

import pytest

pytestmark = pytest.mark.mesh

TRAIN_SCRIPT = textwrap.dedent('''
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import gptoss_jax as gj
    from gptoss_jax.train.data import Example, Rows, pack
    from gptoss_jax.train.step import decay_mask, init_opt_state, make_optimizer, make_train_step
    from gptoss_jax.train.trainer import _device_batch

    cfg = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, sliding_window=16)
    rng = np.random.default_rng(0)
    rows = pack([Example(rng.integers(0, 512, n).astype(np.int32), rng.random(n) < 0.7)
                 for n in (40, 25, 17, 33, 30, 12, 41, 20, 38, 9, 26, 31)], 40)[:8]
    rows = Rows(*(getattr(rows, f.name)[None] for f in dataclasses.fields(rows)))  # one micro-batch of 8 rows
    def train_step(mesh=None):  # one AdamW step of every parameter (dense experts) on packed rows
        model = gj.init_model(cfg, seed=3, dtype=jnp.float32, experts="dense", mesh=mesh)
        graphdef, params = nnx.split(model)
        tx, schedule = make_optimizer(lr=1e-4, warmup=0, steps=10, weight_decay=0.1, clip_norm=1.0,
                                      mask=decay_mask(params))
        step = make_train_step(graphdef, tx, schedule, donate=False)
        new, _, metrics = step(params, init_opt_state(tx, params), 0, _device_batch(rows, mesh))
        flat = {"/".join(p): v.get_value() for p, v in nnx.to_flat_state(new)}
        return flat, {k: float(v) for k, v in metrics.items()}
    ref, ref_metrics = train_step()
    out = {}
    for sizes in ({"fsdp": 8}, {"tensor": 2, "expert": 4}, {"data": 2, "fsdp": 2, "expert": 2}):
        new, metrics = train_step(gj.make_mesh(**sizes))
        out[json.dumps(sizes)] = {
            "param_err": max(float(np.abs(np.asarray(v) - np.asarray(ref[p])).max()) for p, v in new.items()),
            "loss": [metrics["loss"], ref_metrics["loss"]], "grad_norm": [metrics["grad_norm"], ref_metrics["grad_norm"]],
            "sharded": sum(len(v.sharding.device_set) > 1 and not v.sharding.is_fully_replicated
                           for v in new.values()), "params": len(new)}
    print("RESULT" + json.dumps(out))
''')



MESHES = ['{"fsdp": 8}', '{"tensor": 2, "expert": 4}', '{"data": 2, "fsdp": 2, "expert": 2}']  # as test_sharding's


@pytest.fixture(scope="module")
def train_results(run_8_devices):
    return run_8_devices(TRAIN_SCRIPT)


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_step_equals_single_device(train_results, mesh):
    """One fine-tuning step (packed rows, batch sharded over the mesh's batch axes, AdamW) on every mesh: the
    loss and the gradient norm equal one device's, and so does every updated parameter (dense experts included) to
    0.3 lr: Adam's first update is ~lr * g / (|g| + eps), so a gradient entry near eps, where rounding differs,
    moves its weight by a fraction of lr (lr = 1e-4), while a wrong gradient would move it by up to 2 lr."""
    r = train_results[mesh]
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5)
    assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=1e-5)
    assert r["param_err"] <= 3e-5
    assert r["sharded"] > 0  # the updated parameters stay sharded
