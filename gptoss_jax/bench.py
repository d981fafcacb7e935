"""`gptoss-jax bench`: generation speed side by side with Hugging Face transformers, against the roofline.

For each config, one random checkpoint is written (MXFP4 experts) and loaded by both engines, so they run the
same weights: ours keeps the experts packed, transformers dequantizes them to bf16 (`Mxfp4Config(dequantize=True)`;
it cannot run MXFP4 on CPU). Measured, compile and warm-up excluded, best of `--repeats`:
- prefill tokens/s, batch 1, at each `--prefill` length: ours is `gj.generate(..., max_new_tokens=1)` (prefill and
  the first token), transformers one forward with `logits_to_keep=1` (what its `generate` does);
- decode tokens/s at each `--decode-batches` size after a 64-token prompt, greedy: ours is the time between the
  first and the last of `--new-tokens` streamed tokens of `gj.generate`, transformers a loop of cached forwards
  with argmax;
- the machine's sustained read bandwidth, and the decode roofline it implies: weight bytes a step reads
  (unembedding, every layer's attention and router, the routed experts' MXFP4 bytes) / bandwidth.
Results: experiments/results/bench_generate.{json,md,png} (bench_generate_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    "a": ("4 layers, hidden 512, 8/2 heads, 8 experts top-2, full vocab",
          dict(num_hidden_layers=4, hidden_size=512, intermediate_size=512, num_attention_heads=8,
               num_key_value_heads=2, num_experts=8, experts_per_token=2)),
    "b": ("gpt-oss-20b widths, 2 layers", dict(num_hidden_layers=2)),
    # --quick: the full architecture at toy widths, full vocabulary
    "tiny": ("tiny widths (hidden 64), 2 layers, full vocab", dict(
        num_hidden_layers=2, num_experts=4, experts_per_token=2, hidden_size=64, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2)),
}
# What the inference-engine issue asks for (ratio to transformers); prefill: at least on par.
TARGETS = {("a", "decode_b1"): 2.0, ("b", "decode_b1"): 1.6, ("a", "decode_b8"): 1.5, ("b", "decode_b8"): 1.5}
DECODE_PROMPT = 64


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bandwidth() -> dict:
    """Sustained read bandwidth in GB/s: the best of a few full reads of a 1 GiB array, by numpy (one core) and
    by XLA (a reduction over both cores); the roofline takes the larger."""
    import jax
    import jax.numpy as jnp

    x = np.ones(2**28, np.float32)
    x.sum()
    numpy_gbs = x.nbytes / min(_timed(x.sum) for _ in range(5)) / 1e9
    xj = jnp.asarray(x)
    total = jax.jit(jnp.sum)
    total(xj).block_until_ready()
    xla_gbs = xj.nbytes / min(_timed(lambda: total(xj).block_until_ready()) for _ in range(5)) / 1e9
    del xj
    return {"numpy_1core": numpy_gbs, "xla": xla_gbs, "roofline": max(numpy_gbs, xla_gbs)}


def bytes_per_step(cfg, batch: int = 1) -> float:
    """Weight bytes one decode step reads: the unembedding and every layer's attention and router (bf16), and
    the routed experts' MXFP4 bytes (4.25 bits a weight; for batch > 1 the expected number of distinct experts
    among batch x top-k draws); the embedding rows and the KV cache are negligible at these lengths."""
    D, F, E, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.experts_per_token
    attn = (cfg.qkv_size * D + D * cfg.num_attention_heads * cfg.head_dim) * 2
    router = E * D * 2
    expert = 3 * F * D * 17 / 32
    experts = E * (1 - (1 - k / E) ** batch)  # = k for batch 1
    return cfg.num_hidden_layers * (attn + router + experts * expert) + cfg.vocab_size * D * 2


def _ours(path, prompts, batches, decode_prompts, new_tokens, repeats) -> dict:
    import jax.numpy as jnp

    import gptoss_jax as gj

    model = gj.load_model(path, jnp.bfloat16, progress=False)
    out = {}
    for n, p in prompts.items():
        gj.generate(model, p, max_new_tokens=1, temperature=0)  # compile
        out[f"prefill_{n}"] = [n / _timed(lambda: gj.generate(model, p, max_new_tokens=1, temperature=0))
                               for _ in range(repeats)]
    for b in batches:
        batch = decode_prompts[:b]
        runs = []
        for i in range(repeats + 1):  # the first run compiles
            stamps = []
            gj.generate(model, batch, max_new_tokens=new_tokens, temperature=0,
                        on_token=lambda s: stamps.append(time.perf_counter()))
            if i:
                runs.append(b * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
        out[f"decode_b{b}"] = runs
    return out


def _transformers(path, prompts, batches, decode_prompts, new_tokens, repeats) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    # The settings of tests/references.py (bf16 here): eager attention, MXFP4 dequantized on load, local files.
    model = GptOssForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16, attn_implementation="eager", local_files_only=True, use_kernels=False,
        device_map=None, quantization_config=Mxfp4Config(dequantize=True)).eval()
    out = {}
    with torch.inference_mode():
        for n, p in prompts.items():
            ids = torch.as_tensor([p])
            model(ids, use_cache=True, logits_to_keep=1)  # warm-up
            out[f"prefill_{n}"] = [n / _timed(lambda: model(ids, use_cache=True, logits_to_keep=1))
                                   for _ in range(repeats)]
        for b in batches:
            ids = torch.as_tensor(decode_prompts[:b])
            runs = []
            for i in range(repeats + 1):  # the first run warms up
                res = model(ids, use_cache=True, logits_to_keep=1)
                past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(new_tokens - 1):
                    res = model(nxt, past_key_values=past, use_cache=True)
                    past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
                if i:
                    runs.append(b * (new_tokens - 1) / (time.perf_counter() - t))
            out[f"decode_b{b}"] = runs
    return out


def _in_subprocess(fn: str, *args):
    """Run `fn(*args)` of this module in a fresh Python process and return its JSON result: torch then runs
    alone, not beside XLA's thread pools (in one process their threads contend and transformers measured 10x
    slower)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "args.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"fn": fn, "args": args}))
        subprocess.run([sys.executable, "-m", "gptoss_jax.bench", "--worker", str(spec), str(result)], check=True)
        return json.loads(result.read_text())


