"""Named device meshes: ``Mesh``, ``make_mesh``, ``AbstractMesh``, ``AxisType`` and ``set_mesh``.

Every mesh axis has a type, as in JAX: **Explicit** (a value's sharding over it is part of its
type, and every op computes the output sharding by a rule at trace time), **Auto** (the
compiler chooses) or **Manual** (inside ``shard_map``: programs see per-device blocks).
``make_mesh`` makes Explicit axes unless told otherwise; ``Mesh(...)`` and ``AbstractMesh(...)``
make Auto ones.
"""
from __future__ import annotations

import contextvars
import enum
import functools
import math
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

from .devices import Device, devices as _all_devices
from .errors import MeshError
from .runtime import process_index

# How a Mesh draws itself in a notebook: filled by spmd.visualize at import (it sits above this
# module and draws with rich).  None: no HTML picture (the notebook shows the repr).
_html_renderer = None


def _check_axis_names(axis_names, where: str) -> tuple[str, ...]:
    if isinstance(axis_names, str):
        axis_names = (axis_names,)
    try:
        names = tuple(axis_names)
    except TypeError:
        raise MeshError(f"{where}: axis_names must be a sequence of strings, got {axis_names!r}.") from None
    for n in names:
        if not isinstance(n, str) or not n:
            raise MeshError(f"{where}: axis name {n!r} is not a non-empty string; mesh axes are "
                            f"named with strings such as 'data' or 'model'.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MeshError(f"{where}: duplicate axis name {dup[0]!r} in {names}; every mesh axis "
                        f"needs its own name.")
    return names


def _check_axis_sizes(shape, where: str) -> tuple[int, ...]:
    try:
        sizes = tuple(shape)
    except TypeError:
        raise MeshError(f"{where}: mesh shape must be a tuple of positive integers, got {shape!r}.") from None
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise MeshError(f"{where}: mesh axis size {s!r} in {sizes} is not a positive integer.")
    return tuple(int(s) for s in sizes)


class AxisType(enum.Enum):
    """How programs see a mesh axis (``jax.sharding.AxisType``)."""
    Auto = enum.auto()
    Explicit = enum.auto()
    Manual = enum.auto()

    def __repr__(self):
        return self.name

    __str__ = __repr__


def _check_axis_types(axis_types, names, default: AxisType, where: str) -> tuple[AxisType, ...]:
    """One AxisType per axis: ``None`` gives ``default`` to every axis, one AxisType is taken
    for all of them only when there is one axis (as JAX: otherwise the counts must match)."""
    if axis_types is None:
        return (default,) * len(names)
    types = (axis_types,) if isinstance(axis_types, AxisType) else tuple(axis_types)
    if len(types) != len(names):
        raise MeshError(f"{where}: {len(names)} axis names {names} but {len(types)} axis_types "
                        f"{types}; give one AxisType per axis, e.g. axis_types="
                        f"{(AxisType.Explicit,) * len(names)}.")
    for t in types:
        if not isinstance(t, AxisType):
            raise MeshError(f"{where}: axis type {t!r} is not an spmd.AxisType (Auto, Explicit "
                            f"or Manual).")
    return types


_CACHED = ("_identity", "explicit_axes", "auto_axes", "manual_axes", "abstract_mesh",
           "is_multi_process")


