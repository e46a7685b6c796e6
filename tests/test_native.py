"""Loops run as native code (``spmd.executors.native``): the same values as the NumPy loop (and
as JAX), for every kind of equation it writes as C, and the NumPy loop wherever it cannot."""
import subprocess
import warnings

import numpy as np
import pytest

import spmd
import spmd.lax as slax
from spmd import P
from spmd import _cbuild
from spmd.executors import native
from spmd.executors.per_device import reference_executor

F32 = np.float32


def _arr(shape, dtype=F32, scale=1.0, seed=0):
    rng = np.random.default_rng(seed + len(shape))
    return (rng.standard_normal(shape) * scale).astype(dtype)


@pytest.fixture
def calls(monkeypatch):
    """How many times a native loop ran, counted while the test runs."""
    count = [0]
    real = native.Loop.__call__

    def counted(self, *args, **kw):
        out = real(self, *args, **kw)
        count[0] += out is not None
        return out
    monkeypatch.setattr(native.Loop, "__call__", counted)
    return count


def _both(monkeypatch, f, *args, **kw):
    """``spmd.jit(f)(*args)`` with native loops and without (a fresh jit each: the choice is
    made when a program's plan is built)."""
    monkeypatch.setenv("SPMD_NATIVE", "1")
    got = spmd.jit(f, **kw)(*args)
    monkeypatch.setenv("SPMD_NATIVE", "0")
    want = spmd.jit(f, **kw)(*args)
    monkeypatch.setenv("SPMD_NATIVE", "1")
    return got, want


def _close(got, want, tol):
    import optree
    got, want = optree.tree_leaves(got), optree.tree_leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# bodies: (carry, x) -> (carry, y), each with its init and xs
# ---------------------------------------------------------------------------------------------

def rnn(w, u, b):
    return lambda h, x: (np.tanh(h @ w + x @ u + b),) * 2


def gru(wz, wr, wh):
    def cell(h, x):
        z = spmd.nn.sigmoid(h @ wz + x)
        r = 1 / (1 + np.exp(-(h @ wr - x)))
        c = np.tanh((r * h) @ wh + x)
        return (1 - z) * h + z * c, z.sum(-1)
    return cell


def functions_f32(h, x):
    a = np.abs(h) + 0.5
    y = (np.sin(h) + np.cos(x) + np.log(a) + np.sqrt(a) + 1 / np.sqrt(a) + np.exp(-a)
         + np.floor(h) * np.ceil(x) + np.round(h * 3) + np.sign(x) + np.square(h)
         + np.reciprocal(a) + np.arctan2(h, a) + np.hypot(h, x) + np.power(a, 1.5)
         + np.log1p(a) + np.expm1(-a) + np.maximum(h, x) - np.minimum(h, x) + np.trunc(x * 2)
         + np.fmod(h, a) + np.tan(h * 0.3) + np.arcsin(np.tanh(h) * 0.5))
    return h * 0.5 + x * 0.1, y


def integers(c, x):
    n, total = c
    big = x > 0.2
    total = total + np.where(big, x, -x).astype(np.float64) * n.astype(np.float64)
    n = n + big.sum().astype(np.int32) + (np.abs(x) < 0.1).astype(np.int32).max()
    flags = np.logical_and(big, x < 1.0) | (x == 0) ^ (x != x)
    return (n, total), (flags, n * 2 - 1)


def views(h, x):
    # transposes, strided and reversed slices, reshapes of non-contiguous views, concatenation,
    # broadcasts of rows and columns
    t = h.T[::-1, :]                                    # (4, 3)
    s = np.concatenate([h[:, ::2], h[:, 1::2] * 2], axis=1)
    r = t.reshape(2, 6).reshape(3, 4) + x[None, :]
    col = h.sum(1, keepdims=True)
    return s + r * 0.1 - col * 0.01, np.concatenate([r, h[:1]], axis=0)


def products(c, x):
    h, m = c
    w = x[:12].reshape(3, 4)                            # a product of two per-step values
    batch = np.einsum("bij,bjk->bik", m, m.transpose(0, 2, 1)) * 0.1    # batch dims
    return ((np.tanh(h @ h.T @ h * 0.1 + x[:4]),        # transposed operands
             np.tanh(batch @ m)),
            (h.T @ w, h @ x[:4], x[:4] @ h.T))         # leading contraction, matrix-vector


def reductions(h, x):
    return (h * 0.9 + x,
            (h.sum(), h.sum(0), h.max(1), h.min(0), np.prod(h[:, :2] * 0.5 + 1, axis=1),
             np.all(h > -1, axis=0), np.any(h > 1)))