def _environment() -> dict:
    import jax

    env = {"python": platform.python_version(), "jax": jax.__version__, "machine": platform.machine(),
           "cpu": _cpu_name(), "cores": os.cpu_count(), "load_average": os.getloadavg()}
    try:
        import psutil

        env["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for name in ("torch", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            pass
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _checkpoint(cfg, name: str, workdir: Path | None, tmp: str) -> Path:
    """The config's random checkpoint (HF layout, MXFP4 experts, seed 0); kept in `workdir` between runs."""
    from gptoss_jax.checkpoint import write_random_checkpoint

    digest = hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:10]
    folder = (workdir or Path(tmp)) / f"{name}-{digest}"
    if not (folder / "config.json").exists():
        write_random_checkpoint(cfg, folder, "hf", seed=0, progress=False)
    return folder


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # internal: see _in_subprocess
        job = json.loads(Path(argv[1]).read_text())
        prompts = {int(n): p for n, p in job["args"][1].items()}
        result = globals()[job["fn"]](job["args"][0], prompts, *job["args"][2:])
        Path(argv[2]).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(prog="gptoss-jax bench", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="a,b", help="which configs: a (small, full vocab), b (20b widths, "
                                                          "2 layers), tiny; default a,b")
    parser.add_argument("--prefill", default="512,2048", help="prompt lengths for prefill (default 512,2048)")
    parser.add_argument("--decode-batches", default="1,8", help="batch sizes for decode (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode run (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    parser.add_argument("--quick", action="store_true", help="a smoke run (< 1 minute): config tiny, prefill 128, "
                                                             "decode batch 1, 8 tokens, 1 repeat")
    parser.add_argument("--workdir", default=None, help="keep the random checkpoints here between runs "
                                                        "(default: a temporary folder)")
    parser.add_argument("--out", default="experiments/results", help="where to write bench_generate.*")
    args = parser.parse_args(argv)
    needed = ["matplotlib"] + ([] if args.no_transformers else ["torch", "transformers"])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:  # say so before minutes of measuring, not at the plot
        print(f"error: gptoss-jax bench needs {', '.join(missing)}: pip install 'gptoss-jax[bench]'"
              + ("" if args.no_transformers else " (or pass --no-transformers)"), file=sys.stderr)
        return 2
    if args.quick:
        args.configs, args.prefill, args.decode_batches, args.new_tokens, args.repeats = "tiny", "128", "1", 8, 1
    import gptoss_jax as gj

    lengths = [int(x) for x in args.prefill.split(",")]
    batches = [int(x) for x in args.decode_batches.split(",")]
    rng = np.random.default_rng(0)
    prompts = {n: [int(t) for t in rng.integers(0, 200000, n)] for n in lengths}
    # A different prompt per row, so a batch routes to different experts, as real traffic does.
    decode_prompts = [[int(t) for t in rng.integers(0, 200000, DECODE_PROMPT)] for _ in range(max(batches))]
    env = _environment()
    bw = bandwidth()
    print(json.dumps({"environment": env, "bandwidth_gbs": bw}))
    rows = []
    workdir = Path(args.workdir) if args.workdir else None
    for name in args.configs.split(","):
        title, fields = CONFIGS[name]
        cfg = dataclasses.replace(gj.ModelConfig.gpt_oss_20b(), **fields)
        with tempfile.TemporaryDirectory() as tmp:
            path = _checkpoint(cfg, name, workdir, tmp)
            ours = _ours(path, prompts, batches, decode_prompts, args.new_tokens, args.repeats)
            theirs = {} if args.no_transformers else _in_subprocess(
                "_transformers", str(path), prompts, batches, decode_prompts, args.new_tokens, args.repeats)
        for metric, runs in ours.items():
            value, other = max(runs), max(theirs[metric]) if metric in theirs else None
            row = {"config": name, "title": title, "metric": metric, "gptoss_jax": value, "transformers": other,
                   "ratio": value / other if other else None, "target_ratio": TARGETS.get((name, metric)),
                   "runs": {"gptoss_jax": runs, "transformers": theirs.get(metric)}}
            if metric.startswith("decode_b"):
                b = int(metric.removeprefix("decode_b"))
                row["bytes_per_step"] = bytes_per_step(cfg, b)
                row["roofline"] = b * bw["roofline"] * 1e9 / row["bytes_per_step"]
                row["fraction_of_roofline"] = value / row["roofline"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "bench_generate_quick" if args.quick else "bench_generate"
    settings = {k: getattr(args, k) for k in ("configs", "prefill", "decode_batches", "new_tokens", "repeats")}
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "bandwidth_gbs": bw, "settings": settings,
                                                  "rows": rows}, indent=2) + "\n")
    table = _table(rows, bw, env)
    (out / f"{stem}.md").write_text(table)
    print(table)
    _plot(rows, out / f"{stem}.png")
    return 0


