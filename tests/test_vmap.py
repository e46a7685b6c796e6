"""``vmap``: against loops over the batch, for local programs (in_axes, out_axes, axis_size,
pytrees, nesting with jit and grad) and for every collective in the four compositions
``vmap(shard_map)``, ``shard_map(vmap)``, ``grad(vmap)`` and ``vmap(grad)``."""
from __future__ import annotations

import numpy as np
import pytest

import spmd
from spmd import P

from _jax_oracle import SPMD
from test_grad_collectives import ROWS, _setup

rng = np.random.default_rng(0)
B = 3


def test_in_axes_out_axes_pytrees():
    x, y = rng.standard_normal((4, B)), rng.standard_normal(4)
    f = lambda a, d: {"s": np.sin(a["p"]) * d, "t": np.sum(a["p"])}
    out = spmd.vmap(f, in_axes=({"p": 1}, None), out_axes={"s": 1, "t": 0})({"p": x}, y)
    for b in range(B):
        np.testing.assert_allclose(np.asarray(out["s"])[:, b], np.sin(x[:, b]) * y)
        np.testing.assert_allclose(np.asarray(out["t"])[b], np.sum(x[:, b]))


def test_axis_size_with_nothing_mapped_and_mismatch_error():
    out = spmd.vmap(lambda c: c * 2.0, in_axes=None, axis_size=4)(np.float64(3.0))
    np.testing.assert_allclose(np.asarray(out), np.full(4, 6.0))
    with pytest.raises(ValueError, match="sizes"):
        spmd.vmap(lambda a, b: a + b)(np.ones(2), np.ones(3))


@pytest.mark.parametrize("f", [
    lambda x, y: x @ y, lambda x, y: np.einsum("ij,jk->ki", x, y), lambda x, y: np.tanh(x).sum(0) * y[:, 0],
    lambda x, y: np.concatenate([x, y.T], 1), lambda x, y: np.sort(x, axis=1) + np.cumsum(y.T, 0)[:, :3],
    lambda x, y: x[np.array([1, 0])] + np.max(y), lambda x, y: np.pad(x, ((0, 1), (1, 0)))[:, ::2],
    lambda x, y: np.argmax(x, axis=1) + 1.0, lambda x, y: np.transpose(x.reshape(3, 2)) * 2,
], ids=["matmul", "einsum", "reduce", "concat", "sort_cumsum", "take", "pad_slice", "argmax", "reshape"])
@pytest.mark.parametrize("batched", ["both", "x", "y"])
def test_local_ops_against_a_loop(f, batched):
    x, y = rng.standard_normal((B, 2, 3)), rng.standard_normal((B, 3, 2))
    in_axes = {"both": (0, 0), "x": (0, None), "y": (None, 0)}[batched]
    xs = [x[b] if in_axes[0] is not None else x[0] for b in range(B)]
    ys = [y[b] if in_axes[1] is not None else y[0] for b in range(B)]
    out = spmd.vmap(f, in_axes=in_axes)(x if in_axes[0] is not None else x[0], y if in_axes[1] is not None else y[0])
    np.testing.assert_allclose(np.asarray(out), np.stack([f(a, c) for a, c in zip(xs, ys)]))


def test_take_with_batched_indices_and_operand():
    x, i = rng.standard_normal((B, 5, 2)), rng.integers(0, 5, (B, 4))
    out = spmd.vmap(lambda x, i: np.take(x, i, axis=0))(x, i)
    np.testing.assert_allclose(np.asarray(out), np.stack([np.take(x[b], i[b], axis=0) for b in range(B)]))


def test_vmap_jit_grad_nest():
    W, xs = rng.standard_normal((3, 2)), rng.standard_normal((B, 4, 3))
    loss = lambda W, x: np.sum(np.tanh(x @ W) ** 2)
    per_example = spmd.jit(spmd.vmap(spmd.grad(loss), in_axes=(None, 0)))(W, xs)
    np.testing.assert_allclose(np.asarray(per_example), np.stack([np.asarray(spmd.grad(loss)(W, x)) for x in xs]))
    hess = spmd.vmap(spmd.jacfwd(spmd.grad(lambda v: np.sum(np.sin(v) * v))))(rng.standard_normal((B, 2)))
    assert np.asarray(hess).shape == (B, 2, 2)
    prog = spmd.make_program(spmd.vmap(spmd.grad(loss), in_axes=(None, 0)))(W, xs)
    prog.check()


