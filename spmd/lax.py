"""``jax.lax``'s functions under their JAX names, so ``import spmd.lax as lax`` ports a program.

The primitives live in ``spmd.prims`` (one block each, with all their rules); this module is
the API a program calls: the collectives, ``pcast`` and ``stop_gradient``, the elementwise
functions (which, as in JAX, take operands of one dtype: Python scalars adopt it), shapes and
slices, reductions, sorts, ``dot_general`` and ``conv_general_dilated`` (as NumPy code over
primitives, so their gradients are the composition's), ``top_k``, ``reduce_precision``; and
the primitives of ``jax.lax.linalg`` (``solve``, ``cholesky``, ``eigh``, ``qr``, ``svd``), which
also give ``numpy.linalg``'s functions their rules on traced values.

>>> import numpy as np, spmd, spmd.lax as lax
>>> mesh = spmd.make_mesh((8,), ("i",))
>>> f = spmd.shard_map(lambda x: lax.psum(x, "i"), mesh=mesh, in_specs=spmd.P("i"), out_specs=spmd.P())
>>> np.asarray(f(np.arange(8.))).tolist()
[28.0]
>>> np.asarray(lax.dynamic_slice(np.arange(10), (-3,), (2,))).tolist()
[7, 8]
"""
from __future__ import annotations

import builtins
import enum
import math
import types
from typing import NamedTuple

import numpy as np

from . import _xla_math, ad_util, prims
from . import numpy as _snp
from .numpy_api import HANDLED_FUNCTIONS, implements
from .collectives import (all_gather, all_to_all, axis_index, axis_size, pbroadcast, pcast, pmax,
                          pmean, pmin, ppermute, psum, psum_scatter, pvary)
from .control_flow import cond, fori_loop, map, scan, switch, while_loop
from .core import Aval, Primitive, Tracer, aval_of, bind
from .custom_derivatives import custom_jvp
from .jit import with_sharding_constraint
from .prims import stop_gradient

__all__ = [
    # collectives and AD
    "all_gather", "all_to_all", "axis_index", "axis_size", "pbroadcast", "pmax", "pmean", "pmin",
    "ppermute", "psum", "psum_scatter", "pvary", "pcast", "stop_gradient",
    "with_sharding_constraint", "optimization_barrier",
    # control flow
    "cond", "fori_loop", "map", "scan", "switch", "while_loop",
    # elementwise
    "abs", "acos", "acosh", "add", "asin", "asinh", "atan", "atan2", "atanh", "bitwise_and",
    "bitwise_not", "bitwise_or", "bitwise_xor", "cbrt", "ceil", "clamp", "conj", "cos", "cosh",
    "div", "eq", "erf", "erf_inv", "exp", "exp2", "expm1", "floor", "ge", "gt", "imag",
    "integer_pow", "is_finite", "le", "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne",
    "neg", "pow", "real", "reciprocal", "rem", "round", "RoundingMethod", "rsqrt",
    "select", "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign",
    "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "convert_element_type",
    "bitcast_convert_type", "reduce_precision",
    # shapes and slices
    "broadcast", "broadcast_in_dim", "broadcasted_iota", "collapse", "concatenate",
    "dynamic_index_in_dim", "dynamic_slice", "dynamic_slice_in_dim", "dynamic_update_index_in_dim",
    "dynamic_update_slice", "dynamic_update_slice_in_dim", "expand_dims", "full", "full_like",
    "index_in_dim", "iota", "pad", "reshape", "rev", "slice", "slice_in_dim", "squeeze",
    "transpose",
    # reductions, scans, sorts
    "argmax", "argmin", "cummax", "cummin", "cumprod", "cumsum", "cumlogsumexp", "reduce_and",
    "reduce_max", "reduce_min", "reduce_or", "reduce_prod", "reduce_sum", "sort", "sort_key_val",
    "top_k", "approx_max_k", "approx_min_k",
    # contractions
    "dot", "dot_general", "batch_matmul", "conv_general_dilated", "conv", "conv_transpose",
    "ConvDimensionNumbers", "Precision",
    # linear algebra (jax.lax.linalg)
    "linalg",
]


def _operand(x):
    """A traced value as it is; anything else as a NumPy array (Python scalars stay weak)."""
    if isinstance(x, Tracer) or type(x) in (bool, int, float, complex):
        return x
    return np.asarray(x)


def _dtype(x):
    return aval_of(x).dtype


def _weak(x) -> bool:
    return type(x) in (bool, int, float, complex) or (isinstance(x, Tracer) and x.aval.weak)


def _same_dtypes(name, *xs):
    """lax's elementwise functions take one dtype (Python scalars adopt it), as JAX does."""
    xs = [_operand(x) for x in xs]
    strong = {np.dtype(_dtype(x)) for x in xs if not _weak(x)}
    if len(strong) > 1:
        raise TypeError(f"lax.{name} requires arguments to have the same dtypes, got "
                        f"{', '.join(sorted(d.name for d in strong))}. (Cast with "
                        f"lax.convert_element_type or .astype first.)")
    if strong:
        dt = strong.pop()
        xs = [np.asarray(x, dt) if type(x) in (bool, int, float, complex) else x for x in xs]
    return xs


def _elementwise(name, fn, n=1):
    def op(*xs):
        if len(xs) != n:
            raise TypeError(f"lax.{name} takes {n} operand{'s' if n > 1 else ''}, got {len(xs)}")
        return fn(*_same_dtypes(name, *xs))
    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"JAX's ``lax.{name}``: operands of one dtype (Python scalars adopt it)."
    return op


_UNARY = {"abs": np.abs, "acos": np.arccos, "acosh": np.arccosh, "asin": np.arcsin,
          "asinh": np.arcsinh, "atan": np.arctan, "atanh": np.arctanh, "bitwise_not": np.invert,
          "cbrt": np.cbrt, "ceil": np.ceil, "conj": np.conj, "cos": np.cos, "cosh": np.cosh,
          "exp": np.exp, "exp2": np.exp2, "expm1": np.expm1, "floor": np.floor, "imag": np.imag,
          "is_finite": np.isfinite, "log": np.log, "log1p": np.log1p, "neg": np.negative,
          "real": np.real, "reciprocal": np.reciprocal, "sign": np.sign, "sin": np.sin,
          "sinh": np.sinh, "sqrt": np.sqrt, "square": np.square, "tan": np.tan, "tanh": np.tanh}
