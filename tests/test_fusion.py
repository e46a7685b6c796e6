"""The stacked executor's fusions (``spmd/executors/fusion.py``) and the compiler passes that
feed them: each fused program is checked against the reference executor (which runs every
equation on its own, per device) and against NumPy, and the fusion is checked to happen."""
import contextlib
from unittest import mock

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import spmd
from spmd import NamedSharding, P, _host_parallel, prims
from spmd.compiler import cost
from spmd.executors import fusion, reference_executor
from spmd.executors.stacked import StackedExecutor

REFERENCE = reference_executor()
# Auto axes: the chains are compiled by the propagating compiler, as on JAX's Auto meshes
MESH = spmd.make_mesh((2, 4), ("data", "model"), (spmd.AxisType.Auto,) * 2)
rng = np.random.default_rng(7)


@contextlib.contextmanager
def _forced_blocks(on: bool):
    """With ``on``: elementwise chains, single ops and matmuls take their threaded block paths
    (tiny blocks, many of them)."""
    with contextlib.ExitStack() as stack:
        if on:
            for name, value in (("PARALLEL_MIN_BYTES", 0), ("ELEMENTWISE_PARALLEL_MIN_BYTES", 0),
                                ("ELEMENTWISE_BLOCK_BYTES", 8), ("MATMUL_MIN_FLOPS", 0)):
                stack.enter_context(mock.patch.object(_host_parallel, name, value))
        yield


@pytest.fixture(params=["small", "blocked", "blocked-numpy"])
def paths(request, monkeypatch):
    """``blocked``: every elementwise chain runs as C loops (where it can) and every matmul
    takes its threaded block path; ``blocked-numpy``: the chains take their NumPy block path
    (``SPMD_NATIVE=0``)."""
    if request.param != "small":
        monkeypatch.setattr(_host_parallel, "num_threads", lambda: 3)
    if request.param == "blocked-numpy":
        monkeypatch.setenv("SPMD_NATIVE", "0")
    with _forced_blocks(request.param != "small"):
        yield request.param


def _fused_kinds(f, *args):
    body = f.lower(*args).compiled.manual.eqns[0].params["body"]
    plan = fusion.plan_fusions(body, 2, np)
    return sorted(v.kind for v in plan.values() if v != "skip")


def _both(fn, specs, out_specs, *args):
    f = spmd.jit(spmd.shard_map(fn, mesh=MESH, in_specs=specs, out_specs=out_specs))
    g = spmd.jit(spmd.shard_map(fn, mesh=MESH, in_specs=specs, out_specs=out_specs), executor=REFERENCE)
    return f(*args), g(*args)


# body, in_specs, out_specs, operand shapes (global)
DOT_PSUM = [
    ("both-vary-data", lambda a, b: spmd.psum(a.T @ b, "data"), (P("data", "model"), P("data")),
     P(None, "model"), ((8, 16), (8, 6))),
    ("both-vary-two-axes", lambda a, b: spmd.psum(a @ b, ("data", "model")), (P(None, ("data", "model")),
     P(("data", "model"))), P(), ((3, 16), (16, 5))),
    ("one-varies", lambda a, b: spmd.psum(a @ b, "data"), (P("data"), P()), P(), ((4, 6), (6, 3))),
    ("batched", lambda a, b: spmd.psum(np.einsum("bij,bjk->bik", a, b), "model"),
     (P(None, None, "model"), P(None, "model")), P(), ((2, 3, 8), (2, 8, 4))),
    ("int32", lambda a, b: spmd.psum(a @ b, "model"), (P(None, "model"), P("model")), P(), ((3, 8), (8, 2))),
]


