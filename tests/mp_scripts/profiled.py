"""A jitted shard_map step profiled on every process (for test_multiprocess): the values equal
NumPy's with and without the profiler, and each rank's table has a row per collective."""
import numpy as np

import spmd
from spmd import P

spmd.distributed.initialize()
rank, n = spmd.process_index(), spmd.process_count()
mesh = spmd.make_mesh((n,), ("i",))
ring = [(i, (i + 1) % n) for i in range(n)]
step = spmd.jit(spmd.shard_map(lambda b: (spmd.psum(b * 2, "i"), spmd.ppermute(b, "i", ring)),
                               mesh=mesh, in_specs=P("i"), out_specs=(P(), P("i"))))
host = np.arange(n * 6, dtype=np.float32).reshape(n, 6)
x = spmd.device_put(host.reshape(-1), spmd.NamedSharding(mesh, P("i")))


def check(out):
    total, moved = out
    np.testing.assert_array_equal(total.addressable_shards[0].data, 2 * host.sum(0))
    np.testing.assert_array_equal(moved.addressable_shards[0].data, host[(rank - 1) % n])


check(step(x))                                  # traced and prepared
with spmd.profile() as prof:
    check(step(x))
check(step(x))                                  # and after the profiler
table = prof.table()
assert "psum" in table and "ppermute" in table, table
print(f"profiled OK on {n} processes", flush=True)
