"""Rank 1 goes wrong in the way argv[1] names, after three good psums (for test_mpi_collectives):

- ``sleep``: it sleeps 6 s before a psum; every rank prints the CPU time it used while waiting;
- ``stall``: it passes the check of a psum, then stalls inside the data exchange.
"""
import time

from _warm_job import me, mode, psum, x          # joins the job: 3 psums, then "warm"
from spmd.communicators import mpi
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
