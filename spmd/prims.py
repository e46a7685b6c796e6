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

from ._shapes import broadcast_shapes
import optree

from .core import Aval, Primitive, aval_of, bind, current_builder, hooks, untyped
from .sharding import NamedSharding, PartitionSpec, sharding_type
from . import _host_parallel
from . import ad_util, batching, sharding_rules

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
    lead = broadcast_shapes(*[a.shape[:k] for a in arrays])
    return [a if a.shape[:k] == lead else xp.broadcast_to(a, lead + a.shape[k:]) for a in arrays]


def _ew_shape(*avals):
    shapes = [a.shape for a in avals]
    try:
        return broadcast_shapes(*shapes)
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


# How a loop body is written as C (``spmd.executors.native``).  An elementwise primitive's
# ``c`` rule is ``(cw, operand dtypes, result dtype)`` -> the C expression of its operands'
# elements ``{0}``, ``{1}``, ... (None where it has none for those dtypes); ``cw.ctype(dtype)``
# names a dtype's C type.  Other primitives' ``c`` rules are ``(cw, *views, **params)`` -> the
# list of result views, built with the writer's operations.

def _c_kind(dt):
    return "b" if dt == np.bool_ else dt.kind


def c_math(f32, f64):
    """On float32 or float64 operands (all one dtype): the C expression for each."""
    return lambda cw, dts, out: ({np.dtype(np.float32): f32, np.dtype(np.float64): f64}.get(dts[0])
                                 if len(set(dts)) == 1 else None)


def c_expr(expr, kinds="fiu"):
    """On operands of one dtype of ``kinds`` (``f``: floats, ``i``/``u``: integers, ``b``:
    booleans): the C expression ``expr``."""
    return lambda cw, dts, out: expr if len(set(dts)) == 1 and _c_kind(dts[0]) in kinds else None


def c_either(*rules):
    """The first of ``rules`` that has an expression for the dtypes."""
    def rule(cw, dts, out):
        return next((e for e in (r(cw, dts, out) for r in rules) if e is not None), None)
    return rule


class ufunc:
    """The elementwise function that is one NumPy (or CuPy) ufunc, by name: called as
    ``f(xp, *args)``, and with ``out=`` it writes its result into an existing array (what the
    executors' fused elementwise chains do instead of allocating and copying)."""
    __slots__ = ("name", "writes_into")

    def __init__(self, name: str):
        self.name = name
        self.writes_into = isinstance(getattr(np, name, None), np.ufunc)    # np.real is not

    def __call__(self, xp, *args, out=None):
        f = getattr(xp, self.name)
        return f(*args) if out is None else f(*args, out=out)

    def __repr__(self):
        return f"ufunc({self.name!r})"


def unary(name, fn, *, out_dtype=None, deriv=None, nondiff=False, transpose=None, **rules):
    """An elementwise unary primitive.  Autodiff: ``deriv(x, y)`` is dy/dx (y the output);
    ``nondiff`` marks a piecewise-constant op (zero tangent); linear ones give ``transpose``."""
    p = Primitive(name, abstract=_ew_abstract(out_dtype), impl=lambda xp, k, x: _host_parallel.elementwise(xp, fn, x) if k else fn(xp, x),
                  transpose=transpose, category="elementwise", elementwise=fn, **rules)
    p.jvp = (ad_util.deriv_jvp(p, deriv) if deriv else ad_util.zero_jvp(p) if nondiff else
             ad_util.linear_jvp(p) if p.linear else None)
    p.batch = batching.elementwise_batch(p)
    UNARY[name] = p
    return p


def binary(name, fn, *, out_dtype=None, partials=None, nondiff=False, transpose=None, **rules):
    """An elementwise binary primitive.  Autodiff: ``partials(x, y, out)`` gives the pair
    (d out/dx, d out/dy); ``nondiff`` marks a piecewise-constant op (zero tangent)."""
    p = Primitive(name, abstract=_ew_abstract(out_dtype), impl=lambda xp, k, x, y: _host_parallel.elementwise(xp, fn, x, y) if k else fn(xp, x, y),
                  transpose=transpose, category="elementwise", elementwise=fn, **rules)
    p.jvp = (_partials_jvp(p, partials) if partials else ad_util.zero_jvp(p) if nondiff else
             _add_sub_jvp(p) if p.linear else None)
    p.batch = batching.elementwise_batch(p)
    BINARY[name] = p
    return p


def _partials_jvp(p, partials):
    def jvp(primals, tangents):
        (x, y), (tx, ty) = primals, tangents
        out = bind(p, x, y)
        dx, dy = partials(x, y, out)
        return out, ad_util.add_tangents(tx if ad_util.is_zero(tx) else tx * dx, ty if ad_util.is_zero(ty) else ty * dy)
    return jvp


def _add_sub_jvp(p):
    def jvp(primals, tangents):
        (x, y), (tx, ty) = primals, tangents
        out = bind(p, x, y)
        if ad_util.is_zero(ty):
            return out, tx
        if p is sub_p:
            ty = -ty
        return out, ty if ad_util.is_zero(tx) else bind(add_p, tx, ty)
    return jvp


def _mul_transpose(ct, x, y):
    if ad_util.is_undefined(x) and ad_util.is_undefined(y):
        raise TypeError("transpose rule for mul: both operands are linear (a product of tangents)")
    return [ct * y, None] if ad_util.is_undefined(x) else [None, ct * x]


_bool = lambda dt: np.bool_


def _pow_dx(x, y):
    if isinstance(y, (int, float, np.ndarray, np.generic)) and np.ndim(y) == 0 and float(y) in (1, 2):
        return 2 * x if float(y) == 2 else 1            # x ** 2: no pow in the derivative
    return y * x ** (y - 1)


def _chooser(first, tie):
    """Partials of max/min: the chosen operand gets the tangent, ties split it evenly."""
    dx = np.where(first, 1.0, np.where(tie, 0.5, 0.0))
    return dx, 1 - dx

# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------

neg_p = unary("neg", ufunc("negative"), linear=True, transpose=lambda ct, x: [-ct],
              c=c_expr("(-{0})"))
exp_p = unary("exp", ufunc("exp"), deriv=lambda x, y: y,
              c=c_math("spmd_expf({0})", "exp({0})"))
exp2_p = unary("exp2", ufunc("exp2"), deriv=lambda x, y: y * math.log(2),
               c=c_math("exp2f({0})", "exp2({0})"))
log_p = unary("log", ufunc("log"), deriv=lambda x, y: 1 / x,
              c=c_math("logf({0})", "log({0})"))
log2_p = unary("log2", ufunc("log2"), deriv=lambda x, y: 1 / (x * math.log(2)),
               c=c_math("log2f({0})", "log2({0})"))
log10_p = unary("log10", ufunc("log10"), deriv=lambda x, y: 1 / (x * math.log(10)),
                c=c_math("log10f({0})", "log10({0})"))
log1p_p = unary("log1p", ufunc("log1p"), deriv=lambda x, y: 1 / (1 + x),
                c=c_math("log1pf({0})", "log1p({0})"))
expm1_p = unary("expm1", ufunc("expm1"), deriv=lambda x, y: y + 1,
                c=c_math("expm1f({0})", "expm1({0})"))
tanh_p = unary("tanh", ufunc("tanh"), deriv=lambda x, y: 1 - y * y,
               c=c_math("spmd_tanhf({0})", "tanh({0})"))
sinh_p = unary("sinh", ufunc("sinh"), deriv=lambda x, y: np.cosh(x),
               c=c_math("sinhf({0})", "sinh({0})"))
cosh_p = unary("cosh", ufunc("cosh"), deriv=lambda x, y: np.sinh(x),
               c=c_math("coshf({0})", "cosh({0})"))
sin_p = unary("sin", ufunc("sin"), deriv=lambda x, y: np.cos(x),
              c=c_math("sinf({0})", "sin({0})"))
cos_p = unary("cos", ufunc("cos"), deriv=lambda x, y: -np.sin(x),
              c=c_math("cosf({0})", "cos({0})"))
tan_p = unary("tan", ufunc("tan"), deriv=lambda x, y: 1 + y * y,
              c=c_math("tanf({0})", "tan({0})"))
asin_p = unary("asin", ufunc("arcsin"), deriv=lambda x, y: 1 / np.sqrt(1 - x * x),
               c=c_math("asinf({0})", "asin({0})"))
