"""Exchange of sharded arrays with JAX: ``to_jax(x)`` gives a ``jax.Array`` laid out as ``x``
(the same mesh shape, axis names and types, devices by id, and ``PartitionSpec``), copying each
shard once from the host into its JAX device; ``from_jax(a)`` is the reverse.  Single-device
data is exchanged without copies through DLPack (``Array.__dlpack__``, ``Shard.data``).

>>> import numpy as np, spmd
>>> from spmd import P
>>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
>>> x = spmd.device_put(np.arange(32.).reshape(8, 4), spmd.NamedSharding(mesh, P("data", "model")))
>>> a = spmd.interop.to_jax(x)
>>> tuple(a.sharding.spec), dict(a.sharding.mesh.shape)
(('data', 'model'), {'data': 2, 'model': 4})
>>> y = spmd.interop.from_jax(a)
>>> y.sharding.spec == x.sharding.spec and np.array_equal(np.asarray(y), np.asarray(x))
True
"""
from __future__ import annotations

import numpy as np

from .array import Array, device_put, make_array_from_callback
from .devices import devices
from .mesh import AxisType, Mesh
from .sharding import NamedSharding, PartitionSpec

__all__ = ["to_jax", "from_jax"]


def _jax():
    import jax        # optional dependency (the `jax` extra): needed only for the exchange
    return jax


def _devices_by_id(available, ids, who: str, have: str):
    by_id = {d.id: d for d in available}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{who}: the mesh uses device {missing[0]}, but {have} has devices "
                         f"{sorted(by_id)} only. (JAX on the CPU has as many as "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=N gives it; spmd as "
                         f"many as SPMD_NUM_CPU_DEVICES.)")
    return [by_id[i] for i in ids]


def to_jax(x: Array):
    """``x`` as a ``jax.Array`` with a ``NamedSharding`` on a JAX mesh of the same shape, axis
    names, axis types and device ids; each device's block is copied once."""
    jax = _jax()
    if not isinstance(x, Array):
        raise TypeError(f"spmd.interop.to_jax takes an spmd.Array, got {type(x).__name__}; "
                        f"pass NumPy arrays to jax.numpy.asarray directly.")
    mesh = x.sharding.mesh
    ids = [d.id for d in mesh.devices.flat]
    jdevs = _devices_by_id(jax.devices(), ids, "spmd.interop.to_jax", "JAX")
    types = tuple(jax.sharding.AxisType[t.name] for t in mesh.axis_types)
    jmesh = jax.sharding.Mesh(np.array(jdevs, dtype=object).reshape(mesh.axis_sizes),
                              mesh.axis_names, axis_types=types)
    sharding = jax.sharding.NamedSharding(jmesh, jax.sharding.PartitionSpec(*x.sharding.spec))
    by_id = {d.id: d for d in jdevs}
    shards = [jax.device_put(s.data, by_id[s.device.id]) for s in x.addressable_shards]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


def from_jax(a) -> Array:
    """The ``jax.Array`` ``a`` as an ``spmd.Array``: a ``NamedSharding`` keeps its mesh (shape,
    axis names and types, device ids) and spec; any other sharding gives a replicated array."""
    jax = _jax()
    if not isinstance(a, jax.Array):
        raise TypeError(f"spmd.interop.from_jax takes a jax.Array, got {type(a).__name__}")
    if not isinstance(a.sharding, jax.sharding.NamedSharding):
        return device_put(np.asarray(a))
    jmesh = a.sharding.mesh
    ids = [d.id for d in jmesh.devices.flat]
    mine = _devices_by_id(devices(), ids, "spmd.interop.from_jax", "spmd")
    types = tuple(AxisType[t.name] for t in jmesh.axis_types)
    mesh = Mesh(np.array(mine, dtype=object).reshape(jmesh.devices.shape), jmesh.axis_names,
                axis_types=types)
    spec = PartitionSpec(*a.sharding.spec)
    blocks = {_key(s.index, a.shape): s.data for s in a.addressable_shards}
    return make_array_from_callback(a.shape, NamedSharding(mesh, spec),
                                    lambda index: np.asarray(blocks[_key(index, a.shape)]))


def _key(index, shape) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))
