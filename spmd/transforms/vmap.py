"""``vmap``: batching as a Program interpreter.

Every value carries a batch dim (an int) or ``None`` (not batched).  Each primitive's batching
rule re-binds the primitive on the batched operands with its axis parameters shifted: since
the implementations already take ``k`` leading batch dims, a batched primitive is usually the
same primitive with the batch dim moved to the front.  Collectives act on the per-device value,
so under ``vmap`` they keep their mesh axes and only shift the array dims they name; a
``shard_map`` maps to a ``shard_map`` of the batched body, with the batch dim unsplit.
"""
from __future__ import annotations

import functools

import numpy as np
import optree

from ..core import Literal, Tracer, attributed, aval_of, bind, current_builder, hooks, trace
from . import ad
from ..batching import batch_rule, batch_size, moveaxis, to_front  # noqa: F401


# ---------------------------------------------------------------------------------------------
# the interpreter and vmap
# ---------------------------------------------------------------------------------------------

def batch_eval(program, args, dims, size):
    """Inline the batched ``program``; returns (outputs, their batch dims)."""
    env = {id(v): (x, d) for v, x, d in zip(program.in_vars, args, dims)}
    read = lambda a: (a.val, None) if isinstance(a, Literal) else env[id(a)]
    for e in attributed(program.eqns):
        vals, ds = zip(*[read(a) for a in e.inputs]) if e.inputs else ((), ())
        if all(d is None for d in ds):
            outs = bind(e.prim, *vals, **e.params)
            odims = [None] * len(outs) if e.prim.multiple_results else None
        else:
            outs, odims = batch_rule(e.prim)(list(vals), list(ds), **e.params)
        if not e.prim.multiple_results:
            outs, odims = [outs], [odims]
        for v, o, d in zip(e.outputs, outs, odims):
            env[id(v)] = (o, d)
    outs = [read(a) for a in program.out_vars]
    return [o for o, _ in outs], [d for _, d in outs]


def _leaf_axes(axes, tree_value, what):
    is_leaf = lambda x: x is None
    try:
        full = optree.tree_broadcast_prefix(axes, tree_value, none_is_leaf=True)
    except ValueError as e:
        raise ValueError(f"vmap: {what} {axes!r} does not match the structure of the "
                         f"{'arguments' if what == 'in_axes' else 'outputs'} ({e})") from None
    return optree.tree_leaves(full, none_is_leaf=True)


def vmap(f, in_axes=0, out_axes=0, axis_size=None):
    """Map ``f`` over a new leading (or ``in_axes``) dim of its arguments.

    >>> import numpy as np, spmd
    >>> np.asarray(spmd.vmap(lambda r: r @ r)(np.arange(6.).reshape(2, 3))).tolist()
    [5.0, 50.0]
    """
    name = getattr(f, "__name__", "function")
    jitted = []

    @functools.wraps(f, updated=())
    def vmapped(*args):
        if current_builder() is None:      # on concrete arrays: trace once per types, run
            if not jitted:
                jitted.append(hooks.jit(vmapped, _name=f"vmap({name})"))
            return jitted[0](*args)
        leaves, tree = optree.tree_flatten(args, none_is_leaf=False)
        ax = _leaf_axes(tuple(in_axes) if isinstance(in_axes, list) else in_axes, args, "in_axes") \
            if not isinstance(in_axes, (int, type(None))) else [in_axes] * len(leaves)
        ax = [None if a is None else a % max(aval_of(x).ndim, 1) for a, x in zip(ax, leaves)]
        sizes = {aval_of(x).shape[a] for x, a in zip(leaves, ax) if a is not None}
        if axis_size is not None:
            sizes.add(axis_size)
        if len(sizes) != 1:
            raise ValueError(f"vmap({name}): the mapped axes have sizes {sorted(sizes)}; they must "
                             f"all be equal (or pass axis_size= when no argument is mapped).")
        size = sizes.pop()
        leaves = [moveaxis(x, a, 0) if a is not None else x for x, a in zip(leaves, ax)]
        avals = [aval_of(x).update(shape=aval_of(x).shape[1:]) if a is not None else aval_of(x)
                 for x, a in zip(leaves, ax)]
        box = []

        def flat_fn(*xs):
            out = f(*optree.tree_unflatten(tree, list(xs)))
            out_leaves, out_tree = optree.tree_flatten(out, none_is_leaf=False)
            box.append((out, out_tree))
            return out_leaves
        prog, captured = trace(flat_fn, avals, **ad.context(), context=f"vmap({name})")
        outs, odims = batch_eval(prog, leaves + captured,
                                 [0 if a is not None else None for a in ax] + [None] * len(captured), size)
        out_struct, out_tree = box[0]
        oax = [out_axes] * len(outs) if isinstance(out_axes, (int, type(None))) else \
            _leaf_axes(out_axes, out_struct, "out_axes")
        res = []
        for o, d, a in zip(outs, odims, oax):
            if a is None:
                if d is not None:
                    raise ValueError(f"vmap({name}): out_axes=None for an output that is batched")
                res.append(o)
            else:
                o = to_front(o, d, size)
                res.append(moveaxis(o, 0, a % aval_of(o).ndim))
        return optree.tree_unflatten(out_tree, res)
    return vmapped
