"""CPU-side checks of the GPU layer: no GPU, no driver, no CuPy needed.

- every kernel of ``kernels/`` compiles with NVRTC for sm_80, sm_90 and sm_100, for every
  instantiation the loader uses, without register spills;
- NVRTC and the CUDA headers it is checked with come from the same CUDA minor;
- the kernels' index math: the NumPy twins in ``spmd.gpu.index_math`` against NumPy's own
  reshapes and transposes, and the C++ in ``kernels/index_math.cuh`` (compiled here as host
  code) against the NumPy twins;
- the kernels themselves, compiled as host C++ (``kernels/host_shim.h``) and run on the CPU
  against NumPy, the peer all-reduce with its ranks running concurrently;
- GPU discovery says why there is no GPU;
- the GPU executors' Python (NCCL communicator, placements, the CuPy stacked executor) runs the
  collective table on a NumPy stand-in of CuPy and NCCL (``_fake_cupy.py``): plumbing, not CUDA.
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from spmd.gpu import index_math as im
from spmd.gpu import kernels

FAST = settings(max_examples=60, deadline=None)

# ---------------------------------------------------------------------------------------------
# NVRTC: every kernel, every instantiation, every target arch
# ---------------------------------------------------------------------------------------------


def _nvrtc():
    from spmd.gpu import nvrtc_check
    try:
        nvrtc_check.nvrtc_version()
        nvrtc_check.include_dir()
    except nvrtc_check.NvrtcUnavailable as e:
        pytest.skip(f"NVRTC is not installed: {e}")
    return nvrtc_check


@pytest.fixture(scope="module")
def compiled():
    return _nvrtc().compile_all(kernels.TARGET_ARCHS)


@pytest.mark.parametrize("arch", kernels.TARGET_ARCHS)
def test_every_kernel_compiles_without_spills(compiled, arch):
    reports = {r.expression: r for r in compiled[arch]}
    expected = {f"{name}: {e}" for name in kernels.SOURCES for e in kernels.INSTANTIATIONS[name]}
    assert set(reports) == expected
    spilled = [f"{r.expression}: {r.spill_stores} B stored, {r.spill_loads} B loaded"
               for r in reports.values() if r.spills]
    assert not spilled, f"register spills on {arch}:\n" + "\n".join(spilled)
    stack = [f"{r.expression}: {r.stack_bytes} B" for r in reports.values() if r.stack_bytes]
    assert not stack, f"local-memory stack frames on {arch}:\n" + "\n".join(stack)
    assert all(0 < r.registers <= 64 for r in reports.values())


def test_nvrtc_and_headers_are_one_cuda_minor():
    nc = _nvrtc()
    assert nc.nvrtc_version() == nc.headers_version(), (
        "pin nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12 to the same CUDA minor in the "
        "kernels-check extra")
    # the headers that break first when the two drift apart
    probe = ("#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cuda_fp8.h>\n"
             "__global__ void probe(__half* h, __nv_bfloat16* b, __nv_fp8_e4m3* f) {"
             " h[0] = __float2half(1.f); b[0] = __float2bfloat16(2.f); f[0] = __nv_fp8_e4m3(3.f); }")
    nc.compile_source(probe, "sm_90", options=(f"-I{nc.include_dir()}", "-std=c++17"))


def test_ptxas_log_parsing():
    from spmd.gpu.nvrtc_check import parse_ptxas_log
    log = ("ptxas info    : Compiling entry function '_Z1fv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z1fv\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size\n")
    (r,) = parse_ptxas_log(log, {"f": "_Z1fv"})
    assert (r.expression, r.arch, r.registers, r.stack_bytes, r.spill_stores, r.spill_loads) == \
        ("f", "sm_90", 40, 8, 4, 12)
    assert r.spills


def test_sources_are_self_contained_and_every_template_is_instantiated():
    for name in kernels.SOURCES:
        text = kernels.source(name)
        assert '#include "' not in text and "#include <" not in text   # no CUDA header needed
        templates = set(re.findall(r"__global__ void (\w+)\(", text))
        used = {re.match(r"spmd::(\w+)<", e).group(1) for e in kernels.INSTANTIATIONS[name]}
        assert templates == used, name


def test_kernel_sources_ship_with_the_package():
    root = kernels.kernels_dir()
    for name in kernels.SOURCES + kernels.HEADERS:
        assert (root / name).is_file()
    setup = (root.parent / "setup.py").read_text() if (root.parent / "setup.py").exists() else ""
    if setup:          # a source checkout: the wheel maps spmd._kernels onto kernels/
        assert '"spmd._kernels": "kernels"' in setup


# ---------------------------------------------------------------------------------------------
# index math: NumPy twins against NumPy
# ---------------------------------------------------------------------------------------------

@st.composite
def rank_major_views(draw):
    """(base buffer, view): a dim of a strided array split into n chunks and moved to the front,
    as psum_scatter and all_to_all do; the array itself is a transposed / strided view of a
    flat buffer."""
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    dim = draw(st.integers(0, rank - 1))
    n = draw(st.sampled_from([1, 2, 3, 4]))
    shape[dim] *= n
    step = draw(st.integers(1, 2))
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
    perm = draw(st.permutations(range(rank)))
    base_shape = [shape[p] for p in np.argsort(perm)]
    buf = np.arange(int(np.prod(base_shape)) * step + 3, dtype=dtype)
    start = draw(st.integers(0, 3))
    x = buf[start:start + int(np.prod(base_shape)) * step:step].reshape(base_shape).transpose(perm)
    assert x.shape == tuple(shape)
    view = np.moveaxis(x.reshape(x.shape[:dim] + (n, x.shape[dim] // n) + x.shape[dim + 1:]), dim, 0)
    return buf, view


def _elem_strides(a):
    return tuple(s // a.itemsize for s in a.strides)


def _offset_in(buf, a):
    return (a.__array_interface__["data"][0] - buf.__array_interface__["data"][0]) // a.itemsize


@FAST
@given(rank_major_views())
def test_pack_offsets_match_numpy(case):
    buf, view = case
    lay = im.pack_layout(view.shape, _elem_strides(view))
    if lay is None:                                       # more than three runs: caller copies
        assert len(im.runs(view.shape[1:], _elem_strides(view)[1:])) > 3
        return
    assert lay.total == view.size and lay.chunk * lay.n == view.size
    packed = buf[_offset_in(buf, view) + im.pack_offsets(lay)]
    np.testing.assert_array_equal(packed, np.ascontiguousarray(view).ravel())
    # unpack is the inverse scatter
    out = np.zeros_like(buf)
    out[_offset_in(buf, view) + im.pack_offsets(lay)] = packed
    np.testing.assert_array_equal(np.lib.stride_tricks.as_strided(
        out[_offset_in(buf, view):], view.shape, view.strides), view)
    assert im.pack_offsets(lay).max(initial=0) == lay.max_offset()


@FAST
@given(rank_major_views())
def test_widened_pack_moves_the_same_bytes(case):
    buf, view = case
    lay = im.pack_layout(view.shape, _elem_strides(view))
    if lay is None:
        return
    first = _offset_in(buf, view) * view.itemsize        # byte address relative to the buffer
    wide, unit = im.widen(lay, view.itemsize, [first])
    assert first % unit == 0 and unit >= view.itemsize
    shifted = first + view.itemsize
    assert shifted % im.widen(lay, view.itemsize, [shifted])[1] == 0
    raw = buf.view(np.uint8)
    units = first // unit + im.pack_offsets(wide)
    got = np.concatenate([raw[u * unit:(u + 1) * unit] for u in units]) if units.size else raw[:0]
    np.testing.assert_array_equal(got, np.ascontiguousarray(view).view(np.uint8).ravel())


@FAST
@given(st.integers(0, 10**6), st.integers(1, 8), st.sampled_from([1, 2, 4, 8, 16]))
def test_owned_slices_partition_the_buffer(count, n, align):
    slices = [im.owned_slice(count, n, r, align) for r in range(n)]
    assert slices[0][0] == 0 and slices[-1][1] == count
    for (lo, hi), (lo2, _) in zip(slices, slices[1:]):
        assert lo <= hi == lo2
    assert all(lo % align == 0 or lo == count for lo, _ in slices)
    units = -(-count // align)
    assert max(hi - lo for lo, hi in slices) <= -(-units // n) * align    # balanced


@FAST
@given(st.integers(0, 5000), st.integers(1, 8), st.integers(1, 6), st.sampled_from([32, 64, 128]))
def test_grid_stride_blocks_partition_each_slice(count, n, blocks, threads):
    """Every phase of the peer all-reduce walks a slice with the same slice-relative loop, so
    block b reads exactly what block b of each peer wrote: the blocks partition the slice."""
    for r in range(n):
        lo, hi = im.owned_slice(count, n, r)
        parts = [im.block_elements(lo, hi, b, blocks, threads) for b in range(blocks)]
        joined = np.sort(np.concatenate(parts))
        np.testing.assert_array_equal(joined, np.arange(lo, hi))


def test_flag_slots_are_distinct_and_fit_the_flag_array():
    slots = [im.flag_slot(p, b, r) for p in range(im.BARRIER_PHASES) for b in range(im.MAX_BLOCKS)
             for r in range(im.MAX_RANKS)]
    assert sorted(slots) == list(range(im.FLAG_WORDS))


@pytest.mark.parametrize("nbytes, n, peer_ok, aligned, expected", [
    (8 * 2**10, 8, True, True, "one_shot"),
    (256 * 2**10, 8, True, True, "one_shot"),
    (1 * 2**20, 8, True, True, "two_shot"),
    (1 * 2**20, 2, True, True, "one_shot"),
    (64 * 2**20, 8, True, True, "nccl"),
    (8 * 2**10, 8, False, True, "nccl"),        # no peer memory (other node, no P2P)
    (8 * 2**10, 8, True, False, "nccl"),        # unaligned buffer
    (8 * 2**10 + 4, 8, True, True, "nccl"),     # not whole 16-byte packs
    (8 * 2**10, 16, True, True, "nccl"),        # more ranks than the flag layout holds
    (8 * 2**10, 1, True, True, "nccl"),
])
def test_all_reduce_algorithm_by_size(nbytes, n, peer_ok, aligned, expected):
    assert im.choose_all_reduce(nbytes, n, 4, peer_ok=peer_ok, aligned=aligned) == expected


def test_bus_bandwidth_uses_the_nccl_tests_factors():
    assert im.bandwidth("all_reduce", 8 * 10**9, 2.0, 4) == (4.0, 6.0)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert im.bandwidth(op, 8 * 10**9, 2.0, 4) == (4.0, 3.0)


def test_index_type_and_copy_unit():
    assert im.index_type(2**30, 5) == "int" and im.index_type(2**30 + 1) == "long long"
    assert im.copy_unit([256, 512], [64]) == 16
    assert im.copy_unit([256, 520], [64]) == 8
    assert im.copy_unit([256], [6]) == 2
    assert im.copy_unit([257], [64]) == 1


# ---------------------------------------------------------------------------------------------
# index math: the C++ of kernels/index_math.cuh against the NumPy twins
# ---------------------------------------------------------------------------------------------

_SHIM = r'''
#define SPMD_HD inline
#include "index_math.cuh"
extern "C" {
long long strided_offset64(long long t, long long d0, long long d1, long long d2, long long sr,
                           long long s0, long long s1, long long s2) {
  return spmd::strided_offset<long long>(t, d0, d1, d2, sr, s0, s1, s2);
}
int strided_offset32(int t, int d0, int d1, int d2, int sr, int s0, int s1, int s2) {
  return spmd::strided_offset<int>(t, d0, d1, d2, sr, s0, s1, s2);
}
void owned_slice(long long count, int n, int r, long long align, long long* lo, long long* hi) {
  spmd::owned_slice(count, n, r, align, lo, hi);
}
int flag_slot(int phase, int block, int from) { return spmd::flag_slot(phase, block, from); }
int max_blocks() { return spmd::MAX_BLOCKS; }
int max_ranks() { return spmd::MAX_RANKS; }
int barrier_phases() { return spmd::BARRIER_PHASES; }
}
'''


@pytest.fixture(scope="module")
def cxx(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine to build kernels/index_math.cuh as host code")
    d = tmp_path_factory.mktemp("index_math")
    (d / "shim.cpp").write_text(_SHIM)
    lib = d / "libindex_math.so"
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{kernels.kernels_dir()}",
                    str(d / "shim.cpp"), "-o", str(lib)], check=True, capture_output=True)
    so = ctypes.CDLL(str(lib))
    ll = ctypes.c_longlong
    so.strided_offset64.restype = ll
    so.strided_offset64.argtypes = [ll] * 8
    so.owned_slice.argtypes = [ll, ctypes.c_int, ctypes.c_int, ll, ctypes.POINTER(ll), ctypes.POINTER(ll)]
    return so


def test_cxx_constants_match(cxx):
    assert (cxx.max_blocks(), cxx.max_ranks(), cxx.barrier_phases()) == \
        (im.MAX_BLOCKS, im.MAX_RANKS, im.BARRIER_PHASES)


@FAST
@given(rank_major_views())
def test_cxx_strided_offset_matches(cxx, case):
    _, view = case
    lay = im.pack_layout(view.shape, _elem_strides(view))
    if lay is None or lay.total == 0:
        return
    args = (lay.d0, lay.d1, lay.d2, lay.s_rank, lay.s0, lay.s1, lay.s2)
    want = im.pack_offsets(lay)
    for t in {0, lay.total - 1, lay.total // 2, lay.total // 3}:
        assert cxx.strided_offset64(t, *args) == want[t]
        assert cxx.strided_offset32(t, *args) == want[t]


@FAST
@given(st.integers(0, 10**12), st.integers(1, 8), st.sampled_from([1, 8, 16]))
def test_cxx_owned_slice_matches(cxx, count, n, align):
    lo, hi = ctypes.c_longlong(), ctypes.c_longlong()
    for r in range(n):
        cxx.owned_slice(count, n, r, align, ctypes.byref(lo), ctypes.byref(hi))
        assert (lo.value, hi.value) == im.owned_slice(count, n, r, align)


def test_cxx_flag_slot_matches(cxx):
    for p in range(im.BARRIER_PHASES):
        for b in (0, 1, im.MAX_BLOCKS - 1):
            for r in range(im.MAX_RANKS):
                assert cxx.flag_slot(p, b, r) == im.flag_slot(p, b, r)


# ---------------------------------------------------------------------------------------------
# GPU discovery without a GPU
# ---------------------------------------------------------------------------------------------

def test_import_spmd_does_not_import_cupy():
    code = "import sys, spmd, spmd.gpu, spmd.gpu.kernels; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


class _FakeRuntime:
    class CUDARuntimeError(RuntimeError):
        pass

    def __init__(self, runtime=12090, devices=0):
        self._runtime, self._devices = runtime, devices

    def runtimeGetVersion(self):
        return self._runtime

    def getDeviceCount(self):
        return self._devices


@pytest.fixture
def fake_cupy(monkeypatch):
    import types

    import spmd.gpu as gpu

    def install(driver, runtime=12090, devices=0):
        cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=_FakeRuntime(runtime, devices)))
        monkeypatch.setattr(gpu, "_cupy", lambda: cupy)
        monkeypatch.setattr(gpu, "_driver_cuda_version", lambda: driver)
        gpu.gpu_count.cache_clear()
    yield install
    gpu.gpu_count.cache_clear()


@pytest.mark.parametrize("driver, runtime, devices, message", [
    (None, 12090, 0, "no NVIDIA driver"),
    (11080, 12090, 1, "wrong CUDA major: the NVIDIA driver supports CUDA 11.8, but CuPy was built for CUDA 12.9"),
    (12040, 12090, 0, "no GPU"),
])
def test_gpu_devices_say_why_there_are_none(fake_cupy, driver, runtime, devices, message):
    import spmd
    fake_cupy(driver, runtime, devices)
    with pytest.raises(spmd.gpu.GpuUnavailableError, match=re.escape(message)):
        spmd.devices("gpu")
    assert len(spmd.devices()) >= 1                     # the CPU default is unaffected


def test_gpu_devices_and_virtual_devices(fake_cupy, monkeypatch):
    import spmd
    fake_cupy(12040, 12090, 4)
    assert [d.id for d in spmd.devices("gpu")] == [0, 1, 2, 3]
    assert all(d.platform == "gpu" for d in spmd.devices("gpu"))
    monkeypatch.setenv("SPMD_VIRTUAL_DEVICES", "8")
    assert len(spmd.devices("gpu")) == 8
    assert {spmd.gpu.cuda_ordinal(d) for d in spmd.devices("gpu")} == {0}
    monkeypatch.setenv("SPMD_VIRTUAL_DEVICES", "eight")
    with pytest.raises(spmd.MeshError, match="SPMD_VIRTUAL_DEVICES"):
        spmd.devices("gpu")


def test_no_cupy_says_how_to_install(monkeypatch):
    import spmd
    import spmd.gpu as gpu
    monkeypatch.setitem(sys.modules, "cupy", None)       # import cupy -> ImportError
    gpu.gpu_count.cache_clear()
    with pytest.raises(gpu.GpuUnavailableError, match=r"spmd\[cuda12\]"):
        spmd.devices("gpu")
    gpu.gpu_count.cache_clear()


def test_stacked_executor_takes_collective_rules_from_the_hook():
    """The CuPy executor swaps in kernel-backed rules through ``_stacked_rule``; check on the
    CPU that the hook is what the stacked executor uses."""
    import spmd
    from spmd import P
    from spmd.executors import StackedExecutor
    seen = []

    class Counting(StackedExecutor):
        def _stacked_rule(self, prim):
            seen.append(prim.name)
            return super()._stacked_rule(prim)

    mesh = spmd.make_mesh((2, 4), ("a", "b"))
    f = spmd.shard_map(lambda x: spmd.pmax(spmd.psum(x, "b"), "a"), mesh=mesh,
                       in_specs=P("a", "b"), out_specs=P())
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    got = np.asarray(spmd.jit(f, executor=Counting())(x))
    assert {"psum", "pmax"} <= set(seen)
    np.testing.assert_array_equal(got, np.asarray(spmd.jit(f)(x)))


@pytest.mark.parametrize("status, words", [(2, "shm-size"), (4, "another GPU"), (6, "remote rank"),
                                           (99, "NCCL_DEBUG=WARN")])
def test_nccl_errors_say_what_to_do(status, words):
    from spmd.communicators.nccl import describe_nccl_error
    msg = describe_nccl_error(status, "all_reduce(sum) over ('i',) on mesh position 3 (GPU 3)")
    assert msg.startswith("all_reduce(sum) over ('i',) on mesh position 3 (GPU 3) failed with NCCL error")
    assert words in msg


# ---------------------------------------------------------------------------------------------
# the NCCL executor's Python on a NumPy stand-in of CuPy and NCCL (plumbing, not CUDA)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_gpus(monkeypatch):
    import _fake_cupy

    import spmd.gpu as gpu
    yield _fake_cupy.install(monkeypatch, n_gpus=8)
    gpu.gpu_count.cache_clear()                  # forget the stand-in's GPUs
    kernels.sm_count.cache_clear()


@pytest.mark.parametrize("kernels_run", ["array-ops", "host-kernels"])
@pytest.mark.parametrize("which", ["nccl", "cupy-stacked"])
def test_gpu_executors_run_the_collective_table_on_a_stand_in(fake_gpus, monkeypatch, request, which,
                                                               kernels_run):
    import _fake_cupy
    import spmd
    import test_collectives as tc
    from test_gpu import check_row_on
    import spmd.gpu as gpu
    if which == "cupy-stacked":
        monkeypatch.setenv("SPMD_VIRTUAL_DEVICES", "8")
    if kernels_run == "host-kernels":                    # the kernels behind the launchers
        _fake_cupy.kernels_on_host(monkeypatch, request.getfixturevalue("host_kernels"))

    class OnStandIn:
        executor = gpu.nccl_executor() if which == "nccl" else gpu.stacked_executor()

        def devices(self, n):
            return spmd.devices("gpu")[:n]

    ex = OnStandIn()
    meshes = ((2, 4),) if kernels_run == "host-kernels" else ((4,), (2, 4))
    cases = [c for c in tc.CASES if c.values[0] in meshes]
    for row in tc.ROWS:
        for case in cases:
            check_row_on(ex, row, *case.values)
    for row in tc.GROUP_ROWS:
        for case in tc.GROUP_CASES[:3]:
            check_row_on(ex, row, *case)
    import optree
    from test_gpu import PROGRAMS, REFERENCE
    for make in PROGRAMS:
        f, args = make(spmd.make_mesh((2, 4), ("a", "b"), devices=ex.devices(8)))
        got, want = spmd.jit(f, executor=ex.executor)(*args), spmd.jit(f, executor=REFERENCE)(*args)
        for g, w in zip(optree.tree_leaves(got), optree.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, err_msg=make.__name__)
    if kernels_run == "host-kernels":
        from compiler_programs import ROWS as COMPILER_ROWS
        from test_gpu import run_compiled_on
        for row in COMPILER_ROWS:
            run_compiled_on(ex, row)
    if which == "cupy-stacked":
        return
    comms = list(ex.executor._comms.values())
    assert comms and all(len(c.local_positions) in (4, 8) for c in comms)
    for c in comms:
        c.close()
        assert all(nc.destroyed for nc in c._world.values())


# ---------------------------------------------------------------------------------------------
# the one NCCL communicator in both of its modes on the stand-in: every GPU of the mesh in this
# process (grouped calls), and one GPU per process (threads standing for the processes: unique
# ids through a store, the shared collective frame's signature check, deadline and recorder)
# ---------------------------------------------------------------------------------------------

class _MemoryStore:
    """The coordinator store's interface (``set``, ``get`` with a timeout), in memory."""

    def __init__(self):
        import threading
        self._data, self._cond = {}, threading.Condition()

    def set(self, key, value):
        with self._cond:
            self._data[key] = bytes(value)
            self._cond.notify_all()

    def get(self, key, timeout=None):
        import spmd
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._data, timeout):
                raise spmd.CollectiveTimeoutError(f"store.get({key!r}): no process set it within "
                                                  f"{timeout:g} s.")
            return self._data[key]


