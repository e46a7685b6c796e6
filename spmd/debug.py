"""Host callbacks from traced code: ``spmd.debug.print`` / ``spmd.debug.callback`` (JAX's
``jax.debug``) and ``spmd.pure_callback``.

The callback runs when the program runs, on NumPy arrays: under ``jit`` once on the global
values; inside ``shard_map`` once per device on that device's block, in device order; under
``vmap`` once per batch entry; under ``grad`` on the primal values of the forward pass (and
again where ``checkpoint`` recomputes it).  A debug callback is kept although nothing uses its
result (it has none).

>>> import numpy as np, spmd
>>> @spmd.jit
... def f(x):
...     spmd.debug.print("x = {x}, sum = {}", np.sum(x), x=x)
...     return x * 2
>>> _ = f(np.arange(3.))
x = [0. 1. 2.], sum = 3.0
"""
from __future__ import annotations

import builtins

import numpy as np
import optree

from . import batching, prims
from ._shapes import broadcast_shapes
from .core import Primitive, Tracer, aval_of, bind, current_builder, hooks

__all__ = ["print", "callback", "pure_callback"]


# ---------------------------------------------------------------------------------------------
# the primitives: ``debug_callback`` (effects, no results; never dropped as dead code because it
# has no outputs) and ``pure_callback`` (results, no effects).  ``callback`` is the host
# function of NumPy arrays; inside shard_map each device calls it on its own block, in device
# order (the stacked executor loops over its mesh dims, the per-device executor over devices).
# ---------------------------------------------------------------------------------------------

def _host(xp, x):
    return xp.asnumpy(x) if hasattr(xp, "asnumpy") else np.asarray(x)


def _per_device(xp, k, arrays, sizes):
    """``(device index, that device's NumPy blocks)`` over the leading ``k`` mesh dims."""
    if not k:
        yield (), [_host(xp, a) for a in arrays]
        return
    lead = broadcast_shapes(tuple(sizes[:k]), *[a.shape[:k] for a in arrays])
    arrays = [_host(xp, a) for a in arrays]
    for idx in np.ndindex(*lead):
        yield idx, [a[tuple(i if n > 1 else 0 for i, n in zip(idx, a.shape[:k]))] for a in arrays]


def _entry(vals, dims, i):
    """Batch entry ``i`` of each value (unbatched ones as they are)."""
    out = []
    for v, d in zip(vals, dims):
        if d is not None:
            v = batching.moveaxis(v, d, 0)
            shape = aval_of(v).shape
            v = bind(prims.reshape_p, bind(prims.slice_p, v, index=((i, i + 1, 1),) + tuple(
                (0, n, 1) for n in shape[1:])), shape=shape[1:])
        out.append(v)
    return out


def _debug_callback_impl(xp, k, *arrays, callback, mesh_sizes):
    for _, blocks in _per_device(xp, k, arrays, mesh_sizes):
        callback(*blocks)
    return []


def _debug_callback_batch(vals, dims, *, callback, mesh_sizes):
    """One call per batch entry, in order (as JAX's debug callbacks under vmap)."""
    for i in range(batching.batch_size(vals, dims)):
        bind(debug_callback_p, *_entry(vals, dims, i), callback=callback, mesh_sizes=mesh_sizes)
    return [], []


def _debug_callback_jvp(primals, tangents, **params):
    bind(debug_callback_p, *primals, **params)       # the primal values, once
    return [], []


debug_callback_p = Primitive(
    "debug_callback", abstract=lambda *avals, **params: [], multiple_results=True,
    vma=lambda *avals, **params: frozenset(), impl=_debug_callback_impl,
    jvp=_debug_callback_jvp, batch=_debug_callback_batch)


