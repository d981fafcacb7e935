"""`--mesh` and the multi-host flags on every command that loads a model (generate, next-token, chat, finetune,
serve, batch, eval perplexity, eval tasks).

On 8 simulated CPU devices (one subprocess: the device count is fixed when jax starts), each command is run
through `gptoss_jax.cli.main` on one device and on a mesh, from the same tiny float32 checkpoint:
- `batch` (the serving engine `serve` also runs: the model loaded onto tensor=2 x expert=4, the KV cache sharded
  over the same mesh) answers greedy requests with the same tokens as on one device;
- `finetune` on fsdp=8 (batch rows split 8 ways) logs one device's losses and gradient norms step by step;
- `eval perplexity` on tensor=2 x expert=4 gives one device's perplexity.
The mesh tier (`make mesh`). In one process (tests/test_mesh_settings.py): a --mesh whose sizes do not multiply
to the device count is one `error:` line and exit 2 for every such command, and every command's --help lists
--mesh and the coordinator flags.
"""

import json
import sys
import textwrap

import pytest

from gptoss_jax.cli import main

pytestmark = pytest.mark.mesh

SCRIPT = textwrap.dedent('''
    import contextlib, io, json, sys, time
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    import gptoss_jax as gj
    from gptoss_jax.cli import main
    from gptoss_jax.train.data import read_jsonl
    from gptoss_jax.train.vocab import CompactVocab

    root = Path(sys.argv[1])
    assert jax.device_count() == 8
    cfg = gj.ModelConfig.tiny()
    model = gj.init_model(cfg, seed=5, dtype=jnp.float32)
    gj.save_checkpoint(model, root / "ckpt", format="hf")
    # finetune --compact-vocab (the loss over the data's tokens only: a cheap compile) needs the unembedding
    # rows of the tokens the data never shows to be equal
    used = np.asarray(CompactVocab.of([ex.tokens for ex in read_jsonl(root / "train.jsonl", 128)[0]],
                                      cfg.vocab_size).used)
    unemb = np.asarray(model.unembedding[...])
    tied = np.broadcast_to(unemb[0], unemb.shape).copy()
    tied[used] = unemb[used]
    model.unembedding[...] = jnp.asarray(tied)
    gj.save_checkpoint(model, root / "ckpt-tied", format="hf")

    def run(*args):
        t0 = time.perf_counter()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        assert code == 0, (args, err.getvalue()[-3000:])
        return time.perf_counter() - t0

    out, seconds = {}, {}
    for name, mesh in (("one", []), ("mesh", ["--mesh", "tensor=2,expert=4"])):
        seconds["batch " + name] = run("batch", "--checkpoint", root / "ckpt", "--input", root / "requests.jsonl",
                                       "--output", root / f"batch-{name}.jsonl", "--max-batch", 2,
                                       "--max-seq-len", 160, "--prefill-chunk", 32, "--dtype", "float32",
                                       "--no-progress", *mesh)
        rows = [json.loads(x) for x in (root / f"batch-{name}.jsonl").read_text().splitlines()]
        out["batch " + name] = {r["recordId"]: [r["modelOutput"]["choices"], r["modelOutput"]["usage"]]
                                for r in rows}
    for name, mesh in (("one", []), ("mesh", ["--mesh", "fsdp=8"])):
        seconds["finetune " + name] = run(
            "finetune", "--checkpoint", root / "ckpt-tied", "--data", root / "train.jsonl", "--out",
            root / f"run-{name}", "--steps", 3, "--save-every", 3, "--batch-size", 8, "--seq-len", 128,
            "--lr", "3e-3", "--warmup", 1, "--dtype", "float32", "--compact-vocab", "--no-progress", *mesh)
        out["finetune " + name] = [json.loads(x) for x in (root / f"run-{name}" / "metrics.jsonl").read_text()
                                   .splitlines()]
    for name, mesh in (("one", []), ("mesh", ["--mesh", "tensor=2,expert=4"])):
        seconds["perplexity " + name] = run(
            "eval", "perplexity", "--checkpoint", root / "ckpt", "--data", root / "doc.txt", "--window", 32,
            "--stride", 16, "--batch-size", 2, "--dtype", "float32", "--json", root / f"ppl-{name}.json",
            "--no-progress", *mesh)
        out["perplexity " + name] = json.loads((root / f"ppl-{name}.json").read_text())
    print("RESULT" + json.dumps({"out": out, "seconds": seconds}))
''')

DOC = ("The lighthouse stood at the end of a long stone pier, and for more than a century its lamp had turned "
       "through the night. Ships that passed the headland counted its flashes: three short, one long.")