class AbstractMesh:
    """A mesh's shape, axis names and axis types without devices: enough for tracing and
    shard shapes (``jax.sharding.AbstractMesh``).  Axis types default to Auto."""

    def __init__(self, axis_sizes: Sequence[int], axis_names: Sequence[str], axis_types=None):
        self.axis_names = _check_axis_names(axis_names, "AbstractMesh")
        self.axis_sizes = _check_axis_sizes(axis_sizes, "AbstractMesh")
        if len(self.axis_names) != len(self.axis_sizes):
            raise MeshError(f"AbstractMesh: {len(self.axis_sizes)} sizes {self.axis_sizes} but "
                            f"{len(self.axis_names)} names {self.axis_names}.")
        self.axis_types = _check_axis_types(axis_types, self.axis_names, AxisType.Auto,
                                            type(self).__name__)

    @property
    def shape(self) -> "OrderedDict[str, int]":
        return OrderedDict(zip(self.axis_names, self.axis_sizes))

    @property
    def shape_tuple(self) -> tuple[tuple[str, int], ...]:
        return tuple(zip(self.axis_names, self.axis_sizes))

    @property
    def size(self) -> int:
        return math.prod(self.axis_sizes)

    @property
    def empty(self) -> bool:
        return not self.axis_names

    @property
    def abstract_mesh(self) -> "AbstractMesh":
        return self

    def _axes_of(self, kind: AxisType) -> tuple[str, ...]:
        return tuple(n for n, t in zip(self.axis_names, self.axis_types) if t is kind)

    # a mesh never changes after it is made: what every jit call asks of it is computed once
    explicit_axes = functools.cached_property(lambda self: self._axes_of(AxisType.Explicit))
    auto_axes = functools.cached_property(lambda self: self._axes_of(AxisType.Auto))
    manual_axes = functools.cached_property(lambda self: self._axes_of(AxisType.Manual))

    def axis_type(self, name: str) -> AxisType:
        self.axis_size(name)
        return self.axis_types[self.axis_names.index(name)]

    def update_axis_types(self, types: dict) -> "AbstractMesh":
        """This mesh's shape with the axes named in ``types`` ({name: AxisType}) retyped."""
        for n in types:
            self.axis_size(n)
        retyped = tuple(types.get(n, t) for n, t in zip(self.axis_names, self.axis_types))
        return AbstractMesh(self.axis_sizes, self.axis_names, retyped)

    def axis_size(self, name: str) -> int:
        try:
            return self.axis_sizes[self.axis_names.index(name)]
        except ValueError:
            raise MeshError(f"axis {name!r} is not in the mesh; its axes are {self.axis_names}.") from None

    def _key(self):
        return ("abstract", self.axis_names, self.axis_sizes, self.axis_types)

    @functools.cached_property
    def _identity(self) -> tuple:
        key = self._key()
        return key, hash(key)

    def __eq__(self, other):
        return other is self or (type(other) is type(self) and other._identity == self._identity)

    def __hash__(self):
        return self._identity[1]

    def __getstate__(self):            # the cached values are this process's (hashes are salted)
        return {k: v for k, v in self.__dict__.items() if k not in _CACHED}

    def _types_str(self) -> str:
        return f"axis_types={self.axis_types!r}"

    def __repr__(self):
        inner = ", ".join(f"{n!r}: {s}" for n, s in zip(self.axis_names, self.axis_sizes))
        return f"AbstractMesh({{{inner}}}, {self._types_str()})"

    def _ir_str(self) -> str:
        """The short form in printed programs: ``{data:2,model:4}``."""
        return "{" + ",".join(f"{n}:{s}" for n, s in zip(self.axis_names, self.axis_sizes)) + "}"


class Mesh(AbstractMesh):
    """An n-d array of devices with a name per axis.

    >>> import spmd
    >>> mesh = Mesh(np.array(spmd.devices()[:8]).reshape(2, 4), ("data", "model"))
    >>> dict(mesh.shape)
    {'data': 2, 'model': 4}
    """

    def __init__(self, devices: np.ndarray | Sequence[Device], axis_names: Sequence[str],
                 axis_types=None):
        names = _check_axis_names(axis_names, "Mesh")
        arr = np.empty(np.shape(np.asarray(devices, dtype=object)), dtype=object)
        arr[...] = np.asarray(devices, dtype=object)
        if arr.ndim != len(names):
            raise MeshError(f"Mesh: the device array has {arr.ndim} dims {arr.shape} but there are "
                            f"{len(names)} axis names {names}; give one name per dim.")
        flat = list(arr.flat)
        for d in flat:
            if not isinstance(d, Device):
                raise MeshError(f"Mesh: {d!r} is not a Device; build meshes from spmd.devices().")
        ids = [d.id for d in flat]
        if len(set(ids)) != len(ids):
            dup = next(d for d in flat if ids.count(d.id) > 1)
            raise MeshError(f"Mesh: device {dup!r} appears more than once; each device may hold one "
                            f"mesh position.")
        super().__init__(arr.shape, names, axis_types)
        arr.flags.writeable = False
        self.devices = arr
        self.device_ids = np.vectorize(lambda d: d.id, otypes=[np.int64])(arr) if arr.size else np.zeros(arr.shape, np.int64)

    # -- properties mirroring jax.sharding.Mesh --------------------------------------------
    @functools.cached_property
    def abstract_mesh(self) -> AbstractMesh:
        return AbstractMesh(self.axis_sizes, self.axis_names, self.axis_types)

    @property
    def device_list(self) -> list[Device]:
        return list(self.devices.flat)

    @property
    def local_devices(self) -> list[Device]:
        me = process_index()
        return [d for d in self.devices.flat if d.process_index == me]

    @functools.cached_property
    def platform(self) -> str:
        """The platform of the mesh's devices ("cpu", "gpu"; "none" for an empty mesh)."""
        return self.devices.flat[0].platform if self.size else "none"

    @functools.cached_property
    def is_multi_process(self) -> bool:
        return len({d.process_index for d in self.devices.flat}) > 1

    def device_coords(self, device: Device) -> tuple[int, ...]:
        pos = np.argwhere(self.device_ids == device.id)
        if not len(pos):
            raise MeshError(f"{device!r} is not in {self!r}.")
        return tuple(int(i) for i in pos[0])

    def submesh(self, axis_names: str | Iterable[str], **at: int) -> "Mesh":
        """The mesh over ``axis_names`` (in mesh order) at fixed coordinates of the other axes.

        ``mesh.submesh("model", data=1)`` is the row of devices with data index 1.
        """
        keep = _check_axis_names(axis_names, "Mesh.submesh")
        for n in list(keep) + list(at):
            self.axis_size(n)
        index = []
        for n, s in zip(self.axis_names, self.axis_sizes):
            if n in keep:
                if n in at:
                    raise MeshError(f"Mesh.submesh: axis {n!r} is both kept and fixed at {at[n]}.")
                index.append(slice(None))
            else:
                i = at.get(n, 0)
                if not isinstance(i, (int, np.integer)) or not 0 <= i < s:
                    raise MeshError(f"Mesh.submesh: index {i!r} for axis {n!r} is outside 0..{s - 1}.")
                index.append(int(i))
        kept = tuple(n for n in self.axis_names if n in keep)
        return Mesh(self.devices[tuple(index)], kept, tuple(self.axis_type(n) for n in kept))

    def __enter__(self):
        self._ctx = set_mesh(self)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def _key(self):
        return ("mesh", self.axis_names, self.device_ids.shape, tuple(self.device_ids.flat),
                self.axis_types)

    def __repr__(self):
        inner = ", ".join(f"{n!r}: {s}" for n, s in zip(self.axis_names, self.axis_sizes))
        return f"Mesh({{{inner}}}, {self.size} {self.platform} devices, {self._types_str()})"

    def _repr_html_(self):
        return None if _html_renderer is None else _html_renderer(self)