# ---------------------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------------------

MESHES = [((8,), ("i",), "i"), ((2, 4), ("i", "j"), ("i", "j")), ((2, 4), ("i", "j"), "j")]
IDS = ["8", "2x4-ij", "2x4-j"]


def _per_device(row, mesh, names, ax, n, vmap_inside=False):
    body = ROWS[row](SPMD, ax, n)
    if vmap_inside:
        inner = lambda x, w: spmd.vmap(body, in_axes=(0, None))(x, w)[None]
        return spmd.shard_map(inner, mesh=mesh, in_specs=(P(None, names), P()), out_specs=P(names))
    return spmd.shard_map(lambda x, w: body(x, w)[None], mesh=mesh, in_specs=(P(names), P()),
                          out_specs=P(names))


@pytest.mark.parametrize("mesh_shape,names,ax", MESHES, ids=IDS)
@pytest.mark.parametrize("row", list(ROWS))
def test_vmap_of_shard_map_and_shard_map_of_vmap(row, mesh_shape, names, ax):
    mesh = spmd.make_mesh(mesh_shape, names)
    n, x, w = _setup(row, mesh_shape, names, ax)
    xs = np.stack([x * (b + 1) for b in range(B)])
    f = _per_device(row, mesh, names, ax, n)
    want = np.stack([np.asarray(f(xb, w)) for xb in xs])
    np.testing.assert_allclose(np.asarray(spmd.vmap(f, in_axes=(0, None))(xs, w)), want, rtol=1e-12, atol=1e-12)
    g = _per_device(row, mesh, names, ax, n, vmap_inside=True)
    got = np.asarray(g(xs, w))                       # (devices, B, ...)
    np.testing.assert_allclose(np.moveaxis(got, 1, 0), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mesh_shape,names,ax", MESHES[:2], ids=IDS[:2])
@pytest.mark.parametrize("row", list(ROWS))
def test_grad_of_vmap_and_vmap_of_grad(row, mesh_shape, names, ax):
    mesh = spmd.make_mesh(mesh_shape, names)
    n, x, w = _setup(row, mesh_shape, names, ax)
    xs = np.stack([x * (b + 1) for b in range(B)])
    f = _per_device(row, mesh, names, ax, n)
    R = np.random.default_rng(5).standard_normal(np.asarray(f(x, w)).shape)
    loss = lambda x, w: np.sum(np.tanh(f(x, w)) * R)
    per_b = [spmd.grad(loss, argnums=(0, 1))(xb, w) for xb in xs]
    # grad of a vmapped loss: the sum of the per-example losses
    gx, gw = spmd.grad(lambda xs, w: np.sum(spmd.vmap(loss, in_axes=(0, None))(xs, w)), argnums=(0, 1))(xs, w)
    np.testing.assert_allclose(np.asarray(gx), np.stack([np.asarray(a) for a, _ in per_b]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(gw), sum(np.asarray(b) for _, b in per_b), rtol=1e-10, atol=1e-12)
    # per-example gradients
    vx, vw = spmd.vmap(spmd.grad(loss, argnums=(0, 1)), in_axes=(0, None))(xs, w)
    np.testing.assert_allclose(np.asarray(vw), np.stack([np.asarray(b) for _, b in per_b]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(vx), np.stack([np.asarray(a) for a, _ in per_b]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", ["pmax", "pmin"])
def test_vmap_of_pmax_pmin(op):
    mesh = spmd.make_mesh((2, 4), ("i", "j"))
    f = spmd.shard_map(lambda x: getattr(spmd, op)(x, "j"), mesh=mesh, in_specs=P("i", "j"), out_specs=P("i"))
    xs = rng.standard_normal((B, 4, 8))
    want = np.stack([np.asarray(f(x)) for x in xs])
    np.testing.assert_allclose(np.asarray(spmd.vmap(f)(xs)), want)
    g = spmd.shard_map(lambda x: spmd.vmap(lambda r: getattr(spmd, op)(r, "j"))(x), mesh=mesh,
                       in_specs=P(None, "i", "j"), out_specs=P(None, "i"))
    np.testing.assert_allclose(np.asarray(g(xs)), want)


def test_matmul_over_simulated_devices_matches_numpy():
    """Big batched matmuls (the stacked executor's mesh dims) run one single-threaded BLAS call
    per device on the host threads; broadcast (size-1) device dims included."""
    from spmd import _host_parallel
    a = rng.standard_normal((2, 1, 64, 96)).astype(np.float32)
    b = rng.standard_normal((1, 4, 96, 80)).astype(np.float32)
    old = _host_parallel.MATMUL_MIN_FLOPS
    _host_parallel.MATMUL_MIN_FLOPS = 0
    try:
        got = _host_parallel.matmul(np, a, b)
    finally:
        _host_parallel.MATMUL_MIN_FLOPS = old
    np.testing.assert_allclose(got, np.matmul(a, b), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 4, 64, 80)


def test_dynamic_slice_with_batched_starts():
    x = rng.standard_normal((5, 6))
    starts = np.array([0, 3, 4, 1])           # 4 is clipped to 3, as dynamic_slice does
    f = lambda s, c: spmd.prims.dynamic_slice_p(x, s, c, sizes=(2, 3))
    out = spmd.vmap(f, in_axes=(0, None))(starts, np.int64(2))
    want = np.stack([x[min(s, 3):min(s, 3) + 2, 2:5] for s in starts])
    np.testing.assert_allclose(np.asarray(out), want)
    xs = rng.standard_normal((4, 5, 6))
    out = spmd.vmap(lambda x, s: spmd.prims.dynamic_slice_p(x, 1, s, sizes=(2, 2)))(xs, np.array([0, 4, 2, 1]))
    want = np.stack([xb[1:3, s:s + 2] for xb, s in zip(xs, [0, 4, 2, 1])])
    np.testing.assert_allclose(np.asarray(out), want)


def test_per_example_gradients_of_an_embedding_lookup():
    """vmap(grad) of a gather with per-example indices: the transpose is a scatter_add whose
    indices are batched."""
    table = rng.standard_normal((6, 3))
    ids = np.array([[1, 4], [0, 0], [5, 2]])
    loss = lambda t, i: np.sum(np.tanh(np.take(t, i, axis=0)) ** 2)
    got = np.asarray(spmd.vmap(spmd.grad(loss), in_axes=(None, 0))(table, ids))
    want = np.stack([np.asarray(spmd.grad(loss)(table, i)) for i in ids])
    np.testing.assert_allclose(got, want)
    x, upd = rng.standard_normal((B, 2, 5)), rng.standard_normal((B, 2, 4))
    idx = rng.integers(0, 5, (B, 4))
    out = spmd.vmap(lambda x, i, u: spmd.prims.scatter_add_p(x, i, u, axis=1))(x, idx, upd)
    want = np.stack([x[b].copy() for b in range(B)])
    for b in range(B):
        np.add.at(want[b], (slice(None), idx[b]), upd[b])
    np.testing.assert_allclose(np.asarray(out), want)


def test_dynamic_update_slice_with_batched_starts_and_per_example_gradients():
    x, upd = rng.standard_normal((B, 5, 4)), rng.standard_normal((B, 2, 3))
    starts = np.array([3, 0, 9])                       # 9 is clipped to 3
    f = lambda x, u, s: spmd.prims.dynamic_update_slice_p(x, u, s, 1)
    out = np.asarray(spmd.vmap(f)(x, upd, starts))
    for b, s in enumerate(starts):
        want = x[b].copy()
        want[min(s, 3):min(s, 3) + 2, 1:4] = upd[b]
        np.testing.assert_allclose(out[b], want)
    loss = lambda v, s: np.sum(np.sin(spmd.prims.dynamic_slice_p(v, s, sizes=(2,))))
    v = rng.standard_normal(6)
    got = np.asarray(spmd.vmap(spmd.grad(loss), in_axes=(None, 0))(v, np.array([0, 3, 4])))
    want = np.stack([np.asarray(spmd.grad(loss)(v, np.int64(s))) for s in [0, 3, 4]])
    np.testing.assert_allclose(got, want)
