"""Collectives: ordinary primitives, usable inside ``shard_map``.

Each primitive's block holds its shape rule, its vma rule, and two implementations:
``stacked`` works on the stacked layout (mesh axes as leading array dims) with array
operations only, and ``per_device`` works on one array per device through a
``Communicator`` (in-process reference, MPI, NCCL).

Both implementations reduce to the *rank-major* form: the mesh dims of the collective's axes
folded into one leading dim of size ``n`` (the rank within the axis group), optionally split
as ``(groups, group_size)`` for ``axis_index_groups``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import optree

from . import _cache, _host_parallel
from .comm_protocol import placement
from .core import Aval, Primitive, Tracer, bind, current_builder, hooks
from .errors import VmaError
from .prims import dynamic_slice_p, reshape_p
from . import ad_util, batching

# ---------------------------------------------------------------------------------------------
# argument checking (at trace time, before anything runs)
# ---------------------------------------------------------------------------------------------


def _axes_tuple(axis_name) -> tuple[str, ...]:
    if isinstance(axis_name, str):
        return (axis_name,)
    if isinstance(axis_name, (tuple, list)) and all(isinstance(a, str) for a in axis_name):
        return tuple(axis_name)
    raise TypeError(f"axis_name must be a mesh-axis name or a tuple of names, got {axis_name!r}")


def _context(op: str, axis_name):
    """The builder of the enclosing shard_map, after checking ``axis_name`` is manual there."""
    axes = _axes_tuple(axis_name)
    b = current_builder()
    if b is None or not b.manual_axes:
        where = f" in {b.context}" if b is not None else ""
        raise NameError(f"{op}{where}: unbound axis name {axes[0]!r}: collectives can only be used inside "
                        f"a shard_map body whose mesh has that axis; wrap the function with "
                        f"spmd.shard_map(f, mesh=..., in_specs=..., out_specs=...).")
    for a in axes:
        if a not in b.manual_axes:
            known = ", ".join(repr(m) for m in b.manual_axes)
            raise NameError(f"{op} in {b.context}: unbound axis name {a!r}; the manual mesh axes "
                            f"here are {known}.")
    if len(set(axes)) != len(axes):
        raise ValueError(f"{op} in {b.context}: axis {axes} names an axis twice.")
    return b, axes


def _group_size(b, axes) -> int:
    return math.prod(b.mesh.axis_size(a) for a in axes)


def _check_groups(op, b, axes, groups):
    if groups is None:
        return None
    n = _group_size(b, axes)
    try:
        groups = tuple(tuple(int(i) for i in g) for g in groups)
    except TypeError:
        raise ValueError(f"{op} in {b.context}: axis_index_groups must be a list of lists of "
                         f"indices, got {groups!r}") from None
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(n)) or len({len(g) for g in groups}) != 1:
        raise ValueError(f"{op} in {b.context}: axis_index_groups {groups} must split the "
                         f"{n} indices of axis {axes if len(axes) > 1 else axes[0]!r} into groups "
                         f"of equal size, each index exactly once.")
    return groups


def _tree_map(fn, x):
    return optree.tree_map(fn, x)


def _require_varying(op, b, x, axes, hint):
    missing = [a for a in axes if a not in x.aval.vma]
    if missing and b.check_vma:
        raise VmaError(
            f"{op} in {b.context}: the value ({x.aval}) is already invariant over mesh axis "
            f"{missing[0]!r}, so {op} over it would count the same value "
            f"{b.mesh.axis_size(missing[0])} times. {hint}")


def _as_traced(b, x):
    """Constants entering a collective become program values first."""
    if isinstance(x, Tracer):
        return x
    return bind(_identity_p, x)


_identity_p = Primitive("copy", abstract=lambda x: Aval(x.shape, x.dtype),
                        impl=lambda xp, k, x: x, linear=True, category="elementwise",
                        transpose=lambda ct, x: [ct])
_identity_p.jvp = ad_util.linear_jvp(_identity_p)


def _vary(b, x, axes):
    """Implicit pvary of the input of a collective that needs a varying value."""
    missing = tuple(a for a in b.mesh.axis_names if a in axes and a not in x.aval.vma)
    return bind(pvary_p, x, axes=missing) if missing else x


# ---------------------------------------------------------------------------------------------
# rank-major form (used by the stacked implementations)
# ---------------------------------------------------------------------------------------------

class _RankMajor:
    """Fold the mesh dims of ``axes`` of a stacked value into a leading ``(G, g)`` pair.

    Built once per (mesh, axes, groups, stacked shape) and cached (:meth:`of`), so a call only
    applies the transposes and reshapes worked out here."""

    @staticmethod
    @_cache.memoize
    def of(axis_names, sizes, axes, groups, shape) -> "_RankMajor":
        return _RankMajor(axis_names, sizes, axes, groups, shape)

    def __init__(self, axis_names, sizes, axes, groups, shape):
        self.m = m = len(sizes)
        self.pos = [axis_names.index(a) for a in axes]
        self.sizes = sizes
        self.n = math.prod(sizes[p] for p in self.pos)
        self.groups = groups
        want = tuple(sizes[j] if j in self.pos else shape[j] for j in range(m)) + shape[m:]
        self.want = want if want != shape else None         # broadcast invariant inputs first
        self.others = [j for j in range(m) if j not in self.pos]
        self.r = len(self.others)          # other mesh dims, between the rank pair and local dims
        self.perm = self.pos + self.others + list(range(m, len(shape)))
        self.flat = (self.n,) + tuple(want[j] for j in self.perm[len(self.pos):])
        self.order = np.array([i for g in groups for i in g]) if groups is not None else None
        self.G = len(groups) if groups is not None else 1
        self.inv = np.argsort(self.pos + self.others).tolist()

    def fold(self, xp, x):
        """The rank-major array ``(G, g, others..., local...)`` of stacked ``x``."""
        if self.want is not None:
            x = xp.broadcast_to(x, self.want)
        if self.perm != sorted(self.perm):
            x = xp.transpose(x, self.perm)
        y = _host_parallel.reshape(xp, x, self.flat)
        if self.order is not None:
            y = y[self.order]
        return y.reshape((self.G, self.n // self.G) + self.flat[1:])

    def local(self, d):
        """Index of local dim ``d`` in the rank-major array."""
        return 2 + self.r + d

    def unfold(self, xp, z, varying: bool):
        """Back to the stacked layout; ``z`` has shape (G, g or 1, others..., local...)."""
        G = z.shape[0]
        if varying or G > 1:
            if z.shape[1] != self.n // G:
                z = xp.broadcast_to(z, (G, self.n // G) + z.shape[2:])
            z = _host_parallel.reshape(xp, z, (self.n,) + z.shape[2:])
            if self.groups is not None:
                z = xp.take(z, np.argsort(self.order), axis=0)
            z = z.reshape(tuple(self.sizes[p] for p in self.pos) + z.shape[1:])
        else:
            z = z.reshape((1,) * len(self.pos) + z.shape[2:])
        inv = self.inv + list(range(self.m, z.ndim))
        return xp.transpose(z, inv) if inv != list(range(z.ndim)) else z


def _rank_major_rule(body, *, out_varying):
    """A stacked implementation from a function of the rank-major array."""
    def stacked(xp, mesh, x, *, axes, groups=None, **params):
        rm = _RankMajor.of(mesh.axis_names, mesh.axis_sizes, axes, groups, x.shape)
        z = body(xp, rm, rm.fold(xp, x), **params)
        varying = out_varying(params) if callable(out_varying) else out_varying
        return rm.unfold(xp, z, varying)
    return stacked


# ---------------------------------------------------------------------------------------------
# psum / pmax / pmin
# ---------------------------------------------------------------------------------------------

def _reduce_vma(x, *, axes, groups=None, **_):
    return x.vma if groups is not None else x.vma - set(axes)


# A device's array module by name ("cupy") -> its one-pass reduction ``(y, op) -> y reduced
# over axis 1``, or None where it does not apply; registered by the plug-in that brings the
# device (spmd.gpu), without importing the module.
DEVICE_REDUCE: dict = {}


def _reduce_ranks(xp, y, op):
    """``y`` (G, g, rest...) reduced over the ranks: (G, rest...)."""
    device = DEVICE_REDUCE.get(getattr(xp, "__name__", None)) if xp is not np else None
    if device is not None and (out := device(y, op)) is not None:
        return out
    if y.nbytes < _host_parallel.REDUCE_LOOP_MIN_BYTES:
        return {"sum": lambda: y.sum(axis=1, dtype=y.dtype),      # no int promotion
                "max": lambda: y.max(axis=1), "min": lambda: y.min(axis=1)}[op]()
    # big: slab by slab into one output buffer, block by block over the host threads
    out = _host_parallel.empty(xp, y.shape[:1] + y.shape[2:], y.dtype)
    return _host_parallel.reduce_into(xp, op, out, [y[:, i] for i in range(y.shape[1])])


def _unreduced_rule(name, *, sums=False):
    """A collective over axes its operand is a pending sum or a reduced copy over refuses it,
    as JAX does; ``psum`` (``sums``) makes a pending sum (unreduced -> invariant)."""
    def rule(x, *, axes, **_):
        pending = x.unreduced & set(axes)
        for kind, bad in (("unreduced", set() if sums else pending),
                          ("reduced", x.reduced & set(axes))):
            if bad:
                raise ValueError(f"{name} cannot accept a value that is {kind} over mesh axes "
                                 f"{sorted(bad)} (got {x}); "
                                 + ("make its pending sum first with psum" if kind == "unreduced"
                                    else "it is already the same on every device there"))
        return x.unreduced - pending, x.reduced
    return rule


def _all_reduce_prim(name, op):
    return Primitive(
        name, abstract=lambda x, **p: Aval(x.shape, x.dtype), vma=_reduce_vma,
        unreduced=_unreduced_rule(name, sums=op == "sum"),
        stacked=_rank_major_rule(lambda xp, rm, y: xp.expand_dims(_reduce_ranks(xp, y, op), 1),
                                 out_varying=False),
        per_device=lambda comm, bufs, *, axes, groups=None: comm.all_reduce(bufs, axes, groups, op),
        collective=op, linear=(op == "sum"))


psum_p = _all_reduce_prim("psum", "sum")
pmax_p = _all_reduce_prim("pmax", "max")
pmin_p = _all_reduce_prim("pmin", "min")


def _vary_like(x, aval):
    """``pvary`` ``x`` over the axes that ``aval`` varies over and ``x`` does not."""
    b = current_builder()
    missing = tuple(a for a in b.mesh.axis_names if a in aval.vma and a not in x.aval.vma)
    return bind(pvary_p, x, axes=missing) if missing else x


def _psum_transpose(ct, x, *, axes, groups):
    # A sum over a sub-group is its own transpose; over the whole axis the cotangent is
    # invariant and flows back to every device unchanged: a pvary, no communication.  Without
    # vma types (check_vma=False) nothing says the cotangent is the same everywhere: psum it.
    if groups is not None or not current_builder().check_vma:
        return [bind(psum_p, ct, axes=axes, groups=groups)]
    if x.aval.unreduced & set(axes):       # the sum of a pending sum: the cotangent is reduced
        return [bind(preduced_p, ct, axes=axes)]
    return [_vary_like(ct, x.aval)]


psum_p.jvp, psum_p.transpose = ad_util.linear_jvp(psum_p), _psum_transpose
for _p in (pmax_p, pmin_p):
    _p.jvp = ad_util.no_jvp(_p, f"{_p.name} has no gradient (which device's value wins is not a smooth "
                           f"function); wrap its operand in spmd.stop_gradient (lax.stop_gradient) if "
                           f"no gradient should flow through it, take the gradient of a psum-based "
                           f"formulation, or compute the {_p.name} outside the differentiated "
                           f"function.")
del _p


def _all_reduce(prim, op_name, x, axis_name, axis_index_groups):
    b, axes = _context(op_name, axis_name)
    groups = _check_groups(op_name, b, axes, axis_index_groups)

    spelled = repr(axes[0]) if len(axes) == 1 else repr(axes)

    def one(leaf):
        leaf = _as_traced(b, leaf)
        if prim is psum_p and leaf.aval.unreduced & set(axes) and \
                _state(op_name, leaf, axes) == "unreduced":
            return bind(psum_p, leaf, axes=axes, groups=groups)     # the pending sum, made
        if prim is not psum_p:
            # max and min are idempotent: over the axes the value is the same on, it is its own
            # reduction (JAX reduces over the varying axes only, and returns an invariant value)
            varying = tuple(a for a in axes if a in leaf.aval.vma)
            if groups is not None and varying != axes:
                leaf = _vary(b, leaf, axes)      # the groups number devices along all of axes
            elif not varying:
                return leaf
            else:
                return bind(prim, leaf, axes=varying, groups=groups)
        _require_varying(op_name, b, leaf, axes,
                         f"If you mean n·x, write {op_name}(spmd.pvary(x, {spelled}), "
                         f"{spelled}); if the value is already the same everywhere, drop the "
                         f"{op_name}.")
        if prim is psum_p:
            leaf = _count_bools(leaf)
        return bind(prim, leaf, axes=axes, groups=groups)
    return _tree_map(one, x)


def _count_bools(x):
    """A sum of booleans counts them (as ``np.sum`` and ``jax.lax.psum`` do)."""
    return x.astype(np.int_) if x.dtype == np.bool_ else x


def psum(x, axis_name, *, axis_index_groups=None):
    """Sum ``x`` over the devices of mesh axis ``axis_name`` (a name or tuple of names).

    The result is invariant over those axes.  ``psum`` of a value that is already invariant
    over the axis is an error (it would silently count it n times)."""
    return _all_reduce(psum_p, "psum", x, axis_name, axis_index_groups)


def pmax(x, axis_name, *, axis_index_groups=None):
    return _all_reduce(pmax_p, "pmax", x, axis_name, axis_index_groups)


def pmin(x, axis_name, *, axis_index_groups=None):
    return _all_reduce(pmin_p, "pmin", x, axis_name, axis_index_groups)


def pmean(x, axis_name, *, axis_index_groups=None):
    b, axes = _context("pmean", axis_name)
    n = _group_size(b, axes) if axis_index_groups is None else len(list(axis_index_groups)[0])
    return _tree_map(lambda s: s / n, psum(x, axis_name, axis_index_groups=axis_index_groups))


# ---------------------------------------------------------------------------------------------
# all_gather
# ---------------------------------------------------------------------------------------------

def _all_gather_abstract(x, *, axes, axis, tiled, groups, to, size):
    shape = list(x.shape)
    if tiled:
        shape[axis] *= size
    else:
        shape.insert(axis, size)
    return Aval(tuple(shape), x.dtype)


def _all_gather_vma(x, *, axes, groups, to, **_):
    return x.vma - set(axes) if (to == "invariant" and groups is None) else x.vma | set(axes)


def _all_gather_body(xp, rm, y, *, axis, tiled, to, size):
    z = xp.moveaxis(y, 1, rm.local(axis) - 1)          # (G, others, local with g at axis)
    if tiled:                                           # a view when the blocks are adjacent
        a = rm.local(axis) - 1
        z = _host_parallel.reshape(xp, z, z.shape[:a] + (z.shape[a] * z.shape[a + 1],) + z.shape[a + 2:])
    return xp.expand_dims(z, 1)


all_gather_p = Primitive(
    "all_gather", unreduced=_unreduced_rule("all_gather"),
    abstract=_all_gather_abstract, vma=_all_gather_vma,
    stacked=_rank_major_rule(_all_gather_body, out_varying=lambda p: p["to"] == "varying"),
    per_device=lambda comm, bufs, *, axes, axis, tiled, groups, to, size: {
        d: placement(comm).call(d, _join, g, tiled=tiled, axis=axis)
        for d, g in comm.all_gather(bufs, axes, groups).items()},
    collective="all_gather", linear=True)


def _all_gather_transpose(ct, x, *, axes, axis, tiled, groups, to, size):
    if to == "invariant" and groups is None:
        # One invariant copy of the gathered value: device i's block is its own slice of it.
        blk = x.aval.shape[axis] if tiled else 1
        starts = [0] * ct.ndim
        starts[axis] = bind(axis_index_p, axes=axes) * blk
        sizes = tuple(blk if d == axis else n for d, n in enumerate(ct.shape))
        out = bind(dynamic_slice_p, ct, *starts, sizes=sizes)
        if not tiled:
            out = bind(reshape_p, out, shape=x.aval.shape)
        return [_vary_like(out, x.aval)]
    return [bind(psum_scatter_p, ct, axes=axes, scatter_dimension=axis, tiled=tiled, groups=groups,
                 size=size)]


all_gather_p.jvp, all_gather_p.transpose = ad_util.linear_jvp(all_gather_p), _all_gather_transpose


def all_gather(x, axis_name, *, axis_index_groups=None, axis=0, tiled=False, to="varying"):
    """Gather the blocks of ``x`` from every device of ``axis_name`` along ``axis``.

    ``to="varying"`` (default) types the result as varying over the axis, as in JAX;
    ``to="invariant"`` (JAX spells it ``"invarying"``; both accepted) types it invariant."""
    if to == "invarying":
        to = "invariant"
    if to not in ("varying", "invariant"):
        raise ValueError(f"all_gather: to={to!r}; use 'varying' or 'invariant'.")
    b, axes = _context("all_gather", axis_name)
    groups = _check_groups("all_gather", b, axes, axis_index_groups)
    size = _group_size(b, axes) if groups is None else len(groups[0])

    def one(leaf):
        leaf = _vary(b, _as_traced(b, leaf), axes)
        if tiled and leaf.ndim == 0:
            raise ValueError(f"all_gather(tiled=True) in {b.context}: the operand is a scalar, "
                             f"which has no axis to concatenate the blocks along; gather with "
                             f"tiled=False (a new leading axis), or reshape it to shape (1,).")
        nd = leaf.ndim + (0 if tiled else 1)
        ax = _norm_axis("all_gather", b, axis, nd if not tiled else leaf.ndim)
        return bind(all_gather_p, leaf, axes=axes, axis=ax, tiled=bool(tiled), groups=groups,
                    to=to, size=size)
    return _tree_map(one, x)


def _norm_axis(op, b, axis, ndim):
    if not isinstance(axis, (int, np.integer)) or not -ndim <= axis < max(ndim, 1):
        raise ValueError(f"{op} in {b.context}: axis {axis!r} is out of range for a value of rank "
                         f"{ndim}.")
    return int(axis) % max(ndim, 1)


# ---------------------------------------------------------------------------------------------
# psum_scatter
# ---------------------------------------------------------------------------------------------

def _psum_scatter_abstract(x, *, axes, scatter_dimension, tiled, groups, size):
    shape = list(x.shape)
    if tiled:
        shape[scatter_dimension] //= size
    else:
        del shape[scatter_dimension]
    return Aval(tuple(shape), x.dtype)


def _psum_scatter_body(xp, rm, y, *, scatter_dimension, tiled, size):
    # the whole sum, of which each device's block is a view: nothing is copied to scatter it
    s = _reduce_ranks(xp, y, "sum")                     # (G, others, local)
    a = rm.local(scatter_dimension) - 1
    if tiled:
        s = s.reshape(s.shape[:a] + (size, s.shape[a] // size) + s.shape[a + 1:])
    return xp.moveaxis(s, a, 1)


psum_scatter_p = Primitive(
    "psum_scatter", unreduced=_unreduced_rule("psum_scatter"), abstract=_psum_scatter_abstract,
    vma=lambda x, *, axes, **_: x.vma | set(axes),
    stacked=_rank_major_rule(_psum_scatter_body, out_varying=True),
    per_device=lambda comm, bufs, *, axes, scatter_dimension, tiled, groups, size: comm.reduce_scatter(
        {d: _to_front(v, scatter_dimension, size, tiled) for d, v in bufs.items()}, axes, groups, "sum"),
    collective="reduce_scatter", linear=True,
    transpose=lambda ct, x, *, axes, scatter_dimension, tiled, groups, size: [
        bind(all_gather_p, ct, axes=axes, axis=scatter_dimension, tiled=tiled, groups=groups,
             to="varying", size=size)])
psum_scatter_p.jvp = ad_util.linear_jvp(psum_scatter_p)


def _to_front(v, dim, size, tiled):
    """Split dim ``dim`` into ``size`` chunks as a new leading dim (for per-device collectives)."""
    if tiled:
        v = v.reshape(v.shape[:dim] + (size, v.shape[dim] // size) + v.shape[dim + 1:])
    return v if dim == 0 else np.moveaxis(v, dim, 0)


def psum_scatter(x, axis_name, *, scatter_dimension=0, axis_index_groups=None, tiled=False):
    """Sum over ``axis_name`` and leave device ``i`` with block ``i`` along ``scatter_dimension``."""
    b, axes = _context("psum_scatter", axis_name)
    groups = _check_groups("psum_scatter", b, axes, axis_index_groups)
    size = _group_size(b, axes) if groups is None else len(groups[0])

    def one(leaf):
        leaf = _as_traced(b, leaf)
        _require_varying("psum_scatter", b, leaf, axes,
                         f"pvary the value first if you mean to scatter n·x.")
        leaf = _count_bools(leaf)
        d = _norm_axis("psum_scatter", b, scatter_dimension, leaf.ndim)
        n = leaf.shape[d]
        if (tiled and n % size) or (not tiled and n != size):
            need = f"a multiple of {size}" if tiled else f"exactly {size}"
            raise ValueError(f"psum_scatter in {b.context}: scatter_dimension {d} has size {n}, "
                             f"but scattering over axis {axes if len(axes) > 1 else axes[0]!r} "
                             f"({size} devices) needs {need}.")
        return bind(psum_scatter_p, leaf, axes=axes, scatter_dimension=d, tiled=bool(tiled),
                    groups=groups, size=size)
    return _tree_map(one, x)


# ---------------------------------------------------------------------------------------------
# all_to_all
# ---------------------------------------------------------------------------------------------

def _all_to_all_abstract(x, *, axes, split_axis, concat_axis, tiled, groups, size):
    shape = list(x.shape)
    if tiled:
        shape[split_axis] //= size
        shape[concat_axis] *= size
    else:
        del shape[split_axis]
        shape.insert(concat_axis, size)
    return Aval(tuple(shape), x.dtype)


def _all_to_all_body(xp, rm, y, *, split_axis, concat_axis, tiled, size):
    # y: (G, g_src, others, local).  Split local[split_axis] into (g_dst, rest).
    s = rm.local(split_axis)
    if tiled:
        y = y.reshape(y.shape[:s] + (size, y.shape[s] // size) + y.shape[s + 1:])
    z = xp.moveaxis(y, s, 1)                            # (G, g_dst, g_src, others, local')
    # move g_src into the local dims, right before local[concat_axis], and merge when tiled
    c = 2 + rm.r + concat_axis
    z = xp.moveaxis(z, 2, c)
    if tiled:                                           # the one copy: a transpose
        z = _host_parallel.reshape(xp, z, z.shape[:c] + (z.shape[c] * z.shape[c + 1],) + z.shape[c + 2:])
    return z


def _all_to_all_per_device(comm, bufs, *, axes, split_axis, concat_axis, tiled, groups, size):
    sent = {d: _to_front(v, split_axis, size, tiled) for d, v in bufs.items()}
    got = comm.all_to_all(sent, axes, groups)
    # r: (size, chunk...) from each source, joined on the device that holds it
    return {d: placement(comm).call(d, _join, r, tiled=tiled, axis=concat_axis) for d, r in got.items()}


def _join(xp, chunks, *, tiled, axis):
    """The gathered blocks as one value.  A communicator that returns them stacked in one array
    (leading dim: the block) gets a view where the layout allows it (axis 0), not a copy."""
    if hasattr(chunks, "shape"):
        if not tiled:
            return chunks if axis == 0 else xp.moveaxis(chunks, 0, axis)
        if axis == 0:
            return chunks.reshape((chunks.shape[0] * chunks.shape[1],) + tuple(chunks.shape[2:]))
        moved = xp.moveaxis(chunks, 0, axis)
        shape = moved.shape
        return moved.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])
    return (xp.concatenate if tiled else xp.stack)(list(chunks), axis=axis)


all_to_all_p = Primitive(
    "all_to_all", unreduced=_unreduced_rule("all_to_all"),
    abstract=_all_to_all_abstract, vma=lambda x, *, axes, **_: x.vma | set(axes),
    stacked=_rank_major_rule(_all_to_all_body, out_varying=True),
    per_device=_all_to_all_per_device, collective="all_to_all", linear=True,
    transpose=lambda ct, x, *, axes, split_axis, concat_axis, tiled, groups, size: [
        bind(all_to_all_p, ct, axes=axes, split_axis=concat_axis, concat_axis=split_axis,
             tiled=tiled, groups=groups, size=size)])
all_to_all_p.jvp = ad_util.linear_jvp(all_to_all_p)


def all_to_all(x, axis_name, split_axis, concat_axis, *, axis_index_groups=None, tiled=False):
    """Device ``i`` sends chunk ``j`` of ``split_axis`` to device ``j``, which concatenates what
    it receives along ``concat_axis`` in source order."""
    b, axes = _context("all_to_all", axis_name)
    groups = _check_groups("all_to_all", b, axes, axis_index_groups)
    size = _group_size(b, axes) if groups is None else len(groups[0])

    def one(leaf):
        leaf = _vary(b, _as_traced(b, leaf), axes)
        s = _norm_axis("all_to_all", b, split_axis, leaf.ndim)
        c = _norm_axis("all_to_all", b, concat_axis, leaf.ndim if tiled else leaf.ndim)
        n = leaf.shape[s]
        if (tiled and n % size) or (not tiled and n != size):
            need = f"a multiple of {size}" if tiled else f"exactly {size}"
            raise ValueError(f"all_to_all in {b.context}: split_axis {s} has size {n}, but "
                             f"splitting over axis {axes if len(axes) > 1 else axes[0]!r} "
                             f"({size} devices) needs {need}.")
        return bind(all_to_all_p, leaf, axes=axes, split_axis=s, concat_axis=c,
                    tiled=bool(tiled), groups=groups, size=size)
    return _tree_map(one, x)


# ---------------------------------------------------------------------------------------------
# ppermute, pbroadcast
# ---------------------------------------------------------------------------------------------

def _runs(src_of) -> list[tuple[int, int, int]]:
    """``(first destination, end, source of the first)`` of each run of destinations that
    receive from consecutive sources (``source -1``: a run that receives nothing).

    >>> _runs(np.array([-1, 0, 1, 2, 5, 4]))
    [(0, 1, -1), (1, 4, 0), (4, 5, 5), (5, 6, 4)]
    """
    runs, d, n = [], 0, len(src_of)
    while d < n:
        src, end = int(src_of[d]), d + 1
        while end < n and (src_of[end] < 0 if src < 0 else src_of[end] == src + end - d):
            end += 1
        runs.append((d, end, src))
        d = end
    return runs


def _ppermute_body(xp, rm, y, *, perm):
    src_of = np.full(rm.n, -1)
    for s, d in perm:
        src_of[d] = s
    if y.nbytes >= _host_parallel.LOOP_MIN_BYTES or _host_parallel.on_device(xp):
        # big (or on a GPU, where a gather would first upload its index): one block copy per
        # run of destinations whose sources are consecutive too (a shift, as a pipeline's, is
        # one copy), zeros where nothing arrives, over the threads
        out = _host_parallel.empty(xp, y.shape, y.dtype)
        tasks, parts = [], 4 * _host_parallel.num_threads()      # a few tasks per thread in all
        for d, end, src in _runs(src_of):
            if src < 0:
                out[:, d:end] = 0
            else:
                tasks += _host_parallel.copy_tasks(xp, out[:, d:end], y[:, src:src + end - d],
                                                   -(-parts * (end - d) // rm.n))
        _host_parallel.run(xp, y.nbytes, tasks, _host_parallel.COPY_PARALLEL_MIN_BYTES)
        return out
    z = xp.take(y, np.maximum(src_of, 0), axis=1)
    if (src_of < 0).any():
        mask = (src_of >= 0).reshape((1, -1) + (1,) * (z.ndim - 2))
        z = z * xp.asarray(mask, dtype=z.dtype) if z.dtype != np.bool_ else z & xp.asarray(mask)
    return z


ppermute_p = Primitive(
    "ppermute", unreduced=_unreduced_rule("ppermute"),
    abstract=lambda x, **p: Aval(x.shape, x.dtype),
    vma=lambda x, *, axes, **_: x.vma | set(axes),
    stacked=_rank_major_rule(_ppermute_body, out_varying=True),
    per_device=lambda comm, bufs, *, axes, perm, groups=None: comm.permute(bufs, axes, perm),
    collective="permute", linear=True,
    transpose=lambda ct, x, *, axes, perm, **p: [
        bind(ppermute_p, ct, axes=axes, perm=tuple((d, s) for s, d in perm), **p)])
ppermute_p.jvp = ad_util.linear_jvp(ppermute_p)


def ppermute(x, axis_name, perm):
    """Send the value of device ``src`` to device ``dst`` for each ``(src, dst)`` in ``perm``;
    devices that receive nothing get zeros."""
    b, axes = _context("ppermute", axis_name)
    n = _group_size(b, axes)
    try:
        pairs = [tuple(pair) for pair in perm]
    except TypeError:
        pairs = None
    if pairs is None or any(len(p) != 2 for p in pairs):
        raise ValueError(f"ppermute in {b.context}: perm must be a list of (source, destination) "
                         f"pairs, got {perm!r}")
    odd = [i for p in pairs for i in p if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
    if odd:
        raise TypeError(f"ppermute in {b.context}: perm {perm!r} holds {odd[0]!r} of type "
                        f"{type(odd[0]).__name__}; device indices must be integers.")
    perm = tuple((int(s), int(d)) for s, d in pairs)
    for what, idx in (("source", [s for s, _ in perm]), ("destination", [d for _, d in perm])):
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ValueError(f"ppermute in {b.context}: {what} index {bad[0]} is out of range for "
                             f"axis {axes if len(axes) > 1 else axes[0]!r} of size {n}.")
        dup = sorted({i for i in idx if idx.count(i) > 1})
        if dup:
            raise ValueError(f"ppermute in {b.context}: {what} {dup[0]} appears more than once in "
                             f"perm {list(perm)} over axis {axes if len(axes) > 1 else axes[0]!r}; "
                             f"each device sends and receives at most once.")
    return _tree_map(lambda leaf: bind(ppermute_p, _vary(b, _as_traced(b, leaf), axes),
                                       axes=axes, perm=perm), x)


def _pbroadcast_body(xp, rm, y, *, source):
    return y[:, source:source + 1]


pbroadcast_p = Primitive(
    "pbroadcast", unreduced=_unreduced_rule("pbroadcast"),
    abstract=lambda x, **p: Aval(x.shape, x.dtype),
    vma=lambda x, *, axes, **_: x.vma | set(axes),
    stacked=_rank_major_rule(_pbroadcast_body, out_varying=True),
    per_device=lambda comm, bufs, *, axes, source, groups=None: comm.broadcast(bufs, axes, groups, source),
    collective="broadcast", linear=True)


def _pbroadcast_transpose(ct, x, *, axes, source, **_):
    # Every device received the source's value: the source gets the sum of all cotangents.
    total = bind(psum_p, ct, axes=axes, groups=None)
    at_source = bind(axis_index_p, axes=axes) == source
    return [_vary_like(np.where(at_source, total, np.zeros((), ct.dtype)), x.aval)]


pbroadcast_p.jvp, pbroadcast_p.transpose = ad_util.linear_jvp(pbroadcast_p), _pbroadcast_transpose


def pbroadcast(x, axis_name, source):
    """Every device of ``axis_name`` gets the value of device ``source``."""
    b, axes = _context("pbroadcast", axis_name)
    n = _group_size(b, axes)
    if isinstance(source, bool) or not isinstance(source, (int, np.integer)):
        raise TypeError(f"pbroadcast in {b.context}: source={source!r} is a "
                        f"{type(source).__name__}; give the integer index of the sending device "
                        f"along {axes if len(axes) > 1 else axes[0]!r}.")
    if not 0 <= source < n:
        raise ValueError(f"pbroadcast in {b.context}: source {source!r} is out of range for axis "
                         f"{axes if len(axes) > 1 else axes[0]!r} of size {n}.")
    return _tree_map(lambda leaf: bind(pbroadcast_p, _vary(b, _as_traced(b, leaf), axes),
                                       axes=axes, source=int(source)), x)


# ---------------------------------------------------------------------------------------------
# axis_index, axis_size, pvary
# ---------------------------------------------------------------------------------------------

def _axis_index_stacked(xp, mesh, *, axes):
    m = len(mesh.axis_sizes)
    shape = [1] * m
    idx = xp.zeros(shape, dtype=np.int32)
    for a in axes:
        p = mesh.axis_names.index(a)
        n = mesh.axis_sizes[p]
        s = [1] * m
        s[p] = n
        idx = idx * n + xp.arange(n, dtype=np.int32).reshape(s)
    return idx


axis_index_p = Primitive(
    "axis_index", abstract=lambda *, axes: Aval((), np.dtype(np.int32)),
    vma=lambda *, axes: frozenset(axes), stacked=_axis_index_stacked,
    per_device=lambda comm, *, axes: comm.axis_index(axes), collective="none")  # no operands


def axis_index(axis_name):
    """This device's index along ``axis_name`` (major-to-minor over a tuple of names)."""
    b, axes = _context("axis_index", axis_name)
    return bind(axis_index_p, axes=axes)


