"""Sharding rules on Explicit mesh axes: the sharding type of a primitive's output.

On a mesh with Explicit axes a value's sharding is part of its type (``Aval.sharding``), and
every equation computes its output's at trace time from its operands' types, by the rule of
the primitive's ``category`` (declared in its block in ``spmd.prims``), as JAX's lax does:

- elementwise: operands broadcast; each dim takes the one sharding its operands agree on
  (size-1 dims and replicated operands agree with anything); two different ones are an error;
- broadcast / transpose / reduction / arg: the operand's dims move, or go, with their axes;
- reshape: dims split or merged keep their axes where the sizes divide, else an error;
- slice / pad / dynamic_slice: the operand's sharding (an error where a sharded dim's new size
  does not divide);
- scans and sorts, gathers and scatters along an axis: that dim must be whole; a gather's
  indices put their dims in its place; a dynamic update's operand and update must agree;
- concatenate: every operand must have the same sharding;
- contraction: batch dims split on both sides must agree (the left one's sharding is kept),
  free dims keep their axes, a dim contracted while sharded on both sides is ambiguous (an
  error naming the fix: ``out_sharding=``/``reshard``);
- select (declared in its block): the condition and both cases must agree;
- constraint (``reshard``): the sharding asked for (declared by its abstract rule).

Primitives of no category give a replicated type when their operands are replicated, and
otherwise leave the choice to the compiler (no type).  Where a rule raises, the message names
the op, the operands' types and the fix, as JAX's errors do.  The sharding compiler keeps to
the types: of the strategies its own rules propose for an equation, it picks among those that
give the output its type (``spmd.compiler.propagate``).
"""
from __future__ import annotations

import contextlib
import contextvars
import math

from .core import hooks
from .errors import ShardingError, UnreducedError
from .mesh import AxisType
from .sharding import NamedSharding, PartitionSpec, spec_entry


def _dims(aval) -> tuple[tuple[str, ...], ...]:
    """The Explicit axes of each dim of ``aval`` (nothing for an untyped value)."""
    if aval.sharding is None:
        return ((),) * aval.ndim
    return aval.sharding._dim_axes(aval.ndim)


def _fail(prim, avals, problem: str):
    types = ", ".join(str(a) for a in avals)
    raise ShardingError(
        f"{prim.name} on Explicit mesh axes: {problem} (operand types: {types}). Say which "
        f"sharding the result should have: reshard an operand first (spmd.reshard(x, P(...))), "
        f"or give the op out_sharding=P(...).")


def _mesh(prim, avals):
    meshes = {a.sharding.mesh for a in avals if a.sharding is not None}
    if len(meshes) > 1:
        _fail(prim, avals, f"the operands are on different meshes {sorted(map(repr, meshes))}; "
                           f"put them on one mesh")
    return meshes.pop()


def _elementwise(prim, avals, out, params):
    specs = []
    for a in avals:
        if a.ndim:      # scalars broadcast without a sharding; lower ranks align to the right
            pad = out.ndim - a.ndim
            specs.append([((), 1)] * pad + list(zip(_dims(a), a.shape)))
    dims = []
    for d in range(out.ndim):
        found = [ax for ax, n in (s[d] for s in specs) if ax or n != 1]
        shardings = {ax for ax in found if ax}
        if len(shardings) > 1:
            _fail(prim, avals, f"dim {d} is split over {' and '.join(map(str, sorted(shardings)))} "
                               f"in different operands, so the result's sharding is ambiguous")
        dims.append(shardings.pop() if shardings else ())
    return dims


def _padded(a, ndim):
    return ((),) * (ndim - a.ndim) + tuple(_dims(a))


def select(prim, avals, out, params):
    """``select``'s rule (JAX's): its typed operands (the condition unless a scalar, and both
    cases, broadcast dims unsplit) must have one sharding, which the result has."""
    typed = {_padded(a, out.ndim) for a in avals if a.sharding is not None and a.ndim}
    if len(typed) > 1:
        _fail(prim, avals, "the condition and both cases must have the same sharding")
    return list(typed.pop()) if typed else [()] * out.ndim


def _broadcast(prim, avals, out, params):
    (x,) = avals
    dims = [()] * out.ndim
    for i, d in enumerate(params["dims"]):
        dims[d] = _dims(x)[i]
    return dims


