"""``lax.scan`` of a small RNN cell: spmd against JAX, side by side.

- ``scan_rnn_compile``: trace + compile of the scan for 100, 1,000 and 10,000 steps (spmd:
  ``jit(...).lower`` plus the stacked executor's plan, the loop's native code included, found
  in the library cache; JAX: ``jit(...).lower(...).compile()``).  A loop is one equation, so
  neither should grow with the length.  One more row builds the native code from nothing (an
  empty cache, as on a new machine).
- ``scan_rnn_step``: run time of a 1,000-step scan (interleaved with JAX's), per step.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

import spmd
import spmd.lax as slax
from spmd import _cbuild
from spmd.executors.stacked import StackedExecutor
from ._harness import Row, benchmark, jax_peer, skip_rows, timeit, timeit_pair

BATCH, IN, HIDDEN = 8, 16, 32


def rnn(lax, xp, w, u, b, h0, xs):
    def cell(h, x):
        h = xp.tanh(h @ w + x @ u + b)
        return h, h
    return lax.scan(cell, h0, xs)


def _args(steps):
    rng = np.random.default_rng(0)
    f32 = lambda *s: (rng.standard_normal(s) * 0.15).astype(np.float32)   # a contracting cell
    return (f32(HIDDEN, HIDDEN), f32(IN, HIDDEN), f32(HIDDEN), f32(BATCH, HIDDEN),
            f32(steps, BATCH, IN))


@benchmark("scan_rnn_compile")
def compile_time(quick: bool) -> list[Row]:
    name = "scan_rnn_compile"
    jax, why = jax_peer(8)
    rows = []
    for steps in ((100, 1000) if quick else (100, 1000, 10000)):
        args = _args(steps)

        def ours():     # a fresh function each time: no cache answers
            lowered = spmd.jit(lambda *a: rnn(slax, np, *a)).lower(*args)
            return StackedExecutor()._compile(lowered.per_device_program, None)
        case = f"trace+compile, {steps} steps"
        ours_s = timeit(ours, repeat=2 if quick else 7, min_time=0.0)
        if jax is None:
            rows += [Row(name, case, ours_s, "jax", None)] + skip_rows(name, case, "jax", why)
            continue
        jnp = jax.numpy
        theirs = lambda: jax.jit(lambda *a: rnn(jax.lax, jnp, *a)).lower(*args).compile()
        jax_s = timeit(theirs, repeat=2 if quick else 7, min_time=0.0, warmup=0)
        rows.append(Row(name, case, ours_s, "jax lower+compile", jax_s, {"target_s": 0.1}))
    # the same with the loop's C built from nothing (an empty library cache: a new machine)
    args = _args(1000)

    def cold():
        with tempfile.TemporaryDirectory() as where:
            os.environ[_cbuild.CACHE_ENV_VAR] = where
            _cbuild._libraries.clear()
            try:
                lowered = spmd.jit(lambda *a: rnn(slax, np, *a)).lower(*args)
                return StackedExecutor()._compile(lowered.per_device_program, None)
            finally:
                del os.environ[_cbuild.CACHE_ENV_VAR]
                _cbuild._libraries.clear()
    case = "trace+compile, 1000 steps, C built (empty cache)"
    cold_s = timeit(cold, repeat=2 if quick else 5, min_time=0.0)
    if jax is None:
        return rows + [Row(name, case, cold_s, "jax", None)] + skip_rows(name, case, "jax", why)
    theirs = lambda: jax.jit(lambda *a: rnn(jax.lax, jax.numpy, *a)).lower(*args).compile()
    jax_s = timeit(theirs, repeat=2 if quick else 5, min_time=0.0, warmup=0)
    return rows + [Row(name, case, cold_s, "jax lower+compile", jax_s, {"target_s": 0.1})]


@benchmark("scan_rnn_step")
def step_time(quick: bool) -> list[Row]:
    name = "scan_rnn_step"
    steps = 1000                          # the length, also at --quick (a few ms a call)
    args = _args(steps)
    case = f"run, {steps} steps, batch {BATCH}, hidden {HIDDEN}, per step"
    ours_f = spmd.jit(lambda *a: rnn(slax, np, *a))
    ours = lambda: np.asarray(ours_f(*args)[1])
    jax, why = jax_peer(8)
    if jax is None:
        return ([Row(name, case, timeit(ours) / steps, "jax", None)]
                + skip_rows(name, case, "jax", why))
    jnp = jax.numpy
    theirs_f = jax.jit(lambda *a: rnn(jax.lax, jnp, *a))
    theirs = lambda: np.asarray(theirs_f(*args)[1])
    np.testing.assert_allclose(ours(), theirs(), rtol=1e-3, atol=1e-4)
    ours_s, jax_s = timeit_pair(ours, theirs, repeat=3 if quick else 7,
                                min_time=0.02 if quick else 0.2)
    return [Row(name, case, ours_s / steps, "jax.jit(lax.scan)", jax_s / steps,
                {"target_ratio": 1.0})]
