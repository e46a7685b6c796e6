"""A loop whose body is small array arithmetic, run as one call of C code made for it.

A ``scan`` of a small cell (an RNN step: a product of a few KiB, an addition, a ``tanh``) does
microseconds of arithmetic per step, but as NumPy calls each step costs half a microsecond per
call and more between them.  Here the step program that ``control_flow._Split`` leaves is
written as C, the loop over the steps included, and ``gcc`` builds it into a shared library
that runs the whole loop in one call:

- each value is a buffer of its static shape; each equation one loop nest over its result;
- views (a broadcast, a transpose, a slice, a reshape of a contiguous value) make no code, only
  strides for the loop nests that read them;
- a product is a loop nest that the compiler vectorises along the result's last dim; ``tanh``
  and ``exp`` of float32 are rational and polynomial approximations it can vectorise too
  (within a few ulps of NumPy's, as XLA's own are); other functions call the C library.

A body with anything else (a collective, a sub-program, a gather, an unsupported dtype) keeps
the NumPy loop.  The library is built with the plan of the program that holds the loop (``gcc``
takes about 0.07 s) and cached on disk under a hash of its source, the compiler's flags and the
CPU, so a later process loads it at once.  ``SPMD_NATIVE=0`` turns this off (every loop then runs as NumPy
calls); where no C compiler is found, loops run as NumPy calls and one warning says so.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import math
import os
import warnings

import numpy as np

from .. import _cbuild, _host_parallel
from ..core import Literal, Program
from . import profiling

ENV_VAR = "SPMD_NATIVE"
# -O2: vectorised, and faster than -O3 on these loops (0.47 against 0.77 us per RNN step);
# -fwrapv: integers wrap around on overflow, as NumPy's do
FLAGS = ("-O2", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fwrapv", "-fPIC",
         "-shared", "-std=c11")

# An elementwise chain is long flat loops: GCC's default cost model at -O2 leaves them scalar
# (a tanh and its derivative over 512 KiB: 500 us, against 86 us vectorised and 213 us as
# NumPy calls).
CHAIN_FLAGS = FLAGS + ("-fvect-cost-model=dynamic",)

_CTYPE = {np.dtype(t): c for t, c in [
    ("float32", "float"), ("float64", "double"), ("int8", "int8_t"), ("int16", "int16_t"),
    ("int32", "int32_t"), ("int64", "int64_t"), ("uint8", "uint8_t"), ("uint16", "uint16_t"),
    ("uint32", "uint32_t"), ("uint64", "uint64_t"), ("bool", "uint8_t")]}
_MAX_SCRATCH = 16 << 20          # bodies whose values take more run as NumPy calls
_MAX_LITERAL = 1 << 12           # array constants up to this many elements are written inline


class Unsupported(Exception):
    """The body has something this module does not write as C."""


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "off", "false", "no")


# ---------------------------------------------------------------------------------------------
# values in the generated code
# ---------------------------------------------------------------------------------------------

class _View:
    """An array in the generated code: ``ptr[offset + sum(i_d * strides[d])]`` (strides in
    elements), or the scalar C expression ``expr`` broadcast to ``shape`` (``ptr`` None)."""
    __slots__ = ("ptr", "offset", "shape", "strides", "dtype", "expr")

    def __init__(self, ptr, shape, dtype, strides=None, offset=0, expr=None):
        self.ptr, self.shape, self.dtype, self.offset, self.expr = ptr, tuple(shape), dtype, offset, expr
        self.strides = tuple(strides) if strides is not None else _contiguous(shape)

    def with_(self, shape, strides, offset=None):
        return _View(self.ptr, shape, self.dtype, strides,
                     self.offset if offset is None else offset, self.expr)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        return self.ptr is not None and all(
            s == c for n, s, c in zip(self.shape, self.strides, _contiguous(self.shape)) if n != 1)


def _contiguous(shape):
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def _broadcast(v: _View, shape) -> _View:
    """``v`` read as ``shape`` (NumPy's rule: dims aligned at the right, size 1 repeated)."""
    lead = len(shape) - len(v.shape)
    if lead < 0:
        raise Unsupported("broadcast to fewer dims")
    strides = [0] * lead + [0 if (n == 1 and m != 1) else s
                            for n, m, s in zip(v.shape, shape[lead:], v.strides)]
    return v.with_(shape, strides)


def _scalar_literal(value, dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        x = float(value)
        suffix = "f" if dtype == np.float32 else ""
        if math.isnan(x):
            return f"((({_CTYPE[dtype]})NAN))"
        if math.isinf(x):
            return f"(({_CTYPE[dtype]})({'-' if x < 0 else ''}INFINITY))"
        if dtype == np.float32:
            x = float(np.float32(x))
        return f"({x.hex()}{suffix})"
    if dtype.kind == "b":
        return "((uint8_t)1)" if bool(value) else "((uint8_t)0)"
    if dtype.kind in "iu":
        v = int(value)
        if dtype.itemsize == 8:
            return f"(({_CTYPE[dtype]}){v}{'ULL' if dtype.kind == 'u' else 'LL'})" \
                if v != -(1 << 63) else "INT64_MIN"
        return f"(({_CTYPE[dtype]}){v}LL)"
    raise Unsupported(f"a literal of dtype {dtype}")


_REDUCE = {   # a reduction's monoid -> (its identity for a dtype, the C statement adding {1} to {0})
    "sum": (lambda dt: 0, "{0} += {1}"),
    "prod": (lambda dt: 1, "{0} *= {1}"),
    "max": (lambda dt: -np.inf if dt.kind == "f" else np.iinfo(dt).min,
            "{0} = ({1} != {1} || {1} > {0}) ? {1} : {0}"),
    "min": (lambda dt: np.inf if dt.kind == "f" else np.iinfo(dt).max,
            "{0} = ({1} != {1} || {1} < {0}) ? {1} : {0}"),
    "and": (lambda dt: 1, "{0} = {0} & ({1} != 0)"),
    "or": (lambda dt: 0, "{0} = {0} | ({1} != 0)"),
}


# ---------------------------------------------------------------------------------------------
# the C library of one loop
# ---------------------------------------------------------------------------------------------

_PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the helpers below are always inlined: a call left in a loop keeps it scalar */

/* tanh of float32 as a rational function of x (odd numerator of degree 13 over an even
   denominator of degree 6), clamped where tanh rounds to +-1: branch-free, so loops over it
   vectorise.  Its coefficients are the minimax fit used by Eigen and XLA on the CPU. */
static inline __attribute__((always_inline)) float spmd_tanhf(float x) {
    const float c = 7.90531110763549805f;
    float y = x < -c ? -c : (x > c ? c : x);
    float z = y * y;
    float p = -2.76076847742355e-16f;
    p = p * z + 2.00018790482477e-13f;
    p = p * z + -8.60467152213735e-11f;
    p = p * z + 5.12229709037114e-08f;
    p = p * z + 1.48572235717979e-05f;
    p = p * z + 6.37261928875436e-04f;
    p = p * z + 4.89352455891786e-03f;
    p = p * y;
    float q = 1.19825839466702e-06f;
    q = q * z + 1.18534705686654e-04f;
    q = q * z + 2.26843463243900e-03f;
    q = q * z + 4.89352518554385e-03f;
    float r = p / q;
    r = (x < 0.0004f && x > -0.0004f) ? x : r;
    return x != x ? x : r;
}

/* x ** y, with the exponents 2 and 3 as products (as ``prims._power`` computes them): with a
   constant exponent the test folds away and the loop vectorises */
static inline __attribute__((always_inline)) float spmd_powf(float x, float y) {
    return y == 2.0f ? x * x : (y == 3.0f ? x * x * x : powf(x, y));
}
static inline __attribute__((always_inline)) double spmd_pow(double x, double y) {
    return y == 2.0 ? x * x : (y == 3.0 ? x * x * x : pow(x, y));
}

/* exp of float32: 2^n * exp(r) with n = round(x / ln 2) and |r| <= ln(2) / 2, exp(r) a
   polynomial of degree 7 (Cephes' coefficients), 2^n made from exponent bits: branch-free. */
static inline __attribute__((always_inline)) float spmd_expf(float x) {
    float y = x > 88.72283935546875f ? 88.72283935546875f : (x < -104.0f ? -104.0f : x);
    float n = floorf(y * 1.44269504088896341f + 0.5f);
    float r = y - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    /* 2^n in two halves, each a normal float (n runs from -150 to 128) */
    int32_t m = (int32_t)n, h = m >> 1;
    union { int32_t i; float f; } s1, s2;
    s1.i = (h + 127) << 23;
    s2.i = (m - h + 127) << 23;
    float e = p * s1.f * s2.f;
    e = x > 88.72283935546875f ? (float)INFINITY : e;
    e = x < -104.0f ? 0.0f : e;
    return x != x ? x : e;
}
"""


class _Writer:
    """The C function of one loop, written equation by equation."""

    def __init__(self):
        self.lines: list[str] = []       # the step
        self.before: list[str] = []      # before the loop
        self.statics: list[str] = []
        self.scratch = 0                 # bytes of scratch the step's values take
        self.temps: list[tuple[str, str, int]] = []     # (name, ctype, byte offset)
        self.counter = itertools.count()

    def temp(self, shape, dtype) -> _View:
        dtype = np.dtype(dtype)
        if dtype not in _CTYPE:
            raise Unsupported(f"dtype {dtype}")
        name = f"t{len(self.temps)}"
        self.scratch = -(-self.scratch // 64) * 64
        self.temps.append((name, _CTYPE[dtype], self.scratch))
        self.scratch += max(1, math.prod(shape)) * dtype.itemsize
        if self.scratch > _MAX_SCRATCH:
            raise Unsupported("values too large")
        return _View(name, shape, dtype)

    def literal(self, value, dtype) -> _View:
        dtype = np.dtype(dtype)
        if dtype not in _CTYPE:
            raise Unsupported(f"dtype {dtype}")
        arr = np.asarray(value, dtype)
        if arr.ndim == 0:
            return _View(None, (), dtype, (), expr=_scalar_literal(arr.item(), dtype))
        if arr.size > _MAX_LITERAL:
            raise Unsupported("a large array constant")
        name = f"L{len(self.statics)}"
        body = ", ".join(_scalar_literal(x, dtype) for x in arr.reshape(-1).tolist())
        self.statics.append(f"static const {_CTYPE[dtype]} {name}[{arr.size}] = {{{body}}};")
        return _View(name, arr.shape, dtype)

    def nest(self, dims, views, body):
        """Lines running ``body`` for every index of ``dims``: ``[(size, [stride of each of
        views])]``, outermost first.  ``body``: a C statement with ``{0}``, ``{1}``, ... for
        an element of each view, or a function of those elements' C expressions giving lines
        (the views' elements there are the first of a run of the innermost loop it writes)."""
        kept = []
        for n, st in dims:
            if n == 0:
                return
            if n == 1:
                continue
            if kept and all(p == q * n for p, q in zip(kept[-1][1], st)):
                kept[-1] = (kept[-1][0] * n, list(st))        # one flat dim: the same walk
                continue
            kept.append((n, list(st)))
        idx = [f"i{next(self.counter)}" for _ in kept]
        for i, (n, _) in zip(idx, kept):
            self.lines.append(f"for (long {i} = 0; {i} < {n}; {i}++) {{")
        refs = []
        for j, v in enumerate(views):
            if v.ptr is None:
                refs.append(v.expr)
                continue
            terms = [str(v.offset)] if v.offset else []
            terms += [i if st[j] == 1 else f"{i} * {st[j]}"
                      for i, (_, st) in zip(idx, kept) if st[j]]
            refs.append(f"{v.ptr}[{' + '.join(terms) or '0'}]")
        if callable(body):
            self.lines.extend(body(refs))
        else:
            self.lines.append(body.format(*refs) + ";")
        self.lines.extend("}" for _ in kept)

    def elementwise(self, dst: _View, expr: str, operands: list):
        """``dst = expr`` elementwise, ``expr`` of ``{0}``, ``{1}``, ...: ``operands`` (views,
        or unwritten elementwise values, whose expressions fold in where their shape is
        ``dst``'s)."""
        views = [dst]
        body = expr.format(*[self._expand(x, dst.shape, views) for x in operands])
        self.nest([(n, [v.strides[d] for v in views]) for d, n in enumerate(dst.shape)], views,
                  "{0} = " + f"({_CTYPE[dst.dtype]})" + body)

    def _expand(self, x, shape, views) -> str:
        if isinstance(x, _Lazy) and x.shape == shape:
            return "(" + x.expr.format(*[self._expand(a, shape, views) for a in x.operands]) + ")"
        views.append(_broadcast(self.value(x), shape))
        return f"{{{len(views) - 1}}}"

    def copy(self, dst: _View, src):
        self.elementwise(dst, "{0}", [src])

    def value(self, x) -> _View:
        """``x`` as a view: an unwritten elementwise value is written into a buffer first."""
        if isinstance(x, _Lazy):
            out = self.temp(x.shape, x.dtype)
            self.elementwise(out, x.expr, x.operands)
            return out
        return x

    def materialize(self, v) -> _View:
        """``v`` in a contiguous buffer of its own (copied before the loop where it reads only
        consts: the same at every step)."""
        v = self.value(v)
        if v.contiguous and v.offset == 0 and v.ptr.startswith("t"):
            return v
        out = self.temp(v.shape, v.dtype)
        if v.ptr is not None and v.ptr[0] in "kL":
            saved, self.lines = self.lines, self.before
            self.copy(out, v)
            self.lines = saved
        else:
            self.copy(out, v)
        return out

    # -- equations -----------------------------------------------------------------------------

    def ctype(self, dtype) -> str:
        dtype = np.dtype(dtype)
        if dtype not in _CTYPE:
            raise Unsupported(f"dtype {dtype}")
        return _CTYPE[dtype]

    def eqn(self, e, ins: list, single_use: bool) -> list:
        """The views of ``e``'s results: its primitive's ``c`` rule applied to ``ins``."""
        rule = e.prim.c
        if rule is None or e.prim.execute is not None or e.prim.multiple_results:
            raise Unsupported(e.prim.name)
        self.out_avals = [v.aval for v in e.outputs]
        if e.prim.category == "elementwise":
            dt, shape = np.dtype(self.out_avals[0].dtype), tuple(self.out_avals[0].shape)
            self.ctype(dt)
            expr = rule(self, [v.dtype for v in ins], dt)
            if expr is None:
                raise Unsupported(f"{e.prim.name} of {[str(v.dtype) for v in ins]}")
            if all(isinstance(v, _View) and v.ptr is None for v in ins):   # of constants
                return [_broadcast(_View(None, (), dt, (), expr=expr.format(*[v.expr for v in ins])),
                                   shape)]
            lazy = _Lazy(expr, ins, shape, dt)
            if single_use:              # written where it is read, in its reader's loop
                return [lazy]
            return [self.value(lazy)]
        return rule(self, *[self.value(v) for v in ins], **e.params)

    # -- the operations of the primitives' ``c`` rules ------------------------------------------

    def broadcast_in_dim(self, x: _View, shape, dims) -> _View:
        shape = tuple(shape)
        strides = [0] * len(shape)
        for i, d in enumerate(dims):
            if x.shape[i] == shape[d]:
                strides[d] = x.strides[i]
        return x.with_(shape, strides)

    def reshape(self, x: _View, shape) -> _View:
        shape = tuple(shape)
        if x.ptr is None:
            return x.with_(shape, (0,) * len(shape))
        if not x.contiguous:
            x = self.materialize(x)
        return x.with_(shape, _contiguous(shape))

    def transpose(self, x: _View, perm) -> _View:
        return x.with_(tuple(x.shape[q] for q in perm), tuple(x.strides[q] for q in perm))

    def slice(self, x: _View, index) -> _View:
        offset, shape, strides = x.offset, [], []
        for (a, b, c), s in zip(index, x.strides):
            picked = range(a, b, c)
            shape.append(len(picked))
            strides.append(s * c)
            offset += (picked[0] if len(picked) else 0) * s
        return x.with_(tuple(shape), tuple(strides), offset if x.ptr is not None else 0)

    def concatenate(self, xs, axis) -> _View:
        out = self.temp(tuple(self.out_avals[0].shape), self.out_avals[0].dtype)
        start = 0
        for v in xs:
            self.copy(out.with_(v.shape, out.strides, out.strides[axis] * start), v)
            start += v.shape[axis]
        return out

    def dot_general(self, a: _View, b: _View, contract, batch) -> _View:
        (ac, bc), (ab, bb) = contract, batch
        out_aval = self.out_avals[0]
        if a.dtype != b.dtype or np.dtype(out_aval.dtype) != a.dtype or a.dtype == np.bool_:
            raise Unsupported("a product of mixed dtypes")
        if a.ptr is None or b.ptr is None:
            raise Unsupported("a product of a constant")
        out = self.temp(tuple(out_aval.shape), out_aval.dtype)
        af = [i for i in range(len(a.shape)) if i not in ac + ab]
        bf = [j for j in range(len(b.shape)) if j not in bc + bb]
        run = math.prod(b.shape[j] for j in bf)           # the result's innermost run
        if bf and run > 1 and _contiguous([b.shape[j] for j in bf]) != tuple(b.strides[j] for j in bf):
            # the innermost loop walks b's free dims in order: b copied so that they are
            # (once, before the loop, where b is a const)
            perm = list(bb) + list(bc) + bf
            t = self.materialize(b.with_(tuple(b.shape[q] for q in perm),
                                         tuple(b.strides[q] for q in perm)))
            strides = [0] * len(perm)
            for i, q in enumerate(perm):
                strides[q] = t.strides[i]
            b = t.with_(b.shape, strides)
        o, ct = out.strides, _CTYPE[out.dtype]
        nb, na = len(ab), len(af)
        outer = [(a.shape[i], [o[d], a.strides[i], b.strides[j]]) for d, (i, j) in enumerate(zip(ab, bb))]
        outer += [(a.shape[i], [o[nb + d], a.strides[i], 0]) for d, i in enumerate(af)]
        inner = [(a.shape[i], [a.strides[i], b.strides[j]]) for i, j in zip(ac, bc)]
        if not bf or run > _ACC_MAX:
            self.lines.append(f"memset({out.ptr}, 0, sizeof({ct}) * {max(1, out.size)});")
            dims = [(n, st) for n, st in outer] + [(n, [0] + st) for n, st in inner]
            dims += [(b.shape[j], [o[nb + na + d], 0, b.strides[j]]) for d, j in enumerate(bf)]
            self.nest(dims, [out, a, b], "{0} += {1} * {2}")
            return out
        # each run of the result summed in an array the compiler keeps in registers
        acc, j = f"acc{next(self.counter)}", f"j{next(self.counter)}"

        def row(refs):
            o_ref, a_ref, b_ref = refs
            inner_lines = []
            saved, self.lines = self.lines, inner_lines
            self.nest(inner, [a.with_(a.shape, a.strides, _offset_of(a_ref, a)),
                              b.with_(b.shape, b.strides, _offset_of(b_ref, b))],
                      lambda r: [f"{ct} av = {r[0]};",
                                 f"const {ct} *bp = &{r[1]};",
                                 f"for (long {j} = 0; {j} < {run}; {j}++) {acc}[{j}] += av * bp[{j}];"])
            self.lines = saved
            return ([f"{ct} {acc}[{run}];",
                     f"for (long {j} = 0; {j} < {run}; {j}++) {acc}[{j}] = 0;"]
                    + inner_lines
                    + [f"for (long {j} = 0; {j} < {run}; {j}++) (&{o_ref})[{j}] = {acc}[{j}];"])
        self.nest(outer, [out, a, b], row)
        return out

    def reduce(self, x: _View, axes, monoid) -> _View:
        out_aval = self.out_avals[0]
        axes = tuple(axes)
        init, stmt = _REDUCE[monoid]
        dt = np.dtype(out_aval.dtype)
        if dt == np.bool_ and monoid not in ("and", "or"):
            raise Unsupported("a sum of booleans")
        if x.ptr is None:
            raise Unsupported("a reduction of a constant")
        out = self.temp(tuple(out_aval.shape), dt)
        self.nest([(max(1, out.size), [1])], [out], "{0} = " + _scalar_literal(init(dt), dt))
        strides, kept = [], iter(out.strides)
        for d in range(len(x.shape)):
            strides.append(0 if d in axes else next(kept))
        self.nest([(n, [s, xs]) for n, s, xs in zip(x.shape, strides, x.strides)], [out, x], stmt)
        return out


_ACC_MAX = 1024      # a product's innermost run summed in registers up to this many elements


def _offset_of(ref: str, v: _View) -> str:
    """The index expression inside ``ref`` (``ptr[...]``): where a loop nest nested in another
    starts reading ``v``."""
    return ref[len(v.ptr) + 1:-1]


class _Lazy:
    """An elementwise value not yet written: ``expr`` of its ``operands`` (``{0}``, ...).  Its
    one reader folds the expression into its own loop."""
    __slots__ = ("expr", "operands", "shape", "dtype")

    def __init__(self, expr, operands, shape, dtype):
        self.expr, self.operands, self.shape, self.dtype = expr, list(operands), tuple(shape), dtype

    def reads(self, prefix: str) -> bool:
        return any(isinstance(v, _Lazy) and v.reads(prefix) or
                   isinstance(v, _View) and v.ptr is not None and v.ptr.startswith(prefix)
                   for v in self.operands)


def _reads(x, prefix: str) -> bool:
    return x.reads(prefix) if isinstance(x, _Lazy) else (x.ptr is not None and x.ptr.startswith(prefix))


def _write(step: Program, n_consts: int, n_carry: int):
    """The C source of a loop over ``step`` (inputs: consts, carries, the per-step values;
    outputs: the new carries, then the per-step outputs).  Its one function is
    ``int spmd_loop(long length, long reverse, void **buffers)``, ``buffers`` the consts, the
    carries (read as the loop's start, left as its end), the per-step inputs stacked and the
    per-step outputs stacked, each C-contiguous."""
    w = _Writer()
    env: dict[int, object] = {}
    decls, per_step = [], []
    ins, outs = step.in_vars, step.out_vars
    for i, v in enumerate(ins):
        dt = np.dtype(v.aval.dtype)
        if dt not in _CTYPE:
            raise Unsupported(f"dtype {dt}")
        ct, size = _CTYPE[dt], max(1, math.prod(v.aval.shape))
        if i < n_consts:
            decls.append(f"const {ct} *restrict k{i} = (const {ct} *)bufs[{i}];")
            env[id(v)] = _View(f"k{i}", v.aval.shape, dt)
        elif i < n_consts + n_carry:
            decls.append(f"{ct} *restrict c{i} = ({ct} *)bufs[{i}];")
            env[id(v)] = _View(f"c{i}", v.aval.shape, dt)
        else:
            decls.append(f"const {ct} *restrict xa{i} = (const {ct} *)bufs[{i}];")
            per_step.append(f"const {ct} *restrict x{i} = xa{i} + t * {size};")
            env[id(v)] = _View(f"x{i}", v.aval.shape, dt)
    for j, v in enumerate(outs[n_carry:]):
        dt = np.dtype(v.aval.dtype)
        if dt not in _CTYPE:
            raise Unsupported(f"dtype {dt}")
        decls.append(f"{_CTYPE[dt]} *restrict ya{j} = ({_CTYPE[dt]} *)bufs[{len(ins) + j}];")

    uses: dict[int, int] = {}
    for a in [a for e in step.eqns for a in e.inputs] + list(outs):
        uses[id(a)] = uses.get(id(a), 0) + 1

    def read(a):
        if isinstance(a, Literal):
            return w.literal(a.val, a.aval.dtype)
        return env[id(a)]

    for e in step.eqns:
        single = len(e.outputs) == 1 and uses.get(id(e.outputs[0]), 0) <= 1
        for v, r in zip(e.outputs, w.eqn(e, [read(a) for a in e.inputs], single)):
            env[id(v)] = r
    # the step's end: each per-step output into its slot; then each new carry into place,
    # through a staging buffer where it reads a carry (all carries are read before any is
    # written)
    for j, v in enumerate(outs[n_carry:]):
        size = max(1, math.prod(v.aval.shape))
        w.copy(_View(f"(ya{j} + t * {size})", v.aval.shape, np.dtype(v.aval.dtype)), read(v))
    direct, staged = [], []
    for j, v in enumerate(outs[:n_carry]):
        target, src = env[id(ins[n_consts + j])], read(v)
        if src is target:
            continue                                        # passed through unchanged
        if _reads(src, "c"):
            stage = w.temp(v.aval.shape, v.aval.dtype)
            w.copy(stage, src)
            staged.append((target, stage))
        else:
            direct.append((target, src))
    for target, src in direct + staged:
        w.copy(target, src)
    scratch = [f"{ct} *restrict {name} = ({ct} *)(scratch + {off});" for name, ct, off in w.temps]
    return "\n".join([
        _PRELUDE, *w.statics,
        "int spmd_loop(long length, long reverse, void **bufs) {",
        *decls,
        f"char *scratch = aligned_alloc(64, {max(64, -(-w.scratch // 64) * 64)});",
        "if (!scratch) return 1;",
        *scratch, *w.before,
        "for (long s = 0; s < length; s++) {",
        "long t = reverse ? length - 1 - s : s;",
        *per_step, *w.lines,
        "}",
        "free(scratch);",
        "return 0;",
        "}",
    ])


# ---------------------------------------------------------------------------------------------
# building and loading
# ---------------------------------------------------------------------------------------------

_warned = []


def build(source: str, flags: tuple[str, ...] = FLAGS):
    """The ``spmd_loop`` function of ``source``, built (or found built) and loaded.  Raises
    ``RuntimeError`` with the compiler's message where it fails."""
    fn = _cbuild.library(source, flags, what="a loop body").spmd_loop
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    return fn


class Loop:
    """A scan's steps as one native call: ``loop(length, consts, carries, per_step)`` gives the
    final carries and the per-step outputs stacked (steps first), or None where the library
    could not be built (then the caller runs its NumPy loop)."""

    def __init__(self, source, in_avals, n_consts, n_carry, out_avals, reverse):
        self.source, self.in_avals, self.out_avals = source, in_avals, out_avals
        self.n_consts, self.n_carry, self.reverse = n_consts, n_carry, bool(reverse)
        self._fn = None

    def function(self):
        if self._fn is None:
            try:
                self._fn = build(self.source)
            except RuntimeError as err:
                if not _warned:
                    _warned.append(True)
                    warnings.warn(f"spmd: loops run as NumPy calls: {err}", RuntimeWarning,
                                  stacklevel=3)
                self._fn = False
        return self._fn or None

    def __call__(self, length, consts, carries, per_step, ys=None):
        """``ys``: C-contiguous arrays ``(length, ...)`` to write the per-step outputs into."""
        fn = self.function()
        if fn is None:
            return None
        avals, nc, nk = self.in_avals, self.n_consts, self.n_carry
        bufs = [np.ascontiguousarray(x, dtype=avals[i].dtype) for i, x in enumerate(consts)]
        state = [np.array(x, dtype=avals[nc + i].dtype, order="C", copy=True).reshape(avals[nc + i].shape)
                 for i, x in enumerate(carries)]
        stacked = []
        for i, x in enumerate(per_step):
            aval = avals[nc + nk + i]
            x = np.asarray(x)
            if x.shape[0] != length:
                x = np.broadcast_to(x, (length,) + tuple(aval.shape))
            stacked.append(np.ascontiguousarray(x, dtype=aval.dtype))
        # from the buffer pool: a thousand steps' outputs are MiBs, made at every call
        if ys is None:
            ys = [_host_parallel.empty(np, (length,) + tuple(a.shape), a.dtype)
                  for a in self.out_avals[nk:]]
        arrays = [b.reshape(avals[i].shape) if b.ndim != len(avals[i].shape) else b
                  for i, b in enumerate(bufs)] + state + stacked + ys
        ptrs = (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])
        if fn(length, int(self.reverse), ptrs):
            raise MemoryError("spmd: a native loop could not allocate its scratch")
        return state, ys

    def stacked(self, length, k, consts, carries, per_step):
        """The loop on each device's blocks of values stacked with ``k`` mesh dims in front
        (a dim of size 1, or a missing one: the same block for every device), the devices
        spread over the host threads; the results stacked alike."""
        avals, nc, nk = self.in_avals, self.n_consts, self.n_carry

        def lead(v, rank):
            a = np.asarray(v)
            return a.reshape((1,) * (k + rank - a.ndim) + a.shape)
        groups = [[lead(v, avals[i].ndim) for i, v in enumerate(consts)],
                  [lead(v, avals[nc + i].ndim) for i, v in enumerate(carries)],
                  [lead(v, 1 + avals[nc + nk + i].ndim) for i, v in enumerate(per_step)]]
        mesh = tuple(max([a.shape[d] for g in groups for a in g] or [1]) for d in range(k))
        carry_out = [np.empty(mesh + tuple(a.shape), a.dtype) for a in self.out_avals[:nk]]
        ys_out = [_host_parallel.empty(np, mesh + (length,) + tuple(a.shape), a.dtype)
                  for a in self.out_avals[nk:]]

        def one(idx):
            pick = lambda a: a[tuple(i if a.shape[d] > 1 else 0 for d, i in enumerate(idx))]
            state, _ = self(length, *[[pick(a) for a in g] for g in groups],
                            ys=[y[idx] for y in ys_out])
            for c, v in zip(carry_out, state):
                c[idx] = v
        nbytes = sum(y.nbytes for y in ys_out) + sum(a.nbytes for g in groups for a in g)
        _host_parallel.run(np, nbytes, [functools.partial(one, idx) for idx in np.ndindex(*mesh)])
        return carry_out, ys_out


def scan_loop(step: Program, n_consts: int, n_carry: int, reverse: bool):
    """A :class:`Loop` running ``step`` (``control_flow._Split.step``), or None where its body
    is not all local arithmetic this module writes (or ``SPMD_NATIVE=0``)."""
    if not enabled() or not step.eqns:
        return None
    try:
        source = _write(step, n_consts, n_carry)
    except Unsupported:
        return None
    return Loop(source, [v.aval for v in step.in_vars], n_consts, n_carry,
                [v.aval for v in step.out_vars], reverse)


def scan_runner(step: Program, n_consts: int, n_carry: int, reverse: bool, whole, *, k=0,
                positions=None):
    """What an executor's ``native_scan`` gives ``control_flow``: ``run(length, consts,
    carries, per_step)`` on the executor's values, or None.  The values: host arrays after
    ``whole``; with ``k``, stacked with ``k`` mesh dims in front (the stacked executor inside
    ``shard_map``: the loop runs once per device); with ``positions``, dicts of the devices'
    arrays (the per-device executor inside ``shard_map``).  While profiling, the call is one
    step of the profile, named after the equations it runs."""
    loop = scan_loop(step, n_consts, n_carry, reverse)
    if loop is None or loop.function() is None:     # built with the plan, as part of compiling
        return None
    timed_as = []

    def per_device(length, *groups):
        outs = {p: loop(length, *[[v[p] for v in g] for g in groups]) for p in positions}
        return [[{p: outs[p][j][i] for p in positions} for i in range(len(outs[positions[0]][j]))]
                for j in range(2)]

    def call(length, *groups):
        if positions is not None:
            return per_device(length, *groups)
        groups = [[whole(v) for v in g] for g in groups]
        return loop.stacked(length, k, *groups) if k else loop(length, *groups)

    def run(length, *groups):
        if profiling.active is None:
            return call(length, *groups)
        if not timed_as:
            names = "·".join(e.prim.name for e in step.eqns)
            timed_as.append(dataclasses.replace(
                profiling.step_of(step.eqns, step.in_vars, step.out_vars), op=f"native({names})"))
        return profiling.timed(timed_as[0], call, length, *groups)
    return run


# ---------------------------------------------------------------------------------------------
# elementwise chains of the stacked executor
# ---------------------------------------------------------------------------------------------

def _write_chain(eqns, inputs, outputs, in_shapes, in_dtypes, shape) -> str:
    """The C source of elementwise ``eqns`` on values of ``shape`` as one pass:
    ``spmd_loop(_, _, bufs)``, ``bufs`` the chain's inputs (``in_shapes``: (shape, strides in
    elements) each; dims of size 1 broadcast) and then its ``outputs`` (C-contiguous, of
    ``shape``).  One loop nest reads each input element once, computes every equation into a
    local variable and writes each output element once: a chain's values in between never go
    to memory (on a host that moves 15 GB/s, the memory traffic is the cost)."""
    w = _Writer()
    params, args, views, known = [], [], [], {}     # the loop's pointers are restrict
    for j, v in enumerate(outputs):                 # parameters: GCC then needs no alias test
        ct = w.ctype(v.aval.dtype)
        params.append(f"{ct} *restrict y{j}")
        args.append(f"({ct} *)bufs[{len(inputs) + j}]")
        views.append(_View(f"y{j}", shape, np.dtype(v.aval.dtype)))
    dtypes = {}
    for i, (a, (s, strides), dt) in enumerate(zip(inputs, in_shapes, in_dtypes)):
        ct = w.ctype(dt)
        dtypes[id(a)] = np.dtype(dt)
        if isinstance(a, Literal) and np.ndim(a.val) == 0:      # a constant in the code
            known[id(a)] = _scalar_literal(np.asarray(a.val, dt).item(), dt)
            continue
        params.append(f"const {ct} *restrict k{i}")
        args.append(f"(const {ct} *)bufs[{i}]")
        known[id(a)] = len(views)
        views.append(_broadcast(_View(f"k{i}", s, np.dtype(dt), strides), shape))

    def body(refs):
        value = {k: refs[v] if isinstance(v, int) else v for k, v in known.items()}
        lines = []
        for n, e in enumerate(eqns):
            operands = []
            for a in e.inputs:
                if id(a) not in value:          # a constant of the program itself
                    if not (isinstance(a, Literal) and np.ndim(a.val) == 0):
                        raise Unsupported("an array constant in a chain")
                    dtypes[id(a)] = np.dtype(a.aval.dtype)
                    value[id(a)] = _scalar_literal(np.asarray(a.val).item(), a.aval.dtype)
                operands.append(a)
            out = e.outputs[0]
            dt = np.dtype(out.aval.dtype)
            rule = e.prim.c
            expr = rule(w, [dtypes[id(a)] for a in operands], dt) if rule is not None else None
            if expr is None:
                raise Unsupported(e.prim.name)
            ct = w.ctype(dt)
            lines.append(f"const {ct} v{n} = ({ct})({expr.format(*[value[id(a)] for a in operands])});")
            value[id(out)], dtypes[id(out)] = f"v{n}", dt
        return lines + [f"{refs[j]} = {value[id(v)]};" for j, v in enumerate(outputs)]
    w.nest([(n, [v.strides[d] for v in views]) for d, n in enumerate(shape)], views, body)
    return "\n".join([
        _PRELUDE, *w.statics,
        f"static __attribute__((noinline)) void spmd_chain({', '.join(params)}) {{",
        *w.lines,
        "}",
        "int spmd_loop(long length, long reverse, void **bufs) {",
        "(void)length; (void)reverse;",
        f"spmd_chain({', '.join(args)});",
        "return 0;",
        "}",
    ])


class Chain:
    """Elementwise equations of the stacked executor (a fused chain: ``eqns`` reading
    ``inputs`` and giving ``outputs``, every equation's result of one shape) as C loops, built
    once per layout of the inputs.  Called with the stacked values (``k`` mesh dims in front),
    it returns the outputs, or None where the chain or this layout is not one it writes (the
    caller then runs the NumPy calls).  Arrays that broadcast (a bias along the rows, a value
    the same on every device) go in without being copied out."""

    def __init__(self, eqns, inputs, outputs, k: int):
        self.eqns, self.inputs, self.outputs, self.k = tuple(eqns), list(inputs), list(outputs), k
        self.ranks = [len(getattr(a.aval, "shape", ())) for a in self.inputs]
        self.rank = len(self.outputs[0].aval.shape)
        self.dtypes = [np.dtype(v.aval.dtype) for v in self.outputs]
        self.built: dict = {}               # layout -> the loaded function, or None

    def _operand(self, x, rank):
        """``x`` with every dim of the result (ones after the mesh dims where it has fewer
        local dims), its broadcast dims cut to size 1 (a view at the same address); None
        where it cannot go in as it is."""
        k, full = self.k, self.k + self.rank
        if x.ndim == k + rank:
            x = x.reshape(x.shape[:k] + (1,) * (self.rank - rank) + x.shape[k:])
        elif x.size == 1:
            x = x.reshape((1,) * full)
        else:
            return None
        if any(s == 0 and n > 1 for n, s in zip(x.shape, x.strides)):
            x = x[tuple(slice(0, 1) if s == 0 else slice(None) for s in x.strides)]
        if any(s % x.itemsize for s in x.strides) or x.dtype not in _CTYPE:
            return None
        return x

    def __call__(self, shape, vals):
        """The outputs (arrays of ``shape``) of the chain on ``vals``, or None."""
        key = (shape,) + tuple((x.shape, x.strides, x.dtype) if type(x) is np.ndarray else
                               type(x) for x in vals)
        built = self.built.get(key, _UNBUILT)
        if built is _UNBUILT:
            built = self.built[key] = self._build(shape, vals)
        if built is None:
            return None
        outs = [_host_parallel.empty(np, shape, dt) for dt in self.dtypes]
        # every operand starts where its value does (the views only reshape and cut)
        bufs = (ctypes.c_void_p * (len(vals) + len(outs)))(
            *[x.ctypes.data if type(x) is np.ndarray else None for x in vals],
            *[o.ctypes.data for o in outs])
        built(0, 0, bufs)
        return outs

    def _build(self, shape, vals):
        xs = []
        for a, x, rank in zip(self.inputs, vals, self.ranks):
            if type(x) is not np.ndarray:       # a Python scalar: only a constant of the code
                if not (isinstance(a, Literal) and np.ndim(a.val) == 0):
                    return None
                x = np.asarray(a.val, np.dtype(a.aval.dtype))
            x = self._operand(x, rank)
            if x is None:
                return None
            xs.append(x)
        try:
            source = _write_chain(self.eqns, self.inputs, self.outputs,
                                  [(x.shape, [s // x.itemsize for s in x.strides]) for x in xs],
                                  [x.dtype for x in xs], shape)
            return build(source, CHAIN_FLAGS)
        except (Unsupported, RuntimeError):
            return None


_UNBUILT = object()


def chain(eqns, inputs, outputs, k: int):
    """A :class:`Chain` of the elementwise ``eqns``, or None (``SPMD_NATIVE=0``, or an
    equation with no C rule)."""
    if not enabled() or any(e.prim.c is None or len(e.outputs) != 1 for e in eqns):
        return None
    return Chain(eqns, inputs, outputs, k)