def _process_mesh(shape, names):
    """A mesh of GPU devices, device ``p`` on process ``p`` (one GPU per process)."""
    import math

    from spmd import Device, Mesh
    devs = [Device(p, "gpu", p, 0) for p in range(math.prod(shape))]
    return Mesh(np.array(devs, dtype=object).reshape(shape), names)


def _as_processes(n, fn):
    """``fn(rank)`` on ``n`` threads standing for processes: {rank: result or exception}."""
    import threading
    out = {}

    def run(r):
        try:
            out[r] = fn(r)
        except BaseException as e:           # the test looks at every rank's outcome
            out[r] = e
    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


_PROCESS_CALLS = [("all_reduce", (("b",), None, "sum")), ("all_reduce", (("a", "b"), None, "max")),
                  ("all_reduce", (("b",), ((0, 1), (2, 3)), "min")), ("all_gather", (("b",), None)),
                  ("all_gather", (("a",), None)), ("reduce_scatter", (("b",), None, "sum")),
                  ("all_to_all", (("b",), None)),
                  ("permute", (("b",), [(0, 1), (1, 2), (2, 3), (3, 0)])),
                  ("broadcast", (("a", "b"), None, 2)), ("all_reduce", (("a",), None, "sum"))]


@pytest.mark.parametrize("check", [False, True])
def test_nccl_communicator_one_gpu_per_process_on_a_stand_in(fake_gpus, tmp_path, monkeypatch, check):
    import ml_dtypes

    import spmd
    from spmd import flight_recorder
    from spmd.communicators.inprocess import InProcessCommunicator
    from spmd.communicators.nccl import NcclCommunicator
    monkeypatch.setenv("SPMD_FLIGHT_RECORDER_DIR", str(tmp_path))
    mesh = _process_mesh((2, 4), ("a", "b"))
    ref = InProcessCommunicator(spmd.make_mesh((2, 4), ("a", "b")))
    host = {p: np.random.default_rng(p).integers(-5, 5, (4, 3)).astype(np.float32) for p in range(8)}
    bf16 = {p: (host[p] / 4).astype(ml_dtypes.bfloat16) for p in range(8)}
    store = _MemoryStore()
    first = flight_recorder.recorder().seq

    def rank(r):
        comm = NcclCommunicator.one_gpu_per_process(mesh, me=r, local_rank=r, store=store, check=check)
        assert comm.multi_process and comm.local_positions == [r] and comm.check == check
        got = [getattr(comm, name)({r: host[r]}, *args, timeout=20)[r] for name, args in _PROCESS_CALLS]
        got.append(comm.all_gather({r: bf16[r]}, ("b",), None, timeout=20)[r])   # as uint16
        comm.barrier(timeout=20)
        comm.close()
        return got

    results = _as_processes(8, rank)
    for r, got in results.items():
        assert not isinstance(got, BaseException), f"rank {r}: {got!r}"
        for (name, args), g in zip(_PROCESS_CALLS, got):
            assert type(g) is np.ndarray                  # host data comes back to the host
            np.testing.assert_array_equal(g, getattr(ref, name)(host, *args)[r], err_msg=f"{name}{args}")
        assert got[-1].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[-1], ref.all_gather(bf16, ("b",), None)[r])
    entries = [e for e in flight_recorder.recorder().entries if e["seq"] >= first]
    assert {e["op"] for e in entries} == {"psum", "pmax", "pmin", "all_gather", "psum_scatter",
                                          "all_to_all", "ppermute", "pbroadcast"}
    assert all(e["state"] == "completed" for e in entries)
    assert len(entries) == 8 * (len(_PROCESS_CALLS) + 2)        # + the bf16 gather and the barrier
    assert sorted({tuple(e["ranks"]) for e in entries if e["axes"] == ["b"]}) == [
        (0, 1), (0, 1, 2, 3), (2, 3), (4, 5), (4, 5, 6, 7), (6, 7)]