BODIES = {         # name -> (body, init, xs, jit kwargs or None)
    "rnn": (lambda: rnn(_arr((5, 5), scale=0.4), _arr((3, 5), scale=0.4), _arr((5,))),
            lambda: _arr((2, 5)), lambda: _arr((9, 2, 3))),
    "gru": (lambda: gru(_arr((4, 4), scale=0.4), _arr((4, 4), scale=0.4), _arr((4, 4), scale=0.4)),
            lambda: _arr((3, 4)), lambda: _arr((7, 3, 4))),
    "functions_f32": (lambda: functions_f32, lambda: _arr((3, 4)), lambda: _arr((5, 3, 4))),
    "functions_f64": (lambda: functions_f32, lambda: _arr((3, 4), np.float64),
                      lambda: _arr((5, 3, 4), np.float64)),
    "integers": (lambda: integers, lambda: (np.int32(1), np.zeros(4)), lambda: _arr((6, 4))),
    "views": (lambda: views, lambda: _arr((3, 4)), lambda: _arr((5, 4))),
    "products": (lambda: products, lambda: (_arr((3, 4), scale=0.5), _arr((2, 3, 3), scale=0.5)),
                 lambda: _arr((4, 12))),
    "reductions": (lambda: reductions, lambda: _arr((3, 4)), lambda: _arr((6, 3, 4))),
}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", BODIES)
def test_a_native_loop_gives_the_numpy_loops_values(name, reverse, calls, monkeypatch):
    body, init, xs = (make() for make in BODIES[name])
    f = lambda c, xs: slax.scan(body, c, xs, reverse=reverse)
    got, want = _both(monkeypatch, f, init, xs)
    assert calls[0] == 1                                # the native loop ran, once
    _close(got, want, 1e-5 if name != "functions_f64" else 1e-12)


def test_the_benchmark_cell_gives_jaxs_values_forward_and_backward(calls):
    import jax
    w, u, b, h0, xs = _arr((8, 8), scale=0.3), _arr((4, 8), scale=0.3), _arr((8,)), \
        _arr((2, 8)), _arr((50, 2, 4))

    def loss(lax, xp):
        def f(w, u, b, h0, xs):
            def cell(h, x):
                h = xp.tanh(h @ w + x @ u + b)
                return h, h
            h, ys = lax.scan(cell, h0, xs)
            return (ys ** 2).sum() + h.sum()
        return f
    args = (w, u, b, h0, xs)
    got = spmd.jit(spmd.value_and_grad(loss(slax, np), argnums=(0, 1, 2, 3, 4)))(*args)
    assert calls[0] >= 2                # forward and backward scans both ran natively
    want = jax.jit(jax.value_and_grad(loss(jax.lax, jax.numpy), argnums=(0, 1, 2, 3, 4)))(*args)
    _close(got, want, 2e-5)


def test_carries_that_swap_pass_through_or_are_read_as_outputs(calls, monkeypatch):
    def body(c, x):
        a, b, k = c
        return (b, a + x, k), (a, k * x)        # a swap, a carry unchanged, carries as ys
    init = (_arr((3,)), _arr((3,), seed=1), _arr((3,), seed=2))
    got, want = _both(monkeypatch, lambda c, xs: slax.scan(body, c, xs), init, _arr((5, 3)))
    assert calls[0] == 1
    _close(got, want, 0)


def test_integers_wrap_around_on_overflow_as_numpys_do(calls, monkeypatch):
    body = lambda c, x: (c * np.int32(1000003) + x, c - np.int32(2**30))
    xs = np.arange(40, dtype=np.int32).reshape(10, 4)
    got, want = _both(monkeypatch, lambda c, xs: slax.scan(body, c, xs), xs[0] + 7, xs)
    assert calls[0] == 1
    _close(got, want, 0)


def test_lengths_one_and_zero_and_no_xs(calls, monkeypatch):
    body = lambda c, x: (np.tanh(c * 1.5 + x), c * 2)
    for xs in (_arr((1, 4)), _arr((0, 4))):
        got, want = _both(monkeypatch, lambda c, xs: slax.scan(body, c, xs), _arr((4,)), xs)
        _close(got, want, 1e-6)
    got, want = _both(monkeypatch, lambda c: slax.scan(lambda c, _: (np.sin(c) + 1, c), c,
                                                      length=6), _arr((2, 2)))
    _close(got, want, 1e-6)
    assert calls[0] == 2                # length 0 never reaches the loop


def test_fori_loop_and_per_device_executor(calls, monkeypatch):
    f = lambda x: slax.fori_loop(0, 20, lambda i, c: np.tanh(c @ c.T) * 0.5 + c, x)
    x = _arr((3, 3), scale=0.3)
    got, want = _both(monkeypatch, f, x)
    _close(got, want, 1e-6)
    got, want = _both(monkeypatch, f, x, executor=reference_executor())
    _close(got, want, 1e-6)
    assert calls[0] == 2


