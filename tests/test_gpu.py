"""GPU tests (``pytest -m gpu``): skipped, with the reason, where there is no usable GPU.

- the collective table of ``test_collectives.py`` (every row, every mesh, with and without
  ``axis_index_groups``) on each GPU executor: the stacked executor on virtual devices
  (``SPMD_VIRTUAL_DEVICES=8`` on GPU 0) and, where there are enough GPUs, the NCCL executor;
  each against NumPy and the reference executor;
- shard_map programs (nested, closures, check_vma=False, pytrees, partial manual axes) on each
  GPU executor against the reference executor, and the sharding compiler's program table
  (``compiler_programs.py``) against NumPy;
- the kernels on their own: every instantiation loads on this GPU; pack/unpack, the fused
  reduces, the batched copy against NumPy; the one-/two-shot peer all-reduce on every GPU pair
  with P2P; the NCCL communicator's methods against the in-process communicator.
"""
import math
import os

import numpy as np
import pytest

import spmd
from spmd import P
from spmd.executors import reference_executor

import spmd.gpu as gpu

_OK, _WHY = gpu.available()
if not _OK and os.environ.get("SPMD_REQUIRE_GPU") == "1":      # GPU CI: a missing GPU is a failure
    raise RuntimeError(f"SPMD_REQUIRE_GPU=1 but there is no usable GPU: {_WHY}")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason=f"no usable GPU: {_WHY}")]

REFERENCE = reference_executor()
VIRTUAL = 8


def _n_gpus():
    return gpu.gpu_count() if _OK else 0


class GpuExecutor:
    """One GPU executor of the parametrisation, and the GPU devices its meshes are made of."""

    def __init__(self, name):
        self.name = name
        self._executor = None

    def __repr__(self):
        return self.name

    def devices(self, n):
        if self.name == "cupy-stacked":
            os.environ["SPMD_VIRTUAL_DEVICES"] = str(VIRTUAL)
        else:
            os.environ.pop("SPMD_VIRTUAL_DEVICES", None)
        devs = spmd.devices("gpu")
        if len(devs) < n:
            pytest.skip(f"{self.name} needs {n} GPUs, this machine has {len(devs)}")
        return devs[:n]

    @property
    def executor(self):
        if self._executor is None:
            self._executor = gpu.stacked_executor() if self.name == "cupy-stacked" else gpu.nccl_executor()
        return self._executor

    def close(self):
        for comm in getattr(self._executor, "_comms", {}).values():
            comm.close()


EXECUTORS = [GpuExecutor("cupy-stacked"), GpuExecutor("nccl")]


@pytest.fixture(scope="module", autouse=True)
def _restore_env():
    saved = os.environ.get("SPMD_VIRTUAL_DEVICES")
    yield
    for ex in EXECUTORS:
        ex.close()
    if saved is None:
        os.environ.pop("SPMD_VIRTUAL_DEVICES", None)
    else:
        os.environ["SPMD_VIRTUAL_DEVICES"] = saved


def _mesh(ex, shape, names):
    return spmd.make_mesh(shape, names, devices=ex.devices(math.prod(shape)))


# ---------------------------------------------------------------------------------------------
# the collective table on every GPU executor
# ---------------------------------------------------------------------------------------------

import test_collectives as tc  # noqa: E402
from _jax_oracle import run_spmd  # noqa: E402


def check_row_on(ex, row, shape, names, ax, groups=None):
    axes = tc._axes(ax)
    k = math.prod(shape[names.index(a)] for a in axes) if groups is None else len(groups[0])
    mesh = _mesh(ex, shape, names)
    blocks, x = tc._input(shape, names, row.local(k), row.dtype)
    every = P(tuple(names))
    gkw = {} if groups is None else {"axis_index_groups": groups}

    def body(C, xb):
        return tc._call_with_groups(row, C, xb, ax, k, gkw)[None]

    want = tc.per_group(blocks, shape, names, axes, groups, row.expect)
    got = np.asarray(run_spmd(body, mesh, every, every, x, executor=ex.executor))
    np.testing.assert_allclose(got, want.astype(got.dtype), rtol=1e-6, err_msg=f"{ex} vs NumPy")
    ref = np.asarray(run_spmd(body, mesh, every, every, x, executor=REFERENCE))
    assert got.dtype == ref.dtype
    np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=f"{ex} vs reference")


