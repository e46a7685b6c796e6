"""Float math as XLA computes it on the CPU, written as NumPy code (it traces like any other):
``log``, ``log1p``, ``exp``, ``erf``, ``erf_inv`` and the fused multiply-add that XLA's CPU
backend contracts ``a * b + c`` into.  ``spmd.random`` samples with these so that its floats
are JAX's bits, not merely close to them, and ``spmd.nn.gelu`` takes its ``erf`` from here.

In float32 (and narrower, computed in float32) they are XLA's algorithms operation for
operation: Cephes' ``logf``, ``log1p`` and ``expf``, a rational ``erf``, Giles' ``erf_inv``.
``rsqrt`` and ``pow`` are correctly rounded, within an ulp of XLA's.  In float64 ``log``,
``exp`` and ``pow`` are NumPy's, which differ from XLA's in the last bit for about one value in
a thousand; the rest follows XLA with float64 fused multiply-adds emulated exactly.
"""
from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from . import prims
from .core import Tracer, aval_of, bind


def astype(x, dtype):
    if isinstance(x, (np.ndarray, np.generic, Tracer)):
        return x.astype(dtype)
    return np.asarray(x, dtype)


def fma(a, b, c):
    """``a * b + c`` rounded once, as XLA contracts it on the CPU: through float64 for float32
    and narrower; in float64 from the exact product and sum (Dekker's and Knuth's error-free
    transformations; correctly rounded but in rare halfway cases)."""
    dt = np.result_type(*(aval_of(v).dtype for v in (a, b, c)))
    if dt.itemsize < 8:
        f64 = np.float64
        return astype(astype(a, f64) * astype(b, f64) + astype(c, f64), dt)
    a, b, c = (astype(v, dt) for v in (a, b, c))
    product = a * b
    (a1, a2), (b1, b2) = _veltkamp(a), _veltkamp(b)
    product_error = ((a1 * b1 - product) + a1 * b2 + a2 * b1) + a2 * b2
    total = product + c
    virtual = total - product
    sum_error = (product - (total - virtual)) + (c - virtual)
    return total + (sum_error + product_error)


def _veltkamp(x):
    """``x`` as the sum of two halves of 26 bits each (their products are exact)."""
    scaled = 134217729.0 * x
    high = scaled - (scaled - x)
    return high, x - high


def _horner(coefficients, x):
    p = np.asarray(coefficients[0], x.dtype)
    for c in coefficients[1:]:
        p = fma(p, x, np.asarray(c, x.dtype))
    return p


def _f32_upcast(fn):
    """Narrow floats are computed in float32 (as XLA does)."""
    @functools.wraps(fn)
    def wrapped(x):
        dt = aval_of(x).dtype
        if dt.itemsize < 4:
            return astype(fn(astype(x, np.float32)), dt)
        return fn(x)
    return wrapped


def bitcast(x, dtype):
    return bind(prims.bitcast_convert_type_p, x, dtype=np.dtype(dtype))


_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


@_f32_upcast
def log(x):
    """Cephes' logf, evaluated as XLA's CPU backend does."""
    if aval_of(x).dtype == np.float64:
        return np.log(x)
    f32 = np.float32
    tiny = x < f32(2.0 ** -126)                                 # subnormal: scale it up
    xs = np.where(tiny, x * f32(2.0 ** 23), x)
    b = bitcast(xs, np.uint32)
    e = ((b >> 23) & 0xFF).astype(f32) - np.where(tiny, f32(149), f32(126))
    m = bitcast((b & 0x007FFFFF) | 0x3F000000, f32)             # x = m * 2**e, m in [0.5, 1)
    small = m < f32(0.707106781186547524)
    tmp = np.where(small, m, f32(0))
    m = m - f32(1)
    e = e - np.where(small, f32(1), f32(0))
    m = m + tmp
    m2 = m * m
    m3 = m2 * m
    p = [f32(c) for c in _LOG_P]
    y, y1, y2 = fma(p[0], m, p[1]), fma(p[3], m, p[4]), fma(p[6], m, p[7])
    y, y1, y2 = fma(y, m, p[2]), fma(y1, m, p[5]), fma(y2, m, p[8])
    y = fma(fma(y, m3, y1), m3, y2)
    y = fma(y, m3, e * f32(-2.12194440e-4))
    out = (m - m2 * f32(0.5)) + y + e * f32(0.693359375)
    special = np.where(x == 0, f32(-np.inf), np.where(x == np.inf, f32(np.inf), f32(np.nan)))
    return np.where((x > 0) & (x < np.inf), out, special)


_LOG1P_NUM = (4.5270000862445199635215e-5, 4.9854102823193375972212e-1, 6.5787325942061044846969,
              2.9911919328553073277375e1, 6.0949667980987787057556e1, 5.7112963590585538103336e1,
              2.0039553499201281259648e1)
