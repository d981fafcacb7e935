"""The training step: masked next-token loss, AdamW with float32 state, gradient accumulation, clipping.

The model's parameters keep their dtype (bf16 for real checkpoints: "bf16 compute"); the optimizer's moments are
float32 whatever the parameter dtype, and updates are computed in float32 and rounded once into the parameters.
Training state per parameter: 2 (bf16 weight) + 4 + 4 (AdamW moments) = 10 bytes, plus the gradient (2 bytes,
transient; float32 accumulators, 4 bytes, when accumulating over micro-batches).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptoss_jax import ops
from gptoss_jax.model import Transformer
from gptoss_jax.sharding import constrain, mesh_of_array, partition_spec

# Parameters that AdamW's weight decay leaves alone: norms, biases and attention sinks.
NO_DECAY = ("scale", "qkv_b", "out_b", "gate_b", "mlp1_b", "mlp2_b", "sinks")
LOSS_CHUNK = 512  # tokens whose [chunk, vocab] logits exist at once in the loss


def decay_mask(params: nnx.State) -> Any:
    """True for the matrices (decayed), False for norms, biases and sinks."""
    def decayed(path, _):
        return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1] not in NO_DECAY

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(*, lr: float, warmup: int, steps: int, weight_decay: float, clip_norm: float,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, min_lr_ratio: float = 0.1,
                   mask=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping; learning rate: linear warmup to `lr`, cosine decay to lr * min_lr_ratio."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 0), max(steps, warmup + 1),
                                                  end_value=lr * min_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)), schedule


def init_opt_state(tx: optax.GradientTransformation, params: nnx.State):
    """Optimizer state in float32, whatever the parameters' dtype."""
    return tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), params))


def token_losses(model: Transformer, batch: dict, remat: str = "none", chunk: int = LOSS_CHUNK, tied_rows: int = 0):
    """(sum of weighted next-token cross-entropies, sum of weights) for one micro-batch [B, L].

    `tied_rows` > 0: the last unembedding row stands for that many equal rows (a compact vocabulary,
    `gptoss_jax.train.vocab`): its logit counts log(tied_rows) times more in the softmax, and its gradient is that
    of one of the rows it stands for (their sum / tied_rows), as each tied row of the full model would get.

    The unembedding and its log-softmax run over `chunk` tokens at a time (on each device: a chunk is a slice of
    every row of the device's batch shard, so a mesh never gathers the hidden states nor stacks the unembedding
    per chunk) and are recomputed in the backward pass, so the [tokens, vocab] logits never exist whole (201088
    float32 logits are 0.8 MB a token). Each row's trained tokens are moved to its front first and chunks without
    any are skipped: a chat's prompt tokens (often half of a row) never pay for the vocabulary.
    """
    h_BLD = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"], remat=remat)
    B, L, D = h_BLD.shape
    mesh = mesh_of_array(model.unembedding[...])  # None on one device
    shards = 1 if mesh is None else math.prod(
        mesh.shape[a] for a in jax.tree.leaves(partition_spec(("batch",), (B,), mesh)[0]))
    c = max(1, min(chunk // (B // shards), L))  # each row's tokens in a chunk: `chunk` tokens on a device
    pad = -L % c
    w_BL = batch["weights"].astype(jnp.float32)
    order_BL = jnp.argsort(w_BL == 0, axis=1, stable=True)  # each row's trained tokens first, in their order

    def chunks(x_BL, *rest):  # [B, L, ...] -> [L / c, B, c, ...], each row's trained tokens first
        x_BL = jnp.take_along_axis(x_BL, order_BL.reshape(B, L, *[1] * len(rest)), axis=1)
        x_BL = jnp.pad(x_BL, ((0, 0), (0, pad)) + ((0, 0),) * len(rest))
        x = jnp.moveaxis(x_BL.reshape(B, -1, c, *rest), 1, 0)
        return constrain(x, (None, "batch", "sequence", "act_embed")[:x.ndim], mesh)

    unemb_VD = model.unembedding[...]
    if tied_rows:
        u = unemb_VD[-1]
        unemb_VD = unemb_VD.at[-1].set(u / tied_rows + jax.lax.stop_gradient(u - u / tied_rows))
        offset_V = jnp.zeros(unemb_VD.shape[0], jnp.float32).at[-1].set(jnp.log(jnp.float32(tied_rows)))

    def piece(h_BcD, t_Bc, w_Bc):
        logits = ops.linear(h_BcD, unemb_VD, out_dtype=jnp.float32)  # Transformer.logits, with the tied row
        if tied_rows:
            logits = logits + offset_V
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * w_Bc)

    # Recomputed in the backward pass. The checkpoint wraps the cond, not the piece inside it: residuals of a
    # checkpoint inside a cond come out of the cond, and the scan stacks them per chunk (the unembedding too).
    @jax.checkpoint
    def body(total, xs):
        return total + jax.lax.cond(jnp.any(xs[2] != 0), piece, lambda *_: jnp.float32(0), *xs), None

    total, _ = jax.lax.scan(body, jnp.float32(0), (chunks(h_BLD, D), chunks(batch["targets"]), chunks(w_BL)))
    return total, jnp.sum(w_BL)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *, remat: str = "none",
                    donate: bool = True, tied_rows: int = 0):
    """jit(params, opt_state, step, batch [K, B, L] for K micro-batches) -> (params, opt_state, metrics).

    The loss is the mean over every trained token of all K micro-batches, so accumulating K micro-batches of B rows
    gives the gradient of one batch of K * B rows. Gradients are summed in float32.
    """

    def loss_sum(params, micro):
        total, count = token_losses(nnx.merge(graphdef, params), micro, remat, tied_rows=tied_rows)
        return total, count

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def train_step(params, opt_state, step, batch):
        def accumulate(carry, micro):
            g_acc, l_acc, n_acc = carry
            (l, n), g = grad_fn(params, micro)
            return (jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g), l_acc + l, n_acc + n), None

        if jax.tree.leaves(batch)[0].shape[0] == 1:  # one micro-batch: no float32 accumulators
            (l_sum, n_sum), g_sum = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (g_sum, l_sum, n_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        denom = jnp.maximum(n_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), g_sum)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        # The moments are float32, so the updates come out float32 (weight decay promotes the weights).
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u).astype(p.dtype), params, updates)
        metrics = {"loss": l_sum / denom, "grad_norm": grad_norm, "lr": schedule(step), "tokens": n_sum}
        return params, opt_state, metrics

    return jax.jit(train_step, donate_argnums=(0, 1) if donate else ())


def make_eval_step(graphdef, tied_rows: int = 0):
    """jit(params, batch [B, L]) -> (loss sum, trained-token count)."""
    return jax.jit(lambda params, batch: token_losses(nnx.merge(graphdef, params), batch,
                                                      tied_rows=tied_rows))
