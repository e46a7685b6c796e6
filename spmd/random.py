"""``jax.random`` on threefry2x32: the same keys and the same bits as JAX 0.10.

The spec is JAX's default configuration: the ``threefry2x32`` implementation with
``jax_threefry_partitionable=True`` (each output element hashes its own index, so a sharded
draw needs no communication), and JAX's 32-bit default dtypes (``float32``, ``int32``,
``uint32``) when no dtype is given.  A dtype you do give is kept: ``float64`` draws JAX's
``float64`` values (JAX itself computes them only under ``jax_enable_x64``).

Keys are typed (``key(seed)``, an array of keys) or raw (``PRNGKey(seed)``, uint32 data of
shape ``(2,)``), as in JAX; ``key_data`` and ``wrap_key_data`` convert.  Either kind is
an ordinary traced value: the hash is the primitive ``spmd.lax.threefry2x32_p``, every sampler
is NumPy code over it, so they run eagerly, under ``jit``, ``vmap`` and inside ``shard_map``,
where ``fold_in(key, axis_index("x"))`` gives each device its own stream.

The transcendental functions the samplers use (``log``, ``log1p``, ``erf``, ``erf_inv``) are
computed the way XLA computes them on the CPU in float32, fused multiply-adds included, so
``normal``, ``truncated_normal``, ``gumbel`` and ``categorical`` give JAX's float32 bits too;
in float64 they agree with JAX to a few ulps.

>>> import spmd
>>> k = spmd.random.key(0)
>>> spmd.random.key_data(spmd.random.split(k)).tolist()
[[1797259609, 2579123966], [928981903, 3453687069]]
>>> spmd.random.randint(k, (4,), 0, 10).tolist()
[1, 9, 4, 7]
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from . import lax, tree_util
from .core import Tracer, aval_of, bind, hooks

__all__ = ["PRNGKeyArray", "key", "PRNGKey", "key_data", "wrap_key_data", "split", "fold_in",
           "bits", "uniform", "normal", "truncated_normal", "bernoulli", "categorical", "randint",
           "permutation", "choice", "gumbel"]

_U32 = np.dtype(np.uint32)
_FLOATS = tuple(map(np.dtype, (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)))
_IMPL = "threefry2x32"


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------

class KeyDtype:
    """The dtype of typed keys (JAX's ``key<fry>``)."""
    name = "key<fry>"

    def __repr__(self):
        return self.name

    __str__ = __repr__


KEY_DTYPE = KeyDtype()


class PRNGKeyArray:
    """An array of typed keys of ``shape``, held as its uint32 key data of shape
    ``shape + (2,)``.  A pytree whose one leaf is that data, so keys pass through ``jit``,
    ``vmap``, ``grad`` and ``shard_map`` (``in_specs`` name the key dims) like arrays."""
    __slots__ = ("_data",)

    def __init__(self, data):
        self._data = data

    shape = property(lambda self: tuple(self._data.shape[:-1]))
    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    dtype = property(lambda self: KEY_DTYPE)

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a single key")
        return self.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, idx):
        idx = idx if isinstance(idx, tuple) else (idx,)
        return PRNGKeyArray(self._data[idx + (slice(None),)])    # never the key-data dim

    def __repr__(self):
        return f"Array({self.shape}, dtype={KEY_DTYPE}) overlaying:\n{self._data}"


tree_util.register_pytree_node(PRNGKeyArray, lambda k: ((k._data,), None),
                               lambda _, children: PRNGKeyArray(children[0]))


def _check_impl(name, impl):
    if impl is not None and impl != _IMPL:
        raise ValueError(f"spmd.random.{name}: impl={impl!r}; spmd implements only {_IMPL!r}")


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, Tracer) + hooks.array_types)


