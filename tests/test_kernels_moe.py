"""The Pallas MoE grouped matmul (kernels/moe_pallas.py) against its XLA twin, in interpret mode on CPU, and its
lowering for TPU (Mosaic) and CUDA (Triton) with jax.export.

Tolerances are bounds, not guesses: kernel and twin add the same float32 products (bf16 x bf16 and MXFP4 x float
products are exact in float32) in different orders, so each result lies within n * 2^-24 * sum|terms| of the
exact sum (n terms; one rounding per product for float32 inputs adds at most one more unit). The sums of
magnitudes come from the twin itself run on |x|, |W|, |bias| (and |cotangent| for the gradients).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_kernels.moe import grouped_matmul_swiglu_xla, grouped_matmul_xla
from gptoss_kernels.moe_pallas import (grouped_matmul_pallas, grouped_matmul_swiglu_pallas, tpu_weight_layout,
                                      work_items)
from gptoss_kernels.mxfp4 import Packed, dequantize

E, M, K, N = 5, 37, 64, 64  # M is no multiple of the 16-row tile used below
TILE_M = 16
ALPHA, LIMIT = 1.702, 7.0
GROUPS = {
    "ragged": [9, 0, 1, 20, 0],  # empty experts, a one-token group, 7 rows past the groups (zeros)
    "leading_empty": [0, 0, 16, 1, 20],  # fills M exactly; a group boundary inside a tile
    "all_empty": [0, 0, 0, 0, 0],
}
BACKENDS = ["tpu", "gpu"]
TRITON_CALL = "__gpu$xla.gpu.triton"


def make_weights(kind: str, rng, n=N, k=K, scales=(100, 140)):
    if kind == "mxfp4":
        return Packed(jnp.asarray(rng.integers(0, 256, (E, n, k // 2)), jnp.uint8),
                      jnp.asarray(rng.integers(*scales, (E, n, k // 32)), jnp.uint8))
    dtype = {"dense_f32": jnp.float32, "dense_bf16": jnp.bfloat16}[kind]
    return jnp.asarray(rng.standard_normal((E, n, k)) * k**-0.5, dtype)


def dense_f32(w):
    return dequantize(w.blocks, w.scales, jnp.float32) if isinstance(w, Packed) else w.astype(jnp.float32)


def case(kind: str, seed=0, scales=(100, 140)):
    rng = np.random.default_rng(seed)
    dtype = jnp.bfloat16 if kind == "dense_bf16" else jnp.float32
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    b = jnp.asarray(rng.standard_normal((E, N)), dtype)
    return x, make_weights(kind, rng, scales=scales), b


@functools.partial(jax.jit, static_argnames=("backend", "swiglu"))
def kernel_fwd(x, gs, w, b, backend, swiglu=False):
    if swiglu:
        return grouped_matmul_swiglu_pallas(x, gs, w, b, alpha=ALPHA, limit=LIMIT, tile_m=TILE_M, backend=backend,
                                            interpret=True)
    return grouped_matmul_pallas(x, gs, w, b, tile_m=TILE_M, backend=backend, interpret=True)


twin = jax.jit(grouped_matmul_xla)  # compiled once for all the group-size cases of a shape


def magnitude(x, gs, w, b):
    """sum_k |x[m, k] W[e(m), n, k]| + |b[e(m), n]|: the scale of each output's rounding error."""
    return twin(jnp.abs(x).astype(jnp.float32), gs, jnp.abs(dense_f32(w)),
                              jnp.abs(b).astype(jnp.float32))


def assert_within(out, ref, bound, tol, what):
    err = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    ratio = np.max(err / (np.asarray(bound, np.float64) * tol + 1e-300))
    assert ratio <= 1.0, f"{what}: error {ratio:.3g} x the tolerance"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mxfp4", "dense_f32", "dense_bf16"])
def test_forward_matches_twin(backend, kind):
    x, w, b = case(kind)
    for name, sizes in GROUPS.items():
        gs = jnp.asarray(sizes, jnp.int32)
        out = kernel_fwd(x, gs, w, b, backend)
        ref = twin(x, gs, w, b)
        assert out.shape == (M, N) and out.dtype == jnp.float32
        assert_within(out, ref, magnitude(x, gs, w, b), 2 * (K + 1) * 2.0**-24, f"{name}")
        assert np.all(np.asarray(out)[sum(sizes):] == 0), f"{name}: rows past the groups must be zero"


def test_wrong_group_sizes_change_the_output():
    """The comparison can fail: the same rows under shuffled group sizes give a different result."""
    x, w, b = case("mxfp4")
    gs = jnp.asarray(GROUPS["ragged"], jnp.int32)
    out = kernel_fwd(x, gs, w, b, "gpu")
    shuffled = kernel_fwd(x, gs[jnp.array([3, 0, 4, 1, 2])], w, b, "gpu")
    assert float(jnp.max(jnp.abs(out - shuffled))) > 1e-3 * float(jnp.max(jnp.abs(out)))


