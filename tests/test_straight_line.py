"""The stacked executor's straight-line functions (``spmd.executors.lean``), which run the
sub-programs of loops and branches at the top level: every specialised array call and every
fallback against NumPy, which call each equation gets, and values that come in as sharded
``Array``s or out of higher-order equations."""
import functools

import numpy as np
import pytest

import spmd
import spmd.lax as slax
from spmd import P, _host_parallel
from spmd.core import Aval, trace
from spmd.executors import lean, profiling
from spmd.executors.stacked import StackedExecutor, _Run

RNG = np.random.default_rng(3)


def _arr(shape, dtype=np.float32):
    return (RNG.standard_normal(shape) * 3).astype(dtype)


def _dot(contract, batch=((), ())):
    return lambda x, y: slax.dot_general(x, y, (contract, batch))


def _compile(fn, args):
    prog, consts = trace(lambda *xs: [fn(*xs)], [Aval(a.shape, a.dtype) for a in args])
    assert not consts
    return prog, _Run(StackedExecutor(), None).call(prog)


BIG = 64            # (2 BIG, BIG) @ (BIG, BIG): more multiply-adds than one BLAS thread takes
T = lambda a: np.swapaxes(a, -1, -2)
# id, function (traced), NumPy's answer (None: the function itself on arrays), operand shapes
# and dtypes, the call the equation gets (None: the primitive's implementation)
ROWS = [
    ("matrix product", lambda x, y: x @ y, None, [((4, 5), "f4"), ((5, 3), "f4")], np.dot),
    ("matrix product f64", lambda x, y: x @ y, None, [((4, 5), "f8"), ((5, 3), "f8")], np.dot),
    ("rows of x contracted", _dot(((0,), (0,))), lambda x, y: T(x) @ y,
     [((5, 4), "f4"), ((5, 3), "f4")], "swapped"),
    ("columns of y contracted", _dot(((1,), (1,))), lambda x, y: x @ T(y),
     [((4, 5), "f4"), ((3, 5), "f4")], "swapped"),
    ("both transposed", _dot(((0,), (1,))), lambda x, y: T(x) @ T(y),
     [((5, 4), "f4"), ((3, 5), "f4")], "swapped"),
    ("stacks of products", _dot(((2,), (1,)), ((0,), (0,))), lambda x, y: x @ y,
     [((2, 4, 5), "f4"), ((2, 5, 3), "f4")], np.matmul),
    ("stacks, y transposed", _dot(((2,), (2,)), ((0,), (0,))), lambda x, y: x @ T(y),
     [((2, 4, 5), "f4"), ((2, 3, 5), "f4")], "swapped"),
    ("int32 product", lambda x, y: x @ y, None, [((4, 5), "i4"), ((5, 3), "i4")], np.matmul),
    ("float16 product", lambda x, y: x @ y, None, [((4, 5), "f2"), ((5, 3), "f2")], np.matmul),
    ("big product", lambda x, y: x @ y, None, [((2 * BIG, BIG), "f4"), ((BIG, BIG), "f4")],
     "threaded"),
    ("three dims by two (fallback)", lambda x, y: x @ y, None,
     [((2, 4, 5), "f4"), ((5, 3), "f4")], None),
    ("two contracted dims (fallback)", _dot(((1, 2), (0, 1))),
     lambda x, y: np.tensordot(x, y, ((1, 2), (0, 1))), [((4, 2, 3), "f4"), ((2, 3, 5), "f4")],
     None),
    ("broadcast a row", lambda x: slax.broadcast_in_dim(x, (4, 3), (1,)),
     lambda x: np.broadcast_to(x, (4, 3)), [((3,), "f4")], "closure"),
    ("broadcast a column", lambda x: slax.broadcast_in_dim(x, (3, 4), (0, 1)),
     lambda x: np.broadcast_to(x, (3, 4)), [((3, 1), "f4")], "closure"),
    ("broadcast a scalar", lambda x: slax.broadcast_in_dim(x, (2, 2), ()),
     lambda x: np.broadcast_to(x, (2, 2)), [((), "f4")], "closure"),
    ("tanh", np.tanh, None, [((3, 4), "f4")], np.tanh),
    ("add", np.add, None, [((3, 4), "f4"), ((3, 4), "f4")], np.add),
    ("multiply by a Python scalar", lambda x: x * 2.5, None, [((3,), "f4")], np.multiply),
    ("integer division", lambda x, y: x // (np.abs(y) + 1), None, [((5,), "i4"), ((5,), "i4")],
     np.floor_divide),
    ("sum (fallback)", lambda x: x.sum(0), None, [((3, 4), "f4")], None),
    ("transpose (fallback)", lambda x: x.T, None, [((3, 4), "f4")], None),
    ("concatenate (fallback)", lambda x, y: np.concatenate([x, y], 1), None,
     [((3, 4), "f4"), ((3, 2), "f4")], None),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_each_equation_against_numpy(row):
    _, fn, oracle, operands, call = row
    args = [RNG.integers(-5, 6, shape).astype(dtype) if dtype[0] == "i" else _arr(shape, dtype)
            for shape, dtype in operands]
    prog, run = _compile(fn, args)
    got, want = run(*args)[0], np.asarray((oracle or fn)(*args))
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-3 if want.dtype == np.float16 else 1e-5,
                               atol=1e-5)
    chosen = lean.host_call(prog.eqns[-1], np)
    if call is None:
        assert isinstance(chosen, functools.partial) and chosen.args == (np, 0)
    elif call == "threaded":
        assert chosen.func is _host_parallel.matmul
    elif call in ("swapped", "closure"):
        assert chosen.__name__ == "<lambda>"
    else:
        assert chosen is call


