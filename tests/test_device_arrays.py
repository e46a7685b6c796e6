"""The stacked executor keeps a device's arrays on the device: run with a strict stand-in for
CuPy (``_strict_xp``: a ufunc given a host ``numpy.ndarray`` raises, as CuPy's do), the GPT
example, the compiler's program table and the collective table give the host's results.  A
program's constant arrays, inputs left on the host and host-only shortcuts are what this finds,
on the CPU, before a GPU does (`SPMD_EXECUTOR=gpu` runs the same executor with CuPy)."""
import importlib
import math

import numpy as np
import optree
import pytest

import spmd
from spmd import P
from spmd.executors import StackedExecutor, reference_executor
from spmd.layout import GlobalValue

import _strict_xp
import compiler_programs as cp
import test_collectives as tc
from _jax_oracle import run_spmd

XP = _strict_xp.module()


class StrictStacked(StackedExecutor):
    """The stacked executor over the strict module; inputs go "onto the device" at the start of
    a call and outputs come back, as ``spmd.gpu.stacked.CupyStackedExecutor`` does."""

    def __init__(self):
        super().__init__(xp=XP)

    def run(self, program, args):
        def on_device(a):
            if isinstance(a, GlobalValue) and type(a._storage) is np.ndarray:
                return GlobalValue(a._storage.view(_strict_xp.DeviceArray), a.shape, a.sharding)
            return a.view(_strict_xp.DeviceArray) if type(a) is np.ndarray else a

        def on_host(o):
            if isinstance(o, GlobalValue) and isinstance(o._storage, _strict_xp.DeviceArray):
                return GlobalValue(o._storage.view(np.ndarray), o.shape, o.sharding)
            return o.view(np.ndarray) if isinstance(o, _strict_xp.DeviceArray) else o
        return [on_host(o) for o in super().run(program, [on_device(a) for a in args])]


STRICT = StrictStacked()
REFERENCE = reference_executor()


def test_the_stand_in_is_strict():
    x = XP.ones(3)
    with pytest.raises(TypeError, match="host numpy.ndarray"):
        x * np.ones(3)
    with pytest.raises(TypeError, match="host numpy.ndarray"):
        XP.add(x, np.array(2.0, np.float32))
    assert isinstance(x * np.float32(2), _strict_xp.DeviceArray)


@pytest.mark.parametrize("parallel,compiler", [("dp_tp", False), ("dp_tp", True), ("tp", False)])
def test_gpt_trains_as_on_the_host(monkeypatch, parallel, compiler):
    G = importlib.import_module("test_train_gpt").G
    jit_module = importlib.import_module("spmd.jit")
    monkeypatch.setitem(jit_module._FACTORIES, "strict", StrictStacked)
    monkeypatch.setenv("SPMD_EXECUTOR", "stacked")
    host = G.train(spmd, np, parallel, compiler, steps=3)
    monkeypatch.setenv("SPMD_EXECUTOR", "strict")
    np.testing.assert_allclose(G.train(spmd, np, parallel, compiler, steps=3), host, rtol=1e-6)


