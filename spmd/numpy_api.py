"""NumPy on traced values: the NEP 13/18 tables and the ``spmd.numpy`` namespace.

Every NumPy function here is a few lines over primitives (``spmd.prims``); a NumPy function
with no entry raises ``NotImplementedError`` naming it -- never a silent fallback to the host.
"""
from __future__ import annotations

import builtins
import itertools
import math
import operator
import string
import sys

import numpy as np


from ._shapes import broadcast_shapes

from . import _xla_math, prims
from .collectives import pvary
from .core import Tracer, bind, current_builder, hooks, implicit_pvary
from .errors import TracingError

HANDLED_FUNCTIONS: dict = {}


def implements(*np_funcs):
    def register(fn):
        for f in np_funcs:
            HANDLED_FUNCTIONS[f] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------
# operands: dtypes, promotion, broadcasting
# ---------------------------------------------------------------------------------------------

def _is_scalar(x):
    """A Python scalar: weakly typed under NEP 50 (NumPy scalars such as np.float32(1) are not)."""
    return type(x) in (bool, int, float, complex)


def _dtype(x):
    return x.dtype if isinstance(x, Tracer) else np.asarray(x).dtype


def _shape(x):
    return x.shape if isinstance(x, Tracer) else np.shape(x)


_WEAK_STAND_IN = {"b": False, "i": 0, "u": 0, "f": 0.0, "c": 0j}


def _dummy(x):
    """A stand-in for ``x`` that NumPy's own dtype rules accept: Python scalars, and traced
    Python-scalar arguments (weak avals), stay weak."""
    if _is_scalar(x):
        return x
    if isinstance(x, Tracer) and x.aval.weak:
        return _WEAK_STAND_IN[x.dtype.kind]
    return np.zeros((), _dtype(x))


def _operand(x):
    if isinstance(x, Tracer) or _is_scalar(x):
        return x
    if isinstance(x, hooks.array_types):
        return np.asarray(x)
    a = np.asarray(x)
    if a.dtype == object:
        raise TypeError(f"cannot use an object array ({type(x).__name__}) in a traced computation")
    return a


def astype(x, dtype):
    dtype = np.dtype(dtype)
    if _is_scalar(x):
        return np.asarray(x, dtype)
    if _dtype(x) == dtype:
        return x
    if not isinstance(x, Tracer):
        return np.asarray(x).astype(dtype)
    return bind(prims.convert_element_type_p, x, dtype=dtype)


def broadcast_to(x, shape):
    shape = tuple(int(s) for s in shape)
    x = _operand(x)
    if not isinstance(x, Tracer):
        return np.broadcast_to(x, shape)
    if x.shape == shape:
        return x
    lead = len(shape) - x.ndim
    if lead < 0 or any(s not in (1, t) for s, t in zip(x.shape, shape[lead:])):
        raise ValueError(f"cannot broadcast a value of shape {x.shape} to {shape}")
    return bind(prims.broadcast_in_dim_p, x, shape=shape, dims=tuple(range(lead, len(shape))))


def _broadcast_operands(xs):
    shapes = [_shape(x) for x in xs]
    try:
        out = broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"operands could not be broadcast together with shapes "
                         f"{' '.join(str(s) for s in shapes)}") from None
    return [broadcast_to(x, out) if isinstance(x, Tracer) and x.shape != out else x for x in xs]


# ---------------------------------------------------------------------------------------------
# ufuncs
# ---------------------------------------------------------------------------------------------

# ufunc -> primitive.  Operands are cast to the dtypes of the loop NumPy itself would pick
# (``ufunc.resolve_dtypes``), so promotion is NumPy's, ml_dtypes' bfloat16 loops included.
_UFUNCS = {
    np.add: prims.add_p, np.subtract: prims.sub_p, np.multiply: prims.mul_p,
    np.true_divide: prims.div_p, np.floor_divide: prims.floordiv_p,
    np.remainder: prims.rem_p, np.fmod: prims.fmod_p, np.power: prims.pow_p,
    np.maximum: prims.max_p, np.minimum: prims.min_p, np.fmax: prims.fmax_p,
    np.fmin: prims.fmin_p, np.arctan2: prims.atan2_p, np.hypot: prims.hypot_p,
    np.copysign: prims.copysign_p, np.logaddexp: prims.logaddexp_p,
    np.bitwise_and: prims.and_p, np.bitwise_or: prims.or_p,
    np.bitwise_xor: prims.xor_p, np.left_shift: prims.shift_left_p,
    np.right_shift: prims.shift_right_p,
    np.logical_and: prims.and_p, np.logical_or: prims.or_p,
    np.logical_xor: prims.xor_p, np.logical_not: prims.not_p,
    np.equal: prims.eq_p, np.not_equal: prims.ne_p, np.less: prims.lt_p,
    np.less_equal: prims.le_p, np.greater: prims.gt_p,
    np.greater_equal: prims.ge_p,
    np.negative: prims.neg_p, np.positive: None, np.exp: prims.exp_p,
    np.exp2: prims.exp2_p, np.log: prims.log_p, np.log2: prims.log2_p,
    np.log10: prims.log10_p, np.log1p: prims.log1p_p, np.expm1: prims.expm1_p,
    np.tanh: prims.tanh_p, np.sinh: prims.sinh_p, np.cosh: prims.cosh_p,
    np.sin: prims.sin_p, np.cos: prims.cos_p, np.tan: prims.tan_p,
    np.arcsin: prims.asin_p, np.arccos: prims.acos_p, np.arctan: prims.atan_p,
    np.arcsinh: prims.asinh_p, np.arccosh: prims.acosh_p,
    np.arctanh: prims.atanh_p, np.sqrt: prims.sqrt_p, np.cbrt: prims.cbrt_p,
    np.square: prims.square_p, np.reciprocal: prims.reciprocal_p,
    np.absolute: prims.abs_p, np.sign: prims.sign_p, np.floor: prims.floor_p,
    np.ceil: prims.ceil_p, np.trunc: prims.trunc_p, np.rint: prims.rint_p,
    np.conjugate: prims.conj_p, np.invert: prims.invert_p,
    np.isnan: prims.isnan_p, np.isinf: prims.isinf_p,
    np.isfinite: prims.isfinite_p, np.signbit: prims.signbit_p,
}


# ufuncs that are one-liners over others; operands arrive cast to the result dtype
_COMPOSITE_UFUNCS = {
    np.deg2rad: lambda x: apply_ufunc(np.multiply, x, np.asarray(np.pi / 180, _dtype(x))),
    np.radians: lambda x: apply_ufunc(np.multiply, x, np.asarray(np.pi / 180, _dtype(x))),
    np.rad2deg: lambda x: apply_ufunc(np.multiply, x, np.asarray(180 / np.pi, _dtype(x))),
    np.degrees: lambda x: apply_ufunc(np.multiply, x, np.asarray(180 / np.pi, _dtype(x))),
    np.fabs: lambda x: apply_ufunc(np.absolute, x),
    np.float_power: lambda x, y: apply_ufunc(np.power, x, y),
    np.logaddexp2: lambda x, y: _logaddexp2(x, y),
    np.heaviside: lambda x, h: where(apply_ufunc(np.less, x, 0), 0, where(apply_ufunc(np.greater, x, 0), 1,
                                     where(apply_ufunc(np.isnan, x), x, h))),
    np.divmod: lambda x, y: (apply_ufunc(np.floor_divide, x, y), apply_ufunc(np.remainder, x, y)),
}



def _logaddexp2(x, y):
    m = apply_ufunc(np.maximum, x, y)
    m = where(apply_ufunc(np.isfinite, m), m, 0)
    e = apply_ufunc(np.add, apply_ufunc(np.exp2, apply_ufunc(np.subtract, x, m)),
                    apply_ufunc(np.exp2, apply_ufunc(np.subtract, y, m)))
    return apply_ufunc(np.add, apply_ufunc(np.log2, e), m)


def _loop_dtypes(ufunc, operands):
    """The input dtypes of the loop NumPy picks for ``operands`` (Python scalars weak, NEP 50)."""
    if ufunc in (np.logical_and, np.logical_or, np.logical_xor, np.logical_not):
        return (np.dtype(np.bool_),) * ufunc.nin       # the bitwise primitives on bools
    key = tuple(type(d) if type(d) in (int, float, complex) else _dtype(x)
                for x, d in ((x, _dummy(x)) for x in operands))
    dts = ufunc.resolve_dtypes(key + (None,) * ufunc.nout)[:ufunc.nin]
    if builtins.any(dt.kind == "O" for dt in dts):     # only Python scalars: their default dtypes
        dts = ufunc.resolve_dtypes(tuple(_dtype(x) for x in operands) + (None,) * ufunc.nout)[:ufunc.nin]
    if builtins.any(type(x) is int and dt.kind in "iu" and not np.iinfo(dt).min <= x <= np.iinfo(dt).max
                    for x, dt in zip(operands, dts)):
        dts = tuple(np.promote_types(dt, np.int64) for dt in dts)   # NumPy compares int8 with 300
    return dts


def _result_dtype(ufunc, operands):
    try:
        with np.errstate(all="ignore"):
            return np.asarray(ufunc(*[_dummy(x) for x in operands])).dtype
    except (TypeError, OverflowError, np._core._exceptions._UFuncNoLoopError
            if hasattr(np, "_core") and hasattr(np._core, "_exceptions") else TypeError) as e:
        dts = ", ".join(str(_dtype(x)) if not _is_scalar(x) else type(x).__name__ for x in operands)
        raise TypeError(f"np.{ufunc.__name__} of ({dts}): NumPy refuses this dtype combination "
                        f"({e}). Cast the operands with .astype(...) first.") from None


def _composite(ufunc):
    """The rule of a ufunc built from others: NumPy's, or ``scipy.special.erf`` (XLA's float
    math).  SciPy is never imported here: its ufunc reaches spmd only once the program loaded it."""
    rule = _COMPOSITE_UFUNCS.get(ufunc)
    if rule is None:
        special = sys.modules.get("scipy.special")
        if special is not None and ufunc is getattr(special, "erf", None):
            rule = _xla_math.erf
    return rule


def apply_ufunc(ufunc, *operands):
    rule = _composite(ufunc)
    if rule is not None:
        operands = [_operand(x) for x in operands]
        out_dt = _result_dtype(ufunc, operands)
        return rule(*[astype(x, out_dt) for x in operands])
    if ufunc not in _UFUNCS:
        raise NotImplementedError(f"spmd has no rule for numpy.{ufunc.__name__} on traced values")
    prim = _UFUNCS[ufunc]
    operands = [_operand(x) for x in operands]
    _result_dtype(ufunc, operands)          # NumPy's refusals, as clear TypeErrors
    operands = [np.asarray(x, dt) if _is_scalar(x) else astype(x, dt)
                for x, dt in zip(operands, _loop_dtypes(ufunc, operands))]
    if prim is None:
        return operands[0]
    operands = _broadcast_operands(implicit_pvary(operands))
    return bind(prim, *operands)


