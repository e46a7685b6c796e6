"""``Array``: a global array laid out over a mesh, and ``device_put`` / ``reshard``.

On the simulated mesh the storage is the stacked layout (``spmd.layout``): one array with a
dim per mesh axis (size 1 where the array is replicated over it) followed by the block shape.
For evenly divided dims the storage is a view of the host array, so ``device_put`` copies
nothing.  Uneven dims are padded at the end of each dim; shards report the true data.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_dtypes
import numpy as np
import optree

from . import core, layout, numpy as spmd_numpy
from .core import hooks
from .devices import Device, local_devices
from .errors import ShardingError
from .mesh import Mesh
from .sharding import NamedSharding, PartitionSpec, as_sharding, check_spec
from .visualize import visualize_sharding

SUPPORTED_DTYPES = tuple(np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.complex64, np.complex128))


def check_dtype(dtype, what: str) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{what}: dtype {dt} is not supported; use one of {names}.")
    return dt


@dataclasses.dataclass(frozen=True)
class Shard:
    """The block of a global array held by one device."""
    device: Device
    index: tuple[slice, ...]
    data: np.ndarray
    replica_id: int = 0


class Array(layout.GlobalValue):
    """A global array sharded over a mesh.  ``np.asarray(a)`` gathers it."""

    # -- basic properties ------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d spmd.Array")
        return self.shape[0]

    @property
    def is_fully_replicated(self) -> bool:
        return self.sharding.is_fully_replicated

    @property
    def is_fully_addressable(self) -> bool:
        return self.sharding.is_fully_addressable

    def devices(self) -> set:
        return self.sharding.device_set

    def block_until_ready(self):
        if self.is_deleted():
            raise RuntimeError(layout._DELETED)
        return self

    # -- shards ------------------------------------------------------------------------------
    @property
    def addressable_shards(self) -> list[Shard]:
        mesh = self.sharding._concrete_mesh("Array.addressable_shards")
        local = {d.id for d in mesh.local_devices}
        out = []
        replicas: dict[tuple, int] = {}
        for mesh_index, dev in np.ndenumerate(mesh.devices):
            if dev.id not in local:
                continue
            coords = dict(zip(mesh.axis_names, mesh_index))
            index = self.sharding.index_at(coords, self.shape)
            block = self._block_at(mesh_index)
            true = tuple(slice(0, len(range(*s.indices(d)))) for s, d in zip(index, self.shape))
            key = tuple((s.start, s.stop) for s in index)
            rid = replicas.get(key, 0)
            replicas[key] = rid + 1
            out.append(Shard(dev, index, block[true + (Ellipsis,)], rid))
        return out

    def addressable_data(self, index: int):
        """The data of addressable shard ``index`` (``addressable_shards[index].data``)."""
        return self.addressable_shards[index].data

    # -- conversion ----------------------------------------------------------------------------
    def _single_device_data(self, what: str):
        if len(self.sharding.device_set) != 1:
            raise BufferError(f"{what}: this spmd.Array is laid out over "
                              f"{len(self.sharding.device_set)} devices; DLPack exchanges one "
                              f"device's data: use x.addressable_shards[i].data (or "
                              f"x.addressable_data(i)), or np.asarray(x) for the whole array.")
        return self.addressable_shards[0].data

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """The data of a single-device array, without a copy (DLPack)."""
        data = self._single_device_data("__dlpack__")
        kw = {k: v for k, v in dict(stream=stream, max_version=max_version, dl_device=dl_device,
                                    copy=copy).items() if v is not None}
        return data.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._single_device_data("__dlpack_device__").__dlpack_device__()

    def __array_namespace__(self, api_version=None):
        return spmd_numpy

    # -- eager NumPy on sharded arrays: one op at a time through the sharding compiler --------
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return hooks.eager.array_ufunc(self, ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return hooks.eager.array_function(self, func, types, args, kwargs)

    def __getitem__(self, key):
        return hooks.eager.getitem(self, key)

    def __bool__(self):
        return bool(self._gather())

    def __float__(self):
        return float(self._gather())

    def __int__(self):
        return int(self._gather())

    def item(self):
        return self._gather().item()

    def tolist(self):
        return self._gather().tolist()

    __hash__ = object.__hash__

    def __repr__(self):
        if self._blocks is not None and not self.is_fully_replicated:
            return (f"Array(shape={self.shape}, dtype={self.dtype}, sharding={self.sharding.spec}, "
                    f"{len(self._blocks)} addressable shard(s) of a multi-process mesh)")
        body = np.array2string(self._gather(), separator=", ", prefix="Array(", threshold=64)
        return f"Array({body}, dtype={self.dtype}, sharding={self.sharding.spec})"

    def _repr_html_(self):
        return visualize_sharding(self, _html=True)


def _host_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (bool, int, float, complex, np.generic, list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as e:
            raise TypeError(f"{what}: cannot make an array of {type(x).__name__} ({e}).") from None
    elif hasattr(x, "__array__") or hasattr(x, "__dlpack__"):
        arr = np.asarray(x)
    else:
        raise TypeError(f"{what}: expected an array (numpy array, spmd.Array, scalar or nested "
                        f"list), got {type(x).__name__}.")
    if arr.dtype == object:
        raise TypeError(f"{what}: object arrays cannot be placed on devices; convert to a numeric "
                        f"dtype first (for example np.asarray(x, dtype=np.float32)).")
    check_dtype(arr.dtype, what)
    return arr


def device_put(x: Any, device_or_sharding: NamedSharding | PartitionSpec | Device | None = None) -> Array:
    """Place ``x`` on devices with the given sharding (default: replicated on device 0).

    Works on pytrees of arrays, with a single sharding or a matching pytree of shardings.
    ``device_put`` of an ``Array`` re-shards it.
    """
    leaves, tree = optree.tree_flatten(x, none_is_leaf=False)
    if isinstance(device_or_sharding, (NamedSharding, PartitionSpec, Device)) or device_or_sharding is None:
        shardings = [device_or_sharding] * len(leaves)
    else:
        try:
            shardings = tree.flatten_up_to(device_or_sharding)
        except (ValueError, TypeError) as e:
            raise ShardingError(f"device_put: the shardings {device_or_sharding!r} do not match the "
                                f"structure of the arguments ({e}); give one sharding, or a pytree "
                                f"of shardings shaped like the arguments.") from None
    out = [_device_put_one(leaf, s) for leaf, s in zip(leaves, shardings)]
    return optree.tree_unflatten(tree, out) if tree.num_leaves != 1 or not tree.is_leaf() else out[0]


def device_get(x):
    """``x`` (a pytree) with every ``Array`` gathered into a NumPy array on the host."""
    return optree.tree_map(lambda a: np.asarray(a) if isinstance(a, Array) else a, x,
                           none_is_leaf=False)


def block_until_ready(x):
    """Wait for every ``Array`` in the pytree ``x`` (spmd computes eagerly: they are ready, or
    deleted, which is an error); returns ``x``."""
    for leaf in optree.tree_leaves(x, none_is_leaf=False):
        if isinstance(leaf, Array):
            leaf.block_until_ready()
    return x


def _device_put_one(x, s) -> Array:
    if s is None or isinstance(s, Device):
        dev = s if s is not None else local_devices()[0]
        arr = np.empty((1,), dtype=object)
        arr[0] = dev
        s = NamedSharding(Mesh(arr, ("_device",)), PartitionSpec())
    sharding = as_sharding(s, what="device_put")
    if isinstance(x, Array):
        if x.sharding == sharding or x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return reshard(x, sharding)
    host = _host_array(x, "device_put")
    check_spec(sharding.spec, sharding.mesh, host.ndim, what=f"device_put with {sharding.spec}")
    _check_concrete(sharding, "device_put")
    if not sharding.is_fully_addressable:
        # Every process passes the same global value and keeps its own blocks of it.
        return make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return Array.from_host(host, sharding)


def make_array_from_callback(shape, sharding, data_callback):
    """The global array of ``shape`` whose block at index ``idx`` is ``data_callback(idx)``;
    the callback is called only for this process's devices (as ``jax.make_array_from_callback``)."""
    sharding = as_sharding(sharding, what="make_array_from_callback")
    shape = tuple(int(d) for d in shape)
    mesh = sharding.mesh
    local = {d.id for d in mesh.local_devices}
    blocks = {}
    for pos, dev in enumerate(mesh.devices.flat):
        if dev.id in local:
            coords = dict(zip(mesh.axis_names, np.unravel_index(pos, mesh.axis_sizes)))
            blocks[pos] = np.asarray(data_callback(sharding.index_at(coords, shape)))
    return Array.from_blocks(blocks, shape, sharding)


