"""shard_map: specs as pytrees, in_specs=None, the out_specs invariance check, check_vma,
partial-manual axis_names, nesting, jit on either side, closures, and what the top-level
outputs are (spmd.Array with the out_specs sharding, sharing memory where the layout allows).

Programs that JAX can run are compared with ``jax.shard_map`` (see ``_jax_oracle``), and every
program with the reference executor.
"""
from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import spmd
from spmd import P, NamedSharding
from spmd.executors import reference_executor

from _jax_oracle import SPMD, run_jax, run_spmd
from conftest import meshes, specs

REFERENCE = reference_executor()


def _mesh(shape=(2, 4), names=("a", "b")):
    return spmd.make_mesh(shape, names, devices=spmd.devices()[:math.prod(shape)])


def _tree_np(t):
    import optree
    return optree.tree_map(np.asarray, t)


def check_three_ways(body, mesh, in_specs, out_specs, *args, jax=True, **kw):
    """stacked == reference (== JAX); returns the stacked result as NumPy."""
    import optree
    ours = run_spmd(body, mesh, in_specs, out_specs, *args, **kw)
    ref = run_spmd(body, mesh, in_specs, out_specs, *args, executor=REFERENCE, **kw)
    optree.tree_map(np.testing.assert_array_equal, _tree_np(ours), _tree_np(ref))
    if jax:
        theirs = run_jax(body, mesh, in_specs, out_specs, *args, **kw)
        optree.tree_map(lambda o, t: np.testing.assert_array_equal(o, t), _tree_np(ours), theirs)
    return _tree_np(ours)


X = np.arange(64, dtype=np.float32).reshape(8, 8)


# ---------------------------------------------------------------------------------------------
# the two spellings, the mesh from set_mesh, eager calls cached
# ---------------------------------------------------------------------------------------------

def test_function_and_decorator_forms_agree():
    mesh = _mesh()

    def rowsum(block):
        return spmd.psum(block.sum(axis=1), "b")

    as_call = spmd.shard_map(rowsum, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a"))
    as_decorator = spmd.shard_map(mesh=mesh, in_specs=P("a", "b"), out_specs=P("a"))(rowsum)
    np.testing.assert_array_equal(np.asarray(as_call(X)), X.sum(1))
    np.testing.assert_array_equal(np.asarray(as_decorator(X)), X.sum(1))
    assert as_call.__name__ == "rowsum"


def test_mesh_from_set_mesh():
    mesh = _mesh()
    f = spmd.shard_map(lambda b: spmd.psum(b, "a"), in_specs=P("a"), out_specs=P())
    with spmd.set_mesh(mesh):
        out = f(X)
    np.testing.assert_array_equal(np.asarray(out), X[:4] + X[4:])
    assert out.sharding.mesh == mesh


def test_eager_calls_trace_once():
    mesh = _mesh()
    traces = []

    @spmd.shard_map(mesh=mesh, in_specs=P("a"), out_specs=P("a"))
    def f(b):
        traces.append(b.shape)
        return b * 2

    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(X)), 2 * X)
    assert traces == [(4, 8)]


# ---------------------------------------------------------------------------------------------
# specs as pytrees; in_specs=None
# ---------------------------------------------------------------------------------------------

def test_pytree_specs_match_jax():
    mesh = _mesh()
    params = {"w": np.arange(8, dtype=np.float32).reshape(8, 1), "scale": np.float32(2.0) * np.ones(4, np.float32)}

    def body(C, x, p):
        h = x @ p["w"]                                             # (4, 1) partial over b
        return {"h": C.psum(h, "b"), "pair": (x * p["scale"][0], C.np.reshape(C.axis_index("b"), (1,)))}

    in_specs = (P("a", "b"), {"w": P("b"), "scale": P()})
    out_specs = {"h": P("a"), "pair": (P("a", "b"), P("b"))}
    out = check_three_ways(body, mesh, in_specs, out_specs, X, params)
    np.testing.assert_array_equal(out["h"], X @ params["w"])
    np.testing.assert_array_equal(out["pair"][0], 2 * X)
    np.testing.assert_array_equal(out["pair"][1], np.arange(4))


def test_one_spec_for_every_argument_and_output():
    mesh = _mesh()

    def body(C, x, y):
        return x + y, x - y
    out = check_three_ways(body, mesh, P("a"), P("a"), X, 2 * X)
    np.testing.assert_array_equal(out[0], 3 * X)
    np.testing.assert_array_equal(out[1], -X)


