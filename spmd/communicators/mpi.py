"""The MPI communicator: one device per process, collectives through mpi4py.

Mesh position ``p`` lives in process ``mesh.devices.flat[p].process_index``.  A collective over
mesh ``axes`` (and ``axis_index_groups``) runs on the sub-communicator of this process's group,
made once with ``Create_group`` (collective over the group only) and cached.

Every collective runs in the shared collective frame (``spmd.communicators.frame``: flight
recorder, dump on failure, deadline ``SPMD_COLLECTIVE_TIMEOUT``) in two steps:

1. **The check** (always on).  The members of the collective's whole axis group (all of the
   axis, also when ``axis_index_groups`` split it) send each other one small message on
   persistent requests of a control communicator: the collective's number and a digest of its
   arguments (op, axes, shape, dtype, groups, perm), followed by those arguments as text.  It
   cannot be turned off (``SPMD_COLLECTIVE_CHECK`` does not apply: the check costs one small
   message per peer).  It is waited for without keeping a core busy (yielding the core, then
   naps, against the deadline), so a rank that never arrives is named
   (``CollectiveTimeoutError``), a rank that has exited is named (``ProcessExitedError``), and
   ranks that disagree on any argument fail every rank with a
   ``CollectiveMismatchError`` naming the rank, the collective and the argument, before any
   data moves (mismatched buffers could otherwise hang MPI or give silently wrong data).
2. **The data**, with the blocking MPI call on the buffers the executor owns (MPI's own
   algorithms, no staging copies), received into buffers of the host pool
   (``_host_parallel.empty``: big ones are reused once no array refers to them, so MPI does
   not pay a page fault per page of a fresh buffer).  Every member has just shown that it is in
   this very collective, so it completes unless a peer dies or stops inside it; a watchdog
   thread, asleep otherwise, enforces the deadline there: it records and dumps the timeout,
   reports it and ends the process.

Buffers move as raw bytes of contiguous NumPy arrays (no pickling, any dtype including
bfloat16); reductions run in the array's dtype, except float16/bfloat16 (reduced in float32)
and bool (logical or/and).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time

import ml_dtypes
import numpy as np

from .. import _host_parallel
from ..comm_protocol import Communicator, group_of
from ..errors import SpmdError
from ..runtime import DEFAULT_COLLECTIVE_TIMEOUT, collective_timeout_seconds
from .frame import CollectiveFrame, FrameCall

_SIGNATURE_BYTES = 512            # one check message: seq (8 bytes), digest (16), the call as JSON
_SIGNATURE_TAG = 7071
_PERMUTE_TAG = 7072
_EXIT_TAG = 7073
_MAX_CALLS = 4096                 # prepared calls kept (a program runs a few distinct ones)
_WATCH_PERIOD = 0.25              # seconds between the watchdog's looks at the running collective
_control = None
_MPI = None
_subcomms: dict[tuple[int, ...], object] = {}


def mpi():
    """mpi4py's ``MPI`` module: the one place that imports mpi4py (an optional dependency)."""
    global _MPI
    if _MPI is None:
        try:
            from mpi4py import MPI  # optional: the 'mpi' extra, needed only by backend='mpi'
        except ImportError:
            raise SpmdError("backend 'mpi' needs mpi4py: pip install 'spmd[mpi]' (mpi4py and "
                            "mpich).") from None
        _MPI = MPI
    return _MPI


def mpi4py_world():
    """``MPI.COMM_WORLD`` (initializes MPI on first use)."""
    return mpi().COMM_WORLD


def _control_comm():
    """A duplicate of COMM_WORLD for the check messages, so they never match user traffic."""
    global _control
    if _control is None:
        _control = mpi().COMM_WORLD.Dup()
    return _control


def _bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def _from_bytes(b: np.ndarray, dtype, shape) -> np.ndarray:
    return b.view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# the check: one small message to and from every peer of the axis group
# ---------------------------------------------------------------------------------------------

