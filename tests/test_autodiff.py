"""Autodiff of local programs: every differentiable primitive against finite differences
(``check_grads``, first and second order, forward and reverse, float64), the API surface
(argnums, has_aux, pytrees, jit and nesting), and the non-differentiable primitives."""
from __future__ import annotations

import numpy as np
import pytest

import spmd
from spmd import prims
from spmd.transforms.check import check_grads

rng = np.random.default_rng(0)


def r(*shape, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, shape)


pos = lambda *s: r(*s, lo=0.5, hi=2.0)
C34, C32 = r(3, 4), r(3, 2)

# (row name, primitive(s) it exercises, function, args)
ROWS = [
    ("neg", "neg", lambda x: -x, (r(3),)),
    ("exp", "exp", np.exp, (r(3),)),
    ("exp2", "exp2", np.exp2, (r(3),)),
    ("log", "log", np.log, (pos(3),)),
    ("log2", "log2", np.log2, (pos(3),)),
    ("log10", "log10", np.log10, (pos(3),)),
    ("log1p", "log1p", np.log1p, (pos(3),)),
    ("expm1", "expm1", np.expm1, (r(3),)),
    ("tanh", "tanh", np.tanh, (r(3),)),
    ("sinh", "sinh", np.sinh, (r(3),)),
    ("cosh", "cosh", np.cosh, (r(3),)),
    ("sin", "sin", np.sin, (r(3),)),
    ("cos", "cos", np.cos, (r(3),)),
    ("tan", "tan", np.tan, (r(3),)),
    ("asin", "asin", np.arcsin, (r(3, lo=-0.8, hi=0.8),)),
    ("acos", "acos", np.arccos, (r(3, lo=-0.8, hi=0.8),)),
    ("atan", "atan", np.arctan, (r(3),)),
    ("asinh", "asinh", np.arcsinh, (r(3),)),
    ("acosh", "acosh", np.arccosh, (pos(3) + 1,)),
    ("atanh", "atanh", np.arctanh, (r(3, lo=-0.8, hi=0.8),)),
    ("sqrt", "sqrt", np.sqrt, (pos(3),)),
    ("cbrt", "cbrt", np.cbrt, (pos(3),)),
    ("rsqrt", "rsqrt", lambda x: spmd.numpy.rsqrt(x) if not isinstance(x, np.ndarray) else 1 / np.sqrt(x), (pos(3),)),
    ("square", "square", np.square, (r(3),)),
    ("reciprocal", "reciprocal", np.reciprocal, (pos(3),)),
    ("abs", "abs", np.abs, (pos(3) * np.array([1, -1, 1]),)),
    ("logistic", "logistic", lambda x: 1 / (1 + np.exp(-x)), (r(3),)),
    ("add", "add", np.add, (r(3), r(3))),
    ("sharding_constraint", "sharding_constraint mul",
     lambda x: spmd.with_sharding_constraint(x * x, spmd.NamedSharding(spmd.make_mesh((8,), ("i",)), spmd.P())), (r(3),)),
    ("sub", "sub", np.subtract, (r(3), r(3))),
    ("mul", "mul", np.multiply, (r(3), r(3))),
    ("div", "div", np.divide, (r(3), pos(3))),
    ("pow", "pow", np.power, (pos(3), r(3))),
    ("pow_const", "pow", lambda x: x ** 3.0, (r(3),)),
    ("max", "max", np.maximum, (r(4), r(4))),
    ("min", "min", np.minimum, (r(4), r(4))),
    ("fmax", "fmax", np.fmax, (r(4), r(4))),
    ("fmin", "fmin", np.fmin, (r(4), r(4))),
    ("atan2", "atan2", np.arctan2, (r(3), pos(3))),
    ("hypot", "hypot", np.hypot, (pos(3), pos(3))),
    ("copysign", "copysign", np.copysign, (pos(3), r(3))),
    ("logaddexp", "logaddexp", np.logaddexp, (r(3), r(3))),
    ("rem", "rem", np.remainder, (pos(3) * 3, pos(3))),
    ("fmod", "fmod", np.fmod, (pos(3) * 3, pos(3))),
    ("select", "select", lambda x, y: np.where(x > 0, x, y), (r(5), r(5))),
    # the stopped value is locally constant (its tangent is not a symbolic zero), so finite
    # differences agree with the zero derivative at every order
    ("stop_gradient", "stop_gradient", lambda x: x ** 2 * spmd.stop_gradient(x - x + 2.0), (r(3),)),
    ("convert", "convert_element_type", lambda x: x.astype(np.float32).astype(np.float64) * x, (r(3),)),
    ("broadcast", "broadcast_in_dim", lambda x: np.broadcast_to(x[:, None], (3, 4)) * C34, (r(3),)),
    ("reshape", "reshape", lambda x: np.reshape(x, (3, 2)) * C32, (r(2, 3),)),
    ("transpose", "transpose", lambda x: np.transpose(x) * C32, (r(2, 3),)),
    ("slice", "slice", lambda x: x[1:3, ::2] * 2, (r(4, 5),)),
    ("slice_step", "slice", lambda x: x[::-2] ** 2, (r(5),)),
    ("pad", "pad", lambda x: np.pad(x, ((1, 2), (0, 1))) ** 2, (r(2, 3),)),
    ("concatenate", "concatenate", lambda x, y: np.concatenate([x, y * y], axis=1), (r(2, 3), r(2, 2))),
    ("reduce_sum", "reduce_sum", lambda x: np.sum(x ** 2, axis=0), (r(3, 4),)),
    ("reduce_max", "reduce_max", lambda x: np.max(x, axis=1), (r(3, 4),)),
    ("reduce_min", "reduce_min", lambda x: np.min(x, axis=0), (r(3, 4),)),
    ("reduce_prod", "reduce_prod", lambda x: np.prod(x, axis=1), (pos(3, 4),)),
    ("cumsum", "cumsum", lambda x: np.cumsum(x * x, axis=1), (r(3, 4),)),
    ("cumprod", "cumprod", lambda x: np.cumprod(x, axis=0), (pos(4, 2),)),
    ("cummax", "cummax", lambda x: np.maximum.accumulate(x, axis=1), (r(3, 5),)),
    ("cummin", "cummin", lambda x: np.minimum.accumulate(x, axis=0), (r(5, 2),)),
    ("sort", "sort", lambda x: np.sort(x, axis=1) * np.arange(1., 5.), (r(3, 4),)),
    ("dot_general", "dot_general", lambda x, y: x @ y, (r(3, 4), r(4, 2))),
    ("dot_batched", "dot_general", lambda x, y: np.einsum("bij,bjk->bik", x, y), (r(2, 3, 4), r(2, 4, 2))),
    ("dot_contract2", "dot_general", lambda x, y: np.einsum("ijk,kjl->li", x, y), (r(2, 3, 4), r(4, 3, 2))),
    ("take", "take", lambda x: np.take(x, np.array([2, 0, 2]), axis=1) ** 2, (r(3, 4),)),
    ("getitem", "take", lambda x: x[np.array([1, 1, 0])] * x[0], (r(3, 2),)),
    ("dynamic_slice", "dynamic_slice", lambda x: spmd.prims.dynamic_slice_p(x, 1, 0, sizes=(2, 2)) ** 2
        if not isinstance(x, np.ndarray) else x[1:3, 0:2] ** 2, (r(4, 3),)),
    ("dynamic_update_slice", "dynamic_update_slice",
     lambda x, u: spmd.prims.dynamic_update_slice_p(x, u * u, 1, 1) if not isinstance(x, np.ndarray)
     else _dus(x, u * u, 1, 1), (r(4, 3), r(2, 2))),
    ("scatter_add", "scatter_add",
     lambda x, u: spmd.prims.scatter_add_p(x, np.array([0, 2, 0]), u * u, axis=0) if not isinstance(x, np.ndarray)
     else _scatter(x, np.array([0, 2, 0]), u * u), (r(3, 2), r(3, 2))),
    ("mlp", "dot_general tanh add", lambda w, b, x: np.sum(np.tanh(x @ w + b) ** 2), (r(3, 4), r(4), r(5, 3))),
    ("softmax_xent", "exp log reduce_max", lambda z: -np.sum(z[:, 0] - np.log(np.sum(np.exp(z - np.max(z, 1, keepdims=True)), 1)) - np.max(z, 1)), (r(4, 3),)),
]


