"""What the JVP and transpose rules of primitives are written with (JAX's ``ad_util``).

Symbolic zeros (:class:`Zero`), the stand-in for a linear input being transposed
(:class:`UndefinedPrimal`), and builders of common rules (:func:`linear_jvp`,
:func:`deriv_jvp`, :func:`zero_jvp`, :func:`no_jvp`).  It sits below the primitives so that
their blocks can use it; the interpreters that apply the rules are ``spmd.transforms.ad``.
"""
from __future__ import annotations

import numpy as np

from .core import Aval, aval_of, bind, current_builder, hooks


class Zero:
    """A tangent or cotangent known to be zero (of type ``aval``): costs nothing."""
    __slots__ = ("aval",)

    def __init__(self, aval: Aval):
        self.aval = aval

    def __repr__(self):
        return f"Zero({self.aval})"


class UndefinedPrimal:
    """Stands for a linear input of an equation being transposed."""
    __slots__ = ("aval",)

    def __init__(self, aval: Aval):
        self.aval = aval

    def __repr__(self):
        return f"UndefinedPrimal({self.aval})"


def is_zero(t) -> bool:
    return isinstance(t, Zero)


def is_undefined(x) -> bool:
    return isinstance(x, UndefinedPrimal)


def differentiable(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.inexact)


def full(aval: Aval, value):
    """An array of ``value`` with type ``aval`` (including its vma, and its sharding on
    Explicit axes: a zero tangent or cotangent is typed like its primal, as in JAX) in the
    current trace."""
    x = bind(hooks.broadcast_in_dim, np.asarray(value, aval.dtype), shape=tuple(aval.shape), dims=())
    b = current_builder()
    if aval.vma:
        x = bind(hooks.pvary, x, axes=tuple(a for a in b.mesh.axis_names if a in aval.vma))
    if aval.sharding is not None and b is not None and not b.manual_axes:
        x = hooks.constrain(x, aval.sharding, "a constant")
    return x


def instantiate(t, aval=None):
    return full(t.aval if aval is None else aval, 0) if is_zero(t) else t


def add_tangents(a, b):
    if is_zero(a):
        return b
    if is_zero(b):
        return a
    return bind(hooks.add, a, b)


def aval_of_value(x) -> Aval:
    return x.aval if isinstance(x, (Zero, UndefinedPrimal)) else aval_of(x)


def linear_jvp(prim):
    """JVP rule of a primitive linear in all its inputs: apply it to the tangents."""
    def jvp(primals, tangents, **params):
        out = bind(prim, *primals, **params)
        ts = [instantiate(t, aval_of_value(p)) for t, p in zip(tangents, primals)]
        return out, bind(prim, *ts, **params)
    return jvp


def deriv_jvp(prim, deriv):
    """JVP rule of an elementwise unary primitive from its derivative ``deriv(x, y)``."""
    def jvp(primals, tangents, **params):
        (x,), (t,) = primals, tangents
        y = bind(prim, x, **params)
        return y, t * deriv(x, y)
    return jvp


def zero_jvp(prim):
    """JVP rule of a piecewise-constant primitive (floor, sign, argmax, comparisons, ...)."""
    def jvp(primals, tangents, **params):
        out = bind(prim, *primals, **params)
        if prim.multiple_results:
            return out, [Zero(aval_of_value(o)) for o in out]
        return out, Zero(aval_of_value(out))
    return jvp


def no_jvp(prim, why):
    """JVP rule that refuses (a primitive whose derivative we will not guess)."""
    def jvp(primals, tangents, **params):
        raise NotImplementedError(f"jvp rule for {prim.name}: {why}")
    return jvp
