"""Manual axes' unreduced and reduced types (JAX 0.10's ``pcast``, ``typeof(x).manual_axis_type``,
``out_specs=P(unreduced=...)``), ``where`` with a scalar condition, loops and closures on
Explicit axes: each case run by JAX as the oracle (printed types, values, gradients, errors).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.core import ShardingTypeError   # JAX raises it, but exports it under no public name

import spmd
import spmd.numpy as snp
from spmd import P

JP = jax.sharding.PartitionSpec
rng = np.random.default_rng(7)


def f32(*shape):
    return rng.normal(size=shape).astype(np.float32)


class F:
    """One framework's names, so that each case is written once for both."""

    def __init__(self, name, shape=(2, 2), names=("x", "y")):
        self.name = name
        if name == "spmd":
            self.mesh = spmd.make_mesh(shape, names)
            self.np, self.P, self.jit, self.grad = snp, P, spmd.jit, spmd.grad
            self.typeof, self.shard_map = spmd.typeof, spmd.shard_map
            self.reshard, self.set_mesh = spmd.reshard, spmd.set_mesh
            self.pcast, self.psum, self.lax = spmd.pcast, spmd.psum, spmd.lax
            self.device_put = spmd.device_put
        else:
            self.mesh = jax.make_mesh(shape, names)
            self.np, self.P, self.jit, self.grad = jnp, JP, jax.jit, jax.grad
            self.typeof, self.shard_map = jax.typeof, jax.shard_map
            self.reshard, self.set_mesh = jax.sharding.reshard, jax.set_mesh
            self.pcast, self.psum, self.lax = jax.lax.pcast, jax.lax.psum, jax.lax
            self.device_put = jax.device_put

    def ns(self, *spec, **kw):
        return (spmd.NamedSharding if self.name == "spmd" else jax.sharding.NamedSharding)(
            self.mesh, self.P(*spec, **kw))

    def put(self, x, *spec, **kw):
        return self.device_put(x, self.ns(*spec, **kw))


def both(shape=(2, 2), names=("x", "y")):
    return F("spmd", shape, names), F("jax", shape, names)


def spec_of(x):
    """A result's sharding as spmd's P, without the unreduced axes (spmd makes a pending sum at
    the boundary of jit, where JAX hands out an Array that cannot be read until resharded)."""
    return P(*x.sharding.spec)


def outcome(fn):
    """``('ok', value)`` or ``('raises', exception kind)``: JAX's ShardingTypeError is spmd's
    ShardingError; JAX's ValueError and NotImplementedError are the same in spmd."""
    try:
        return "ok", fn()
    except ShardingTypeError:
        return "raises", "sharding"
    except spmd.ShardingError as e:
        return "raises", "not implemented" if isinstance(e, NotImplementedError) else "sharding" \
            if not isinstance(e, spmd.UnreducedError) and "inside shard_map" in str(e) else "value"
    except NotImplementedError:
        return "raises", "not implemented"
    except ValueError:
        return "raises", "value"
    except TypeError:
        return "raises", "type"


# -- pcast: every (state, to) pair -----------------------------------------------------------

def _make_state(Fw, a, state):
    """``a`` (varying over x) brought to ``state`` over mesh axis y."""
    if state == "varying":
        return Fw.pcast(a, "y", to="varying")
    if state == "unreduced":
        return Fw.pcast(Fw.pcast(a, "y", to="varying"), "y", to="unreduced")
    if state == "reduced":
        return Fw.pcast(a, "y", to="reduced")
    return a


STATES = ["invariant", "varying", "unreduced", "reduced"]


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("to", ["varying", "unreduced", "reduced"])
def test_pcast_types_and_errors_match_jax(state, to):
    a = f32(4, 4)
    results = []
    for Fw in both():
        seen = []

        def body(b):
            y = Fw.pcast(_make_state(Fw, b, state), "y", to=to)
            seen.append(str(Fw.typeof(y)))
            return b
        x = Fw.put(a, "x")
        got = outcome(lambda: Fw.jit(Fw.shard_map(body, mesh=Fw.mesh, in_specs=Fw.P("x"),
                                                  out_specs=Fw.P("x")))(x))
        results.append((got[0], got[1] if got[0] == "raises" else seen))
    assert results[0] == results[1]


