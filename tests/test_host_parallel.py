"""The big-value paths of the stacked collectives (slab loops into output buffers, split over
host threads), forced on small arrays and compared bit for bit with the reference executor;
the C pool of matrix products against NumPy."""
import collections
import math
import threading
import time

import numpy as np
import pytest

import spmd
from spmd import P, _cbuild, _gemm, _host_parallel
from spmd.executors import reference_executor

REFERENCE = reference_executor()


@pytest.fixture
def big_paths(monkeypatch):
    """Every collective takes its big-value path, on the thread pool."""
    monkeypatch.setattr(_host_parallel, "LOOP_MIN_BYTES", 0)
    monkeypatch.setattr(_host_parallel, "REDUCE_LOOP_MIN_BYTES", 0)
    monkeypatch.setattr(_host_parallel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(_host_parallel, "ELEMENTWISE_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(_host_parallel, "COPY_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(_host_parallel, "num_threads", lambda: 3)   # uneven chunks


def _ring(n):
    return [(i, (i + 1) % n) for i in range(n)]


def _halves(n):
    """Even and odd indices: two axis_index_groups (one group when n is odd)."""
    return [list(range(0, n, 2)), list(range(1, n, 2))] if n % 2 == 0 else [list(range(n))]


f32, i32 = np.float32, np.int32
# id, body(x, ax, n), local block shape(n), dtype
ROWS = [
    ("psum", lambda x, ax, n: spmd.psum(x, ax), lambda n: (2, 3), f32),
    ("psum-int32", lambda x, ax, n: spmd.psum(x, ax), lambda n: (5,), i32),
    ("psum-bool", lambda x, ax, n: spmd.psum(x, ax), lambda n: (3,), np.bool_),
    ("psum-scalar", lambda x, ax, n: spmd.psum(x.sum(), ax), lambda n: (2,), f32),
    ("pmax", lambda x, ax, n: spmd.pmax(x, ax), lambda n: (2, 3), f32),
    ("pmin", lambda x, ax, n: spmd.pmin(x, ax), lambda n: (2, 3), i32),
    ("psum-groups", lambda x, ax, n: spmd.psum(x, ax, axis_index_groups=_halves(n)),
     lambda n: (3, 2), f32),
    ("all_gather", lambda x, ax, n: spmd.all_gather(x, ax), lambda n: (2, 3), f32),
    ("all_gather-tiled-0", lambda x, ax, n: spmd.all_gather(x, ax, tiled=True), lambda n: (2, 3), f32),
    ("all_gather-tiled-1", lambda x, ax, n: spmd.all_gather(x, ax, axis=1, tiled=True),
     lambda n: (2, 3), f32),
    ("all_gather-invariant", lambda x, ax, n: spmd.all_gather(x, ax, axis=1, tiled=True, to="invariant"),
     lambda n: (2, 3), f32),
    ("psum_scatter", lambda x, ax, n: spmd.psum_scatter(x, ax), lambda n: (n, 3), f32),
    ("psum_scatter-tiled-0", lambda x, ax, n: spmd.psum_scatter(x, ax, tiled=True),
     lambda n: (2 * n, 3), i32),
    ("psum_scatter-tiled-1", lambda x, ax, n: spmd.psum_scatter(x, ax, scatter_dimension=1, tiled=True),
     lambda n: (3, 2 * n), f32),
    ("psum_scatter-groups", lambda x, ax, n: spmd.psum_scatter(
        x, ax, tiled=True, axis_index_groups=[list(range(n))[::-1]]), lambda n: (n, 2), f32),
    ("all_to_all-tiled-0-0", lambda x, ax, n: spmd.all_to_all(x, ax, 0, 0, tiled=True),
     lambda n: (2 * n, 3), f32),
    ("all_to_all-tiled-0-1", lambda x, ax, n: spmd.all_to_all(x, ax, 0, 1, tiled=True),
     lambda n: (n, 3), f32),
    ("all_to_all-1-0", lambda x, ax, n: spmd.all_to_all(x, ax, 1, 0), lambda n: (2, n), f32),
    ("ppermute-ring", lambda x, ax, n: spmd.ppermute(x, ax, _ring(n)), lambda n: (2, 3), f32),
    ("ppermute-partial", lambda x, ax, n: spmd.ppermute(x, ax, [(0, n - 1)]), lambda n: (2, 3), f32),
    ("ppermute-shift", lambda x, ax, n: spmd.ppermute(x, ax, [(s, s + 1) for s in range(n - 1)]),
     lambda n: (2, 3), f32),
    ("ppermute-invariant-input", lambda x, ax, n: spmd.ppermute(spmd.psum(x, ax), ax, _ring(n)),
     lambda n: (2, 3), f32),
]

MESHES = [((8,), ("i",), "i"), ((2, 4), ("a", "b"), "b"), ((2, 4), ("a", "b"), "a"),
          ((2, 4), ("a", "b"), ("b", "a"))]


@pytest.mark.parametrize("mesh_shape,names,ax", MESHES, ids=lambda v: str(v))
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r[0])
def test_big_paths_match_reference(big_paths, row, mesh_shape, names, ax):
    _, body, local, dtype = row
    mesh = spmd.make_mesh(mesh_shape, names)
    n = math.prod(mesh.axis_size(a) for a in ((ax,) if isinstance(ax, str) else ax))
    shape = local(n)
    blocks = np.random.default_rng(0).integers(-8, 9, (mesh.size,) + shape).astype(dtype)
    x = blocks.reshape((mesh.size * shape[0],) + shape[1:])
    every = P(tuple(names))
    f = spmd.shard_map(lambda b: body(b, ax, n)[None], mesh=mesh, in_specs=every, out_specs=every)
    got = np.asarray(spmd.jit(f)(spmd.device_put(x, spmd.NamedSharding(mesh, every))))
    want = np.asarray(spmd.jit(f, executor=REFERENCE)(x))
    np.testing.assert_array_equal(got, want)


def test_reduce_into_adds_in_order_over_chunks():
    rng = np.random.default_rng(1)
    slabs = [rng.standard_normal((7, 5)).astype(np.float32) for _ in range(5)]
    out = np.empty((7, 5), np.float32)
    for parts in (1, 2, 3, 9):
        chunks = _host_parallel.chunks(out.shape, parts)
        covered = np.zeros(out.shape, int)
        for idx in chunks:
            covered[idx] += 1
        assert (covered == 1).all()
    _host_parallel.reduce_into(np, "sum", out, slabs)
    want = slabs[0] + slabs[1]
    for s in slabs[2:]:
        want = want + s
    np.testing.assert_array_equal(out, want)


def test_reshape_is_a_view_when_strides_allow(big_paths):
    x = np.arange(24.0).reshape(2, 3, 4)
    assert np.shares_memory(_host_parallel.reshape(np, x, (6, 4)), x)
    t = x.transpose(1, 0, 2)
    y = _host_parallel.reshape(np, t, (6, 4))
    assert not np.shares_memory(y, x)
    np.testing.assert_array_equal(y, t.reshape(6, 4))


def test_threads_run_every_task(big_paths):
    done = []
    _host_parallel.run(np, 1 << 30, [lambda i=i: done.append(i) for i in range(10)])
    assert sorted(done) == list(range(10))


def test_pooled_buffers_are_reused_only_once_free():
    _host_parallel.release_pool()                 # no free buffer of this size left by others
    shape = (_host_parallel.POOL_MIN_BYTES // 4,)
    a = _host_parallel.empty(np, shape, np.float32)
    a[:] = 1
    view = a[::2]
    del a
    b = _host_parallel.empty(np, shape, np.float32)   # ``view`` still holds the first buffer
    b[:] = 2
    assert not np.shares_memory(b, view) and (view == 1).all()
    address = b.__array_interface__["data"][0]
    del b
    c = _host_parallel.empty(np, shape, np.int32)
    assert c.__array_interface__["data"][0] == address and c.dtype == np.int32


@pytest.mark.parametrize("xs, ys, contract", [
    ((2, 1, 5, 6), (1, 4, 6, 7), ((1,), (0,))),      # x over data, w over model: both fold
    ((2, 4, 5, 6), (1, 4, 6, 7), ((1,), (0,))),      # x folds its data dim into its rows
    ((2, 1, 5, 6), (1, 4, 7, 6), ((1,), (1,))),      # w transposed
    ((2, 1, 6, 5), (2, 4, 6, 7), ((0,), (0,))),      # y's model dim cannot fold without a copy
])
def test_matmul_with_devices_folded(big_paths, monkeypatch, xs, ys, contract):
    """dot_general of operands that vary over different mesh axes (one big product, cut into
    row blocks over the threads) equals the per-device products."""
    monkeypatch.setattr(_host_parallel, "MATMUL_MIN_FLOPS", 0)
    from spmd import prims as lax
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=xs), rng.normal(size=ys)
    got = lax.dot_general_p.impl(np, 2, x, y, contract=contract, batch=((), ()))
    (xc,), (yc,) = contract
    want = np.matmul(np.swapaxes(x, -1, -2) if xc == 0 else x, np.swapaxes(y, -1, -2) if yc == 1 else y)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("shapes", [((2, 4, 6, 5), (2, 4, 6, 5)), ((2, 1, 6, 5), (1, 4, 1, 5)), ((1, 4, 6, 5), ()),
                                    ((1, 1, 7, 3), (1, 1, 7, 3))])
def test_elementwise_blocks_match_one_call(big_paths, monkeypatch, shapes):
    """Elementwise ops on stacked values, cut into blocks over the threads (operands broadcast)."""
    monkeypatch.setattr(_host_parallel, "BLOCK_BYTES", 16)
    from spmd import prims as lax
    rng = np.random.default_rng(0)
    x, y = (rng.normal(size=s).astype(np.float32) for s in shapes)
    for p, args in ((lax.mul_p, (x, y)), (lax.sub_p, (x, 1.5)), (lax.tanh_p, (x,)), (lax.lt_p, (x, y))):
        got = p.impl(np, 2, *args)
        want = p.impl(np, 0, *args)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_concatenate_pieces_match_one_call(big_paths):
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(2, 4, n)).astype(np.float32) for n in (5, 1, 7)]
    for axis in (0, 2):
        np.testing.assert_array_equal(_host_parallel.concatenate(np, xs if axis else xs[:1] * 3, axis),
                                      np.concatenate(xs if axis else xs[:1] * 3, axis=axis))


