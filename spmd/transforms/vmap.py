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
from ..mesh import AbstractMesh
from ..sharding import NamedSharding, PartitionSpec, spec_entry
from . import ad
from ..sharding_rules import spmd_axis_name as spmd_axis
from ..batching import batch_rule, batch_size, moveaxis, to_front  # noqa: F401


# ---------------------------------------------------------------------------------------------
# the interpreter and vmap
# ---------------------------------------------------------------------------------------------

def batch_eval(program, args, dims, size, axis_name=None):
    """Inline the batched ``program``; returns (outputs, their batch dims).  ``axis_name``: the
    name of the batch dim, which the program's collectives may name (``vmap(axis_name=)``)."""
    env = {id(v): (x, d) for v, x, d in zip(program.in_vars, args, dims)}
    read = lambda a: (a.val, None) if isinstance(a, Literal) else env[id(a)]
    for e in attributed(program.eqns):
        vals, ds = zip(*[read(a) for a in e.inputs]) if e.inputs else ((), ())
        if axis_name is not None and _names_axis(e, axis_name):
            outs, odims = _over_batch(e, list(vals), list(ds), axis_name, size)
        elif all(d is None for d in ds):
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


def _names_axis(e, axis_name) -> bool:
    """Whether ``e`` is a collective over the named batch dim (and over no mesh axis)."""
    axes = e.params.get("axes")
    if e.prim.stacked is None or axes is None or axis_name not in axes:
        return False
    if tuple(axes) != (axis_name,):
        raise NotImplementedError(f"{e.prim.name} over the vmap axis {axis_name!r} together with "
                                  f"mesh axes {tuple(a for a in axes if a != axis_name)}: call it "
                                  f"over each separately.")
    return True


def _over_batch(e, vals, dims, axis_name, size):
    """A collective over the named batch dim is its stacked implementation with the batch dim as
    the one mesh dim (size 1 where a value does not vary along it), on traced values."""
    stacked = [np.expand_dims(v, 0) if d is None else moveaxis(v, d, 0) for v, d in zip(vals, dims)]
    out = e.prim.stacked(hooks.array_namespace, AbstractMesh((size,), (axis_name,)), *stacked,
                         **e.params)
    outs, res = out if e.prim.multiple_results else [out], []
    for v, o in zip(e.outputs, outs):
        if axis_name in v.aval.vma:
            res.append((np.broadcast_to(o, (size,) + tuple(aval_of(o).shape[1:])), 0))
        else:
            res.append((np.squeeze(o, 0), None))
    outs, odims = [o for o, _ in res], [d for _, d in res]
    return (outs, odims) if e.prim.multiple_results else (outs[0], odims[0])


def _leaf_axes(axes, tree_value, what):
    is_leaf = lambda x: x is None
    try:
        full = optree.tree_broadcast_prefix(axes, tree_value, none_is_leaf=True)
    except ValueError as e:
        raise ValueError(f"vmap: {what} {axes!r} does not match the structure of the "
                         f"{'arguments' if what == 'in_axes' else 'outputs'} ({e})") from None
    return optree.tree_leaves(full, none_is_leaf=True)


def _with_named_axis(ctx, axis_name, size, name):
    """The tracing context with the batch dim as one more manual axis named ``axis_name``."""
    mesh = ctx.get("mesh")
    names, sizes = (tuple(mesh.axis_names), tuple(mesh.axis_sizes)) if mesh is not None else ((), ())
    if axis_name in names:
        raise ValueError(f"vmap({name}): axis_name={axis_name!r} is already a mesh axis here; "
                         f"give the vmapped axis another name.")
    return dict(mesh=AbstractMesh(sizes + (size,), names + (axis_name,)),
                manual_axes=tuple(ctx.get("manual_axes", ())) + (axis_name,),
                check_vma=ctx.get("check_vma", True))


def _per_example(aval):
    """The type ``f`` sees of a mapped argument (batch dim in front): the batch dim goes, with
    the Explicit mesh axes it is split over, as in JAX."""
    if aval.sharding is None:
        return aval.update(shape=aval.shape[1:])
    spec, dims = aval.sharding.spec, aval.sharding._dim_axes(aval.ndim)[1:]
    spec = PartitionSpec(*map(spec_entry, dims), unreduced=spec.unreduced, reduced=spec.reduced)
    return aval.update(shape=aval.shape[1:], sharding=NamedSharding(aval.sharding.mesh, spec))


