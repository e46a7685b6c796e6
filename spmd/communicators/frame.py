"""The frame around every collective of a communicator: flight recorder, cross-rank signature
check, deadline, dump on failure.  The MPI and NCCL communicators run each collective inside
one :class:`CollectiveFrame`; only posting the calls and testing for completion are theirs::

    with CollectiveFrame(op, axes, ranks, x, me=rank, timeout=timeout) as frame:
        if check:
            frame.check(exchange(frame.signature()))   # every rank's signature: same call?
        post()
        frame.wait(done, on_timeout=cancel)             # polls done() until the deadline
        return result()

On leaving the frame the flight-recorder entry is completed, or, on an exception, recorded as
``timeout`` / ``error`` and the recorder dumped (once: the frame's own timeout, mismatch and
exited-peer errors record and dump before they raise).
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from ..errors import CollectiveTimeoutError, ProcessExitedError, SpmdError
from ..flight_recorder import ARGUMENT_FIELDS, check_same_calls, dump_quietly, recorder
from ..runtime import _timeout_override, collective_timeout_seconds


def signature_check(default: bool) -> bool:
    """Whether ranks exchange call signatures before each collective: ``SPMD_COLLECTIVE_CHECK``
    (``1``/``0``), else the backend's ``default``."""
    raw = os.environ.get("SPMD_COLLECTIVE_CHECK", "").strip()
    if raw == "":
        return default
    if raw not in ("0", "1"):
        raise SpmdError(f"SPMD_COLLECTIVE_CHECK={raw!r}: use 1 (check every collective's "
                        f"signature across ranks) or 0 (skip the check).")
    return raw == "1"


class FrameCall:
    """What one collective call is, apart from its data and its number: op, axes, the ranks of
    the group, shape, dtype, bytes, ``axis_index_groups`` and ``perm``, with its flight-recorder
    entry worked out.  A communicator makes one per distinct call and reuses it (a training
    step runs the same collectives every step)."""

    __slots__ = ("op", "axes", "ranks", "shape", "dtype", "groups", "perm", "entry")

    def __init__(self, op: str, axes, ranks, shape, dtype, nbytes: int, *, groups=None,
                 perm=None):
        self.op, self.axes, self.ranks = op, tuple(axes), tuple(ranks)
        self.shape, self.groups, self.perm = tuple(shape), groups, perm
        dtype = np.dtype(dtype)
        self.dtype = _DTYPE_NAMES.get(dtype) or _DTYPE_NAMES.setdefault(dtype, str(dtype))
        self.entry = {"op": op, "axes": list(self.axes), "ranks": list(self.ranks),
                      "shape": list(self.shape), "dtype": self.dtype, "nbytes": int(nbytes)}
        for name, value in (("groups", groups), ("perm", perm)):
            if value is not None:
                self.entry[name] = [list(v) for v in value]

    def signature(self, ranks) -> dict:
        """What every rank of the group must agree on (see :meth:`CollectiveFrame.signature`),
        without the sequence number."""
        mine = {k: self.entry[k] for k in ("op", "axes", "shape", "dtype")}
        mine["ranks"] = list(ranks)
        for name in ARGUMENT_FIELDS:
            if name in self.entry:
                mine[name] = self.entry[name]
        return mine