def _key_data(name: str, keys, *, single: bool = True):
    """The uint32 key data of ``keys`` (typed or raw), and whether they were typed."""
    typed = isinstance(keys, PRNGKeyArray)
    data = keys._data if typed else keys
    if not typed and not _is_array(data):
        raise TypeError(f"spmd.random.{name}: argument `key` must be a PRNG key "
                        f"(spmd.random.key(seed), or a raw uint32 key spmd.random.PRNGKey(seed)), "
                        f"got {type(keys).__name__}: {keys!r:.60}")
    if isinstance(data, hooks.array_types):
        data = np.asarray(data)
    a = aval_of(data)
    if a.dtype != _U32 or not a.shape or a.shape[-1] != 2:
        raise TypeError(f"spmd.random.{name}: argument `key` must be a PRNG key; a raw key is "
                        f"uint32 data of shape (..., 2) (spmd.random.PRNGKey(seed)), got "
                        f"{a.dtype}{list(a.shape)}")
    if single and a.shape != (2,):
        raise ValueError(f"spmd.random.{name} accepts a single key, but was given a key array "
                         f"of shape {a.shape[:-1]} != (). Use spmd.vmap for batching.")
    return data, typed


def _wrap(data, typed):
    return PRNGKeyArray(data) if typed else data


def _seed(name: str, seed):
    """Key data from an integer seed, as JAX makes it: a 64-bit integer is split into its
    high and low words; a Python int is taken modulo 2**32 with a zero high word (JAX with its
    default 32-bit integers), as is any integer of 32 bits or fewer."""
    if isinstance(seed, PRNGKeyArray):
        raise TypeError(f"spmd.random.{name} accepts a scalar seed, but was given a PRNG key.")
    if isinstance(seed, (bool, int, np.integer)) and not isinstance(seed, np.int64 | np.uint64):
        return np.array([0, int(seed) & 0xFFFFFFFF], _U32)
    if not _is_array(seed) and not isinstance(seed, np.generic):
        raise TypeError(f"spmd.random.{name}: the seed must be an integer, got "
                        f"{type(seed).__name__}")
    if isinstance(seed, hooks.array_types) or isinstance(seed, np.generic):
        seed = np.asarray(seed)
    a = aval_of(seed)
    if a.ndim:
        raise TypeError(f"spmd.random.{name} accepts a scalar seed, but was given an array of "
                        f"shape {a.shape} != (). Use spmd.vmap for batching.")
    if a.dtype.kind not in "iu":
        raise TypeError(f"spmd.random.{name}: the seed must be an integer, got {a.dtype}")
    low = seed.astype(_U32)
    high = (seed >> 32).astype(_U32) if a.dtype.itemsize == 8 and not a.weak else low * 0
    return np.stack([high, low])


def key(seed, *, impl=None) -> PRNGKeyArray:
    """A typed key (a key array of shape ``()``) from an integer seed."""
    _check_impl("key", impl)
    return PRNGKeyArray(_seed("key", seed))


def PRNGKey(seed, *, impl=None):
    """A raw key: uint32 data of shape ``(2,)``, from an integer seed."""
    _check_impl("PRNGKey", impl)
    return _seed("PRNGKey", seed)


def key_data(keys):
    """The uint32 data of typed keys (shape ``keys.shape + (2,)``); raw keys as they are."""
    return _key_data("key_data", keys, single=False)[0]


def wrap_key_data(key_bits_array, *, impl=None) -> PRNGKeyArray:
    """Typed keys from uint32 key data of shape ``(..., 2)``."""
    _check_impl("wrap_key_data", impl)
    if isinstance(key_bits_array, PRNGKeyArray):
        raise TypeError("spmd.random.wrap_key_data: the argument is already a typed key")
    return PRNGKeyArray(_key_data("wrap_key_data", key_bits_array, single=False)[0])


# ---------------------------------------------------------------------------------------------
# the hash and the bits
# ---------------------------------------------------------------------------------------------

def _shape(name, shape) -> tuple:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    try:
        return tuple(operator.index(d) for d in shape)
    except TypeError:
        raise TypeError(f"spmd.random.{name}: shape must be a sequence of integers, got "
                        f"{shape!r}") from None


def _hash(data, c_high, c_low):
    """threefry2x32 of the counters ``(c_high, c_low)`` under key ``data``."""
    return bind(lax.threefry2x32_p, data[0], data[1], c_high, c_low)


