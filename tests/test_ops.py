"""The op table: every NumPy function, ufunc and method that traces, compared with NumPy itself.

One helper (``check_op``, after tinygrad's ``helper_test_op``) runs a row four ways and
compares values, shapes and dtypes with NumPy run on the same inputs:

1. ``spmd.jit(fn)`` (stacked executor, ``k = 0`` leading dims);
2. the same program through the reference executor;
3. inside a ``shard_map`` on a 2x4 mesh, stacked executor: argument 0 is a batch over
   ``data``, argument 1 a batch over ``model``, argument 2 a batch over both, the rest are
   replicated -- so every implementation runs with ``k = 2`` leading dims, size-1 mesh dims
   broadcasting against size-n ones;
4. that shard_map program through the reference executor (one device at a time);
5. ``spmd.vmap`` over argument 0's batch.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import zlib
from typing import Any, Callable

import ml_dtypes
import numpy as np
import optree
import pytest

import spmd
import spmd.numpy as snp
from spmd import P, prims
from spmd.core import Tracer
from spmd.executors import reference_executor
from spmd.numpy_api import _COMPOSITE_UFUNCS, _GUFUNCS, _UFUNCS, HANDLED_FUNCTIONS

pytestmark = [pytest.mark.filterwarnings(f"ignore:{m}:RuntimeWarning")       # NumPy's own, on purpose
              for m in ("All-NaN slice", "Mean of empty slice", "Degrees of freedom <= 0")]

MESH = spmd.make_mesh((2, 4), ("data", "model"))
BATCH = {0: (2, P("data")), 1: (4, P("model")), 2: (8, P(("data", "model")))}

f16, bf16, f32, f64 = np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float64)
i8, i32, i64, u8, b_ = np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.uint8), np.dtype(np.bool_)
c64, c128 = np.dtype(np.complex64), np.dtype(np.complex128)
FLOAT = [f32, f64]
FLOAT_ALL = [f32, f64, f16, bf16]
NUM = [f32, f64, i32, i64]
ALL = [f32, f64, i32, i64, b_]
TOL = {f16: 1e-2, bf16: 4e-2, f32: 2e-5, f64: 1e-10, c64: 2e-5, c128: 1e-10}


@dataclasses.dataclass(frozen=True)
class In:
    """An input: shape, and optionally its own dtype and value range (else the case's)."""
    shape: tuple
    dtype: Any = None
    low: float | None = None
    high: float | None = None


@dataclasses.dataclass
class Op:
    names: tuple            # the NumPy API it exercises: "np.sum", "ndarray.sum", "spmd.numpy.softmax"
    fn: Callable            # traced by spmd
    shapes: list            # list of cases; each a tuple of shapes / In, one per input
    dtypes: list = dataclasses.field(default_factory=lambda: list(FLOAT))
    low: float = -2.0
    high: float = 2.0
    ref: Callable | None = None   # NumPy reference if fn itself is not NumPy code
    tol: float | None = None

    @property
    def id(self):
        return self.names[0]


def _arity(fn):
    if isinstance(fn, np.ufunc):
        return fn.nin
    return len(inspect.signature(fn).parameters)


def op(names, fn, shapes, dtypes=None, **kw):
    """A row; for a one-input ``fn`` each case in ``shapes`` is a shape, else a tuple of them."""
    names = tuple(names.split()) if isinstance(names, str) else tuple(names)
    cases = [(s,) for s in shapes] if _arity(fn) == 1 else list(shapes)
    return Op(names, fn, cases, list(dtypes or FLOAT), **kw)


# ---------------------------------------------------------------------------------------------
# the helper
# ---------------------------------------------------------------------------------------------

def _random(rng, shape, dtype, low, high):
    dt = np.dtype(dtype)
    if dt == b_:
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        lo = max(int(np.floor(low)), 0) if dt.kind == "u" else int(np.floor(low))
        hi = max(int(np.ceil(high)), lo + 1)
        return rng.integers(lo, hi, shape).astype(dt)
    if dt.kind == "c":
        return (rng.uniform(low, high, shape) + 1j * rng.uniform(low, high, shape)).astype(dt)
    return rng.uniform(low, high, shape).astype(dt)


def _compare(got, want, tol, what):
    got_leaves, got_tree = optree.tree_flatten(got, none_is_leaf=True)
    want_leaves, want_tree = optree.tree_flatten(want, none_is_leaf=True)
    assert len(got_leaves) == len(want_leaves), f"{what}: {got_tree} != {want_tree}"
    for g, w in zip(got_leaves, want_leaves):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape, f"{what}: shape {g.shape} != NumPy's {w.shape}"
        assert g.dtype == w.dtype, f"{what}: dtype {g.dtype} != NumPy's {w.dtype}"
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(g, w, err_msg=what)
        else:
            t = tol if tol is not None else TOL[w.dtype]
            wide = c128 if w.dtype.kind == "c" else f64
            np.testing.assert_allclose(g.astype(wide), w.astype(wide), rtol=t, atol=t,
                                       equal_nan=True, err_msg=what)


EXERCISED: set = set()      # primitive names seen in the programs the table traced
RAN: set = set()            # ids of the rows run so far


def _record(program):
    for e in program.eqns:
        EXERCISED.add(e.prim.name)
        for sub in e.prim.subprograms(e.params):
            _record(sub)


def _expand(out):
    return optree.tree_map(lambda y: np.expand_dims(y, (0, 1)), out)


def check_op(fn, args, batches, ref=None, tol=None):
    """Run ``fn`` on ``args`` through spmd five ways and compare each with NumPy.  ``batches[i]``
    is a stack of inputs for argument ``i < 3`` whose first entry is ``args[i]``."""
    ref = ref or fn
    want = ref(*args)
    _compare(spmd.jit(fn)(*args), want, tol, "jit")
    program = spmd.make_program(fn)(*args)
    program.check()
    _record(program)
    _compare(reference_executor().run(program, list(args)), optree.tree_leaves(want), tol,
             "reference executor")
    want_v = optree.tree_map(lambda *ys: np.stack(ys), *[ref(np.asarray(b), *args[1:]) for b in batches[0]])
    vmapped = spmd.vmap(fn, in_axes=(0,) + (None,) * (len(args) - 1))
    _compare(vmapped(batches[0], *args[1:]), want_v, tol, "vmap")
    # shard_map: argument i < 3 becomes a batch split over BATCH[i]'s mesh axes
    n_in = min(len(args), 3)
    specs = tuple(BATCH[i][1] if i < n_in else P() for i in range(len(args)))

    def body(*blocks):
        return _expand(fn(*[b[0] if i < n_in else b for i, b in enumerate(blocks)]))

    g = spmd.shard_map(body, mesh=MESH, in_specs=specs, out_specs=P("data", "model"))
    gargs = [batches[i] if i < n_in else a for i, a in enumerate(args)]

    def on_device(d, m):                        # the arguments device (d, m) sees
        return [np.asarray(gargs[0][d]), np.asarray(gargs[1][m]) if n_in > 1 else None,
                np.asarray(gargs[2][4 * d + m]) if n_in > 2 else None][:n_in]

    per_device = [ref(*on_device(d, m), *args[n_in:]) for d in range(2) for m in range(4)]
    want_g = optree.tree_map(lambda *ys: np.stack(ys).reshape((2, 4) + np.shape(ys[0])), *per_device)
    _compare(g(*gargs), want_g, tol, "shard_map (stacked executor)")
    gprog = spmd.make_program(g)(*gargs)
    gprog.check()
    _record(gprog)
    _compare(reference_executor().run(gprog, gargs), optree.tree_leaves(want_g), tol,
             "shard_map (reference executor)")


@np.errstate(all="ignore")          # NumPy warns on nan / inf in the ops' own domains
def run_row(row: Op):
    rng = np.random.default_rng(zlib.crc32(row.id.encode()))
    for shapes, dtype in itertools.product(row.shapes, row.dtypes):
        ins = [s if isinstance(s, In) else In(tuple(s)) for s in shapes]
        batches = []
        for i, s in enumerate(ins):
            dt = s.dtype or dtype
            lo = row.low if s.low is None else s.low
            hi = row.high if s.high is None else s.high
            lead = (BATCH[i][0],) if i < 3 else ()
            batches.append(_random(rng, lead + s.shape, dt, lo, hi))
        args = [np.asarray(b[0]) if i < 3 else b for i, b in enumerate(batches)]
        try:
            check_op(row.fn, args, batches, row.ref, row.tol)
        except Exception as e:
            desc = ", ".join(f"{np.asarray(a).dtype}{list(np.shape(a))}" for a in args)
            raise AssertionError(f"{row.id} on ({desc}): {type(e).__name__}: {e}") from e
    RAN.add(id(row))


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------

U_SHAPES = [(), (5,), (2, 3)]
B_SHAPES = [((2, 3), (2, 3)), ((2, 3), (3,)), ((), (2, 3)), ((3, 1), (1, 4))]

UNARY = [  # ufunc, dtypes, value range
    (np.negative, NUM + [f16, bf16, c128], (-2, 2)), (np.positive, NUM, (-2, 2)),
    (np.exp, FLOAT_ALL + [c128], (-3, 3)), (np.exp2, FLOAT, (-3, 3)),
    (np.log, FLOAT_ALL, (0.1, 4)), (np.log2, FLOAT, (0.1, 4)), (np.log10, FLOAT, (0.1, 4)),
    (np.log1p, FLOAT, (-0.5, 3)), (np.expm1, FLOAT, (-2, 2)), (np.tanh, FLOAT_ALL, (-3, 3)),
    (np.sinh, FLOAT, (-2, 2)), (np.cosh, FLOAT, (-2, 2)), (np.sin, FLOAT + [c128], (-3, 3)),
    (np.cos, FLOAT, (-3, 3)), (np.tan, FLOAT, (-1, 1)), (np.arcsin, FLOAT, (-0.9, 0.9)),
    (np.arccos, FLOAT, (-0.9, 0.9)), (np.arctan, FLOAT, (-3, 3)), (np.arcsinh, FLOAT, (-3, 3)),
    (np.arccosh, FLOAT, (1.1, 3)), (np.arctanh, FLOAT, (-0.9, 0.9)),
    (np.sqrt, FLOAT_ALL + [c128], (0.1, 4)), (np.cbrt, FLOAT, (-3, 3)),
    (np.square, NUM + [c128], (-3, 3)), (np.reciprocal, FLOAT, (0.5, 3)),
    (np.absolute, NUM + [f16, bf16, c64, c128], (-3, 3)), (np.sign, NUM, (-3, 3)),
    (np.floor, FLOAT, (-3, 3)), (np.ceil, FLOAT, (-3, 3)), (np.trunc, FLOAT, (-3, 3)),
    (np.rint, FLOAT, (-3, 3)), (np.conjugate, [c64, c128, f32], (-2, 2)),
    (np.invert, [i32, i64, b_], (-5, 5)), (np.logical_not, ALL, (-2, 2)),
    (np.isnan, FLOAT, (-2, 2)), (np.isinf, FLOAT, (-2, 2)), (np.isfinite, FLOAT, (-2, 2)),
    (np.signbit, FLOAT + [i32], (-2, 2)),
]

BINARY = [
    (np.add, ALL + [c128, f16, bf16], None), (np.subtract, NUM + [c128, bf16], None),
    (np.multiply, ALL + [c128, f16], None), (np.true_divide, FLOAT + [i32, c128], In((), low=0.5, high=3)),
    (np.floor_divide, [f32, f64, i32, i64], In((), low=1, high=4)),
    (np.remainder, [f32, f64, i32, i64], In((), low=1, high=4)),
    (np.fmod, [f32, f64, i32], In((), low=1, high=4)),
    (np.power, FLOAT + [i64], In((), low=0, high=3)),
    (np.maximum, ALL + [f16], None), (np.minimum, ALL, None), (np.fmax, FLOAT, None),
    (np.fmin, FLOAT, None), (np.arctan2, FLOAT, None), (np.hypot, FLOAT, None),
    (np.copysign, FLOAT, None), (np.logaddexp, FLOAT, None),
    (np.bitwise_and, [i32, i64, b_], None), (np.bitwise_or, [i32, i64, b_], None),
    (np.bitwise_xor, [i32, i64, b_], None), (np.left_shift, [i32, i64], In((), low=0, high=4)),
    (np.right_shift, [i32, i64], In((), low=0, high=4)),
    (np.logical_and, ALL, None), (np.logical_or, ALL, None), (np.logical_xor, ALL, None),
    (np.equal, ALL, None), (np.not_equal, ALL, None), (np.less, NUM, None),
    (np.less_equal, NUM, None), (np.greater, NUM, None), (np.greater_equal, NUM, None),
]


def _binary_shapes(second):
    if second is None:
        return B_SHAPES
    return [(a, dataclasses.replace(second, shape=b)) for a, b in B_SHAPES]


ROWS = [op(f"np.{uf.__name__}", uf, U_SHAPES, dts, low=lo, high=hi) for uf, dts, (lo, hi) in UNARY]
ROWS += [op(f"np.{uf.__name__}", uf, _binary_shapes(second), dts, low=-3, high=3)
         for uf, dts, second in BINARY]

R3 = [(2, 3, 4)]
ROWS += [
    # operators, weak Python scalars (NEP 50), mixed dtypes
    op("ndarray.__add__ ndarray.__radd__", lambda x: 1 + x + 2, U_SHAPES, ALL[:-1] + [i8, u8, f16, bf16]),
    op("ndarray.__mul__", lambda x: x * 2.5, U_SHAPES, [f32, i32, i8, f16, bf16, c64]),
    op("ndarray.__truediv__ ndarray.__rtruediv__", lambda x: (x / 3, 2 / (x + 5)), U_SHAPES, [f32, i32, f16], low=0, high=3),
    op("ndarray.__sub__ ndarray.__rsub__ ndarray.__neg__", lambda x: (x - 1, 1 - x, -x), U_SHAPES, NUM),
    op("ndarray.__pow__ ndarray.__rpow__", lambda x: (x ** 2, 2 ** x, x ** 0.5), U_SHAPES, [f32, f64, i64], low=0, high=3),
    op("ndarray.__floordiv__ ndarray.__mod__", lambda x: (x // 2, x % 3, -x // 2.0), U_SHAPES, NUM),
    op("ndarray.__lt__ ndarray.__le__ ndarray.__gt__ ndarray.__ge__ ndarray.__eq__ ndarray.__ne__",
       lambda x, y: (x < y, x <= 0.5, x > y, x >= 1, x == y, x != 0), B_SHAPES[:3], [f32, i32]),
    op("ndarray.__and__ ndarray.__or__ ndarray.__xor__ ndarray.__invert__",
       lambda x, y: (x & y, x | y, x ^ True, ~x), B_SHAPES[:3], [b_]),
    op("ndarray.__abs__", lambda x: abs(x), U_SHAPES, [f32, i32, c64]),
    op("ndarray.__divmod__ ndarray.__rdivmod__ builtins.round", lambda x: (round(x), round(x, 1), divmod(x, 2), divmod(7, x + 5)),
       U_SHAPES, [f32, f64, i64], low=0, high=4,      # NumPy arrays lack __round__; JAX arrays have it
       ref=lambda x: (np.round(x), np.round(x, 1), divmod(x, 2), divmod(7, x + 5))),
    op("np.add", lambda x, y: x + y, [((2, 3), In((2, 3), i32)), ((3,), In((3,), f32))], [f16, f32, i64]),
    op("np.multiply", lambda x, y: x * y, [((3,), In((3,), f32))], [i8, u8, f16, bf16, b_]),
    op("np.add", lambda x: x + np.float32(2.0), U_SHAPES, [f64, f16, i32, i64]),
    op("np.subtract", lambda x: np.subtract(x, np.arange(3)), [(2, 3)], [f32, i32, u8]),
    op("np.add", lambda x: np.add(x, 1, dtype=np.float32), [(2, 3)], [i32, f64]),
    # where / clip / composites
    op("np.where", lambda c, x, y: np.where(c, x, y), [(In((2, 3), b_), (2, 3), (2, 3)),
                                                      (In((3,), b_), (2, 3), ()), (In((), b_), (3,), (2, 1))], ALL),
    op("np.where", lambda c, x: np.where(c > 0, x, 0.5), [((2, 3), (2, 3))], [f32, i32]),
    op("np.clip", lambda x: np.clip(x, -1, 1), U_SHAPES, NUM + [f16]),
    op("np.clip", lambda x, lo: np.clip(x, lo, 1.5), [((2, 3), (3,))], FLOAT),
    op("ndarray.clip", lambda x: (x.clip(0), x.clip(max=1), x.clip(-1, 1)), U_SHAPES, [f32, i32]),
    op("np.round np.around", lambda x: (np.round(x), np.round(x, 2), np.around(x, 1)), U_SHAPES, [f32, f64, i32]),
    op("ndarray.round", lambda x: x.round(1), U_SHAPES, FLOAT),
    op("np.real np.imag np.conj", lambda x: (np.real(x), np.imag(x), np.conj(x)), U_SHAPES, [c64, c128, f32]),
    op("ndarray.real ndarray.imag ndarray.conj", lambda x: (x.real, x.imag, x.conj()), U_SHAPES, [c128, f64]),
    op("np.abs", lambda x: np.abs(x), U_SHAPES, [f32, i64, c128]),
    op("np.nan_to_num", lambda x: np.nan_to_num(np.log(x)), U_SHAPES, FLOAT, low=-1, high=2),
    op("np.isclose", lambda x, y: np.isclose(x, y, atol=0.5), B_SHAPES, FLOAT),
    op("spmd.numpy.rsqrt", snp.rsqrt, U_SHAPES, FLOAT_ALL, low=0.5, high=3, ref=lambda x: 1 / np.sqrt(x)),
    op("spmd.numpy.softmax", lambda x: snp.softmax(x, axis=-1), [(5,), (2, 3)], FLOAT_ALL,
       ref=lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)),
    op("spmd.numpy.layer_norm", lambda x: snp.layer_norm(x, axis=-1), [(5,), (2, 3)], FLOAT, tol=1e-4,
       ref=lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)),
    op("spmd.numpy.logsumexp", lambda x: (snp.logsumexp(x), snp.logsumexp(x, axis=-1, keepdims=True)),
       [(5,), (2, 3)], FLOAT_ALL,
       ref=lambda x: (np.log(np.exp(x).sum()), np.log(np.exp(x).sum(-1, keepdims=True)))),
    # reductions
    op("np.sum ndarray.sum", lambda x: (np.sum(x), x.sum(0), np.sum(x, axis=(0, 2)), x.sum(-1, keepdims=True)),
       R3, ALL + [u8, i8, f16, bf16, c64]),
    op("np.sum", lambda x: (np.sum(x), np.sum(x, keepdims=True)), [()], ALL),
    op("np.sum", lambda x: (np.sum(x, dtype=np.float32), np.sum(x, axis=1, initial=1.0)), R3, [i32, f64]),
    op("np.mean ndarray.mean", lambda x: (np.mean(x), x.mean(1), np.mean(x, axis=(0, -1), keepdims=True)),
       R3, [f32, f64, i32, f16, bf16, b_, c128]),
    op("np.prod ndarray.prod", lambda x: (np.prod(x), x.prod(-1)), R3, [f32, f64, i32, b_], low=0.5, high=1.5),
    op("np.max ndarray.max np.amax", lambda x: (np.max(x), x.max(0), np.amax(x, axis=(1, 2), keepdims=True)),
       R3, ALL + [f16, bf16]),
    op("np.max np.min", lambda x: (np.max(x), np.min(x, keepdims=True), x.max(axis=())), [()], ALL),
    op("np.min ndarray.min np.amin", lambda x: (np.min(x), x.min(-1, keepdims=True), np.amin(x, 1)),
       R3, ALL + [f16]),
    op("np.argmax ndarray.argmax", lambda x: (np.argmax(x), x.argmax(1), np.argmax(x, -1, keepdims=True)),
       R3, NUM + [b_, f16]),
    op("np.argmin ndarray.argmin", lambda x: (np.argmin(x), x.argmin(0), np.argmin(x, axis=2)), R3, NUM),
    op("np.var ndarray.var", lambda x: (np.var(x), x.var(0), np.var(x, axis=-1, ddof=1, keepdims=True)),
       R3, [f32, f64, i32, c128]),
    op("np.std ndarray.std", lambda x: (np.std(x), x.std(1), np.std(x, axis=(0, 1), keepdims=True)),
       R3, [f32, f64, i64]),
    op("np.sum np.mean np.max np.min np.prod np.all np.var np.std",
       lambda x, m: (np.sum(x, where=m), np.mean(x, axis=1, where=m), np.max(x, axis=0, where=m, initial=-5),
                     np.min(x, where=m[0], initial=9), np.prod(x, 1, where=m, keepdims=True), np.all(x > 0, where=m),
                     np.var(x, axis=1, where=m, ddof=1), np.std(x, where=m), np.var(x, 0, mean=np.mean(x, 0, keepdims=True))),
       [((3, 4), In((3, 4), b_))], [f32, f64, i32]),
    op("np.all np.any ndarray.all ndarray.any",
       lambda x: (np.all(x), np.any(x, 0), x.all(-1), x.any(axis=(1, 2), keepdims=True)), R3, ALL),
    op("np.cumsum ndarray.cumsum", lambda x: (np.cumsum(x), np.cumsum(x, 0), x.cumsum(-1)), R3, ALL + [i8]),
    op("np.cumprod ndarray.cumprod", lambda x: (np.cumprod(x, axis=1), x.cumprod(-1)), R3, [f32, f64, i32],
       low=0.5, high=1.5),
    op("np.add.reduce np.maximum.reduce np.add.accumulate",
       lambda x: (np.add.reduce(x), np.maximum.reduce(x, axis=-1), np.add.accumulate(x, axis=1)), R3, NUM),
    op("np.sort", lambda x: (np.sort(x), np.sort(x, axis=0), np.sort(x, axis=None)), R3, NUM + [b_]),
    op("np.argsort ndarray.argsort", lambda x: (np.argsort(x), x.argsort(0)), R3, [f32, f64]),
    # contraction
    op("np.matmul ndarray.__matmul__", lambda x, y: (np.matmul(x, y), x @ y),
       [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,)),
        ((2, 1, 3, 4), (5, 4, 2))], NUM + [c128, f16]),
    op("np.matmul", lambda x, y: x @ y, [((3, 4), In((4, 2), i32)), ((2, 4), In((4,), f32))], [f32, i64]),
    op("np.dot ndarray.dot", lambda x, y: (np.dot(x, y), x.dot(y)),
       [((3, 4), (4, 5)), ((4,), (4,)), ((), (3,)), ((2, 3, 4), (5, 4, 2))], NUM),
    op("np.tensordot", lambda x, y: (np.tensordot(x, y, 1), np.tensordot(x, y, axes=([0], [1]))),
       [((3, 4), (4, 3))], NUM),
    op("np.tensordot", lambda x, y: np.tensordot(x, y), [((2, 3, 4), (3, 4, 5))], FLOAT),
    op("np.inner np.outer np.vdot", lambda x, y: (np.inner(x, y), np.outer(x, y), np.vdot(x, y)),
       [((4,), (4,))], NUM + [c128]),
    op("np.einsum", lambda x, y: (np.einsum("ij,jk->ik", x, y), np.einsum("ij,jk", x, y),
                                  np.einsum("ij,jk->k", x, y), np.einsum("ij,kj->jik", x, y.T)),
       [((3, 4), (4, 5))], NUM),
    op("np.einsum", lambda q, k: np.einsum("bhqd,bhkd->bhqk", q, k), [((2, 2, 3, 4), (2, 2, 5, 4))], FLOAT),
    op("np.einsum", lambda x: (np.einsum("ij->ji", x), np.einsum("ij->", x), np.einsum("ii->i", x),
                               np.einsum("ii", x), np.einsum("...j->j...", x)), [(3, 3)], NUM),
    op("np.einsum", lambda x, y, z: np.einsum("ij,jk,kl->il", x, y, z), [((2, 3), (3, 4), (4, 2))], FLOAT),
    op("np.einsum", lambda x, y: (np.einsum("...ij,...jk->...ik", x, y), np.einsum(x, [Ellipsis, 0, 1], y, [Ellipsis, 1, 2]),
                                  np.einsum(x, [0, 1, 2], y, [0, 2, 3], [3, 1])), [((2, 3, 4), (2, 4, 5))], FLOAT),
    # shapes
    op("np.reshape ndarray.reshape", lambda x: (np.reshape(x, (4, -1)), x.reshape(2, 12), x.reshape(-1)), R3, ALL),
    op("np.ravel ndarray.ravel ndarray.flatten", lambda x: (np.ravel(x), x.ravel(), x.flatten()), R3 + [()], ALL),
    op("np.transpose ndarray.transpose ndarray.T",
       lambda x: (np.transpose(x), x.transpose(1, 0, 2), x.transpose((2, 0, 1)), x.T, np.transpose(x, (-1, 0, 1))),
       R3, ALL),
    op("ndarray.mT", lambda x: x.mT, R3, FLOAT),
    op("np.swapaxes ndarray.swapaxes", lambda x: (np.swapaxes(x, 0, -1), x.swapaxes(1, 2)), R3, ALL),
    op("np.moveaxis", lambda x: (np.moveaxis(x, 0, -1), np.moveaxis(x, [0, 1], [-1, 0])), R3, ALL),
    op("np.expand_dims", lambda x: (np.expand_dims(x, 0), np.expand_dims(x, -1), np.expand_dims(x, (0, -1))),
       [(), (3,), (2, 3)], ALL),
    op("np.squeeze ndarray.squeeze", lambda x: (np.squeeze(x), x.squeeze(0), np.squeeze(x, axis=-1)),
       [(1, 3, 1)], ALL),
    op("np.broadcast_to", lambda x: np.broadcast_to(x, (2, 3, 4)), [(), (4,), (3, 1), (2, 3, 4)], ALL),
    op("np.broadcast_arrays", lambda x, y: np.broadcast_arrays(x, y), B_SHAPES, FLOAT),
    op("np.atleast_1d np.atleast_2d np.atleast_3d", lambda x: (np.atleast_1d(x), np.atleast_2d(x), np.atleast_3d(x)),
       [(), (3,), (2, 3)], FLOAT),
    op("np.concatenate", lambda x, y: (np.concatenate([x, y]), np.concatenate((x, y, x), axis=-1),
                                       np.concatenate([x, y], axis=None)), [((2, 3), (2, 3))], ALL),
    op("np.concatenate", lambda x, y: np.concatenate([x, y], axis=1), [((2, 3), In((2, 1), i32))], [f32, i64]),
    op("np.concatenate", lambda x: np.concatenate([x, np.zeros((1, 3), np.float32)]), [(2, 3)], [f32, f64, i32]),
    op("np.stack", lambda x, y: (np.stack([x, y]), np.stack([x, y], axis=-1), np.stack((x, y, x), -2)),
       [((2, 3), (2, 3)), ((3,), (3,))], ALL),
    op("np.stack", lambda x, y: (np.stack([x, y]), np.stack([x, y], axis=-1)), [((), ())], ALL),
    op("np.hstack np.vstack np.dstack np.column_stack",
       lambda x, y: (np.hstack([x, y]), np.vstack([x, y]), np.dstack([x, y]), np.column_stack([x, y])),
       [((2, 3), (2, 3)), ((3,), (3,))], FLOAT),
    op("np.split np.array_split", lambda x: (np.split(x, 2), np.split(x, [1, 3], axis=-1),
                                             np.array_split(x, 3, axis=2), np.split(x, 4, axis=2)), R3, ALL),
    op("np.flip", lambda x: (np.flip(x), np.flip(x, 0), np.flip(x, (1, 2))), R3, ALL),
    op("np.fliplr np.flipud", lambda x: (np.fliplr(x), np.flipud(x)), [(2, 3)], FLOAT),
    op("np.roll", lambda x: (np.roll(x, 1), np.roll(x, -2, axis=2), np.roll(x, 5, 1), np.roll(x, (1, 2), (0, 2))),
       R3, ALL),
    op("np.pad", lambda x: (np.pad(x, 1), np.pad(x, ((0, 1), (2, 0)), constant_values=3), np.pad(x, (1, 2))),
       [(2, 3)], ALL),
    op("np.pad", lambda x: (np.pad(x, 2, mode="edge"), np.pad(x, ((1, 2), (0, 3)), mode="reflect"),
                            np.pad(x, (1, 2), mode="symmetric"), np.pad(x, ((2, 0), (1, 1)), mode="wrap"),
                            np.pad(x, ((1, 2), (0, 1)), constant_values=((-1, -2), (-3, -4)))), [(2, 3)], ALL),
    op("np.take", lambda x, i: (np.take(x, i, axis=1, mode="wrap"), np.take(x, i, mode="clip"), x.take(i, 0, mode="clip")),
       [((3, 4), In((5,), i64, -9, 9))], [f32, i32]),
    op("np.take", lambda x: (np.take(x, np.array([-7, 2, 9]), axis=1, mode="wrap"), np.take(x, [-7, 9], mode="clip")),
       [(3, 4)], [f32]),
    op("np.tile", lambda x: (np.tile(x, 2), np.tile(x, (2, 1)), np.tile(x, (2, 1, 2))), [(3,), (2, 3)], ALL),
    op("np.repeat ndarray.repeat", lambda x: (np.repeat(x, 2), np.repeat(x, 3, axis=-1), x.repeat(2, 0)),
       [(2, 3)], ALL),
    op("np.tril np.triu", lambda x: (np.tril(x), np.triu(x), np.tril(x, -1), np.triu(x, 1)),
       [(3, 3), (2, 3, 4)], ALL),
    op("np.diff", lambda x: (np.diff(x), np.diff(x, axis=0), np.diff(x, n=2)), [(3, 4)], NUM),
    op("np.trace", lambda x: (np.trace(x), np.trace(x, 1)), [(3, 3), (3, 4)], NUM),
    op("np.diagonal np.diag", lambda x: (np.diagonal(x), np.diag(x), np.diag(x, -1)), [(3, 4)], NUM),
    op("np.linalg.norm", lambda x: (np.linalg.norm(x), np.linalg.norm(x, axis=-1), np.linalg.norm(x, axis=0, keepdims=True)),
       [(3, 4)], FLOAT + [c128]),
    # indexing
    op("ndarray.__getitem__",
       lambda x: (x[1], x[-1], x[0, 2], x[:, 1:3], x[::-1], x[..., -1], x[None], x[:, None, 1], x[1, ..., ::2],
                  x[-3:], x[:, -1::-2]),
       [(3, 4)], ALL),
    op("ndarray.__getitem__", lambda x: (x[()], x[None], x[...]), [()], FLOAT),
    op("ndarray.__getitem__", lambda x, i: (x[i], x[:, i], x[i, 1], x[1:, i]), [((4, 5), In((3,), i64, -4, 4)),
                                                                                 ((4, 5), In((2, 2), i32, -4, 4)),
                                                                                 ((4, 5), In((), i64, -4, 4))], FLOAT + [i32]),
    op("ndarray.__getitem__", lambda x, i, j: (x[i, j], x[i, :, j], x[:, i, j], x[i, 0, j]),
       [((4, 4, 4), In((3,), i64, -4, 4), In((3,), i64, -4, 4)),
        ((4, 4, 4), In((2, 1), i64, 0, 4), In((3,), i32, 0, 4))], FLOAT),
    op("ndarray.__getitem__", lambda x: (x[np.array([0, 2, 2])], x[[1, 0]], x[:, [-1]], x[[0, 1], [2, 3]]),
       [(3, 4)], FLOAT),
    op("np.take ndarray.take", lambda x, i: (np.take(x, i, axis=0), np.take(x, i, axis=-1), np.take(x, i), x.take(i, 1)),
       [((4, 5), In((3,), i64, -4, 4)), ((4, 5), In((2, 3), i32, 0, 4))], FLOAT + [i32, b_]),
    op("np.take_along_axis", lambda x, i: (np.take_along_axis(x, i, axis=1), np.take_along_axis(x, i[:, :1], axis=0)),
       [((3, 4), In((3, 2), i64, -3, 3))], FLOAT + [i32]),
    op("np.take_along_axis", lambda x: np.take_along_axis(x, np.argsort(x, axis=-1), axis=-1), R3, FLOAT),
    # creation, constants, casts
    op("np.zeros_like np.ones_like np.full_like",
       lambda x: (np.zeros_like(x), np.ones_like(x, dtype=np.int32), np.full_like(x, 7), np.full_like(x, 2.5, np.float32),
                  np.zeros_like(x, shape=(2,))),
       U_SHAPES, ALL),
    op("np.empty_like", lambda x: np.empty_like(x) * 0 + x, U_SHAPES, FLOAT),
    op("constants", lambda x: (x + np.arange(3), x * np.linspace(0, 1, 3), x @ np.eye(3)),
       [(2, 3)], [f32, f64, i32]),
    op("ndarray.astype np.astype", lambda x: (x.astype(np.float32), x.astype(np.int32), x.astype(bool),
                                              np.astype(x, np.float16), x.astype(ml_dtypes.bfloat16)),
       U_SHAPES, ALL + [f16, bf16], low=-100, high=100),
    op("np.copy ndarray.copy", lambda x: (np.copy(x), x.copy()), U_SHAPES, ALL),
    # composite ufuncs and gufuncs
    op("np.deg2rad np.radians np.rad2deg np.degrees np.fabs",
       lambda x: (np.deg2rad(x), np.radians(x), np.rad2deg(x), np.degrees(x), np.fabs(x)), U_SHAPES, [f32, f64, i32]),
    op("np.logaddexp2", np.logaddexp2, B_SHAPES, FLOAT, low=-3, high=3),
    op("np.float_power", np.float_power, [((2, 3), (2, 3)), ((), (3,))], [f32, f64, i32], low=0.5, high=3),
    op("np.heaviside", lambda x, h: np.heaviside(np.round(x), h), B_SHAPES, FLOAT),
    op("np.divmod", lambda x, y: np.divmod(x, y), _binary_shapes(In((), low=1, high=4)), [f32, f64, i32, i64]),
    op("np.vecdot np.matvec np.vecmat", lambda a, v: (np.vecdot(a, v), np.matvec(a, v), np.vecmat(v, a)),
       [((3, 3), (3,)), ((2, 4, 4), (4,))], [f32, f64, i32, c128]),
    op("np.vecdot", lambda a, b: np.vecdot(a, b, axis=0), [((3, 2), (3, 1))], FLOAT),
    # array-API names and more of NumPy
    op("np.concat np.permute_dims np.matrix_transpose np.unstack",
       lambda x, y: (np.concat([x, y], axis=-1), np.permute_dims(x, (2, 0, 1)), np.matrix_transpose(x), np.unstack(y, axis=1)),
       [((2, 3, 4), (2, 3, 4))], ALL),
    op("np.cumulative_sum np.cumulative_prod",
       lambda x: (np.cumulative_sum(x, axis=0), np.cumulative_sum(x, axis=-1, include_initial=True),
                  np.cumulative_prod(x, axis=1, include_initial=True)), R3, [f32, f64, i32, b_], low=0.5, high=1.5),
    op("np.cumulative_sum", lambda x: np.cumulative_sum(x), [(5,)], [f32, i32]),
    op("np.isneginf np.isposinf", lambda x: (np.isneginf(np.log(x)), np.isposinf(1 / x)), U_SHAPES, FLOAT, low=-1, high=1),
    op("np.ptp np.count_nonzero", lambda x: (np.ptp(x), np.ptp(x, axis=1), np.count_nonzero(x), np.count_nonzero(x, axis=-1)),
       R3, [f32, f64, i32], low=-1, high=2),
    op("np.nansum np.nanprod np.nanmax np.nanmin np.nanmean",
       lambda x: (np.nansum(np.log(x)), np.nanprod(np.sqrt(x), axis=0), np.nanmax(np.log(x), axis=-1),
                  np.nanmin(np.sqrt(x), 1), np.nanmean(np.log(x), axis=(0, 2), keepdims=True)), R3, FLOAT, low=-1, high=3),
    op("np.nanmax np.nanmin", lambda x: (np.nanmax(np.log(x), 0), np.nanmin(np.log(x), 0)), [(2, 3)], FLOAT, low=-2, high=-1),
    op("np.nansum np.nanmax", lambda x: (np.nansum(x, 0), np.nanmax(x), np.nanmean(x)), [(2, 3)], [i32, i64]),
    op("np.average", lambda x, w: (np.average(x), np.average(x, axis=1, weights=w), np.average(x, 1, w, keepdims=True),
                                   np.average(x, axis=-1, weights=w, returned=True)),
       [((2, 3), (3,))], [f32, f64, i32], low=1, high=3),
    op("np.average", lambda x, w: np.average(x, axis=0, weights=w), [((2, 3), (2, 3))], [f32, f64], low=1, high=3),
    op("np.median", lambda x: (np.median(x), np.median(x, axis=0), np.median(x, axis=-1, keepdims=True),
                               np.median(x, keepdims=True)), [(3, 4), (2, 5)], [f32, f64, i32]),
    op("np.quantile np.percentile", lambda x: (np.quantile(x, 0.3), np.quantile(x, [0.25, 0.5, 0.9], axis=1),
                                               np.percentile(x, 75, axis=0, keepdims=True), np.quantile(x, 0.5, keepdims=True)),
       [(3, 4), (2, 5)], [f32, f64, i32], tol=1e-6),     # NumPy interpolates float32 data partly in float32
    op("np.select", lambda x: np.select([x < -1, x > 1], [x, 2 * x], -x), U_SHAPES, [f32, f64, i32]),
    op("np.searchsorted ndarray.searchsorted", lambda a, v: (np.searchsorted(np.sort(a), v), np.sort(a).searchsorted(v, "right")),
       [((5,), (3,)), ((4,), ()), ((6,), (2, 3))], [f32, i32]),
    op("np.append", lambda x, y: (np.append(x, y), np.append(x, y, axis=0)), [((2, 3), (1, 3))], ALL),
    op("np.rot90", lambda x: (np.rot90(x), np.rot90(x, 2), np.rot90(x, 3), np.rot90(x, -1, axes=(1, 2)), np.rot90(x, 4)),
       R3, [f32, i32]),
    op("np.sinc", np.sinc, U_SHAPES, FLOAT),
    op("np.sinc", lambda x: np.sinc(x * 0), [(3,)], FLOAT),
    op("np.meshgrid", lambda x, y: (np.meshgrid(x, y), np.meshgrid(x, y, indexing="ij"), np.meshgrid(x, y, sparse=True)),
       [((3,), (4,))], [f32, i32]),
    op("np.kron", np.kron, [((2, 3), (3, 2)), ((2,), (3,)), ((2, 2), (3,))], NUM),
    op("np.cross", lambda a, b: (np.cross(a, b), np.cross(a.T, b.T, axis=0)), [((4, 3), (4, 3)), ((4, 3), (3,))], NUM),
    op("np.linalg.norm", lambda x: (np.linalg.norm(x, 1), np.linalg.norm(x, np.inf), np.linalg.norm(x, -np.inf),
                                    np.linalg.norm(x, -1, keepdims=True), np.linalg.norm(x, "fro"),
                                    np.linalg.norm(x, 3, axis=1), np.linalg.norm(x, 0, axis=0), np.linalg.norm(x, 1, axis=(1, 0))),
       [(3, 4)], [f32, f64, i32, c128]),
    op("np.linalg.vector_norm np.linalg.matrix_norm",
       lambda x: (np.linalg.vector_norm(x), np.linalg.vector_norm(x, axis=-1, ord=1), np.linalg.matrix_norm(x),
                  np.linalg.matrix_norm(x, ord=np.inf, keepdims=True)), [(2, 3, 4)], [f32, f64, i64]),
    op("ndarray.diagonal ndarray.trace", lambda x: (x.diagonal(), x.diagonal(1), x.trace(), x.trace(-1)), [(3, 4)], NUM),
    op("spmd.numpy", lambda x: _namespace_ops(x.__array_namespace__(), x), [(2, 3)], [f32, f64, i32],
       ref=lambda x: _namespace_ops(np, x)),
    op("np.maximum.accumulate np.minimum.accumulate",
       lambda x: (np.maximum.accumulate(x, axis=1), np.minimum.accumulate(x, axis=-1)), R3, NUM),
]