def _explicit_batch_axes(name, mapped, unmapped, spmd_axis_name):
    """The Explicit mesh axes the mapped dims of the arguments are split over (the batch dims
    of reshards inside, and so of the results, stay split over them); JAX's errors where the
    arguments disagree, where an unmapped one is split over those axes, or where
    ``spmd_axis_name`` names another split."""
    dim0 = lambda a: a.sharding._dim_axes(a.ndim)[0] if a.sharding is not None else ()
    splits = {dim0(a) for a in mapped}
    if len(splits) > 1:
        raise ValueError(f"vmap({name}): the mapped dims of the arguments are split over "
                         f"different mesh axes {sorted(splits)}; they must be split alike "
                         f"(reshard them first).")
    typed = splits.pop() if splits else ()
    if not typed:
        return ()
    for a in unmapped:
        if a.sharding is not None and set(typed) & {x for ax in a.sharding.spec.axes for x in ax}:
            raise ValueError(f"vmap({name}): an unmapped argument {a} is split over the mesh "
                             f"axes {typed} that the mapped dims are split over; reshard it, or "
                             f"map it too.")
    given = (spmd_axis_name,) if isinstance(spmd_axis_name, str) else spmd_axis_name
    if given is not None and tuple(given) != typed:
        raise ValueError(f"vmap({name}): the mapped dims of the arguments are split over the "
                         f"Explicit mesh axes {typed}, and spmd_axis_name={spmd_axis_name!r} "
                         f"names another split; give only one of the two (as in JAX).")
    return typed


def vmap(f, in_axes=0, out_axes=0, axis_name=None, axis_size=None, spmd_axis_name=None):
    """Map ``f`` over a new leading (or ``in_axes``) dim of its arguments.  With
    ``spmd_axis_name``, the sharding constraints inside (a sharded ``jit``'s shardings,
    ``with_sharding_constraint``) split the mapped dim over that mesh axis.  On Explicit axes
    ``f`` sees each argument's type without the mapped dim, and a mapped dim split over mesh
    axes stays split over them in the results (``reshard`` inside keeps it), as in JAX.

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
        for i, (a, x) in enumerate(zip(ax, leaves)):
            shape = aval_of(x).shape
            if a is not None and not -len(shape) <= a < len(shape):
                raise ValueError(f"vmap({name}): in_axes={a} for argument leaf {i} of shape "
                                 f"{tuple(shape)}: mapping along axis {a} needs a rank of at least "
                                 f"{a + 1 if a >= 0 else -a}, but it is {len(shape)}.")
        ax = [None if a is None else a % max(aval_of(x).ndim, 1) for a, x in zip(ax, leaves)]
        sizes = {aval_of(x).shape[a] for x, a in zip(leaves, ax) if a is not None}
        if axis_size is not None:
            sizes.add(axis_size)
        if len(sizes) != 1:
            raise ValueError(f"vmap({name}): the mapped axes have sizes {sorted(sizes)}; they must "
                             f"all be equal (or pass axis_size= when no argument is mapped).")
        size = sizes.pop()
        leaves = [moveaxis(x, a, 0) if a is not None else x for x, a in zip(leaves, ax)]
        avals = [_per_example(aval_of(x)) if a is not None else aval_of(x)
                 for x, a in zip(leaves, ax)]
        explicit = _explicit_batch_axes(
            name, [aval_of(x) for x, a in zip(leaves, ax) if a is not None],
            [aval_of(x) for x, a in zip(leaves, ax) if a is None], spmd_axis_name)
        box = []

        def flat_fn(*xs):
            out = f(*optree.tree_unflatten(tree, list(xs)))
            out_leaves, out_tree = optree.tree_flatten(out, none_is_leaf=False)
            box.append((out, out_tree))
            return out_leaves
        ctx = ad.context()
        if axis_name is not None:        # collectives may name the batch dim: trace with it
            ctx = _with_named_axis(ctx, axis_name, size, name)
            avals = [v.update(vma=v.vma | {axis_name}) if a is not None else v
                     for v, a in zip(avals, ax)]
        prog, captured = trace(flat_fn, avals, **ctx, context=f"vmap({name})")
        with spmd_axis(spmd_axis_name, explicit):
            outs, odims = batch_eval(prog, leaves + captured,
                                     [0 if a is not None else None for a in ax] + [None] * len(captured),
                                     size, axis_name)
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
                rank = aval_of(o).ndim
                if not -rank <= a < rank:
                    raise ValueError(f"vmap({name}): out_axes={a} for output leaf {len(res)}, whose "
                                     f"rank with the mapped axis is {rank}: the axis must be in "
                                     f"[{-rank}, {rank}).")
                res.append(moveaxis(o, 0, a % rank))
        return optree.tree_unflatten(out_tree, res)
    return vmapped
