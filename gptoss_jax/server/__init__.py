"""An OpenAI-compatible server with continuous batching (`gptoss-jax serve`) and offline batch inference
(`gptoss-jax batch`), both on the inference engine (`gptoss_jax.engine`). See docs/server.md."""
