"""Parity without torch: logits of committed random checkpoints against those the references computed
(tests/make_golden.py writes the fixtures with Hugging Face transformers and OpenAI's gpt_oss.torch)."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
from parity_util import ARGMAX_AGREEMENT, TOLERANCE, argmax_agreement, relative_error

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
LAYOUTS = ["original", "hf_mxfp4", "hf_bf16"]


def expected(layout):
    return dict(np.load(GOLDEN / layout / "expected.npz"))


@pytest.fixture(scope="module")
def float32_logits():
    return {layout: np.asarray(gj.load_model(GOLDEN / layout, jnp.float32, progress=False)(
        expected(layout)["tokens"])) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_logits_match_the_references(layout, float32_logits):
    exp = expected(layout)
    assert exp["tokens"].shape == (2, 300)  # batch > 1, several 128-token windows
    ours = float32_logits[layout]
    assert relative_error(ours, exp["logits_hf"]) <= TOLERANCE
    if "logits_openai" in exp:
        assert relative_error(ours, exp["logits_openai"]) <= TOLERANCE


def test_layouts_load_to_the_same_model(float32_logits):
    np.testing.assert_array_equal(float32_logits["original"], float32_logits["hf_mxfp4"])
    np.testing.assert_array_equal(float32_logits["original"], float32_logits["hf_bf16"])


def test_bfloat16_argmax_agrees(float32_logits):
    exp = expected("original")
    ours = np.asarray(gj.load_model(GOLDEN / "original", jnp.bfloat16, progress=False)(exp["tokens"]))
    assert argmax_agreement(ours, exp["logits_hf"]) >= ARGMAX_AGREEMENT


@pytest.mark.parametrize("field, value", [("sliding_window", 129), ("sliding_window", 127)])
def test_an_off_by_one_window_fails_parity(tmp_path, field, value):
    """The classic bug (window 129) changes every logit past position 128 beyond the tolerance."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / "original", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    exp = expected("original")
    ours = np.asarray(gj.load_model(ckpt, jnp.float32, progress=False)(exp["tokens"]))
    assert relative_error(ours[:, :127], exp["logits_hf"][:, :127]) <= TOLERANCE  # same before the window edge
    assert relative_error(ours, exp["logits_hf"]) > 100 * TOLERANCE
