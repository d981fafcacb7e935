"""Every benchmark of the repository and the evaluations, one command, one report.

Runs, each as a subprocess with its own flags (a failure is recorded and the others still run):
- generate:   experiments/bench_generate.py (`gptoss-jax bench`): generation speed against transformers, roofline
- kernels:    experiments/bench_kernels.py: the Pallas kernels' roofline (analytic)
- train:      experiments/bench_train.py: fine-tuning speed and memory against transformers
- server:     experiments/bench_server.py: serving throughput and latency (engine, HTTP, transformers)
- perplexity: `gptoss-jax eval perplexity` on experiments/tasks/sample.txt (strided windows)
- tasks:      `gptoss-jax eval tasks` on experiments/tasks/arithmetic.jsonl (exact match) and arithmetic_mc.jsonl
              (multiple choice), through Harmony, greedy, with a 95% Wilson interval
(`evals` names perplexity and tasks together.) The evaluations use --checkpoint, or the committed demo model
(demo/gptoss-demo: it adds integers, so the arithmetic tasks measure it; it knows no English, so the perplexity of
sample.txt is huge).

Writes OUT/bench_all.json (every run's status, time, command and results), OUT/REPORT.md (a summary, the
evaluation tables, and each benchmark's own Markdown table; benchmarks not rerun this time are included from
their earlier results in OUT, marked as such) and PNG plots (matplotlib; without it the report says so).
OUT is experiments/results, or experiments/results/quick with --quick, so a smoke run never overwrites the
full results.

usage: nice -n 19 .venv/bin/python experiments/bench_all.py [--quick] [--only NAME,...] [--checkpoint DIR]
                                                           [--no-transformers] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "experiments"
TASK_FILES = {"arithmetic": EXP / "tasks" / "arithmetic.jsonl", "arithmetic_mc": EXP / "tasks" / "arithmetic_mc.jsonl"}
TEXT_FILE = EXP / "tasks" / "sample.txt"
BENCHMARKS = ("generate", "kernels", "train", "server", "perplexity", "tasks")
ALIASES = {"evals": ("perplexity", "tasks"), "all": BENCHMARKS}
TITLES = {"generate": "Generation speed (bench_generate.py)", "kernels": "Kernel roofline (bench_kernels.py)",
          "train": "Fine-tuning speed and memory (bench_train.py)", "server": "Serving (bench_server.py)",
          "perplexity": "Perplexity (gptoss-jax eval perplexity)", "tasks": "Task accuracy (gptoss-jax eval tasks)"}
# bench_server.py writes to a fixed folder; this runs it with that folder pointed at OUT.
_SERVER = ("import importlib.util, pathlib, sys; "
           "spec = importlib.util.spec_from_file_location('bench_server', {path!r}); "
           "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
           "m.RESULTS = pathlib.Path({out!r}); sys.exit(m.main(sys.argv[1:]))")


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(BENCHMARKS)
    names: list[str] = []
    for n in (x.strip() for x in text.split(",") if x.strip()):
        if n in ALIASES:
            names += ALIASES[n]
        elif n in BENCHMARKS:
            names.append(n)
        else:
            raise SystemExit(f"bench_all.py: error: unknown benchmark {n!r}; choose from "
                             f"{', '.join(BENCHMARKS + tuple(ALIASES))}")
    return [b for b in BENCHMARKS if b in names]


def commands(name: str, args, out: Path, checkpoint: str | None) -> list[tuple[str, list[str]]]:
    """(label, argv) subprocesses for one benchmark; an empty list with a reason is handled by the caller."""
    py, q, nt = sys.executable, args.quick, args.no_transformers
    cli = [py, "-m", "gptoss_jax.cli"]
    if name == "generate":
        return [("generate", [py, str(EXP / "bench_generate.py"), "--out", str(out)] + (["--quick"] if q else [])
                 + (["--no-transformers"] if nt else []))]
    if name == "kernels":
        return [("kernels", [py, str(EXP / "bench_kernels.py"), "--out", str(out)])]
    if name == "train":
        small = ["--config", "tiny", "--batch", "1", "--seq-len", "64", "--steps", "1"] if q else []
        return [("train", [py, str(EXP / "bench_train.py"), "--out", str(out)] + small)]
    if name == "server":
        small = ["--requests", "4", "--max-tokens", "8", "--concurrency", "1,4"] if q else []
        code = _SERVER.format(path=str(EXP / "bench_server.py"), out=str(out))
        return [("server", [py, "-c", code] + small + (["--no-transformers"] if nt else []))]
    if name == "perplexity":
        window, stride = (64, 32) if q else (1024, 512)
        return [("perplexity", cli + ["eval", "perplexity", "--checkpoint", checkpoint, "--data", str(TEXT_FILE),
                                      "--window", str(window), "--stride", str(stride), "--batch-size", "4",
                                      "--json", str(out / "eval_perplexity.json"), "--no-progress"])]
    if name == "tasks":
        small = ["--limit", "4", "--max-new-tokens", "4", "--batch-size", "4"] if q else [
            "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "8"]
        runs = []
        for task, path in TASK_FILES.items():
            res = out / f"eval_tasks_{task}.jsonl"
            res.unlink(missing_ok=True)  # a fresh measurement (the file resumes otherwise)
            Path(str(res) + ".summary.json").unlink(missing_ok=True)
            runs.append((f"tasks:{task}", cli + ["eval", "tasks", "--checkpoint", checkpoint, "--tasks", str(path),
                                                 "--out", str(res), "--reasoning-effort", args.reasoning_effort,
                                                 "--no-progress"] + small))
        return runs
    raise ValueError(name)


def _results(name: str, out: Path, quick: bool):
    """The JSON a benchmark wrote, or None."""
    if name == "tasks":
        got = {}
        for task in TASK_FILES:
            f = out / f"eval_tasks_{task}.jsonl.summary.json"
            if f.exists():
                got[task] = json.loads(f.read_text())
        return got or None
    stem = {"perplexity": "eval_perplexity", "generate": "bench_generate_quick" if quick else "bench_generate"}.get(
        name, f"bench_{name}")
    f = out / f"{stem}.json"
    return json.loads(f.read_text()) if f.exists() else None


def _markdown_of(name: str, out: Path, quick: bool) -> str | None:
    stem = "bench_generate_quick" if (name == "generate" and quick) else f"bench_{name}"
    f = out / f"{stem}.md"
    if not f.exists():
        return None
    # The benchmark's own headings go two levels down, under this report's section.
    return "\n".join("##" + line if line.startswith("#") else line for line in f.read_text().splitlines())


def environment() -> dict:
    import jax

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def run_all(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = parse_only(args.only)
    report: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                    "settings": {"quick": args.quick, "only": names, "no_transformers": args.no_transformers,
                                 "checkpoint": args.checkpoint or "the demo model (demo/gptoss-demo)",
                                 "reasoning_effort": args.reasoning_effort},
                    "environment": environment(), "benchmarks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None and any(n in ("perplexity", "tasks") for n in names):
            from gptoss_jax.demo import DEMO_CHECKPOINT

            checkpoint = str(DEMO_CHECKPOINT)
        for name in names:
            entry = {"status": "ok", "seconds": 0.0, "runs": []}
            if name == "train" and args.no_transformers:
                entry.update(status="skipped", reason="bench_train.py has no option to leave transformers out")
            else:
                for label, argv in commands(name, args, out, checkpoint):
                    print(f"[bench_all] {label}: {' '.join(argv)[:300]}", flush=True)
                    t = time.perf_counter()
                    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          timeout=args.timeout)
                    sec = time.perf_counter() - t
                    sys.stdout.write(proc.stdout[-4000:])
                    entry["runs"].append({"label": label, "returncode": proc.returncode, "seconds": round(sec, 2),
                                          "command": argv, **({"log_tail": proc.stdout[-3000:]}
                                                              if proc.returncode else {})})
                    entry["seconds"] = round(entry["seconds"] + sec, 2)
                    if proc.returncode:
                        entry["status"] = "failed"
                entry["results"] = _results(name, out, args.quick)
                if entry["status"] == "ok" and entry["results"] is None:
                    entry["status"] = "failed"
                    entry["reason"] = "no results file was written"
            report["benchmarks"][name] = entry
            print(f"[bench_all] {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
    report["plots"] = plots(report, out)
    (out / "bench_all.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(markdown(report, out))
    return report


def plots(report: dict, out: Path) -> dict:
    """PNG plots; {name: file} or {"error": why}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"error": "matplotlib is not installed (pip install -e '.[bench]'): no plots"}
    made = {}
    tasks = (report["benchmarks"].get("tasks") or {}).get("results") or {}
    if tasks:
        fig, ax = plt.subplots(figsize=(5, 3))
        names = list(tasks)
        acc = [tasks[n]["accuracy"] for n in names]
        err = [[a - tasks[n]["ci95"][0] for n, a in zip(names, acc)], [tasks[n]["ci95"][1] - a for n, a in
                                                                        zip(names, acc)]]
        ax.bar(names, acc, yerr=err, capsize=6, color="#4c72b0")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% Wilson CI)")
        ax.set_title("Task accuracy")
        fig.tight_layout()
        fig.savefig(out / "eval_tasks.png", dpi=120)
        plt.close(fig)
        made["tasks"] = "eval_tasks.png"
    ran = {n: e["seconds"] for n, e in report["benchmarks"].items() if e["status"] != "skipped"}
    if ran:
        fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * len(ran)))
        ax.barh(list(ran), list(ran.values()), color=["#55a868" if report["benchmarks"][n]["status"] == "ok"
                                                      else "#c44e52" for n in ran])
        ax.invert_yaxis()
        ax.set_xlabel("wall time, s (red: failed)")
        ax.set_title("bench_all: time per benchmark")
        fig.tight_layout()
        fig.savefig(out / "bench_all_times.png", dpi=120)
        plt.close(fig)
        made["times"] = "bench_all_times.png"
    return made


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(report: dict, out: Path) -> str:
    s = report["settings"]
    env = report["environment"]
    quick = s["quick"]
    lines = ["# Benchmark and evaluation report", "",
             f"Generated {report['date']} by `python experiments/{report['command']}`"
             + (" (--quick: smoke sizes, not measurements to quote)" if quick else "") + ". Evaluation checkpoint: "
             f"{s['checkpoint']}. Machine: {env['cpus']} CPUs, {env['platform']}; JAX {env['jax']} "
             f"({env['backend']}).", "",
             "| benchmark | status | wall time s | results |", "|---|---|---|---|"]
    for name in BENCHMARKS:
        e = report["benchmarks"].get(name)
        if e is None:
            earlier = name in ("generate", "kernels", "train", "server") and _markdown_of(name, out, quick)
            lines.append(f"| {name} | {'not rerun (earlier results below)' if earlier else 'not run this time'} | "
                         f"| {_files(name, out, quick) if earlier else ''} |")
            continue
        status = e["status"] + (f" ({e['reason']})" if e.get("reason") else "")
        lines.append(f"| {name} | {status} | {e['seconds']:.1f} | {_files(name, out, quick)} |")
    plots = report.get("plots", {})
    if "error" in plots:
        lines += ["", f"Plots: {plots['error']}."]

    lines += ["", "## Evaluation", ""]
    p = (report["benchmarks"].get("perplexity") or {}).get("results")
    if p:
        lines += ["| data | documents | scored tokens | window | stride | mean NLL (nats) | perplexity |",
                  "|---|---|---|---|---|---|---|",
                  f"| {Path(p['data']).name} | {p['documents']} | {p['tokens']:,} | {p['window']} | {p['stride']} | "
                  f"{p['nll']:.4f} | {p['perplexity']:.4g} |", ""]
    t = (report["benchmarks"].get("tasks") or {}).get("results")
    if t:
        lines += ["| task file | items | correct | accuracy | 95% CI (Wilson) | no answer extracted | reasoning effort "
                  "| max new tokens |", "|---|---|---|---|---|---|---|---|"]
        for task, r in t.items():
            lines.append(f"| {Path(r['tasks']).name} | {r['n']} | {r['correct']} | {_pct(r['accuracy'])} | "
                         f"[{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}] | {r['unanswered']} | "
                         f"{r['reasoning_effort']} | {r['max_new_tokens']} |")
        lines.append("")
        if "tasks" in plots:
            lines += [f"![task accuracy]({plots['tasks']})", ""]
    if not p and not t:
        lines += ["Not run this time.", ""]
    lines += ["Commands: `gptoss-jax eval perplexity --checkpoint DIR --data FILE [--window W --stride S]`, "
              "`gptoss-jax eval tasks --checkpoint DIR --tasks FILE.jsonl --out RESULTS.jsonl`.", ""]

    for name in ("generate", "kernels", "train", "server"):
        md = _markdown_of(name, out, quick)
        lines += [f"## {TITLES[name]}", ""]
        e = report["benchmarks"].get(name)
        if e is None and md:
            lines += ["*From an earlier run (not rerun this time).*", ""]
        if md:
            lines += [md.strip(), ""]
            png = out / ("bench_generate_quick.png" if (name == "generate" and quick) else f"bench_{name}.png")
            if png.exists():
                lines += [f"![{name}]({png.name})", ""]
        elif e is not None and e["status"] != "ok":
            lines += [f"{e['status']}" + (f": {e['reason']}" if e.get("reason") else "") + ".", ""]
            tail = next((r.get("log_tail") for r in e["runs"] if r.get("log_tail")), None)
            if tail:
                lines += ["```", tail.strip()[-1500:], "```", ""]
        else:
            lines += ["No results yet.", ""]
    if "times" in plots:
        lines += ["## Time per benchmark", "", f"![time per benchmark]({plots['times']})", ""]
    return "\n".join(lines)