def test_nccl_communicator_one_gpu_per_process_mismatch_and_timeouts(fake_gpus, tmp_path, monkeypatch):
    import spmd
    from spmd import flight_recorder
    from spmd.communicators.nccl import NcclCommunicator
    from spmd.errors import CollectiveMismatchError
    monkeypatch.setenv("SPMD_FLIGHT_RECORDER_DIR", str(tmp_path))
    mesh = _process_mesh((4,), ("i",))
    x = np.ones(3, np.float32)

    def job(check, odd):
        store = _MemoryStore()

        def rank(r):
            comm = NcclCommunicator.one_gpu_per_process(mesh, me=r, local_rank=r, store=store,
                                                        check=check)
            if r == 1:
                return odd(comm)
            return comm.all_reduce({r: x}, ("i",), None, "sum", timeout=1.0)
        return _as_processes(4, rank)

    # rank 1 calls something else: every rank says so, before any data moves
    out = job(True, lambda comm: comm.all_gather({1: x}, ("i",), None, timeout=5))
    assert all(isinstance(e, CollectiveMismatchError) for e in out.values()), out
    assert "rank 1: #" in str(out[0]) and "all_gather" in str(out[0]) and "psum" in str(out[0])
    # rank 1 never arrives: with the check, the others name it ...
    out = job(True, lambda comm: None)
    for r in (0, 2, 3):
        assert isinstance(out[r], spmd.CollectiveTimeoutError), out[r]
        assert re.search(r"psum over axes \('i',\) \(collective #\d+ of rank \d, shape \(3,\), "
                         r"group ranks \[0, 1, 2, 3\]\) did not complete within 1 s: ranks \[1\] "
                         r"did not arrive", str(out[r])), str(out[r])
    # ... without it, NCCL never finishes: the deadline aborts the communicator
    out = job(False, lambda comm: None)
    for r in (0, 2, 3):
        assert isinstance(out[r], spmd.CollectiveTimeoutError), out[r]
        assert "NCCL did not finish" in str(out[r]) and "aborted" in str(out[r])
    last = list(flight_recorder.recorder().entries)[-3:]
    assert [e["state"] for e in last] == ["timeout"] * 3 and all(e["op"] == "psum" for e in last)
    assert (tmp_path / "rank0.json").exists()                  # dumped