acos_p = unary("acos", ufunc("arccos"), deriv=lambda x, y: -1 / np.sqrt(1 - x * x),
               c=c_math("acosf({0})", "acos({0})"))
atan_p = unary("atan", ufunc("arctan"), deriv=lambda x, y: 1 / (1 + x * x),
               c=c_math("atanf({0})", "atan({0})"))
asinh_p = unary("asinh", ufunc("arcsinh"), deriv=lambda x, y: 1 / np.sqrt(x * x + 1),
                c=c_math("asinhf({0})", "asinh({0})"))
acosh_p = unary("acosh", ufunc("arccosh"), deriv=lambda x, y: 1 / np.sqrt(x * x - 1),
                c=c_math("acoshf({0})", "acosh({0})"))
atanh_p = unary("atanh", ufunc("arctanh"), deriv=lambda x, y: 1 / (1 - x * x),
                c=c_math("atanhf({0})", "atanh({0})"))
sqrt_p = unary("sqrt", ufunc("sqrt"), deriv=lambda x, y: 0.5 / y,
               c=c_math("sqrtf({0})", "sqrt({0})"))
cbrt_p = unary("cbrt", ufunc("cbrt"), deriv=lambda x, y: 1 / (3 * y * y),
               c=c_math("cbrtf({0})", "cbrt({0})"))
rsqrt_p = unary("rsqrt", lambda xp, x: 1 / xp.sqrt(x), deriv=lambda x, y: -0.5 * y / x,
                c=c_math("(1.0f / sqrtf({0}))", "(1.0 / sqrt({0}))"))
square_p = unary("square", ufunc("square"), deriv=lambda x, y: 2 * x,
                 c=c_expr("({0} * {0})"))
reciprocal_p = unary("reciprocal", ufunc("reciprocal"), deriv=lambda x, y: -y * y,
                     c=c_math("(1.0f / {0})", "(1.0 / {0})"))
abs_p = unary("abs", ufunc("abs"), out_dtype=_real_dtype, deriv=lambda x, y: np.sign(x),
              c=c_either(c_math("fabsf({0})", "fabs({0})"), c_expr("({0} < 0 ? -{0} : {0})", "iu")))
sign_p = unary("sign", ufunc("sign"), nondiff=True,
               c=c_either(c_math("({0} != {0} ? {0} : (float)(({0} > 0) - ({0} < 0)))", "({0} != {0} ? {0} : (double)(({0} > 0) - ({0} < 0)))"), c_expr("(({0} > 0) - ({0} < 0))", "iu")))
floor_p = unary("floor", ufunc("floor"), nondiff=True,
                c=c_math("floorf({0})", "floor({0})"))
ceil_p = unary("ceil", ufunc("ceil"), nondiff=True,
               c=c_math("ceilf({0})", "ceil({0})"))
trunc_p = unary("trunc", ufunc("trunc"), nondiff=True,
                c=c_math("truncf({0})", "trunc({0})"))
round_p = unary("round", ufunc("round"), nondiff=True,
                c=c_math("rintf({0})", "rint({0})"))
rint_p = unary("rint", ufunc("rint"), nondiff=True,
               c=c_math("rintf({0})", "rint({0})"))
conj_p = unary("conj", ufunc("conj"), linear=True, transpose=lambda ct, x: [np.conj(ct)])
real_p = unary("real", ufunc("real"), out_dtype=_real_dtype, linear=True,
               transpose=lambda ct, x: [ct.astype(x.aval.dtype)])
imag_p = unary("imag", ufunc("imag"), out_dtype=_real_dtype, linear=True,
               transpose=lambda ct, x: [ct.astype(x.aval.dtype) * -1j])
logistic_p = unary("logistic", lambda xp, x: 1 / (1 + xp.exp(-x)), deriv=lambda x, y: y * (1 - y),
                   c=c_math("(1.0f / (1.0f + spmd_expf(-{0})))", "(1.0 / (1.0 + exp(-{0})))"))
not_p = unary("not", ufunc("logical_not"), out_dtype=_bool, nondiff=True,
              c=c_expr("(!{0})", "biu"))
invert_p = unary("invert", ufunc("invert"), nondiff=True,
                 c=c_either(c_expr("(!{0})", "b"), c_expr("(~{0})", "iu")))
isnan_p = unary("isnan", ufunc("isnan"), out_dtype=_bool, nondiff=True,
                c=c_expr("({0} != {0})", "f"))
isinf_p = unary("isinf", ufunc("isinf"), out_dtype=_bool, nondiff=True,
                c=c_expr("(isinf({0}) != 0)", "f"))
isfinite_p = unary("isfinite", ufunc("isfinite"), out_dtype=_bool, nondiff=True,
                   c=c_expr("(isfinite({0}) != 0)", "f"))
signbit_p = unary("signbit", ufunc("signbit"), out_dtype=_bool, nondiff=True,
                  c=c_expr("(signbit({0}) != 0)", "f"))

add_p = binary("add", ufunc("add"), linear=True,
               transpose=lambda ct, x, y: [ct if ad_util.is_undefined(x) else None, ct if ad_util.is_undefined(y) else None],
               c=c_expr("({0} + {1})"))
sub_p = binary("sub", ufunc("subtract"), linear=True,
               transpose=lambda ct, x, y: [ct if ad_util.is_undefined(x) else None, -ct if ad_util.is_undefined(y) else None],
               c=c_expr("({0} - {1})"))
mul_p = binary("mul", ufunc("multiply"), partials=lambda x, y, o: (y, x), multilinear=(0, 1),
               transpose=_mul_transpose,
               c=c_expr("({0} * {1})"))
div_p = binary("div", ufunc("true_divide"), partials=lambda x, y, o: (1 / y, -o / y),
               multilinear=(0,), transpose=lambda ct, x, y: [ct / y, None],
               c=c_expr("({0} / {1})", "f"))
floordiv_p = binary("floordiv", ufunc("floor_divide"), nondiff=True)
rem_p = binary("rem", ufunc("remainder"), partials=lambda x, y, o: (1, -np.floor(x / y)))
fmod_p = binary("fmod", ufunc("fmod"), partials=lambda x, y, o: (1, -np.trunc(x / y)),
                c=c_math("fmodf({0}, {1})", "fmod({0}, {1})"))
class _power(ufunc):
    """``power``, with a float array raised to the scalar 2 or 3 (``x ** 3``, the derivative's
    ``x ** 2``) as products: what XLA computes for JAX's ``integer_pow``, and several times
    faster than the ``powf`` NumPy calls for every element."""
    __slots__ = ()

    def __call__(self, xp, x, y, out=None):
        if getattr(x, "dtype", None) is not None and x.dtype.kind == "f" and np.size(y) == 1 \
                and np.ndim(y) <= np.ndim(x) and getattr(y, "dtype", x.dtype) == x.dtype:
            e = float(np.reshape(y, -1)[0]) if np.ndim(y) else float(y)
            if e == 2.0:
                return xp.multiply(x, x, out=out)
            if e == 3.0:        # ``out`` may be ``x``'s own buffer: square into a fresh one
                return xp.multiply(xp.multiply(x, x), x, out=out)
        return super().__call__(xp, x, y, out=out)


pow_p = binary("pow", _power("power"),
               partials=lambda x, y, o: (_pow_dx(x, y), np.log(np.where(x > 0, x, 1)) * o),
               c=c_math("spmd_powf({0}, {1})", "spmd_pow({0}, {1})"))
max_p = binary("max", ufunc("maximum"), partials=lambda x, y, o: _chooser(x > y, x == y),
               monoid="max",
               c=c_expr("(({0} != {0} || {0} > {1}) ? {0} : {1})"))
min_p = binary("min", ufunc("minimum"), partials=lambda x, y, o: _chooser(x < y, x == y),
               monoid="min",
               c=c_expr("(({0} != {0} || {0} < {1}) ? {0} : {1})"))
fmax_p = binary("fmax", ufunc("fmax"), partials=lambda x, y, o: _chooser(x > y, x == y),
                c=c_math("fmaxf({0}, {1})", "fmax({0}, {1})"))
fmin_p = binary("fmin", ufunc("fmin"), partials=lambda x, y, o: _chooser(x < y, x == y),
                c=c_math("fminf({0}, {1})", "fmin({0}, {1})"))
atan2_p = binary("atan2", ufunc("arctan2"),
                 partials=lambda x, y, o: (y / (x * x + y * y), -x / (x * x + y * y)),
                 c=c_math("atan2f({0}, {1})", "atan2({0}, {1})"))
