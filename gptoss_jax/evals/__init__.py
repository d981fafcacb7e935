"""Evaluation: perplexity over text (sliding windows) and accuracy on JSONL question sets (Harmony prompts).

- `gptoss_jax.evals.perplexity.perplexity(model, "file.txt" | "file.jsonl", window=..., stride=...)`
- `gptoss_jax.evals.tasks.evaluate_tasks(model, "tasks.jsonl", "results.jsonl", reasoning_effort="low")`
- `gptoss-jax eval perplexity ...` and `gptoss-jax eval tasks ...` on the command line (`gptoss_jax.evals.cli`).
"""
