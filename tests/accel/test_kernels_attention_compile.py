"""The attention kernels compiled for a real TPU (v5e, Mosaic) and GPU (H100, Triton) at gpt-oss shapes.

Every variant must compile (Mosaic and Triton reject kernels that lower fine: VMEM / shared-memory limits, block
shapes, loop bounds), hold its Pallas kernels (a fallback to XLA would hide a kernel that no longer runs), and
keep the compiler's temporaries small: the prefill chunk over a KV cache never materializes the [B, K, G, T, S]
float32 scores, and a decode step never copies the cache (on TPU a [B, S, 8, 64] cache is laid out S-minor; a
kernel that reads it otherwise makes XLA transpose the whole cache on every call).

Shapes: q [B, T, K=8, G=8, H=64], k/v [B, S, 8, 64], sinks [8, 8], bf16 (positions int32).
"""

import jax
import jax.numpy as jnp
import pytest

from gptoss_kernels.attention_pallas import decode_attention, flash_attention

pytestmark = pytest.mark.accel

K, G, H = 8, 8, 64
SM_SCALE = 0.125
BF16, F32, I32 = jnp.bfloat16, jnp.float32, jnp.int32
MiB = 1 << 20


def _s(*shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _flash(backend, B, T, window, grad, segments):
    def fwd(q, k, v, s, *seg):
        return flash_attention(q, k, v, s, window=window, sm_scale=SM_SCALE, backend=backend,
                               segment_ids_BT=seg[0] if seg else None)

    def vjp(q, k, v, s, *seg):
        out, pullback = jax.vjp(lambda *a: fwd(*a, *seg), q, k, v, s)
        return pullback(out)  # dq, dk, dv, dsinks

    args = [_s(B, T, K, G, H), _s(B, T, K, H), _s(B, T, K, H), _s(K, G, dtype=F32)]
    if segments:
        args.append(_s(B, T, dtype=I32))
    return (vjp if grad else fwd), args, 3 if grad else 1  # forward; backward adds dq and dk/dv kernels


def _cache(backend, B, T, S, window):
    fn = lambda q, k, v, s, qp, kp: decode_attention(q, k, v, s, window=window, sm_scale=SM_SCALE, q_pos_BT=qp,
                                                     k_pos_BS=kp, backend=backend)
    return fn, [_s(B, T, K, G, H), _s(B, S, K, H), _s(B, S, K, H), _s(K, G, dtype=F32), _s(B, T, dtype=I32),
                _s(B, S, dtype=I32)], 1


# name -> (builder, kwargs). Flash: whole sequences (training, prefill without a cache); cache: decode steps on a
# ring (sliding layers, 128 slots) and a full cache, prefill chunks of 512 over 8192 cached slots (full layers)
# and over the ring plus the chunk's own 512 keys (sliding layers, as `kvcache.attend` passes them).
FLASH = {f"flash_{'grad' if grad else 'fwd'}_w{w}{'_seg' if seg else ''}_B{B}_T{T}": dict(
             B=B, T=T, window=w, grad=grad, segments=seg)
         for B, T in [(1, 4096)] for w in (0, 128) for grad in (False, True) for seg in (False, True)}
FLASH.update({f"flash_{'grad' if grad else 'fwd'}_w0_B4_T8192": dict(B=4, T=8192, window=0, grad=grad, segments=False)
              for grad in (False, True)})
CACHE = {
    "decode_ring_B8_S128": dict(B=8, T=1, S=128, window=128),
    "decode_full_B8_S8192": dict(B=8, T=1, S=8192, window=0),
    "decode_full_B1_S131072": dict(B=1, T=1, S=131072, window=0),
    "chunk_full_B8_T512_S8192": dict(B=8, T=512, S=8192, window=0),
    "chunk_ring_B8_T512_S640": dict(B=8, T=512, S=128 + 512, window=128),
}


def _report(target, compile_on, name, fn, args, n_kernels):
    report = compile_on(target, fn, *args)
    # One line per variant for the table (`pytest -s`).
    print(f"\n{name} @ {target.name}: ok={report['ok']} temp={report['temp_bytes'] / MiB:.1f} MiB "
          f"kernels={report['kernel_calls']} {report['seconds']:.1f}s")
    assert report["ok"], report["error"]
    assert report["kernel_calls"] >= n_kernels, report
    return report


@pytest.mark.parametrize("name", list(FLASH))
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_flash_compiles(backend, name, request, compile_on):
    fn, args, n_kernels = _flash(backend, **FLASH[name])
    _report(request.getfixturevalue(backend), compile_on, name, fn, args, n_kernels)


@pytest.mark.parametrize("name", list(CACHE))
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_cache_attention_compiles(backend, name, request, compile_on):
    case = CACHE[name]
    fn, args, n_kernels = _cache(backend, **case)
    report = _report(request.getfixturevalue(backend), compile_on, name, fn, args, n_kernels)
    B, T, S = case["B"], case["T"], case["S"]
    kv_bytes = 2 * B * S * K * H * 2
    scores_bytes = B * K * G * T * S * 4  # what the twin materializes (8 GiB for the 8192-slot chunk)
    q_bytes = B * T * K * G * H * 2
    # Temporaries: at most re-laid-out copies of q and the output (and the kernels' small partial results);
    # never the scores, never a copy of the cache.
    assert report["temp_bytes"] <= 4 * q_bytes + 4 * MiB, report
    if T == 1:
        assert report["temp_bytes"] < kv_bytes / 2, report
    else:  # 1/128 of the scores for 8192 slots, 1/10 for the ring's 640
        assert report["temp_bytes"] * 8 < scores_bytes, report