@pytest.mark.parametrize("row", DOT_PSUM, ids=[r[0] for r in DOT_PSUM])
def test_dot_then_psum_matches_the_reference(row, paths):
    name, fn, specs, out_spec, shapes = row
    dtype = np.int32 if name == "int32" else np.float32
    args = [rng.integers(-3, 4, size=s).astype(dtype) for s in shapes]
    got, want = _both(fn, specs, out_spec, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.asarray(got).dtype == dtype


def test_dot_then_psum_of_invariant_operands_counts_each_device():
    """Neither operand varies over the axis (check_vma off): the psum counts the product once
    per device, fused or not."""
    a, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    out = fusion.dot_then_psum(np, MESH, prims.dot_general_p.rule("impl"), a[None, None], b[None, None],
                               contract=((1,), (0,)), batch=((), ()), axes=("model",))
    np.testing.assert_allclose(out[0, 0], 4 * (a @ b), rtol=1e-5)


CHAINS = [
    ("scale-sub", lambda p, g: p - 0.1 * g, np.float32),
    ("tanh-and-derivative", lambda x, b: (np.tanh(x + b), 1 - np.tanh(x + b) ** 2), np.float32),
    ("composite-members", lambda x, y: np.reciprocal(1 + np.exp(-x)) * y + np.sqrt(np.abs(y)), np.float64),
    ("int", lambda x, y: (x * 3 - y) // 2 + x, np.int32),
    ("broadcast-inside", lambda x, y: np.maximum(x, 0) * y[:1] + y, np.float32),   # rows whole
]


@pytest.mark.parametrize("row", CHAINS, ids=[r[0] for r in CHAINS])
def test_elementwise_chains_match_the_reference(row, paths):
    name, fn, dtype = row
    x = (rng.normal(size=(8, 12)) * 4).astype(dtype)
    y = (rng.normal(size=(8, 12)) * 4 + 5).astype(dtype)
    spec = P(None, "model") if name == "broadcast-inside" else P("data", "model")
    got, want = _both(fn, (spec, spec), spec, x, y)
    # a chain that runs as C computes tanh and exp as XLA does on the CPU, a few ulps from
    # NumPy's; 1 - tanh(x)**2 of a saturated tanh turns that into about 1e-7 absolute
    atol = 2e-6 if dtype == np.float32 else 0
    for g, w in zip(np.atleast_1d(got) if not isinstance(got, tuple) else got,
                    np.atleast_1d(want) if not isinstance(want, tuple) else want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=atol)
    with np.errstate(all="ignore"):
        expect = fn(x, y)
    for g, w in zip(got if isinstance(got, tuple) else (got,), expect if isinstance(expect, tuple) else (expect,)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=atol)


def test_chain_writes_results_and_keeps_intermediates_in_scratch():
    """Registers: a member that is a result writes into the result; the others share scratch
    slots once their values are dead."""
    add, tanh, mul, sub = (p.rules["elementwise"] for p in (prims.add_p, prims.tanh_p, prims.mul_p, prims.sub_p))
    # refs: 0 x, 1 b, 2 one; 3 s=x+b, 4 t=tanh(s), 5 u=t*t, 6 v=1-u
    members = ((add, (0, 1)), (tanh, (3,)), (mul, (4, 4)), (sub, (2, 5)))
    ops = fusion._registers(members, (4, 6), 3)
    assert [op[2] for op in ops] == [None, 0, None, 1]           # t and v are results 0 and 1
    assert ops[0][3] == ops[2][3] == 0                          # s's slot is reused for u
    chain = fusion.ElementwiseChain(np, members, (4, 6), 3)
    x = rng.normal(size=(2, 4, 64, 80)).astype(np.float32)
    b = rng.normal(size=(1, 4, 1, 80)).astype(np.float32)
    t, v = chain(x, b, np.float32(1))
    np.testing.assert_allclose(t, np.tanh(x + b), rtol=1e-6)
    np.testing.assert_allclose(v, 1 - np.tanh(x + b) ** 2, rtol=1e-5, atol=1e-6)


def _mlp_step(lr):
    def loss(p, x, y):
        w1, w2 = p
        return np.mean((np.tanh(x @ w1) @ w2 - y) ** 2)

    def step(p, x, y):
        g = spmd.grad(loss)(p, x, y)
        return tuple(w - lr * gw for w, gw in zip(p, g))
    S = lambda *s: NamedSharding(MESH, P(*s))
    return loss, step, ((S(None, "model"), S("model")), S("data"), S("data"))


def test_training_step_fuses_and_matches_numpy(paths):
    """The DP x TP step: every psum is fused into the product it reduces, the update
    ``w - lr * g`` runs as one chain after the reduction, and the values are NumPy's."""
    loss, step, shardings = _mlp_step(0.1)
    # gradient blocks of 16 KiB: reduced one by one (too big to be worth combining on the host)
    w1, w2 = rng.normal(size=(64, 256)).astype(np.float32) / 8, rng.normal(size=(256, 64)).astype(np.float32) / 16
    x, y = rng.normal(size=(8, 64)).astype(np.float32), rng.normal(size=(8, 64)).astype(np.float32)
    f = spmd.jit(step, in_shardings=shardings, out_shardings=shardings[0])
    got = f((w1, w2), x, y)
    want = spmd.jit(step, in_shardings=shardings, out_shardings=shardings[0], executor=REFERENCE)((w1, w2), x, y)
    h = np.tanh(x @ w1)
    d = 2 * (h @ w2 - y) / y.size
    grads = (x.T @ ((d @ w2.T) * (1 - h ** 2)), h.T @ d)
    for g, r, w, gr in zip(got, want, (w1, w2), grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(g), w - 0.1 * gr, rtol=1e-4, atol=1e-5)
    assert _fused_kinds(f, (w1, w2), x, y).count("dot_then_psum") == 3
    assert "elementwise" in _fused_kinds(f, (w1, w2), x, y)


def test_reduction_moves_before_the_learning_rate_scaling():
    """``w - lr * psum(g)``: the psum reduces the gradient, not the scaled gradient."""
    loss, step, shardings = _mlp_step(0.1)
    w1, w2 = np.ones((64, 256), np.float32), np.ones((256, 64), np.float32)
    x = y = np.ones((8, 64), np.float32)
    f = spmd.jit(step, in_shardings=shardings, out_shardings=shardings[0])
    body = f.lower((w1, w2), x, y).compiled.manual.eqns[0].params["body"]
    names = [e.prim.name for e in body.eqns]
    for i, e in enumerate(body.eqns):
        if e.prim.name == "psum" and e.params["axes"] == ("data",):
            user = next(u for u in body.eqns[i + 1:] if e.outputs[0] in u.inputs)
            assert user.prim.name == "mul"                       # the lr scaling comes after
    assert names.count("psum") == 3


def test_unused_values_are_not_computed():
    """jit drops what the function computes but does not return (the loss under grad)."""
    def f(x):
        unused = np.sin(x).sum()            # noqa: F841
        return x * 2
    prog = spmd.make_program(f)(np.ones(3, np.float32))
    assert [e.prim.name for e in prog.eqns] == ["mul"]


def test_big_gradients_are_reduced_one_by_one_on_the_cpu_model():
    """Combining reductions copies each buffer: worth it for small ones (the latency saved),
    not for big ones on the host (the copy costs more), and on GPUs up to many MiB."""
    loss, step, shardings = _mlp_step(0.1)
    grad = spmd.grad(loss)
    big = (np.ones((64, 512), np.float32), np.ones((512, 64), np.float32))
    x = y = np.ones((4, 64), np.float32)
    for model, expected in ((cost.CPU, 2), (cost.GPU, 1)):
        f = spmd.jit(grad, in_shardings=shardings, out_shardings=shardings[0])
        with cost.set_cost_model(model):
            kinds = [k for k, a in f.lower(big, x, y).collectives() if a == ("data",)]
        assert len(kinds) == expected, (model, kinds)
    assert cost.CPU.worth_combining(1024, ("data",)) and not cost.CPU.worth_combining(1 << 20, ("data",))


def test_chains_with_dead_and_shared_values(paths):
    """A chain nothing reads is not run; a chain value that a later product reads is written."""
    def body(x, w):
        dead = np.tanh(x) * 2 - 1                               # noqa: F841
        h = np.exp(-x * x) + 1                                  # chain; h read by the product
        return (h * 3) @ w, h
    x = rng.normal(size=(8, 12)).astype(np.float32)
    w = rng.normal(size=(12, 5)).astype(np.float32)
    specs = (P("data"), P())
    f = spmd.shard_map(body, mesh=MESH, in_specs=specs, out_specs=(P("data"), P("data")))
    prog = spmd.make_program(f)(x, w).eqns[0].params["body"]
    plan = fusion.plan_fusions(prog, 2, np)
    runs = [v for v in plan.values() if v != "skip"]
    assert len(runs) == 1 and len(runs[0].outputs) == 2         # h (returned) and h * 3 (read)
    tanh = next(e for e in prog.eqns if e.prim.name == "tanh")
    assert plan[id(tanh)] == "skip"
    got, want = _both(body, specs, (P("data"), P("data")), x, w)
    for g, r, e in zip(got, want, ((np.exp(-x * x) + 1) * 3 @ w, np.exp(-x * x) + 1)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-4, atol=1e-5)


def test_chains_that_meet_fuse_into_one_step_inside_and_outside_shard_map(paths):
    """An Adam update of each parameter: the m, v and parameter chains meet (interleaved with
    the other parameter's as tree_map orders them), and each parameter's update runs as one
    fused step writing m, v and p; outside shard_map as well."""
    def adam(ps, gs, ms, vs):
        ms = [0.9 * m + 0.1 * g for m, g in zip(ms, gs)]
        vs = [0.99 * v + 0.01 * g * g for v, g in zip(vs, gs)]
        ps = [p - 0.1 * (m * 2.0) / (np.sqrt(v * 3.0) + 1e-8) for p, m, v in zip(ps, ms, vs)]
        return ps, ms, vs
    shapes = ((8, 12), (4, 8))
    args = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(4)]
    args[3] = [np.abs(a) for a in args[3]]
    want = adam(*args)
    specs = ([P("data"), P(None, "model")],) * 4
    f = spmd.shard_map(adam, mesh=MESH, in_specs=specs, out_specs=specs[:3])
    body = spmd.make_program(f)(*args).eqns[0].params["body"]
    top = spmd.make_program(adam)(*args)
    for prog, k in ((body, 2), (top, 0)):
        runs = [v for v in fusion.plan_fusions(prog, k, np).values() if v != "skip"]
        assert [len(r.outputs) for r in runs] == [3, 3], runs        # p, m, v per parameter
        assert sum(len(r.eqns) for r in runs) == len(prog.eqns) - sum(
            e.prim.name == "broadcast_in_dim" for e in prog.eqns)
    for fn in (spmd.jit(f), spmd.jit(adam)):
        for g, w in zip(spmd.tree_util.tree_leaves(fn(*args)), spmd.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-6)
    got, ref = _both(adam, specs, specs[:3], *args)
    for g, r in zip(spmd.tree_util.tree_leaves(got), spmd.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# property test: random products reduced over random axes, then random elementwise chains
# ---------------------------------------------------------------------------------------------


_MESHES = [((8,), ("x",)), ((2, 4), ("data", "model")), ((4, 2), ("a", "b"))]
_OPS = [lambda z: z * 0.5, lambda z: z + 1, np.tanh, lambda z: z - z * z * 0.1,
        lambda z: np.maximum(z, 0), lambda z: np.exp(-z * z), lambda z: -z]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_property_fused_programs_equal_the_reference(data):
    """``psum(x @ y)`` over random axes (both operands varying, or, without the type check,
    also axes neither varies over), then a random chain of elementwise ops whose intermediate
    values are returned too: the stacked executor (fused) equals the reference executor (every
    equation on its own, per device) and NumPy, on the small and the threaded block paths."""
    sizes, names = data.draw(st.sampled_from(_MESHES))
    mesh = spmd.make_mesh(sizes, names, devices=spmd.devices()[:int(np.prod(sizes))])
    contract = tuple(data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True)))
    rest = [a for a in names if a not in contract]
    rows = tuple(data.draw(st.lists(st.sampled_from(rest), max_size=len(rest), unique=True))) if rest else ()
    extra = () if not rest else tuple(a for a in rest if a not in rows and data.draw(st.booleans()))
    n_c = int(np.prod([mesh.axis_size(a) for a in contract]))
    n_r = int(np.prod([mesh.axis_size(a) for a in rows]))
    m, k, n = n_r * data.draw(st.integers(1, 3)), n_c * data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    rng_ = np.random.default_rng(data.draw(st.integers(0, 999)))
    x = rng_.normal(size=(m, k)).astype(np.float32)
    y = rng_.normal(size=(k, n)).astype(np.float32)
    ops = data.draw(st.lists(st.sampled_from(range(len(_OPS))), min_size=1, max_size=5))
    scale = int(np.prod([mesh.axis_size(a) for a in extra]))

    def body(x, y):
        z = spmd.psum(x @ y, contract + extra)
        outs = [z]
        for i in ops:
            outs.append(_OPS[i](outs[-1]))
        return tuple(outs)
    row = rows if len(rows) > 1 else (rows[0] if rows else None)
    specs = (P(row, contract if len(contract) > 1 else contract[0]), P(contract if len(contract) > 1 else contract[0]))
    out_specs = tuple(P(row) for _ in range(len(ops) + 1))
    kw = dict(mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=not extra)
    want = [(x @ y) * scale]
    for i in ops:
        want.append(_OPS[i](want[-1]))
    ref = spmd.jit(spmd.shard_map(body, **kw), executor=REFERENCE)(x, y)
    for blocked in (False, True):
        with _forced_blocks(blocked):
            got = spmd.jit(spmd.shard_map(body, **kw))(x, y)
        for g, r, w in zip(got, ref, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-5, atol=2e-5)
            np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=2e-4)


