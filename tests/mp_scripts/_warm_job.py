"""The start the fault scripts share: importing it joins the job (``spmd-run``), builds a 1-D
mesh ``i`` over every process, runs three good psums and prints ``warm``. Then rank 1 (``me``)
goes wrong as ``mode`` (argv[1]) says."""
import sys

import numpy as np

import spmd
from spmd import P

mode = sys.argv[1]
spmd.distributed.initialize()
rank, n = spmd.process_index(), spmd.process_count()
mesh = spmd.make_mesh((n,), ("i",))


def smap(body, out=P()):
    return spmd.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=out)


psum = smap(lambda b: spmd.psum(b, "i"))
x = np.arange(2.0 * n)
for _ in range(3):
    psum(x)
print("warm", flush=True)
me = rank == 1