def _writing_ufuncs():
    from spmd import prims as lax
    prims = list(lax.UNARY.values()) + list(lax.BINARY.values())
    return [(p.name, p.rules["elementwise"], p in lax.BINARY.values()) for p in prims
            if getattr(p.rules["elementwise"], "writes_into", False)]


@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (3, 5, 2), (1, 4, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.float64])
def test_blocked_elementwise_writes_every_block_right(big_paths, monkeypatch, shape, dtype):
    """Every ufunc-backed primitive, cut into blocks along a dim after the first (strided result
    blocks), equals the one-call result: NumPy's own ``negative`` gets such an ``out=`` wrong."""
    monkeypatch.setattr(_host_parallel, "ELEMENTWISE_BLOCK_BYTES", 4)
    rng = np.random.default_rng(3)
    x = (rng.random(shape) * 4 + 1).astype(dtype)
    y = (rng.random(shape) * 3 + 1).astype(dtype)
    for name, fn, binary in _writing_ufuncs():
        args = (x, y) if binary else (x,)
        try:
            with np.errstate(all="ignore"):
                want = fn(np, *args)
        except TypeError:                           # e.g. bitwise ops on floats
            continue
        with np.errstate(all="ignore"):
            got = _host_parallel.elementwise(np, fn, *args)
        np.testing.assert_array_equal(got, want, err_msg=name)