def test_nccl_communicator_modes_and_their_checks(fake_gpus):
    import spmd
    from spmd import flight_recorder
    from spmd.communicators.nccl import GpuPlacement, NcclCommunicator
    from spmd.errors import SpmdError
    # every GPU of the mesh in this process: grouped calls, CuPy placement, the frame records
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices("gpu")[:4])
    with NcclCommunicator.for_mesh(mesh) as comm:
        assert not comm.multi_process and comm.local_positions == [0, 1, 2, 3]
        assert isinstance(comm.placement, GpuPlacement)
        bufs = {p: comm.placement.to_local(p, np.full(2, p, np.float32)) for p in range(4)}
        got = comm.all_reduce(bufs, ("i",), None, "sum", timeout=5)
        assert all((comm.placement.to_host(got[p]) == 6).all() for p in range(4))
        e = flight_recorder.recorder().entries[-1]
        assert (e["op"], e["ranks"], e["state"]) == ("psum", [0], "completed")
        np.testing.assert_array_equal(comm.axis_index(("i",))[3], 3)
        comm.barrier()
    assert comm._closed and all(c.destroyed for c in comm._world.values())
    # one GPU per process needs exactly one device of the mesh on this process
    with pytest.raises(SpmdError, match="one GPU per process.*puts 4 devices on process 0"):
        NcclCommunicator.one_gpu_per_process(mesh, me=0, local_rank=0, store=_MemoryStore())
    with pytest.raises(SpmdError, match="SPMD_COLLECTIVE_CHECK=1.*coordinator's store"):
        NcclCommunicator.one_gpu_per_process(_process_mesh((2,), ("i",)), me=0, local_rank=0,
                                             check=True)


