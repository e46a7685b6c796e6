"""Local (per-device) primitives.  Each is one registration block with its rules side by side.

Implementations take ``(xp, k, *arrays, **params)``: every array carries ``k`` leading batch
dims (mesh dims in the stacked executor, possibly of size 1), and axis parameters refer to the
per-device value, so the implementation adds ``k``.  The same code serves numpy with ``k=0``,
the stacked executor, cupy, and vmap.

Elementwise primitives require operands of one shape (``spmd.numpy_api`` inserts
``broadcast_in_dim``) and one dtype (it inserts ``convert_element_type``); scalar constants
broadcast.
"""
from __future__ import annotations

import math

import numpy as np

from .core import Aval, Primitive, bind

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _shift(axes, k):
    return tuple(a + k for a in axes)


def _common_batch(xp, k, arrays):
    """Broadcast the k leading dims of ``arrays`` to a common shape (for ops that do not
    broadcast by themselves, such as concatenate)."""
    if k == 0:
        return arrays
    lead = np.broadcast_shapes(*[a.shape[:k] for a in arrays])
    return [a if a.shape[:k] == lead else xp.broadcast_to(a, lead + a.shape[k:]) for a in arrays]


def _ew_shape(*avals):
    shapes = [a.shape for a in avals]
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"operands could not be broadcast together with shapes {shapes}") from None


def _ew_abstract(out_dtype=None):
    def abstract(*avals, **params):
        dt = avals[0].dtype if out_dtype is None else out_dtype(avals[0].dtype)
        return Aval(_ew_shape(*avals), np.dtype(dt))
    return abstract


def _real_dtype(dt):
    return np.empty(0, dt).real.dtype


UNARY = {}
BINARY = {}


def unary(name, fn, *, out_dtype=None, jvp=None, **rules):
    p = Primitive(name, abstract=_ew_abstract(out_dtype), impl=lambda xp, k, x: fn(xp, x),
                  jvp=jvp, category="elementwise", **rules)
    UNARY[name] = p
    return p


def binary(name, fn, *, out_dtype=None, jvp=None, **rules):
    p = Primitive(name, abstract=_ew_abstract(out_dtype), impl=lambda xp, k, x, y: fn(xp, x, y),
                  jvp=jvp, category="elementwise", **rules)
    BINARY[name] = p
    return p


_bool = lambda dt: np.bool_

# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------