def _counters(shape):
    """The index of each element of ``shape`` as (high, low) uint32 words: the counters of
    the partitionable threefry (JAX's ``iota_2x32_shape``)."""
    n = math.prod(shape)
    if n >= 2 ** 32:
        raise NotImplementedError(f"spmd.random: {n} random values in one draw (at most 2**32)")
    low = bind(lax.iota_p, dtype=_U32, shape=(n,), dimension=0).reshape(shape)
    return np.uint32(0), low


def _bits(data, bit_width: int, shape):
    high, low = _hash(data, *_counters(shape))
    if bit_width == 64:
        return (high.astype(np.uint64) << 32) | low.astype(np.uint64)
    out = high ^ low
    return out if bit_width == 32 else out.astype(f"uint{bit_width}")


def _split(data, shape):
    return np.stack(_hash(data, *_counters(shape)), axis=-1)


def split(key, num: int | Sequence[int] = 2):
    """``num`` new keys (a tuple: keys of that shape) from one key."""
    data, typed = _key_data("split", key)
    return _wrap(_split(data, _shape("split", num)), typed)


def fold_in(key, data):
    """A new key from ``key`` and a 32-bit integer (traced ones too: ``axis_index``)."""
    kd, typed = _key_data("fold_in", key)
    if isinstance(data, int) and not 0 <= data < 2 ** 32:
        raise OverflowError(f"Python integer {data} out of bounds for uint32")
    data = _operand(data)
    if aval_of(data).ndim:
        raise TypeError(f"spmd.random.fold_in accepts a scalar, but was given an array of shape "
                        f"{aval_of(data).shape} != (). Use spmd.vmap for batching.")
    if aval_of(data).dtype.kind not in "biu":
        raise TypeError(f"spmd.random.fold_in: data must be an integer, got {aval_of(data).dtype}")
    return _wrap(np.stack(_hash(kd, np.uint32(0), data.astype(_U32))), typed)


def bits(key, shape=(), dtype=None):
    """Uniform random bits: unsigned integers of ``dtype`` (default uint32)."""
    data, _ = _key_data("bits", key)
    dtype = np.dtype(np.uint32 if dtype is None else dtype)
    if dtype.kind != "u":
        raise ValueError(f"dtype argument to `bits` must be an unsigned int dtype, got {dtype}")
    return _bits(data, dtype.itemsize * 8, _shape("bits", shape))


# ---------------------------------------------------------------------------------------------
# float32 math as XLA computes it on the CPU (fused multiply-adds included), so that the
# samplers below give JAX's bits; float64 uses NumPy's (a few ulps from XLA's)
# ---------------------------------------------------------------------------------------------

def _astype(x, dtype):
    return x.astype(dtype) if isinstance(x, (np.ndarray, np.generic, Tracer)) else np.asarray(x, dtype)


def _fma(a, b, c):
    """``a * b + c`` rounded once (float32 and narrower), as XLA contracts it on the CPU."""
    dt = np.result_type(*(aval_of(v).dtype for v in (a, b, c)))
    if dt.itemsize >= 8:
        return a * b + c
    f64 = np.float64
    return _astype(_astype(a, f64) * _astype(b, f64) + _astype(c, f64), dt)


def _horner(coefficients, x):
    p = np.asarray(coefficients[0], x.dtype)
    for c in coefficients[1:]:
        p = _fma(p, x, np.asarray(c, x.dtype))
    return p


def _f32_upcast(fn):
    """Narrow floats are computed in float32 (as XLA does)."""
    def wrapped(x):
        dt = aval_of(x).dtype
        if dt.itemsize < 4:
            return _astype(fn(_astype(x, np.float32)), dt)
        return fn(x)
    return wrapped


def _bitcast(x, dtype):
    return bind(lax.bitcast_convert_type_p, x, dtype=np.dtype(dtype))


_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)


