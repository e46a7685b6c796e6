"""Collectives on 8 simulated devices, float32, 1 MiB and 16 MiB per device (and the
reduce-scatter at 64 MiB): spmd against JAX.

Both sides run the same user program, a cached ``jit(shard_map(collective))`` on an input
already laid out with its ``in_specs`` (so no relayout is timed), and both results stay on the
devices: JAX's is waited for with ``block_until_ready``; spmd computes synchronously.  Every
case first checks that the two results agree on device 0.

``x memcopy`` is the fraction of the memory-copy bound: the time ``np.copyto`` takes to copy
the bytes the collective moves at least (every device's block once, 8 x the per-device size)
between two preallocated buffers, divided by the collective's time; 1.0 is copy speed, above 1
is faster than one copy (a sum reads its inputs and writes an eighth as much).  spmd splits big
copies and sums over the host threads, so it can beat the one-threaded copy, and takes big
outputs from a pool of buffers that no array uses any more (as JAX's allocator reuses its
buffers), so the copy's destination is as warm as the bound's.  The three (spmd,
JAX, the copy) are timed in turns, sample by sample, so that a change in the load of a shared
machine hits all three alike.

Where spmd's result is a view, no bytes move: ``all_gather(tiled, axis=0)`` of blocks that
already sit side by side is a reshape of the input, and every ``all_gather`` result is one
gathered array that the 8 devices share (JAX writes 8 copies).  The ``+ copy`` rows then add
one copy of the gathered array per call, so the comparison does not rest on the view.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

import spmd
from ._harness import Row, benchmark, jax_peer, skip_rows

NAME = "collectives"
N = 8
COLS = 512
RING = tuple((i, (i + 1) % N) for i in range(N))

# name, body written once for a namespace of collectives (spmd or jax.lax), out_specs entries
CASES = [
    ("psum", lambda C, b: C.psum(b, "i"), ()),
    ("all_gather tiled axis 0", lambda C, b: C.all_gather(b, "i", axis=0, tiled=True), ("i",)),
    ("all_gather tiled axis 1", lambda C, b: C.all_gather(b, "i", axis=1, tiled=True), ("i",)),
    ("psum_scatter tiled", lambda C, b: C.psum_scatter(b, "i", scatter_dimension=0, tiled=True), ("i",)),
    ("all_to_all tiled", lambda C, b: C.all_to_all(b, "i", 0, 0, tiled=True), ("i",)),
    ("ppermute ring shift", lambda C, b: C.ppermute(b, "i", RING), ("i",)),
]


def _size_label(nbytes: int) -> str:
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


def _shares_input(out: spmd.Array, x: spmd.Array) -> bool:
    return np.shares_memory(out._storage, x._storage)


def _sample(fn, min_time: float) -> float:
    """Seconds per call of ``fn`` over calls lasting at least ``min_time`` in all."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time:
            return elapsed / calls


def _in_turns(fns, repeat: int, min_time: float) -> list[float]:
    """Median seconds per call of each of ``fns``, sampled in turns (starting with a different
    one each round) after one warm-up call."""
    for fn in fns:
        fn()
    samples = [[] for _ in fns]
    for r in range(repeat):
        for i in range(len(fns)):
            k = (r + i) % len(fns)
            samples[k].append(_sample(fns[k], min_time))
    return [statistics.median(s) for s in samples]


@benchmark(NAME)
def collectives(quick: bool) -> list[Row]:
    sizes = [16 * 2**10] if quick else [2**20, 16 * 2**20, 64 * 2**20]
    timing = {16 * 2**10: (3, 0.0), 2**20: (11, 0.1), 16 * 2**20: (7, 0.2),
              64 * 2**20: (5, 0.3)}                                         # (samples, seconds)
    jax, why = jax_peer(N)
    if why:
        return skip_rows(NAME, "collectives", "jax", why)
    from jax.sharding import NamedSharding as JaxNamedSharding, PartitionSpec as JaxP
    mesh = spmd.make_mesh((N,), ("i",))
    jmesh = jax.make_mesh((N,), ("i",), devices=jax.devices()[:N])
    rows = []
    for per_device in sizes:
        size = _size_label(per_device)
        repeat, min_time = timing[per_device]
        moved = N * per_device                      # every device's block, once
        src, dst = np.ones(moved, np.uint8), np.zeros(moved, np.uint8)
        memcopy = lambda: np.copyto(dst, src)
        copies = []
        # small integers: sums are exact in float32, so both sides must agree bit for bit
        host = np.random.default_rng(0).integers(0, 8, (N * per_device // 4 // COLS, COLS)).astype(np.float32)
        x = spmd.device_put(host, spmd.NamedSharding(mesh, spmd.P("i")))
        jx = jax.device_put(host, JaxNamedSharding(jmesh, JaxP("i")))
        # at 64 MiB per device (512 MiB in all) only the reduce-scatter, the one collective
        # that is at the memory-copy bound on both sides
        cases = CASES if per_device < 64 * 2**20 else [c for c in CASES if c[0].startswith("psum_scatter")]
        for label, body, out_spec in cases:
            f = spmd.jit(spmd.shard_map(lambda b, body=body: body(spmd, b), mesh=mesh,
                                        in_specs=spmd.P("i"), out_specs=spmd.P(*out_spec)))
            g = jax.jit(jax.shard_map(lambda b, body=body: body(jax.lax, b), mesh=jmesh,
                                      in_specs=JaxP("i"), out_specs=JaxP(*out_spec)))
            out, jout = f(x), g(jx).block_until_ready()
            np.testing.assert_array_equal(out.addressable_shards[0].data,
                                          np.asarray(jout.addressable_shards[0].data))
            view = _shares_input(out, x)
            # the gathered array as a buffer of its own, copied once per call
            own = lambda: np.array(f(x).addressable_shards[0].data, copy=True)
            t, jt, copy_s, *own_t = _in_turns(
                [lambda: f(x), lambda: g(jx).block_until_ready(), memcopy] + ([own] if view else []),
                repeat, min_time)
            copies.append(copy_s)
            extra = {"x memcopy": "view" if view else round(copy_s / t, 2)}
            if view:
                extra["note"] = "a view of the input: no bytes move"
            elif label.startswith("all_gather"):
                extra["note"] = "one gathered copy, shared by the 8 devices"
            rows.append(Row(NAME, f"{label}, {size}/device", t, "jax", jt, extra))
            if view:
                rows.append(Row(NAME, f"{label} + copy, {size}/device", own_t[0], "jax", jt,
                                {"x memcopy": round(copy_s / own_t[0], 2)}))
            del out, jout
        copy_s = statistics.median(copies)
        rows.append(Row(NAME, f"memcopy {_size_label(moved)} (the bound at {size}/device)", None,
                        "numpy", copy_s, {"GB/s": round(moved / copy_s / 1e9, 2)}))
    return rows
