"""Rewrites of traced programs that compute the same values with less memory traffic.

``merge_padded_sums``: the gradient of ``w[0], w[1], ...`` (layers stacked on one array) is a sum
of cotangents each padded with zeros to the whole array; adding them costs a full-size fill,
copy and add per slice. Where the padded ranges are adjacent along one dim, the sum is one
concatenation padded once.

``psums_before_joins``: a sum over devices of values joined (concatenated, reshaped, products
added) on every device in the same way is the join of the sums.  A data-parallel step sums the concatenated
weight gradients of its stacked layers; summed piece by piece, each sum meets the product that
made the piece, which the executor runs as one contraction over the devices.
"""
from __future__ import annotations

import numpy as np

from .. import prims
from ..collectives import psum_p
from ..core import Eqn, Literal, Params, Program, Var


def _uses(program: Program) -> dict[int, int]:
    """How many times each variable is read (a program output counts twice: never folded)."""
    uses: dict[int, int] = {}
    for e in program.eqns:
        for a in e.inputs:
            if isinstance(a, Var):
                uses[id(a)] = uses.get(id(a), 0) + 1
    for a in program.out_vars:
        if isinstance(a, Var):
            uses[id(a)] = uses.get(id(a), 0) + 2
    return uses


def psums_before_joins(program: Program) -> Program:
    """``psum(concatenate(a, b))`` -> ``concatenate(psum(a), psum(b))``, ``psum(reshape(a))``
    -> ``reshape(psum(a))`` and ``psum(a + b)`` -> ``psum(a) + psum(b)``, recursively, where
    the pieces are products (or such joins of them) read only by the join and varying over
    every axis of the sum.  The replaced joins are left dead (run ``dce`` after)."""
    uses = _uses(program)
    made = {id(v): e for e in program.eqns for v in e.outputs}
    eqns, changed = [], False
    for e in program.eqns:
        if e.prim is psum_p and e.params.get("groups") is None:
            new = _summed(e.inputs[0], e.outputs[0], e, made, uses)
            changed |= len(new) > 1
            eqns += new
        else:
            eqns.append(e)
    return Program(program.in_vars, eqns, program.out_vars) if changed else program


_JOINS = (prims.reshape_p, prims.concatenate_p)


def _join(x, axes, made, uses):
    """The equation that joins ``x`` from products the sum can move before, or None: a
    reshape, a concatenation or an addition (``g_q @ wq.T + g_k @ wk.T``, an input's gradient
    through several projections), read only here, whose pieces vary over ``axes`` and are
    products or such joins of products (other pieces would only be summed in more, smaller
    sums)."""
    e = made.get(id(x)) if isinstance(x, Var) and uses.get(id(x)) == 1 else None
    if e is None or e.prim not in _JOINS + (prims.add_p,) or not all(
            isinstance(a, Var) and axes <= a.aval.vma for a in e.inputs):
        return None
    return e if all(_ends_in_product(a, axes, made, uses) for a in e.inputs) else None


def _ends_in_product(x, axes, made, uses) -> bool:
    e = made.get(id(x)) if isinstance(x, Var) and uses.get(id(x)) == 1 else None
    return e is not None and (e.prim is prims.dot_general_p or _join(x, axes, made, uses) is not None)


def _summed(x, out, psum, made, uses) -> list:
    """Equations that compute ``out = psum(x)`` with the sum moved before ``x``'s joins."""
    axes = set(psum.params["axes"])
    join = _join(x, axes, made, uses)
    if join is None:
        return [Eqn(psum_p, [x], psum.params, [out], psum.source)]
    eqns, sums = [], []
    for a in join.inputs:
        sums.append(Var(a.aval.update(vma=a.aval.vma - axes)))
        eqns += _summed(a, sums[-1], psum, made, uses)
    return eqns + [Eqn(join.prim, sums, join.params, [out], join.source)]


def merge_padded_sums(program: Program) -> Program:
    """``pad(a) + pad(b)`` -> ``pad(concatenate([a, b]))`` where ``a`` and ``b`` are padded with
    zeros along the same single dim into adjacent ranges and nothing else reads the pads.
    ``program`` has no dead equations; the replaced ones are left dead (run ``dce`` after)."""
    uses = _uses(program)
    made: dict[int, Eqn] = {}
    eqns, changed = [], False
    for e in program.eqns:
        new = _merged(e, made, uses) if e.prim is prims.add_p else None
        for eq in new or [e]:
            eqns.append(eq)
            for v in eq.outputs:
                made[id(v)] = eq
        changed |= new is not None
    return Program(program.in_vars, eqns, program.out_vars) if changed else program


def _padded_dim(x, made, uses):
    """``(dim, lo, the pad equation)`` if ``x`` is a zero pad along one dim read only here."""
    pad = made.get(id(x)) if isinstance(x, Var) and uses.get(id(x)) == 1 else None
    if pad is None or pad.prim is not prims.pad_p or pad.outputs[0].aval.sharding is not None:
        return None
    value = pad.inputs[1]
    if not isinstance(value, Literal) or np.any(np.asarray(value.val) != 0):
        return None
    dims = [d for d, (lo, hi) in enumerate(pad.params["config"]) if (lo, hi) != (0, 0)]
    if len(dims) != 1 or min(pad.params["config"][dims[0]]) < 0:
        return None
    return dims[0], pad.params["config"][dims[0]][0], pad


def _pieces(x, d, made, uses):
    """``x``'s parts along ``d`` if it is a concatenation along ``d`` read only here."""
    cat = made.get(id(x)) if isinstance(x, Var) and uses.get(id(x)) == 1 else None
    if cat is not None and cat.prim is prims.concatenate_p and cat.params["axis"] == d:
        return list(cat.inputs)
    return [x]


def _merged(e, made, uses):
    a, b = (_padded_dim(x, made, uses) for x in e.inputs)
    if a is None or b is None or a[0] != b[0]:
        return None
    d = a[0]
    (_, lo_a, pad_a), (_, lo_b, pad_b) = a, b
    n_a, n_b = (p.inputs[0].aval.shape[d] for p in (pad_a, pad_b))
    if lo_a + n_a == lo_b:
        first, second, lo = pad_a, pad_b, lo_a
    elif lo_b + n_b == lo_a:
        first, second, lo = pad_b, pad_a, lo_b
    else:
        return None
    out = e.outputs[0]
    total = out.aval.shape[d]
    parts = _pieces(first.inputs[0], d, made, uses) + _pieces(second.inputs[0], d, made, uses)
    if n_a + n_b == total:                              # the whole dim: no padding left
        return [Eqn(prims.concatenate_p, parts, Params(axis=d), [out], e.source)]
    shape = list(out.aval.shape)
    shape[d] = n_a + n_b
    joined = Var(out.aval.update(shape=tuple(shape)))
    uses[id(joined)] = 1                                # read by the pad below only
    config = tuple((lo, total - lo - n_a - n_b) if i == d else (0, 0)
                   for i in range(len(shape)))
    return [Eqn(prims.concatenate_p, parts, Params(axis=d), [joined], e.source),
            Eqn(prims.pad_p, [joined, first.inputs[1]], Params(config=config), [out], e.source)]