@_f32_upcast
def _log(x):
    """Cephes' logf, evaluated as XLA's CPU backend does."""
    if aval_of(x).dtype == np.float64:
        return np.log(x)
    f32 = np.float32
    tiny = x < f32(2.0 ** -126)                                 # subnormal: scale it up
    xs = np.where(tiny, x * f32(2.0 ** 23), x)
    b = _bitcast(xs, _U32)
    e = ((b >> 23) & 0xFF).astype(f32) - np.where(tiny, f32(149), f32(126))
    m = _bitcast((b & 0x007FFFFF) | 0x3F000000, f32)             # x = m * 2**e, m in [0.5, 1)
    small = m < f32(0.707106781186547524)
    tmp = np.where(small, m, f32(0))
    m = m - f32(1)
    e = e - np.where(small, f32(1), f32(0))
    m = m + tmp
    m2 = m * m
    m3 = m2 * m
    p = [f32(c) for c in _LOG_P]
    y, y1, y2 = _fma(p[0], m, p[1]), _fma(p[3], m, p[4]), _fma(p[6], m, p[7])
    y, y1, y2 = _fma(y, m, p[2]), _fma(y1, m, p[5]), _fma(y2, m, p[8])
    y = _fma(_fma(y, m3, y1), m3, y2)
    y = _fma(y, m3, e * f32(-2.12194440e-4))
    out = (m - m2 * f32(0.5)) + y + e * f32(0.693359375)
    special = np.where(x == 0, f32(-np.inf), np.where(x == np.inf, f32(np.inf), f32(np.nan)))
    return np.where((x > 0) & (x < np.inf), out, special)


_LOG1P_NUM = (4.5270000862445199635215e-5, 4.9854102823193375972212e-1, 6.5787325942061044846969,
              2.9911919328553073277375e1, 6.0949667980987787057556e1, 5.7112963590585538103336e1,
              2.0039553499201281259648e1)
_LOG1P_DEN = (1., 1.5062909083469192043167e1, 8.3047565967967209469434e1, 2.2176239823732856465394e2,
              3.0909872225312059774938e2, 2.1642788614495947685003e2, 6.0118660497603843919306e1)


@_f32_upcast
def _log1p(x):
    """``log(1 + x)``: Cephes' rational function near 0, ``log`` elsewhere (XLA's CPU)."""
    if aval_of(x).dtype == np.float64:
        return np.log1p(x)
    f32 = np.float32
    x2 = x * x
    near0 = (x * x2) * (_horner(_LOG1P_NUM, x) / _horner(_LOG1P_DEN, x))
    near0 = x + (f32(-0.5) * x2 + near0)
    return np.where(np.abs(x) < f32(0.41421356237309504880), near0, _log(x + f32(1)))


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
def _erf(x):
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
    return np.where(np.abs(x) >= np.float32(3.832506856900711), np.copysign(np.float32(1), x), p / q)


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
def _erf_inv(x):
    """Giles' approximation of the inverse error function (XLA's)."""
    dt = aval_of(x).dtype
    w = -_log1p(x * -x)
    if dt == np.float64:
        # three ranges of w, one polynomial each (of 23, 19 and 17 coefficients)
        mid, low = w < 6.25, w < 16
        w = np.where(mid, w - 3.125, np.sqrt(w) - np.where(low, 3.25, 5.0))
        c_mid, c_low, c_high = _ERFINV64
        coefficient = lambda i: np.where(mid, c_mid[i], np.where(low, c_low[i], c_high[i])
                                         if i < 17 else c_low[i] if i < 19 else 0.0)
        p = coefficient(0)
        for i in range(1, 23):
            step = coefficient(i) + p * w
            p = step if i < 17 else np.where(low if i < 19 else mid, step, p)
    else:
        f32 = np.float32
        small = w < f32(5)
        w = np.where(small, w - f32(2.5), np.sqrt(w) - f32(3))
        c_small, c_big = _ERFINV32
        p = np.where(small, f32(c_small[0]), f32(c_big[0]))
        for i in range(1, 9):
            p = _fma(p, w, np.where(small, f32(c_small[i]), f32(c_big[i])))
    return np.where(np.abs(x) == 1, x * np.asarray(np.inf, dt), p * x)


