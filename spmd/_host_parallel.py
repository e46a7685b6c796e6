"""Large NumPy copies and reductions, split over a few host threads.

The simulated mesh keeps every device's block in host memory, so a collective is a copy or a
sum over memory.  One thread cannot use all of the memory bandwidth (on a two-core machine
one core copies at about 70% of what two do); NumPy releases the GIL inside ufuncs and
``copyto``, so splitting a big copy or sum into one chunk per core runs it at the bandwidth of
the machine.  Every function here takes the array namespace ``xp`` and does the plain
operation when it is not NumPy (cupy runs it on the GPU) or the arrays are small.

Results are bit-identical to the one-call versions: a reduction adds the slabs in order
(``((s0 + s1) + s2) + ...``), the order the reference executor uses.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import glob
import math
import os
import sys
import threading

import numpy as np

from . import _gemm
from ._shapes import broadcast_shapes

# Below this many bytes touched, one call on one thread is faster than handing out chunks.
PARALLEL_MIN_BYTES = 1 << 20
# Elementwise work (ufuncs, fused chains) is mostly memory-bound: below this many bytes of
# result, a hand-out costs more than the second thread saves.  Handing out wakes a sleeping
# helper (the submitting thread spends 15-50 us in that wake on a virtual machine) and the
# caller may then sleep until the helper is done.  Measured on 2 cores, one thread against
# two: a 1 MiB multiply 104 against 270 us, 4 MiB 453 against 641 us, 8 MiB about equal; a
# chain with more arithmetic per byte (tanh and its derivative) gains from 4 MiB on, so the
# recipes' steps are fastest with this threshold (TP 26.0 -> 25.1 ms, DP 5.7 -> 5.4 ms).
ELEMENTWISE_PARALLEL_MIN_BYTES = 4 << 20
# A copy (plain or transposing) is memory-bound: split over the threads it loses below about
# this many bytes copied (2 cores: 4 MiB 1.2x slower than one thread, 8 MiB 1.3x faster).
COPY_PARALLEL_MIN_BYTES = 6 << 20
# Collectives on values of at least this many bytes loop over slabs into preallocated outputs;
# smaller ones make one NumPy call (fewer Python calls).  Tests set it to 0 to check both paths.
LOOP_MIN_BYTES = 1 << 18
# Reductions stay one NumPy call while their inputs fit in a last-level cache: there one pass is
# quicker than handing blocks to threads.
REDUCE_LOOP_MIN_BYTES = 16 << 20

# Big outputs come from a pool of host buffers: the first touch of a fresh ``np.empty`` of a MiB
# faults in and zeroes every page (glibc maps each anew), costing as much as the work that fills
# it (a 1,000-step scan of a small RNN ran twice as long).  A
# pooled buffer is handed out again once no array refers to it any more (like the memory pools
# of JAX's and CuPy's allocators); at most POOL_MAX_BYTES stay pooled.
POOL_MIN_BYTES = 1 << 18
# Reductions go block by block: a block of the result this big stays in a core's L2 cache.
BLOCK_BYTES = 256 << 10
# Elementwise work goes in blocks this big, at least one per host thread: handing out a block
# costs tens of microseconds, and a memory-bound ufunc gains nothing from blocks that fit in L2.
ELEMENTWISE_BLOCK_BYTES = 4 << 20
# Per-thread scratch blocks (``scratch``) up to this size are kept for the next call.
SCRATCH_MAX_BYTES = 16 << 20
POOL_MAX_BYTES = 1 << 30
_buffers: list = []                     # every pooled buffer, oldest first
_by_size: dict = {}                     # nbytes -> the pooled buffers of that size
_pooled_bytes = 0
_buffers_lock = threading.Lock()

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_local = threading.local()              # set inside pool workers: no nested hand-outs


@functools.lru_cache(maxsize=None)
def num_threads() -> int:
    """Host threads for one process's work: ``SPMD_HOST_THREADS``, else the cores it may run
    on (at most 8).  ``spmd-run`` gives each of N processes on one machine its share of the
    cores, so that ranks do not take cores from each other."""
    raw = os.environ.get("SPMD_HOST_THREADS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"SPMD_HOST_THREADS={raw!r}: use a whole number of threads, 1 or "
                             f"more (or unset it: the cores this process may run on).")
        return int(raw)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _worker_init():
    _local.worker = True


def _after_fork_in_child():
    # the parent's pool threads do not exist in a forked child; start afresh there
    global _pool, _buffers_lock
    _pool, _buffers_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def run(xp, nbytes: int, tasks, min_bytes: int | None = None) -> None:
    """Run the zero-argument callables ``tasks``, which write disjoint parts of their outputs;
    on the thread pool when ``xp`` is NumPy and ``nbytes`` (the bytes they touch) is at least
    ``min_bytes`` (default ``PARALLEL_MIN_BYTES``)."""
    global _pool
    tasks = list(tasks)
    threads = num_threads()
    if (len(tasks) < 2 or threads < 2 or xp is not np
            or nbytes < (PARALLEL_MIN_BYTES if min_bytes is None else min_bytes)
            or getattr(_local, "worker", False)):
        for t in tasks:
            t()
        return
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(threads, "spmd-host", _worker_init)
    # The caller and the helpers take tasks from one shared iterator (each task once; its next()
    # holds the GIL).  On a busy host a helper may not get a core for a while: the caller then
    # does the work itself instead of waiting, and helpers that never started are cancelled.
    pending = iter(tasks)
    futures = [_pool.submit(_drain, pending) for _ in range(min(threads, len(tasks)) - 1)]
    try:
        _drain(pending)
    finally:
        for f in futures:
            if not f.cancel():
                f.result()


def _drain(tasks):
    for t in tasks:
        t()


def chunks(shape: tuple[int, ...], parts: int) -> list[tuple]:
    """Index tuples that cut an array of ``shape`` into about ``parts`` pieces along its first
    dim that is long enough (the outermost, so each piece stays as contiguous as it can)."""
    axis = next((d for d, n in enumerate(shape) if n >= parts), None)
    if axis is None:
        axis = max(range(len(shape)), key=lambda d: shape[d], default=None)
    if axis is None or shape[axis] < 2 or parts < 2:
        return [()]
    n = shape[axis]
    cuts = [n * i // parts for i in range(parts + 1)]
    head = (slice(None),) * axis
    return [head + (slice(a, b),) for a, b in zip(cuts, cuts[1:]) if b > a]


_REDUCE = {"sum": "add", "max": "maximum", "min": "minimum"}


def reduce_into(xp, op: str, out, slabs):
    """``out = slabs[0] op slabs[1] op ...`` in order (``op`` one of sum/max/min; the slabs are
    arrays or views of ``out``'s shape), over the host threads.  One task per cache-sized block
    of ``out``, so the running result stays in cache while the slabs stream through."""
    ufunc = getattr(xp, _REDUCE[op])

    def block(idx):
        o = out[idx]
        if len(slabs) == 1:
            xp.copyto(o, slabs[0][idx])
            return
        ufunc(slabs[0][idx], slabs[1][idx], out=o)
        for s in slabs[2:]:
            ufunc(o, s[idx], out=o)
    run(xp, out.nbytes * (len(slabs) + 1),
        [functools.partial(block, idx) for idx in _blocks(xp, out.shape, out.nbytes // BLOCK_BYTES)])
    return out


def copy_tasks(xp, out, src, parts: int | None = None) -> list:
    """Tasks that together copy ``src`` into ``out`` (default: a few per host thread)."""
    return [functools.partial(_copy_block, xp, out, src, idx)
            for idx in _blocks(xp, out.shape, parts or 4 * num_threads())]


# The array modules whose arrays live on an accelerator (each call a kernel launch), by name;
# the plug-in that brings one adds it (spmd.gpu: "cupy").
DEVICE_MODULES: set = set()


def on_device(xp) -> bool:
    """``xp`` is a GPU's array module (not NumPy, nor a tracing namespace such as vmap's)."""
    return getattr(xp, "__name__", None) in DEVICE_MODULES


def _blocks(xp, shape, parts: int) -> list[tuple]:
    """:func:`chunks` for host arrays; a device's array (CuPy) is one block: its kernels are
    parallel already, and each block would cost a launch."""
    return chunks(shape, parts) if xp is np else [()]


def _copy_block(xp, out, src, idx):
    xp.copyto(out[idx], src[idx])


def empty(xp, shape, dtype):
    """``xp.empty(shape, dtype)``, from the buffer pool when it is NumPy and big."""
    global _pooled_bytes
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if xp is not np or nbytes < POOL_MIN_BYTES:
        return xp.empty(shape, dtype)
    with _buffers_lock:
        for buf in _by_size.get(nbytes, ()):
            # free: referenced only by the two lists (and ``buf`` and getrefcount's argument)
            if sys.getrefcount(buf) == 4:
                break
        else:
            buf = np.empty(nbytes, np.uint8)
            _buffers.append(buf)
            _by_size.setdefault(nbytes, []).append(buf)
            _pooled_bytes += nbytes
            while _pooled_bytes > POOL_MAX_BYTES and len(_buffers) > 1:
                old = _buffers.pop(0)               # still-used ones just stop being pooled
                same = _by_size[old.nbytes]
                del same[next(i for i, b in enumerate(same) if b is old)]
                _pooled_bytes -= old.nbytes
    return buf.view(dtype).reshape(shape)


def release_pool() -> None:
    """Forget the pooled buffers (arrays still using one keep it): the next big outputs are
    fresh allocations again, which is what a memory measurement should see."""
    global _pooled_bytes
    with _buffers_lock:
        _buffers.clear()
        _by_size.clear()
        _pooled_bytes = 0


def copy(xp, src):
    """A C-contiguous copy of ``src``."""
    if xp is not np or src.nbytes < COPY_PARALLEL_MIN_BYTES:
        return xp.array(src, order="C")
    out = empty(xp, src.shape, src.dtype)
    copy_into(xp, out, src)
    return out


def copy_into(xp, out, src) -> None:
    """``out[...] = src``, over the threads when it is big enough to gain from them."""
    run(xp, out.nbytes, copy_tasks(xp, out, src), COPY_PARALLEL_MIN_BYTES)


def concatenate(xp, arrays, axis: int):
    """``xp.concatenate(arrays, axis=axis)`` of arrays of one dtype; big ones are copied piece
    by piece over the host threads."""
    nbytes = sum(a.nbytes for a in arrays)
    if xp is not np or nbytes < COPY_PARALLEL_MIN_BYTES or len({a.dtype for a in arrays}) > 1:
        return xp.concatenate(arrays, axis=axis)
    shape = list(arrays[0].shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    out = empty(xp, tuple(shape), arrays[0].dtype)
    tasks, at = [], 0
    for a in arrays:
        tasks += copy_tasks(xp, out[(slice(None),) * axis + (slice(at, at + a.shape[axis]),)], a)
        at += a.shape[axis]
    run(xp, nbytes, tasks, COPY_PARALLEL_MIN_BYTES)
    return out


def elementwise(xp, fn, *args):
    """``fn(xp, *args)`` for an elementwise ``fn`` (operands broadcast), block by block over
    the host threads when the result is big: NumPy runs a ufunc on one core.  A ``fn`` that
    can write into an array (``spmd.prims.ufunc``) writes each block straight into the result."""
    if xp is not np or not _big(args):
        return fn(xp, *args)
    probe = fn(xp, *_one_element(args))
    into = getattr(fn, "writes_into", False)

    def fill(xp, a, o):
        if into and o[0].flags.c_contiguous:
            fn(xp, *a, out=o[0])
        else:
            xp.copyto(o[0], fn(xp, *a))
    return blockwise(xp, fill, args, [np.result_type(probe)])[0]


def _big(args) -> bool:
    shape = broadcast_shapes(*(np.shape(a) for a in args))
    itemsize = max((a.dtype.itemsize for a in args if isinstance(a, np.ndarray)), default=8)
    return (math.prod(shape) * itemsize >= ELEMENTWISE_PARALLEL_MIN_BYTES and num_threads() >= 2
            and not getattr(_local, "worker", False))


def _one_element(args):
    """``args`` cut to one element each: an elementwise function's result dtypes from them
    are those of the whole (NumPy's dtype rules do not look at values)."""
    return [a[(slice(0, 1),) * a.ndim] if isinstance(a, np.ndarray) else a for a in args]


def scratch(slot: int, shape, dtype):
    """A block-sized NumPy work array of this thread, reused from call to call (a fresh one of
    a MiB costs its page faults every time): ``slot`` tells apart the ones in use together.
    Its contents never leave the caller."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > SCRATCH_MAX_BYTES:
        return np.empty(shape, dtype)
    bufs = getattr(_local, "scratch", None)
    if bufs is None:
        bufs = _local.scratch = {}
    buf = bufs.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[slot] = np.empty(max(nbytes, BLOCK_BYTES), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


def blockwise(xp, fill, args, dtypes) -> list:
    """Results of the operands' broadcast shape, one per dtype, filled by
    ``fill(xp, operand blocks, result blocks)`` block by block over the host threads (one call
    on the whole arrays when they are small).

    A result block is strided when the blocks cut a dim after the first one that is not 1;
    ``fill`` should write into such a block with ``copyto`` rather than a ufunc's ``out=``:
    NumPy 2.4's ``negative`` writes wrong values into a strided ``out`` whose last dim has
    size 1 (float32 and int32; contiguous ``out`` is right for every ufunc)."""
    shape = broadcast_shapes(*(np.shape(a) for a in args))
    outs = [empty(xp, shape, dt) for dt in dtypes]
    nbytes = math.prod(shape) * max(np.dtype(dt).itemsize for dt in dtypes)
    blocks = chunks(shape, max(num_threads(), nbytes // ELEMENTWISE_BLOCK_BYTES)) \
        if xp is np and nbytes >= ELEMENTWISE_PARALLEL_MIN_BYTES else [()]
    if len(blocks) < 2:
        fill(xp, args, outs)
        return outs

    def operands(idx):
        axis, cut = len(idx) - 1, idx[-1]
        out = []
        for a in args:
            d = axis - (len(shape) - np.ndim(a))
            out.append(a if d < 0 or a.shape[d] == 1 else a[(slice(None),) * d + (cut,)])
        return out
    errors = np.geterr()                # np.errstate is per thread: the caller's holds in helpers

    def block(idx):
        with np.errstate(**errors):
            fill(xp, operands(idx), [o[idx] for o in outs])
    run(xp, 2 * nbytes * len(outs), [functools.partial(block, idx) for idx in blocks])
    return outs


def reshape_is_view(xp, x, shape) -> bool:
    """Whether ``x.reshape(shape)`` needs no copy (assumed so for non-NumPy namespaces)."""
    if xp is not np:
        return True
    try:
        x.reshape(shape, copy=False)
    except ValueError:
        return False
    return True


def reshape(xp, x, shape):
    """``x.reshape(shape)``: a view when strides allow, else one (threaded) copy."""
    if xp is np:
        try:
            return x.reshape(shape, copy=False)
        except ValueError:
            return copy(xp, x).reshape(shape)
    return xp.reshape(x, shape)


# ---------------------------------------------------------------------------------------------
# matmul over the simulated devices
# ---------------------------------------------------------------------------------------------

# Below this many multiply-adds a batched matmul is one NumPy call.
MATMUL_MIN_FLOPS = 1 << 24
# Up to this many multiply-adds OpenBLAS runs a product on one thread by itself (its
# GEMM_MULTITHREAD_THRESHOLD, 4 * 65536): no thread count to set around the call, which costs
# more than a small product.
MATMUL_SINGLE_THREAD_FLOPS = 1 << 18


@functools.lru_cache(maxsize=1)
def _openblas():
    """(get_num_threads, set_num_threads) of NumPy's bundled OpenBLAS, or None."""
    for path in glob.glob(os.path.dirname(np.__file__) + ".libs/libscipy_openblas*.so*"):
        try:
            lib = ctypes.CDLL(path)
            return lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
        except (OSError, AttributeError):
            continue
    return None


def _pooled_matmul(a, b, lead):
    """``np.matmul(a, b)``, a big result written into a pooled buffer (no fresh pages)."""
    shape = lead + (a.shape[-2], b.shape[-1])
    dtype = np.result_type(a, b)
    if math.prod(shape) * dtype.itemsize < POOL_MIN_BYTES:
        return np.matmul(a, b)
    return np.matmul(a, b, out=empty(np, shape, dtype))


def matmul(xp, a, b, devices_folded=False):
    """``xp.matmul(a, b)`` where the leading dims are the simulated devices: one single-threaded
    BLAS call per device, the devices spread over the host threads (as XLA runs one thread per
    device).  A multi-threaded BLAS call per device is what NumPy would do; on a busy host its
    spinning threads cost up to ten times the work itself.  ``devices_folded``: the devices were
    folded into the rows or columns (fewer, bigger products), so products are also cut into
    row blocks until every host thread has one; so is a single product (no device dims)."""
    if xp is not np or a.ndim < 2 or b.ndim < 2:
        return xp.matmul(a, b)
    lead = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if a.ndim > 2 and math.prod(b.shape[:-2]) == 1 and reshape_is_view(
            xp, a, (-1, a.shape[-1])):
        # the same matrix for every leading index (a loop's weight against all its steps):
        # one product of all the rows, not one per leading index
        rows = a.reshape(-1, a.shape[-1])
        return matmul(xp, rows, b.reshape(b.shape[-2:])).reshape(lead + (a.shape[-2], b.shape[-1]))
    rows = a.shape[-2]
    flops = math.prod(lead) * rows * a.shape[-1] * b.shape[-1]
    blas = _openblas()
    if blas is None or flops <= MATMUL_SINGLE_THREAD_FLOPS:
        return _pooled_matmul(a, b, lead)
    # one product (a weight gradient with the devices folded into its contraction): row blocks
    devices_folded = devices_folded or math.prod(lead) < 2
    get, set_ = blas
    before = get()
    set_(1)
    try:
        if flops < MATMUL_MIN_FLOPS or num_threads() < 2 or getattr(_local, "worker", False):
            return _pooled_matmul(a, b, lead)
        out = empty(xp, lead + (rows, b.shape[-1]), np.result_type(a, b))
        a = np.broadcast_to(a, lead + a.shape[-2:])
        b = np.broadcast_to(b, lead + b.shape[-2:])
        parts = min(rows, -(-num_threads() // math.prod(lead))) if devices_folded else 1
        cuts = [rows * j // parts for j in range(parts + 1)]
        if _gemm.products(a, b, out, cuts, num_threads()):
            return out
        run(xp, out.nbytes + a.nbytes + b.nbytes,
            [lambda i=i, r=slice(lo, hi): np.matmul(a[i][r], b[i], out=out[i][r])
             for i in np.ndindex(*lead) for lo, hi in zip(cuts, cuts[1:])])
        return out
    finally:
        set_(before)