def axis_size(axis_name) -> int:
    """The number of devices along ``axis_name`` (a Python int)."""
    b, axes = _context("axis_size", axis_name)
    return _group_size(b, axes)


def _pvary_stacked(xp, mesh, x, *, axes):
    shape = list(x.shape)
    for a in axes:
        shape[mesh.axis_names.index(a)] = mesh.axis_size(a)
    return xp.broadcast_to(x, tuple(shape))


pvary_p = Primitive(
    "pvary", abstract=lambda x, **p: Aval(x.shape, x.dtype), unreduced=_unreduced_rule("pvary"),
    vma=lambda x, *, axes: x.vma | set(axes), stacked=_pvary_stacked,
    per_device=lambda comm, bufs, *, axes: bufs, collective="none", linear=True, free=True,
    transpose=lambda ct, x, *, axes: [bind(psum_p, ct, axes=axes, groups=None)],
    c=lambda cw, x, *, axes: [x])           # a device's block is its block: nothing moves
pvary_p.jvp = ad_util.linear_jvp(pvary_p)
hooks.pvary = pvary_p


def pvary(x, axis_name):
    """Mark ``x`` as varying over ``axis_name`` (no data moves)."""
    b, axes = _context("pvary", axis_name)

    def one(leaf):
        leaf = _as_traced(b, leaf)
        new = tuple(a for a in b.mesh.axis_names if a in axes and a not in leaf.aval.vma)
        return bind(pvary_p, leaf, axes=new) if new else leaf
    return _tree_map(one, x)


