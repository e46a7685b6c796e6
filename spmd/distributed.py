"""Multi-process runtime: which process this is, how processes find each other, and helpers
to build and gather global arrays whose shards live in different processes.

A single process is the default: process 0 of 1, with simulated devices.  After
``initialize()`` (one call at the top of a script started by ``spmd-run``, ``torchrun``,
``srun`` or ``mpiexec``) every process holds one device, ``spmd.devices()`` lists all of them,
meshes span processes, and ``jit`` / ``shard_map`` run through the backend's communicator::

    import spmd
    spmd.distributed.initialize()              # reads the launcher's environment
    mesh = spmd.make_mesh((spmd.process_count(),), ("i",))
    x = spmd.distributed.make_array_from_process_local_data(
        spmd.NamedSharding(mesh, spmd.P("i")), np.full(2, spmd.process_index()))
    total = spmd.distributed.process_allgather(x)   # the global array, on every process

Every collective has a deadline (``SPMD_COLLECTIVE_TIMEOUT`` seconds, default 300, or
``with collective_timeout(s):``); on expiry it raises ``CollectiveTimeoutError`` and the
flight recorder (``spmd.flight_recorder``) dumps the last collectives of the process.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import sys
import warnings

import numpy as np
import optree

from . import flight_recorder, runtime
from .array import Array, make_array_from_callback  # noqa: F401 (make_array_from_callback: public here)
from .comm_protocol import rank_in
from .communicators.mpi import MPICommunicator, announce_exit, mpi4py_world
from .communicators.nccl import NcclCommunicator
from .core import hooks
from .devices import devices
from .errors import SpmdError
from .executors import PerDeviceExecutor
from .executors.per_device import _Blocks, gather_blocks
from .mesh import make_mesh
from .runtime import (DEFAULT_COLLECTIVE_TIMEOUT, Store, _State, collective_timeout,  # noqa: F401
                      collective_timeout_seconds, is_initialized, process_count, process_index,
                      state, store)
from .sharding import as_sharding

BACKENDS = ("mpi", "nccl")


# ---------------------------------------------------------------------------------------------
# the launcher's environment
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """What a launcher told this process: who it is, how many there are, where to meet."""
    launcher: str
    process_id: int
    num_processes: int
    local_rank: int = 0
    coordinator: str | None = None
    backend: str | None = None


def _int(env, name):
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise SpmdError(f"environment variable {name}={raw!r} is not an integer; the launcher "
                        f"that set it is misconfigured.") from None


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``node[03-05,9],gpu1``."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = nodelist.split("[", 1)
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def detect_environment(env=None) -> LaunchEnv | None:
    """The launch environment found in ``env`` (default ``os.environ``), or None.

    Checked in order: ``spmd-run`` (``SPMD_PROCESS_ID``), ``torchrun`` (``RANK``/``WORLD_SIZE``),
    Open MPI (``OMPI_COMM_WORLD_RANK``), MPICH / Intel MPI (``PMI_RANK``), SLURM
    (``SLURM_PROCID``).  MPI launchers imply the ``mpi`` backend.
    """
    env = os.environ if env is None else env
    if "SPMD_PROCESS_ID" in env:
        return LaunchEnv("spmd-run", _int(env, "SPMD_PROCESS_ID"), _int(env, "SPMD_NUM_PROCESSES"),
                         int(env.get("SPMD_LOCAL_RANK", env["SPMD_PROCESS_ID"])),
                         env.get("SPMD_COORDINATOR"), env.get("SPMD_BACKEND") or None)
    if "RANK" in env and "WORLD_SIZE" in env:
        coord = None
        if "MASTER_ADDR" in env:
            coord = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
        return LaunchEnv("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"),
                         int(env.get("LOCAL_RANK", 0)), coord, None)
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv("openmpi", _int(env, "OMPI_COMM_WORLD_RANK"),
                         _int(env, "OMPI_COMM_WORLD_SIZE"),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), None, "mpi")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return LaunchEnv("mpich", _int(env, "PMI_RANK"), _int(env, "PMI_SIZE"),
                         int(env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", 0))), None, "mpi")
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_NPROCS" in env):
        n = _int(env, "SLURM_NTASKS" if "SLURM_NTASKS" in env else "SLURM_NPROCS")
        nodes = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST")))
        coord = None
        if nodes:
            port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
            coord = f"{_first_slurm_host(nodes)}:{port}"
        return LaunchEnv("slurm", _int(env, "SLURM_PROCID"), n, int(env.get("SLURM_LOCALID", 0)),
                         coord, None)
    return None


# ---------------------------------------------------------------------------------------------
# initialize / shutdown
# ---------------------------------------------------------------------------------------------

def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, backend: str | None = None) -> _State:
    """Join the job: learn this process's index, connect the backend, install the flight
    recorder's dump-on-SIGUSR1.  Arguments left out are read from the launcher's environment
    (see :func:`detect_environment`).

    ``backend``: ``"mpi"`` (CPU processes through mpi4py; the processes must be started by
    ``mpiexec``/``srun``/``spmd-run``) or ``"nccl"`` (one GPU per process; the NCCL unique id
    goes through the coordinator, or MPI when that is how the job was started).
    """
    if is_initialized():
        st = state()
        raise SpmdError(f"spmd.distributed.initialize() was already called (process "
                        f"{st.process_index} of {st.process_count}, backend "
                        f"{st.backend!r}); call it once per process.")
    found = detect_environment()
    launcher = found.launcher if found else "manual"
    if found is not None:
        coordinator = coordinator if coordinator is not None else found.coordinator
        num_processes = num_processes if num_processes is not None else found.num_processes
        process_id = process_id if process_id is not None else found.process_id
        backend = backend if backend is not None else found.backend
    local_rank = found.local_rank if found else 0
    if backend is not None and backend not in BACKENDS:
        raise SpmdError(f"initialize(backend={backend!r}): use one of {BACKENDS}.")
    if backend == "mpi":
        comm = mpi4py_world()
        atexit.register(announce_exit)     # runs before mpi4py's MPI_Finalize
        if num_processes is not None and num_processes != comm.Get_size():
            raise SpmdError(f"initialize: num_processes={num_processes} but MPI_COMM_WORLD has "
                            f"{comm.Get_size()} processes; start the script with "
                            f"`spmd-run -n {num_processes}` or `mpiexec -n {num_processes}`.")
        num_processes, process_id = comm.Get_size(), comm.Get_rank()
    if num_processes is None or process_id is None:
        raise SpmdError("initialize: cannot tell how many processes there are or which one this "
                        "is: no launcher environment was found (spmd-run, torchrun, SLURM, "
                        "mpiexec). Start the script with `spmd-run -n N script.py`, or pass "
                        "num_processes= and process_id= (and coordinator='host:port').")
    if not 0 <= process_id < num_processes:
        raise SpmdError(f"initialize: process_id={process_id} is outside 0..{num_processes - 1}.")
    if backend == "nccl" and coordinator is None and num_processes > 1 and launcher != "mpich" \
            and launcher != "openmpi":
        raise SpmdError("initialize(backend='nccl'): the NCCL unique id needs a coordinator "
                        "('host:port' of process 0, from MASTER_ADDR/MASTER_PORT or "
                        "SPMD_COORDINATOR) or an MPI launch.")
    st = runtime.set_state(_State(process_id, num_processes, backend, coordinator, local_rank,
                                  launcher))
    global _joined
    _joined = True
    if coordinator is not None and backend != "mpi" and num_processes > 1:
        runtime.set_store(Store(coordinator, process_id == 0, num_processes))
    flight_recorder.install_signal_handler()
    return st


def shutdown():
    """Leave the job (tests and restarts); afterwards this is a single process again."""
    global _executor
    runtime.reset()
    _executor = None


# A script started by `spmd-run -n N` that never calls initialize() would run N independent
# simulations of the whole mesh, and print N copies of its results, silently.  Computing before
# initialize() is legitimate (a simulated run to compare the job against), so the process is not
# stopped then: the first computation warns, and a process that computed and exits without ever
# having called initialize() fails with the fix in its message, so that spmd-run reports it.
def _spmd_run_job() -> LaunchEnv | None:
    try:
        found = detect_environment()
    except SpmdError:            # a malformed environment: initialize() reports it
        return None
    return found if found and found.launcher == "spmd-run" and found.num_processes > 1 else None


_LAUNCH = _spmd_run_job()
UNJOINED_LAUNCH = _LAUNCH is not None     # started by `spmd-run -n N`, N > 1
_warned_unjoined = False
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_joined = False          # has initialize() ever been called in this process


def _unjoined_message() -> str:
    return (f"process {_LAUNCH.process_id} of {_LAUNCH.num_processes} was started by spmd-run "
            f"but has not called spmd.distributed.initialize(), so it computes alone on its own "
            f"simulated devices, as every other process does; call "
            f"spmd.distributed.initialize() at the top of the script.")


def warn_if_unjoined() -> None:
    """Called by ``jit`` before it runs a program when :data:`UNJOINED_LAUNCH`: warns once."""
    global _warned_unjoined
    if not _warned_unjoined and not is_initialized():
        _warned_unjoined = True
        frame, level = sys._getframe(1), 2      # point the warning at the user's line
        while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
            frame, level = frame.f_back, level + 1
        warnings.warn(_unjoined_message(), RuntimeWarning, stacklevel=level)


def _fail_if_never_joined() -> None:
    if _warned_unjoined and not _joined and not _crashed:     # it computed alone, and finished
        sys.stdout.flush()
        sys.stderr.write(f"spmd: error: {_unjoined_message()}\n")
        sys.stderr.flush()
        os._exit(1)          # an exception raised at exit would not change the exit status


_crashed = False           # an uncaught exception ends the process: its own report says why


def _note_crash(kind, value, tb, _previous=sys.excepthook):
    global _crashed
    _crashed = True
    _previous(kind, value, tb)


if UNJOINED_LAUNCH:
    atexit.register(_fail_if_never_joined)
    sys.excepthook = _note_crash


# ---------------------------------------------------------------------------------------------
# global arrays from per-process data, and back
# ---------------------------------------------------------------------------------------------

def make_array_from_process_local_data(sharding, local_data, global_shape=None):
    """The global array whose part on this process is ``local_data``: the union of the blocks
    of this process's devices (with one device per process, that device's block).

    ``global_shape`` defaults to ``local_data``'s shape scaled along each split dim by the
    number of blocks there over the number this process holds.  Dims this process holds whole
    are replicated: every process must pass the same data there.
    """
    sharding = as_sharding(sharding, what="make_array_from_process_local_data")
    local_data = np.asarray(local_data)
    mesh, ndim = sharding.mesh, local_data.ndim
    mine = [p for p, d in enumerate(mesh.devices.flat) if d in set(mesh.local_devices)]
    dim_axes = sharding._dim_axes(ndim)
    held = [len({rank_in(mesh, axes, p) for p in mine}) if axes else 1 for axes in dim_axes]
    if global_shape is None:
        global_shape = tuple(d * n // h for d, n, h in zip(local_data.shape, sharding.num_parts(ndim), held))
    global_shape = tuple(global_shape)

    def coords(p):
        return dict(zip(mesh.axis_names, np.unravel_index(p, mesh.axis_sizes)))
    starts = [sharding.index_at(coords(p), global_shape) for p in mine]
    lo = [min(idx[d].indices(global_shape[d])[0] for idx in starts) for d in range(ndim)]
    hi = [max(idx[d].indices(global_shape[d])[1] for idx in starts) for d in range(ndim)]
    if tuple(h - l for l, h in zip(lo, hi)) != local_data.shape:
        raise SpmdError(f"make_array_from_process_local_data: process {process_index()} passed "
                        f"data of shape {local_data.shape}, but its blocks of the global shape "
                        f"{global_shape} under {sharding.spec} cover "
                        f"{tuple(h - l for l, h in zip(lo, hi))}.")
    return make_array_from_callback(global_shape, sharding, lambda idx: local_data[tuple(
        slice(s.indices(g)[0] - o, s.indices(g)[1] - o) for s, g, o in zip(idx, global_shape, lo))])


def process_allgather(x, tiled: bool = True):
    """The whole of the global array ``x`` (or a pytree of them), on every process.

    A non-Array leaf is this process's data: the result stacks (``tiled=False``) or
    concatenates (``tiled=True``) every process's value in process order."""
    return optree.tree_map(lambda a: _gather_array(a) if isinstance(a, Array)
                           else _gather_host(np.asarray(a), tiled), x)