class _DeviceNumpy:
    """NumPy under another name, as the collectives see a GPU's array module (CuPy), counting
    the calls made through it (each would be a kernel launch there)."""

    __name__ = "device_numpy"

    def __init__(self):
        self.calls = collections.Counter()

    def __getattr__(self, name):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attr(*args, **kwargs)
        return counted


def test_device_arrays_are_one_block_per_call():
    """Host-thread blocking is for host arrays: on a device's array module a reduction is one
    call per slab and a copy is one call, however big."""
    xp = _DeviceNumpy()
    slabs = [np.full(4 * _host_parallel.BLOCK_BYTES // 4, i, np.float32) for i in range(5)]
    out = np.empty_like(slabs[0])
    _host_parallel.reduce_into(xp, "sum", out, slabs)
    np.testing.assert_array_equal(out, sum(slabs))
    assert xp.calls["add"] == 4
    assert len(_host_parallel.copy_tasks(xp, out, slabs[1])) == 1
    assert len(_host_parallel.copy_tasks(np, out, slabs[1])) > 1


@pytest.mark.parametrize("perm", [[(i, (i + 1) % 8) for i in range(8)], [(0, 7)], [(3, 4), (4, 3)]],
                         ids=["ring", "one", "swap"])
def test_device_ppermute_copies_runs(monkeypatch, perm):
    """A ppermute on a device's arrays is block copies of runs (no gather with a host index),
    with the same result as on the host."""
    class Mesh:
        axis_names, axis_sizes = ("i",), (8,)
    rule = spmd.collectives.ppermute_p.rules["stacked"]
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 2, 3)
    xp = _DeviceNumpy()
    monkeypatch.setattr(_host_parallel, "DEVICE_MODULES", _host_parallel.DEVICE_MODULES | {xp.__name__})
    got = rule(xp, Mesh, x, axes=("i",), perm=tuple(perm))
    np.testing.assert_array_equal(got, rule(np, Mesh, x, axes=("i",), perm=tuple(perm)))
    assert xp.calls["take"] == 0 and xp.calls["copyto"] >= 1


# ---------------------------------------------------------------------------------------------
# the C pool of matrix products (spmd._gemm)
# ---------------------------------------------------------------------------------------------

def _pool_products(a, b, parts=1):
    """``a @ b`` through ``_gemm.products`` (asserting the pool took it), row blocks ``parts``."""
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = (np.broadcast_to(x, lead + x.shape[-2:]) for x in (a, b))
    out = np.full(lead + (a.shape[-2], b.shape[-1]), np.nan, np.result_type(a, b))
    cuts = [a.shape[-2] * j // parts for j in range(parts + 1)]
    assert _gemm.products(a, b, out, cuts, 3), "the product pool refused the product"
    return out


needs_pool = pytest.mark.skipif(
    not _gemm._openblas_cblas() or _cbuild.compiler() is None,
    reason="the product pool needs NumPy's bundled OpenBLAS and a C compiler")


@needs_pool
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["plain", "a transposed", "b transposed", "a broadcast",
                                    "row blocks", "one product, row blocks", "strided rows"])
def test_pool_products_equal_numpy(dtype, layout):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 3, 24, 16)).astype(dtype)
    b = rng.standard_normal((4, 3, 16, 40)).astype(dtype)
    parts = 1
    if layout == "a transposed":
        a = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    elif layout == "b transposed":
        b = np.ascontiguousarray(np.swapaxes(b, -1, -2)).swapaxes(-1, -2)
    elif layout == "a broadcast":
        a = a[:1]
    elif layout == "row blocks":
        parts = 5
    elif layout == "one product, row blocks":
        a, b, parts = a[0, 0], b[0, 0], 7
    elif layout == "strided rows":
        a = rng.standard_normal((4, 3, 48, 20)).astype(dtype)[..., ::2, 2:18]
    got = _pool_products(a, b, parts)
    np.testing.assert_allclose(got, np.matmul(a, b), rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5)