def test_reduction_moves_up_a_chain_of_scalings_with_other_varying_factors():
    """``w - 0.5 * (s * (x.T @ y))`` with ``s`` split over ``model``: the data psum moves above
    both scalings, and the lowered per-device program still type-checks (the factor's own
    axes stay on the scaled values)."""
    S = lambda *s: NamedSharding(MESH, P(*s))
    x, y = rng.normal(size=(8, 64)).astype(np.float32), rng.normal(size=(8, 64)).astype(np.float32)
    s, w = rng.normal(size=(64,)).astype(np.float32), rng.normal(size=(64, 64)).astype(np.float32)
    f = spmd.jit(lambda x, y, s, w: w - 0.5 * (s * (x.T @ y)),
                 in_shardings=(S("data"), S("data"), S("model"), S(None, "model")), out_shardings=S(None, "model"))
    np.testing.assert_allclose(np.asarray(f(x, y, s, w)), w - 0.5 * (s * (x.T @ y)), rtol=1e-4, atol=1e-5)
    body = f.lower(x, y, s, w).compiled.manual.eqns[0].params["body"]
    body.check()
    names = [e.prim.name for e in body.eqns]
    assert names.count("psum") == 1
    assert names.index("psum") < max(i for i, n in enumerate(names) if n == "mul")