# ---------------------------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------------------------

def _float_dtype(name, dtype):
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in _FLOATS:
        raise ValueError(f"dtype argument to `{name}` must be a float dtype, got {dt}")
    return dt


def _operand(x):
    """Arrays (and traced values) keep their dtype; Python scalars and lists get JAX's
    default 32-bit ones, as ``jnp.asarray`` gives them."""
    if isinstance(x, Tracer):
        if x.aval.weak and x.dtype.itemsize == 8:
            return x.astype(x.dtype.kind + "4" if x.dtype.kind in "iuf" else x.dtype)
        return x
    if isinstance(x, (np.ndarray, np.generic) + hooks.array_types):
        return np.asarray(x)
    a = np.asarray(x)
    return a.astype(a.dtype.kind + "4") if a.dtype.kind in "iuf" and a.dtype.itemsize == 8 else a


def _check_shape(name, shape, *param_shapes):
    if param_shapes and np.broadcast_shapes(shape, *param_shapes) != tuple(shape):
        raise ValueError(f"spmd.random.{name}: parameter shapes {list(param_shapes)} must "
                         f"broadcast to the shape argument {tuple(shape)}")


def _finfo(dtype):
    return ml_dtypes.finfo(dtype)


def _uniform(data, shape, dtype, minval, maxval):
    """JAX's uniform floats: random mantissa bits under exponent 0, scaled into the range."""
    info = _finfo(dtype)
    nbits, nmant = info.bits, info.nmant
    rng_bits = 8 if nmant < 8 else nbits
    raw = _bits(data, rng_bits, shape).astype(f"uint{nbits}")
    floats = (raw >> (rng_bits - nmant)).astype(dtype) * np.asarray(2.0 ** -nmant, dtype)
    minval, maxval = _astype(minval, dtype), _astype(maxval, dtype)
    return np.maximum(minval, _fma(floats, maxval - minval, minval))


def uniform(key, shape=(), dtype=None, minval=0., maxval=1.):
    """Uniform floats in ``[minval, maxval)`` (default float32)."""
    data, _ = _key_data("uniform", key)
    shape, dtype = _shape("uniform", shape), _float_dtype("uniform", dtype)
    _check_shape("uniform", shape, aval_of(minval).shape, aval_of(maxval).shape)
    return _uniform(data, shape, dtype, minval, maxval)


def _normal(data, shape, dtype):
    if dtype.kind == "c":
        real = np.dtype(f"float{dtype.itemsize * 4}")
        k_re, k_im = _split(data, (2,))
        re, im = _normal(k_re, shape, real), _normal(k_im, shape, real)
        return (re.astype(dtype) + 1j * im.astype(dtype)) / np.asarray(np.sqrt(2), dtype)
    lo = np.asarray(-1 + _finfo(dtype).epsneg, dtype)            # nextafter(-1, 0)
    u = _uniform(data, shape, dtype, lo, np.asarray(1, dtype))
    return np.asarray(np.sqrt(2), dtype) * _erf_inv(u)


def normal(key, shape=(), dtype=None):
    """Standard normal floats (default float32; complex dtypes too)."""
    data, _ = _key_data("normal", key)
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in _FLOATS + (np.dtype(np.complex64), np.dtype(np.complex128)):
        raise ValueError(f"dtype argument to `normal` must be a float or complex dtype, got {dt}")
    return _normal(data, _shape("normal", shape), dt)


def _next_toward(x, up: bool):
    """``nextafter(x, +inf if up else -inf)``, from the bits."""
    dt = aval_of(x).dtype
    uint = np.dtype(f"uint{dt.itemsize * 8}")
    b = _bitcast(x, uint)
    one = np.asarray(1, uint)
    away = _bitcast(b + one, dt)                 # one ulp further from zero
    toward = _bitcast(b - one, dt)               # one ulp nearer zero
    smallest = np.asarray(_finfo(dt).smallest_subnormal * (1 if up else -1), dt)
    moved = np.where(x > 0, away if up else toward, np.where(x < 0, toward if up else away, smallest))
    return np.where(np.isnan(x) | (x == (np.inf if up else -np.inf)), x, moved)


