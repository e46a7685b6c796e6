"""Sub-programs that run many times (a loop's body, a branch) as one straight-line Python
function of host arrays.

At the top level of a program (outside ``shard_map``) a local value is one whole array of the
shape its type gives, so each equation can be bound once to the array call that computes it:
``matmul`` for a product of matrices, the ufunc itself for an elementwise operation, a reshape
and broadcast with its shapes worked out beforehand.  The equations then become the lines of
one generated function (as ``dataclasses`` and ``namedtuple`` generate theirs): no list of
values to index, no dispatch through the generic implementations, which re-derive layouts on
every call, and each value dropped after its last use.  A loop of a thousand steps of a small
body spends its time in the array calls rather than around them.

>>> import numpy as np
>>> from spmd.core import trace, Aval
>>> f4 = np.dtype("f4")
>>> prog, _ = trace(lambda h, w: [np.tanh(h @ w)], [Aval((2, 3), f4), Aval((3, 3), f4)])
>>> step = straight_line(prog, np, higher=None, gather=lambda v: v)
>>> step(np.ones((2, 3), f4), 2 * np.eye(3, dtype=f4))[0].astype(float).round(3).tolist()
[[0.964, 0.964, 0.964], [0.964, 0.964, 0.964]]
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from .. import _host_parallel, prims
from ..core import Literal, Program
from . import profiling


def straight_line(program: Program, xp, *, higher, gather, timed=None, const=None):
    """``program`` as one function of its inputs returning the list of its outputs.

    Local equations run as :func:`host_call` on whole arrays: their operands pass through
    ``gather`` first where they may not be (the program's inputs, the results of other
    equations).  Every other equation (higher-order, or a collective) runs as ``higher(eqn)``
    on its operands as they are.  ``timed(list of inputs)``: how the program runs instead
    while profiling is on (step by step, each step timed).  ``const(array)``: a literal
    array where the arrays live (a GPU's copy), made once here; None: literals as they are."""
    ns = {"gather": gather, "whole_array": type(xp.empty(0)), "profiling": profiling,
          "timed": timed}
    names: dict[int, str] = {}           # id(var) -> its name in the function
    whole: set[int] = set()              # vars known to hold whole host arrays
    gathered: dict[int, str] = {}        # id(var) -> the name of its gathered value
    lines = []
    number = itertools.count()

    def name(a, gather_it=False):
        if isinstance(a, Literal):
            c = f"c{next(number)}"
            ns[c] = const(a.val) if const is not None and isinstance(a.val, np.ndarray) else a.val
            return c
        if not gather_it or id(a) in whole:
            return names[id(a)]
        if id(a) not in gathered:
            g, v = f"g{next(number)}", names[id(a)]
            gathered[id(a)] = g
            lines.append(f"{g} = {v} if {v}.__class__ is whole_array else gather({v})")
        return gathered[id(a)]

    params = []
    for v in program.in_vars:
        names[id(v)] = f"a{next(number)}"
        params.append(names[id(v)])
    if timed is not None:
        lines.append(f"if profiling.active is not None: return timed([{', '.join(params)}])")
    last_use = {}
    for j, e in enumerate(program.eqns):
        for a in e.inputs:
            last_use[id(a)] = j
    keep = {id(a) for a in program.out_vars}
    fresh: set[int] = set()              # vars holding an array this function made itself
    for j, e in enumerate(program.eqns):
        local = e.prim.execute is None and e.prim.stacked is None
        fn = f"f{j}"
        call = ns[fn] = host_call(e, xp) if local else higher(e)
        args = ", ".join(name(a, gather_it=local) for a in e.inputs)
        into = _reusable(e, call, fresh, last_use, keep, j) if local else None
        if into is not None:             # write into a temporary that dies here
            args += f", out={names[id(into)]}"
        if local and (isinstance(call, np.ufunc) or e.prim is prims.dot_general_p):
            fresh.update(id(v) for v in e.outputs)
        outs = []
        for v in e.outputs:
            names[id(v)] = f"v{next(number)}"
            outs.append(names[id(v)])
            if local:
                whole.add(id(v))
        if not outs:
            lines.append(f"{fn}({args})")
        elif e.prim.multiple_results:
            lines.append(f"{', '.join(outs)}, = {fn}({args})")
        else:
            lines.append(f"{outs[0]} = {fn}({args})")
        dead = [a for a in dict.fromkeys(id(a) for a in e.inputs if not isinstance(a, Literal))
                if last_use[a] == j and a not in keep]
        dead = [names[a] for a in dead] + [gathered.pop(a) for a in dead if a in gathered]
        if dead:
            lines.append(f"del {', '.join(dead)}")
    results = ", ".join(name(a) for a in program.out_vars)
    source = "\n    ".join([f"def body({', '.join(params)}):"] + lines + [f"return [{results}]"])
    exec(compile(source, f"<straight line of {len(program.eqns)} equations>", "exec"), ns)
    return ns["body"]


def _reusable(e, call, fresh, last_use, keep, j):
    """An operand of ufunc equation ``e`` whose array the ufunc may write its result into:
    one this function made (not a view of an input), read for the last time here, of the
    result's shape and dtype (as every operand is), with at least one dim (a ufunc of 0-d
    arrays gives a scalar); or None.  In a loop's body this saves an allocation per op."""
    if not isinstance(call, np.ufunc) or len(e.outputs) != 1:
        return None
    out = e.outputs[0].aval
    if not out.shape or any(not isinstance(a, Literal) and a.aval.dtype != out.dtype
                            for a in e.inputs):
        return None
    return next((a for a in e.inputs if not isinstance(a, Literal) and id(a) in fresh
                 and last_use[id(a)] == j and id(a) not in keep and a.aval.shape == out.shape),
                None)


def host_call(eqn, xp):
    """The function of whole host arrays (``xp``'s) that computes local equation ``eqn``."""
    special = _SPECIALIZED.get(eqn.prim)
    fn = special(xp, eqn) if special is not None else None
    if fn is not None:
        return fn
    ew = eqn.prim.elementwise
    if isinstance(ew, prims.ufunc):         # the elementwise rule is the impl on whole arrays
        return getattr(xp, ew.name)
    return functools.partial(eqn.prim.rule("impl"), xp, 0, **eqn.params)


def _dot_general(xp, eqn):
    """A product of matrices (or of stacks of them, the batch dims in front) as one
    ``matmul`` of the operands or their transposed views; None for other contractions."""
    x, y = (a.aval for a in eqn.inputs)
    (xc, yc), (xb, yb) = eqn.params["contract"], eqn.params["batch"]
    nb = len(xb)
    if (len(xc) != 1 or xb != yb or xb != tuple(range(nb)) or x.ndim != nb + 2
            or y.ndim != nb + 2):
        return None
    tx, ty = xc[0] == nb, yc[0] == nb + 1        # contracting x's rows, y's columns
    flops = math.prod(eqn.outputs[0].aval.shape) * x.shape[xc[0]]
    if xp is np and flops > _host_parallel.MATMUL_SINGLE_THREAD_FLOPS:
        matmul = functools.partial(_host_parallel.matmul, xp)
    elif nb == 0 and x.dtype in _BLAS_DTYPES:
        matmul = xp.dot                         # the same BLAS call, reached in fewer steps
    else:
        matmul = xp.matmul
    if not (tx or ty):
        return matmul
    swap = lambda a: xp.swapaxes(a, -1, -2)
    return lambda a, b: matmul(swap(a) if tx else a, swap(b) if ty else b)


def _broadcast_in_dim(xp, eqn):
    shape, dims = tuple(eqn.params["shape"]), eqn.params["dims"]
    src = eqn.inputs[0].aval.shape
    expanded = [1] * len(shape)
    for i, d in enumerate(dims):
        expanded[d] = src[i]
    expanded = tuple(expanded)
    return lambda x: xp.broadcast_to(xp.reshape(x, expanded), shape)


_BLAS_DTYPES = tuple(map(np.dtype, ("float32", "float64", "complex64", "complex128")))
_SPECIALIZED = {prims.dot_general_p: _dot_general, prims.broadcast_in_dim_p: _broadcast_in_dim}
