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
process runs the same program on its own devices' shards. Process 0 alone prints, serves HTTP and writes files;
what only it knows (a line typed into `chat`, a request to `serve`, the results file `eval tasks` resumes from)
reaches the others through `share` / `Channel` (the coordinator's key-value store), so every process launches the
same computations in the same order.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

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


T = TypeVar("T")

MESH_HELP = ("shard the model over a mesh of all devices (of every process), e.g. tensor=2,expert=4; the sizes "
             "must multiply to the device count; default: one device, or fsdp over all devices in a "
             "multi-process job")


def add_distributed_args(parser, mesh: bool = False, mesh_help: str = "") -> None:
    """Add the multi-host flags to a (sub)parser (and, with `mesh`, --mesh: see `mesh_from_args`; `mesh_help` is
    appended to its help: what this command shards besides the parameters). Every command that loads a model
    takes them; `gptoss_jax.cli.main` joins the job (`setup`) before the command runs."""
    if mesh:
        parser.add_argument("--mesh", metavar="data=..,fsdp=..,tensor=..,expert=..",
                            help=MESH_HELP + (f"; {mesh_help}" if mesh_help else ""))
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


def _client():
    from jax._src import distributed as jd

    if jd.global_state.client is None:
        raise RuntimeError("a multi-process job without jax.distributed: start it through "
                           "gptoss_jax.distributed.initialize (the --coordinator-address / --distributed flags)")
    return jd.global_state.client


class Channel:
    """Messages from process 0 to every other process of the job, in order: process 0 `send`s, the others
    `recv` the same sequence. Carried by the coordinator's key-value store (one key per message and receiver,
    deleted once read), not by device collectives, so a receiver may wait for hours (an idle server) without a
    collective timing out. Messages are pickled: the job's own processes only. Channels are told apart by name;
    every process must create the same channels."""

    def __init__(self, name: str, poll_s: float = 30.0):
        self.name, self.poll_s, self.count = name, poll_s, 0

    def _key(self, n: int, process: int) -> str:
        return f"gptoss_jax/{self.name}/{n}/{process}"

    def send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        client = _client()
        for p in range(1, jax.process_count()):
            client.key_value_set_bytes(self._key(self.count, p), data)
        self.count += 1

    def recv(self) -> Any:
        client = _client()
        key = self._key(self.count, jax.process_index())
        while True:
            try:
                data = client.blocking_key_value_get_bytes(key, int(self.poll_s * 1000))
                break
            except Exception as e:  # noqa: BLE001 - a wait that timed out: process 0 has nothing yet; wait on
                if "DEADLINE_EXCEEDED" not in str(e).upper():
                    raise
        client.key_value_delete(key)
        self.count += 1
        return pickle.loads(data)  # noqa: S301 - from process 0 of this job


_SHARE = None


def share(fn: Callable[[], T]) -> T:
    """`fn()` run on process 0 only, its value (or the exception it raised) handed to every process: for what
    only process 0 may do (read stdin, read or truncate a file it alone writes, check a file it alone reads).
    In a single-process job, just `fn()`."""
    global _SHARE
    if jax.process_count() == 1:
        return fn()
    if _SHARE is None:
        _SHARE = Channel("share")
    if not is_main_process():
        ok, value = _SHARE.recv()
        if not ok:
            raise value
        return value
    try:
        value = fn()
    except Exception as e:
        try:
            pickle.dumps(e)
            _SHARE.send((False, e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle: its type name and message
            _SHARE.send((False, RuntimeError(f"{type(e).__name__}: {e}")))
        raise
    _SHARE.send((True, value))
    return value


def setup(args) -> None:
    """For a CLI command: initialize a multi-process job from its flags / the environment, and silence
    stdout on every process but 0 (all run the same program; one prints)."""
    import os
    import sys

    if initialize(args) and not is_main_process():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (lives as long as the process)