def truncated_normal(key, lower, upper, shape=None, dtype=None):
    """Normal floats conditioned on ``lower < x < upper``."""
    data, _ = _key_data("truncated_normal", key)
    dtype = _float_dtype("truncated_normal", dtype)
    bounds = (aval_of(lower).shape, aval_of(upper).shape)
    if shape is None:
        shape = np.broadcast_shapes(*bounds)
    else:
        shape = _shape("truncated_normal", shape)
        _check_shape("truncated_normal", shape, *bounds)
    sqrt2 = np.asarray(np.sqrt(2), dtype)
    lower, upper = _astype(lower, dtype), _astype(upper, dtype)
    u = _uniform(data, shape, dtype, _erf(lower / sqrt2), _erf(upper / sqrt2))
    out = sqrt2 * _erf_inv(u)
    # rounding (or drawing the lower end itself) must not leave the open interval
    lo = _next_toward(lax.stop_gradient(lower), up=True)
    hi = _next_toward(lax.stop_gradient(upper), up=False)
    return np.minimum(np.maximum(out, lo), hi)


def bernoulli(key, p=0.5, shape=None, mode="low"):
    """Booleans that are True with probability ``p``; ``mode="high"`` resolves tiny ``p``."""
    if mode not in ("high", "low"):
        raise ValueError(f"got mode={mode!r}, expected 'high' or 'low'")
    data, _ = _key_data("bernoulli", key)
    p = _operand(p)
    dtype = aval_of(p).dtype
    if dtype not in _FLOATS:
        raise TypeError(f"bernoulli probability `p` must have a floating dtype, got {dtype}.")
    if shape is None:
        shape = aval_of(p).shape
    else:
        shape = _shape("bernoulli", shape)
        _check_shape("bernoulli", shape, aval_of(p).shape)
    if mode == "high":
        u = _uniform(data, (2,) + shape, dtype, 0., 1.)
        return u[1] * np.asarray(2.0 ** -_finfo(dtype).nmant, dtype) < p - u[0]
    return _uniform(data, shape, dtype, 0., 1.) < p


def _gumbel(data, shape, dtype, mode):
    if mode is None:
        mode = "low"
    if mode not in ("highest", "high", "low"):
        raise ValueError(f"Must provide valid mode for gumbel got: {mode}")
    info = _finfo(dtype)
    if mode == "highest" and dtype == np.float32:
        raise NotImplementedError("spmd.random.gumbel(mode='highest') in float32 (JAX's 64-bit "
                                  "fixed-point variant); use mode='high'")
    if mode == "low":
        u = _uniform(data, shape, dtype, np.asarray(info.tiny, dtype), 1.)
        return -_log(-_log(u))
    u = _uniform(data, (2,) + shape, dtype, 0., 1.)
    high, low = u[0], u[1]
    x = np.where(high >= 0.5, high, high + np.asarray(2.0 ** -info.nmant, dtype) * low
                 + np.asarray(info.tiny, dtype))
    return -_log(-_log1p(-x))


def gumbel(key, shape=(), dtype=None, mode=None):
    """Standard Gumbel floats (default float32)."""
    data, _ = _key_data("gumbel", key)
    return _gumbel(data, _shape("gumbel", shape), _float_dtype("gumbel", dtype), mode)


def _top_k_indices(x, k):
    """Indices of the ``k`` largest entries along the last dim, the lower index first among
    equals (XLA's TopK)."""
    return np.argsort(-x, axis=-1)[..., :k].astype(np.int32)


