"""Eager operations on sharded ``Array``s: each NumPy call outside ``jit`` compiles one op
through the sharding compiler (propagation picks the output sharding and the collectives),
cached on (op, static arguments, argument types and shardings) -- DTensor's experience with
JAX's specs.

>>> import numpy as np, spmd
>>> from spmd import P, NamedSharding
>>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
>>> x = spmd.device_put(np.ones((8, 4)), NamedSharding(mesh, P("data")))
>>> w = spmd.device_put(np.ones((4, 8)), NamedSharding(mesh, P(None, "model")))
>>> (x @ w).sharding.spec
P('data', 'model')
"""
from __future__ import annotations

import sys

import numpy as np
import optree

from . import _cache
from .array import Array
from .core import hooks
from .errors import ShardingError, TracingError
from .jit import Jitted
from .numpy_api import HANDLED_FUNCTIONS
from .sharding import NamedSharding, PartitionSpec

_CACHE = _cache.LRU()
# NumPy functions that only look at shapes and dtypes: answered on the host from stand-ins.
_METADATA = {np.shape, np.ndim, np.size, np.result_type}


def _freeze(x):
    """A hashable key for a static argument."""
    if isinstance(x, slice):
        return ("slice", x.start, x.stop, x.step)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_freeze(v) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, np.dtype) or isinstance(x, type):
        return ("type", str(x))
    try:
        hash(x)
    except TypeError:
        return ("repr", repr(x))
    return (type(x).__name__, x)


def _is_array(x):
    return isinstance(x, (Array, np.ndarray))


def call(name, fn, args, kwargs):
    """``fn(*args, **kwargs)`` on sharded Arrays, compiled through the sharding compiler."""
    leaves, tree = optree.tree_flatten((tuple(args), dict(kwargs)), none_is_leaf=True)
    dyn = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    arrays = [leaves[i] for i in dyn]
    mesh, first = None, None
    for i, a in zip(dyn, arrays):
        if isinstance(a, Array) and a.sharding.mesh.axis_names != ("_device",):
            if mesh is None:
                mesh, first = a.sharding.mesh, i
            elif a.sharding.mesh != mesh:
                raise ShardingError(f"{name}: operands live on different meshes ({mesh!r} and "
                                    f"{a.sharding.mesh!r}); reshard one of them with spmd.reshard first.")
    if mesh is None:           # nothing sharded: plain host NumPy
        host = [np.asarray(a) for a in arrays]
        return fn(*_rebuild(tree, leaves, dyn, host)[0], **_rebuild(tree, leaves, dyn, host)[1])
    shardings = tuple(a.sharding if isinstance(a, Array) and a.sharding.mesh == mesh
                      else NamedSharding(mesh, PartitionSpec()) for a in arrays)
    static = tuple(_freeze(leaves[i]) for i in range(len(leaves)) if i not in set(dyn))
    key = (name, tree, static, tuple((a.shape, np.dtype(a.dtype), s.spec) for a, s in zip(arrays, shardings)), mesh)
    jf = _CACHE.get(key)
    if jf is None:
        # the static leaves only: the cached op must not keep this call's arrays alive
        statics = [None if i in dyn else leaf for i, leaf in enumerate(leaves)]

        def one_op(*xs):
            a, kw = _rebuild(tree, statics, dyn, list(xs))
            return fn(*a, **kw)
        one_op.__qualname__ = name
        jf = Jitted(one_op, name=name, in_shardings=shardings)
        _CACHE.put(key, jf)
    return jf(*arrays)


def _rebuild(tree, leaves, dyn, values):
    new = list(leaves)
    for i, v in zip(dyn, values):
        new[i] = v
    return optree.tree_unflatten(tree, new)


def array_ufunc(self, ufunc, method, inputs, kwargs):
    if kwargs.get("out") is not None:
        raise TypeError(f"np.{ufunc.__name__}(..., out=...): spmd.Arrays are immutable; use the "
                        f"returned value instead.")
    if method not in ("__call__", "reduce", "accumulate"):
        return NotImplemented
    return call(f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__,
                lambda *a, **k: getattr(ufunc, method)(*a, **k), inputs, kwargs)


def array_function(self, func, types, args, kwargs):
    if func in _METADATA:
        stand_in = lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape) if isinstance(x, Array) else x
        return func(*optree.tree_map(stand_in, args), **kwargs)
    host = lambda x: np.asarray(x) if isinstance(x, Array) else x
    on_host = lambda: func(*optree.tree_map(host, args, none_is_leaf=True),
                           **optree.tree_map(host, kwargs, none_is_leaf=True))
    if func not in HANDLED_FUNCTIONS or func in _HOST:
        # no traced rule, or a Python value as result (np.allclose): NumPy on gathered values
        return on_host()
    try:
        return call(getattr(func, "__name__", str(func)), func, args, kwargs)
    except TracingError:
        _HOST.add(func)
        return on_host()


_HOST: set = set()


def getitem(self, key):
    return call("getitem", lambda x, k: x[k], (self, key), {})


hooks.eager = sys.modules[__name__]
