"""experiments/bench_all.py end to end at smoke size: the JSON, the Markdown report and the plots it writes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "bench_all.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_all", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_only_names():
    m = _module()
    assert m.parse_only(None) == list(m.BENCHMARKS)
    assert m.parse_only("tasks,evals, kernels") == ["kernels", "perplexity", "tasks"]
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        m.parse_only("kernels,nope")


def _run(tmp_path, only):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--only", only, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench_all.json").read_text())
    assert set(report) == {"date", "command", "settings", "environment", "benchmarks", "plots"}
    assert report["settings"]["quick"] is True
    md = (out / "REPORT.md").read_text()
    assert md.startswith("# Benchmark and evaluation report")
    if _has_matplotlib():
        assert report["plots"]["times"] == "bench_all_times.png"
        for f in report["plots"].values():
            assert (out / f).stat().st_size > 1000 and f"({f})" in md
    else:
        assert "matplotlib is not installed" in report["plots"]["error"] and "matplotlib is not installed" in md
    return out, report, md


def test_quick_perplexity_and_kernels(tmp_path):
    out, report, md = _run(tmp_path, "perplexity,kernels")
    assert list(report["benchmarks"]) == ["kernels", "perplexity"]
    for e in report["benchmarks"].values():
        assert e["status"] == "ok" and e["seconds"] > 0 and e["runs"][0]["returncode"] == 0
    p = report["benchmarks"]["perplexity"]["results"]
    assert {"tokens", "documents", "nll", "perplexity", "window", "stride", "windows"} <= set(p)
    assert p["tokens"] > 100 and p["documents"] == 1 and (p["window"], p["stride"]) == (64, 32)
    assert p["perplexity"] > 1000  # the demo model knows no English
    assert "| sample.txt | 1 |" in md and "## Kernel roofline (bench_kernels.py)" in md
    assert "| generate | not run this time |" in md and "| perplexity | ok |" in md
    assert json.loads((out / "bench_kernels.json").read_text())


@pytest.mark.demo  # the harness end to end on the demo model (`make e2e`, run by CI)
def test_quick_evals(tmp_path):
    out, report, md = _run(tmp_path, "evals")
    t = report["benchmarks"]["tasks"]
    assert t["status"] == "ok" and [r["label"] for r in t["runs"]] == ["tasks:arithmetic", "tasks:arithmetic_mc"]
    for name, r in t["results"].items():
        assert r["n"] == 4 and 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1
        assert len((out / f"eval_tasks_{name}.jsonl").read_text().splitlines()) == 4
    assert "| arithmetic.jsonl | 4 |" in md and "| arithmetic_mc.jsonl | 4 |" in md
    if _has_matplotlib():
        assert report["plots"]["tasks"] == "eval_tasks.png" and (out / "eval_tasks.png").exists()