def _namespace_ops(xp, x):
    """Array-API style code: the namespace is spmd.numpy for traced values, NumPy for the oracle."""
    y = xp.astype(x, xp.float32)
    return (xp.acos(xp.tanh(y)), xp.concat([y, xp.exp(y)], axis=-1), xp.linalg.vector_norm(y, axis=-1),
            xp.max(x, axis=0), xp.argmax(x, axis=1), xp.permute_dims(x, (1, 0)), xp.pow(y, 2),
            xp.cumulative_sum(x, axis=1), xp.where(x > 0, x, 0), xp.abs(x), xp.matmul(y, xp.matrix_transpose(y)))


def _np_dynamic_slice(x, s, size):
    s = int(np.clip(s, 0, x.shape[0] - size))
    return x[s:s + size]


def _np_dynamic_update_slice(x, u, s):
    s, out = int(np.clip(s, 0, x.shape[0] - u.shape[0])), x.copy()
    out[s:s + u.shape[0]] = u
    return out


def _np_threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32, 20 rounds, in wrapping uint32 arithmetic (Salmon et al. 2011)."""
    rotl = lambda v, r: (v << np.uint32(r)) | (v >> np.uint32(32 - r))
    k1, k2, x1, x2 = np.broadcast_arrays(*[np.asarray(a, np.uint32) for a in (k1, k2, x1, x2)])
    ks = [k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA)]
    a, b = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
            a = a + b
            b = a ^ rotl(b, r)
        a, b = a + ks[(i + 1) % 3], b + ks[(i + 2) % 3] + np.uint32(i + 1)
    return a, b


def _np_scatter_add(x, i, u, axis):
    out = x.copy()
    np.add.at(out, (slice(None),) * axis + (i,), u)
    return out


# Primitives no NumPy function above reaches (autodiff and vmap use them), bound directly.
ROWS += [
    op("prims.logistic", lambda x: prims.logistic_p(x), U_SHAPES, FLOAT_ALL, ref=lambda x: 1 / (1 + np.exp(-x))),
    op("prims.sharding_constraint", lambda x: spmd.with_sharding_constraint(x, spmd.NamedSharding(MESH, P())),
       [(2, 3)], [f32, i32], ref=lambda x: x),
    op("prims.iota", lambda x: x + prims.iota_p(dtype=x.dtype, shape=x.shape, dimension=1), [(2, 3)], [f32, i32],
       ref=lambda x: x + np.arange(3, dtype=x.dtype)),
    op("prims.cumsum", lambda x: (prims.cumsum_p(x, axis=1, reverse=True), prims.cummax_p(x, axis=0, reverse=True)), R3, NUM,
       ref=lambda x: (np.flip(np.cumsum(np.flip(x, 1), 1, dtype=x.dtype), 1),
                      np.flip(np.maximum.accumulate(np.flip(x, 0), 0), 0))),
    op("prims.dynamic_slice", lambda x, s: prims.dynamic_slice_p(x, s, sizes=(3,)),
       [((6,), In((), i64, -2, 7)), ((5,), In((), i32, 0, 3))], [f32, i32], ref=lambda x, s: _np_dynamic_slice(x, s, 3)),
    op("prims.dynamic_slice", lambda x, s, t: prims.dynamic_slice_p(x, s, t, sizes=(2, 3)),
       [((4, 5), In((), i64, -1, 4), In((), i64, 0, 3))], FLOAT,
       ref=lambda x, s, t: _np_dynamic_slice(_np_dynamic_slice(x, s, 2).T, t, 3).T),
    op("prims.dynamic_update_slice", lambda x, u, s: prims.dynamic_update_slice_p(x, u, s),
       [((6,), (2,), In((), i64, -1, 7)), ((5, 2), (3, 2), In((), i32, 0, 3))], [f32, i32],
       ref=_np_dynamic_update_slice),
    op("prims.scatter_add", lambda x, i, u: prims.scatter_add_p(x, i, u, axis=0),
       [((5,), In((4,), i64, -5, 5), (4,)), ((4, 3), In((2, 2), i64, 0, 4), (2, 2, 3))], [f32, f64, i32],
       ref=lambda x, i, u: _np_scatter_add(x, i, u, 0)),
    op("prims.scatter_add", lambda x, i, u: prims.scatter_add_p(x, i, u, axis=1),
       [((2, 5), In((3,), i64, 0, 5), (2, 3))], FLOAT, ref=lambda x, i, u: _np_scatter_add(x, i, u, 1)),
    op("prims.stop_gradient", lambda x: prims.stop_gradient_p(x), U_SHAPES, ALL, ref=lambda x: x),
    op("prims.bitcast_convert_type", lambda x: prims.bitcast_convert_type_p(x, dtype=np.dtype(np.uint32)), U_SHAPES,
       [f32, i32], ref=lambda x: x.view(np.uint32)),
    op("prims.threefry2x32", lambda k1, k2, x1, x2: tuple(prims.threefry2x32_p(k1, k2, x1, x2)),
       [((), (), (5,), (5,)), ((2, 3), (2, 3), (2, 3), (2, 3)), ((), (3,), (2, 3), (1, 3))],
       [np.dtype(np.uint32)], low=0, high=2 ** 32 - 1, ref=lambda *a: _np_threefry2x32(*a)),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}-{r.id}" for i, r in enumerate(ROWS)])
def test_op(row):
    run_row(row)


PROMOTION_DTYPES = [b_, i8, u8, np.dtype(np.int16), i32, i64, np.dtype(np.uint32), f16, bf16, f32, f64, c64, c128]
PROMOTION_UFUNCS = [np.add, np.subtract, np.multiply, np.true_divide, np.floor_divide, np.remainder, np.power,
                    np.maximum, np.fmin, np.equal, np.less, np.logical_and, np.logical_xor, np.bitwise_and,
                    np.arctan2, np.hypot, np.logaddexp, np.left_shift, np.copysign, np.heaviside, np.float_power]
UNARY_PROMOTION = [np.negative, np.exp, np.sqrt, np.absolute, np.sign, np.square, np.reciprocal, np.floor,
                   np.invert, np.logical_not, np.isnan, np.signbit, np.conjugate, np.deg2rad, np.rint]


def _outcome(fn, *args):
    """The result dtype of ``fn(*args)``, or "refused" when it raises a TypeError/OverflowError."""
    try:
        with np.errstate(all="ignore"):
            return np.asarray(fn(*args)).dtype
    except (TypeError, OverflowError):
        return "refused"
    except ValueError:                         # value-dependent (int ** -1): no dtype rule to compare
        return None


@pytest.mark.parametrize("ufunc", PROMOTION_UFUNCS, ids=lambda u: u.__name__)
def test_dtype_promotion_matches_numpy(ufunc):
    """Every pair of dtypes, and every dtype with a weak Python scalar (NEP 50): spmd's traced
    result dtype equals NumPy's, and spmd refuses (TypeError) exactly what NumPy refuses."""
    operands = [np.ones(2, d) for d in PROMOTION_DTYPES] + [True, 3, 300, -1, 2.5, 1j]
    for x, y in itertools.product(operands, repeat=2):
        if not isinstance(x, np.ndarray) and not isinstance(y, np.ndarray):
            continue
        want = _outcome(ufunc, x, y)
        if want is None:
            continue
        def traced(*arrays):                   # the arrays are traced, Python scalars stay as they are
            it = iter(arrays)
            return ufunc(*[next(it) if isinstance(v, np.ndarray) else v for v in (x, y)])
        arrays = [v for v in (x, y) if isinstance(v, np.ndarray)]
        try:
            got = spmd.make_program(traced)(*arrays).out_avals[0].dtype
        except TypeError:
            got = "refused"
        what = f"np.{ufunc.__name__}({x!r:.30}, {y!r:.30})"
        assert got == want, f"{what}: spmd {got}, NumPy {want}"
        if got != "refused" and ufunc is not np.left_shift:       # shifting by 300 is undefined
            with np.errstate(all="ignore"):
                _compare(spmd.jit(traced)(*arrays), ufunc(x, y), None, what)