def test_sharded_inputs_and_higher_order_results_are_gathered():
    """A scan at the top level reading a sharded Array and the result of a cond: the straight
    line gathers both before its array calls."""
    mesh = spmd.make_mesh((4,), ("x",))
    w = _arr((8, 8)) * 0.2
    w_sharded = spmd.device_put(w, spmd.NamedSharding(mesh, P("x")))
    xs = _arr((5, 2, 8))

    def f(w, xs):
        def body(c, x):
            c = slax.cond(c.sum() > 0, lambda v: v * 0.5, lambda v: v + 1.0, c)
            return np.tanh(c @ w + x), c.sum()
        return slax.scan(body, xs[0], xs)

    def oracle(w, xs):
        c, ys = xs[0], []
        for x in xs:
            c = c * 0.5 if c.sum() > 0 else c + 1.0
            ys.append(c.sum())
            c = np.tanh(c @ w + x)
        return c, np.stack(ys)
    want = oracle(w, xs)
    for arg in (w, w_sharded):
        got = spmd.jit(f)(arg, xs)
        np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got[1]), want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_profiling_runs_the_timed_steps_with_the_same_values(native, monkeypatch):
    # the NumPy loop: each step's equations timed; a native loop: one timed call
    monkeypatch.setenv("SPMD_NATIVE", "1" if native else "0")
    w, h0, xs = _arr((4, 4)) * 0.3, _arr((2, 4)), _arr((6, 2, 4))
    f = spmd.jit(lambda w, h, xs: slax.scan(lambda h, x: (np.tanh(h @ w + x),) * 2, h, xs))
    fast = [np.asarray(o) for o in f(w, h0, xs)]
    recording = profiling.Recording()
    monkeypatch.setattr(profiling, "active", recording)
    timed = [np.asarray(o) for o in f(w, h0, xs)]
    monkeypatch.setattr(profiling, "active", None)
    for a, b in zip(fast, timed):
        np.testing.assert_array_equal(a, b)
    ops = [event[0].op for event in recording.events]
    if native:
        assert ops == ["native(dot_general·add·tanh)", "scan"], ops
    else:
        assert ops.count("tanh") == 6 and ops.count("dot_general") == 6


def test_ops_write_into_temporaries_that_die_and_never_into_inputs_or_live_values():
    """``tanh(x @ w + b) * 2``: the sum, tanh and product reuse the product's buffer; the
    inputs, a temporary read again later and the returned values keep their contents."""
    f4 = np.dtype("float32")
    x, w, b = _arr((3, 4)), _arr((4, 4)), _arr((4,))
    saved = [a.copy() for a in (x, w, b)]

    def fn(x, w, b):
        h = x @ w
        y = np.tanh(h + b) * 2           # h + b, tanh, * 2: into the product's buffer
        z = np.exp(-x)                   # x is an input: never written
        return [y, z, h]                 # h is returned: never written
    prog, _ = trace(fn, [Aval((3, 4), f4), Aval((4, 4), f4), Aval((4,), f4)])
    real = lean._reusable
    reused = []
    lean._reusable = lambda e, *a: reused.append((e.prim.name, real(e, *a))) or reused[-1][1]
    try:
        step = lean.straight_line(prog, np, higher=None, gather=lambda v: v)
    finally:
        lean._reusable = real
    y, z, h = step(x, w, b)
    for a, s in zip((x, w, b), saved):
        np.testing.assert_array_equal(a, s)
    np.testing.assert_allclose(h, x @ w, rtol=1e-6)
    np.testing.assert_allclose(y, np.tanh(x @ w + b) * 2, rtol=1e-5)
    np.testing.assert_allclose(z, np.exp(-x), rtol=1e-6)
    into = {name: r is not None for name, r in reused}
    assert into == {"dot_general": False, "broadcast_in_dim": False,
                    "add": False,                         # h + b: h is returned, kept
                    "tanh": True, "mul": True, "neg": False, "exp": True}, into

