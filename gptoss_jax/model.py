"""The gpt-oss forward pass in Flax NNX, top to bottom in the order of docs/spec.md.

Shapes: B batch, T tokens, D hidden, V vocab, N query heads, K kv heads, G = N / K, H head dim, E experts,
F expert width, M routed rows (tokens x experts per token). Linear weights are stored (out, in) as in both
checkpoint layouts. Blocks are stacked along a leading layer axis and run under `jax.lax.scan` in (sliding,
full) pairs, so compile time does not grow with depth and each window is a static number.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss_jax import expert_parallel, kvcache, ops
from gptoss_jax.config import MXFP4_BLOCK, REMAT_MODES, ModelConfig
from gptoss_jax.mxfp4 import Packed
from gptoss_jax.rope import apply_rope, rope_cos_sin
from gptoss_jax.sharding import RESIDUAL, constrain, mesh_of_array, variable_shardings
from gptoss_kernels.moe import swiglu  # noqa: F401  (the activation, re-exported for tests and notebooks)

ExpertFormat = Literal["mxfp4", "dense"]


class Quantized(nnx.Variable):
    """Packed MXFP4 bytes (FP4 codes or E8M0 scales): frozen weights. Fine-tuning upcasts them to a Param."""


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.scale = nnx.Param(1.0 + _normal(rngs, (cfg.hidden_size,), 0.1, jnp.float32).astype(dtype),
                               axes=("embed",))
        self.eps = cfg.rms_norm_eps

    def __call__(self, x_BTD):
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        D, NH = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        self.cfg = cfg
        self.kernels = ops.kernel_mode(cfg.kernels)
        self.norm = RMSNorm(cfg, dtype, rngs)
        self.qkv_w = nnx.Param(_normal(rngs, (cfg.qkv_size, D), D**-0.5, dtype), axes=("qkv", "embed"))
        self.qkv_b = nnx.Param(_normal(rngs, (cfg.qkv_size,), 0.02, dtype), axes=("qkv",))
        self.out_w = nnx.Param(_normal(rngs, (D, NH), NH**-0.5, dtype), axes=("embed", "heads_x_dim"))
        self.out_b = nnx.Param(_normal(rngs, (D,), 0.02, dtype), axes=("embed",))
        self.sinks = nnx.Param(_normal(rngs, (cfg.num_attention_heads,), 1.0, dtype), axes=("heads",))

    def __call__(self, x_BTD, cos, sin, *, window: int, kv=None, chunk=None, segment_ids_BT=None):
        """Whole-sequence attention (packed rows: `segment_ids_BT`), or with `kv` = (layer k, layer v, is_ring) a
        chunk over a KV cache, which returns the updated layer cache too."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        K, G, H = cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim
        qkv = ops.linear(self.norm(x_BTD), self.qkv_w[...], self.qkv_b[...])
        q, k, v = jnp.split(qkv, [K * G * H, K * G * H + K * H], axis=-1)
        q_BTKGH = apply_rope(q.reshape(B, T, K, G, H), cos, sin)  # query head k*G + g reads kv head k
        k_BTKH = apply_rope(k.reshape(B, T, K, H), cos, sin)
        v_BTKH = v.reshape(B, T, K, H)
        sinks_KG = self.sinks[...].reshape(K, G)
        if kv is None:
            o = ops.attention(q_BTKGH, k_BTKH, v_BTKH, sinks_KG, window=window, sm_scale=H**-0.5,
                              segment_ids_BT=segment_ids_BT, kernels=self.kernels)
            new_kv = None
        else:
            layer_k, layer_v, ring = kv
            o, *new_kv = kvcache.attend(layer_k, layer_v, q_BTKGH, k_BTKH, v_BTKH, sinks_KG, chunk, window=window,
                                        sm_scale=H**-0.5, ring=ring, kernels=self.kernels)
        return x_BTD + ops.linear(o.reshape(B, T, K * G * H), self.out_w[...], self.out_b[...]), new_kv


