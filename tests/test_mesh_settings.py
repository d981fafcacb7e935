"""The single-process side of meshes and multi-host jobs, in the default tier (the runs on 8 simulated devices
and on two loopback processes are the mesh tier, tests/mesh/): every command that loads a model refuses a --mesh
that does not fit the devices with one `error:` line, lists --mesh and the coordinator flags in its --help, reads
the coordinator settings from flags and environment, and `partition_spec` replicates what a mesh axis does not
divide."""

import json

import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gptoss_jax.cli import build_parser, main

COMMANDS = {  # command -> the arguments it needs besides --checkpoint
    "generate": ["--prompt", "hi"],
    "next-token": ["--prompt", "hi"],
    "chat": [],
    "finetune": ["--data", "{data}", "--out", "{out}"],
    "serve": [],
    "batch": ["--input", "{data}", "--output", "{out}"],
    "eval perplexity": ["--data", "{data}"],
    "eval tasks": ["--tasks", "{tasks}", "--out", "{out}"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_mesh_that_does_not_fit_the_devices_is_one_error_line(command, tmp_path, capsys):
    """On this one-device process fsdp=2 cannot be laid out: the command stops before loading anything."""
    (tmp_path / "data.jsonl").write_text(json.dumps({"recordId": 1, "modelInput": {}}) + "\n")
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"id": 1, "question": "1 + 1?", "answer": 2}) + "\n")
    fill = {"{data}": str(tmp_path / "data.jsonl"), "{tasks}": str(tmp_path / "tasks.jsonl"),
            "{out}": str(tmp_path / "out")}
    args = [*command.split(), "--checkpoint", str(tmp_path / "nothing-here"),
            *(fill.get(a, a) for a in COMMANDS[command]), "--mesh", "fsdp=2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"gptoss-jax {command.split()[0]}: error: a mesh of data=1 x fsdp=2 x tensor=1 x expert=1 = "
                   "2 devices, but there are 1"]
    assert not (tmp_path / "out").exists()  # nothing written


def test_every_model_command_has_the_mesh_and_coordinator_flags():
    parser = build_parser()
    for command in [*COMMANDS, "plan"]:
        sub = parser
        for word in command.split():
            sub = next(a for a in sub._actions if a.dest in ("command", "eval_command")).choices[word]
        text = sub.format_help()
        assert "--mesh" in text, command
        if command != "plan":  # plan works on an abstract mesh: no job to join
            for flag in ("--coordinator-address", "--num-processes", "--process-id", "--distributed"):
                assert flag in text, (command, flag)


def test_coordinator_settings_from_flags_and_environment():
    import argparse

    from gptoss_jax import distributed

    parser = argparse.ArgumentParser()
    distributed.add_distributed_args(parser, mesh=True)
    env = {"GPTOSS_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "GPTOSS_PROCESS_ID": "3"}
    s = distributed.settings(parser.parse_args([]), env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.wanted) == ("10.0.0.1:1234", 4, 3, True)
    s = distributed.settings(parser.parse_args(["--process-id", "1", "--mesh", "fsdp=8"]), env)  # flags win
    assert (s.num_processes, s.process_id) == (4, 1)
    assert not distributed.settings(parser.parse_args([]), {}).wanted  # nothing set: single process
    assert not distributed.settings(parser.parse_args(["--distributed", "off"]), env).wanted
    assert distributed.settings(parser.parse_args(["--distributed", "auto"]), {}).wanted  # JAX detects the rest
    with pytest.raises(ValueError, match="process id 4 is outside 0 .. 3"):
        distributed.settings(parser.parse_args(["--process-id", "4"]), env)
    with pytest.raises(ValueError, match="number of processes must be an integer"):
        distributed.settings(None, {"GPTOSS_NUM_PROCESSES": "two"})
    assert not distributed.initialize(parser.parse_args([]), environ={})  # a no-op without settings


def test_partition_spec_replicates_what_does_not_divide():
    from gptoss_jax.sharding import partition_spec

    mesh = Mesh(np.empty((1, 1, 1, 2), dtype=object), ("data", "fsdp", "tensor", "expert"))  # shapes only
    assert partition_spec(("experts", "embed"), (5, 64), mesh) == P(None, None)  # 5 experts on expert=2
    assert partition_spec(("experts", "embed"), (4, 64), mesh) == P("expert", None)
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'hidden'"):
        partition_spec(("hidden",), (4,), mesh)
