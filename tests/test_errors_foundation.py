"""Bad input to the foundation API: one row per mistake, each checking the exception type, that
spmd itself raised it (not NumPy or optree), and that the message names the offending value."""
import os

import numpy as np
import pytest

import spmd
from spmd import P, NamedSharding

SPMD_DIR = os.path.dirname(spmd.__file__)


def _mesh():
    return spmd.make_mesh((2, 4), ("data", "model"))


def _sharded(spec=P("data")):
    return spmd.device_put(np.ones((4, 4)), NamedSharding(_mesh(), spec))


def _bare_p_without_mesh():
    return spmd.device_put(np.ones(4), P("data"))


def _env(value):
    def call():
        os.environ["SPMD_NUM_CPU_DEVICES"] = value  # restored by the monkeypatch in the test
        return spmd.devices()
    return call


CASES = [
    # (id, call, exception type, text the message must contain)
    ("unknown-axis", lambda: NamedSharding(_mesh(), P("batch")), spmd.ShardingError, "'batch'"),
    ("axis-used-twice", lambda: NamedSharding(_mesh(), P("data", ("model", "data"))), spmd.ShardingError, "'data' twice"),
    ("spec-longer-than-rank", lambda: spmd.device_put(np.ones(4), NamedSharding(_mesh(), P("data", "model"))), spmd.ShardingError, "rank 1"),
    ("reshard-spec-longer-than-rank", lambda: spmd.reshard(_sharded(), NamedSharding(_mesh(), P(None, None, "model"))), spmd.ShardingError, "3 entries"),
    ("mesh-size-vs-device-count", lambda: spmd.make_mesh((3, 4), ("a", "b")), spmd.MeshError, "(3, 4)"),
    ("names-vs-shape-length", lambda: spmd.make_mesh((2, 4), ("a",)), spmd.MeshError, "('a',)"),
    ("duplicate-devices", lambda: spmd.make_mesh((2, 2), ("a", "b"), devices=spmd.devices()[:2] * 2), spmd.MeshError, "CpuDevice(id=0)"),
    ("duplicate-devices-in-Mesh", lambda: spmd.Mesh(np.array(spmd.devices()[:1] * 2), ("a",)), spmd.MeshError, "CpuDevice(id=0)"),
    ("not-a-device", lambda: spmd.Mesh(np.arange(4), ("a",)), spmd.MeshError, "0 is not a Device"),
    ("device-array-rank", lambda: spmd.Mesh(np.array(spmd.devices()).reshape(2, 4), ("a",)), spmd.MeshError, "(2, 4)"),
    ("duplicate-axis-names", lambda: spmd.make_mesh((2, 4), ("x", "x")), spmd.MeshError, "'x'"),
    ("non-string-axis-name", lambda: spmd.make_mesh((2, 4), ("x", 7)), spmd.MeshError, "7"),
    ("empty-axis-name", lambda: spmd.AbstractMesh((8,), ("",)), spmd.MeshError, "''"),
    ("zero-axis-size", lambda: spmd.make_mesh((0, 8), ("a", "b")), spmd.MeshError, "size 0"),
    ("negative-axis-size", lambda: spmd.AbstractMesh((-2, 4), ("a", "b")), spmd.MeshError, "-2"),
    ("float-axis-size", lambda: spmd.make_mesh((2.0, 4), ("a", "b")), spmd.MeshError, "2.0"),
    ("mesh-shape-not-a-tuple", lambda: spmd.make_mesh(8, ("a",)), spmd.MeshError, "got 8"),
    ("env-devices-zero", _env("0"), spmd.MeshError, "SPMD_NUM_CPU_DEVICES='0'"),
    ("env-devices-word", _env("eight"), spmd.MeshError, "'eight'"),
    ("env-devices-negative", _env("-4"), spmd.MeshError, "'-4'"),
    ("env-devices-float", _env("2.5"), spmd.MeshError, "'2.5'"),
    ("unknown-platform", lambda: spmd.devices("tpu"), spmd.MeshError, "'tpu'"),
    ("device-put-non-array", lambda: spmd.device_put(object(), NamedSharding(_mesh(), P())), TypeError, "got object"),
    ("device-put-string", lambda: spmd.device_put("abc", NamedSharding(_mesh(), P())), TypeError, "got str"),
    ("device-put-object-array", lambda: spmd.device_put(np.array([1, "a"], dtype=object), NamedSharding(_mesh(), P())), TypeError, "object arrays"),
    ("unsupported-dtype-str", lambda: spmd.device_put(np.array(["a", "b"]), NamedSharding(_mesh(), P())), TypeError, "<U1"),
    ("unsupported-dtype-datetime", lambda: spmd.device_put(np.array(["2024-01-01"], "datetime64[D]"), NamedSharding(_mesh(), P())), TypeError, "datetime64[D]"),
    ("unsupported-dtype-longdouble", lambda: spmd.device_put(np.ones(2, np.longdouble), NamedSharding(_mesh(), P())), TypeError, str(np.dtype(np.longdouble))),
    ("device-put-abstract-mesh", lambda: spmd.device_put(np.ones(4), NamedSharding(_mesh().abstract_mesh, P("data"))), spmd.ShardingError, "AbstractMesh"),
    ("reshard-abstract-mesh", lambda: spmd.reshard(_sharded(), NamedSharding(_mesh().abstract_mesh, P("model"))), spmd.ShardingError, "AbstractMesh"),
    ("device-put-array-abstract-mesh", lambda: spmd.device_put(_sharded(), NamedSharding(_mesh().abstract_mesh, P("model"))), spmd.ShardingError, "AbstractMesh"),
    ("sharding-not-a-sharding", lambda: spmd.device_put(np.ones(4), "data"), spmd.ShardingError, "'data'"),
    ("sharding-tree-mismatch", lambda: spmd.device_put({"w": np.ones(4)}, {"b": P()}), spmd.ShardingError, "{'b': P()}"),
    ("bad-spec-entry-int", lambda: P("data", 1), spmd.ShardingError, "entry 1"),
    ("bad-spec-entry-in-tuple", lambda: P(("data", 3)), spmd.ShardingError, "('data', 3)"),
    # a list of names is accepted as their tuple (JAX 0.10); one holding a non-name is not
    ("bad-spec-entry-list", lambda: P(["data", 3]), spmd.ShardingError, "['data', 3]"),
    ("spec-not-a-spec", lambda: NamedSharding(_mesh(), "data"), spmd.ShardingError, "'data'"),
    ("named-sharding-non-mesh", lambda: NamedSharding("mesh", P()), spmd.ShardingError, "got str"),
    ("bare-P-without-set-mesh", _bare_p_without_mesh, spmd.ShardingError, "P('data')"),
    ("set-mesh-non-mesh", lambda: spmd.set_mesh({"data": 2}).__enter__(), spmd.MeshError, "{'data': 2}"),
    ("submesh-index-out-of-range", lambda: _mesh().submesh("model", data=2), spmd.MeshError, "index 2"),
    ("submesh-index-not-int", lambda: _mesh().submesh("model", data="0"), spmd.MeshError, "'0'"),
    ("submesh-unknown-axis", lambda: _mesh().submesh("rows"), spmd.MeshError, "'rows'"),
    ("submesh-kept-and-fixed", lambda: _mesh().submesh("model", model=1), spmd.MeshError, "'model'"),
    ("axis-size-unknown", lambda: _mesh().axis_size("batch"), spmd.MeshError, "'batch'"),
    ("device-not-in-mesh", lambda: _mesh().submesh("model").device_coords(spmd.devices()[7]), spmd.MeshError, "CpuDevice(id=7)"),
    ("indices-map-abstract-mesh", lambda: NamedSharding(_mesh().abstract_mesh, P()).devices_indices_map((2,)), spmd.ShardingError, "AbstractMesh"),
    ("shard-shape-too-short", lambda: NamedSharding(_mesh(), P("data", "model")).shard_shape((8,)), spmd.ShardingError, "rank 1"),
    ("len-of-0d-array", lambda: len(spmd.device_put(1.0, NamedSharding(_mesh(), P()))), TypeError, "0-d"),
]


@pytest.mark.parametrize("call, exc_type, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc_type, needle, monkeypatch):
    monkeypatch.setenv("SPMD_NUM_CPU_DEVICES", os.environ.get("SPMD_NUM_CPU_DEVICES", "8"))
    with pytest.raises(exc_type) as info:
        call()
    err = info.value
    assert needle in str(err), f"message does not name {needle!r}: {err}"
    # spmd raised it on purpose: one of its own types, or raised from a frame inside spmd/.
    assert isinstance(err, spmd.SpmdError) or info.traceback[-1].path.is_relative_to(SPMD_DIR), \
        f"{type(err).__name__} escaped from {info.traceback[-1].path}: {err}"


def test_table_is_large_enough():
    assert len(CASES) >= 15