def test_in_specs_none_takes_the_arguments_shardings():
    mesh = _mesh()
    x = spmd.device_put(X, NamedSharding(mesh, P("b", "a")))
    y = spmd.device_put(X[:, :1], NamedSharding(mesh, P()))
    f = spmd.shard_map(lambda xb, yb: (xb * 2, spmd.all_gather(xb, "b", tiled=True, to="invariant")),
                       mesh=mesh, out_specs=(P("b", "a"), P(None, "a")))
    twice, cols = f(x, y)
    assert twice.sharding.spec == P("b", "a") and cols.sharding.spec == P(None, "a")
    np.testing.assert_array_equal(np.asarray(twice), 2 * X)
    np.testing.assert_array_equal(np.asarray(cols), X)
    # the mesh too comes from the arguments
    g = spmd.shard_map(lambda xb: spmd.psum(xb, "a"), out_specs=P("b"))
    np.testing.assert_array_equal(np.asarray(g(x)), X[:, :4] + X[:, 4:])
    # another layout of the same values: traced again with the new specs
    x2 = spmd.device_put(X, NamedSharding(mesh, P("a", "b")))
    explicit = spmd.shard_map(f.__wrapped__, mesh=mesh, in_specs=(P("a", "b"), P()),
                              out_specs=(P("b", "a"), P(None, "a")))
    for o, e in zip(f(x2, y), explicit(X, X[:, :1])):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(e))


def test_pytree_outputs_and_none_leaves():
    mesh = _mesh()
    f = spmd.shard_map(lambda d: {"x": d["x"] + 1, "n": None}, mesh=mesh,
                       in_specs=({"x": P("a")},), out_specs={"x": P("a"), "n": None})
    out = f({"x": X})
    assert out["n"] is None
    np.testing.assert_array_equal(np.asarray(out["x"]), X + 1)


# ---------------------------------------------------------------------------------------------
# layouts: spec tuples in either order, outputs on other dims, constants and closures as outputs
# ---------------------------------------------------------------------------------------------

W = np.float32(3)

LAYOUTS = [
    ("tuple-spec-minor-first", lambda C, x: x + C.axis_index(("b", "a")).astype(np.float32),
     P(("b", "a")), P(("b", "a")), (X,)),
    ("tuple-spec-reordered-out", lambda C, x: x, P(("b", "a")), P(("a", "b")), (X,)),
    ("scalar-out", lambda C, x: C.psum(x.sum(), ("a", "b")), P("a", "b"), P(), (X,)),
    ("constant-out", lambda C, x: (C.np.float32(1.0) * C.np.ones(()), x), P("a", "b"),
     (P(), P("a", "b")), (X,)),
    ("same-value-twice", lambda C, x: (x, x), P("a", "b"), (P("a", "b"), P("b", "a")), (X,)),
    ("closure-out", lambda C, x: (x, W * C.np.ones((2,), np.float32)), P("a", "b"),
     (P("a", "b"), P()), (X,)),
    ("python-scalar-arg", lambda C, x, s: x * s, (P("a", "b"), P()), P("a", "b"), (X, 2.0)),
    ("out-on-another-dim", lambda C, x: C.psum(x, "b"), P("a", "b"), P(None, "a"), (X,)),
    ("block-moves-dims", lambda C, x: x, P("a"), P(None, "a"), (X,)),
    ("invariant-out-repeated", lambda C, x: x * 2, P(), P("a"), (X,)),
    ("spec-entry-as-1-tuple", lambda C, x: C.psum(x, "a"), P(("b",), "a"), P("b"), (X,)),
]


@pytest.mark.parametrize("body, in_specs, out_specs, args", [c[1:] for c in LAYOUTS],
                         ids=[c[0] for c in LAYOUTS])
def test_layouts_match_jax(body, in_specs, out_specs, args):
    check_three_ways(body, _mesh(), in_specs, out_specs, *args)


# ---------------------------------------------------------------------------------------------
# vma: the out_specs check, implicit pvary, check_vma=False
# ---------------------------------------------------------------------------------------------

def test_out_specs_invariance_passes_when_reduced():
    mesh = _mesh()
    out = check_three_ways(lambda C, x: (C.psum(x, "b"), C.pmax(x, ("a", "b"))),
                           mesh, P("a", "b"), (P("a"), P()), X)
    np.testing.assert_array_equal(out[0], X.reshape(8, 4, 2).sum(1))
    np.testing.assert_array_equal(out[1], X.reshape(2, 4, 4, 2).max((0, 2)))