def _files(name: str, out: Path, quick: bool) -> str:
    if name == "tasks":
        return ", ".join(f"eval_tasks_{t}.jsonl" for t in TASK_FILES if (out / f"eval_tasks_{t}.jsonl").exists())
    stem = {"perplexity": "eval_perplexity", "generate": "bench_generate_quick" if quick else "bench_generate"}.get(
        name, f"bench_{name}")
    return ", ".join(p.name for p in sorted(out.glob(f"{stem}.*")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="benchmarks: " + ", ".join(BENCHMARKS) + "; evals = perplexity,tasks")
    ap.add_argument("--quick", action="store_true",
                    help="smoke sizes (tiny configs, few tokens, 4 task items); "
                         "default output experiments/results/quick")
    ap.add_argument("--only", default=None, metavar="NAME,...", help="run only these (default: all)")
    ap.add_argument("--checkpoint", default=None,
                    help="model for the evaluations (default: the demo model, demo/gptoss-demo)")
    ap.add_argument("--no-transformers", action="store_true",
                    help="leave out the Hugging Face transformers comparisons (and bench_train, which has no such "
                         "option)")
    ap.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="low")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="task evaluation reply limit (default: 256)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds each subprocess may run (default: none)")
    ap.add_argument("--out", default=None, help="results folder (default: experiments/results[/quick])")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(EXP / "results" / "quick") if args.quick else str(EXP / "results")
    parse_only(args.only)  # unknown names fail before anything runs
    report = run_all(args)
    failed = [n for n, e in report["benchmarks"].items() if e["status"] == "failed"]
    print(f"[bench_all] report: {Path(args.out) / 'REPORT.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