# ---------------------------------------------------------------------------------------------
# the vectorised tanh and exp of float32
# ---------------------------------------------------------------------------------------------

def _elementwise_loop(fn, xs):
    """``fn`` of each element of ``xs`` (float32) computed in a native loop."""
    # (of x + c, c = 0: a value of the x alone would be computed for all steps before the loop)
    return np.asarray(spmd.jit(lambda xs: slax.scan(lambda c, x: (c, fn(x + c)), np.float32(0),
                                                    xs)[1])(xs))


SPECIAL = np.array([0.0, -0.0, 1e-30, -1e-30, 3e-4, -3e-4, 5e-4, 0.5, -0.5, 1, -1, 7.9, -7.9,
                    8, 9, -9, 20, -20, 88.7, 88.8, -87.3, -87.4, -103.9, -104.5, -200, 200,
                    np.inf, -np.inf, np.nan], F32)


def test_tanh_and_exp_of_float32_are_within_a_few_ulps_of_numpys(calls):
    grid = np.concatenate([np.linspace(-12, 12, 20001, dtype=F32),
                           np.geomspace(1e-8, 12, 4001).astype(F32),
                           -np.geomspace(1e-8, 12, 4001).astype(F32), SPECIAL]).reshape(-1, 1)
    got = _elementwise_loop(np.tanh, grid)
    np.testing.assert_array_max_ulp(got, np.tanh(grid), maxulp=4)
    grid = np.concatenate([np.linspace(-87.3, 88.7, 40001, dtype=F32), SPECIAL]).reshape(-1, 1)
    got = _elementwise_loop(np.exp, grid)
    with np.errstate(over="ignore"):
        want = np.exp(grid)
    normal = ~(grid < -87.33)
    np.testing.assert_array_max_ulp(got[normal], want[normal], maxulp=4)
    np.testing.assert_allclose(got[~normal], want[~normal], atol=2e-38, rtol=0)
    assert calls[0] == 2


# ---------------------------------------------------------------------------------------------
# where the NumPy loop runs instead, and the library cache
# ---------------------------------------------------------------------------------------------

def test_a_body_it_cannot_write_runs_as_numpy_calls(calls):
    body = lambda c, x: (c + x[np.argmax(x + c)], c)         # argmax, a gather: not in C
    got = spmd.jit(lambda c, xs: slax.scan(body, c, xs))(np.float32(0), _arr((5, 3)))
    c, ys = np.float32(0), []
    for x in _arr((5, 3)):
        ys.append(c)
        c = c + x[np.argmax(x + c)]
    _close(got, (c, np.stack(ys)), 1e-6)
    assert calls[0] == 0


