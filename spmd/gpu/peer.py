"""Peer memory for the one-shot / two-shot all-reduce kernels (``kernels/allreduce.cu``).

Each rank owns one raw ``cudaMalloc`` region: the flag array (``FLAG_WORDS`` 32-bit words,
zeroed once) followed by a data buffer of ``capacity`` bytes.  Raw allocations, not CuPy's
pool, because a CUDA IPC handle names a whole allocation.  Ranks reach each other's regions
either by peer access (several GPUs in this process) or by IPC handles (one GPU per process;
the handles travel through ``allgather_bytes``, e.g. the MPI communicator's).
"""
from __future__ import annotations

import numpy as np

from ..communicators.cuda import cupy as _cupy
from . import index_math as im
from . import kernels

_FLAG_BYTES = -(-im.FLAG_WORDS * 4 // 256) * 256     # data stays 256-byte aligned


class PeerAllReduce:
    """One rank's view of a group's peer regions.  ``self(x, out, op)`` all-reduces ``x``
    (contiguous, at most ``capacity`` bytes, a whole number of 16-byte packs) into ``out`` on the
    current stream; every rank of the group must call it with the same size and algorithm."""

    def __init__(self, n: int, rank: int, ordinal: int, own_ptr: int, peer_ptrs: list[int],
                 capacity: int, opened: list[int]):
        cupy = _cupy()
        self.n, self.rank, self.ordinal, self.capacity = n, rank, ordinal, capacity
        self._own, self._opened = own_ptr, opened
        self._epoch = 0
        with cupy.cuda.Device(ordinal):
            self._flags = cupy.asarray(np.array(peer_ptrs, np.uint64))
            self._bufs = cupy.asarray(np.array([p + _FLAG_BYTES for p in peer_ptrs], np.uint64))

    @staticmethod
    def _allocate(ordinal: int, capacity: int) -> int:
        cupy = _cupy()
        rt = cupy.cuda.runtime
        with cupy.cuda.Device(ordinal):
            ptr = rt.malloc(_FLAG_BYTES + capacity)
            rt.memset(ptr, 0, _FLAG_BYTES)
            rt.deviceSynchronize()
        return ptr

    @classmethod
    def in_process(cls, ordinals: list[int], capacity: int) -> list["PeerAllReduce"]:
        """One per rank for GPUs ``ordinals`` of this process; enables peer access both ways.
        Raises RuntimeError where two of them cannot reach each other."""
        cupy = _cupy()
        rt = cupy.cuda.runtime
        for i in ordinals:
            for j in ordinals:
                if i != j and not rt.deviceCanAccessPeer(i, j):
                    raise RuntimeError(f"GPU {i} cannot access GPU {j}'s memory (no P2P)")
        for i in ordinals:
            with cupy.cuda.Device(i):
                for j in ordinals:
                    if i != j:
                        try:
                            rt.deviceEnablePeerAccess(j)
                        except rt.CUDARuntimeError as e:   # already enabled is fine
                            if "PeerAccessAlreadyEnabled" not in str(e):
                                raise
        ptrs = [cls._allocate(o, capacity) for o in ordinals]
        return [cls(len(ordinals), r, o, ptrs[r], ptrs, capacity, []) for r, o in enumerate(ordinals)]

    @classmethod
    def over_ipc(cls, n: int, rank: int, ordinal: int, capacity: int, allgather_bytes) -> "PeerAllReduce":
        """This process's rank of a group spread over processes of one node."""
        cupy = _cupy()
        rt = cupy.cuda.runtime
        own = cls._allocate(ordinal, capacity)
        handles = allgather_bytes(bytes(rt.ipcGetMemHandle(own)))
        ptrs, opened = [], []
        with cupy.cuda.Device(ordinal):
            for r, h in enumerate(handles):
                if r == rank:
                    ptrs.append(own)
                else:
                    p = rt.ipcOpenMemHandle(h, rt.cudaIpcMemLazyEnablePeerAccess)
                    ptrs.append(p)
                    opened.append(p)
        return cls(n, rank, ordinal, own, ptrs, capacity, opened)

    def __call__(self, x, out, op: str, algorithm: str, scale: float | None = None):
        cupy = _cupy()
        if x.nbytes > self.capacity or x.nbytes % 16:
            raise ValueError(f"peer all-reduce of {x.nbytes} bytes: needs a multiple of 16 bytes "
                             f"up to {self.capacity}")
        ctype = kernels.reduce_ctype(x.dtype)
        self._epoch = (self._epoch + 1) % 2**32 or 1
        packs = x.nbytes // 16
        fn = kernels.kernel("allreduce.cu", f"spmd::allreduce_{algorithm}<{ctype}, {kernels.OPS[op]}>")
        threads = 512
        blocks = im.launch_blocks(packs if algorithm == "one_shot" else -(-packs // self.n), threads,
                                  im.MAX_BLOCKS)
        with cupy.cuda.Device(self.ordinal):
            fn((blocks,), (threads,), (x, out, self._bufs, self._flags, np.int32(self.n),
                                       np.int32(self.rank), np.int64(packs), np.uint32(self._epoch),
                                       np.float64(scale or 1.0), np.int32(scale is not None)))
        return out

    def close(self):
        """Unmap the peers' regions and free this rank's (after the device is idle)."""
        cupy = _cupy()
        rt = cupy.cuda.runtime
        with cupy.cuda.Device(self.ordinal):
            rt.deviceSynchronize()
            for p in self._opened:
                rt.ipcCloseMemHandle(p)
            if self._own:
                rt.free(self._own)
        self._own, self._opened = 0, []
