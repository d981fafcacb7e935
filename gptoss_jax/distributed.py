"""Multi-host jobs: read the coordinator settings and call `jax.distributed.initialize` (JAX's own runtime; no
other distributed engine).

Settings come from command-line flags (`add_distributed_args`) or, when a flag is not given, the environment:

| setting | flag | environment (first set wins) |
|---|---|---|
| process 0's host:port | `--coordinator-address` | GPTOSS_COORDINATOR_ADDRESS, JAX_COORDINATOR_ADDRESS |
| number of processes | `--num-processes` | GPTOSS_NUM_PROCESSES, JAX_NUM_PROCESSES |
| this process's id (0 .. n-1) | `--process-id` | GPTOSS_PROCESS_ID, JAX_PROCESS_ID |
| this process's GPUs | `--local-device-ids` | GPTOSS_LOCAL_DEVICE_IDS, JAX_LOCAL_DEVICE_IDS |

With none of them set the job is single-process and nothing is initialized. `--distributed auto` calls
`jax.distributed.initialize()` with whatever is set and lets JAX detect the rest (TPU pods, SLURM, Open MPI,
Kubernetes); `--distributed off` never initializes. On CPU the cross-process collectives are gloo.

After `initialize`, `jax.devices()` lists every process's devices and `gj.make_mesh(...)` spans them all; every
process runs the same program on its own devices' shards.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

ENV = {
    "coordinator_address": ("GPTOSS_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("GPTOSS_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("GPTOSS_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("GPTOSS_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    mode: str = "env"  # "env": initialize when any setting is given; "auto": always; "off": never

    @property
    def wanted(self) -> bool:
        if self.mode == "off":
            return False
        given = (self.coordinator_address, self.num_processes, self.process_id, self.local_device_ids)
        return self.mode == "auto" or any(v is not None for v in given)


def add_distributed_args(parser, mesh: bool = False) -> None:
    """Add the multi-host flags to a (sub)parser (and, with `mesh`, --mesh: see `mesh_from_args`)."""
    if mesh:
        parser.add_argument("--mesh", metavar="data=..,fsdp=..,tensor=..,expert=..",
                            help="shard the model over a mesh of all devices (of every process), e.g. "
                                 "tensor=2,expert=4; default: one device, or fsdp over all devices in a "
                                 "multi-process job")
    g = parser.add_argument_group("multi-host (jax.distributed; flags override GPTOSS_* / JAX_* environment)")
    g.add_argument("--coordinator-address", metavar="HOST:PORT",
                   help="process 0's address, the same on every process (env GPTOSS_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (env GPTOSS_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1 (env GPTOSS_PROCESS_ID)")
    g.add_argument("--local-device-ids", metavar="0,1,..", help="this process's GPUs (env GPTOSS_LOCAL_DEVICE_IDS)")
    g.add_argument("--distributed", choices=("env", "auto", "off"), default="env",
                   help="env (default): initialize when any setting is given; auto: always, JAX detects the "
                        "cluster (TPU pod, SLURM, ...); off: single process")


def _int(name: str, value) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _ids(value) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"local device ids must be comma-separated integers, got {value!r}") from None
    return tuple(int(v) for v in value)


def settings(args=None, environ: Mapping[str, str] | None = None) -> Settings:
    """The coordinator settings: each from `args` (an argparse namespace with the flags above) when given,
    else from the environment."""
    environ = os.environ if environ is None else environ

    def pick(field):
        value = getattr(args, field, None) if args is not None else None
        if value is not None:
            return value
        return next((environ[k] for k in ENV[field] if environ.get(k)), None)

    s = Settings(coordinator_address=pick("coordinator_address") or None,
                 num_processes=_int("number of processes", pick("num_processes")),
                 process_id=_int("process id", pick("process_id")),
                 local_device_ids=_ids(pick("local_device_ids")),
                 mode=getattr(args, "distributed", None) or "env")
    if s.num_processes is not None and s.num_processes < 1:
        raise ValueError(f"number of processes must be >= 1, got {s.num_processes}")
    if s.process_id is not None and s.num_processes is not None and not 0 <= s.process_id < s.num_processes:
        raise ValueError(f"process id {s.process_id} is outside 0 .. {s.num_processes - 1}")
    return s


def initialize(args=None, *, environ: Mapping[str, str] | None = None, timeout_s: int = 300,
               bind_address: str | None = None, **overrides) -> bool:
    """Call `jax.distributed.initialize` with the settings from `args` / the environment (keyword `overrides`,
    e.g. process_id=1, win over both). Returns whether this is a multi-process job now. Calling it again, or
    with nothing set, does nothing. `bind_address` is where process 0's coordinator listens (JAX's default:
    every interface, [::]:PORT; tests pass 127.0.0.1:PORT to stay on loopback)."""
    s = dataclasses.replace(settings(args, environ), **overrides)
    if not s.wanted or is_initialized():
        return is_initialized()
    if _backend_started():
        raise RuntimeError("jax.distributed.initialize must run before JAX starts its backend (before any "
                           "computation or jax.devices() call)")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes exchange data over TCP
    jax.distributed.initialize(coordinator_address=s.coordinator_address, num_processes=s.num_processes,
                               process_id=s.process_id,
                               local_device_ids=list(s.local_device_ids) if s.local_device_ids else None,
                               initialization_timeout=timeout_s, coordinator_bind_address=bind_address)
    return True


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def is_main_process() -> bool:
    """Process 0 prints and writes what should appear once per job."""
    return jax.process_index() == 0


def mesh_from_args(args):
    """The mesh a command's model is sharded over: --mesh when given; in a multi-process job without it, fsdp
    over every device; otherwise None (one device)."""
    from gptoss_jax.sharding import make_mesh, parse_mesh

    text = getattr(args, "mesh", None)
    if text:
        return make_mesh(**parse_mesh(text))
    if jax.process_count() > 1:
        return make_mesh(fsdp=jax.device_count())
    return None


def to_host(x):
    """A (possibly multi-process) array as one numpy array on every process."""
    import numpy as np

    if jax.process_count() > 1 and not getattr(x, "is_fully_addressable", True):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def setup(args) -> None:
    """For a CLI command: initialize a multi-process job from its flags / the environment, and silence
    stdout on every process but 0 (all run the same program; one prints)."""
    import os
    import sys

    if initialize(args) and not is_main_process():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the process)