def test_unary_dtype_rules_match_numpy():
    for ufunc, dt in itertools.product(UNARY_PROMOTION, PROMOTION_DTYPES):
        want = _outcome(ufunc, np.ones(2, dt))
        try:
            got = spmd.make_program(ufunc)(np.ones(2, dt)).out_avals[0].dtype
        except TypeError:
            got = "refused"
        assert got == want, f"np.{ufunc.__name__}({dt}): spmd {got}, NumPy {want}"
        if got != "refused":
            with np.errstate(all="ignore"):
                _compare(spmd.jit(ufunc)(np.ones(2, dt)), ufunc(np.ones(2, dt)), None, f"np.{ufunc.__name__}({dt})")


def test_every_primitive_is_exercised():
    """Every local primitive of ``spmd.prims`` ran in some row (rows not run yet run here)."""
    for row in ROWS:
        if id(row) not in RAN:
            run_row(row)
    primitives = {v.name for v in vars(prims).values() if isinstance(v, spmd.Primitive)}
    assert primitives <= EXERCISED, sorted(primitives - EXERCISED)


def _resolve(name):
    if not name.startswith("np."):
        return None
    obj = np
    for part in name[3:].split("."):
        obj = getattr(obj, part)
    return obj


def test_numpy_coverage():
    """At least 80 distinct NumPy functions and ufuncs trace, each compared with NumPy above."""
    funcs = set()
    for row in ROWS:
        for name in row.names:
            f = _resolve(name)
            if f is None:
                continue
            if "." in name[3:] and isinstance(_resolve(name.rsplit(".", 1)[0]), np.ufunc):
                funcs.add(name)                       # ufunc methods: np.add.reduce
                continue
            dispatched = f in HANDLED_FUNCTIONS or f in _UFUNCS or f in _COMPOSITE_UFUNCS or f in _GUFUNCS
            assert dispatched, f"{name} is in the table but spmd has no rule for it"
            funcs.add(f)
    methods = {n for r in ROWS for n in r.names if n.startswith("ndarray.")}
    for m in methods:
        assert hasattr(Tracer, m.split(".")[1]), m
    assert len(funcs) >= 80, len(funcs)
    assert len(methods) >= 30, len(methods)


