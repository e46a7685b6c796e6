"""Array, device_put and reshard: bit-exact round trips over random layouts, views, shards vs JAX."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import spmd
from spmd import P, NamedSharding
from conftest import layouts, specs

DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
          np.uint64, np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.complex64,
          np.complex128]


def random_array(shape, dtype, seed) -> np.ndarray:
    """Random bits of ``dtype`` (NaNs and infinities included for floats)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if dtype == np.bool_:
        return (rng.random(n) < 0.5).reshape(shape)
    return rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype).reshape(shape)


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def assert_same_bits(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(bits(got), bits(want))


def assert_shards_match(arr, x):
    shards = arr.addressable_shards
    assert sorted(s.device.id for s in shards) == sorted(arr.sharding.mesh.device_ids.flat)
    for shard in shards:
        assert isinstance(shard.data, np.ndarray)  # also for rank 0: a 0-d array, not a scalar
        assert_same_bits(shard.data, x[shard.index])


@settings(max_examples=200, deadline=None)
@given(layouts(), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
def test_device_put_round_trip_is_bit_exact(layout, dtype, seed):
    sharding, shape = layout
    x = random_array(shape, dtype, seed)
    arr = spmd.device_put(x, sharding)
    assert arr.shape == x.shape and arr.dtype == x.dtype and arr.sharding == sharding
    assert_same_bits(np.asarray(arr), x)
    assert_shards_match(arr, x)


@settings(max_examples=100, deadline=None)
@given(layouts(even=True), st.sampled_from(DTYPES))
def test_device_put_of_even_layout_is_a_view(layout, dtype):
    sharding, shape = layout
    x = random_array(shape, dtype, 0)
    arr = spmd.device_put(x, sharding)
    if x.size:
        assert all(np.shares_memory(s.data, x) for s in arr.addressable_shards)
    gathered = np.asarray(arr)
    assert not np.shares_memory(gathered, x)  # np.asarray gives the caller their own copy


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from(DTYPES))
def test_reshard_round_trips(data, dtype):
    first, shape = data.draw(layouts())
    mesh = first.mesh
    second = NamedSharding(mesh, data.draw(specs(mesh, len(shape))))
    x = random_array(shape, dtype, 1)
    a = spmd.device_put(x, first)
    b = spmd.reshard(a, second)
    assert b.sharding == second
    assert_same_bits(np.asarray(b), x)
    assert_shards_match(b, x)
    back = spmd.device_put(b, first)
    assert_same_bits(np.asarray(back), x)
    assert_shards_match(back, x)


def test_reshard_to_another_mesh():
    x = np.arange(48.0).reshape(6, 8)
    a = spmd.device_put(x, NamedSharding(spmd.make_mesh((2, 4), ("a", "b")), P("a", "b")))
    other = spmd.make_mesh((4, 2), ("p", "q"), devices=spmd.devices()[::-1])
    b = spmd.reshard(a, NamedSharding(other, P("q", "p")))
    assert b.sharding.mesh == other
    np.testing.assert_array_equal(np.asarray(b), x)
    assert_shards_match(b, x)


# -- the Array API -------------------------------------------------------------------------------

@pytest.fixture
def mesh():
    return spmd.make_mesh((2, 4), ("data", "model"))


def test_array_properties(mesh):
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    a = spmd.device_put(x, NamedSharding(mesh, P("data", "model")))
    assert isinstance(a, spmd.Array)
    assert (a.shape, a.dtype, a.ndim, a.size, a.itemsize, a.nbytes, len(a)) == ((8, 4), np.float32, 2, 32, 4, 128, 8)
    assert a.devices() == set(spmd.devices())
    assert not a.is_fully_replicated and a.is_fully_addressable
    assert a.block_until_ready() is a
    shard = a.addressable_shards[5]
    assert shard.device.id == 5 and shard.index == (slice(4, 8), slice(1, 2))
    np.testing.assert_array_equal(shard.data, x[4:8, 1:2])
    assert repr(a).startswith("Array([[ 0.,  1.,  2.,  3.],") and repr(a).endswith("dtype=float32, sharding=P('data', 'model'))")
    html = a._repr_html_()
    assert "<table" in html and "float32[8,4]" in html
    with pytest.raises(TypeError, match="0-d"):
        len(spmd.device_put(np.float32(1), NamedSharding(mesh, P())))


def test_np_asarray_dtype_and_copy(mesh):
    x = np.arange(8, dtype=np.int32)
    a = spmd.device_put(x, NamedSharding(mesh, P("model")))
    assert np.asarray(a, dtype=np.float64).dtype == np.float64
    # device_put of an even layout is a view of the host array, so gathering needs no copy
    assert np.shares_memory(np.asarray(a, copy=False), x)
    y = np.arange(32).reshape(8, 4)
    b = spmd.device_put(y, NamedSharding(mesh, P("data", "model")))
    assert np.shares_memory(np.asarray(b, copy=False), y)
    assert not np.shares_memory(np.asarray(b), y)
    with pytest.raises(ValueError, match="copy is needed"):
        np.asarray(b, dtype=np.float32, copy=False)


def test_replica_ids_and_uneven_shards(mesh):
    x = np.arange(6.0)
    a = spmd.device_put(x, NamedSharding(mesh, P("model")))
    got = [(s.device.id, s.index, s.replica_id, s.data.tolist()) for s in a.addressable_shards]
    assert got[:4] == [(0, (slice(0, 2),), 0, [0.0, 1.0]), (1, (slice(2, 4),), 0, [2.0, 3.0]),
                       (2, (slice(4, 6),), 0, [4.0, 5.0]), (3, (slice(6, 6),), 0, [])]
    assert [s.replica_id for s in a.addressable_shards[4:]] == [1, 1, 1, 1]


def test_device_put_to_device_and_default():
    x = np.arange(5)
    a = spmd.device_put(x)
    assert [s.device.id for s in a.addressable_shards] == [0]
    b = spmd.device_put(x, spmd.devices()[3])
    assert [s.device.id for s in b.addressable_shards] == [3]
    np.testing.assert_array_equal(np.asarray(b), x)


def test_device_put_pytrees(mesh):
    tree = {"w": np.ones((4, 8)), "b": [np.zeros(8), np.float32(2)]}
    out = spmd.device_put(tree, NamedSharding(mesh, P()))
    assert set(out) == {"w", "b"} and isinstance(out["b"][0], spmd.Array)
    shardings = {"w": NamedSharding(mesh, P("data", "model")),
                 "b": [NamedSharding(mesh, P("model")), NamedSharding(mesh, P())]}
    out = spmd.device_put(tree, shardings)
    assert out["w"].sharding.spec == P("data", "model") and out["b"][0].sharding.spec == P("model")
    np.testing.assert_array_equal(np.asarray(out["b"][1]), np.float32(2))


def test_device_put_of_array_with_same_sharding_is_identity(mesh):
    s = NamedSharding(mesh, P("data"))
    a = spmd.device_put(np.ones((4, 4)), s)
    assert spmd.device_put(a, s) is a
    assert spmd.device_put(a, NamedSharding(mesh, P("data", None))) is a


def test_device_put_accepts_scalars_lists_and_foreign_arrays(mesh):
    jax = pytest.importorskip("jax")
    s = NamedSharding(mesh, P())
    assert np.asarray(spmd.device_put(3.5, s)) == 3.5
    np.testing.assert_array_equal(np.asarray(spmd.device_put(np.array([[1, 2], [3, 4]]), s)), [[1, 2], [3, 4]])
    j = jax.numpy.arange(8.0)
    np.testing.assert_array_equal(np.asarray(spmd.device_put(j, NamedSharding(mesh, P("model")))), np.arange(8.0))


def test_shards_match_jax(mesh):
    """Shard order, index, replica id and data equal jax.device_put's for the same layout."""
    jax = pytest.importorskip("jax")
    from jax.sharding import Mesh as JaxMesh, NamedSharding as JaxNamedSharding, PartitionSpec as JaxP
    jdevs = {d.id: d for d in jax.devices()}
    x = np.arange(4 * 8 * 2, dtype=np.float32).reshape(4, 8, 2)
    for ids in (np.arange(8).reshape(2, 4), np.arange(8)[::-1].reshape(2, 4)):
        m = spmd.make_mesh((2, 4), ("a", "b"), devices=[spmd.devices()[i] for i in ids.flat])
        jm = JaxMesh(np.vectorize(lambda i: jdevs[int(i)], otypes=[object])(ids), ("a", "b"))
        for spec in [P("a", "b"), P("b"), P(None, ("b", "a")), P(None, None, "a"), P()]:
            ours = spmd.device_put(x, NamedSharding(m, spec)).addressable_shards
            theirs = jax.device_put(x, JaxNamedSharding(jm, JaxP(*spec))).addressable_shards
            assert [(s.device.id, s.index, s.replica_id) for s in ours] == \
                   [(s.device.id, s.index, s.replica_id) for s in theirs]
            for o, t in zip(ours, theirs):
                np.testing.assert_array_equal(o.data, np.asarray(t.data))