def test_pcast_argument_errors_match_jax():
    a = f32(4, 4)
    for Fw in both():
        x = Fw.put(a, "x")
        for bad, kind in (({"x"}, TypeError), ("y", ValueError)):
            body = (lambda b, bad=bad: Fw.pcast(b, bad, to="varying")) if kind is TypeError else \
                (lambda b: Fw.pcast(b, "y", to="sideways"))
            with pytest.raises(kind):
                Fw.jit(Fw.shard_map(body, mesh=Fw.mesh, in_specs=Fw.P("x"), out_specs=Fw.P("x")))(x)
        with pytest.raises(ValueError, match="pcast can only accept axis_name"):
            Fw.jit(Fw.shard_map(lambda b: Fw.pcast(b, ("x", "y"), to="unreduced"), mesh=Fw.mesh,
                                in_specs=Fw.P("x"), out_specs=Fw.P("x")))(x)


# -- ops on unreduced and reduced values inside shard_map ----------------------------------------

def _u(Fw, b):
    return Fw.pcast(b, "x", to="unreduced")


def _r(Fw, b):
    return Fw.pcast(Fw.psum(b, "x"), "x", to="reduced")


OPS = [   # name, body (b varies over x), out_specs (kwargs of P)
    ("u + u", lambda Fw, b: _u(Fw, b) + _u(Fw, b), {"unreduced": {"x"}}),
    ("sum of u", lambda Fw, b: _u(Fw, b).sum(0), {"unreduced": {"x"}}),
    ("transpose of u", lambda Fw, b: _u(Fw, b).T, {"unreduced": {"x"}}),
    ("reshape of u", lambda Fw, b: _u(Fw, b).reshape(4, 2), {"unreduced": {"x"}}),
    ("u * r", lambda Fw, b: _u(Fw, b) * _r(Fw, b), {"unreduced": {"x"}}),
    ("r * u", lambda Fw, b: _r(Fw, b) * _u(Fw, b), {"unreduced": {"x"}}),
    ("r * r", lambda Fw, b: _r(Fw, b) * _r(Fw, b), {"reduced": {"x"}}),
    ("sin of r", lambda Fw, b: Fw.np.sin(_r(Fw, b)), {"reduced": {"x"}}),
    ("sum of r", lambda Fw, b: _r(Fw, b).sum(), {"reduced": {"x"}}),
    ("r + varying", lambda Fw, b: _r(Fw, b) + b, {}),
    ("sin of u", lambda Fw, b: Fw.np.sin(_u(Fw, b)), {"unreduced": {"x"}}),
    ("u * u", lambda Fw, b: _u(Fw, b) * _u(Fw, b), {"unreduced": {"x"}}),
    ("u + invariant", lambda Fw, b: _u(Fw, b) + Fw.psum(b, "x"), {"unreduced": {"x"}}),
    ("u * 2", lambda Fw, b: _u(Fw, b) * 2.0, {"unreduced": {"x"}}),
    ("r * 2", lambda Fw, b: _r(Fw, b) * 2.0, {"reduced": {"x"}}),
    ("r + invariant", lambda Fw, b: _r(Fw, b) + Fw.psum(b, "x"), {"reduced": {"x"}}),
    ("psum of u", lambda Fw, b: Fw.psum(_u(Fw, b), "x"), {}),
    ("psum of r", lambda Fw, b: Fw.psum(_r(Fw, b), "x"), {}),
    ("psum of u and an invariant axis", lambda Fw, b: Fw.psum(_u(Fw, b), ("x", "y")), {}),
    ("all_gather of u", lambda Fw, b: Fw.lax.all_gather(_u(Fw, b), "x"), {}),
    ("where of u", lambda Fw, b: Fw.np.where(b > 0, _u(Fw, b), _u(Fw, b)), {"unreduced": {"x"}}),
    ("out_specs P() of u", lambda Fw, b: _u(Fw, b), {}),
    ("out_specs P('x') of u", lambda Fw, b: _u(Fw, b), {"x": True}),
    ("out_specs unreduced of invariant", lambda Fw, b: Fw.psum(b, "x"), {"unreduced": {"x"}}),
    ("out_specs unreduced of varying", lambda Fw, b: b * 2, {"unreduced": {"x"}}),
    ("out_specs reduced of invariant", lambda Fw, b: Fw.psum(b, "x"), {"reduced": {"x"}}),
    ("out_specs P() of r", lambda Fw, b: _r(Fw, b), {}),
]


