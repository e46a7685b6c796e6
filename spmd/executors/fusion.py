"""Fusions of the stacked executor on the host: a few equations run as one array operation
where the simulated devices sharing one memory makes that cheaper than running them in turn.

* ``psum(dot_general(x, y))``: the sum over the devices of their products is one product
  whose contraction also runs over the devices -- a data-parallel weight gradient becomes
  ``(data * batch, in)^T @ (data * batch, out)``: no per-device partial products are written
  and summed afterwards, and the longer contraction runs BLAS closer to its peak.
* chains of elementwise operations on values of one shape (``tanh(x @ w + b)`` and its
  derivative, ``p - lr * g``) run block by block: each block goes through the whole chain
  while it is in cache, and only the values used outside the chain are written out (what XLA's
  loop fusion does).

The fused forms compute the same values as the equations in turn, up to the order in which
floating-point sums are added.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .._shapes import broadcast_shapes

from .. import _host_parallel
from ..collectives import psum_p
from . import native


def dot_then_psum(xp, mesh, dot_impl, x, y, *, contract, batch, axes):
    """``psum(dot_general(x, y), axes)`` of stacked ``x``, ``y`` as one contraction.

    Over a mesh dim of ``axes`` along which both operands vary, the dim joins the first
    contraction dim of both; where one operand varies, it is summed first (the product is
    bilinear); where neither does, the product is the same on every device and is scaled by
    the axis size (what the psum of an invariant value gives).  The result has size 1 on the
    mesh dims of ``axes``, as a psum's result."""
    k = len(mesh.axis_sizes)
    scale, both = 1, []
    for p in sorted(mesh.axis_names.index(a) for a in axes):
        vx, vy = x.shape[p] > 1, y.shape[p] > 1
        if vx and vy:
            both.append(p)
        elif vx:
            x = x.sum(axis=p, keepdims=True, dtype=x.dtype)
        elif vy:
            y = y.sum(axis=p, keepdims=True, dtype=y.dtype)
        else:
            scale *= mesh.axis_sizes[p]
    if both:
        x = _into_contraction(xp, x, k, both, contract[0][0])
        y = _into_contraction(xp, y, k, both, contract[1][0])
    out = dot_impl(xp, k, x, y, contract=contract, batch=batch)
    return out * out.dtype.type(scale) if scale != 1 else out


def _into_contraction(xp, x, k, mesh_dims, c):
    """Stacked ``x`` with its ``mesh_dims`` (now size 1) merged in front of local dim ``c``."""
    keep = [d for d in range(k) if d not in mesh_dims]
    local = x.shape[k:]
    t = xp.transpose(x, keep + [k + j for j in range(c)] + list(mesh_dims) + list(range(k + c, x.ndim)))
    merged = math.prod(x.shape[d] for d in mesh_dims) * local[c]
    shape = tuple(1 if d in mesh_dims else x.shape[d] for d in range(k)) + local[:c] + (merged,) + local[c + 1:]
    return _host_parallel.reshape(xp, t, shape)


@dataclasses.dataclass
class Fused:
    """Equations ``eqns`` that run as one step: it reads ``inputs`` and writes ``outputs``."""
    kind: str
    inputs: list
    outputs: list
    params: dict
    eqns: tuple

    def make(self, xp, mesh):
        if self.kind == "dot_then_psum":
            dot = self.params["dot"]
            return functools.partial(dot_then_psum, xp, mesh, dot.prim.rule("impl"), **dot.params,
                                     axes=self.params["axes"])
        k = len(mesh.axis_sizes) if mesh is not None else 0
        return ElementwiseChain(xp, self.params["members"], self.params["results"], len(self.inputs),
                                native.chain(self.eqns, self.inputs, self.outputs, k)
                                if xp is np else None)


# A chain whose result is smaller than this runs its members in turn: each is one quick NumPy
# call on arrays that stay in cache, and the block path's bookkeeping (tens of microseconds)
# costs more than the temporaries it saves (an Adam update of a bias or a small weight).
IN_TURN_MAX_BYTES = 128 << 10
# A chain that runs as C (``native.Chain``) costs a few microseconds to call: it pays from
# smaller results on.
NATIVE_IN_TURN_MAX_BYTES = 32 << 10