def _message(call: FrameCall, whole) -> np.ndarray:
    """The check message of a call (its seq left 0): a digest of every argument, then the
    arguments as JSON."""
    signature = call.signature(ranks=whole)
    text = json.dumps(signature, sort_keys=True).encode()
    digest = hashlib.blake2b(text, digest_size=16).digest()
    if len(text) > _SIGNATURE_BYTES - 24:      # too long to name: keep what fits in the text
        short = {k: v for k, v in signature.items() if k not in ("groups", "perm")}
        text = json.dumps(dict(short, truncated=True), sort_keys=True).encode()
    row = np.zeros(_SIGNATURE_BYTES, np.uint8)
    row[8:24] = np.frombuffer(digest, np.uint8)
    row[24:24 + len(text)] = np.frombuffer(text[:_SIGNATURE_BYTES - 24], np.uint8)
    return row


class _Check:
    """The check of one axis group: persistent sends and receives of one message per peer on the
    control communicator (every group uses the same tag, so a peer that is in a different
    collective is seen as a mismatch, not a hang)."""

    def __init__(self, control, me: int, ranks: tuple[int, ...]):
        self.ranks, self.peers = ranks, [r for r in ranks if r != me]
        self.out = np.zeros(_SIGNATURE_BYTES, np.uint8)
        self.inbox = np.zeros((len(self.peers), _SIGNATURE_BYTES), np.uint8)
        self.receives = [control.Recv_init(self.inbox[i], source=r, tag=_SIGNATURE_TAG)
                         for i, r in enumerate(self.peers)]
        self.requests = self.receives + [control.Send_init(self.out, dest=r, tag=_SIGNATURE_TAG)
                                         for r in self.peers]
        self.out_seq = self.out[:8].view(np.int64)
        self.in_digests = self.inbox[:, 8:24]
        self.posted = None                # the message in ``out`` (the seq apart)

    def post(self, message: np.ndarray, expected: bytes, seq: int):
        if self.posted is not message:    # a step repeats its collectives: copy only on change
            self.out[:] = message
            self.posted = message
        self.out_seq[0] = seq
        self.expected = expected
        _MPI.Prequest.Startall(self.requests)

    def agree(self) -> bool:
        return self.in_digests.tobytes() == self.expected

    def theirs(self) -> dict:
        """{rank: the signature it sent} (after a disagreement: to name it)."""
        out = {}
        for r, row in zip(self.peers, self.inbox):
            text = bytes(row[24:]).rstrip(b"\0").decode(errors="replace")
            try:
                out[r] = json.loads(text)
            except ValueError:
                out[r] = {"op": "?", "axes": [], "shape": [], "dtype": "?", "unreadable": text}
            out[r]["seq"] = int(row[:8].view(np.int64)[0])
        return out


# ---------------------------------------------------------------------------------------------
# the watchdog: the deadline of the blocking data step
# ---------------------------------------------------------------------------------------------

class _Watchdog:
    """One daemon thread that looks at the collective in its data step every ``_WATCH_PERIOD``
    seconds; past the frame's deadline it records, dumps and reports the timeout and ends the
    process (the main thread is inside MPI and cannot raise)."""

    def __init__(self):
        self.frame = None
        self.thread = None

    def watch(self, frame):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="spmd-mpi-watchdog", daemon=True)
            self.thread.start()
        self.frame = frame

    def _run(self):
        while True:
            time.sleep(_WATCH_PERIOD)
            frame = self.frame
            try:
                expired = frame is not None and frame.expired()
            except SpmdError:        # SPMD_COLLECTIVE_TIMEOUT made unreadable since the start
                frame._timeout = DEFAULT_COLLECTIVE_TIMEOUT
                expired = frame.expired()
            if not expired:
                continue
            error = frame.timed_out("every rank arrived, but the data exchange did not finish "
                                    "(a peer stopped or died inside the collective)")
            if self.frame is frame:
                sys.stderr.write(f"{type(error).__name__}: {error}\n")
                sys.stderr.flush()
                os._exit(1)


_watchdog = _Watchdog()


# ---------------------------------------------------------------------------------------------
# the communicator
# ---------------------------------------------------------------------------------------------

