"""The MoE Pallas kernels (kernels/moe_pallas.py) compiled for a TPU v5e chip (Mosaic) and an H100 (Triton) at
gpt-oss's shapes, forward and backward, and what the compiler says about their memory.

Each case compiles one program: the kernel's output and its VJP (dx, dbias, and dW for dense weights) at once, so
the forward kernel, the backward dx kernel, the SwiGLU's recomputed pre-activation and the GPU's dW kernel all pass
through the backend compiler. Weights come in the layout the target gives such arrays by default (except where
noted), and the kernels must read them where they lie: the compiled program may not copy them (no temporary as
large as a weight array; at decode sizes all temporaries together stay below the weights' bytes).

gpt-oss: D = 2880, expert width 2880; mlp1 [E, 5760, 2880] with the fused SwiGLU, mlp2 [E, 2880, 2880] plain;
20b E = 32, 120b E = 128; MXFP4 codes [E, N, 1440] + scales [E, N, 90] (uint8), or dense bf16.
"""

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec

from gptoss_jax import targets
from gptoss_kernels.moe_pallas import grouped_matmul_pallas, grouped_matmul_swiglu_pallas, tpu_weight_layout
from gptoss_kernels.mxfp4 import Packed

pytestmark = pytest.mark.accel

D = 2880
ALPHA, LIMIT = 1.702, 7.0
DECODE, PREFILL = 8 * 4, 2048 * 4  # rows: tokens x 4 active experts


class Case:
    def __init__(self, model, rows, kind, mlp, weight_layout=None):
        self.E = {"20b": 32, "120b": 128}[model]
        self.M = {"decode": DECODE, "prefill": PREFILL}[rows]
        self.kind, self.swiglu = kind, mlp == "mlp1"
        self.N = 2 * D if self.swiglu else D
        # major_to_minor of the weight arrays on the TPU where not the default (see the 120b mlp2 note below)
        self.weight_layout = weight_layout
        self.id = f"{model}-{rows}-{kind}-{mlp}" + ("-kn" if weight_layout else "")


# The 120b's mlp2 weights, [128, 2880, 1440] codes and [128, 2880, 2880] dense, are stored by a TPU with the
# experts minor-most ([N, C, E] in memory: no padding at all), which no kernel can read one expert of without
# reading all 128; the kernel's transposed reading ([E, C, N], major_to_minor (0, 2, 1)) is what the caller has
# to place them in (`jax.device_put` with a `Format`) so that they are not copied at every call. See
# test_tpu_default_layouts.
KN = (0, 2, 1)
CASES = [
    Case("20b", "decode", "mxfp4", "mlp1"),
    Case("20b", "decode", "mxfp4", "mlp2"),
    Case("20b", "decode", "dense", "mlp1"),
    Case("20b", "decode", "dense", "mlp2"),
    Case("20b", "prefill", "mxfp4", "mlp1"),
    Case("20b", "prefill", "dense", "mlp2"),
    Case("120b", "decode", "mxfp4", "mlp1"),
    Case("120b", "prefill", "mxfp4", "mlp2", weight_layout=KN),
    Case("120b", "prefill", "dense", "mlp1"),
]


@pytest.fixture(scope="module")
def h100() -> targets.Target:
    return targets.get_target("h100")


class _Keep:
    """A lowering whose compiled program is kept (for its HLO) when `compile_report` compiles it."""

    def __init__(self, lowered):
        self.lowered, self.compiled = lowered, None

    def compile(self):
        self.compiled = self.lowered.compile()
        return self.compiled


