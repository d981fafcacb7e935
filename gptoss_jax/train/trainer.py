"""`finetune`: full-parameter fine-tuning of a gpt-oss checkpoint on Harmony chat data.

A run lives in one folder: `run.json` (its configuration), `model_config.json`, `metrics.jsonl`, and
`checkpoints/<step>/` written by orbax's CheckpointManager (parameters, optimizer state, step and data position).
orbax writes each checkpoint under a temporary name and renames it only once complete, so a run killed at any
moment, even mid-save, resumes from the newest complete checkpoint; the resumed run repeats the same data in the
same order and computes the same numbers.

With a mesh (`finetune(cfg, mesh=...)`, `gptoss-jax finetune --mesh`) parameters and optimizer state are sharded
by the logical-axis table and each batch's rows are split over data x fsdp. In a multi-process job every process
reads its share of each batch's rows; process 0 alone checks and writes the run's files (run.json, the model
config, the compact vocabulary, metrics.jsonl, TensorBoard) while every process takes part in orbax's checkpoint
writes, into one folder they all see.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from gptoss_jax.checkpoint import load_model
from gptoss_jax.config import ModelConfig
from gptoss_jax.distributed import is_main_process, share
from gptoss_jax.model import Transformer, init_model
from gptoss_jax.sharding import logical_sharding, mesh_of
from gptoss_jax.train.config import RESUMABLE_FIELDS, RUN_FILE, FinetuneConfig, RunError
from gptoss_jax.train.data import RowStream, Rows, batches, pack, read_jsonl
from gptoss_jax.train.step import decay_mask, init_opt_state, make_eval_step, make_optimizer, make_train_step
from gptoss_jax.train.vocab import VOCAB_FILE, CompactVocab, compact

MODEL_CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.jsonl"


def trainable_model(checkpoint: str | Path, dtype, mesh=None) -> Transformer:
    """The checkpoint with every parameter trainable: MXFP4 experts decoded to `dtype` weights."""
    return load_model(checkpoint, dtype=dtype, mesh=mesh, experts="dense", progress=False)


class Run:
    """One run folder: its files, its checkpoints, and the checks that a resumed run matches it."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.dir = Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        share(self._check_config)  # process 0 checks and writes run.json; its verdict reaches every process
        self.manager = ocp.CheckpointManager(
            (self.dir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True),
            item_names=("state", "meta"))

    def _check_config(self) -> None:
        path = self.dir / RUN_FILE
        mine = dataclasses.asdict(self.cfg)
        if path.exists():
            theirs = json.loads(path.read_text())
            diff = sorted(k for k in set(mine) | set(theirs)
                          if k not in RESUMABLE_FIELDS and mine.get(k) != theirs.get(k))
            if diff:
                detail = "; ".join(f"{k}: run has {theirs.get(k)!r}, now {mine.get(k)!r}" for k in diff)
                raise RunError(f"{self.dir} holds a run with a different configuration ({detail}); "
                               "use a new --out or the same settings to resume it")
        elif (self.dir / "checkpoints").exists() or (self.dir / METRICS_FILE).exists():
            raise RunError(f"{self.dir} holds files of another run but no {RUN_FILE}; use an empty --out")
        path.write_text(json.dumps(mine, indent=2) + "\n")

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params,
                                                                                    "opt": opt_state}),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, params, opt_state) -> tuple[Any, Any, dict] | None:
        """The newest complete checkpoint (restored with the shardings of `params`/`opt_state`), or None."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt": opt_state})
        got = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return got.state["params"], got.state["opt"], got.meta

    def metrics_log(self, upto_step: int):
        """metrics.jsonl opened for appending, with lines past `upto_step` (from a killed run) removed (on
        process 0; the others write nowhere)."""
        if not is_main_process():
            return open(os.devnull, "w")  # noqa: SIM115
        path = self.dir / METRICS_FILE
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= upto_step]
            path.write_text("".join(line + "\n" for line in keep))
        return path.open("a")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _device_batch(rows: Rows, mesh=None) -> dict:
    """This process's rows [..., B_local, L] as arrays; with a mesh, one global array per field whose batch
    dimension is sharded as the table says (each process supplies its share of the rows)."""
    arrays = {f.name: getattr(rows, f.name) for f in dataclasses.fields(Rows)}
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    out = {}
    for k, v in arrays.items():
        shape = (*v.shape[:-2], v.shape[-2] * jax.process_count(), v.shape[-1])
        axes = (None,) * (v.ndim - 2) + ("batch", "sequence")
        out[k] = jax.make_array_from_process_local_data(logical_sharding(axes, shape, mesh), v, shape)
    return out


def evaluate(eval_step, params, rows: Rows, batch_size: int, mesh=None) -> float:
    """Mean loss over every trained token of `rows`, in batches (each process evaluates its share of each)."""
    total = count = 0.0
    share = batch_size // jax.process_count()
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        if len(part) < batch_size:  # keep one compiled shape: pad with weightless rows
            part = Rows.concat([part, Rows.zeros(batch_size - len(part), part.inputs.shape[1])])
        part = part[jax.process_index() * share : (jax.process_index() + 1) * share]
        s, n = eval_step(params, _device_batch(part, mesh))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def finetune(cfg: FinetuneConfig, *, model: Transformer | None = None, mesh=None) -> dict:
    """Run (or resume) fine-tuning as `cfg` says; returns the last step's metrics. `model` overrides loading
    `cfg.checkpoint` (notebooks); `mesh` shards parameters, optimizer state and batches."""
    run = Run(cfg)
    try:
        return _train(run, cfg, model, mesh)
    finally:
        run.close()


def _train(run: Run, cfg: FinetuneConfig, model: Transformer | None, mesh) -> dict:
    dtype = jnp.dtype(cfg.dtype)
    examples, stats = read_jsonl(cfg.data, cfg.seq_len)
    eval_rows = None
    eval_examples = read_jsonl(cfg.eval_data, cfg.seq_len)[0] if cfg.eval_data else []
    if model is None:
        model = trainable_model(cfg.checkpoint, dtype, mesh)
    tied_rows = 0
    if cfg.compact_vocab:
        vocab = CompactVocab.of([ex.tokens for ex in examples + eval_examples], model.config.vocab_size)

        def check_and_save():
            saved = CompactVocab.load(run.dir)
            if saved is not None and saved != vocab:
                raise RunError(f"{run.dir / VOCAB_FILE}: the run's vocabulary differs from the data's tokens now "
                               f"({len(saved.used)} vs {len(vocab.used)} tokens); the data files changed")
            vocab.save(run.dir)

        share(check_and_save)
        model = compact(model, vocab)
        examples, eval_examples = ([dataclasses.replace(ex, tokens=vocab.encode(ex.tokens)) for ex in exs]
                                   for exs in (examples, eval_examples))
        tied_rows = vocab.tied_rows
        print(f"compact vocabulary: {len(vocab.used)} tokens of {vocab.full_size} plus one tied row")
    if eval_examples:
        eval_rows = pack(eval_examples, cfg.seq_len)
    mesh = mesh or mesh_of(model)
    model_cfg: ModelConfig = model.config
    if is_main_process():
        (run.dir / MODEL_CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n")

    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(lr=cfg.lr, warmup=cfg.warmup, steps=cfg.steps, weight_decay=cfg.weight_decay,
                                  clip_norm=cfg.clip_norm, min_lr_ratio=cfg.min_lr_ratio, mask=decay_mask(params))
    opt_state = init_opt_state(tx, params)
    step, position, tokens_seen = 0, (0, 0), 0
    restored = run.restore(params, opt_state)
    if restored is not None:
        params, opt_state, meta = restored
        step, position, tokens_seen = meta["step"], tuple(meta["position"]), meta["tokens_seen"]
    if step >= cfg.steps:
        print(f"{run.dir}: already at step {step} of {cfg.steps}; nothing to do")
        return {"step": step}

    train_step = make_train_step(graphdef, tx, schedule, remat=cfg.remat, tied_rows=tied_rows)
    eval_step = make_eval_step(graphdef, tied_rows) if eval_rows is not None else None
    stream = RowStream(examples, cfg.seq_len, cfg.seed)
    data = batches(stream, cfg.batch_size, cfg.grad_accum, position, process_index=jax.process_index(),
                   process_count=jax.process_count())
    log = run.metrics_log(step)
    writer = _tensorboard(run.dir) if cfg.tensorboard else None
    print(f"fine-tuning {cfg.checkpoint}: {stats.summary()}; {len(stream.epoch_rows(0))} packed rows of "
          f"{cfg.seq_len} per epoch; {'resuming at step ' + str(step) if step else 'from step 0'}")
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", unit="step",
               disable=not (cfg.progress and is_main_process()))
    metrics: dict = {}
    try:
        while step < cfg.steps:
            rows, position = next(data)
            t0 = time.perf_counter()
            params, opt_state, out = train_step(params, opt_state, step, _device_batch(rows, mesh))
            out = {k: float(v) for k, v in jax.device_get(out).items()}
            dt = time.perf_counter() - t0
            if not math.isfinite(out["loss"]) or not math.isfinite(out["grad_norm"]):
                raise FloatingPointError(
                    f"step {step + 1}: loss {out['loss']}, grad norm {out['grad_norm']}: stopping; the newest good "
                    f"checkpoint is step {run.manager.latest_step()} in {run.dir / 'checkpoints'} (try a lower --lr)")
            step += 1
            tokens_seen += int(out["tokens"])
            metrics = {"step": step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
                       "tokens": int(out["tokens"]), "tokens_seen": tokens_seen,
                       "tokens_per_s": rows.inputs.size * jax.process_count() / dt, "epoch": position[0]}
            if eval_step is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics["eval_loss"] = evaluate(eval_step, params, eval_rows, cfg.batch_size, mesh)
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if writer is not None:
                for k, v in metrics.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps:
                run.save(step, params, opt_state, {"step": step, "position": list(position),
                                                   "tokens_seen": tokens_seen})
    finally:
        bar.close()
        log.close()
        if writer is not None:
            writer.close()
    return metrics


def _tensorboard(folder: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise RunError("--tensorboard needs the tensorboardX package (pip install tensorboardX)") from None
    return SummaryWriter(str(folder / "tensorboard")) if is_main_process() else None


def load_run(folder: str | Path, dtype=jnp.bfloat16) -> Transformer:
    """The newest complete checkpoint of a run folder as a model (dense experts), e.g. for export."""
    folder = Path(folder)
    if not (folder / RUN_FILE).exists() or not (folder / MODEL_CONFIG_FILE).exists():
        raise RunError(f"{folder} is not a fine-tuning run folder (no {RUN_FILE} / {MODEL_CONFIG_FILE})")
    model_cfg = ModelConfig(**json.loads((folder / MODEL_CONFIG_FILE).read_text()))
    run_dtype = jnp.dtype(json.loads((folder / RUN_FILE).read_text())["dtype"])
    abstract = nnx.eval_shape(lambda: init_model(model_cfg, dtype=run_dtype, experts="dense"))
    graphdef, params = nnx.split(abstract)
    tx, _ = make_optimizer(lr=1.0, warmup=0, steps=1, weight_decay=0.0, clip_norm=1.0, mask=decay_mask(params))
    abstract_state = {"params": params, "opt": jax.eval_shape(lambda p: init_opt_state(tx, p), params)}
    with ocp.CheckpointManager((folder / "checkpoints").absolute(), item_names=("state", "meta")) as manager:
        step = manager.latest_step()
        if step is None:
            raise RunError(f"{folder / 'checkpoints'} holds no complete checkpoint")
        got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          got.state["params"])
    return nnx.merge(graphdef, params)
