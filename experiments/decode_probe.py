"""Decode and prefill time of a checkpoint through `gj.generate`, for before/after comparisons of one change.

Decode per token = (time of 18 new tokens - time of 2 new tokens) / 16, best of 2 rounds after a compiling run;
prefill = the 2-token run. Run the "before" tree with `PYTHONPATH=<worktree of the old commit>`, e.g.
    python experiments/decode_probe.py /tmp/gptoss-20b-random
A shallower real-width model isolates costs that grow with depth:
    gptoss-jax init --preset 20b --set num_hidden_layers=8 --format hf --out /tmp/20b-8layers
"""

import argparse
import time

import numpy as np

import gptoss_jax as gj


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt-tokens", type=int, default=65)
    args = parser.parse_args()
    model = gj.load_model(args.checkpoint)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 200000, args.prompt_tokens)]

    def timed(n):
        t = time.perf_counter()
        gj.generate(model, prompt, max_new_tokens=n, temperature=0)
        return time.perf_counter() - t

    timed(2), timed(18)  # compile
    rounds = [(timed(2), timed(18)) for _ in range(2)]
    decode_ms = 1000 * min(b - a for a, b in rounds) / 16
    print(f"{model.config.num_hidden_layers} layers: decode {decode_ms:.1f} ms/token, "
          f"prefill + 2 tokens {min(a for a, _ in rounds):.2f} s")


if __name__ == "__main__":
    main()
