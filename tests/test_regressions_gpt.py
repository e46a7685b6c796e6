"""Regression tests, one per bug: each failed before its fix.

Values against NumPy, gradients against JAX's (``jax.shard_map``) where JAX runs the same
program, and the collectives of backward programs counted in bytes.
"""
from __future__ import annotations

import numpy as np
import pytest

import spmd
from spmd import P


# --- indexing with an ellipsis and None ---------------------------------------------------------

@pytest.mark.parametrize("index", [
    lambda x: x[..., None], lambda x: x[None, ...], lambda x: x[None, ..., None],
    lambda x: x[..., None, 1], lambda x: x[0, ..., None], lambda x: x[...],
    lambda x: x[..., np.array([0, 2])], lambda x: x[:, None, ...]])
def test_ellipsis_with_new_axes_matches_numpy(index):
    a = np.arange(24.0).reshape(2, 3, 4)[..., 0]
    got = np.asarray(spmd.jit(index)(a))
    np.testing.assert_array_equal(got, index(a))


# --- combining inserted psums of several groups -------------------------------------------------

@pytest.mark.parametrize("mixed", ["dtype", "axes"])
def test_adam_moment_of_six_gradients_pending_over_different_groups(mixed):
    """Six gradients pending a sum, then ``0.9 * m + 0.1 * g`` in the same jit: the compiler
    combines the psums of each group (same axes and dtype) into one; two groups interleaved in
    program order made the second merge read equations the first had moved (KeyError)."""
    mesh = spmd.make_mesh((2, 4), ("a", "b"))
    rng = np.random.default_rng(0)
    keys = [f"w{i}" for i in range(6)]
    dtype = lambda i: np.float32 if mixed == "dtype" and i % 2 else np.float64
    params = {k: rng.normal(size=4).astype(dtype(i)) for i, k in enumerate(keys)}
    m = {k: rng.normal(size=4).astype(dtype(i)) for i, k in enumerate(keys)}
    x, z = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
    data = lambda i: z if mixed == "axes" and i % 2 else x

    def loss(p, x, z):
        return sum(np.sum(np.tanh((z if mixed == "axes" and i % 2 else x) * p[k]))
                   for i, k in enumerate(keys))

    def step(p, m, x, z):
        g = spmd.grad(loss)(p, x, z)
        return {k: 0.9 * m[k] + 0.1 * g[k] for k in keys}

    put = lambda s: spmd.NamedSharding(mesh, s)
    f = spmd.jit(step, in_shardings=(put(P()), put(P()), put(P("a")), put(P(("a", "b")))))
    comp = f.lower(params, m, x, z)
    assert [c.step.kind for c in comp.compiled.inserted] == ["psum", "psum"]
    got = f(params, m, x, z)
    for i, k in enumerate(keys):
        grad = np.sum(data(i) * (1 - np.tanh(data(i) * params[k]) ** 2), axis=0)
        np.testing.assert_allclose(np.asarray(got[k]), 0.9 * m[k] + 0.1 * grad, rtol=1e-5)
        assert got[k].dtype == dtype(i)


# --- gradient psums the size of the parameters --------------------------------------------------

def _matmul_layer(C, x, w, g):
    return C.psum(C.np.sum(C.np.tanh(x @ w)), "d")


def _layer_norm_gain(C, x, w, g):
    mu = C.np.mean(x, axis=-1, keepdims=True)
    return C.psum(C.np.sum(C.np.tanh((x - mu) * g) @ w), "d")


@pytest.mark.parametrize("body,used", [(_matmul_layer, "w"), (_layer_norm_gain, "wg")])
def test_data_parallel_gradient_psums_are_parameter_sized(body, used):
    """``x (B,T,D) @ w`` and ``x * g`` with invariant ``w``, ``g`` in a data-parallel shard_map:
    the backward program psums a cotangent the size of each parameter (the implicit pvary sits
    on the parameter, before the broadcast), and the gradients are JAX's."""
    import jax
    import jax.numpy as jnp
    from _jax_oracle import SPMD, jax_mesh, jax_namespace, jax_spec

    mesh = spmd.make_mesh((8,), ("d",))
    rng = np.random.default_rng(1)
    x, w, g = rng.normal(size=(64, 10, 16)), rng.normal(size=(16, 4)), rng.normal(size=16)
    specs = (P("d"), P(), P())
    loss = spmd.shard_map(lambda x, w, g: body(SPMD, x, w, g), mesh=mesh, in_specs=specs,
                          out_specs=P())
    grad = spmd.grad(loss, argnums=(1, 2))
    backward = [c for c in spmd.collectives_of(spmd.make_program(grad)(x, w, g))
                if "transpose" in c.where]
    params = dict(w=w, g=g)
    assert sorted(c.bytes_per_device for c in backward) == sorted(params[p].nbytes for p in used)

    J = jax_namespace()
    jloss = jax.shard_map(lambda x, w, g: body(J, x, w, g), mesh=jax_mesh((8,), ("d",)),
                          in_specs=tuple(map(jax_spec, specs)), out_specs=jax_spec(P()))
    with jax.enable_x64(True):
        want = jax.jit(jax.grad(jloss, argnums=(1, 2)))(x, w, g)
    for got, ref in zip(grad(x, w, g), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-10, atol=1e-12)


# --- jacfwd / jacrev nest their blocks as JAX does ----------------------------------------------

def _h(w, xy, np=np):
    x, y = xy
    return np.tanh(x * w) * y


def _h_tree(w, xy, np=np):
    return {"a": np.sin(w), "b": (np.tanh(xy[0] * w), np.sum(xy[1]))}


@pytest.mark.parametrize("f", [_h, _h_tree])
@pytest.mark.parametrize("argnums", [0, 1, (0,), (0, 1), (1, 0)])
@pytest.mark.parametrize("which", ["jacfwd", "jacrev"])
def test_jacobians_have_jax_structure_and_values(which, argnums, f):
    """Pytree arguments and outputs: output structure outside, the picked arguments' inside,
    one block ``out.shape + in.shape`` per pair of leaves (was one stacked array, or a
    TypeError for jacfwd)."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(2)
    w, x, y = rng.normal(size=3), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    with jax.enable_x64(True):
        want = getattr(jax, which)(lambda *a: f(*a, np=jnp), argnums=argnums)(w, (x, y))
    got = getattr(spmd, which)(f, argnums=argnums)(w, (x, y))
    want_leaves, want_tree = jax.tree.flatten(want)
    got_leaves, got_tree = jax.tree.flatten(jax.tree.map(np.asarray, got))
    assert got_tree == want_tree
    for g, r in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(g, np.asarray(r), rtol=1e-12, atol=1e-12)


def test_vmap_of_an_elementwise_op_with_a_lower_rank_constant():
    """``x * c`` with ``c`` of lower rank than ``x`` (NumPy broadcasting) under vmap, batched
    operands of lower rank too; jacrev's backward programs hold such products."""
    c, b = np.arange(3.0), np.arange(12.0).reshape(4, 3)
    x = np.arange(24.0).reshape(2, 4, 3)
    np.testing.assert_array_equal(np.asarray(spmd.vmap(lambda x: x * c)(x)), x * c)
    np.testing.assert_array_equal(np.asarray(spmd.vmap(lambda r: r * b)(x[:, 0])),
                                  x[:, :1] * b)
    np.testing.assert_array_equal(np.asarray(spmd.vmap(lambda r, s: r + s)(x[:, 0], x)),
                                  x[:, :1] + x)