def checked_results(callback, got, result_avals):
    """A pure callback's results (NumPy arrays), checked against the types it declared."""
    for i, (g, want) in enumerate(zip(got, result_avals)):
        if g.shape != tuple(want.shape) or g.dtype != want.dtype:
            raise TypeError(f"pure_callback({callback.__name__}): result {i} has type "
                            f"{g.dtype}{list(g.shape)}, but result_shape_dtypes says "
                            f"{want.dtype}{list(want.shape)}")
    return got


def _pure_callback_impl(xp, k, *arrays, callback, result_avals, mesh_sizes, vmap_method):
    per = [(idx, checked_results(callback, callback(*blocks), result_avals))
           for idx, blocks in _per_device(xp, k, arrays, (1,) * k)]
    if not k:
        return [xp.asarray(r) for r in per[0][1]]
    lead = tuple(max(i) + 1 for i in zip(*[i for i, _ in per])) if per else (1,) * k
    return [xp.asarray(np.stack([r[j] for _, r in per]).reshape(lead + tuple(a.shape)))
            for j, a in enumerate(result_avals)]


def _pure_callback_jvp(primals, tangents, **params):
    raise ValueError("Pure callbacks do not support JVP. Please use `spmd.custom_jvp` (or "
                     "custom_vjp) to use callbacks while taking gradients.")


def _pure_callback_batch(vals, dims, *, callback, result_avals, mesh_sizes, vmap_method):
    """``sequential``: one call per batch entry; ``expand_dims`` / ``broadcast_all``: one call
    on the batched arrays (unbatched ones with a size-1 / the full batch dim in front)."""
    size = batching.batch_size(vals, dims)
    if vmap_method == "sequential":
        outs = [bind(pure_callback_p, *_entry(vals, dims, i), callback=callback,
                     result_avals=result_avals, mesh_sizes=mesh_sizes, vmap_method=vmap_method)
                for i in range(size)]
        return [bind(prims.concatenate_p, *[bind(prims.reshape_p, o[j], shape=(1,) + tuple(a.shape))
                                      for o in outs], axis=0)
                for j, a in enumerate(result_avals)], [0] * len(result_avals)
    if vmap_method not in ("expand_dims", "broadcast_all"):
        raise NotImplementedError(
            f"pure_callback under vmap needs vmap_method='sequential', 'expand_dims' or "
            f"'broadcast_all' (got {vmap_method!r}): say how the callback handles a batch.")
    front = []
    for v, d in zip(vals, dims):
        shape = aval_of(v).shape
        if d is not None:
            front.append(batching.moveaxis(v, d, 0))
        elif vmap_method == "expand_dims":
            front.append(bind(prims.reshape_p, v, shape=(1,) + tuple(shape)))
        else:
            front.append(batching.to_front(v, None, size))
    batched = tuple(a.update(shape=(size,) + tuple(a.shape)) for a in result_avals)
    return bind(pure_callback_p, *front, callback=callback, result_avals=batched,
                mesh_sizes=mesh_sizes, vmap_method=vmap_method), [0] * len(result_avals)


pure_callback_p = Primitive(
    "pure_callback", abstract=lambda *avals, result_avals, **params: list(result_avals),
    multiple_results=True, impl=_pure_callback_impl, jvp=_pure_callback_jvp,
    batch=_pure_callback_batch)



class _Callback:
    """The host function of an equation (hashed by identity): the user's callback with the
    static leaves of its arguments put back around the arrays the program passes."""

    def __init__(self, fn, tree, static, dynamic):
        self.fn, self.tree, self.static, self.dynamic = fn, tree, static, dynamic
        self.__name__ = getattr(fn, "__name__", "callback")

    def __call__(self, *arrays):
        leaves = list(self.static)
        for i, a in zip(self.dynamic, arrays):
            leaves[i] = a
        args, kwargs = optree.tree_unflatten(self.tree, leaves)
        return self.fn(*args, **kwargs)


def _is_array(x) -> bool:
    return isinstance(x, (Tracer, np.ndarray, np.generic) + hooks.array_types)