@pytest.mark.parametrize("ex", EXECUTORS, ids=repr)
@pytest.mark.parametrize("shape, names, ax", tc.CASES)
@pytest.mark.parametrize("row", tc.ROWS, ids=repr)
def test_collective_table(ex, row, shape, names, ax):
    check_row_on(ex, row, shape, names, ax)


@pytest.mark.parametrize("ex", EXECUTORS, ids=repr)
@pytest.mark.parametrize("shape, names, ax, groups", tc.GROUP_CASES,
                         ids=[f"{'x'.join(map(str, c[0]))}-{c[3]}" for c in tc.GROUP_CASES])
@pytest.mark.parametrize("row", tc.GROUP_ROWS, ids=repr)
def test_collective_table_with_groups(ex, row, shape, names, ax, groups):
    check_row_on(ex, row, shape, names, ax, groups=groups)


# ---------------------------------------------------------------------------------------------
# shard_map programs on every GPU executor
# ---------------------------------------------------------------------------------------------

X = np.arange(64, dtype=np.float32).reshape(8, 8)
W = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)


def _matmul(mesh):
    f = spmd.shard_map(lambda x, w: spmd.psum(x @ w, "b"), mesh=mesh,
                       in_specs=(P("a", "b"), P("b", None)), out_specs=P("a", None))
    return f, (X, W)


def _nested(mesh):
    inner = lambda x: spmd.psum(x, "b")
    outer = lambda x: spmd.shard_map(inner, mesh=mesh, in_specs=P(None, "b"), out_specs=P(),
                                     axis_names={"b"})(x) * spmd.axis_index("a")
    return spmd.shard_map(outer, mesh=mesh, in_specs=P("a", None), out_specs=P("a", None),
                          axis_names={"a"}), (X,)


def _closure(mesh):
    c = np.float32(3)
    return spmd.shard_map(lambda x: spmd.pmean(x * c, ("a", "b")), mesh=mesh,
                          in_specs=P("a", "b"), out_specs=P()), (X,)


def _unchecked(mesh):
    return spmd.shard_map(lambda x: x + 1, mesh=mesh, in_specs=P("a"), out_specs=P(),
                          check_vma=False), (X,)


def _pytree(mesh):
    body = lambda d: {"s": spmd.psum(d["x"].sum(0), "a"),
                      "g": spmd.all_gather(d["y"], "b", axis=1, tiled=True, to="invariant")}
    f = spmd.shard_map(body, mesh=mesh, in_specs=({"x": P("a", "b"), "y": P(None, "b")},),
                       out_specs={"s": P("b"), "g": P()})
    return (lambda x, y: f({"x": x, "y": y})), (X, W)


def _ring(mesh):
    def body(x):
        n = spmd.axis_size("b")
        acc = x
        for _ in range(n - 1):
            x = spmd.ppermute(x, "b", [(i, (i + 1) % n) for i in range(n)])
            acc = acc + x
        return acc
    return spmd.shard_map(body, mesh=mesh, in_specs=P("a", "b"), out_specs=P("a", "b")), (X,)


def _scatter_gather(mesh):
    def body(x):
        x = x * (spmd.axis_index("b") + 1).astype(x.dtype)          # varies over "b"
        s = spmd.psum_scatter(x, "b", scatter_dimension=1, tiled=True)
        return spmd.all_gather(s, "b", axis=1, tiled=True, to="invariant")
    return spmd.shard_map(body, mesh=mesh, in_specs=P("a", None), out_specs=P("a", None)), (X,)


