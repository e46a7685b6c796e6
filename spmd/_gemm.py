"""Matrix products of the simulated devices on host threads that wait for work by spinning.

A batched product of the stacked executor (one product per simulated device, or row blocks of
one product) goes to a pool of C threads as one call: each thread takes products from a shared
counter and runs them with NumPy's OpenBLAS on one thread, the calling thread as well.  Handing
out work this way costs about a microsecond, against tens for a Python thread pool, whose
helpers sleep on a lock: waking a sleeping thread costs 15-50 us on a virtual machine, and a
training step makes dozens of products (a (8, 64, 256) x (8, 256, 256) product took 530 us on
two Python threads, against 290 us for half of it on one).

After a product a helper spins for ``SPIN_SECONDS`` before it sleeps, so the products of one
step find it awake; a process that shares its cores with others pays that much CPU per product
at most.  ``products`` returns False (the caller then uses the Python pool) where there is no C
compiler, no OpenBLAS with a CBLAS interface, a dtype other than float32/float64, or a layout
BLAS cannot take; ``SPMD_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import glob
import math
import os

import numpy as np

from . import _cbuild

SPIN_SECONDS = 1e-3

_SOURCE = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

typedef int64_t blasint;
typedef void (*sgemm_t)(int, int, int, blasint, blasint, blasint, float, const float *, blasint,
                        const float *, blasint, float, float *, blasint);
typedef void (*dgemm_t)(int, int, int, blasint, blasint, blasint, double, const double *,
                        blasint, const double *, blasint, double, double *, blasint);
enum { ROW_MAJOR = 101, MAX_WORKERS = 63 };
#define CLOSED 0xffffffffull

/* the job: products C = A B of one shape but their rows; per product 4 int64: the addresses of
   A, B and C and its number of rows.  Written by the caller while the pool is closed. */
static struct {
    const int64_t *tasks;
    int64_t count, n, k, lda, ldb, ldc;
    int trans_a, trans_b, f64;
} job;
static sgemm_t sgemm;
static dgemm_t dgemm;
static _Atomic uint64_t state;      /* generation << 32 | next product (CLOSED: none) */
static _Atomic uint64_t posted;     /* the latest job's generation */
static _Atomic int64_t finished;    /* products of the job done */
static _Atomic int sleeping;
static int workers;
static int64_t spin_ns;
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t calling = PTHREAD_MUTEX_INITIALIZER;

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void product(int64_t i) {
    const int64_t *t = job.tasks + 4 * i;
    if (job.f64)
        dgemm(ROW_MAJOR, job.trans_a, job.trans_b, t[3], job.n, job.k, 1.0,
              (const double *)(intptr_t)t[0], job.lda, (const double *)(intptr_t)t[1], job.ldb,
              0.0, (double *)(intptr_t)t[2], job.ldc);
    else
        sgemm(ROW_MAJOR, job.trans_a, job.trans_b, t[3], job.n, job.k, 1.0f,
              (const float *)(intptr_t)t[0], job.lda, (const float *)(intptr_t)t[1], job.ldb,
              0.0f, (float *)(intptr_t)t[2], job.ldc);
}

/* take products of job `gen` until none is left (a late helper finds the job closed) */
static void work(uint64_t gen) {
    for (;;) {
        uint64_t s = atomic_load(&state);
        if ((s >> 32) != gen || (s & CLOSED) >= (uint64_t)job.count)
            return;
        if (!atomic_compare_exchange_weak(&state, &s, s + 1))
            continue;
        product((int64_t)(s & CLOSED));
        atomic_fetch_add(&finished, 1);
    }
}

static void *helper(void *unused) {
    (void)unused;
    uint64_t seen = atomic_load(&posted);
    for (;;) {
        int64_t since = now_ns();
        uint64_t gen;
        unsigned spins = 0;
        while ((gen = atomic_load(&posted)) == seen) {
            if ((++spins & 1023) == 0 && now_ns() - since > spin_ns) {
                pthread_mutex_lock(&sleep_lock);
                atomic_fetch_add(&sleeping, 1);
                while (atomic_load(&posted) == seen)
                    pthread_cond_wait(&wake, &sleep_lock);
                atomic_fetch_sub(&sleeping, 1);
                pthread_mutex_unlock(&sleep_lock);
                since = now_ns();
            } else {
                relax();
            }
        }
        seen = gen;
        work(gen);
    }
    return 0;
}

static int started;

static void forked_child(void) {       /* the helpers do not exist in a forked child */
    workers = 0;
    atomic_store(&sleeping, 0);
    pthread_mutex_init(&sleep_lock, 0);
    pthread_cond_init(&wake, 0);
    pthread_mutex_init(&calling, 0);
}

/* the BLAS functions, the number of helper threads, their spin before sleeping (ns) */
int spmd_gemm_setup(void *s, void *d, int helpers, int64_t spin) {
    sgemm = (sgemm_t)s;
    dgemm = (dgemm_t)d;
    spin_ns = spin;
    if (!started) {
        pthread_atfork(0, 0, forked_child);
        started = 1;
    }
    while (workers < helpers && workers < MAX_WORKERS) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, helper, 0);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        workers++;
    }
    return workers;
}

/* run the products; returns the number of helper threads that could take part */
int spmd_gemm(const int64_t *tasks, int64_t count, int64_t n, int64_t k, int64_t lda,
              int64_t ldb, int64_t ldc, int trans_a, int trans_b, int f64) {
    if (pthread_mutex_trylock(&calling) != 0) {   /* another thread is using the pool */
        int64_t i;
        for (i = 0; i < count; i++) {
            /* no shared job: run on this thread with a private copy */
            const int64_t *t = tasks + 4 * i;
            if (f64)
                dgemm(ROW_MAJOR, trans_a, trans_b, t[3], n, k, 1.0, (const double *)(intptr_t)t[0],
                      lda, (const double *)(intptr_t)t[1], ldb, 0.0, (double *)(intptr_t)t[2], ldc);
            else
                sgemm(ROW_MAJOR, trans_a, trans_b, t[3], n, k, 1.0f, (const float *)(intptr_t)t[0],
                      lda, (const float *)(intptr_t)t[1], ldb, 0.0f, (float *)(intptr_t)t[2], ldc);
        }
        return 0;
    }
    job.tasks = tasks; job.count = count; job.n = n; job.k = k;
    job.lda = lda; job.ldb = ldb; job.ldc = ldc;
    job.trans_a = trans_a; job.trans_b = trans_b; job.f64 = f64;
    atomic_store(&finished, 0);
    uint64_t gen = (atomic_load(&posted) + 1) & CLOSED;
    atomic_store(&state, gen << 32);             /* open: product 0 next */
    atomic_store(&posted, gen);
    if (atomic_load(&sleeping)) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    work(gen);
    while (atomic_load(&finished) < count)        /* helpers are inside their last products */
        relax();
    atomic_store(&state, (gen << 32) | CLOSED);
    int helpers = workers;
    pthread_mutex_unlock(&calling);
    return helpers;
}
"""

