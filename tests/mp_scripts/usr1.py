"""Run a few collectives, say so, then wait: the test sends SIGUSR1 and reads the dumps."""
import time

import numpy as np

import spmd
from spmd import P

spmd.distributed.initialize()
mesh = spmd.make_mesh((spmd.process_count(),), ("i",))
f = spmd.shard_map(lambda b: spmd.psum(b, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
x = np.arange(2.0 * spmd.process_count())
for _ in range(3):
    f(x)
print("ready", flush=True)
time.sleep(30)
