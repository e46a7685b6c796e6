"""Per-call overhead: a cached ``jit(shard_map(psum))`` on 8 floats over 8 devices, spmd vs JAX.

The data is tiny, so the time is what a call costs besides the work: flattening the
arguments, the cache lookup, dispatch to the executor (JAX: to its 8 device threads and their
rendezvous), and wrapping the result.  Both sides wait for the result (JAX with
``block_until_ready``; spmd runs synchronously).  The second row calls the ``shard_map``
directly, without ``jit`` around it, as a notebook user would.
"""
from __future__ import annotations

import numpy as np

import spmd
from ._harness import Row, benchmark, jax_peer, skip_rows, timeit

NAME = "call_overhead"
N = 8


@benchmark(NAME)
def call_overhead(quick: bool) -> list[Row]:
    timing = dict(repeat=3, min_time=0.01) if quick else dict(repeat=9, min_time=0.3)
    jax, why = jax_peer(N)
    if why:
        return skip_rows(NAME, "jit(shard_map(psum))", "jax", why)
    from jax.sharding import NamedSharding as JaxNamedSharding, PartitionSpec as JaxP
    mesh = spmd.make_mesh((N,), ("i",))
    jmesh = jax.make_mesh((N,), ("i",), devices=jax.devices()[:N])
    host = np.arange(N, dtype=np.float32)
    x = spmd.device_put(host, spmd.NamedSharding(mesh, spmd.P("i")))
    jx = jax.device_put(host, JaxNamedSharding(jmesh, JaxP("i")))
    ours = spmd.shard_map(lambda b: spmd.psum(b, "i"), mesh=mesh, in_specs=spmd.P("i"),
                          out_specs=spmd.P())
    theirs = jax.shard_map(lambda b: jax.lax.psum(b, "i"), mesh=jmesh, in_specs=JaxP("i"),
                           out_specs=JaxP())
    rows = []
    for label, f, g in (("jit(shard_map(psum)), 8 x float32", spmd.jit(ours), jax.jit(theirs)),
                        ("shard_map(psum) called directly", ours, theirs)):
        np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(g(jx)))
        t = timeit(lambda: f(x), **timing)
        # JAX dispatches asynchronously; waiting on every call also keeps its 8 device threads'
        # rendezvous from piling up
        jt = timeit(lambda: g(jx).block_until_ready(), **timing)
        rows.append(Row(NAME, label, t, "jax", jt, {"target ratio": "<= 0.5"}))
    return rows