# ---------------------------------------------------------------------------------------------
# the kernels themselves, run on the CPU as host C++ (kernels/host_shim.h): every CUDA thread in
# turn, or each as a std::thread for the peer all-reduce (ranks spin on each other's flags)
# ---------------------------------------------------------------------------------------------

_DRIVER = r"""
#include "host_shim.h"
#include "pack.cu"
#include "copy.cu"
#include "reduce.cu"
#include "allreduce.cu"

template <typename T> struct Tag { typedef T type; };

template <typename Fn> void with_type_op(int dt, int op, Fn fn) {
  auto with_op = [&](auto t) {
    switch (op) {
      case 0: fn(t, Tag<spmd::Sum>{}); break;
      case 1: fn(t, Tag<spmd::Max>{}); break;
      default: fn(t, Tag<spmd::Min>{}); break;
    }
  };
  switch (dt) {
    case 0: with_op(Tag<float>{}); break;
    case 1: with_op(Tag<double>{}); break;
    case 2: with_op(Tag<spmd::half_t>{}); break;
    case 3: with_op(Tag<spmd::bf16_t>{}); break;
    case 4: with_op(Tag<int>{}); break;
    default: with_op(Tag<long long>{}); break;
  }
}

template <typename Fn> void with_unit(int unit, Fn fn) {
  switch (unit) {
    case 1: fn(Tag<unsigned char>{}); break;
    case 2: fn(Tag<unsigned short>{}); break;
    case 4: fn(Tag<unsigned int>{}); break;
    case 8: fn(Tag<unsigned long long>{}); break;
    default: fn(Tag<spmd::b128>{}); break;
  }
}

typedef long long ll;

extern "C" {
void run_pack(int unpack, int unit, int wide_index, const void* src, void* dst, ll n, ll d0, ll d1,
              ll d2, ll sr, ll s0, ll s1, ll s2, int blocks, int threads) {
  with_unit(unit, [&](auto u) {
    typedef typename decltype(u)::type T;
    auto go = [&](auto i) {
      typedef typename decltype(i)::type I;
      host_launch({(unsigned)blocks}, {(unsigned)threads}, [&] {
        if (unpack)
          spmd::unpack_chunks<T, I>((const T*)src, (T*)dst, n, d0, d1, d2, sr, s0, s1, s2);
        else
          spmd::pack_chunks<T, I>((const T*)src, (T*)dst, n, d0, d1, d2, sr, s0, s1, s2);
      });
    };
    if (wide_index) go(Tag<long long>{}); else go(Tag<int>{});
  });
}

void run_copy_batched(int unit, const void** srcs, void** dsts, const ll* counts, int copies,
                      int blocks, int threads) {
  auto go = [&](auto u) {
    typedef typename decltype(u)::type V;
    host_launch({(unsigned)blocks, (unsigned)copies}, {(unsigned)threads},
                [&] { spmd::copy_batched<V>((const V* const*)srcs, (V* const*)dsts, counts); });
  };
  if (unit == 16) go(Tag<spmd::Pack<unsigned int>>{}); else with_unit(unit, go);
}

void run_reduce_axis(int dt, int op, int wide_index, const void* src, void* dst, ll outer, ll n,
                     ll inner, ll s_outer, ll s_n, ll s_inner, double scale, int use_scale,
                     int blocks, int threads) {
  with_type_op(dt, op, [&](auto t, auto o) {
    typedef typename decltype(t)::type T;
    typedef typename decltype(o)::type Op;
    auto go = [&](auto i) {
      typedef typename decltype(i)::type I;
      host_launch({(unsigned)blocks}, {(unsigned)threads}, [&] {
        spmd::reduce_axis<T, Op, I>((const T*)src, (T*)dst, outer, n, inner, s_outer, s_n, s_inner,
                                    scale, use_scale);
      });
    };
    if (wide_index) go(Tag<long long>{}); else go(Tag<int>{});
  });
}

void run_reduce_ptrs(int dt, int op, const void** srcs, int n, void* dst, ll count, double scale,
                     int use_scale, int vectorized, int blocks, int threads) {
  with_type_op(dt, op, [&](auto t, auto o) {
    typedef typename decltype(t)::type T;
    typedef typename decltype(o)::type Op;
    host_launch({(unsigned)blocks}, {(unsigned)threads}, [&] {
      spmd::reduce_ptrs<T, Op>((const T* const*)srcs, n, (T*)dst, count, scale, use_scale, vectorized);
    });
  });
}

void run_allreduce(int two_shot, int dt, int op, const void** ins, void** outs, void** bufs,
                   unsigned** flags, int n, ll packs, unsigned epoch, double scale, int use_scale,
                   int blocks, int threads) {
  with_type_op(dt, op, [&](auto t, auto o) {
    typedef typename decltype(t)::type T;
    typedef typename decltype(o)::type Op;
    typedef spmd::Pack<T> P;
    host_launch_concurrent(n, {(unsigned)blocks}, {(unsigned)threads}, [&](int r) {
      if (two_shot)
        spmd::allreduce_two_shot<T, Op>((const P*)ins[r], (P*)outs[r], (P* const*)bufs, flags, n, r,
                                        packs, epoch, scale, use_scale);
      else
        spmd::allreduce_one_shot<T, Op>((const P*)ins[r], (P*)outs[r], (P* const*)bufs, flags, n, r,
                                        packs, epoch, scale, use_scale);
    });
  });
}
}
"""

