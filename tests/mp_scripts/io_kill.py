"""A training loop's checkpoints, for the kill test of ``test_io.py``.

``io_kill.py DIR PHASE...``: one forked process per phase commits step 1 with
``CheckpointManager(DIR/PHASE)``, writes its pid to ``DIR/PHASE/pid``, then saves step 2 with
``SPMD_IO_PAUSE_AT=PHASE``, which stops the save there (the test then kills it with
SIGKILL); a PHASE named ``random-<k>`` does not stop, and the test kills it at a random
time.  ``data(step)`` and ``target()`` let the test check what was saved.
"""
import ctypes
import os
import signal
import sys
import time

import numpy as np

import spmd
from spmd import P, NamedSharding

PR_SET_PDEATHSIG = 1


def data(step):
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((16, 12)).astype(np.float32),
            "b": rng.integers(-100, 100, (12,)).astype(np.int32),
            "emb": rng.standard_normal((10, 8)).astype(np.float64)}


def mesh():
    return spmd.make_mesh((2, 4), ("data", "model"))


def target():
    return {"w": NamedSharding(mesh(), P("model", "data")), "b": NamedSharding(mesh(), P()),
            "emb": NamedSharding(mesh(), P(("data", "model")))}


def tree(step):
    specs = {"w": P("data", "model"), "b": P("model"), "emb": P("data")}
    return {k: spmd.device_put(v, NamedSharding(mesh(), specs[k])) for k, v in data(step).items()}


def run(folder, pause):
    mgr = spmd.io.CheckpointManager(folder)
    mgr.save(1, tree(1))
    mgr.wait_until_finished()
    os.environ["SPMD_IO_PAUSE_AT"] = pause       # "random-<k>": no pause, killed at any time
    with open(os.path.join(folder, "pid"), "w") as f:
        f.write(str(os.getpid()))
    mgr.save(2, tree(2))
    mgr.wait_until_finished()
    time.sleep(3600)               # saved: wait for the kill (so that the pid stays this one's)


if __name__ == "__main__":
    # one child per phase, forked before the storage layer starts its threads
    root, children = sys.argv[1], []
    for phase in sys.argv[2:]:
        pid = os.fork()
        if pid == 0:
            ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # never outlive the job
            try:
                run(os.path.join(root, phase), phase)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
