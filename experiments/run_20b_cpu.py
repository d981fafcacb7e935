"""The real-size gpt-oss-20b (random MXFP4 weights) on a CPU box: write, load packed, generate.

Writes the checkpoint in the original layout layer by layer (never whole in memory), loads it with the experts
kept as MXFP4, and generates tokens for a Harmony chat prompt. Reports peak resident memory (anonymous memory,
which is what the model costs, and the total including file pages the checkpoint's memory map touched), load
time, compile time and decode tokens/s against the batch-1 roofline. Opt-in: minutes and ~13 GB of disk.

usage: .venv/bin/python experiments/run_20b_cpu.py [--dir /tmp/gptoss-20b-random] [--new-tokens 32]
"""

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory(threading.Thread):
    """Samples /proc/self/status every 50 ms: peak RssAnon and VmRSS in bytes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "VmRSS": 0}
        self.stopped = threading.Event()

    def sample(self):
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def run(self):
        while not self.stopped.wait(0.05):
            self.sample()


def bandwidth_gbs() -> float:
    """Sustained read bandwidth: the best of a few sums over a 2 GiB array."""
    x = np.ones(2**28, np.float64)
    best = min(_timed(x.sum) for _ in range(4))
    return x.nbytes / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def bytes_per_token(cfg) -> int:
    """Weights a batch-1 decode step reads: attention and router of every layer, the 4 routed experts' MXFP4
    bytes, the unembedding (bf16); the embedding row is negligible."""
    D, H = cfg.hidden_size, cfg.head_dim
    attn = (cfg.qkv_size * D + D * cfg.num_attention_heads * H) * 2
    router = cfg.num_experts * D * 2
    expert = (2 * cfg.intermediate_size * D + D * cfg.intermediate_size) * 17 // 32  # 4.25 bits a weight
    return cfg.num_hidden_layers * (attn + router + cfg.experts_per_token * expert) + cfg.vocab_size * D * 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/gptoss-20b-random", help="where the random checkpoint lives")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--preset", default="20b", help="20b (default); tiny for a quick check of the script")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = parser.parse_args()

    import jax.numpy as jnp

    import gptoss_jax as gj
    from gptoss_jax.checkpoint import write_random_checkpoint

    cfg = gj.ModelConfig.preset(args.preset)
    result = {"preset": args.preset}
    path = Path(args.dir)
    if not (path / "config.json").exists():
        result["write_s"] = _timed(lambda: write_random_checkpoint(cfg, path, "original", seed=0))
    result["checkpoint_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))

    mem = PeakMemory()
    mem.start()
    t = time.perf_counter()
    model = gj.load_model(path, dtype=jnp.bfloat16)
    result["load_s"] = time.perf_counter() - t
    mem.sample()
    result["after_load"] = dict(mem.peak)

    prompt = gj.harmony.render_chat([{"role": "user", "content": "Explain mixture-of-experts in one paragraph."}],
                                    reasoning_effort="low")
    stamps = []
    for run in ("cold", "warm"):  # the cold run compiles prefill and decode; the warm run is steady state
        stamps = []
        t0 = time.perf_counter()
        gj.generate(model, prompt, max_new_tokens=args.new_tokens, temperature=0,
                    on_token=lambda step: stamps.append(time.perf_counter()))
        result[f"{run}_total_s"] = stamps[-1] - t0
        result[f"{run}_first_token_s"] = stamps[0] - t0
        result[f"{run}_decode_tok_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    result["compile_s"] = result["cold_total_s"] - result["warm_total_s"]
    result["prompt_tokens"] = len(prompt)
    result["new_tokens"] = len(stamps)
    mem.stopped.set()
    mem.sample()
    result["peak_rss_anon_gib"] = mem.peak["RssAnon"] / 2**30
    result["peak_rss_gib"] = mem.peak["VmRSS"] / 2**30
    result["bandwidth_gbs"] = bandwidth_gbs()
    result["bytes_per_token"] = bytes_per_token(cfg)
    result["roofline_tok_s"] = result["bandwidth_gbs"] * 1e9 / result["bytes_per_token"]
    result["fraction_of_roofline"] = result["warm_decode_tok_s"] / result["roofline_tok_s"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"run_{args.preset}_cpu"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [("checkpoint on disk", f"{result['checkpoint_bytes'] / 2**30:.2f} GiB"),
            ("load time", f"{result['load_s']:.1f} s"),
            ("peak resident memory, anonymous (the model's cost)", f"{result['peak_rss_anon_gib']:.2f} GiB"),
            ("peak resident memory, total (incl. mapped checkpoint pages)", f"{result['peak_rss_gib']:.2f} GiB"),
            ("prompt tokens", str(result["prompt_tokens"])),
            ("compile time (prefill + decode: cold run - warm run)", f"{result['compile_s']:.1f} s"),
            ("first token, warm (prefill)", f"{result['warm_first_token_s']:.2f} s"),
            ("decode, warm", f"{result['warm_decode_tok_s']:.2f} tok/s"),
            ("batch-1 roofline", f"{result['roofline_tok_s']:.2f} tok/s "
                                 f"({result['bytes_per_token'] / 1e9:.2f} GB/token at {result['bandwidth_gbs']:.1f} GB/s)"),
            ("fraction of roofline", f"{result['fraction_of_roofline']:.0%}")]
    if "write_s" in result:
        rows.insert(0, ("write random checkpoint", f"{result['write_s']:.0f} s"))
    table = [f"# gpt-oss-{args.preset} with random MXFP4 weights on this CPU", "", "| | |", "|---|---|"]
    table += [f"| {k} | {v} |" for k, v in rows]
    (out / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