@needs_pool
def test_pool_refuses_what_blas_cannot_read_and_writes_nothing(monkeypatch):
    a, b = np.ones((2, 4, 6), np.float32), np.ones((2, 6, 5), np.float32)
    out = np.full((2, 4, 5), -1.0, np.float32)
    strided = np.ones((2, 4, 12), np.float32)[..., ::2]          # a column stride BLAS lacks
    assert not _gemm.products(strided, b, out, [0, 4], 2)
    assert not _gemm.products(a.astype(np.int32), b.astype(np.int32), out.astype(np.int32),
                              [0, 4], 2)
    assert not _gemm.products(a, b.astype(np.float64), out, [0, 4], 2)
    monkeypatch.setenv("SPMD_NATIVE", "0")
    assert not _gemm.products(a, b, out, [0, 4], 2)
    assert (out == -1).all()


@needs_pool
def test_pool_products_from_many_threads_at_once():
    """Threads that call the pool together: one takes the pool, the others run their products
    on their own thread; every result is right."""
    rng = np.random.default_rng(5)
    pairs = [(rng.standard_normal((8, 32, 48)), rng.standard_normal((8, 48, 16)))
             for _ in range(6)]
    errors, barrier = [], threading.Barrier(len(pairs))

    def one(a, b):
        try:
            barrier.wait()
            for _ in range(20):
                np.testing.assert_allclose(_pool_products(a, b), a @ b, rtol=1e-12)
        except BaseException as e:               # noqa: BLE001 (reported by the main thread)
            errors.append(e)
    threads = [threading.Thread(target=one, args=p) for p in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


@needs_pool
@pytest.mark.timeout(60)
def test_pool_works_in_a_forked_child():
    """A forked child has none of its parent's helper threads; its products start new ones."""
    import multiprocessing
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((8, 40, 24)), rng.standard_normal((8, 24, 8))
    _pool_products(a, b)                        # the parent's helpers exist
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_pool_products, (a, b)).get(timeout=30)
    np.testing.assert_allclose(got, a @ b, rtol=1e-12)


@needs_pool
def test_a_helper_sleeps_once_the_products_stop():
    """After its spin a helper waits without using the CPU: a process that does nothing uses
    next to none."""
    import resource
    a, b = np.ones((8, 64, 64)), np.ones((8, 64, 64))
    _pool_products(a, b)
    time.sleep(_gemm.SPIN_SECONDS * 5)

    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    before = cpu()
    time.sleep(0.3)
    assert cpu() - before < 0.05