def test_without_a_compiler_loops_run_as_numpy_calls_with_one_warning(tmp_path, monkeypatch,
                                                                       calls):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("SPMD_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_warned", [])
    body = lambda c, x: (np.cos(c) * 0.5 + x, c)
    with pytest.warns(RuntimeWarning, match="loops run as NumPy calls"):
        got = spmd.jit(lambda c, xs: slax.scan(body, c, xs))(_arr((2,)), _arr((4, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # once, not at every loop
        spmd.jit(lambda c, xs: slax.scan(body, c * 1, xs))(_arr((2,)), _arr((4, 2)))
    c, ys = _arr((2,)), []
    for x in _arr((4, 2)):
        ys.append(c)
        c = np.cos(c) * F32(0.5) + x
    _close(got, (c, np.stack(ys)), 1e-6)
    assert calls[0] == 0


def test_a_built_loop_is_loaded_from_the_disk_cache_without_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("SPMD_NATIVE_CACHE", str(tmp_path))
    f = lambda c, xs: slax.scan(lambda c, x: (np.sinh(c) * 0.1 + x, c), c, xs)
    first = spmd.jit(f)(_arr((3,)), _arr((4, 3)))
    assert len(list(tmp_path.glob("*.so"))) == 1
    monkeypatch.setattr(_cbuild, "_libraries", {})          # a new process, as far as it knows

    def no_compiler(*a, **k):
        raise AssertionError("the compiler ran again")
    monkeypatch.setattr(subprocess, "run", no_compiler)
    again = spmd.jit(f)(_arr((3,)), _arr((4, 3)))
    _close(again, first, 0)


def test_spmd_native_0_turns_native_loops_off(monkeypatch, calls):
    monkeypatch.setenv("SPMD_NATIVE", "0")
    spmd.jit(lambda c, xs: slax.scan(lambda c, x: (c + x, c), c, xs))(_arr((3,)), _arr((4, 3)))
    assert calls[0] == 0


def test_the_disk_cache_keeps_the_most_recently_built_libraries(tmp_path, monkeypatch):
    monkeypatch.setenv("SPMD_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setattr(_cbuild, "CACHE_MAX_FILES", 2)
    for scale in (0.1, 0.2, 0.3):               # three bodies, three libraries
        spmd.jit(lambda c, xs: slax.scan(lambda c, x: (np.sin(c) * scale + x, c), c, xs))(
            _arr((3,)), _arr((4, 3)))
    assert len(list(tmp_path.glob("*.so"))) == 2


@pytest.mark.parametrize("executor", ["stacked", "reference"])
def test_a_loop_inside_shard_map_runs_natively_once_per_device(executor, calls, monkeypatch):
    # a data-parallel RNN: each device runs the scan on its batch rows (the weights and a
    # per-step input the same on every device), then a psum outside the loop
    import jax
    mesh = spmd.make_mesh((4,), ("data",))
    w, u, b = _arr((6, 6), scale=0.4), _arr((3, 6), scale=0.4), _arr((6,))
    h0, xs, shift = _arr((8, 6)), _arr((5, 8, 3)), _arr((5, 6), seed=3)

    def body(lax, xp):
        def f(w, u, b, h0, xs, shift):
            def cell(h, x):
                x, s = x
                h = xp.tanh(h @ w + x @ u + b + s)
                return h, h.sum(-1)
            h, ys = lax.scan(cell, h0, (xs, shift))
            return lax.psum(h.sum(), "data"), h, ys
        return f
    specs = (P(), P(), P(), P("data"), P(None, "data"), P())
    out_specs = (P(), P("data"), P(None, "data"))
    kw = {} if executor == "stacked" else {"executor": reference_executor()}
    args = (w, u, b, h0, xs, shift)
    f = spmd.shard_map(body(slax, np), mesh=mesh, in_specs=specs, out_specs=out_specs)
    got, want = _both(monkeypatch, f, *args, **kw)
    assert calls[0] == 4                                # one call per device
    _close(got, want, 1e-5)
    jmesh = jax.make_mesh((4,), ("data",))
    JP = jax.sharding.PartitionSpec
    theirs = jax.jit(jax.shard_map(body(jax.lax, jax.numpy), mesh=jmesh,
                                   in_specs=tuple(JP(*s) for s in specs),
                                   out_specs=tuple(JP(*s) for s in out_specs)))(
        *[jax.device_put(a, jax.sharding.NamedSharding(jmesh, JP(*s))) for a, s in zip(args, specs)])
    _close(got, theirs, 2e-5)


# ---------------------------------------------------------------------------------------------
# elementwise chains of the stacked executor as C
# ---------------------------------------------------------------------------------------------

def test_fused_chains_run_as_c_on_strided_and_broadcast_operands(monkeypatch):
    """A chain of a tanh layer's forward and derivative, on a bias broadcast along the rows
    and a block cut out of a wider array (strided rows), runs as C (no NumPy fallback) and
    equals NumPy within the tanh approximation's few ulps; x ** 2, x ** 3 and x ** 1.5 too."""
    from spmd.executors import fusion
    ran = []
    real = native.Chain.__call__

    def spy(self, shape, vals):
        out = real(self, shape, vals)
        ran.append(out is not None)
        return out
    monkeypatch.setattr(native.Chain, "__call__", spy)
    monkeypatch.setattr(fusion, "IN_TURN_MAX_BYTES", 0)
    mesh = spmd.make_mesh((4,), ("data",))
    wide = _arr((8, 96, 64), seed=1)

    def body(x, b):
        h = np.tanh(x[:, :48] + b)
        return h, 1 - h * h, h ** 2 + np.abs(x[:, :48]) ** 1.5 - h ** 3
    f = spmd.jit(spmd.shard_map(body, mesh=mesh, in_specs=(P("data"), P()),
                                out_specs=(P("data"),) * 3))
    b = _arr((64,), seed=2)
    got = f(wide, b)
    h = np.tanh(wide[:, :48] + b)
    want = (h, 1 - h * h, h ** 2 + np.abs(wide[:, :48]) ** 1.5 - h ** 3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=2e-6)
    assert ran and all(ran), ran


def test_a_chain_the_c_cannot_write_runs_as_numpy_calls(monkeypatch):
    """float16 has no C type here: the chain takes its NumPy path and is still right."""
    from spmd.executors import fusion
    monkeypatch.setattr(fusion, "IN_TURN_MAX_BYTES", 0)
    mesh = spmd.make_mesh((4,), ("data",))
    x = _arr((8, 64)).astype(np.float16)
    f = spmd.jit(spmd.shard_map(lambda x: np.tanh(x * 2 + 1) * x, mesh=mesh, in_specs=P("data"),
                                out_specs=P("data")))
    np.testing.assert_allclose(np.asarray(f(x)), np.tanh(x * 2 + 1) * x, rtol=2e-3)
