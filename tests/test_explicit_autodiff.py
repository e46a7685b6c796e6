"""Autodiff and ``vmap`` through programs on Explicit mesh axes, with JAX running each case as
the oracle: every leaf of ``grad``, of ``vjp``'s cotangents, of ``jvp``'s and ``linearize``'s
tangents and of ``vmap``'d outputs has the type ``jax.typeof`` gives the same program (a
cotangent or tangent carries its primal's sharding), with JAX's values; the backward pass of
a Megatron step inserts the collectives its shard_map form writes; ``zeros_like`` and its
kin keep the sharding; ``vmap`` over a sharded dim keeps it, and raises where JAX raises.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import spmd
from test_explicit import Framework, meshes, put

rng = np.random.default_rng(8)
SP, JX = (Framework(name, m) for name, m in zip(("spmd", "jax"), meshes((2, 4), ("data", "model"))))
leaves = jax.tree_util.tree_leaves


def f32(*shape):
    return rng.normal(size=shape).astype(np.float32)


MEGATRON = [((8, 4), ("data", None)), ((4, 16), (None, "model")), ((16, 4), ("model", None))]

# name -> (program of x, w1, w2 with a non-scalar output, the operands' shapes and specs)
PROGRAMS = {
    "matmul chain": (lambda F, x, w1, w2: F.np.tanh(F.snp.matmul(
        F.np.tanh(x @ w1), w2, out_sharding=F.ns("data", None))), MEGATRON),
    "einsum out_sharding": (lambda F, x, w1, w2: F.snp.einsum(
        "bi,io->bo", x, w1, out_sharding=F.ns("data", None)) * (w2 ** 2).sum(), MEGATRON),
    "reshape": (lambda F, x, w1, w2: F.np.sin(x).reshape(2, 4, 8) * 2 + (w1 * w2).sum(),
                [((8, 8), ("data", None)), ((4, 16), (None, "model")), ((4, 16), (None, "model"))]),
    # w2 is unused: its cotangent is a zero of its type
    "elementwise and reduction": (lambda F, x, w1, w2: (F.np.exp(x) * x).sum(axis=0)
                                  + (w1 * w1).max(),
                                  [((8, 4), ("data", "model"))] + MEGATRON[1:]),
    "megatron mlp": (lambda F, x, w1, w2: F.snp.matmul(
        F.np.tanh(x @ w1), w2, out_sharding=F.ns("data", None)) ** 2, MEGATRON),
}


def _transformed(F, mode, body):
    """``mode`` of ``body`` as a function of (a batch of x, x, w1, w2)."""
    f = lambda *a: body(F, *a)
    loss = lambda *a: f(*a).sum()
    vjp, jvp = (spmd.vjp, spmd.jvp) if F.name == "spmd" else (jax.vjp, jax.jvp)
    linearize = spmd.linearize if F.name == "spmd" else jax.linearize

    def pullback(*a):
        out, back = vjp(f, *a)
        return back(out)
    return {
        "grad": lambda xs, *a: F.grad(loss, argnums=(0, 1, 2))(*a),
        "vjp": lambda xs, *a: pullback(*a),
        "jvp": lambda xs, *a: jvp(f, a, a),
        "linearize": lambda xs, *a: linearize(f, *a)[1](*a),
        "vmap": lambda xs, *a: F.vmap(f, in_axes=(0, None, None))(xs, *a[1:]),
        "vmap of grad": lambda xs, *a: F.vmap(F.grad(loss, argnums=(0, 1)),
                                              in_axes=(0, None, None))(xs, *a[1:]),
    }[mode]


def _operands(specs):
    xs = f32(3, *specs[0][0])
    vals = [put(f32(*shape), SP.mesh, JX.mesh, *spec) for shape, spec in specs]
    batch = put(xs, SP.mesh, JX.mesh, None, *specs[0][1])
    return [batch[0]] + [v[0] for v in vals], [batch[1]] + [v[1] for v in vals]


def _types_and_values(F, fn, args, jitted):
    """The types of the result's leaves as ``fn`` sees them while traced (under ``jit``) or
    as the arrays it returns, and the types and values of what it returns."""
    inside = []

    def traced(*a):
        out = fn(*a)
        inside.extend(str(F.typeof(o)) for o in leaves(out))
        return out
    with F.set_mesh(F.mesh):
        out = F.jit(traced)(*args) if jitted else fn(*args)
    return inside, [str(F.typeof(o)) for o in leaves(out)], [np.asarray(o) for o in leaves(out)]


MODES = ["grad", "vjp", "jvp", "linearize", "vmap", "vmap of grad"]


@pytest.mark.parametrize("jitted", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_transformed_types_and_values_match_jax(name, mode, jitted):
    body, specs = PROGRAMS[name]
    args, jargs = _operands(specs)
    inside, types, values = _types_and_values(SP, _transformed(SP, mode, body), args, jitted)
    jinside, jtypes, jvalues = _types_and_values(JX, _transformed(JX, mode, body), jargs, jitted)
    assert inside == jinside and types == jtypes
    assert len(values) == len(jvalues)
    for v, jv in zip(values, jvalues):
        np.testing.assert_allclose(v, jv, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(jv).max()))


def test_cotangent_of_every_input_has_the_primal_type():
    """A gradient of each input of the Megatron loss is typed like that input, and placed
    as it is."""
    body, specs = PROGRAMS["megatron mlp"]
    (_, *args), _ = _operands(specs)
    grads = spmd.jit(spmd.grad(lambda *a: body(SP, *a).sum(), argnums=(0, 1, 2)))(*args)
    assert [spmd.typeof(g) for g in grads] == [spmd.typeof(a) for a in args]
    assert [g.sharding for g in grads] == [a.sharding for a in args]


def _megatron_step():
    x, y = (spmd.device_put(f32(8, 4), SP.ns("data", None)) for _ in range(2))
    params = [spmd.device_put(f32(4, 16), SP.ns(None, "model")),
              spmd.device_put(f32(16, 4), SP.ns("model", None))]

    def loss(params, x, y):
        w1, w2 = params
        out = SP.snp.matmul(np.tanh(x @ w1), w2, out_sharding=SP.ns("data", None))
        return ((out - y) ** 2).sum()

    def step(params, x, y):
        return [p - 0.01 * g for p, g in zip(params, spmd.grad(loss)(params, x, y))]
    return step, (params, x, y)


def test_typed_backward_pass_inserts_no_more_collectives():
    """The Megatron step's backward pass: the global program has no collective (the types
    say where data lie, the compiler moves them), and the per-device program has the two
    sums of the shard_map form: the activations' cotangent over model, the gradients over
    data."""
    step, args = _megatron_step()
    program = spmd.make_program(step)(*args)
    assert spmd.collectives_of(program) == []
    assert [str(v.aval) for v in program.out_vars] == ["f32[4,16@model]", "f32[16@model,4]"]
    per_device = spmd.jit(step).lower(*args).per_device_program
    assert [(c.op, c.axes, c.bytes_per_device) for c in spmd.collectives_of(per_device)] == [
        ("psum", ("model",), 64), ("psum", ("data",), 128)]


# -- zeros_like and its kin ------------------------------------------------------------------------

def _likes(F, x):
    n = F.np
    return [n.zeros_like(x), n.ones_like(x), n.full_like(x, 3.0), n.empty_like(x),
            n.zeros_like(x, dtype=np.int32), n.ones_like(x, shape=(4, 8, 2)),
            n.zeros_like(x.sum(0)), n.full_like(x, 2.0) + x]


@pytest.mark.parametrize("spec", [("data", None, "model"), (None, ("data", "model")), ()])
def test_zeros_like_keeps_the_sharding_as_in_jax(spec):
    x, jx = put(f32(4, 8, 4), SP.mesh, JX.mesh, *spec)
    for jitted in (True, False):
        inside, types, values = _types_and_values(SP, lambda a: _likes(SP, a), [x], jitted)
        jinside, jtypes, jvalues = _types_and_values(JX, lambda a: _likes(JX, a), [jx], jitted)
        assert inside == jinside and types == jtypes
        for v, jv in zip(values, jvalues):
            np.testing.assert_array_equal(v, jv)


# -- vmap over a dim split over an Explicit axis ---------------------------------------------------

def _vmapped(F, in_axes, **kw):
    seen = []

    def f(r):
        seen.append(str(F.typeof(r)))
        return F.reshard(r * 2, F.P(None, None)) + 1
    return seen, F.jit(F.vmap(f, in_axes=in_axes, **kw))


@pytest.mark.parametrize("in_axes", [0, 1])
@pytest.mark.parametrize("kw", [{}, {"spmd_axis_name": "data"}, {"spmd_axis_name": "model"}],
                         ids=["plain", "spmd_axis_name=data", "spmd_axis_name=model"])
def test_vmap_over_a_split_dim_matches_jax(in_axes, kw):
    """The mapped dim's axes leave the per-example type and split the results' batch dim (a
    reshard inside keeps it split); spmd_axis_name naming another split raises, as in JAX."""
    x, jx = put(f32(4, 8, 4), SP.mesh, JX.mesh, "data", None, "model")
    results = []
    for F, a in ((SP, x), (JX, jx)):
        seen, fn = _vmapped(F, in_axes, **kw)
        with F.set_mesh(F.mesh):
            try:
                out = fn(a)
            except ValueError as e:
                results.append(("ValueError", seen, "vmap" in str(e) or F.name == "jax"))
                continue
        results.append((str(F.typeof(out)), seen, np.asarray(out)))
    (t, seen, v), (jt, jseen, jv) = results
    assert (t, seen) == (jt, jseen)
    if t == "ValueError":
        assert in_axes == 0 and kw == {"spmd_axis_name": "model"} and v
    else:
        np.testing.assert_allclose(v, jv)


def test_vmap_errors_where_jax_raises():
    x, jx = put(f32(4, 8, 4), SP.mesh, JX.mesh, "data", None, "model")
    w, jw = put(f32(4, 4), SP.mesh, JX.mesh, None, "data")
    u, ju = put(f32(4, 4), SP.mesh, JX.mesh, "model", None)
    for F, (a, b, c) in ((SP, (x, w, u)), (JX, (jx, jw, ju))):
        with F.set_mesh(F.mesh):
            # an unmapped argument split over the axis the mapped dim is split over
            with pytest.raises(ValueError, match="unmapped|Unmapped"):
                F.jit(F.vmap(lambda r, w: r[:, :4] @ w, in_axes=(0, None)))(a, b)
            # mapped dims split differently
            with pytest.raises(ValueError, match="split alike|sharded the same"):
                F.jit(F.vmap(lambda r, v: r[:, :4] * v[0], in_axes=(0, 0)))(a, c)



# -- shard_map's unreduced / reduced in_specs, and vmap of the casts to them ----------------------

PENDING = {"plain": {}, "reduced": {"reduced": {"x"}}, "unreduced": {"unreduced": {"x"}}}


@pytest.mark.parametrize("jitted", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("arg, spec", [("plain", "reduced"), ("reduced", "plain"),
                                       ("plain", "unreduced"), ("numpy", "unreduced"),
                                       ("reduced", "reduced")])
def test_in_specs_pending_axes_must_be_the_arguments_as_in_jax(arg, spec, jitted):
    """An in_specs entry names as unreduced / reduced exactly the axes the argument's type
    does; otherwise both raise ValueError before tracing the body."""
    a = f32(8)
    outcomes = []
    for Fw, mesh, Pw, NSw in ((spmd, spmd.make_mesh((2,), ("x",)), spmd.P, spmd.NamedSharding),
                              (jax, jax.make_mesh((2,), ("x",)), jax.sharding.PartitionSpec,
                               jax.sharding.NamedSharding)):
        x = a if arg == "numpy" else Fw.device_put(a, NSw(mesh, Pw(None, **PENDING[arg])))
        s = Pw(None, **PENDING[spec])
        f = Fw.shard_map(lambda v: v, mesh=mesh, in_specs=s, out_specs=s)
        try:
            out = (Fw.jit(f) if jitted else f)(x)
            outcomes.append(("ok", np.asarray(out)))
        except ValueError as e:
            outcomes.append(("raises", "in_specs" in str(e)))
    (kind, v), (jkind, jv) = outcomes
    assert kind == jkind == ("ok" if arg == spec else "raises")
    if kind == "ok":
        np.testing.assert_array_equal(v, jv)
    else:
        assert v and jv


@pytest.mark.parametrize("to, spec", [("unreduced", ("x",)), ("reduced", ())])
def test_vmap_of_a_pcast_to_unreduced_or_reduced_raises_as_in_jax(to, spec):
    """JAX has no batching rule for these casts: vmap of one over a batched value raises
    NotImplementedError in both."""
    a = f32(3, 4)
    for Fw, mesh in ((spmd, spmd.make_mesh((2,), ("x",), (spmd.AxisType.Auto,))),
                     (jax, jax.make_mesh((2,), ("x",), (jax.sharding.AxisType.Auto,)))):
        Pw = spmd.P if Fw is spmd else jax.sharding.PartitionSpec
        pcast = spmd.pcast if Fw is spmd else jax.lax.pcast
        body = lambda b: Fw.vmap(lambda r: pcast(r, "x", to=to))(b)
        f = Fw.shard_map(body, mesh=mesh, in_specs=Pw(None, *spec), out_specs=Pw(None, *spec))
        with pytest.raises(NotImplementedError):
            Fw.jit(f)(a)
    # reduced -> varying of a batched value raises too
    for Fw, mesh in ((spmd, spmd.make_mesh((2,), ("x",), (spmd.AxisType.Auto,))),
                     (jax, jax.make_mesh((2,), ("x",), (jax.sharding.AxisType.Auto,)))):
        Pw = spmd.P if Fw is spmd else jax.sharding.PartitionSpec
        pcast = spmd.pcast if Fw is spmd else jax.lax.pcast
        psum = spmd.psum if Fw is spmd else jax.lax.psum
        bad = Fw.shard_map(lambda b: psum(Fw.vmap(lambda r: pcast(r, "x", to="varying"))(
            pcast(b, "x", to="reduced")), "x"), mesh=mesh, in_specs=Pw(), out_specs=Pw())
        with pytest.raises(NotImplementedError):
            Fw.jit(bad)(a)