class MPICommunicator(Communicator):
    """The communicator protocol of ``spmd.comm_protocol`` over MPI processes."""

    multi_process = True

    def __init__(self, mesh):
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
        self._groups: dict = {}
        self._checks: dict = {}
        self._calls: dict = {}
        self._perms: dict = {}            # id(perm) -> (perm, as (int, int) pairs)

    # -- groups ----------------------------------------------------------------------------------
    def _group(self, axes, groups):
        """(process ranks of this process's group in rank order, those of its whole axis group)."""
        key = (axes, groups)
        found = self._groups.get(key)
        if found is None:
            p = self.local_positions[0]
            ranks = tuple(self.process_of[q] for q in group_of(self.mesh, tuple(axes), groups, p))
            whole = tuple(self.process_of[q] for q in group_of(self.mesh, tuple(axes), None, p))
            found = self._groups[key] = (ranks, whole)
        return found

    def _subcomm(self, ranks: tuple[int, ...]):
        """The MPI communicator of ``ranks`` (shared by every mesh over the same processes)."""
        comm = _subcomms.get(ranks)
        if comm is None:
            group = self.world.Get_group().Incl(list(ranks))
            comm = _subcomms[ranks] = self.world.Create_group(group)
            group.Free()
        return comm

    # -- one collective in the shared frame: check, then the data with a watchdog ----------------
    def _call(self, op, axes, groups, x, perm=None, reduce=None) -> "_Call":
        """The prepared call of this op, axes, groups, perm, shape and dtype (made once);
        ``reduce``: the reduction (sum, max, min) of a reducing op."""
        axes = axes if type(axes) is tuple else tuple(axes)
        key = (op, axes, groups, perm, x.shape, x.dtype)
        call = self._calls.get(key)
        if call is None:
            if len(self._calls) >= _MAX_CALLS:
                self._calls.clear()
            call = self._calls[key] = _Call(self, op, axes, groups, perm, x, reduce)
        return call

    def _run(self, call: "_Call", data, timeout=None):
        """Run one collective: ``data(comm)`` makes the blocking MPI call on the group's
        communicator and returns the result."""
        with CollectiveFrame.begin(call.frame, self.me, timeout) as frame:
            if call.check is not None:
                self._arrive(frame, call)
            comm = self._subcomm(call.frame.ranks)   # after the check: Create_group waits for
            _watchdog.watch(frame)                    # the whole group
            try:
                return data(comm)
            finally:
                _watchdog.frame = None

    def _arrive(self, frame, call):
        """The check over the whole axis group: every peer is in this collective with the same
        arguments, or the frame raises and names them."""
        check = call.check
        check.post(call.message, call.expected, frame.entry["seq"])
        if not _MPI.Request.Testall(check.requests):
            try:
                self._wait(frame, check)
            except BaseException:
                self._forget(check)         # its requests were cancelled: new ones next time
                raise
        if not check.agree():
            theirs = check.theirs()
            theirs[self.me] = frame.signature(ranks=check.ranks)
            frame.check(theirs, differ=True)

    def _forget(self, check):
        self._checks.pop(check.ranks, None)
        self._calls.clear()

    def _wait(self, frame, check):
        """Wait for the check's messages within the frame's deadline, naming the ranks that
        never arrive or that have exited."""
        MPI = _MPI
        pending = dict(zip(check.peers, check.receives))

        def gone():
            exited = [r for r, q in pending.items()
                      if self.control.Iprobe(source=r, tag=_EXIT_TAG) and not q.Test()]
            if exited:
                raise frame.exited(exited)

        def cancel():
            missing = [r for r, q in pending.items() if not q.Test()]
            for q in check.requests:
                try:
                    q.Cancel()
                except MPI.Exception:
                    pass
            return (f"ranks {missing} did not arrive" if missing else
                    "every rank arrived but the check messages did not complete (a peer may "
                    "have died)")
        requests = check.requests
        frame.wait(lambda: MPI.Request.Testall(requests), on_timeout=cancel, poll=gone)

    def _check(self, whole):
        check = self._checks.get(whole)
        if check is None:
            check = self._checks[whole] = _Check(self.control, self.me, whole)
        return check

    # -- the protocol ----------------------------------------------------------------------------
    def _one(self, bufs):
        (p, x), = bufs.items()
        return p, (x if type(x) is np.ndarray else np.asarray(x))

    def all_reduce(self, bufs, axes, groups, op, *, timeout=None):
        p, x = self._one(bufs)
        call = self._call(_REDUCE_NAMES[op], axes, groups, x, reduce=op)
        if call.work is None:         # no MPI reduction for this dtype: gather, reduce in order
            g = self.all_gather(bufs, axes, groups, timeout=timeout)[p]
            return {p: np.array(_NUMPY_REDUCE[op].reduce(g, axis=0), dtype=x.dtype)}
        send, recv = call.operand(x), call.receive()

        def data(comm):
            comm.Allreduce(send, recv, call.mpi_op)
            return call.result(recv)
        return {p: self._run(call, data, timeout)}

    def all_gather(self, bufs, axes, groups, *, timeout=None):
        p, x = self._one(bufs)
        call = self._call("all_gather", axes, groups, x)
        send, recv = call.operand(x), call.receive()

        def data(comm):
            comm.Allgather(send, recv)
            return call.result(recv)
        return {p: self._run(call, data, timeout)}

    def reduce_scatter(self, bufs, axes, groups, op, *, timeout=None):
        p, x = self._one(bufs)
        name = "psum_scatter" if op == "sum" else f"reduce_scatter({op})"
        call = self._call(name, axes, groups, x, reduce=op)
        if call.work is None:
            g = self.all_to_all(bufs, axes, groups, timeout=timeout)[p]
            return {p: np.array(_NUMPY_REDUCE[op].reduce(g, axis=0), dtype=x.dtype)}
        send, recv = call.operand(x), call.receive()

        def data(comm):
            comm.Reduce_scatter_block(send, recv, call.mpi_op)
            return call.result(recv)
        return {p: self._run(call, data, timeout)}

    def all_to_all(self, bufs, axes, groups, *, timeout=None):
        p, x = self._one(bufs)
        call = self._call("all_to_all", axes, groups, x)
        send, recv = call.operand(x), call.receive()

        def data(comm):
            comm.Alltoall(send, recv)
            return call.result(recv)
        return {p: self._run(call, data, timeout)}

    def permute(self, bufs, axes, perm, *, timeout=None):
        p, x = self._one(bufs)
        known = self._perms.get(id(perm))     # a program passes the same perm every step
        if known is None or known[0] is not perm:
            if len(self._perms) >= _MAX_CALLS:
                self._perms.clear()
            known = self._perms[id(perm)] = (perm, tuple((int(s), int(d)) for s, d in perm))
        call = self._call("ppermute", axes, None, x, known[1])
        send = call.operand(x)
        src, dst = call.sources, call.dests
        recv = call.receive() if src else np.zeros(x.shape, x.dtype)

        def data(comm):
            if len(src) == len(dst) == 1:            # a ring step: one combined call
                comm.Sendrecv(send, dst[0], _PERMUTE_TAG, recv, src[0], _PERMUTE_TAG)
            else:
                _MPI.Request.Waitall([comm.Isend(send, dest=d, tag=_PERMUTE_TAG) for d in dst]
                                     + [comm.Irecv(recv, source=s, tag=_PERMUTE_TAG) for s in src])
            return call.result(recv)
        return {p: self._run(call, data, timeout)}

    def broadcast(self, bufs, axes, groups, source, *, timeout=None):
        p, x = self._one(bufs)
        call = self._call("pbroadcast", axes, groups, x)

        def data(comm):
            buf = np.array(_bytes(x)) if comm.Get_rank() == source else np.empty(x.nbytes, np.uint8)
            comm.Bcast(buf, root=source)
            return _from_bytes(buf, x.dtype, x.shape)
        return {p: self._run(call, data, timeout)}

    def barrier(self, *, timeout=None):
        call = self._call("barrier", tuple(self.mesh.axis_names), None, np.zeros(0, np.uint8))
        self._run(call, lambda comm: comm.Barrier(), timeout)


