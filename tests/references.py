"""Independent references for the parity tests: random gpt-oss checkpoints and the two reference forwards.

Nothing here imports `gptoss_jax`: the checkpoints are written with numpy + safetensors straight from
docs/spec.md, and the logits come from Hugging Face transformers and OpenAI's `gpt_oss.torch`, so a bug in our
implementation cannot leak into the thing it is compared against.

torch / transformers / gpt_oss are imported lazily, so writing checkpoints needs only numpy, ml_dtypes and
safetensors.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

LAYOUTS = ("original", "hf_mxfp4", "hf_bf16")

# Original-layout config (exactly the 16 fields of gpt_oss.torch.model.ModelConfig). Three layers so that the
# pattern sliding/full/sliding ends on a sliding layer; GQA group 4; the real 20b RoPE / SwiGLU constants.
SMALL_CONFIG = {
    "num_hidden_layers": 3,
    "num_experts": 4,
    "experts_per_token": 2,
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 64,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000.0,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1.0,
    "rope_ntk_beta": 32.0,
}

FP4_VALUES = np.array(
    [+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)
_FP4_RMS = float(np.sqrt(np.mean(FP4_VALUES**2)))  # 2.93: rms of a uniformly random FP4 code
_MXFP4_BLOCK = 32
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers warns about / rejects files without it


def _bf16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# MXFP4, decoded independently (numpy), used to build the dense layout and to check what transformers loaded.
# ---------------------------------------------------------------------------------------------------------------


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(E, rows, cols/32, 16) uint8 codes + (E, rows, cols/32) E8M0 scales -> float32 (E, rows, cols).

    Low nibble = even element, high nibble = odd element; value = fp4 * 2^(scale - 127). Exact in float32.
    """
    assert blocks.dtype == np.uint8 and scales.dtype == np.uint8 and blocks.shape[:-1] == scales.shape
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])
    values = np.ldexp(FP4_VALUES[codes], scales.astype(np.int32)[..., None] - 127)
    return values.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def _random_mxfp4(rng: np.random.Generator, experts: int, rows: int, cols: int):
    """Uniform random codes; scales centred so the decoded weights have std ~ cols^-0.5 (fan-in init)."""
    assert cols % _MXFP4_BLOCK == 0
    groups = cols // _MXFP4_BLOCK
    blocks = rng.integers(0, 256, size=(experts, rows, groups, _MXFP4_BLOCK // 2), dtype=np.uint8)
    centre = 127 + round(math.log2(cols**-0.5 / _FP4_RMS))
    scales = (centre + rng.integers(-1, 2, size=(experts, rows, groups))).astype(np.uint8)
    return blocks, scales


# ---------------------------------------------------------------------------------------------------------------
# The random model, in the original layout (the canonical form; the HF layouts are renamings of it).
# ---------------------------------------------------------------------------------------------------------------


def random_original_tensors(config: dict = SMALL_CONFIG, seed: int = 0) -> dict[str, np.ndarray]:
    """All tensors of a random model, original-layout names, in the checkpoint dtypes (bf16 / uint8)."""
    rng = np.random.default_rng(seed)
    H, V = config["hidden_size"], config["vocab_size"]
    I, E = config["intermediate_size"], config["num_experts"]
    nq, nkv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    qkv_dim = d * (nq + 2 * nkv)

    def normal(shape, std):
        return _bf16(rng.normal(0.0, std, size=shape))

    def norm_scale():
        return _bf16(1.0 + rng.normal(0.0, 0.1, size=(H,)))

    t = {
        "embedding.weight": normal((V, H), 1.0),
        "unembedding.weight": normal((V, H), H**-0.5),
        "norm.scale": norm_scale(),
    }
    for n in range(config["num_hidden_layers"]):
        p = f"block.{n}."
        t[p + "attn.norm.scale"] = norm_scale()
        t[p + "attn.qkv.weight"] = normal((qkv_dim, H), H**-0.5)
        t[p + "attn.qkv.bias"] = normal((qkv_dim,), 0.05)
        t[p + "attn.out.weight"] = normal((H, nq * d), (nq * d) ** -0.5)
        t[p + "attn.out.bias"] = normal((H,), 0.05)
        t[p + "attn.sinks"] = normal((nq,), 1.0)
        t[p + "mlp.norm.scale"] = norm_scale()
        t[p + "mlp.gate.weight"] = normal((E, H), H**-0.5)
        t[p + "mlp.gate.bias"] = normal((E,), 0.1)
        blocks, scales = _random_mxfp4(rng, E, 2 * I, H)
        t[p + "mlp.mlp1_weight.blocks"], t[p + "mlp.mlp1_weight.scales"] = blocks, scales
        t[p + "mlp.mlp1_bias"] = normal((E, 2 * I), 0.05)
        blocks, scales = _random_mxfp4(rng, E, H, I)
        t[p + "mlp.mlp2_weight.blocks"], t[p + "mlp.mlp2_weight.scales"] = blocks, scales
        t[p + "mlp.mlp2_bias"] = normal((E, H), 0.05)
    for name, x in t.items():
        assert np.any(x.astype(np.float32) != 0), name
    return t


def original_to_hf(tensors: dict[str, np.ndarray], config: dict = SMALL_CONFIG, dense: bool = False):
    """Rename (and for `dense`, dequantize + transpose) original-layout tensors into the HF layout.

    The MXFP4 bytes are copied unchanged (gate/linear stay interleaved). Dense experts are stored
    (E, in, out), the transpose of the original (out, in); FP4 * 2^k is exact in bf16, so the dense
    checkpoint holds the very same model.
    """
    nq, nkv, d = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    q_end, k_end = nq * d, (nq + nkv) * d
    out = {"model.embed_tokens.weight": tensors["embedding.weight"]}
    for n in range(config["num_hidden_layers"]):
        src, dst = f"block.{n}.", f"model.layers.{n}."
        out[dst + "input_layernorm.weight"] = tensors[src + "attn.norm.scale"]
        for part in ("weight", "bias"):
            fused = tensors[src + f"attn.qkv.{part}"]
            out[dst + f"self_attn.q_proj.{part}"] = fused[:q_end]
            out[dst + f"self_attn.k_proj.{part}"] = fused[q_end:k_end]
            out[dst + f"self_attn.v_proj.{part}"] = fused[k_end:]
            out[dst + f"self_attn.o_proj.{part}"] = tensors[src + f"attn.out.{part}"]
        out[dst + "self_attn.sinks"] = tensors[src + "attn.sinks"]
        out[dst + "post_attention_layernorm.weight"] = tensors[src + "mlp.norm.scale"]
        out[dst + "mlp.router.weight"] = tensors[src + "mlp.gate.weight"]
        out[dst + "mlp.router.bias"] = tensors[src + "mlp.gate.bias"]
        for hf, orig in (("gate_up_proj", "mlp1"), ("down_proj", "mlp2")):
            blocks = tensors[src + f"mlp.{orig}_weight.blocks"]
            scales = tensors[src + f"mlp.{orig}_weight.scales"]
            if dense:
                out[dst + f"mlp.experts.{hf}"] = _bf16(dequantize_mxfp4(blocks, scales).transpose(0, 2, 1))
            else:
                out[dst + f"mlp.experts.{hf}_blocks"] = blocks
                out[dst + f"mlp.experts.{hf}_scales"] = scales
            out[dst + f"mlp.experts.{hf}_bias"] = tensors[src + f"mlp.{orig}_bias"]
    out["model.norm.weight"] = tensors["norm.scale"]
    out["lm_head.weight"] = tensors["unembedding.weight"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_config(config: dict = SMALL_CONFIG, quantized: bool = True) -> dict:
    """config.json in the form the Hub's openai/gpt-oss-* repositories ship it (rope_scaling + rope_theta,
    which transformers 5 folds into `rope_parameters` on load).

    pad/eos ids are left out on purpose: the real ones (199999 / 200002) lie outside a 256-token vocabulary
    and transformers uses pad_token_id as the embedding's padding_idx, which must be < vocab_size.
    """
    L = config["num_hidden_layers"]
    c = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "head_dim": config["head_dim"],
        "hidden_act": "silu",
        "hidden_size": config["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": config["intermediate_size"],
        # even layers slide (layer 0 first), as in gpt_oss.torch's `layer_idx % 2 == 0`
        "layer_types": ["sliding_attention" if n % 2 == 0 else "full_attention" for n in range(L)],
        "max_position_embeddings": int(config["initial_context_length"] * config["rope_scaling_factor"]),
        "num_attention_heads": config["num_attention_heads"],
        "num_experts_per_tok": config["experts_per_token"],
        "num_hidden_layers": L,
        "num_key_value_heads": config["num_key_value_heads"],
        "num_local_experts": config["num_experts"],
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": float(config["rope_scaling_factor"]),
            "beta_fast": float(config["rope_ntk_beta"]),
            "beta_slow": float(config["rope_ntk_alpha"]),
            "original_max_position_embeddings": config["initial_context_length"],
            "truncate": False,
        },
        "rope_theta": float(config["rope_theta"]),
        "router_aux_loss_coef": 0.9,
        "sliding_window": config["sliding_window"],
        "swiglu_limit": float(config["swiglu_limit"]),
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": config["vocab_size"],
    }
    if quantized:
        c["quantization_config"] = {
            "quant_method": "mxfp4",
            # as on the Hub: only the experts are MXFP4
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        }
    return c


def _save(tensors: dict[str, np.ndarray], file: Path) -> None:
    save_file(tensors, str(file), metadata=_SAFETENSORS_METADATA)


def write_random_checkpoint(path, layout: str, config: dict = SMALL_CONFIG, seed: int = 0) -> None:
    """Write a random checkpoint folder in `layout` ("original", "hf_mxfp4" or "hf_bf16").

    For one (config, seed) all three layouts hold the same model: hf_mxfp4 has the original's bytes
    renamed (split over two shards + index), hf_bf16 the same experts dequantized (exactly) to bf16.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = random_original_tensors(config, seed)

    if layout == "original":
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _save(tensors, path / "model.safetensors")
        return

    hf = original_to_hf(tensors, config, dense=(layout == "hf_bf16"))
    (path / "config.json").write_text(json.dumps(hf_config(config, quantized=(layout == "hf_mxfp4")), indent=2) + "\n")
    if layout == "hf_bf16":
        _save(hf, path / "model.safetensors")
        return

    # Two shards cut at half the bytes, in model order, so one layer straddles the files (as on the Hub).
    names = list(hf)
    total = sum(hf[k].nbytes for k in names)
    shards, running = ([], []), 0
    for k in names:
        shards[0 if running < total // 2 else 1].append(k)
        running += hf[k].nbytes
    weight_map = {}
    for i, keys in enumerate(shards):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        _save({k: hf[k] for k in keys}, path / file)
        weight_map.update({k: file for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_checkpoint(path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder (any layout, sharded or not) as numpy, checkpoint dtypes."""
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reference forwards.
# ---------------------------------------------------------------------------------------------------------------


def _expected_hf_state(path) -> dict[str, np.ndarray]:
    """What a dense HF model loaded from `path` must hold (float32): the checkpoint, MXFP4 decoded here."""
    raw = read_checkpoint(path)
    out = {}
    for k, v in raw.items():
        if k.endswith("_scales"):
            continue
        if k.endswith("_blocks"):
            base = k.removesuffix("_blocks")
            out[base] = dequantize_mxfp4(v, raw[base + "_scales"]).transpose(0, 2, 1)
        else:
            out[k] = v.astype(np.float32)
    return out


def load_hf_model(path, dtype=None):
    """transformers.GptOssForCausalLM from a local HF-layout folder, on CPU, eager attention and experts.

    MXFP4 on CPU: the quantizer only keeps MXFP4 with the `kernels` package + triton (Hub kernels); without
    them (and always on CPU unless use_kernels=True) it falls back to dequantizing. We pass
    Mxfp4Config(dequantize=True) explicitly so that path is taken by decision, not by fallback, and nothing
    ever calls `get_kernel` (a Hub download). Dequantization goes straight to the parameter dtype (exact).

    Raises if the load report lists missing / unexpected / mismatched keys, or if any parameter differs from
    the checkpoint's value (decoded independently here): a silently re-initialised weight would otherwise
    make the reference meaningless.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # only effective if transformers is not imported yet
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    dtype = torch.float32 if dtype is None else dtype
    kwargs = {}
    if "quantization_config" in json.loads((Path(path) / "config.json").read_text()):
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model, info = GptOssForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,
        attn_implementation="eager",  # the plain softmax-with-sink path (sdpa is unsupported for gpt_oss anyway)
        experts_implementation="eager",  # the per-expert loop in modeling_gpt_oss, not grouped_mm
        device_map=None,
        local_files_only=True,
        use_kernels=False,
        output_loading_info=True,
        **kwargs,
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"transformers did not load {path} cleanly: {problems}")
    if model.config._attn_implementation != "eager" or model.config._experts_implementation != "eager":
        raise RuntimeError("transformers did not honour the eager attention / experts implementation")

    expected = _expected_hf_state(path)
    state = model.state_dict()
    if set(state) != set(expected):
        raise RuntimeError(
            f"parameter names differ: model-only {sorted(set(state) - set(expected))}, "
            f"checkpoint-only {sorted(set(expected) - set(state))}"
        )
    for k, v in state.items():
        got = v.detach().float().numpy()
        want = expected[k].astype(ml_dtypes.bfloat16).astype(np.float32) if v.dtype == torch.bfloat16 else expected[k]
        if got.shape != want.shape or not np.array_equal(got, want):
            raise RuntimeError(f"{k}: loaded value differs from the checkpoint (re-initialised or mis-decoded)")
    model.eval()
    return model


def hf_logits(path, tokens, dtype=None) -> np.ndarray:
    """float32 logits [B, T, V] of transformers' GptOssForCausalLM (HF layouts) for int tokens [B, T].

    dtype is the model dtype (torch.float32 by default; torch.bfloat16 for the bf16 argmax check).
    """
    import torch

    model = load_hf_model(path, dtype)
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    assert ids.ndim == 2, "tokens must be [B, T]"
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits
    return logits.float().numpy()


def openai_logits(path, tokens) -> np.ndarray:
    """float32 logits [B, T, V] of OpenAI's gpt_oss.torch Transformer (original layout only).

    It loads in bf16 (and runs attention in the parameter dtype), so we cast it to float32 for a tight
    comparison. It takes one unbatched [T] sequence, so the batch is run row by row.
    """
    import torch
    from gpt_oss.torch.model import Transformer

    if "model_type" in json.loads((Path(path) / "config.json").read_text()):
        raise ValueError(f"{path} is a Hugging Face layout; gpt_oss.torch reads the original layout only")
    model = Transformer.from_checkpoint(str(path), device="cpu").float().eval()
    tokens = np.asarray(tokens)
    assert tokens.ndim == 2, "tokens must be [B, T]"
    rows = []
    with torch.inference_mode():
        for seq in tokens:
            rows.append(model(torch.as_tensor(seq, dtype=torch.long)).float().numpy())
    return np.stack(rows)
