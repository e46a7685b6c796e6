"""MPI collective throughput on 4 processes (``spmd-run -n 4``) beside the same collectives on
the simulated mesh (4 devices in one process, the stacked executor), 1 KiB to 64 MiB per rank.

Both sides run the same user program, ``jit(shard_map(collective))`` on an input already laid
out over the mesh, so the times include spmd's executor.  ``comm busbw`` is the MPI
communicator alone (no executor, no signature check): the transport's own speed.  Bus
bandwidth uses the nccl-tests formulas (all-reduce x 2(n-1)/n, the others x (n-1)/n) with the
per-rank input size.  On the simulated mesh the "bus" is one process's memory, so its busbw
is a memory-copy rate, not a network one: the comparison says what leaving one process costs.
(The simulated ``all_gather(to="invariant", tiled=True)`` is a view of the stacked input, so
its time does not grow with the size.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

NAME = "mpi_collectives"
FULL_SIZES = [2**10 * 4**k for k in range(9)]            # 1 KiB .. 64 MiB per rank
QUICK_SIZES = [2**10, 2**16]
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def _size(nbytes):
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


def _program(op, mesh):
    import spmd
    from spmd import P
    body, out = {
        "all_reduce": (lambda b: spmd.psum(b, "i"), P()),
        "all_gather": (lambda b: spmd.all_gather(b, "i", tiled=True, to="invariant"), P()),
        "reduce_scatter": (lambda b: spmd.psum_scatter(b, "i", tiled=True), P("i")),
        "all_to_all": (lambda b: spmd.all_to_all(b, "i", 0, 0, tiled=True), P("i")),
    }[op]
    return spmd.jit(spmd.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=out))


def _input(mesh, nbytes):
    import spmd
    n = mesh.size
    elems = max(nbytes // 4 // n * n, n)                 # float32, divisible for the scatters
    return spmd.device_put(np.ones(n * elems, np.float32), spmd.NamedSharding(mesh, spmd.P("i")))


def _loops(nbytes):
    return max(1, min(100, 2**23 // nbytes))


# ---------------------------------------------------------------------------------------------
# the worker: every rank of `spmd-run -n 4 -m benchmarks.bench_mpi OUT quick`
# ---------------------------------------------------------------------------------------------

def _worker(out_path, quick):
    import spmd
    spmd.distributed.initialize()
    mesh = spmd.make_mesh((spmd.process_count(),), ("i",))
    comm = spmd.distributed.executor().comm(mesh)
    raw = type(comm)(mesh, check=False)
    p = comm.local_positions[0]
    calls = {"all_reduce": lambda b: raw.all_reduce(b, ("i",), None, "sum"),
             "all_gather": lambda b: raw.all_gather(b, ("i",), None),
             "reduce_scatter": lambda b: raw.reduce_scatter(b, ("i",), None, "sum"),
             "all_to_all": lambda b: raw.all_to_all(b, ("i",), None)}
    repeat = 1 if quick else 3
    results = []
    for nbytes in (QUICK_SIZES if quick else FULL_SIZES):
        for op in OPS:
            f, x = _program(op, mesh), _input(mesh, nbytes)
            block = x.addressable_shards[0].data
            bufs = {p: block.reshape((mesh.size, -1)) if op in ("reduce_scatter", "all_to_all")
                    else block}
            times = {}
            for kind, call in (("jit", lambda: f(x)), ("comm", lambda: calls[op](bufs))):
                call()
                samples = []
                for _ in range(repeat):
                    comm.barrier()
                    t0 = time.perf_counter()
                    for _ in range(_loops(nbytes)):
                        call()
                    samples.append((time.perf_counter() - t0) / _loops(nbytes))
                times[kind] = float(np.median(samples))
            results.append({"op": op, "nbytes": int(block.nbytes), "jit_s": times["jit"],
                            "comm_s": times["comm"]})
    if spmd.process_index() == 0:
        with open(out_path, "w") as fh:
            json.dump({"n": spmd.process_count(), "results": results}, fh)


# ---------------------------------------------------------------------------------------------
# the benchmark: launch the workers, time the simulated mesh here
# ---------------------------------------------------------------------------------------------

def _simulated(op, nbytes, n, timing):
    import spmd
    from benchmarks._harness import timeit
    mesh = spmd.make_mesh((n,), ("i",), devices=spmd.devices()[:n])
    f, x = _program(op, mesh), _input(mesh, nbytes)
    return timeit(lambda: f(x), **timing)


def mpi_collectives(quick: bool):
    from benchmarks._harness import Row, skip_rows
    from spmd.gpu.index_math import bandwidth
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return skip_rows(NAME, "all collectives", "simulated mesh", "mpi4py is not installed")
    n = 2 if quick else 4
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "mpi.json")
        cmd = [sys.executable, "-m", "spmd.run", "-n", str(n), "-m", "benchmarks.bench_mpi", out,
               "quick" if quick else "full"]
        job = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900,
                             env=dict(os.environ, PYTHONPATH=root))
        if job.returncode != 0:
            raise RuntimeError(f"the MPI workers failed: {job.stderr.strip().splitlines()[-1:]}")
        with open(out) as fh:
            measured = json.load(fh)
    timing = dict(repeat=3, min_time=0.0) if quick else dict(repeat=5, min_time=0.05)
    rows = []
    for r in measured["results"]:
        op, nbytes = r["op"], r["nbytes"]
        sim = _simulated(op, nbytes, n, timing)
        bus = lambda s: round(bandwidth(op, nbytes, s, n)[1], 3)
        rows.append(Row(NAME, f"{op} {_size(nbytes)} x{n}", r["jit_s"], f"simulated mesh ({n} devices)",
                        sim, {"mpi busbw GB/s": bus(r["jit_s"]), "comm busbw GB/s": bus(r["comm_s"]),
                              "simulated busbw GB/s": bus(sim)}))
    return rows


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2] == "quick")
else:
    from ._harness import benchmark
    benchmark(NAME)(mpi_collectives)
