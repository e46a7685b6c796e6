"""Collective bandwidth on GPUs: algorithm and bus bandwidth (the nccl-tests formulas: all-reduce
x 2(n-1)/n, all-gather / reduce-scatter / all-to-all x (n-1)/n) from 8 KiB to 256 MiB per rank.

- virtual devices (the stacked executor on one GPU): each collective's stacked rule on a CuPy
  array, the fused reduce kernel for psum against CuPy's generic reduction, next to a CuPy copy
  of the same bytes (the HBM bound);
- several GPUs: the NCCL communicator, the peer-memory one-/two-shot all-reduce kernels against
  NCCL at the sizes they are chosen for, and JAX on the same GPUs where it has a GPU backend.

Times are host wall-clock per call with the GPUs synchronised (so they include launch cost,
which is what a user of small collectives pays).  Without a GPU it returns one skip row.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ._harness import Row, benchmark, skip_rows, timeit

NAME = "gpu_collectives"
FULL_SIZES = [8 * 2**10 * 4**k for k in range(8)] + [256 * 2**20]      # 8 KiB .. 256 MiB
QUICK_SIZES = [8 * 2**10, 2**20]
VIRTUAL = 8


def _size(nbytes):
    return f"{nbytes // 2**20} MiB" if nbytes >= 2**20 else f"{nbytes // 2**10} KiB"


def _bw(op, nbytes, seconds, n):
    """``nbytes`` per rank in; nccl-tests counts an all-gather by its gathered output."""
    from spmd.gpu.index_math import bandwidth
    alg, bus = bandwidth(op, nbytes * n if op == "all_gather" else nbytes, seconds, n)
    return {"algbw GB/s": round(alg, 2), "busbw GB/s": round(bus, 2)}


@benchmark(NAME, gpu=True)
def gpu_collectives(quick: bool) -> list[Row]:
    import spmd.gpu as gpu
    ok, why = gpu.available()
    if not ok:
        return skip_rows(NAME, "all collectives", "-", f"no usable GPU: {why}")
    sizes = QUICK_SIZES if quick else FULL_SIZES
    timing = dict(repeat=3, min_time=0.0) if quick else dict(repeat=7, min_time=0.1)
    rows = _virtual_rows(sizes, timing)
    n = gpu.gpu_count()
    if n < 2:
        rows += skip_rows(NAME, "NCCL / peer kernels", "nccl", f"needs 2 GPUs, this machine has {n}")
    else:
        rows += _multi_gpu_rows(sizes, timing, n)
    return rows


def _virtual_rows(sizes, timing):
    import cupy

    from spmd.collectives import all_gather_p, all_to_all_p, ppermute_p, psum_p, psum_scatter_p
    from spmd.gpu import stacked

    def sync(fn):
        def run():
            fn()
            cupy.cuda.get_current_stream().synchronize()
        return run

    class _Mesh:                                          # the two fields the stacked rules read
        axis_names, axis_sizes = ("i",), (VIRTUAL,)

    mesh = _Mesh()
    n = VIRTUAL
    rows = []
    for nbytes in sizes:
        per = nbytes // 4
        x = cupy.random.random((n, per), dtype=np.float32)
        dst = cupy.empty_like(x)
        copy_s = timeit(sync(lambda: cupy.copyto(dst, x)), **timing)
        chunked = x.reshape(n, n, per // n) if per % n == 0 else None
        ax = dict(axes=("i",))
        cases = [
            ("all_reduce", "psum (fused reduce kernel)",
             lambda: stacked.KERNEL_RULES[psum_p](cupy, mesh, x, **ax)),
            ("all_reduce", "psum (CuPy generic)", lambda: psum_p.rules["stacked"](cupy, mesh, x, **ax)),
            ("all_gather", "all_gather tiled",
             lambda: cupy.ascontiguousarray(all_gather_p.rules["stacked"](
                 cupy, mesh, x, **ax, axis=0, tiled=True, groups=None, to="varying", size=n))),
        ]
        if chunked is not None:
            cases += [
                ("reduce_scatter", "psum_scatter",
                 lambda: cupy.ascontiguousarray(psum_scatter_p.rules["stacked"](
                     cupy, mesh, chunked, **ax, scatter_dimension=0, tiled=False, groups=None, size=n))),
                ("all_to_all", "all_to_all",
                 lambda: cupy.ascontiguousarray(all_to_all_p.rules["stacked"](
                     cupy, mesh, chunked, **ax, split_axis=0, concat_axis=0, tiled=False, groups=None,
                     size=n))),
            ]
        cases.append(("permute", "ppermute shift",
                      lambda: cupy.ascontiguousarray(ppermute_p.rules["stacked"](
                          cupy, mesh, x, **ax, perm=tuple((i, (i + 1) % n) for i in range(n))))))
        for op, label, fn in cases:
            t = timeit(sync(fn), **timing)
            rows.append(Row(NAME, f"{label} {_size(nbytes)}/device, {n} virtual devices", t,
                            "cupy copy (HBM bound)", copy_s, _bw(op, nbytes, t, n)))
    return rows


def _multi_gpu_rows(sizes, timing, n_gpus):
    import cupy

    import spmd
    from spmd.gpu import index_math as im
    from spmd.communicators.nccl import NcclCommunicator

    saved = os.environ.pop("SPMD_VIRTUAL_DEVICES", None)
    n = min(n_gpus, 8)
    mesh = spmd.make_mesh((n,), ("i",), devices=spmd.devices("gpu")[:n])
    rows = []
    with NcclCommunicator.for_mesh(mesh) as comm:
        def sync(fn):
            def run():
                fn()
                for p in comm.local_positions:
                    with cupy.cuda.Device(p):
                        cupy.cuda.get_current_stream().synchronize()
            return run

        for nbytes in sizes:
            per = nbytes // 4
            bufs = {p: comm.placement.call(p, lambda xp: xp.random.random(per, dtype=np.float32))
                    for p in comm.local_positions}
            chunked = {p: b.reshape(n, -1) for p, b in bufs.items()} if per % n == 0 else None
            jax_s = _jax_seconds(n, per, timing)
            os.environ["SPMD_GPU_KERNELS"] = "0"          # NCCL only
            try:
                calls = [("all_reduce", lambda: comm.all_reduce(bufs, ("i",), None, "sum")),
                         ("all_gather", lambda: comm.all_gather(bufs, ("i",), None))]
                if chunked is not None:
                    calls += [("reduce_scatter", lambda: comm.reduce_scatter(chunked, ("i",), None, "sum")),
                              ("all_to_all", lambda: comm.all_to_all(chunked, ("i",), None))]
                nccl_s = {}
                for op, fn in calls:
                    nccl_s[op] = t = timeit(sync(fn), **timing)
                    peer = jax_s.get(op) if isinstance(jax_s, dict) else None
                    rows.append(Row(NAME, f"{op} {_size(nbytes)}/GPU, NCCL x{n}", t, "jax", peer,
                                    {**_bw(op, nbytes, t, n),
                                     **({"jax": jax_s} if isinstance(jax_s, str) else {})}))
            finally:
                os.environ.pop("SPMD_GPU_KERNELS", None)
            algo = im.choose_all_reduce(nbytes, n, 4, peer_ok=True, aligned=True)
            if algo != "nccl":
                t = timeit(sync(lambda: comm.all_reduce(bufs, ("i",), None, "sum")), **timing)
                rows.append(Row(NAME, f"all_reduce {_size(nbytes)}/GPU, peer {algo} kernel x{n}", t,
                                "nccl", nccl_s["all_reduce"], _bw("all_reduce", nbytes, t, n)))
    if saved is not None:
        os.environ["SPMD_VIRTUAL_DEVICES"] = saved
    return rows


def _jax_seconds(n, per, timing):
    """JAX's time for each collective on ``n`` GPUs, or a string saying why there is none."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return "JAX_PLATFORMS=cpu (the benchmarks' default): run with JAX_PLATFORMS= to let JAX use the GPUs"
    try:
        import jax
        from jax.sharding import PartitionSpec as JP
        gpus = jax.devices("gpu")
    except Exception as e:                               # no jax, or no GPU backend in it
        return f"no JAX GPU backend ({type(e).__name__}); pip install 'jax[cuda12]'"
    if len(gpus) < n:
        return f"JAX sees {len(gpus)} GPUs"
    mesh = jax.make_mesh((n,), ("i",), devices=gpus[:n])
    x = jax.device_put(np.ones(n * per, np.float32), jax.sharding.NamedSharding(mesh, JP("i")))
    lax = jax.lax
    bodies = {"all_reduce": lambda b: lax.psum(b, "i"),
              "all_gather": lambda b: lax.all_gather(b, "i", tiled=True)}
    if per % n == 0:
        bodies["reduce_scatter"] = lambda b: lax.psum_scatter(b, "i", tiled=True)
        bodies["all_to_all"] = lambda b: lax.all_to_all(b, "i", 0, 0, tiled=True)
    out = {}
    for op, body in bodies.items():
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=JP("i"), out_specs=JP("i"), check_vma=False))
        f(x).block_until_ready()
        out[op] = timeit(lambda: f(x).block_until_ready(), **timing)
    return out
