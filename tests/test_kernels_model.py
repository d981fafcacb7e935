"""The model with its Pallas kernels forced on (interpret mode, on CPU) computes what it computes with the XLA twins:
logits, every loss gradient, and KV-cached greedy decoding (the decode-attention kernel)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import ops

# conftest's tiny_config: sliding (window 16), full, sliding, so the band is exercised; its tiny_tokens, 40 a row,
# are no multiple of any kernel block.


@pytest.fixture(scope="module")
def model(tiny_config):
    """`model(kernels, experts)`: the tiny model (seed 1, float32) with that kernel choice, built once per pair."""
    built = {}

    def get(kernels: str, experts: str):
        if (kernels, experts) not in built:
            built[kernels, experts] = gj.init_model(dataclasses.replace(tiny_config, kernels=kernels), seed=1,
                                                    dtype=jnp.float32, experts=experts)
        return built[kernels, experts]

    return get


def _loss_and_grads(model, tokens):
    def loss(model):
        logits = model.forward(jnp.asarray(tokens[:, :-1]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(tokens[:, 1:])).mean()

    return nnx.jit(lambda m: nnx.value_and_grad(loss)(m))(model)


# Each backend's kernels once, between them both expert kinds (the kernel tests cover the full grid).
@pytest.mark.parametrize("backend, experts", [("tpu", "dense"), ("gpu", "mxfp4")])
def test_logits_and_gradients_match_the_twins(model, tiny_tokens, backend, experts):
    twin, kernel = model("xla", experts), model(f"interpret-{backend}", experts)
    (loss_t, grads_t), (loss_k, grads_k) = _loss_and_grads(twin, tiny_tokens), _loss_and_grads(kernel, tiny_tokens)
    np.testing.assert_allclose(float(loss_k), float(loss_t), rtol=1e-6)
    flat_t, flat_k = nnx.to_flat_state(grads_t), nnx.to_flat_state(grads_k)
    assert [p for p, _ in flat_t] == [p for p, _ in flat_k]
    for (path, g_t), (_, g_k) in zip(flat_t, flat_k):
        g_t, g_k = np.asarray(g_t.get_value()), np.asarray(g_k.get_value())
        # float32, summation order only: within 1e-5 of the gradient's own scale
        np.testing.assert_allclose(g_k, g_t, atol=1e-5 * max(np.abs(g_t).max(), 1e-6), err_msg=str(path))
    if experts == "dense":  # every parameter is trained, experts included
        assert any(p[-1] == "weight" and np.abs(np.asarray(g.get_value())).max() > 0 for p, g in flat_k)


def test_kernel_choice_follows_config_and_environment(tiny_config, monkeypatch):
    x = jnp.zeros(3)  # an array on this host's default backend (CPU here)
    assert ops.implementation("xla", x) == ("xla", False, None)
    assert ops.implementation("interpret-gpu", x) == ("pallas", True, "gpu")
    assert ops.implementation("auto", x)[0] == ("pallas" if jax.default_backend() in ("tpu", "gpu") else "xla")
    with pytest.raises(gj.ConfigError, match="needs a TPU or GPU target"):
        ops.implementation("pallas", x)
    monkeypatch.setenv(ops.KERNELS_ENV, "interpret-tpu")
    assert ops.implementation("auto", x) == ("pallas", True, "tpu")
    assert ops.implementation("xla", x) == ("xla", False, None)  # an explicit config wins over the environment
    monkeypatch.setenv(ops.KERNELS_ENV, "cuda")
    with pytest.raises(gj.ConfigError, match="GPTOSS_KERNELS='cuda'"):
        ops.implementation("auto", x)
    with pytest.raises(gj.ConfigError, match="kernels"):
        dataclasses.replace(tiny_config, kernels="triton")


def test_cached_greedy_decoding_with_the_decode_kernel(model, tiny_tokens):
    prompts = [list(tiny_tokens[0, :13]), list(tiny_tokens[1, :29])]  # ragged: per-row positions and empty slots
    twin = gj.generate(model("xla", "mxfp4"), prompts, max_new_tokens=6, temperature=0)  # the gradients' twin
    kernel = gj.generate(model("interpret-tpu", "mxfp4"), prompts, max_new_tokens=6, temperature=0)
    assert kernel == twin
