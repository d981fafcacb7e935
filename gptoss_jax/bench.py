"""`gptoss-jax bench`: generation speed side by side with Hugging Face transformers, against the roofline.

For each config, one random checkpoint is written (MXFP4 experts) and loaded by both engines, so they run the
same weights: ours keeps the experts packed, transformers dequantizes them to bf16 (it cannot run MXFP4 on CPU).
Measured: prefill tokens/s at two prompt lengths (batch 1) and decode tokens/s at two batch sizes (prompt 64,
greedy), best of `--repeats`, compile excluded; the machine's read bandwidth and the batch-1 decode roofline it
implies. Results: experiments/results/bench_generate.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "a": ("4 layers, hidden 512, 8/2 heads, 8 experts top-2, full vocab",
          dict(num_hidden_layers=4, hidden_size=512, intermediate_size=512, num_attention_heads=8,
               num_key_value_heads=2, num_experts=8, experts_per_token=2)),
    "b": ("gpt-oss-20b widths, 2 layers", dict(num_hidden_layers=2)),
}


def bandwidth_gbs() -> float:
    """Sustained read bandwidth: the best of a few sums over a 2 GiB array."""
    x = np.ones(2**28, np.float64)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.nbytes / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bytes_per_token(cfg) -> int:
    """Weight bytes a batch-1 decode step reads: every layer's attention and router (bf16), the routed experts'
    MXFP4 bytes (4.25 bits a weight) and the unembedding (bf16); the embedding row is negligible."""
    D, H, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn = (cfg.qkv_size * D + D * cfg.num_attention_heads * H) * 2
    router = cfg.num_experts * D * 2
    expert = 3 * F * D * 17 // 32
    return cfg.num_hidden_layers * (attn + router + cfg.experts_per_token * expert) + cfg.vocab_size * D * 2


def _ours(path, prompts, decode_batches, decode_prompt, new_tokens, repeats):
    import jax.numpy as jnp

    import gptoss_jax as gj

    model = gj.load_model(path, jnp.bfloat16, progress=False)
    out = {}
    for n, p in prompts.items():
        gj.generate(model, p, max_new_tokens=1, temperature=0)  # compile
        out[f"prefill_{n}"] = n / min(_timed(lambda: gj.generate(model, p, max_new_tokens=1, temperature=0))
                                      for _ in range(repeats))
    for b in decode_batches:
        batch = [decode_prompt] * b
        best = 0.0
        for _ in range(repeats + 1):  # the first run compiles
            stamps = []
            gj.generate(model, batch, max_new_tokens=new_tokens, temperature=0,
                        on_token=lambda s: stamps.append(time.perf_counter()))
            best = max(best, b * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        out[f"decode_b{b}"] = best
    return out


def _transformers(path, prompts, decode_batches, decode_prompt, new_tokens, repeats):
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16, attn_implementation="eager", local_files_only=True,
        quantization_config=Mxfp4Config(dequantize=True)).eval()
    out = {}
    with torch.inference_mode():
        for n, p in prompts.items():
            ids = torch.as_tensor([p])
            model(ids)
            out[f"prefill_{n}"] = n / min(_timed(lambda: model(ids, use_cache=True)) for _ in range(repeats))
        for b in decode_batches:
            ids = torch.as_tensor([decode_prompt] * b)
            best = 0.0
            for _ in range(repeats + 1):
                res = model(ids, use_cache=True)
                past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(new_tokens - 1):
                    res = model(nxt, past_key_values=past, use_cache=True)
                    past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                best = max(best, b * (new_tokens - 1) / (time.perf_counter() - t))
            out[f"decode_b{b}"] = best
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gptoss-jax bench", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="a,b", help="which configs: a (small, full vocab), b (20b widths, "
                                                          "2 layers); default a,b")
    parser.add_argument("--prefill", default="512,2048", help="prompt lengths for prefill (default 512,2048)")
    parser.add_argument("--decode-batches", default="1,8", help="batch sizes for decode (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    parser.add_argument("--quick", action="store_true", help="a smoke run: config a, prefill 128, decode b1, "
                                                             "8 tokens, 1 repeat")
    parser.add_argument("--out", default="experiments/results", help="where to write bench_generate.*")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.prefill, args.decode_batches, args.new_tokens, args.repeats = "a", "128", "1", 8, 1
    import gptoss_jax as gj
    from gptoss_jax.checkpoint import write_random_checkpoint

    lengths = [int(x) for x in args.prefill.split(",")]
    batches = [int(x) for x in args.decode_batches.split(",")]
    rng = np.random.default_rng(0)
    prompts = {n: list(rng.integers(0, 200000, n)) for n in lengths}
    decode_prompt = list(rng.integers(0, 200000, 64))
    bw = bandwidth_gbs()
    rows = []
    for name in args.configs.split(","):
        title, fields = CONFIGS[name]
        cfg = dataclasses.replace(gj.ModelConfig.gpt_oss_20b(), **fields)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_random_checkpoint(cfg, Path(tmp) / name, "hf", seed=0, progress=False)
            ours = _ours(path, prompts, batches, decode_prompt, args.new_tokens, args.repeats)
            theirs = {} if args.no_transformers else _transformers(path, prompts, batches, decode_prompt,
                                                                   args.new_tokens, args.repeats)
        roofline = bw * 1e9 / bytes_per_token(cfg)
        for metric, value in ours.items():
            row = {"config": name, "title": title, "metric": metric, "gptoss_jax": value,
                   "transformers": theirs.get(metric), "ratio": value / theirs[metric] if metric in theirs else None}
            if metric == "decode_b1":
                row["roofline"] = roofline
                row["fraction_of_roofline"] = value / roofline
            rows.append(row)
            print(json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_generate_quick" if args.quick else "bench_generate"
    (out / f"{stem}.json").write_text(json.dumps({"bandwidth_gbs": bw, "rows": rows}, indent=2) + "\n")
    lines = [f"# Generation speed, tokens/s (read bandwidth {bw:.1f} GB/s)", "",
             "| config | metric | gptoss-jax | transformers | ratio | roofline | of roofline |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {r['config']}: {r['title']} | {r['metric']} | {fmt(r['gptoss_jax'])} | "
                     f"{fmt(r['transformers'])} | {fmt(r['ratio'], '{:.2f}x')} | {fmt(r.get('roofline'))} | "
                     f"{fmt(r.get('fraction_of_roofline'), '{:.0%}')} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, out / f"{stem}.png")
    return 0


def _plot(rows, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['config']}:{r['metric']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.1), 4))
    ax.bar(x - 0.2, [r["gptoss_jax"] for r in rows], 0.4, label="gptoss-jax")
    ax.bar(x + 0.2, [r["transformers"] or 0 for r in rows], 0.4, label="transformers (torch CPU)")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
