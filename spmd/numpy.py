"""``spmd.numpy``: an array namespace for code that prefers explicit calls to NumPy's
protocols.  Each function works on traced values and on plain arrays alike.

>>> import spmd.numpy as snp
>>> float(snp.logsumexp(np.zeros(4)))
1.3862943611198906
"""
import numpy as np

from . import numpy_api as _api
from .numpy_api import (astype, broadcast_to, reshape, ravel, transpose, swapaxes, moveaxis,
                        expand_dims, squeeze, concatenate, stack, split, flip, roll, pad, tile,
                        repeat, sum, prod, amax, amin, mean, var, std, sort, argsort, where,
                        clip, logsumexp, softmax, layer_norm, rsqrt, full, zeros_like, ones_like,
                        full_like, arange, tril, triu, matmul, dot, tensordot, inner, outer,
                        einsum, take, isclose)

max = amax
min = amin
all = _api.all_
any = _api.any_
argmax = lambda x, axis=None, keepdims=False: _api._arg(_api.lax.argmax_p, x, axis, keepdims)
argmin = lambda x, axis=None, keepdims=False: _api._arg(_api.lax.argmin_p, x, axis, keepdims)
cumsum = lambda x, axis=None, dtype=None: _api._cum(_api.lax.cumsum_p, x, axis, dtype)


def _ufunc(uf):
    def f(*xs):
        if any(isinstance(x, _api.Tracer) for x in xs):
            return _api.apply_ufunc(uf, *xs)
        return uf(*[np.asarray(x) if hasattr(x, "__array__") else x for x in xs])
    f.__name__ = uf.__name__
    f.__doc__ = f"Elementwise numpy.{uf.__name__}."
    return f


for _uf in _api._UFUNCS:
    globals()[_uf.__name__] = _ufunc(_uf)
add, subtract, multiply, divide = (globals()[n] for n in ("add", "subtract", "multiply", "divide"))
abs = globals()["absolute"]
pow = globals()["power"]

zeros = lambda shape, dtype=np.float64: np.zeros(shape, dtype)
ones = lambda shape, dtype=np.float64: np.ones(shape, dtype)
asarray = _api._asarray
float16, float32, float64 = np.float16, np.float32, np.float64
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
bool_ = np.bool_
complex64, complex128 = np.complex64, np.complex128
pi, e, inf, nan = np.pi, np.e, np.inf, np.nan
