"""Rank 1 goes wrong in the way argv[1] names, after three good psums (for test_mpi_collectives):

- ``sleep``: it sleeps 6 s before a psum; every rank prints the CPU time it used while waiting;
- ``stall``: it passes the check of a psum, then stalls inside the data exchange.
"""
import sys
import time

import numpy as np

import spmd
from spmd import P
from spmd.communicators import mpi

mode = sys.argv[1]
spmd.distributed.initialize()
rank, n = spmd.process_index(), spmd.process_count()
mesh = spmd.make_mesh((n,), ("i",))
smap = lambda body, out=P(): spmd.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=out)
psum = smap(lambda b: spmd.psum(b, "i"))
x = np.arange(2.0 * n)
for _ in range(3):
    psum(x)
print("warm", flush=True)
me = rank == 1
if mode == "sleep":
    if me:
        time.sleep(6)
    cpu, wall = time.process_time(), time.monotonic()
    try:
        psum(x)
    finally:
        print(f"waited {time.monotonic() - wall:.2f} s using {time.process_time() - cpu:.3f} s "
              f"of CPU", flush=True)
elif mode == "stall":
    if me:
        class Stalled:                       # the check passes, then the data never moves
            def __init__(self, comm):
                self.comm = comm

            def Allreduce(self, *args):
                time.sleep(60)
        real = mpi.MPICommunicator._subcomm
        mpi.MPICommunicator._subcomm = lambda self, ranks: Stalled(real(self, ranks))
    t0 = time.monotonic()
    print(f"started {t0:.3f}", flush=True)
    psum(x)
print("done", flush=True)