def categorical(key, logits, axis=-1, shape=None, replace=True, mode=None):
    """Indices drawn from the categorical distributions ``softmax(logits, axis)`` (the Gumbel
    max trick; without replacement the Gumbel top-k trick)."""
    data, _ = _key_data("categorical", key)
    logits = _operand(logits)
    a = aval_of(logits)
    axis = axis if axis >= 0 else axis + a.ndim
    batch_shape = a.shape[:axis] + a.shape[axis + 1:]
    if shape is None:
        shape = batch_shape
    else:
        shape = _shape("categorical", shape)
        _check_shape("categorical", shape, batch_shape)
    prefix = shape[:len(shape) - len(batch_shape)]
    if replace:
        logits_shape = list(shape[len(shape) - len(batch_shape):])
        logits_shape.insert(axis, a.shape[axis])
        g = _gumbel(data, prefix + tuple(logits_shape), a.dtype, mode)
        lead = len(prefix)
        return np.argmax(g + np.reshape(logits, (1,) * lead + a.shape), axis=lead + axis).astype(np.int32)
    k = math.prod(prefix)
    if k > a.shape[axis]:
        raise ValueError(f"Number of samples without replacement ({k}) cannot exceed number of "
                         f"categories ({a.shape[axis]}).")
    noisy = logits + _gumbel(data, a.shape, a.dtype, mode)
    idx = _top_k_indices(np.moveaxis(noisy, axis, -1), k)          # batch..., k
    return np.reshape(np.moveaxis(idx, -1, 0), shape)


def _clip_to(x, dtype):
    """An integer ``x`` as ``dtype``, clipped into its range instead of wrapping."""
    src, dst = np.iinfo(aval_of(x).dtype), np.iinfo(dtype)
    lo = np.asarray(max(src.min, dst.min), aval_of(x).dtype)
    hi = np.asarray(min(src.max, dst.max), aval_of(x).dtype)
    return np.minimum(np.maximum(x, lo), hi).astype(dtype)


def _rem(x, y):
    """``x % y`` for unsigned integers, ``x`` where ``y == 0`` (XLA's remainder)."""
    zero = y == 0
    return np.where(zero, x, x % np.where(zero, np.asarray(1, aval_of(y).dtype), y))