# ---------------------------------------------------------------------------------------------
# pcast: a value's state over Manual axes (varying, invariant, unreduced, reduced), JAX 0.10's
# type casts.  No data moves; each cast's transpose is the cast between the cotangents' states
# (the cotangent of an unreduced value is reduced and the reverse):
#
#   invariant -> varying   pvary               transpose: psum (varying -> invariant)
#   invariant -> reduced   preduced            transpose: psum of a pending sum
#   varying -> unreduced   vary_unreduced_cast transpose: reduced_vary_cast
#   reduced -> varying     reduced_vary_cast   transpose: vary_unreduced_cast
#
# ``psum`` of a value unreduced over its axes makes the pending sum (unreduced -> invariant).
# ---------------------------------------------------------------------------------------------

def _cast_rule(name, need, add, drop):
    """The unreduced rule of a cast: its operand must be ``need`` over ``axes`` ('varying',
    'reduced' or 'invariant'); the result is ``add`` there ('unreduced', 'reduced' or None) and
    no longer ``drop``."""
    def rule(x, *, axes):
        got = _state(name, x, axes, quiet=True)
        if got != need:
            raise ValueError(f"{name} is a {need} -> {add or 'varying'} cast, but the value {x} "
                             f"is {got} over mesh axes {list(axes)}.")
        ur = {"unreduced": x.unreduced, "reduced": x.reduced}
        if add:
            ur[add] = ur[add] | set(axes)
        if drop:
            ur[drop] = ur[drop] - set(axes)
        return ur["unreduced"], ur["reduced"]
    return rule


