import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_kernels.attention import attention_xla, band_mask


@pytest.mark.parametrize("window, expected", [(128, 128), (129, 129), (0, None)])
def test_sliding_mask_admits_exactly_window_keys_including_self(window, expected):
    T = 400
    visible = np.asarray(band_mask(jnp.arange(T), jnp.arange(T), window))
    counts = visible.sum(1)
    if expected is None:
        np.testing.assert_array_equal(counts, np.arange(1, T + 1))
    else:
        np.testing.assert_array_equal(counts, np.minimum(np.arange(1, T + 1), expected))
        i = 300
        assert visible[i, i] and visible[i, i - expected + 1] and not visible[i, i - expected]
    assert not np.triu(visible, 1).any()  # causal


def naive_attention(q, k, v, sinks, window, sm_scale):
    """Per query head, a softmax over [scores..., sink]: the sink is an extra logit that attends to nothing."""
    B, T, K, G, H = q.shape
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for h in range(K * G):
            kv, g = h // G, h % G  # query head h reads kv head h // G
            for i in range(T):
                js = [j for j in range(T) if j <= i and (window == 0 or i - j < window)]
                s = np.array([q[b, i, kv, g] @ k[b, j, kv] * sm_scale for j in js] + [sinks[kv, g]])
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, i, kv, g] = p[:-1] @ v[b, js, kv]
    return out


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("G", [1, 3])
def test_sink_softmax_matches_the_naive_formula(window, G):
    rng = np.random.default_rng(window + G)
    B, T, K, H = 2, 11, 2, 8
    q = rng.normal(size=(B, T, K, G, H)).astype(np.float32)
    k = rng.normal(size=(B, T, K, H)).astype(np.float32)
    v = rng.normal(size=(B, T, K, H)).astype(np.float32)
    sinks = rng.normal(size=(K, G)).astype(np.float32) * 2
    out = attention_xla(*map(jnp.asarray, (q, k, v, sinks)), window=window, sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(out), naive_attention(q, k, v, sinks, window, 0.3), atol=2e-6)


def test_sink_equals_sigmoid_of_lse_gap():
    """Kernels that return the log-sum-exp L can apply the sink afterwards: o * sigmoid(L - sink)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in [(1, 9, 1, 2, 4), (1, 9, 1, 4), (1, 9, 1, 4)])
    sinks = jnp.asarray([[0.7, -1.5]])
    with_sink = attention_xla(q, k, v, sinks, window=0, sm_scale=0.5)
    no_sink = attention_xla(q, k, v, jnp.full((1, 2), -jnp.inf), window=0, sm_scale=0.5)
    s = jnp.einsum("btkgh,bskh->bkgts", q, k) * 0.5
    s = jnp.where(jnp.tril(jnp.ones((9, 9), bool)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [b, k, g, t]
    gate = jax.nn.sigmoid(lse - sinks[None, :, :, None]).transpose(0, 3, 1, 2)[..., None]
    np.testing.assert_allclose(np.asarray(with_sink), np.asarray(no_sink * gate), atol=1e-6)
