"""Measure parity with the references and the full-size footprints; write experiments/results/parity.{json,md}.

Needs the reference extra (`make parity` installs it). Usage: .venv/bin/python experiments/parity_report.py
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import gptoss_jax as gj  # noqa: E402
import references  # noqa: E402
from parity_util import argmax_agreement, relative_error  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--length", type=int, default=400)
    args = parser.parse_args()
    tokens = np.random.default_rng(args.seed).integers(0, references.SMALL_CONFIG["vocab_size"],
                                                       (args.batch, args.length))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in references.LAYOUTS:
            path = Path(tmp) / layout
            references.write_random_checkpoint(path, layout, seed=args.seed)
            ours = np.asarray(gj.load_model(path, jnp.float32, progress=False)(tokens))
            ours_bf16 = np.asarray(gj.load_model(path, jnp.bfloat16, progress=False)(tokens))
            hf_path = path if layout != "original" else Path(tmp) / "hf_mxfp4"
            if layout == "original":
                references.write_random_checkpoint(hf_path, "hf_mxfp4", seed=args.seed)
            refs = {"transformers": references.hf_logits(hf_path, tokens)}
            if layout == "original":
                refs["gpt_oss.torch"] = references.openai_logits(path, tokens)
            for name, ref in refs.items():
                rows.append({"layout": layout, "reference": name,
                             "max_abs_error": float(np.abs(ours - ref).max()),
                             "logit_scale": float(np.abs(ref).max()),
                             "relative_error": relative_error(ours, ref),
                             "bf16_argmax_agreement": argmax_agreement(ours_bf16, ref)})
    sizes = []
    for name, cfg in [("gpt-oss-20b", gj.ModelConfig.gpt_oss_20b()), ("gpt-oss-120b", gj.ModelConfig.gpt_oss_120b())]:
        m = nnx.eval_shape(lambda cfg=cfg: gj.init_model(cfg))
        sizes.append({"model": name, "parameters": gj.param_count(m), "bytes": gj.param_bytes(m),
                      "GiB": gj.param_bytes(m) / 2**30})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"tokens": list(tokens.shape), "config": references.SMALL_CONFIG, "seed": args.seed}
    (out / "parity.json").write_text(json.dumps({"setup": setup, "parity": rows, "sizes": sizes}, indent=2) + "\n")
    lines = [f"# Parity (float32, batch {args.batch} x {args.length} tokens, random {references.SMALL_CONFIG['num_hidden_layers']}"
             "-layer checkpoint)", "",
             "| layout | reference | max abs error | logit scale | error / scale | bf16 argmax agreement |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['reference']} | {r['max_abs_error']:.2e} | {r['logit_scale']:.2f} | "
              f"{r['relative_error']:.2e} | {r['bf16_argmax_agreement']:.3f} |" for r in rows]
    lines += ["", "# Full-size footprint (jax.eval_shape; bf16 non-expert weights, MXFP4 experts)", "",
              "| model | parameters | bytes | GiB |", "|---|---|---|---|"]
    lines += [f"| {s['model']} | {s['parameters']:,} | {s['bytes']:,} | {s['GiB']:.3f} |" for s in sizes]
    (out / "parity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