def _dus(x, u, *starts):
    out = x.copy()
    out[tuple(slice(s, s + n) for s, n in zip(starts, u.shape))] = u
    return out


def _scatter(x, idx, u):
    out = x.copy()
    np.add.at(out, idx, u)
    return out


# rows whose finite differences are coarse (a float32 round trip inside)
LOOSE = {"convert": dict(rtol=1e-2, atol=1e-3)}


@pytest.mark.parametrize("name,prims,f,args", ROWS, ids=[r[0] for r in ROWS])
def test_check_grads(name, prims, f, args):
    check_grads(f, args, order=2, modes=("fwd", "rev"), **LOOSE.get(name, dict(rtol=2e-5, atol=1e-6)))


def test_every_differentiable_primitive_has_a_row():
    covered = {p for row in ROWS for p in row[1].split()}
    nondiff = {"floordiv", "and", "or", "xor", "shift_left", "shift_right", "eq", "ne", "lt", "le",
               "gt", "ge", "not", "invert", "isnan", "isinf", "isfinite", "signbit", "sign", "floor",
               "ceil", "trunc", "round", "rint", "reduce_and", "reduce_or", "argmax", "argmin",
               "argsort", "iota", "conj", "real", "imag", "bitcast_convert_type", "threefry2x32"}
    every = {p.name for p in map(lambda n: getattr(prims, n), prims.__all__)}
    missing = every - covered - nondiff
    assert not missing, f"primitives without a gradient row: {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# non-differentiable primitives: zero tangents, never a made-up gradient
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("f", [
    lambda x: np.floor(x) * 1.0, lambda x: np.sign(x), lambda x: np.round(x),
    lambda x: (x > 0).astype(float), lambda x: np.argmax(x).astype(float) + 0 * x[0],
    lambda x: np.argsort(x).astype(float),
], ids=["floor", "sign", "round", "gt", "argmax", "argsort"])
def test_piecewise_constant_ops_have_zero_gradient(f):
    x = np.array([0.3, -1.2, 2.5])
    g = spmd.grad(lambda x: np.sum(f(x) * x))(x)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(f(x), (3,)))   # d f = 0


