import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax.engine import sample, steps
from gptoss_jax.kvcache import KVCache

CFG = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, num_hidden_layers=3)  # sliding, full, sliding


@pytest.fixture(scope="module")
def model():
    return gj.init_model(CFG, seed=3, dtype=jnp.float32)


@nnx.jit
def _extend(m, tokens, cache, n):
    h, cache = m.extend(tokens, cache, n)
    return m.logits(h), cache


def test_cached_decoding_equals_full_recompute_across_ring_wraps(model):
    """Prefill in uneven chunks, then one token at a time to 400 tokens: the 128-slot rings wrap twice."""
    T = 400
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, T))
    full = np.asarray(model(tokens))
    cache = KVCache.create(CFG, 2, 512, jnp.float32)
    assert cache.ring_k.shape[2] == 128  # the sliding layers' memory does not grow with context
    got, pos = [], 0
    for size in [100, 37, 37, 1, 130] + [1] * (T - 305):
        logits, cache = _extend(model, jnp.asarray(tokens[:, pos:pos + size]), cache, jnp.full((2,), size))
        got.append(np.asarray(logits))
        pos += size
    got = np.concatenate(got, axis=1)
    assert pos == T and int(cache.lengths[0]) == T
    assert np.abs(got - full).max() <= 1e-4 * max(1.0, np.abs(full).max())


def test_padded_batch_equals_prompts_run_alone(model):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (5, 31, 17)]  # ragged, one prefill chunk size
    batch = gj.generate(model, prompts, max_new_tokens=12, temperature=0)
    alone = [gj.generate(model, p, max_new_tokens=12, temperature=0) for p in prompts]
    assert batch == alone
    # Greedy decoding equals the argmax of full forwards (one shape: causal, so trailing padding is inert).
    seq = np.zeros((1, 64), np.int64)
    seq[0, :5] = prompts[0]
    for n in range(5, 17):
        seq[0, n] = int(np.asarray(model(seq))[0, n - 1].argmax())
    assert list(seq[0, 5:17]) == batch[0]


def test_padded_batch_with_sampling_equals_alone(model):
    prompts = [[1, 2, 3], list(range(10, 60))]
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=40, seed=5)
    assert gj.generate(model, prompts, **kw) == [gj.generate(model, p, **kw) for p in prompts]


def test_same_seed_same_tokens(model):
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = gj.generate(model, [7, 8, 9], seed=1, **kw)
    assert a == gj.generate(model, [7, 8, 9], seed=1, **kw)
    assert a != gj.generate(model, [7, 8, 9], seed=2, **kw)
    assert len(a) == 16 and all(0 <= t < CFG.vocab_size for t in a)


def test_stop_tokens_end_each_row_independently(model):
    prompts = [[1, 2, 3], [4, 5, 6]]
    free = gj.generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3)
    i = next(i for i in range(1, 10) if free[0][i] not in free[0][:i])  # a token row 0 first samples at step i
    stop = free[0][i]
    out = gj.generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=[stop])
    assert out[0] == free[0][: i + 1]  # ends with the stop token
    expected_1 = free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert out[1] == expected_1


def test_on_token_streams_every_step(model):
    steps = []
    out = gj.generate(model, [[1, 2], [3]], max_new_tokens=5, temperature=0, on_token=steps.append)
    assert [[s[i] for s in steps] for i in range(2)] == out


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt_tokens=[]), "no prompts"),
    (dict(prompt_tokens=[[1], []]), "prompt 1 is empty"),
    (dict(prompt_tokens=[1, 512]), r"outside \[0, 512\)"),
    (dict(prompt_tokens=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_tokens=[1], temperature=-0.5), "temperature"),
    (dict(prompt_tokens=[1], top_p=0.0), "top_p"),
    (dict(prompt_tokens=[1], top_p=1.5), "top_p"),
    (dict(prompt_tokens=[1], top_k=-1), "top_k"),
])
def test_bad_input_raises_clear_errors(model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        gj.generate(model, **kwargs)


def test_prompt_longer_than_context():
    cfg = dataclasses.replace(CFG, initial_context_length=64, rope_scaling_factor=1.0)
    small = gj.init_model(cfg, dtype=jnp.float32)
    with pytest.raises(ValueError, match="more than the context of 64 tokens"):
        gj.generate(small, list(range(60)), max_new_tokens=10)


def _draw(logits, n=4000, temperature=1.0, top_p=1.0, top_k=0):
    logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    return np.asarray(sample(logits, jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.int32),
                             jnp.full(n, temperature, jnp.float32), jnp.full(n, top_p, jnp.float32),
                             jnp.full(n, top_k, jnp.int32)))


def test_sampling_follows_the_softmax_and_its_filters():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    freq = np.bincount(_draw(logits), minlength=4) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert set(_draw(logits, top_p=0.8)) == {0, 1}  # the nucleus: 0.5 + 0.3 reaches 0.8
    assert set(_draw(logits, top_k=3)) == {0, 1, 2}
    assert set(_draw(logits, temperature=0.0)) == {0}
    hot = np.bincount(_draw(logits, temperature=3.0), minlength=4) / 4000
    assert hot[3] > 0.12  # a higher temperature flattens the distribution


def test_generation_stops_on_harmony_stop_tokens():
    """A rigged unembedding makes <|return|> or <|call|> the only likely token (which one depends on the sign of
    the last hidden state's first feature); swapping the rows makes it the other one. Each run stops at once."""
    cfg = dataclasses.replace(gj.ModelConfig.tiny(), num_hidden_layers=1)  # one sliding layer, no scan
    model = gj.init_model(cfg, seed=0, dtype=jnp.float32)
    assert set(gj.harmony.stop_tokens()) == {200002, 200012}
    ret, call = 200002, 200012  # <|return|>, <|call|>
    outs = []
    for sign in (1.0, -1.0):
        w = np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32)
        w[ret, 0], w[call, 0] = 100 * sign, -100 * sign
        model.unembedding.set_value(jnp.asarray(w))
        outs.append(gj.generate(model, [200006, 1, 2, 3], max_new_tokens=10, temperature=0,
                                stop_tokens=gj.harmony.stop_tokens()))
    assert sorted(outs) == [[200002], [200012]]


def test_no_recompilation_per_prompt_length_or_token(model):
    """Prompt lengths inside one bucket and every decode step reuse one compiled prefill and one decode step."""
    prefill, _, decode = steps(nnx.graphdef(model))
    gj.generate(model, list(range(1, 21)), max_new_tokens=3, temperature=0)
    sizes = prefill._cache_size(), decode._cache_size()
    for n in (23, 27, 31):
        gj.generate(model, list(range(1, n + 1)), max_new_tokens=8, temperature=0)
    assert (prefill._cache_size(), decode._cache_size()) == sizes
