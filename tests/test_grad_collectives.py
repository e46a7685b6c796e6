"""Gradients through shard_map and every collective.

Each row is a shard_map body written once against a namespace of collectives (``C``: spmd's
or JAX's, see ``_jax_oracle``), run on 1-D and 2-D meshes over single axes and axis tuples.
The loss is a scalar function of the global output (every device's value, ``y[None]`` with
``out_specs`` over all mesh axes).  For each row and mesh:

- ``spmd.grad`` equals ``jax.grad`` of the same program on 8 JAX CPU devices (float64),
- ``spmd``'s derivatives pass ``check_grads`` (central differences of the global function,
  and the vjp is the transpose of the jvp),

and the backward programs of a data-parallel and a Megatron-style MLP contain exactly the
collectives they need (counted equation by equation).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import spmd
from spmd import P
from spmd.transforms.check import check_grads

from _jax_oracle import SPMD, jax_mesh, jax_namespace, jax_spec

MESHES = [((8,), ("i",), "i"), ((2, 4), ("i", "j"), "j"), ((2, 4), ("i", "j"), "i"),
          ((2, 4), ("i", "j"), ("i", "j"))]

# name -> body(C, axis, n) giving the per-device function of (x block (n, 2n), w (2n,) invariant)
ROWS = {
    "psum": lambda C, ax, n: lambda x, w: C.psum(C.np.sin(x) * w, ax),
    "pmean": lambda C, ax, n: lambda x, w: C.pmean(C.np.sin(x) * w, ax),
    "all_gather": lambda C, ax, n: lambda x, w: C.all_gather(C.np.sin(x) * w, ax),
    "all_gather_axis1": lambda C, ax, n: lambda x, w: C.all_gather(C.np.sin(x) * w, ax, axis=1),
    "all_gather_tiled": lambda C, ax, n: lambda x, w: C.all_gather(C.np.sin(x) * w, ax, axis=1, tiled=True),
    "all_gather_invariant": lambda C, ax, n: lambda x, w: C.all_gather(C.np.sin(x) * w, ax, tiled=True, to="invariant"),
    "all_gather_invariant_untiled": lambda C, ax, n: lambda x, w: C.all_gather(C.np.sin(x) * w, ax, axis=1, to="invariant"),
    "psum_scatter": lambda C, ax, n: lambda x, w: C.psum_scatter(C.np.sin(x) * w, ax),
    "psum_scatter_tiled": lambda C, ax, n: lambda x, w: C.psum_scatter(C.np.sin(x) * w, ax, scatter_dimension=1, tiled=True),
    "all_to_all": lambda C, ax, n: lambda x, w: C.all_to_all(C.np.sin(x) * w, ax, 0, 1),
    "all_to_all_tiled": lambda C, ax, n: lambda x, w: C.all_to_all(C.np.sin(x) * w, ax, 1, 0, tiled=True),
    "ppermute_cycle": lambda C, ax, n: lambda x, w: C.ppermute(C.np.sin(x) * w, ax, [(i, (i + 1) % n) for i in range(n)]),
    "ppermute_partial": lambda C, ax, n: lambda x, w: C.ppermute(C.np.sin(x) * w, ax, [(0, n - 1)]),
    "pbroadcast": lambda C, ax, n: lambda x, w: C.pbroadcast(C.np.sin(x) * w, ax, n - 1),
    "pvary": lambda C, ax, n: lambda x, w: C.pvary(w, ax) * C.np.sin(x),
    "axis_index": lambda C, ax, n: lambda x, w: C.np.sin(x) * w * (C.axis_index(ax) + 1),
    "psum_of_invariant_param": lambda C, ax, n: lambda x, w: C.psum(C.np.sum(C.np.sin(x), 0) * w, ax) * w,
}


# rows where JAX itself fails (checked against finite differences only)
JAX_CANNOT = {"all_to_all": "JAX 0.10: the transpose of an untiled all_to_all gives a cotangent "
                            "of the wrong shape (float64[8,1,16] for float64[8,16,1])"}


def _jax_run(f, *args):
    """jit ``f`` with XLA's optimisations off (the programs are tiny) and run it."""
    import jax
    return jax.jit(f).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def _group(mesh_shape, names, ax):
    axes = (ax,) if isinstance(ax, str) else ax
    return math.prod(mesh_shape[names.index(a)] for a in axes)


