"""Threads and the compile caches: several threads trace, compile and run at once and every
result is exact; the caches stay within their size and an evicted entry compiles again."""
import sys
import threading
import traceback

import numpy as np
import pytest

import spmd
from spmd import NamedSharding, P, _cache, eager, psum, shard_map
from spmd.compiler import redistribute
from spmd.executors import StackedExecutor

THREADS = 4
SHAPES = 200


def _functions(mesh, executor=None):
    """``jit(shard_map(psum))`` and a ``jit`` with in/out shardings (the compiler inserts a
    psum over "model"): ``(name, call on (x, w), what NumPy says)`` each."""
    rowsum = spmd.jit(shard_map(lambda b: psum(b, "model"), mesh=mesh, in_specs=P("data", "model"),
                                out_specs=P("data")), executor=executor)
    matmul = spmd.jit(lambda x, w: x @ w + 1.0, executor=executor,
                      in_shardings=(NamedSharding(mesh, P("data", "model")),
                                    NamedSharding(mesh, P("model"))),
                      out_shardings=NamedSharding(mesh, P("data")))
    return [("jit(shard_map(psum))", lambda x, w: rowsum(x),
             lambda x, w: x.reshape(len(x), 4, -1).sum(1)),
            ("jit with shardings", matmul, lambda x, w: x @ w + 1.0)]


def _operands(rows, cols):
    """Small integers in float64, so that every sum is exact whatever its order."""
    x = np.arange(rows * cols, dtype=np.float64).reshape(rows, cols) % 7 - 3
    w = np.arange(cols * 3, dtype=np.float64).reshape(cols, 3) % 5 - 2
    return x, w


def _check(name, call, expect, rows, cols):
    x, w = _operands(rows, cols)
    got, want = np.asarray(call(x, w)), expect(x, w)
    if got.shape != want.shape or not np.array_equal(got, want):
        raise AssertionError(f"{name} on x of shape {(rows, cols)}: got {got!r}, want {want!r}")


@pytest.mark.timeout(120)
def test_threads_compile_and_run_at_once():
    """4 threads, released together by a barrier, each compile 200 new shapes of both functions
    (threads 0 and 2, and 1 and 3, meet the same shapes: the same cache keys at once) and call
    the shapes the main thread compiled before; every value equals NumPy's."""
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    shared = _functions(mesh)
    warm = [(2 * k, 4) for k in range(1, 9)]
    for f in shared:
        for rows, cols in warm:
            _check(*f, rows, cols)

    barrier = threading.Barrier(THREADS)
    errors = []

    def work(t):
        try:
            barrier.wait(timeout=60)
            for i in range(SHAPES):
                rows, cols = 2 * (i + 1), 4 * (2 + t % 2)       # new shapes, never the main's
                for f in shared:
                    _check(*f, rows, cols)
                    _check(*f, *warm[i % len(warm)])            # compiled by the main thread
        except Exception:
            errors.append(f"thread {t}:\n{traceback.format_exc()}")
            barrier.abort()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)               # switch threads often: races show up sooner
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=110)
    finally:
        sys.setswitchinterval(interval)
    assert not any(th.is_alive() for th in threads), "a thread is still running (deadlock?)"
    assert not errors, "\n".join(errors)


@pytest.fixture
def small_caches():
    _cache.set_default_size(6)
    try:
        yield 6
    finally:
        _cache.set_default_size(None)


class _CountingExecutor(StackedExecutor):
    plans_made = 0

    def _compile(self, program, mesh):
        self.plans_made += mesh is None       # a whole program (not a shard_map body)
        return super()._compile(program, mesh)


@pytest.mark.timeout(60)
def test_caches_evict_and_recompile(small_caches):
    """With room for 6 entries, 20 shapes leave at most 6 plans in the executor, 6 eager ops and
    6 redistribution plans; the evicted shapes compile again and still give exact values."""
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    executor = _CountingExecutor()
    fns = _functions(mesh, executor)
    shapes = [(2 * k, 8) for k in range(1, 21)]
    for rounds in (1, 2):                      # the second round meets only evicted entries
        for rows, cols in shapes:
            for f in fns:
                _check(*f, rows, cols)
            x, _ = _operands(rows, cols)
            xs = spmd.device_put(x, NamedSharding(mesh, P("data", "model")))
            assert np.array_equal(np.asarray(xs * 2 + xs), x * 3)          # eager ops
            assert len(executor._plans) <= small_caches
            assert len(eager._CACHE) <= small_caches
            assert len(redistribute.plan.cache) <= small_caches
        assert executor.plans_made == rounds * len(shapes) * len(fns)
    assert len(executor._plans) == small_caches


def test_lru_order_and_size():
    c = _cache.LRU(maxsize=3)
    for k in "abc":
        c.put(k, k.upper())
    assert c.get("a") == "A"                  # "a" is now the most recently used
    c.put("d", "D")
    assert c.get("b") is None and len(c) == 3 and all(k in c for k in "acd")
    c.clear()
    assert len(c) == 0 and c.get("a", 0) == 0
    with pytest.raises(ValueError, match="positive integer"):
        _cache.LRU(maxsize=0)


def test_lru_repeated_key_keeps_recency_and_sees_every_change():
    c = _cache.LRU(maxsize=2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1 and c.get("a") == 1        # the repeat is answered by the last entry
    c.put("c", 3)                                     # "b" is the least recently used
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    c.put("c", 30)                                    # a new value under the last key
    assert c.get("c") == 30
    c.clear()
    assert c.get("c") is None


def test_set_default_size_trims_live_caches():
    c = _cache.LRU()
    try:
        for k in range(10):
            c.put(k, k)
        _cache.set_default_size(4)
        assert len(c) == 4 and c.get(9) == 9 and c.get(5) is None
        with pytest.raises(ValueError, match="set_default_size"):
            _cache.set_default_size(-1)
    finally:
        _cache.set_default_size(None)
    assert c.maxsize == _cache.default_size()


@pytest.mark.parametrize("raw", ["0", "-3", "ten", "1.5", "2e3"])
def test_bad_cache_size_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv("SPMD_CACHE_SIZE", raw)
    with pytest.raises(ValueError, match=f"SPMD_CACHE_SIZE={raw!r} is not a positive integer"):
        _cache.default_size()


def test_cache_size_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPMD_CACHE_SIZE", "37")
    assert _cache.default_size() == 37 == _cache.LRU().maxsize
    monkeypatch.delenv("SPMD_CACHE_SIZE")
    assert _cache.default_size() == _cache.DEFAULT_SIZE == 1024
