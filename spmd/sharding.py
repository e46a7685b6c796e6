"""``PartitionSpec`` and ``NamedSharding``: how an array's dims map onto mesh axes.

Uneven dims are allowed: a dim of size ``d`` split ``n`` ways has blocks of ``ceil(d / n)``;
trailing blocks are shorter or empty.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from .errors import ShardingError


class ShardingAssertionError(ShardingError, AssertionError):
    """``with_sharding_constraint`` on all-Explicit axes found another sharding (JAX raises an
    AssertionError there; this is both)."""
from .mesh import AbstractMesh, Mesh, get_mesh


def _entry_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


class PartitionSpec(tuple):
    """One entry per array dim: ``None``, a mesh-axis name, or a tuple of names (major first);
    as JAX's, ``unreduced=`` names mesh axes over which the value is a sum still pending (each
    device holds a part) and ``reduced=`` axes over which it is already summed.

    >>> PartitionSpec("data", None)
    P('data', None)
    >>> PartitionSpec(None, unreduced={"model"})
    P(None, unreduced={'model'})
    """

    def __new__(cls, *entries, unreduced=frozenset(), reduced=frozenset()):
        # a list of names is the tuple of them (JAX: ``P(['x', 'y']) == P(('x', 'y'))``)
        entries = tuple(tuple(e) if isinstance(e, list) and all(isinstance(a, str) for a in e)
                        else e for e in entries)
        for e in entries:
            ok = e is None or isinstance(e, str) or (
                isinstance(e, tuple) and all(isinstance(a, str) for a in e))
            if not ok:
                raise ShardingError(
                    f"PartitionSpec entry {e!r} is not None, an axis name or a tuple of axis names.")
        self = super().__new__(cls, entries)
        for name, axes in (("unreduced", unreduced), ("reduced", reduced)):
            axes = frozenset((axes,) if isinstance(axes, str) else axes)
            if not all(isinstance(a, str) for a in axes):
                raise ShardingError(f"PartitionSpec {name}={set(axes)!r}: give a set of mesh "
                                    f"axis names.")
            setattr(self, name, axes)
        if self.unreduced & self.reduced:
            raise ShardingError(f"PartitionSpec: axes {sorted(self.unreduced & self.reduced)} are "
                                f"both unreduced and reduced.")
        return self

    def __repr__(self):
        extra = [f"{k}={set(sorted(getattr(self, k)))!r}" for k in ("unreduced", "reduced")
                 if getattr(self, k)]
        return "P(" + ", ".join([repr(e) for e in self] + extra) + ")"

    __str__ = __repr__

    def _ir_str(self) -> str:
        """The short form in printed programs: ``P(data,None)``, ``P((data,model),)``."""
        def entry(e):
            if isinstance(e, tuple):
                return "(" + ",".join(map(str, e)) + ("," if len(e) == 1 else "") + ")"
            return str(e)
        return "P(" + ",".join(entry(e) for e in self) + ")"

    @property
    def partitions(self) -> tuple:
        """The entries, one per dim (JAX's name; unreduced and reduced axes are apart)."""
        return tuple(self)

    # a spec never changes after it is made: its axes and identity are computed once (every
    # jit call hashes and compares the specs of its arguments)
    @functools.cached_property
    def axes(self) -> tuple[tuple[str, ...], ...]:
        """The mesh axes of each entry, as tuples."""
        return tuple(_entry_axes(e) for e in self)

    def _normalized(self) -> tuple[tuple[str, ...], ...]:
        axes = list(self.axes)
        while axes and not axes[-1]:
            axes.pop()
        return tuple(axes)

    @functools.cached_property
    def _identity(self) -> tuple:
        key = (self._normalized(), self.unreduced, self.reduced)
        return key, hash(key)

    def __eq__(self, other):
        if other is self:
            return True
        if isinstance(other, PartitionSpec):
            return self._identity == other._identity
        return tuple.__eq__(self, other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return self._identity[1]

    def __reduce__(self):
        return (_spec, (tuple(self), self.unreduced, self.reduced))


P = PartitionSpec


def _spec(entries, unreduced, reduced):
    return PartitionSpec(*entries, unreduced=unreduced, reduced=reduced)

# How a NamedSharding draws itself in a notebook: filled by spmd.visualize at import (it sits
# above this module and draws with rich).
_pictures: dict = {}


def check_spec(spec: PartitionSpec, mesh: AbstractMesh, ndim: int | None = None, *, what: str = "spec"):
    """Raise a ShardingError naming ``what`` if ``spec`` does not fit ``mesh`` (and rank ``ndim``)."""
    if not isinstance(spec, PartitionSpec):
        raise ShardingError(f"{what}: expected a PartitionSpec (spmd.P), got {type(spec).__name__} {spec!r}.")
    seen: dict[str, int] = {}
    for dim, axes in enumerate(spec.axes):
        for a in axes:
            if a not in mesh.axis_names:
                raise ShardingError(f"{what}: {spec} names mesh axis {a!r}, which is not in the mesh; "
                                    f"its axes are {mesh.axis_names}.")
            if a in seen:
                raise ShardingError(f"{what}: {spec} uses mesh axis {a!r} twice (dims {seen[a]} and "
                                    f"{dim}); an axis can split only one dim.")
            seen[a] = dim
    for a in sorted(spec.unreduced | spec.reduced):
        if a not in mesh.axis_names or a in seen:
            raise ShardingError(f"{what}: {spec} names mesh axis {a!r} as unreduced or reduced; "
                                f"it must be an axis of the mesh {mesh.axis_names} that splits "
                                f"no dim.")
    if ndim is not None and len(spec) > ndim:
        raise ShardingError(f"{what}: {spec} has {len(spec)} entries but the array has rank {ndim}; "
                            f"give at most one entry per dim.")


def block_size(dim: int, parts: int) -> int:
    return -(-dim // parts) if dim else 0


def shard_range(dim: int, parts: int, i: int) -> tuple[int, int]:
    """[start, stop) of block ``i`` of a dim of size ``dim`` split ``parts`` ways."""
    b = block_size(dim, parts)
    return min(i * b, dim), min((i + 1) * b, dim)


class NamedSharding:
    """A mesh and a PartitionSpec.

    >>> from spmd import make_mesh
    >>> s = NamedSharding(make_mesh((2, 4), ("data", "model")), P("data"))
    >>> s.shard_shape((8, 6))
    (4, 6)
    """

    def __init__(self, mesh: AbstractMesh, spec: PartitionSpec = PartitionSpec(), *, memory_kind=None):
        if not isinstance(mesh, AbstractMesh):
            raise ShardingError(f"NamedSharding: first argument must be a Mesh, got {type(mesh).__name__}.")
        if isinstance(spec, tuple) and not isinstance(spec, PartitionSpec):
            spec = PartitionSpec(*spec)
        check_spec(spec, mesh, what="NamedSharding")
        self.mesh = mesh
        self.spec = spec
        self.memory_kind = memory_kind

    # -- geometry ----------------------------------------------------------------------------
    def _dim_axes(self, ndim: int) -> tuple[tuple[str, ...], ...]:
        known = self.__dict__.setdefault("_dims", {})       # a sharding never changes
        axes = known.get(ndim)
        if axes is None:
            check_spec(self.spec, self.mesh, ndim, what=f"NamedSharding(mesh, {self.spec})")
            axes = known[ndim] = self.spec.axes + ((),) * (ndim - len(self.spec.axes))
        return axes

    def num_parts(self, ndim: int) -> tuple[int, ...]:
        return tuple(math.prod(self.mesh.axis_size(a) for a in ax) for ax in self._dim_axes(ndim))

    def shard_shape(self, global_shape) -> tuple[int, ...]:
        """The shape of the largest block (all blocks, when the dims divide evenly)."""
        shape = tuple(global_shape)
        return tuple(block_size(d, n) for d, n in zip(shape, self.num_parts(len(shape))))

    def _dim_position(self, coords: dict[str, int], axes: tuple[str, ...]) -> int:
        pos = 0
        for a in axes:
            pos = pos * self.mesh.axis_size(a) + coords[a]
        return pos

    def index_at(self, coords: dict[str, int], global_shape) -> tuple[slice, ...]:
        """The block of ``global_shape`` held at mesh coordinates ``coords``."""
        shape = tuple(global_shape)
        out = []
        for d, axes, n in zip(shape, self._dim_axes(len(shape)), self.num_parts(len(shape))):
            if n == 1:  # as JAX: a dim split one way (no axes, or only size-1 axes) is slice(None)
                out.append(slice(None))
            else:
                out.append(slice(*shard_range(d, n, self._dim_position(coords, axes))))
        return tuple(out)

    def devices_indices_map(self, global_shape) -> dict:
        """Device -> tuple of slices it holds (the meaning of JAX's method of the same name)."""
        mesh = self._concrete_mesh("devices_indices_map")
        return {dev: self.index_at(dict(zip(mesh.axis_names, idx)), global_shape)
                for idx, dev in np.ndenumerate(mesh.devices)}

    def _concrete_mesh(self, what: str) -> Mesh:
        if not isinstance(self.mesh, Mesh):
            raise ShardingError(
                f"{what} needs a Mesh with devices; this sharding has {self.mesh!r} (axis names "
                f"and sizes only), as the outputs of shard_map(mesh=mesh.abstract_mesh) have "
                f"when no argument or `with spmd.set_mesh(mesh):` gave a concrete mesh of that "
                f"shape. Pass the concrete mesh (mesh=mesh), device_put the arguments onto it, "
                f"or call inside `with spmd.set_mesh(mesh):`.")
        return self.mesh

    @property
    def device_set(self) -> set:
        return set(self._concrete_mesh("device_set").devices.flat)

    @property
    def addressable_devices(self) -> set:
        return set(self._concrete_mesh("addressable_devices").local_devices)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def is_fully_replicated(self) -> bool:
        return all(self.mesh.axis_size(a) == 1 for ax in self.spec.axes for a in ax)

    @property
    def is_fully_addressable(self) -> bool:
        return not getattr(self.mesh, "is_multi_process", False)

    def replica_axes(self) -> tuple[str, ...]:
        used = {a for ax in self.spec.axes for a in ax}
        return tuple(a for a in self.mesh.axis_names if a not in used)

    def with_spec(self, spec) -> "NamedSharding":
        return NamedSharding(self.mesh, spec if isinstance(spec, PartitionSpec) else PartitionSpec(*spec))

    def is_equivalent_to(self, other, ndim: int) -> bool:
        return (isinstance(other, NamedSharding) and other.mesh == self.mesh
                and self._dim_axes(ndim) == other._dim_axes(ndim))

    def __eq__(self, other):
        return other is self or (isinstance(other, NamedSharding) and other.mesh == self.mesh
                                 and other.spec == self.spec)

    def __hash__(self):
        h = self.__dict__.get("_hash")
        if h is None:
            h = self._hash = hash((self.mesh, self.spec))
        return h

    def __getstate__(self):            # the cached values are this process's (hashes are salted)
        return {k: v for k, v in self.__dict__.items() if k not in ("_hash", "_dims", "_types")}

    def __repr__(self):
        return f"NamedSharding(mesh={self.mesh!r}, spec={self.spec!r})"

    def _repr_html_(self):
        return _pictures["html"](self)


def spec_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def sharding_type(s: NamedSharding, ndim: int) -> NamedSharding | None:
    """The sharding a value laid out by ``s`` carries in its type (JAX's sharding in types): on
    the abstract mesh, one spec entry per dim, Explicit axes only (Auto axes are the
    compiler's to choose, Manual ones are per-device); None when the mesh has no Explicit axis.

    >>> from spmd import make_mesh
    >>> sharding_type(NamedSharding(make_mesh((2, 4), ("x", "y")), P("x")), 2).spec
    P('x', None)
    """
    cache = s.__dict__.setdefault("_types", {})     # every jit call asks, per argument
    if ndim not in cache:
        explicit = s.mesh.explicit_axes
        dims = (tuple(a for a in ax if a in explicit) for ax in s._dim_axes(ndim))
        cache[ndim] = None if not explicit else NamedSharding(s.mesh.abstract_mesh, PartitionSpec(
            *map(spec_entry, dims), unreduced=s.spec.unreduced & set(explicit),
            reduced=s.spec.reduced & set(explicit)))
    return cache[ndim]


def as_sharding(s: Any, *, what: str) -> NamedSharding:
    """A NamedSharding from a NamedSharding, or a bare P under ``with set_mesh(mesh):``."""
    if isinstance(s, NamedSharding):
        return s
    if isinstance(s, PartitionSpec):
        mesh = get_mesh()
        if mesh is None:
            raise ShardingError(f"{what}: got the bare spec {s}, which needs a mesh; wrap it as "
                                f"NamedSharding(mesh, {s}) or call inside `with spmd.set_mesh(mesh):`.")
        return NamedSharding(mesh, s)
    raise ShardingError(f"{what}: expected a NamedSharding or PartitionSpec, got "
                        f"{type(s).__name__} {s!r}.")
