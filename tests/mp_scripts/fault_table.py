"""One rank (rank 1) goes wrong in the way argv[1] names, after three good psums; argv[2] is a
token that marks every process of the job (the test looks for leftovers by it).

raise, shape, dtype, op, groups, perm, hang, sigkill, sigterm, sigstop, early_exit, extra, wait (every
rank waits, for signals sent to the launcher)."""
import os
import signal
import sys
import time

import numpy as np

import spmd
from spmd import P
from _warm_job import me, mode, n, psum, smap, x  # joins the job: 3 psums, then "warm"

if mode == "raise" and me:
    raise ValueError("bad batch on this rank")
elif mode == "shape":
    psum(np.arange(4.0 * n) if me else x)
elif mode == "dtype":
    psum(x.astype(np.float32) if me else x)
elif mode == "op":
    (smap(lambda b: spmd.pmax(b, "i")) if me else psum)(x)
elif mode == "groups":
    groups = [[0, 1], [2, 3]] if me else [[0, 2], [1, 3]]
    smap(lambda b: spmd.psum(b, "i", axis_index_groups=groups), P("i"))(x)
elif mode == "perm":
    perm = [(i, (i + (2 if me else 1)) % n) for i in range(n)]
    smap(lambda b: spmd.ppermute(b, "i", perm), P("i"))(x)
elif mode == "hang" and me:
    time.sleep(60)
elif mode == "sigkill" and me:
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "sigterm" and me:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
elif mode == "sigstop" and me:
    os.kill(os.getpid(), signal.SIGSTOP)
elif mode == "early_exit" and me:
    sys.exit(0)
elif mode == "wait":
    time.sleep(60)
psum(x)
if mode == "extra" and me:
    psum(x)
print("done", flush=True)
