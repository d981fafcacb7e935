"""Regression tests for the XLA:CPU layer-loop forms (`gptoss_jax.forms.CPUForms.layers`; docs/cpu_performance.md,
section 4).

Inside a rolled loop over the stacked layers XLA:CPU converts every stacked bf16 weight to a float32 copy on each
call (2x the weights in extra memory). The compiled prefill and decode steps must hold no such copy; with the
CPU forms switched off the same check finds it, so the test can fail.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import ops
from gptoss_jax.forms import CPUForms, Forms
from gptoss_jax.engine import steps
from gptoss_jax.kvcache import KVCache

CFG = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, num_hidden_layers=4)


def _compiled_steps():
    model = gj.init_model(CFG, seed=0, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    steps.cache_clear()  # trace anew under the current ops
    prefill, _, decode = steps(graphdef)
    cache = KVCache.create(CFG, 1, 128)
    one = jnp.ones((1,), jnp.int32)
    prefill_hlo = prefill.lower(state, cache, one * 0, one.astype(bool), jnp.ones((1, 16), jnp.int32), one * 16,
                                jnp.zeros((1, CFG.hidden_size), jnp.bfloat16), every_row=True).compile().as_text()
    decode_hlo = decode.lower(state, cache, one, one.astype(bool), one.astype(jnp.uint32), jnp.zeros(1),
                              jnp.ones(1), one * 0, None).compile().as_text()
    stacked = [v.get_value().shape for _, v in nnx.to_flat_state(nnx.state(model.blocks))
               if v.get_value().dtype == jnp.bfloat16 and v.get_value().ndim >= 3]
    return prefill_hlo, decode_hlo, stacked


def _f32_copies(hlo: str, shapes) -> list[str]:
    return [s for s in (f"f32[{','.join(map(str, shape))}]" for shape in shapes) if s in hlo]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the forms under test are XLA:CPU's")
def test_inference_steps_hold_no_float32_copy_of_the_stacked_weights(monkeypatch):
    prefill_hlo, decode_hlo, stacked = _compiled_steps()
    assert stacked  # qkv_w, out_w, gate_w: [layers, out, in]
    assert _f32_copies(decode_hlo, stacked) == []
    assert _f32_copies(prefill_hlo, stacked) == []
    # With the plain layer loop the copies are there (what this test guards against).
    monkeypatch.setattr(CPUForms, "layers", Forms.layers)
    try:
        prefill_hlo, decode_hlo, stacked = _compiled_steps()
    finally:
        steps.cache_clear()  # drop the steps traced with the plain loop
    assert _f32_copies(decode_hlo, stacked) and _f32_copies(prefill_hlo, stacked)


def test_the_cpu_shaping_stays_off_the_plain_path():
    """A 1-row product with K = 4096 is cut under XLA:CPU's matrix-vector limit, its sum behind a barrier; the
    plain form (TPU, GPU) is the one dot of the specification."""
    x, w = jnp.ones((1, 4096), jnp.bfloat16), jnp.ones((8, 4096), jnp.bfloat16)
    plain, cpu = (str(jax.make_jaxpr(forms.matmul)(x, w)) for forms in (Forms(), CPUForms()))
    assert plain.count("dot_general") == 1 and "optimization_barrier" not in plain
    assert cpu.count("dot_general") == 2 and "optimization_barrier" in cpu
    assert isinstance(ops.forms(x), CPUForms) == (jax.default_backend() == "cpu")
