"""Collectives whose results the MPI communicator builds in reused receive buffers: results
kept alive are never overwritten, a dropped result's buffer serves the next call, and every
value equals NumPy's (ring and partial ppermutes, reductions of bool, float16 and int).  Then
rank 1 passes other ``axis_index_groups`` to a psum, and another perm to a ppermute, than the
other ranks: each rank prints the error it gets (4 processes)."""
import numpy as np

import spmd
from spmd import P, _host_parallel

spmd.distributed.initialize()
rank, n = spmd.process_index(), spmd.process_count()
mesh = spmd.make_mesh((n,), ("i",))
smap = lambda body, out: spmd.jit(spmd.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=out))
big = 2**18                                 # elements per rank: 1 MiB, pooled receive buffers
psum = smap(lambda b: spmd.psum(b, "i"), P())
gather = smap(lambda b: spmd.all_gather(b, "i", tiled=True, to="invariant"), P())
scatter = smap(lambda b: spmd.psum_scatter(b, "i", tiled=True), P("i"))
a2a = smap(lambda b: spmd.all_to_all(b, "i", 0, 0, tiled=True), P("i"))
ring = smap(lambda b: spmd.ppermute(b, "i", [(i, (i + 1) % n) for i in range(n)]), P("i"))
half = smap(lambda b: spmd.ppermute(b, "i", [(0, n - 1)]), P("i"))
blocks = lambda k: np.arange(n * big * n, dtype=np.float32).reshape(n, -1) + k   # row r: rank r
for k in range(4):
    x = blocks(k)
    flat = x.reshape(-1)
    results = [(psum(flat[:n * big]), flat[:n * big].reshape(n, -1).sum(0)),
               (gather(flat), flat),
               (scatter(flat), x.sum(0)),
               (a2a(flat), x.reshape(n, n, -1).transpose(1, 0, 2).reshape(-1)),
               (ring(flat), np.roll(x, 1, axis=0).reshape(-1)),
               (half(flat), np.concatenate([np.zeros_like(x[:-1]), x[:1]]).reshape(-1))]
    if k == 0:
        kept = results                   # alive while later calls reuse the other buffers
for got, want in kept + results:
    mine = got.addressable_shards[0].data                # P("i"): this rank's block only
    np.testing.assert_array_equal(mine, want if mine.size == want.size else
                                  want.reshape(n, -1)[rank])

# with dropped results in the pool, the next result takes a pooled buffer (no fresh pages);
# a result that is kept is never reused
del results, got, mine
data = lambda a: a.addressable_shards[0].data
pooled = {b.ctypes.data for b in _host_parallel._buffers}
assert data(psum(flat[:n * big])).__array_interface__["data"][0] in pooled
keep = psum(flat[:n * big])
other = psum(flat[:n * big] + 1)
assert data(keep).__array_interface__["data"][0] != data(other).__array_interface__["data"][0]
np.testing.assert_array_equal(data(keep) + n, data(other))

for dtype in (np.bool_, np.float16, np.int32):
    v = (np.arange(n * 6) % 3 == 1) if dtype is np.bool_ else np.arange(n * 6).astype(dtype)
    for op, ref in (("psum", np.sum), ("pmax", np.max), ("pmin", np.min)):
        got = smap(lambda b: getattr(spmd, op)(b, "i"), P())(v)
        want = ref(v.reshape(n, -1), axis=0)
        np.testing.assert_array_equal(np.asarray(got), want.astype(np.asarray(got).dtype))
print(f"values OK on {n} processes", flush=True)

# arguments that differ on rank 1: every rank gets the error and goes on
x = np.arange(2.0 * n)
me = rank == 1
groups = [[0, 1], [2, 3]] if me else [[0, 2], [1, 3]]
perm = [(i, (i + (2 if me else 1)) % n) for i in range(n)]
for body in (lambda b: spmd.psum(b, "i", axis_index_groups=groups),
             lambda b: spmd.ppermute(b, "i", perm)):
    try:
        smap(body, P("i"))(x)
        print("no error", flush=True)
    except spmd.errors.CollectiveMismatchError as e:
        print(f"{type(e).__name__}: {e}", flush=True)