_DT = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
       np.dtype("bfloat16"): 3, np.dtype(np.int32): 4, np.dtype(np.int64): 5}
_OP = {"sum": 0, "max": 1, "min": 2}
_L, _I, _P = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to run the kernels as host code")
    d = tmp_path_factory.mktemp("host_kernels")
    (d / "driver.cpp").write_text(_DRIVER)
    built = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                            "-Wno-unknown-pragmas", f"-I{kernels.kernels_dir()}", str(d / "driver.cpp"),
                            "-o", str(d / "libkernels.so")], capture_output=True, text=True)
    if built.returncode and ("_Float16" in built.stderr or "barrier" in built.stderr):
        pytest.skip(f"this C++ compiler lacks C++20 std::barrier or _Float16: {built.stderr[:300]}")
    assert built.returncode == 0, built.stderr
    return ctypes.CDLL(str(d / "libkernels.so"))


def _ptrs(arrays):
    return (_P * len(arrays))(*[a.ctypes.data for a in arrays])


@FAST
@given(rank_major_views(), st.integers(1, 4), st.sampled_from([1, 7, 32]), st.booleans())
def test_host_pack_and_unpack_kernels(host_kernels, case, blocks, threads, wide_index):
    buf, view = case
    lay = im.pack_layout(view.shape, _elem_strides(view))
    if lay is None:
        return
    first = _offset_in(buf, view) * view.itemsize
    wide, unit = im.widen(lay, view.itemsize, [first])
    packed = np.zeros(view.size, view.dtype)
    args = [_L(v) for v in (wide.n, wide.d0, wide.d1, wide.d2, wide.s_rank, wide.s0, wide.s1, wide.s2)]
    host_kernels.run_pack(_I(0), _I(unit), _I(wide_index), _P(view.ctypes.data), _P(packed.ctypes.data),
                          *args, _I(blocks), _I(threads))
    np.testing.assert_array_equal(packed, np.ascontiguousarray(view).ravel())
    target = np.zeros_like(buf)
    dst = target[_offset_in(buf, view):]
    host_kernels.run_pack(_I(1), _I(unit), _I(wide_index), _P(packed.ctypes.data), _P(dst.ctypes.data),
                          *args, _I(blocks), _I(threads))
    np.testing.assert_array_equal(np.lib.stride_tricks.as_strided(dst, view.shape, view.strides), view)