def _transpose(prim, avals, out, params):
    x = _dims(avals[0])
    return [x[p] for p in params["perm"]]


def _reduction(prim, avals, out, params):
    axes = params["axes"]
    return [ax for d, ax in enumerate(_dims(avals[0])) if d not in axes]


def _arg(prim, avals, out, params):
    return [ax for d, ax in enumerate(_dims(avals[0])) if d != params["axis"]]


def _reshape(prim, avals, out, params):
    """JAX's rule: only 1-sized dims inserted or removed, or one dim split into several (its
    axes go to the leading ones, major first, as the sizes divide) or several merged into one
    (their axes in order; no replicated dim may come before a sharded one)."""
    (x,) = avals
    mesh, xd, shape = x.sharding.mesh, _dims(x), tuple(params["shape"])
    if not any(xd):
        return [()] * len(shape)
    src = [(n, ax) for n, ax in zip(x.shape, xd) if n != 1]
    dst = [n for n in shape if n != 1]
    if [n for n, _ in src] == dst:
        it = iter(ax for _, ax in src)
        return [() if n == 1 else next(it) for n in shape]
    groups = _one_group(prim, avals, [n for n, _ in src], dst, shape)
    out_dims = []
    for ins, outs in groups:
        axes = tuple(a for k in ins for a in src[k][1])
        merged = [src[k][1] for k in ins]
        while merged and not merged[-1]:
            merged.pop()
        if not all(merged):             # a merge keeps the axes of a major-first run of dims
            _fail(prim, avals, f"reshape {x.shape} -> {shape} merges a replicated dim in front "
                               f"of a sharded one")
        it = iter(axes)
        for n in (dst[j] for j in outs):
            got = []
            while n > 1:
                a = next(it, None)
                if a is None:
                    break
                n, rem = divmod(n, mesh.axis_size(a))
                if rem:
                    _fail(prim, avals, f"reshape {x.shape} -> {shape} splits a dim whose size is "
                                       f"not divisible by mesh axis {a!r}")
                got.append(a)
            out_dims.append(tuple(got))
        if next(it, None) is not None:
            _fail(prim, avals, f"reshape {x.shape} -> {shape} leaves mesh axes without a dim")
    it = iter(out_dims)
    return [() if n == 1 else next(it) for n in shape]


def _one_group(prim, avals, src, dst, shape):
    """Groups ``(source dims, destination dims)`` of equal size where only one group splits or
    merges (JAX supports no more in one reshape on Explicit axes)."""
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        while pi != pj:
            if pi < pj and i + 1 < len(src):
                i += 1
                pi *= src[i]
                gi.append(i)
            elif pj < pi and j + 1 < len(dst):
                j += 1
                pj *= dst[j]
                gj.append(j)
            else:
                break
        groups.append((gi, gj))
        i, j = i + 1, j + 1
    if sum(len(gi) > 1 or len(gj) > 1 for gi, gj in groups) > 1 or \
            any(len(gi) > 1 and len(gj) > 1 for gi, gj in groups):
        _fail(prim, avals, f"reshape {avals[0].shape} -> {shape} splits or merges more than one "
                           f"group of dims")
    return groups


def _sliced(prim, avals, out, params):
    x = avals[0]
    if not out.ndim or all(n == 1 for n in out.shape):
        return [()] * out.ndim
    mesh = x.sharding.mesh if x.sharding is not None else None
    for d, (n_in, n_out, ax) in enumerate(zip(x.shape, out.shape, _dims(x))):
        parts = math.prod(mesh.axis_size(a) for a in ax) if ax else 1
        if n_in != n_out and n_out % parts:
            _fail(prim, avals, f"dim {d} is split over {ax} but its new size {n_out} is not "
                               f"divisible by {parts}")
    return list(_dims(x))


def _along_whole_dim(prim, avals, out, params):
    """Scans and sorts along ``axis`` need that dim whole on every device."""
    x, axis = avals[0], params["axis"]
    if _dims(x)[axis]:
        _fail(prim, avals, f"it runs along dim {axis}, which is split over {_dims(x)[axis]}")
    return list(_dims(x))


def _gather(prim, avals, out, params):
    """``take`` along ``axis``: that dim of the table whole; the indices' dims in its place."""
    x, idx = avals[0], avals[1]
    axis = params["axis"]
    xd = _dims(x)
    if xd[axis]:
        _fail(prim, avals, f"it gathers along dim {axis}, which is split over {xd[axis]}")
    return list(xd[:axis]) + list(_dims(idx)) + list(xd[axis + 1:])


