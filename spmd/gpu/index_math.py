"""The communication kernels' index math, in NumPy, runnable without a GPU.

``kernels/index_math.cuh`` holds the device twins of :func:`chunk_offset`,
:func:`owned_slice` and :func:`flag_slot` (same formulas, same names); ``tests/test_kernels.py``
compiles that header as plain C++ on the CPU and checks it against these, and checks these
against NumPy's own reshapes and transposes.  The rest (layout collapsing, vector widths,
index types, the algorithm choice, bus bandwidth) only runs on the host.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

MAX_BLOCKS = 64          # kernels/index_math.cuh
MAX_RANKS = 8
BARRIER_PHASES = 3
INT32_MAX = 2**31 - 1

# ---------------------------------------------------------------------------------------------
# pack / unpack of a strided dim
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """A dim of ``n * c`` elements split into ``n`` chunks, the array viewed as
    ``(outer, n, c, inner)`` with element strides ``(s_outer, s_dim, s_inner)``."""
    outer: int
    n: int
    c: int
    inner: int
    s_outer: int
    s_dim: int
    s_inner: int

    @property
    def total(self) -> int:
        return self.outer * self.n * self.c * self.inner

    @property
    def chunk(self) -> int:
        """Elements per rank in the packed buffer."""
        return self.outer * self.c * self.inner

    def max_offset(self) -> int:
        """Largest strided offset the kernel computes (strides are non-negative here)."""
        if self.total == 0:
            return 0
        return ((self.outer - 1) * self.s_outer + (self.n * self.c - 1) * self.s_dim
                + (self.inner - 1) * self.s_inner)


def _collapse(shape, strides):
    """(size, stride) of dims that can be walked as one, or None."""
    dims = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not dims:
        return 1, 1
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    return math.prod(n for n, _ in dims), dims[-1][1]


def chunk_layout(shape, strides, dim: int, n: int) -> ChunkLayout | None:
    """The kernel view of splitting ``dim`` into ``n`` chunks; ``strides`` in elements.

    None when the dims before (or after) ``dim`` cannot be walked with one stride (the caller
    makes the array contiguous first) or when a stride is negative.

    >>> chunk_layout((4, 6, 5), (30, 5, 1), 1, 3)
    ChunkLayout(outer=4, n=3, c=2, inner=5, s_outer=30, s_dim=5, s_inner=1)
    """
    if shape[dim] % n:
        raise ValueError(f"dim {dim} of shape {tuple(shape)} does not split into {n} chunks")
    if any(s < 0 for s in strides):
        return None
    outer, inner = _collapse(shape[:dim], strides[:dim]), _collapse(shape[dim + 1:], strides[dim + 1:])
    if outer is None or inner is None:
        return None
    lay = ChunkLayout(outer[0], n, shape[dim] // n, inner[0], outer[1], strides[dim], inner[1])
    if lay.inner == 1 and lay.s_dim == 1:
        # chunks along the innermost dim: the same offsets with c moved into inner, which lets
        # the element be widened below.
        lay = dataclasses.replace(lay, inner=lay.c, c=1, s_dim=lay.c, s_inner=1)
    return lay


def chunk_offset(t, outer, c, inner, s_outer, s_dim, s_inner):
    """Strided offset of packed element ``t`` (array or scalar): the twin of the device one."""
    i = t % inner
    t = t // inner
    e = t % c
    t = t // c
    o = t % outer
    j = t // outer
    return o * s_outer + (j * c + e) * s_dim + i * s_inner


def pack_offsets(lay: ChunkLayout) -> np.ndarray:
    """For each element of the packed buffer, its offset in the strided source."""
    t = np.arange(lay.total, dtype=np.int64)
    return chunk_offset(t, lay.outer, lay.c, lay.inner, lay.s_outer, lay.s_dim, lay.s_inner)


def widen(lay: ChunkLayout, itemsize: int, addresses=()) -> tuple[ChunkLayout, int]:
    """Move ``unit`` bytes per element instead of ``itemsize`` (the widest of 16, 8, 4, 2, 1
    that the contiguous inner run, every stride and every address divide): fewer, wider
    loads.  Returns the layout in units and the unit."""
    for unit in (16, 8, 4, 2, 1):
        if unit < itemsize:
            break
        if unit == itemsize:
            return lay, unit
        k = unit // itemsize
        if (lay.s_inner == 1 and lay.inner % k == 0 and lay.s_outer % k == 0 and lay.s_dim % k == 0
                and all(a % unit == 0 for a in addresses)):
            return dataclasses.replace(lay, inner=lay.inner // k, s_outer=lay.s_outer // k,
                                       s_dim=lay.s_dim // k), unit
    return lay, itemsize


def index_type(*extents: int) -> str:
    """``"int"`` when every index fits in 32 bits (much cheaper division), else ``"long long"``."""
    return "int" if max(extents, default=0) <= INT32_MAX else "long long"


def copy_unit(addresses, nbytes) -> int:
    """Widest unit (16, 8, 4, 2, 1 bytes) that every address and byte count is a multiple of."""
    for unit in (16, 8, 4, 2):
        if all(a % unit == 0 for a in addresses) and all(b % unit == 0 for b in nbytes):
            return unit
    return 1


# ---------------------------------------------------------------------------------------------
# peer-memory all-reduce
# ---------------------------------------------------------------------------------------------

def owned_slice(count: int, n: int, r: int, align: int = 1) -> tuple[int, int]:
    """Elements ``[lo, hi)`` that rank ``r`` owns in the two-shot all-reduce: ``n`` nearly equal
    slices with boundaries on multiples of ``align``, covering ``[0, count)`` exactly."""
    units = -(-count // align)
    base, extra = divmod(units, n)
    start = r * base + min(r, extra)
    length = base + (1 if r < extra else 0)
    return min(start * align, count), min((start + length) * align, count)


def flag_slot(phase: int, block: int, sender: int) -> int:
    """Where ``sender`` signals ``block`` of barrier ``phase`` in a rank's flag array."""
    return (phase * MAX_BLOCKS + block) * MAX_RANKS + sender