_LOG1P_DEN = (1., 1.5062909083469192043167e1, 8.3047565967967209469434e1,
              2.2176239823732856465394e2, 3.0909872225312059774938e2, 2.1642788614495947685003e2,
              6.0118660497603843919306e1)


@_f32_upcast
def log1p(x):
    """``log(1 + x)``: Cephes' rational function near 0, ``log`` elsewhere (XLA's CPU)."""
    dt = aval_of(x).dtype
    x2 = x * x
    near0 = (x * x2) * (_horner(_LOG1P_NUM, x) / _horner(_LOG1P_DEN, x))
    near0 = x + (np.asarray(-0.5, dt) * x2 + near0)
    return np.where(np.abs(x) < np.asarray(0.41421356237309504880, dt), near0,
                    log(x + np.asarray(1, dt)))


_ERF_NUM = (0.00022905065861350646, 0.0034082910107109506, 0.050955695062380861,
            0.18520832239976145, 1.128379143519084)
_ERF_DEN = (-1.1791602954361697e-7, 0.000023547966471313185, 0.0010179625278914885,
            0.014070470171167667, 0.11098505178285362, 0.49746925110067538, 1.0)
_ERF64_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
            7.00332514112805075473e3, 5.55923013010394962768e4)
_ERF64_U = (1., 3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
            2.26290000613890934246e4, 4.92673942608635921086e4)
_ERFC64_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
             4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
             9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2)
_ERFC64_Q = (1., 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
             9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
             1.65666309194161350182e3, 5.57535340817727675546e2)
_ERFC64_R = (5.64189583547755073984e-1, 1.27536670759978104416e0, 5.01905042251180477414e0,
             6.16021097993053585195e0, 7.40974269950448939160e0, 2.97886665372100240670e0)
_ERFC64_S = (1., 2.26052863220117276590e0, 9.39603524938001434673e0, 1.20489539808096656605e1,
             1.70814450747565897222e1, 9.60896809063285878198e0, 3.36907645100081516050e0)


@_f32_upcast
def erf(x):
    """A rational approximation in float32 (XLA's CPU); Cephes' in float64."""
    if aval_of(x).dtype == np.float64:
        z = x * x
        near0 = x * _horner(_ERF64_T, z) / _horner(_ERF64_U, z)
        ax = np.abs(x)
        tail = np.exp(-z) * np.where(ax < 8, _horner(_ERFC64_P, ax) / _horner(_ERFC64_Q, ax),
                                     _horner(_ERFC64_R, ax) / _horner(_ERFC64_S, ax))
        tail = np.where(-z < -7.09782712893383996843e2, 0.0, tail)
        erfc = np.where(x < 0, 2.0 - tail, tail)
        return np.where(ax < 1, near0, 1.0 - erfc)
    x2 = x * x
    p = x * _horner(_ERF_NUM, x2)
    q = _horner(_ERF_DEN, x2)
    saturated = np.abs(x) >= np.float32(3.832506856900711)
    return np.where(saturated, np.copysign(np.float32(1), x), p / q)


_ERFINV32 = ((2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
              -0.00125372503, -0.00417768164, 0.246640727, 1.50140941),
             (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
              -0.0076224613, 0.00943887047, 1.00167406, 2.83297682))
_ERFINV64 = (
    (-3.6444120640178196996e-21, -1.685059138182016589e-19, 1.2858480715256400167e-18,
     1.115787767802518096e-17, -1.333171662854620906e-16, 2.0972767875968561637e-17,
     6.6376381343583238325e-15, -4.0545662729752068639e-14, -8.1519341976054721522e-14,
     2.6335093153082322977e-12, -1.2975133253453532498e-11, -5.4154120542946279317e-11,
     1.051212273321532285e-09, -4.1126339803469836976e-09, -2.9070369957882005086e-08,
     4.2347877827932403518e-07, -1.3654692000834678645e-06, -1.3882523362786468719e-05,
     0.0001867342080340571352, -0.00074070253416626697512, -0.0060336708714301490533,
     0.24015818242558961693, 1.6536545626831027356),
    (2.2137376921775787049e-09, 9.0756561938885390979e-08, -2.7517406297064545428e-07,
     1.8239629214389227755e-08, 1.5027403968909827627e-06, -4.013867526981545969e-06,
     2.9234449089955446044e-06, 1.2475304481671778723e-05, -4.7318229009055733981e-05,
     6.8284851459573175448e-05, 2.4031110387097893999e-05, -0.0003550375203628474796,
     0.00095328937973738049703, -0.0016882755560235047313, 0.0024914420961078508066,
     -0.0037512085075692412107, 0.005370914553590063617, 1.0052589676941592334,
     3.0838856104922207635),
    (-2.7109920616438573243e-11, -2.5556418169965252055e-10, 1.5076572693500548083e-09,
     -3.7894654401267369937e-09, 7.6157012080783393804e-09, -1.4960026627149240478e-08,
     2.9147953450901080826e-08, -6.7711997758452339498e-08, 2.2900482228026654717e-07,
     -9.9298272942317002539e-07, 4.5260625972231537039e-06, -1.9681778105531670567e-05,
     7.5995277030017761139e-05, -0.00021503011930044477347, -0.00013871931833623122026,
     1.0103004648645343977, 4.8499064014085844221))


