"""NCCL across processes: one GPU per process, collectives through ``cupy.cuda.nccl``.

Process ``p`` drives CUDA device ``local_rank`` (from the launcher).  A collective over mesh
``axes`` (and ``axis_index_groups``) runs on the NCCL communicator of this process's group,
made on first use: the group's first rank makes the NCCL unique id and hands it to the others
through the coordinator's key-value store (``spmd.distributed.store()``) or, when the job was
started by MPI, through MPI point-to-point messages.

Every call is enqueued on this process's stream and the stream is polled against the
collective's deadline (``SPMD_COLLECTIVE_TIMEOUT``); on expiry the NCCL communicator is
aborted (so no kernel waits forever) and ``CollectiveTimeoutError`` is raised.  With
``SPMD_COLLECTIVE_CHECK=1`` the ranks also exchange a signature of each call through the store
first, which names the ranks that did not arrive and catches mismatched calls.

Buffers may be CuPy arrays (on this process's GPU) or NumPy arrays (copied to the GPU and
back, for the NumPy per-device executor).  Data moves as bytes; reductions run in the dtype
(bool as uint8 max/min, complex sums as pairs of reals).

This module is written against the CuPy/NCCL API without a GPU to run it on: it is untested
on hardware (its tests are marked ``gpu`` and skip without two GPUs).
"""
from __future__ import annotations

import json
import os
import time

import ml_dtypes
import numpy as np

from ..errors import CollectiveMismatchError, CollectiveTimeoutError, SpmdError
from ..flight_recorder import check_same_calls, dump_quietly, recorder
from . import group_of, rank_in

_UID_TAG = 7074


def _cupy():
    from ..gpu import _cupy
    return _cupy()


def encode_unique_id(uid) -> bytes:
    """NCCL's unique id (a tuple of 128 signed chars in CuPy) as bytes, and back."""
    return bytes(int(b) & 0xFF for b in uid)


def decode_unique_id(data: bytes) -> tuple:
    return tuple(b - 256 if b > 127 else b for b in data)


def _nccl_dtype(dtype):
    """(NCCL dtype, elements per item) to move or reduce an array of ``dtype``."""
    from cupy.cuda import nccl
    dtype = np.dtype(dtype)
    table = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
             np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.int32): nccl.NCCL_INT32,
             np.dtype(np.int64): nccl.NCCL_INT64, np.dtype(np.uint32): nccl.NCCL_UINT32,
             np.dtype(np.uint64): nccl.NCCL_UINT64, np.dtype(np.int8): nccl.NCCL_INT8,
             np.dtype(np.uint8): nccl.NCCL_UINT8, np.dtype(np.bool_): nccl.NCCL_UINT8}
    if hasattr(nccl, "NCCL_BFLOAT16"):
        table[np.dtype(ml_dtypes.bfloat16)] = nccl.NCCL_BFLOAT16
    if dtype in table:
        return table[dtype], 1
    if dtype.kind == "c":
        return table[np.dtype(f"f{dtype.itemsize // 2}")], 2
    return None, None