@pytest.mark.parametrize("name, body, out", OPS, ids=[o[0] for o in OPS])
def test_ops_on_unreduced_and_reduced_values_match_jax(name, body, out):
    a = f32(4, 4)
    results = []
    for Fw in both():
        seen = []

        def traced(b):
            y = body(Fw, b)
            seen.append(str(Fw.typeof(y)))
            return y
        spec = Fw.P("x", **{k: v for k, v in out.items() if k != "x"}) if out.get("x") else \
            Fw.P(**out)
        x = Fw.put(a, "x")
        got = outcome(lambda: Fw.jit(Fw.shard_map(traced, mesh=Fw.mesh, in_specs=Fw.P("x"),
                                                  out_specs=spec))(x))
        results.append((got[0], got[1] if got[0] == "raises" else seen))
    assert results[0] == results[1]


def test_unreduced_specs_need_an_explicit_fully_manual_mesh_as_in_jax():
    for Fw, mesh in ((spmd, spmd.make_mesh((2, 1), ("x", "y"), (spmd.AxisType.Auto,) * 2)),
                     (jax, jax.make_mesh((2, 1), ("x", "y"), (jax.sharding.AxisType.Auto,) * 2))):
        Pw = P if Fw is spmd else JP
        with pytest.raises(ValueError, match="Explicit"):
            Fw.shard_map(lambda v: v, mesh=mesh, in_specs=Pw(unreduced={"x"}),
                         out_specs=Pw())(np.arange(8.0))
        with pytest.raises(NotImplementedError, match="manual"):
            Fw.shard_map(lambda v: v, mesh=mesh, in_specs=Pw(unreduced={"x"}), out_specs=Pw(),
                         axis_names={"x"})(np.arange(8.0))


# -- values and gradients through unreduced and reduced values ----------------------------------

def test_matmul_left_unreduced_by_shard_map_is_summed_where_resharded():
    a, b = f32(4, 8), f32(8, 4)
    outs = []
    for Fw in both():
        x, w = Fw.put(a, "x", "y"), Fw.put(b, "y", None)
        seen = []

        def body(x, w):
            c = Fw.np.matmul(x, w)
            seen.append(str(Fw.typeof(c)))
            c = Fw.pcast(c, "y", to="unreduced")
            seen.append(str(Fw.typeof(c)))
            return c
        f = Fw.shard_map(body, mesh=Fw.mesh, in_specs=(Fw.P("x", "y"), Fw.P("y", None)),
                         out_specs=Fw.P("x", None, unreduced={"y"}))

        def loss(x, w):
            z = f(x, w)
            seen.append(str(Fw.typeof(z)))
            return Fw.reshard(z, Fw.ns("x", None)).sum()
        value = Fw.jit(loss)(x, w)
        gx, gw = Fw.jit(Fw.grad(loss, argnums=(0, 1)))(x, w)
        outs.append((seen[:3], float(value), np.asarray(gx), np.asarray(gw), spec_of(gx),
                     spec_of(gw)))
    (s, v, gx, gw, sx, sw), (js, jv, jgx, jgw, jsx, jsw) = outs
    assert s == js == ["float32[2,4]{V:(x,y)}", "float32[2,4]{V:x, U:y}", "float32[4@x,4]{U:y}"]
    np.testing.assert_allclose(v, jv, rtol=1e-5)
    np.testing.assert_allclose(gx, jgx, rtol=1e-5)
    np.testing.assert_allclose(gw, jgw, rtol=1e-5)
    assert (sx, sw) == (jsx, jsw) == (P("x", "y"), P("y"))


