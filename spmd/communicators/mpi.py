"""The MPI communicator: one device per process, collectives through mpi4py.

Mesh position ``p`` lives in process ``mesh.devices.flat[p].process_index``.  A collective over
mesh ``axes`` (and ``axis_index_groups``) runs on the sub-communicator of this process's group,
made once with ``Create_group`` (collective over the group only) and cached.

Every call is non-blocking and runs in the shared collective frame
(``spmd.communicators.frame``: flight recorder, signature check, dump on failure), polled
against a deadline (``SPMD_COLLECTIVE_TIMEOUT``), so no collective can hang silently.  Before the data moves, the members of the group exchange a
small signature (op, axes, shape, dtype) point-to-point on a control communicator: this tells
*which* ranks have not arrived when the deadline passes, and catches ranks that call different
collectives at the same point (``CollectiveMismatchError`` on every rank, instead of a hang or
silently wrong data).  ``SPMD_COLLECTIVE_CHECK=0`` skips the signature exchange (faster small
collectives; a timeout then cannot name the missing ranks).

Buffers move as raw bytes of contiguous NumPy arrays (no pickling, any dtype including
bfloat16); reductions run in the array's dtype, except float16/bfloat16 (reduced in float32)
and bool (logical or/and).
"""
from __future__ import annotations

import json
import os
import sys
import time

import ml_dtypes
import numpy as np

from ..comm_protocol import Communicator, group_of
from ..errors import SpmdError
from ..runtime import collective_timeout_seconds
from .frame import CollectiveFrame, signature_check

_SIGNATURE_BYTES = 512
_SIGNATURE_TAG = 7071
_PERMUTE_TAG = 7072
_EXIT_TAG = 7073
_control = None
_subcomms: dict[tuple[int, ...], object] = {}


def mpi():
    """mpi4py's ``MPI`` module: the one place that imports mpi4py (an optional dependency)."""
    try:
        from mpi4py import MPI  # optional: mpi4py is the 'mpi' extra, needed only by backend='mpi'
    except ImportError:
        raise SpmdError("backend 'mpi' needs mpi4py: pip install 'spmd[mpi]' (mpi4py and "
                        "mpich).") from None
    return MPI


def mpi4py_world():
    """``MPI.COMM_WORLD`` (initializes MPI on first use)."""
    return mpi().COMM_WORLD


def _control_comm():
    """A duplicate of COMM_WORLD for the signature messages, so they never match user traffic."""
    global _control
    if _control is None:
        _control = mpi().COMM_WORLD.Dup()
    return _control


def _bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def _from_bytes(b: np.ndarray, dtype, shape) -> np.ndarray:
    return b.view(dtype).reshape(shape)