def _a2a(mesh):
    body = lambda x: spmd.all_to_all(x, "b", 1, 0, tiled=True)
    return spmd.shard_map(body, mesh=mesh, in_specs=P("a", None), out_specs=P(("a", "b"), None)), (X,)


PROGRAMS = [_matmul, _nested, _closure, _unchecked, _pytree, _ring, _scatter_gather, _a2a]


@pytest.mark.parametrize("ex", EXECUTORS, ids=repr)
@pytest.mark.parametrize("make", PROGRAMS, ids=lambda f: f.__name__.strip("_"))
def test_shard_map_programs(ex, make):
    mesh = _mesh(ex, (2, 4), ("a", "b"))
    f, args = make(mesh)
    got = spmd.jit(f, executor=ex.executor)(*args)
    want = spmd.jit(f, executor=REFERENCE)(*args)
    import optree
    for g, w in zip(optree.tree_leaves(got), optree.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the sharding compiler's program table on every GPU executor
# ---------------------------------------------------------------------------------------------

import compiler_programs as cp  # noqa: E402


def run_compiled_on(ex, row):
    sizes, names = row.mesh
    mesh = _mesh(ex, sizes, names)
    args = cp.make_args(row)
    ins = tuple(spmd.NamedSharding(mesh, P(*s)) for s in row.in_specs)
    f = spmd.jit(lambda *a: row.fn(np, *a), in_shardings=ins,
                 out_shardings=cp.out_shardings(row, mesh, spmd.NamedSharding, P), executor=ex.executor)
    import optree
    for g, w in zip(optree.tree_leaves(f(*args)), optree.tree_leaves(row.fn(np, *args)), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5, err_msg=f"{row.name} on {ex}")


@pytest.mark.parametrize("ex", EXECUTORS, ids=repr)
@pytest.mark.parametrize("row", cp.ROWS, ids=[r.name for r in cp.ROWS])
def test_compiler_table(ex, row):
    run_compiled_on(ex, row)


# ---------------------------------------------------------------------------------------------
# the kernels on their own
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cupy():
    import cupy
    return cupy


def test_every_instantiation_loads(cupy):
    from spmd.gpu import kernels
    for name in kernels.SOURCES:
        for expr in kernels.INSTANTIATIONS[name]:
            assert kernels.kernel(name, expr) is not None


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64, np.complex128])
@pytest.mark.parametrize("shape, dim, n", [((8, 6, 5), 1, 3), ((4, 12), 1, 4), ((12,), 0, 3),
                                           ((2, 3, 4, 6), 3, 2), ((6, 7), 0, 6)])
def test_pack_unpack_match_numpy(cupy, dtype, shape, dim, n):
    from spmd.gpu import ops
    x = (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)
    split = lambda a: a.reshape(a.shape[:dim] + (n, -1) + a.shape[dim + 1:])
    layouts = [lambda m, a: a, lambda m, a: m.asfortranarray(a),          # strided sources too
               lambda m, a: m.repeat(a, 2, axis=-1)[..., ::2]]
    for make in layouts:
        host, dev = make(np, x), make(cupy, cupy.asarray(x))
        packed = ops.pack(cupy.moveaxis(split(dev), dim, 0))
        np.testing.assert_array_equal(packed.get(), np.ascontiguousarray(np.moveaxis(split(host), dim, 0)))
        target = cupy.zeros(shape, dtype)
        ops.unpack(packed, cupy.moveaxis(split(target), dim, 0))
        np.testing.assert_array_equal(target.get(), x)


@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reduce_axis_matches_numpy(cupy, op, dtype, axis):
    from spmd.gpu import ops
    x = np.random.default_rng(0).integers(-50, 50, size=(4, 8, 33)).astype(dtype)
    got = ops.reduce_axis(cupy.asarray(x), axis, op).get()
    want = getattr(np, op)(x, axis=axis, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-3 if dtype == np.float16 else 1e-6)
    if op == "sum" and np.dtype(dtype).kind == "f":
        got = ops.reduce_axis(cupy.asarray(x), axis, "sum", scale=0.25).get()
        np.testing.assert_allclose(got, want * dtype(0.25), rtol=1e-3 if dtype == np.float16 else 1e-6)


