"""The parity tier: live comparison with Hugging Face transformers and OpenAI's gpt_oss.torch (float32).

Run with `make parity` (installs the references). Without them these tests skip and say why, unless
GPTOSS_REQUIRE_REFERENCES=1 (as in CI), which turns a missing reference into a failure.
"""

import dataclasses
import importlib.util
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gptoss_jax as gj
import references
from parity_util import ARGMAX_AGREEMENT, TOLERANCE, argmax_agreement, relative_error

pytestmark = pytest.mark.parity

_missing = [m for m in ("torch", "transformers", "gpt_oss") if importlib.util.find_spec(m) is None]
if _missing:
    reason = f"reference implementation(s) not installed: {', '.join(_missing)} (run `make parity`)"
    if os.environ.get("GPTOSS_REQUIRE_REFERENCES") == "1":
        raise RuntimeError(reason + "; GPTOSS_REQUIRE_REFERENCES=1 demands them")
    pytestmark = [pytest.mark.parity, pytest.mark.skip(reason=reason)]

SEED = 7  # not the golden fixtures' seed
TOKENS = np.random.default_rng(SEED).integers(0, references.SMALL_CONFIG["vocab_size"], (3, 333))


def _perturb_dense_experts(path, seed):
    """Make an hf_bf16 checkpoint's experts genuinely dense (not MXFP4-representable)."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    rng = np.random.default_rng(seed)
    for k, v in tensors.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            x = v.astype(np.float32)
            tensors[k] = (x + rng.normal(0, 0.3 * x.std(), x.shape)).astype(ml_dtypes.bfloat16)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    for layout in references.LAYOUTS:
        references.write_random_checkpoint(root / layout, layout, seed=SEED)
    _perturb_dense_experts(root / "hf_bf16", SEED)
    return root


@pytest.fixture(scope="module")
def reference_logits(checkpoints):
    return {
        "original": {"openai": references.openai_logits(checkpoints / "original", TOKENS),
                     "hf": references.hf_logits(checkpoints / "hf_mxfp4", TOKENS)},  # the same model
        "hf_mxfp4": {"hf": references.hf_logits(checkpoints / "hf_mxfp4", TOKENS)},
        "hf_bf16": {"hf": references.hf_logits(checkpoints / "hf_bf16", TOKENS)},
    }


@pytest.mark.parametrize("layout", references.LAYOUTS)
def test_float32_logits_match_live_references(layout, checkpoints, reference_logits, record_property):
    ours = np.asarray(gj.load_model(checkpoints / layout, jnp.float32, progress=False)(TOKENS))
    for name, ref in reference_logits[layout].items():
        err = relative_error(ours, ref)
        record_property(f"{layout}_vs_{name}", err)
        print(f"parity {layout} vs {name}: max abs error / logit scale = {err:.2e}")
        assert err <= TOLERANCE


@pytest.mark.parametrize("layout", ["original", "hf_bf16"])
def test_bfloat16_argmax_agreement(layout, checkpoints, reference_logits):
    ours = np.asarray(gj.load_model(checkpoints / layout, jnp.bfloat16, progress=False)(TOKENS))
    agreement = argmax_agreement(ours, reference_logits[layout]["hf"])
    print(f"bf16 argmax agreement {layout}: {agreement:.3f}")
    assert agreement >= ARGMAX_AGREEMENT


@pytest.fixture(scope="module")
def our_model():
    cfg = dataclasses.replace(gj.ModelConfig.from_json_dict(references.SMALL_CONFIG), sliding_window=128)
    return gj.init_model(cfg, seed=SEED, dtype=jnp.float32)


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_checkpoints_we_save_in_hf_format_load_in_transformers(our_model, tmp_path, experts):
    path = gj.save_checkpoint(our_model, tmp_path / "hf", "hf", experts=experts, progress=False)
    ours = np.asarray(gj.load_model(path, jnp.float32, progress=False)(TOKENS))
    assert relative_error(ours, references.hf_logits(path, TOKENS)) <= TOLERANCE


def test_checkpoints_we_save_in_original_format_load_in_gpt_oss_torch(our_model, tmp_path):
    path = gj.save_checkpoint(our_model, tmp_path / "original", "original", progress=False)
    ours = np.asarray(gj.load_model(path, jnp.float32, progress=False)(TOKENS))
    assert relative_error(ours, references.openai_logits(path, TOKENS)) <= TOLERANCE


def test_greedy_generation_matches_transformers(checkpoints):
    """Prompts of 150 tokens and 60 new ones: the KV cache and its 128-slot rings against transformers' own
    cached greedy generation, float32."""
    import torch

    prompts = TOKENS[:2, :150]
    hf = references.load_hf_model(checkpoints / "hf_mxfp4")
    ids = torch.as_tensor(prompts, dtype=torch.long)
    with torch.inference_mode():  # an explicit mask: otherwise transformers masks every id equal to pad_token_id
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, min_new_tokens=60,
                          do_sample=False, pad_token_id=0)
    expected = out[:, 150:].tolist()
    ours = gj.generate(gj.load_model(checkpoints / "original", jnp.float32, progress=False),
                       [list(p) for p in prompts], max_new_tokens=60, temperature=0)
    assert ours == expected
