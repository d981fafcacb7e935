"""`gptoss-jax finetune`: the command line of `gptoss_jax.train.trainer.finetune`."""

from __future__ import annotations

import dataclasses

from gptoss_jax.config import REMAT_MODES
from gptoss_jax.distributed import add_distributed_args
from gptoss_jax.train.config import FinetuneConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="full-parameter fine-tuning on Harmony chat data (JSONL)",
        description="Fine-tune every parameter of a checkpoint on JSONL chat data ({\"messages\": [...]} per line, "
                    "optionally reasoning_effort and tools), with the loss on the assistant's tokens only. MXFP4 "
                    "experts are decoded to trainable weights. AdamW (float32 moments) with warmup and cosine "
                    "decay, global-norm clipping, gradient accumulation. Checkpoints (orbax) go to OUT/checkpoints; "
                    "running the same command again resumes from the newest complete one. Metrics go to "
                    "OUT/metrics.jsonl. Export with `gptoss-jax convert --checkpoint OUT`.")
    d = _DEFAULTS
    p.add_argument("--checkpoint", required=True, help="the model to start from (either layout)")
    p.add_argument("--data", required=True, help="training conversations, JSONL")
    p.add_argument("--out", required=True, help="run folder (created; an existing run with the same settings resumes)")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"optimizer steps (default: {d['steps']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"packed rows per micro-batch (default: {d['batch_size']})")
    p.add_argument("--seq-len", type=int, default=d["seq_len"],
                   help=f"tokens per packed row; longer examples are truncated (default: {d['seq_len']})")
    p.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate (default: {d['lr']})")
    p.add_argument("--warmup", type=int, default=d["warmup"], help=f"linear warmup steps (default: {d['warmup']})")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                   help="AdamW weight decay on the matrices; none on norms, biases, sinks (default: 0)")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"],
                   help="micro-batches per optimizer step (default: 1)")
    p.add_argument("--save-every", type=int, default=d["save_every"],
                   help=f"checkpoint every N steps, and at the end (default: {d['save_every']})")
    p.add_argument("--keep", type=int, default=d["keep"], help=f"checkpoints kept (default: {d['keep']})")
    p.add_argument("--eval-data", default=None, help="held-out conversations, JSONL (optional)")
    p.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help=f"evaluate every N steps, and at the end (default: {d['eval_every']})")
    p.add_argument("--seed", type=int, default=d["seed"], help="data order (default: 0)")
    p.add_argument("--remat", choices=REMAT_MODES, default=d["remat"],
                   help=f"per-layer rematerialization policy (default: {d['remat']})")
    p.add_argument("--clip-norm", type=float, default=d["clip_norm"], help="global gradient-norm clip (default: 1)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=d["dtype"],
                   help="parameter and compute dtype (default: bfloat16)")
    p.add_argument("--compact-vocab", action="store_true",
                   help="for a model whose unembedding rows of every token the data never shows are equal (one "
                        "initialized for it, e.g. the demo model's): train over the data's tokens plus one row "
                        "standing for all others, exactly the full-vocabulary losses and gradients at a fraction "
                        "of the cost; the export writes the full vocabulary back")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs (needs tensorboardX)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_args(p, mesh=True,
                         mesh_help="the optimizer state alike, each batch's rows split over data x fsdp (in a "
                                   "multi-process job each process reads its share of the rows; the run folder "
                                   "must be one folder all see, e.g. NFS or GCS, for the checkpoints). A run "
                                   "may resume on another mesh")
    p.set_defaults(func=run)


def run(args) -> None:
    from gptoss_jax.distributed import mesh_from_args

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    mesh = mesh_from_args(args)  # a bad --mesh fails before the run folder is touched
    from gptoss_jax.train.trainer import finetune

    cfg = FinetuneConfig(**values, progress=not args.no_progress)
    metrics = finetune(cfg, mesh=mesh)
    print(f"done: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.4f}; run folder {cfg.out}")