@pytest.mark.parametrize("M_rows,tm", [(37, 16), (5, 8), (256, 128), (1, 16)])
def test_work_items_write_every_row_once(M_rows, tm):
    """Each padded row is written by exactly one item, with a value iff it lies inside its expert's group."""
    rng = np.random.default_rng(M_rows)
    items = jax.jit(work_items, static_argnums=(1, 2))
    num_tiles = -(-M_rows // tm)
    for _ in range(20):
        total = rng.integers(0, M_rows + 1)
        sizes = np.bincount(rng.integers(0, E, total), minlength=E)
        meta = np.asarray(items(jnp.asarray(sizes, jnp.int32), num_tiles, tm))
        tile, expert, lo, hi, end = meta
        assert np.all(np.diff(tile) >= 0), "tiles must not decrease along the items"
        writes = np.zeros(num_tiles * tm, int)
        ends = np.cumsum(sizes)
        for t, e, a, z, n in meta.T:
            assert t * tm <= a and z <= (t + 1) * tm
            writes[a:z] += 1
            if n > 0:  # a real item: its expert's rows, and zeros only past all groups
                assert a >= ends[e] - sizes[e] and min(z, n) <= ends[e] and (z <= n or n == total)
        assert np.all(writes == 1), sizes


def grads(f, x, gs, w, b, ct, wrt_w):
    if wrt_w:
        return jax.grad(lambda x, w, b: jnp.sum(f(x, gs, w, b) * ct), argnums=(0, 1, 2))(x, w, b)
    return jax.grad(lambda x, b: jnp.sum(f(x, gs, w, b) * ct), argnums=(0, 1))(x, b)


twin_grads = jax.jit(grads, static_argnums=(0, 6))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mxfp4", "dense_f32"])
def test_gradients_match_twin(backend, kind):
    x, w, b = case(kind, seed=1)
    dense = kind != "mxfp4"
    ct = jnp.asarray(np.random.default_rng(2).standard_normal((M, N)), jnp.float32)
    gs = jnp.asarray(GROUPS["ragged"], jnp.int32)
    got = jax.jit(lambda x, w, b: grads(lambda *a: kernel_fwd(*a, backend), x, gs, w, b, ct, dense))(x, w, b)
    ref = twin_grads(grouped_matmul_xla, x, gs, w, b, ct, dense)
    # Magnitudes: the twin's gradient with every factor replaced by its absolute value.
    mag = twin_grads(grouped_matmul_xla, jnp.abs(x), gs, jnp.abs(dense_f32(w)), jnp.abs(b), jnp.abs(ct), dense)
    tol = 2 * (max(M, N) + 1) * 2.0**-24
    for name, g, r, m in zip(["dx", "dW", "dbias"] if dense else ["dx", "dbias"], got, ref, mag):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert_within(g, r, m, tol, name)
    assert np.all(np.asarray(got[0])[sum(GROUPS["ragged"]):] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_epilogue_matches_twin(backend):
    # Scales near those of real checkpoints, so the activations cross both clamps and the sigmoid's knee.
    x, w, b = case("mxfp4", seed=3, scales=(122, 126))
    gs = jnp.asarray(GROUPS["ragged"], jnp.int32)
    ct = jnp.asarray(np.random.default_rng(4).standard_normal((M, N // 2)), jnp.float32)
    fused = functools.partial(kernel_fwd, backend=backend, swiglu=True)
    out, got = jax.jit(lambda x, b: (fused(x, gs, w, b), grads(fused, x, gs, w, b, ct, False)))(x, b)
    fref = functools.partial(grouped_matmul_swiglu_xla, alpha=ALPHA, limit=LIMIT)
    ref = jax.jit(fref)(x, gs, w, b)
    h = twin(x, gs, w, b)
    assert out.shape == (M, N // 2) and np.all(np.asarray(out)[sum(GROUPS["ragged"]):] == 0)
    assert float(jnp.mean(h[:, 0::2] > LIMIT)) > 0.02 and float(jnp.mean(jnp.abs(h[:, 1::2]) < 1)) > 0.02
    # The SwiGLU is 8.8-Lipschitz in the gate and 7 in the linear half: 16x the matmul's bound covers both.
    mag = magnitude(x, gs, w, b)
    assert_within(out, ref, jnp.maximum(mag[:, 0::2], mag[:, 1::2]), 16 * 2 * (K + 1) * 2.0**-24, "swiglu")

    for name, g, r in zip(["dx", "dbias"], got, twin_grads(fref, x, gs, w, b, ct, False)):
        # Through the SwiGLU's second derivative the matmul's rounding (~1e-6 relative) moves the gradient by a
        # like relative amount; 1e-4 of the largest entry leaves a margin of 100.
        err = float(jnp.max(jnp.abs(g - r)))
        assert err <= 1e-4 * float(jnp.max(jnp.abs(r))), f"{name}: {err}"


N_WIDE, TILE_N_WIDE = 640, 256  # three N tiles of 256 columns, the last clipped to 128


@pytest.mark.parametrize("backend,layout", [("tpu", "nk"), ("tpu", "kn"), ("gpu", None)])
@pytest.mark.parametrize("kind", ["mxfp4", "dense_f32"])
def test_wide_tiles_match_twin(backend, layout, kind):
    """N = 640 in several tiles. TPU: the kernels reading the weights row-major ("nk") and transposed ("kn": how a
    TPU stores gpt-oss's codes, so that they are read without a copy), in 256-column tiles: the SwiGLU's lane
    gathers over whole pairs of 128-lane vregs, and a clipped last N tile whose garbage must stay out of every
    result. GPU: ten 64-column tiles of the dense dW kernel. Forward (plain and SwiGLU), dx, dW and dbias against
    the twin."""
    rng = np.random.default_rng(5)
    w = make_weights(kind, rng, n=N_WIDE, scales=(122, 126))
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((E, N_WIDE)), jnp.float32)
    gs = jnp.asarray(GROUPS["ragged"], jnp.int32)
    opts = dict(tile_m=TILE_M, tile_n=TILE_N_WIDE, backend=backend, interpret=True, weight_layout=layout)
    plain = functools.partial(grouped_matmul_pallas, **opts)
    fused = functools.partial(grouped_matmul_swiglu_pallas, alpha=ALPHA, limit=LIMIT, **opts)
    fref = functools.partial(grouped_matmul_swiglu_xla, alpha=ALPHA, limit=LIMIT)
    dense = kind != "mxfp4"
    ct = jnp.asarray(rng.standard_normal((M, N_WIDE)), jnp.float32)

    out, act, got = jax.jit(lambda x, w, b: (plain(x, gs, w, b), fused(x, gs, w, b),
                                             grads(plain, x, gs, w, b, ct, dense)))(x, w, b)
    mag = magnitude(x, gs, w, b)
    assert_within(out, twin(x, gs, w, b), mag, 2 * (K + 1) * 2.0**-24, "plain")
    assert act.shape == (M, N_WIDE // 2) and np.all(np.asarray(act)[sum(GROUPS["ragged"]):] == 0)
    assert_within(act, jax.jit(fref)(x, gs, w, b), jnp.maximum(mag[:, 0::2], mag[:, 1::2]),
                  16 * 2 * (K + 1) * 2.0**-24, "swiglu")
    ref = twin_grads(grouped_matmul_xla, x, gs, w, b, ct, dense)
    gmag = twin_grads(grouped_matmul_xla, jnp.abs(x), gs, jnp.abs(dense_f32(w)), jnp.abs(b), jnp.abs(ct), dense)
    for name, g, r, m in zip(["dx", "dW", "dbias"] if dense else ["dx", "dbias"], got, ref, gmag):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert_within(g, r, m, 2 * (max(M, N_WIDE) + 1) * 2.0**-24, name)


def test_tpu_weight_layout_rule():
    """Off a TPU host the layout comes from the TPU compiler's rule (least padding): gpt-oss's codes and its dense
    [E, 5760, 2880] weights are stored N-minor; row-major on a tie ([E, 2880, 2880])."""
    assert tpu_weight_layout((32, 2880, 1440), jnp.uint8) == "kn"
    assert tpu_weight_layout((128, 5760, 1440), jnp.uint8) == "kn"
    assert tpu_weight_layout((32, 5760, 2880), jnp.bfloat16) == "kn"
    assert tpu_weight_layout((32, 2880, 2880), jnp.bfloat16) == "nk"
    assert tpu_weight_layout((8, 512, 128), jnp.uint8) == "nk"


def export_variant(platform: str, kind: str, swiglu: bool):
    """Export forward + VJP (bf16 activations) at a TPU-tileable size; the MLIR text."""
    Mx, Kx, Nx = 64, 256, 512
    w = make_weights(kind, np.random.default_rng(0), n=Nx, k=Kx)
    backend = "tpu" if platform == "tpu" else "gpu"
    if swiglu:
        f = functools.partial(grouped_matmul_swiglu_pallas, alpha=ALPHA, limit=LIMIT, backend=backend)
    else:
        f = functools.partial(grouped_matmul_pallas, backend=backend)

    def fwd_bwd(x, gs, w, b, ct):
        y, vjp = jax.vjp(lambda x, w, b: f(x, gs, w, b), x, w, b)
        return y, vjp(ct)

    x = jax.ShapeDtypeStruct((Mx, Kx), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((E,), jnp.int32)
    ws = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w)
    b = jax.ShapeDtypeStruct((E, Nx), jnp.bfloat16)
    ct = jax.ShapeDtypeStruct((Mx, Nx // 2 if swiglu else Nx), jnp.float32)
    checks = [] if platform == "tpu" else [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    return jax.export.export(jax.jit(fwd_bwd), platforms=[platform], disabled_checks=checks)(x, gs, ws, b, ct)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("kind", ["mxfp4", "dense_bf16"])
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_every_variant_lowers(platform, kind, swiglu):
    text = export_variant(platform, kind, swiglu).mlir_module()
    target = "tpu_custom_call" if platform == "tpu" else TRITON_CALL
    # forward, dx, for the SwiGLU the recomputed pre-activation, and on GPU the dense weights' dW
    dw_kernel = platform == "cuda" and kind != "mxfp4"
    assert text.count(f"stablehlo.custom_call @{target}") == (3 if swiglu else 2) + dw_kernel