def test_shard_map_result_left_unreduced_is_summed_at_the_jit_boundary():
    """JAX hands out an Array typed ``P('x', None, unreduced={'y'})`` that must be resharded
    before it can be read; spmd makes the pending sum at the boundary: its value is JAX's
    resharded one."""
    a, b = f32(4, 8), f32(8, 4)
    vals = []
    for Fw in both():
        f = Fw.jit(Fw.shard_map(lambda x, w: Fw.pcast(x @ w, "y", to="unreduced"), mesh=Fw.mesh,
                                in_specs=(Fw.P("x", "y"), Fw.P("y", None)),
                                out_specs=Fw.P("x", None, unreduced={"y"})))
        out = f(Fw.put(a, "x", "y"), Fw.put(b, "y", None))
        if Fw.name == "jax":
            assert out.sharding.spec == JP("x", None, unreduced={"y"})
            out = jax.sharding.reshard(out, Fw.ns("x", None))
        vals.append(np.asarray(out))
    np.testing.assert_allclose(vals[0], vals[1], rtol=1e-5)
    np.testing.assert_allclose(vals[0], a @ b, rtol=1e-5)


def test_psum_of_unreduced_input_and_its_reduced_cotangent_match_jax():
    a, b = f32(2, 4), f32(4, 6)
    outs = []
    for Fw in both((2,), ("x",)):
        seen = []

        def ar(z):
            seen.append(str(Fw.typeof(z)))
            out = Fw.psum(z, "x")
            seen.append(str(Fw.typeof(out)))
            return out

        def loss(x, y):
            z = Fw.np.einsum("ab,bc->ac", x, y, out_sharding=Fw.P(unreduced={"x"}))
            return Fw.shard_map(ar, in_specs=Fw.P(unreduced={"x"}), out_specs=Fw.P())(z).sum()
        with Fw.set_mesh(Fw.mesh):
            x, y = Fw.put(a, None, "x"), Fw.put(b, "x", None)
            value = Fw.jit(loss)(x, y)
            gx, gy = Fw.jit(Fw.grad(loss, argnums=(0, 1)))(x, y)
        outs.append((seen[:2], float(value), np.asarray(gx), np.asarray(gy), spec_of(gx),
                     spec_of(gy)))
    (s, v, gx, gy, sx, sy), (js, jv, jgx, jgy, jsx, jsy) = outs
    assert s == js == ["float32[2,6]{U:x}", "float32[2,6]"]
    np.testing.assert_allclose(v, jv, rtol=1e-5)
    np.testing.assert_allclose(gx, jgx, rtol=1e-5)
    np.testing.assert_allclose(gy, jgy, rtol=1e-5)
    # JAX types y's gradient P('x', None), the primal's sharding; spmd's transposes leave the
    # cotangents of linearized inputs untyped, so the compiler places that one (replicated)
    assert sx == jsx == P(None, "x") and jsy == P("x")


def test_reduced_output_and_its_unreduced_cotangent_match_jax():
    a, b = f32(2, 4), f32(4, 6)
    outs = []
    for Fw in both((2,), ("x",)):
        seen = []

        def pr(v):
            out = Fw.pcast(v, "x", to="reduced")
            seen.append(str(Fw.typeof(out)))
            return out

        def loss(x, y):
            x = Fw.shard_map(pr, in_specs=Fw.P(), out_specs=Fw.P(reduced={"x"}))(x)
            seen.append(str(Fw.typeof(x)))
            return Fw.np.einsum("ab,bc->ac", x, y).sum()
        with Fw.set_mesh(Fw.mesh):
            x, y = Fw.put(a, None, None), Fw.put(b, None, "x")
            value = Fw.jit(loss)(x, y)
            gx = Fw.jit(Fw.grad(loss))(x, y)
        outs.append((seen[:2], float(value), np.asarray(gx), spec_of(gx)))
    (s, v, gx, sx), (js, jv, jgx, jsx) = outs
    assert s == js == ["float32[2,4]{R:x}", "float32[2,4]{R:x}"]
    np.testing.assert_allclose(v, jv, rtol=1e-5)
    np.testing.assert_allclose(gx, jgx, rtol=1e-5)
    assert sx == jsx == P(None, None)