_BINARY = {"add": np.add, "atan2": np.arctan2, "bitwise_and": np.bitwise_and,
           "bitwise_or": np.bitwise_or, "bitwise_xor": np.bitwise_xor, "eq": np.equal,
           "ge": np.greater_equal, "gt": np.greater, "le": np.less_equal, "lt": np.less,
           "max": np.maximum, "min": np.minimum, "mul": np.multiply, "ne": np.not_equal,
           "pow": np.power, "rem": np.fmod, "shift_left": np.left_shift,
           "shift_right_arithmetic": np.right_shift, "sub": np.subtract}
globals().update({k: _elementwise(k, f) for k, f in _UNARY.items()})
globals().update({k: _elementwise(k, f, 2) for k, f in _BINARY.items()})


def _div(x, y):
    if np.dtype(_dtype(x)).kind in "iu":         # integer division rounds toward zero (C)
        q = np.abs(x) // np.abs(y)
        return np.where((x < 0) != (y < 0), -q, q).astype(_dtype(x))
    return np.true_divide(x, y)


div = _elementwise("div", _div, 2)


def _shift_right_logical(x, y):
    dt = np.dtype(_dtype(x))
    unsigned = np.dtype(f"uint{dt.itemsize * 8}")
    out = np.right_shift(x.astype(unsigned), y.astype(unsigned))
    out = np.where(y.astype(unsigned) >= dt.itemsize * 8, np.zeros((), unsigned), out)
    return out.astype(dt)


def _array(x):
    return x if isinstance(x, Tracer) else np.asarray(x)


shift_right_logical = _elementwise("shift_right_logical",
                                   lambda x, y: _shift_right_logical(_array(x), _array(y)), 2)


def logistic(x):
    """``1 / (1 + exp(-x))`` (one primitive)."""
    x = _operand(x)
    return bind(prims.logistic_p, x) if isinstance(x, Tracer) else 1 / (1 + np.exp(-x))


def rsqrt(x):
    """``1 / sqrt(x)`` (one primitive)."""
    x = _operand(x)
    return bind(prims.rsqrt_p, x) if isinstance(x, Tracer) else 1 / np.sqrt(x)


@custom_jvp
def erf(x):
    """The error function as XLA computes it on the CPU; its derivative is the exact
    ``2/sqrt(pi) exp(-x^2)`` (not the derivative of the approximation)."""
    return _xla_math.erf(_operand(x))


erf.defjvp(lambda p, t: (erf(p[0]), t[0] * (2 / math.sqrt(math.pi)) * np.exp(-p[0] * p[0])))


@custom_jvp
def erf_inv(x):
    """The inverse error function as XLA computes it on the CPU (exact derivative)."""
    return _xla_math.erf_inv(_operand(x))


erf_inv.defjvp(lambda p, t: (erf_inv(p[0]), t[0] * (math.sqrt(math.pi) / 2)
                             * np.exp(erf_inv(p[0]) * erf_inv(p[0]))))


def integer_pow(x, y: int):
    """``x ** y`` for a Python int ``y``, by repeated squaring (as XLA expands it)."""
    if not isinstance(y, (int, np.integer)):
        raise TypeError(f"lax.integer_pow: the exponent must be a Python int, got "
                        f"{type(y).__name__}")
    x = _operand(x)
    if y == 0:
        return np.ones_like(x)
    acc, base, n = None, x, builtins.abs(int(y))
    while n:
        if n & 1:
            acc = base if acc is None else acc * base
        n >>= 1
        if n:
            base = base * base
    return 1 / acc if y < 0 else acc


class RoundingMethod(enum.IntEnum):
    AWAY_FROM_ZERO = 0
    TO_NEAREST_EVEN = 1


def round(x, rounding_method=RoundingMethod.AWAY_FROM_ZERO):  # noqa: A001 (JAX's name)
    """Round to an integral value; ties away from zero by default (not NumPy's ties-to-even)."""
    x = _operand(x)
    if RoundingMethod(rounding_method) == RoundingMethod.TO_NEAREST_EVEN:
        return np.round(x)
    t = np.trunc(x)
    return np.where(np.abs(x - t) >= 0.5, t + np.sign(x), t)


def clamp(min, x, max):  # noqa: A002 (JAX's names)
    """``x`` limited to ``[min, max]``."""
    x, lo, hi = _same_dtypes("clamp", x, min, max)
    return np.minimum(np.maximum(x, lo), hi)


def select(pred, on_true, on_false):
    """``on_true`` where ``pred``, else ``on_false``: operands of one shape and dtype."""
    pred, on_true, on_false = _operand(pred), *_same_dtypes("select", on_true, on_false)
    if np.dtype(_dtype(pred)) != np.bool_:
        raise TypeError(f"lax.select: pred must be boolean, got {np.dtype(_dtype(pred)).name}")
    shapes = {tuple(aval_of(v).shape) for v in (on_true, on_false)}
    if len(shapes) > 1 or (np.ndim(pred) if not isinstance(pred, Tracer) else pred.ndim) and \
            (pred.shape if isinstance(pred, Tracer) else np.shape(pred)) not in shapes:
        raise TypeError(f"lax.select: pred, on_true and on_false must have one shape (pred may be "
                        f"a scalar), got {[aval_of(v).shape for v in (pred, on_true, on_false)]}")
    return np.where(pred, on_true, on_false)


def select_n(which, *cases):
    """``cases[which]`` elementwise (``which`` boolean for two cases, else an integer)."""
    if not cases:
        raise ValueError("lax.select_n: at least one case is required")
    which, cases = _operand(which), _same_dtypes("select_n", *cases)
    out = cases[0]
    for i, c in enumerate(cases[1:], 1):
        out = np.where(which == i if np.dtype(_dtype(which)) != np.bool_ else which, c, out)
    return out