def _scatter(prim, avals, out, params):
    if _dims(avals[0])[params["axis"]]:
        _fail(prim, avals, f"it scatters along dim {params['axis']}, which is split over "
                           f"{_dims(avals[0])[params['axis']]}")
    return list(_dims(avals[0]))


def _window_update(prim, avals, out, params):
    x, update = avals[0], avals[1]
    if _dims(x) != _dims(update):
        _fail(prim, avals, "the operand and the update must have the same sharding")
    return list(_dims(x))


def _concatenate(prim, avals, out, params):
    kinds = {_dims(a) for a in avals if a.sharding is not None}
    if len(kinds) > 1:
        _fail(prim, avals, "the operands have different shardings")
    return list(kinds.pop())


def _contraction(prim, avals, out, params):
    x, y = avals
    (xc, yc), (xb, yb) = params["contract"], params["batch"]
    xd, yd = _dims(x), _dims(y)
    for kind, xs, ys in (("batch", xb, yb), ("contracting", xc, yc)):
        for i, j in zip(xs, ys):
            if xd[i] and yd[j] and xd[i] != yd[j]:
                _fail(prim, avals, f"{kind} dim {i} of the left operand is split over {xd[i]} "
                                   f"but {kind} dim {j} of the right one over {yd[j]}")
    for i, j in zip(xc, yc):
        if xd[i] and yd[j]:
            _fail(prim, avals, f"contracting dims are sharded on both sides ({xd[i]} and "
                               f"{yd[j]}), so the result's sharding is ambiguous")
    # as JAX: batch dims take the left operand's sharding
    xf = [i for i in range(x.ndim) if i not in xc + xb]
    yf = [j for j in range(y.ndim) if j not in yc + yb]
    return [xd[i] for i in xb] + [xd[i] for i in xf] + [yd[j] for j in yf]


_RULES = {"elementwise": _elementwise, "broadcast": _broadcast, "transpose": _transpose,
          "reduction": _reduction, "arg": _arg, "reshape": _reshape, "slice": _sliced,
          "pad": _sliced, "window": _sliced, "concatenate": _concatenate,
          "contraction": _contraction, "scan": _along_whole_dim, "gather": _gather,
          "scatter": _scatter, "window_update": _window_update}


# While ``vmap`` batches: the mesh axes its ``spmd_axis_name=`` names, and the Explicit axes
# the mapped dims of its arguments are split over.  A constraint inside keeps its batch dim split
# over them: a ``with_sharding_constraint`` over the first (JAX's spmd_axis_name), a ``reshard``
# on Explicit axes over the second (JAX's explicit mesh axis), as in JAX.
_spmd_axis: contextvars.ContextVar[tuple] = contextvars.ContextVar("spmd_axis_name",
                                                                   default=((), ()))


@contextlib.contextmanager
def spmd_axis_name(name, explicit=()):
    axes = () if name is None else (name,) if isinstance(name, str) else tuple(name)
    token = _spmd_axis.set((axes, tuple(explicit)))
    try:
        yield
    finally:
        _spmd_axis.reset(token)


def batch_axes(mesh) -> tuple:
    """The mesh axes the batch dim of the ``vmap`` being applied is split over, for a
    constraint on ``mesh`` (a ``reshard`` where the mesh has Explicit axes)."""
    named, explicit = _spmd_axis.get()
    return explicit if mesh is not None and mesh.explicit_axes else named


def sharding_rule(prim, avals, out, params) -> NamedSharding | None:
    """The sharding type of ``prim``'s output ``out`` (an ``Aval``) from its operands' types."""
    mesh = _mesh(prim, avals)
    unreduced = _unreduced(prim, avals, params)
    rule = prim.sharding or _RULES.get(prim.category)
    if rule is None:
        return NamedSharding(mesh, PartitionSpec(*[None] * out.ndim)) if not any(
            ax for a in avals for ax in _dims(a)) else None
    dims = rule(prim, avals, out, params)
    used = [a for ax in dims for a in ax]
    if len(set(used)) != len(used):
        dup = next(a for a in used if used.count(a) > 1)
        _fail(prim, avals, f"the result would split two dims over mesh axis {dup!r}")
    if any(mesh.axis_type(a) is not AxisType.Explicit for a in used):
        return None
    return NamedSharding(mesh, PartitionSpec(*map(spec_entry, dims), unreduced=unreduced))