def _data(dtype, shape, seed):
    x = np.random.default_rng(seed).integers(-20, 20, size=shape)
    return x.astype(dtype)


@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "bfloat16", np.int32, np.int64])
@pytest.mark.parametrize("layout, axis", [("contiguous", 0), ("contiguous", 1), ("contiguous", 2),
                                          ("transposed", 1)])       # the reduced dim strided
def test_host_reduce_axis_kernel(host_kernels, op, dtype, axis, layout):
    import ml_dtypes  # noqa: F401  (registers the bfloat16 dtype)
    x = _data(np.dtype(dtype), (3, 5, 7), 0)
    if layout == "transposed":
        x = np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)
    before = im.runs(x.shape[:axis], _elem_strides(x)[:axis])
    after = im.runs(x.shape[axis + 1:], _elem_strides(x)[axis + 1:])
    assert len(before) <= 1 and len(after) <= 1
    (outer, s_outer), = before or [(1, 0)]
    (inner, s_inner), = after or [(1, 1)]
    out = np.zeros(x.shape[:axis] + x.shape[axis + 1:], x.dtype)
    scale = 0.5 if op == "sum" and x.dtype.kind == "f" else None
    host_kernels.run_reduce_axis(_I(_DT[x.dtype]), _I(_OP[op]), _I(0), _P(x.ctypes.data), _P(out.ctypes.data),
                                 _L(outer), _L(x.shape[axis]), _L(inner), _L(s_outer),
                                 _L(x.strides[axis] // x.itemsize), _L(s_inner),
                                 ctypes.c_double(scale or 1.0), _I(scale is not None), _I(2), _I(5))
    want = {"sum": np.sum, "max": np.max, "min": np.min}[op](x.astype(np.float64), axis=axis) * (scale or 1)
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=1e-2 if x.itemsize == 2 else 1e-6)


