"""`gptoss-jax plan`: per-device memory from the sharding table on an abstract mesh (no devices needed).

The figures are checked against shard sizes worked out by hand from docs/spec.md's tensor shapes and the table's
documented rules (the real per-device bytes of sharded arrays are checked in tests/mesh/test_sharding.py's 8-device run).
"""

import math

import jax
import pytest

from gptoss_jax.cli import main
from gptoss_jax.plan import GiB, TARGETS, MemoryPlan, abstract_mesh, format_plan, plan, sharded_param_shapes
from gptoss_jax.config import ModelConfig
from gptoss_jax.sharding import parse_mesh

V, D, F, N, K, H = 201088, 2880, 2880, 64, 8, 64
QKV = H * (N + 2 * K)


def expected_param_bytes(L, E, *, fsdp=1, tensor=1, expert=1, dense=False):
    """Per-device parameter bytes of gpt-oss with this mesh, from docs/spec.md's shapes: bf16 tensors, MXFP4 experts
    (codes [E, out, in/2] + scales [E, out, in/32] uint8) or dense bf16 experts. Table: vocab, qkv, heads and
    expert_mlp over tensor; embed over fsdp; experts over expert, then fsdp (each split only where it divides; an
    expert array whose experts took fsdp keeps its hidden dimension whole)."""
    def div(n, k):
        return k if n % k == 0 else 1

    n_e = div(E, expert)
    e_fsdp = div(E // n_e, fsdp)  # the experts take fsdp before their hidden dimension can
    n_e, d_fsdp = n_e * e_fsdp, fsdp if e_fsdp == 1 else 1  # splits of an expert array's E and D

    def expert_matrix(out, inp, out_axis, in_axis):  # out_axis/in_axis: the mesh size splitting each dim
        if dense:
            return E * out * inp * 2 / (n_e * div(out, out_axis) * div(inp, in_axis))
        codes = E * out * (inp // 2) / (n_e * div(out, out_axis) * div(inp // 2, in_axis))
        scales = E * out * (inp // 32) / (n_e * div(out, out_axis) * div(inp // 32, in_axis))
        return codes + scales

    per_layer = (
        2 * D * 2 / div(D, fsdp)  # attention and MoE norms
        + QKV * D * 2 / (div(QKV, tensor) * div(D, fsdp)) + QKV * 2 / div(QKV, tensor)
        + D * N * H * 2 / (div(D, fsdp) * div(N * H, tensor)) + D * 2 / div(D, fsdp)
        + N * 2 / div(N, tensor)  # sinks
        + E * D * 2 / (n_e * div(D, d_fsdp)) + E * 2 / n_e  # router
        + expert_matrix(2 * F, D, tensor, d_fsdp) + E * 2 * F * 2 / (n_e * div(2 * F, tensor))
        + expert_matrix(D, F, d_fsdp, tensor) + E * D * 2 / (n_e * div(D, d_fsdp))
    )
    return L * per_layer + 2 * V * D * 2 / (div(V, tensor) * div(D, fsdp)) + D * 2 / div(D, fsdp)


def test_one_device_holds_the_official_checkpoint_bytes():
    for name, nbytes in (("20b", 13_761_264_768), ("120b", 65_248_815_744)):
        p = plan(name, {}, batch=1, seq_len=128)
        assert p.params == p.params_global == nbytes  # docs/spec.md's checkpoint sizes


@pytest.mark.parametrize("name,L,E,mesh", [
    ("20b", 24, 32, {"fsdp": 2, "tensor": 2, "expert": 2}),
    ("120b", 36, 128, {"expert": 8}),
    ("120b", 36, 128, {"fsdp": 4, "tensor": 2}),
    ("120b", 36, 128, {"fsdp": 8}),
    ("20b", 24, 32, {"tensor": 8}),  # 90 scale groups do not split 8 ways: replicated, never an error
])
def test_parameter_bytes_per_device(name, L, E, mesh):
    p = plan(name, mesh, batch=1, seq_len=128)
    assert p.params == expected_param_bytes(L, E, **mesh)
    t = plan(name, mesh, batch=1, seq_len=128, train=True)
    assert t.params == expected_param_bytes(L, E, dense=True, **mesh)


def test_figures_are_the_shard_shapes_of_eval_shape():
    """Every array's figure is `shard_shape` of the sharding that `jax.eval_shape` of the jitted initializer
    carries, summed; and the shards tile the array (shard count x shard size = array size)."""
    cfg, sizes = ModelConfig.gpt_oss_120b(), {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}
    shapes = sharded_param_shapes(cfg, abstract_mesh(sizes))
    total = 0
    for path, x in shapes.items():
        assert isinstance(x, jax.ShapeDtypeStruct) and x.sharding.mesh.shape == sizes
        shard = x.sharding.shard_shape(x.shape)
        splits = math.prod(dim // s for dim, s in zip(x.shape, shard))
        assert splits * math.prod(shard) == math.prod(x.shape)
        total += math.prod(shard) * x.dtype.itemsize
    assert plan("120b", sizes, batch=1, seq_len=128).params == total
    assert shapes[("blocks", "mlp", "mlp1", "blocks")].sharding.shard_shape((36, 128, 5760, 1440)) == \
        (36, 32, 2880, 1440)  # experts over expert then fsdp, expert MLP over tensor, hidden whole
    assert shapes[("blocks", "attn", "qkv_w")].sharding.shard_shape((36, QKV, D)) == (36, QKV // 2, D // 2)


def test_training_state_kv_cache_and_activations():
    mesh = {"data": 2, "fsdp": 4}
    t = plan("20b", mesh, batch=8, seq_len=4096, train=True)
    n = expected_param_bytes(24, 32, fsdp=4, dense=True) // 2  # bf16 trainable parameters on one device
    assert t.grads == 6 * n  # float32 accumulator + bf16 micro-batch gradient
    assert 0 < t.optimizer - 8 * n <= 64  # the trainer's AdamW: float32 mu and nu, and its step counters
    assert t.kv_cache == 0
    # batch 8 over data x fsdp = 8: one sequence per device; 24 saved [4096, 2880] bf16 layer inputs
    saved = [v for k, v in t.parts["activations"].items() if k.startswith("saved residual")]
    assert saved == [24 * 4096 * D * 2]

    i = plan("20b", {"fsdp": 2, "tensor": 4}, batch=4, seq_len=3000)
    assert i.cache_len == 4096  # generate rounds the cache up to a power of two
    # K/V [layers/2, batch / fsdp, slots, kv heads / tensor, 64] bf16, twice (k and v), full + ring layers
    assert i.kv_cache == 2 * 12 * (4 // 2) * (4096 + 128) * (8 // 4) * 64 * 2 + (4 // 2) * 4
    assert i.grads == i.optimizer == 0 and i.activations > 0
    assert i.total == i.params + i.kv_cache + i.activations


def test_routed_rows_follow_the_moe_layout():
    """Where the MoE gathers the tokens over fsdp (decode and prefill chunks: the 120b's experts outweigh them),
    each device holds the routed rows of the whole group; where it gathers the weights (many long rows), only its
    own. Rows of one prefill chunk of 512 tokens: k = 4 copies of [D] bf16 in, [2F] and [F] float32, [D]
    float32 out."""
    per_token = 4 * (D * 2 + 2 * F * 4 + F * 4 + D * 4)

    def routed(p):
        return next(v for n, v in p.parts["activations"].items() if n.endswith("routed rows"))

    assert routed(plan("120b", {"fsdp": 8}, batch=8, seq_len=8192)) == 8 * 512 * per_token  # the group's 8 rows
    assert routed(plan("120b", {"expert": 8}, batch=8, seq_len=8192)) == 8 * 512 * per_token  # not split
    # 64 rows of 512 tokens: the group's rows (6 GB) outweigh a 20b layer's experts: those move, the rows stay
    assert routed(plan("20b", {"fsdp": 8}, batch=64, seq_len=8192)) == 8 * 512 * per_token


def test_verdicts():
    fits = plan("20b", {"fsdp": 8}, batch=1, seq_len=4096)
    assert fits.verdict(TARGETS[0]).startswith("fits")  # v5e-8: 1.9 GiB of parameters per chip
    assert fits.verdict(TARGETS[1]).startswith("n/a")  # a v5p-8 has 4 chips
    big = plan("20b", {"fsdp": 8}, batch=8, seq_len=4096, train=True)
    assert big.verdict(TARGETS[0]).startswith("does not fit")  # 20b fine-tuning needs > 16 GiB a chip
    assert big.verdict(TARGETS[2]).startswith("fits")
    fake = MemoryPlan("x", parse_mesh("fsdp=8"), 1, 1, False, 0, int(15 * GiB), 0, 0, 0, 0, 0, {})
    assert fake.verdict(TARGETS[0]).startswith("tight")  # 15 of 16 GiB: under 10% headroom


def test_parse_mesh_rejects_bad_input():
    assert parse_mesh("fsdp=2, expert=4") == {"data": 1, "fsdp": 2, "tensor": 1, "expert": 4}
    for bad in ("fsdp", "pipeline=2", "fsdp=0", "fsdp=two"):
        with pytest.raises(ValueError, match="--mesh"):
            parse_mesh(bad)


def test_cli(capsys):
    assert main(["plan", "--model", "120b", "--mesh", "fsdp=2,tensor=4", "--batch", "2", "--seq-len", "8192"]) == 0
    out = capsys.readouterr().out
    p = plan("120b", {"fsdp": 2, "tensor": 4}, batch=2, seq_len=8192)
    assert out.strip() == format_plan(p)
    assert f"| parameters | {p.params / GiB:.2f} |" in out and "| 8xH100 | 8 | 80 GiB | fits" in out
    assert main(["plan", "--model", "20b", "--mesh", "fsdp=3x"]) == 2
    assert "error: --mesh: fsdp must be a positive integer" in capsys.readouterr().err


def test_cli_summary_over_the_targets(capsys):
    """Without --mesh: one row per target, each on fsdp over its devices. 20b fine-tuning needs ~16 bytes a
    parameter (bf16 weight, f32 grad accumulator + bf16 grad, f32 mu + nu): 312 GiB, more than a v5e-8's 128."""
    assert main(["plan", "--model", "20b", "--batch", "8", "--seq-len", "2048", "--train"]) == 0
    rows = {line.split(" |")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| TPU") or line.startswith("| 8x")}
    assert set(rows) == {"TPU v5e-8 (8 x 16 GiB)", "TPU v5p-8 (4 x 95 GiB)", "8xH100 (8 x 80 GiB)"}
    assert "| fsdp=8 |" in rows["TPU v5e-8 (8 x 16 GiB)"] and "does not fit" in rows["TPU v5e-8 (8 x 16 GiB)"]
    assert "| fsdp=4 |" in rows["TPU v5p-8 (4 x 95 GiB)"]
    total = plan("20b", {"fsdp": 8}, batch=8, seq_len=2048, train=True).total
    assert f"| {total / GiB:.2f} | fits" in rows["8xH100 (8 x 80 GiB)"]


def test_compile_target_errors_name_the_target():
    """A target libtpu does not know, or a mesh larger than the target: one error naming it, no traceback."""
    with pytest.raises(SystemExit, match="cannot compile for 'v9z:1x1'"):
        main(["plan", "--model", "20b", "--compile", "v9z:1x1"])
    with pytest.raises(SystemExit, match="expected h100:N"):
        main(["plan", "--model", "20b", "--compile", "h100:eight"])
