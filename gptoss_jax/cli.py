"""`gptoss-jax`: the command line. Each subcommand has `--help`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from gptoss_jax import plan
from gptoss_jax.distributed import add_distributed_args
from gptoss_jax.train import cli as finetune_cli

DTYPES = ("bfloat16", "float32")


def _parse_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def cmd_init(args) -> None:
    import json

    import jax.numpy as jnp

    from flax import nnx

    from gptoss_jax.checkpoint import write_random_checkpoint
    from gptoss_jax.config import ConfigError, ModelConfig
    from gptoss_jax.model import init_model, param_count

    cfg = ModelConfig.preset(args.preset)
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    overrides = {}
    for key, value in args.set:
        if key not in fields:
            raise ConfigError(f"--set {key}: not a ModelConfig field; fields are {sorted(fields)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"--set {key}={value}: the value must be a number") from None
    cfg = dataclasses.replace(cfg, **overrides)
    path = write_random_checkpoint(cfg, args.out, args.format, seed=args.seed, overwrite=args.overwrite)
    count = param_count(nnx.eval_shape(lambda: init_model(cfg, dtype=jnp.bfloat16)))
    print(f"wrote a random {args.preset} checkpoint ({count:,} parameters, {args.format} layout) to {path}")


def cmd_convert(args) -> None:
    from pathlib import Path

    from gptoss_jax.checkpoint import convert_checkpoint, find_layout
    from gptoss_jax.train.config import RUN_FILE

    if (Path(args.checkpoint) / RUN_FILE).exists():  # a fine-tuning run: export its newest checkpoint
        from gptoss_jax.train.export import export_run

        path, errors = export_run(args.checkpoint, args.out, args.format, experts=args.experts,
                                  overwrite=args.overwrite)
        detail = ", ".join(f"{k} {v:.2%}" for k, v in errors.items())
        print(f"exported the fine-tuning run {args.checkpoint} to the {args.format} layout ({args.experts} experts) "
              f"in {path}" + (f"; MXFP4 re-encoding error (relative RMS): {detail}" if errors else ""))
        return
    src = find_layout(args.checkpoint)
    path = convert_checkpoint(args.checkpoint, args.out, args.format, experts=args.experts, overwrite=args.overwrite)
    print(f"converted {src.folder} ({src.format} layout, {src.experts} experts) to the {args.format} layout "
          f"({args.experts} experts) in {path}")


def cmd_next_token(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gptoss_jax.checkpoint import load_model
    from gptoss_jax.distributed import mesh_from_args, to_host
    from gptoss_jax.tokenizer import harmony_encoding

    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    enc = harmony_encoding()
    tokens = enc.encode(args.prompt, allowed_special=set())
    if not tokens:
        raise ValueError("--prompt is empty")
    model = load_model(args.checkpoint, dtype=jnp.dtype(args.dtype), mesh=mesh_from_args(args))
    logits = model(np.asarray([tokens]))[0, -1]
    probs = to_host(jax.nn.softmax(logits))
    top = np.argsort(-probs)[: args.top_k]
    print(f"prompt: {args.prompt!r} ({len(tokens)} tokens)")
    print(f"{'rank':>4}  {'token id':>8}  {'probability':>11}  text")
    for rank, t in enumerate(top, 1):
        print(f"{rank:>4}  {int(t):>8}  {float(probs[t]):>11.4f}  {enc.decode([int(t)])!r}")


def _load(args):
    import jax.numpy as jnp

    from gptoss_jax.checkpoint import load_model
    from gptoss_jax.distributed import mesh_from_args

    path = args.checkpoint
    if path is None:  # generate and chat: the committed demo model
        from gptoss_jax.demo import DEMO_CHECKPOINT

        if not (DEMO_CHECKPOINT / "config.json").is_file():
            raise FileNotFoundError(f"no --checkpoint given and the demo model is not at {DEMO_CHECKPOINT} (it ships "
                                    "with a git checkout; `make demo-model` rebuilds it); pass --checkpoint DIR")
        print(f"(no --checkpoint: the demo model {DEMO_CHECKPOINT.name}, trained only to add integers; try "
              "\"What is 48 + 79?\")", file=sys.stderr)
        path = DEMO_CHECKPOINT
    return load_model(path, dtype=jnp.dtype(args.dtype), mesh=mesh_from_args(args))


def _sampling_kwargs(args) -> dict:
    from gptoss_jax.engine import Sampling

    Sampling(args.temperature, args.top_p, args.top_k, args.seed)  # validates, naming the bad value
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed}


class _Printer:
    """Streams Harmony deltas: reasoning set apart (dimmed on a terminal), the answer plain."""

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.color = self.out.isatty()
        self.field = None

    def __call__(self, deltas) -> None:
        for d in deltas:
            if d.field != self.field:
                self._switch(d.field, d)
            self.out.write(self._style(d.text))
        self.out.flush()

    def _switch(self, field, d) -> None:
        if self.field is not None:
            self.out.write("\n")
        titles = {"reasoning_content": "[reasoning]", "tool_calls": f"[tool call {d.recipient or ''}]",
                  "content": "[answer]"}
        self.out.write(self._style(titles.get(field, f"[{field}]"), bold=True) + "\n")
        self.field = field

    def _style(self, text: str, bold: bool = False) -> str:
        if not self.color or not text:
            return text
        code = "1" if bold else ("2" if self.field == "reasoning_content" else "0")
        return f"\033[{code}m{text}\033[0m"

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _stream_chat(model, messages, args, printer) -> dict:
    from gptoss_jax import harmony
    from gptoss_jax.generate import generate

    prompt = harmony.render_chat(messages, reasoning_effort=args.reasoning_effort)
    parser = harmony.StreamParser()
    generate(model, prompt, stop_tokens=harmony.stop_tokens(), **_sampling_kwargs(args),
             on_token=lambda step: printer(parser.feed(step[0])) if step[0] is not None else None)
    printer(parser.close())
    printer.end()
    return parser.finish()


def cmd_generate(args) -> None:
    from gptoss_jax import harmony
    from gptoss_jax.generate import generate

    if not args.prompt:
        raise ValueError("--prompt is empty")
    _sampling_kwargs(args)
    model = _load(args)
    if not args.raw:
        _stream_chat(model, [{"role": "user", "content": args.prompt}], args, _Printer())
        return
    tokens, shown = [], ""

    def show(step):
        nonlocal shown
        if step[0] is None:
            return
        tokens.append(step[0])
        text = harmony.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    sys.stdout.write(args.prompt)
    generate(model, harmony.encode(args.prompt), **_sampling_kwargs(args), on_token=show)
    sys.stdout.write(harmony.decode(tokens)[len(shown):] + "\n")


def _read_line() -> str | None:
    try:
        return input("> ").strip()
    except EOFError:
        return None


def cmd_chat(args) -> None:
    from gptoss_jax.distributed import share

    _sampling_kwargs(args)
    model = _load(args)
    printer = _Printer()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("gptoss-jax chat: type a message; /reset starts over, /exit or Ctrl-D quits.")
    while True:
        line = share(_read_line)  # process 0 reads the terminal; every process generates the reply
        if line is None:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = messages[:1] if args.system else []
            print("(conversation cleared)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream_chat(model, messages, args, printer)
        printer.field = None
        # Harmony drops this turn's reasoning from later prompts; keeping it here is harmless.
        messages.append({"role": "assistant", "content": reply["content"] or "",
                         "reasoning_content": reply["reasoning_content"]})


def _add_sampling(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default: 256)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="0 = greedy; the model card recommends 1.0 (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same tokens (default: 0)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="parameter and activation dtype")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-jax", description="gpt-oss-20b / gpt-oss-120b in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="write a random-weight checkpoint of a preset",
                       description="Write a checkpoint with random weights at a realistic scale (MXFP4 experts), "
                                   "layer by layer, so even the 120b needs only one layer in memory.")
    p.add_argument("--preset", default="tiny", help="tiny, 20b or 120b (default: tiny)")
    p.add_argument("--out", required=True, help="folder to write (created; must be empty unless --overwrite)")
    p.add_argument("--format", choices=("original", "hf"), default="original",
                   help="original (gpt_oss.torch) or hf (transformers) layout (default: original)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", type=_parse_override, action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, e.g. --set vocab_size=1024 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("convert", help="rewrite a checkpoint in the other layout, or export a fine-tuning run",
                       description="Convert between the original and the Hugging Face layouts, tensor by tensor "
                                   "(MXFP4 expert bytes are copied unchanged: lossless). Given a `finetune` run "
                                   "folder, export its newest checkpoint: experts re-encoded to MXFP4 (the "
                                   "relative re-encoding error is printed) or, with --experts bf16 (hf), kept dense.")
    p.add_argument("--checkpoint", required=True,
                   help="source folder (either layout, an HF snapshot root, or a `finetune` run folder)")
    p.add_argument("--out", required=True, help="destination folder")
    p.add_argument("--format", choices=("original", "hf"), required=True, help="destination layout")
    p.add_argument("--experts", choices=("mxfp4", "bf16"), default="mxfp4",
                   help="expert storage in the destination: mxfp4 (default) or bf16 (hf only, dequantized)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("next-token", help="print the most likely next tokens after a raw-text prompt",
                       description="Run the full forward pass on a raw-text prompt (no chat template) and print "
                                   "the top-k next tokens with their probabilities.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (either layout)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--top-k", type=int, default=5, help="how many tokens to show (default: 5)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="parameter and activation dtype")
    add_distributed_args(p, mesh=True)
    p.set_defaults(func=cmd_next_token)

    p = sub.add_parser("generate", help="generate a reply (Harmony chat) or a raw-text continuation",
                       description="Load a checkpoint and stream a reply to --prompt as a one-turn Harmony chat: "
                                   "the reasoning (analysis channel) set apart from the answer (final channel). "
                                   "--raw continues the text as is instead.")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder (either layout); default: the demo model gptoss-demo, which adds integers")
    p.add_argument("--prompt", required=True, help="the user message (or, with --raw, the text to continue)")
    p.add_argument("--raw", action="store_true", help="plain text completion, no chat format")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    _add_sampling(p)
    add_distributed_args(p, mesh=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal",
                       description="A multi-turn Harmony chat that streams tokens and shows the reasoning apart "
                                   "from the answer. /reset clears the conversation, /exit or Ctrl-D quits.")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint folder (either layout); default: the demo model gptoss-demo, which adds integers")
    p.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
    p.add_argument("--system", default="", help="instructions for the model (the developer message)")
    _add_sampling(p)
    add_distributed_args(p, mesh=True, mesh_help="in a multi-process job process 0 reads the terminal")
    p.set_defaults(func=cmd_chat)

    finetune_cli.add_parser(sub)

    from gptoss_jax.server.cli import add_parsers as add_server_parsers

    add_server_parsers(sub)  # serve, batch

    plan.add_parser(sub)  # gptoss-jax plan

    from gptoss_jax.evals.cli import add_parser as add_eval_parser

    add_eval_parser(sub)  # eval perplexity, eval tasks

    # `bench` has its own parser (gptoss_jax.bench); main() hands it the arguments unparsed.
    sub.add_parser("bench", help="generation speed against transformers and the roofline (bench --help)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from gptoss_jax.bench import main as bench

        return bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "distributed"):  # commands with the multi-host flags: join the job first
            from gptoss_jax.distributed import setup

            setup(args)
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, NotImplementedError, FloatingPointError) as e:
        # Bad input (checkpoint, config, arguments) is reported without a traceback.
        print(f"gptoss-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
