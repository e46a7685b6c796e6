"""The sharding compiler against jax.jit, side by side.

- ``compiler_compile``: trace + propagate + lower of a generated 1000-equation program
  (Megatron MLP blocks on a 2x4 mesh) against ``jax.jit(...).lower(...).compile()``.
- ``compiler_mlp_step``: one DP x TP training step of an MLP (forward, backward, SGD update)
  on a 2x4 mesh, ``spmd.jit`` against ``jax.jit`` with the same shardings.
- ``compiler_collectives``: per program of the compiler's test table, the collectives and
  bytes per device spmd inserts against those in JAX's compiled HLO (no timings: the
  comparison is in the extra columns).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

import spmd
from spmd import NamedSharding, P
from ._harness import Row, benchmark, jax_peer, skip_rows, timeit, timeit_pair


def _jax(name, case):
    jax, why = jax_peer(8)
    return (jax, None) if jax else (None, skip_rows(name, case, "jax", why))


def _jax_mesh(jax):
    """A 2x4 JAX mesh with automatic (propagated) shardings, as spmd.jit works."""
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def blocks(xp, x, w1, b1, w2, n_blocks):
    """``n_blocks`` residual Megatron MLP blocks: 6 equations each."""
    for _ in range(n_blocks):
        x = x + xp.tanh(x @ w1 + b1) @ w2
    return x


@benchmark("compiler_compile")
def compile_time(quick: bool) -> list[Row]:
    name = "compiler_compile"
    n_blocks = 20 if quick else 167
    d, h = 16, 64
    rng = np.random.default_rng(0)
    args = [rng.normal(size=s).astype(np.float32) for s in ((8, d), (d, h), (h,), (h, d))]
    mesh = spmd.make_mesh((2, 4), ("data", "model"), (spmd.AxisType.Auto,) * 2)
    specs = (P("data"), P(None, "model"), P("model"), P("model"))
    ins = tuple(NamedSharding(mesh, s) for s in specs)
    fn = lambda *a: blocks(np, *a, n_blocks)

    def ours():
        return spmd.jit(fn, in_shardings=ins, out_shardings=ins[0]).lower(*args)
    lowered = ours()
    n_eqns = len(lowered.compiled.program.eqns)
    n_coll = len(lowered.compiled.inserted)
    ours_s = timeit(ours, repeat=3 if quick else 5, min_time=0.0, warmup=1)
    # CPU seconds of this process too: wall time on a shared machine counts other processes
    t0 = time.process_time()
    ours()
    ours_cpu = time.process_time() - t0
    case = f"trace+propagate+lower, {n_eqns} equations"
    jax, skip = _jax(name, case)
    if jax is None:
        return [Row(name, case, ours_s, "jax", None, {"collectives": n_coll})] + skip
    import jax.numpy as jnp
    from jax.sharding import NamedSharding as JNS, PartitionSpec as JP
    jmesh = _jax_mesh(jax)
    jins = tuple(JNS(jmesh, JP(*s)) for s in specs)
    # a fresh function each time, so that JAX's caches do not answer
    theirs = lambda: jax.jit(lambda *a: blocks(jnp, *a, n_blocks), in_shardings=jins,
                             out_shardings=jins[0]).lower(*args).compile()
    jax_s = timeit(theirs, repeat=3 if quick else 5, min_time=0.0, warmup=1)
    t0 = time.process_time()
    theirs()
    jax_cpu = time.process_time() - t0
    return [Row(name, case, ours_s, "jax lower+compile", jax_s,
                {"equations": n_eqns, "collectives": n_coll, "target_s": 0.5,
                 "cpu_s spmd": round(ours_cpu, 3), "cpu_s jax": round(jax_cpu, 3)})]


def mlp_loss(xp, params, x, y):
    w1, b1, w2 = params
    return xp.mean((xp.tanh(x @ w1 + b1) @ w2 - y) ** 2)


@benchmark("compiler_mlp_step")
def mlp_step(quick: bool) -> list[Row]:
    name = "compiler_mlp_step"
    batch, d, h = (16, 32, 64) if quick else (256, 512, 2048)
    rng = np.random.default_rng(0)
    params = tuple(rng.normal(size=s).astype(np.float32) * 0.05 for s in ((d, h), (h,), (h, d)))
    x = rng.normal(size=(batch, d)).astype(np.float32)
    y = rng.normal(size=(batch, d)).astype(np.float32)
    mesh = spmd.make_mesh((2, 4), ("data", "model"), (spmd.AxisType.Auto,) * 2)
    pspecs = (P(None, "model"), P("model"), P("model"))
    S = lambda s: NamedSharding(mesh, s)

    def step(params, x, y):
        g = spmd.grad(lambda p: mlp_loss(np, p, x, y))(params)
        return tuple(p - 0.1 * gi for p, gi in zip(params, g))
    f = spmd.jit(step, in_shardings=(tuple(map(S, pspecs)), S(P("data")), S(P("data"))),
                 out_shardings=tuple(map(S, pspecs)))
    p_s = spmd.device_put(params, tuple(map(S, pspecs)))
    x_s, y_s = spmd.device_put(x, S(P("data"))), spmd.device_put(y, S(P("data")))
    out = f(p_s, x_s, y_s)
    timing = dict(repeat=3, min_time=0.0) if quick else dict(repeat=7, min_time=0.2)
    ours_s = timeit(lambda: f(p_s, x_s, y_s), **timing)
    case = f"DPxTP MLP step, batch {batch}, {d}->{h}->{d}, 2x4 mesh"
    kinds = sorted(f"{k}({','.join(a)})" for k, a in f.lower(p_s, x_s, y_s).collectives())
    jax, skip = _jax(name, case)
    if jax is None:
        return [Row(name, case, ours_s, "jax", None, {"collectives": kinds})] + skip
    import jax.numpy as jnp
    from jax.sharding import NamedSharding as JNS, PartitionSpec as JP
    jmesh = _jax_mesh(jax)
    JS = lambda s: JNS(jmesh, JP(*s))

    def jstep(params, x, y):
        g = jax.grad(lambda p: mlp_loss(jnp, p, x, y))(params)
        return tuple(p - 0.1 * gi for p, gi in zip(params, g))
    jf = jax.jit(jstep, in_shardings=(tuple(map(JS, pspecs)), JS(P("data")), JS(P("data"))),
                 out_shardings=tuple(map(JS, pspecs)))
    jp = jax.device_put(params, tuple(map(JS, pspecs)))
    jx, jy = jax.device_put(x, JS(P("data"))), jax.device_put(y, JS(P("data")))
    jout = jf(jp, jx, jy)
    for a, b in zip(out, jout):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)
    ours_s, jax_s = timeit_pair(lambda: f(p_s, x_s, y_s), lambda: jax.block_until_ready(jf(jp, jx, jy)),
                                **timing)
    cpu = {}
    for who, fn in (("spmd", lambda: f(p_s, x_s, y_s)), ("jax", lambda: jax.block_until_ready(jf(jp, jx, jy)))):
        t0 = time.process_time()
        for _ in range(3):
            fn()
        cpu[f"cpu_s {who}"] = round((time.process_time() - t0) / 3, 4)
    return [Row(name, case, ours_s, "jax.jit", jax_s, {"collectives": kinds, "target_ratio": 1.0, **cpu})]


@benchmark("compiler_collectives")
def collectives_vs_jax(quick: bool) -> list[Row]:
    name = "compiler_collectives"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tests"))
    try:
        import compiler_programs as table
    finally:
        sys.path.pop(0)
    jax, skip = _jax(name, "program table")
    if jax is None:
        return skip
    import jax.numpy as jnp
    from jax.sharding import NamedSharding as JNS, PartitionSpec as JP
    rows = []
    for row in table.ROWS if not quick else table.ROWS[:4]:
        if not row.jax:
            continue
        sizes, names = row.mesh
        n = int(np.prod(sizes))
        mesh = spmd.make_mesh(sizes, names, (spmd.AxisType.Auto,) * len(names),
                              devices=spmd.devices()[:n])
        jmesh = jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(sizes), names)
        args = table.make_args(row)
        f = spmd.jit(lambda *a: row.fn(np, *a), in_shardings=tuple(NamedSharding(mesh, P(*s)) for s in row.in_specs),
                     out_shardings=table.out_shardings(row, mesh, NamedSharding, P))
        comp = f.lower(*args).compiled
        jf = jax.jit(lambda *a: row.fn(jnp, *a), in_shardings=tuple(JNS(jmesh, JP(*s)) for s in row.in_specs),
                     out_shardings=table.out_shardings(row, jmesh, JNS, JP))
        theirs = table.hlo_collectives(jf.lower(*args).compile().as_text())
        ours_b = sum(i.nbytes for i in comp.inserted)
        jax_b = sum(b for _, b in theirs)
        rows.append(Row(name, row.name, None, "jax", None, {
            "spmd": [f"{k}({','.join(a)})" for k, a in comp.collectives()],
            "jax": [k for k, _ in theirs],
            "bytes spmd": ours_b, "bytes jax": jax_b,
            "cheaper": len(comp.inserted) < len(theirs) or ours_b < jax_b}))
    return rows