class MPICommunicator(Communicator):
    """The communicator protocol of ``spmd.comm_protocol`` over MPI processes."""

    multi_process = True

    def __init__(self, mesh, *, check: bool | None = None):
        MPI = mpi()
        self.world = MPI.COMM_WORLD
        self.control = _control_comm()
        self.me = self.world.Get_rank()
        self.mesh = mesh
        self.process_of = [d.process_index for d in mesh.devices.flat]
        self.local_positions = [p for p, r in enumerate(self.process_of) if r == self.me]
        if len(self.local_positions) > 1:
            raise SpmdError(f"the MPI communicator holds one device per process, but {mesh!r} puts "
                            f"{len(self.local_positions)} devices on process {self.me}; build the "
                            f"mesh from spmd.devices() after spmd.distributed.initialize().")
        if max(self.process_of, default=0) >= self.world.Get_size():
            raise SpmdError(f"{mesh!r} names process {max(self.process_of)}, but MPI_COMM_WORLD "
                            f"has {self.world.Get_size()} processes.")
        self.check = signature_check(default=True) if check is None else check

    # -- groups ----------------------------------------------------------------------------------
    def _my_group(self, axes, groups):
        """The mesh positions of this process's group, in rank order."""
        return group_of(self.mesh, tuple(axes), groups, self.local_positions[0])

    def _subcomm(self, ranks: tuple[int, ...]):
        """The MPI communicator of ``ranks`` (shared by every mesh over the same processes)."""
        comm = _subcomms.get(ranks)
        if comm is None:
            group = self.world.Get_group().Incl(list(ranks))
            comm = _subcomms[ranks] = self.world.Create_group(group)
            group.Free()
        return comm

    # -- one collective in the shared frame: record, check, wait with a deadline ---------------
    def _run(self, op, axes, groups, x, start, *, timeout=None):
        """Run one collective: ``start(comm, index)`` posts the non-blocking calls of this rank
        (``index`` = its rank in the group) and returns (requests, finish) where ``finish()``
        gives the result once the requests are done."""
        ranks = tuple(self.process_of[p] for p in self._my_group(axes, groups))
        with CollectiveFrame(op, axes, ranks, x, me=self.me, timeout=timeout) as frame:
            if self.check and len(ranks) > 1:
                self._arrive(frame)
            requests, finish = start(self._subcomm(ranks), ranks.index(self.me))
            self._wait(frame, requests)
            return finish()

    def _arrive(self, frame):
        """Exchange call signatures with the group point-to-point on the control communicator;
        names the ranks that do not arrive and those that call something else."""
        mine = frame.signature()
        sig = np.zeros(_SIGNATURE_BYTES, np.uint8)
        raw = json.dumps(mine).encode()[:_SIGNATURE_BYTES]
        sig[:len(raw)] = np.frombuffer(raw, np.uint8)
        peers = [r for r in frame.ranks if r != self.me]
        inbox = {r: np.zeros(_SIGNATURE_BYTES, np.uint8) for r in peers}
        recvs = {r: self.control.Irecv(inbox[r], source=r, tag=_SIGNATURE_TAG) for r in peers}
        sends = [self.control.Isend(sig, dest=r, tag=_SIGNATURE_TAG) for r in peers]
        self._wait(frame, list(recvs.values()) + sends, pending=recvs)
        theirs = {self.me: mine}
        for r in peers:
            theirs[r] = json.loads(bytes(inbox[r]).rstrip(b"\0").decode())
        frame.check(theirs)

    def _wait(self, frame, requests, pending=None):
        """Wait for ``requests`` within the frame's deadline.  ``pending``: {rank: receive} of
        the signature exchange, to name the ranks that never arrived or exited."""
        MPI = mpi()

        def gone():
            exited = [r for r, q in pending.items()
                      if self.control.Iprobe(source=r, tag=_EXIT_TAG) and not q.Test()]
            if exited:
                raise frame.exited(exited)

        def cancel():
            missing = [r for r, q in pending.items() if not q.Test()] if pending is not None else None
            for q in requests:
                try:
                    q.Cancel()
                except MPI.Exception:
                    pass
            return (f"ranks {missing} did not arrive" if missing else
                    "every rank arrived but the data exchange did not finish (a peer may "
                    "have died)" if self.check else
                    "SPMD_COLLECTIVE_CHECK=0, so the ranks that did not arrive are unknown")
        frame.wait(lambda: MPI.Request.Testall(requests), on_timeout=cancel,
                   poll=gone if pending is not None else None)

    # -- the protocol ----------------------------------------------------------------------------
    def _one(self, bufs):
        (p, x), = bufs.items()
        return p, np.asarray(x)

    def all_reduce(self, bufs, axes, groups, op, *, timeout=None):
        p, x = self._one(bufs)
        MPI = mpi()
        work, mpi_op = _reduction(x.dtype, op)
        if work is None:              # no MPI reduction for this dtype: gather, reduce in order
            g = self.all_gather(bufs, axes, groups, timeout=timeout)[p]
            return {p: np.array(_NUMPY_REDUCE[op].reduce(g, axis=0), dtype=x.dtype)}
        send = np.ascontiguousarray(x, dtype=work)
        recv = np.empty_like(send)

        def start(comm, index):
            return [comm.Iallreduce(send, recv, mpi_op)], lambda: recv.astype(x.dtype, copy=False)
        return {p: self._run(_REDUCE_NAMES[op], axes, groups, x, start, timeout=timeout)}

    def all_gather(self, bufs, axes, groups, *, timeout=None):
        p, x = self._one(bufs)
        n = len(self._my_group(axes, groups))
        send = _bytes(x)
        recv = np.empty(n * send.size, np.uint8)

        def start(comm, index):
            return [comm.Iallgather(send, recv)], lambda: _from_bytes(recv, x.dtype, (n,) + x.shape)
        return {p: self._run("all_gather", axes, groups, x, start, timeout=timeout)}

    def reduce_scatter(self, bufs, axes, groups, op, *, timeout=None):
        p, x = self._one(bufs)
        work, mpi_op = _reduction(x.dtype, op)
        if work is None:
            g = self.all_to_all(bufs, axes, groups, timeout=timeout)[p]
            return {p: np.array(_NUMPY_REDUCE[op].reduce(g, axis=0), dtype=x.dtype)}
        send = np.ascontiguousarray(x, dtype=work)
        recv = np.empty(x.shape[1:], work)

        def start(comm, index):
            return ([comm.Ireduce_scatter_block(send, recv, mpi_op)],
                    lambda: recv.astype(x.dtype, copy=False))
        name = "psum_scatter" if op == "sum" else f"reduce_scatter({op})"
        return {p: self._run(name, axes, groups, x, start, timeout=timeout)}

    def all_to_all(self, bufs, axes, groups, *, timeout=None):
        p, x = self._one(bufs)
        send = _bytes(x)
        recv = np.empty_like(send)

        def start(comm, index):
            return [comm.Ialltoall(send, recv)], lambda: _from_bytes(recv, x.dtype, x.shape)
        return {p: self._run("all_to_all", axes, groups, x, start, timeout=timeout)}

    def permute(self, bufs, axes, perm, *, timeout=None):
        p, x = self._one(bufs)
        send = _bytes(x)
        recv = np.zeros_like(send)

        def start(comm, index):
            reqs = [comm.Isend(send, dest=d, tag=_PERMUTE_TAG) for s, d in perm if s == index]
            got = [comm.Irecv(recv, source=s, tag=_PERMUTE_TAG) for s, d in perm if d == index]
            return reqs + got, lambda: _from_bytes(recv, x.dtype, x.shape)
        return {p: self._run("ppermute", axes, None, x, start, timeout=timeout)}

    def broadcast(self, bufs, axes, groups, source, *, timeout=None):
        p, x = self._one(bufs)
        buf = np.array(_bytes(x))

        def start(comm, index):
            return [comm.Ibcast(buf, root=source)], lambda: _from_bytes(buf, x.dtype, x.shape)
        return {p: self._run("pbroadcast", axes, groups, x, start, timeout=timeout)}

    def barrier(self, *, timeout=None):
        x = np.zeros(0, np.uint8)

        def start(comm, index):
            return [comm.Ibarrier()], lambda: None
        self._run("barrier", self.mesh.axis_names, None, x, start, timeout=timeout)


