"""``spmd.nn`` against ``jax.nn`` (values and gradients, float32 and float64, large inputs
included), through jit, vmap and shard_map; and ``stop_gradient``."""
from __future__ import annotations

import numpy as np
import pytest

import spmd
from spmd import P, prims, nn
from spmd.transforms.check import check_grads

jax = pytest.importorskip("jax")
jnp = jax.numpy

rng = np.random.default_rng(0)
X = np.concatenate([rng.uniform(-4, 4, 20), [0.0, -30.0, 30.0, -100.0, 100.0, -1000.0, 1000.0]])
M = rng.normal(size=(4, 6)) * 3
M[0, :] += 500                                   # a row far from 0: stability
MASK = rng.uniform(size=(4, 6)) > 0.3
MASK[:, 0] = True
B = np.where(rng.uniform(size=(4, 6)) > 0.5, 1.0, 2.0)

# name -> (spmd function, jax function, input)
ROWS = {
    "relu": (nn.relu, jax.nn.relu, X),
    "sigmoid": (nn.sigmoid, jax.nn.sigmoid, X),
    "silu": (nn.silu, jax.nn.silu, X),
    "gelu": (nn.gelu, jax.nn.gelu, X),
    "gelu_exact": (lambda x: nn.gelu(x, approximate=False), lambda x: jax.nn.gelu(x, approximate=False), X),
    "softmax": (nn.softmax, jax.nn.softmax, M),
    "softmax_axis0": (lambda x: nn.softmax(x, axis=0), lambda x: jax.nn.softmax(x, axis=0), M),
    "softmax_where": (lambda x: nn.softmax(x, where=MASK), lambda x: jax.nn.softmax(x, where=MASK), M),
    "log_softmax": (nn.log_softmax, jax.nn.log_softmax, M),
    "log_softmax_axes": (lambda x: nn.log_softmax(x, axis=(0, 1)), lambda x: jax.nn.log_softmax(x, axis=(0, 1)), M),
    "logsumexp": (nn.logsumexp, jax.nn.logsumexp, M),
    "logsumexp_axis": (lambda x: nn.logsumexp(x, axis=1, keepdims=True),
                       lambda x: jax.nn.logsumexp(x, axis=1, keepdims=True), M),
    "logsumexp_b": (lambda x: nn.logsumexp(x, axis=0, b=B.astype(x.dtype)),
                    lambda x: jax.nn.logsumexp(x, axis=0, b=B.astype(x.dtype)), M),
    "logsumexp_where": (lambda x: nn.logsumexp(x, axis=1, where=MASK, keepdims=True),
                        lambda x: jax.nn.logsumexp(x, axis=1, where=MASK, keepdims=True), M),
}
TOL = {np.float32: dict(rtol=2e-6, atol=1e-6), np.float64: dict(rtol=1e-13, atol=1e-13)}
GRAD_TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _jax_value_and_grad(f, x):
    w = np.cos(np.arange(x.size)).reshape(x.shape).astype(x.dtype)   # a fixed cotangent direction
    (_, value), grad = jax.jit(jax.value_and_grad(lambda x: (jnp.sum(f(x) * w), f(x)), has_aux=True))(x)
    return np.asarray(value), np.asarray(grad), w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(ROWS))
def test_values_and_gradients_match_jax(name, dtype):
    mine, theirs, x = ROWS[name]
    x = x.astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        want, want_grad, w = _jax_value_and_grad(theirs, x)
    got = np.asarray(mine(x))
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    np.testing.assert_allclose(got, want, **TOL[dtype])
    grad = np.asarray(spmd.grad(lambda x: np.sum(mine(x) * w))(x))
    assert np.all(np.isfinite(grad)), "a gradient is not finite"
    # exact gelu differentiates a rational approximation of erf: close to, not exactly, erf'
    np.testing.assert_allclose(grad, want_grad, **(GRAD_TOL[dtype] if name != "gelu_exact" else dict(rtol=1e-5, atol=1e-6)))
    np.testing.assert_allclose(np.asarray(spmd.jit(mine)(x)), want, **TOL[dtype])


@pytest.mark.parametrize("name", ["sigmoid", "gelu", "gelu_exact", "softmax", "log_softmax", "logsumexp_axis"])
def test_gradients_against_finite_differences(name):
    mine, _, x = ROWS[name]
    x = x[:8] if x.ndim == 1 else x[1:]                      # float64, away from the huge values
    check_grads(mine, (x,), order=1 if name == "gelu_exact" else 2, rtol=1e-5, atol=1e-6)


