"""Where a step's time goes (``spmd.profile``): the time of every equation the executors run,
by op and source line.

>>> import numpy as np, spmd
>>> f = spmd.jit(lambda x: np.tanh(x @ x))
>>> x = np.ones((64, 64), np.float32)
>>> _ = f(x)                                   # the first call traces and compiles
>>> with spmd.profile() as prof:
...     _ = f(x)
>>> sorted(r.op for r in prof.rows())
['dot_general', 'tanh']

``prof.table(top=20)`` (also ``print(prof)``) lists the steps by the time spent in them,
nested steps not counted (``self ms``); ``total ms`` counts them (a ``shard_map``, ``scan``,
``cond`` or ``while`` row holds its body's rows, shown indented below its own level).  A step
is an equation, or equations the stacked executor fused into one (``fused(sub·mul·tanh)``),
with the user's lines it came from and the bytes of its operands and results (per device inside
``shard_map``).  ``prof.save_trace(path)`` writes the run in Chrome's trace-event format
(https://ui.perfetto.dev opens it): one track for the executor's steps, one for collective
equations, one for the collectives the flight recorder saw (multi-process communicators).

``SPMD_PROFILE=path`` profiles the whole process and writes the trace to ``path`` at exit (with
several processes, ``path`` gets ``.rank<r>`` before its extension), and the table to stderr.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import os
import sys
import threading
import time

from . import flight_recorder, runtime
from .core import source_text
from .errors import SpmdError
from .executors import profiling


@dataclasses.dataclass(frozen=True)
class Row:
    """The calls of one step in a profile."""
    op: str
    source: str             # the user's lines, short (``train.py:12 (loss)``)
    calls: int
    self_s: float           # seconds in the step itself, the steps nested in it not counted
    total_s: float          # seconds including the nested steps
    bytes_in: int           # per call
    bytes_out: int          # per call
    depth: int              # 0: a step of the top-level program; 1: in its shard_map; ...
    collective: bool
    step: profiling.Step = dataclasses.field(repr=False, compare=False)


class Profile:
    """The executor steps run between ``start()`` and ``stop()`` (or in a ``with`` block)."""

    def __init__(self):
        self.events: list = []          # (step, start_ns, end_ns, depth, thread) as recorded
        self.collectives: list = []     # the flight recorder's entries of the window
        self.wall_s = 0.0
        self._running = False

    def start(self) -> "Profile":
        if self._running:
            raise SpmdError("spmd.profile: this profile is already running; make a new one "
                            "with spmd.profile() to profile again.")
        rec = profiling.active
        self._owns = rec is None                # an outer profile keeps recording after ours
        if self._owns:
            rec = profiling.active = profiling.Recording()
        self._rec, self._first = rec, len(rec.events)
        self._seq = flight_recorder.recorder().seq
        self._thread = threading.get_ident()
        self._wall0, self._t0 = time.time(), time.perf_counter_ns()
        self._running = True
        return self

    def stop(self) -> "Profile":
        if not self._running:
            raise SpmdError("spmd.profile: stop() without start().")
        self._t1 = time.perf_counter_ns()
        self._running = False
        if self._owns:
            profiling.active = None
        self.events = self._rec.events[self._first:]
        self.wall_s = (self._t1 - self._t0) / 1e9
        self.collectives = [dict(e) for e in flight_recorder.recorder().entries
                            if e["seq"] >= self._seq]
        return self

    def __enter__(self) -> "Profile":
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- the table -------------------------------------------------------------------------------
    def _self_times(self) -> list[int]:
        """Each event's nanoseconds without the events nested in it (they end before it does,
        one level deeper, on the same thread)."""
        inner: dict = collections.defaultdict(int)      # (thread, depth) -> ns of ended events
        out = []
        for step, start, end, depth, thread in self.events:
            dur = end - start
            out.append(dur - inner.pop((thread, depth + 1), 0))
            inner[(thread, depth)] += dur
        return out

    def rows(self) -> list[Row]:
        """One row per step, by self time (most first)."""
        acc: dict = {}
        for (step, start, end, depth, _), own in zip(self.events, self._self_times()):
            key = (step.op, tuple(map(id, step.eqns)), depth)
            a = acc.get(key)
            if a is None:
                a = acc[key] = [step, depth, 0, 0, 0]
            a[2] += 1
            a[3] += own
            a[4] += end - start
        rows = [Row(step.op, _short_sources(step.sources), calls, own / 1e9, total / 1e9,
                    step.bytes_in, step.bytes_out, depth, step.collective, step)
                for step, depth, calls, own, total in acc.values()]
        return sorted(rows, key=lambda r: -r.self_s)

    def by_op(self) -> list[tuple[str, int, float, int]]:
        """``(op, calls, self seconds, bytes out)`` per op, most time first."""
        acc: dict = {}
        for r in self.rows():
            a = acc.setdefault(r.op, [0, 0.0, 0])
            a[0] += r.calls
            a[1] += r.self_s
            a[2] += r.calls * r.bytes_out
        return sorted(((op, *a) for op, a in acc.items()), key=lambda t: -t[2])

    def table(self, top: int = 20) -> str:
        """The ``top`` rows by self time, then the ``top`` ops by self time."""
        rows = self.rows()
        wall = self.wall_s or 1e-30
        in_steps = sum(end - start for _, start, end, depth, _ in self.events if depth == 0) / 1e9
        head = (f"spmd.profile: {self.wall_s * 1e3:.3f} ms wall, {in_steps * 1e3:.3f} ms in "
                f"{len(self.events)} executor steps ({100 * in_steps / wall:.0f}%)")
        if self.collectives:
            head += f", {len(self.collectives)} collectives in the flight recorder"
        lines = [head, f"{'self ms':>9} {'total ms':>9} {'%wall':>6} {'calls':>6}  "
                       f"{'op':<28} {'bytes out':>10} {'bytes in':>10}  source"]
        for r in rows[:top]:
            op = _clip("  " * r.depth + r.op)
            lines.append(f"{r.self_s * 1e3:9.3f} {r.total_s * 1e3:9.3f} "
                         f"{100 * r.self_s / wall:6.1f} {r.calls:6d}  {op:<28} "
                         f"{_fmt_bytes(r.bytes_out):>10} {_fmt_bytes(r.bytes_in):>10}  {r.source}")
        if len(rows) > top:
            rest = sum(r.self_s for r in rows[top:])
            lines.append(f"{rest * 1e3:9.3f} {'':9} {100 * rest / wall:6.1f} {'':6}  "
                         f"({len(rows) - top} more rows)")
        lines += ["", f"{'self ms':>9} {'%wall':>6} {'calls':>6}  {'op':<28} {'bytes out':>10}"]
        for op, calls, own, nbytes in self.by_op()[:top]:
            lines.append(f"{own * 1e3:9.3f} {100 * own / wall:6.1f} {calls:6d}  {_clip(op):<28} "
                         f"{_fmt_bytes(nbytes):>10}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    # -- the trace -------------------------------------------------------------------------------
    def trace(self) -> dict:
        """The run in Chrome's trace-event format (``{"traceEvents": [...]}``; times in µs
        from the start of the profile)."""
        pid = runtime.process_index()
        threads = {self._thread: 0}
        for *_, thread in self.events:
            threads.setdefault(thread, len(threads))
        events = [{"name": "process_name", "ph": "M", "pid": pid,
                   "args": {"name": f"spmd process {pid}"}},
                  {"name": "profile", "ph": "X", "pid": pid, "tid": 0, "ts": 0.0,
                   "dur": self.wall_s * 1e6, "args": {"steps": len(self.events)}}]
        names = {0: "profile", 1: "flight recorder"}
        for thread, n in threads.items():
            suffix = f" (thread {n})" if n else ""
            names[2 + 2 * n], names[3 + 2 * n] = f"executor{suffix}", f"collectives{suffix}"
        for tid, name in names.items():
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"name": name}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"sort_index": tid}})
        for (step, start, end, depth, thread), own in zip(self.events, self._self_times()):
            tid = 2 + 2 * threads[thread] + step.collective
            events.append({"name": step.op, "cat": "collective" if step.collective else "step",
                           "ph": "X", "pid": pid, "tid": tid, "ts": (start - self._t0) / 1e3,
                           "dur": (end - start) / 1e3,
                           "args": {"op": step.op, "depth": depth, "self_us": own / 1e3,
                                    "source": [source_text(s) for s in step.sources],
                                    "bytes_in": step.bytes_in, "bytes_out": step.bytes_out}})
        for e in self.collectives:
            end = e["end"] if e["end"] is not None else e["start"]
            events.append({"name": e["op"], "cat": "flight recorder", "ph": "X", "pid": pid,
                           "tid": 1, "ts": (e["start"] - self._wall0) * 1e6,
                           "dur": max(end - e["start"], 0.0) * 1e6,
                           "args": {k: e[k] for k in ("seq", "axes", "ranks", "shape", "dtype",
                                                      "nbytes", "state")}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save_trace(self, path: str) -> str:
        """Write :meth:`trace` as JSON to ``path``; returns ``path``."""
        with open(path, "w") as f:
            json.dump(self.trace(), f)
        return path


def profile() -> Profile:
    """A profile of the executor steps run inside ``with spmd.profile() as prof:`` (or between
    ``prof = spmd.profile().start()`` and ``prof.stop()``); profiles may nest."""
    return Profile()


def _clip(op: str, width: int = 28) -> str:
    """A long fused chain's name cut to ``width`` (the rows and the trace keep it whole)."""
    return op if len(op) <= width else op[:width - 2] + "…)"


def _short_sources(sources) -> str:
    """``file.py:12 (fn)``, or ``file.py:12,13 (fn)`` for lines of one function, at most three
    lines shown."""
    by_fn: dict = {}
    for code, line in sources:
        by_fn.setdefault((os.path.basename(code.co_filename), code.co_name), []).append(line)
    parts = []
    for (name, fn), lines in by_fn.items():
        shown = ",".join(map(str, lines[:3])) + ("+" if len(lines) > 3 else "")
        parts.append(f"{name}:{shown} ({fn})")
    return "; ".join(parts[:2]) + (f"; +{len(parts) - 2}" if len(parts) > 2 else "")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _rank_path(path: str) -> str:
    if runtime.process_count() <= 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{runtime.process_index()}{ext}"


def _profile_process(path: str) -> Profile:
    """``SPMD_PROFILE``: profile until exit, then write the trace and print the table."""
    prof = Profile().start()

    def write():
        prof.stop()
        out = prof.save_trace(_rank_path(path))
        sys.stderr.write(f"{prof.table()}\nspmd.profile: trace written to {out}\n")
    atexit.register(write)
    return prof


if os.environ.get("SPMD_PROFILE", "").strip():
    _profile_process(os.environ["SPMD_PROFILE"].strip())