def _setup(row, mesh_shape, names, ax, groups=None):
    n = _group(mesh_shape, names, ax) if groups is None else len(groups[0])
    ndev = math.prod(mesh_shape)
    rng = np.random.default_rng(hash((row, mesh_shape, str(ax))) % 2 ** 32)
    x = rng.standard_normal((n * ndev, 2 * n))
    w = rng.standard_normal(2 * n)
    return n, x, w


def _spmd_loss(body, mesh, all_axes, R=None):
    f = spmd.shard_map(lambda x, w: body(x, w)[None], mesh=mesh, in_specs=(P(all_axes), P()),
                       out_specs=P(all_axes))
    if R is None:
        return f
    return lambda x, w: np.sum(np.tanh(f(x, w)) * R)


@pytest.mark.parametrize("mesh_shape,names,ax", MESHES, ids=["8", "2x4-j", "2x4-i", "2x4-ij"])
@pytest.mark.parametrize("row", list(ROWS))
def test_grad_matches_jax_and_finite_differences(row, mesh_shape, names, ax):
    import jax
    import jax.numpy as jnp
    mesh = spmd.make_mesh(mesh_shape, names)
    n, x, w = _setup(row, mesh_shape, names, ax)
    body = ROWS[row]
    out = np.asarray(_spmd_loss(body(SPMD, ax, n), mesh, names)(x, w))
    R = np.random.default_rng(7).standard_normal(out.shape)
    loss = _spmd_loss(body(SPMD, ax, n), mesh, names, R)
    gx, gw = spmd.grad(loss, argnums=(0, 1))(x, w)

    check_grads(loss, (x, w), order=1, modes=("fwd", "rev"), rtol=1e-5, atol=1e-6)
    if row in JAX_CANNOT:
        return
    J = jax_namespace()
    jf = jax.shard_map(lambda x, w: body(J, ax, n)(x, w)[None], mesh=jax_mesh(mesh_shape, names),
                       in_specs=(jax_spec(P(names)), jax_spec(P())), out_specs=jax_spec(P(names)))
    with jax.enable_x64(True):
        jgx, jgw = _jax_run(jax.grad(lambda x, w: jnp.sum(jnp.tanh(jf(x, w)) * R), argnums=(0, 1)), x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(jgx), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(jgw), rtol=1e-10, atol=1e-12)


GROUP_ROWS = {
    "psum": lambda C, ax, n, g: lambda x, w: C.psum(C.np.sin(x) * w, ax, axis_index_groups=g),
    "all_gather": lambda C, ax, n, g: lambda x, w: C.all_gather(C.np.sin(x) * w, ax, axis_index_groups=g),
    "all_gather_tiled": lambda C, ax, n, g: lambda x, w: C.all_gather(C.np.sin(x) * w, ax, axis=1, tiled=True, axis_index_groups=g),
    "psum_scatter": lambda C, ax, n, g: lambda x, w: C.psum_scatter(C.np.sin(x) * w, ax, axis_index_groups=g),
    "psum_scatter_tiled": lambda C, ax, n, g: lambda x, w: C.psum_scatter(C.np.sin(x) * w, ax, scatter_dimension=1, tiled=True, axis_index_groups=g),
    "all_to_all": lambda C, ax, n, g: lambda x, w: C.all_to_all(C.np.sin(x) * w, ax, 0, 1, axis_index_groups=g),
}


@pytest.mark.parametrize("row", list(GROUP_ROWS))
def test_grad_under_axis_index_groups(row):
    """Sub-group collectives (JAX has no vma typing for them): against finite differences and
    the transpose identity, on a 1-D mesh and over an axis tuple of a 2-D mesh."""
    for mesh_shape, names, ax, groups in [((8,), ("i",), "i", ((0, 1, 2, 3), (4, 5, 6, 7))),
                                         ((8,), ("i",), "i", ((0, 5), (1, 4), (2, 7), (3, 6))),
                                         ((2, 4), ("i", "j"), ("i", "j"), ((0, 2, 4, 6), (1, 3, 5, 7)))]:
        mesh = spmd.make_mesh(mesh_shape, names)
        n, x, w = _setup(row, mesh_shape, names, ax, groups)
        body = GROUP_ROWS[row](SPMD, ax, n, groups)
        out = np.asarray(_spmd_loss(body, mesh, names)(x, w))
        R = np.random.default_rng(3).standard_normal(out.shape)
        check_grads(_spmd_loss(body, mesh, names, R), (x, w), order=1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["pmax", "pmin"])
