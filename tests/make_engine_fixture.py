"""Write tests/fixtures/engine: a tiny float32 model (small vocabulary) and the tokens `gj.generate` gives for a
set of requests (greedy and sampled, with and without top-k, a ragged batch). Recorded once, before the inference
core was shared by `generate` and the server (issue 16), so both are checked against the pre-refactor outputs.

    .venv/bin/python tests/make_engine_fixture.py   # rewrites the fixture: only when the model's numbers change
"""

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import gptoss_jax as gj

OUT = Path(__file__).parent / "fixtures" / "engine"
CFG = dataclasses.replace(gj.ModelConfig.tiny(), vocab_size=512, num_hidden_layers=3)  # sliding, full, sliding
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.8, top_p=0.9, seed=7),
    "top_k": dict(temperature=1.0, top_k=20, seed=11),
    "top_k_top_p": dict(temperature=0.7, top_p=0.8, top_k=50, seed=3),
}
MAX_NEW_TOKENS = 12


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(0, CFG.vocab_size, n)] for n in (3, 17, 40, 1)]


def main():
    model = gj.init_model(CFG, seed=3, dtype=jnp.float32)
    gj.save_checkpoint(model, OUT / "model", format="hf", overwrite=True)
    model = gj.load_model(OUT / "model", dtype=jnp.float32)
    ps = prompts()
    tokens = {name: gj.generate(model, ps, max_new_tokens=MAX_NEW_TOKENS, **kw) for name, kw in SETTINGS.items()}
    (OUT / "tokens.json").write_text(json.dumps({"prompts": ps, "max_new_tokens": MAX_NEW_TOKENS,
                                                 "settings": SETTINGS, "tokens": tokens}, indent=1) + "\n")


if __name__ == "__main__":
    main()