def test_integer_outputs_get_zero_tangents():
    y, t = spmd.jvp(lambda x: (x * 2).astype(np.int64), (np.array([1.5, 2.5]),), (np.ones(2),))
    assert np.asarray(t).tolist() == [0, 0]


def test_grad_of_integer_argument_is_a_clear_error():
    with pytest.raises(TypeError, match="float or complex"):
        spmd.grad(lambda i: i * 2.0)(np.int64(3))


def test_grad_of_non_scalar_is_a_clear_error():
    with pytest.raises(TypeError, match="scalar"):
        spmd.grad(lambda x: x * 2)(np.ones(3))


# ---------------------------------------------------------------------------------------------
# the API
# ---------------------------------------------------------------------------------------------

def test_argnums_has_aux_pytrees():
    params = {"w": r(3, 2), "b": r(2)}
    x = r(4, 3)

    def loss(p, x):
        y = np.tanh(x @ p["w"] + p["b"])
        return np.sum(y ** 2), {"y": y}
    (v, aux), g = spmd.value_and_grad(loss, has_aux=True)(params, x)
    import jax
    import jax.numpy as jnp
    jl = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
    with jax.enable_x64(True):
        jv, jg = jax.value_and_grad(jl)(params, x)
        jgx = jax.grad(jl, argnums=1)(params, x)
    np.testing.assert_allclose(np.asarray(v), jv)
    np.testing.assert_allclose(np.asarray(g["w"]), jg["w"])
    np.testing.assert_allclose(np.asarray(g["b"]), jg["b"])
    assert np.asarray(aux["y"]).shape == (4, 2)
    gw, gx = spmd.grad(lambda p, x: loss(p, x)[0], argnums=(0, 1))(params, x)
    np.testing.assert_allclose(np.asarray(gx), jgx)


def test_grad_under_jit_and_jit_under_grad():
    f = lambda x: np.sum(np.sin(x) * x)
    x = r(5)
    want = np.cos(x) * x + np.sin(x)
    np.testing.assert_allclose(np.asarray(spmd.jit(spmd.grad(f))(x)), want)
    np.testing.assert_allclose(np.asarray(spmd.grad(spmd.jit(f))(x)), want)
    prog = spmd.make_program(spmd.grad(f))(x)
    prog.check()
    assert "cos" in str(prog)


def test_second_derivative_and_hessian():
    f = lambda x: np.sum(x ** 3)
    x = r(3)
    np.testing.assert_allclose(np.asarray(spmd.jacfwd(spmd.grad(f))(x)), np.diag(6 * x))
    np.testing.assert_allclose(np.asarray(spmd.jacrev(spmd.grad(f))(x)), np.diag(6 * x))
    np.testing.assert_allclose(np.asarray(spmd.grad(spmd.grad(lambda s: s ** 4))(1.5)), 12 * 1.5 ** 2)


def test_linearize_and_vjp_match_jvp():
    f = lambda x, y: np.sin(x) * y
    x, y, tx, ty = r(3), r(3), r(3), r(3)
    out, f_jvp = spmd.linearize(f, x, y)
    _, t = spmd.jvp(f, (x, y), (tx, ty))
    np.testing.assert_allclose(np.asarray(f_jvp(tx, ty)), np.asarray(t))
    out, vjp_fn = spmd.vjp(f, x, y)
    gx, gy = vjp_fn(np.ones(3))
    np.testing.assert_allclose(np.asarray(gx), np.cos(x) * y)
    np.testing.assert_allclose(np.asarray(gy), np.sin(x))


def test_jacobians():
    f = lambda x: np.tanh(x[:2] * x[1:])
    x = r(3)
    jf, jr = np.asarray(spmd.jacfwd(f)(x)), np.asarray(spmd.jacrev(f)(x))
    import jax
    import jax.numpy as jnp
    with jax.enable_x64(True):
        want = jax.jacfwd(lambda x: jnp.tanh(x[:2] * x[1:]))(x)
    np.testing.assert_allclose(jf, want)
    np.testing.assert_allclose(jr, want)


def test_transformed_program_prints_and_rejits():
    f = spmd.grad(lambda w: np.sum(np.exp(w) * w))
    prog = spmd.make_program(f)(r(3))
    text = str(prog)
    assert "exp" in text and "mul" in text
    g = spmd.jit(f)
    np.testing.assert_allclose(np.asarray(g(np.zeros(3))), np.ones(3))
