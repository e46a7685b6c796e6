"""Training steps of the parallelism recipes (``spmd.parallel``) against the same steps written
by hand with ``jax.shard_map``: data parallelism, FSDP, tensor parallelism and GPipe.

Each case is one jitted ``value_and_grad`` of a tanh MLP on 8 simulated CPU devices. The JAX
side spells out the same collectives (``pmean`` per gradient, tiled ``all_gather`` per layer,
column/row-parallel ``psum``, a ``ppermute`` per pipeline tick) and the same program (GPipe's
ticks as one ``lax.scan``, as ``pipeline.gpipe`` runs them); values and gradients are
checked equal before timing.
"""
from __future__ import annotations

import numpy as np

import spmd
from spmd import P
from spmd.parallel import data, fsdp, pipeline, tensor
from ._harness import Row, benchmark, jax_peer, timeit_pair

NAME = "parallel"


def _layer(p, h):
    return np.tanh(h @ p["w"] + p["b"])


def _params(layers, d, seed=0):
    rng = np.random.default_rng(seed)
    return {"w": (rng.standard_normal((layers, d, d)) / np.sqrt(d)).astype(np.float32),
            "b": np.zeros((layers, d), np.float32)}


def _tp_params(layers, d, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-2])).astype(np.float32)
    return {"w1": f32(layers, d, 4 * d), "w2": f32(layers, 4 * d, d)}


def _spmd_cases(layers):
    """name -> (loss body over one device's blocks, in_specs of the parameters, mesh shape)."""
    def dp(p, x, y):
        h = x
        for i in range(layers):
            h = _layer({k: v[i] for k, v in p.items()}, h)
        return np.mean((h - y) ** 2)

    def fsdp_loss(p, x, y):
        shards = [{k: v[i] for k, v in p.items()} for i in range(layers)]
        return np.mean((fsdp.fsdp_apply(_layer, shards, x, "data") - y) ** 2)

    def tp(p, x, y):
        for i in range(layers):
            h = np.tanh(tensor.column_parallel_linear(x, p["w1"][i]))
            x = x + tensor.row_parallel_linear(h, p["w2"][i], "model")
        return np.mean((x - y) ** 2)

    def pp(p, x, y):
        out = pipeline.gpipe(_layer, {k: v[0] for k, v in p.items()},
                             x.reshape(4, -1, x.shape[-1]), "data")
        return np.mean((out.reshape(y.shape) - y) ** 2)
    return {"DP": (dp, P()), "FSDP": (fsdp_loss, P(None, "data")),
            "TP": (tp, {"w1": P(None, None, "model"), "w2": P(None, "model")}),
            "PP (GPipe, 4 microbatches)": (pp, P("data"))}


def _spmd_step(name, loss, spec):
    """A jitted ``(loss, grads)`` step of ``loss`` over a mesh of 8."""
    axes = ("model",) if name == "TP" else ("data",)
    mesh = spmd.make_mesh((8,), axes)
    batch_spec = P("data") if name in ("DP", "FSDP") else P()

    def body(p, x, y):
        if name == "DP":
            value, grads = spmd.value_and_grad(loss)(spmd.pvary(p, "data"), x, y)
            return spmd.pmean(value, "data"), data.mean_gradients(grads, "data")
        if name == "FSDP":
            return spmd.value_and_grad(lambda p, x, y: spmd.pmean(loss(p, x, y), "data"))(p, x, y)
        return spmd.value_and_grad(loss)(p, x, y)
    specs = (spec, batch_spec, batch_spec)
    step = spmd.jit(spmd.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(), spec)))
    return step, lambda *args: spmd.tree_util.tree_map(
        lambda s, a: spmd.device_put(a, spmd.NamedSharding(mesh, s)), specs, args,
        is_leaf=lambda s: isinstance(s, P))