def _randint(data, shape, minval, maxval, dtype):
    # Python ints as int64 (JAX's 32-bit ones would overflow), clipped into dtype below
    minval, maxval = [np.asarray(v) if isinstance(v, int) else _operand(v) for v in (minval, maxval)]
    minval = minval if aval_of(minval).dtype.kind in "iu" else _astype(minval, np.int32)
    maxval = maxval if aval_of(maxval).dtype.kind in "iu" else _astype(maxval, np.int32)
    # maxval past dtype's largest value: the span reaches one further (randint(.., 256, uint8))
    too_high = maxval > _clip_to(np.asarray(np.iinfo(dtype).max, dtype), aval_of(maxval).dtype)
    minval, maxval = _clip_to(minval, dtype), _clip_to(maxval, dtype)
    nbits = dtype.itemsize * 8
    k1, k2 = _split(data, (2,))
    # twice the bits of the dtype, so that the bias of the modulus is small
    higher, lower = _bits(k1, nbits, shape), _bits(k2, nbits, shape)
    unsigned = np.dtype(f"uint{nbits}")
    with np.errstate(over="ignore"):
        span = (maxval - minval).astype(unsigned)
        span = np.where(maxval <= minval, np.asarray(1, unsigned), span)
        span = np.where(too_high & (maxval > minval), span + np.asarray(1, unsigned), span)
        multiplier = _rem(np.asarray(2 ** (nbits // 2), unsigned), span)
        multiplier = _rem(multiplier * multiplier, span)
        offset = _rem(_rem(higher, span) * multiplier + _rem(lower, span), span)
        return minval + offset.astype(dtype)


def randint(key, shape, minval, maxval, dtype=None):
    """Uniform integers in ``[minval, maxval)`` (default int32)."""
    data, _ = _key_data("randint", key)
    dtype = np.dtype(np.int32 if dtype is None else dtype)
    if dtype.kind not in "iu":
        raise TypeError(f"randint only accepts integer dtypes, got {dtype}")
    shape = _shape("randint", shape)
    _check_shape("randint", shape, aval_of(minval).shape, aval_of(maxval).shape)
    return _randint(data, shape, minval, maxval, dtype)


def _shuffle(data, x, axis):
    """Sort by random 32-bit keys, as many rounds as make collisions unlikely (JAX's)."""
    size = math.prod(aval_of(x).shape)
    rounds = int(np.ceil(3 * np.log(max(1, size)) / np.log(np.iinfo(np.uint32).max)))
    for _ in range(rounds):
        data, sub = _split(data, (2,))
        order = np.argsort(_bits(sub, 32, aval_of(x).shape), axis=axis)
        x = np.take_along_axis(x, order, axis=axis)
    return x


def _permutation(data, x, axis, independent=False):
    a = aval_of(x)
    if not a.ndim:
        if a.dtype.kind not in "iu":
            raise TypeError("x must be an integer or at least 1-dimensional")
        return _shuffle(data, np.arange(int(x), dtype=np.int32), 0)
    axis = axis if axis >= 0 else axis + a.ndim
    if independent or a.ndim == 1:
        return _shuffle(data, x, axis)
    return np.take(x, _shuffle(data, np.arange(a.shape[axis], dtype=np.int32), 0), axis=axis)


def permutation(key, x, axis=0, independent=False):
    """``x`` shuffled along ``axis`` (an int ``n``: a shuffled ``arange(n)``); the rows of a
    multi-dimensional ``x`` move together unless ``independent``."""
    data, _ = _key_data("permutation", key)
    return _permutation(data, _operand(x), axis, independent)


def choice(key, a, shape=(), replace=True, p=None, axis=0, mode=None):
    """A sample of ``a`` (an int ``n``: of ``arange(n)``) along ``axis``, with or without
    replacement, uniform or with probabilities ``p``."""
    data, _ = _key_data("choice", key)
    if not isinstance(shape, Sequence):
        raise TypeError(f"shape argument of spmd.random.choice must be a sequence, got {shape}")
    shape = _shape("choice", shape)
    arr = _operand(a)
    ar = aval_of(arr)
    if ar.ndim == 0:
        n_inputs = int(a)
    else:
        axis = axis if axis >= 0 else axis + ar.ndim
        n_inputs = ar.shape[axis]
    n_draws = math.prod(shape)
    if n_draws == 0:
        return np.zeros(shape, dtype=ar.dtype)
    if n_inputs <= 0:
        raise ValueError("a must be greater than 0 unless no samples are taken")
    if not replace and n_draws > n_inputs:
        raise ValueError(f"Cannot take a larger sample (size {n_draws}) than population (size "
                         f"{n_inputs}) when 'replace=False'")
    if p is None:
        if replace:
            ind = _randint(data, shape, 0, n_inputs, np.dtype(np.int32))
            result = ind if ar.ndim == 0 else np.take(arr, ind, axis=axis)
        else:
            shuffled = _permutation(data, np.asarray(n_inputs) if ar.ndim == 0 else arr, axis)
            result = shuffled[(slice(None),) * axis + (slice(n_draws),)]
    else:
        p = _operand(p)
        if aval_of(p).dtype.kind not in "f" and aval_of(p).dtype not in _FLOATS:
            p = _astype(p, np.float32)
        if aval_of(p).shape != (n_inputs,):
            raise ValueError(f"p must be None or a 1D vector with the same size as a.shape[axis]. "
                             f"p has shape {aval_of(p).shape} and a.shape[axis] is {n_inputs}.")
        if replace:
            cumulative = np.cumsum(p)
            u = _uniform(data, shape, aval_of(p).dtype, 0., 1.)
            ind = np.searchsorted(cumulative, cumulative[-1] * (1 - u)).astype(np.int32)
        else:
            g = _gumbel(data, (n_inputs,), aval_of(p).dtype, mode) + _log(p)
            ind = _top_k_indices(g, n_draws)
        result = ind if ar.ndim == 0 else np.take(arr, ind, axis=axis)
    return np.reshape(result, shape if ar.ndim == 0 else ar.shape[:axis] + shape + ar.shape[axis + 1:])
