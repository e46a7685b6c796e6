"""spmd's collectives on MPI processes against raw mpi4py in the same processes.

Per op and size (1 KiB to 64 MiB of float32 per rank), on 2 and 4 processes (``spmd-run``):
the user's program ``jit(shard_map(collective))`` on an input already laid out over the mesh,
against the mpi4py call a hand-written MPI program makes on the same per-rank buffers
(``Allreduce``, ``Allgather``, ``Reduce_scatter_block``, ``Alltoall``, ``Sendrecv`` for a
ring ``ppermute``; its output buffers allocated once).  The two run interleaved, sample by
sample, so a change in the machine's load falls on both.  ``comm/raw`` is spmd's MPI
communicator called directly (no jit, no executor): what the communicator itself costs.  Bus
bandwidth uses the nccl-tests factors with the per-rank input size.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

NAME = "mpi_collectives"
FULL_SIZES = [2**10 * 4**k for k in range(9)]            # 1 KiB .. 64 MiB per rank
QUICK_SIZES = [2**10, 2**16]
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute")


def _size(nbytes):
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


def _loops(nbytes, quick):
    return max(1, min(20 if quick else 100, 2**23 // nbytes))


# ---------------------------------------------------------------------------------------------
# the worker: every rank of `spmd-run -n N -m benchmarks.bench_mpi OUT quick|full`
# ---------------------------------------------------------------------------------------------

def _cases(op, mesh, comm, world, block):
    """(the spmd program, the communicator call, the raw mpi4py call) on ``block``, this rank's
    float32 input."""
    import spmd
    from spmd import P
    n, r, ax = mesh.size, world.Get_rank(), ("i",)
    ring = [(i, (i + 1) % n) for i in range(n)]
    body, out_spec = {
        "all_reduce": (lambda b: spmd.psum(b, "i"), P()),
        "all_gather": (lambda b: spmd.all_gather(b, "i", tiled=True, to="invariant"), P()),
        "reduce_scatter": (lambda b: spmd.psum_scatter(b, "i", tiled=True), P("i")),
        "all_to_all": (lambda b: spmd.all_to_all(b, "i", 0, 0, tiled=True), P("i")),
        "permute": (lambda b: spmd.ppermute(b, "i", ring), P("i")),
    }[op]
    f = spmd.jit(spmd.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=out_spec))
    x = spmd.device_put(np.tile(block, n), spmd.NamedSharding(mesh, P("i")))
    p = comm.local_positions[0]
    rows = {p: block.reshape(n, -1)}
    out = np.empty(n * block.size if op == "all_gather" else
                   block.size // n if op == "reduce_scatter" else block.size, np.float32)
    via_comm, raw = {
        "all_reduce": (lambda: comm.all_reduce({p: block}, ax, None, "sum"),
                       lambda: world.Allreduce(block, out)),
        "all_gather": (lambda: comm.all_gather({p: block}, ax, None),
                       lambda: world.Allgather(block, out)),
        "reduce_scatter": (lambda: comm.reduce_scatter(rows, ax, None, "sum"),
                           lambda: world.Reduce_scatter_block(block, out)),
        "all_to_all": (lambda: comm.all_to_all(rows, ax, None),
                       lambda: world.Alltoall(block, out)),
        "permute": (lambda: comm.permute({p: block}, ax, ring),
                    lambda: world.Sendrecv(block, (r + 1) % n, 0, out, (r - 1) % n, 0)),
    }[op]
    return (lambda: f(x)), via_comm, raw


def _worker(out_path, quick, sizes):
    import spmd
    from spmd.communicators.mpi import mpi4py_world
    spmd.distributed.initialize()
    world = mpi4py_world()
    mesh = spmd.make_mesh((spmd.process_count(),), ("i",))
    comm = spmd.distributed.executor().comm(mesh)
    repeat = 3 if quick else 9
    results = []
    for nbytes in sizes:
        block = np.ones(nbytes // 4, np.float32)
        for op in OPS:
            calls = _cases(op, mesh, comm, world, block)
            samples = ([], [], [])
            loops = _loops(nbytes, quick)
            for call in calls:
                call()                                  # warm up: compile, make the groups
            for _ in range(repeat):                     # interleaved: spmd, comm, raw, spmd...
                for call, out in zip(calls, samples):
                    world.Barrier()
                    t0 = time.perf_counter()
                    for _ in range(loops):
                        call()
                    out.append((time.perf_counter() - t0) / loops)
            spmd_s, comm_s, raw_s = (statistics.median(s) for s in samples)
            results.append({"op": op, "nbytes": nbytes, "spmd_s": spmd_s, "comm_s": comm_s,
                            "raw_s": raw_s, "min_ratio": min(samples[0]) / min(samples[2])})
    if spmd.process_index() == 0:
        with open(out_path, "w") as fh:
            json.dump({"n": spmd.process_count(), "results": results}, fh)


# ---------------------------------------------------------------------------------------------
# the benchmark: launch the workers, read their times
# ---------------------------------------------------------------------------------------------

def _launch(n, quick):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "mpi.json")
        cmd = [sys.executable, "-m", "spmd.run", "-n", str(n), "-m", "benchmarks.bench_mpi", out,
               "quick" if quick else "full"]
        job = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800,
                             env=dict(os.environ, PYTHONPATH=root))
        if job.returncode != 0:
            raise RuntimeError(f"the MPI workers failed: {job.stderr.strip().splitlines()[-3:]}")
        with open(out) as fh:
            return json.load(fh)


def mpi_collectives(quick: bool):
    from benchmarks._harness import Row, skip_rows
    from spmd.comm_protocol import BUS_FACTOR
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return skip_rows(NAME, "all collectives", "mpi4py", "mpi4py is not installed")
    rows = []
    for n in ((2,) if quick else (2, 4)):
        measured = _launch(n, quick)
        for r in measured["results"]:
            op, nbytes = r["op"], r["nbytes"]
            bus = lambda s: round(nbytes * BUS_FACTOR[op](n) / s / 1e9, 3)
            rows.append(Row(NAME, f"{op} {_size(nbytes)} x{n}", r["spmd_s"], "mpi4py", r["raw_s"],
                            {"comm/raw": round(r["comm_s"] / r["raw_s"], 3),
                             "min ratio": round(r["min_ratio"], 3),
                             "busbw GB/s": bus(r["spmd_s"]), "raw busbw GB/s": bus(r["raw_s"])}))
    return rows


if __name__ == "__main__":        # OUT quick|full [bytes per rank...]
    _worker(sys.argv[1], sys.argv[2] == "quick", [int(a) for a in sys.argv[3:]]
            or (QUICK_SIZES if sys.argv[2] == "quick" else FULL_SIZES))
else:
    from ._harness import benchmark
    benchmark(NAME)(mpi_collectives)