def _jax_step(jax, name, layers):
    jnp, lax = jax.numpy, jax.lax
    JP = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((8,), ("model",) if name == "TP" else ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    layer = lambda w, b, h: jnp.tanh(h @ w + b)

    if name == "DP":
        def body(p, x, y):
            def loss(p):
                h = x
                for i in range(layers):
                    h = layer(p["w"][i], p["b"][i], h)
                return jnp.mean((h - y) ** 2)
            value, grads = jax.value_and_grad(loss)(lax.pcast(p, "data", to="varying"))
            return lax.pmean(value, "data"), jax.tree.map(lambda g: lax.pmean(g, "data"), grads)
        spec, batch = JP(), JP("data")
    elif name == "FSDP":
        def body(p, x, y):
            def loss(p):
                h = x
                for i in range(layers):
                    w, b = (lax.all_gather(p[k][i], "data", axis=0, tiled=True)
                            for k in ("w", "b"))
                    h = layer(w, b, h)
                return lax.pmean(jnp.mean((h - y) ** 2), "data")
            return jax.value_and_grad(loss)(p)
        spec, batch = JP(None, "data"), JP("data")
    elif name == "TP":
        def body(p, x, y):
            def loss(p):
                h = x
                for i in range(layers):
                    h = h + lax.psum(jnp.tanh(h @ p["w1"][i]) @ p["w2"][i], "model")
                return jnp.mean((h - y) ** 2)
            return jax.value_and_grad(loss)(p)
        spec, batch = {"w1": JP(None, None, "model"), "w2": JP(None, "model")}, JP()
    else:
        # GPipe as spmd.parallel.pipeline.gpipe writes it: the first tick, then the other
        # ticks as one lax.scan, then the last stage's outputs psummed to every stage
        def body(p, x, y):
            def loss(p):
                me, n = lax.axis_index("data"), 8
                mbs = x.reshape(4, -1, x.shape[-1])
                forward = [(s, s + 1) for s in range(n - 1)]
                stage = lambda h: layer(p["w"][0], p["b"][0], h)

                def tick(arrived, fed):
                    h = stage(jnp.where(me == 0, fed, arrived))
                    return lax.ppermute(h, "data", forward), h
                first = stage(jnp.where(me == 0, mbs[0], jnp.zeros_like(mbs[0])))
                drain = jnp.zeros((n - 1,) + mbs.shape[1:], mbs.dtype)
                _, ys = lax.scan(tick, lax.ppermute(first, "data", forward),
                                 jnp.concatenate([mbs[1:], drain]))
                out = jnp.concatenate([first[None], ys])[n - 1:]
                out = lax.psum(jnp.where(me == n - 1, out, jnp.zeros_like(out)), "data")
                return jnp.mean((out.reshape(y.shape) - y) ** 2)
            return jax.value_and_grad(loss)(p)
        spec, batch = JP("data"), JP()
    specs = (spec, batch, batch)
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(JP(), spec)))
    return step, lambda *args: jax.tree.map(
        lambda s, a: jax.device_put(a, jax.sharding.NamedSharding(mesh, s)), specs, args,
        is_leaf=lambda s: isinstance(s, JP))


@benchmark(NAME)
def parallel_steps(quick: bool) -> list[Row]:
    layers, d, batch = (2, 16, 32) if quick else (4, 256, 256)
    timing = dict(repeat=3, min_time=0.0) if quick else dict(repeat=7, min_time=0.3)
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal((batch, d)).astype(np.float32) for _ in range(2))
    jax, why = jax_peer(8)
    rows = []
    for name, (loss, spec) in _spmd_cases(layers).items():
        pp = name.startswith("PP")
        params = (_tp_params if name == "TP" else _params)(8 if pp else layers, d)
        case = f"{name}: value_and_grad, {8 if pp else layers} layers of {d}, batch {batch}"
        step, place = _spmd_step(name, loss, spec)
        args = place(params, x, y)
        value, grads = step(*args)
        if why:
            rows.append(Row(NAME, case, None, "jax", None, {"skipped": why}))
            continue
        jstep, jplace = _jax_step(jax, name, layers)
        jargs = jplace(params, x, y)
        jvalue, jgrads = jstep(*jargs)
        np.testing.assert_allclose(np.asarray(value), np.asarray(jvalue), rtol=1e-4)
        for k in params:
            np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(jgrads[k]), rtol=2e-3,
                                       atol=1e-5)
        collectives = len(spmd.collectives_of(spmd.make_program(step)(*args)))
        ours, theirs = timeit_pair(lambda: step(*args),
                                   lambda: jax.block_until_ready(jstep(*jargs)), **timing)
        rows.append(Row(NAME, case, ours, "jax", theirs, {"collectives": collectives}))
    return rows
