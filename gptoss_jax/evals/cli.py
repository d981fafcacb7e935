"""`gptoss-jax eval perplexity` and `gptoss-jax eval tasks`.

Both take --mesh and the multi-host flags. In a multi-process job every process reads the data / task file and
runs the same batches; process 0 alone prints and writes (--json, --out and its summary), and the results
`eval tasks` resumes from are process 0's."""

from __future__ import annotations

import json
from pathlib import Path

from gptoss_jax.distributed import add_distributed_args

DTYPES = ("bfloat16", "float32")


def add_parser(sub) -> None:
    """Register `gptoss-jax eval {perplexity,tasks}` on the CLI's subparsers."""
    p = sub.add_parser("eval", help="perplexity on text, accuracy on JSONL question sets",
                       description="Evaluate a checkpoint: `eval perplexity` (strided sliding windows over text) or "
                                   "`eval tasks` (multiple-choice / exact-match questions through Harmony).")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")

    q = ev.add_parser("perplexity", help="perplexity of a checkpoint on a .txt or .jsonl file",
                      description="Perplexity on a text file (.txt: the whole file is one document) or JSONL (a "
                                  "\"text\" field per line), tokenized with o200k_harmony. Long documents are scored "
                                  "with strided windows: each token once, with at least WINDOW - STRIDE tokens of "
                                  "left context.")
    q.add_argument("--checkpoint", required=True, help="checkpoint folder (either layout)")
    q.add_argument("--data", required=True, help=".txt or .jsonl file")
    q.add_argument("--window", type=int, default=1024, help="tokens per forward window (default: 1024)")
    q.add_argument("--stride", type=int, default=512, help="window start step (default: 512)")
    q.add_argument("--batch-size", type=int, default=4, help="windows per forward batch (default: 4)")
    q.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="parameter and activation dtype")
    q.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON here")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_args(q, mesh=True, mesh_help="each batch of windows split over data x fsdp")
    q.set_defaults(func=cmd_perplexity)

    t = ev.add_parser("tasks", help="accuracy on JSONL multiple-choice / exact-match tasks (resumable)",
                      description="Each JSONL line: {\"id\", \"question\", \"choices\"?: [...], \"answer\"}. Prompts "
                                  "are one-turn Harmony chats; replies are generated in batches (greedy by default) "
                                  "and the final channel's answer is compared: a letter for multiple choice, the "
                                  "number or normalized text for exact match. Per-item results are appended to --out; "
                                  "running again skips ids already there. Prints accuracy with a 95% Wilson interval "
                                  "and writes it to OUT with .summary.json.")
    t.add_argument("--checkpoint", required=True, help="checkpoint folder (either layout)")
    t.add_argument("--tasks", required=True, help="tasks, JSONL")
    t.add_argument("--out", required=True, help="per-item results, JSONL (appended; resumes)")
    t.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="low")
    t.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default: 256)")
    t.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: 8)")
    t.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    t.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="parameter and activation dtype")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_args(t, mesh=True, mesh_help="the KV cache over the same mesh")
    t.set_defaults(func=cmd_tasks)


def _load(args):
    import jax.numpy as jnp

    from gptoss_jax.checkpoint import load_model
    from gptoss_jax.distributed import mesh_from_args

    return load_model(args.checkpoint, dtype=jnp.dtype(args.dtype), mesh=mesh_from_args(args))


def cmd_perplexity(args) -> None:
    from gptoss_jax.distributed import is_main_process
    from gptoss_jax.evals.perplexity import perplexity

    if not Path(args.data).is_file():
        raise FileNotFoundError(f"no such data file: {args.data}")
    model = _load(args)
    r = perplexity(model, args.data, window=args.window, stride=args.stride, batch_size=args.batch_size,
                   progress=not args.no_progress and is_main_process())
    print(f"perplexity {r.perplexity:.4f} (mean NLL {r.nll:.4f} nats) over {r.tokens:,} tokens in "
          f"{r.documents} document(s); window {r.window}, stride {r.stride}, {r.windows} windows")
    if args.json and is_main_process():
        Path(args.json).write_text(json.dumps(dict(r.to_dict(), data=str(args.data),
                                                    checkpoint=str(args.checkpoint)), indent=2) + "\n")


def cmd_tasks(args) -> None:
    from gptoss_jax.distributed import is_main_process, share
    from gptoss_jax.evals.tasks import evaluate_tasks, load_tasks, read_results

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    items = load_tasks(args.tasks)[: args.limit]  # bad task files fail before the model loads
    prior = share(lambda: read_results(args.out))  # process 0's results file: what every process skips
    done = {r["id"] for r in prior}
    model = _load(args) if any(it["id"] not in done for it in items) else None  # all done: just summarize
    main = is_main_process()
    s = evaluate_tasks(model, args.tasks, args.out if main else None, prior=prior,
                       reasoning_effort=args.reasoning_effort, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, temperature=args.temperature, seed=args.seed, limit=args.limit,
                       progress=not args.no_progress and main)
    print(format_summary(s))
    if main:
        summary = {k: v for k, v in s.items() if k != "results"}
        summary.update(tasks=str(args.tasks), checkpoint=str(args.checkpoint), results_file=str(args.out))
        Path(str(args.out) + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def format_summary(s: dict) -> str:
    lo, hi = s["ci95"]
    line = (f"accuracy {s['accuracy']:.1%} ({s['correct']}/{s['n']}), 95% CI [{lo:.1%}, {hi:.1%}]; "
            f"{s['unanswered']} without an extractable answer")
    if s.get("resumed"):
        line += f"; {s['resumed']} read back from the results file"
    for kind, k in s.get("by_kind", {}).items():
        lo, hi = k["ci95"]
        line += f"\n  {kind}: {k['accuracy']:.1%} ({k['correct']}/{k['n']}), 95% CI [{lo:.1%}, {hi:.1%}]"
    return line