class ElementwiseChain:
    """Runs ``members`` (``(fn, operand refs)``; a ref below the number of inputs is an input,
    above it the result of an earlier member) block by block, returning the ``results`` refs.

    In a block, a member that is a result writes straight into the result's block, and the
    others into this thread's scratch blocks (reused once their value is dead), so a chain
    allocates no temporary of the whole size and copies nothing."""

    def __init__(self, xp, members, results, n_in, native=None):
        self.xp, self.members, self.results, self.n_in = xp, members, results, n_in
        self.native = native            # the chain as C loops (``native.Chain``), or None
        self.ops = _registers(members, results, n_in)
        self.layouts: dict = {}         # (shape, dtype) of the inputs -> (blocked?, dtypes, shape)

    def layout(self, vals):
        key = tuple((np.shape(v), getattr(v, "dtype", type(v))) for v in vals)
        hit = self.layouts.get(key)
        if hit is None:
            shapes = [np.shape(v) for v in vals]
            for fn, refs in self.members:
                shapes.append(broadcast_shapes(*[shapes[r] for r in refs]))
            full = broadcast_shapes(*shapes[:self.n_in])
            probe = _in_turn(self.xp, self.members, self.results, _host_parallel._one_element(vals))
            dtypes = [np.result_type(p) for p in (probe if len(self.results) > 1 else (probe,))]
            # blocks only when every member has the one shape (they line up) and one dtype
            # (scratch blocks are shared between them)
            limit = IN_TURN_MAX_BYTES if self.native is None else NATIVE_IN_TURN_MAX_BYTES
            small = math.prod(full) * dtypes[0].itemsize < min(
                limit, _host_parallel.ELEMENTWISE_PARALLEL_MIN_BYTES)
            blocked = (all(sh == full for sh in shapes[self.n_in:]) and len(set(dtypes)) == 1
                       and not small)
            hit = self.layouts[key] = (blocked, dtypes, full)
        return hit

    def __call__(self, *vals):
        xp, n_in = self.xp, self.n_in
        blocked, dtypes, full = self.layout(vals)
        if not blocked:
            return _in_turn(xp, self.members, self.results, vals)
        if self.native is not None:
            outs = self.native(full, vals)
            if outs is not None:
                return tuple(outs) if len(self.results) > 1 else outs[0]
        ops = self.ops

        def fill(xp, args, outs):
            env = list(args) + [None] * len(ops)
            for i, (fn, refs, dest, slot, into) in enumerate(ops):
                a = [env[r] for r in refs]
                if dest is not None:                    # see blockwise: strided blocks copy
                    o = outs[dest]
                    fn(xp, *a, out=o) if into and o.flags.c_contiguous else xp.copyto(o, fn(xp, *a))
                    env[n_in + i] = o
                elif into and xp is np:
                    env[n_in + i] = fn(xp, *a, out=_host_parallel.scratch(slot, outs[0].shape, dtypes[0]))
                else:
                    env[n_in + i] = fn(xp, *a)
        outs = _host_parallel.blockwise(xp, fill, vals, dtypes)
        return tuple(outs) if len(self.results) > 1 else outs[0]


def _in_turn(xp, members, results, vals):
    env = list(vals)
    for fn, refs in members:
        env.append(fn(xp, *[env[r] for r in refs]))
    return tuple(env[r] for r in results) if len(results) > 1 else env[results[0]]


def _registers(members, results, n_in):
    """``(fn, refs, result index or None, scratch slot, writes into an array?)`` per member: a
    member that is not a result gets a scratch slot that no live value holds (freed after its
    value's last use)."""
    last = {}
    for i, (fn, refs) in enumerate(members):
        for r in refs:
            last[r] = i
    holder, free, ops, n_slots = {}, [], [], 0
    for i, (fn, refs) in enumerate(members):
        for r in set(refs):                         # operands dead after this member: free
            if last[r] == i and r in holder:
                free.append(holder.pop(r))
        ref, into = n_in + i, getattr(fn, "writes_into", False)
        if ref in results:
            ops.append((fn, refs, results.index(ref), None, into))
            continue
        if free:
            slot = free.pop()
        else:
            slot, n_slots = n_slots, n_slots + 1
        holder[ref] = slot
        ops.append((fn, refs, None, slot, into))
    return ops