hypot_p = binary("hypot", ufunc("hypot"), partials=lambda x, y, o: (x / o, y / o),
                 c=c_math("hypotf({0}, {1})", "hypot({0}, {1})"))
copysign_p = binary("copysign", ufunc("copysign"),
                    partials=lambda x, y, o: (np.sign(x) * np.sign(o), 0),
                    c=c_math("copysignf({0}, {1})", "copysign({0}, {1})"))
logaddexp_p = binary("logaddexp", ufunc("logaddexp"),
                     partials=lambda x, y, o: (np.exp(x - o), np.exp(y - o)))
and_p = binary("and", ufunc("bitwise_and"), nondiff=True,
               c=c_expr("({0} & {1})", "biu"))
or_p = binary("or", ufunc("bitwise_or"), nondiff=True,
              c=c_expr("({0} | {1})", "biu"))
xor_p = binary("xor", ufunc("bitwise_xor"), nondiff=True,
               c=c_expr("({0} ^ {1})", "biu"))
shift_left_p = binary("shift_left", ufunc("left_shift"), nondiff=True)
shift_right_p = binary("shift_right", ufunc("right_shift"), nondiff=True)
eq_p = binary("eq", ufunc("equal"), out_dtype=_bool, nondiff=True,
              c=c_expr("({0} == {1})", "biuf"))
ne_p = binary("ne", ufunc("not_equal"), out_dtype=_bool, nondiff=True,
              c=c_expr("({0} != {1})", "biuf"))
lt_p = binary("lt", ufunc("less"), out_dtype=_bool, nondiff=True,
              c=c_expr("({0} < {1})", "biuf"))
le_p = binary("le", ufunc("less_equal"), out_dtype=_bool, nondiff=True,
              c=c_expr("({0} <= {1})", "biuf"))
gt_p = binary("gt", ufunc("greater"), out_dtype=_bool, nondiff=True,
              c=c_expr("({0} > {1})", "biuf"))
ge_p = binary("ge", ufunc("greater_equal"), out_dtype=_bool, nondiff=True,
              c=c_expr("({0} >= {1})", "biuf"))


def _select_abstract(pred, on_true, on_false):
    return Aval(_ew_shape(pred, on_true, on_false), on_true.dtype)


def _select_jvp(primals, tangents):
    (c, x, y), (_, tx, ty) = primals, tangents
    out = bind(select_p, c, x, y)
    return out, bind(select_p, c, ad_util.instantiate(tx, ad_util.aval_of_value(out)),
                     ad_util.instantiate(ty, ad_util.aval_of_value(out)))


def _select_transpose(ct, c, x, y):
    zero = np.zeros((), ct.dtype)
    return [None, bind(select_p, c, ct, zero) if ad_util.is_undefined(x) else None,
            bind(select_p, c, zero, ct) if ad_util.is_undefined(y) else None]


def _select_impl(xp, k, c, x, y):
    """``where(c, x, y)``; a predicate that is one value per device (a broadcast: a pipeline's
    ``where(stage == 0, fed, arrived)``) picks each device's block whole: a copy, not a pass
    over every element with its three operands."""
    if xp is np and isinstance(c, np.ndarray) and c.ndim >= k and not any(c.strides[k:]):
        shape = np.broadcast_shapes(c.shape, np.shape(x), np.shape(y))
        if (len(shape) == c.ndim and math.prod(shape[:k]) <= _PICK_MAX_DEVICES
                and math.prod(shape) >= _PICK_MIN_ELEMENTS):
            out = _host_parallel.empty(np, shape, np.result_type(x, y))   # pooled: no page faults
            x, y = np.broadcast_to(x, shape), np.broadcast_to(y, shape)
            if k == 1:              # devices in a row that pick the same side: one copy
                pick = np.broadcast_to(c[(slice(None),) + (0,) * (c.ndim - 1)], shape[:1])
                start = 0
                for end in [*(np.flatnonzero(pick[1:] != pick[:-1]) + 1).tolist(), shape[0]]:
                    np.copyto(out[start:end], (x if pick[start] else y)[start:end])
                    start = end
                return out
            for idx in np.ndindex(*shape[:k]):
                at = tuple(min(i, n - 1) for i, n in zip(idx, c.shape)) + (0,) * (c.ndim - k)
                np.copyto(out[idx], x[idx] if c[at] else y[idx])
            return out
    return xp.where(c, x, y)


_PICK_MAX_DEVICES, _PICK_MIN_ELEMENTS = 64, 1 << 14

select_p = Primitive("select", abstract=_select_abstract,
                     impl=_select_impl, category="elementwise",
                     linear=(1, 2), jvp=_select_jvp, transpose=_select_transpose,
                     sharding=sharding_rules.select,
                     c=lambda cw, dts, out: "({0} ? {1} : {2})" if dts[1] == dts[2] else None)
select_p.batch = batching.elementwise_batch(select_p)


def _convert_abstract(x, *, dtype):
    return Aval(x.shape, np.dtype(dtype))


def _convert_impl(xp, k, x, *, dtype):
    return x.astype(dtype) if hasattr(x, "astype") else xp.asarray(x, dtype=dtype)


def _convert_jvp(primals, tangents, *, dtype):
    (x,), (t,) = primals, tangents
    out = bind(convert_element_type_p, x, dtype=dtype)
    if not (ad_util.differentiable(dtype) and ad_util.differentiable(ad_util.aval_of_value(x).dtype)):
        return out, ad_util.Zero(ad_util.aval_of_value(out))
    return out, bind(convert_element_type_p, t, dtype=dtype)


def _convert_c(cw, dts, out):
    if out == np.bool_:
        return "({0} != 0)"
    if dts[0].kind == "f" and out.kind in "iu":
        return None                 # out of range or NaN: C leaves it undefined, NumPy does not
    return f"(({cw.ctype(out)}){{0}})"


convert_element_type_p = Primitive(
    "convert_element_type", abstract=_convert_abstract, impl=_convert_impl, category="elementwise",
    c=_convert_c,
    linear=lambda dtype: np.dtype(dtype).kind in "fc",     # rounding to integers is not linear
    jvp=_convert_jvp,
    transpose=lambda ct, x, *, dtype: [bind(convert_element_type_p, ct, dtype=x.aval.dtype)])
convert_element_type_p.batch = batching.elementwise_batch(convert_element_type_p)


def _bitcast_abstract(x, *, dtype):
    if np.dtype(dtype).itemsize != np.dtype(x.dtype).itemsize:
        raise TypeError(f"bitcast_convert_type: {x.dtype} and {np.dtype(dtype)} differ in width")
    return Aval(x.shape, np.dtype(dtype))


# the same bits read as another dtype of the same width (``x.view(dtype)``)
bitcast_convert_type_p = Primitive(
    "bitcast_convert_type", abstract=_bitcast_abstract, category="elementwise",
    impl=lambda xp, k, x, *, dtype: xp.asarray(x).view(dtype))
bitcast_convert_type_p.jvp = ad_util.zero_jvp(bitcast_convert_type_p)
bitcast_convert_type_p.batch = batching.elementwise_batch(bitcast_convert_type_p)

# ---------------------------------------------------------------------------------------------
# shape and layout
# ---------------------------------------------------------------------------------------------


def _bid_abstract(x, *, shape, dims):
    if len(dims) != x.ndim or any(x.shape[i] not in (1, shape[d]) for i, d in enumerate(dims)):
        raise ValueError(f"cannot broadcast shape {x.shape} to {shape} along dims {dims}")
    return Aval(tuple(shape), x.dtype)


def _bid_impl(xp, k, x, *, shape, dims):
    x = xp.asarray(x)              # a Python scalar operand (a weak literal inlined by a rule)
    lead = x.shape[:k]
    expanded = [1] * len(shape)
    for i, d in enumerate(dims):
        expanded[d] = x.shape[k + i]
    return xp.broadcast_to(x.reshape(lead + tuple(expanded)), lead + tuple(shape))


def _bid_transpose(ct, x, *, shape, dims):
    summed = tuple(sorted([d for d in range(len(shape)) if d not in dims] +
                          [d for i, d in enumerate(dims) if x.aval.shape[i] == 1 and shape[d] != 1]))
    out = bind(reduce_sum_p, ct, axes=summed) if summed else ct
    return [bind(reshape_p, out, shape=x.aval.shape) if out.shape != x.aval.shape else out]