def test_pmax_pmin_gradient_is_a_clear_error(op):
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])
    f = spmd.shard_map(lambda x: getattr(spmd, op)(x, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    with pytest.raises(NotImplementedError, match=f"{op} has no gradient"):
        spmd.grad(lambda x: np.sum(f(x)))(np.arange(8.))
    # no tangent flowing through it: fine
    g = spmd.grad(lambda x, y: np.sum(f(y) * x))(np.ones(2), np.arange(8.))
    np.testing.assert_allclose(np.asarray(g), np.asarray(f(np.arange(8.))))


def test_second_order_through_shard_map():
    mesh = spmd.make_mesh((2, 4), ("i", "j"))
    f = spmd.shard_map(lambda x, w: spmd.psum(np.sum(np.sin(x * w)), ("i", "j")), mesh=mesh,
                       in_specs=(P("i", "j"), P()), out_specs=P())
    x, w = np.random.default_rng(0).standard_normal((4, 8)), np.array(0.7)
    check_grads(f, (x, w), order=2, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# invariant (P() / closed-over) parameters: global gradient by default, per-device on request
# ---------------------------------------------------------------------------------------------

def test_gradient_of_invariant_params_is_the_global_gradient():
    mesh = spmd.make_mesh((4,), ("data",), devices=spmd.devices()[:4])
    rng = np.random.default_rng(1)
    x, w, v = rng.standard_normal((8, 3)), rng.standard_normal(3), rng.standard_normal(3)

    def loss(w, v, x):
        # w enters with P(); v is closed over
        return spmd.shard_map(lambda w, xb: spmd.psum(np.sum(np.tanh(xb @ (w * v))), "data"),
                              mesh=mesh, in_specs=(P(), P("data")), out_specs=P())(w, x)
    glob = lambda w, v, x: np.sum(np.tanh(x @ (w * v)))
    gw, gv = spmd.grad(loss, argnums=(0, 1))(w, v, x)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(spmd.grad(glob)(w, v, x)))
    np.testing.assert_allclose(np.asarray(gv), np.asarray(spmd.grad(glob, argnums=1)(w, v, x)))


def test_per_device_gradients_recipe():
    """grad inside the body of a *varying* copy of the parameter (``pvary``): each device's
    gradient of its own block's loss (the docstring of spmd.transforms.api); their sum is the
    global gradient.  Without the pvary the parameter stays invariant and its gradient is the
    global one, already summed."""
    mesh = spmd.make_mesh((4,), ("data",), devices=spmd.devices()[:4])
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((8, 3)), rng.standard_normal(3)
    local_loss = lambda w, xb: np.sum(np.tanh(xb @ w))
    per_device = spmd.shard_map(lambda w, xb: spmd.grad(local_loss)(spmd.pvary(w, "data"), xb)[None],
                                mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))(w, x)
    per_device = np.asarray(per_device)
    summed = spmd.shard_map(lambda w, xb: spmd.grad(local_loss)(w, xb), mesh=mesh,
                            in_specs=(P(), P("data")), out_specs=P())(w, x)
    np.testing.assert_allclose(np.asarray(summed), np.asarray(spmd.grad(local_loss)(w, x)))
    for d in range(4):
        np.testing.assert_allclose(per_device[d], np.asarray(spmd.grad(local_loss)(w, x[2 * d:2 * d + 2])))
    np.testing.assert_allclose(per_device.sum(0), np.asarray(spmd.grad(local_loss)(w, x)))


# ---------------------------------------------------------------------------------------------
# the backward pass has exactly the collectives it needs
# ---------------------------------------------------------------------------------------------

COMMUNICATING = {"psum", "pmax", "pmin", "all_gather", "psum_scatter", "all_to_all", "ppermute",
                 "pbroadcast"}


def count_collectives(program):
    """{name: count} of the communicating collectives in ``program`` and its sub-programs."""
    counts: dict[str, int] = {}

    def walk(p):
        for e in p.eqns:
            if e.prim.name in COMMUNICATING:
                counts[e.prim.name] = counts.get(e.prim.name, 0) + 1
            for sub in e.prim.subprograms(e.params):
                walk(sub)
    walk(program)
    return counts


def _backward_program(loss, *args):
    """The program of vjp's backward pass alone (the forward collectives excluded)."""
    from spmd.transforms import ad, api
    import optree
    leaves, tree = optree.tree_flatten(args)
    outs, res, linear, t_unknown, diff, *_ = api._linearize(lambda *a: loss(*a), leaves, tree, False)
    return ad.transpose_program(linear, [False] * len(res) + [True] * sum(diff), {})


def test_data_parallel_mlp_backward_has_one_psum_per_parameter():
    mesh = spmd.make_mesh((8,), ("data",))
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) for s in [(4, 8), (8,), (8, 2), (2,)]]
    x, y = rng.standard_normal((16, 4)), rng.standard_normal((16, 2))

    def body(w1, b1, w2, b2, x, y):
        h = np.tanh(x @ w1 + b1)
        return spmd.pmean(np.mean((h @ w2 + b2 - y) ** 2), "data")
    loss = lambda w1, b1, w2, b2, x, y: spmd.shard_map(
        body, mesh=mesh, in_specs=(P(),) * 4 + (P("data"), P("data")), out_specs=P())(w1, b1, w2, b2, x, y)
    fwd = count_collectives(spmd.make_program(loss)(*params, x, y))
    assert fwd == {"psum": 1}
    bwd = count_collectives(_backward_program(lambda *p: loss(*p, x, y), *params))
    assert bwd == {"psum": 4}                       # one all-reduce per parameter, nothing else
    g = spmd.grad(loss, argnums=(0, 1, 2, 3))(*params, x, y)
    glob = lambda w1, b1, w2, b2: np.mean((np.tanh(x @ w1 + b1) @ w2 + b2 - y) ** 2)
    for a, b in zip(g, spmd.grad(glob, argnums=(0, 1, 2, 3))(*params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_megatron_mlp_backward_collectives():
    """Column-parallel w1 then row-parallel w2 (one psum forward).  Gradients of the sharded
    weights need no communication; the gradient of the replicated input needs one psum."""
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((6, 8)), rng.standard_normal((8, 6))
    x = rng.standard_normal((4, 6))

    def body(x, w1, w2):
        h = np.tanh(x @ w1)
        return spmd.psum(h @ w2, "model")
    mlp = spmd.shard_map(body, mesh=mesh, in_specs=(P("data"), P(None, "model"), P("model")),
                         out_specs=P("data"))
    loss = lambda w1, w2, x: np.sum(mlp(x, w1, w2) ** 2)
    assert count_collectives(spmd.make_program(loss)(w1, w2, x)) == {"psum": 1}
    # w.r.t. the weights only: each device owns its shards, and the data axis needs one psum
    # per weight (the weights are replicated over "data")
    assert count_collectives(_backward_program(lambda a, b: loss(a, b, x), w1, w2)) == {"psum": 2}
    # w.r.t. the input only: the column-parallel matmul's transpose sums over "model"
    assert count_collectives(_backward_program(lambda x: loss(w1, w2, x), x)) == {"psum": 1}
    g = spmd.grad(loss, argnums=(0, 1, 2))(w1, w2, x)
    glob = lambda w1, w2, x: np.sum((np.tanh(x @ w1) @ w2) ** 2)
    for a, b in zip(g, spmd.grad(glob, argnums=(0, 1, 2))(w1, w2, x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_transpose_of_shard_map_is_a_shard_map():
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])
    f = spmd.shard_map(lambda x: spmd.all_gather(np.sin(x), "i", tiled=True), mesh=mesh,
                       in_specs=P("i"), out_specs=P("i"))
    prog = spmd.make_program(spmd.grad(lambda x: np.sum(f(x) ** 2)))(np.arange(8.))
    prog.check()
    names = [e.prim.name for e in prog.eqns]
    assert names.count("shard_map") == 2
    assert "psum_scatter" in str(prog)


@pytest.mark.parametrize("row", ["psum", "pmean", "all_gather", "all_gather_tiled", "psum_scatter_tiled",
                                 "all_to_all_tiled", "ppermute_cycle", "axis_index", "psum_of_invariant_param"])
def test_grad_without_vma_checking_matches_jax(row):
    """check_vma=False: no types say what is replicated; like JAX, outputs' cotangents are shared
    out and inputs' cotangents summed over the axes their specs omit."""
    import jax
    import jax.numpy as jnp
    mesh_shape, names, ax = (2, 4), ("i", "j"), "j"
    mesh = spmd.make_mesh(mesh_shape, names)
    n, x, w = _setup(row, mesh_shape, names, ax)
    body = ROWS[row]
    # the output is reduced over every axis, so it is replicated as out_specs P() promises
    summed = row in ("psum", "pmean", "psum_of_invariant_param")
    reduce = lambda C, y: C.psum(C.np.sum(y), "i" if summed else ("i", "j"))
    f = spmd.shard_map(lambda x, w: reduce(SPMD, body(SPMD, ax, n)(x, w)), mesh=mesh,
                       in_specs=(P(names), P()), out_specs=P(), check_vma=False)
    gx, gw = spmd.grad(lambda x, w: np.sin(f(x, w)), argnums=(0, 1))(x, w)
    J = jax_namespace()
    jf = jax.shard_map(lambda x, w: reduce(J, body(J, ax, n)(x, w)), mesh=jax_mesh(mesh_shape, names),
                       in_specs=(jax_spec(P(names)), jax_spec(P())), out_specs=jax_spec(P()), check_vma=False)
    with jax.enable_x64(True):
        jgx, jgw = _jax_run(jax.grad(lambda x, w: jnp.sin(jf(x, w)), argnums=(0, 1)), x, w)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(jgx), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(jgw), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("row", list(ROWS))
def test_gradient_programs_agree_on_the_reference_executor(row):
    """The transposed programs run on the reference executor (a loop over devices with naive
    collectives) and give the stacked executor's gradients."""
    from spmd.executors import reference_executor
    mesh_shape, names, ax = (2, 4), ("i", "j"), ("i", "j")
    mesh = spmd.make_mesh(mesh_shape, names)
    n, x, w = _setup(row, mesh_shape, names, ax)
    f = _spmd_loss(ROWS[row](SPMD, ax, n), mesh, names)
    R = np.random.default_rng(9).standard_normal(np.asarray(f(x, w)).shape)
    grad = spmd.grad(_spmd_loss(ROWS[row](SPMD, ax, n), mesh, names, R), argnums=(0, 1))
    for a, b in zip(spmd.jit(grad)(x, w), spmd.jit(grad, executor=reference_executor())(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


from hypothesis import given, settings  # noqa: E402
import hypothesis.strategies as st  # noqa: E402

from conftest import meshes, specs  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_property_grad_of_shard_map_is_grad_of_global_function(data):
    """Random mesh and layout of x: the gradient of ``sum(tanh(x * w) * c)`` computed per
    block inside shard_map (w replicated, a psum over the axes x is split over) equals the
    gradient of the global NumPy function, for x and for w."""
    mesh = data.draw(meshes())
    spec = data.draw(specs(mesh, 2))
    sharding = spmd.NamedSharding(mesh, spec)
    shape = tuple(n * data.draw(st.integers(1, 2)) for n in sharding.num_parts(2))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    x, w, c = rng.standard_normal(shape), rng.standard_normal(()), rng.standard_normal(shape)
    axes = tuple(mesh.axis_names)

    def local(xb, w, cb):
        v = np.sum(np.tanh(xb * w) * cb)
        split = tuple(a for a in axes if a in v.vma)    # the axes the spec splits x over
        return spmd.psum(v, split) if split else v
    f = spmd.shard_map(local, mesh=mesh, in_specs=(spec, P(), spec), out_specs=P())
    glob = lambda x, w: np.sum(np.tanh(x * w) * c)
    for a, b in zip(spmd.grad(lambda x, w: f(x, w, c), argnums=(0, 1))(x, w),
                    spmd.grad(glob, argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("row", ["all_gather_invariant", "psum_scatter_tiled", "all_to_all_tiled",
                                 "ppermute_cycle", "pbroadcast", "psum_of_invariant_param"])
def test_second_order_through_collectives(row):
    """Second derivatives differentiate the transposed programs (collectives' transposes,
    shard_map of the transposed body) once more."""
    mesh_shape, names, ax = (2, 4), ("i", "j"), "j"
    mesh = spmd.make_mesh(mesh_shape, names)
    n, x, w = _setup(row, mesh_shape, names, ax)
    if row not in ("psum_scatter_tiled", "all_to_all_tiled"):    # smaller: order 2 runs many programs
        x, w = x[:, :n], w[:n]
    f = _spmd_loss(ROWS[row](SPMD, ax, n), mesh, names)
    R = np.random.default_rng(4).standard_normal(np.asarray(f(x, w)).shape)
    check_grads(_spmd_loss(ROWS[row](SPMD, ax, n), mesh, names, R), (x, w), order=2, rtol=1e-5, atol=1e-6)