def make_mesh(axis_shapes: Sequence[int], axis_names: Sequence[str], axis_types=None, *,
              devices: Sequence[Device] | None = None) -> Mesh:
    """A mesh of the given shape over the first ``prod(axis_shapes)`` of ``devices`` (default:
    all devices), with Explicit axes unless ``axis_types`` says otherwise (as JAX's).

    >>> mesh = make_mesh((2, 4), ("data", "model"))
    >>> dict(mesh.shape), mesh.axis_types
    ({'data': 2, 'model': 4}, (Explicit, Explicit))
    >>> make_mesh((4,), ("x",)).device_ids.tolist()
    [0, 1, 2, 3]
    """
    names = _check_axis_names(axis_names, "make_mesh")
    sizes = _check_axis_sizes(axis_shapes, "make_mesh")
    if len(names) != len(sizes):
        raise MeshError(f"make_mesh: axis_shapes {sizes} has {len(sizes)} entries but axis_names "
                        f"{names} has {len(names)}.")
    types = _check_axis_types(axis_types, names, AxisType.Explicit, "make_mesh")
    devs = list(_all_devices() if devices is None else devices)
    if math.prod(sizes) > len(devs):
        hint = (" Set SPMD_NUM_CPU_DEVICES to change the number of simulated devices, or make a "
                "smaller mesh.")
        raise MeshError(f"make_mesh: mesh shape {sizes} needs {math.prod(sizes)} devices but "
                        f"{len(devs)} were given.{hint}")
    arr = np.empty(math.prod(sizes), dtype=object)
    arr[:] = devs[:math.prod(sizes)]
    return Mesh(arr.reshape(sizes), names, types)


_current_mesh: contextvars.ContextVar[AbstractMesh | None] = contextvars.ContextVar("spmd_mesh", default=None)


class set_mesh:
    """Make ``mesh`` the default for shard_map, jit and bare ``P`` specs: for the rest of the
    program (``spmd.set_mesh(mesh)``) or, as a context manager, for a block
    (``with spmd.set_mesh(mesh):``), as ``jax.set_mesh``."""

    def __init__(self, mesh: AbstractMesh):
        if not isinstance(mesh, AbstractMesh):
            raise MeshError(f"set_mesh expects a Mesh, got {type(mesh).__name__} {mesh!r}.")
        self.mesh = mesh
        self._token = _current_mesh.set(mesh)

    def __enter__(self):
        return self.mesh

    def __exit__(self, *exc):
        _current_mesh.reset(self._token)


def get_mesh() -> AbstractMesh | None:
    """The mesh of the innermost ``set_mesh``, or None."""
    return _current_mesh.get()