def _check_concrete(sharding: NamedSharding, what: str):
    if not isinstance(sharding.mesh, Mesh):
        raise ShardingError(f"{what} needs a Mesh with devices, but {sharding.spec} is on "
                            f"{sharding.mesh!r}; build the sharding on spmd.make_mesh(...).")


def reshard(x: Array, sharding: NamedSharding | PartitionSpec) -> Array:
    """``x`` with a new sharding (on the same or another mesh)."""
    sharding = as_sharding(sharding, what="reshard")
    if not isinstance(x, Array):
        return device_put(x, sharding)
    check_spec(sharding.spec, sharding.mesh, x.ndim, what=f"reshard to {sharding.spec}")
    _check_concrete(sharding, "reshard")
    if x.sharding.mesh == sharding.mesh and x._blocks is None and not x.is_deleted():
        return hooks.reshard(x, sharding)                 # the redistribution planner
    if x._blocks is not None:      # across processes: gather the whole, keep this process's blocks
        return device_put(hooks.process_allgather(x), sharding)
    return Array.from_host(x._gather(), sharding)


def _install_array_methods():
    """Operators and ndarray methods of ``Array``, all through NumPy's protocols (eager ops)."""
    core.install_operators(Array, inplace=False)
    for name in ("sum", "mean", "max", "min", "prod", "std", "var", "argmax", "argmin", "any",
                 "all", "cumsum", "round", "clip", "squeeze", "swapaxes", "transpose"):
        setattr(Array, name, (lambda f: lambda s, *a, **k: f(s, *a, **k))(getattr(np, name)))
    Array.reshape = lambda s, *shape, **k: np.reshape(s, shape[0] if len(shape) == 1 else shape, **k)
    Array.astype = lambda s, dtype, **k: np.asarray(s).astype(dtype) if s.sharding.mesh.axis_names == ("_device",) \
        else _eager_astype(s, dtype)
    Array.T = property(lambda s: np.transpose(s))


def _eager_astype(x, dtype):
    return hooks.eager.call(f"astype[{np.dtype(dtype)}]", lambda a: a.astype(dtype), (x,), {})


_install_array_methods()
hooks.array_types = (Array,)