broadcast_in_dim_p = Primitive("broadcast_in_dim", abstract=_bid_abstract, impl=_bid_impl,
                               category="broadcast", linear=True, transpose=_bid_transpose,
                               c=lambda cw, x, *, shape, dims: [cw.broadcast_in_dim(x, shape, dims)])
broadcast_in_dim_p.batch = batching.shifted_batch(broadcast_in_dim_p, lambda p, n: dict(
    p, shape=(n,) + tuple(p["shape"]), dims=(0,) + tuple(d + 1 for d in p["dims"])))


def _reshape_abstract(x, *, shape):
    if math.prod(shape) != x.size:
        raise ValueError(f"cannot reshape {x.shape} (size {x.size}) into {shape}")
    return Aval(tuple(shape), x.dtype)


reshape_p = Primitive("reshape", abstract=_reshape_abstract,
                      impl=lambda xp, k, x, *, shape: xp.reshape(x, x.shape[:k] + tuple(shape)),
                      linear=True, category="reshape",
                      transpose=lambda ct, x, *, shape: [bind(reshape_p, ct, shape=x.aval.shape)],
                      c=lambda cw, x, *, shape: [cw.reshape(x, shape)])
reshape_p.batch = batching.shifted_batch(reshape_p, lambda p, n: dict(p, shape=(n,) + tuple(p["shape"])))


def _transpose_abstract(x, *, perm):
    if sorted(perm) != list(range(x.ndim)):
        raise ValueError(f"transpose permutation {perm} does not fit rank {x.ndim}")
    return Aval(tuple(x.shape[p] for p in perm), x.dtype)


transpose_p = Primitive("transpose", abstract=_transpose_abstract,
                        impl=lambda xp, k, x, *, perm: xp.transpose(x, tuple(range(k)) + _shift(perm, k)),
                        linear=True, category="transpose",
                        transpose=lambda ct, x, *, perm: [bind(transpose_p, ct, perm=tuple(np.argsort(perm).tolist()))],
                        c=lambda cw, x, *, perm: [cw.transpose(x, perm)])
transpose_p.batch = batching.shifted_batch(transpose_p, lambda p, n: dict(p, perm=(0,) + tuple(a + 1 for a in p["perm"])))


def _slice_abstract(x, *, index):
    return Aval(tuple(len(range(*s)) for s in index), x.dtype)


slice_p = Primitive("slice", abstract=_slice_abstract,
                    impl=lambda xp, k, x, *, index: x[(slice(None),) * k + tuple(
                        slice(a, None if (c < 0 and b < 0) else b, c) for a, b, c in index)],
                    linear=True, category="slice", transpose=lambda ct, x, *, index: [_unslice(ct, x.aval, index)],
                    c=lambda cw, x, *, index: [cw.slice(x, index)])
slice_p.batch = batching.shifted_batch(slice_p, lambda p, n: dict(p, index=((0, n, 1),) + tuple(p["index"])))


def _unslice(ct, aval, index):
    """The transpose of ``slice``: put ``ct`` back where it came from, zeros elsewhere (one pad
    for the dims sliced to a contiguous range, a scatter-add for each strided one)."""
    config = [(0, 0)] * ct.ndim
    for d, (n, s) in enumerate(zip(aval.shape, index)):
        picked = list(range(*s))
        if picked == list(range(picked[0], picked[0] + len(picked))) if picked else False:
            config[d] = (picked[0], n - picked[-1] - 1)
        else:
            zeros = ad_util.full(ad_util.aval_of_value(ct).update(shape=ct.shape[:d] + (n,) + ct.shape[d + 1:]), 0)
            ct = bind(scatter_add_p, zeros, np.asarray(picked, np.int64), ct, axis=d)
    if any(config):
        ct = bind(pad_p, ct, np.zeros((), ct.dtype), config=tuple(config))
    return ct


def _pad_abstract(x, value, *, config):
    return Aval(tuple(d + lo + hi for d, (lo, hi) in zip(x.shape, config)), x.dtype)


def _pad_impl(xp, k, x, value, *, config):
    v = value.reshape(()) if getattr(value, "ndim", 0) and value.size == 1 else value
    if getattr(v, "ndim", 0) or any(lo < 0 or hi < 0 for lo, hi in config):
        return xp.pad(x, ((0, 0),) * k + tuple(config), constant_values=v)
    # one fill and one copy: NumPy's pad walks every side of every dim (3x slower here)
    shape = x.shape[:k] + tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[k:], config))
    out = xp.zeros(shape, x.dtype) if v == 0 else xp.full(shape, v, x.dtype)
    out[(slice(None),) * k + tuple(slice(lo, lo + n) for n, (lo, _) in
                                   zip(x.shape[k:], config))] = x
    return out


def _pad_transpose(ct, x, value, *, config):
    inner = bind(slice_p, ct, index=tuple((lo, lo + n, 1) for n, (lo, hi) in zip(x.aval.shape, config)))
    cv = None
    if ad_util.is_undefined(value):
        total = bind(reduce_sum_p, ct, axes=tuple(range(ct.ndim)))
        cv = total - bind(reduce_sum_p, inner, axes=tuple(range(ct.ndim)))
    return [inner if ad_util.is_undefined(x) else None, cv]


pad_p = Primitive("pad", abstract=_pad_abstract, impl=_pad_impl, category="pad", linear=True,
                  transpose=_pad_transpose)
pad_p.jvp = ad_util.linear_jvp(pad_p)


def _pad_batch(vals, dims, *, config):
    batching.require_unbatched(pad_p, "padding value", dims[1:])
    return bind(pad_p, batching.moveaxis(vals[0], dims[0], 0), vals[1], config=((0, 0),) + tuple(config)), 0


pad_p.batch = _pad_batch


def _concat_abstract(*xs, axis):
    base = list(xs[0].shape)
    for x in xs[1:]:
        if len(x.shape) != len(base) or any(a != b for i, (a, b) in enumerate(zip(x.shape, base)) if i != axis):
            raise ValueError(f"concatenate: shapes {[x.shape for x in xs]} differ outside axis {axis}")
    base[axis] = sum(x.shape[axis] for x in xs)
    return Aval(tuple(base), xs[0].dtype)


concatenate_p = Primitive("concatenate", abstract=_concat_abstract,
                          impl=lambda xp, k, *xs, axis: _host_parallel.concatenate(xp, _common_batch(xp, k, list(xs)), axis + k),
                          linear=True, category="concatenate", transpose=lambda ct, *xs, axis: _concat_transpose(ct, xs, axis),
                          c=lambda cw, *xs, axis: [cw.concatenate(xs, axis)])
concatenate_p.batch = batching.shifted_batch(concatenate_p, batching.plus1("axis"))


def _concat_transpose(ct, xs, axis):
    out, start = [], 0
    for x in xs:
        n = ad_util.aval_of_value(x).shape[axis]
        out.append(bind(slice_p, ct, index=tuple((start, start + n, 1) if d == axis else (0, s, 1)
                                                 for d, s in enumerate(ct.shape)))
                   if ad_util.is_undefined(x) else None)
        start += n
    return out


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


def reduction(name, fn, monoid, out_dtype=None, **rules):
    p = Primitive(name, abstract=_reduce_abstract(out_dtype),
                  impl=lambda xp, k, x, *, axes: fn(xp, x, _shift(axes, k)),
                  category="reduction", monoid=monoid,
                  c=lambda cw, x, *, axes: [cw.reduce(x, axes, monoid)], **rules)
    p.batch = batching.shifted_batch(p, batching.plus1("axes"))
    return p


def _kept(ndim, axes):
    return tuple(i for i in range(ndim) if i not in axes)


def _reduce_sum_transpose(ct, x, *, axes):
    return [bind(broadcast_in_dim_p, ct, shape=x.aval.shape, dims=_kept(x.aval.ndim, axes))]


def _reduce_chooser_jvp(primals, tangents, *, axes, prim):
    """max/min: the tangent of the chosen elements (averaged over ties)."""
    (x,), (t,) = primals, tangents
    y = bind(prim, x, axes=axes)
    chosen = (x == bind(broadcast_in_dim_p, y, shape=x.shape, dims=_kept(x.ndim, axes))).astype(x.dtype)
    return y, bind(reduce_sum_p, t * chosen, axes=axes) / bind(reduce_sum_p, chosen, axes=axes)