def convert_element_type(operand, new_dtype):
    return np.asarray(_operand(operand)).astype(new_dtype) if not isinstance(operand, Tracer) \
        else operand.astype(new_dtype)


def bitcast_convert_type(operand, new_dtype):
    """The bits of ``operand`` read as ``new_dtype`` (of the same width)."""
    return _xla_math.bitcast(_operand(operand), np.dtype(new_dtype))


def reduce_precision(operand, exponent_bits: int, mantissa_bits: int):
    """``operand`` rounded (to nearest even) to a float format with that many exponent and
    mantissa bits, out-of-range values going to infinity or zero, as XLA does."""
    x = _operand(operand)
    dt = np.dtype(_dtype(x))
    if dt.kind != "f":
        raise TypeError(f"lax.reduce_precision takes a floating point operand, got {dt.name}")
    info = np.finfo(dt)
    src_m, src_e, nbits = info.nmant, dt.itemsize * 8 - 1 - info.nmant, dt.itemsize * 8
    utype = np.dtype(f"uint{nbits}")
    u = lambda v: np.asarray(v, utype)
    bits = _xla_math.bitcast(x, utype)
    if mantissa_bits < src_m:
        drop = src_m - mantissa_bits
        bias = np.bitwise_and(np.right_shift(bits, u(drop)), u(1)) + u((1 << (drop - 1)) - 1)
        bits = np.bitwise_and(bits + bias, u(~((1 << drop) - 1) & ((1 << nbits) - 1)))
    if exponent_bits < src_e:
        exp_mask = ((1 << src_e) - 1) << src_m
        src_bias, red_bias = (1 << (src_e - 1)) - 1, (1 << (exponent_bits - 1)) - 1
        exponent = np.bitwise_and(bits, u(exp_mask))
        signed_zero = np.bitwise_and(bits, u(1 << (nbits - 1)))
        bits = np.where(exponent > u((src_bias + red_bias) << src_m),
                        np.bitwise_or(signed_zero, u(exp_mask)),
                        np.where(exponent <= u((src_bias - red_bias) << src_m), signed_zero, bits))
    out = _xla_math.bitcast(bits, dt)
    if mantissa_bits < src_m:
        out = np.where(np.isnan(x), x if mantissa_bits > 0 else np.asarray(np.inf, dt), out)
    return out


# ---------------------------------------------------------------------------------------------
# shapes and slices
# ---------------------------------------------------------------------------------------------

def broadcast_in_dim(operand, shape, broadcast_dimensions, out_sharding=None):
    """``operand`` placed in ``shape``: its dim ``i`` becomes dim ``broadcast_dimensions[i]``."""
    x = _operand(operand)
    shape, dims = tuple(int(s) for s in shape), tuple(int(d) for d in broadcast_dimensions)
    nd = np.ndim(x) if not isinstance(x, Tracer) else x.ndim
    if len(dims) != nd or list(dims) != sorted(set(dims)) or any(d >= len(shape) for d in dims):
        raise TypeError(f"lax.broadcast_in_dim: broadcast_dimensions {dims} must be strictly "
                        f"increasing, one per operand dim ({nd}), each below the rank {len(shape)}")
    if not isinstance(x, Tracer):
        x = np.asarray(x)
        return np.broadcast_to(x.reshape([x.shape[dims.index(d)] if d in dims else 1
                                          for d in range(len(shape))]), shape)
    return bind(prims.broadcast_in_dim_p, x, shape=shape, dims=dims)


def broadcast(operand, sizes):
    """``operand`` with the dims ``sizes`` added in front."""
    nd = np.ndim(operand) if not isinstance(operand, Tracer) else operand.ndim
    sizes = tuple(sizes)
    return broadcast_in_dim(operand, sizes + tuple(np.shape(operand) if not isinstance(
        operand, Tracer) else operand.shape), tuple(range(len(sizes), len(sizes) + nd)))


def reshape(operand, new_sizes, dimensions=None, out_sharding=None):
    """``operand`` reshaped (after transposing by ``dimensions``, if given)."""
    x = _operand(operand)
    if dimensions is not None:
        x = np.transpose(x, dimensions)
    return np.reshape(x, tuple(new_sizes))


def transpose(operand, permutation):
    return np.transpose(_operand(operand), tuple(permutation))


def rev(operand, dimensions):
    return np.flip(_operand(operand), tuple(dimensions)) if len(dimensions) else _operand(operand)


def squeeze(array, dimensions):
    return np.squeeze(_operand(array), tuple(dimensions))


def expand_dims(array, dimensions):
    return np.expand_dims(_operand(array), tuple(dimensions))


def collapse(operand, start_dimension, stop_dimension=None):
    """Dims ``start_dimension:stop_dimension`` merged into one."""
    shape = aval_of(_operand(operand)).shape
    stop = len(shape) if stop_dimension is None else stop_dimension
    return np.reshape(operand, shape[:start_dimension] + (math.prod(shape[start_dimension:stop]),)
                      + shape[stop:])


def concatenate(operands, dimension):
    return np.concatenate([_operand(x) for x in operands], axis=dimension)


def pad(operand, padding_value, padding_config):
    """``operand`` padded by ``(low, high, interior)`` per dim; negative low/high crop."""
    x, v = _operand(operand), _operand(padding_value)
    cfg = [tuple(int(c) for c in p) for p in padding_config]
    if len(cfg) != aval_of(x).ndim:
        raise ValueError(f"lax.pad: padding_config has {len(cfg)} entries for an operand of rank "
                         f"{aval_of(x).ndim}")
    for d, (lo, hi, interior) in enumerate(cfg):
        if interior < 0:
            raise ValueError(f"lax.pad: interior padding must be non-negative, got {interior}")
        if interior:
            x = _interleave(x, d, interior, v)
        n = aval_of(x).shape[d]
        x = _slice_dim(x, d, builtins.max(-lo, 0), n - builtins.max(-hi, 0))
        if lo > 0 or hi > 0:
            width = [(0, 0)] * aval_of(x).ndim
            width[d] = (builtins.max(lo, 0), builtins.max(hi, 0))
            x = np.pad(x, width, constant_values=v) if not isinstance(v, Tracer) else \
                bind(prims.pad_p, x, v, config=tuple(width))
    return x