def test_implicit_pvary_in_the_program():
    mesh = _mesh()
    w = np.ones((8,), np.float32)

    def body(x, s):                           # s invariant, x varying: s is pvary'd first
        return x * s + w
    f = spmd.shard_map(body, mesh=mesh, in_specs=(P("a", None), P()), out_specs=P("a", None))
    program = spmd.make_program(f)(X, np.float32(3))
    body_prog = program.eqns[0].params["body"]
    program.check()
    assert [e.prim.name for e in body_prog.eqns].count("pvary") >= 1
    assert body_prog.in_avals[0].vma == {"a"} and body_prog.in_avals[1].vma == frozenset()
    np.testing.assert_array_equal(np.asarray(f(X, np.float32(3))), 3 * X + 1)


def test_check_vma_false_unchecked_out_specs_takes_device_zero():
    mesh = _mesh()
    out = check_three_ways(lambda C, x: x * 2, mesh, P("a", "b"), P(), X, check_vma=False)
    np.testing.assert_array_equal(out, 2 * X[:4, :2])


def test_check_vma_false_body_sees_everything_varying():
    mesh = _mesh()
    f = spmd.shard_map(lambda x: x, mesh=mesh, in_specs=P("a"), out_specs=P("a"), check_vma=False)
    body = spmd.make_program(f)(X).eqns[0].params["body"]
    assert body.in_avals[0].vma == {"a", "b"}


# ---------------------------------------------------------------------------------------------
# partial-manual axis_names, nesting
# ---------------------------------------------------------------------------------------------

def test_partial_manual_axis_names_matches_jax():
    mesh = _mesh()

    def body(C, x):
        assert x.shape == (4, 8)                 # only 'a' is manual: 'b' is left to the caller
        return C.psum(x, "a") * 2, x + C.axis_index("a")
    out = check_three_ways(body, mesh, P("a"), (P(), P("a")), X, axis_names={"a"})
    np.testing.assert_array_equal(out[0], 2 * (X[:4] + X[4:]))
    np.testing.assert_array_equal(out[1], X + np.repeat([0, 1], 4)[:, None])


def test_partial_manual_rejects_other_axes_in_specs():
    mesh = _mesh()
    f = spmd.shard_map(lambda x: x, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", "b"),
                       axis_names={"a"})
    with pytest.raises(spmd.ShardingError, match="'b'.*not manual"):
        f(X)


def test_nested_shard_map_matches_jax():
    mesh = _mesh()

    def body(C, x):
        inner = C.shard_map(lambda y: C.psum(y, "b"), in_specs=P(None, "b"), out_specs=P(),
                            axis_names={"b"})
        return inner(x) + C.axis_index("a")
    out = check_three_ways(body, mesh, P("a"), P("a"), X, axis_names={"a"})
    want = X.reshape(8, 4, 2).sum(1) + np.repeat([0, 1], 4)[:, None]
    np.testing.assert_array_equal(out, want)


def test_nested_inner_collectives_over_outer_axes_match_jax():
    """The inner body may reduce over the outer manual axis too; its result is then invariant
    over that axis in the outer body as well."""
    mesh = _mesh()

    def body(C, x):
        inner = C.shard_map(lambda y: (C.psum(y, ("a", "b")),
                                       C.all_gather(y, "a", tiled=True, to="invariant")),
                            in_specs=P(None, "b"), out_specs=(P(), P(None, "b")), axis_names={"b"})
        total, gathered = inner(x)
        if C is SPMD:
            assert total.vma == frozenset() and gathered.vma == frozenset()
        return total, gathered
    total, gathered = check_three_ways(body, mesh, P("a"), (P(), P()), X, axis_names={"a"})
    np.testing.assert_array_equal(total, X.reshape(2, 4, 4, 2).sum((0, 2)))
    np.testing.assert_array_equal(gathered, X)


def test_nested_inner_sees_outer_vma_and_closure():
    mesh = _mesh()

    @spmd.shard_map(mesh=mesh, in_specs=P("a"), out_specs=P("a"), axis_names={"a"})
    def outer(x):
        s = x.sum()                               # varying over 'a', closed over by the inner body

        @spmd.shard_map(in_specs=P(None, "b"), out_specs=P(None, "b"), axis_names={"b"})
        def inner(y):
            assert s.vma == {"a"} and y.vma == {"a", "b"}
            return y * s
        return inner(x)
    want = X * np.repeat([X[:4].sum(), X[4:].sum()], 4)[:, None]
    np.testing.assert_array_equal(np.asarray(outer(X)), want)
    np.testing.assert_array_equal(np.asarray(spmd.jit(outer, executor=REFERENCE)(X)), want)