_FLAGS = ("-O2", "-fPIC", "-shared", "-pthread", "-std=c11")
_NO_TRANS, _TRANS = 111, 112
_pool = None                     # (setup, run, BLAS addresses, threads), or False where none
_forked = False                  # in a forked child: the helpers are to be started again
_layouts: dict = {}              # shapes and strides -> (task offsets, BLAS arguments)


def _openblas_cblas():
    """(cblas sgemm, cblas dgemm) addresses of NumPy's bundled OpenBLAS (64-bit ints), or None."""
    for path in glob.glob(os.path.dirname(np.__file__) + ".libs/libscipy_openblas64_*.so*"):
        try:
            lib = ctypes.CDLL(path)
            return (ctypes.cast(lib.scipy_cblas_sgemm64_, ctypes.c_void_p).value,
                    ctypes.cast(lib.scipy_cblas_dgemm64_, ctypes.c_void_p).value)
        except (OSError, AttributeError):
            continue
    return None


def _enabled() -> bool:
    return os.environ.get("SPMD_NATIVE", "1").strip().lower() not in ("0", "off", "false", "no")


def _load(threads: int):
    global _pool
    blas = _openblas_cblas()
    if blas is None:
        _pool = False
        return
    try:
        lib = _cbuild.library(_SOURCE, _FLAGS, ("-lpthread",), what="the matrix-product pool")
    except RuntimeError:
        _pool = False
        return
    setup, run = lib.spmd_gemm_setup, lib.spmd_gemm
    setup.restype, run.restype = ctypes.c_int, ctypes.c_int
    setup.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    run.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 6 + [ctypes.c_int] * 3
    setup(blas[0], blas[1], threads - 1, int(SPIN_SECONDS * 1e9))
    _pool = (setup, run, blas, threads)


