"""Generation speed against Hugging Face transformers and the roofline (same as `gptoss-jax bench`).

usage: .venv/bin/python experiments/bench_generate.py [--quick] [--configs a,b] [--help]
"""

from gptoss_jax.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