@pytest.fixture(scope="module")
def results(tmp_path_factory, run_8_devices, write_echo_data):
    root = tmp_path_factory.mktemp("cli-mesh")
    write_echo_data(root / "train.jsonl", 24, 0)
    (root / "doc.txt").write_text(DOC)
    with (root / "requests.jsonl").open("w") as f:
        for i, text in enumerate(["Say hi.", "What is 48 + 79? Think it through before you answer."]):
            f.write(json.dumps({"recordId": f"r{i}", "modelInput": {
                "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}}) + "\n")
    got = run_8_devices(SCRIPT, str(root), timeout=900)
    print(got["seconds"])
    return got["out"]


def test_serving_engine_on_a_mesh_answers_one_devices_greedy_tokens(results):
    one, mesh = results["batch one"], results["batch mesh"]
    assert set(one) == {"r0", "r1"}
    assert mesh == one  # the same completions (text, reasoning, finish reason) and token counts
    assert all(usage["completion_tokens"] == 8 for _, usage in one.values())


def test_finetune_on_a_mesh_logs_one_devices_losses(results):
    one, mesh = results["finetune one"], results["finetune mesh"]
    assert [m["step"] for m in mesh] == [m["step"] for m in one] == [1, 2, 3]
    for a, b in zip(mesh, one):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
    assert one[-1]["loss"] < one[0]["loss"]  # the steps did train


def test_eval_perplexity_on_a_mesh_equals_one_device(results):
    one, mesh = results["perplexity one"], results["perplexity mesh"]
    assert mesh["tokens"] == one["tokens"] and mesh["windows"] == one["windows"] > 1
    assert mesh["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


WORKER = textwrap.dedent('''
    import sys
    pid, port, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    from gptoss_jax import distributed
    # join on loopback only (what --coordinator-address does, with the coordinator bound to 127.0.0.1), and pin
    # gloo to loopback too, as tests/mesh/test_multihost.py does; `main` then finds the job already joined
    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           bind_address=f"127.0.0.1:{port}", timeout_s=60)
    from jax._src import distributed as jd, xla_bridge
    from jax._src.lib import _jax
    xla_bridge.register_backend_factory("cpu", lambda: xla_bridge.make_cpu_client(
        collectives=_jax.make_gloo_tcp_collectives(distributed_client=jd.global_state.client,
                                                   hostname="127.0.0.1")), priority=0, fail_quietly=False)
    from gptoss_jax.cli import main
    sys.exit(main(argv + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                          "--process-id", str(pid)]))
''')


@pytest.mark.slow  # reason: two processes compiling the sharded engine step side by side (~75 s on 2 cores)
def test_batch_in_a_two_process_job(tmp_path, free_port, job_env, run_job):
    """`batch --mesh tensor=2,expert=4` over two processes of 4 CPU devices: process 0 reads the input, runs the
    engine and writes the output; process 1 follows its device operations (Engine.follow) and writes nothing;
    the answers are one device's."""
    import jax.numpy as jnp

    import gptoss_jax as gj

    gj.save_checkpoint(gj.init_model(gj.ModelConfig.tiny(), seed=5, dtype=jnp.float32), tmp_path / "ckpt",
                       format="hf")
    with (tmp_path / "requests.jsonl").open("w") as f:
        for i, text in enumerate(["Say hi.", "What is 48 + 79?"]):
            f.write(json.dumps({"recordId": f"r{i}", "modelInput": {
                "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}}) + "\n")
    common = ["batch", "--checkpoint", str(tmp_path / "ckpt"), "--input", str(tmp_path / "requests.jsonl"),
              "--max-batch", "2", "--max-seq-len", "160", "--prefill-chunk", "32", "--dtype", "float32",
              "--no-progress"]
    port = str(free_port())
    # meanwhile: one device, in this process
    single, outs = run_job([[sys.executable, "-c", WORKER, str(i), port, *common, "--output",
                             str(tmp_path / f"out{i}.jsonl"), "--mesh", "tensor=2,expert=4"] for i in range(2)],
                           job_env(4), timeout=400,
                           meanwhile=lambda: main([*common, "--output", str(tmp_path / "single.jsonl")]))
    assert single == 0
    for code, out, err in outs:
        assert code == 0, err[-3000:]
    assert "batch: 2 done, 0 errors" in outs[0][1] and "batch:" not in outs[1][1]  # process 1 prints nothing
    assert not (tmp_path / "out1.jsonl").exists()  # ... and writes nothing

    def answers(path):
        return {r["recordId"]: r["modelOutput"]["choices"] for r in map(json.loads, path.read_text().splitlines())}

    assert answers(tmp_path / "out0.jsonl") == answers(tmp_path / "single.jsonl")
