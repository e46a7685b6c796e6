"""What the batching rules of primitives are written with: moving a batch dim, broadcasting an
unbatched operand, and builders of the rules shared by families of primitives.  It sits below
the primitives so their blocks can use it; the interpreter is ``spmd.transforms.vmap``.
"""
from __future__ import annotations

import numpy as np

from .core import Tracer, aval_of, bind, hooks


def moveaxis(x, src, dst):
    nd = aval_of(x).ndim
    src, dst = src % nd, dst % nd
    if src == dst:
        return x
    perm = [i for i in range(nd) if i != src]
    perm.insert(dst, src)
    return bind(hooks.transpose, x, perm=tuple(perm))


def to_front(x, d, size):
    """``x`` with its batch dim first; an unbatched ``x`` is broadcast (it is the same for
    every batch entry)."""
    if d is not None:
        return moveaxis(x, d, 0)
    a = aval_of(x)
    return bind(hooks.broadcast_in_dim, x, shape=(size,) + tuple(a.shape), dims=tuple(range(1, a.ndim + 1)))


def batch_size(vals, dims):
    return next(aval_of(v).shape[d] for v, d in zip(vals, dims) if d is not None)


def _all_front(vals, dims):
    """Every operand batched at the front, Python and 0-d constants left to broadcast.  An
    operand of lower rank (elementwise primitives broadcast as NumPy does: ``x * np.ones(3)``)
    gets its missing leading dims as 1s after the batch dim, where NumPy would put them."""
    size = batch_size(vals, dims)
    rank = max(aval_of(v).ndim - (d is not None) for v, d in zip(vals, dims))
    out = []
    for v, d in zip(vals, dims):
        if d is None and not np.ndim(v) and not isinstance(v, Tracer):
            out.append(v)
            continue
        v = to_front(v, d, size)
        lead = rank - (aval_of(v).ndim - 1)
        if lead:
            shape = aval_of(v).shape
            v = bind(hooks.broadcast_in_dim, v, shape=shape[:1] + (1,) * lead + shape[1:],
                     dims=(0,) + tuple(range(1 + lead, 1 + rank)))
        out.append(v)
    return out


def require_unbatched(prim, what, dims):
    if any(d is not None for d in dims):
        raise NotImplementedError(f"batch rule for {prim.name} with batched {what}")


# ---------------------------------------------------------------------------------------------
# batching rules shared by families of primitives (registered in each primitive's block)
# ---------------------------------------------------------------------------------------------

def elementwise_batch(prim):
    """Operands batched at the front (unbatched arrays broadcast); the same parameters."""
    def rule(vals, dims, /, **params):
        return bind(prim, *_all_front(vals, dims), **params), 0
    return rule


def shifted_batch(prim, shift):
    """Operands batched at the front, parameters from ``shift(params, batch size)``."""
    def rule(vals, dims, /, **params):
        size = batch_size(vals, dims)
        return bind(prim, *_all_front(vals, dims), **shift(dict(params), size)), 0
    return rule


def plus1(*names):
    """A ``shift`` that moves the axis parameters ``names`` past the new leading dim."""
    def shift(p, size):
        for n in names:
            v = p[n]
            p[n] = tuple(a + 1 for a in v) if isinstance(v, tuple) else v + 1
        return p
    return shift


def batch_rule(prim):
    return prim.rule("batch")
