"""Bad input found by trying the runtime as a new user would: each row is a clear error from spmd
naming the argument (the same exception type as JAX where JAX runs the same program), or, where
JAX accepts the input, JAX's result.  Settings read from the environment are validated too."""
import os

import numpy as np
import pytest

import spmd
from spmd import P
from spmd import flight_recorder, runtime
from spmd.errors import SpmdError

SPMD_DIR = os.path.dirname(spmd.__file__)


def _mesh():
    return spmd.make_mesh((8,), ("i",))


def _smap(body, spec=P("i"), out=P("i"), mesh=None):
    return spmd.shard_map(body, mesh=mesh or _mesh(), in_specs=spec, out_specs=out)


CASES = [
    # (id, call, exception type, text the message must contain)
    ("all-gather-tiled-scalar",
     lambda: _smap(lambda x: spmd.all_gather(x.sum(), "i", tiled=True), out=P())(np.ones(8)),
     ValueError, "scalar"),
    ("shard-map-mesh-str", lambda: spmd.shard_map(lambda x: x, mesh="str", in_specs=P("i"),
                                                  out_specs=P("i"))(np.ones(8)),
     TypeError, "mesh='str'"),
    ("nested-shard-map-other-mesh",
     lambda: _smap(lambda x: _smap(lambda y: y * 2, P("a"), P("a"),
                                   mesh=spmd.make_mesh((2, 4), ("a", "b")))(x))(np.arange(16.0)),
     spmd.ShardingError, "must use the enclosing mesh"),
    ("jit-returns-str", lambda: spmd.jit(lambda x: "hello")(np.ones(2)), TypeError, "'hello'"),
    ("shard-map-object-dtype", lambda: _smap(lambda x: x)(np.array([object()] * 8)),
     TypeError, "dtype object"),
    ("jit-object-dtype", lambda: spmd.jit(lambda x: x)(np.array([None, 1], dtype=object)),
     TypeError, "dtype object"),
    ("static-argnums-out-of-range", lambda: spmd.jit(lambda x: x, static_argnums=3),
     ValueError, "static_argnums=(3,)"),
    ("donate-argnums-out-of-range", lambda: spmd.jit(lambda x: x, donate_argnums=(0, 2)),
     ValueError, "donate_argnums=(0, 2)"),
    ("static-argnums-not-int", lambda: spmd.jit(lambda x: x, static_argnums=("x",)),
     TypeError, "'x'"),
    ("ppermute-float-indices",
     lambda: _smap(lambda x: spmd.ppermute(x, "i", [(0.0, 1.0), (1.0, 0.0)]))(np.ones(8)),
     TypeError, "0.0 of type float"),
    ("ppermute-not-pairs", lambda: _smap(lambda x: spmd.ppermute(x, "i", [(0, 1, 2)]))(np.ones(8)),
     ValueError, "(source, destination) pairs"),
    ("pbroadcast-source-bool",
     lambda: _smap(lambda x: spmd.pbroadcast(x, "i", source=True))(np.ones(8)),
     TypeError, "source=True"),
    ("vmap-in-axes-too-large", lambda: spmd.vmap(lambda x: x, in_axes=5)(np.ones((2, 3))),
     ValueError, "in_axes=5"),
    ("vmap-in-axes-too-negative", lambda: spmd.vmap(lambda x: x, in_axes=-3)(np.ones((2, 3))),
     ValueError, "in_axes=-3"),
    ("vmap-out-axes-too-large", lambda: spmd.vmap(lambda x: x, out_axes=5)(np.ones((2, 3))),
     ValueError, "out_axes=5"),
]


