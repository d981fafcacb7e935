"""gptoss_kernels: performance-critical ops, each Pallas kernel beside its pure-XLA twin.

Installed under the import name `gptoss_kernels` (pyproject maps this folder). A bare `import kernels` would
shadow Hugging Face's unrelated `kernels` package, so importing it under that name fails loudly.
"""

if __name__ == "kernels":
    raise ImportError("this folder is the `gptoss_kernels` package of gptoss-jax; import it as gptoss_kernels "
                      "(a bare `kernels` name belongs to an unrelated PyPI package)")
