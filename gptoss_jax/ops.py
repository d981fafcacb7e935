"""The switch points for performance-critical ops: the model calls only these.

Attention and the expert matmuls run either as the Pallas kernels in `gptoss_kernels` or as their pure-XLA twins
(the specification), behind the same signatures; `ModelConfig.kernels` chooses (`implementation`): by default the
kernels on TPU and GPU, the twins elsewhere, and the environment variable GPTOSS_KERNELS overrides that default.
"TPU" and "GPU" mean the platform the program is compiled for (`target_platform`: the devices its arrays are
placed or sharded on), not the host: a step traced on a CPU host for a TPU mesh holds the Mosaic kernels.
Under a mesh every kernel runs inside `shard_map` (Mosaic and Triton calls cannot be partitioned automatically),
split by the logical-axis table: attention over batch and kv heads, the MoE as `expert_parallel` lays it out.

On XLA:CPU the form of a product decides its speed by up to 10-30x (docs/cpu_performance.md has the measured
tables), so the CPU forms are chosen here, by shape, at trace time. Every form computes the same float32
accumulation of exact products; only the summation order differs.
"""

import math
import os

import jax
import jax.numpy as jnp

from gptoss_jax.config import KERNEL_MODES, ConfigError
from gptoss_jax.sharding import mesh_of_array, partition_spec
from gptoss_kernels.attention import attention_xla
from gptoss_kernels.attention_pallas import decode_attention, flash_attention
from gptoss_kernels.moe import expert_loop_matmul_xla, grouped_matmul_xla, rowwise_matmul_xla, swiglu
from gptoss_kernels.moe_pallas import grouped_matmul_pallas, grouped_matmul_swiglu_pallas

KERNELS_ENV = "GPTOSS_KERNELS"

# XLA:CPU rewrites a matrix-vector dot into one loop fusion that reads the matrix once, on both cores, with any
# elementwise producer (a bf16 -> f32 convert, an MXFP4 decode) fused in, but only while the contracted length
# is below this; from 4096 on it falls back to a generic dot that first materializes an f32 copy of the matrix.
_CPU_GEMV_MAX_K = 4095
# grouped_matmul: up to this many rows (decode: batch x experts per token) run row by row, each reading only its
# own expert's bytes; above it (prefill) a loop over experts decodes each routed expert once for all its rows.
ROWWISE_MAX_ROWS = 64


def target_platform(x) -> str:
    """"cpu", "tpu" or "gpu": the platform a (traced) array's program is compiled for. A sharded or mesh-placed
    array carries its mesh's device kind through tracing (also for a deviceless compile target); an array on
    one device without a mesh lives on the default backend."""
    mesh = jax.typeof(x).sharding.mesh
    device = None if mesh.empty else mesh.abstract_device
    platform = jax.default_backend() if device is None else device.platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def _on_cpu(x) -> bool:
    return target_platform(x) == "cpu"


def implementation(kernels: str, like) -> tuple[str, bool, str | None]:
    """(implementation, interpret, kernel backend) for a `ModelConfig.kernels` value and the program holding the
    array `like`: ("xla", False, None) for the twins, ("pallas", interpret?, "tpu" | "gpu")."""
    if kernels == "auto":
        kernels = os.environ.get(KERNELS_ENV, "auto")
        if kernels not in KERNEL_MODES:
            raise ConfigError(f"{KERNELS_ENV}={kernels!r}: expected one of {KERNEL_MODES}")
    platform = target_platform(like)
    if kernels == "auto":
        kernels = "pallas" if platform in ("tpu", "gpu") else "xla"
    if kernels.startswith("interpret-"):
        return "pallas", True, kernels.removeprefix("interpret-")
    if kernels == "pallas" and platform not in ("tpu", "gpu"):
        raise ConfigError(f"kernels='pallas' needs a TPU or GPU target, this program runs on {platform!r} "
                          "(use 'interpret-tpu' / 'interpret-gpu' to run the kernels on CPU)")
    return kernels, False, platform if kernels == "pallas" else None


