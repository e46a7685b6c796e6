"""Checkpoint save and load of 1 GiB of float32 parameters: ``spmd.io`` against orbax (JAX
arrays of the same layout, orbax's default format), and against the disk's copy bound (the same
bytes written with one ``write`` and ``fsync`` per array, and read back with one ``read`` per
array, the arrays in parallel threads).

Both sides write to the same disk, one after the other in each round (spmd, orbax, bound), so a
change in the machine's load falls on all of them.  The bound moves the bytes with no format and
no checksum; a checkpoint writes one file per chunk, more of them at once, so its save can beat
the bound's one file per array.  Each case gives the median of 5 rounds and the range of the
rounds' ratios (on a loaded host one round can be off by 2x).
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import spmd
from ._harness import Row, benchmark, gbps, jax_peer, skip_rows

NAME = "io"


def _rounds(fns, rounds: int, after=lambda: None) -> list[list[float]]:
    """Seconds of each of ``fns`` in each of ``rounds`` rounds, run in turn in each round;
    ``after()`` runs untimed after every round (it deletes what the round wrote)."""
    samples = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, samples):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        after()
    return samples


def _ratio_range(ours: list[float], peer: list[float]) -> str:
    """The lowest and highest of the rounds' ratios (a noisy host moves the medians)."""
    ratios = [a / b for a, b in zip(ours, peer)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def _write_one(path, a):
    with open(path, "wb") as f:
        f.write(memoryview(a).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def _write_raw(folder, arrays):
    """The bound for a save: each array's bytes to its own file and fsync, all at once."""
    os.makedirs(folder)
    with ThreadPoolExecutor(len(arrays)) as pool:
        list(pool.map(_write_one, [os.path.join(folder, str(i)) for i in range(len(arrays))],
                      arrays))


def _read_raw(folder, arrays):
    """The bound for a load: each file read into a new array, all at once."""
    with ThreadPoolExecutor(len(arrays)) as pool:
        return list(pool.map(lambda i: np.fromfile(os.path.join(folder, str(i)), arrays[i].dtype),
                             range(len(arrays))))


@benchmark(NAME)
def save_and_load(quick: bool) -> list[Row]:
    n_arrays, rows_per = (4, 64) if quick else (8, 8192)
    shape = (rows_per, 4096)                                     # 4 MiB or 1 GiB in all
    nbytes = n_arrays * rows_per * 4096 * 4
    size = f"{nbytes // 2**20} MiB"
    rounds = 2 if quick else 5
    jax, why = jax_peer(8)
    try:
        import orbax.checkpoint as ocp  # noqa: PLC0415 (the peer; optional)
    except ImportError as e:
        why = why or f"orbax-checkpoint is not installed ({e})"
    if why:
        return skip_rows(NAME, f"save / load {size}", "orbax", why)
    import absl.logging  # noqa: PLC0415 (orbax logs every save at WARNING)
    absl.logging.set_verbosity(absl.logging.ERROR)
    from jax.sharding import NamedSharding as JaxSharding, PartitionSpec as JaxP  # noqa: PLC0415

    rng = np.random.default_rng(0)
    host = [rng.random(shape, dtype=np.float32) for _ in range(n_arrays)]
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    ours = {f"w{i}": spmd.device_put(h, spmd.NamedSharding(mesh, spmd.P("data", "model")))
            for i, h in enumerate(host)}
    jmesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
    jsharding = JaxSharding(jmesh, JaxP("data", "model"))
    theirs = {f"w{i}": jax.device_put(h, jsharding) for i, h in enumerate(host)}
    root = tempfile.mkdtemp(prefix="spmd-bench-io-")
    count = iter(range(10**6))
    paths = {}

    def spmd_save():
        paths["spmd"] = os.path.join(root, f"spmd{next(count)}")
        spmd.io.save(paths["spmd"], ours)

    checkpointer = ocp.StandardCheckpointer()

    def orbax_save():
        paths["orbax"] = os.path.join(root, f"orbax{next(count)}")
        checkpointer.save(paths["orbax"], theirs)
        checkpointer.wait_until_finished()

    def bound_save():
        paths["raw"] = os.path.join(root, f"raw{next(count)}")
        _write_raw(paths["raw"], host)

    def clean():
        for p in os.listdir(root):
            shutil.rmtree(os.path.join(root, p))

    try:
        saves = _rounds([spmd_save, orbax_save, bound_save], rounds, clean)
        spmd_save(), orbax_save(), bound_save()
        target = {k: spmd.NamedSharding(mesh, spmd.P("data", "model")) for k in ours}
        resharded = {k: spmd.NamedSharding(spmd.make_mesh((4, 2), ("a", "b")), spmd.P("b", "a"))
                     for k in ours}
        jtarget = {k: jax.ShapeDtypeStruct(shape, np.float32, sharding=jsharding) for k in ours}
        jm42 = jax.make_mesh((4, 2), ("a", "b"), devices=jax.devices()[:8])
        jsharding42 = JaxSharding(jm42, JaxP("b", "a"))
        jresharded = {k: jax.ShapeDtypeStruct(shape, np.float32, sharding=jsharding42)
                      for k in ours}
        back = spmd.io.load(paths["spmd"], resharded)
        jback = checkpointer.restore(paths["orbax"], jresharded)
        for k, h in zip(ours, host):
            assert np.array_equal(np.asarray(back[k]), h)
            assert np.array_equal(np.asarray(jback[k]), h)
        del back, jback
        loads = _rounds([lambda: spmd.io.load(paths["spmd"], target),
                         lambda: checkpointer.restore(paths["orbax"], jtarget),
                         lambda: _read_raw(paths["raw"], host)], rounds)
        reloads = _rounds([lambda: spmd.io.load(paths["spmd"], resharded),
                           lambda: checkpointer.restore(paths["orbax"], jresharded)], rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    bsave_s, bload_s = med(saves[2]), med(loads[2])
    rows = [Row(NAME, f"disk bound: write+fsync {size}", None, "raw files", bsave_s,
                {"GB/s": gbps(nbytes, bsave_s)}),
            Row(NAME, f"disk bound: read {size}", None, "raw files", bload_s,
                {"GB/s": gbps(nbytes, bload_s)})]
    cases = (("save", saves[0], saves[1], bsave_s),
             ("load, same layout", loads[0], loads[1], bload_s),
             ("load, 2x4 -> 4x2 transposed", reloads[0], reloads[1], bload_s))
    for case, ours, peer, bound_s in cases:
        ours_s, peer_s = med(ours), med(peer)
        rows.append(Row(NAME, f"{case} {size}, 2x4 P('data','model')", ours_s, "orbax", peer_s,
                        {"ratio range": _ratio_range(ours, peer),
                         "GB/s spmd": gbps(nbytes, ours_s), "GB/s orbax": gbps(nbytes, peer_s),
                         "x disk bound spmd": round(ours_s / bound_s, 2),
                         "x disk bound orbax": round(peer_s / bound_s, 2)}))
    return rows
