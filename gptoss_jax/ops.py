"""The switch points for performance-critical ops: the model calls only these.

Attention and the expert matmuls run either as the Pallas kernels in `gptoss_kernels` or as their pure-XLA twins
(the specification), behind the same signatures; `ModelConfig.kernels` chooses (`implementation`): by default the
kernels on TPU and GPU, the twins elsewhere, and the environment variable GPTOSS_KERNELS overrides that default,
read once when a model is built (`kernel_mode`). "TPU" and "GPU" mean the platform the program is compiled for
(`target_platform`: the devices its arrays are placed or sharded on), not the host: a step traced on a CPU host
for a TPU mesh holds the Mosaic kernels. Under a mesh every kernel runs inside `shard_map` (Mosaic and Triton
calls cannot be partitioned automatically), split by the logical-axis table: attention over batch and kv heads,
the MoE as `expert_parallel` lays it out.

How the dense products, the XLA expert matmuls and the layer loop are written is the platform's (`forms`): the
plain expressions on TPU and GPU, XLA:CPU's own forms on CPU (`gptoss_jax.forms`).
"""

import math
import os

import jax
import jax.numpy as jnp

from gptoss_jax.config import KERNEL_MODES, ConfigError
from gptoss_jax.forms import CPUForms, Forms
from gptoss_jax.sharding import mesh_of_array, partition_spec
from gptoss_kernels.attention import attention_xla
from gptoss_kernels.attention_pallas import decode_attention, flash_attention
from gptoss_kernels.moe import swiglu
from gptoss_kernels.moe_pallas import grouped_matmul_pallas, grouped_matmul_swiglu_pallas

KERNELS_ENV = "GPTOSS_KERNELS"
# "auto" with no environment override, resolved: the kernels on TPU and GPU, the twins elsewhere.
PLATFORM_KERNELS = "platform"
_FORMS = {"cpu": CPUForms()}
_PLAIN = Forms()


def target_platform(x) -> str:
    """"cpu", "tpu" or "gpu": the platform a (traced) array's program is compiled for. A sharded or mesh-placed
    array carries its mesh's device kind through tracing (also for a deviceless compile target); an array on
    one device without a mesh lives on the default backend."""
    mesh = jax.typeof(x).sharding.mesh
    device = None if mesh.empty else mesh.abstract_device
    platform = jax.default_backend() if device is None else device.platform
    return "gpu" if platform in ("cuda", "rocm") else platform


def forms(like) -> Forms:
    """The product and layer-loop forms of the platform the program holding the array `like` is compiled for."""
    return _FORMS.get(target_platform(like), _PLAIN)


def kernel_mode(kernels: str) -> str:
    """A `ModelConfig.kernels` value with "auto" resolved against the GPTOSS_KERNELS override. Modules call this
    once, when built, and keep the result, so a traced program never reads the environment."""
    if kernels != "auto":
        return kernels
    kernels = os.environ.get(KERNELS_ENV, "auto")
    if kernels not in KERNEL_MODES:
        raise ConfigError(f"{KERNELS_ENV}={kernels!r}: expected one of {KERNEL_MODES}")
    return PLATFORM_KERNELS if kernels == "auto" else kernels


def implementation(kernels: str, like) -> tuple[str, bool, str | None]:
    """(implementation, interpret, kernel backend) for a `ModelConfig.kernels` value (or a `kernel_mode`) and the
    program holding the array `like`: ("xla", False, None) for the twins, ("pallas", interpret?, "tpu" | "gpu")."""
    kernels = kernel_mode(kernels)
    platform = target_platform(like)
    if kernels == PLATFORM_KERNELS:
        kernels = "pallas" if platform in ("tpu", "gpu") else "xla"
    if kernels.startswith("interpret-"):
        return "pallas", True, kernels.removeprefix("interpret-")
    if kernels == "pallas" and platform not in ("tpu", "gpu"):
        raise ConfigError(f"kernels='pallas' needs a TPU or GPU target, this program runs on {platform!r} "
                          "(use 'interpret-tpu' / 'interpret-gpu' to run the kernels on CPU)")
    return kernels, False, platform if kernels == "pallas" else None