FLAG_WORDS = BARRIER_PHASES * MAX_BLOCKS * MAX_RANKS


def block_elements(lo: int, hi: int, block: int, blocks: int, threads: int) -> np.ndarray:
    """The elements of ``[lo, hi)`` that ``block`` touches in the kernels' slice-relative
    grid-stride loop (``t = lo + block * threads + thread + k * blocks * threads``)."""
    start = lo + block * threads
    idx = [np.arange(s, min(s + threads, hi)) for s in range(start, hi, blocks * threads)]
    return np.concatenate(idx) if idx else np.zeros(0, np.int64)


# Below one_shot_max the whole message fits in one round trip of peer reads; up to
# two_shot_max the two-shot kernel (each rank reads 2/n of the data) still beats NCCL's ring
# latency; above it NCCL's bandwidth wins.  Conservative starting points (vLLM and
# TensorRT-LLM use similar ones) to be tuned with benchmarks/bench_gpu_collectives.py.
ONE_SHOT_MAX_BYTES = 256 * 2**10
TWO_SHOT_MAX_BYTES = 4 * 2**20


def choose_all_reduce(nbytes: int, n: int, itemsize: int, *, peer_ok: bool, aligned: bool,
                      one_shot_max: int = ONE_SHOT_MAX_BYTES,
                      two_shot_max: int = TWO_SHOT_MAX_BYTES) -> str:
    """``"one_shot"``, ``"two_shot"`` or ``"nccl"`` for an all-reduce of ``nbytes`` over ``n``
    ranks.  The peer kernels need peer memory, 16-byte aligned buffers whose size is a whole
    number of 16-byte packs, and at most MAX_RANKS ranks."""
    if n == 1 or not peer_ok or not aligned or n > MAX_RANKS or nbytes % 16 or itemsize > 16:
        return "nccl"
    if nbytes <= one_shot_max or n == 2 and nbytes <= two_shot_max:
        return "one_shot"         # with 2 ranks two-shot moves the same bytes in more steps
    if nbytes <= two_shot_max:
        return "two_shot"
    return "nccl"


def launch_blocks(units: int, threads: int, max_blocks: int) -> int:
    return max(1, min(max_blocks, -(-units // threads)))


# ---------------------------------------------------------------------------------------------
# bandwidth (the nccl-tests formulas)
# ---------------------------------------------------------------------------------------------

BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "permute": lambda n: 1.0,
}


def bandwidth(op: str, nbytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algorithm bandwidth, bus bandwidth) in GB/s for ``op`` on ``nbytes`` per rank.

    >>> bandwidth("all_reduce", 10**9, 1.0, 8)
    (1.0, 1.75)
    """
    alg = nbytes / seconds / 1e9
    return alg, alg * BUS_FACTOR[op](n)