def _reduce_prod_jvp(primals, tangents, *, axes):
    (x,), (t,) = primals, tangents
    y = bind(reduce_prod_p, x, axes=axes)
    return y, bind(reduce_sum_p, t * bind(broadcast_in_dim_p, y, shape=x.shape, dims=_kept(x.ndim, axes)) / x,
                   axes=axes)


reduce_sum_p = reduction("reduce_sum", lambda xp, x, a: xp.sum(x, axis=a, dtype=x.dtype), linear=True, monoid="sum",
                         transpose=_reduce_sum_transpose)
reduce_sum_p.jvp = ad_util.linear_jvp(reduce_sum_p)
reduce_max_p = reduction("reduce_max", lambda xp, x, a: xp.max(x, axis=a), monoid="max",
                         jvp=lambda p, t, *, axes: _reduce_chooser_jvp(p, t, axes=axes, prim=reduce_max_p))
reduce_min_p = reduction("reduce_min", lambda xp, x, a: xp.min(x, axis=a), monoid="min",
                         jvp=lambda p, t, *, axes: _reduce_chooser_jvp(p, t, axes=axes, prim=reduce_min_p))
reduce_prod_p = reduction("reduce_prod", lambda xp, x, a: xp.prod(x, axis=a, dtype=x.dtype), monoid="prod",
                          jvp=_reduce_prod_jvp)
reduce_and_p = reduction("reduce_and", lambda xp, x, a: xp.all(x, axis=a), monoid="and",
                         out_dtype=_bool)
reduce_or_p = reduction("reduce_or", lambda xp, x, a: xp.any(x, axis=a), monoid="or",
                        out_dtype=_bool)
reduce_and_p.jvp, reduce_or_p.jvp = ad_util.zero_jvp(reduce_and_p), ad_util.zero_jvp(reduce_or_p)


def _arg_abstract(x, *, axis, index_dtype):
    return Aval(tuple(d for i, d in enumerate(x.shape) if i != axis), np.dtype(index_dtype))


argmax_p = Primitive("argmax", abstract=_arg_abstract, category="arg",
                     impl=lambda xp, k, x, *, axis, index_dtype: xp.argmax(x, axis=axis + k).astype(index_dtype))
argmin_p = Primitive("argmin", abstract=_arg_abstract, category="arg",
                     impl=lambda xp, k, x, *, axis, index_dtype: xp.argmin(x, axis=axis + k).astype(index_dtype))
argmax_p.jvp, argmin_p.jvp = ad_util.zero_jvp(argmax_p), ad_util.zero_jvp(argmin_p)
argmax_p.batch = batching.shifted_batch(argmax_p, batching.plus1("axis"))
argmin_p.batch = batching.shifted_batch(argmin_p, batching.plus1("axis"))


def _cum_impl(fn):
    def impl(xp, k, x, *, axis, reverse):
        if reverse:
            x = xp.flip(x, axis=axis + k)
        out = fn(xp, x, axis + k)
        return xp.flip(out, axis=axis + k) if reverse else out
    return impl


_same = lambda x, **p: Aval(x.shape, x.dtype)
def _take_along(x, idx, axis):
    """``np.take_along_axis`` from ``take`` on the flattened value (so its transpose is a
    ``scatter_add``)."""
    shape = x.shape
    flat = idx.astype(np.int64) * math.prod(shape[axis + 1:])
    for d, n in enumerate(shape):
        if d != axis:
            flat = flat + bind(iota_p, dtype=np.int64, shape=shape, dimension=d) * math.prod(shape[d + 1:])
    return bind(take_p, bind(reshape_p, x, shape=(math.prod(shape),)), flat, axis=0)


def _cum_record_jvp(prim):
    """cummax/cummin: each output is the element of the latest running record (earliest,
    when reversed), so its tangent is that element's."""
    def jvp(primals, tangents, *, axis, reverse):
        (x,), (t,) = primals, tangents
        y = bind(prim, x, axis=axis, reverse=reverse)
        pos = bind(iota_p, dtype=np.int64, shape=x.shape, dimension=axis)
        if reverse:
            rec = bind(cummin_p, np.where(x == y, pos, x.shape[axis]), axis=axis, reverse=True)
        else:
            rec = bind(cummax_p, np.where(x == y, pos, 0), axis=axis, reverse=False)
        return y, _take_along(t, rec, axis)
    return jvp


def _cumprod_jvp(primals, tangents, *, axis, reverse):
    (x,), (t,) = primals, tangents
    y = bind(cumprod_p, x, axis=axis, reverse=reverse)
    return y, y * bind(cumsum_p, t / x, axis=axis, reverse=reverse)


def _sort_jvp(primals, tangents, *, axis):
    (x,), (t,) = primals, tangents
    perm = bind(argsort_p, x, axis=axis, index_dtype=np.dtype(np.int64))
    return _take_along(x, perm, axis), _take_along(t, perm, axis)


cumsum_p = Primitive("cumsum", abstract=_same, impl=_cum_impl(lambda xp, x, a: xp.cumsum(x, axis=a, dtype=x.dtype)), linear=True,
                     category="scan",
                     transpose=lambda ct, x, *, axis, reverse: [bind(cumsum_p, ct, axis=axis, reverse=not reverse)])
cumsum_p.jvp = ad_util.linear_jvp(cumsum_p)
cumprod_p = Primitive("cumprod", abstract=_same, impl=_cum_impl(lambda xp, x, a: xp.cumprod(x, axis=a, dtype=x.dtype)),
                      category="scan", jvp=_cumprod_jvp)
cummax_p = Primitive("cummax", abstract=_same, impl=_cum_impl(lambda xp, x, a: xp.maximum.accumulate(x, axis=a)),
                     category="scan")
cummin_p = Primitive("cummin", abstract=_same, impl=_cum_impl(lambda xp, x, a: xp.minimum.accumulate(x, axis=a)),
                     category="scan")
cummax_p.jvp, cummin_p.jvp = _cum_record_jvp(cummax_p), _cum_record_jvp(cummin_p)

sort_p = Primitive("sort", abstract=_same, impl=lambda xp, k, x, *, axis: xp.sort(x, axis=axis + k),
                   category="scan", jvp=_sort_jvp)
argsort_p = Primitive("argsort", abstract=lambda x, *, axis, index_dtype: Aval(x.shape, np.dtype(index_dtype)),
                      category="scan",
                      impl=lambda xp, k, x, *, axis, index_dtype: xp.argsort(x, axis=axis + k, kind="stable").astype(index_dtype))
argsort_p.jvp = ad_util.zero_jvp(argsort_p)
for _p in (cumsum_p, cumprod_p, cummax_p, cummin_p, sort_p, argsort_p):
    _p.batch = batching.shifted_batch(_p, batching.plus1("axis"))

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


def _one_block(a, k):
    """Stacked ``a`` with each mesh dim along which it is a broadcast (stride 0: every device's
    block is the same, as after a ``pvary``) cut to size 1, so that a product with an operand
    that varies there folds the devices into its rows or columns (one big product) instead of
    repeating the same block once per device."""
    strides = getattr(a, "strides", None)
    if not k or strides is None:
        return a
    cut = [a.shape[i] > 1 and strides[i] == 0 for i in range(k)]
    return a[tuple(slice(0, 1) if c else slice(None) for c in cut)] if any(cut) else a