def compile_case(target: targets.Target, case: Case):
    backend = target.platform
    mesh = target.mesh({})
    replicated = NamedSharding(mesh, PartitionSpec())

    def spec(shape, dtype, layout=None):
        sharding = replicated if layout is None else Format(Layout(layout), replicated)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    E, M, N = case.E, case.M, case.N
    layout = case.weight_layout if backend == "tpu" else None
    if case.kind == "mxfp4":
        w = Packed(spec((E, N, D // 2), jnp.uint8, layout), spec((E, N, D // 32), jnp.uint8))
        weight_bytes = E * N * (D // 2 + D // 32)
        largest = E * N * D // 2
    else:
        w = spec((E, N, D), jnp.bfloat16, layout)
        weight_bytes, largest = E * N * D * 2, E * N * D
    x, gs, b = spec((M, D), jnp.bfloat16), spec((E,), jnp.int32), spec((E, N), jnp.bfloat16)
    ct = spec((M, N // 2 if case.swiglu else N), jnp.float32)
    if case.swiglu:
        f = functools.partial(grouped_matmul_swiglu_pallas, alpha=ALPHA, limit=LIMIT, backend=backend)
    else:
        f = functools.partial(grouped_matmul_pallas, backend=backend)

    def fwd_bwd(x, gs, w, b, ct):
        if case.kind == "mxfp4":  # frozen packed weights: gradients for x and the bias
            y, vjp = jax.vjp(lambda x, b: f(x, gs, w, b), x, b)
        else:
            y, vjp = jax.vjp(lambda x, w, b: f(x, gs, w, b), x, w, b)
        return y, vjp(ct)

    keep = []

    def lower():
        keep.append(_Keep(jax.jit(fwd_bwd).lower(x, gs, w, b, ct)))
        return keep[-1]

    report = targets.compile_report(lower, target.hbm_bytes)
    text = keep[-1].compiled.as_text() if report["ok"] else ""
    return report, text, weight_bytes, largest


# A copy or transpose in the compiled program: `copy(...)`, `transpose(...)`, or a fusion named after one.
_RESHUFFLE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (copy|transpose|fusion|copy-start)\(")


def weight_sized_copies(hlo_text: str, largest: int) -> list[str]:
    """The copies / transposes in the program whose result holds at least `largest` elements: a weight array
    moved to another layout."""
    found = []
    for line in hlo_text.splitlines():
        m = _RESHUFFLE.match(line)
        if not m:
            continue
        name, _, dims, op = m.groups()
        if op == "fusion" and not ("copy" in name or "transpose" in name):
            continue
        if dims and np.prod([int(d) for d in dims.split(",")]) >= largest:
            found.append(line.strip()[:200])
    return found


def expected_kernels(case: Case, backend: str) -> int:
    """The output's kernel, dx, the SwiGLU's recomputed pre-activation, and the GPU's dense dW."""
    return 2 + case.swiglu + (backend == "gpu" and case.kind == "dense")


def check(target: targets.Target, case: Case):
    report, text, weight_bytes, largest = compile_case(target, case)
    mib = 1 << 20
    print(f"{target.name} {case.id}: ok={report['ok']} temp={report['temp_bytes'] / mib:.1f} MiB "
          f"(weights {weight_bytes / mib:.0f} MiB) kernels={report['kernel_calls']} {report['seconds']} s")
    assert report["ok"], f"{target.name} {case.id}: {report['error']}"
    assert report["kernel_calls"] >= expected_kernels(case, target.platform), report
    assert report["fits"], report
    copies = weight_sized_copies(text, largest)
    assert not copies, f"{target.name} {case.id}: the weights are copied: {copies}"
    if case.M == DECODE:
        assert report["temp_bytes"] < weight_bytes, report


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tpu_compiles(tpu, case):
    check(tpu, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_compiles(h100, case):
    check(h100, case)


def test_weight_copy_detector(tpu):
    """The check above can fail: weights handed to the kernel in the layout it does not read are copied."""
    case = Case("20b", "decode", "mxfp4", "mlp2", weight_layout=(0, 1, 2))  # row-major codes
    report, text, weight_bytes, largest = compile_case(tpu, case)
    assert report["ok"], report["error"]
    assert weight_sized_copies(text, largest) and report["temp_bytes"] > weight_bytes * 0.9


def test_tpu_default_layouts(tpu):
    """`tpu_weight_layout` (the rule used when compiling from a CPU host) against the TPU compiler's own default
    layouts for gpt-oss's weight shapes: where the default is one the kernel reads ("kn": N minor, then C; "nk":
    row-major), the rule names it; the 120b's mlp2 arrays are stored expert-minor, which the kernel cannot read
    (the caller has to place them "kn", as the 120b mlp2 case above does)."""
    device = tpu.devices[0]
    shapes = [((E, N, D // 2), np.uint8) for E in (32, 128) for N in (D, 2 * D)]
    shapes += [((E, N, D), ml_dtypes.bfloat16) for E in (32, 128) for N in (D, 2 * D)]
    expert_minor = []
    for shape, dtype in shapes:
        text = str(device.client.get_default_layout(np.dtype(dtype), shape, device))
        minor_to_major = tuple(int(d) for d in text[1:text.index(":")].split(","))
        default = {(1, 2, 0): "kn", (2, 1, 0): "nk"}.get(minor_to_major)
        if default is None:
            expert_minor.append(shape)
            assert minor_to_major[0] == 0, (shape, text)
        else:
            assert tpu_weight_layout(shape, dtype) == default, (shape, text)
    assert expert_minor == [(128, D, D // 2), (128, D, D)]