@pytest.mark.parametrize("op", ["mul", "add"])
def test_reduced_operand_meeting_a_varying_one_has_a_pending_sum_cotangent(op):
    """JAX casts the reduced operand to varying (not pvary): its cotangent is a pending sum
    (JAX returns it typed ``P(None, unreduced={'x'})``; spmd makes the sum at the boundary)."""
    a, b = f32(16), f32(8)
    outs = []
    for Fw in both((2,), ("x",)):
        fn = (lambda u, v: u * v) if op == "mul" else (lambda u, v: u + v)
        seen = []

        def body(u, v):
            seen.append(str(Fw.typeof(v)))
            z = fn(u, v)
            seen.append(str(Fw.typeof(z)))
            return Fw.psum(z, "x")
        f = Fw.shard_map(body, mesh=Fw.mesh, in_specs=(Fw.P("x"), Fw.P(None, reduced={"x"})),
                         out_specs=Fw.P())
        loss = lambda u, v: f(u, v).sum()
        u, v = Fw.put(a, "x"), Fw.put(b, None, reduced={"x"})
        value = np.asarray(Fw.jit(f)(u, v))
        gu, gv = Fw.jit(Fw.grad(loss, argnums=(0, 1)))(u, v)
        if Fw.name == "jax":
            assert gv.sharding.spec == JP(None, unreduced={"x"})
            gv = jax.sharding.reshard(gv, Fw.ns())
        outs.append((seen[:2], value, np.asarray(gu), np.asarray(gv), spec_of(gu)))
    (s, v, gu, gv, su), (js, jv, jgu, jgv, jsu) = outs
    assert s == js == ["float32[8]{R:x}", "float32[8]{V:x}"]
    np.testing.assert_allclose(v, jv, rtol=1e-5)
    np.testing.assert_allclose(gu, jgu, rtol=1e-5)
    np.testing.assert_allclose(gv, jgv, rtol=1e-5)
    assert su == jsu == P("x")


def test_reduced_to_varying_pcast_gradient_matches_jax():
    a = f32(8)
    outs = []
    for Fw in both((2,), ("x",)):
        f = Fw.shard_map(lambda v: Fw.pcast(v, "x", to="varying"), mesh=Fw.mesh,
                         in_specs=Fw.P(None, reduced={"x"}), out_specs=Fw.P("x"))
        v = Fw.put(a, None, reduced={"x"})
        out = Fw.jit(f)(v)
        g = Fw.jit(Fw.grad(lambda v: (f(v) ** 2).sum()))(v)
        if Fw.name == "jax":
            g = jax.sharding.reshard(g, Fw.ns())
        outs.append((np.asarray(out), spec_of(out), np.asarray(g)))
    (o, so, g), (jo, jso, jg) = outs
    np.testing.assert_allclose(o, jo)
    assert so == jso == P("x")
    np.testing.assert_allclose(g, jg, rtol=1e-5)


# -- where with a scalar condition ---------------------------------------------------------------

@pytest.mark.parametrize("cond", ["python", "traced", "traced other case"])
def test_where_with_a_scalar_condition_keeps_the_cases_sharding(cond):
    a = f32(8, 4)
    outs = []
    for Fw in both((2, 4), ("x", "y")):
        seen = []

        def f(x):
            c = True if cond == "python" else x.sum() > 0
            out = Fw.np.where(c, x, x * 2) if cond != "traced other case" else \
                Fw.np.where(c, x, 0.0)
            seen.append(str(Fw.typeof(out)))
            return out
        out = Fw.jit(f)(Fw.put(a, "x"))
        outs.append((seen, np.asarray(out), spec_of(out)))
    assert outs[0][0] == outs[1][0] == ["float32[8@x,4]"]
    np.testing.assert_allclose(outs[0][1], outs[1][1])
    assert outs[0][2] == outs[1][2] == P("x")


