"""device_put and gather of one float32 array over 8 devices: spmd against JAX.

spmd's simulated devices share host memory, so ``device_put`` of an evenly divided array is a
view (no bytes move) and the gather is one copy; JAX copies into one buffer per device and
back.  The ``memcopy`` row is the bandwidth bound for moving the same bytes once.
"""
from __future__ import annotations

import numpy as np

import spmd
from ._harness import Row, benchmark, jax_peer, gbps, memcopy_seconds, skip_rows, timeit

NAME = "device_put"
# (case label, array shape in units of the leading dim, mesh shape, axis names, spec)
LAYOUTS = [
    ("2x4 mesh, P('data','model')", 2, (2, 4), ("data", "model"), ("data", "model")),
    ("8-way, P('x')", 1, (8,), ("x",), ("x",)),
]


def _size_label(nbytes: int) -> str:
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


@benchmark(NAME)
def device_put_and_gather(quick: bool) -> list[Row]:
    nbytes = 64 * 2**10 if quick else 64 * 2**20
    timing = dict(repeat=3, min_time=0.0) if quick else dict(repeat=7, min_time=0.2)
    size = _size_label(nbytes)
    flat = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    copy_s = memcopy_seconds(nbytes)
    rows = [Row(NAME, f"memcopy {size} (bandwidth bound)", None, "numpy", copy_s,
                {"GB/s": gbps(nbytes, copy_s)})]
    jax, why = jax_peer(8)
    if why:
        return rows + skip_rows(NAME, "device_put / gather", "jax", why)
    from jax.sharding import NamedSharding as JaxNamedSharding, PartitionSpec as JaxP
    for label, rank, mesh_shape, names, spec in LAYOUTS:
        x = flat.reshape(-1, 1024) if rank == 2 else flat
        ours = spmd.NamedSharding(spmd.make_mesh(mesh_shape, names), spmd.P(*spec))
        theirs = JaxNamedSharding(jax.make_mesh(mesh_shape, names, devices=jax.devices()[:8]), JaxP(*spec))
        np.testing.assert_array_equal(np.asarray(spmd.device_put(x, ours)),
                                      np.asarray(jax.device_put(x, theirs)))

        put_s = timeit(lambda: spmd.device_put(x, ours), **timing)
        jput_s = timeit(lambda: jax.device_put(x, theirs).block_until_ready(), **timing)
        # a view moves no bytes, so a bandwidth figure for it would mean nothing
        zero_copy = all(np.shares_memory(s.data, x) for s in spmd.device_put(x, ours).addressable_shards)
        put_rate = {"spmd zero-copy": True} if zero_copy else {"GB/s spmd": gbps(nbytes, put_s)}
        rows.append(Row(NAME, f"device_put {size}, {label}", put_s, "jax", jput_s,
                        {**put_rate, "GB/s jax": gbps(nbytes, jput_s)}))
        # JAX caches np.asarray of an array, so each call gathers a freshly placed one.
        trip_s = timeit(lambda: np.asarray(spmd.device_put(x, ours)), **timing)
        jtrip_s = timeit(lambda: np.asarray(jax.device_put(x, theirs).block_until_ready()), **timing)
        rows.append(Row(NAME, f"device_put + gather {size}, {label}", trip_s, "jax", jtrip_s,
                        {"GB/s spmd": gbps(nbytes, trip_s), "GB/s jax": gbps(nbytes, jtrip_s),
                         "x memcopy spmd": round(trip_s / copy_s, 2)}))
    return rows