def handle_ufunc(ufunc, method, inputs, kwargs):
    if kwargs.get("out") is not None:
        raise TypeError(f"np.{ufunc.__name__}(..., out=...): traced values are immutable; use the "
                        f"returned value instead.")
    if method == "__call__":
        if ufunc in _GUFUNCS:
            return _GUFUNCS[ufunc](*inputs, **{k: v for k, v in kwargs.items() if k != "out"})
        extra = {k: v for k, v in kwargs.items() if k not in ("out",) and v is not None}
        if "dtype" in extra:
            dt = extra.pop("dtype")
            inputs = [astype(_operand(x), dt) for x in inputs]
        if extra:
            raise NotImplementedError(f"numpy.{ufunc.__name__} with {sorted(extra)} on traced values")
        return apply_ufunc(ufunc, *inputs)
    if method == "reduce":
        red = {np.add: sum, np.multiply: prod, np.maximum: amax, np.minimum: amin,
               np.logical_and: all_, np.logical_or: any_}.get(ufunc)
        if red is None:
            raise NotImplementedError(f"numpy.{ufunc.__name__}.reduce on traced values")
        kw = {k: v for k, v in kwargs.items() if k in ("axis", "keepdims", "dtype")}
        kw.setdefault("axis", 0)
        return red(inputs[0], **kw)
    if method == "accumulate" and ufunc in (np.add, np.multiply, np.maximum, np.minimum):
        p = {np.add: prims.cumsum_p, np.multiply: prims.cumprod_p, np.maximum: prims.cummax_p,
             np.minimum: prims.cummin_p}[ufunc]
        return _cum(p, inputs[0], kwargs.get("axis", 0), kwargs.get("dtype"))
    raise NotImplementedError(f"numpy.{ufunc.__name__}.{method} on traced values")


def handle_function(func, args, kwargs):
    if kwargs.get("out") is not None:
        raise TypeError(f"np.{func.__name__}(..., out=...): traced values are immutable; use the "
                        f"returned value instead.")
    impl = HANDLED_FUNCTIONS.get(func)
    if impl is None:
        mod = getattr(func, "__module__", None) or "numpy"      # numpy.linalg, not numpy.linalg._linalg
        mod = ".".join(itertools.takewhile(lambda part: not part.startswith("_"), mod.split(".")))
        why = ("its output shape depends on the values, which a traced program cannot have; "
               "use np.where(cond, x, y) or a fixed-size mask instead."
               if func in _DATA_DEPENDENT_SHAPE else
               "express it with supported NumPy functions or file an issue.")
        raise NotImplementedError(f"spmd has no rule for {mod}.{func.__name__} on traced values: {why}")
    return impl(*args, **kwargs)


_DATA_DEPENDENT_SHAPE = {np.nonzero, np.argwhere, np.flatnonzero, np.unique, np.extract,
                         np.compress}


# ---------------------------------------------------------------------------------------------
# axes
# ---------------------------------------------------------------------------------------------

def _axis(axis, ndim):
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < max(ndim, 1):
        raise np.exceptions.AxisError(f"axis {axis} is out of bounds for array of dimension {ndim}")
    return int(axis) % max(ndim, 1)


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (tuple, list)):
        out = tuple(sorted(_axis(a, ndim) for a in axis))
        if len(set(out)) != len(out):
            raise ValueError(f"repeated axis in {axis}")
        return out
    return (_axis(axis, ndim),)


# ---------------------------------------------------------------------------------------------
# shape manipulation
# ---------------------------------------------------------------------------------------------

@implements(np.reshape)
def reshape(x, shape=None, order="C", *, newshape=None, copy=None):
    shape = newshape if shape is None else shape
    if order != "C":
        raise NotImplementedError("reshape with order other than 'C'")
    x = _operand(x)
    if not isinstance(x, Tracer):
        return np.reshape(x, shape)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ValueError("reshape: can only specify one unknown dimension")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if rest == 0 or x.size % rest:
            raise ValueError(f"cannot reshape a value of size {x.size} into shape {shape}")
        shape = tuple(x.size // rest if s == -1 else s for s in shape)
    if math.prod(shape) != x.size:
        raise ValueError(f"cannot reshape a value of shape {x.shape} into shape {shape}")
    return x if shape == x.shape else bind(prims.reshape_p, x, shape=shape)


@implements(np.ravel)
def ravel(x, order="C"):
    return reshape(x, (-1,), order)


@implements(np.transpose, np.permute_dims)
def transpose(x, axes=None):
    x = _operand(x)
    if not isinstance(x, Tracer):
        return np.transpose(x, axes)
    perm = tuple(reversed(range(x.ndim))) if axes is None else tuple(_axis(a, x.ndim) for a in axes)
    if sorted(perm) != list(range(x.ndim)):
        raise ValueError(f"transpose: axes {axes} don't match the value's rank {x.ndim}")
    return x if perm == tuple(range(x.ndim)) else bind(prims.transpose_p, x, perm=perm)


@implements(np.swapaxes)
def swapaxes(x, axis1, axis2):
    x = _operand(x)
    perm = list(range(np.ndim(x) if not isinstance(x, Tracer) else x.ndim))
    a, b = _axis(axis1, len(perm)), _axis(axis2, len(perm))
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, perm)


@implements(np.moveaxis)
def moveaxis(x, source, destination):
    x = _operand(x)
    nd = len(_shape(x))
    src = [_axis(a, nd) for a in (source if isinstance(source, (tuple, list)) else [source])]
    dst = [_axis(a, nd) for a in (destination if isinstance(destination, (tuple, list)) else [destination])]
    order = [i for i in range(nd) if i not in src]
    for d, s in sorted(zip(dst, src)):
        order.insert(d, s)
    return transpose(x, order)


@implements(np.expand_dims)
def expand_dims(x, axis):
    x = _operand(x)
    shape = list(_shape(x))
    axes = axis if isinstance(axis, (tuple, list)) else [axis]
    nd = len(shape) + len(axes)
    for a in sorted(_axis(a, nd) for a in axes):
        shape.insert(a, 1)
    return reshape(x, tuple(shape))


@implements(np.squeeze)
def squeeze(x, axis=None):
    x = _operand(x)
    shape = _shape(x)
    axes = [i for i, s in enumerate(shape) if s == 1] if axis is None else _axes(axis, len(shape))
    for a in axes:
        if shape[a] != 1:
            raise ValueError(f"cannot select an axis to squeeze out which has size not equal to one (axis {a}, size {shape[a]})")
    return reshape(x, tuple(s for i, s in enumerate(shape) if i not in axes))


implements(np.broadcast_to)(lambda x, shape, subok=False: broadcast_to(x, shape))


@implements(np.broadcast_arrays)
def broadcast_arrays(*xs, subok=False):
    return _broadcast_operands([_operand(x) for x in xs])


@implements(np.atleast_1d)
def atleast_1d(*xs):
    out = [reshape(x, (1,)) if len(_shape(x)) == 0 else _operand(x) for x in xs]
    return out[0] if len(out) == 1 else out


@implements(np.atleast_2d)
def atleast_2d(*xs):
    out = []
    for x in xs:
        s = _shape(x)
        out.append(reshape(x, (1,) * (2 - len(s)) + tuple(s)) if len(s) < 2 else _operand(x))
    return out[0] if len(out) == 1 else out


@implements(np.atleast_3d)
def atleast_3d(*xs):
    def one(x):
        s = tuple(_shape(x))
        return reshape(x, {0: (1, 1, 1), 1: (1,) + s + (1,), 2: s + (1,)}.get(len(s), s))
    out = [one(_operand(x)) for x in xs]
    return out[0] if len(out) == 1 else out


def _same_dtype(xs):
    dt = np.result_type(*[_dummy(_operand(x)) for x in xs])
    return [astype(_operand(x), dt) for x in xs]


@implements(np.concatenate, np.concat)
def concatenate(arrays, axis=0, out=None, dtype=None, casting="same_kind"):
    xs = list(arrays)
    if dtype is not None:
        xs = [astype(_operand(x), dtype) for x in xs]
    xs = _same_dtype(xs)
    if axis is None:
        xs, axis = [ravel(x) for x in xs], 0
    nd = len(_shape(xs[0]))
    ax = _axis(axis, nd)
    if not any(isinstance(x, Tracer) for x in xs):
        return np.concatenate(xs, axis=ax)
    return bind(prims.concatenate_p, *xs, axis=ax)


@implements(np.stack)
def stack(arrays, axis=0, out=None, dtype=None, casting="same_kind"):
    xs = list(arrays)
    shapes = {tuple(_shape(x)) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"all input arrays must have the same shape, got {sorted(shapes)}")
    ax = _axis(axis, len(_shape(xs[0])) + 1)
    return concatenate([expand_dims(x, ax) for x in xs], axis=ax, dtype=dtype)


implements(np.hstack)(lambda tup, dtype=None, casting="same_kind": concatenate(
    atleast_1d(*tup) if len(tup) > 1 else [atleast_1d(*tup)], axis=0 if len(_shape(tup[0])) <= 1 else 1, dtype=dtype))
implements(np.vstack)(lambda tup, dtype=None, casting="same_kind": concatenate(
    [atleast_2d(x) for x in tup], axis=0, dtype=dtype))


implements(np.dstack)(lambda tup, dtype=None, casting="same_kind": concatenate(
    [atleast_3d(x) for x in tup], axis=2, dtype=dtype))
implements(np.column_stack)(lambda tup: concatenate(
    [reshape(x, (-1, 1)) if len(_shape(x)) < 2 else x for x in tup], axis=1))


@implements(np.split)
def split(x, indices_or_sections, axis=0):
    n = _shape(x)[_axis(axis, len(_shape(x)))]
    if isinstance(indices_or_sections, (int, np.integer)) and n % int(indices_or_sections):
        raise ValueError(f"array split does not result in an equal division: size {n} into "
                         f"{indices_or_sections}")
    return array_split(x, indices_or_sections, axis)