@_f32_upcast
def erf_inv(x):
    """Giles' approximation of the inverse error function (XLA's)."""
    dt = aval_of(x).dtype
    w = -log1p(x * -x)
    if dt == np.float64:
        # three ranges of w, one polynomial each (of 23, 19 and 17 coefficients)
        mid, low = w < 6.25, w < 16
        w = np.where(mid, w - 3.125, np.sqrt(w) - np.where(low, 3.25, 5.0))
        c_mid, c_low, c_high = _ERFINV64
        coefficient = lambda i: np.where(mid, c_mid[i], np.where(low, c_low[i], c_high[i])
                                         if i < 17 else c_low[i] if i < 19 else 0.0)
        p = coefficient(0)
        for i in range(1, 23):
            step = fma(p, w, coefficient(i))
            p = step if i < 17 else np.where(low if i < 19 else mid, step, p)
    else:
        f32 = np.float32
        small = w < f32(5)
        w = np.where(small, w - f32(2.5), np.sqrt(w) - f32(3))
        c_small, c_big = _ERFINV32
        p = np.where(small, f32(c_small[0]), f32(c_big[0]))
        for i in range(1, 9):
            p = fma(p, w, np.where(small, f32(c_small[i]), f32(c_big[i])))
    return np.where(np.abs(x) == 1, x * np.asarray(np.inf, dt), p * x)


def next_toward(x, up: bool):
    """``nextafter(x, +inf if up else -inf)``, from the bits."""
    dt = aval_of(x).dtype
    uint = np.dtype(f"uint{dt.itemsize * 8}")
    b = bitcast(x, uint)
    one = np.asarray(1, uint)
    away = bitcast(b + one, dt)                 # one ulp further from zero
    toward = bitcast(b - one, dt)               # one ulp nearer zero
    smallest = np.asarray(ml_dtypes.finfo(dt).smallest_subnormal * (1 if up else -1), dt)
    moved = np.where(x > 0, away if up else toward,
                     np.where(x < 0, toward if up else away, smallest))
    return np.where(np.isnan(x) | (x == (np.inf if up else -np.inf)), x, moved)


def rsqrt(x):
    """``1 / sqrt(x)`` rounded once.  XLA's CPU backend refines the processor's approximate
    reciprocal square root with a Newton step in float32, which no portable code reproduces;
    this differs from it by an ulp for some inputs."""
    dt = aval_of(x).dtype
    if dt.itemsize >= 8:
        return np.asarray(1, dt) / np.sqrt(x)
    return astype(1 / np.sqrt(astype(x, np.float64)), dt)


def pow(x, y):
    """``x ** y``: through float64 for float32 and narrower."""
    dt = aval_of(x).dtype
    if dt.itemsize >= 8:
        return np.power(x, y)
    return astype(np.power(astype(x, np.float64), astype(y, np.float64)), dt)


_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
          5.0000001201e-1)


@_f32_upcast
def exp(x):
    """Cephes' expf as XLA's CPU backend evaluates it: ``2**n * e**r`` with ``|n|`` at most 127
    (so ``r`` grows past ``ln 2 / 2`` at the top of the range), and results below the smallest
    normal flushed to zero.  In float64 NumPy's."""
    if aval_of(x).dtype == np.float64:
        return np.exp(x)
    f32 = np.float32
    x = np.minimum(np.maximum(x, f32(-88.72283935546875)), f32(88.72283935546875))
    n = np.clip(np.floor(fma(x, f32(1.44269504088896341), f32(0.5))), f32(-127), f32(127))
    r = fma(-n, f32(0.693359375), x)                           # r = x - n ln 2, in two parts
    r = fma(-n, f32(-2.12194440e-4), r)
    y = fma(_horner(_EXP_P, r), r * r, r) + f32(1)
    with np.errstate(invalid="ignore", over="ignore"):        # NaN's n; overflow to inf
        scale = bitcast(((n + f32(127)).astype(np.int32) << 23), f32)   # 2**n; 0 for n = -127
        out = y * scale
    return np.where(np.abs(out) < f32(2.0 ** -126), f32(0), out)