hooks.process_allgather = process_allgather


def _communicator(mesh):
    return executor().comm(mesh)


def _gather_array(a):
    if a.is_fully_addressable or a.is_fully_replicated:
        return np.asarray(a)
    blocks = _Blocks.of(a)
    return gather_blocks(_communicator(blocks.mesh), blocks.mesh, blocks.spec, blocks.shape, blocks.bufs)


def _gather_host(x, tiled):
    if process_count() == 1:
        return x if tiled and x.ndim else x[None]
    mesh = make_mesh((process_count(),), ("processes",), devices=devices())
    comm = _communicator(mesh)
    g = comm.all_gather({p: x for p in comm.local_positions}, ("processes",), None)
    out = g[comm.local_positions[0]]
    return np.concatenate(list(out)) if tiled and x.ndim else out


_executor = None


def executor():
    """The per-device executor over this job's backend (what ``jit`` runs on after initialize)."""
    global _executor
    st = state()
    if _executor is None or _executor.backend != st.backend:
        if st.backend == "mpi":
            make = MPICommunicator
        elif st.backend == "nccl":
            make = NcclCommunicator.one_gpu_per_process
        else:
            raise SpmdError(f"process {st.process_index} of {st.process_count} has no "
                            f"collective backend; pass backend='mpi' (CPU) or 'nccl' (GPU) to "
                            f"spmd.distributed.initialize().")
        _executor = PerDeviceExecutor(make)
        _executor.backend = st.backend
    return _executor
