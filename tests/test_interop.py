"""Exchange with JAX: ``spmd.interop.to_jax`` / ``from_jax`` keep the mesh (shape, axis names,
axis types, device ids), the spec and every shard's data, both ways and round trip; JAX computes
on what it gets; DLPack shares a single-device array's memory and refuses a sharded one.
"""
import numpy as np
import pytest

import spmd
from spmd import P, NamedSharding

LAYOUTS = [((2, 4), ("data", "model"), P("data", "model")),
           ((2, 4), ("data", "model"), P(None, "model")),
           ((2, 4), ("data", "model"), P()),
           ((8,), ("x",), P("x")),
           ((4, 2), ("a", "b"), P(("a", "b"))),
           ((2,), ("x",), P(None, "x"))]


def _put(shape, names, spec, dtype=np.float32):
    mesh = spmd.make_mesh(shape, names, devices=spmd.devices()[:int(np.prod(shape))])
    x = np.arange(64, dtype=dtype).reshape(8, 8)
    return x, spmd.device_put(x, NamedSharding(mesh, spec))


@pytest.mark.parametrize("shape,names,spec", LAYOUTS, ids=[str(r[2]) + str(r[0]) for r in LAYOUTS])
def test_to_jax_keeps_mesh_spec_and_shards(shape, names, spec):
    import jax
    host, x = _put(shape, names, spec)
    a = spmd.interop.to_jax(x)
    assert isinstance(a, jax.Array) and a.dtype == host.dtype
    np.testing.assert_array_equal(np.asarray(a), host)
    jm = a.sharding.mesh
    assert dict(jm.shape) == dict(x.sharding.mesh.shape) and jm.axis_names == names
    assert [t.name for t in jm.axis_types] == [t.name for t in x.sharding.mesh.axis_types]
    assert tuple(a.sharding.spec) == tuple(x.sharding.spec)
    mine = {s.device.id: s.data for s in x.addressable_shards}
    for s in a.addressable_shards:                       # every device holds the same block
        np.testing.assert_array_equal(np.asarray(s.data), mine[s.device.id])
    # JAX computes on it, sharded as it is
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda v: v * 2)(a)), host * 2)
    back = spmd.interop.from_jax(a)
    assert back.sharding.spec == x.sharding.spec and back.sharding.mesh.axis_names == names
    assert [d.id for d in back.sharding.mesh.devices.flat] == [d.id for d in x.sharding.mesh.devices.flat]
    np.testing.assert_array_equal(np.asarray(back), host)


def test_from_jax_of_arrays_jax_made():
    import jax
    jmesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("i", "j"))
    host = np.arange(32.).reshape(8, 4).astype(np.float32)
    a = jax.device_put(host, jax.sharding.NamedSharding(jmesh, jax.sharding.PartitionSpec("j", "i")))
    x = spmd.interop.from_jax(a)
    assert x.sharding.spec == P("j", "i") and dict(x.sharding.mesh.shape) == {"i": 4, "j": 2}
    assert x.sharding.shard_shape(x.shape) == (4, 1)
    np.testing.assert_array_equal(np.asarray(x), host)
    for s in x.addressable_shards:
        np.testing.assert_array_equal(s.data, host[s.index])
    # spmd computes on it, collectives included
    f = spmd.shard_map(lambda b: spmd.psum(b.sum(0, keepdims=True), "j"), mesh=x.sharding.mesh,
                       in_specs=P("j", "i"), out_specs=P(None, "i"))
    np.testing.assert_allclose(np.asarray(f(x)), host.sum(0, keepdims=True))
    single = spmd.interop.from_jax(jax.numpy.arange(5))
    np.testing.assert_array_equal(np.asarray(single), np.arange(5))


def test_dlpack_of_single_device_arrays_and_shards():
    import jax
    x = spmd.device_put(np.arange(6.).reshape(2, 3))
    y = np.from_dlpack(x)
    assert np.shares_memory(y, x.addressable_data(0)) and x.__dlpack_device__() == (1, 0)
    np.testing.assert_array_equal(np.asarray(jax.numpy.from_dlpack(x)), np.arange(6.).reshape(2, 3))
    _, z = _put((2,), ("x",), P("x"))
    with pytest.raises(BufferError, match="laid out over 2 devices; DLPack exchanges one device's "
                                          "data: use x.addressable_shards"):
        np.from_dlpack(z)
    np.testing.assert_array_equal(np.from_dlpack(z.addressable_shards[1].data), np.arange(32, 64).reshape(4, 8))


def test_bad_inputs():
    with pytest.raises(TypeError, match="to_jax takes an spmd.Array, got ndarray"):
        spmd.interop.to_jax(np.ones(3))
    with pytest.raises(TypeError, match="from_jax takes a jax.Array, got ndarray"):
        spmd.interop.from_jax(np.ones(3))