neg_p = unary("neg", lambda xp, x: xp.negative(x), linear=True)
exp_p = unary("exp", lambda xp, x: xp.exp(x))
exp2_p = unary("exp2", lambda xp, x: xp.exp2(x))
log_p = unary("log", lambda xp, x: xp.log(x))
log2_p = unary("log2", lambda xp, x: xp.log2(x))
log10_p = unary("log10", lambda xp, x: xp.log10(x))
log1p_p = unary("log1p", lambda xp, x: xp.log1p(x))
expm1_p = unary("expm1", lambda xp, x: xp.expm1(x))
tanh_p = unary("tanh", lambda xp, x: xp.tanh(x))
sinh_p = unary("sinh", lambda xp, x: xp.sinh(x))
cosh_p = unary("cosh", lambda xp, x: xp.cosh(x))
sin_p = unary("sin", lambda xp, x: xp.sin(x))
cos_p = unary("cos", lambda xp, x: xp.cos(x))
tan_p = unary("tan", lambda xp, x: xp.tan(x))
asin_p = unary("asin", lambda xp, x: xp.arcsin(x))
acos_p = unary("acos", lambda xp, x: xp.arccos(x))
atan_p = unary("atan", lambda xp, x: xp.arctan(x))
asinh_p = unary("asinh", lambda xp, x: xp.arcsinh(x))
acosh_p = unary("acosh", lambda xp, x: xp.arccosh(x))
atanh_p = unary("atanh", lambda xp, x: xp.arctanh(x))
sqrt_p = unary("sqrt", lambda xp, x: xp.sqrt(x))
cbrt_p = unary("cbrt", lambda xp, x: xp.cbrt(x))
rsqrt_p = unary("rsqrt", lambda xp, x: 1 / xp.sqrt(x))
square_p = unary("square", lambda xp, x: xp.square(x))
reciprocal_p = unary("reciprocal", lambda xp, x: xp.reciprocal(x))
abs_p = unary("abs", lambda xp, x: xp.abs(x), out_dtype=_real_dtype)
sign_p = unary("sign", lambda xp, x: xp.sign(x))
floor_p = unary("floor", lambda xp, x: xp.floor(x))
ceil_p = unary("ceil", lambda xp, x: xp.ceil(x))
trunc_p = unary("trunc", lambda xp, x: xp.trunc(x))
round_p = unary("round", lambda xp, x: xp.round(x))
rint_p = unary("rint", lambda xp, x: xp.rint(x))
conj_p = unary("conj", lambda xp, x: xp.conj(x), linear=True)
real_p = unary("real", lambda xp, x: xp.real(x), out_dtype=_real_dtype, linear=True)
imag_p = unary("imag", lambda xp, x: xp.imag(x), out_dtype=_real_dtype, linear=True)
logistic_p = unary("logistic", lambda xp, x: 1 / (1 + xp.exp(-x)))
not_p = unary("not", lambda xp, x: xp.logical_not(x), out_dtype=_bool)
invert_p = unary("invert", lambda xp, x: xp.invert(x))
isnan_p = unary("isnan", lambda xp, x: xp.isnan(x), out_dtype=_bool)
isinf_p = unary("isinf", lambda xp, x: xp.isinf(x), out_dtype=_bool)
isfinite_p = unary("isfinite", lambda xp, x: xp.isfinite(x), out_dtype=_bool)
signbit_p = unary("signbit", lambda xp, x: xp.signbit(x), out_dtype=_bool)

add_p = binary("add", lambda xp, x, y: xp.add(x, y), linear=True)
sub_p = binary("sub", lambda xp, x, y: xp.subtract(x, y), linear=True)
mul_p = binary("mul", lambda xp, x, y: xp.multiply(x, y))
div_p = binary("div", lambda xp, x, y: xp.true_divide(x, y))
floordiv_p = binary("floordiv", lambda xp, x, y: xp.floor_divide(x, y))
rem_p = binary("rem", lambda xp, x, y: xp.remainder(x, y))
fmod_p = binary("fmod", lambda xp, x, y: xp.fmod(x, y))
pow_p = binary("pow", lambda xp, x, y: xp.power(x, y))
max_p = binary("max", lambda xp, x, y: xp.maximum(x, y))
min_p = binary("min", lambda xp, x, y: xp.minimum(x, y))
fmax_p = binary("fmax", lambda xp, x, y: xp.fmax(x, y))
fmin_p = binary("fmin", lambda xp, x, y: xp.fmin(x, y))
atan2_p = binary("atan2", lambda xp, x, y: xp.arctan2(x, y))
hypot_p = binary("hypot", lambda xp, x, y: xp.hypot(x, y))
copysign_p = binary("copysign", lambda xp, x, y: xp.copysign(x, y))
logaddexp_p = binary("logaddexp", lambda xp, x, y: xp.logaddexp(x, y))
and_p = binary("and", lambda xp, x, y: xp.bitwise_and(x, y))
or_p = binary("or", lambda xp, x, y: xp.bitwise_or(x, y))
xor_p = binary("xor", lambda xp, x, y: xp.bitwise_xor(x, y))
shift_left_p = binary("shift_left", lambda xp, x, y: xp.left_shift(x, y))
shift_right_p = binary("shift_right", lambda xp, x, y: xp.right_shift(x, y))
eq_p = binary("eq", lambda xp, x, y: xp.equal(x, y), out_dtype=_bool)
ne_p = binary("ne", lambda xp, x, y: xp.not_equal(x, y), out_dtype=_bool)
lt_p = binary("lt", lambda xp, x, y: xp.less(x, y), out_dtype=_bool)
le_p = binary("le", lambda xp, x, y: xp.less_equal(x, y), out_dtype=_bool)
gt_p = binary("gt", lambda xp, x, y: xp.greater(x, y), out_dtype=_bool)
ge_p = binary("ge", lambda xp, x, y: xp.greater_equal(x, y), out_dtype=_bool)


