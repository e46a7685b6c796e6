"""``spmd.numpy``: an array namespace for code that prefers explicit calls to NumPy's
protocols (``x.__array_namespace__()`` of a traced value or an ``spmd.Array`` is this module).
Each function works on traced values and on plain arrays alike, under NumPy's name and its
array-API aliases (``acos``, ``concat``, ``permute_dims``, ``pow``, ...).

>>> import spmd.numpy as snp
>>> float(snp.logsumexp(np.zeros(4)))
1.3862943611198906
>>> snp.acos(np.ones(2))
array([0., 0.])
"""
import builtins
import sys
import types

import numpy as np

from . import core as _core, numpy_api as _api
from .compiler import Sharding as _Sharding
from .prims import sharding_constraint_p as _constraint_p
from .sharding import as_sharding as _as_sharding
from .numpy_api import (logsumexp, softmax, layer_norm, rsqrt, full, arange)  # noqa: F401 (composites)


def _ufunc(uf):
    def f(*xs, **kwargs):
        if builtins.any(isinstance(x, _api.Tracer) for x in xs):
            return _api.handle_ufunc(uf, "__call__", xs, kwargs)
        return uf(*[np.asarray(x) if hasattr(x, "__array__") else x for x in xs], **kwargs)
    f.__name__ = uf.__name__
    f.__doc__ = f"Elementwise numpy.{uf.__name__}."
    return f


# These need concrete values by design (they return Python bools).
_NOT_EXPORTED = {np.allclose, np.array_equal}


def _table():
    table = {uf: _ufunc(uf) for uf in (*_api._UFUNCS, *_api._COMPOSITE_UFUNCS)}
    table.update(_api._GUFUNCS)
    table.update({f: impl for f, impl in _api.HANDLED_FUNCTIONS.items() if f not in _NOT_EXPORTED})
    return table


def _export(module, table, into):
    """Every name under which ``module`` offers a function spmd handles (aliases included)."""
    for name in dir(module):
        if name.startswith("_") or name in into:
            continue
        try:
            impl = table.get(getattr(module, name))
        except TypeError:                           # unhashable module attributes
            continue
        if impl is not None:
            into[name] = impl


_export(np, _table(), globals())
linalg = types.SimpleNamespace()
_export(np.linalg, _table(), vars(linalg))

zeros = lambda shape, dtype=np.float64: np.zeros(shape, dtype)
ones = lambda shape, dtype=np.float64: np.ones(shape, dtype)
asarray = _api._asarray
empty = zeros


def _with_out_sharding(fn):
    """``fn`` taking JAX's ``out_sharding=`` (a NamedSharding, or a P under ``set_mesh``): the
    result laid out by it, its type on Explicit axes, where the op's own sharding rule would
    be ambiguous or choose otherwise.  Outside a traced function it runs as one compiled op."""
    def f(*args, out_sharding=None, **kwargs):
        if out_sharding is None:
            return fn(*args, **kwargs)
        if _core.current_builder() is None:   # arrays traced, the rest (shapes, subscripts) static
            kinds = (np.ndarray, *_core.hooks.array_types)
            arrays = [i for i, a in enumerate(args) if isinstance(a, kinds)]

            def op(*xs):
                full = list(args)
                for i, x in zip(arrays, xs):
                    full[i] = x
                return f(*full, out_sharding=out_sharding, **kwargs)
            return _core.hooks.jit(op, _name=fn.__name__)(*[args[i] for i in arrays])
        ns = _as_sharding(out_sharding, what=f"spmd.numpy.{fn.__name__}(out_sharding=...)")
        with _core.untyped():
            out = fn(*args, **kwargs)
        return _core.bind(_constraint_p, out, sharding=_Sharding.from_spec(ns.spec, np.ndim(out)),
                          mesh=ns.mesh)
    f.__name__, f.__qualname__, f.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return f


for _name in ("einsum", "dot", "matmul", "reshape", "zeros", "ones", "empty", "full", "arange"):
    globals()[_name] = _with_out_sharding(globals()[_name])
float16, float32, float64 = np.float16, np.float32, np.float64
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
bool_ = np.bool_
complex64, complex128 = np.complex64, np.complex128
pi, e, inf, nan = np.pi, np.e, np.inf, np.nan


_core.hooks.array_namespace = sys.modules[__name__]     # what __array_namespace__ of a tracer gives