def test_reduce_before_scaling_keeps_the_factors_axes():
    """The pass on a body where the factor varies over an axis the summed value does not (traced
    as the compiler traces its per-device bodies): the rewritten program type-checks and runs
    the psum first."""
    from spmd.compiler.lower import reduce_before_scaling
    from spmd.core import Aval, trace

    def body(x, s):
        return [spmd.psum(0.5 * (s * x), "data")]
    avals = [Aval((2, 8), np.dtype(np.float32), frozenset({"data"})),
             Aval((2, 8), np.dtype(np.float32), frozenset({"model"}))]
    inner, _ = trace(body, avals, mesh=MESH, manual_axes=MESH.axis_names, check_vma=False, context="test")
    psum = next(e for e in inner.eqns if e.prim.name == "psum")
    rewritten = reduce_before_scaling(inner, {id(psum): "record"})
    rewritten.check()
    assert [e.prim.name for e in rewritten.eqns][-3:] == ["psum", "mul", "mul"]
    assert [v.aval.vma for v in rewritten.eqns[-2].outputs] == [frozenset({"model"})]
    x = rng.normal(size=(2, 1, 2, 8)).astype(np.float32)         # stacked: varies over data
    s = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)         # varies over model
    ex = StackedExecutor()
    got = ex._compile(rewritten, MESH)([x, s])[0]
    want = ex._compile(inner, MESH)([x, s])[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[0], 0.5 * s[0] * x.sum(0), rtol=1e-5)