class NcclProcessCommunicator:
    """The communicator protocol of ``spmd.communicators`` over processes with one GPU each."""

    multi_process = True

    def __init__(self, mesh):
        from .. import distributed
        cupy = _cupy()
        st = distributed.state()
        self.me, self.mesh = st.process_index, mesh
        self.device = cupy.cuda.Device(st.local_rank)
        self.device.use()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.process_of = [d.process_index for d in mesh.devices.flat]
        self.local_positions = [p for p, r in enumerate(self.process_of) if r == self.me]
        if len(self.local_positions) != 1:
            raise SpmdError(f"the cross-process NCCL communicator holds one GPU per process, but "
                            f"{mesh!r} puts {len(self.local_positions)} devices on process "
                            f"{self.me}; for several GPUs in one process use spmd.gpu.nccl_executor().")
        self.check = os.environ.get("SPMD_COLLECTIVE_CHECK", "0") == "1"
        self._comms: dict[tuple[int, ...], object] = {}
        self._generation = 0

    # -- groups and their NCCL communicators -----------------------------------------------------
    def _my_group(self, axes, groups):
        """The mesh positions of this process's group, in rank order."""
        return group_of(self.mesh, tuple(axes), groups, self.local_positions[0])

    def _comm(self, ranks: tuple[int, ...], timeout: float):
        comm = self._comms.get(ranks)
        if comm is None:
            from cupy.cuda import nccl
            uid = self._exchange_unique_id(ranks, timeout)
            with self.device:
                comm = self._comms[ranks] = nccl.NcclCommunicator(len(ranks), uid, ranks.index(self.me))
        return comm

    def _exchange_unique_id(self, ranks, timeout):
        from cupy.cuda import nccl
        from .. import distributed
        key = f"nccl-uid/{self._generation}/{'-'.join(map(str, self.process_of))}/{'-'.join(map(str, ranks))}"
        root = ranks[0] == self.me
        uid = nccl.get_unique_id() if root else None
        if distributed.state().coordinator is not None and distributed.state().backend != "mpi":
            store = distributed.store()
            if root:
                store.set(key, encode_unique_id(uid))
                return uid
            return decode_unique_id(store.get(key, timeout))
        # Started by MPI: the group's first rank sends the id to the others.
        from mpi4py import MPI
        world = MPI.COMM_WORLD
        buf = np.zeros(128, np.uint8)
        if root:
            buf[:] = np.frombuffer(encode_unique_id(uid), np.uint8)
            for r in ranks[1:]:
                world.Isend(buf, dest=r, tag=_UID_TAG).Free()
            return uid
        req = world.Irecv(buf, source=ranks[0], tag=_UID_TAG)
        deadline = time.monotonic() + timeout
        while not req.Test():
            if time.monotonic() > deadline:
                req.Cancel()
                raise CollectiveTimeoutError(f"rank {self.me} waited {timeout:g} s for rank "
                                             f"{ranks[0]} to send the NCCL unique id of group {list(ranks)}.")
            time.sleep(1e-3)
        return decode_unique_id(bytes(buf))

    # -- the frame around every collective -------------------------------------------------------
    def _run(self, op, axes, groups, x, enqueue, *, timeout=None):
        """``enqueue(comm, index, send)`` puts this rank's NCCL calls on ``self.stream`` and
        returns the output device array; ``send`` is ``x`` on this GPU, contiguous."""
        from ..distributed import collective_timeout_seconds
        cupy = _cupy()
        timeout = collective_timeout_seconds() if timeout is None else timeout
        ranks = tuple(self.process_of[p] for p in self._my_group(axes, groups))
        on_host = isinstance(x, np.ndarray)
        bf16 = on_host and x.dtype == np.dtype(ml_dtypes.bfloat16)
        entry = recorder().start(op, axes, ranks, x.shape, x.dtype, x.nbytes)
        deadline = time.monotonic() + timeout
        try:
            if self.check and len(ranks) > 1:
                self._arrive(entry, ranks, deadline)
            comm = self._comm(ranks, max(deadline - time.monotonic(), 0.0))
            with self.device, self.stream:
                # CuPy has no bfloat16: such host data travels as uint16 (NCCL is told the type)
                host = np.ascontiguousarray(x).view(np.uint16) if bf16 else x
                send = cupy.ascontiguousarray(cupy.asarray(host))
                out = enqueue(comm, ranks.index(self.me), send)
            while not self.stream.done:
                if time.monotonic() > deadline:
                    comm.abort()
                    del self._comms[ranks]
                    self._generation += 1
                    recorder().finish(entry, "timeout")
                    path = dump_quietly(f"timeout in {op} #{entry['seq']}")
                    raise CollectiveTimeoutError(
                        f"{op} over axes {tuple(axes)} (collective #{entry['seq']} of rank "
                        f"{self.me}, shape {tuple(x.shape)}, group ranks {list(ranks)}) did not "
                        f"complete within {timeout:g} s on NCCL; the communicator was aborted. "
                        f"Run with SPMD_COLLECTIVE_CHECK=1 to learn which ranks did not arrive. "
                        f"Flight recorder: {path}")
                time.sleep(0)
            comm.check_async_error()
        except (CollectiveTimeoutError, CollectiveMismatchError):
            raise
        except BaseException as e:
            recorder().finish(entry, "error")
            dump_quietly(f"{type(e).__name__} in {op}: {e}")
            raise
        recorder().finish(entry)
        if not on_host:
            return out
        return out.get().view(x.dtype) if bf16 else out.get()

    def _arrive(self, entry, ranks, deadline):
        from .. import distributed
        store = distributed.store()
        mine = {k: entry[k] for k in ("seq", "op", "axes", "shape", "dtype")}
        prefix = f"sig/{'-'.join(map(str, ranks))}/{entry['seq']}"
        store.set(f"{prefix}/{self.me}", json.dumps(mine).encode())
        theirs, missing = {self.me: mine}, []
        for r in ranks:
            if r != self.me:
                try:
                    theirs[r] = json.loads(store.get(f"{prefix}/{r}",
                                                     max(deadline - time.monotonic(), 0.01)))
                except CollectiveTimeoutError:
                    missing.append(r)
        if missing:
            recorder().finish(entry, "timeout")
            path = dump_quietly(f"timeout in {entry['op']} #{entry['seq']}")
            raise CollectiveTimeoutError(
                f"{entry['op']} over axes {tuple(entry['axes'])} (collective #{entry['seq']} of rank "
                f"{self.me}, group ranks {list(ranks)}): ranks {missing} did not arrive. "
                f"Flight recorder: {path}")
        check_same_calls(entry, ranks, theirs)

    # -- the protocol ----------------------------------------------------------------------------
    @staticmethod
    def _one(bufs):
        (p, x), = bufs.items()
        return p, x

    def all_reduce(self, bufs, axes, groups, op, *, timeout=None):
        from cupy.cuda import nccl
        p, x = self._one(bufs)
        kind, per = _nccl_dtype(x.dtype)
        if kind is None or (per == 2 and op != "sum"):
            raise SpmdError(f"{op} over NCCL: dtype {x.dtype} has no NCCL reduction.")
        nop = _nccl_op(x.dtype, op)

        def enqueue(comm, index, send):
            out = _cupy().empty_like(send)
            comm.allReduce(send.data.ptr, out.data.ptr, send.size * per, kind, nop, self.stream.ptr)
            return out
        return {p: self._run({"sum": "psum", "max": "pmax", "min": "pmin"}[op], axes, groups, x,
                             enqueue, timeout=timeout)}

    def all_gather(self, bufs, axes, groups, *, timeout=None):
        from cupy.cuda import nccl
        p, x = self._one(bufs)
        n = len(self._my_group(axes, groups))

        def enqueue(comm, index, send):
            out = _cupy().empty((n,) + send.shape, send.dtype)
            comm.allGather(send.data.ptr, out.data.ptr, send.nbytes, nccl.NCCL_UINT8, self.stream.ptr)
            return out
        return {p: self._run("all_gather", axes, groups, x, enqueue, timeout=timeout)}

    def reduce_scatter(self, bufs, axes, groups, op, *, timeout=None):
        p, x = self._one(bufs)
        kind, per = _nccl_dtype(x.dtype)
        if kind is None or (per == 2 and op != "sum"):
            raise SpmdError(f"reduce_scatter({op}) over NCCL: dtype {x.dtype} has no NCCL reduction.")
        nop = _nccl_op(x.dtype, op)

        def enqueue(comm, index, send):
            out = _cupy().empty(send.shape[1:], send.dtype)
            comm.reduceScatter(send.data.ptr, out.data.ptr, out.size * per, kind, nop, self.stream.ptr)
            return out
        return {p: self._run("psum_scatter" if op == "sum" else f"reduce_scatter({op})", axes, groups,
                             x, enqueue, timeout=timeout)}

    def all_to_all(self, bufs, axes, groups, *, timeout=None):
        from cupy.cuda import nccl
        p, x = self._one(bufs)

        def enqueue(comm, index, send):
            out = _cupy().empty_like(send)
            chunk = send.nbytes // send.shape[0]
            nccl.groupStart()
            for j in range(send.shape[0]):
                comm.send(send.data.ptr + j * chunk, chunk, nccl.NCCL_UINT8, j, self.stream.ptr)
                comm.recv(out.data.ptr + j * chunk, chunk, nccl.NCCL_UINT8, j, self.stream.ptr)
            nccl.groupEnd()
            return out
        return {p: self._run("all_to_all", axes, groups, x, enqueue, timeout=timeout)}

    def permute(self, bufs, axes, perm, *, timeout=None):
        from cupy.cuda import nccl
        p, x = self._one(bufs)

        def enqueue(comm, index, send):
            out = _cupy().zeros_like(send)
            nccl.groupStart()
            for s, d in perm:
                if s == index:
                    comm.send(send.data.ptr, send.nbytes, nccl.NCCL_UINT8, d, self.stream.ptr)
                if d == index:
                    comm.recv(out.data.ptr, out.nbytes, nccl.NCCL_UINT8, s, self.stream.ptr)
            nccl.groupEnd()
            return out
        return {p: self._run("ppermute", axes, None, x, enqueue, timeout=timeout)}

    def broadcast(self, bufs, axes, groups, source, *, timeout=None):
        from cupy.cuda import nccl
        p, x = self._one(bufs)

        def enqueue(comm, index, send):
            out = _cupy().empty_like(send)
            comm.broadcast(send.data.ptr, out.data.ptr, send.nbytes, nccl.NCCL_UINT8, source,
                           self.stream.ptr)
            return out
        return {p: self._run("pbroadcast", axes, groups, x, enqueue, timeout=timeout)}

    def axis_index(self, axes):
        return {p: np.int32(rank_in(self.mesh, axes, p)) for p in self.local_positions}

    def barrier(self, *, timeout=None):
        self.all_reduce({self.local_positions[0]: np.zeros(1, np.float32)}, self.mesh.axis_names,
                        None, "sum", timeout=timeout)


def _nccl_op(dtype, op):
    from cupy.cuda import nccl
    if np.dtype(dtype) == np.bool_:                    # logical or / and on 0/1 bytes
        return {"sum": nccl.NCCL_MAX, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}[op]
    return {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}[op]
