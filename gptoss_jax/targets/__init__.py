"""Compile targets without the hardware: TPU topologies (libtpu) and GPUs (the CUDA plugin), deviceless.

`get_target("v5e:2x2")` gives a TPU topology's compile-only devices as libtpu names them; `get_target("h100")` /
`get_target("h100:8")` gives N H100s described by `h100_sxm.txtpb` (the `tpu` and `gpu` extras install the
compilers). A jitted function lowered with `jax.ShapeDtypeStruct`s sharded over `target.mesh(...)` then compiles
with the real backend compiler (Mosaic and Triton for our kernels), and `compile_report` reads the compiler's own
per-device memory figures (`compiled.memory_analysis()`).

Both compilers run in this process next to the CPU backend: `prepare_environment()` (before JAX's first backend
use) keeps JAX on the CPU platform (so the CUDA plugin never looks for a GPU) and tells libtpu not to query a
metadata server. See docs/accelerators.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from gptoss_jax.sharding import MESH_AXES

GiB = 1 << 30
_HERE = Path(__file__).parent

# HBM per JAX device as the TPU compiler reports it when a program does not fit ("exceeds available HBM (...)"),
# measured with libtpu 0.0.42.1 (a v5p or v4 device is one megacore chip).
TPU_HBM_BYTES = {
    "TPU v5 lite": int(15.75 * GiB),
    "TPU v5": int(95.74 * GiB),
    "TPU v6 lite": int(31.25 * GiB),
    "TPU v4": int(15.25 * GiB),
}
# GPU name -> (target description file, device kind). The memory is the description's device_memory_size.
GPUS = {"h100": "h100_sxm.txtpb"}
# The Pallas kernels in a compiled program: Mosaic custom calls on TPU, Triton fusions / custom calls on GPU.
_KERNEL_CALL = re.compile(r'custom_call_target="(tpu_custom_call|__gpu\$xla\.gpu\.triton)"|kind=kCustom.*triton')


class TargetError(ValueError):
    """A compile target that is unknown here, or whose compiler is not installed."""


def prepare_environment() -> None:
    """Before JAX's first backend use: compile for accelerators from this CPU host (see the module docstring)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu locks the (absent) chips for one process; compiling needs no chip, so several processes may
    # (pytest workers, a plan next to a test run).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")  # JAX read the variable when it was imported
    # XLA:GPU would otherwise time GEMM algorithms on the (absent) device.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_autotune_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_autotune_level=0").strip()


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given: "v5e:2x2", "h100:8"
    platform: str  # "tpu" | "gpu"
    devices: tuple
    device_kind: str
    hbm_bytes: int  # memory of one device

    def mesh(self, sizes: Mapping[str, int]) -> Mesh:
        """A mesh with our axes over the first devices of the target (`{"fsdp": 1}` is one chip)."""
        shape = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
        n = math.prod(shape)
        if n > len(self.devices):
            raise TargetError(f"a mesh of {n} devices does not fit {self.name}, which has {len(self.devices)}")
        return Mesh(np.asarray(self.devices[:n], dtype=object).reshape(shape), MESH_AXES)


def get_target(name: str) -> Target:
    """`name`: a TPU topology as libtpu names it (`v5e:2x2`, `v5e:2x4`, `v5p:2x2x1`, `v6e:2x2`, `v4:2x2x1`, ...)
    or a GPU with an optional count (`h100`, `h100:8`)."""
    from jax.experimental import topologies

    gpu, _, count = name.partition(":")
    if gpu in GPUS:
        if count and not count.isdigit():
            raise TargetError(f"--compile {name!r}: expected {gpu}:N with N a number of GPUs")
        text = (_HERE / GPUS[gpu]).read_text()
        try:
            topo = topologies.get_topology_desc(platform="cuda", target_config=text,
                                                topology=f"1x1x{int(count or 1)}")
        except Exception as e:  # noqa: BLE001  (the plugin's own message says what is missing)
            raise TargetError(f"cannot compile for {name}: {_first_line(e)} (install the `gpu` extra: "
                              "pip install -e '.[gpu]')") from e
        memory = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
        devices = tuple(topo.devices)
        return Target(name, "gpu", devices, devices[0].device_kind, memory)
    try:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"cannot compile for {name!r}: {_first_line(e)} (a TPU topology as libtpu names it, "
                          f"e.g. v5e:2x2, v5p:2x2x1, with the `tpu` extra installed; or one of "
                          f"{', '.join(GPUS)}[:N])") from e
    devices = tuple(topo.devices)
    kind = devices[0].device_kind
    hbm = TPU_HBM_BYTES.get(kind) or _probe_tpu_hbm(devices[0])
    return Target(name, "tpu", devices, kind, hbm)


def _probe_tpu_hbm(device) -> int:
    """A TPU generation not in the table: ask its compiler (a program that cannot fit names the HBM it has)."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    huge = jax.ShapeDtypeStruct((1 << 20, 1 << 17), np.float32, sharding=sharding)
    try:
        jax.jit(lambda a: a + 1).lower(huge).compile()
    except Exception as e:  # noqa: BLE001
        m = re.search(r"exceeds available HBM \(([\d.]+)([KMGT])\)", str(e))
        if m:
            return int(float(m.group(1)) * (1 << 10 * (1 + "KMGT".index(m.group(2)))))
    raise TargetError(f"cannot tell the HBM of {device.device_kind}")


def _first_line(e: Exception) -> str:
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)


def kernel_calls(compiled) -> int:
    """Pallas kernel invocations (Mosaic / Triton) in a compiled program's HLO."""
    return sum(1 for line in compiled.as_text().splitlines() if _KERNEL_CALL.search(line))


def compile_report(lower: Callable[[], jax.stages.Lowered], hbm_bytes: int) -> dict:
    """Compile a lowering for its target and read the compiler's per-device memory.

    Returns {"ok", "error", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes", "fits",
    "kernel_calls", "seconds"}; total = arguments + outputs + temporaries - aliased. A program the device's memory
    cannot hold (or that the compiler rejects) is ok: False with the compiler's message, never an exception;
    an error while tracing or lowering (a bug, not a verdict) raises.
    """
    start = time.perf_counter()
    report = dict(ok=False, error=None, argument_bytes=0, output_bytes=0, temp_bytes=0, alias_bytes=0,
                  total_bytes=0, fits=False, kernel_calls=0, seconds=0.0)
    lowered = lower()  # tracing errors are ours and raise; only the compiler's verdict is reported
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  (reported, not raised: a verdict, not a crash)
        report.update(error=_compiler_message(e), seconds=round(time.perf_counter() - start, 2))
        return report
    mem = compiled.memory_analysis()
    parts = dict(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                 temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes)
    total = parts["argument_bytes"] + parts["output_bytes"] + parts["temp_bytes"] - parts["alias_bytes"]
    report.update(parts, ok=True, total_bytes=total, fits=total <= hbm_bytes, kernel_calls=kernel_calls(compiled),
                  seconds=round(time.perf_counter() - start, 2))
    return report


def _compiler_message(e: Exception) -> str:
    """The compiler's own words, without Python's traceback or JAX's frame filtering notes."""
    lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith("---")]
    text = " ".join(lines[:6])
    return text[:2000]