def _cast(name, vma, rule, stacked=lambda xp, mesh, x, *, axes: x):
    return Primitive(name, abstract=lambda x, **p: Aval(x.shape, x.dtype), vma=vma,
                     unreduced=rule, stacked=stacked, per_device=lambda comm, bufs, *, axes: bufs,
                     collective="none", linear=True, free=True)


preduced_p = _cast("preduced", lambda x, *, axes: x.vma,
                   _cast_rule("preduced", "invariant", "reduced", None))
vary_unreduced_cast_p = _cast("vary_unreduced_cast", lambda x, *, axes: x.vma - set(axes),
                              _cast_rule("vary_unreduced_cast", "varying", "unreduced", None))
reduced_vary_cast_p = _cast("reduced_vary_cast", lambda x, *, axes: x.vma | set(axes),
                            _cast_rule("reduced_vary_cast", "reduced", None, "reduced"),
                            stacked=_pvary_stacked)
preduced_p.transpose = lambda ct, x, *, axes: [bind(psum_p, ct, axes=axes, groups=None)]
vary_unreduced_cast_p.transpose = lambda ct, x, *, axes: [bind(reduced_vary_cast_p, ct, axes=axes)]
reduced_vary_cast_p.transpose = lambda ct, x, *, axes: [bind(vary_unreduced_cast_p, ct, axes=axes)]
for _p in (preduced_p, vary_unreduced_cast_p, reduced_vary_cast_p):
    _p.jvp = ad_util.linear_jvp(_p)
