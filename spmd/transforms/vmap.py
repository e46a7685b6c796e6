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

from ..core import Literal, Tracer, aval_of, bind, current_builder, trace
from . import ad


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def moveaxis(x, src, dst):
    nd = aval_of(x).ndim
    src, dst = src % nd, dst % nd
    if src == dst:
        return x
    from ..lax import transpose_p
    perm = [i for i in range(nd) if i != src]
    perm.insert(dst, src)
    return bind(transpose_p, x, perm=tuple(perm))


def to_front(x, d, size):
    """``x`` with its batch dim first; an unbatched ``x`` is broadcast (it is the same for
    every batch entry)."""
    from ..lax import broadcast_in_dim_p
    if d is not None:
        return moveaxis(x, d, 0)
    a = aval_of(x)
    return bind(broadcast_in_dim_p, x, shape=(size,) + tuple(a.shape), dims=tuple(range(1, a.ndim + 1)))


def _size(vals, dims):
    return next(aval_of(v).shape[d] for v, d in zip(vals, dims) if d is not None)


def _all_front(vals, dims):
    size = _size(vals, dims)
    return [to_front(v, d, size) if d is not None or np.ndim(v) or isinstance(v, Tracer) else v
            for v, d in zip(vals, dims)]


# ---------------------------------------------------------------------------------------------
# batching rules (one per primitive family: the axis parameters shift by the new leading dim)
# ---------------------------------------------------------------------------------------------

def _elementwise(prim):
    def rule(vals, dims, /, **params):
        return bind(prim, *_all_front(vals, dims), **params), 0
    return rule


def _shifted(prim, shift):
    """Move every operand's batch dim to the front and rebind with ``shift(params, size)``."""
    def rule(vals, dims, /, **params):
        size = _size(vals, dims)
        return bind(prim, *_all_front(vals, dims), **shift(dict(params), size)), 0
    return rule


def _plus1(*names):
    def shift(p, size):
        for n in names:
            v = p[n]
            p[n] = tuple(a + 1 for a in v) if isinstance(v, tuple) else v + 1
        return p
    return shift


def _dot_general_batch(vals, dims, *, contract, batch):
    from ..lax import dot_general_p
    (x, y), (dx, dy) = vals, dims
    (xc, yc), (xb, yb) = contract, batch
    up = lambda t: tuple(a + 1 for a in t)
    if dx is not None and dy is not None:
        x, y = moveaxis(x, dx, 0), moveaxis(y, dy, 0)
        return bind(dot_general_p, x, y, contract=(up(xc), up(yc)), batch=((0,) + up(xb), (0,) + up(yb))), 0
    if dx is not None:
        x = moveaxis(x, dx, 0)
        return bind(dot_general_p, x, y, contract=(up(xc), yc), batch=(up(xb), yb)), len(xb)
    y = moveaxis(y, dy, 0)
    x_free = aval_of(x).ndim - len(xc) - len(xb)
    return bind(dot_general_p, x, y, contract=(xc, up(yc)), batch=(xb, up(yb))), len(xb) + x_free


def _take_batch(vals, dims, *, axis):
    from .. import lax
    (x, idx), (dx, di) = vals, dims
    if di is None:
        return bind(lax.take_p, moveaxis(x, dx, 0), idx, axis=axis + 1), 0
    if dx is None:
        return bind(lax.take_p, x, idx, axis=axis), axis + di
    # both batched: gather from the flattened (batch, axis) pair
    x, idx = moveaxis(x, dx, 0), moveaxis(idx, di, 0)
    B, xs = aval_of(x).shape[0], aval_of(x).shape[1:]
    n = xs[axis]
    rest = xs[:axis] + xs[axis + 1:]
    flat = bind(lax.reshape_p, moveaxis(x, axis + 1, 1), shape=(B * n,) + rest)
    ia = aval_of(idx)
    offs = bind(lax.iota_p, dtype=ia.dtype, shape=ia.shape, dimension=0) * n
    out = bind(lax.take_p, flat, np.where(idx < 0, idx + n, idx) + offs, axis=0)   # B, I..., rest...
    ni = ia.ndim - 1
    perm = (0,) + tuple(range(1 + ni, 1 + ni + axis)) + tuple(range(1, 1 + ni)) + \
        tuple(range(1 + ni + axis, 1 + ni + len(rest)))
    return bind(lax.transpose_p, out, perm=perm), 0


def _unbatched_operands(prim, which):
    def check(vals, dims):
        for i in which(len(vals)):
            if dims[i] is not None:
                raise NotImplementedError(f"batch rule for {prim.name} with batched "
                                          f"{'indices' if prim.name != 'pad' else 'padding value'}")
    return check


def _dynamic_slice_batch(vals, dims, *, sizes):
    from ..lax import dynamic_slice_p
    _unbatched_operands(dynamic_slice_p, lambda n: range(1, n))(vals, dims)
    x = moveaxis(vals[0], dims[0], 0)
    return bind(dynamic_slice_p, x, 0, *vals[1:], sizes=(aval_of(x).shape[0],) + tuple(sizes)), 0


def _dus_batch(vals, dims):
    from ..lax import dynamic_update_slice_p
    _unbatched_operands(dynamic_update_slice_p, lambda n: range(2, n))(vals, dims)
    size = _size(vals, dims)
    x, upd = to_front(vals[0], dims[0], size), to_front(vals[1], dims[1], size)
    return bind(dynamic_update_slice_p, x, upd, 0, *vals[2:]), 0