# -- loops and conds keep their types; a carry's type may not change -------------------------

LOOPS = [
    ("scan", lambda Fw, x: Fw.lax.scan(lambda c, s: (c + s, c * 2), x, Fw.np.stack([x, x]))),
    ("fori_loop", lambda Fw, x: Fw.lax.fori_loop(0, 3, lambda i, c: c * 2, x)),
    ("while_loop", lambda Fw, x: Fw.lax.while_loop(lambda c: c[0] < 3,
                                                   lambda c: (c[0] + 1, c[1] * 2), (0, x))[1]),
    ("cond", lambda Fw, x: Fw.lax.cond(x.sum() > 0, lambda v: v * 2, lambda v: v + 1, x)),
]


@pytest.mark.parametrize("name, loop", LOOPS, ids=[r[0] for r in LOOPS])
def test_loop_results_are_typed_as_in_jax(name, loop):
    a = f32(8, 4)
    outs = []
    for Fw in both((2, 4), ("x", "y")):
        seen = []

        def f(x):
            out = loop(Fw, x)
            seen.extend(str(Fw.typeof(o)) for o in (out if isinstance(out, tuple) else (out,)))
            return out
        out = Fw.jit(f)(Fw.put(a, "x"))
        outs.append((seen, [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]))
    assert outs[0][0] == outs[1][0]
    for s, j in zip(outs[0][1], outs[1][1]):
        np.testing.assert_allclose(s, j, rtol=1e-5)


CHANGED = [
    ("scan", lambda Fw, x, to: Fw.lax.scan(lambda c, _: (Fw.reshard(c, to), None), x, None,
                                           length=2)[0]),
    ("while_loop", lambda Fw, x, to: Fw.lax.while_loop(lambda c: c.sum() < 0,
                                                       lambda c: Fw.reshard(c, to), x)),
    ("cond", lambda Fw, x, to: Fw.lax.cond(x.sum() > 0, lambda v: v * 2,
                                           lambda v: Fw.reshard(v, to), x)),
]


@pytest.mark.parametrize("name, loop", CHANGED, ids=[r[0] for r in CHANGED])
def test_a_carry_whose_sharding_changes_is_a_type_error_as_in_jax(name, loop):
    for Fw in both((2, 4), ("x", "y")):
        to = Fw.ns(None, "y")
        with pytest.raises(TypeError, match="type"):
            Fw.jit(lambda x: loop(Fw, x, to))(Fw.put(f32(8, 4), "x"))


# -- closing over a value sharded on Explicit axes ------------------------------------------

def test_shard_map_closing_over_an_explicitly_sharded_value_raises_as_in_jax():
    a = f32(8, 4)
    for Fw in both((2,), ("x",)):
        x, w = Fw.put(a, "x"), Fw.put(a, "x")
        closes = Fw.shard_map(lambda b: b * w.sum(), mesh=Fw.mesh, in_specs=Fw.P("x"),
                              out_specs=Fw.P("x"))
        with pytest.raises(NotImplementedError):
            Fw.jit(closes)(x)
        ones = np.ones((4, 4), np.float32)     # an unsharded value closes over fine
        fine = Fw.shard_map(lambda b: (ones * b).sum(-1), mesh=Fw.mesh, in_specs=Fw.P("x"),
                            out_specs=Fw.P("x"))
        np.testing.assert_allclose(np.asarray(fine(x)), a.sum(-1), rtol=1e-5)
    with pytest.raises(NotImplementedError, match="pass the value as an argument"):
        spmd.jit(lambda x: spmd.shard_map(lambda b: b + x, mesh=spmd.make_mesh((2,), ("x",)),
                                          in_specs=P("x"), out_specs=P("x"))(x))(
            spmd.device_put(a, spmd.NamedSharding(spmd.make_mesh((2,), ("x",)), P("x"))))
