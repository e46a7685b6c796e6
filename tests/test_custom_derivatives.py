"""``custom_jvp`` / ``custom_vjp`` against JAX running the same programs: the behaviours JAX's
documentation shows (a numerically stable ``log1pexp``, gradient clipping, ``nondiff_argnums``,
``defjvps``), under ``jit``, ``vmap``, second order, inside ``shard_map`` with collectives in the
rules (stacked and reference executors), and the bad inputs each named in a clear error.

Each program is written once against a namespace ``C`` (``spmd`` or ``jax`` names), so both
frameworks trace the same code.
"""
import functools
import types

import numpy as np
import pytest

import spmd
from spmd import P
from spmd.executors import reference_executor

from _jax_oracle import jax_mesh, jax_spec

XS = np.array([-3., 0., 2., 10., 100., 1000.], np.float32)
SPMD = types.SimpleNamespace(custom_jvp=spmd.custom_jvp, custom_vjp=spmd.custom_vjp,
                             grad=spmd.grad, vmap=spmd.vmap, jit=spmd.jit, np=np, psum=spmd.psum,
                             pvary=spmd.pvary, axis_index=spmd.axis_index)


@functools.cache
def _jax():
    import jax
    return types.SimpleNamespace(custom_jvp=jax.custom_jvp, custom_vjp=jax.custom_vjp,
                                 grad=jax.grad, vmap=jax.vmap, jit=jax.jit, np=jax.numpy,
                                 psum=jax.lax.psum, axis_index=jax.lax.axis_index,
                                 pvary=lambda x, a: jax.lax.pcast(x, a, to="varying"))


def both(program, *args):
    """``program(C)(*args)`` with spmd and with JAX, as NumPy arrays."""
    got = np.asarray(spmd.jit(program(SPMD))(*args))
    want = np.asarray(_jax().jit(program(_jax()))(*args))
    return got, want


# ---------------------------------------------------------------------------------------------
# the programs of JAX's custom derivative documentation, written against C
# ---------------------------------------------------------------------------------------------

def log1pexp(C):
    @C.custom_jvp
    def f(x):
        return C.np.log(1. + C.np.exp(x))

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), t * (1. - 1. / (1. + C.np.exp(x)))
    return f


def log1pexp_defjvps(C):
    @C.custom_jvp
    def f(x):
        return C.np.log(1. + C.np.exp(x))
    f.defjvps(lambda t, ans, x: t * (1. - 1. / (1. + C.np.exp(x))))
    return f


def clip_gradient(C):
    @C.custom_vjp
    def f(lo, hi, x):
        return x

    def fwd(lo, hi, x):
        return x, (lo, hi)

    def bwd(res, g):
        lo, hi = res
        return (None, None, C.np.clip(g, lo, hi))
    f.defvjp(fwd, bwd)
    return f


def clip_gradient_nondiff(C):
    @functools.partial(C.custom_vjp, nondiff_argnums=(0, 1))
    def f(lo, hi, x):
        return x
    f.defvjp(lambda lo, hi, x: (x, None), lambda lo, hi, _, g: (C.np.clip(g, lo, hi),))
    return f


def sin_times(C):
    @C.custom_vjp
    def f(x, y):
        return C.np.sin(x) * y
    f.defvjp(lambda x, y: (C.np.sin(x) * y, (C.np.cos(x), C.np.sin(x), y)),
             lambda res, g: (res[0] * g * res[2], res[1] * g))
    return f


def apply_twice(C):
    """``nondiff_argnums`` holding a function (JAX's ``app`` example)."""
    @functools.partial(C.custom_jvp, nondiff_argnums=(0,))
    def app(fn, x):
        return fn(x)

    @app.defjvp
    def app_jvp(fn, primals, tangents):
        (x,), (t,) = primals, tangents
        return app(fn, x), 2. * t
    return app