class CollectiveFrame:
    """One collective as the flight recorder, the deadline and the cross-rank check see it.

    ``ranks``: the process ranks of this process's group; ``me``: this process's rank;
    ``x``: this rank's input (for shape, dtype and bytes); ``timeout``: seconds, default
    :func:`spmd.runtime.collective_timeout_seconds`.  :meth:`begin` makes one from a
    :class:`FrameCall` made beforehand."""

    __slots__ = ("call", "me", "entry", "_timeout", "_started", "_deadline")

    def __init__(self, op: str, axes, ranks, x, *, me: int, timeout: float | None = None,
                 groups=None, perm=None):
        call = FrameCall(op, axes, ranks, x.shape, x.dtype, x.nbytes, groups=groups, perm=perm)
        self._start(call, me, timeout)

    @classmethod
    def begin(cls, call: FrameCall, me: int, timeout: float | None = None) -> "CollectiveFrame":
        frame = cls.__new__(cls)
        frame._start(call, me, timeout)
        return frame

    def _start(self, call: FrameCall, me: int, timeout):
        # The deadline is worked out when something asks for it (a wait, the watchdog): most
        # collectives complete without anyone asking, and reading the environment costs as
        # much as the rest of the frame.  ``collective_timeout(s)`` is read now, in the
        # caller's context.
        self.call, self.me, self._deadline = call, me, None
        self._timeout = float(timeout) if timeout is not None else _timeout_override.get()
        self._started = time.monotonic()
        self.entry = recorder().begin(call.entry)

    op = property(lambda self: self.call.op)
    axes = property(lambda self: self.call.axes)
    ranks = property(lambda self: self.call.ranks)
    shape = property(lambda self: self.call.shape)
    dtype = property(lambda self: self.call.dtype)
    groups = property(lambda self: self.call.groups)
    perm = property(lambda self: self.call.perm)

    @property
    def timeout(self) -> float:
        """Seconds from the start to the deadline: ``timeout``, else ``collective_timeout(s)``
        at the start, else ``SPMD_COLLECTIVE_TIMEOUT`` (read on first use)."""
        if self._timeout is None:
            self._timeout = collective_timeout_seconds()
        return self._timeout

    @property
    def deadline(self) -> float:
        """The ``time.monotonic()`` past which the collective has failed."""
        if self._deadline is None:
            self._deadline = self._started + self.timeout
        return self._deadline

    # -- entering and leaving --------------------------------------------------------------------
    def __enter__(self) -> "CollectiveFrame":
        return self

    def __exit__(self, kind, error, tb):
        if self.entry["state"] != "started":       # already recorded (and dumped) by the frame
            return False
        if kind is None:
            recorder().finish(self.entry)
            return False
        recorder().finish(self.entry, "timeout" if issubclass(kind, CollectiveTimeoutError)
                          else "error")
        dump_quietly(f"{kind.__name__} in {self.op}: {error}")
        return False

    # -- time ------------------------------------------------------------------------------------
    def left(self, at_least: float = 0.0) -> float:
        """Seconds until the deadline (not less than ``at_least``)."""
        return max(self.deadline - time.monotonic(), at_least)

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    # -- the cross-rank signature check ----------------------------------------------------------
    @property
    def seq(self) -> int:
        return self.entry["seq"]

    def signature(self, ranks=None) -> dict:
        """What every rank of the group must agree on: op, axes, shape, dtype, the ranks that
        exchange it (``ranks``, default the group), and ``axis_index_groups`` / ``perm``."""
        return {"seq": self.seq, **self.call.signature(self.ranks if ranks is None else ranks)}

    def check(self, theirs: dict, *, differ: bool = False) -> None:
        """``theirs``: {rank: signature} of every rank of the group (this one included);
        ``CollectiveMismatchError`` (recorded, dumped) unless they agree.  ``differ``: the
        ranks already know that they disagree (their digests differ), so raise in any case."""
        check_same_calls(self.entry, self.ranks, theirs, differ=differ,
                         who=f"{self.op} over axes {self.axes} (collective #{self.seq} of rank "
                             f"{self.me})")

    # -- failures ----------------------------------------------------------------------------------
    def _describe(self) -> str:
        return (f"{self.op} over axes {self.axes} (collective #{self.seq} of rank {self.me}, "
                f"shape {self.shape}, group ranks {list(self.ranks)})")

    def timed_out(self, why: str) -> CollectiveTimeoutError:
        """Record and dump the timeout; the error to raise (``why``: what is known about it)."""
        recorder().finish(self.entry, "timeout")
        path = dump_quietly(f"timeout in {self.op} #{self.seq}")
        return CollectiveTimeoutError(
            f"{self._describe()} did not complete within {self.timeout:g} s: {why}. "
            f"Flight recorder: {path}; run `python -m spmd.flight_recorder "
            f"{os.path.dirname(path) if path else 'DIR'}` over every rank's dump. "
            f"Raise the limit with SPMD_COLLECTIVE_TIMEOUT or "
            f"spmd.distributed.collective_timeout(seconds).")

    def not_arrived(self, missing) -> CollectiveTimeoutError:
        return self.timed_out(f"ranks {sorted(missing)} did not arrive")

    def exited(self, gone) -> ProcessExitedError:
        """Record and dump a peer's exit; the error to raise."""
        recorder().finish(self.entry, "error")
        path = dump_quietly(f"rank(s) {list(gone)} exited during {self.op} #{self.seq}")
        return ProcessExitedError(
            f"{self.op} over axes {self.axes} (collective #{self.seq} of rank {self.me}, group "
            f"ranks {list(self.ranks)}) cannot complete: rank(s) {list(gone)} exited before "
            f"arriving. Flight recorder: {path}")

    # -- waiting ---------------------------------------------------------------------------------
    def wait(self, done: Callable[[], bool], *, on_timeout: Callable[[], str],
             poll: Callable[[], None] | None = None) -> None:
        """Poll ``done()`` until it is true or the deadline passes, without keeping a core busy.
        On expiry ``on_timeout()`` cleans up (cancels requests, aborts a communicator) and says
        what is known; the frame then raises ``CollectiveTimeoutError``.  ``poll()``, called now
        and then, may raise (e.g. :meth:`exited` when a peer is gone)."""
        if done():
            return
        start = time.monotonic()
        spins, nap = 0, _NAP_FIRST
        while not done():
            spins += 1
            now = time.monotonic()
            if poll is not None and spins % 64 == 0:
                poll()
            if now > self.deadline:
                raise self.timed_out(on_timeout())
            # Give the core away at once to whoever needs it (a peer that shares this core
            # answers only once it runs; with no one else waiting the yield returns in about a
            # microsecond), then nap, longer and longer: a rank that waits for a late peer
            # costs next to no CPU.
            waited = now - start
            if waited < _YIELD_SECONDS:
                os.sched_yield()
            else:
                time.sleep(nap)
                nap = min(nap * 1.5, _NAP_LAST if waited < _LONG_WAIT else _NAP_LONG)


_YIELD_SECONDS = 10e-3                            # yield the core, then nap
_NAP_FIRST, _NAP_LAST, _LONG_WAIT, _NAP_LONG = 50e-6, 2e-3, 0.1, 20e-3
_DTYPE_NAMES: dict = {}                           # str(dtype) takes microseconds: once per dtype