@implements(np.array_split)
def array_split(x, indices_or_sections, axis=0):
    x = _operand(x)
    ax = _axis(axis, len(_shape(x)))
    n = _shape(x)[ax]
    if isinstance(indices_or_sections, (int, np.integer)):
        k = int(indices_or_sections)
        if k <= 0:
            raise ValueError("number sections must be larger than 0.")
        # the first n % k sections are one longer
        cuts = list(itertools.accumulate((n // k + (i < n % k) for i in range(k - 1))))
    else:
        cuts = [int(c) for c in indices_or_sections]
    bounds = [0] + cuts + [n]
    return [_slice_axis(x, ax, a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _slice_axis(x, axis, start, stop, step=1):
    index = tuple((0, d, 1) if i != axis else slice(start, stop, step).indices(d)
                  for i, d in enumerate(_shape(x)))
    if not isinstance(x, Tracer):
        return x[tuple(slice(*s) for s in index)]
    return bind(prims.slice_p, x, index=index)


@implements(np.flip)
def flip(x, axis=None):
    x = _operand(x)
    for a in _axes(axis, len(_shape(x))):
        x = _slice_axis(x, a, None, None, -1)
    return x


implements(np.fliplr)(lambda x: flip(x, 1))
implements(np.flipud)(lambda x: flip(x, 0))


@implements(np.roll)
def roll(x, shift, axis=None):
    if axis is None:
        return reshape(roll(ravel(x), shift, 0), _shape(x))
    if isinstance(shift, (tuple, list)) or isinstance(axis, (tuple, list)):
        shifts, axes = np.broadcast_arrays(np.asarray(shift), np.asarray(axis))
        for s_, a in zip(shifts.ravel(), axes.ravel()):
            x = roll(x, int(s_), int(a))
        return _operand(x)
    x = _operand(x)
    ax = _axis(axis, len(_shape(x)))
    n = _shape(x)[ax]
    s = int(shift) % n if n else 0
    if s == 0:
        return x
    return concatenate([_slice_axis(x, ax, n - s, n), _slice_axis(x, ax, 0, n - s)], axis=ax)


@implements(np.pad)
def pad(x, pad_width, mode="constant", constant_values=0, stat_length=None, end_values=0):
    """'constant' is the pad primitive; the modes that copy elements ('edge', 'reflect',
    'symmetric', 'wrap') are a ``take`` per dim at the indices NumPy's pad gives ``arange(n)``;
    the statistic modes ('maximum', 'minimum', 'mean', 'median') and 'linear_ramp' concatenate
    what they compute per dim, in NumPy's order of dims ('empty' pads with zeros)."""
    x = _operand(x)
    nd = len(_shape(x))
    pw = np.broadcast_to(np.asarray(pad_width, dtype=np.int64), (nd, 2))
    config = tuple((int(a), int(b)) for a, b in pw)
    if mode in ("edge", "reflect", "symmetric", "wrap"):
        for d, (lo, hi) in enumerate(config):
            if lo or hi:
                x = take(x, np.pad(np.arange(_shape(x)[d]), (lo, hi), mode=mode), axis=d)
        return x
    if mode in _PAD_STATISTICS or mode == "linear_ramp":
        return _pad_computed(x, config, mode, stat_length, end_values)
    if mode == "empty":
        mode, constant_values = "constant", 0
    if mode != "constant":
        raise NotImplementedError(f"numpy.pad with mode={mode!r} on traced values (constant, edge, "
                                  f"reflect, symmetric, wrap, maximum, minimum, mean, median, "
                                  f"linear_ramp and empty are supported)")
    values = np.asarray(constant_values, dtype=_dtype(x))
    if values.ndim == 0:
        return bind(prims.pad_p, x, values, config=config)
    values = np.broadcast_to(values, (nd, 2))           # one value per side of each dim
    for d, (lo, hi) in enumerate(config):
        for side, width in ((0, lo), (1, hi)):
            if width:
                one = tuple((width, 0) if e == d and side == 0 else (0, width) if e == d else (0, 0)
                            for e in range(nd))
                x = bind(prims.pad_p, x, values[d, side], config=one)
    return x


_PAD_STATISTICS = {"maximum": lambda v, d: amax(v, d, keepdims=True),
                   "minimum": lambda v, d: amin(v, d, keepdims=True),
                   "mean": lambda v, d: mean(v, d, keepdims=True),
                   "median": lambda v, d: median(v, d, keepdims=True)}


def _pad_computed(x, config, mode, stat_length, end_values):
    nd = len(_shape(x))
    lengths = np.broadcast_to(np.asarray(stat_length if stat_length is not None else -1), (nd, 2))
    ends = np.broadcast_to(np.asarray(end_values), (nd, 2))
    integer = _dtype(x).kind in "iub"
    for d, (lo, hi) in enumerate(config):
        n = _shape(x)[d]
        parts = []
        for side, width in ((0, lo), (1, hi)):
            if not width:
                continue
            edge = _slice_axis(x, d, 0, 1) if side == 0 else _slice_axis(x, d, n - 1, n)
            if mode == "linear_ramp":
                steps = (np.arange(width) / width if side == 0 else np.arange(1, width + 1) / width)
                shape = [1] * nd
                shape[d] = width
                steps = steps.reshape(shape)
                start, stop = (ends[d, 0], edge) if side == 0 else (edge, ends[d, 1])
                v = apply_ufunc(np.add, start, apply_ufunc(np.multiply, apply_ufunc(
                    np.subtract, stop, start), steps))
            else:
                k = int(lengths[d, side])
                k = n if k < 0 else builtins.min(builtins.max(k, 1), n)
                window = _slice_axis(x, d, 0, k) if side == 0 else _slice_axis(x, d, n - k, n)
                v = _PAD_STATISTICS[mode](window, d)
            if integer and _dtype(v) != _dtype(x):   # NumPy: ramps floor, statistics round
                v = apply_ufunc(np.floor if mode == "linear_ramp" else np.rint, v)
            v = astype(v, _dtype(x))
            parts.append((side, broadcast_to(v, tuple(width if e == d else s
                                                      for e, s in enumerate(_shape(x))))))
        if parts:
            x = concatenate([p for side, p in parts if side == 0] + [x]
                            + [p for side, p in parts if side == 1], axis=d)
    return x


@implements(np.tile)
def tile(x, reps):
    x = _operand(x)
    reps = (reps,) if isinstance(reps, int) else tuple(reps)
    shape = _shape(x)
    nd = max(len(shape), len(reps))
    x = reshape(x, (1,) * (nd - len(shape)) + tuple(shape))
    reps = (1,) * (nd - len(reps)) + reps
    for ax, r in enumerate(reps):
        if r != 1:
            x = concatenate([x] * r, axis=ax)
    return x


@implements(np.repeat)
def repeat(x, repeats, axis=None):
    if not isinstance(repeats, (int, np.integer)):
        raise NotImplementedError("numpy.repeat with per-element repeats on traced values")
    if axis is None:
        x, axis = ravel(x), 0
    x = _operand(x)
    shape = _shape(x)
    ax = _axis(axis, len(shape))
    y = expand_dims(x, ax + 1)
    y = broadcast_to(y, shape[:ax + 1] + (int(repeats),) + shape[ax + 1:])
    return reshape(y, shape[:ax] + (shape[ax] * int(repeats),) + shape[ax + 1:])


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------

def _accumulator_dtype(dt):
    """NumPy sums and products of bools and small integers in 64 bits."""
    if dt.kind in "biu" and dt.itemsize < 8:
        return np.dtype(np.uint64 if dt.kind == "u" else np.int64)
    return dt


_IDENTITY = {prims.reduce_sum_p: 0, prims.reduce_prod_p: 1, prims.reduce_and_p: True, prims.reduce_or_p: False}


def _reduce(prim, x, axis, keepdims, dtype=None, initial=None, where=None):
    x = _operand(x)
    if dtype is not None:
        x = astype(x, dtype)
    elif prim in (prims.reduce_sum_p, prims.reduce_prod_p):
        x = astype(x, _accumulator_dtype(_dtype(x)))
    if where is not None and where is not True:      # masked out elements become the identity
        identity = _IDENTITY.get(prim, initial)
        if identity is None:
            raise ValueError(f"reduction operation '{prim.name}' does not have an identity, so to use a "
                             f"where mask one has to specify 'initial'")
        x = globals()["where"](where, x, np.asarray(identity, _dtype(x)))
    shape = _shape(x)
    axes = _axes(axis, len(shape))
    if prim in (prims.reduce_max_p, prims.reduce_min_p) and any(shape[a] == 0 for a in axes) and initial is None:
        raise ValueError("zero-size array to reduction operation which has no identity")
    out = bind(prim, x, axes=axes)
    if initial is not None:
        op = {prims.reduce_sum_p: np.add, prims.reduce_prod_p: np.multiply, prims.reduce_max_p: np.maximum,
              prims.reduce_min_p: np.minimum}[prim]
        out = apply_ufunc(op, out, np.asarray(initial, _dtype(out)))
    if keepdims:
        out = reshape(out, tuple(1 if i in axes else s for i, s in enumerate(shape)))
    return out


@implements(np.sum)
def sum(x, axis=None, dtype=None, out=None, keepdims=False, initial=None, where=None):
    return _reduce(prims.reduce_sum_p, x, axis, keepdims, dtype, initial, where)


@implements(np.prod)
def prod(x, axis=None, dtype=None, out=None, keepdims=False, initial=None, where=None):
    return _reduce(prims.reduce_prod_p, x, axis, keepdims, dtype, initial, where)


@implements(np.max, np.amax)
def amax(x, axis=None, out=None, keepdims=False, initial=None, where=None):
    return _reduce(prims.reduce_max_p, x, axis, keepdims, None, initial, where)


@implements(np.min, np.amin)
def amin(x, axis=None, out=None, keepdims=False, initial=None, where=None):
    return _reduce(prims.reduce_min_p, x, axis, keepdims, None, initial, where)


@implements(np.all)
def all_(x, axis=None, out=None, keepdims=False, *, where=None):
    return _reduce(prims.reduce_and_p, astype(_operand(x), np.bool_), axis, keepdims, where=where)


@implements(np.any)
def any_(x, axis=None, out=None, keepdims=False, *, where=None):
    return _reduce(prims.reduce_or_p, astype(_operand(x), np.bool_), axis, keepdims, where=where)


def _count(shape, axes):
    return math.prod(shape[a] for a in axes)


@implements(np.mean)
def mean(x, axis=None, dtype=None, out=None, keepdims=False, *, where=None):
    x = _operand(x)
    if dtype is None and _dtype(x).kind in "biu":
        dtype = np.float64
    s = sum(x, axis, dtype, keepdims=keepdims, where=where)
    if where is not None and where is not True:
        n = sum(broadcast_to(_operand(where), _shape(x)), axis, keepdims=keepdims)
        return apply_ufunc(np.true_divide, s, astype(n, _dtype(s)))
    return apply_ufunc(np.true_divide, s, _count(_shape(x), _axes(axis, len(_shape(x)))))


@implements(np.var)
def var(x, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *, where=None, mean=None,
        correction=None):
    x = _operand(x)
    ddof = correction if correction is not None else ddof
    mu = globals()["mean"](x, axis, dtype, keepdims=True, where=where) if mean is None else mean
    d = apply_ufunc(np.subtract, x, mu)
    sq = apply_ufunc(np.multiply, d, apply_ufunc(np.conjugate, d)) if _dtype(d).kind == "c" else apply_ufunc(np.square, d)
    if _dtype(sq).kind == "c":
        sq = bind(prims.real_p, sq)
    total = sum(sq, axis, keepdims=keepdims, where=where)
    if where is not None and where is not True:
        n = sum(broadcast_to(_operand(where), _shape(x)), axis, keepdims=keepdims)
        return apply_ufunc(np.true_divide, total, astype(apply_ufunc(np.maximum, apply_ufunc(
            np.subtract, n, ddof), 0), _dtype(total)))
    n = _count(_shape(x), _axes(axis, len(_shape(x))))
    return apply_ufunc(np.true_divide, total, builtins.max(n - ddof, 0))


@implements(np.std)
def std(x, axis=None, dtype=None, out=None, ddof=0, keepdims=False, *, where=None, mean=None,
        correction=None):
    return apply_ufunc(np.sqrt, var(x, axis, dtype, ddof=ddof, keepdims=keepdims, where=where, mean=mean,
                                    correction=correction))


def _arg(prim, x, axis, keepdims):
    x = _operand(x)
    if axis is None:
        x, axis = ravel(x), 0
    ax = _axis(axis, len(_shape(x)))
    if _shape(x)[ax] == 0:
        raise ValueError(f"attempt to get {prim.name} of an empty sequence")
    out = bind(prim, x, axis=ax, index_dtype=np.dtype(np.int64))
    return expand_dims(out, ax) if keepdims else out


implements(np.argmax)(lambda x, axis=None, out=None, *, keepdims=False: _arg(prims.argmax_p, x, axis, keepdims))
implements(np.argmin)(lambda x, axis=None, out=None, *, keepdims=False: _arg(prims.argmin_p, x, axis, keepdims))


def _cum(prim, x, axis, dtype):
    x = _operand(x)
    if dtype is not None:
        x = astype(x, dtype)
    elif prim in (prims.cumsum_p, prims.cumprod_p):
        x = astype(x, _accumulator_dtype(_dtype(x)))
    if axis is None:
        x, axis = ravel(x), 0
    return bind(prim, x, axis=_axis(axis, len(_shape(x))), reverse=False)


implements(np.cumsum)(lambda x, axis=None, dtype=None, out=None: _cum(prims.cumsum_p, x, axis, dtype))
implements(np.cumprod)(lambda x, axis=None, dtype=None, out=None: _cum(prims.cumprod_p, x, axis, dtype))


@implements(np.sort)
def sort(x, axis=-1, kind=None, order=None, *, stable=None):
    x = _operand(x)
    if axis is None:
        x, axis = ravel(x), 0
    return bind(prims.sort_p, x, axis=_axis(axis, len(_shape(x))))


@implements(np.argsort)
def argsort(x, axis=-1, kind=None, order=None, *, stable=None):
    x = _operand(x)
    if axis is None:
        x, axis = ravel(x), 0
    return bind(prims.argsort_p, x, axis=_axis(axis, len(_shape(x))), index_dtype=np.dtype(np.int64))


# ---------------------------------------------------------------------------------------------
# elementwise composites
# ---------------------------------------------------------------------------------------------

@implements(np.where)
def where(cond, x=None, y=None):
    if x is None or y is None:
        raise NotImplementedError("numpy.where(cond) with one argument has a data-dependent shape; "
                                  "pass both x and y")
    cond = astype(_operand(cond), np.bool_)
    x, y = _same_dtype([x, y])
    cond, x, y = implicit_pvary([cond, x, y])
    if np.ndim(cond) or not isinstance(cond, Tracer):
        cond, x, y = _broadcast_operands([cond, x, y])
        return bind(prims.select_p, cond, x, y)
    # a traced scalar condition takes the cases' sharding (JAX's select takes it unbroadcast)
    x, y = _broadcast_operands([x, y])
    typed = [v.aval.sharding for v in (x, y) if isinstance(v, Tracer) and v.aval.sharding]
    shape = broadcast_shapes(_shape(x), _shape(y))
    cond = broadcast_to(cond, shape)
    cond = hooks.constrain(cond, typed[0], "where") if typed and shape else cond
    return bind(prims.select_p, cond, x, y)


@implements(np.clip)
def clip(x, a_min=None, a_max=None, out=None, *, min=None, max=None):
    lo = a_min if a_min is not None else min
    hi = a_max if a_max is not None else max
    if lo is not None:
        x = apply_ufunc(np.maximum, x, lo)
    if hi is not None:
        x = apply_ufunc(np.minimum, x, hi)
    return x


@implements(np.round, np.around)
def round_(x, decimals=0, out=None):
    if _dtype(x).kind in "biu" and decimals >= 0:
        return _operand(x)
    if _dtype(x).kind in "biu":
        return astype(round_(astype(x, np.float64), decimals), _dtype(x))
    if decimals == 0:
        return bind(prims.round_p, _operand(x)) if _dtype(x).kind in "fc" else _operand(x)
    s = 10.0 ** decimals
    return apply_ufunc(np.true_divide, bind(prims.round_p, apply_ufunc(np.multiply, x, s)), s)


implements(np.real)(lambda x: bind(prims.real_p, _operand(x)) if _dtype(x).kind == "c" else _operand(x))
implements(np.imag)(lambda x: bind(prims.imag_p, _operand(x)) if _dtype(x).kind == "c" else apply_ufunc(np.multiply, x, 0))
implements(np.conj, np.conjugate)(lambda x: apply_ufunc(np.conjugate, x))
implements(np.abs, np.absolute)(lambda x: apply_ufunc(np.absolute, x))
implements(np.nan_to_num)(lambda x, copy=True, nan=0.0, posinf=None, neginf=None: _nan_to_num(x, nan, posinf, neginf))


def _nan_to_num(x, nan, posinf, neginf):
    x = _operand(x)
    if _dtype(x).kind not in "fc":
        return x
    info = np.finfo(_dtype(x))
    x = where(apply_ufunc(np.isnan, x), nan, x)
    x = where(apply_ufunc(np.logical_and, apply_ufunc(np.isinf, x), apply_ufunc(np.greater, x, 0)),
              info.max if posinf is None else posinf, x)
    return where(apply_ufunc(np.isinf, x), info.min if neginf is None else neginf, x)


@implements(np.isclose)
def isclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    d = apply_ufunc(np.absolute, apply_ufunc(np.subtract, a, b))
    tol = apply_ufunc(np.add, atol, apply_ufunc(np.multiply, rtol, apply_ufunc(np.absolute, b)))
    out = apply_ufunc(np.less_equal, d, tol)
    if equal_nan:
        out = apply_ufunc(np.logical_or, out, apply_ufunc(np.logical_and, apply_ufunc(np.isnan, a),
                                                          apply_ufunc(np.isnan, b)))
    return out


def logsumexp(x, axis=None, keepdims=False):
    """``log(sum(exp(x)))``, computed stably."""
    m = amax(x, axis, keepdims=True)
    m = where(apply_ufunc(np.isfinite, m), m, 0)
    s = sum(apply_ufunc(np.exp, apply_ufunc(np.subtract, x, m)), axis, keepdims=True)
    out = apply_ufunc(np.add, apply_ufunc(np.log, s), m)
    return out if keepdims else squeeze(out, _axes(axis, len(_shape(x))))


def softmax(x, axis=-1):
    """``exp(x) / sum(exp(x))`` along ``axis``, computed stably."""
    e = apply_ufunc(np.exp, apply_ufunc(np.subtract, x, amax(x, axis, keepdims=True)))
    return apply_ufunc(np.true_divide, e, sum(e, axis, keepdims=True))


def layer_norm(x, axis=-1, eps=1e-5):
    """``(x - mean) / sqrt(var + eps)`` along ``axis``."""
    mu = mean(x, axis, keepdims=True)
    return apply_ufunc(np.true_divide, apply_ufunc(np.subtract, x, mu),
                       apply_ufunc(np.sqrt, apply_ufunc(np.add, var(x, axis, keepdims=True), eps)))


def rsqrt(x):
    """``1 / sqrt(x)``, one primitive (typed like ``np.sqrt(x)``)."""
    x = _operand(x)
    return bind(prims.rsqrt_p, astype(x, _result_dtype(np.sqrt, [x])))


# ---------------------------------------------------------------------------------------------
# creation
# ---------------------------------------------------------------------------------------------

def full(shape, fill_value, dtype=None):
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if isinstance(fill_value, Tracer):
        return broadcast_to(astype(fill_value, dtype or fill_value.dtype), shape)
    return np.full(shape, fill_value, dtype=dtype)


@implements(np.zeros_like)
def zeros_like(x, dtype=None, order="K", subok=True, shape=None):
    return full_like(x, 0, dtype, shape=shape)


@implements(np.ones_like)
def ones_like(x, dtype=None, order="K", subok=True, shape=None):
    return full_like(x, 1, dtype, shape=shape)


@implements(np.empty_like)
def empty_like(x, dtype=None, order="K", subok=True, shape=None):
    return full_like(x, 0, dtype, shape=shape)


@implements(np.full_like)
def full_like(x, fill_value, dtype=None, order="K", subok=True, shape=None):
    """Constant, but typed like ``x``: inside shard_map it has ``x``'s varying axes; on
    Explicit axes, unless ``shape=`` is given, ``x``'s sharding (as ``jax.numpy``'s)."""
    dt = np.dtype(dtype) if dtype is not None else _dtype(x)
    typed = isinstance(x, Tracer) and shape is None and x.aval.sharding is not None
    shape = tuple(_shape(x)) if shape is None else tuple(shape)
    b = current_builder()
    if isinstance(x, Tracer) and x.vma and b is not None:
        c = pvary(np.full((), fill_value, dt), tuple(a for a in b.mesh.axis_names if a in x.vma))
        return broadcast_to(c, shape)
    if typed and b is not None and not b.manual_axes:
        ns = x.aval.sharding
        return hooks.constrain(broadcast_to(np.full((), fill_value, dt), shape),
                               type(ns)(ns.mesh, type(ns.spec)(*ns.spec)), "full_like")
    return np.full(shape, fill_value, dtype=dt)


def arange(start, stop=None, step=None, dtype=None):
    """Like numpy.arange (the result is a constant)."""
    return np.arange(start, stop, step, dtype=dtype) if stop is not None else np.arange(start, dtype=dtype)


@implements(np.tril)
def tril(x, k=0):
    return _tri_mask(x, k, lower=True)


@implements(np.triu)
def triu(x, k=0):
    return _tri_mask(x, k, lower=False)


def _tri_mask(x, k, lower):
    x = _operand(x)
    shape = _shape(x)
    n, m = shape[-2], shape[-1]
    mask = np.tri(n, m, k, dtype=bool) if lower else ~np.tri(n, m, k - 1, dtype=bool)
    return where(mask, x, np.zeros((), _dtype(x)))


# ---------------------------------------------------------------------------------------------
# contraction
# ---------------------------------------------------------------------------------------------

def _dot(x, y, contract, batch):
    x, y = _same_dtype([x, y])
    return bind(prims.dot_general_p, x, y, contract=contract, batch=batch)


def matmul(a, b):
    a, b = implicit_pvary([_operand(a), _operand(b)])
    sa, sb = tuple(_shape(a)), tuple(_shape(b))
    if not sa or not sb:
        raise ValueError("matmul: Input operand does not have enough dimensions")
    a2 = reshape(a, (1,) + sa) if len(sa) == 1 else a
    b2 = reshape(b, sb + (1,)) if len(sb) == 1 else b
    sa2, sb2 = tuple(_shape(a2)), tuple(_shape(b2))
    if sa2[-1] != sb2[-2]:
        raise ValueError(f"matmul: Input operand 1 has a mismatch in its core dimension 0 "
                         f"(size {sb2[-2]} is different from {sa2[-1]})")
    batch = broadcast_shapes(sa2[:-2], sb2[:-2])
    shape = batch + ((sa2[-2],) if len(sa) > 1 else ()) + ((sb2[-1],) if len(sb) > 1 else ())
    if len(sb2) == 2:       # x @ w: the leading dims of x are free dims, w is not broadcast
        return reshape(_dot(a2, b2, ((len(sa2) - 1,), (0,)), ((), ())), shape)
    a2 = broadcast_to(a2, batch + sa2[-2:]) if sa2[:-2] != batch else a2
    b2 = broadcast_to(b2, batch + sb2[-2:]) if sb2[:-2] != batch else b2
    nb = len(batch)
    out = _dot(a2, b2, ((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    return reshape(out, shape)


@implements(np.dot)
def dot(a, b, out=None):
    a, b = _operand(a), _operand(b)
    sa, sb = _shape(a), _shape(b)
    if not sa or not sb:
        return apply_ufunc(np.multiply, a, b)
    if len(sb) <= 2:
        return matmul(a, b)
    return tensordot(a, b, axes=([len(sa) - 1], [len(sb) - 2]))


@implements(np.tensordot)
def tensordot(a, b, axes=2):
    a, b = _operand(a), _operand(b)
    sa, sb = _shape(a), _shape(b)
    if isinstance(axes, (int, np.integer)):
        ca, cb = tuple(range(len(sa) - axes, len(sa))), tuple(range(axes))
    else:
        ca, cb = axes
        ca = tuple(_axis(i, len(sa)) for i in (ca if isinstance(ca, (list, tuple)) else [ca]))
        cb = tuple(_axis(i, len(sb)) for i in (cb if isinstance(cb, (list, tuple)) else [cb]))
    return _dot(a, b, (ca, cb), ((), ()))


@implements(np.inner)
def inner(a, b):
    return tensordot(a, b, axes=([-1], [-1]))


@implements(np.outer)
def outer(a, b, out=None):
    return apply_ufunc(np.multiply, reshape(ravel(a), (-1, 1)), ravel(b))


@implements(np.vdot)
def vdot(a, b):
    return dot(apply_ufunc(np.conjugate, ravel(a)), ravel(b))


@implements(np.einsum)
def einsum(subscripts, *operands, out=None, dtype=None, optimize=False, **kw):
    """Two-operand contractions become ``dot_general``; more operands are contracted pairwise
    left to right; an index repeated within one operand takes a diagonal; ``...`` names the
    broadcast leading dims."""
    if not isinstance(subscripts, str):         # interleaved form: op0, sublist0, op1, sublist1, ..., [out]
        args, n = (subscripts,) + operands, (len(operands) + 1) // 2
        term = lambda sub: "".join("..." if i is Ellipsis else string.ascii_letters[i] for i in sub)
        subscripts = ",".join(term(sub) for sub in args[1:2 * n:2]) + ("->" + term(args[-1]) if len(args) % 2 else "")
        operands = args[0:2 * n:2]
    if out is not None:
        raise TypeError("np.einsum(..., out=...): traced values are immutable; use the returned value.")
    ops = implicit_pvary([_operand(o) for o in operands])
    ops = _same_dtype([astype(o, dtype) for o in ops] if dtype is not None else ops)
    subscripts = subscripts.replace(" ", "")
    ins, arrow, out = subscripts.partition("->")
    terms = ins.split(",")
    if len(terms) != len(ops):
        raise ValueError(f"einsum: {len(terms)} operand subscripts but {len(ops)} operands")
    n_ell = builtins.max([len(_shape(o)) - len(t) + 3 for t, o in zip(terms, ops) if "..." in t], default=0)
    ell = "".join(c for c in string.ascii_letters if c not in subscripts)[:n_ell]
    terms = [t.replace("...", ell[n_ell - (len(_shape(o)) - len(t) + 3):]) for t, o in zip(terms, ops)]
    if arrow:
        out = out.replace("...", ell)
    else:
        joined = "".join(terms)
        out = ell + "".join(sorted(c for c in set(joined) if joined.count(c) == 1 and c not in ell))
    sizes = {}
    for t, o in zip(terms, ops):
        if len(t) != len(_shape(o)):
            raise ValueError(f"einsum: subscripts {t!r} do not match an operand of rank {len(_shape(o))}")
        for c, n in zip(t, _shape(o)):
            sizes[c] = n if sizes.get(c, 1) == 1 else sizes[c]
    # the ``...`` dims broadcast; a repeated index within one operand takes its diagonal
    ops = [broadcast_to(o, tuple(sizes[c] if c in ell else n for c, n in zip(t, _shape(o))))
           for t, o in zip(terms, ops)]
    for i, t in enumerate(terms):
        while len(set(t)) != len(t):
            c = next(c for c in t if t.count(c) > 1)
            a, b = t.index(c), t.index(c, t.index(c) + 1)
            ops[i] = diagonal(ops[i], 0, a, b)
            t = "".join(ch for j, ch in enumerate(t) if j not in (a, b)) + c
        terms[i] = t
    cur_t, cur = terms[0], ops[0]
    for i in range(1, len(terms)):
        later = "".join(terms[i + 1:]) + out
        cur_t, cur = _einsum_pair(cur_t, cur, terms[i], ops[i], later)
    # single operand: sum indices not kept, then transpose
    gone = tuple(i for i, c in enumerate(cur_t) if c not in out)
    if gone:
        cur = sum(cur, axis=gone, dtype=_dtype(cur))
        cur_t = "".join(c for c in cur_t if c in out)
    return transpose(cur, [cur_t.index(c) for c in out]) if cur_t != out else cur


def _einsum_pair(ta, a, tb, b, later):
    # indices only in one operand and not needed later are summed first
    def presum(t, x, other):
        gone = tuple(i for i, c in enumerate(t) if c not in other and c not in later)
        if gone:
            x = sum(x, axis=gone, dtype=_dtype(x))
            t = "".join(c for c in t if c not in [t[i] for i in gone])
        return t, x
    ta, a = presum(ta, a, tb)
    tb, b = presum(tb, b, ta)
    batch = [c for c in ta if c in tb and c in later]
    contract = [c for c in ta if c in tb and c not in later]
    out = _dot(a, b, (tuple(ta.index(c) for c in contract), tuple(tb.index(c) for c in contract)),
               (tuple(ta.index(c) for c in batch), tuple(tb.index(c) for c in batch)))
    t_out = "".join(batch) + "".join(c for c in ta if c not in batch and c not in contract) + \
        "".join(c for c in tb if c not in batch and c not in contract)
    return t_out, out


# ---------------------------------------------------------------------------------------------
# indexing
# ---------------------------------------------------------------------------------------------

@implements(np.take)
def take(x, indices, axis=None, out=None, mode=None):
    x = _operand(x)
    if axis is None:
        x, axis = ravel(x), 0
    ax = _axis(axis, len(_shape(x)))
    idx = _operand(indices)
    if not np.issubdtype(_dtype(idx), np.integer):
        raise IndexError(f"take: indices must be integers, got {_dtype(idx)}")
    n = _shape(x)[ax]
    if mode == "wrap":
        idx = _ew(np.remainder, idx, n)
    elif mode == "clip":                       # NumPy clips negative indices to 0 in this mode
        idx = _ew(np.minimum, _ew(np.maximum, idx, 0), n - 1)
    elif mode not in (None, "raise"):
        raise ValueError(f"take: mode {mode!r} is not one of 'raise', 'wrap', 'clip'")
    if not isinstance(idx, Tracer):
        idx = np.asarray(idx)
        if idx.size and (idx.max() >= n or idx.min() < -n):
            raise IndexError(f"index {int(idx.max() if idx.max() >= n else idx.min())} is out of "
                             f"bounds for axis {ax} with size {n}")
    return bind(prims.take_p, x, idx, axis=ax)


@implements(np.take_along_axis)
def take_along_axis(x, indices, axis=-1):
    """One ``take`` from the flattened ``x`` at the flat positions the indices name; or, for
    one traced index per row of a float array (a cross-entropy's target), the sum of the row
    masked to that position (see :func:`_pick_one`)."""
    x, idx = _operand(x), _operand(indices)
    if axis is None:
        x, axis = ravel(x), 0
    shape, ishape = tuple(_shape(x)), tuple(_shape(idx))
    if len(ishape) != len(shape):
        raise ValueError("`indices` and `arr` must have the same number of dimensions")
    ax = _axis(axis, len(shape))
    others = lambda s, v: tuple(v if i == ax else d for i, d in enumerate(s))
    out_shape = broadcast_shapes(others(shape, 1), others(ishape, 1))
    x = broadcast_to(x, others(out_shape, shape[ax]))
    if (isinstance(idx, Tracer) and ishape[ax] == 1 and shape[ax] <= _PICK_ONE_MAX
            and np.issubdtype(_dtype(x), np.inexact)):
        return _pick_one(x, broadcast_to(idx, out_shape), ax)
    out_shape = others(out_shape, ishape[ax])
    idx = _index_in_range(broadcast_to(idx, out_shape), shape[ax], ax)
    strides = [math.prod(_shape(x)[d + 1:]) for d in range(len(shape))]
    base = builtins.sum(np.arange(n).reshape((-1,) + (1,) * (len(shape) - d - 1)) * strides[d]
                        for d, n in enumerate(out_shape) if d != ax)
    flat = _ew(np.add, _ew(np.multiply, idx, strides[ax]), np.broadcast_to(base, out_shape))
    return take(ravel(x), flat, axis=0)


_PICK_ONE_MAX = 4096      # longest axis a one-per-row pick reads whole (masked) instead of gathering


def _pick_one(x, idx, ax):
    """``take_along_axis(x, idx, ax)`` for one index per row (``idx`` has size 1 along ``ax``):
    the row's sum masked to the index.  Every dim but ``ax`` stays where it is (a batch split
    over devices stays split, where a take from the flattened array would gather it), and the
    gradient is the mask times the cotangent, not a scatter into zeros.  An index outside
    ``[-n, n)`` gives NaN, as JAX's default ``fill`` mode does."""
    n = _shape(x)[ax]
    idx = astype(idx, np.int64)
    valid = apply_ufunc(np.logical_and, apply_ufunc(np.greater_equal, idx, -n),
                        apply_ufunc(np.less, idx, n))
    idx = where(apply_ufunc(np.less, idx, 0), apply_ufunc(np.add, idx, n), idx)
    positions = np.arange(n).reshape(tuple(n if d == ax else 1 for d in range(len(_shape(x)))))
    picked = sum(where(apply_ufunc(np.equal, idx, positions), x, 0), axis=ax, keepdims=True)
    return where(valid, picked, np.nan)


def _is_int(k):
    return isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))


def getitem(x, key):
    """NumPy indexing: basic (ints, slices, None, Ellipsis) and integer-array (advanced)
    indices, with NumPy's rule for where the index dims go."""
    if not isinstance(key, tuple):
        key = (key,)
    key = tuple(np.asarray(k) if isinstance(k, list) else k for k in key)
    n_ellipsis = builtins.sum(1 for k in key if k is Ellipsis)
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    used = builtins.sum(1 for k in key if k is not None and k is not Ellipsis)
    if used > x.ndim:
        raise IndexError(f"too many indices for a value of rank {x.ndim}: {key}")
    # The dims no index names are sliced whole: where the ellipsis stands, else at the end.
    i = next((i for i, k in enumerate(key) if k is Ellipsis), len(key))
    key = key[:i] + (slice(None),) * (x.ndim - used) + key[i + n_ellipsis:]
    if builtins.any(k is None for k in key):      # None: a new dim of size 1, sliced whole
        dims = iter(x.shape)
        x = reshape(x, tuple(1 if k is None else next(dims) for k in key))
        key = tuple(slice(None) if k is None else k for k in key)
    # With any array in the key, integers count as (0-d) array indices too, as in NumPy.
    advanced = not builtins.all(isinstance(k, slice) or _is_int(k) for k in key)
    index, squeeze_dims, arrays = [], [], []
    for d, (k, n) in enumerate(zip(key, x.shape)):
        if isinstance(k, slice):
            index.append(k.indices(n))
            continue
        if _is_int(k):
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for axis {d} with size {n}")
            if not advanced:
                index.append((int(k) % n, int(k) % n + 1, 1))
                squeeze_dims.append(d)
                continue
        k = _operand(k)
        if _dtype(k) == np.bool_:
            raise IndexError("boolean mask indexing has a data-dependent shape and is not "
                             "supported on traced values; use np.where(mask, x, 0) instead")
        if not np.issubdtype(_dtype(k), np.integer):
            raise IndexError(f"only integers, slices, None, Ellipsis and integer arrays are "
                             f"valid indices, got {_dtype(k)}")
        index.append((0, n, 1))
        arrays.append((d, k))
    y = x
    if builtins.any(s != (0, d, 1) for s, d in zip(index, x.shape)):
        y = bind(prims.slice_p, x, index=tuple(index))
    if squeeze_dims:
        y = reshape(y, tuple(s for i, s in enumerate(_shape(y)) if i not in squeeze_dims))
    return _gather(y, arrays) if arrays else y


def _ew(ufunc, *xs):
    """An elementwise op on traced values, or on the host for constants."""
    if builtins.any(isinstance(x, Tracer) for x in xs):
        return apply_ufunc(ufunc, *xs)
    return ufunc(*xs)


def _index_in_range(idx, n, axis):
    """``idx`` as int64 in ``[0, n)``: negative indices wrap; constant ones are bounds-checked."""
    if not isinstance(idx, Tracer):
        idx = np.asarray(idx, np.int64)
        if idx.size and (idx.max() >= n or idx.min() < -n):
            bad = int(idx.max() if idx.max() >= n else idx.min())
            raise IndexError(f"index {bad} is out of bounds for axis {axis} with size {n}")
        return np.where(idx < 0, idx + n, idx)
    idx = astype(idx, np.int64)
    return where(apply_ufunc(np.less, idx, 0), apply_ufunc(np.add, idx, n), idx)


def _gather(x, arrays):
    """``x`` indexed by integer arrays ``[(dim, idx), ...]``: the indexed dims are merged into
    one and read with a single ``take``.  The index dims replace the indexed dims where those
    are adjacent, else they go first (NumPy's rule)."""
    shape = _shape(x)
    if len(arrays) == 1:
        (d, idx), = arrays
        return take(x, _index_in_range(idx, shape[d], d), axis=d)
    dims = [d for d, _ in arrays]
    pos = dims[0] if dims == list(range(dims[0], dims[0] + len(dims))) else 0
    rest = [d for d in range(len(shape)) if d not in dims]
    x = transpose(x, rest[:pos] + dims + rest[pos:])
    x = reshape(x, tuple(shape[d] for d in rest[:pos]) + (math.prod(shape[d] for d in dims),)
                + tuple(shape[d] for d in rest[pos:]))
    flat = 0
    for j, (d, idx) in enumerate(arrays):
        stride = math.prod(shape[e] for e in dims[j + 1:])
        flat = _ew(np.add, flat, _ew(np.multiply, _index_in_range(idx, shape[d], d), stride))
    return take(x, flat, axis=pos)


# ---------------------------------------------------------------------------------------------
# more of NumPy, each a few lines over the functions above
# ---------------------------------------------------------------------------------------------

def _vecdot(x, y, axis=-1):
    x, y = _operand(x), _operand(y)
    return einsum("...i,...i->...", moveaxis(apply_ufunc(np.conjugate, x), axis, -1), moveaxis(y, axis, -1))


_GUFUNCS = {
    np.matmul: matmul,
    np.vecdot: _vecdot,
    np.matvec: lambda a, v: einsum("...ij,...j->...i", a, v),
    np.vecmat: lambda v, a: einsum("...i,...ij->...j", apply_ufunc(np.conjugate, v), a),
}

implements(np.matrix_transpose)(lambda x, /: swapaxes(x, -1, -2))
implements(np.unstack)(lambda x, /, *, axis=0: tuple(
    squeeze(s, axis) for s in split(x, _shape(x)[_axis(axis, len(_shape(x)))], axis)))
implements(np.isneginf)(lambda x, out=None: apply_ufunc(np.logical_and, apply_ufunc(np.isinf, x),
                                                        apply_ufunc(np.signbit, x)))
implements(np.isposinf)(lambda x, out=None: apply_ufunc(np.logical_and, apply_ufunc(np.isinf, x),
                                                        apply_ufunc(np.logical_not, apply_ufunc(np.signbit, x))))
implements(np.ptp)(lambda x, axis=None, out=None, keepdims=False: apply_ufunc(
    np.subtract, amax(x, axis, keepdims=keepdims), amin(x, axis, keepdims=keepdims)))
implements(np.count_nonzero)(lambda x, axis=None, *, keepdims=False: sum(
    apply_ufunc(np.not_equal, x, 0), axis, keepdims=keepdims))


def _cumulative_fn(prim, identity):
    def cumulative(x, /, *, axis=None, dtype=None, out=None, include_initial=False):
        x = _operand(x)
        if axis is None and len(_shape(x)) > 1:
            raise ValueError("For arrays which have more than one dimension ``axis`` argument is required.")
        y = _cum(prim, x, axis, dtype)
        if include_initial:
            ax = _axis(axis if axis is not None else 0, len(_shape(y)))
            y = pad(y, [(1, 0) if d == ax else (0, 0) for d in range(len(_shape(y)))], constant_values=identity)
        return y
    return cumulative


implements(np.cumulative_sum)(_cumulative_fn(prims.cumsum_p, 0))
implements(np.cumulative_prod)(_cumulative_fn(prims.cumprod_p, 1))


def _nan_reduction(reduce, fill):
    def f(x, axis=None, dtype=None, out=None, keepdims=False, **kw):
        x = _operand(x)
        if _dtype(x).kind in "fc":
            x = where(apply_ufunc(np.isnan, x), fill, x)
        return reduce(x, axis, dtype, keepdims=keepdims)
    return f


implements(np.nansum)(_nan_reduction(sum, 0))
implements(np.nanprod)(_nan_reduction(prod, 1))


def _nan_extremum(reduce, fill):
    def f(x, axis=None, out=None, keepdims=False, **kw):
        x = _operand(x)
        if _dtype(x).kind not in "f":
            return reduce(x, axis, keepdims=keepdims)
        nan = apply_ufunc(np.isnan, x)
        r = reduce(where(nan, fill, x), axis, keepdims=keepdims)
        return where(all_(nan, axis, keepdims=keepdims), np.nan, r)       # all-NaN slices stay NaN
    return f


implements(np.nanmax)(_nan_extremum(amax, -np.inf))
implements(np.nanmin)(_nan_extremum(amin, np.inf))


@implements(np.nanmean)
def nanmean(x, axis=None, dtype=None, out=None, keepdims=False, **kw):
    x = _operand(x)
    if _dtype(x).kind not in "fc":
        return mean(x, axis, dtype, keepdims=keepdims)
    ok = apply_ufunc(np.logical_not, apply_ufunc(np.isnan, x))
    total = sum(where(ok, x, 0), axis, dtype, keepdims=keepdims)
    return apply_ufunc(np.true_divide, total, astype(sum(ok, axis, keepdims=keepdims), _dtype(total)))


@implements(np.average)
def average(a, axis=None, weights=None, returned=False, *, keepdims=False):
    a = _operand(a)
    if weights is None:
        avg = mean(a, axis, keepdims=keepdims)
        scale = np.asarray(math.prod(_shape(a)) // math.prod(_shape(avg)), _dtype(avg))
    else:
        w = _operand(weights)
        if len(_shape(w)) != len(_shape(a)):       # 1-D weights along ``axis``
            ax = _axis(axis, len(_shape(a)))
            w = reshape(w, tuple(-1 if d == ax else 1 for d in range(len(_shape(a)))))
        dt = np.result_type(_dummy(a), _dummy(w), *([np.float64] if _dtype(a).kind in "biu" else []))
        scale = sum(broadcast_to(w, _shape(a)), axis, dt, keepdims=keepdims)
        avg = apply_ufunc(np.true_divide, sum(apply_ufunc(np.multiply, a, w), axis, dt, keepdims=keepdims), scale)
    if returned:
        return avg, broadcast_to(astype(scale, _dtype(avg)), _shape(avg))
    return avg


@implements(np.median)
def median(a, axis=None, out=None, overwrite_input=False, keepdims=False):
    """The mean of the one or two middle elements after a sort."""
    a = _operand(a)
    nd = len(_shape(a))
    if axis is None:
        s, ax = sort(ravel(a)), 0
    else:
        ax = _axis(axis, nd)
        s = sort(a, axis=ax)
    n = _shape(s)[ax]
    m = mean(_slice_axis(s, ax, (n - 1) // 2, n // 2 + 1), ax, keepdims=keepdims)
    if keepdims and axis is None:
        m = reshape(m, (1,) * nd)
    return m


def _quantile_fn(scale):
    def quantile(a, q, axis=None, out=None, overwrite_input=False, method="linear", keepdims=False, *,
                 weights=None, interpolation=None):
        """Linear interpolation between the two order statistics around ``q * (n - 1)``."""
        if method != "linear" or weights is not None or isinstance(q, Tracer):
            raise NotImplementedError("numpy.quantile/percentile on traced values supports a constant q "
                                      "and method='linear' only")
        a = _operand(a)
        nd = len(_shape(a))
        qa = np.asarray(q, np.float64) / scale
        dt = np.result_type(_dummy(a), q if _is_scalar(q) else qa, *([np.float64] if _dtype(a).kind in "biu" else []))
        s = sort(ravel(a), 0) if axis is None else sort(a, _axis(axis, nd))
        ax = 0 if axis is None else _axis(axis, nd)
        s = moveaxis(astype(s, dt), ax, 0)
        n = _shape(s)[0]
        pos = qa * (n - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        t = (pos - lo).astype(dt)
        below, above = take(s, lo, axis=0), take(s, hi, axis=0)
        tt = t.reshape(t.shape + (1,) * (len(_shape(below)) - t.ndim))
        diff = apply_ufunc(np.subtract, above, below)
        out = where(tt >= 0.5, apply_ufunc(np.subtract, above, apply_ufunc(np.multiply, diff, 1 - tt)),
                    apply_ufunc(np.add, below, apply_ufunc(np.multiply, diff, tt)))
        if keepdims:
            kept = [1 if axis is None or d == ax else n_ for d, n_ in enumerate(_shape(a))]
            out = reshape(out, qa.shape + tuple(kept))
        return out
    return quantile


implements(np.quantile)(_quantile_fn(1))
implements(np.percentile)(_quantile_fn(100))


@implements(np.select)
def select(condlist, choicelist, default=0):
    choices = _same_dtype(list(choicelist) + [default])
    out = choices[-1]
    for cond, choice in reversed(list(zip(condlist, choices[:-1]))):
        out = where(cond, choice, out)
    return out


@implements(np.searchsorted)
def searchsorted(a, v, side="left", sorter=None):
    """Insertion points into the sorted 1-D ``a``: a count of the elements before each value."""
    a, v = _operand(a), _operand(v)
    if sorter is not None:
        a = take(a, sorter)
    before = apply_ufunc(np.less if side == "left" else np.less_equal, a, expand_dims(v, -1))
    return sum(before, axis=-1)


@implements(np.insert)
def insert(arr, obj, values, axis=None):
    """NumPy's insert with concrete positions ``obj``: NumPy itself inserts the (negated) flat
    positions of ``values`` among those of ``arr``, and the result gathers from both."""
    if isinstance(obj, Tracer):
        raise TracingError("numpy.insert needs concrete positions (obj) in a traced function: its "
                           "result's shape depends on them.")
    arr, values = _operand(arr), astype(_operand(values), _dtype(arr))
    where_arr = np.arange(math.prod(_shape(arr))).reshape(_shape(arr))
    where_val = -1 - np.arange(math.prod(_shape(values))).reshape(_shape(values))
    tags = np.insert(where_arr, obj, where_val, axis=axis)
    from_arr = take(ravel(arr), np.maximum(tags, 0).reshape(-1))
    from_val = take(ravel(values), np.maximum(-1 - tags, 0).reshape(-1))
    return reshape(where((tags >= 0).reshape(-1), from_arr, from_val), tags.shape)


@implements(np.histogram)
def histogram(a, bins=10, range=None, density=None, weights=None):  # noqa: A002 (NumPy's name)
    """Counts per bin (the last bin closed), as NumPy; with a number of bins and no ``range``
    the edges span the traced minimum and maximum."""
    a = ravel(_operand(a))
    if isinstance(bins, (int, np.integer)):
        if range is not None:
            edges = np.linspace(range[0], range[1], int(bins) + 1)
        else:
            lo, hi = amin(a), amax(a)
            same = apply_ufunc(np.equal, lo, hi)
            lo, hi = where(same, apply_ufunc(np.subtract, lo, 0.5), lo), where(same, apply_ufunc(np.add, hi, 0.5), hi)
            steps = np.arange(int(bins) + 1) / int(bins)
            edges = apply_ufunc(np.add, lo, apply_ufunc(np.multiply, apply_ufunc(np.subtract, hi, lo), steps))
            edges = concatenate([_slice_axis(edges, 0, 0, int(bins)), reshape(hi, (1,))])
        edges = astype(edges, np.result_type(_dtype(a), np.float64) if _dtype(a).kind in "iub" else _dtype(a))
    else:
        edges = _operand(bins)
    n = _shape(edges)[0] - 1
    idx = apply_ufunc(np.subtract, searchsorted(edges, a, side="right"), 1)
    last = _slice_axis(edges, 0, n, n + 1)
    idx = where(apply_ufunc(np.equal, a, last), n - 1, idx)            # the last bin is closed
    inside = apply_ufunc(np.logical_and, apply_ufunc(np.greater_equal, a, _slice_axis(edges, 0, 0, 1)),
                         apply_ufunc(np.less_equal, a, last))
    hit = apply_ufunc(np.logical_and, apply_ufunc(np.equal, expand_dims(idx, -1), np.arange(n)),
                      expand_dims(inside, -1))
    w = np.ones((), np.int64) if weights is None else expand_dims(ravel(_operand(weights)), -1)
    hist = sum(where(hit, w, np.zeros((), _dtype(w))), axis=0)
    if density:
        widths = _diff(edges, 1, 0)
        hist = apply_ufunc(np.true_divide, hist, apply_ufunc(np.multiply, sum(hist), widths))
    return hist, edges


@implements(np.put_along_axis)
def put_along_axis(arr, indices, values, axis, inplace=True, *, mode=None):
    """``arr`` with ``values`` written at ``indices`` along ``axis`` (the last write wins).
    NumPy writes in place, which traced values cannot: call it as
    ``spmd.numpy.put_along_axis(..., inplace=False)``, which returns the new array."""
    if inplace:
        raise TypeError("numpy.put_along_axis changes arr in place, but traced values are "
                        "immutable; use spmd.numpy.put_along_axis(arr, indices, values, axis, "
                        "inplace=False), which returns the updated array.")
    arr, idx = _operand(arr), _operand(indices)
    if axis is None:
        arr, axis = ravel(arr), 0
    shape = tuple(_shape(arr))
    ax = _axis(axis, len(shape))
    if len(_shape(idx)) != len(shape):
        raise ValueError("`indices` and `arr` must have the same number of dimensions")
    out_shape = broadcast_shapes(tuple(1 if d == ax else n for d, n in enumerate(shape)),
                                 tuple(1 if d == ax else n for d, n in enumerate(_shape(idx))))
    idx_shape = tuple(_shape(idx)[ax] if d == ax else n for d, n in enumerate(out_shape))
    idx = _index_in_range(broadcast_to(idx, idx_shape), shape[ax], ax)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    base = builtins.sum(np.arange(n).reshape((-1,) + (1,) * (len(shape) - d - 1)) * strides[d]
                        for d, n in enumerate(idx_shape) if d != ax)
    pos = ravel(_ew(np.add, _ew(np.multiply, idx, strides[ax]), np.broadcast_to(base, idx_shape)))
    vals = ravel(broadcast_to(astype(_operand(values), _dtype(arr)), idx_shape))
    m = _shape(pos)[0]
    # the last write to a position wins: drop the writes a later one overrides
    later = np.triu(np.ones((m, m), bool), 1)
    overridden = any_(apply_ufunc(np.logical_and, apply_ufunc(
        np.equal, expand_dims(pos, 1), expand_dims(pos, 0)), later), axis=1)
    keep = apply_ufunc(np.logical_not, overridden)
    zeros = np.zeros((math.prod(shape),), _dtype(arr))
    written = bind(prims.scatter_add_p, zeros, pos, where(keep, vals, np.zeros((), _dtype(arr))), axis=0)
    hits = bind(prims.scatter_add_p, np.zeros((math.prod(shape),), np.int64), pos,
                astype(keep, np.int64), axis=0)
    return reshape(where(apply_ufunc(np.greater, hits, 0), written, ravel(arr)), shape)


@implements(np.append)
def append(arr, values, axis=None):
    if axis is None:
        return concatenate([ravel(arr), ravel(values)])
    return concatenate([arr, values], axis=axis)


@implements(np.rot90)
def rot90(m, k=1, axes=(0, 1)):
    a0, a1 = axes
    k %= 4
    if k == 0:
        return _operand(m)
    if k == 2:
        return flip(flip(m, a0), a1)
    if k == 1:
        return swapaxes(flip(m, a1), a0, a1)
    return flip(swapaxes(m, a0, a1), a1)


@implements(np.sinc)
def sinc(x):
    x = _operand(x)
    y = apply_ufunc(np.multiply, np.pi, where(apply_ufunc(np.equal, x, 0), 1.0e-20, x))
    return apply_ufunc(np.true_divide, apply_ufunc(np.sin, y), y)


@implements(np.meshgrid)
def meshgrid(*xi, copy=True, sparse=False, indexing="xy"):
    n = len(xi)
    dims = list(range(n))
    if indexing == "xy" and n > 1:
        dims[0], dims[1] = 1, 0
    out = [reshape(x, tuple(-1 if d == dims[i] else 1 for d in range(n))) for i, x in enumerate(xi)]
    return tuple(out) if sparse else tuple(broadcast_arrays(*out))


@implements(np.kron)
def kron(a, b):
    a, b = _operand(a), _operand(b)
    nd = builtins.max(len(_shape(a)), len(_shape(b)))
    sa = (1,) * (nd - len(_shape(a))) + tuple(_shape(a))
    sb = (1,) * (nd - len(_shape(b))) + tuple(_shape(b))
    pa = reshape(a, tuple(itertools.chain.from_iterable((n, 1) for n in sa)))
    pb = reshape(b, tuple(itertools.chain.from_iterable((1, n) for n in sb)))
    return reshape(apply_ufunc(np.multiply, pa, pb), tuple(x * y for x, y in zip(sa, sb)))


@implements(np.cross)
def cross(a, b, axisa=-1, axisb=-1, axisc=-1, axis=None):
    if axis is not None:
        axisa = axisb = axisc = axis
    a, b = moveaxis(a, axisa, -1), moveaxis(b, axisb, -1)
    if _shape(a)[-1] != 3 or _shape(b)[-1] != 3:
        raise NotImplementedError("numpy.cross on traced values supports 3-vectors only")
    a0, a1, a2 = (a[..., i] for i in range(3))
    b0, b1, b2 = (b[..., i] for i in range(3))
    mul, sub = (lambda x, y: apply_ufunc(np.multiply, x, y)), (lambda x, y: apply_ufunc(np.subtract, x, y))
    c = stack([sub(mul(a1, b2), mul(a2, b1)), sub(mul(a2, b0), mul(a0, b2)), sub(mul(a0, b1), mul(a1, b0))], -1)
    return moveaxis(c, -1, axisc)


# ---------------------------------------------------------------------------------------------
# misc
# ---------------------------------------------------------------------------------------------

implements(np.shape)(lambda x: tuple(_shape(x)))
implements(np.ndim)(lambda x: len(_shape(x)))
implements(np.size)(lambda x, axis=None: math.prod(_shape(x)) if axis is None else _shape(x)[axis])
implements(np.result_type)(lambda *xs: np.result_type(*[_dummy(x) if isinstance(x, Tracer) else x for x in xs]))
implements(np.astype)(lambda x, dtype, /, *, copy=True, device=None: astype(x, dtype)) if hasattr(np, "astype") else None
implements(np.copy)(lambda x, order="K", subok=False: _operand(x))
implements(np.diff)(lambda x, n=1, axis=-1: _diff(x, n, axis))
implements(np.trace)(lambda x, offset=0, axis1=0, axis2=1, dtype=None, out=None: _trace(x, offset, axis1, axis2))
implements(np.linalg.norm)(lambda x, ord=None, axis=None, keepdims=False: _norm(x, ord, axis, keepdims))
implements(np.linalg.vector_norm)(lambda x, /, *, axis=None, keepdims=False, ord=2: _vector_norm(
    astype(x, np.float64) if _dtype(x).kind in "biu" else _operand(x), ord, _axes(axis, len(_shape(x))), keepdims))
implements(np.linalg.matrix_norm)(lambda x, /, *, keepdims=False, ord="fro": _norm(x, ord, (-2, -1), keepdims))
implements(np.allclose)(lambda *a, **k: _concrete_needed("numpy.allclose"))
implements(np.array_equal)(lambda *a, **k: _concrete_needed("numpy.array_equal"))


def _concrete_needed(name):
    raise TracingError(f"{name} returns a Python bool, which needs concrete values; inside a traced "
                       f"function use np.isclose(...).all() or compare after the function returns.")


def _diff(x, n, axis):
    x = _operand(x)
    ax = _axis(axis, len(_shape(x)))
    for _ in range(n):
        m = _shape(x)[ax]
        x = apply_ufunc(np.subtract, _slice_axis(x, ax, 1, m), _slice_axis(x, ax, 0, m - 1))
    return x


@implements(np.diagonal)
def diagonal(x, offset=0, axis1=0, axis2=1):
    """The diagonal of dims ``axis1, axis2`` as the last dim: a ``take`` from their merger."""
    x = _operand(x)
    nd = len(_shape(x))
    a1, a2 = _axis(axis1, nd), _axis(axis2, nd)
    if a1 == a2:
        raise ValueError("axis1 and axis2 cannot be the same")
    x = moveaxis(x, (a1, a2), (-2, -1))
    *lead, n1, n2 = _shape(x)
    rows = np.arange(builtins.max(0, -offset), builtins.max(builtins.min(n1, n2 - offset), 0))
    return take(reshape(x, tuple(lead) + (n1 * n2,)), rows * n2 + rows + offset, axis=-1)


@implements(np.diag)
def diag(v, k=0):
    v = _operand(v)
    if len(_shape(v)) == 2:
        return diagonal(v, k)
    if len(_shape(v)) != 1:
        raise ValueError("Input must be 1- or 2-d.")
    n = _shape(v)[0] + abs(k)
    vp = reshape(pad(v, (0, abs(k))), (n, 1) if k >= 0 else (1, n))
    return where(np.eye(n, k=k, dtype=bool), vp, np.zeros((), _dtype(v)))


def _trace(x, offset, axis1, axis2):
    x = _operand(x)
    shape = _shape(x)
    mask = np.eye(shape[axis1], shape[axis2], offset, dtype=bool)
    mshape = [1] * len(shape)
    mshape[axis1], mshape[axis2] = shape[axis1], shape[axis2]
    return sum(where(mask.reshape(mshape), x, 0), axis=(axis1, axis2))


def _norm(x, ord, axis, keepdims):
    """Vector norms of any order; matrix norms 'fro', 1, -1, inf, -inf (2, -2 and 'nuc' need an SVD)."""
    x = _operand(x)
    if _dtype(x).kind in "biu":
        x = astype(x, np.float64)
    nd = len(_shape(x))
    if axis is None and ord is None:            # the 2-norm of the flattened array ('fro' for matrices)
        return _vector_norm(x, 2, tuple(range(nd)), keepdims)
    axes = list(range(nd)) if axis is None else [_axis(a, nd) for a in (axis if isinstance(axis, (tuple, list)) else [axis])]
    if len(axes) == 1:
        return _vector_norm(x, 2 if ord is None else ord, tuple(axes), keepdims)
    if len(axes) != 2:
        raise ValueError("Improper number of dimensions to norm.")
    if ord in (None, "fro"):
        return _vector_norm(x, 2, tuple(axes), keepdims)
    if ord not in (1, -1, np.inf, -np.inf):
        raise NotImplementedError(f"numpy.linalg.norm with ord={ord!r} on traced values (needs an SVD)")
    inner, outer = (axes[0], axes[1]) if ord in (1, -1) else (axes[1], axes[0])
    sums = sum(apply_ufunc(np.absolute, x), inner, keepdims=True)
    out = (amax if ord > 0 else amin)(sums, outer, keepdims=True)
    return out if keepdims else squeeze(out, tuple(axes))


def _vector_norm(x, ord, axes, keepdims):
    a = apply_ufunc(np.absolute, x)
    if ord == np.inf:
        return amax(a, axes, keepdims=keepdims)
    if ord == -np.inf:
        return amin(a, axes, keepdims=keepdims)
    if ord == 0:
        return sum(astype(apply_ufunc(np.not_equal, a, 0), _dtype(a)), axes, keepdims=keepdims)
    if ord == 1:
        return sum(a, axes, keepdims=keepdims)
    if ord == 2:
        return apply_ufunc(np.sqrt, sum(apply_ufunc(np.multiply, a, a), axes, keepdims=keepdims))
    return apply_ufunc(np.power, sum(apply_ufunc(np.power, a, ord), axes, keepdims=keepdims), 1.0 / ord)


def _asarray(x, dtype=None, order=None, **kw):
    x = _operand(x)
    return astype(x, dtype) if dtype is not None else x


HANDLED_FUNCTIONS[np.asarray] = _asarray
HANDLED_FUNCTIONS[np.array] = _asarray


# ---------------------------------------------------------------------------------------------
# Tracer methods
# ---------------------------------------------------------------------------------------------

def _install_methods():
    T = Tracer
    T.__getitem__ = getitem
    T.__matmul__ = lambda s, o: matmul(s, o)
    T.__rmatmul__ = lambda s, o: matmul(o, s)
    T.sum = lambda s, axis=None, dtype=None, out=None, keepdims=False, **k: sum(s, axis, dtype, keepdims=keepdims, **k)
    T.prod = lambda s, axis=None, dtype=None, out=None, keepdims=False, **k: prod(s, axis, dtype, keepdims=keepdims, **k)
    T.mean = lambda s, axis=None, dtype=None, out=None, keepdims=False: mean(s, axis, dtype, keepdims=keepdims)
    T.var = lambda s, axis=None, dtype=None, out=None, ddof=0, keepdims=False: var(s, axis, dtype, ddof=ddof, keepdims=keepdims)
    T.std = lambda s, axis=None, dtype=None, out=None, ddof=0, keepdims=False: std(s, axis, dtype, ddof=ddof, keepdims=keepdims)
    T.max = lambda s, axis=None, out=None, keepdims=False, **k: amax(s, axis, keepdims=keepdims, **k)
    T.min = lambda s, axis=None, out=None, keepdims=False, **k: amin(s, axis, keepdims=keepdims, **k)
    T.all = lambda s, axis=None, out=None, keepdims=False: all_(s, axis, keepdims=keepdims)
    T.any = lambda s, axis=None, out=None, keepdims=False: any_(s, axis, keepdims=keepdims)
    T.argmax = lambda s, axis=None, out=None, keepdims=False: _arg(prims.argmax_p, s, axis, keepdims)
    T.argmin = lambda s, axis=None, out=None, keepdims=False: _arg(prims.argmin_p, s, axis, keepdims)
    T.cumsum = lambda s, axis=None, dtype=None, out=None: _cum(prims.cumsum_p, s, axis, dtype)
    T.cumprod = lambda s, axis=None, dtype=None, out=None: _cum(prims.cumprod_p, s, axis, dtype)
    T.reshape = lambda s, *shape, order="C": reshape(s, shape[0] if len(shape) == 1 else shape, order)
    T.transpose = lambda s, *axes: transpose(s, (axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else axes) or None)
    T.swapaxes = swapaxes
    T.squeeze = lambda s, axis=None: squeeze(s, axis)
    T.ravel = lambda s, order="C": ravel(s, order)
    T.flatten = lambda s, order="C": ravel(s, order)
    T.astype = lambda s, dtype, **k: astype(s, dtype)
    T.clip = lambda s, min=None, max=None: clip(s, min, max)
    T.round = lambda s, decimals=0: round_(s, decimals)
    T.__round__ = lambda s, ndigits=None: round_(s, ndigits or 0)
    T.__divmod__ = lambda s, o: apply_ufunc(np.divmod, s, o)
    T.__rdivmod__ = lambda s, o: apply_ufunc(np.divmod, o, s)
    T.conj = T.conjugate = lambda s: apply_ufunc(np.conjugate, s)
    T.dot = lambda s, o: dot(s, o)
    T.take = lambda s, indices, axis=None, out=None, mode=None: take(s, indices, axis, out, mode)
    T.argsort = lambda s, axis=-1, kind=None: argsort(s, axis)
    T.diagonal = lambda s, offset=0, axis1=0, axis2=1: diagonal(s, offset, axis1, axis2)
    T.trace = lambda s, offset=0, axis1=0, axis2=1, dtype=None, out=None: _trace(s, offset, axis1, axis2)
    T.searchsorted = lambda s, v, side="left", sorter=None: searchsorted(s, v, side, sorter)
    T.nonzero = lambda s: handle_function(np.nonzero, (s,), {})
    T.repeat = lambda s, repeats, axis=None: repeat(s, repeats, axis)
    T.copy = lambda s: s
    T.T = property(lambda s: transpose(s))
    T.mT = property(lambda s: swapaxes(s, -1, -2))
    T.real = property(lambda s: HANDLED_FUNCTIONS[np.real](s))
    T.imag = property(lambda s: HANDLED_FUNCTIONS[np.imag](s))
    T.itemsize = property(lambda s: np.dtype(s.dtype).itemsize)
    T.nbytes = property(lambda s: s.size * np.dtype(s.dtype).itemsize)

    def setitem(s, key, value):
        raise TypeError("traced values are immutable: `x[idx] = v` is not supported; build a new "
                        "value with np.where(mask, v, x) or np.concatenate.")
    T.__setitem__ = setitem

    def in_place(name, instead):
        def method(s, *args, **kwargs):
            raise TypeError(f"x.{name}() changes x in place, but traced values are immutable; use "
                            f"{instead} instead.")
        return method
    T.sort = in_place("sort", "x = np.sort(x)")
    T.fill = in_place("fill", "np.full_like(x, value)")
    T.resize = in_place("resize", "np.reshape or np.pad")


_install_methods()


hooks.handle_ufunc, hooks.handle_function = handle_ufunc, handle_function