def _interleave(x, d, k, v):
    """``k`` copies of ``v`` between neighbours along dim ``d``."""
    shape = aval_of(x).shape
    n = shape[d]
    if n == 0:
        return x
    x = np.expand_dims(x, d + 1)
    fill = np.broadcast_to(np.asarray(v, _dtype(x)) if not isinstance(v, Tracer) else v,
                           shape[:d + 1] + (k,) + shape[d + 1:])
    x = np.concatenate([x, fill], axis=d + 1)
    x = np.reshape(x, shape[:d] + (n * (k + 1),) + shape[d + 1:])
    return _slice_dim(x, d, 0, n * (k + 1) - k)


def _slice_dim(x, d, start, stop, step=1):
    idx = [builtins.slice(None)] * aval_of(x).ndim
    idx[d] = builtins.slice(start, stop, step)
    return x[tuple(idx)]


def slice(operand, start_indices, limit_indices, strides=None):  # noqa: A001 (JAX's name)
    x = _operand(operand)
    strides = strides or (1,) * len(start_indices)
    return x[tuple(builtins.slice(int(a), int(b), int(s))
                   for a, b, s in zip(start_indices, limit_indices, strides))]


def slice_in_dim(operand, start_index, limit_index, stride=1, axis=0):
    x = _operand(operand)
    n = aval_of(x).shape[axis]
    start = 0 if start_index is None else start_index % n if start_index < 0 else start_index
    limit = n if limit_index is None else limit_index % n if limit_index < 0 else limit_index
    return _slice_dim(x, axis, start, limit, stride)


def index_in_dim(operand, index, axis=0, keepdims=True):
    x = _operand(operand)
    n = aval_of(x).shape[axis]
    i = index + n if index < 0 else index
    if not 0 <= i < n:
        raise IndexError(f"lax.index_in_dim: index {index} is out of bounds for axis {axis} with "
                         f"size {n}")
    out = _slice_dim(x, axis, i, i + 1)
    return out if keepdims else np.squeeze(out, axis)


def _start(i, n):
    """A start index as lax takes it: negative ones count from the end (then XLA clamps)."""
    if isinstance(i, Tracer):
        return np.where(i < 0, i + n, i)
    return int(i) + n if int(i) < 0 else int(i)


def dynamic_slice(operand, start_indices, slice_sizes):
    """``operand[start : start + size]`` per dim with traced starts, clamped to fit."""
    x = _operand(operand)
    shape = aval_of(x).shape
    starts = list(start_indices) if not isinstance(start_indices, Tracer) else \
        [start_indices[i] for i in range(start_indices.shape[0])]
    if len(starts) != len(shape) or len(slice_sizes) != len(shape):
        raise TypeError(f"lax.dynamic_slice: an operand of rank {len(shape)} needs {len(shape)} "
                        f"start indices and slice sizes, got {len(starts)} and {len(slice_sizes)}")
    sizes = tuple(int(s) for s in slice_sizes)
    if any(not 0 <= s <= n for s, n in zip(sizes, shape)):
        raise TypeError(f"lax.dynamic_slice: slice sizes {sizes} must be within the operand's "
                        f"shape {shape}")
    return bind(prims.dynamic_slice_p, x, *[_start(s, n) for s, n in zip(starts, shape)],
                sizes=sizes)


def dynamic_slice_in_dim(operand, start_index, slice_size, axis=0):
    shape = aval_of(_operand(operand)).shape
    starts = [0] * len(shape)
    starts[axis] = start_index
    sizes = [slice_size if d == axis else n for d, n in enumerate(shape)]
    return dynamic_slice(operand, starts, sizes)


def dynamic_index_in_dim(operand, index, axis=0, keepdims=True):
    out = dynamic_slice_in_dim(operand, index, 1, axis)
    return out if keepdims else np.squeeze(out, axis)


def dynamic_update_slice(operand, update, start_indices):
    """``operand`` with ``update`` written at ``start_indices`` (clamped to fit)."""
    x, upd = _same_dtypes("dynamic_update_slice", operand, update)
    shape = aval_of(x).shape
    starts = list(start_indices) if not isinstance(start_indices, Tracer) else \
        [start_indices[i] for i in range(start_indices.shape[0])]
    if len(starts) != len(shape) or aval_of(upd).ndim != len(shape):
        raise TypeError(f"lax.dynamic_update_slice: operand, update and start_indices must have "
                        f"one rank, got {len(shape)}, {aval_of(upd).ndim} and {len(starts)}")
    return bind(prims.dynamic_update_slice_p, x, upd,
                *[_start(s, n) for s, n in zip(starts, shape)])


def dynamic_update_slice_in_dim(operand, update, start_index, axis):
    starts = [0] * aval_of(_operand(operand)).ndim
    starts[axis] = start_index
    return dynamic_update_slice(operand, update, starts)


def dynamic_update_index_in_dim(operand, update, index, axis):
    update = _operand(update)
    if aval_of(update).ndim == aval_of(_operand(operand)).ndim - 1:
        update = np.expand_dims(update, axis)
    return dynamic_update_slice_in_dim(operand, update, index, axis)


def iota(dtype, size):
    return bind(prims.iota_p, dtype=np.dtype(dtype), shape=(int(size),), dimension=0)


def broadcasted_iota(dtype, shape, dimension):
    return bind(prims.iota_p, dtype=np.dtype(dtype), shape=tuple(int(s) for s in shape),
                dimension=int(dimension))


def full(shape, fill_value, dtype=None):
    dt = np.dtype(dtype) if dtype is not None else np.asarray(fill_value).dtype
    return np.full(tuple(shape), np.asarray(fill_value, dt))


def full_like(x, fill_value, dtype=None, shape=None):
    return np.full_like(_operand(x), fill_value, dtype=dtype, shape=shape)


def optimization_barrier(operand):
    """The identity on a pytree (spmd does not reorder across it to begin with)."""
    return operand


# ---------------------------------------------------------------------------------------------
# reductions, scans, sorts
# ---------------------------------------------------------------------------------------------