# ---------------------------------------------------------------------------------------------
# jit on either side, closures
# ---------------------------------------------------------------------------------------------

def test_shard_map_inside_jit():
    mesh = _mesh()
    sm = spmd.shard_map(lambda b: spmd.psum(b, "b"), mesh=mesh, in_specs=P(None, "b"), out_specs=P())

    @spmd.jit
    def f(x):
        return sm(x * 2) + 1

    np.testing.assert_array_equal(np.asarray(f(X)), 2 * X.reshape(8, 4, 2).sum(1) + 1)
    np.testing.assert_array_equal(np.asarray(spmd.jit(f.__wrapped__, executor=REFERENCE)(X)),
                                  np.asarray(f(X)))
    (sm_eqn,) = [e for e in spmd.make_program(f)(X).eqns if e.prim.name == "shard_map"]
    assert sm_eqn.params["out_specs"] == (P(),)


def test_jit_inside_shard_map():
    mesh = _mesh()
    local = spmd.jit(lambda b: np.tanh(b) * 2)
    f = spmd.shard_map(lambda b: spmd.pmax(local(b), "a"), mesh=mesh, in_specs=P("a"), out_specs=P())
    np.testing.assert_allclose(np.asarray(f(X)), np.maximum(np.tanh(X[:4]), np.tanh(X[4:])) * 2,
                               rtol=1e-6)


def test_closures_over_constants_and_outer_tracers():
    mesh = _mesh()
    w = np.arange(8, dtype=np.float32)

    @spmd.jit
    def f(x, scale):
        @spmd.shard_map(mesh=mesh, in_specs=P("a"), out_specs=(P("a"), P()))
        def body(b):
            assert scale.vma == frozenset()          # closed over: invariant
            return b * w * scale, spmd.all_gather(b[:, 0], "a", tiled=True, to="invariant") * scale
        return body(x)
    y, col = f(X, np.float32(2))
    np.testing.assert_array_equal(np.asarray(y), X * w * 2)
    np.testing.assert_array_equal(np.asarray(col), X[:, 0] * 2)
    ref = spmd.jit(f.__wrapped__, executor=REFERENCE)(X, np.float32(2))
    np.testing.assert_array_equal(np.asarray(ref[0]), np.asarray(y))


def test_psum_of_closed_over_value_needs_pvary():
    mesh = _mesh()
    c = np.ones(3, np.float32)
    f = spmd.shard_map(lambda b: spmd.psum(spmd.pvary(c, "a"), "a") + b.sum(), mesh=mesh,
                       in_specs=P(), out_specs=P())
    np.testing.assert_array_equal(np.asarray(f(X)), 2 * c + X.sum())


# ---------------------------------------------------------------------------------------------
# outputs: spmd.Array with the out_specs sharding; views where the layout allows
# ---------------------------------------------------------------------------------------------

def test_outputs_are_arrays_with_out_specs_sharding():
    mesh = _mesh()
    f = spmd.shard_map(lambda b: (b, spmd.psum(b, "b")), mesh=mesh, in_specs=P("a", "b"),
                       out_specs=(P("a", "b"), P("a")))
    same, reduced = f(X)
    for out, spec in ((same, P("a", "b")), (reduced, P("a"))):
        assert isinstance(out, spmd.Array)
        assert out.sharding == NamedSharding(mesh, spec)
    assert same.addressable_shards[5].data.shape == (4, 2)
    assert reduced._storage.shape[:2] == (2, 1)                 # stored once along 'b'


