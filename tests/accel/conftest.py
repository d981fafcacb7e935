"""The accelerator tier (`make accel`): real TPU (libtpu) and GPU (CUDA plugin) compiles on this CPU host.

Every test here compiles for a deviceless target (`gptoss_jax.targets`) and reads what the compiler says; a
missing compiler is a failure, not a skip (install the `tpu` and `gpu` extras)."""

from gptoss_jax import targets

targets.prepare_environment()  # before any JAX backend starts

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tpu() -> targets.Target:
    """One TPU v5e chip's worth of compile-only devices (a 2x2 topology; meshes take the first devices)."""
    return targets.get_target("v5e:2x2")


@pytest.fixture(scope="session")
def gpu() -> targets.Target:
    """Eight H100s, compile-only."""
    return targets.get_target("h100:8")


@pytest.fixture(scope="session")
def compile_on():
    """`compile_on(target, fn, *args)`: see `_compile_on`."""
    return _compile_on


def _compile_on(target: targets.Target, fn, *args, mesh_sizes=None, static_argnames=()):
    """Compile `fn` for `target` with `args` (ShapeDtypeStructs or arrays' shapes) placed, unsharded, on the
    target's first device (or replicated over `mesh_sizes`); returns `targets.compile_report`'s dict."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = target.mesh(mesh_sizes or {})
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, PartitionSpec())),
                          args)
    return targets.compile_report(lambda: jax.jit(fn, static_argnames=static_argnames).lower(*placed),
                                  target.hbm_bytes)
