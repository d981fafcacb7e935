"""The inference core: `gj.generate` and the server's continuous-batching engine give the same tokens, and both
give the tokens recorded before they shared one core (tests/fixtures/engine, written by make_engine_fixture.py)."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
from gptoss_jax.engine import Engine, GenRequest, Sampling, sample

FIXTURE = Path(__file__).parent / "fixtures" / "engine"
RECORDED = json.loads((FIXTURE / "tokens.json").read_text())
SETTINGS = RECORDED["settings"]


@pytest.fixture(scope="module")
def model():
    return gj.load_model(FIXTURE / "model", dtype=jnp.float32, progress=False)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_generate_gives_the_recorded_tokens(model, name):
    got = gj.generate(model, RECORDED["prompts"], max_new_tokens=RECORDED["max_new_tokens"], **SETTINGS[name])
    assert got == RECORDED["tokens"][name]


def test_the_server_engine_gives_the_recorded_tokens_whatever_shares_its_batch(model):
    """Every setting's requests in one continuous batch, submitted while others decode: each request gets the
    tokens `gj.generate` recorded for it alone in its own batch."""
    n = RECORDED["max_new_tokens"]
    with Engine(model, max_batch=4, max_seq_len=128) as engine:
        reqs = {}
        for name in sorted(SETTINGS):
            for i, prompt in enumerate(RECORDED["prompts"]):
                reqs[name, i] = engine.submit(GenRequest(prompt, n, Sampling(**SETTINGS[name])))
        for r in reqs.values():
            assert r.done.wait(600) and r.error is None, r.error
        assert engine.max_active_seen == 4  # the batch was shared
    for (name, i), r in reqs.items():
        assert r.tokens == RECORDED["tokens"][name][i], (name, i)


def test_sample_applies_top_k_then_top_p_per_row():
    """Row by row against a numpy reference of the distribution: tokens outside the top k, or outside the
    nucleus of the top k, are never drawn; a greedy row is the argmax; a masked token is never drawn."""
    V, draws = 12, 400
    logits = np.random.default_rng(0).normal(size=(V,)).astype(np.float32) * 2
    order = np.argsort(-logits)
    rows = {"top_k 3": (1.0, 1.0, 3), "top_p 0.5": (1.0, 0.5, 0), "top_k 5 top_p 0.6": (1.0, 0.6, 5),
            "greedy": (0.0, 1.0, 0)}
    for name, (t, p, k) in rows.items():
        B = draws
        got = np.asarray(sample(jnp.tile(logits, (B, 1)), jnp.arange(B, dtype=jnp.uint32), jnp.zeros(B, jnp.int32),
                                jnp.full(B, t, jnp.float32), jnp.full(B, p, jnp.float32), jnp.full(B, k, jnp.int32)))
        kept = order[: k or V]
        probs = np.exp(logits[kept] - logits[kept].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        nucleus = set(kept[before < p].tolist()) if t else {int(order[0])}
        assert set(got.tolist()) <= nucleus, name
        if t:
            assert len(set(got.tolist())) == len(nucleus), name  # every allowed token turns up in 400 draws
    mask = np.ones((4, V), bool)
    mask[:, order[0]] = False
    got = np.asarray(sample(jnp.tile(logits, (4, 1)), jnp.arange(4, dtype=jnp.uint32), jnp.zeros(4, jnp.int32),
                            jnp.asarray([0.0, 1, 1, 1]), jnp.ones(4), jnp.zeros(4, jnp.int32), jnp.asarray(mask)))
    assert order[0] not in got and got[0] == order[1]


@pytest.mark.parametrize("kw, words", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"), (dict(seed=-1), "seed")])
def test_bad_sampling_settings_are_named(kw, words):
    with pytest.raises(ValueError, match=words):
        Sampling(**kw)


@pytest.mark.parametrize("prompt, max_tokens, words", [
    ([], 4, "empty"), ([1, 10**6], 4, r"outside \[0, 512\)"), ([1], 0, "max_tokens"), ([1] * 120, 20, "context of 128")])
def test_requests_that_cannot_run_are_refused_at_submit(model, prompt, max_tokens, words):
    engine = Engine(model, max_batch=1, max_seq_len=128)
    with pytest.raises(ValueError, match=words):
        engine.submit(GenRequest(prompt, max_tokens))