def _select_abstract(pred, on_true, on_false):
    return Aval(_ew_shape(pred, on_true, on_false), on_true.dtype)


select_p = Primitive("select", abstract=_select_abstract,
                     impl=lambda xp, k, c, x, y: xp.where(c, x, y), category="elementwise")


def _convert_abstract(x, *, dtype):
    return Aval(x.shape, np.dtype(dtype))


def _convert_impl(xp, k, x, *, dtype):
    return x.astype(dtype) if hasattr(x, "astype") else xp.asarray(x, dtype=dtype)


convert_element_type_p = Primitive("convert_element_type", abstract=_convert_abstract,
                                   impl=_convert_impl, category="elementwise")

# ---------------------------------------------------------------------------------------------
# shape and layout
# ---------------------------------------------------------------------------------------------


def _bid_abstract(x, *, shape, dims):
    if len(dims) != x.ndim or any(x.shape[i] not in (1, shape[d]) for i, d in enumerate(dims)):
        raise ValueError(f"cannot broadcast shape {x.shape} to {shape} along dims {dims}")
    return Aval(tuple(shape), x.dtype)


def _bid_impl(xp, k, x, *, shape, dims):
    lead = x.shape[:k]
    expanded = [1] * len(shape)
    for i, d in enumerate(dims):
        expanded[d] = x.shape[k + i]
    return xp.broadcast_to(x.reshape(lead + tuple(expanded)), lead + tuple(shape))


broadcast_in_dim_p = Primitive("broadcast_in_dim", abstract=_bid_abstract, impl=_bid_impl,
                               category="broadcast")


def _reshape_abstract(x, *, shape):
    if math.prod(shape) != x.size:
        raise ValueError(f"cannot reshape {x.shape} (size {x.size}) into {shape}")
    return Aval(tuple(shape), x.dtype)


reshape_p = Primitive("reshape", abstract=_reshape_abstract,
                      impl=lambda xp, k, x, *, shape: xp.reshape(x, x.shape[:k] + tuple(shape)),
                      linear=True, category="reshape")


def _transpose_abstract(x, *, perm):
    if sorted(perm) != list(range(x.ndim)):
        raise ValueError(f"transpose permutation {perm} does not fit rank {x.ndim}")
    return Aval(tuple(x.shape[p] for p in perm), x.dtype)


transpose_p = Primitive("transpose", abstract=_transpose_abstract,
                        impl=lambda xp, k, x, *, perm: xp.transpose(x, tuple(range(k)) + _shift(perm, k)),
                        linear=True, category="transpose")


def _slice_abstract(x, *, index):
    return Aval(tuple(len(range(*s)) for s in index), x.dtype)


slice_p = Primitive("slice", abstract=_slice_abstract,
                    impl=lambda xp, k, x, *, index: x[(slice(None),) * k + tuple(
                        slice(a, None if (c < 0 and b < 0) else b, c) for a, b, c in index)],
                    linear=True, category="slice")


def _pad_abstract(x, value, *, config):
    return Aval(tuple(d + lo + hi for d, (lo, hi) in zip(x.shape, config)), x.dtype)


def _pad_impl(xp, k, x, value, *, config):
    v = value.reshape(()) if getattr(value, "ndim", 0) and value.size == 1 else value
    return xp.pad(x, ((0, 0),) * k + tuple(config), constant_values=v)


pad_p = Primitive("pad", abstract=_pad_abstract, impl=_pad_impl, category="pad")