def _reduce(name, fn):
    def reduce(operand, axes):
        x = _operand(operand)
        out = fn(x, axis=tuple(axes))
        return out.astype(_dtype(x)) if _dtype(out) != _dtype(x) else out   # NumPy widens ints
    reduce.__name__ = name
    return reduce


reduce_sum, reduce_prod = _reduce("reduce_sum", np.sum), _reduce("reduce_prod", np.prod)
reduce_max, reduce_min = _reduce("reduce_max", np.max), _reduce("reduce_min", np.min)
reduce_and, reduce_or = _reduce("reduce_and", np.all), _reduce("reduce_or", np.any)


def argmax(operand, axis: int, index_dtype):
    return np.argmax(_operand(operand), axis=axis).astype(index_dtype)


def argmin(operand, axis: int, index_dtype):
    return np.argmin(_operand(operand), axis=axis).astype(index_dtype)


def _cumulative(prim):
    def f(operand, axis: int = 0, reverse: bool = False):
        x = _operand(operand)
        return bind(prim, x, axis=axis % builtins.max(aval_of(x).ndim, 1), reverse=bool(reverse))
    f.__name__ = prim.name
    return f


cumsum, cumprod = _cumulative(prims.cumsum_p), _cumulative(prims.cumprod_p)
cummax, cummin = _cumulative(prims.cummax_p), _cumulative(prims.cummin_p)


def cumlogsumexp(operand, axis: int = 0, reverse: bool = False):
    """``log(cumsum(exp(x)))``, computed stably."""
    x = _operand(operand)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return np.log(cumsum(np.exp(x - stop_gradient(m)), axis, reverse)) + stop_gradient(m)


def sort(operand, dimension: int = -1, is_stable: bool = True, num_keys: int = 1):
    """Sort along ``dimension``; a sequence of operands is sorted by its first ``num_keys``
    (lexicographically), the others permuted alike."""
    if isinstance(operand, (tuple, list)):
        ops = [_operand(x) for x in operand]
        if not 1 <= num_keys <= len(ops):
            raise ValueError(f"lax.sort: num_keys={num_keys} must be between 1 and the number of "
                             f"operands ({len(ops)})")
        perm = None
        for key in reversed(ops[:num_keys]):        # stable sorts, least significant key first
            k = key if perm is None else np.take_along_axis(key, perm, dimension)
            p = np.argsort(k, axis=dimension, stable=True)
            perm = p if perm is None else np.take_along_axis(perm, p, dimension)
        return tuple(np.take_along_axis(x, perm, dimension) for x in ops)
    if num_keys != 1:
        raise ValueError(f"lax.sort: num_keys={num_keys} needs a sequence of operands")
    return np.sort(_operand(operand), axis=dimension)


def sort_key_val(keys, values, dimension: int = -1, is_stable: bool = True):
    return sort((keys, values), dimension, is_stable, 1)


def top_k(operand, k: int):
    """The ``k`` largest entries along the last dim and their indices (int32), the lower index
    first among equals."""
    x = _operand(operand)
    n = aval_of(x).shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"lax.top_k: k={k} must be between 0 and the last dim's size ({n})")
    key = -x if np.dtype(_dtype(x)).kind in "fi" else -x.astype(np.int64)
    idx = np.argsort(key, axis=-1, stable=True)[..., :k]
    return np.take_along_axis(x, idx, -1), idx.astype(np.int32)


def _approx_k(largest):
    def f(operand, k: int, reduction_dimension: int = -1, recall_target: float = 0.95,
          reduction_input_size_override: int = -1, aggregate_to_topk: bool = True):
        """Exact: the top-k (a recall of 1 meets every ``recall_target``)."""
        x = np.moveaxis(_operand(operand), reduction_dimension, -1)
        vals, idx = top_k(x if largest else -x, k)
        vals = vals if largest else -vals
        return tuple(np.moveaxis(v, -1, reduction_dimension) for v in (vals, idx))
    return f


approx_max_k, approx_min_k = _approx_k(True), _approx_k(False)


# ---------------------------------------------------------------------------------------------
# contractions
# ---------------------------------------------------------------------------------------------

def _contract(x, y, contract, batch, preferred_element_type):
    x, y = _operand(x), _operand(y)
    dt = np.result_type(_dtype(x), _dtype(y))
    x, y = [v.astype(dt) if _dtype(v) != dt else v for v in (x, y)]
    out = bind(prims.dot_general_p, x, y, contract=contract, batch=batch)
    return out.astype(preferred_element_type) if preferred_element_type is not None else out


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                out_sharding=None):
    """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``: the result's dims are the
    batch dims, then ``lhs``'s free dims, then ``rhs``'s."""
    (lc, rc), (lb, rb) = dimension_numbers
    return _contract(lhs, rhs, (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)),
                     preferred_element_type)


def dot(lhs, rhs, precision=None, preferred_element_type=None, out_sharding=None):
    """Vector/matrix products: the last dim of ``lhs`` with the first of ``rhs``."""
    nl = aval_of(_operand(lhs)).ndim
    return _contract(lhs, rhs, ((nl - 1,), (0,)), ((), ()), preferred_element_type)


def batch_matmul(lhs, rhs, precision=None):
    nd = aval_of(_operand(lhs)).ndim
    b = tuple(range(nd - 2))
    return _contract(lhs, rhs, ((nd - 1,), (nd - 2,)), (b, b), None)


class ConvDimensionNumbers(NamedTuple):
    """Positions of (batch, feature, spatial...) in lhs and out, (out feature, in feature,
    spatial...) in rhs."""
    lhs_spec: tuple
    rhs_spec: tuple
    out_spec: tuple


def _conv_dimension_numbers(lhs_ndim, rhs_ndim, dimension_numbers) -> ConvDimensionNumbers:
    if dimension_numbers is None:
        iota_ = tuple(range(lhs_ndim))
        return ConvDimensionNumbers(iota_, tuple(range(rhs_ndim)), iota_)
    if isinstance(dimension_numbers, ConvDimensionNumbers):
        return dimension_numbers
    lhs, rhs, out = dimension_numbers
    if not isinstance(lhs, str):
        return ConvDimensionNumbers(tuple(lhs), tuple(rhs), tuple(out))

    def spec(s, first, second):
        spatial = [i for i, c in enumerate(s) if c not in (first, second)]
        rhs_spatial = [c for c in rhs if c not in "OI"]
        order = sorted(spatial, key=lambda i: rhs_spatial.index(s[i])) if s is not rhs else spatial
        return (s.index(first), s.index(second)) + tuple(order)
    return ConvDimensionNumbers(spec(lhs, "N", "C"), spec(rhs, "O", "I"), spec(out, "N", "C"))


