"""Sharding in types (JAX's Explicit, Auto and Manual mesh axes), with JAX running each case
as the oracle: meshes and their axis types, ``typeof``, ``reshard``, ``out_sharding=``, the
errors, ``shard_map`` on Explicit meshes, autodiff and ``vmap``, and the Auto-mode shardings.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.core import ShardingTypeError   # JAX raises it, but exports it under no public name

import spmd
import spmd.numpy as snp
from spmd import AxisType, NamedSharding, P

JP, JNS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
rng = np.random.default_rng(13)


def meshes(shape=(2, 4), names=("X", "Y"), types=None):
    """The same mesh in spmd and in JAX (``types``: names of AxisType members, or None)."""
    s = spmd.make_mesh(shape, names, None if types is None else tuple(AxisType[t] for t in types))
    j = jax.make_mesh(shape, names,
                      None if types is None else tuple(jax.sharding.AxisType[t] for t in types))
    return s, j


def put(x, s, j, *spec):
    return spmd.device_put(x, NamedSharding(s, P(*spec))), jax.device_put(x, JNS(j, JP(*spec)))


def f32(*shape):
    return rng.normal(size=shape).astype(np.float32)


# -- meshes ----------------------------------------------------------------------------------------

MESH_SHAPES = [((4,), ("x",)), ((2, 4), ("x", "y")), ((2, 2), ("a", "b")), ((8,), ("i",)),
               ((1, 2), ("p", "q"))]


@pytest.mark.parametrize("shape, names", MESH_SHAPES)
def test_make_mesh_defaults_match_jax(shape, names):
    s, j = meshes(shape, names)
    assert [t.name for t in s.axis_types] == [t.name for t in j.axis_types]
    assert s.axis_types == (AxisType.Explicit,) * len(names)
    # the first prod(shape) devices
    assert s.device_ids.tolist() == np.vectorize(lambda d: d.id)(j.devices).tolist()
    assert s.explicit_axes == j.explicit_axes and s.auto_axes == j.auto_axes == ()
    plain = spmd.Mesh(s.devices, names)
    jplain = jax.sharding.Mesh(j.devices, names)
    assert [t.name for t in plain.axis_types] == [t.name for t in jplain.axis_types]
    assert plain != s and (jplain != j)
    am = s.abstract_mesh
    assert am.axis_types == s.axis_types and am == spmd.AbstractMesh(shape, names, s.axis_types)


def test_axis_types_argument_and_errors():
    s, j = meshes((2, 4), ("x", "y"), ("Explicit", "Auto"))
    assert (s.explicit_axes, s.auto_axes) == (j.explicit_axes, j.auto_axes) == (("x",), ("y",))
    assert s.axis_type("y") is AxisType.Auto
    with pytest.raises(ValueError):
        jax.make_mesh((2, 4), ("x", "y"), (jax.sharding.AxisType.Explicit,))
    for bad in [(AxisType.Explicit,), ("Explicit", "Auto")]:
        with pytest.raises(spmd.MeshError, match="axis_types|AxisType"):
            spmd.make_mesh((2, 4), ("x", "y"), bad)
    with pytest.raises(ValueError):
        jax.make_mesh((16,), ("x",))
    with pytest.raises(spmd.MeshError, match="needs 16 devices"):
        spmd.make_mesh((16,), ("x",))


def test_set_mesh_and_get_abstract_mesh():
    s, _ = meshes()
    assert spmd.get_abstract_mesh().empty and spmd.get_abstract_mesh().axis_names == ()
    with spmd.set_mesh(s) as m:
        assert m is s and spmd.get_abstract_mesh() == s.abstract_mesh
    assert spmd.get_mesh() is None
    setter = spmd.set_mesh(s)                 # a plain call sets it for what follows
    try:
        assert spmd.get_mesh() is s
        x = spmd.device_put(f32(8, 4), P("X"))
        assert x.sharding == NamedSharding(s, P("X"))
    finally:
        setter.__exit__(None, None, None)
    assert spmd.get_mesh() is None

    seen = []

    def body(b):
        seen.append(spmd.get_abstract_mesh())
        return b
    spmd.shard_map(body, mesh=s, in_specs=P("X"), out_specs=P("X"), axis_names={"X"})(f32(8, 4))
    assert seen[0].axis_types == (AxisType.Manual, AxisType.Explicit)


# -- typeof ----------------------------------------------------------------------------------------

class Framework:
    """One framework's names, so that a program is written once for both (``F.np`` is NumPy
    for spmd and jax.numpy for JAX)."""

    def __init__(self, name, mesh):
        self.name, self.mesh = name, mesh
        if name == "spmd":
            self.np, self.snp, self.P, self.NS, self.lax = np, snp, P, NamedSharding, spmd.lax
            self.jit, self.grad, self.vmap = spmd.jit, spmd.grad, spmd.vmap
            self.typeof, self.shard_map = spmd.typeof, spmd.shard_map
            self.reshard, self.set_mesh = spmd.reshard, spmd.set_mesh
        else:
            self.np, self.snp, self.P, self.NS, self.lax = jnp, jnp, JP, JNS, jax.lax
            self.jit, self.grad, self.vmap, self.typeof = jax.jit, jax.grad, jax.vmap, jax.typeof
            self.shard_map, self.reshard = jax.shard_map, jax.sharding.reshard
            self.set_mesh = jax.set_mesh

    def ns(self, *spec):
        return self.NS(self.mesh, self.P(*spec))


def frameworks(shape=(2, 4), names=("X", "Y"), types=None):
    s, j = meshes(shape, names, types)
    return Framework("spmd", s), Framework("jax", j)


SP, JX = frameworks()


def _types(F, program, *args):
    """The types ``program`` records with ``F.typeof`` while ``F.jit`` traces it."""
    seen = []
    F.jit(lambda *a: program(F, seen, *a))(*args)
    return seen


def _show(F, seen, *xs):
    seen.extend(str(F.typeof(x)) for x in xs)
    return xs[0]


TYPEOF_PROGRAMS = [
    ("elementwise", lambda F, seen, x, w: _show(F, seen, x * 2, x + 1.0, -x, F.np.tanh(x))),
    ("reductions", lambda F, seen, x, w: _show(F, seen, x.sum(0), x.sum(axis=1), x.max())),
    ("transpose and reshape", lambda F, seen, x, w: _show(F, seen, x.T, x.reshape(2, 4, 16))),
    ("matmul", lambda F, seen, x, w: _show(F, seen, x @ w.T)),
    ("reshard", lambda F, seen, x, w: _show(F, seen, F.reshard(x, F.ns(None, "Y")))),
    ("shard_map", lambda F, seen, x, w: _show(F, seen, F.shard_map(
        lambda b: _show(F, seen, b, F.lax.psum(b, "X"), F.lax.axis_index("Y")),
        mesh=F.mesh, in_specs=F.P("X", "Y"), out_specs=F.P("X", "Y"))(x))),
]


@pytest.mark.parametrize("name, program", TYPEOF_PROGRAMS, ids=[p[0] for p in TYPEOF_PROGRAMS])
@pytest.mark.parametrize("spec", [("X", "Y"), (("X", "Y"),), (None, "Y"), ()])
def test_typeof_inside_jit_matches_jax(name, program, spec):
    if name == "shard_map":
        spec = ("X", "Y")
    x, jx = put(f32(8, 16), SP.mesh, JX.mesh, *spec)
    w, jw = put(f32(4, 16), SP.mesh, JX.mesh)
    assert _types(SP, program, x, w) == _types(JX, program, jx, jw)


@pytest.mark.parametrize("spec", [("X", "Y"), (("X", "Y"),), (("Y", "X"), None), (None, "X"), ()])
def test_typeof_of_arrays_matches_jax(spec):
    x, jx = put(f32(8, 16), SP.mesh, JX.mesh, *spec)
    t, jt = spmd.typeof(x), jax.typeof(jx)
    assert str(t) == str(jt) and repr(t) == repr(jt)
    assert t.sharding.spec == P(*jt.sharding.spec) and t.shape == jt.shape
    assert t.manual_axis_type.varying == t.vma == frozenset()


def test_typeof_on_auto_axes_shows_no_sharding():
    s, j = meshes(types=("Auto", "Auto"))
    x, jx = put(f32(8, 16), s, j, "X", "Y")
    assert str(spmd.typeof(x)) == str(jax.typeof(jx)) == "float32[8,16]"
    assert spmd.typeof(x).sharding.spec == P(None, None)
    assert str(spmd.typeof(np.ones(3, np.float32))) == str(jax.typeof(np.ones(3, np.float32)))


# -- reshard, out_sharding, with_sharding_constraint -----------------------------------------

def test_reshard_outside_and_inside_jit_matches_jax():
    x, jx = put(f32(8, 16), SP.mesh, JX.mesh, "X", "Y")
    y, jy = spmd.reshard(x, SP.ns(None, "X")), jax.sharding.reshard(jx, JX.ns(None, "X"))
    assert str(spmd.typeof(y)) == str(jax.typeof(jy)) and y.sharding.spec == P(*jy.sharding.spec)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jy))

    def f(F, seen, x):
        y = F.reshard(x * 2, F.ns("Y", None))
        seen.append(str(F.typeof(y)))
        return y.sum(1)
    assert _types(SP, f, x) == _types(JX, f, jx)
    out, jout = SP.jit(lambda x: f(SP, [], x))(x), JX.jit(lambda x: f(JX, [], x))(jx)
    assert out.sharding.spec == P(*jout.sharding.spec)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jout), rtol=1e-5)


def test_reshard_of_a_bare_spec_needs_a_mesh_as_in_jax():
    x, jx = put(f32(8, 16), SP.mesh, JX.mesh, "X")
    with pytest.raises(ValueError):
        jax.sharding.reshard(jx, JP("Y"))
    with pytest.raises(ValueError, match="needs a mesh"):
        spmd.reshard(x, P("Y"))


OUT_SHARDING = [
    ("matmul", lambda F, x, w: F.snp.matmul(x, w, out_sharding=F.P("X", None))),
    ("einsum", lambda F, x, w: F.snp.einsum("ij,jk->ik", x, w, out_sharding=F.P("X", "Y"))),
    ("dot", lambda F, x, w: F.snp.dot(x, w, out_sharding=F.P(None, "Y"))),
    ("reshape", lambda F, x, w: F.snp.reshape(x, (64,), out_sharding=F.P(("X", "Y")))),
    ("zeros", lambda F, x, w: x.sum() + F.snp.zeros((8, 4), np.float32, out_sharding=F.P("X"))),
    ("ones", lambda F, x, w: F.snp.ones((4,), np.float32, out_sharding=F.P("Y")) * 2),
    ("full", lambda F, x, w: F.snp.full((8, 4), 3.0, np.float32, out_sharding=F.P("X", "Y"))),
    ("arange", lambda F, x, w: F.snp.arange(8, dtype=np.float32, out_sharding=F.P("Y"))),
]


@pytest.mark.parametrize("name, op", OUT_SHARDING, ids=[o[0] for o in OUT_SHARDING])
def test_out_sharding_matches_jax(name, op):
    x, jx = put(f32(8, 8), SP.mesh, JX.mesh, "X", "Y")
    w, jw = put(f32(8, 8), SP.mesh, JX.mesh, "Y", None)

    def program(F, seen, x, w):
        out = op(F, x, w)
        seen.append(str(F.typeof(out)))
        return out
    with spmd.set_mesh(SP.mesh), jax.set_mesh(JX.mesh):
        assert _types(SP, program, x, w) == _types(JX, program, jx, jw)
        out = SP.jit(lambda x, w: program(SP, [], x, w))(x, w)
        jout = JX.jit(lambda x, w: program(JX, [], x, w))(jx, jw)
    assert out.sharding.spec == P(*jout.sharding.spec)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jout), rtol=1e-5, atol=1e-5)


def test_out_sharding_outside_jit_matches_jax():
    with spmd.set_mesh(SP.mesh), jax.set_mesh(JX.mesh):
        z = snp.zeros((8, 4), np.float32, out_sharding=P("X"))
        jz = jnp.zeros((8, 4), out_sharding=JP("X"))
        assert str(spmd.typeof(z)) == str(jax.typeof(jz))
        assert z.sharding.spec == P(*jz.sharding.spec)
        x, jx = put(f32(8, 8), SP.mesh, JX.mesh, "X", "Y")
        m = snp.matmul(x, x, out_sharding=P(None, "Y"))
        jm = jnp.matmul(jx, jx, out_sharding=JP(None, "Y"))
        assert m.sharding.spec == P(*jm.sharding.spec)
        np.testing.assert_allclose(np.asarray(m), np.asarray(jm), rtol=1e-5)


def test_with_sharding_constraint_on_explicit_axes_is_an_assert():
    x, jx = put(f32(8, 4), SP.mesh, JX.mesh, "X", "Y")
    for F, v, wsc in ((SP, x, spmd.with_sharding_constraint),
                      (JX, jx, jax.lax.with_sharding_constraint)):
        with pytest.raises(ValueError, match="reshard"):      # a NamedSharding names Auto axes only
            F.jit(lambda x: wsc(x, F.ns("X", "Y")))(v)
        with F.set_mesh(F.mesh):                                 # a bare P: an assert
            with pytest.raises(AssertionError, match="reshard"):
                F.jit(lambda x: wsc(x, F.P("Y")))(v)
            same = F.jit(lambda x: wsc(x, F.P("X", "Y")))(v)
        assert P(*same.sharding.spec) == P("X", "Y")


def test_auto_axes_and_explicit_axes_match_jax():
    x, jx = put(f32(8, 4), SP.mesh, JX.mesh, "X", "Y")
    w, jw = put(f32(4, 8), SP.mesh, JX.mesh, "Y", None)
    auto = {"spmd": spmd.auto_axes, "jax": jax.sharding.auto_axes}
    explicit = {"spmd": spmd.explicit_axes, "jax": jax.sharding.explicit_axes}

    def run(F, x, w):
        seen = []

        def inner(x, w):       # Auto inside: no types; a contraction sharded on both sides is fine
            return _show(F, seen, x, x @ w)
        outer = auto[F.name](inner, out_sharding=F.P("X", None))
        with F.set_mesh(F.mesh):
            out = F.jit(lambda x, w: _show(F, seen, outer(x, w)))(x, w)
        return out, seen
    (out, seen), (jout, jseen) = run(SP, x, w), run(JX, jx, jw)
    assert seen == jseen and out.sharding.spec == P(*jout.sharding.spec)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jout), rtol=1e-5)

    sp, jxf = frameworks(types=("Auto", "Auto"))
    a = f32(8, 4)

    def run_explicit(F):
        seen = []
        inner = explicit[F.name](lambda a: _show(F, seen, a, a * 2), in_sharding=F.P("X", None))
        with F.set_mesh(F.mesh):
            out = F.jit(lambda a: _show(F, seen, inner(a)))(a)
        return out, seen
    (out, seen), (jout, jseen) = run_explicit(sp), run_explicit(jxf)
    assert seen == jseen and out.sharding.spec == P(*jout.sharding.spec)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jout))


def test_unreduced_contraction_is_summed_at_the_reshard_as_in_jax():
    for spec in [P("x", unreduced={"y"}), P(None, reduced={"x"}), P(unreduced={"x", "y"})]:
        jspec = JP(*spec.partitions, unreduced=spec.unreduced, reduced=spec.reduced)
        assert repr(spec) == repr(jspec)
        assert spec != P(*spec.partitions) and jspec != JP(*jspec.partitions)
    x, jx = put(f32(8, 4), SP.mesh, JX.mesh, None, "X")
    w, jw = put(f32(4, 8), SP.mesh, JX.mesh, "X", None)

    def program(F, seen, x, w):
        y = F.snp.matmul(x, w, out_sharding=F.P(None, None, unreduced={"X"}))
        z = F.reshard(y, F.P())
        _show(F, seen, y, y + y, z)
        with pytest.raises(ShardingTypeError if F is JX else spmd.ShardingError, match="reduce"):
            y + 1.0
        return z
    with spmd.set_mesh(SP.mesh), jax.set_mesh(JX.mesh):
        assert _types(SP, program, x, w) == _types(JX, program, jx, jw)
        assert _types(SP, program, x, w)[0] == "float32[8,8]{U:X}"
        lowered = SP.jit(lambda x, w: program(SP, [], x, w)).lower(x, w)
        out = SP.jit(lambda x, w: program(SP, [], x, w))(x, w)
        jout = JX.jit(lambda x, w: program(JX, [], x, w))(jx, jw)
    assert lowered.collectives() == [("psum", ("X",))]     # the pending sum, made at the reshard
    assert out.sharding.spec == P(*jout.sharding.spec)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jout), rtol=1e-5, atol=1e-5)


# -- errors ----------------------------------------------------------------------------------------

ERRORS = [
    ("contracting dims sharded on both sides", lambda F, x, w: x @ w, ("X", "Y"), ("Y", None),
     r"dot_general.*sharded on both sides.*out_sharding"),
    ("incompatible broadcast", lambda F, x, w: x + w, ("X", None), ("Y", None),
     r"add.*dim 0 is split over.*ambiguous.*reshard"),
    ("select of different shardings", lambda F, x, w: F.np.where(x > 0, x, w), ("X", None),
     (None, None), r"select.*same sharding"),
    ("concatenate of different shardings", lambda F, x, w: F.np.concatenate([x, w]), ("X", None),
     (None, "Y"), r"concatenate.*different shardings"),
    ("reshape across a sharded dim", lambda F, x, w: x.reshape(4, 16), (None, "Y"), (),
     r"reshape \(8, 8\) -> \(4, 16\)"),
    ("slice not divisible", lambda F, x, w: x[1:4], ("X", None), (), r"slice.*not divisible"),
]


@pytest.mark.parametrize("name, fn, xs, ws, pattern", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_where_jax_raises(name, fn, xs, ws, pattern):
    x, jx = put(f32(8, 8), SP.mesh, JX.mesh, *xs)
    w, jw = put(f32(8, 8), SP.mesh, JX.mesh, *ws)
    with pytest.raises(ShardingTypeError):
        jax.jit(lambda x, w: fn(JX, x, w))(jx, jw)

    def user_step(x, w):
        return fn(SP, x, w)
    with pytest.raises(spmd.ShardingError, match=pattern) as info:
        spmd.jit(user_step)(x, w)
    assert "user_step" in str(info.value)          # the user's function is named


# -- shard_map on Explicit meshes ------------------------------------------------------------------

def test_shard_map_takes_in_specs_from_types():
    x, jx = put(f32(8, 16), SP.mesh, JX.mesh, "X", "Y")

    def run(F, x):
        seen = []

        def f(x):
            out = F.shard_map(lambda b: F.lax.psum(b, "Y"), mesh=F.mesh, out_specs=F.P("X"))(x)
            seen.append(str(F.typeof(out)))
            return out
        return F.jit(f)(x), seen
    (out, seen), (jout, jseen) = run(SP, x), run(JX, jx)
    assert seen == jseen and out.sharding.spec == P(*jout.sharding.spec)
    np.testing.assert_allclose(np.asarray(out), np.asarray(jout), rtol=1e-5)


def test_shard_map_over_some_axes_keeps_the_others_explicit():
    a = f32(8, 4)

    def run(F):
        mesh = F.mesh
        seen = []

        def body(x):
            m = (spmd.get_abstract_mesh if F is SP else jax.sharding.get_abstract_mesh)()
            seen.append((m.manual_axes, m.explicit_axes))
            return _show(F, seen, x, x * 2)
        with F.set_mesh(mesh):
            x = (spmd if F is SP else jax).device_put(a, F.P("X", "Y"))
            out = F.jit(F.shard_map(body, axis_names=frozenset("X"), out_specs=F.P("X")))(x)
        return out, seen + [str(F.typeof(out))]
    (out, seen), (jout, jseen) = run(SP), run(JX)
    assert seen == jseen == [(("X",), ("Y",)), "float32[4,4@Y]{V:X}", "float32[4,4@Y]{V:X}",
                             "float32[8@X,4@Y]"]
    assert out.sharding.spec == P(*jout.sharding.spec) == P("X", "Y")
    np.testing.assert_allclose(np.asarray(out), np.asarray(jout))


# -- autodiff on Explicit axes ---------------------------------------------------------------------

def test_grad_through_explicit_program_matches_jax():
    x, jx = put(f32(8, 4), SP.mesh, JX.mesh, "X", None)
    w, jw = put(f32(4, 16), SP.mesh, JX.mesh, None, "Y")

    def grad(F, w, x):
        return F.jit(F.grad(lambda w, x: F.np.tanh(x @ w).sum()))(w, x)
    g, jg = grad(SP, w, x), grad(JX, jw, jx)
    assert g.sharding.spec == P(*jg.sharding.spec) == P(None, "Y")
    assert str(spmd.typeof(g)) == str(jax.typeof(jg))
    np.testing.assert_allclose(np.asarray(g), np.asarray(jg), rtol=1e-5, atol=1e-6)


# -- Auto mode -------------------------------------------------------------------------------------

def test_auto_mode_shardings_match_jax():
    sp, jx = frameworks((2, 4), ("data", "model"), ("Auto", "Auto"))
    w, jw = put(f32(8, 16), sp.mesh, jx.mesh, None, "model")
    x, jxx = put(f32(4, 8), sp.mesh, jx.mesh, "data")

    def step(F, w, x):    # a plain jit training step: no shardings given
        return F.jit(lambda w, x: w - 0.1 * F.grad(lambda w: F.np.tanh(x @ w).sum())(w))(w, x)
    out, jout = step(sp, w, x), step(jx, jw, jxx)
    assert out.sharding.spec == P(*jout.sharding.spec) == P(None, "model")
    np.testing.assert_allclose(np.asarray(out), np.asarray(jout), rtol=1e-5, atol=1e-6)

    def constrained(F, a):    # a final with_sharding_constraint is honoured
        return F.jit(lambda a: (spmd if F is sp else jax.lax).with_sharding_constraint(
            a * 2, F.ns("data")))(a)
    a = f32(8, 16)
    c, jc = constrained(sp, a), constrained(jx, a)
    assert c.sharding.spec == P(*jc.sharding.spec) == P("data")
    assert len({str(sh.index) for sh in c.addressable_shards}) == 2

    def partial_auto(F, a):   # a shard_map over "model" only, then a constraint on "data"
        wsc = spmd.with_sharding_constraint if F is sp else jax.lax.with_sharding_constraint
        body = F.shard_map(lambda b: b * 2, mesh=F.mesh, in_specs=F.P("model"),
                           out_specs=F.P("model"), axis_names={"model"})
        return F.jit(lambda a: wsc(body(a), F.ns("data")))(a)
    c, jc = partial_auto(sp, a), partial_auto(jx, a)
    assert c.sharding.spec == P(*jc.sharding.spec) == P("data")
    np.testing.assert_allclose(np.asarray(c), np.asarray(jc))

    b = f32(2, 8)
    for kw in ({}, {"spmd_axis_name": "data"}):     # vmap of a jit with shardings keeps them
        v, jv = (F.vmap(F.jit(lambda a: a * 2, in_shardings=F.ns("model"),
                              out_shardings=F.ns("model")), **kw)(b) for F in (sp, jx))
        assert v.sharding.spec == P(*jv.sharding.spec)
        np.testing.assert_allclose(np.asarray(v), np.asarray(jv))


# -- collectives: Explicit mode inserts what the shard_map form writes ------------------------

def test_megatron_mlp_in_explicit_mode_moves_what_shard_map_moves():
    x = spmd.device_put(f32(8, 4), SP.ns("X", None))
    w1 = spmd.device_put(f32(4, 16), SP.ns(None, "Y"))
    w2 = spmd.device_put(f32(16, 4), SP.ns("Y", None))

    def explicit(x, w1, w2):
        return snp.matmul(np.tanh(x @ w1), w2, out_sharding=SP.ns("X", None))
    manual = spmd.jit(spmd.shard_map(lambda x, w1, w2: spmd.psum(np.tanh(x @ w1) @ w2, "Y"),
                                     mesh=SP.mesh, out_specs=P("X", None),
                                     in_specs=(P("X", None), P(None, "Y"), P("Y", None))))
    lowered = spmd.jit(explicit).lower(x, w1, w2)
    written = [(c.op, c.axes, c.bytes_per_device)
               for c in spmd.collectives_of(manual.lower(x, w1, w2).per_device_program)]
    assert lowered.collectives() == [(op, axes) for op, axes, _ in written] == [("psum", ("Y",))]
    assert f"{written[0][2]} B per device" in lowered.explain()
    np.testing.assert_allclose(np.asarray(spmd.jit(explicit)(x, w1, w2)),
                               np.asarray(manual(x, w1, w2)), rtol=1e-5)


def _bytes_by_collective(program) -> dict:
    out: dict = {}
    for c in spmd.collectives_of(program):
        out[(c.op, c.axes)] = out.get((c.op, c.axes), 0) + c.bytes_per_device
    return out


def test_dp_tp_training_step_in_explicit_mode_moves_what_shard_map_moves():
    x, y = (spmd.device_put(f32(8, 4), SP.ns("X", None)) for _ in range(2))
    params = [spmd.device_put(f32(4, 16), SP.ns(None, "Y")),
              spmd.device_put(f32(16, 4), SP.ns("Y", None))]

    def loss(params, x, y):            # data parallel over X, Megatron MLP over Y
        w1, w2 = params
        out = snp.matmul(np.tanh(x @ w1), w2, out_sharding=SP.ns("X", None))
        return ((out - y) ** 2).sum()

    def step(params, x, y):
        return [p - 0.01 * g for p, g in zip(params, spmd.grad(loss)(params, x, y))]

    def local_loss(params, x, y):
        w1, w2 = params
        return ((spmd.psum(np.tanh(x @ w1) @ w2, "Y") - y) ** 2).sum()

    def local_step(params, x, y):      # the parameters' gradients are summed over X by autodiff
        return [p - 0.01 * g for p, g in zip(params, spmd.grad(local_loss)(params, x, y))]
    specs = [P(None, "Y"), P("Y", None)]
    manual = spmd.jit(spmd.shard_map(local_step, mesh=SP.mesh, out_specs=specs,
                                     in_specs=(specs, P("X", None), P("X", None))))
    explicit = spmd.jit(step)
    inserted = _bytes_by_collective(explicit.lower(params, x, y).per_device_program)
    written = _bytes_by_collective(manual.lower(params, x, y).per_device_program)
    assert inserted == written == {("psum", ("Y",)): 64, ("psum", ("X",)): 128}
    for a, b, p in zip(explicit(params, x, y), manual(params, x, y), params):
        assert a.sharding.spec == b.sharding.spec == p.sharding.spec
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