PROGRAMS = {
    "log1pexp value": lambda C: C.vmap(log1pexp(C)),
    "log1pexp grad": lambda C: C.vmap(C.grad(log1pexp(C))),
    "log1pexp second order": lambda C: C.vmap(C.grad(C.grad(log1pexp(C)))),
    "defjvps grad": lambda C: C.vmap(C.grad(log1pexp_defjvps(C))),
    "defjvps second order": lambda C: C.vmap(C.grad(C.grad(log1pexp_defjvps(C)))),
    "grad of vmap": lambda C: C.grad(lambda x: C.vmap(log1pexp(C))(x).sum()),
    "clip_gradient": lambda C: C.grad(lambda x: C.np.sum(clip_gradient(C)(-0.75, 0.75, C.np.sin(x)) * 3)),
    "clip_gradient nondiff": lambda C: C.grad(
        lambda x: C.np.sum(clip_gradient_nondiff(C)(-0.75, 0.75, C.np.sin(x)) * 3)),
    "clip_gradient vmap of grad": lambda C: C.vmap(C.grad(lambda x: clip_gradient(C)(-0.5, 0.5, x) * 3)),
    "clip_gradient grad of vmap": lambda C: C.grad(
        lambda x: C.vmap(lambda x: clip_gradient(C)(-0.5, 0.5, x) * 3)(x).sum()),
    "sin_times grad": lambda C: C.grad(lambda x: C.np.sum(sin_times(C)(x, x * x))),
    "sin_times vmap": lambda C: C.vmap(C.grad(lambda x: sin_times(C)(x, 2. * x), argnums=0)),
    "nondiff function": lambda C: C.grad(lambda x: apply_twice(C)(C.np.sin, x).sum()),
}


@pytest.mark.parametrize("name", PROGRAMS)
def test_documented_behaviours_match_jax(name):
    got, want = both(PROGRAMS[name], XS)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)      # NaN where JAX has NaN


def test_log1pexp_rule_is_what_makes_large_inputs_finite():
    plain = spmd.vmap(spmd.grad(lambda x: np.log(1. + np.exp(x))))(XS)
    assert np.isnan(np.asarray(plain)[-1])               # the rule is needed, and it is used
    np.testing.assert_array_equal(np.asarray(spmd.grad(log1pexp(SPMD))(np.float32(1000.))), 1.)


def test_custom_jvp_keyword_arguments_and_eager_call():
    f = log1pexp(SPMD)
    np.testing.assert_allclose(f(x=np.float32(2.)), np.log1p(np.exp(np.float32(2.))), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(spmd.grad(lambda x: f(x=x))(2.)), 1 / (1 + np.exp(-2.)))


# ---------------------------------------------------------------------------------------------
# inside shard_map, with collectives in the function and in the rules
# ---------------------------------------------------------------------------------------------

def psum_clipped(C):
    """The forward pass sums over the mesh; the backward pass clips each device's cotangent."""
    @C.custom_vjp
    def f(x):
        return C.psum(x, "i")
    f.defvjp(lambda x: (C.psum(x, "i"), x),
             lambda x, g: (C.np.clip(C.pvary(g, "i"), -1., 1.) * C.np.cos(x),))
    return f


def scaled_by_device(C):
    """A custom JVP whose rule itself runs a collective."""
    @C.custom_jvp
    def f(x):
        return C.np.sin(x) * C.psum(x, "i")

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        s = C.psum(x, "i")
        return f(x), C.np.cos(x) * t * s + C.np.sin(x) * C.psum(t, "i")
    return f


SHARD_MAP_BODIES = {
    "log1pexp": lambda C, x: C.psum(C.np.sum(log1pexp(C)(x) * x), "i"),
    "psum_clipped": lambda C, x: C.np.sum(psum_clipped(C)(x) * 3.),
    "collective in the jvp rule": lambda C, x: C.psum(C.np.sum(scaled_by_device(C)(x)), "i"),
    "clip_gradient": lambda C, x: C.psum(C.np.sum(clip_gradient(C)(-0.1, 0.1, x * x)), "i"),
}


def _sharded_grad(C, body, mesh, x):
    if C is SPMD:
        f = spmd.shard_map(lambda b: body(C, b), mesh=mesh, in_specs=P("i"), out_specs=P())
        return spmd.grad(lambda x: f(x))
    import jax
    f = jax.shard_map(lambda b: body(C, b), mesh=mesh, in_specs=jax_spec(P("i")),
                      out_specs=jax_spec(P()))
    return jax.grad(lambda x: f(x))


