"""Sharding in types (JAX's Explicit axes): ``typeof``, ``reshard``, ``get_abstract_mesh``,
``auto_axes`` and ``explicit_axes``.

On a mesh whose axes are Explicit (``make_mesh``'s default), a value's sharding is part of its
type and every op computes its output's by a rule (``spmd.sharding_rules``); data moves only
where the program says so, with ``reshard`` or an op's ``out_sharding=``.

>>> import numpy as np, spmd
>>> from spmd import P
>>> mesh = spmd.make_mesh((2, 4), ("X", "Y"))
>>> x = spmd.device_put(np.zeros((8, 4), np.float32), spmd.NamedSharding(mesh, P("X", "Y")))
>>> print(spmd.typeof(x))
float32[8@X,4@Y]
>>> spmd.typeof(x).sharding.spec
P('X', 'Y')
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import optree

from .array import Array, reshard as _reshard_array
from .core import Aval, Tracer, axes_str, aval_of, current_builder
from .errors import ShardingError
from .jit import constrain, jit
from .mesh import AbstractMesh, AxisType, Mesh, get_mesh, set_mesh
from .sharding import NamedSharding, PartitionSpec, as_sharding


@dataclasses.dataclass(frozen=True)
class ManualAxisType:
    """How a value inside ``shard_map`` relates to the Manual mesh axes: the axes it varies
    over, and those over which it is a pending sum (``unreduced``) or a reduced copy."""
    varying: frozenset = frozenset()
    unreduced: frozenset = frozenset()
    reduced: frozenset = frozenset()


class ShapedArray:
    """A value's type as ``spmd.typeof`` gives it: shape, dtype and sharding, printed as JAX
    prints them (``float32[8@X,4]``; inside ``shard_map`` ``float32[2]{V:i}``)."""

    def __init__(self, aval: Aval, sharding: NamedSharding):
        self.shape, self.dtype, self.weak_type = aval.shape, np.dtype(aval.dtype), aval.weak
        self.sharding = sharding
        self.manual_axis_type = ManualAxisType(frozenset(aval.vma), frozenset(aval.unreduced),
                                               frozenset(aval.reduced))
        self._aval = aval

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    vma = property(lambda self: self.manual_axis_type.varying)
    mat = property(lambda self: self.manual_axis_type)

    def str_short(self) -> str:
        """JAX's printed type: ``float32[8@X,4]{V:i, U:(j,k), R:l}`` (Manual and Explicit
        unreduced and reduced axes together, in mesh order)."""
        mat, spec, order = self.manual_axis_type, self.sharding.spec, self.sharding.mesh.axis_names
        parts = [f"{tag}:{axes_str([a for a in order if a in axes])}" for tag, axes in (
            ("V", mat.varying), ("U", mat.unreduced | spec.unreduced),
            ("R", mat.reduced | spec.reduced)) if axes]
        states = "{" + ", ".join(parts) + "}" if parts else ""
        return f"{self.dtype.name}[{self._aval.dims_str()}]{states}"

    __str__ = str_short

    def __repr__(self):
        return f"ShapedArray({self.str_short()})"

    def __eq__(self, other):
        return (isinstance(other, ShapedArray) and self._aval.update(weak=False)
                == other._aval.update(weak=False) and self.sharding == other.sharding)

    def __hash__(self):
        return hash((self._aval.update(weak=False), self.sharding))


_EMPTY = AbstractMesh((), ())


def get_abstract_mesh() -> AbstractMesh:
    """The abstract mesh of the innermost ``set_mesh`` (an empty one when none is set), as
    ``jax.sharding.get_abstract_mesh``; inside ``shard_map`` its mesh, with the axes the body
    sees per device typed Manual."""
    b = current_builder()
    while b is not None and not b.manual_axes:
        b = b.parent
    if b is not None and b.mesh is not None:
        return b.mesh.abstract_mesh.update_axis_types({a: AxisType.Manual for a in b.manual_axes})
    mesh = get_mesh()
    return _EMPTY if mesh is None else mesh.abstract_mesh


def typeof(x) -> ShapedArray:
    """The type of ``x`` (an Array, a traced value, a NumPy array or scalar), as
    ``jax.typeof``: shape, dtype, sharding, and inside ``shard_map`` the Manual axes it varies
    over."""
    aval = aval_of(x)
    if aval.sharding is not None:
        return ShapedArray(aval, aval.sharding)
    mesh = x.sharding.mesh.abstract_mesh if isinstance(x, Array) else get_abstract_mesh()
    return ShapedArray(aval, NamedSharding(mesh, PartitionSpec(*[None] * aval.ndim)))


def reshard(x, sharding):
    """``x`` (a pytree) laid out by ``sharding`` (a NamedSharding, or a bare P under
    ``set_mesh``), as ``jax.sharding.reshard``: inside a traced function the new sharding is
    the value's type on Explicit axes and the redistribution planner moves the data; outside
    it is ``device_put``'s resharding."""
    def one(leaf, target):
        ns = as_sharding(target, what="reshard")
        if not isinstance(leaf, Tracer):
            return _reshard_array(leaf, ns)
        if leaf.aval.vma:
            raise ShardingError(f"reshard inside shard_map: the value {leaf.aval} varies over the "
                                f"Manual axes {sorted(leaf.aval.vma)}; reshard before the "
                                f"shard_map or move data with collectives inside it.")
        return constrain(leaf, ns, "reshard")
    leaves, tree = optree.tree_flatten(x)      # no tree_map: equations point at the caller's line
    targets = ([sharding] * len(leaves) if isinstance(sharding, (NamedSharding, PartitionSpec))
               else tree.flatten_up_to(sharding))
    return optree.tree_unflatten(tree, [one(leaf, t) for leaf, t in zip(leaves, targets)])