@pytest.mark.parametrize("call, exc_type, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc_type, needle):
    with pytest.raises(exc_type) as info:
        call()
    err = info.value
    assert needle in str(err), f"message does not name {needle!r}: {err}"
    assert isinstance(err, SpmdError) or info.traceback[-1].path.is_relative_to(SPMD_DIR), \
        f"{type(err).__name__} escaped from {info.traceback[-1].path}: {err}"


def _jax():
    jax = pytest.importorskip("jax")
    from jax.sharding import AxisType
    return jax, jax.make_mesh((8,), ("i",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("name", ["all-gather-tiled-scalar", "ppermute-float-indices",
                                  "static-argnums-out-of-range", "vmap-in-axes-too-large",
                                  "vmap-out-axes-too-large", "jit-returns-str"])
def test_same_exception_type_as_jax(name):
    """JAX refuses the same programs, with the same exception type."""
    jax, mesh = _jax()
    from jax.sharding import PartitionSpec as JP
    smap = lambda body, out=JP("i"): jax.shard_map(body, mesh=mesh, in_specs=JP("i"), out_specs=out)
    programs = {
        "all-gather-tiled-scalar": lambda: smap(lambda x: jax.lax.all_gather(x.sum(), "i", tiled=True),
                                                JP())(np.ones(8, np.float32)),
        "ppermute-float-indices": lambda: smap(lambda x: jax.lax.ppermute(
            x, "i", [(0.0, 1.0), (1.0, 0.0)]))(np.ones(8, np.float32)),
        "static-argnums-out-of-range": lambda: jax.jit(lambda x: x, static_argnums=3)(np.ones(2)),
        "vmap-in-axes-too-large": lambda: jax.vmap(lambda x: x, in_axes=5)(np.ones((2, 3))),
        "vmap-out-axes-too-large": lambda: jax.vmap(lambda x: x, out_axes=5)(np.ones((2, 3))),
        "jit-returns-str": lambda: jax.jit(lambda x: "hello")(np.ones(2)),
    }
    with pytest.raises(Exception) as theirs:
        programs[name]()
    ours = {c[0]: c for c in CASES}[name]
    with pytest.raises(ours[2]):
        ours[1]()
    assert isinstance(theirs.value, ours[2]), (type(theirs.value), ours[2])


def test_rank_above_32_works_as_in_jax():
    """NumPy's broadcasting helpers stop at 32 dimensions; spmd's do not (JAX takes rank 33)."""
    mesh = spmd.make_mesh((2, 4), ("a", "b"))
    x = np.random.default_rng(0).normal(size=(2, 4) + (1,) * 31)
    f = lambda v: np.sin(v) * 2 + v.sum(axis=0, keepdims=True)
    got = spmd.jit(f)(spmd.device_put(x, spmd.NamedSharding(mesh, P("a", "b"))))
    np.testing.assert_allclose(np.asarray(got), f(x), rtol=1e-12)


def test_negative_static_argnums_count_from_the_end():
    f = spmd.jit(lambda x, n: x * n, static_argnums=-1)
    assert f.static_argnums == (1,) and float(f(np.float64(2.0), 3)) == 6.0


# -- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "0", "-1", "soon", "1e400"])
def test_collective_timeout_setting_is_validated(monkeypatch, raw):
    monkeypatch.setenv("SPMD_COLLECTIVE_TIMEOUT", raw)
    with pytest.raises(SpmdError, match=f"SPMD_COLLECTIVE_TIMEOUT={raw!r} is not a positive number"):
        runtime.collective_timeout_seconds()


def test_collective_timeout_setting_accepts_positive_seconds(monkeypatch):
    monkeypatch.setenv("SPMD_COLLECTIVE_TIMEOUT", " 2.5 ")
    assert runtime.collective_timeout_seconds() == 2.5


@pytest.mark.parametrize("raw, expected", [("08", 8), (" 4 ", 4), ("16", 16)])
def test_device_count_setting_takes_integers_with_leading_zeros(monkeypatch, raw, expected):
    monkeypatch.setenv("SPMD_NUM_CPU_DEVICES", raw)
    assert len(spmd.devices()) == expected


@pytest.mark.parametrize("raw", ["10000000", "0", "-4", "2.5", "eight", "1e3"])
def test_device_count_setting_is_bounded(monkeypatch, raw):
    monkeypatch.setenv("SPMD_NUM_CPU_DEVICES", raw)
    with pytest.raises(spmd.MeshError, match=f"SPMD_NUM_CPU_DEVICES={raw!r}: .* from 1 to 16384"):
        spmd.devices()


@pytest.mark.parametrize("raw", ["0", "many", "-5"])
def test_flight_recorder_size_setting_is_validated(monkeypatch, raw):
    monkeypatch.setenv("SPMD_FLIGHT_RECORDER_SIZE", raw)
    with pytest.raises(SpmdError, match="SPMD_FLIGHT_RECORDER_SIZE"):
        flight_recorder.FlightRecorder()


def test_weak_python_scalars_still_compute_under_jit():
    """Two Python scalars meet in a ufunc (a traced int and a literal): NumPy's loop for them is
    the object loop; spmd takes their default dtypes instead (the dtype check must not fire)."""
    assert bool(spmd.jit(lambda n: n < 7)(3)) and int(spmd.jit(lambda n: n + 7)(3)) == 10


def test_executor_chosen_by_environment(monkeypatch):
    f = spmd.jit(lambda x: x * 2)
    monkeypatch.setenv("SPMD_EXECUTOR", "reference")
    np.testing.assert_array_equal(np.asarray(f(np.arange(3.0))), [0, 2, 4])
    monkeypatch.setenv("SPMD_EXECUTOR", "tpu")
    with pytest.raises(ValueError, match=r"SPMD_EXECUTOR='tpu'; use one of 'stacked', 'reference'"):
        f(np.arange(3.0))


def test_gpu_executor_says_what_it_needs(monkeypatch):
    """``SPMD_EXECUTOR=gpu`` runs on the GPU where there is one; where there is none the error
    names the setting and what is missing."""
    import spmd.gpu
    monkeypatch.setenv("SPMD_EXECUTOR", "gpu")
    f = spmd.jit(lambda x: x * 2)
    if spmd.gpu.available()[0]:
        np.testing.assert_array_equal(np.asarray(f(np.arange(3.0))), [0, 2, 4])
    else:
        with pytest.raises(spmd.gpu.GpuUnavailableError, match=r"^SPMD_EXECUTOR='gpu': "):
            f(np.arange(3.0))
