"""Write the golden parity fixtures: small random gpt-oss checkpoints in all three layouts plus reference logits.

    python tests/make_golden.py [--out tests/fixtures/golden]

For each layout in ("original", "hf_mxfp4", "hf_bf16") it writes <out>/<layout>/ with the checkpoint and an
expected.npz holding
    tokens        int32 [2, 300]      random ids in [0, 256), the same for every layout
    logits_hf     float32 [2, 300, 256]  transformers GptOssForCausalLM, float32, eager
    logits_openai float32 [2, 300, 256]  gpt_oss.torch Transformer cast to float32 (original layout only)
    bf16_argmax   int32 [2, 300]      argmax of the transformers logits with the model in bfloat16
All three layouts hold the same model (same seed), so every file's logits describe one model. transformers
cannot read the original layout, so the original folder's logits_hf / bf16_argmax come from its hf_mxfp4
twin, after checking the two hold the same bytes. Fails if the two references differ by more than 1e-5.

Independent of gptoss_jax by design; needs the reference extra (torch, transformers, gpt_oss).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import references as R  # noqa: E402

BATCH, LENGTH = 2, 300  # 300 tokens: past two 128-token windows, so the sliding layers really slide
TOLERANCE = 1e-5


def _check_same_model(out: Path, config: dict) -> None:
    """The three folders must hold one model: hf_mxfp4 = original renamed, hf_bf16 = its exact dense decode."""
    original = R.read_checkpoint(out / "original")
    for layout, dense in (("hf_mxfp4", False), ("hf_bf16", True)):
        want = R.original_to_hf(original, config, dense=dense)
        got = R.read_checkpoint(out / layout)
        assert set(got) == set(want), layout
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), f"{layout}: {k}"


def _stats(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs": float(np.abs(a - b).max()), "max_logit": float(np.abs(b).max()), "std_logit": float(b.std())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "fixtures" / "golden",
        help="output folder (default: tests/fixtures/golden next to this script)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model (default 0)")
    parser.add_argument("--token-seed", type=int, default=1234, help="seed of the token ids (default 1234)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = R.SMALL_CONFIG
    out: Path = args.out
    tokens = np.random.default_rng(args.token_seed).integers(0, config["vocab_size"], (BATCH, LENGTH)).astype(np.int32)

    for layout in R.LAYOUTS:
        shutil.rmtree(out / layout, ignore_errors=True)  # no stale shards from an earlier run
        R.write_random_checkpoint(out / layout, layout, config, seed=args.seed)
    _check_same_model(out, config)

    hf_source = {"original": "hf_mxfp4", "hf_mxfp4": "hf_mxfp4", "hf_bf16": "hf_bf16"}
    logits_hf, argmax_bf16 = {}, {}
    for layout in ("hf_mxfp4", "hf_bf16"):
        logits_hf[layout] = R.hf_logits(out / layout, tokens, torch.float32)
        argmax_bf16[layout] = R.hf_logits(out / layout, tokens, torch.bfloat16).argmax(-1).astype(np.int32)
    logits_openai = R.openai_logits(out / "original", tokens)

    rows, ok = [], True
    for layout in R.LAYOUTS:
        hf = logits_hf[hf_source[layout]]
        s = _stats(hf, logits_openai)
        s["bf16_argmax_match"] = float(np.mean(argmax_bf16[hf_source[layout]] == hf.argmax(-1)))
        ok &= s["max_abs"] <= TOLERANCE
        rows.append((layout, s))
        arrays = {"tokens": tokens, "logits_hf": hf.astype(np.float32), "bf16_argmax": argmax_bf16[hf_source[layout]]}
        if layout == "original":
            arrays["logits_openai"] = logits_openai.astype(np.float32)
        np.savez_compressed(out / layout / "expected.npz", **arrays)
        print(
            f"{layout:9s} |HF - OpenAI| max {s['max_abs']:.3e}   logits max |x| {s['max_logit']:.3f} std {s['std_logit']:.3f}"
            f"   bf16 argmax = fp32 argmax on {100 * s['bf16_argmax_match']:.1f}% of positions"
        )
    cross = float(np.abs(logits_hf["hf_mxfp4"] - logits_hf["hf_bf16"]).max())
    print(f"HF hf_mxfp4 vs hf_bf16 max abs {cross:.3e}")

    _write_readme(out, args, rows, cross, torch)
    if not ok:
        print(f"FAIL: the references disagree by more than {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


def _write_readme(out: Path, args, rows, cross: float, torch) -> None:
    import transformers

    table = "\n".join(
        f"| {layout} | {s['max_abs']:.2e} | {s['max_logit']:.2f} | {s['std_logit']:.2f} | {100 * s['bf16_argmax_match']:.1f}% |"
        for layout, s in rows
    )
    text = f"""# Golden parity fixtures

Generated by `python tests/make_golden.py` (seed {args.seed}, token seed {args.token_seed}); do not edit by hand.
The generator and the references live in `tests/references.py` and do not use `gptoss_jax`.

One small random gpt-oss model (`references.SMALL_CONFIG`: 3 layers sliding/full/sliding, 4 experts top-2,
vocab 256, hidden 64, expert width 64, 8 query heads / 2 kv heads of 64, window 128, the real 20b YaRN and
SwiGLU constants), written three ways with numpy + safetensors following docs/spec.md:

- `original/`: gpt_oss config.json (16 keys) + `model.safetensors`, MXFP4 experts.
- `hf_mxfp4/`: Hub-style config.json (`quantization_config` mxfp4, `rope_scaling` yarn with `truncate: false`),
  the same bytes renamed, in two shards with `model.safetensors.index.json` (layer 1 straddles the shards).
- `hf_bf16/`: same config without `quantization_config`; experts dequantized (exactly) to dense bf16
  `gate_up_proj` (E, hidden, 2*I) / `down_proj` (E, I, hidden).

Random values: linear weights N(0, fan_in^-1/2), biases N(0, 0.05) (router bias N(0, 0.1)), sinks N(0, 1),
norm scales 1 + N(0, 0.1), embeddings N(0, 1); MXFP4 codes uniform random bytes, scales 2^-5 +- 1 octave.

Each `<layout>/expected.npz` holds `tokens` (int32 [{BATCH}, {LENGTH}]), `logits_hf` (float32 [{BATCH}, {LENGTH}, 256],
transformers {transformers.__version__} `GptOssForCausalLM` in float32 with eager attention and eager experts;
MXFP4 loaded with `Mxfp4Config(dequantize=True)`), `bf16_argmax` (argmax of the same model run in bfloat16)
and, for `original/`, `logits_openai` (OpenAI `gpt_oss.torch` Transformer, loaded in bf16 and cast to float32,
one sequence at a time). transformers cannot read the original layout, so `original/` takes `logits_hf` and
`bf16_argmax` from the byte-identical `hf_mxfp4` twin. torch {torch.__version__}, CPU.

Agreement of the references (|HF - OpenAI| over all {BATCH}x{LENGTH}x256 logits; the generator fails above 1e-5):

| layout | max abs diff | max abs logit | logit std | bf16 argmax = fp32 argmax |
|---|---|---|---|---|
{table}

The rows coincide because the three folders hold one model; transformers on `hf_mxfp4` vs on `hf_bf16`:
max abs diff {cross:.1e} (exact dequantization). With a 256-token vocabulary near-ties are common, so a bf16
run matches the float32 argmax on only part of the positions (last column): set argmax thresholds with that in mind.
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