def _unreduced(prim, avals, params) -> frozenset:
    """A value unreduced over an axis (a sum pending there) may only meet ops linear in it,
    with every operand pending the same sum (``y + y``); anything else would communicate
    implicitly, so it is an error, as in JAX."""
    pending = [a.sharding.spec.unreduced if a.sharding is not None else frozenset() for a in avals]
    if not any(pending):
        return frozenset()
    linear = prim.category == "elementwise" and prim.linear_operands(len(avals), params) == tuple(
        range(len(avals)))
    if not linear or len(set(pending)) > 1:
        which = next(a for a, p in zip(avals, pending) if p)
        _fail(prim, avals, f"an operand ({which}) is a sum still pending over mesh axes "
                           f"{sorted(set().union(*pending))}; only linear ops on operands all "
                           f"pending the same sum keep it pending, so reduce it first with "
                           f"spmd.reshard(x, P(...)) (the sum is made there)")
    return pending[0]


def manual_unreduced(prim, avals, params) -> tuple[frozenset, frozenset]:
    """The Manual axes over which ``prim``'s result is a pending sum (unreduced) or a reduced
    copy, from its operands' (JAX's rules inside ``shard_map``):

    - reduced: every reduced operand on the same axes, which the result keeps; the other
      operands must be pending sums there (a replicated or constant one would be counted once
      per device by the cotangent's sum);
    - unreduced: an op linear in all its operands keeps a sum pending when every operand pends
      the same one (``u + u``, ``u.sum(0)``, ``u.T``); an op linear in each operand apart
      (``mul``, ``dot``) when one operand pends it and the others are reduced on its axes
      (``u * r``); any other op needs the sum made first (``psum``), or communication would be
      implicit."""
    reduced = {a.reduced for a in avals if a.reduced}
    if len(reduced) > 1:
        _fail_manual(prim, avals, "its operands are reduced over different mesh axes "
                                  f"{' and '.join(str(sorted(r)) for r in reduced)}")
    red = reduced.pop() if reduced else frozenset()
    for a in avals:
        if red and not a.reduced and not red <= a.unreduced:
            _fail_manual(prim, avals, f"an operand ({a}) is replicated over mesh axes "
                                      f"{sorted(red)}, which another operand is reduced over; "
                                      f"pcast it to 'reduced' there too")
    pending = [a.unreduced for a in avals]
    if not any(pending):
        return frozenset(), red
    n = len(avals)
    if prim.linear_operands(n, params) == tuple(range(n)) and prim.category != "contraction":
        if len(set(pending)) > 1:
            which = next(a for a, u in zip(avals, pending) if u != pending[0])
            _fail_manual(prim, avals, f"an operand ({which}) is not a sum pending over the same "
                                      f"mesh axes as the others; {prim.name} would communicate "
                                      f"implicitly")
        return pending[0], red
    sums = [i for i, u in enumerate(pending) if u]
    if len(sums) > 1 and set(sums) <= set(prim.multilinear):
        _fail_manual(prim, avals, f"{prim.name} is linear in each operand apart, so at most one "
                                  f"of them may be a pending sum")
    if len(sums) == 1 and sums[0] in prim.multilinear:
        u = pending[sums[0]]
        others = [a for i, a in enumerate(avals) if i != sums[0]]
        if all(a.reduced == u for a in others):
            return u, red - u
        _fail_manual(prim, avals, f"{prim.name} is linear in its pending-sum operand only while "
                                  f"the other operands are reduced over the same mesh axes "
                                  f"{sorted(u)} (pcast them to 'reduced')")
    raise UnreducedError(
        f"unreduced rule for {prim.name}: an operand is a sum still pending over mesh axes "
        f"{sorted(set().union(*pending))} and {prim.name} is not linear in it (operand types: "
        f"{', '.join(map(str, avals))}); make the sum first with spmd.psum(x, axes).")


def _fail_manual(prim, avals, problem: str):
    raise ShardingError(f"{prim.name} inside shard_map: {problem} (operand types: "
                        f"{', '.join(map(str, avals))}).")


hooks.sharding_rule = sharding_rule
hooks.manual_unreduced = manual_unreduced