class _Call:
    """One distinct collective of this process (op, axes, groups, perm, shape, dtype), with
    everything that does not change from one call to the next worked out once: the group's
    ranks, the check and its message, the flight-recorder entry, the reduction's dtype and MPI
    op, a permutation's sources and destinations, and the shapes and dtypes of the buffers MPI
    sends from and receives into."""

    __slots__ = ("frame", "check", "message", "expected", "size", "work", "mpi_op",
                 "sources", "dests", "_bytes", "_cast", "_recv", "_pooled", "_out")

    def __init__(self, owner: MPICommunicator, op, axes, groups, perm, x, reduce):
        ranks, whole = owner._group(axes, groups)
        self.frame = FrameCall(op, axes, ranks, x.shape, x.dtype, x.nbytes, groups=groups,
                               perm=perm)
        self.size = len(ranks)
        self.check = owner._check(whole) if len(whole) > 1 else None
        if self.check is not None:
            self.message = _message(self.frame, whole)
            self.expected = self.message[8:24].tobytes() * len(self.check.peers)
        self.work, self.mpi_op = _reduction(x.dtype, reduce) if reduce else (None, None)
        if perm is not None:
            index = ranks.index(owner.me)
            self.sources = [s for s, d in perm if d == index]
            self.dests = [d for s, d in perm if s == index]
        # MPI moves a reduction's operand in ``work`` (a 0-d one as one element), and other
        # data as it is, or, in dtypes mpi4py cannot describe (bfloat16, float8, non-native
        # byte order), as raw bytes; the result is ``_out`` (dtype, shape) of what arrived
        work = self.work if self.work is not None else x.dtype
        self._bytes = self.work is None and not _described(x.dtype)
        self._cast = work != x.dtype or x.ndim == 0 or self._bytes
        if self._bytes:
            work = np.dtype(np.uint8)
        count = max(x.size, 1) * (x.dtype.itemsize if self._bytes else 1)
        scatter = op == "psum_scatter" or op.startswith("reduce_scatter")
        count = count * self.size if op == "all_gather" else count // self.size if scatter else count
        self._recv = ((count,), work)
        self._pooled = count * work.itemsize >= _host_parallel.POOL_MIN_BYTES
        shape = ((self.size,) + x.shape if op == "all_gather" else
                 x.shape[1:] if scatter else x.shape)
        self._out = (x.dtype, shape)

    def operand(self, x: np.ndarray) -> np.ndarray:
        """``x`` as MPI sends it: C-contiguous, in the reduction's dtype."""
        if self._bytes:
            return np.ascontiguousarray(x).reshape(-1).view(np.uint8)
        if self._cast or not x.flags.c_contiguous:
            return np.ascontiguousarray(x, dtype=self.work).reshape(-1)
        return x

    def receive(self) -> np.ndarray:
        """A buffer for MPI to receive into (from the host pool when it is big)."""
        shape, dtype = self._recv
        return (_host_parallel.empty(np, shape, dtype) if self._pooled else
                np.empty(shape, dtype))

    def result(self, recv: np.ndarray) -> np.ndarray:
        """The received buffer as the collective's result (its dtype and shape)."""
        dtype, shape = self._out
        if self._bytes:
            return recv.view(dtype).reshape(shape)
        return recv.astype(dtype, copy=False).reshape(shape)


def _described(dtype: np.dtype) -> bool:
    """Whether mpi4py can describe ``dtype`` to MPI (NumPy's own numeric types, native order)."""
    return dtype.kind in "biufc" and dtype.isnative and dtype.num < 256


_REDUCE_NAMES = {"sum": "psum", "max": "pmax", "min": "pmin"}
_NUMPY_REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}
_reductions: dict = {}


def _reduction(dtype, op):
    """(dtype to reduce in, MPI op), or (None, None) when MPI cannot reduce this dtype."""
    found = _reductions.get((dtype, op))
    if found is None:
        MPI = mpi()
        dtype = np.dtype(dtype)
        ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        if dtype == np.bool_:
            found = np.dtype(np.uint8), {"sum": MPI.LOR, "max": MPI.LOR, "min": MPI.LAND}[op]
        elif dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
            found = np.dtype(np.float32), ops[op]
        elif dtype.kind == "c" and op != "sum":
            found = None, None
        else:
            found = dtype, ops[op]
        _reductions[(dtype, op)] = found
    return found


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