def _dot_impl(xp, k, x, y, *, contract, batch):
    """Transpose both operands to (batch, free, contract) / (batch, contract, free) and use
    matmul (BLAS).  A mesh dim along which only one operand varies (the other has size 1
    there) joins that operand's free dims where that needs no copy: x stacked (2,1,B,K) @ w
    stacked (1,4,K,N) is one (2B,K) @ (K,4N) product when w's blocks lie side by side (a
    view of the global array), else one (2B,K) block times each (K,N) block; not 8 products
    of B rows."""
    (xc, yc), (xb, yb) = contract, batch
    x, y = _one_block(x, k), _one_block(y, k)
    xf = [i for i in range(x.ndim - k) if i not in xc + xb]
    yf = [j for j in range(y.ndim - k) if j not in yc + yb]
    B = tuple(x.shape[k + i] for i in xb)
    C = math.prod(x.shape[k + i] for i in xc)

    def matrix(a, own, drop, fold, is_x):
        """``a`` transposed to (drop, lead, B, fold, free, C) if ``is_x`` else (drop, lead, B,
        C, fold, free), reshaped to (lead, B, rows, C) / (lead, B, C, cols), and the sizes that
        make its rows / cols; None for the matrix when ``fold`` would need a copy.  ``drop``:
        size-1 dims of ``a`` that the other operand folds."""
        b, free, c = own
        lead = tuple(i for i in range(k) if i not in drop + fold)
        ax = lambda t: _shift(tuple(t), k)
        rows = tuple(a.shape[i] for i in fold) + tuple(a.shape[k + i] for i in free)
        if is_x:
            t = xp.transpose(a, drop + lead + ax(b) + fold + ax(free) + ax(c))
            shape = tuple(a.shape[i] for i in lead) + B + (math.prod(rows), C)
        else:
            t = xp.transpose(a, drop + lead + ax(b) + ax(c) + fold + ax(free))
            shape = tuple(a.shape[i] for i in lead) + B + (C, math.prod(rows))
        if fold and not _host_parallel.reshape_is_view(xp, t, shape):
            return None, rows
        return _host_parallel.reshape(xp, t, shape), rows

    x_only = tuple(i for i in range(k) if y.shape[i] == 1 < x.shape[i])
    y_only = tuple(i for i in range(k) if x.shape[i] == 1 < y.shape[i])
    fx = x_only if x_only and matrix(x, (xb, xf, xc), (), x_only, True)[0] is not None else ()
    fy = y_only if y_only and matrix(y, (yb, yf, yc), (), y_only, False)[0] is not None else ()
    a, M = matrix(x, (xb, xf, xc), fy, fx, True)
    b, N = matrix(y, (yb, yf, yc), fx, fy, False)
    out = _host_parallel.matmul(xp, a, b, devices_folded=bool(fx or fy))
    lead = tuple(i for i in range(k) if i not in fx + fy)
    out = out.reshape(out.shape[:len(lead)] + B + M + N)
    if not fx and not fy:
        return out
    # mesh dims back in front: out is (lead, B, fx, x free, fy, y free)
    s, nb = len(lead), len(B)
    where = {d: j for j, d in enumerate(lead)}
    where.update({d: s + nb + j for j, d in enumerate(fx)})
    where.update({d: s + nb + len(M) + j for j, d in enumerate(fy)})
    perm = ([where[d] for d in range(k)] + list(range(s, s + nb)) + list(range(s + nb + len(fx), s + nb + len(M)))
            + list(range(s + nb + len(M) + len(fy), out.ndim)))
    return xp.transpose(out, perm)


def _dot_jvp(primals, tangents, *, contract, batch):
    (x, y), (tx, ty) = primals, tangents
    out = bind(dot_general_p, x, y, contract=contract, batch=batch)
    return out, ad_util.add_tangents(
        tx if ad_util.is_zero(tx) else bind(dot_general_p, tx, y, contract=contract, batch=batch),
        ty if ad_util.is_zero(ty) else bind(dot_general_p, x, ty, contract=contract, batch=batch))


def _dot_transpose(ct, x, y, *, contract, batch):
    """The cotangent of one operand is a dot_general of ``ct`` with the other operand, in the
    order that makes its dims come out as the operand's (no transpose in the common cases)."""
    if ad_util.is_undefined(x) and ad_util.is_undefined(y):
        raise TypeError("transpose rule for dot_general: both operands are linear")
    # On Explicit axes the product may contract a dim sharded on both sides (ct's and the
    # other operand's): it is computed untyped, and the backward pass types it as the operand's
    # cotangent (JAX's out_sharding=), the compiler planning the reduction.
    with untyped():
        if ad_util.is_undefined(x):
            return [_dot_transpose_operand(ct, x.aval.ndim, y, contract, batch, is_y=False), None]
        (xc, yc), (xb, yb) = contract, batch
        return [None, _dot_transpose_operand(ct, y.aval.ndim, x, (yc, xc), (yb, xb), is_y=True)]


def _dot_transpose_operand(ct, ndim, other, contract, batch, is_y):
    """``contract`` / ``batch``: (the operand's dims, the other's).  ``ct``'s dims are (batch,
    x free, y free); the other's free dims contract with their place in ``ct``."""
    (oc, tc), (ob, tb) = contract, batch
    own_free = [i for i in range(ndim) if i not in oc + ob]
    other_free = [j for j in range(ad_util.aval_of_value(other).ndim) if j not in tc + tb]
    nb = len(ob)
    at = nb if is_y else nb + len(own_free)            # where the other's free dims sit in ct
    ct_other = tuple(range(at, at + len(other_free)))
    # the other's remaining dims (its contract dims, in its order) are the operand's contract dims
    own_contract = [oc[i] for i in np.argsort(tc)]
    if is_y:    # (batch, contract, free): y = x^T ct keeps y's order in the usual layouts
        out = bind(dot_general_p, other, ct, contract=(tuple(other_free), ct_other), batch=(tuple(tb), tuple(range(nb))))
        order = list(ob) + own_contract + own_free
    else:       # (batch, free, contract): x = ct y^T
        out = bind(dot_general_p, ct, other, contract=(ct_other, tuple(other_free)), batch=(tuple(range(nb)), tuple(tb)))
        order = list(ob) + own_free + own_contract
    perm = tuple(np.argsort(order).tolist())
    return out if perm == tuple(range(ndim)) else bind(transpose_p, out, perm=perm)


def _dot_batch(vals, dims, *, contract, batch):
    """A batched operand's batch dim becomes a dot_general batch dim (both batched) or a free
    dim, whose place in the output (batch dims, x free, y free) is the result's batch dim."""
    (x, y), (dx, dy) = vals, dims
    (xc, yc), (xb, yb) = contract, batch
    up = lambda t: tuple(a + 1 for a in t)
    if dx is not None and dy is not None:
        x, y = batching.moveaxis(x, dx, 0), batching.moveaxis(y, dy, 0)
        return bind(dot_general_p, x, y, contract=(up(xc), up(yc)), batch=((0,) + up(xb), (0,) + up(yb))), 0
    if dx is not None:
        x = batching.moveaxis(x, dx, 0)
        return bind(dot_general_p, x, y, contract=(up(xc), yc), batch=(up(xb), yb)), len(xb)
    y = batching.moveaxis(y, dy, 0)
    x_free = ad_util.aval_of_value(x).ndim - len(xc) - len(xb)
    return bind(dot_general_p, x, y, contract=(xc, up(yc)), batch=(xb, up(yb))), len(xb) + x_free


dot_general_p = Primitive("dot_general", abstract=_dot_abstract, impl=_dot_impl, category="contraction",
                          multilinear=(0, 1), jvp=_dot_jvp, transpose=_dot_transpose, batch=_dot_batch,
                          c=lambda cw, x, y, *, contract, batch: [cw.dot_general(x, y, contract, batch)])

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
    lead = broadcast_shapes(x.shape[:k], idx.shape[:k])
    ni = idx.ndim - k
    xm = xp.moveaxis(x, k + axis, k)                         # K, A, pre..., post...
    grids = [xp.arange(s).reshape((-1,) + (1,) * (k - 1 - i + ni)) for i, s in enumerate(lead)]
    grids = [g if x.shape[i] != 1 else xp.zeros_like(g) for i, g in enumerate(grids)]
    out = xm[tuple(grids) + (idx,)]                            # K, I..., pre..., post...
    pre = list(range(k + ni, k + ni + axis))
    perm = list(range(k)) + pre + list(range(k, k + ni)) + list(range(k + ni + axis, out.ndim))
    return xp.transpose(out, perm)


def _take_jvp(primals, tangents, *, axis):
    (x, idx), (t, _) = primals, tangents
    return bind(take_p, x, idx, axis=axis), bind(take_p, t, idx, axis=axis)


def _take_transpose(ct, x, idx, *, axis):
    return [bind(scatter_add_p, ad_util.full(x.aval, 0), idx, ct, axis=axis), None]