def linear(x, w_OI, b_O=None, out_dtype=None):
    """x @ w.T (+ b) with w stored (out, in) as in both checkpoint layouts; accumulates in float32. Keep every big
    dense product here: its form is the platform's (`forms`; on XLA:CPU it follows the number of rows)."""
    lead, K = x.shape[:-1], x.shape[-1]
    y = forms(x).matmul(x.reshape(math.prod(lead), K), w_OI)
    if b_O is not None:
        y = y + b_O.astype(jnp.float32)
    return y.reshape(*lead, -1).astype(out_dtype or x.dtype)


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
    """Expert-sorted rows times their experts' (MXFP4-packed or dense) weights, plus bias; float32 [M, N]. Rows
    past the groups come out zero from the twins (not necessarily from the kernels)."""
    impl, interpret, backend = implementation(kernels, x_MK)
    if impl == "pallas":
        return grouped_matmul_pallas(x_MK, group_sizes_E, w, bias_EN, interpret=interpret, backend=backend)
    return forms(x_MK).expert_matmul(x_MK, group_sizes_E, w, bias_EN)


def grouped_matmul_swiglu(x_MK, group_sizes_E, w, bias_EN, *, alpha: float, limit: float, kernels: str = "auto"):
    """The first expert matmul and its clamped SwiGLU (interleaved gate/linear columns); float32 [M, N/2]. The
    kernel applies the activation in its epilogue."""
    impl, interpret, backend = implementation(kernels, x_MK)
    if impl == "pallas":
        return grouped_matmul_swiglu_pallas(x_MK, group_sizes_E, w, bias_EN, alpha=alpha, limit=limit,
                                            interpret=interpret, backend=backend)
    return swiglu(grouped_matmul(x_MK, group_sizes_E, w, bias_EN, kernels="xla"), alpha, limit)


def dispatch(t_BTD, expert_BTK, weight_BTK, w1, b1, w2, b2, *, first=0, alpha: float, limit: float,
             kernels: str) -> jax.Array:
    """The experts' part of the MoE for routed tokens: float32 [B, T, D] = sum_k weight * expert(t), over the
    experts [first, first + E) whose weights w1 [E, 2F, D], w2 [E, D, F] (`Packed` or dense) and biases b1 [E, 2F],
    b2 [E, D] are given; pairs routed to other experts add nothing (on a mesh each device passes its own block:
    `expert_parallel`). The SwiGLU output is cast to the tokens' dtype before the second matmul."""
    B, T, D = t_BTD.shape
    E, k = b1.shape[0], expert_BTK.shape[-1]
    local_M = expert_BTK.reshape(-1) - first
    mine_M = (local_M >= 0) & (local_M < E)
    # Sort the (token, expert) pairs by expert so each expert's rows are contiguous (stably: the same order on
    # every layout); other experts' pairs (key E) go last, past the groups.
    key_M = jnp.where(mine_M, local_M, E)
    order_M = jnp.argsort(key_M, stable=True)
    group_sizes_E = jnp.bincount(key_M, length=E + 1)[:E]
    x_MD = jnp.take(t_BTD.reshape(B * T, D), order_M // k, axis=0)
    a_MF = grouped_matmul_swiglu(x_MD, group_sizes_E, w1, b1, alpha=alpha, limit=limit, kernels=kernels)
    y_MD = grouped_matmul(a_MF.astype(t_BTD.dtype), group_sizes_E, w2, b2, kernels=kernels)
    y_TKD = jnp.take(y_MD, jnp.argsort(order_M), axis=0).reshape(B * T, k, D)
    y_TKD = jnp.where(mine_M.reshape(B * T, k, 1), y_TKD, 0.0)
    return jnp.einsum("tkd,tk->td", y_TKD, weight_BTK.reshape(B * T, k)).reshape(B, T, D)