def _scatter_add_batch(vals, dims, *, axis):
    from ..lax import scatter_add_p
    _unbatched_operands(scatter_add_p, lambda n: [1])(vals, dims)
    size = _size(vals, dims)
    x, upd = to_front(vals[0], dims[0], size), to_front(vals[2], dims[2], size)
    return bind(scatter_add_p, x, vals[1], upd, axis=axis + 1), 0


def _pad_batch(vals, dims, *, config):
    from ..lax import pad_p
    _unbatched_operands(pad_p, lambda n: [1])(vals, dims)
    return bind(pad_p, moveaxis(vals[0], dims[0], 0), vals[1], config=((0, 0),) + tuple(config)), 0


def _shard_map_batch(vals, dims, *, body, mesh, in_specs, out_specs, manual_axes, check_vma, name):
    from ..shard_map import _body_ctx, shard_map_p
    from ..sharding import PartitionSpec
    size = _size(vals, dims)
    vals = [moveaxis(v, d, 0) if d is not None else v for v, d in zip(vals, dims)]
    bdims = [0 if d is not None else None for d in dims]
    unsplit = lambda s: PartitionSpec(None, *s)
    avals = [v.aval.update(shape=(size,) + v.aval.shape) if d is not None else v.aval
             for v, d in zip(body.in_vars, bdims)]

    def batched_body(*xs):
        outs, odims = batch_eval(body, xs, bdims, size)
        return [to_front(o, d, size) for o, d in zip(outs, odims)]
    bbody, _ = trace(batched_body, avals, **_body_ctx(mesh, manual_axes, check_vma))
    outs = bind(shard_map_p, *vals, body=bbody, mesh=mesh,
                in_specs=tuple(unsplit(s) if d is not None else s for s, d in zip(in_specs, bdims)),
                out_specs=tuple(unsplit(s) for s in out_specs), manual_axes=manual_axes,
                check_vma=check_vma, name=name)
    return outs, [0] * len(outs)


@functools.cache
def _rules():
    import importlib
    c = importlib.import_module("spmd.collectives")   # (spmd.collectives is also a function)
    from .. import lax
    from ..shard_map import shard_map_p
    rules = {}
    for p in list(lax.UNARY.values()) + list(lax.BINARY.values()) + [
            lax.select_p, lax.convert_element_type_p, c._identity_p, c.psum_p, c.pmax_p, c.pmin_p,
            c.pvary_p, c.ppermute_p, c.pbroadcast_p]:
        rules[p] = _elementwise(p)
    rules[lax.broadcast_in_dim_p] = _shifted(lax.broadcast_in_dim_p, lambda p, n: dict(
        p, shape=(n,) + tuple(p["shape"]), dims=(0,) + tuple(d + 1 for d in p["dims"])))
    rules[lax.reshape_p] = _shifted(lax.reshape_p, lambda p, n: dict(p, shape=(n,) + tuple(p["shape"])))
    rules[lax.transpose_p] = _shifted(lax.transpose_p, lambda p, n: dict(
        p, perm=(0,) + tuple(a + 1 for a in p["perm"])))
    rules[lax.slice_p] = _shifted(lax.slice_p, lambda p, n: dict(p, index=((0, n, 1),) + tuple(p["index"])))
    rules[lax.concatenate_p] = _shifted(lax.concatenate_p, _plus1("axis"))
    for p in (lax.reduce_sum_p, lax.reduce_max_p, lax.reduce_min_p, lax.reduce_prod_p,
              lax.reduce_and_p, lax.reduce_or_p):
        rules[p] = _shifted(p, _plus1("axes"))
    for p in (lax.argmax_p, lax.argmin_p, lax.cumsum_p, lax.cumprod_p, lax.cummax_p, lax.cummin_p,
              lax.sort_p, lax.argsort_p):
        rules[p] = _shifted(p, _plus1("axis"))
    rules[lax.dot_general_p] = _dot_general_batch
    rules[lax.take_p] = _take_batch
    rules[lax.dynamic_slice_p] = _dynamic_slice_batch
    rules[lax.dynamic_update_slice_p] = _dus_batch
    rules[lax.scatter_add_p] = _scatter_add_batch
    rules[lax.pad_p] = _pad_batch
    rules[c.all_gather_p] = _shifted(c.all_gather_p, _plus1("axis"))
    rules[c.psum_scatter_p] = _shifted(c.psum_scatter_p, _plus1("scatter_dimension"))
    rules[c.all_to_all_p] = _shifted(c.all_to_all_p, _plus1("split_axis", "concat_axis"))
    rules[shard_map_p] = _shard_map_batch
    return rules


def batch_rule(prim):
    rule = prim.batch or _rules().get(prim)
    if rule is None:
        raise NotImplementedError(f"batch rule for {prim.name}")
    return rule


# ---------------------------------------------------------------------------------------------
# the interpreter and vmap
# ---------------------------------------------------------------------------------------------

def batch_eval(program, args, dims, size):
    """Inline the batched ``program``; returns (outputs, their batch dims)."""
    env = {id(v): (x, d) for v, x, d in zip(program.in_vars, args, dims)}
    read = lambda a: (a.val, None) if isinstance(a, Literal) else env[id(a)]
    for e in program.eqns:
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

    @functools.wraps(f)
    def vmapped(*args):
        if current_builder() is None:      # on concrete arrays: trace once per types, run
            if not jitted:
                from ..jit import jit
                jitted.append(jit(vmapped, _name=f"vmap({name})"))
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
