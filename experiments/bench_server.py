"""Serving throughput and latency: requests/s, time to first token (TTFT) and tokens/s per stream at concurrency
1, 4 and 16, on bench config "a" (4 layers, hidden 512, 8 experts top-2, full vocabulary; random MXFP4 weights).

Three ways of running the same 16 chat requests (Harmony prompts of ~70 tokens, `--max-tokens` new tokens each,
temperature 1, one seed per request):
- engine: the continuous-batching engine called directly (threads submitting `GenRequest`s), no HTTP;
- server: the same engine behind `gptoss-jax serve`'s ASGI app on uvicorn, through the official `openai` client
  (AsyncOpenAI, streaming), so the difference to `engine` is the server's overhead;
- transformers: Hugging Face `generate` (sampling, bf16, MXFP4 dequantized on load), one request after the other
  (it has no continuous batching), in a separate process so torch does not share threads with XLA.
At concurrency c, c clients each send their share of the requests one after the other. Compilation is excluded
(one warm-up round per concurrency level). Writes experiments/results/bench_server.{json,md}.

usage: nice -n 19 .venv/bin/python experiments/bench_server.py [--max-tokens 32] [--requests 16] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = ["the sea", "volcanoes", "bread", "jazz", "prime numbers", "owls", "rain", "chess", "tea", "bridges",
          "comets", "maple trees", "deserts", "clocks", "coral", "lighthouses"]


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}]


def _summary(records: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in records]
    tps = [r["tokens_per_s"] for r in records if r["tokens_per_s"] is not None]
    return {"requests": len(records), "wall_s": wall, "requests_per_s": len(records) / wall,
            "ttft_mean_s": float(np.mean(ttft)), "ttft_p50_s": float(np.median(ttft)),
            "ttft_max_s": float(np.max(ttft)), "tokens_per_s_per_stream": float(np.mean(tps)),
            "tokens_per_s_total": sum(r["tokens"] for r in records) / wall}


def _record(start: float, stamps: list[float], tokens: int) -> dict:
    ttft = stamps[0] - start
    rate = (tokens - 1) / (stamps[-1] - stamps[0]) if tokens > 1 and stamps[-1] > stamps[0] else None
    return {"ttft": ttft, "tokens": tokens, "tokens_per_s": rate}


def bench_engine(engine, prompts, max_tokens: int, concurrency: int) -> dict:
    from gptoss_jax import harmony
    from gptoss_jax.engine import GenRequest, Sampling

    todo = list(range(len(prompts)))
    lock = threading.Lock()
    records: list[dict] = []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            stamps: list[float] = []
            start = time.perf_counter()
            req = GenRequest(prompts[i], max_tokens, Sampling(1.0, seed=i), stop_tokens=tuple(harmony.stop_tokens()),
                             on_token=lambda t: stamps.append(time.perf_counter()))
            engine.generate(req)
            with lock:
                records.append(_record(start, stamps, len(req.tokens)))

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return _summary(records, time.perf_counter() - t)


def bench_server(base_url: str, model: str, n: int, max_tokens: int, concurrency: int) -> dict:
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
        todo = list(range(n))
        records: list[dict] = []

        async def worker():
            while todo:
                i = todo.pop(0)
                start = time.perf_counter()
                stamps, tokens = [], 0
                stream = await client.chat.completions.create(
                    model=model, messages=_messages(i), max_tokens=max_tokens, temperature=1.0, seed=i,
                    stream=True, stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                    delta = chunk.choices[0].delta if chunk.choices else None
                    if delta is not None and (delta.content or getattr(delta, "reasoning_content", None)):
                        stamps.append(time.perf_counter())
                records.append(_record(start, stamps or [time.perf_counter()], tokens))

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await client.close()
        return _summary(records, time.perf_counter() - t)

    return asyncio.run(run())


def hf_worker(path: str, prompts: list[list[int]], max_tokens: int, out: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="eager", local_files_only=True, use_kernels=False,
        device_map=None, quantization_config=Mxfp4Config(dequantize=True)).eval()

    class Stamps:
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def one(i, p):
        s = Stamps()
        start = time.perf_counter()
        torch.manual_seed(i)
        with torch.inference_mode():
            model.generate(torch.as_tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                           do_sample=True, temperature=1.0, top_p=1.0, top_k=0, streamer=s)
        return _record(start, s.t[1:], len(s.t) - 1)  # the first put is the prompt

    one(0, prompts[0])  # warm-up
    t = time.perf_counter()
    records = [one(i, p) for i, p in enumerate(prompts)]
    Path(out).write_text(json.dumps(_summary(records, time.perf_counter() - t)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prefill-chunk", type=int, default=128)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--hf-worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hf_worker:
        path, prompts, max_tokens, out = args.hf_worker
        hf_worker(path, json.loads(Path(prompts).read_text()), int(max_tokens), out)
        return 0

    import dataclasses

    import jax
    import jax.numpy as jnp
    import uvicorn

    import gptoss_jax as gj
    from gptoss_jax import harmony
    from gptoss_jax.bench import CONFIGS, _environment
    from gptoss_jax.checkpoint import write_random_checkpoint
    from gptoss_jax.server.api import create_app
    from gptoss_jax.engine import Engine

    levels = [int(c) for c in args.concurrency.split(",")]
    cfg = dataclasses.replace(gj.ModelConfig.gpt_oss_20b(), **CONFIGS["a"][1])
    prompts = [harmony.render_chat(_messages(i)) for i in range(args.requests)]
    results: dict = {"config": "a: " + CONFIGS["a"][0], "requests": args.requests, "max_tokens": args.max_tokens,
                     "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
                     "environment": _environment(), "backend": jax.default_backend(),
                     "engine": {"max_batch": max(levels), "max_seq_len": 256, "prefill_chunk": args.prefill_chunk},
                     "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a"
        write_random_checkpoint(cfg, path, "hf", seed=0, progress=False)
        model = gj.load_model(path, jnp.bfloat16, progress=False)
        engine = Engine(model, max_batch=max(levels), max_seq_len=256, max_queue=1024,
                        prefill_chunk=args.prefill_chunk, model_name="a").start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
        th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        th.start()
        while not srv.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}/v1"
        for c in levels:
            print(f"concurrency {c}: warm-up", flush=True)
            for group in sorted({min(c, 1 << k) for k in range(c.bit_length())}):
                bench_engine(engine, prompts[:group], 2, group)  # compiles the prefill and decode shapes up to c
            for name, fn in (("engine", lambda: bench_engine(engine, prompts, args.max_tokens, c)),
                             ("server", lambda: bench_server(base, "a", args.requests, args.max_tokens, c))):
                r = fn()
                results["runs"][f"{name}_c{c}"] = r
                print(f"  {name}: {r['requests_per_s']:.2f} req/s, TTFT {r['ttft_mean_s'] * 1000:.0f} ms, "
                      f"{r['tokens_per_s_per_stream']:.1f} tok/s per stream", flush=True)
        srv.should_exit = True
        th.join(timeout=10)
        engine.stop()
        if not args.no_transformers:
            print("transformers (sequential)", flush=True)
            pfile, out = Path(tmp) / "prompts.json", Path(tmp) / "hf.json"
            pfile.write_text(json.dumps(prompts))
            subprocess.run([sys.executable, __file__, "--hf-worker", str(path), str(pfile), str(args.max_tokens),
                            str(out)], check=True)
            results["runs"]["transformers_c1"] = json.loads(out.read_text())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_server.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "bench_server.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


def _markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# Serving benchmark (experiments/bench_server.py)", "",
        f"Config {results['config']}; {results['requests']} chat requests of ~{results['prompt_tokens_mean']:.0f} "
        f"prompt tokens, {results['max_tokens']} new tokens each, temperature 1. Backend {results['backend']}, "
        f"{env.get('cpu')}, {env.get('cores')} cores, load average at start {env.get('load_average')}. "
        "The machine was shared with other jobs: the numbers are indicative.", "",
        f"Engine: {results['engine']['max_batch']} slots at every concurrency level, slots of "
        f"{results['engine']['max_seq_len']} tokens, prefill chunks up to {results['engine']['prefill_chunk']}. "
        "TTFT is from sending the request to its first token; tokens/s per stream is a stream's tokens after "
        "the first over the time between its first and last; requests/s and tokens/s total are over the "
        "wall time of the whole run.", "",
        "| run | concurrency | requests/s | TTFT mean (ms) | TTFT p50 (ms) | tokens/s per stream | tokens/s total |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results["runs"].items():
        name, c = key.rsplit("_c", 1)
        label = {"engine": "engine (direct)", "server": "server (HTTP, openai client)",
                 "transformers": "transformers generate (sequential)"}[name]
        lines.append(f"| {label} | {c} | {r['requests_per_s']:.2f} | {r['ttft_mean_s'] * 1000:.0f} | "
                     f"{r['ttft_p50_s'] * 1000:.0f} | {r['tokens_per_s_per_stream']:.1f} | "
                     f"{r['tokens_per_s_total']:.1f} |")
    lines += ["", "How to read it: the engine decodes only its busy slots, rounded up to a power of two, so a lone "
              "stream runs one row; at concurrency 16 the TTFT includes waiting for the whole group's prefill. "
              "Server vs engine is the HTTP + SSE + Harmony-parsing overhead. On a shared machine the load changes "
              f"during a run (load average at the end: {[round(x, 2) for x in os.getloadavg()]}): compare rows "
              "only within one quiet run."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
