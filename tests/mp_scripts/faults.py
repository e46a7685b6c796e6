"""A job that goes wrong in one of several ways (argv[1]):

- ``mismatch``: rank 1 calls all_gather where the others call psum;
- ``hang``: rank 1 skips a psum and sleeps, the others wait for it;
- ``kill``: rank 2 kills itself with SIGKILL between collectives;
- ``flaky``: rank 0 fails on the first attempt only (for --max-restarts);
- ``ok``: nothing goes wrong.
"""
import os
import signal
import sys
import time

import numpy as np

import spmd
from spmd import P

mode = sys.argv[1]
spmd.distributed.initialize()
rank, n = spmd.process_index(), spmd.process_count()
mesh = spmd.make_mesh((n,), ("i",))
x = np.arange(2.0 * n)
smap = lambda body, out: spmd.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=out)
psum = smap(lambda b: spmd.psum(b, "i"), P())
gather = smap(lambda b: spmd.all_gather(b, "i", tiled=True, to="invariant"), P())

for step in range(3):
    psum(x)
print("warm", flush=True)
if mode == "mismatch":
    (gather if rank == 1 else psum)(x)
elif mode == "hang":
    if rank == 1:
        time.sleep(60)
    psum(x)
elif mode == "kill":
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    psum(x)
elif mode == "flaky":
    if rank == 0 and os.environ["SPMD_RESTART_COUNT"] == "0":
        raise RuntimeError("transient failure on the first attempt")
    psum(x)
print("done", np.asarray(psum(x)).tolist(), flush=True)
