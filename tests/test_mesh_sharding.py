"""Devices, Mesh, AbstractMesh, PartitionSpec and NamedSharding; JAX is the oracle for the geometry."""
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings

import spmd
from spmd import P, NamedSharding, Mesh, AbstractMesh
from spmd.core import Aval
from conftest import layouts

jax = pytest.importorskip("jax")
from jax.sharding import Mesh as JaxMesh, NamedSharding as JaxNamedSharding, PartitionSpec as JaxP  # noqa: E402


@pytest.fixture
def mesh():
    return spmd.make_mesh((2, 4), ("data", "model"))


# -- devices -----------------------------------------------------------------------------------

def test_devices_default_eight_cpu():
    devs = spmd.devices()
    assert [d.id for d in devs] == list(range(8))
    assert spmd.device_count() == spmd.local_device_count() == 8
    assert repr(devs[3]) == "CpuDevice(id=3)"
    assert devs[0].platform == "cpu"


def test_num_cpu_devices_env(monkeypatch):
    monkeypatch.setenv("SPMD_NUM_CPU_DEVICES", "4")
    assert spmd.device_count() == 4
    assert spmd.make_mesh((2, 2), ("a", "b")).size == 4


# -- Mesh ----------------------------------------------------------------------------------------

def test_mesh_shape_is_ordered_mapping(mesh):
    assert isinstance(mesh.shape, OrderedDict)
    assert list(mesh.shape.items()) == [("data", 2), ("model", 4)]
    assert mesh.shape["model"] == 4
    assert mesh.axis_names == ("data", "model") and mesh.axis_sizes == (2, 4)
    assert mesh.size == 8 and mesh.axis_size("data") == 2
    assert mesh.devices.shape == (2, 4)
    assert mesh.device_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mesh.device_coords(spmd.devices()[6]) == (1, 2)


def test_mesh_shape_matches_jax(mesh):
    jmesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices())
    assert mesh.shape == jmesh.shape
    assert mesh.axis_names == jmesh.axis_names
    assert mesh.size == jmesh.size


def test_mesh_constructor_and_equality(mesh):
    same = Mesh(np.array(spmd.devices()).reshape(2, 4), ("data", "model"),
                (spmd.AxisType.Explicit,) * 2)
    assert same == mesh and hash(same) == hash(mesh)
    assert Mesh(same.devices, ("data", "model")) != mesh   # as JAX: axis types are part of a mesh
    assert spmd.make_mesh((2, 4), ("data", "model"), devices=spmd.devices()[::-1]) != mesh
    assert spmd.make_mesh((4, 2), ("data", "model")) != mesh
    assert mesh.devices.flags.writeable is False


def test_make_mesh_devices_argument():
    devs = spmd.devices()
    m = spmd.make_mesh((2, 2), ("a", "b"), devices=[devs[7], devs[5], devs[3], devs[1]])
    assert m.device_ids.tolist() == [[7, 5], [3, 1]]
    assert m.device_list == [devs[7], devs[5], devs[3], devs[1]]
    assert spmd.make_mesh((4,), "x", devices=devs[:4]).axis_names == ("x",)


def test_mesh_repr_and_html(mesh):
    assert repr(mesh) == "Mesh({'data': 2, 'model': 4}, 8 cpu devices, axis_types=(Explicit, Explicit))"
    html = mesh._repr_html_()
    assert html.startswith("<div") and "<table" in html
    assert "data \\ model" in html
    assert all(f"CPU {i}" in html for i in range(8))


def test_abstract_mesh(mesh):
    am = mesh.abstract_mesh
    assert isinstance(am, AbstractMesh) and not isinstance(am, Mesh)
    same = AbstractMesh((2, 4), ("data", "model"), (spmd.AxisType.Explicit,) * 2)
    assert am == same and hash(am) == hash(same) and am != AbstractMesh((2, 4), ("data", "model"))
    assert am != mesh
    assert am.shape == mesh.shape and am.size == 8
    assert repr(am) == "AbstractMesh({'data': 2, 'model': 4}, axis_types=(Explicit, Explicit))"
    s = NamedSharding(am, P("data"))
    assert s.shard_shape((8, 3)) == (4, 3)
    with pytest.raises(spmd.ShardingError, match="needs a Mesh with devices"):
        s.devices_indices_map((8, 3))


def test_submesh():
    m = spmd.make_mesh((2, 2, 2), ("a", "b", "c"))
    row = m.submesh("c", a=1, b=0)
    assert row.axis_names == ("c",) and row.device_ids.tolist() == [4, 5]
    plane = m.submesh(("c", "a"), b=1)  # kept axes stay in mesh order
    assert plane.axis_names == ("a", "c") and plane.device_ids.tolist() == [[2, 3], [6, 7]]
    assert m.submesh(("a", "b", "c")) == m
    assert m.submesh("b").device_ids.tolist() == [0, 2]  # unnamed axes default to index 0