def linear(x, w_OI, b_O=None, out_dtype=None):
    """x @ w.T (+ b) with w stored (out, in) as in both checkpoint layouts; accumulates in float32.

    Keep every big dense product here: on XLA:CPU the fast form of a bf16 product depends on the number of rows
    (measured on the 201088 x 2880 unembedding, 2 cores; docs/cpu_performance.md):
    - 1 row: `f32(x) @ f32(w).T` becomes a fused matrix-vector loop (47 ms, ~25 GB/s); the same product as
      `dot_general(..., preferred_element_type=f32)` upcasts the whole matrix first (1470 ms).
      XLA makes that rewrite only while K < 4096, so longer rows are cut into pieces.
    - 2+ rows: `dot_general(bf16, bf16, preferred_element_type=f32)` runs as one YNNPACK bf16 kernel; every
      other form upcasts the matrix to f32 first (8 rows: 52-110 ms against 720-1950 ms).
    """
    lead, K = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x_RK = x.reshape(rows, K)
    pieces = -(-K // _CPU_GEMV_MAX_K)
    on_cpu = _on_cpu(x)
    if on_cpu and rows == 1 and K % pieces == 0:
        # XLA stops that rewrite at K = 4096 (the 20b's attention output projection): cut K into pieces below it
        # (2880 x 4096 in the model: 2.3 ms, against 7-10 ms padded to 2 rows for YNNPACK, which copies the layer's
        # weight out first, and 37 ms as is). Their sum goes behind a barrier: fused into the last product, it
        # costs that product the rewrite.
        if pieces > 1:
            # Materialize the vector as one row first (XLA never fuses a reduction into its consumer): fused, each
            # piece would recompute it from its producer's shape, e.g. the attention output's [K, G, H], with index
            # arithmetic per element (5.2 ms for a 2880 x 2048 piece, against 1.1 ms).
            x_RK = jnp.max(jnp.stack([x_RK, x_RK]), axis=0)
        parts = [x_p.astype(jnp.float32) @ w_p.astype(jnp.float32).T
                 for x_p, w_p in zip(jnp.split(x_RK, pieces, axis=1), jnp.split(w_OI, pieces, axis=1))]
        y = sum(jax.lax.optimization_barrier(parts)) if pieces > 1 else parts[0]
    else:
        if on_cpu and rows == 1:  # no even cut: pad to 2 rows and take the YNNPACK form
            x_RK = jnp.concatenate([x_RK, jnp.zeros_like(x_RK)])
        dims = (((1,), (1,)), ((), ()))
        y = jax.lax.dot_general(x_RK, w_OI, dims, preferred_element_type=jnp.float32)[:rows]
    if b_O is not None:
        y = y + b_O.astype(jnp.float32)
    return y.reshape(*lead, -1).astype(out_dtype or x.dtype)


def unroll_layers(x) -> bool:
    """Whether decode steps run the layers as straight-line code instead of under a scan: on XLA:CPU.

    XLA:CPU slices bf16 arrays through float32, and inside a loop it hoists that convert out: a scan over the
    stacked layers converted all layers' weights to a float32 copy on every call (2x the bf16 weights in extra
    memory; for the 20b's 2880 x 4096 attention output projection 19 ms a layer against 2 ms). Bitcasting the
    weights to same-width integers around the loop stops the hoisting but makes XLA copy every stacked weight per
    call. Indexed one layer at a time (`layer_slice`), each weight is read in place by its product: 4 layers at the
    20b's widths decode in 106 ms a token instead of 960. The price is compile time that grows with depth, for the
    decode step on CPU only. Prefill keeps the scan: its expert loops take each layer's experts as loop operands,
    which XLA copies out of the stacked weights, and unrolled it schedules all layers' copies at once (the 20b
    then needs 24 GB); the full forward (training, parity) keeps it too.
    """
    return _on_cpu(x)


def scan_operands(tree, like):
    """(tree, restore) for a scan over stacked layers on XLA:CPU: bf16 leaves cross the loop as their uint16 bit
    patterns and `restore` bitcasts one layer's slice back inside the body.

    For the prefill scan (see `unroll_layers`): otherwise XLA converts every stacked bf16 weight to a float32 copy
    per call (2x their size: 2.6 GB for the 20b), where this way it copies them once at their own width. A bitcast
    to integers has no gradient: inference only. Elsewhere the tree passes unchanged.
    """
    if not _on_cpu(like):
        return tree, lambda t: t
    dtypes = jax.tree.map(lambda a: a.dtype, tree)
    return jax.tree.map(_bits, tree), lambda t: jax.tree.map(
        lambda a, dtype: a if a.dtype == dtype else jax.lax.bitcast_convert_type(a, dtype), t, dtypes)


def layer_slice(stacked, i: int):
    """Layer i of a stacked weight, for the unrolled layers. A bf16 array is sliced as its uint16 bit pattern:
    XLA:CPU slices bf16 through float32, which makes a slice read by two products a materialized copy."""
    layer = _bits(stacked)[i]
    return layer if layer.dtype == stacked.dtype else jax.lax.bitcast_convert_type(layer, stacked.dtype)


def _bits(a):
    """A bf16 array as its uint16 bit patterns (a same-width stand-in XLA:CPU neither converts nor hoists)."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a


# Logical axes of attention's operands (the sharding table splits batch and kv heads; the rest stays whole).
_Q_AXES = ("batch", "sequence", "kv_heads", None, "head_dim")
_KV_AXES = ("batch", "sequence", "kv_heads", "head_dim")
_SINK_AXES = ("kv_heads", None)
_POS_AXES = ("batch", "sequence")


def attention(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, *, window: int, sm_scale: float, q_pos_BT=None, k_pos_BS=None,
              segment_ids_BT=None, kernels: str = "auto"):
    """Causal attention with sinks and an optional sliding window; [B, T, K, G, H].

    Without positions: a whole sequence from position 0 (the flash kernel), optionally packed (`segment_ids_BT`:
    queries see their own segment only). With positions: queries against a KV cache's slots, whose position is -1
    when empty (the cache kernel: one decode token or a prefill chunk of any length, tiled, never a [chunk, cache]
    score matrix).
    """
    impl, interpret, backend = implementation(kernels, q_BTKGH)
    kw = dict(window=window, sm_scale=sm_scale, interpret=interpret, backend=backend)
    if impl == "pallas" and q_pos_BT is None:
        if segment_ids_BT is None:
            return _per_device(lambda q, k, v, s: flash_attention(q, k, v, s, **kw),
                               (q_BTKGH, k_BSKH, v_BSKH, sinks_KG), (_Q_AXES, _KV_AXES, _KV_AXES, _SINK_AXES))
        return _per_device(lambda q, k, v, s, seg: flash_attention(q, k, v, s, segment_ids_BT=seg, **kw),
                           (q_BTKGH, k_BSKH, v_BSKH, sinks_KG, segment_ids_BT),
                           (_Q_AXES, _KV_AXES, _KV_AXES, _SINK_AXES, _POS_AXES))
    if impl == "pallas":
        return _per_device(lambda q, k, v, s, qp, kp: decode_attention(q, k, v, s, q_pos_BT=qp, k_pos_BS=kp, **kw),
                           (q_BTKGH, k_BSKH, v_BSKH, sinks_KG, q_pos_BT, k_pos_BS),
                           (_Q_AXES, _KV_AXES, _KV_AXES, _SINK_AXES, _POS_AXES, _POS_AXES))
    return attention_xla(q_BTKGH, k_BSKH, v_BSKH, sinks_KG, q_pos_BT=q_pos_BT, k_pos_BS=k_pos_BS,
                         segment_ids_BT=segment_ids_BT, window=window, sm_scale=sm_scale)


def _per_device(kernel, args, axes):
    """`kernel(*args)`, inside `shard_map` when the arrays are split over (or replicated on) a mesh: each device
    runs the kernel on its shards as the logical-axis table splits them (`axes`: one tuple per argument; the
    result is laid out like the first argument). Mosaic and Triton calls cannot be partitioned by the compiler."""
    mesh = mesh_of_array(args[0])
    if mesh is None or mesh.manual_axes:  # one device, or already per device (inside a shard_map)
        return kernel(*args)
    specs = tuple(partition_spec(a, x.shape, mesh) for a, x in zip(axes, args))
    return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def grouped_matmul(x_MK, group_sizes_E, w, bias_EN, *, kernels: str = "auto"):
    """Expert-sorted rows times their experts' (MXFP4-packed or dense) weights, plus bias; float32 [M, N].

    The twins on CPU (20b widths, mlp1, 2 cores; docs/cpu_performance.md):
    - decode-sized calls (M <= ROWWISE_MAX_ROWS) run row by row, each row fused matrix-vector products over its
      own expert's weights (`rowwise_matmul_xla`): 4 rows (batch 1) 5 ms against 224 ms for the grouped
      matmul, which scans all (row tile, expert) work items and decodes a whole expert for each;
    - larger calls (prefill) decode each routed expert once and multiply all of its rows
      (`expert_loop_matmul_xla`): 256 rows 0.45 s against 2.1 s.
    Both treat dense experts exactly as packed ones (bit-identical results) and differentiate as the
    specification does.
    """
    impl, interpret, backend = implementation(kernels, x_MK)
    if impl == "pallas":
        return grouped_matmul_pallas(x_MK, group_sizes_E, w, bias_EN, interpret=interpret, backend=backend)
    if _on_cpu(x_MK):
        K = x_MK.shape[1] // 2  # both CPU forms contract the even and the odd columns apart
        if x_MK.shape[0] <= ROWWISE_MAX_ROWS and K <= _CPU_GEMV_MAX_K:
            return rowwise_matmul_xla(x_MK, group_sizes_E, w, bias_EN)
        return expert_loop_matmul_xla(x_MK, group_sizes_E, w, bias_EN)
    return grouped_matmul_xla(x_MK, group_sizes_E, w, bias_EN)


def grouped_matmul_swiglu(x_MK, group_sizes_E, w, bias_EN, *, alpha: float, limit: float, kernels: str = "auto"):
    """The first expert matmul and its clamped SwiGLU (interleaved gate/linear columns); float32 [M, N/2]. The
    kernel applies the activation in its epilogue."""
    impl, interpret, backend = implementation(kernels, x_MK)
    if impl == "pallas":
        return grouped_matmul_swiglu_pallas(x_MK, group_sizes_E, w, bias_EN, alpha=alpha, limit=limit,
                                            interpret=interpret, backend=backend)
    return swiglu(grouped_matmul(x_MK, group_sizes_E, w, bias_EN, kernels="xla"), alpha, limit)