def test_identity_shares_memory_with_the_input():
    mesh = _mesh()
    x = spmd.device_put(X, NamedSharding(mesh, P("a", "b")))
    f = spmd.shard_map(lambda b: b, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", "b"))
    out = f(x)
    assert np.shares_memory(out._storage, x._storage)
    out_host = f(X)                                           # a host array is split as a view
    assert np.shares_memory(out_host._storage, X)
    np.testing.assert_array_equal(np.asarray(out_host), X)


def test_output_storage_is_the_body_result(monkeypatch):
    """The stacked body result becomes the output's storage as is (no gather, no copy)."""
    from spmd.executors import stacked
    results = []
    real_compile = stacked.StackedExecutor._compile

    def spy(self, program, mesh):
        run = real_compile(self, program, mesh)
        if mesh is None:
            return run

        def recording(args):
            outs = run(args)
            results.extend(outs)
            return outs
        return recording
    monkeypatch.setattr(stacked.StackedExecutor, "_compile", spy)
    mesh = _mesh()
    f = spmd.shard_map(lambda b: (b * 2, spmd.psum(b, "a")), mesh=mesh, in_specs=P("a", "b"),
                       out_specs=(P("a", "b"), P(None, "b")))
    twice, summed = f(X)
    assert np.shares_memory(twice._storage, results[0])
    assert np.shares_memory(summed._storage, results[1])
    assert summed._storage.shape[:2] == (1, 4)


# ---------------------------------------------------------------------------------------------
# property test: random meshes, specs and shapes; stacked == reference == NumPy
# ---------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_property_random_layouts(data):
    mesh = data.draw(meshes())
    rank = data.draw(st.integers(1, 3))
    spec = data.draw(specs(mesh, rank))
    axes_of = [(() if e is None else (e,) if isinstance(e, str) else tuple(e)) for e in spec]
    axes_of += [()] * (rank - len(axes_of))
    parts = [math.prod(mesh.axis_size(a) for a in ax) for ax in axes_of]
    shape = tuple(p * data.draw(st.integers(1, 3)) for p in parts)
    x = np.random.default_rng(data.draw(st.integers(0, 999))).integers(-5, 6, shape).astype(np.float32)
    named = tuple(a for a in mesh.axis_names if any(a in ax for ax in axes_of))
    lead = axes_of[0]

    def body(b):
        outs = [2 * b + 1]
        if named:
            outs.append(spmd.psum(b, named))
        if lead:                                   # undo the split of dim 0: invariant again
            outs.append(spmd.all_gather(b, lead, axis=0, tiled=True, to="invariant"))
        return outs
    out_specs = [spec] + ([P()] if named else []) + ([P(None, *spec[1:])] if lead else [])
    f = spmd.shard_map(body, mesh=mesh, in_specs=spec, out_specs=out_specs)
    ours = [np.asarray(o) for o in f(x)]
    ref = spmd.jit(f, executor=REFERENCE)(x)
    for o, r in zip(ours, ref):
        np.testing.assert_array_equal(o, np.asarray(r))
    np.testing.assert_array_equal(ours[0], 2 * x + 1)
    if named:
        split = x.reshape(sum(((p, s // p) for p, s in zip(parts, shape)), ()))
        np.testing.assert_array_equal(ours[1], split.sum(tuple(range(0, 2 * rank, 2))))
    if lead:
        np.testing.assert_array_equal(ours[-1], x)


# ---------------------------------------------------------------------------------------------
# the stacked executor: the vma type is the layout, for local ops on mixed operands too
# ---------------------------------------------------------------------------------------------

def test_stacked_layout_follows_vma_for_local_ops():
    from test_collectives import _recording_body_outputs
    mesh = _mesh()
    w = np.arange(8, dtype=np.float32).reshape(2, 4)

    def body(x):
        row_sums = spmd.psum(x.sum(1), "b")                  # {a}
        outs = [
            np.zeros(3, np.float32) + 1,                      # constant: {}
            np.arange(4) * 2,                                 # {}
            x.sum(0),                                         # {a, b}
            np.where(row_sums > 10, row_sums, 0.0),           # {a}
            row_sums[:, None] * w[:1],                        # {a}, closure is invariant
            np.concatenate([row_sums, np.ones(2, np.float32)]),   # {a}
            x[0, 0] + spmd.axis_index("b"),                   # {a, b}
            np.maximum(spmd.pmax(x, ("a", "b")), 0).T,        # {}
            spmd.all_gather(row_sums, "a", tiled=True, to="invariant").reshape(2, 4),  # {}
        ]
        return [o[None] for o in outs]
    every = P(("a", "b"))
    f = spmd.shard_map(body, mesh=mesh, in_specs=P("a", "b"), out_specs=every)
    program = spmd.make_program(f)(X)
    vmas = [a.vma for a in program.eqns[0].params["body"].out_avals]
    assert vmas[:4] == [frozenset(), frozenset(), {"a", "b"}, {"a"}]
    with _recording_body_outputs() as outs:
        f(X)
    for z, vma in zip(outs, vmas):
        assert z.shape[:2] == tuple(n if a in vma else 1 for a, n in (("a", 2), ("b", 4))), vma
