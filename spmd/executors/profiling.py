"""What the executors record while :func:`spmd.profile` is on: the time of every step they run.

``active`` is the one slot: None (profiling off) or the :class:`Recording` every executor
appends to.  An executor reads it once per program run and only then takes its timed path,
so profiling off costs one attribute read per run.  A step is an equation, or equations the
stacked executor fused into one; a higher-order step (``shard_map``, ``scan``, ``cond``,
``while``) is timed around the steps of its sub-programs, which are recorded one level deeper.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
import weakref

import numpy as np

active: "Recording | None" = None


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """One step of a run as a profile shows it."""
    op: str                 # the primitive's name, or ``fused(sub·mul·tanh)``
    eqns: tuple             # the equations it runs
    sources: tuple          # the user's lines ``(code, line)`` of those equations, in order
    bytes_in: int           # of its operands' types (per device inside shard_map)
    bytes_out: int          # of its results' types
    collective: bool        # a collective runs in it


def step_of(eqns, inputs, outputs) -> Step:
    """The step that runs ``eqns``, reading ``inputs`` and writing ``outputs``."""
    names = [e.prim.name for e in eqns]
    op = names[0] if len(names) == 1 else f"fused({'·'.join(names)})"
    sources = tuple(dict.fromkeys(e.source for e in eqns if e.source is not None))
    collective = any(e.prim.rules.get("collective") not in (None, "none") for e in eqns)
    return Step(op, tuple(eqns), sources, _nbytes(inputs), _nbytes(outputs), collective)


def _nbytes(atoms) -> int:
    total = 0
    for a in atoms:
        aval = getattr(a, "aval", None)
        if aval is not None:
            total += math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
    return total


class Recording:
    """Every step run while it is ``active``: ``events`` holds ``(step, start_ns, end_ns,
    depth, thread)`` in the order the steps end (a higher-order step after its inner steps)."""

    def __init__(self):
        self.events: list = []
        self._depth = threading.local()


def timed(step: Step, fn, *args):
    """``fn(*args)``, recorded as ``step`` when a recording is active."""
    rec = active
    if rec is None:
        return fn(*args)
    local = rec._depth
    depth = getattr(local, "n", 0)
    local.n = depth + 1
    start = time.perf_counter_ns()
    try:
        return fn(*args)
    finally:
        end = time.perf_counter_ns()
        local.n = depth
        rec.events.append((step, start, end, depth, threading.get_ident()))


_eqn_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # Eqn -> its Step


def per_equation(apply):
    """``apply(e, *args)`` timed as the step of equation ``e``: for an executor that walks
    the equations each run and keeps no plan to hold the steps in."""
    def timed_apply(e, *args):
        step = _eqn_steps.get(e)
        if step is None:
            step = _eqn_steps[e] = step_of((e,), e.inputs, e.outputs)
        return timed(step, apply, e, *args)
    return timed_apply