def test_reduce_ptrs_and_nan_propagation(cupy):
    from spmd.gpu import ops
    xs = [np.random.default_rng(i).random(1001).astype(np.float32) for i in range(5)]
    xs[2][7] = np.nan
    for op, fn in (("sum", np.add), ("max", np.maximum), ("min", np.minimum)):
        out = cupy.empty(1001, np.float32)
        ops.reduce_ptrs([cupy.asarray(x) for x in xs], out, op)
        want = xs[0]
        for x in xs[1:]:
            want = fn(want, x)
        np.testing.assert_allclose(out.get(), want, rtol=1e-6)


def test_copy_batched(cupy):
    from spmd.gpu import ops
    srcs = [cupy.arange(n, dtype=np.uint8) for n in (1, 17, 4096, 100003)]
    dsts = [cupy.zeros_like(s) for s in srcs]
    ops.copy_batched(list(zip(srcs, dsts)))
    for s, d in zip(srcs, dsts):
        np.testing.assert_array_equal(s.get(), d.get())


def _p2p_ordinals(cupy, want):
    n = _n_gpus()
    if n < 2:
        pytest.skip(f"the peer all-reduce needs 2 GPUs, this machine has {n}")
    ords = list(range(min(n, want)))
    rt = cupy.cuda.runtime
    if not all(rt.deviceCanAccessPeer(i, j) for i in ords for j in ords if i != j):
        pytest.skip("these GPUs have no P2P access to each other")
    return ords


@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64])
@pytest.mark.parametrize("nbytes", [16, 4096, 1 << 20])
def test_peer_all_reduce(cupy, algorithm, dtype, nbytes):
    from spmd.gpu.peer import PeerAllReduce
    ords = _p2p_ordinals(cupy, 8)
    ranks = PeerAllReduce.in_process(ords, 1 << 20)
    try:
        count = nbytes // np.dtype(dtype).itemsize
        host = [np.random.default_rng(r).integers(-4, 5, count).astype(dtype) for r in ords]
        for rep in range(3):                    # epochs advance; the flags are reused
            outs = []
            for r, o in enumerate(ords):
                with cupy.cuda.Device(o):
                    x = cupy.asarray(host[r] * (rep + 1))
                    outs.append(ranks[r](x, cupy.empty_like(x), "sum", algorithm))
            want = sum(h * (rep + 1) for h in host)
            for o, out in zip(ords, outs):
                with cupy.cuda.Device(o):
                    np.testing.assert_allclose(out.get(), want, rtol=1e-3)
    finally:
        for r in ranks:
            r.close()


def test_nccl_communicator_matches_in_process(cupy):
    from spmd.communicators.inprocess import InProcessCommunicator
    from spmd.communicators.nccl import NcclCommunicator
    ex = EXECUTORS[1]
    n = min(_n_gpus(), 4)
    if n < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {n}")
    mesh = spmd.make_mesh((n,), ("i",), devices=ex.devices(n))
    ref = InProcessCommunicator(mesh)
    host = {p: np.random.default_rng(p).integers(-5, 5, (n, 3)).astype(np.float32) for p in range(n)}
    with NcclCommunicator.for_mesh(mesh) as comm:
        dev = {p: comm.placement.to_local(p, h) for p, h in host.items()}
        calls = [("all_reduce", (("i",), None, "sum")), ("all_reduce", (("i",), None, "max")),
                 ("all_gather", (("i",), None)), ("reduce_scatter", (("i",), None, "sum")),
                 ("all_to_all", (("i",), None)), ("permute", (("i",), [(0, 1), (1, 0)])),
                 ("broadcast", (("i",), None, 1))]
        for name, args in calls:
            got = getattr(comm, name)(dev, *args)
            want = getattr(ref, name)(host, *args)
            for p in range(n):
                np.testing.assert_allclose(comm.placement.to_host(got[p]), want[p], err_msg=name)
        comm.barrier()
    assert comm._closed