def _concat_abstract(*xs, axis):
    base = list(xs[0].shape)
    for x in xs[1:]:
        if len(x.shape) != len(base) or any(a != b for i, (a, b) in enumerate(zip(x.shape, base)) if i != axis):
            raise ValueError(f"concatenate: shapes {[x.shape for x in xs]} differ outside axis {axis}")
    base[axis] = sum(x.shape[axis] for x in xs)
    return Aval(tuple(base), xs[0].dtype)


concatenate_p = Primitive("concatenate", abstract=_concat_abstract,
                          impl=lambda xp, k, *xs, axis: xp.concatenate(_common_batch(xp, k, list(xs)), axis=axis + k),
                          linear=True, category="concatenate")


def _iota_abstract(*, dtype, shape, dimension):
    return Aval(tuple(shape), np.dtype(dtype))


def _iota_impl(xp, k, *, dtype, shape, dimension):
    r = xp.arange(shape[dimension], dtype=dtype)
    r = r.reshape(tuple(s if i == dimension else 1 for i, s in enumerate(shape)))
    return xp.broadcast_to(r, tuple(shape)).reshape((1,) * k + tuple(shape))


iota_p = Primitive("iota", abstract=_iota_abstract, impl=_iota_impl)

# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------


def _reduce_abstract(out_dtype=None):
    def abstract(x, *, axes):
        dt = x.dtype if out_dtype is None else out_dtype(x.dtype)
        return Aval(tuple(d for i, d in enumerate(x.shape) if i not in axes), np.dtype(dt))
    return abstract


def reduction(name, fn, out_dtype=None, **rules):
    return Primitive(name, abstract=_reduce_abstract(out_dtype),
                     impl=lambda xp, k, x, *, axes: fn(xp, x, _shift(axes, k)),
                     category="reduction", **rules)


reduce_sum_p = reduction("reduce_sum", lambda xp, x, a: xp.sum(x, axis=a, dtype=x.dtype), linear=True, monoid="sum")
reduce_max_p = reduction("reduce_max", lambda xp, x, a: xp.max(x, axis=a), monoid="max")
reduce_min_p = reduction("reduce_min", lambda xp, x, a: xp.min(x, axis=a), monoid="min")
reduce_prod_p = reduction("reduce_prod", lambda xp, x, a: xp.prod(x, axis=a, dtype=x.dtype), monoid="prod")
reduce_and_p = reduction("reduce_and", lambda xp, x, a: xp.all(x, axis=a), out_dtype=_bool)
reduce_or_p = reduction("reduce_or", lambda xp, x, a: xp.any(x, axis=a), out_dtype=_bool)


def _arg_abstract(x, *, axis, index_dtype):
    return Aval(tuple(d for i, d in enumerate(x.shape) if i != axis), np.dtype(index_dtype))


argmax_p = Primitive("argmax", abstract=_arg_abstract,
                     impl=lambda xp, k, x, *, axis, index_dtype: xp.argmax(x, axis=axis + k).astype(index_dtype))
argmin_p = Primitive("argmin", abstract=_arg_abstract,
                     impl=lambda xp, k, x, *, axis, index_dtype: xp.argmin(x, axis=axis + k).astype(index_dtype))


def _cum_impl(fn):
    def impl(xp, k, x, *, axis, reverse):
        if reverse:
            x = xp.flip(x, axis=axis + k)
        out = fn(xp, x, axis + k)
        return xp.flip(out, axis=axis + k) if reverse else out
    return impl


_same = lambda x, **p: Aval(x.shape, x.dtype)
cumsum_p = Primitive("cumsum", abstract=_same, impl=_cum_impl(lambda xp, x, a: xp.cumsum(x, axis=a, dtype=x.dtype)), linear=True)
cumprod_p = Primitive("cumprod", abstract=_same, impl=_cum_impl(lambda xp, x, a: xp.cumprod(x, axis=a, dtype=x.dtype)))
cummax_p = Primitive("cummax", abstract=_same, impl=_cum_impl(lambda xp, x, a: xp.maximum.accumulate(x, axis=a)))
cummin_p = Primitive("cummin", abstract=_same, impl=_cum_impl(lambda xp, x, a: xp.minimum.accumulate(x, axis=a)))