hooks.reduced_vary_cast = reduced_vary_cast_p
_PCASTS = {("invariant", "varying"): pvary_p, ("invariant", "reduced"): preduced_p,
           ("varying", "unreduced"): vary_unreduced_cast_p,
           ("reduced", "varying"): reduced_vary_cast_p}


def _state(op, x, axes, quiet=False) -> str:
    """The one state of value (or type) ``x`` over ``axes``: varying, unreduced, reduced or
    invariant (a pcast or psum over axes in different states is an error, as in JAX)."""
    aval = getattr(x, "aval", x)
    states = {"varying" if a in aval.vma else "unreduced" if a in aval.unreduced else
              "reduced" if a in aval.reduced else "invariant" for a in axes}
    if len(states) > 1 and not quiet:
        raise ValueError(f"{op} can only accept axis_name which corresponds to one of varying, "
                         f"unreduced, reduced or invariant state of the input: the value "
                         f"{aval} is {' and '.join(sorted(states))} over mesh axes "
                         f"{list(axes)}; {op} over each group apart.")
    return states.pop() if len(states) == 1 else "mixed"


def pcast(x, axis_name, *, to: str):
    """Change the state of ``x`` over the Manual mesh axes ``axis_name`` (JAX 0.10's
    ``lax.pcast``): invariant to ``'varying'`` (``pvary``) or ``'reduced'``, varying to
    ``'unreduced'`` (a sum still pending: ``psum`` makes it), reduced to ``'varying'``.  No data
    moves; under autodiff unreduced and reduced values have reduced and unreduced cotangents."""
    if isinstance(axis_name, (set, frozenset)):
        raise TypeError(f"pcast: axis_name={axis_name} must be a tuple or a str.")
    if not axis_name:
        return x
    if to not in ("varying", "reduced", "unreduced"):
        raise ValueError(f"pcast: unexpected to={to!r}; the allowed values are 'varying', "
                         f"'reduced' and 'unreduced'.")
    b, axes = _context("pcast", axis_name)
    axes = tuple(a for a in b.mesh.axis_names if a in axes)

    def one(leaf):
        leaf = _as_traced(b, leaf)
        if not b.check_vma:                   # unchecked bodies carry no Manual types
            return leaf
        frm = _state("pcast", leaf, axes)
        prim = _PCASTS.get((frm, to))
        if prim is None and frm == to == "varying":
            raise ValueError(f"pcast: the value ({leaf.aval}) already varies over mesh axis "
                             f"{axes[0]!r} (Unsupported pcast from=varying, to='varying'); drop "
                             f"the axis from the pcast.")
        if prim is None:
            allowed = ", ".join(f"{f} -> {t}" for f, t in _PCASTS)
            raise ValueError(f"Unsupported pcast from={frm}, to={to!r} over mesh axes "
                             f"{list(axes)} of {leaf.aval} in {b.context}; the casts are "
                             f"{allowed}.")
        return bind(prim, leaf, axes=axes)
    return _tree_map(one, x)


