"""``jax.nn``'s activations, written as NumPy code: they run eagerly (on NumPy arrays and
sharded ``Array``s), under ``jit``, ``grad`` and ``vmap``, and inside ``shard_map``, and are
differentiated through the NumPy calls they are made of.  Each is computed stably: no
overflow for large inputs, and no NaN in any gradient.

>>> import numpy as np, spmd
>>> spmd.nn.relu(np.array([-1., 2.])).tolist()
[0.0, 2.0]
>>> np.round(spmd.nn.softmax(np.array([0., np.log(3.)])), 6).tolist()
[0.25, 0.75]
"""
from __future__ import annotations

import numpy as np

from . import _xla_math, prims
from .core import Tracer, aval_of, hooks

__all__ = ["relu", "gelu", "silu", "swish", "sigmoid", "softmax", "log_softmax", "logsumexp",
           "one_hot"]


def _array(x):
    """Traced values and arrays as they are (a sharded ``Array`` stays sharded)."""
    return x if isinstance(x, (Tracer, np.ndarray) + hooks.array_types) else np.asarray(x)


def relu(x):
    """``max(x, 0)``, with derivative 0 at 0 (as JAX); NaN stays NaN."""
    return np.where(x <= 0, 0, x)


def sigmoid(x):
    """``1 / (1 + exp(-x))`` from ``exp(-|x|)``, which never overflows."""
    x = _array(x)
    e = np.exp(np.where(x >= 0, -x, x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def silu(x):
    """``x * sigmoid(x)`` (also called swish)."""
    return x * sigmoid(x)


swish = silu


def gelu(x, approximate: bool = True):
    """The Gaussian error linear unit ``x * Phi(x)``; ``approximate=True`` (JAX's default) is
    the tanh approximation, ``False`` the exact form through ``erf``."""
    x = _array(x)
    dt = aval_of(x).dtype
    if approximate:
        cdf = 0.5 * (1.0 + np.tanh(np.asarray(np.sqrt(2 / np.pi), dt) * (x + 0.044715 * x ** 3)))
        return x * cdf
    return 0.5 * x * (1 + _xla_math.erf(x * np.asarray(np.sqrt(0.5), dt)))


def _max(x, axis, where, keepdims):
    if where is None:
        return np.max(x, axis=axis, keepdims=keepdims)
    return np.max(x, axis=axis, keepdims=keepdims, where=where, initial=-np.inf)


def _sum(x, axis, where, keepdims):
    if where is None:                       # NumPy reads where=None as "nothing"
        return np.sum(x, axis=axis, keepdims=keepdims)
    return np.sum(x, axis=axis, keepdims=keepdims, where=where)


def softmax(x, axis=-1, where=None):
    """``exp(x) / sum(exp(x))`` along ``axis`` (an int, a tuple or None), shifted by the
    maximum; entries outside ``where`` are 0."""
    x = _array(x)
    x_max = prims.stop_gradient(_max(x, axis, where, keepdims=True))
    x_safe = x if where is None else np.where(where, x, -np.inf)
    unnormalized = np.exp(x_safe - x_max)
    result = unnormalized / _sum(unnormalized, axis, where, keepdims=True)
    return result if where is None else np.where(where, result, 0)


def log_softmax(x, axis=-1, where=None):
    """``x - logsumexp(x)`` along ``axis``; entries outside ``where`` are ``-inf``."""
    x = _array(x)
    x_max = prims.stop_gradient(_max(x, axis, where, keepdims=True))
    shifted = (x if where is None else np.where(where, x, -np.inf)) - x_max
    result = shifted - np.log(_sum(np.exp(shifted), axis, where, keepdims=True))
    return result if where is None else np.where(where, result, -np.inf)


def logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, where=None):
    """``log(sum(b * exp(a)))`` over ``axis``, shifted by the maximum; ``return_sign`` also
    returns the sign of the sum (else a negative sum gives NaN)."""
    a = _array(a)
    if b is not None:
        b = _array(b)
        a = np.where(b != 0, a, -np.inf)
    if aval_of(a).dtype.kind not in "fc":
        a = a.astype(np.result_type(aval_of(a).dtype, np.float32))
    ndim = aval_of(a).ndim
    axes = tuple(range(ndim)) if axis is None else tuple(
        d % ndim for d in (axis if isinstance(axis, tuple) else (axis,)))
    amax = _max(a, axes, where, keepdims)
    amax = prims.stop_gradient(np.where(np.isfinite(amax), amax, 0))
    exp_a = np.exp(a - (amax if keepdims else np.expand_dims(amax, axes)))
    if b is not None:
        exp_a = exp_a * b
    total = _sum(exp_a, axes, where, keepdims)
    sign = np.sign(total)
    out = np.log(np.abs(total)) + amax
    if return_sign:
        return out, sign
    return out if b is None else np.where(sign < 0, np.nan, out)


def one_hot(x, num_classes: int, *, dtype=None, axis: int = -1):
    """``x == arange(num_classes)`` along a new dim ``axis``, as ``dtype`` (default float32);
    out-of-range indices give rows of zeros."""
    if isinstance(axis, str):
        raise NotImplementedError("spmd.nn.one_hot: a mesh axis name as `axis` (classes split "
                                  "over devices); pass an integer axis")
    x = _array(x)
    ndim = aval_of(x).ndim
    out_axis = axis % (ndim + 1)
    classes = [1] * ndim
    classes.insert(out_axis, num_classes)
    labels = np.arange(num_classes, dtype=aval_of(x).dtype).reshape(classes)
    return (np.expand_dims(x, out_axis) == labels).astype(np.float32 if dtype is None else dtype)