sort_p = Primitive("sort", abstract=_same, impl=lambda xp, k, x, *, axis: xp.sort(x, axis=axis + k))
argsort_p = Primitive("argsort", abstract=lambda x, *, axis, index_dtype: Aval(x.shape, np.dtype(index_dtype)),
                      impl=lambda xp, k, x, *, axis, index_dtype: xp.argsort(x, axis=axis + k, kind="stable").astype(index_dtype))

# ---------------------------------------------------------------------------------------------
# contraction
# ---------------------------------------------------------------------------------------------


def _dot_abstract(x, y, *, contract, batch):
    (xc, yc), (xb, yb) = contract, batch
    for i, j in zip(xc + xb, yc + yb):
        if x.shape[i] != y.shape[j]:
            raise ValueError(f"dot_general: dim {i} of {x.shape} does not match dim {j} of {y.shape}")
    if x.dtype != y.dtype:
        raise TypeError(f"dot_general: operand dtypes differ ({x.dtype} and {y.dtype})")
    xf = [i for i in range(x.ndim) if i not in xc + xb]
    yf = [j for j in range(y.ndim) if j not in yc + yb]
    return Aval(tuple(x.shape[i] for i in xb) + tuple(x.shape[i] for i in xf) + tuple(y.shape[j] for j in yf),
                x.dtype)


def _dot_impl(xp, k, x, y, *, contract, batch):
    """Transpose both operands to (batch, free, contract) / (batch, contract, free) and use
    matmul (BLAS); leading batch dims broadcast."""
    (xc, yc), (xb, yb) = contract, batch
    xr, yr = x.ndim - k, y.ndim - k
    xf = [i for i in range(xr) if i not in xc + xb]
    yf = [j for j in range(yr) if j not in yc + yb]
    lead = tuple(range(k))
    xt = xp.transpose(x, lead + _shift(tuple(xb) + tuple(xf) + tuple(xc), k))
    yt = xp.transpose(y, lead + _shift(tuple(yb) + tuple(yc) + tuple(yf), k))
    B = tuple(x.shape[k + i] for i in xb)
    M = tuple(x.shape[k + i] for i in xf)
    N = tuple(y.shape[k + j] for j in yf)
    C = math.prod(x.shape[k + i] for i in xc)
    out = xp.matmul(xt.reshape(x.shape[:k] + B + (math.prod(M), C)),
                    yt.reshape(y.shape[:k] + B + (C, math.prod(N))))
    return out.reshape(out.shape[:k] + B + M + N)


dot_general_p = Primitive("dot_general", abstract=_dot_abstract, impl=_dot_impl, category="contraction")

# ---------------------------------------------------------------------------------------------
# indexing
# ---------------------------------------------------------------------------------------------


def _take_abstract(x, idx, *, axis):
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"take: indices must be integers, got {idx.dtype}")
    return Aval(x.shape[:axis] + idx.shape + x.shape[axis + 1:], x.dtype)


def _take_impl(xp, k, x, idx, *, axis):
    """``x.take(idx, axis)`` per batch entry (batch dims broadcast between x and idx)."""
    n = x.shape[k + axis]
    idx = xp.where(idx < 0, idx + n, idx)
    if k == 0:
        return xp.take(x, idx, axis=axis)
    lead = np.broadcast_shapes(x.shape[:k], idx.shape[:k])
    ni = idx.ndim - k
    xm = xp.moveaxis(x, k + axis, k)                         # K, A, pre..., post...
    grids = [xp.arange(s).reshape((-1,) + (1,) * (k - 1 - i + ni)) for i, s in enumerate(lead)]
    grids = [g if x.shape[i] != 1 else xp.zeros_like(g) for i, g in enumerate(grids)]
    out = xm[tuple(grids) + (idx,)]                            # K, I..., pre..., post...
    pre = list(range(k + ni, k + ni + axis))
    perm = list(range(k)) + pre + list(range(k, k + ni)) + list(range(k + ni + axis, out.ndim))
    return xp.transpose(out, perm)