# Under vmap a collective acts on the per-device value with one more leading dim: the same mesh
# axes, the array dims it names shifted by one.
for _p in (_identity_p, psum_p, pmax_p, pmin_p, pvary_p, ppermute_p, pbroadcast_p):
    _p.batch = batching.elementwise_batch(_p)


def _no_batch_of_cast(prim):
    def rule(vals, dims, *, axes):
        raise NotImplementedError(
            f"vmap of {prim.name} (pcast to or from 'unreduced' / 'reduced' over mesh axes "
            f"{list(axes)}) of a batched value is not implemented, as in JAX; pcast outside the "
            f"vmap, or the value before it is batched.")
    return rule


for _p in (preduced_p, vary_unreduced_cast_p, reduced_vary_cast_p):
    _p.batch = _no_batch_of_cast(_p)
all_gather_p.batch = batching.shifted_batch(all_gather_p, batching.plus1("axis"))
psum_scatter_p.batch = batching.shifted_batch(psum_scatter_p, batching.plus1("scatter_dimension"))
all_to_all_p.batch = batching.shifted_batch(all_to_all_p, batching.plus1("split_axis", "concat_axis"))
del _p

COLLECTIVES = (psum_p, pmax_p, pmin_p, all_gather_p, psum_scatter_p, all_to_all_p, ppermute_p,
               pbroadcast_p, axis_index_p, pvary_p, preduced_p, vary_unreduced_cast_p,
               reduced_vary_cast_p)