def test_set_mesh_context(mesh):
    assert spmd.get_mesh() is None
    other = spmd.make_mesh((8,), ("x",))
    with spmd.set_mesh(mesh) as m:
        assert m is mesh and spmd.get_mesh() is mesh
        with spmd.set_mesh(other):
            assert spmd.get_mesh() is other
        assert spmd.get_mesh() is mesh
        x = spmd.device_put(np.arange(8.0), P("model"))  # bare P takes the context mesh
        assert x.sharding == NamedSharding(mesh, P("model"))
    assert spmd.get_mesh() is None
    with pytest.raises(RuntimeError):
        with spmd.set_mesh(mesh):
            raise RuntimeError("boom")
    assert spmd.get_mesh() is None
    with mesh:
        assert spmd.get_mesh() is mesh
    assert spmd.get_mesh() is None


# -- PartitionSpec and NamedSharding ---------------------------------------------------------------

def test_partition_spec_values():
    assert repr(P("data", None)) == "P('data', None)"
    assert repr(P(("data", "model"))) == "P(('data', 'model'))"
    assert P("a") == P(("a",)) and hash(P("a")) == hash(P(("a",)))
    assert P("a") == P("a", None) and hash(P("a")) == hash(P("a", None))
    assert P("a", "b") != P("b", "a")
    assert P(("a", "b")).axes == (("a", "b"),)
    assert pickle.loads(pickle.dumps(P("a", ("b", "c")))) == P("a", ("b", "c"))
    assert len(P(None, "a")) == 2 and P(None, "a")[1] == "a"


def test_types_pickled_in_another_process_hash_as_made_here(tmp_path):
    """Mesh, PartitionSpec, NamedSharding and Aval keep their hash once computed; a pickle
    from a process with another string-hash salt must not carry that process's hash."""
    made = tmp_path / "types.pkl"
    code = ("import pickle, numpy as np, spmd; from spmd import P; from spmd.core import Aval\n"
            "m = spmd.make_mesh((2, 4), ('data', 'model'))\n"
            "s = spmd.NamedSharding(m, P('data', 'model'))\n"
            "a = Aval((8, 4), np.dtype('float32'), sharding=s)\n"
            "objs = (m, m.abstract_mesh, s.spec, s, a)\n"
            "[hash(o) for o in objs]; m.explicit_axes; s._dim_axes(2)\n"
            f"pickle.dump(objs, open({str(made)!r}, 'wb'))\n")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    with open(made, "rb") as fh:
        theirs = pickle.load(fh)
    m = spmd.make_mesh((2, 4), ("data", "model"))
    s = NamedSharding(m, P("data", "model"))
    ours = (m, m.abstract_mesh, s.spec, s, Aval((8, 4), np.dtype("float32"), sharding=s))
    for a, b in zip(theirs, ours):
        assert a == b and hash(a) == hash(b), (a, b)
    assert {ours[3]: 1}[theirs[3]] == 1 and {ours[4]: 1}[theirs[4]] == 1


def test_named_sharding_geometry(mesh):
    s = NamedSharding(mesh, P(("model", "data")))
    assert s.num_parts(2) == (8, 1)
    assert s.shard_shape((16, 3)) == (2, 3)
    assert s.shard_shape((10, 3)) == (2, 3)  # uneven: the largest block
    assert not s.is_fully_replicated and s.replica_axes() == ()
    r = NamedSharding(mesh, P())
    assert r.is_fully_replicated and r.replica_axes() == ("data", "model")
    assert s.device_set == set(spmd.devices()) and s.addressable_devices == set(spmd.devices())
    assert s.num_devices == 8 and s.is_fully_addressable
    assert s.with_spec(P("data")) == NamedSharding(mesh, P("data"))
    assert NamedSharding(mesh, ("data",)) == NamedSharding(mesh, P("data"))  # a plain tuple is a spec
    assert s.is_equivalent_to(NamedSharding(mesh, P(("model", "data"), None)), 2)
    assert hash(s) == hash(NamedSharding(mesh, P(("model", "data"))))
    assert repr(s) == ("NamedSharding(mesh=Mesh({'data': 2, 'model': 4}, 8 cpu devices, "
                       "axis_types=(Explicit, Explicit)), spec=P(('model', 'data')))")


def test_devices_indices_map_uneven(mesh):
    m = NamedSharding(mesh, P("model")).devices_indices_map((6, 2))
    by_id = {d.id: idx[0] for d, idx in m.items()}
    assert by_id[0] == by_id[4] == slice(0, 2)
    assert by_id[2] == slice(4, 6)
    assert by_id[3] == by_id[7] == slice(6, 6)  # the block past the end is empty
    assert all(idx[1] == slice(None) for idx in m.values())


def _jax_mesh(mesh):
    jdevs = {d.id: d for d in jax.devices()}
    return JaxMesh(np.vectorize(lambda i: jdevs[int(i)], otypes=[object])(mesh.device_ids), mesh.axis_names)


def _jax_spec(spec):
    return JaxP(*(e if e != () else None for e in spec))


@settings(max_examples=150, deadline=None)
@given(layouts(even=True))
def test_devices_indices_map_matches_jax(layout):
    sharding, shape = layout
    ours = {d.id: idx for d, idx in sharding.devices_indices_map(shape).items()}
    theirs = JaxNamedSharding(_jax_mesh(sharding.mesh), _jax_spec(sharding.spec)).devices_indices_map(shape)
    assert ours == {d.id: idx for d, idx in theirs.items()}
    assert sharding.shard_shape(shape) == JaxNamedSharding(
        _jax_mesh(sharding.mesh), _jax_spec(sharding.spec)).shard_shape(shape)