def plan_fusions(program, k: int, xp) -> dict:
    """``{id(eqn): "skip" | Fused}`` for the equations of ``program`` (a shard_map body with
    ``k`` mesh axes, or with ``k = 0`` a program's top level) that run fused: a ``Fused`` step runs where its last equation was, and
    the other equations it covers are skipped."""
    if xp is not np:
        return {}
    uses: dict[int, int] = {}
    for a in [a for e in program.eqns for a in e.inputs] + list(program.out_vars):
        uses[id(a)] = uses.get(id(a), 0) + 1
    producer = {id(v): e for e in program.eqns for v in e.outputs}
    plan = {}
    for e in program.eqns if k else ():            # psums are inside shard_map only
        if e.prim is not psum_p or e.params.get("groups") is not None:
            continue
        d = producer.get(id(e.inputs[0]))
        if d is not None and d.prim.category == "contraction" and uses[id(e.inputs[0])] == 1 \
                and d.params["contract"][0]:
            plan[id(d)] = "skip"
            plan[id(e)] = Fused("dot_then_psum", list(d.inputs), list(e.outputs),
                                {"dot": d, "axes": e.params["axes"]}, (d, e))
    for group in _elementwise_groups(program, plan):
        _plan_group(group, uses, plan)
    return plan


def _elementwise_groups(program, taken):
    """Groups of elementwise equations with one output type, joined by what they read from
    each other (independent chains that meet, as ``a * m + b * g`` and the three lines of an
    Adam update of one parameter, become one group), members in program order.  A group runs
    where its last equation was, so once an equation outside it reads one of its values the
    group takes no more members (it would run after that reader)."""
    group_of: dict[int, int] = {}        # id(var) -> the group (index in `groups`) that makes it
    groups: list = []                    # list of members, or None once merged into another
    closed: set[int] = set()
    for e in program.eqns:
        fn = None if id(e) in taken else e.prim.elementwise
        readers = {group_of[id(a)] for a in e.inputs if id(a) in group_of}
        out = e.outputs[0].aval if fn is not None and e.outputs else None
        key = (out.shape, out.vma, out.dtype) if out is not None else None
        joins = [g for g in readers if g not in closed and groups[g][1] == key]
        closed.update(readers.difference(joins))
        if fn is not None:
            g = min(joins) if joins else len(groups)
            if not joins:
                groups.append(([], key))
            for other in joins:                  # the chains meet here: one group
                if other != g:
                    groups[g][0].extend(groups[other][0])
                    for m in groups[other][0]:
                        group_of[id(m.outputs[0])] = g
                    groups[other] = None
                    closed.add(other)
            groups[g][0].append(e)
            group_of[id(e.outputs[0])] = g
    order = {id(e): i for i, e in enumerate(program.eqns)}
    return [sorted(g[0], key=lambda e: order[id(e)]) for g in groups
            if g is not None and len(g[0]) > 1]


def _plan_group(group, uses, plan):
    refs: dict[int, int] = {}
    inputs, members = [], []
    for e in group:                             # the group's inputs first, in order of use
        for a in e.inputs:
            if id(a) not in refs and not any(a is v for g in group for v in g.outputs):
                refs[id(a)] = len(inputs)
                inputs.append(a)
    inside = {}
    for e in group:
        members.append((e.prim.elementwise, tuple(refs[id(a)] for a in e.inputs)))
        refs[id(e.outputs[0])] = len(inputs) + len(members) - 1
        for a in e.inputs:
            inside[id(a)] = inside.get(id(a), 0) + 1
    outputs = [e.outputs[0] for e in group if uses.get(id(e.outputs[0]), 0) > inside.get(id(e.outputs[0]), 0)]
    for e in group[:-1] if outputs else group:          # nothing used: nothing to run
        plan[id(e)] = "skip"
    if not outputs:
        return
    plan[id(group[-1])] = Fused("elementwise", inputs, outputs,
                                {"members": tuple(members), "results": tuple(refs[id(v)] for v in outputs)},
                                tuple(group))