@pytest.mark.parametrize("lead,starts_shape,broadcast", [
    ((2, 4), (2, 1), False), ((2, 4), (1, 4), False), ((2, 4), (2, 4), False), ((1, 4), (2, 1), False),
    ((2, 4), (2, 1), True), ((3,), (3,), False), ((2, 1), (), False)])
def test_stacked_dynamic_slice_matches_per_device_slices(lead, starts_shape, broadcast):
    """The stacked dynamic_slice (one start per simulated device, as the compiler's R->S
    slices make): its plain-slice and broadcast-dim fast paths against slicing each device's
    block on its own."""
    rng = np.random.default_rng(len(lead) * 10 + len(starts_shape))
    k = len(lead)
    x = rng.normal(size=lead + (9, 5)).astype(np.float32)
    if broadcast:                                   # a broadcast dim (stride 0): a view comes back
        x = np.broadcast_to(x[..., :1, :], x.shape)
    starts = rng.integers(-2, 9, size=starts_shape)
    got = prims._dynamic_slice_impl(np, k, x, starts, np.int64(1), sizes=(4, 3))
    out_lead = np.broadcast_shapes(lead, np.shape(starts) if starts_shape else ())
    assert got.shape == out_lead + (4, 3)
    xs = np.broadcast_to(x, out_lead + x.shape[k:])
    ss = np.broadcast_to(np.asarray(starts).reshape(np.shape(starts) + (1,) * (k - len(starts_shape))), out_lead)
    for pos in np.ndindex(*out_lead):
        s = int(np.clip(ss[pos], 0, 9 - 4))
        np.testing.assert_array_equal(got[pos], xs[pos][s:s + 4, 1:4])