_UNARY = [np.tanh, lambda v: np.exp(-v * v), lambda v: -v, lambda v: v * 0.5]
_BINARY = [np.add, np.multiply, np.subtract, np.maximum]


def _replay(program, n_out, x, un, bin_, mat, psum):
    """Run a drawn program on ``x`` with the given operations; returns the picked values.
    Each step reads earlier values chosen by its numbers, so values get several users."""
    vals = [x]
    for kind, i, j in program:
        a = vals[i % len(vals)]
        if kind == "un":
            vals.append(un(j, a))
        elif kind == "bin":
            vals.append(bin_(i, a, vals[j % len(vals)]))
        elif kind == "mat":
            vals.append(mat(a))
        else:
            vals.append(psum(a))
    picked = sorted({(len(vals) - 1 - k * 7) % len(vals) for k in range(n_out)})
    return tuple(vals[p] for p in picked)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_property_random_programs_plan_and_run_like_the_reference(data):
    """Random per-device programs -- elementwise ops on random earlier values (so values have
    several users), products and psums interleaved, values of mixed vma -- with a random set of
    returned values: the fusion planner's groups and their outputs give what the reference
    executor (no fusion) gives, on the small and the threaded block paths."""
    m = data.draw(st.integers(1, 4))
    w = rng.normal(size=(m, m)).astype(np.float32) / 2
    program = data.draw(st.lists(st.tuples(st.sampled_from(["un", "bin", "mat", "psum"]),
                                           st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)),
                                 min_size=1, max_size=12))
    n_out = data.draw(st.integers(1, 4))

    def body(x, w):
        return _replay(program, n_out, x, lambda j, a: _UNARY[j % len(_UNARY)](a),
                       lambda i, a, b: _BINARY[i % len(_BINARY)](a, b), lambda a: np.tanh(a @ w),
                       lambda a: spmd.psum(a, "model") * 0.25 if a.aval.vma >= {"model"} else a)
    # which results vary over "model" (their out_specs say so): the same program on flags
    varying = _replay(program, n_out, True, lambda j, a: a, lambda i, a, b: a or b, lambda a: a, lambda a: False)
    out_specs = tuple(P("data", "model") if v else P("data") for v in varying)
    f = spmd.shard_map(body, mesh=MESH, in_specs=(P("data", "model"), P()), out_specs=out_specs)
    x = rng.normal(size=(2 * m, 4 * m)).astype(np.float32)
    with np.errstate(all="ignore"):
        ref = spmd.jit(f, executor=REFERENCE)(x, w)
    for blocked in (False, True):
        with _forced_blocks(blocked), np.errstate(all="ignore"):
            got = spmd.jit(f)(x, w)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


def test_product_with_a_pvaried_operand_folds_the_devices(monkeypatch):
    """``x @ pvary(w)``: ``w`` is the same block on every device (a broadcast view), so the
    stacked executor makes one product of all devices' rows, not one product per device."""
    mesh = spmd.make_mesh((8,), ("data",))
    x = rng.normal(size=(64, 12)).astype(np.float32)
    w = rng.normal(size=(12, 5)).astype(np.float32)
    shapes = []
    real = _host_parallel.matmul
    monkeypatch.setattr(_host_parallel, "matmul",
                        lambda xp, a, b, **kw: shapes.append((a.shape, b.shape)) or real(xp, a, b, **kw))
    body = lambda x, w: np.tanh(x @ spmd.pvary(w, "data"))
    f = spmd.shard_map(body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
    got = spmd.jit(f)(x, w)
    assert shapes == [((64, 12), (12, 5))], shapes
    np.testing.assert_allclose(np.asarray(got), np.tanh(x @ w), rtol=1e-5, atol=1e-6)
    ref = spmd.jit(f, executor=REFERENCE)(x, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