class PackedExperts(nnx.Module):
    """Expert matrices [E, out, in] kept as MXFP4: codes [E, out, in/2] and scales [E, out, in/32] (`Packed`)."""

    def __init__(self, blocks, scales, axes: tuple[str, str, str]):
        self.blocks = Quantized(blocks, axes=axes)
        self.scales = Quantized(scales, axes=axes)

    @classmethod
    def random(cls, rngs: nnx.Rngs, E: int, out: int, inp: int, axes):
        """Uniform codes (rms 2.93) with scales near 2^round(log2(inp^-0.5 / 2.93)), so weights have std ~inp^-0.5."""
        blocks = jax.random.randint(rngs.params(), (E, out, inp // 2), 0, 256).astype(jnp.uint8)
        center = 127 + round(math.log2(inp**-0.5 / 2.93))
        scales = jax.random.randint(rngs.params(), (E, out, inp // MXFP4_BLOCK), center - 1, center + 2)
        return cls(blocks, scales.astype(jnp.uint8), axes)

    def weights(self) -> Packed:
        return Packed(self.blocks[...], self.scales[...])


class DenseExperts(nnx.Module):
    """Expert matrices [E, out, in] as ordinary parameters (bf16 checkpoints; fine-tuning)."""

    def __init__(self, weight, axes: tuple[str, str, str]):
        self.weight = nnx.Param(weight, axes=axes)

    def weights(self) -> jax.Array:
        return self.weight[...]


def route(t_BTD, gate_w_ED, gate_b_E, k: int) -> tuple[jax.Array, jax.Array]:
    """The router, in float32: each token's k experts [B, T, k] by raw logit (top-k), and their weights, a softmax
    over those k logits only."""
    logits_BTE = ops.linear(t_BTD.astype(jnp.float32), gate_w_ED.astype(jnp.float32), gate_b_E.astype(jnp.float32))
    top_BTK, expert_BTK = jax.lax.top_k(logits_BTE, k)
    return expert_BTK, jax.nn.softmax(top_BTK, axis=-1)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, experts: ExpertFormat, rngs: nnx.Rngs):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.kernels = ops.kernel_mode(cfg.kernels)
        self.norm = RMSNorm(cfg, dtype, rngs)
        self.gate_w = nnx.Param(_normal(rngs, (E, D), D**-0.5, dtype), axes=("experts", "embed"))
        self.gate_b = nnx.Param(_normal(rngs, (E,), 0.1, dtype), axes=("experts",))
        axes1, axes2 = ("experts", "expert_mlp", "embed"), ("experts", "embed", "expert_mlp")
        if experts == "mxfp4":
            self.mlp1 = PackedExperts.random(rngs, E, 2 * F, D, axes1)
            self.mlp2 = PackedExperts.random(rngs, E, D, F, axes2)
        elif experts == "dense":
            self.mlp1 = DenseExperts(_normal(rngs, (E, 2 * F, D), D**-0.5, dtype), axes1)
            self.mlp2 = DenseExperts(_normal(rngs, (E, D, F), F**-0.5, dtype), axes2)
        else:
            raise ValueError(f"experts must be 'mxfp4' or 'dense', got {experts!r}")
        self.mlp1_b = nnx.Param(_normal(rngs, (E, 2 * F), 0.02, dtype), axes=("experts", "expert_mlp"))
        self.mlp2_b = nnx.Param(_normal(rngs, (E, D), 0.02, dtype), axes=("experts", "embed"))

    def __call__(self, x_BTD):
        cfg = self.cfg
        mesh = mesh_of_array(self.mlp1_b[...])  # None on one device
        x_BTD = constrain(x_BTD, RESIDUAL, mesh)  # the residual stream at the block boundary, as the table says
        t_BTD = self.norm(x_BTD)
        expert_BTK, weight_BTK = route(t_BTD, self.gate_w[...], self.gate_b[...], cfg.experts_per_token)
        experts = (self.mlp1.weights(), self.mlp1_b[...], self.mlp2.weights(), self.mlp2_b[...])
        expert_kw = dict(alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit, kernels=self.kernels)
        if mesh is None:
            y_BTD = ops.dispatch(t_BTD, expert_BTK, weight_BTK, *experts, **expert_kw)
        else:  # on a mesh: each device runs the experts it holds
            y_BTD = expert_parallel.moe(t_BTD, expert_BTK, weight_BTK, *experts, mesh=mesh, **expert_kw)
        return constrain(x_BTD + y_BTD.astype(x_BTD.dtype), RESIDUAL, mesh)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, experts: ExpertFormat, rngs: nnx.Rngs):
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp = MoE(cfg, dtype, experts, rngs)

    def __call__(self, x_BTD, cos, sin, *, window: int, kv=None, chunk=None, segment_ids_BT=None):
        with jax.named_scope("attention"):
            x_BTD, new_kv = self.attn(x_BTD, cos, sin, window=window, kv=kv, chunk=chunk,
                                      segment_ids_BT=segment_ids_BT)
        with jax.named_scope("moe"):
            return self.mlp(x_BTD), new_kv


def non_block_params(cfg: ModelConfig, dtype, rngs: nnx.Rngs) -> tuple[nnx.Param, RMSNorm, nnx.Param]:
    """The embedding, the final norm and the (untied) unembedding, randomly initialised."""
    D, V = cfg.hidden_size, cfg.vocab_size
    return (nnx.Param(_normal(rngs, (V, D), 1.0, dtype), axes=("vocab", "embed")), RMSNorm(cfg, dtype, rngs),
            nnx.Param(_normal(rngs, (V, D), D**-0.5, dtype), axes=("vocab", "embed")))


class Transformer(nnx.Module):
    """gpt-oss. `model(tokens)`: int32 [B, T] -> float32 logits [B, T, vocab] (full causal forward, no cache)."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, experts: ExpertFormat = "mxfp4",
                 rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.embedding, self.norm, self.unembedding = non_block_params(cfg, dtype, rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs):
            return Block(cfg, dtype, experts, rngs)

        self.blocks = stacked_blocks(rngs)  # every leaf has a leading layer axis

    def __call__(self, tokens_BT) -> jax.Array:
        if isinstance(tokens_BT, jax.core.Tracer):
            return self.forward(tokens_BT)
        return _jitted_forward(self, check_tokens(tokens_BT, self.config))

    def forward(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, remat: str = "none") -> jax.Array:
        return self.logits(self.hidden(tokens_BT, segment_ids_BT, positions_BT, remat=remat))

    def hidden(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, remat: str = "none") -> jax.Array:
        """Final-normed hidden states [B, T, D] of the full causal forward. Packed rows (training) give each token
        its example's segment id (attention stays inside an example) and its position within the example (RoPE).
        `remat` names a rematerialization policy per layer (REMAT_POLICIES)."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        positions = jnp.arange(tokens_BT.shape[1])[None] if positions_BT is None else positions_BT
        x_BTD = self._embed(tokens_BT)
        cos, sin = rope_cos_sin(positions, self.config)
        x_BTD, _ = self._run_blocks(x_BTD, cos, sin, segment_ids_BT=segment_ids_BT, remat=remat)
        return self.norm(x_BTD)

    def extend(self, tokens_BT, cache: kvcache.KVCache, n_B) -> tuple[jax.Array, kvcache.KVCache]:
        """Run a chunk of new tokens over the cache: row b's first n_B[b] tokens are real and continue from
        position cache.lengths[b]. Returns the final-normed hidden states [B, T, D] and the updated cache."""
        chunk = kvcache.Chunk(cache.lengths, n_B.astype(jnp.int32))
        x_BTD = self._embed(tokens_BT)
        cos, sin = rope_cos_sin(chunk.positions(tokens_BT.shape[1]), self.config)
        caches = {"full": (cache.full_k, cache.full_v), "ring": (cache.ring_k, cache.ring_v)}
        x_BTD, caches = self._run_blocks(x_BTD, cos, sin, caches, chunk)
        return self.norm(x_BTD), kvcache.KVCache(*caches["full"], *caches["ring"], cache.lengths + chunk.n)

    def logits(self, h) -> jax.Array:
        """Unembedding (no bias) of final-normed hidden states; float32."""
        return ops.linear(h, self.unembedding[...], out_dtype=jnp.float32)

    def _embed(self, tokens_BT):
        return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

    def _run_blocks(self, x_BTD, cos, sin, caches=None, chunk=None, *, segment_ids_BT=None, remat: str = "none"):
        """The layer stack: one scan over (sliding, full) pairs, then the trailing sliding layer of an odd depth.
        `caches` = {"full": (k, v), "ring": (k, v)}, each stacked over its layers, is carried through the scan and
        updated in place. How the loop reads the stacked weights is the platform's (`ops.forms(x).layers`)."""
        cfg = self.config
        graphdef, state = nnx.split(self.blocks)
        layers = ops.forms(x_BTD).layers(state, x_BTD, cached=caches is not None)

        def block(x, layer_state, kv, window):
            return nnx.merge(graphdef, layer_state)(x, cos, sin, window=window, kv=kv, chunk=chunk,
                                                    segment_ids_BT=segment_ids_BT)

        if REMAT_POLICIES[remat] is not None:  # training: recompute each layer's activations in the backward pass
            block = jax.checkpoint(block, policy=REMAT_POLICIES[remat], static_argnums=(3,), prevent_cse=False)

        def layer(carry, idx, i):  # layer 2 * idx + i: sliding (i = 0, ring cache idx) or full (i = 1, full cache idx)
            x, caches = carry
            window, kind = cfg.layer_window(i), ("ring", "full")[i]
            kv = None if caches is None else (*(a[idx] for a in caches[kind]), kind == "ring")
            with jax.named_scope(f"block_{'sliding' if window else 'full'}"):
                x, new_kv = block(x, layers.take(2 * idx + i), kv, window)
            if caches is not None:
                caches = {**caches, kind: tuple(a.at[idx].set(n) for a, n in zip(caches[kind], new_kv))}
            return x, caches

        def pair(carry, idx):
            return layer(layer(carry, idx, 0), idx, 1), None

        L = cfg.num_hidden_layers
        carry = layers.scan(pair, (x_BTD, caches), L // 2)
        return layer(carry, L // 2, 0) if L % 2 else carry


# Per-layer rematerialization for training: "none" keeps every activation, "full" recomputes the whole layer in the
# backward pass, "dots" keeps matmul outputs, "dots_no_batch" keeps only the weight matmuls' outputs.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT_MODES


@nnx.jit
def _jitted_forward(model: Transformer, tokens_BT):
    return model.forward(tokens_BT)


def check_tokens(tokens_BT, cfg: ModelConfig) -> jax.Array:
    """Concrete token ids as int32 [B, T], or a ValueError that says what is wrong."""
    tokens = jnp.asarray(tokens_BT)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a 2-D [batch, length] array, got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    if tokens.shape[1] == 0:
        raise ValueError("tokens has length 0")
    if tokens.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the context of {cfg.max_position_embeddings}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got min {lo}, max {hi}")
    return tokens.astype(jnp.int32)


def init_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16, experts: ExpertFormat = "mxfp4",
               mesh: jax.sharding.Mesh | None = None) -> Transformer:
    """Random weights at a realistic scale (router, sinks and biases non-zero); experts MXFP4 unless 'dense'.

    With a `mesh` (`gj.make_mesh`) every parameter is created already sharded as the logical-axis table in
    `gptoss_jax.sharding` says, inside one jitted initializer: no device ever holds the whole model. The values
    equal the unsharded ones for the same seed.
    """
    def build():
        return Transformer(cfg, dtype=dtype, experts=experts, rngs=nnx.Rngs(seed))

    if mesh is None:
        return build()
    abstract = nnx.eval_shape(build)
    graphdef, _ = nnx.split(abstract)
    placed = variable_shardings(abstract, mesh)
    values = jax.jit(lambda: [v.get_value() for _, v in nnx.to_flat_state(nnx.state(build()))],
                     out_shardings=[sharding for _, sharding in placed])()
    leaves = dict(nnx.to_flat_state(nnx.state(abstract)))
    for (path, _), value in zip(placed, values):
        leaves[path].set_value(value)
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def param_count(model: Transformer) -> int:
    """Parameters as the model card counts them: an FP4 code is one parameter, E8M0 scales are not counted."""
    total = 0
    for path, leaf in nnx.to_flat_state(nnx.state(model)):
        if path[-1] == "scales":
            continue
        total += leaf.get_value().size * (2 if path[-1] == "blocks" else 1)
    return total


def param_bytes(model: Transformer) -> int:
    return sum(leaf.get_value().size * leaf.get_value().dtype.itemsize for _, leaf in nnx.to_flat_state(nnx.state(model)))
