"""The collective table of tests/test_collectives.py on MPI processes, row by row against the
simulated mesh of the same shape (computed in this process before ``initialize()``).

Inputs are small integers, so every reduction is exact in any order: results must match bit
for bit.  Two extra rows use random floats (float32 within rounding, bfloat16 moved exactly).
Then a shard_map program, a jit program with top-level operations around a shard_map, and a
jit program with in/out shardings (the sharding compiler inserts the collectives).
Prints ``OK <count>`` on success; any mismatch raises.
"""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import spmd  # noqa: E402
from spmd import P  # noqa: E402

import test_collectives as T  # noqa: E402
from _jax_oracle import SPMD, run_spmd  # noqa: E402

N = int(os.environ["SPMD_NUM_PROCESSES"])
if N == 2:
    MESHES = [((2,), ("i",), "i", None)]
else:
    MESHES = [((4,), ("i",), "i", None), ((2, 2), ("a", "b"), "a", None),
              ((2, 2), ("a", "b"), "b", None), ((2, 2), ("a", "b"), ("a", "b"), None),
              ((2, 2), ("a", "b"), ("b", "a"), None)]
GROUPED = [((4,), ("i",), "i", ((0, 2), (1, 3))), ((4,), ("i",), "i", ((3, 1), (2, 0))),
           ((2, 2), ("a", "b"), ("a", "b"), ((0, 3), (1, 2)))] if N == 4 else []


def table_cases():
    for shape, names, ax, groups in MESHES:
        for row in T.ROWS:
            yield row, shape, names, ax, groups
    for shape, names, ax, groups in GROUPED:
        for row in T.GROUP_ROWS:
            yield row, shape, names, ax, groups


def run_row(row, shape, names, ax, groups, devices):
    axes = T._axes(ax)
    n = math.prod(shape[names.index(a)] for a in axes)
    k = n if groups is None else len(groups[0])
    mesh = spmd.make_mesh(shape, names, devices=devices)
    _, x = T._input(shape, names, row.local(k), row.dtype)
    every = P(tuple(names))
    gkw = {} if groups is None else {"axis_index_groups": groups}
    out = run_spmd(lambda C, xb: T._call_with_groups(row, C, xb, ax, k, gkw)[None],
                   mesh, every, every, x)
    return spmd.distributed.process_allgather(out)


def float_cases(devices):
    """psum of random float32 (order of the sum may differ) and all_gather / psum of bfloat16."""
    mesh = spmd.make_mesh((N,), ("i",), devices=devices)
    rng = np.random.default_rng(1)
    x32 = rng.standard_normal((N * 3, 5)).astype(np.float32)
    xbf = rng.standard_normal((N * 2, 4)).astype(ml_dtypes.bfloat16)
    sm = lambda body, out: spmd.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=out)
    g = spmd.distributed.process_allgather
    return {"psum-f32": g(spmd.jit(sm(lambda b: spmd.psum(b, "i"), P()))(x32)),
            "all_gather-bf16": g(spmd.jit(sm(lambda b: spmd.all_gather(b, "i", tiled=True)[None],
                                              P("i")))(xbf)),
            "psum-bf16": g(spmd.jit(sm(lambda b: spmd.psum(b, "i"), P()))(xbf))}


def programs(devices):
    """A shard_map program and a jit program mixing global ops with a shard_map."""
    shape, names = ((N,), ("i",)) if N == 2 else ((2, 2), ("data", "model"))
    # Auto axes: the sharding compiler places the jit programs (on Explicit axes, as in JAX,
    # a contraction sharded on both sides would need an out_sharding)
    mesh = spmd.make_mesh(shape, names, devices=devices,
                          axis_types=(spmd.AxisType.Auto,) * len(shape))
    rng = np.random.default_rng(2)
    x = rng.integers(-4, 5, (8, 8)).astype(np.float64)
    w = rng.integers(-4, 5, (8, 4)).astype(np.float64)
    spec_x = P(names[0], names[-1]) if N == 4 else P(None, "i")
    spec_w = P(names[-1], None) if N == 4 else P("i", None)
    out_spec = P(names[0]) if N == 4 else P()

    def layer(xb, wb):
        y = spmd.psum(xb @ wb, names[-1])
        return np.tanh(y / 16) + 1

    f = spmd.shard_map(layer, mesh=mesh, in_specs=(spec_x, spec_w), out_specs=out_spec)
    xs = spmd.device_put(x, spmd.NamedSharding(mesh, spec_x))
    sm = spmd.distributed.process_allgather(f(xs, w))

    @spmd.jit
    def step(x, w):
        h = f(x * 2, w)                    # shard_map inside jit, global ops around it
        return (h * h).sum(axis=1), h.T @ h

    a, b = step(x, w)

    # the sharding compiler: global code, shardings in and out, collectives inserted
    row, col = (names[0], names[-1]) if N == 4 else (None, "i")
    mlp = spmd.jit(lambda x, w: np.tanh(x @ w / 16).sum(axis=1),
                   in_shardings=(spmd.NamedSharding(mesh, P(row, col)),
                                 spmd.NamedSharding(mesh, P(col, None))),
                   out_shardings=spmd.NamedSharding(mesh, P(row)))
    c = mlp(x, w)
    return {"shard_map": sm, "jit-rows": spmd.distributed.process_allgather(a),
            "jit-gram": spmd.distributed.process_allgather(b),
            "sharded-jit": spmd.distributed.process_allgather(c)}


def compute(devices):
    out = {}
    for i, (row, shape, names, ax, groups) in enumerate(table_cases()):
        out[i] = run_row(row, shape, names, ax, groups, devices)
    out.update(float_cases(devices))
    out.update(programs(devices))
    return out


simulated = compute(spmd.devices()[:N])
spmd.distributed.initialize()
assert spmd.process_count() == N and len(spmd.devices()) == N
got = compute(spmd.devices())
cases = list(table_cases())
for key, want in simulated.items():
    have = got[key]
    what = (f"{cases[key][0].id} on mesh {cases[key][1]} axes {cases[key][3]} groups {cases[key][4]}"
            if isinstance(key, int) else key)
    assert have.dtype == want.dtype, f"{what}: dtype {have.dtype} != {want.dtype}"
    if key == "psum-f32":
        np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-6, err_msg=what)
    elif key == "psum-bf16":
        # MPI sums bfloat16 in float32 and rounds once; the simulated mesh rounds each step
        np.testing.assert_allclose(have.astype(np.float32), want.astype(np.float32), atol=0.03,
                                   err_msg=what)
    else:
        np.testing.assert_array_equal(have, want, err_msg=what)
print(f"OK {len(simulated)} on {N} processes", flush=True)

# device_put / reshard of an array whose shards live in different processes
mesh = spmd.make_mesh((N,), ("i",))
y = spmd.device_put(np.arange(4.0 * N).reshape(N, 4), spmd.NamedSharding(mesh, P("i")))
z = spmd.reshard(y, spmd.NamedSharding(mesh, P(None, "i")))
assert z.addressable_shards[0].data.shape == (N, 4 // N)
np.testing.assert_array_equal(spmd.distributed.process_allgather(z), np.arange(4.0 * N).reshape(N, 4))
print("reshard OK", flush=True)