@pytest.mark.parametrize("vectorized", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16", np.int64])
@pytest.mark.parametrize("count", [1, 8, 37, 1000])
def test_host_reduce_ptrs_kernel(host_kernels, vectorized, dtype, count):
    import ml_dtypes  # noqa: F401
    xs = [_data(np.dtype(dtype), count, s) for s in range(5)]
    if np.dtype(dtype).kind == "f":
        xs[3][count // 2] = np.nan
    for op, fn in (("sum", np.add), ("max", np.maximum), ("min", np.minimum)):
        out = np.zeros(count, xs[0].dtype)
        host_kernels.run_reduce_ptrs(_I(_DT[out.dtype]), _I(_OP[op]), _ptrs(xs), _I(len(xs)),
                                     _P(out.ctypes.data), _L(count), ctypes.c_double(1.0), _I(0),
                                     _I(vectorized), _I(2), _I(4))
        want = xs[0].astype(np.float64)
        for x in xs[1:]:
            want = fn(want, x.astype(np.float64))
        np.testing.assert_allclose(out.astype(np.float64), want, rtol=1e-2 if out.itemsize == 2 else 1e-6)


def test_host_copy_batched_kernel(host_kernels):
    srcs = [np.arange(n, dtype=np.uint8) for n in (16, 48, 4096)]
    for unit in (1, 2, 4, 8, 16):
        dsts = [np.zeros_like(s) for s in srcs]
        counts = np.array([s.nbytes // unit for s in srcs], np.int64)
        host_kernels.run_copy_batched(_I(unit), _ptrs(srcs), _ptrs(dsts), _P(counts.ctypes.data),
                                      _I(len(srcs)), _I(3), _I(16))
        for s, d in zip(srcs, dsts):
            np.testing.assert_array_equal(s, d)


@pytest.mark.parametrize("two_shot", [0, 1], ids=["one_shot", "two_shot"])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype, op", [(np.float32, "sum"), (np.float16, "sum"), ("bfloat16", "max"),
                                        (np.int64, "min"), (np.float64, "sum")])
def test_host_peer_all_reduce(host_kernels, two_shot, n, dtype, op):
    """The ranks run at once and meet at the flag barriers; the flags are reused across calls
    (the epoch grows), and every rank ends with the same, correct result."""
    import ml_dtypes  # noqa: F401
    dtype = np.dtype(dtype)
    count = 16 // dtype.itemsize * 37                     # 37 packs: slices of uneven length
    bufs = [np.zeros(count * dtype.itemsize, np.uint8) for _ in range(n)]
    flags = [np.zeros(im.FLAG_WORDS, np.uint32) for _ in range(n)]
    for epoch in (1, 2, 3):
        ins = [_data(dtype, count, 10 * epoch + r) for r in range(n)]
        outs = [np.zeros_like(x) for x in ins]
        scale = 0.25 if op == "sum" and dtype.kind == "f" and epoch == 3 else None
        host_kernels.run_allreduce(_I(two_shot), _I(_DT[dtype]), _I(_OP[op]), _ptrs(ins), _ptrs(outs),
                                   _ptrs(bufs), _ptrs(flags), _I(n), _L(count * dtype.itemsize // 16),
                                   ctypes.c_uint(epoch), ctypes.c_double(scale or 1.0),
                                   _I(scale is not None), _I(3), _I(8))
        fn = {"sum": np.add, "max": np.maximum, "min": np.minimum}[op]
        want = ins[0].astype(np.float64)
        for x in ins[1:]:
            want = fn(want, x.astype(np.float64))
        for o in outs:
            np.testing.assert_allclose(o.astype(np.float64), want * (scale or 1),
                                       rtol=1e-2 if dtype.itemsize == 2 else 1e-6)
            np.testing.assert_array_equal(o, outs[0])          # bitwise the same on every rank


# ---------------------------------------------------------------------------------------------
# spmd.gpu's launchers driving the host-run kernels (stand-in CuPy): argument order, types,
# layouts, grids and the peer all-reduce's buffers, from the Python side down to the kernels
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def launch_on_host(fake_gpus, host_kernels, monkeypatch):
    import _fake_cupy
    _fake_cupy.kernels_on_host(monkeypatch, host_kernels)
    return fake_gpus


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.complex128])
def test_ops_launchers_drive_the_kernels(launch_on_host, dtype):
    from spmd.gpu import ops
    cupy = launch_on_host
    x = (np.arange(4 * 6 * 10) % 251).astype(dtype).reshape(4, 6, 10)
    for host in (x, np.asfortranarray(x), x[:, :, ::-1][:, :, ::-1]):
        dev = cupy.asarray(host) if host.flags.c_contiguous else host.view(type(cupy.asarray(host)))
        view = cupy.moveaxis(dev.reshape(4, 3, 2, 10), 1, 0)
        packed = ops.pack(view)
        np.testing.assert_array_equal(packed, np.ascontiguousarray(np.moveaxis(host.reshape(4, 3, 2, 10), 1, 0)))
        target = cupy.zeros(x.shape, dtype)
        ops.unpack(packed, cupy.moveaxis(target.reshape(4, 3, 2, 10), 1, 0))
        np.testing.assert_array_equal(target, x)
    if np.dtype(dtype).kind == "f":
        y = cupy.asarray(x.real.astype(np.float32))
        for axis in range(3):
            np.testing.assert_allclose(ops.reduce_axis(y, axis, "sum", scale=0.5),
                                       y.sum(axis=axis, keepdims=True) * 0.5, rtol=1e-6)
        outs = cupy.empty(60, np.float32)
        ops.reduce_ptrs([y[i].ravel() for i in range(4)], outs, "max")
        np.testing.assert_array_equal(outs, y.max(axis=0).ravel())
    srcs = [cupy.asarray(np.arange(n, dtype=np.uint8)) for n in (3, 64)]
    dsts = [cupy.zeros_like(s) for s in srcs]
    ops.copy_batched(list(zip(srcs, dsts)))
    assert all((s == d).all() for s, d in zip(srcs, dsts))


@pytest.mark.parametrize("nbytes", [4096, 1 << 20])        # one-shot, then two-shot over 4 ranks
def test_nccl_communicator_peer_path_drives_the_all_reduce_kernels(launch_on_host, nbytes):
    import spmd
    from spmd.gpu import index_math
    from spmd.communicators.nccl import NcclCommunicator
    mesh = spmd.make_mesh((2, 4), ("a", "b"), devices=spmd.devices("gpu")[:8])
    host = {p: np.random.default_rng(p).integers(-9, 9, nbytes // 4).astype(np.float32) for p in range(8)}
    assert index_math.choose_all_reduce(nbytes, 4, 4, peer_ok=True, aligned=True) != "nccl"
    with NcclCommunicator.for_mesh(mesh) as comm:
        for _ in range(2):                                    # the flags are reused
            got = comm.all_reduce({p: comm.placement.to_local(p, h) for p, h in host.items()},
                                  ("b",), None, "sum")
            for p in range(8):
                row = [q for q in range(8) if q // 4 == p // 4]
                np.testing.assert_array_equal(got[p], sum(host[q] for q in row))
        assert len(comm._peer) == 2 and all(v is not None for v in comm._peer.values())


def test_peer_all_reduce_over_ipc_handles_on_the_stand_in(launch_on_host):
    """One rank per "process" (threads here): IPC handles travel through allgather_bytes, each
    rank maps the others' buffers, and the all-reduce kernels meet over them."""
    import sys
    import threading

    from spmd.gpu.peer import PeerAllReduce
    cupy = launch_on_host
    rt = sys.modules["cupy.cuda.runtime"]
    rt.__dict__.update(ipcGetMemHandle=lambda p: p.to_bytes(64, "little"),
                       ipcOpenMemHandle=lambda h, flags: int.from_bytes(h, "little"),
                       ipcCloseMemHandle=lambda p: None, cudaIpcMemLazyEnablePeerAccess=1)
    n, posted, ranks = 3, {}, [None] * 3
    meet = threading.Barrier(n)

    def allgather_bytes_for(r):
        def allgather(payload):
            posted[r] = payload
            meet.wait()
            return [posted[i] for i in range(n)]
        return allgather

    def open_rank(r):
        ranks[r] = PeerAllReduce.over_ipc(n, r, r, 4096, allgather_bytes_for(r))
    threads = [threading.Thread(target=open_rank, args=(r,)) for r in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    xs = [cupy.asarray(np.full(1024, r + 1, np.float32)) for r in range(n)]
    outs = [ranks[r](xs[r], cupy.empty_like(xs[r]), "sum", "two_shot") for r in range(n)]
    for o in outs:
        np.testing.assert_array_equal(o, np.full(1024, 6, np.float32))
    for r in ranks:
        r.close()
