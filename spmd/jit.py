"""``spmd.jit``: trace once per (argument types, static arguments), cache, execute."""
from __future__ import annotations

import functools
import os

import numpy as np
import optree

from . import distributed
from .array import Array
from .core import Tracer, aval_of, current_builder, trace
from .transforms.ad import dce


_EXECUTORS: dict = {}     # one per SPMD_EXECUTOR value: executors keep their compiled plans


def _default_executor():
    if distributed.process_count() > 1:
        return distributed.executor()
    name = os.environ.get("SPMD_EXECUTOR", "stacked")
    executor = _EXECUTORS.get(name)
    if executor is None:
        from .executors import StackedExecutor, reference_executor
        if name == "reference":
            executor = reference_executor()
        elif name == "stacked":
            executor = StackedExecutor()
        else:
            raise ValueError(f"SPMD_EXECUTOR={name!r}; use 'stacked' or 'reference'.")
        _EXECUTORS[name] = executor
    return executor


class Lowered:
    def __init__(self, program, in_tree, out_tree):
        self.program = program
        self.in_tree = in_tree
        self.out_tree = out_tree

    def as_text(self) -> str:
        return str(self.program)


def _hashable_static(v, name):
    try:
        hash(v)
    except TypeError:
        raise TypeError(f"jit({name}): static argument {v!r} is not hashable; static arguments "
                        f"key the compilation cache, so pass a tuple instead of a list.") from None
    return v


class Jitted:
    def __init__(self, f, static_argnums=(), static_argnames=(), name=None, executor=None):
        self.f = f
        self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self.static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        self.name = name or getattr(f, "__qualname__", getattr(f, "__name__", "function"))
        self.executor = executor
        self._cache: dict = {}
        self._sharded = None         # the sharding compiler's view, made on first sharded call
        functools.update_wrapper(self, f)

    def _split(self, args, kwargs):
        static = tuple((i, _hashable_static(args[i], self.name)) for i in self.static_argnums if i < len(args))
        static_kw = tuple(sorted((k, _hashable_static(v, self.name)) for k, v in kwargs.items()
                                 if k in self.static_argnames))
        dyn_args = [a for i, a in enumerate(args) if i not in self.static_argnums]
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        return static, static_kw, dyn_args, dyn_kwargs

    def _program(self, args, kwargs):
        if self.static_argnums or self.static_argnames:
            static, static_kw, dyn_args, dyn_kwargs = self._split(args, kwargs)
        else:
            static, static_kw, dyn_args, dyn_kwargs = (), (), list(args), kwargs
        leaves, in_tree = optree.tree_flatten((dyn_args, dyn_kwargs), none_is_leaf=False)
        key = (in_tree, tuple(map(_signature, leaves)), static, static_kw)
        hit = self._cache.get(key)
        if hit is None:
            avals = tuple(aval_of(x) for x in leaves)
            out_box = []

            def flat_fn(*tracers):
                a, kw = optree.tree_unflatten(in_tree, list(tracers))
                full = list(a)
                for i, v in sorted(static):
                    full.insert(i, v)
                out = self.f(*full, **kw, **dict(static_kw))
                out_leaves, out_tree = optree.tree_flatten(out, none_is_leaf=False)
                out_box.append(out_tree)
                return out_leaves

            program, captured = trace(flat_fn, avals, context=f"jit({self.name})")
            assert not captured
            # values the function computed but does not return (the loss under spmd.grad) go
            program = dce(program)
            hit = self._cache[key] = (program, in_tree, out_box[0])
        return hit, leaves

    def __call__(self, *args, **kwargs):
        if current_builder() is not None:          # inside another trace: inline
            return self.f(*args, **kwargs)
        (program, in_tree, out_tree), leaves = self._program(args, kwargs)
        if _sharded_arguments(leaves) and not _has_shard_map(program):
            # sharded Arrays in: the sharding compiler follows their shardings (as jax.jit does)
            from .compiler.jit import ShardedJitted
            if self._sharded is None:
                self._sharded = ShardedJitted(self)
            return self._sharded(*args, **kwargs)
        executor = self.executor or _default_executor()
        leaves = [np.asarray(x) if type(x) in (bool, int, float, complex) else x for x in leaves]
        outs = executor.run(program, leaves)
        return optree.tree_unflatten(out_tree, [_as_array(o) for o in outs])

    def lower(self, *args, **kwargs) -> Lowered:
        (program, in_tree, out_tree), _ = self._program(args, kwargs)
        return Lowered(program, in_tree, out_tree)

    def _cache_size(self) -> int:
        return len(self._cache)


def _signature(x):
    """What the program traced for argument ``x`` depends on: its shape and dtype, or, for a
    Python scalar (weakly typed), its type."""
    t = type(x)
    if t is Array or t is np.ndarray or isinstance(x, np.generic):
        return x.shape, x.dtype
    if t in (bool, int, float, complex):
        return t
    return aval_of(x)


def _sharded_arguments(leaves) -> bool:
    return any(type(x) is Array and x.sharding.mesh.size > 1 and not x.sharding.is_fully_replicated
               for x in leaves)


def _has_shard_map(program) -> bool:
    return any(e.prim.name == "shard_map" for e in program.eqns)


def _as_array(x):
    if isinstance(x, Array):
        return x
    from .array import device_put
    return device_put(np.asarray(x))


def jit(f=None, *, in_shardings=None, out_shardings=None, donate_argnums=(), static_argnums=(),
        static_argnames=(), _name=None, executor=None):
    """Trace ``f`` once per argument types (and static arguments), cache the program, run it.

    With ``in_shardings`` / ``out_shardings`` / ``donate_argnums`` the sharding compiler
    (``spmd.compiler``) propagates shardings and inserts the collectives.

    >>> import numpy as np, spmd
    >>> double = spmd.jit(lambda x: 2 * x)
    >>> np.asarray(double(np.arange(3.)))
    array([0., 2., 4.])
    """
    if f is None:
        return functools.partial(jit, in_shardings=in_shardings, out_shardings=out_shardings,
                                 donate_argnums=donate_argnums, static_argnums=static_argnums,
                                 static_argnames=static_argnames, _name=_name, executor=executor)
    plain = Jitted(f, static_argnums, static_argnames, _name, executor)
    if in_shardings is None and out_shardings is None and not donate_argnums:
        return plain
    from .compiler.jit import ShardedJitted
    return ShardedJitted(plain, in_shardings, out_shardings, donate_argnums)


def make_program(f, *, static_argnums=()):
    """``make_program(f)(*args)`` returns the Program that ``f`` traces to (like make_jaxpr)."""
    def build(*args, **kwargs):
        return Jitted(f, static_argnums).lower(*args, **kwargs).program
    return build
