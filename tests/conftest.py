import os

# Tests run on CPU (a GPU/TPU would change float32 matmul precision); set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
