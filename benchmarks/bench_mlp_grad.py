"""value_and_grad of a data-parallel x tensor-parallel MLP written with shard_map: spmd vs JAX.

The MLP is Megatron-style on a 2x4 mesh: the batch is split over ``data``; ``w1`` is
column-parallel and ``w2`` row-parallel over ``model`` (one psum forward); the loss is a pmean
over ``data``.  Its gradient program (spmd's transpose of the shard_map) has one psum over
``data`` per weight and nothing else.  Both sides are jitted; the time is one training step
(forward and backward) on 8 simulated CPU devices.
"""
from __future__ import annotations

import numpy as np

import spmd
from spmd import P
from ._harness import Row, benchmark, jax_peer, timeit, timeit_pair

NAME = "mlp_grad"
SPECS = dict(w1=P(None, "model"), b1=P("model"), w2=P("model", None))


def _body(C, np_):
    def body(params, x, y):
        h = np_.tanh(x @ params["w1"] + params["b1"])
        out = C.psum(h @ params["w2"], "model")
        return C.pmean(np_.mean((out - y) ** 2), "data")
    return body


def _inputs(batch, d, hidden, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
    params = {"w1": f32(d, hidden), "b1": np.zeros(hidden, np.float32), "w2": f32(hidden, d)}
    return params, f32(batch, d), f32(batch, d)


@benchmark(NAME)
def mlp_value_and_grad(quick: bool) -> list[Row]:
    sizes = [(16, 16, 32)] if quick else [(64, 128, 512), (512, 512, 2048)]
    return [row for size in sizes for row in _one_size(quick, *size)]


def _one_size(quick, batch, d, hidden) -> list[Row]:
    timing = dict(repeat=3, min_time=0.0) if quick else dict(repeat=7, min_time=0.3)
    case = f"2x4 mesh (data x model), batch {batch}, {d}->{hidden}->{d}, float32"
    params, x, y = _inputs(batch, d, hidden)

    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    put = lambda a, s: spmd.device_put(a, spmd.NamedSharding(mesh, s))
    sp = {k: put(v, SPECS[k]) for k, v in params.items()}
    sx, sy = put(x, P("data")), put(y, P("data"))
    loss = spmd.shard_map(_body(spmd, np), mesh=mesh, in_specs=(SPECS, P("data"), P("data")), out_specs=P())
    step = spmd.jit(spmd.value_and_grad(loss))
    v, g = step(sp, sx, sy)
    spmd_s = timeit(lambda: step(sp, sx, sy), **timing)
    extra = {"backward psums": _backward_psums(loss, params, x, y)}
    jax, why = jax_peer(8)
    if why:
        return [Row(NAME, case, spmd_s, "jax", None, {**extra, "skipped": why})]
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as JP
    jmesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    jspec = lambda s: JP(*s)
    jp = {k: jax.device_put(v, NamedSharding(jmesh, jspec(SPECS[k]))) for k, v in params.items()}
    jx, jy = (jax.device_put(a, NamedSharding(jmesh, JP("data"))) for a in (x, y))
    C = type("C", (), {"psum": staticmethod(jax.lax.psum), "pmean": staticmethod(jax.lax.pmean)})
    jloss = jax.shard_map(_body(C, jnp), mesh=jmesh, in_specs=({k: jspec(s) for k, s in SPECS.items()},
                                                                JP("data"), JP("data")), out_specs=JP())
    jstep = jax.jit(jax.value_and_grad(jloss))
    jv, jg = jstep(jp, jx, jy)
    np.testing.assert_allclose(np.asarray(v), np.asarray(jv), rtol=1e-4)
    for k in params:
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(jg[k]), rtol=2e-3, atol=1e-5)
    spmd_s, jax_s = timeit_pair(lambda: step(sp, sx, sy), lambda: jax.block_until_ready(jstep(jp, jx, jy)),
                                **timing)
    return [Row(NAME, case, spmd_s, "jax", jax_s, extra)]


def _backward_psums(loss, params, x, y) -> int:
    prog = spmd.make_program(spmd.value_and_grad(loss))(params, x, y)
    count = 0

    def walk(p):
        nonlocal count
        for e in p.eqns:
            count += e.prim.name == "psum"
            for sub in e.prim.subprograms(e.params):
                walk(sub)
    walk(prog)
    return count - 2                                  # the forward pass's psum and pmean