def test_nccl_executor_rejects_virtual_devices():
    os.environ["SPMD_VIRTUAL_DEVICES"] = "4"
    try:
        mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices("gpu")[:4])
        f = spmd.shard_map(lambda x: spmd.psum(x, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
        with pytest.raises(ValueError, match="one GPU per mesh device"):
            spmd.jit(f, executor=gpu.nccl_executor())(np.ones(4, np.float32))
    finally:
        os.environ.pop("SPMD_VIRTUAL_DEVICES", None)


# ---------------------------------------------------------------------------------------------
# a whole model: SPMD_EXECUTOR=gpu
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parallel,compiler", [("dp_tp", False), ("dp_tp", True), ("tp", False)])
def test_gpt_trains_on_the_gpu_as_on_the_host(monkeypatch, parallel, compiler):
    """``examples/train_gpt.py`` (shard_map or jit shardings, autodiff, Adam) with every
    ``spmd.jit`` on the GPU (``SPMD_EXECUTOR=gpu``, 8 virtual devices): the losses of the host's
    stacked executor, step by step."""
    import test_train_gpt
    G = test_train_gpt.G
    monkeypatch.setenv("SPMD_EXECUTOR", "stacked")
    host = G.train(spmd, np, parallel, compiler, steps=4)
    monkeypatch.setenv("SPMD_EXECUTOR", "gpu")
    on_gpu = G.train(spmd, np, parallel, compiler, steps=4)
    np.testing.assert_allclose(on_gpu, host, rtol=2e-5)
    assert on_gpu[-1] < on_gpu[0]


def test_pipeline_recipe_trains_on_the_gpu_as_on_the_host(monkeypatch):
    """DP x FSDP x TP x GPipe (scan over the stages) with SPMD_EXECUTOR=gpu."""
    import test_train_gpt
    G = test_train_gpt.G
    monkeypatch.setenv("SPMD_EXECUTOR", "stacked")
    host = G.train_recipe("dp_fsdp_tp_pp", 3)
    monkeypatch.setenv("SPMD_EXECUTOR", "gpu")
    np.testing.assert_allclose(G.train_recipe("dp_fsdp_tp_pp", 3), host, rtol=2e-5)


@pytest.mark.parametrize("virtual", [8, None], ids=["virtual", "one-gpu-per-device"])
def test_a_gpu_mesh_runs_on_the_gpus_by_default(monkeypatch, virtual):
    """Without ``executor=`` or ``SPMD_EXECUTOR``, a program on a mesh of GPU devices runs on
    the GPUs: virtual devices on the stacked executor on GPU 0, real ones on NCCL."""
    import importlib
    jit_module = importlib.import_module("spmd.jit")
    monkeypatch.delenv("SPMD_EXECUTOR", raising=False)
    if virtual:
        monkeypatch.setenv("SPMD_VIRTUAL_DEVICES", str(virtual))
    else:
        monkeypatch.delenv("SPMD_VIRTUAL_DEVICES", raising=False)
    devs = spmd.devices("gpu")
    n = 8 if virtual else len(devs)
    mesh = spmd.make_mesh((n,), ("i",), devices=devs[:n])
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    f = spmd.shard_map(lambda b: spmd.psum(b, "i") * 2, mesh=mesh, in_specs=P("i"), out_specs=P())
    np.testing.assert_allclose(np.asarray(spmd.jit(f)(x)), x.sum(0, keepdims=True) * 2)
    name = "gpu" if virtual else "nccl"
    made = jit_module._EXECUTORS[name]
    assert isinstance(made, gpu.CupyStackedExecutor if virtual else gpu.PerDeviceExecutor)
