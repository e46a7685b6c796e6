"""``check_grads``: compare forward and reverse derivatives with finite differences.

Like ``jax.test_util.check_grads``: ``fwd`` checks ``jvp`` against central differences in a
random direction; ``rev`` checks ``vjp`` against ``jvp`` through the identity
``<u, J v> = <J^T u, v>``; ``order=2`` repeats both on the JVP and VJP functions themselves,
so second derivatives (which differentiate the transformed Programs) are checked too.
"""
from __future__ import annotations

import numpy as np

from .api import jvp, vjp


def _rand_like(rng, x):
    x = np.asarray(x)
    return rng.standard_normal(x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.inexact) else None


def _inner(a, b):
    return float(sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in zip(a, b)))


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_jvp(f, args, *, eps=1e-5, rtol=1e-5, atol=1e-6, rng=None):
    rng = rng or np.random.default_rng(0)
    args = tuple(np.asarray(a) for a in args)
    ts = tuple(_rand_like(rng, a) for a in args)
    ts = tuple(t if t is not None else np.zeros_like(a) for t, a in zip(ts, args))
    _, t_out = jvp(f, args, ts)
    plus = f(*[a + eps * t for a, t in zip(args, ts)])
    minus = f(*[a - eps * t for a, t in zip(args, ts)])
    for tp, p, m in zip(_as_tuple(t_out), _as_tuple(plus), _as_tuple(minus)):
        fd = (np.asarray(p, np.float64) - np.asarray(m, np.float64)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(tp), fd, rtol=rtol, atol=atol,
                                   err_msg="jvp differs from central differences")


def check_vjp(f, args, *, rtol=1e-5, atol=1e-6, rng=None):
    rng = rng or np.random.default_rng(1)
    args = tuple(np.asarray(a) for a in args)
    out, vjp_fn = vjp(f, *args)
    cts = type(out)(_rand_like(rng, o) for o in out) if isinstance(out, (tuple, list)) else _rand_like(rng, out)
    ts = tuple(_rand_like(rng, a) for a in args)
    _, t_out = jvp(f, args, ts)
    grads = vjp_fn(cts)
    lhs = _inner(_as_tuple(cts), _as_tuple(t_out))
    rhs = _inner(grads, ts)
    np.testing.assert_allclose(lhs, rhs, rtol=rtol, atol=atol, err_msg="vjp is not the transpose of jvp")


def check_grads(f, args, order=1, modes=("fwd", "rev"), *, eps=1e-5, rtol=1e-5, atol=1e-6):
    """Check derivatives of ``f`` at ``args`` up to ``order`` (float64 inputs recommended)."""
    args = tuple(np.asarray(a) for a in args)
    if "fwd" in modes:
        check_jvp(f, args, eps=eps, rtol=rtol, atol=atol)
    if "rev" in modes:
        check_vjp(f, args, rtol=rtol, atol=atol)
    if order > 1:
        n = len(args)
        rng = np.random.default_rng(2)
        ts = tuple(_rand_like(rng, a) for a in args)
        if "fwd" in modes:
            f_jvp = lambda *a: jvp(f, a[:n], a[n:])[1]
            check_grads(f_jvp, args + ts, order - 1, modes, eps=eps, rtol=rtol, atol=atol)
        if "rev" in modes:
            out = f(*args)
            ct = type(out)(_rand_like(rng, o) for o in out) if isinstance(out, (tuple, list)) else _rand_like(rng, out)
            f_vjp = lambda *a: vjp(f, *a)[1](ct)
            check_grads(f_vjp, args, order - 1, modes, eps=eps, rtol=rtol, atol=atol)
