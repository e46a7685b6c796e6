"""``jax.random`` on threefry2x32: the same keys and the same bits as JAX 0.10.

The spec is JAX's default configuration: the ``threefry2x32`` implementation with
``jax_threefry_partitionable=True`` (each output element hashes its own index, so a sharded
draw needs no communication), and JAX's 32-bit default dtypes (``float32``, ``int32``,
``uint32``) when no dtype is given.  A dtype you do give is kept: ``float64`` draws JAX's
``float64`` values (JAX itself computes them only under ``jax_enable_x64``).

Keys are typed (``key(seed)``, an array of keys) or raw (``PRNGKey(seed)``, uint32 data of
shape ``(2,)``), as in JAX; ``key_data`` and ``wrap_key_data`` convert.  Either kind is
an ordinary traced value: the hash is the primitive ``spmd.prims.threefry2x32_p``, every sampler
is NumPy code over it, so they run eagerly, under ``jit``, ``vmap`` and inside ``shard_map``,
where ``fold_in(key, axis_index("x"))`` gives each device its own stream.

The transcendental functions the samplers use (``log``, ``log1p``, ``exp``, ``erf``,
``erf_inv``) are computed the way XLA computes them on the CPU in float32, fused multiply-adds
included, so ``normal``, ``truncated_normal``, ``gumbel`` and ``categorical`` give JAX's float32
bits too; in float64 they agree with JAX to a few ulps.  ``gamma``, ``loggamma``, ``beta`` and
``dirichlet`` give JAX's float32 bits wherever XLA's reciprocal square root of ``a - 1/3``
(``a + 2/3`` below 1) is the correctly rounded one: XLA refines the processor's approximate one,
which is an ulp off for some ``a`` (about one in seven on an AMD EPYC), and the draws for that
``a`` then differ by a few ulps.  ``gamma`` with ``a < 1`` takes a power, an ulp off XLA's in
about one draw in a thousand.

>>> import spmd
>>> k = spmd.random.key(0)
>>> spmd.random.key_data(spmd.random.split(k)).tolist()
[[1797259609, 2579123966], [928981903, 3453687069]]
>>> spmd.random.randint(k, (4,), 0, 10).tolist()
[9, 0, 2, 3]
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from ._shapes import broadcast_shapes

from . import _xla_math as xm, prims, numpy_api, tree_util
from .collectives import pmax, pvary
from .control_flow import while_loop
from .core import Tracer, aval_of, bind, hooks

__all__ = ["PRNGKeyArray", "key", "PRNGKey", "key_data", "wrap_key_data", "split", "fold_in",
           "bits", "uniform", "normal", "truncated_normal", "bernoulli", "categorical", "randint",
           "permutation", "choice", "gumbel", "gamma", "loggamma", "beta", "dirichlet"]

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
    return bind(prims.threefry2x32_p, data[0], data[1], c_high, c_low)


def _counters(shape):
    """The index of each element of ``shape`` as (high, low) uint32 words: the counters of
    the partitionable threefry (JAX's ``iota_2x32_shape``)."""
    n = math.prod(shape)
    if n >= 2 ** 32:
        raise NotImplementedError(f"spmd.random: {n} random values in one draw (at most 2**32)")
    low = bind(prims.iota_p, dtype=_U32, shape=(n,), dimension=0).reshape(shape)
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
    try:
        fits = not param_shapes or broadcast_shapes(shape, *param_shapes) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
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
    minval, maxval = xm.astype(minval, dtype), xm.astype(maxval, dtype)
    span = maxval - minval
    power_of_2 = not isinstance(span, Tracer) and np.all(
        np.abs(np.frexp(span.astype(np.float64))[0]) == 0.5)
    # XLA fuses the multiply-add; with a power-of-2 span the product is exact anyway
    scaled = floats * span + minval if power_of_2 else xm.fma(floats, span, minval)
    return np.maximum(minval, scaled)


def uniform(key, shape=(), dtype=None, minval=0., maxval=1.):
    """Uniform floats in ``[minval, maxval)`` (default float32)."""
    data, _ = _key_data("uniform", key)
    shape, dtype = _shape("uniform", shape), _float_dtype("uniform", dtype)
    _check_shape("uniform", shape, aval_of(minval).shape, aval_of(maxval).shape)
    return _uniform(data, shape, dtype, minval, maxval)


def _inverse_sqrt2(dtype):
    """XLA divides by a constant as it multiplies by its rounded reciprocal."""
    return np.asarray(1, dtype) / np.asarray(np.sqrt(2), dtype)


def _normal(data, shape, dtype):
    if dtype.kind == "c":
        real = np.dtype(f"float{dtype.itemsize * 4}")
        k_re, k_im = _split(data, (2,))
        re, im = _normal(k_re, shape, real), _normal(k_im, shape, real)
        return (re.astype(dtype) + 1j * im.astype(dtype)) * _inverse_sqrt2(dtype)
    lo = np.asarray(-1 + _finfo(dtype).epsneg, dtype)            # nextafter(-1, 0)
    u = _uniform(data, shape, dtype, lo, np.asarray(1, dtype))
    return np.asarray(np.sqrt(2), dtype) * xm.erf_inv(u)


def normal(key, shape=(), dtype=None):
    """Standard normal floats (default float32; complex dtypes too)."""
    data, _ = _key_data("normal", key)
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in _FLOATS + (np.dtype(np.complex64), np.dtype(np.complex128)):
        raise ValueError(f"dtype argument to `normal` must be a float or complex dtype, got {dt}")
    return _normal(data, _shape("normal", shape), dt)


def truncated_normal(key, lower, upper, shape=None, dtype=None):
    """Normal floats conditioned on ``lower < x < upper``."""
    data, _ = _key_data("truncated_normal", key)
    dtype = _float_dtype("truncated_normal", dtype)
    bounds = (aval_of(lower).shape, aval_of(upper).shape)
    if shape is None:
        shape = broadcast_shapes(*bounds)
    else:
        shape = _shape("truncated_normal", shape)
        _check_shape("truncated_normal", shape, *bounds)
    lower, upper = xm.astype(lower, dtype), xm.astype(upper, dtype)
    u = _uniform(data, shape, dtype, xm.erf(lower * _inverse_sqrt2(dtype)),
                 xm.erf(upper * _inverse_sqrt2(dtype)))
    out = np.asarray(np.sqrt(2), dtype) * xm.erf_inv(u)
    # rounding (or drawing the lower end itself) must not leave the open interval
    lo = xm.next_toward(prims.stop_gradient(lower), up=True)
    hi = xm.next_toward(prims.stop_gradient(upper), up=False)
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
        return -xm.log(-xm.log(u))
    u = _uniform(data, (2,) + shape, dtype, 0., 1.)
    high, low = u[0], u[1]
    x = np.where(high >= 0.5, high, high + np.asarray(2.0 ** -info.nmant, dtype) * low
                 + np.asarray(info.tiny, dtype))
    return -xm.log(-xm.log1p(-x))


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
        noisy = g + np.reshape(logits, (1,) * lead + a.shape)
        return np.argmax(noisy, axis=lead + axis).astype(np.int32)
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
    minval, maxval = (np.asarray(v) if isinstance(v, int) else _operand(v)
                      for v in (minval, maxval))
    minval = minval if aval_of(minval).dtype.kind in "iu" else xm.astype(minval, np.int32)
    maxval = maxval if aval_of(maxval).dtype.kind in "iu" else xm.astype(maxval, np.int32)
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
    if dtype.itemsize >= 4:
        return _randint(data, shape, minval, maxval, dtype)
    # narrower integers are drawn in 32 bits (less bias), then cast
    info, i32 = np.iinfo(dtype), np.dtype(np.int32)
    low = np.clip(xm.astype(_operand(minval), i32), info.min, info.max)
    high = np.clip(xm.astype(_operand(maxval), i32), info.min, info.max + 1)
    return _randint(data, shape, low, high, i32).astype(dtype)


def _take(x, indices, axis):
    """``np.take`` that also traces when only the indices are traced (NumPy dispatches
    ``np.take`` on its first argument alone)."""
    if isinstance(indices, Tracer):
        return numpy_api.take(x, indices, axis=axis)
    return np.take(x, indices, axis=axis)


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
    return _take(x, _shuffle(data, np.arange(a.shape[axis], dtype=np.int32), 0), axis)


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
            result = ind if ar.ndim == 0 else _take(arr, ind, axis)
        else:
            shuffled = _permutation(data, np.asarray(n_inputs) if ar.ndim == 0 else arr, axis)
            result = shuffled[(slice(None),) * axis + (slice(n_draws),)]
    else:
        p = _operand(p)
        if aval_of(p).dtype.kind not in "f" and aval_of(p).dtype not in _FLOATS:
            p = xm.astype(p, np.float32)
        if aval_of(p).shape != (n_inputs,):
            raise ValueError(f"p must be None or a 1D vector with the same size as a.shape[axis]. "
                             f"p has shape {aval_of(p).shape} and a.shape[axis] is {n_inputs}.")
        if replace:
            cumulative = np.cumsum(p)
            u = _uniform(data, shape, aval_of(p).dtype, 0., 1.)
            ind = np.searchsorted(cumulative, cumulative[-1] * (1 - u)).astype(np.int32)
        else:
            g = _gumbel(data, (n_inputs,), aval_of(p).dtype, mode) + xm.log(p)
            ind = _top_k_indices(g, n_draws)
        result = ind if ar.ndim == 0 else _take(arr, ind, axis)
    return np.reshape(result, shape if ar.ndim == 0 else
                      ar.shape[:axis] + shape + ar.shape[axis + 1:])


# ---------------------------------------------------------------------------------------------
# gamma and the samplers built on it
# ---------------------------------------------------------------------------------------------

def _words(keys):
    """The two key words of an array of keys ``(..., 2)``, as ``_hash`` takes them: samplers
    given these draw one value per key (a draw of shape ``()`` under each)."""
    return keys[..., 0], keys[..., 1]


def _split_each(keys, num: int):
    """``num`` keys from each key of ``keys`` (shape ``(n, 2)``): ``split(k, num)`` per key."""
    high, low = _hash((keys[:, :1], keys[:, 1:]), *_counters((num,)))
    return [np.stack([high[:, i], low[:, i]], axis=-1) for i in range(num)]


def _any_anywhere(mask, axes):
    """Whether ``mask`` has a True element, on any device of the mesh ``axes`` (in shard_map:
    every device then loops as many times as the slowest, its finished elements unchanged)."""
    found = np.any(mask)
    return pmax(found.astype(np.int32), axes) > 0 if axes else found


def _marsaglia_tsang(keys, d, c, axes):
    """The accepted ``V`` of Marsaglia and Tsang's rejection loop for ``Gamma(d + 1/3)``, one
    per key, as JAX draws it: each round splits its key in three (next round, normal, uniform),
    redraws the normal (from its own key chain) until ``v = 1 + c x > 0``, and accepts when
    ``U < 1 - 0.0331 x^4`` or ``log U < x^2 / 2 + d (1 - v^3 + log v^3)``.  Every element runs
    its own loop; the vectorised loop runs until all have accepted, each keeping its state once
    its own test passes (in shard_map, until all have on every device of ``axes``)."""
    dtype = aval_of(d).dtype
    one, zero = np.ones_like(d), np.zeros_like(d)
    half, squeeze = np.asarray(0.5, dtype), np.asarray(0.0331, dtype)

    def rejected(state):
        _, X, V, U = state
        return (U >= xm.fma(-(X * X), squeeze, one)) & (
            xm.log(U) >= xm.fma(X, half, d * ((one - V) + xm.log(V))))

    def draw_normal(state):
        keys, x, v = state
        keys_next, sub = _split_each(keys, 2)
        x_new = _normal(_words(sub), (), dtype)
        redo = v <= 0
        return (np.where(redo[:, None], keys_next, keys), np.where(redo, x_new, x),
                np.where(redo, xm.fma(x_new, c, one), v))

    def round_(state):
        keys, X, V, U = state
        keys_next, x_key, u_key = _split_each(keys, 3)
        _, x, v = while_loop(lambda s: _any_anywhere(s[2] <= 0, axes), draw_normal,
                             (x_key, zero, -one))
        new = (x * x, v * v * v, _uniform(_words(u_key), (), dtype, 0., 1.))
        redo = rejected(state)
        return (np.where(redo[:, None], keys_next, keys),
                *(np.where(redo, n, o) for n, o in zip(new, (X, V, U))))

    # the initial state is rejected, so that every element draws at least once
    return while_loop(lambda s: _any_anywhere(rejected(s), axes), round_,
                      (keys, zero, one, one + one))[2]


def _gamma(data, alpha, log_space: bool):
    """Standard gamma samples (their logs if ``log_space``) for ``alpha`` of the output's shape
    and dtype, one key per element split from ``data``.  ``alpha < 1`` is drawn as
    ``Gamma(alpha + 1) * U ** (1 / alpha)`` (in logs: plus ``log U / alpha``)."""
    shape, dtype = aval_of(alpha).shape, aval_of(alpha).dtype
    n = math.prod(shape)
    if n == 0:
        return np.zeros(shape, dtype)
    keys = _split(data, (n,))
    alpha = np.reshape(alpha, (n,))
    axes = tuple(aval_of(keys).vma)
    if axes:                      # in shard_map: the loops' carries vary as the keys do
        alpha = pvary(alpha, axes)
    one = np.ones_like(alpha)
    boosted = alpha >= one
    d = np.where(boosted, alpha, alpha + one) - np.asarray(1 / 3, dtype)
    c = np.asarray(1 / 3, dtype) * xm.rsqrt(d)
    loop_keys, boost_key = _split_each(keys, 2)
    V = _marsaglia_tsang(loop_keys, d, c, axes)
    u = _uniform(_words(boost_key), (), dtype, 0., 1.)
    if log_space:
        log_u = xm.log1p(-u)                   # log(1 - u), as -exponential() gives it
        log_boost = np.where(boosted | (log_u == 0), np.zeros_like(u), log_u * (one / alpha))
        out = (xm.log(d) + xm.log(V)) + log_boost
    else:
        boost = np.where(boosted, one, xm.pow(one - u, one / alpha))
        out = (d * V) * boost
    return np.reshape(out, shape)


def _gamma_params(name, shape, dtype, *params):
    """The parameters cast to the float ``dtype`` and broadcast to the output shape (``shape``,
    or by default the parameters' broadcast shape)."""
    dtype = _float_dtype(name, dtype)
    params = [xm.astype(p, dtype) for p in params]        # Python floats exactly, as JAX's x64
    shapes = [aval_of(p).shape for p in params]
    if shape is None:
        shape = broadcast_shapes(*shapes)
    else:
        shape = _shape(name, shape)
        _check_shape(name, shape, *shapes)
    return [np.broadcast_to(p, shape) for p in params]


def gamma(key, a, shape=None, dtype=None):
    """Standard gamma floats of shape parameter ``a`` (default float32; the shape defaults to
    ``a``'s).  Marsaglia and Tsang's method, each element with its own key."""
    data, _ = _key_data("gamma", key)
    (a,) = _gamma_params("gamma", shape, dtype, a)
    return _gamma(data, a, log_space=False)


def loggamma(key, a, shape=None, dtype=None):
    """The logs of standard gamma floats, drawn in log space (accurate for tiny ``a``, whose
    samples underflow); ``exp(loggamma(...))`` is close to ``gamma(...)`` of the same key."""
    data, _ = _key_data("loggamma", key)
    (a,) = _gamma_params("loggamma", shape, dtype, a)
    return _gamma(data, a, log_space=True)


def beta(key, a, b, shape=None, dtype=None):
    """Beta floats: ``G_a / (G_a + G_b)`` of two gamma draws, taken from their logs so that
    small parameters keep their precision."""
    data, _ = _key_data("beta", key)
    a, b = _gamma_params("beta", shape, dtype, a, b)
    key_a, key_b = _split(data, (2,))
    log_a, log_b = _gamma(key_a, a, log_space=True), _gamma(key_b, b, log_space=True)
    log_max = np.maximum(log_a, log_b)
    scaled_a, scaled_b = xm.exp(log_a - log_max), xm.exp(log_b - log_max)
    return scaled_a / (scaled_a + scaled_b)


def dirichlet(key, alpha, shape=None, dtype=None):
    """Dirichlet floats over the last dim of ``alpha`` (``shape`` is the batch shape, without
    that dim): the softmax of log-gamma draws."""
    data, _ = _key_data("dirichlet", key)
    alpha = xm.astype(alpha, _float_dtype("dirichlet", dtype))
    a = aval_of(alpha)
    if a.ndim < 1:
        raise ValueError(f"spmd.random.dirichlet requires alpha.ndim >= 1, got alpha.ndim == "
                         f"{a.ndim}")
    batch = a.shape[:-1] if shape is None else _shape("dirichlet", shape)
    _check_shape("dirichlet", batch, a.shape[:-1])
    logs = _gamma(data, np.broadcast_to(alpha, batch + a.shape[-1:]), log_space=True)
    e = xm.exp(logs - np.max(logs, axis=-1, keepdims=True))
    # XLA divides by the sum as it multiplies by its reciprocal
    return e * (np.asarray(1, aval_of(e).dtype) / np.sum(e, axis=-1, keepdims=True))
