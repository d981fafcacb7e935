"""`gptoss-jax serve` and `gptoss-jax batch` (registered by gptoss_jax.cli.build_parser via `add_parsers`).

Both take --mesh and the multi-host flags: the model is loaded onto the mesh and the engine's KV cache sharded
over it. In a multi-process job process 0 serves HTTP (or reads --input and writes --output) and runs the
engine's loop; the other processes follow its device operations (`Engine.follow`)."""

from __future__ import annotations

import os
from pathlib import Path

from gptoss_jax.distributed import add_distributed_args

DTYPES = ("bfloat16", "float32")


def _engine_args(p) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (either layout)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots shared by all requests (default: 8)")
    p.add_argument("--max-seq-len", type=int, default=4096,
                   help="tokens per slot: prompt + max_tokens of one request (default: 4096)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="longest prefill chunk: prompts are prefilled in chunks of a power of two up to it "
                        "(default: 512)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the checkpoint folder's name)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="parameter and activation dtype")
    add_distributed_args(p, mesh=True, mesh_help="the KV cache over the same mesh (slots over data x fsdp, kv "
                                                 "heads over tensor); in a multi-process job process 0 runs the "
                                                 "engine and the others follow its steps")


def _engine(args, max_queue: int):
    import jax
    import jax.numpy as jnp

    from gptoss_jax.checkpoint import load_model
    from gptoss_jax.distributed import mesh_from_args
    from gptoss_jax.distributed import Channel
    from gptoss_jax.engine import Engine

    name = args.model_name or Path(args.checkpoint).resolve().name
    model = load_model(args.checkpoint, dtype=jnp.dtype(args.dtype), mesh=mesh_from_args(args))
    return Engine(model, max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=max_queue,
                  prefill_chunk=args.prefill_chunk, model_name=name,
                  channel=Channel("engine") if jax.process_count() > 1 else None)  # process 0 leads


def cmd_serve(args) -> None:
    import uvicorn

    from gptoss_jax.server.api import create_app

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    api_key = args.api_key or os.environ.get("GPTOSS_API_KEY") or None
    engine = _engine(args, args.max_queue)
    if not engine.leads:  # processes 1.. of a multi-process job: process 0 serves
        engine.follow()
        return
    engine.start()
    try:  # stopping the engine also releases the followers of a multi-process job
        app = create_app(engine, api_key=api_key, max_body_bytes=args.max_body_bytes)
        print(f"serving {engine.model_name} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots x "
              f"{args.max_seq_len} tokens; API key {'required' if api_key else 'off'})")
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()


def cmd_batch(args) -> None:
    from gptoss_jax.distributed import share
    from gptoss_jax.server.batch import run_batch

    def check_input():  # process 0 reads --input (and writes --output)
        if not Path(args.input).is_file():
            raise FileNotFoundError(f"--input {args.input}: no such file")

    share(check_input)
    engine = _engine(args, max_queue=1 << 30)
    if not engine.leads:
        engine.follow()
        return
    with engine:
        counts = run_batch(engine, args.input, args.output, progress=not args.no_progress)
    print(f"batch: {counts['done']} done, {counts['errors']} errors, {counts['skipped']} already in "
          f"{args.output} (skipped)")


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve /v1/chat/completions, /v1/responses, /v1/models and /health on an "
                                   "ASGI server (uvicorn). Requests share one continuous-batching engine. "
                                   "See docs/server.md.")
    _engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (or set GPTOSS_API_KEY)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; beyond it: 503 with Retry-After (default: 64)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get a 400")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", help="offline batch inference over a JSONL file of chat requests",
                       description="Run {\"recordId\", \"modelInput\": <chat completions request>} lines; write "
                                   "{\"recordId\", \"modelOutput\": <chat completion>} or {\"recordId\", "
                                   "\"error\"} lines. Resumes: records already in --output are skipped.")
    _engine_args(p)
    p.add_argument("--input", required=True, help="JSONL file of records")
    p.add_argument("--output", required=True, help="JSONL file to append results to")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)