_REDUCE_NAMES = {"sum": "psum", "max": "pmax", "min": "pmin"}
_NUMPY_REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}


def _reduction(dtype, op):
    """(dtype to reduce in, MPI op), or (None, None) when MPI cannot reduce this dtype."""
    MPI = mpi()
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.dtype(np.uint8), {"sum": MPI.LOR, "max": MPI.LOR, "min": MPI.LAND}[op]
    if dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        return np.dtype(np.float32), {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]
    if dtype.kind == "c" and op != "sum":
        return None, None
    return dtype, {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}[op]


def announce_exit():
    """At exit: tell every process this one is leaving (so a peer that waits for it in a
    collective fails at once), then meet the others at a barrier with a deadline, so that
    ``MPI_Finalize`` does not wait forever for a peer that is stuck."""
    MPI = mpi()
    if MPI.Is_finalized():
        return
    control = _control_comm()
    note = np.zeros(1, np.uint8)
    for r in range(control.Get_size()):
        if r != control.Get_rank():
            control.Isend(note, dest=r, tag=_EXIT_TAG).Free()
    barrier = control.Ibarrier()
    deadline = time.monotonic() + collective_timeout_seconds()
    while not barrier.Test():
        if time.monotonic() > deadline:
            sys.stderr.write(f"spmd: rank {control.Get_rank()} gave up waiting for the other "
                             f"processes to exit\n")
            sys.stderr.flush()
            os._exit(1)
        time.sleep(1e-3)