take_p = Primitive("take", abstract=_take_abstract, impl=_take_impl, category="gather")


def _dynamic_slice_abstract(x, *starts, sizes):
    return Aval(tuple(sizes), x.dtype)


def _dynamic_slice_impl(xp, k, x, *starts, sizes):
    for d, (s, size) in enumerate(zip(starts, sizes)):
        if size == x.shape[k + d]:
            continue
        s = xp.clip(s, 0, x.shape[k + d] - size)
        idx = xp.asarray(s)[..., None] + xp.arange(size)
        x = _take_impl(xp, k, x, idx.reshape(idx.shape[:k] + (size,)) if k else idx, axis=d)
    return x


dynamic_slice_p = Primitive("dynamic_slice", abstract=_dynamic_slice_abstract,
                            impl=_dynamic_slice_impl, category="gather")


def _scatter_add_abstract(x, idx, upd, *, axis):
    return Aval(x.shape, x.dtype)


def _scatter_add_impl(xp, k, x, idx, upd, *, axis):
    """``x`` with ``upd`` added at ``idx`` along ``axis`` (repeated indices accumulate)."""
    lead = np.broadcast_shapes(x.shape[:k], idx.shape[:k], upd.shape[:k])
    out = xp.array(xp.broadcast_to(x, lead + x.shape[k:]))
    n = x.shape[k + axis]
    idx = xp.where(idx < 0, idx + n, idx)
    ni = idx.ndim - k
    om = xp.moveaxis(out, k + axis, k)                      # view: K, A, pre, post
    um = upd if axis == 0 else xp.moveaxis(upd, tuple(range(k + axis, k + axis + ni)),
                                           tuple(range(k, k + ni)))   # K, I, pre, post
    grids = [xp.arange(s).reshape((-1,) + (1,) * (k - 1 - i + ni)) for i, s in enumerate(lead)]
    xp.add.at(om, tuple(grids) + (idx,), xp.broadcast_to(um, lead + um.shape[k:]))
    return out


scatter_add_p = Primitive("scatter_add", abstract=_scatter_add_abstract, impl=_scatter_add_impl,
                          category="scatter")


def _dus_abstract(x, upd, *starts):
    return Aval(x.shape, x.dtype)


def _dus_impl(xp, k, x, upd, *starts):
    """``x`` with ``upd`` written at ``starts`` (each start may vary over the batch dims)."""
    idx = []
    for d, s in enumerate(starts):
        size = upd.shape[k + d]
        s = xp.clip(s, 0, x.shape[k + d] - size)
        idx.append(xp.asarray(s)[..., None] + xp.arange(size))
    lead = np.broadcast_shapes(x.shape[:k], upd.shape[:k], *[i.shape[:k] for i in idx])
    out = xp.array(xp.broadcast_to(x, lead + x.shape[k:]))
    r = len(starts)
    grids = [xp.arange(s).reshape((-1,) + (1,) * (k - 1 - i + r)) for i, s in enumerate(lead)]
    per_dim = [i.reshape(i.shape[:k] + (1,) * d + (i.shape[-1],) + (1,) * (r - d - 1)) if k else
               i.reshape((1,) * d + (i.shape[-1],) + (1,) * (r - d - 1)) for d, i in enumerate(idx)]
    out[tuple(grids) + tuple(per_dim)] = xp.broadcast_to(upd, lead + upd.shape[k:])
    return out


dynamic_update_slice_p = Primitive("dynamic_update_slice", abstract=_dus_abstract,
                                   impl=_dus_impl, category="scatter")


def dtype_of(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


__all__ = [n for n in dir() if n.endswith("_p")]
del bind