def _table(rows, bw, env) -> str:
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = ["# Generation speed, tokens/s", "",
             f"{env.get('cpu', '?')}, {env.get('cores')} cores; jax {env.get('jax')}, torch {env.get('torch', '-')}, "
             f"transformers {env.get('transformers', '-')}. Read bandwidth {bw['roofline']:.1f} GB/s (numpy, one core: "
             f"{bw['numpy_1core']:.1f}; XLA: {bw['xla']:.1f}); load average at start "
             f"{', '.join(f'{x:.1f}' for x in env['load_average'])}.", "",
             "| config | metric | gptoss-jax | transformers | ratio | target | roofline | of roofline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']}: {r['title']} | {r['metric']} | {fmt(r['gptoss_jax'])} | "
                     f"{fmt(r['transformers'])} | {fmt(r['ratio'], '{:.2f}x')} | "
                     f"{fmt(r['target_ratio'], '{:.1f}x')} | {fmt(r.get('roofline'))} | "
                     f"{fmt(r.get('fraction_of_roofline'), '{:.0%}')} |")
    lines += ["", "prefill: batch 1, tokens/s of the prompt; decode: batch x tokens/s after a "
              f"{DECODE_PROMPT}-token prompt (a different one per row), greedy. Best of the repeats (all runs in "
              "the .json). Roofline: weight bytes a decode step reads / read bandwidth (MXFP4 experts; transformers holds them in bf16, so its "
              "own roofline is lower)."]
    return "\n".join(lines) + "\n"


def _plot(rows, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 4.2), squeeze=False)
    for ax, name in zip(axes[0], configs):
        sub = [r for r in rows if r["config"] == name]
        x = np.arange(len(sub))
        ax.bar(x - 0.2, [r["gptoss_jax"] for r in sub], 0.4, label="gptoss-jax (XLA:CPU)")
        ax.bar(x + 0.2, [r["transformers"] or 0 for r in sub], 0.4, label="transformers (torch CPU, bf16)")
        for i, r in enumerate(sub):
            if r.get("roofline"):
                ax.hlines(r["roofline"], i - 0.4, i + 0.4, colors="k", linestyles="dashed",
                          label="roofline" if i == len(sub) - 1 else None)
            if r["ratio"]:
                ax.text(i, max(r["gptoss_jax"], r["transformers"] or 0) * 1.08, f"{r['ratio']:.2f}x",
                        ha="center", fontsize=8)
        ax.set_xticks(x, [r["metric"] for r in sub], rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{name}: {sub[0]['title']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