def _take_batch(vals, dims, *, axis):
    (x, idx), (dx, di) = vals, dims
    if di is None:
        return bind(take_p, batching.moveaxis(x, dx, 0), idx, axis=axis + 1), 0
    if dx is None:
        return bind(take_p, x, idx, axis=axis), axis + di
    # both batched: gather from the flattened (batch, axis) pair
    x, idx = batching.moveaxis(x, dx, 0), batching.moveaxis(idx, di, 0)
    B, xs = x.shape[0], x.shape[1:]
    n, rest = xs[axis], xs[:axis] + xs[axis + 1:]
    flat = bind(reshape_p, batching.moveaxis(x, axis + 1, 1), shape=(B * n,) + rest)
    offsets = bind(iota_p, dtype=idx.dtype, shape=idx.shape, dimension=0) * n
    out = bind(take_p, flat, np.where(idx < 0, idx + n, idx) + offsets, axis=0)   # B, I..., rest...
    ni = idx.ndim - 1
    perm = ((0,) + tuple(range(1 + ni, 1 + ni + axis)) + tuple(range(1, 1 + ni))
            + tuple(range(1 + ni + axis, 1 + ni + len(rest))))
    return bind(transpose_p, out, perm=perm), 0


take_p = Primitive("take", abstract=_take_abstract, impl=_take_impl, category="gather",
                   multilinear=(0,), jvp=_take_jvp, transpose=_take_transpose, batch=_take_batch)


def _dynamic_slice_abstract(x, *starts, sizes):
    return Aval(tuple(sizes), x.dtype)


def _dynamic_slice_impl(xp, k, x, *starts, sizes):
    for d, (s, size) in enumerate(zip(starts, sizes)):
        ax = k + d
        if size == x.shape[ax]:
            continue
        window = (slice(None),) * ax
        if xp is np and x.strides[ax] == 0:             # a broadcast dim: every window is the same
            x = x[window + (slice(0, size),)]
            continue
        s = xp.asarray(xp.clip(s, 0, x.shape[ax] - size))
        s = s.reshape((1,) * (k - s.ndim) + s.shape)       # a literal start has no batch dims
        if xp is np and s.size <= 64:
            x = _dynamic_slice_by_position(x, k, ax, s, size)
            continue
        idx = s[..., None] + xp.arange(size)
        x = _take_impl(xp, k, x, idx.reshape(idx.shape[:k] + (size,)) if k else idx, axis=d)
    return x


def _dynamic_slice_by_position(x, k, ax, s, size):
    """``x`` cut to ``size`` along ``ax`` at start ``s`` (one per position of the leading ``k``
    dims; a simulated device's block offset): one plain slice copy per distinct start, which
    streams memory where a gather of ``start + arange(size)`` indexes every element."""
    lead = broadcast_shapes(x.shape[:k], s.shape)
    out = _host_parallel.empty(np, lead + x.shape[k:ax] + (size,) + x.shape[ax + 1:], x.dtype)
    x = np.broadcast_to(x, lead + x.shape[k:])
    tail = (slice(None),) * (ax - k)
    for pos in np.ndindex(*s.shape):
        sel = tuple(slice(p, p + 1) if n > 1 else slice(None) for p, n in zip(pos, s.shape))
        start = int(s[pos])
        np.copyto(out[sel], x[sel + tail + (slice(start, start + size),)])
    return out


def _dynamic_slice_jvp(primals, tangents, *, sizes):
    x, *starts = primals
    return (bind(dynamic_slice_p, x, *starts, sizes=sizes),
            bind(dynamic_slice_p, tangents[0], *starts, sizes=sizes))


dynamic_slice_p = Primitive(
    "dynamic_slice", abstract=_dynamic_slice_abstract, impl=_dynamic_slice_impl, category="window",
    multilinear=(0,), jvp=_dynamic_slice_jvp,
    transpose=lambda ct, x, *starts, sizes: [bind(dynamic_update_slice_p, ad_util.full(x.aval, 0), ct, *starts)]
    + [None] * len(starts))


def _dynamic_slice_batch(vals, dims, *, sizes):
    """Unbatched starts: one dynamic_slice of the batched operand.  A batched start: a batched
    gather of ``start + arange(size)`` along its dim (what take's batching rule does)."""
    n = batching.batch_size(vals, dims)
    x, starts = batching.to_front(vals[0], dims[0], n), vals[1:]
    batched = [d is not None for d in dims[1:]]
    x = bind(dynamic_slice_p, x, 0, *[0 if b else s for s, b in zip(starts, batched)],
             sizes=(n,) + tuple(x.shape[i + 1] if b else size for i, (size, b) in enumerate(zip(sizes, batched))))
    for i, (s, d) in enumerate(zip(starts, dims[1:])):
        if d is not None:
            s = np.clip(batching.moveaxis(s, d, 0), 0, x.shape[i + 1] - sizes[i])
            idx = s[:, None] + bind(iota_p, dtype=s.dtype, shape=(1, sizes[i]), dimension=1)
            x, _ = _take_batch([x, idx], [0, 0], axis=i)
    return x, 0


dynamic_slice_p.batch = _dynamic_slice_batch


def _scatter_add_abstract(x, idx, upd, *, axis):
    return Aval(x.shape, x.dtype)


def _scatter_add_impl(xp, k, x, idx, upd, *, axis):
    """``x`` with ``upd`` added at ``idx`` along ``axis`` (repeated indices accumulate)."""
    lead = broadcast_shapes(x.shape[:k], idx.shape[:k], upd.shape[:k])
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


def _scatter_add_jvp(primals, tangents, *, axis):
    (x, idx, upd), (tx, _, tu) = primals, tangents
    out = bind(scatter_add_p, x, idx, upd, axis=axis)
    if ad_util.is_zero(tu):
        return out, tx
    return out, bind(scatter_add_p, ad_util.instantiate(tx, ad_util.aval_of_value(x)), idx, tu, axis=axis)


scatter_add_p = Primitive(
    "scatter_add", abstract=_scatter_add_abstract, impl=_scatter_add_impl, category="scatter",
    jvp=_scatter_add_jvp,
    transpose=lambda ct, x, idx, upd, *, axis: [ct if ad_util.is_undefined(x) else None, None,
                                                bind(take_p, ct, idx, axis=axis) if ad_util.is_undefined(upd) else None])


def _scatter_add_batch(vals, dims, *, axis):
    n = batching.batch_size(vals, dims)
    x, upd = batching.to_front(vals[0], dims[0], n), batching.to_front(vals[2], dims[2], n)
    if dims[1] is None:
        return bind(scatter_add_p, x, vals[1], upd, axis=axis + 1), 0
    # batched indices: scatter into the flattened (batch, axis) pair, as take's rule gathers
    idx = batching.moveaxis(vals[1], dims[1], 0)
    xs = x.shape[1:]
    a, rest, ni = xs[axis], xs[:axis] + xs[axis + 1:], idx.ndim - 1
    flat = bind(reshape_p, batching.moveaxis(x, axis + 1, 1), shape=(n * a,) + rest)
    offsets = bind(iota_p, dtype=idx.dtype, shape=idx.shape, dimension=0) * a
    upd = bind(transpose_p, upd, perm=(0,) + tuple(range(1 + axis, 1 + axis + ni)) + tuple(range(1, 1 + axis))
               + tuple(range(1 + axis + ni, upd.ndim)))                       # B, I..., rest...
    m = math.prod(idx.shape)
    out = bind(scatter_add_p, flat, bind(reshape_p, np.where(idx < 0, idx + a, idx) + offsets, shape=(m,)),
               bind(reshape_p, upd, shape=(m,) + rest), axis=0)
    return batching.moveaxis(bind(reshape_p, out, shape=(n, a) + rest), 1, axis + 1), 0


scatter_add_p.batch = _scatter_add_batch


def _dus_abstract(x, upd, *starts):
    return Aval(x.shape, x.dtype)


def _dus_impl(xp, k, x, upd, *starts):
    """``x`` with ``upd`` written at ``starts`` (each start may vary over the batch dims)."""
    idx = []
    for d, s in enumerate(starts):
        size = upd.shape[k + d]
        s = xp.asarray(xp.clip(s, 0, x.shape[k + d] - size))
        s = s.reshape((1,) * (k - s.ndim) + s.shape)       # a literal start has no batch dims
        idx.append(s[..., None] + xp.arange(size))
    lead = broadcast_shapes(x.shape[:k], upd.shape[:k], *[i.shape[:k] for i in idx])
    out = xp.array(xp.broadcast_to(x, lead + x.shape[k:]))
    r = len(starts)
    grids = [xp.arange(s).reshape((-1,) + (1,) * (k - 1 - i + r)) for i, s in enumerate(lead)]
    per_dim = [i.reshape(i.shape[:k] + (1,) * d + (i.shape[-1],) + (1,) * (r - d - 1)) if k else
               i.reshape((1,) * d + (i.shape[-1],) + (1,) * (r - d - 1)) for d, i in enumerate(idx)]
    out[tuple(grids) + tuple(per_dim)] = xp.broadcast_to(upd, lead + upd.shape[k:])
    return out