def test_relu_derivative_at_zero_is_zero_and_nan_stays():
    assert float(spmd.grad(nn.relu)(0.0)) == float(jax.grad(jax.nn.relu)(0.0)) == 0.0
    assert np.isnan(nn.relu(np.array([np.nan]))[0])


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")        # log(0), as NumPy's
def test_logsumexp_sign_and_infinities():
    b = np.array([[1.0, -2.0, 1.0], [1.0, 1.0, 1.0]])
    a = np.array([[0.0, 0.5, 0.1], [-np.inf, 0.0, 1.0]])
    out, sign = nn.logsumexp(a, axis=1, b=b, return_sign=True)
    jout, jsign = jax.nn.logsumexp(a, axis=1, b=b, return_sign=True)
    np.testing.assert_allclose(out, jout, rtol=1e-6)
    np.testing.assert_array_equal(sign, jsign)
    assert np.isnan(nn.logsumexp(a, axis=1, b=b)[0])
    assert nn.logsumexp(np.array([-np.inf, -np.inf])) == -np.inf


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_one_hot(axis):
    x = np.array([[0, 2, 5], [1, -1, 3]])
    got, want = nn.one_hot(x, 4, axis=axis), np.asarray(jax.nn.one_hot(x, 4, axis=axis))
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(spmd.jit(lambda x: nn.one_hot(x, 4, axis=axis, dtype=np.int32))(x),
                                  np.asarray(jax.nn.one_hot(x, 4, axis=axis, dtype=np.int32)))


def test_under_vmap_and_shard_map():
    x = M.astype(np.float32)
    np.testing.assert_allclose(np.asarray(spmd.vmap(nn.softmax)(x)), np.asarray(jax.vmap(jax.nn.softmax)(x)),
                               rtol=2e-6, atol=1e-7)
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])
    f = spmd.shard_map(lambda b: nn.log_softmax(nn.gelu(b)), mesh=mesh, in_specs=P("i"), out_specs=P("i"))
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(jax.nn.log_softmax(jax.nn.gelu(x))), rtol=2e-6, atol=1e-6)
    g = spmd.grad(lambda x: np.sum(f(x) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(lambda x: jnp.sum(jax.nn.log_softmax(jax.nn.gelu(x)) ** 2))(x)),
                               rtol=1e-4, atol=1e-5)


def test_eager_on_sharded_arrays_keeps_the_sharding():
    mesh = spmd.make_mesh((2, 4), ("x", "y"))
    x = spmd.device_put(M.astype(np.float32)[:, :4].repeat(2, axis=0), spmd.NamedSharding(mesh, P("x", "y")))
    for f, g in [(nn.gelu, jax.nn.gelu), (nn.sigmoid, jax.nn.sigmoid), (lambda x: nn.softmax(x, axis=0),
                                                                        lambda x: jax.nn.softmax(x, axis=0))]:
        y = f(x)
        assert isinstance(y, spmd.Array) and y.sharding.spec == P("x", "y")
        np.testing.assert_allclose(np.asarray(y), np.asarray(g(np.asarray(x))), rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# stop_gradient
# ---------------------------------------------------------------------------------------------

def test_stop_gradient_blocks_every_order():
    assert float(spmd.grad(lambda x: x * spmd.stop_gradient(x))(3.0)) == 3.0
    assert float(spmd.grad(spmd.grad(lambda x: x * x * spmd.stop_gradient(x)))(3.0)) == 6.0
    _, t = spmd.jvp(lambda x: spmd.stop_gradient(np.sin(x)), (np.ones(3),), (np.ones(3),))
    np.testing.assert_array_equal(np.asarray(t), 0.0)
    out = spmd.stop_gradient({"a": np.ones(2), "b": (3,)})
    assert out["b"] == (3,)
    g = spmd.grad(lambda p: np.sum(p["w"] * prims.stop_gradient(p)["w"] ** 2))({"w": np.arange(3.)})
    np.testing.assert_allclose(np.asarray(g["w"]), np.arange(3.) ** 2)


def test_stop_gradient_under_vmap_jit_and_shard_map():
    x = np.arange(8.)
    f = lambda x: np.sum(x * spmd.stop_gradient(x))
    np.testing.assert_allclose(np.asarray(spmd.vmap(spmd.grad(f))(x.reshape(4, 2))), x.reshape(4, 2))
    np.testing.assert_allclose(np.asarray(spmd.jit(spmd.grad(f))(x)), x)
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])

    def body(b):
        s = spmd.stop_gradient(b)
        assert s.vma == b.vma == frozenset({"i"})                 # the vma passes through
        return spmd.psum(np.sum(b * s), "i")
    loss = spmd.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=P())
    np.testing.assert_allclose(np.asarray(spmd.grad(loss)(x)), x)


def test_pmax_without_gradient_names_stop_gradient():
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])
    loss = lambda op: spmd.shard_map(lambda b: np.sum(spmd.pmax(op(b), "i")), mesh=mesh, in_specs=P("i"),
                                     out_specs=P())
    with pytest.raises(NotImplementedError, match="stop_gradient"):
        spmd.grad(loss(lambda b: b))(np.arange(8.))
    g = spmd.grad(lambda x: loss(spmd.stop_gradient)(x) + np.sum(x))(np.arange(8.))
    np.testing.assert_allclose(np.asarray(g), 1.0)