def test_take_along_axis_of_one_traced_index_per_row_is_jaxs_and_keeps_the_batch_split():
    """One traced index per row (a cross-entropy's target): JAX's values (a wrapped negative
    index, NaN for one out of range, as JAX's default ``fill`` mode) and gradient; compiled
    with the batch split over ``data``, no collective moves the logits."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 6)).astype(np.float32)
    idx = np.array([[0, 5, -1], [2, 6, -7], [1, 1, 1], [3, 4, -6]])[..., None]
    pick = lambda xp: lambda x, i: xp.take_along_axis(x, i, axis=-1)
    got = np.asarray(spmd.jit(pick(np))(x, idx))
    want = np.asarray(jax.jit(pick(jnp))(x, idx))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=0)
    ok = np.where(np.abs(idx) < 6, idx, 0)
    loss = lambda xp: lambda x, i: (xp.take_along_axis(x, i, axis=-1) ** 2).sum()
    g = np.asarray(spmd.jit(spmd.grad(loss(np)))(x, ok))
    np.testing.assert_allclose(g, np.asarray(jax.grad(loss(jnp))(x, ok)), rtol=1e-6)
    mesh = spmd.make_mesh((2, 4), ("data", "model"), (spmd.AxisType.Auto,) * 2)
    sharded = spmd.jit(pick(np), in_shardings=(spmd.NamedSharding(mesh, P("data")),) * 2,
                       out_shardings=spmd.NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(np.asarray(sharded(x, ok)), np.take_along_axis(x, ok, axis=-1))
    assert sharded.lower(x, ok).collectives() == []