def _dus_jvp(primals, tangents):
    x, upd, *starts = primals
    tx, tu = tangents[:2]
    out = bind(dynamic_update_slice_p, x, upd, *starts)
    return out, bind(dynamic_update_slice_p, ad_util.instantiate(tx, ad_util.aval_of_value(x)),
                     ad_util.instantiate(tu, ad_util.aval_of_value(upd)), *starts)


def _dus_transpose(ct, x, upd, *starts):
    u = ad_util.aval_of_value(upd)
    return [bind(dynamic_update_slice_p, ct, ad_util.full(u, 0), *starts) if ad_util.is_undefined(x) else None,
            bind(dynamic_slice_p, ct, *starts, sizes=u.shape) if ad_util.is_undefined(upd) else None] + [None] * len(starts)


def _dus_batch(vals, dims):
    n = batching.batch_size(vals, dims)
    x, upd = batching.to_front(vals[0], dims[0], n), batching.to_front(vals[1], dims[1], n)
    if all(d is None for d in dims[2:]):
        return bind(dynamic_update_slice_p, x, upd, 0, *vals[2:]), 0
    # batched starts: gather upd into x's shape (a batched take per dim) and select the window
    r = x.ndim - 1
    full, inside = upd, True
    for d, (s, sd) in enumerate(zip(vals[2:], dims[2:])):
        size, u = x.shape[d + 1], upd.shape[d + 1]
        s = np.clip(batching.moveaxis(s, sd, 0) if sd is not None else s, 0, size - u)
        rel = bind(iota_p, dtype=np.int64, shape=(1, size), dimension=1) - np.reshape(s, (-1, 1))
        rel = np.broadcast_to(rel, (n, size))
        full, _ = _take_batch([full, np.clip(rel, 0, u - 1)], [0, 0], axis=d)
        inside = inside & np.reshape((rel >= 0) & (rel < u), (n,) + (1,) * d + (size,) + (1,) * (r - d - 1))
    return np.where(inside, full, x), 0


dynamic_update_slice_p = Primitive("dynamic_update_slice", abstract=_dus_abstract,
                                   impl=_dus_impl, category="window_update", jvp=_dus_jvp, transpose=_dus_transpose,
                                   batch=_dus_batch)


for _p in (broadcast_in_dim_p, reshape_p, transpose_p, slice_p, concatenate_p):
    _p.jvp = ad_util.linear_jvp(_p)
del _p


def dtype_of(x):
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


# ---------------------------------------------------------------------------------------------
# sharding_constraint: the identity that pins a value's sharding (``with_sharding_constraint``)
# ---------------------------------------------------------------------------------------------

def _constraint_jvp(primals, tangents, **params):
    (x,), (t,) = primals, tangents
    return (bind(sharding_constraint_p, x, **params),
            t if ad_util.is_zero(t) else bind(sharding_constraint_p, t, **params))


def _constraint_transpose(ct, x, **params):
    return [ct if ad_util.is_zero(ct) else bind(sharding_constraint_p, ct, **params)]


def _constraint_abstract(x, *, sharding, mesh):
    """On Explicit axes the constraint (``reshard``) is the sharding rule: it sets the type."""
    spec = PartitionSpec(*[tuple(ax) or None for ax in sharding.dims],
                         unreduced={a for a, op in sharding.partial if op == "sum"})
    return Aval(x.shape, x.dtype, sharding=sharding_type(NamedSharding(mesh, spec), x.ndim))


sharding_constraint_p = Primitive(
    "sharding_constraint", abstract=_constraint_abstract,
    impl=lambda xp, k, x, **p: x, linear=True, category="constraint")
sharding_constraint_p.jvp = _constraint_jvp
sharding_constraint_p.transpose = _constraint_transpose
# under vmap the new leading dim is split over vmap's spmd_axis_name, or for a reshard on
# Explicit axes over the axes the mapped arguments are split over (by default over nothing)
sharding_constraint_p.batch = batching.shifted_batch(sharding_constraint_p, lambda p, n: dict(
    p, sharding=p["sharding"].with_dims((sharding_rules.batch_axes(p["mesh"]),
                                         *p["sharding"].dims))))


# ---------------------------------------------------------------------------------------------
# stop_gradient: the identity whose derivative is zero (of every order)
# ---------------------------------------------------------------------------------------------

stop_gradient_p = Primitive("stop_gradient", abstract=lambda x: Aval(x.shape, x.dtype),
                            impl=lambda xp, k, x: x, category="elementwise",
                            c=c_expr("{0}", "biuf"))
stop_gradient_p.jvp = ad_util.zero_jvp(stop_gradient_p)
stop_gradient_p.batch = batching.elementwise_batch(stop_gradient_p)


def stop_gradient(x):
    """``x`` (a pytree) unchanged, as a constant to differentiation: ``grad`` and ``jvp`` see a
    zero derivative through it (JAX's ``lax.stop_gradient``).  Outside a trace it returns ``x``.

    >>> import spmd
    >>> float(spmd.grad(lambda x: x * spmd.stop_gradient(x))(3.0))
    3.0
    """
    if current_builder() is None:
        return x
    return optree.tree_map(lambda a: bind(stop_gradient_p, a), x)


# ---------------------------------------------------------------------------------------------
# threefry2x32: the counter-based hash under spmd.random (Salmon et al. 2011, 20 rounds), as
# JAX computes it, so that spmd.random gives JAX's bits.  Elementwise in its counters; the key
# words are usually scalars that broadcast against them.
# ---------------------------------------------------------------------------------------------

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry_abstract(k1, k2, x1, x2):
    ops = (k1, k2, x1, x2)
    if any(a.dtype != np.uint32 for a in ops):
        raise TypeError(f"threefry2x32: operands must be uint32, got {[str(a.dtype) for a in ops]}")
    out = Aval(_ew_shape(*ops), np.dtype(np.uint32))
    return [out, out]


def _threefry_impl(xp, k, *ops):
    """In wrapping uint32 arithmetic.  With ``k`` leading batch dims an operand of lower
    per-device rank (a scalar key word) broadcasts against the trailing dims of the others."""
    ops = [xp.asarray(a, dtype=xp.uint32) for a in ops]
    if k:
        ops = [a.reshape((1,) * k + a.shape) if a.ndim < k else a for a in ops]  # Python scalars
        r = max(a.ndim for a in ops)
        ops = [a.reshape(a.shape[:k] + (1,) * (r - a.ndim) + a.shape[k:]) for a in ops]
    k1, k2, x1, x2 = ops
    with np.errstate(over="ignore"):              # 0-d operands compute as NumPy scalars
        ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
        x0, x1 = x1 + ks[0], x2 + ks[1]
        for i in range(5):
            for rot in _THREEFRY_ROTATIONS[i % 2]:
                x0 = x0 + x1
                x1 = x0 ^ ((x1 << np.uint32(rot)) | (x1 >> np.uint32(32 - rot)))
            x0 = x0 + ks[(i + 1) % 3]
            x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return [xp.asarray(x0), xp.asarray(x1)]


def _threefry_batch(vals, dims):
    """Batch dims to the front; a batched operand of lower rank than the others (a key word)
    gets size-1 dims after its batch dim, so it broadcasts against them."""
    rank = max(aval_of(v).ndim - (d is not None) for v, d in zip(vals, dims))
    out = []
    for v, d in zip(vals, dims):
        if d is not None:
            v = batching.moveaxis(v, d, 0)
            shape = aval_of(v).shape
            v = bind(reshape_p, v, shape=shape[:1] + (1,) * (rank + 1 - len(shape)) + shape[1:])
        out.append(v)
    return bind(threefry2x32_p, *out), [0, 0]


threefry2x32_p = Primitive("threefry2x32", abstract=_threefry_abstract, impl=_threefry_impl,
                           multiple_results=True, category="elementwise", batch=_threefry_batch)
threefry2x32_p.jvp = ad_util.zero_jvp(threefry2x32_p)


# the primitives that core and the rule helpers build with (spmd.core.Hooks)
hooks.add, hooks.broadcast_in_dim, hooks.transpose, hooks.reshape = (
    add_p, broadcast_in_dim_p, transpose_p, reshape_p)

__all__ = [n for n in dir() if n.endswith("_p")]