def _same_pads(in_shape, window, strides, padding):
    if not isinstance(padding, str):
        return [tuple(int(v) for v in p) for p in padding]
    mode = padding.upper()
    if mode == "VALID":
        return [(0, 0)] * len(in_shape)
    if mode not in ("SAME", "SAME_LOWER"):
        raise ValueError(f"lax.conv_general_dilated: padding {padding!r} is not 'SAME', "
                         f"'SAME_LOWER', 'VALID' or a sequence of (low, high) pairs")
    pads = []
    for n, w, s in zip(in_shape, window, strides):
        total = builtins.max((-(-n // s) - 1) * s + w - n, 0)
        lo = total // 2 if mode == "SAME" else total - total // 2
        pads.append((lo, total - lo))
    return pads


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """N-d convolution as JAX's: strides, explicit or 'SAME'/'VALID' padding, input (transposed
    convolution) and kernel dilation, feature groups.  Written as pads, strided slices and one
    ``dot_general``, so its gradients are theirs."""
    x, w = _operand(lhs), _operand(rhs)
    dn = _conv_dimension_numbers(aval_of(x).ndim, aval_of(w).ndim, dimension_numbers)
    x = np.transpose(x, dn.lhs_spec)                  # N, C, spatial...
    w = np.transpose(w, dn.rhs_spec)                  # O, I, spatial...
    nsp = aval_of(x).ndim - 2
    strides = tuple(window_strides) or (1,) * nsp
    lhs_dil = tuple(lhs_dilation or (1,) * nsp)
    rhs_dil = tuple(rhs_dilation or (1,) * nsp)
    if batch_group_count != 1:
        raise NotImplementedError("lax.conv_general_dilated with batch_group_count > 1")
    n, c = aval_of(x).shape[:2]
    o, i = aval_of(w).shape[:2]
    g = feature_group_count
    if c != i * g or o % g:
        raise ValueError(f"lax.conv_general_dilated: lhs has {c} features and rhs {i} input "
                         f"features x feature_group_count={g}; they must be equal (and rhs's "
                         f"{o} output features a multiple of {g})")
    window = aval_of(w).shape[2:]
    eff_window = [(k - 1) * d + 1 for k, d in zip(window, rhs_dil)]
    pads = _same_pads(aval_of(x).shape[2:], eff_window, strides, padding)
    dt = np.result_type(_dtype(x), _dtype(w))
    x, w = x.astype(dt) if _dtype(x) != dt else x, w.astype(dt) if _dtype(w) != dt else w
    x = pad(x, np.zeros((), dt),
            [(0, 0, 0)] * 2 + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dil)])
    size = aval_of(x).shape[2:]
    out_sp = [builtins.max((m - e) // s + 1, 0) for m, e, s in zip(size, eff_window, strides)]
    patches = []
    for offs in np.ndindex(*window):              # one strided slice per kernel position
        idx = (builtins.slice(None),) * 2 + tuple(
            builtins.slice(k * d, k * d + (m - 1) * s + 1, s)
            for k, d, m, s in zip(offs, rhs_dil, out_sp, strides))
        patches.append(x[idx])
    p = np.stack(patches, axis=2) if patches else x[:, :, None]
    kk = math.prod(window)
    p = np.reshape(p, (n, g, c // g, kk) + tuple(out_sp))               # N G Cg K out...
    wk = np.reshape(w, (g, o // g, i, kk))                                # G Og Cg K
    out = bind(prims.dot_general_p, p, wk, contract=((2, 3), (2, 3)), batch=((1,), (0,)))
    # out: G, N, out..., Og  ->  N, G*Og, out...
    out = np.moveaxis(out, -1, 1)                                         # G Og N out...
    out = np.reshape(np.moveaxis(out, 2, 0), (n, o) + tuple(out_sp))
    out = np.transpose(out, np.argsort(dn.out_spec))
    return out.astype(preferred_element_type) if preferred_element_type is not None else out


def _transpose_pads(k, s, padding):
    """The padding of the transposed convolution for the forward one's ``padding``."""
    if padding == "SAME":
        total = k + s - 2
        lo = k - 1 if s > k - 1 else -(-total // 2)
    elif padding == "VALID":
        total, lo = k + s - 2 + builtins.max(k - s, 0), k - 1
    else:
        lo, total = k - padding[0] - 1, 2 * k - padding[0] - padding[1] - 2
    return lo, total - lo


def conv_transpose(lhs, rhs, strides, padding, rhs_dilation=None, dimension_numbers=None,
                   transpose_kernel=False, precision=None, preferred_element_type=None,
                   use_consistent_padding=False):
    """The fractionally strided convolution (JAX's ``lax.conv_transpose``): the input dilated
    by ``strides``, channels last by default (``NHWC``, ``HWIO``)."""
    x, w = _operand(lhs), _operand(rhs)
    nd = aval_of(x).ndim
    if dimension_numbers is None:
        if not 2 <= nd <= 5:
            raise ValueError(f"lax.conv_transpose: no default dimension_numbers for rank {nd}")
        sp = "HWD"[:nd - 2]
        dimension_numbers = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    dn = _conv_dimension_numbers(nd, aval_of(w).ndim, dimension_numbers)
    window = [aval_of(w).shape[i] for i in dn.rhs_spec[2:]]
    rhs_dil = tuple(rhs_dilation or (1,) * (nd - 2))
    if use_consistent_padding or padding in ("SAME", "VALID"):
        per_dim = [padding] * len(strides) if isinstance(padding, str) else padding
        pads = [_transpose_pads((k - 1) * d + 1, s, p)
                for k, d, s, p in zip(window, rhs_dil, strides, per_dim)]
    else:
        pads = padding
    if transpose_kernel:               # flip the spatial dims, swap the feature dims
        w = np.swapaxes(np.flip(w, tuple(dn.rhs_spec[2:])), dn.rhs_spec[0], dn.rhs_spec[1])
    return conv_general_dilated(x, w, (1,) * (nd - 2), pads, lhs_dilation=tuple(strides),
                                rhs_dilation=rhs_dil, dimension_numbers=dn,
                                preferred_element_type=preferred_element_type)


class Precision(enum.Enum):
    """Matmul precision hints (accepted everywhere ``precision=`` is; NumPy computes at the
    operands' own precision)."""
    DEFAULT = 0
    HIGH = 1
    HIGHEST = 2


def conv(lhs, rhs, window_strides, padding, precision=None, preferred_element_type=None):
    """``conv_general_dilated`` in the NCHW / OIHW layout without dilation."""
    return conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision,
                                preferred_element_type=preferred_element_type)


# ---------------------------------------------------------------------------------------------
# linear algebra: the primitives of ``jax.lax.linalg`` (one block each; batch dims lead, the
# matrix dims are the last two), and NumPy's ``np.linalg`` functions on traced values over them
# (registered in the NumPy table from here, the layer that holds the primitives).  Their JVPs
# are the textbook formulas written with the primitives, so reverse mode transposes them.
# ---------------------------------------------------------------------------------------------

def _mT(x):
    return np.swapaxes(x, -1, -2)


def _front_batch(prim, n_out):
    """Batch rule: every operand with the batch dim in front (unbatched ones broadcast)."""
    def rule(vals, dims, **params):
        size = next(aval_of(v).shape[d] for v, d in zip(vals, dims) if d is not None)
        front = [np.moveaxis(v, d, 0) if d is not None else
                 np.broadcast_to(v, (size,) + tuple(aval_of(v).shape)) for v, d in zip(vals, dims)]
        out = bind(prim, *front, **params)
        return out, ([0] * n_out if prim.multiple_results else 0)
    return rule


def _solve_abstract(a, b):
    if a.ndim < 2 or a.shape[-1] != a.shape[-2] or b.shape[:-1] != a.shape[:-1]:
        raise ValueError(f"linalg solve: a must be square matrices and b matrices with as many "
                         f"rows (same batch dims), got {a.shape} and {b.shape}")
    return Aval(b.shape, np.result_type(a.dtype, b.dtype))


def _solve_jvp(primals, tangents):
    (a, b), (ta, tb) = primals, tangents
    x = bind(solve_p, a, b)
    rhs = ad_util.instantiate(tb, ad_util.aval_of_value(x))
    if not ad_util.is_zero(ta):
        rhs = rhs - ta @ x
    return x, bind(solve_p, a, rhs)


solve_p = Primitive("linalg_solve", abstract=_solve_abstract, linear=(1,),
                    impl=lambda xp, k, a, b: xp.linalg.solve(a, b), jvp=_solve_jvp,
                    transpose=lambda ct, a, b: [None, bind(solve_p, _mT(a), ct)])
solve_p.batch = _front_batch(solve_p, 1)


def _square(name, a):
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"linalg {name}: expects square matrices in the last two dims, got "
                         f"{a.shape}")
    return a


def _cholesky_jvp(primals, tangents):
    (a,), (ta,) = primals, tangents
    low = bind(cholesky_p, a)
    inner = bind(solve_p, low, _mT(bind(solve_p, low, ta)))        # L^-1 dA L^-T
    n = aval_of(a).shape[-1]
    phi = np.where(np.tri(n, dtype=bool), inner, 0) * np.where(np.eye(n, dtype=bool), 0.5, 1.0)
    return low, low @ phi.astype(aval_of(a).dtype)


cholesky_p = Primitive("cholesky", abstract=lambda a: Aval(_square("cholesky", a).shape, a.dtype),
                       impl=lambda xp, k, a: xp.linalg.cholesky(a), jvp=_cholesky_jvp)
cholesky_p.batch = _front_batch(cholesky_p, 1)


def _eigh_jvp(primals, tangents):
    (a,), (ta,) = primals, tangents
    w, v = bind(eigh_p, a)
    m = _mT(v) @ ta @ v
    gap = w[..., None, :] - w[..., :, None]                         # w_j - w_i
    n = aval_of(a).shape[-1]
    eye = np.eye(n, dtype=bool)
    f = np.where(eye, 0, 1 / np.where(eye, 1, gap))
    return [w, v], [np.diagonal(m, axis1=-2, axis2=-1), v @ (f * m)]


eigh_p = Primitive("eigh", abstract=lambda a: [Aval(_square("eigh", a).shape[:-1], a.dtype),
                                               Aval(a.shape, a.dtype)],
                   multiple_results=True, impl=lambda xp, k, a: list(xp.linalg.eigh(a)),
                   jvp=_eigh_jvp)
eigh_p.batch = _front_batch(eigh_p, 2)


def _qr_abstract(a, *, full_matrices):
    m, n = a.shape[-2:]
    k = m if full_matrices else min(m, n)
    return [Aval(a.shape[:-2] + (m, k), a.dtype), Aval(a.shape[:-2] + (k, n), a.dtype)]


def _qr_jvp(primals, tangents, *, full_matrices):
    (a,), (ta,) = primals, tangents
    q, r = bind(qr_p, a, full_matrices=full_matrices)
    m, n = aval_of(a).shape[-2:]
    if m < n or (full_matrices and m > n):
        raise NotImplementedError(f"the derivative of a QR decomposition of {m}x{n} matrices"
                                  f"{' with full_matrices' if full_matrices else ''} (it exists "
                                  f"for reduced QR with rows >= columns)")
    da_rinv = _mT(bind(solve_p, _mT(r), _mT(ta)))                   # dA R^-1
    c = _mT(q) @ da_rinv
    low = np.tril(c, -1)
    omega = low - _mT(low)
    return [q, r], [q @ (omega - c) + da_rinv, (c - omega) @ r]


qr_p = Primitive("qr", abstract=_qr_abstract, multiple_results=True, jvp=_qr_jvp,
                 impl=lambda xp, k, a, *, full_matrices: list(xp.linalg.qr(
                     a, mode="complete" if full_matrices else "reduced")))
qr_p.batch = _front_batch(qr_p, 2)


def _svd_abstract(a, *, full_matrices):
    m, n = a.shape[-2:]
    k = min(m, n)
    lead = a.shape[:-2]
    return [Aval(lead + (m, m if full_matrices else k), a.dtype), Aval(lead + (k,), a.dtype),
            Aval(lead + (n if full_matrices else k, n), a.dtype)]


def _svd_jvp(primals, tangents, *, full_matrices):
    (a,), (ta,) = primals, tangents
    u, s, vh = bind(svd_p, a, full_matrices=full_matrices)
    m, n = aval_of(a).shape[-2:]
    if full_matrices and m != n:
        raise NotImplementedError("the derivative of an SVD of non-square matrices with "
                                  "full_matrices=True (use full_matrices=False)")
    v = _mT(vh)
    ds_mat = _mT(u) @ ta @ v
    ds = np.diagonal(ds_mat, axis1=-2, axis2=-1)
    k = min(m, n)
    eye = np.eye(k, dtype=bool)
    sj, si = s[..., None, :], s[..., :, None]
    f = np.where(eye, 0, 1 / np.where(eye, 1, (sj + si) * (sj - si)))
    s_inv = np.where(s == 0, 0, 1 / np.where(s == 0, 1, s))
    skew = 0.5 * (ds_mat - _mT(ds_mat)) * s_inv[..., None, :] * eye
    du = u @ (f * (ds_mat * sj + _mT(ds_mat * sj)) + skew)
    dv = v @ (f * (ds_mat * si + _mT(ds_mat * si)))
    if m > n:
        dav = ta @ v
        du = du + (dav - u @ (_mT(u) @ dav)) / sj
    if n > m:
        dau = _mT(ta) @ u
        dv = dv + (dau - v @ (vh @ dau)) / sj
    return [u, s, vh], [du, ds, _mT(dv)]


svd_p = Primitive("svd", abstract=_svd_abstract, multiple_results=True, jvp=_svd_jvp,
                  impl=lambda xp, k, a, *, full_matrices: list(xp.linalg.svd(
                      a, full_matrices=full_matrices)))
svd_p.batch = _front_batch(svd_p, 3)


def _float_operand(a):
    a = _operand(a)
    return a.astype(np.float64) if np.dtype(_dtype(a)).kind in "biu" else a


def _symmetrized(a):
    """The symmetric part, as JAX's cholesky and eigh read their input."""
    return (a + _mT(a)) / 2


def _triangle(a, lower=True):
    """The symmetric matrix of one triangle, as NumPy's cholesky and eigh read their input."""
    t = np.tril(a) if lower else np.triu(a)
    return t + _mT(np.tril(a, -1) if lower else np.triu(a, 1))


def _np_solve(a, b):
    a, b = _float_operand(a), _float_operand(b)
    dt = np.result_type(_dtype(a), _dtype(b))
    a, b = a.astype(dt), b.astype(dt)
    if aval_of(b).ndim == 1:
        return bind(solve_p, a, b[:, None])[..., 0]
    lead = np.broadcast_shapes(aval_of(a).shape[:-2], aval_of(b).shape[:-2])
    return bind(solve_p, np.broadcast_to(a, lead + aval_of(a).shape[-2:]),
                np.broadcast_to(b, lead + aval_of(b).shape[-2:]))


def _np_inv(a):
    a = _float_operand(a)
    n = aval_of(a).shape[-1]
    return bind(solve_p, a, np.broadcast_to(np.eye(n, dtype=_dtype(a)), aval_of(a).shape))


def _np_qr(a, mode="reduced"):
    if mode not in ("reduced", "complete", "r"):
        raise NotImplementedError(f"numpy.linalg.qr(mode={mode!r}) on traced values")
    q, r = bind(qr_p, _float_operand(a), full_matrices=mode == "complete")
    return r if mode == "r" else (q, r)


def _np_svd(a, full_matrices=True, compute_uv=True, hermitian=False):
    u, s, vh = bind(svd_p, _float_operand(a), full_matrices=bool(full_matrices and compute_uv))
    return (u, s, vh) if compute_uv else s


def _np_eigh(a, UPLO="L"):
    return tuple(bind(eigh_p, _triangle(_float_operand(a), UPLO.upper() == "L")))


implements(np.linalg.solve)(_np_solve)
implements(np.linalg.inv)(_np_inv)
def _np_cholesky(a, /, *, upper=False):
    low = bind(cholesky_p, _triangle(_float_operand(a), not upper))
    return _mT(low) if upper else low


implements(np.linalg.cholesky)(_np_cholesky)
implements(np.linalg.eigh)(_np_eigh)
implements(np.linalg.eigvalsh)(lambda a, UPLO="L": _np_eigh(a, UPLO)[0])
implements(np.linalg.qr)(_np_qr)
implements(np.linalg.svd)(_np_svd)
for _name in ("solve", "inv", "cholesky", "eigh", "eigvalsh", "qr", "svd"):      # spmd.numpy.linalg
    setattr(_snp.linalg, _name, HANDLED_FUNCTIONS[getattr(np.linalg, _name)])
del _name


def _lax_cholesky(x, *, symmetrize_input=True):
    return bind(cholesky_p, _symmetrized(x) if symmetrize_input else x)


def _lax_eigh(x, *, lower=True, symmetrize_input=True, sort_eigenvalues=True):
    w, v = bind(eigh_p, _symmetrized(x) if symmetrize_input else _triangle(x, lower))
    return v, w


def _lax_qr(x, *, full_matrices=True):
    return tuple(bind(qr_p, x, full_matrices=full_matrices))


def _lax_svd(x, *, full_matrices=True, compute_uv=True):
    u, s, vh = bind(svd_p, x, full_matrices=full_matrices)
    return (u, s, vh) if compute_uv else s


# ``jax.lax.linalg``'s functions on the primitives above
linalg = types.SimpleNamespace(cholesky=_lax_cholesky, eigh=_lax_eigh, qr=_lax_qr, svd=_lax_svd)
