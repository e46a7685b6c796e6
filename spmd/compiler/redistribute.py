"""Redistribution: THE transition table between shardings, its planner and its lowering.

Each row moves one mesh axis (or the axes of one dim) from one placement to another:

=========================  ==========================  ===============================
transition                 per-device operation        collective (cost model kind)
=========================  ==========================  ===============================
S(d) -> R                  all_gather(dim d, tiled)    all_gather
R -> S(d)                  slice at axis_index         none (local)
P(sum) -> R                psum                        all_reduce
P(max|min) -> R            pmax / pmin                 all_reduce
P(sum) -> S(d)             psum_scatter(dim d, tiled)  reduce_scatter
S(i) -> S(j)               all_to_all(split j, cat i)  all_to_all
S(d) on a -> S(d) on b     ppermute over (a, b)        permute  (|a| == |b|)
R -> P(sum)                keep on index 0, zeros      none (local)
R -> P(max|min)            nothing                     none
=========================  ==========================  ===============================

``plan`` searches the cheapest sequence of rows (Dijkstra over shardings, priced by
``cost.CostModel``) and ``apply`` emits it inside a per-device trace.  A dim that does not
divide evenly is padded per shard (blocks of ``ceil(d / n)``); rows that would need a
different padding of the same dim are left to the planner's gather-then-slice route.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math

import numpy as np

from .. import _cache, prims
from ..collectives import (all_gather_p, all_to_all_p, axis_index_p, pmax_p, pmin_p,
                           ppermute_p, psum_p, psum_scatter_p)
from ..core import bind
from ..sharding import block_size
from .cost import CostModel
from .placements import Sharding

_REDUCE = {"sum": psum_p, "max": pmax_p, "min": pmin_p}
_STEP_EPS = 1e-12          # prefer fewer steps between plans of equal time


@dataclasses.dataclass(frozen=True)
class Step:
    """One row of the table applied to a value: ``kind`` over mesh ``axes``."""
    kind: str                 # psum|pmax|pmin|psum_scatter|all_gather|all_to_all|ppermute|slice|mask
    axes: tuple[str, ...]
    dim: int | None           # the dim gathered / sliced / scattered / split (all_to_all: source)
    dim2: int | None          # all_to_all: destination dim
    src: Sharding
    dst: Sharding
    collective: str | None    # cost-model kind, None for local steps
    nbytes: int               # bytes per device (the cost model's S)
    time: float

    def __str__(self):
        where = f" dim {self.dim}" if self.dim is not None else ""
        if self.dim2 is not None:
            where = f" dim {self.dim}->{self.dim2}"
        return f"{self.kind}({','.join(self.axes)}){where}: {self.src} -> {self.dst}"


@dataclasses.dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    time: float

    @property
    def collectives(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.collective)


def _n(axes, sizes):
    return math.prod(sizes[a] for a in axes)


def _even(d, axes, sizes):
    return d % _n(axes, sizes) == 0


def _moves(state: Sharding, dst: Sharding, shape, itemsize, sizes: dict, cm: CostModel):
    """Every row of the table that applies to ``state``: yields ``(Step, new_state)``."""
    dims = state.dims
    local = state.local_shape(shape, sizes)
    nbytes = math.prod(local) * itemsize
    used = state.used_axes | state.partial_axes
    free = [a for a in sizes if a not in used]

    def step(kind, axes, dim, dim2, new, collective, b):
        t = cm.time(collective, b, axes, sizes) if collective else 0.0
        return Step(kind, tuple(axes), dim, dim2, state, new, collective, int(b), t), new

    def set_dim(d, axes, base=None):
        nd = list((base or state).dims)
        nd[d] = tuple(axes)
        return (base or state).with_dims(nd)

    # P -> R (all pending axes of one op at once, or one axis)
    by_op: dict[str, list[str]] = {}
    for a, op in state.partial:
        if dst.partial_op(a) != op:
            by_op.setdefault(op, []).append(a)
    for op, axes in by_op.items():
        groups = [tuple(axes)] + ([(a,) for a in axes] if len(axes) > 1 else [])
        for g in groups:
            new = state.with_partial([p for p in state.partial if p[0] not in g])
            yield step(f"p{op}", g, None, None, new, "all_reduce", nbytes)
    # P(sum) -> S(d)
    for a in by_op.get("sum", ()):
        rest = state.with_partial([p for p in state.partial if p[0] != a])
        for d, axes in enumerate(dims):
            if axes and not _even(shape[d], axes + (a,), sizes):
                continue
            yield step("psum_scatter", (a,), d, None, set_dim(d, axes + (a,), rest), "reduce_scatter",
                       math.prod(Sharding(dims).local_shape(shape, sizes)) * itemsize
                       if axes else _padded_bytes(local, d, sizes[a], itemsize))
    for d, axes in enumerate(dims):
        if not axes:
            continue
        # S -> R: all axes of the dim, or only its minor-most one when the dim is even
        full = set_dim(d, ())
        yield step("all_gather", axes, d, None, full, "all_gather",
                   math.prod(full.local_shape(shape, sizes)) * itemsize)
        if len(axes) > 1 and _even(shape[d], axes, sizes):
            part = set_dim(d, axes[:-1])
            yield step("all_gather", axes[-1:], d, None, part, "all_gather",
                       math.prod(part.local_shape(shape, sizes)) * itemsize)
        a = axes[-1]
        # S(i) -> S(j)
        if _even(shape[d], axes, sizes):
            for j, other in enumerate(dims):
                if j != d and _even(shape[j], other + (a,), sizes):
                    new = set_dim(j, other + (a,), set_dim(d, axes[:-1]))
                    yield step("all_to_all", (a,), d, j, new, "all_to_all", nbytes)
        # S(d) over a -> S(d) over b (same size): a permutation
        for b in free:
            if sizes[b] == sizes[a]:
                yield step("ppermute", (a, b), d, None, set_dim(d, axes[:-1] + (b,)), "permute", nbytes)
    for a in free:
        # R -> S(d)
        for d, axes in enumerate(dims):
            if not axes or _even(shape[d], axes + (a,), sizes):
                yield step("slice", (a,), d, None, set_dim(d, axes + (a,)), None, 0)
        # R -> P
        op = dst.partial_op(a)
        if op is not None:
            yield step("mask", (a,), None, None, state.with_partial(state.partial + ((a, op),)), None, 0)
    # several axes onto an unsplit dim at once (the only way onto an uneven dim)
    sums = by_op.get("sum", [])
    for k in range(2, len(sizes) + 1):
        for d, axes in enumerate(dims):
            if axes:
                continue
            for group in itertools.permutations(free, k):
                yield step("slice", group, d, None, set_dim(d, group), None, 0)
            for group in itertools.permutations(sums, k):
                rest = state.with_partial([p for p in state.partial if p[0] not in group])
                yield step("psum_scatter", group, d, None, set_dim(d, group, rest), "reduce_scatter",
                           _padded_bytes(local, d, _n(group, sizes), itemsize))


def _drop_trivial(sh: Sharding, sizes) -> Sharding:
    """Mesh axes of size 1 split nothing and pend nothing."""
    return Sharding(tuple(tuple(a for a in axes if sizes[a] > 1) for axes in sh.dims),
                    tuple(p for p in sh.partial if sizes[p[0]] > 1))


def _padded_bytes(local, d, n, itemsize):
    shape = list(local)
    shape[d] = block_size(shape[d], n) * n
    return math.prod(shape) * itemsize


@_cache.memoize
def plan(shape: tuple, itemsize: int, src: Sharding, dst: Sharding, mesh_sizes: tuple,
         cm: CostModel) -> Plan:
    """The cheapest sequence of table rows turning ``src`` into ``dst``.

    ``mesh_sizes``: ``((axis_name, size), ...)``.  Dijkstra over shardings; every transition
    is priced by the cost model, local steps are free."""
    sizes = dict(mesh_sizes)
    src, dst = _drop_trivial(src, sizes), _drop_trivial(dst, sizes)
    if src == dst:
        return Plan((), 0.0)
    tie = itertools.count()
    best = {src: 0.0}
    heap = [(0.0, next(tie), src, ())]
    while heap:
        cost, _, state, steps = heapq.heappop(heap)
        if state == dst:
            return Plan(steps, sum(s.time for s in steps))
        if cost > best.get(state, math.inf):
            continue
        for s, new in _moves(state, dst, shape, itemsize, sizes, cm):
            c = cost + s.time + _STEP_EPS
            if c < best.get(new, math.inf):
                best[new] = c
                heapq.heappush(heap, (c, next(tie), new, steps + (s,)))
    raise AssertionError(f"no redistribution from {src} to {dst} for shape {shape}")


# ---------------------------------------------------------------------------------------------
# lowering the steps inside a per-device trace
# ---------------------------------------------------------------------------------------------

def axis_index(axes):
    return bind(axis_index_p, axes=tuple(axes))


def _pad_to(x, dim, size):
    if x.shape[dim] == size:
        return x
    # concatenate zeros rather than prims.pad: NumPy's pad has no cast for bfloat16
    shape = tuple(size - n if i == dim else n for i, n in enumerate(x.shape))
    zeros = bind(prims.broadcast_in_dim_p, np.zeros((), x.dtype), shape=shape, dims=())
    return bind(prims.concatenate_p, x, zeros, axis=dim)


def _trim(x, dim, size):
    if x.shape[dim] == size:
        return x
    index = tuple((0, size if i == dim else n, 1) for i, n in enumerate(x.shape))
    return bind(prims.slice_p, x, index=index)


def slice_block(x, dim, axes, blk):
    """Block ``axis_index(axes)`` of size ``blk`` along ``dim`` (the R -> S row)."""
    start = axis_index(axes) * np.int32(blk)
    starts = [np.int32(0)] * x.ndim
    starts[dim] = start
    sizes = tuple(blk if i == dim else n for i, n in enumerate(x.shape))
    return bind(prims.dynamic_slice_p, x, *starts, sizes=sizes)


def apply(x, p: Plan, shape, sizes: dict):
    """Emit the steps of ``p`` on the per-device value ``x`` (inside a shard_map trace)."""
    for s in p.steps:
        x = _EMIT[s.kind](x, s, shape, sizes)
    return x


def _emit_reduce(x, s, shape, sizes):
    return bind(_REDUCE[s.kind[1:]], x, axes=s.axes, groups=None)


def _emit_all_gather(x, s, shape, sizes):
    n = _n(s.axes, sizes)
    y = bind(all_gather_p, x, axes=s.axes, axis=s.dim, tiled=True, groups=None, to="invariant", size=n)
    return _trim(y, s.dim, s.dst.local_shape(shape, sizes)[s.dim])


def _emit_slice(x, s, shape, sizes):
    blk = s.dst.local_shape(shape, sizes)[s.dim]
    x = _pad_to(x, s.dim, blk * _n(s.axes, sizes))
    return slice_block(x, s.dim, s.axes, blk)


def _emit_psum_scatter(x, s, shape, sizes):
    n = _n(s.axes, sizes)
    x = _pad_to(x, s.dim, s.dst.local_shape(shape, sizes)[s.dim] * n)
    return bind(psum_scatter_p, x, axes=s.axes, scatter_dimension=s.dim, tiled=True, groups=None, size=n)


def _emit_all_to_all(x, s, shape, sizes):
    n = sizes[s.axes[0]]
    return bind(all_to_all_p, x, axes=s.axes, split_axis=s.dim2, concat_axis=s.dim, tiled=True,
                groups=None, size=n)


def _emit_ppermute(x, s, shape, sizes):
    a, b = s.axes
    n = sizes[a]
    perm = tuple((q * n + p, p * n + q) for p in range(n) for q in range(n))
    return bind(ppermute_p, x, axes=(a, b), perm=perm)


def _emit_mask(x, s, shape, sizes):
    if s.dst.partial_op(s.axes[0]) != "sum":
        return x
    keep = axis_index(s.axes) == np.int32(0)
    return np.where(keep, x, np.zeros((), x.dtype))


_EMIT = {"psum": _emit_reduce, "pmax": _emit_reduce, "pmin": _emit_reduce,
         "all_gather": _emit_all_gather, "slice": _emit_slice, "psum_scatter": _emit_psum_scatter,
         "all_to_all": _emit_all_to_all, "ppermute": _emit_ppermute, "mask": _emit_mask}