@pytest.mark.parametrize("row", cp.ROWS, ids=[r.name for r in cp.ROWS])
def test_compiler_table(row):
    sizes, names = row.mesh
    mesh = spmd.make_mesh(sizes, names)
    args = cp.make_args(row)
    ins = tuple(spmd.NamedSharding(mesh, P(*s)) for s in row.in_specs)
    f = spmd.jit(lambda *a: row.fn(np, *a), in_shardings=ins,
                 out_shardings=cp.out_shardings(row, mesh, spmd.NamedSharding, P), executor=STRICT)
    for g, w in zip(optree.tree_leaves(f(*args)), optree.tree_leaves(row.fn(np, *args)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape, names, ax", tc.CASES[::3])
@pytest.mark.parametrize("row", tc.ROWS, ids=repr)
def test_collective_table(row, shape, names, ax):
    axes = tc._axes(ax)
    k = math.prod(shape[names.index(a)] for a in axes)
    mesh = spmd.make_mesh(shape, names)
    blocks, x = tc._input(shape, names, row.local(k), row.dtype)
    every = P(tuple(names))

    def body(C, xb):
        return tc._call_with_groups(row, C, xb, ax, k, {})[None]
    got = np.asarray(run_spmd(body, mesh, every, every, x, executor=STRICT))
    want = np.asarray(run_spmd(body, mesh, every, every, x, executor=REFERENCE))
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("recipe", ["fsdp", "zero2", "tp_vocab", "dp_fsdp_tp_pp"])
def test_recipes_train_as_on_the_host(monkeypatch, recipe):
    """spmd.parallel's recipes (all_gather/psum_scatter, vocab-parallel loss, GPipe on scan)."""
    G = importlib.import_module("test_train_gpt").G
    assert recipe in G.RECIPES
    jit_module = importlib.import_module("spmd.jit")
    monkeypatch.setitem(jit_module._FACTORIES, "strict", StrictStacked)
    monkeypatch.setenv("SPMD_EXECUTOR", "stacked")
    host = G.train_recipe(recipe, 2)
    monkeypatch.setenv("SPMD_EXECUTOR", "strict")
    np.testing.assert_allclose(G.train_recipe(recipe, 2), host, rtol=1e-6)


def test_a_mesh_of_a_platforms_devices_runs_on_its_executor(monkeypatch):
    """A program on a mesh of a plug-in platform's devices runs on the executor the plug-in
    registered for it (as ``spmd.gpu`` does for "gpu"), found from an argument's mesh or from
    a ``shard_map``'s; ``SPMD_EXECUTOR`` still overrides; a CPU mesh stays on the host."""
    devices_module = importlib.import_module("spmd.devices")
    Device = devices_module.Device
    jit_module = importlib.import_module("spmd.jit")
    fake = tuple(Device(i, "fake", 0, i) for i in range(8))
    monkeypatch.setitem(devices_module._platforms, "fake", lambda: fake)
    monkeypatch.setattr(jit_module, "_FACTORIES", dict(jit_module._FACTORIES))
    monkeypatch.setattr(jit_module, "_BY_PLATFORM", {})
    monkeypatch.setattr(jit_module, "_EXECUTORS", {})
    monkeypatch.delenv("SPMD_EXECUTOR", raising=False)
    ran = []

    class Counting(StrictStacked):
        def run(self, program, args):
            ran.append(program)
            return super().run(program, args)
    jit_module.register_executor("fake", Counting, platform="fake")

    mesh = spmd.make_mesh((2, 4), ("a", "b"), devices=spmd.devices("fake"))
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    f = spmd.shard_map(lambda b: spmd.psum(b, "b"), mesh=mesh, in_specs=P("a", "b"), out_specs=P("a"))
    np.testing.assert_array_equal(np.asarray(spmd.jit(f)(x)),
                                  np.asarray(spmd.jit(f, executor=REFERENCE)(x)))
    assert len(ran) == 1                                  # from the shard_map's mesh
    placed = spmd.device_put(x, spmd.NamedSharding(mesh, P("a")))
    np.testing.assert_array_equal(np.asarray(spmd.jit(lambda v: v * 2)(placed)), x * 2)
    assert len(ran) == 2                                  # from the argument's mesh
    monkeypatch.setenv("SPMD_EXECUTOR", "stacked")
    spmd.jit(f)(x)
    assert len(ran) == 2
    monkeypatch.delenv("SPMD_EXECUTOR")
    cpu = spmd.shard_map(lambda b: b * 2, mesh=spmd.make_mesh((8,), ("i",)), in_specs=P("i"),
                         out_specs=P("i"))
    spmd.jit(cpu)(x)
    assert len(ran) == 2