def _split(fn, args, kwargs):
    """The array leaves of ``(args, kwargs)`` (what the program passes) and the callback that
    takes them."""
    leaves, tree = optree.tree_flatten((args, kwargs), none_is_leaf=True)
    dynamic = [i for i, x in enumerate(leaves) if _is_array(x)]
    static = [None if i in dynamic else x for i, x in enumerate(leaves)]
    return [leaves[i] for i in dynamic], _Callback(fn, tree, static, dynamic)


def _mesh_sizes() -> tuple:
    b = current_builder()
    return tuple(b.mesh.axis_sizes) if b is not None and b.manual_axes else ()


def _host_values(arrays):
    return [np.asarray(a) for a in arrays]


def callback(callback, *args, ordered: bool = False, partitioned: bool = False, **kwargs):
    """Call ``callback(*args, **kwargs)`` on the host with the values as NumPy arrays, when the
    program runs (per device inside ``shard_map``).  Returns None.  Calls run in program order
    whether or not ``ordered`` is set."""
    arrays, cb = _split(callback, args, kwargs)
    if current_builder() is None:
        cb(*_host_values(arrays))
        return None
    bind(debug_callback_p, *arrays, callback=cb, mesh_sizes=_mesh_sizes())
    return None


def print(fmt: str, *args, ordered: bool = False, **kwargs):  # noqa: A001 (JAX's name)
    """``print(fmt.format(*args, **kwargs))`` with the runtime values (NumPy arrays), once per
    device inside ``shard_map``."""
    if not isinstance(fmt, str):
        raise TypeError(f"spmd.debug.print: the format must be a string, got {type(fmt).__name__}; "
                        f"write spmd.debug.print('{{}}', x)")
    callback(lambda *a, **k: builtins.print(fmt.format(*a, **k)), *args, ordered=ordered, **kwargs)


def pure_callback(callback, result_shape_dtypes, *args, sharding=None, vmap_method=None,
                  **kwargs):
    """``callback(*args, **kwargs)`` computed on the host (NumPy arrays in and out), typed by
    ``result_shape_dtypes`` (a pytree of ``ShapeDtypeStruct`` or anything with ``.shape`` and
    ``.dtype``).  Not differentiable (use ``custom_jvp``/``custom_vjp`` around it); under
    ``vmap`` ``vmap_method`` says how it takes a batch ('sequential', 'expand_dims',
    'broadcast_all'); unused results may be dropped, as for any pure function."""
    name = getattr(callback, "__name__", "callback")
    res_leaves, res_tree = optree.tree_flatten(result_shape_dtypes, none_is_leaf=False)
    try:
        result_avals = tuple(aval_of(np.zeros((), r.dtype)).update(shape=tuple(r.shape))
                             for r in res_leaves)
    except AttributeError:
        raise TypeError(f"pure_callback({name}): result_shape_dtypes must be a pytree of values "
                        f"with .shape and .dtype (spmd.ShapeDtypeStruct), got "
                        f"{result_shape_dtypes!r}") from None

    def checked(*a, **k):
        out = callback(*a, **k)
        got, got_tree = optree.tree_flatten(out, none_is_leaf=False)
        if got_tree != res_tree:
            raise TypeError(f"pure_callback({name}) returned structure {got_tree}, but "
                            f"result_shape_dtypes has {res_tree}")
        return [np.asarray(g) for g in got]       # their types are checked where it runs
    checked.__name__ = name
    arrays, cb = _split(checked, args, kwargs)
    if current_builder() is None:
        return optree.tree_unflatten(res_tree, checked_results(cb, cb(*_host_values(arrays)),
                                                                result_avals))
    outs = bind(pure_callback_p, *arrays, callback=cb, result_avals=result_avals,
                mesh_sizes=_mesh_sizes(), vmap_method=vmap_method)
    return optree.tree_unflatten(res_tree, outs)