def _retyped_mesh(what: str, axes, kind: AxisType, args):
    """The context mesh (else the mesh of the first typed argument) and the same mesh with
    ``axes`` (default: all) typed ``kind``; None when there is no mesh to retype."""
    mesh = get_mesh()
    if mesh is None:
        typed = [x.aval.sharding for x in optree.tree_leaves(args)
                 if isinstance(x, Tracer) and x.aval.sharding is not None]
        mesh = typed[0].mesh if typed else None
    if mesh is None:
        return None, None
    axes = mesh.axis_names if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for a in axes:
        if a not in mesh.axis_names:
            raise ShardingError(f"{what}: axes names {a!r}, which is not an axis of the mesh "
                                f"{mesh.axis_names}.")
    types = tuple(kind if n in axes else t for n, t in zip(mesh.axis_names, mesh.axis_types))
    new = (Mesh(mesh.devices, mesh.axis_names, types) if isinstance(mesh, Mesh)
           else AbstractMesh(mesh.axis_sizes, mesh.axis_names, types))
    return mesh, new


def _on(mesh, x) -> NamedSharding:
    """``x``'s sharding type, on ``mesh`` (the same axes, retyped)."""
    return NamedSharding(mesh, typeof(x).sharding.spec)


def _traced(fun, *args, **kwargs):
    """``fun(*args, **kwargs)`` inside a traced function: outside one, as one compiled call."""
    if current_builder() is not None:
        return fun(*args, **kwargs)
    return jit(lambda *a: fun(*a, **kwargs), _name=getattr(fun, "__name__", "function"))(*args)


def auto_axes(f=None, /, *, axes=None, out_sharding=None):
    """``f`` with mesh ``axes`` (default: all) Auto inside (the compiler chooses its layouts
    there; no sharding types, no ambiguity errors), its result resharded to ``out_sharding``
    on the outer mesh, as ``jax.sharding.auto_axes``.  Used as a decorator or a call."""
    if f is None:
        return lambda g: auto_axes(g, axes=axes, out_sharding=out_sharding)

    @functools.wraps(f)
    def call(*args, **kwargs):
        target = kwargs.pop("out_sharding", out_sharding)
        if target is None:
            raise TypeError(f"auto_axes({f.__name__}): missing the keyword argument "
                            f"out_sharding, the sharding of the result on the outer mesh.")

        def inside(*args):
            outer, new = _retyped_mesh(f"auto_axes({f.__name__})", axes, AxisType.Auto, args)
            if outer is None:
                return f(*args, **kwargs)
            with set_mesh(new):
                args = optree.tree_map(lambda x: reshard(x, _on(new, x)) if isinstance(x, Tracer)
                                       else x, args)
                out = f(*args, **kwargs)
            with set_mesh(outer):
                return reshard(out, target)
        return _traced(inside, *args)
    return call


def explicit_axes(f=None, /, *, axes=None, in_sharding=None):
    """``f`` with mesh ``axes`` (default: all) Explicit inside, its arguments resharded to
    ``in_sharding`` (their types there), its result back on the outer mesh's Auto axes, as
    ``jax.sharding.explicit_axes``.  Needs ``set_mesh``."""
    if f is None:
        return lambda g: explicit_axes(g, axes=axes, in_sharding=in_sharding)

    @functools.wraps(f)
    def call(*args, **kwargs):
        target = kwargs.pop("in_sharding", in_sharding)
        if target is None:
            raise TypeError(f"explicit_axes({f.__name__}): missing the keyword argument "
                            f"in_sharding, the shardings (types) of the arguments inside.")
        if get_mesh() is None:
            raise ShardingError(f"explicit_axes({f.__name__}) needs a mesh: call it inside "
                                f"`with spmd.set_mesh(mesh):`.")

        def inside(*args):
            outer, new = _retyped_mesh(f"explicit_axes({f.__name__})", axes, AxisType.Explicit, ())
            with set_mesh(new):
                out = f(*reshard(args, target), **kwargs)
            return optree.tree_map(lambda o: reshard(o, _on(outer, o)) if isinstance(o, Tracer)
                                   else o, out)
        return _traced(inside, *args)
    return call