@pytest.mark.parametrize("name", SHARD_MAP_BODIES)
def test_inside_shard_map_matches_jax(name):
    body = SHARD_MAP_BODIES[name]
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])
    x = np.linspace(-2, 3, 8).astype(np.float32)
    want = np.asarray(_jax().jit(_sharded_grad(_jax(), body, jax_mesh((4,), ("i",)), x))(x))
    g = _sharded_grad(SPMD, body, mesh, x)
    np.testing.assert_allclose(np.asarray(spmd.jit(g)(x)), want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(spmd.jit(g, executor=reference_executor())(x), want, rtol=2e-6,
                               atol=1e-6)


def test_compiled_with_shardings_inlines_the_body():
    mesh = spmd.make_mesh((8,), ("i",))
    sh = spmd.NamedSharding(mesh, P("i"))
    f = spmd.jit(spmd.grad(lambda x: np.sum(log1pexp(SPMD)(x) * 2)), in_shardings=sh,
                 out_shardings=sh)
    x = np.linspace(-5, 500, 16).astype(np.float32)
    np.testing.assert_allclose(np.asarray(f(x)), 2 / (1 + np.exp(-x.astype(np.float64))), rtol=1e-5)
    prims = [e.prim.name for e in spmd.make_program(log1pexp(SPMD))(x).eqns]
    assert prims == ["custom_jvp_call"]


# ---------------------------------------------------------------------------------------------
# bad inputs: each a clear error naming the function
# ---------------------------------------------------------------------------------------------

def _vjp_fn(bwd, fwd=None):
    @spmd.custom_vjp
    def scale(x, y):
        return x * y
    scale.defvjp(fwd or (lambda x, y: (x * y, (x, y))), bwd)
    return lambda x: np.sum(scale(x, 2. * x))


BAD = {
    "bwd returns a bare array": (
        _vjp_fn(lambda res, g: g * res[1]), TypeError, "bwd rule of scale must return a tuple"),
    "bwd returns too few cotangents": (
        _vjp_fn(lambda res, g: (g * res[1],)), TypeError, "returned 1 cotangents, but scale has 2"),
    "bwd cotangent of the wrong shape": (
        _vjp_fn(lambda res, g: (g * res[1], np.sum(g))), TypeError,
        r"cotangent of shape \[\] for the argument at \[1\], whose shape is \[3\]"),
    "bwd cotangent of the wrong structure": (
        _vjp_fn(lambda res, g: (g * res[1], (g, g))), TypeError,
        "the cotangent of argument 1 has structure"),
    "fwd returns no residuals": (
        _vjp_fn(lambda res, g: (g, g), fwd=lambda x, y: x * y), TypeError,
        "fwd rule of scale must return a pair"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_rules_are_clear_errors(name):
    fn, exc, match = BAD[name]
    with pytest.raises(exc, match=match):
        spmd.grad(fn)(np.ones(3))


def test_jvp_rule_with_wrong_output_structure_or_type():
    @spmd.custom_jvp
    def pair(x):
        return x, 2 * x
    pair.defjvp(lambda p, t: (pair(*p), t[0]))
    with pytest.raises(TypeError, match=r"pair: the tangent output of the JVP rule has structure"):
        spmd.grad(lambda x: pair(x)[1])(1.)

    @spmd.custom_jvp
    def g(x):
        return x * 2
    g.defjvp(lambda p, t: (g(*p), np.ones(3)))
    with pytest.raises(TypeError, match=r"g: the tangent output of the JVP rule at the top has "
                                        r"type float64\[3\], but the primal has float64\[\]"):
        spmd.grad(g)(1.)


def test_missing_rules_and_forward_mode_of_custom_vjp():
    @spmd.custom_jvp
    def nothing(x):
        return x
    with pytest.raises(AttributeError, match="No JVP defined for custom_jvp function nothing"):
        nothing(1.)
    f = sin_times(SPMD)
    with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp "
                                        r"function \(f\)"):
        spmd.jvp(lambda x: f(x, x), (np.float32(1.),), (np.float32(1.),))


def test_rule_closing_over_a_differentiated_value_is_an_error():
    def loss(w, x):
        @spmd.custom_jvp
        def scaled(x):
            return x * w

        @scaled.defjvp
        def scaled_jvp(p, t):
            return scaled(p[0]), t[0] * w
        return np.sum(scaled(x))
    with pytest.raises(TypeError, match="scaled closes over a traced value that is being "
                                        "differentiated; pass it as an argument of scaled"):
        spmd.grad(loss)(2., np.ones(3))
    # differentiating with respect to the argument only is fine
    np.testing.assert_allclose(np.asarray(spmd.grad(loss, argnums=1)(2., np.ones(3))), [2., 2., 2.])


def test_pmax_gradient_error_names_stop_gradient():
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])
    f = spmd.shard_map(lambda x: spmd.pmax(x, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    with pytest.raises(NotImplementedError, match=r"pmax has no gradient.*stop_gradient"):
        spmd.grad(lambda x: np.sum(f(x)))(np.arange(8.))
    g = spmd.grad(lambda x: np.sum(f(spmd.stop_gradient(x))) + np.sum(x))(np.arange(8.))
    np.testing.assert_array_equal(np.asarray(g), np.ones(8))
