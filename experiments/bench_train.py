"""Full fine-tuning speed and memory on CPU: gptoss-jax's train step against transformers' GptOssForCausalLM with
torch AdamW, on the same packed Harmony rows, batch and length.

Each engine runs in its own process (their thread pools contend otherwise). Per engine: load the same random
checkpoint (MXFP4 experts decoded to bf16 trainable weights by both), one warm-up step (compilation), then
`--steps` timed optimizer steps. Reported: tokens/s (row tokens through forward + backward + update), peak resident
memory of the process (`ru_maxrss`) and its increase over the loaded model, that increase per parameter, and the
training state's bytes per parameter by construction:
- gptoss-jax: bf16 weights + float32 AdamW moments: 2 + 8 = 10 (+ 2 for the transient bf16 gradient);
- transformers bf16 + torch AdamW: bf16 weights and moments: 2 + 4 = 6 (+ 2 for the gradient; moments in bf16
  lose precision: that is what a plain bf16 model + `torch.optim.AdamW` does);
- transformers float32 + torch AdamW: 4 + 8 = 12 (+ 4 for the gradient).
transformers sees the packed rows as plain sequences (it has no segment isolation on CPU); the work per token is
the same. Results: experiments/results/bench_train.{json,md}.

usage: .venv/bin/python experiments/bench_train.py [--config a|tiny] [--batch 2] [--seq-len 256] [--steps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "ocean"]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _current_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def make_rows(batch: int, seq_len: int, steps: int, seed: int = 0):
    """(steps + 1) batches of packed rows from a synthetic Harmony chat task."""
    from gptoss_jax.train.data import RowStream, render_example

    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(400):
        a, b = (int(x) for x in rng.integers(100, 10**6, 2))
        examples.append(render_example({"messages": [
            {"role": "user", "content": f"What is {a} + {b}? Also say {rng.choice(WORDS)}."},
            {"role": "assistant", "reasoning_content": f"Adding {a} and {b} column by column gives {a + b}.",
             "content": f"{a + b}"}]}))
    stream = RowStream(examples, seq_len, seed)
    rows, _ = stream.take(batch * (steps + 1), (0, 0))
    return rows


def ours(path: str, batch: int, seq_len: int, steps: int, remat: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptoss_jax.train.step import decay_mask, init_opt_state, make_optimizer, make_train_step
    from gptoss_jax.train.trainer import trainable_model

    rows = make_rows(batch, seq_len, steps)
    base = _current_rss_gib()
    model = trainable_model(path, jnp.bfloat16)
    graphdef, params = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    loaded = _current_rss_gib()
    tx, schedule = make_optimizer(lr=1e-5, warmup=0, steps=100, weight_decay=0.0, clip_norm=1.0,
                                  mask=decay_mask(params))
    opt = init_opt_state(tx, params)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) + sum(
        x.nbytes for x in jax.tree.leaves(opt) if hasattr(x, "nbytes"))
    step = make_train_step(graphdef, tx, schedule, remat=remat)
    times, losses = [], []
    for i in range(steps + 1):
        part = rows[i * batch : (i + 1) * batch]
        b = {f.name: jnp.asarray(getattr(part, f.name))[None] for f in dataclasses.fields(part)}
        t = time.perf_counter()
        params, opt, m = step(params, opt, i, b)
        losses.append(float(m["loss"]))  # blocks
        times.append(time.perf_counter() - t)
    return {"tokens_per_s": batch * seq_len * steps / sum(times[1:]), "compile_and_first_step_s": times[0],
            "losses": losses, "n_params": n_params, "peak_rss_gib": _rss_gib(), "model_rss_gib": loaded - base, "base_rss_gib": base,
            "state_bytes_per_param": state_bytes / n_params}


def transformers_(path: str, batch: int, seq_len: int, steps: int, dtype: str) -> dict:
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    rows = make_rows(batch, seq_len, steps)
    base = _current_rss_gib()
    model = GptOssForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="eager", local_files_only=True, use_kernels=False,
        device_map=None, quantization_config=Mxfp4Config(dequantize=True))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    loaded = _current_rss_gib()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    times, losses = [], []
    for i in range(steps + 1):
        part = rows[i * batch : (i + 1) * batch]
        ids = torch.as_tensor(part.inputs, dtype=torch.long)
        # labels[t] is the target of position t - 1 in transformers' shifted loss; -100 = not trained
        labels = torch.full_like(ids, -100)
        targets = np.where(part.weights > 0, part.targets, -100)
        labels[:, 1:] = torch.as_tensor(targets[:, :-1], dtype=torch.long)
        t = time.perf_counter()
        out = model(input_ids=ids, labels=labels, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        times.append(time.perf_counter() - t)
    per = {"bfloat16": 2 + 4, "float32": 4 + 8}[dtype]
    return {"tokens_per_s": batch * seq_len * steps / sum(times[1:]), "compile_and_first_step_s": times[0],
            "losses": losses, "n_params": n_params, "peak_rss_gib": _rss_gib(), "model_rss_gib": loaded - base, "base_rss_gib": base,
            "state_bytes_per_param": per}


def _in_subprocess(fn: str, *args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        subprocess.run([sys.executable, __file__, "--worker", fn, json.dumps(args), str(result)], check=True)
        return json.loads(result.read_text())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        fn, args, out = argv[1], json.loads(argv[2]), argv[3]
        Path(out).write_text(json.dumps({"ours": ours, "transformers": transformers_}[fn](*args)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="a", help="a (4 layers, hidden 512, full vocab; default) or tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = p.parse_args(argv)

    import gptoss_jax as gj
    from gptoss_jax.bench import CONFIGS, _checkpoint, _environment

    title, fields = CONFIGS[args.config]
    cfg = dataclasses.replace(gj.ModelConfig.gpt_oss_20b(), **fields)
    env = _environment()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(_checkpoint(cfg, args.config, None, tmp))
        common = (path, args.batch, args.seq_len, args.steps)
        for name, fn, extra in (("gptoss-jax (remat full)", "ours", "full"), ("gptoss-jax (no remat)", "ours", "none"),
                                ("transformers bf16 + torch AdamW", "transformers", "bfloat16"),
                                ("transformers float32 + torch AdamW", "transformers", "float32")):
            runs[name] = _in_subprocess(fn, *common, extra)
            print(name, json.dumps(runs[name]))
    ref = runs["transformers bf16 + torch AdamW"]
    lines = [f"# Fine-tuning speed and memory (CPU, {env['cores']} cores)", "",
             f"Config {args.config} ({title}); batch {args.batch} x {args.seq_len} tokens; {args.steps} timed steps "
             f"after one warm-up; {runs['gptoss-jax (remat full)']['n_params']:,} parameters. "
             "`python experiments/bench_train.py`", "",
             "| engine | tokens/s | vs transformers bf16 | peak RSS GiB | peak RSS growth beyond the loaded model, "
             "bytes/param | weights + optimizer state, bytes/param | first step s |", "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        growth = (r["peak_rss_gib"] - r["base_rss_gib"] - r["model_rss_gib"]) * 2**30 / r["n_params"]
        r["peak_bytes_per_param"] = r["peak_rss_gib"] * 2**30 / r["n_params"]
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | "
                     f"{r['peak_rss_gib']:.2f} | {growth:.1f} | {r['state_bytes_per_param']:.1f} | "
                     f"{r['compile_and_first_step_s']:.1f} |")
    lines += ["", f"Environment: {json.dumps(env)}", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps({"environment": env, "settings": vars(args), "runs": runs},
                                                     indent=2) + "\n")
    (out / "bench_train.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
