"""Parity tier: a fine-tuned model exported by `gptoss-jax convert` loads in transformers and gives the logits
gptoss-jax gives on the same exported checkpoint (float32), for MXFP4 and bf16 experts."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import gptoss_jax as gj
import references
from gptoss_jax.checkpoint import write_random_checkpoint
from gptoss_jax.train.export import export_run
from gptoss_jax.train.trainer import FinetuneConfig, finetune
from parity_util import TOLERANCE, relative_error

pytestmark = pytest.mark.parity

_missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
if _missing:
    reason = f"reference implementation(s) not installed: {', '.join(_missing)} (run `make parity`)"
    if os.environ.get("GPTOSS_REQUIRE_REFERENCES") == "1":
        raise RuntimeError(reason + "; GPTOSS_REQUIRE_REFERENCES=1 demands them")
    pytestmark = [pytest.mark.parity, pytest.mark.skip(reason=reason)]

TOKENS = np.random.default_rng(11).integers(0, 200000, (2, 150))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three steps of fine-tuning at a high learning rate, so every weight (experts included) leaves its
    MXFP4 grid."""
    root = tmp_path_factory.mktemp("ftparity")
    write_random_checkpoint(gj.ModelConfig.tiny(), root / "ckpt", progress=False)
    with (root / "data.jsonl").open("w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count to {i}"},
                                             {"role": "assistant", "content": " ".join(map(str, range(i + 1)))}]})
                    + "\n")
    finetune(FinetuneConfig(checkpoint=str(root / "ckpt"), data=str(root / "data.jsonl"), out=str(root / "run"),
                            steps=3, batch_size=2, seq_len=128, lr=1e-2, warmup=0, save_every=3,
                            dtype="float32", progress=False))
    return root


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_exported_finetune_loads_in_transformers(run, experts):
    path, errors = export_run(run / "run", run / f"hf-{experts}", "hf", experts=experts)
    if experts == "mxfp4":
        assert set(errors) == {"mlp1", "mlp2"} and all(0 < e < 0.2 for e in errors.values())
    ours = np.asarray(gj.load_model(path, jnp.float32, progress=False)(TOKENS))
    assert relative_error(ours, references.hf_logits(path, TOKENS)) <= TOLERANCE
