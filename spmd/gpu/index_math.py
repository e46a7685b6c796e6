"""The communication kernels' index math, in NumPy, runnable without a GPU.

``kernels/index_math.cuh`` holds the device twins of :func:`strided_offset`,
:func:`owned_slice` and :func:`flag_slot` (same formulas, same names); ``tests/test_kernels.py``
compiles that header as plain C++ on the CPU and checks it against these, and checks these
against NumPy's own reshapes and transposes.  The rest (layout collapsing, vector widths,
index types, the algorithm choice, bus bandwidth) only runs on the host.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..comm_protocol import BUS_FACTOR

MAX_BLOCKS = 64          # kernels/index_math.cuh
MAX_RANKS = 8
BARRIER_PHASES = 3
INT32_SAFE = 2**30

# ---------------------------------------------------------------------------------------------
# pack / unpack of a strided dim
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """A view with the rank dim first, its other dims collapsed into three strided runs:
    shape ``(n, d0, d1, d2)``, element strides ``(s_rank, s0, s1, s2)``."""
    n: int
    d0: int
    d1: int
    d2: int
    s_rank: int
    s0: int
    s1: int
    s2: int

    @property
    def total(self) -> int:
        return self.n * self.d0 * self.d1 * self.d2

    @property
    def chunk(self) -> int:
        """Elements per rank in the packed buffer."""
        return self.d0 * self.d1 * self.d2

    def max_offset(self) -> int:
        if self.total == 0:
            return 0
        return ((self.n - 1) * self.s_rank + (self.d0 - 1) * self.s0 + (self.d1 - 1) * self.s1
                + (self.d2 - 1) * self.s2)


def runs(shape, strides) -> list[tuple[int, int]]:
    """Maximal runs ``(size, stride)`` of dims that can be walked as one (size-1 dims dropped).

    >>> runs((4, 3, 5), (15, 5, 1)), runs((4, 3, 5), (5, 20, 1))
    ([(60, 1)], [(4, 5), (3, 20), (5, 1)])
    """
    out: list[tuple[int, int]] = []
    for n, s in zip(shape, strides):
        if n == 1:
            continue
        if out and out[-1][1] == s * n:
            out[-1] = (out[-1][0] * n, s)
        else:
            out.append((n, s))
    return out


def pack_layout(shape, strides) -> PackLayout | None:
    """The kernel view of a rank-major view (``shape[0]`` ranks), strides in elements; None when
    the other dims need more than three runs or a stride is negative (then the caller copies).

    >>> pack_layout((3, 4, 2, 5), (10, 30, 5, 1))     # dim 1 of a (4, 6, 5) array, 3 chunks
    PackLayout(n=3, d0=1, d1=4, d2=10, s_rank=10, s0=0, s1=30, s2=1)
    """
    if any(s < 0 for s in strides):
        return None
    rest = runs(shape[1:], strides[1:])
    if len(rest) > 3:
        return None
    rest = [(1, 0)] * (3 - len(rest)) + rest
    (d0, s0), (d1, s1), (d2, s2) = rest
    return PackLayout(shape[0], d0, d1, d2, strides[0] if shape[0] > 1 else 0, s0, s1, s2)


def strided_offset(t, d0, d1, d2, s_rank, s0, s1, s2):
    """Strided offset of packed element ``t`` (array or scalar): the twin of the device one."""
    c = t % d2
    t = t // d2
    b = t % d1
    t = t // d1
    a = t % d0
    j = t // d0
    return j * s_rank + a * s0 + b * s1 + c * s2


def pack_offsets(lay: PackLayout) -> np.ndarray:
    """For each element of the packed buffer, its offset in the strided view."""
    t = np.arange(lay.total, dtype=np.int64)
    return strided_offset(t, lay.d0, lay.d1, lay.d2, lay.s_rank, lay.s0, lay.s1, lay.s2)


def widen(lay: PackLayout, itemsize: int, addresses=()) -> tuple[PackLayout, int]:
    """Move ``unit`` bytes per element instead of ``itemsize``: the widest of 16, 8, 4, 2, 1
    that the contiguous innermost run, every other stride and every address allow.  Fewer,
    wider loads.  Returns the layout in units and the unit."""
    for unit in (16, 8, 4, 2, 1):
        if unit <= itemsize:
            return lay, itemsize
        k = unit // itemsize
        if (lay.s2 == 1 and lay.d2 % k == 0 and lay.s_rank % k == 0 and lay.s0 % k == 0
                and lay.s1 % k == 0 and all(a % unit == 0 for a in addresses)):
            return dataclasses.replace(lay, d2=lay.d2 // k, s_rank=lay.s_rank // k,
                                       s0=lay.s0 // k, s1=lay.s1 // k), unit
    return lay, itemsize


def index_type(*extents: int) -> str:
    """``"int"`` when 32-bit indices are safe (much cheaper division), else ``"long long"``.

    Safe means every extent is at most 2**30: a grid-stride loop's ``t + stride`` then cannot
    overflow, whatever the grid (at most a few million threads)."""
    return "int" if max(extents, default=0) <= INT32_SAFE else "long long"


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



def bandwidth(op: str, nbytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algorithm bandwidth, bus bandwidth) in GB/s for ``op`` on ``nbytes`` per rank.

    >>> bandwidth("all_reduce", 10**9, 1.0, 8)
    (1.0, 1.75)
    """
    alg = nbytes / seconds / 1e9
    return alg, alg * BUS_FACTOR[op](n)