def _after_fork_in_child():
    global _forked
    _forked = True               # the helpers are gone: the next call starts new ones


os.register_at_fork(after_in_child=_after_fork_in_child)


def _blas(rows: int, cols: int, s_rows: int, s_cols: int, itemsize: int):
    """(transposed, leading dim) for BLAS of a rows x cols matrix with these byte strides, or
    None when BLAS cannot read it as it is."""
    if (cols == 1 or s_cols == itemsize) and (
            rows == 1 or (s_rows % itemsize == 0 and s_rows // itemsize >= cols)):
        return _NO_TRANS, (s_rows // itemsize if rows > 1 else max(cols, 1))
    if (rows == 1 or s_rows == itemsize) and (
            cols == 1 or (s_cols % itemsize == 0 and s_cols // itemsize >= rows)):
        return _TRANS, (s_cols // itemsize if cols > 1 else max(rows, 1))
    return None


def _layout(a, b, out, cuts):
    """The offsets of each product's A, B and C from the arrays' starts and its rows, and the
    BLAS arguments, for these shapes and strides (worked out once per layout)."""
    key = (a.shape, a.strides, b.strides, out.strides, a.dtype.itemsize, tuple(cuts))
    hit = _layouts.get(key)
    if hit is None:
        lead, (rows, k), n = a.shape[:-2], a.shape[-2:], b.shape[-1]
        size = a.dtype.itemsize
        ta = _blas(rows, k, a.strides[-2], a.strides[-1], size)
        tb = _blas(k, n, b.strides[-2], b.strides[-1], size)
        tc = _blas(rows, n, out.strides[-2], out.strides[-1], size)
        if ta is None or tb is None or tc is None or tc[0] != _NO_TRANS or 0 in a.shape + (n,):
            hit = None
        else:
            index = np.indices(lead, dtype=np.int64).reshape(len(lead), math.prod(lead)).T
            base = np.stack([index @ np.asarray(x.strides[:-2], np.int64).reshape(-1)
                             for x in (a, b, out)], axis=1)          # (products, 3)
            parts = [(lo, hi) for lo, hi in zip(cuts, cuts[1:])]
            tasks = np.zeros((len(base), len(parts), 4), np.int64)
            for j, (lo, hi) in enumerate(parts):
                tasks[:, j, :3] = base + [lo * a.strides[-2], 0, lo * out.strides[-2]]
                tasks[:, j, 3] = hi - lo
            hit = (tasks.reshape(-1, 4), (n, k, ta[1], tb[1], tc[1], ta[0], tb[0]))
        if len(_layouts) > 256:
            _layouts.clear()
        _layouts[key] = hit
    return hit


def products(a: np.ndarray, b: np.ndarray, out: np.ndarray, cuts, threads: int) -> bool:
    """``out[i][lo:hi] = a[i][lo:hi] @ b[i]`` for every leading index ``i`` (``a``, ``b`` and
    ``out`` of one leading shape) and every row block ``lo:hi`` of ``cuts``, on ``threads``
    threads; False, with nothing written, where the pool cannot take it."""
    global _forked
    if _pool is None and _enabled():
        _load(threads)
    elif _forked and _pool:
        setup, _, blas, count = _pool
        setup(blas[0], blas[1], count - 1, int(SPIN_SECONDS * 1e9))
        _forked = False
    if not _pool or not _enabled() or a.dtype != b.dtype or a.dtype != out.dtype or \
            a.dtype not in (np.float32, np.float64):
        return False
    found = _layout(a, b, out, cuts)
    if found is None:
        return False
    offsets, (n, k, lda, ldb, ldc, ta, tb) = found
    tasks = offsets + np.array([a.ctypes.data, b.ctypes.data, out.ctypes.data, 0], np.int64)
    _pool[1](tasks.ctypes.data, len(tasks), n, k, lda, ldb, ldc, ta, tb,
             int(a.dtype == np.float64))
    return True

