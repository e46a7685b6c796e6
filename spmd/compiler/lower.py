"""Lowering: a global Program with chosen strategies -> a manual Program.

The result is ``{ lambda globals ; outs = shard_map[body, all mesh axes] globals }`` whose body
works on per-device blocks with explicit collectives from ``spmd.collectives`` -- the form
the existing executors run.  Every redistribution the body needs is planned by
``redistribute.plan`` and recorded (for ``explain``).

Uneven dims: blocks are padded to ``ceil(d / n)``; where padding could leak into a result
(a reduction or contraction over the dim) the block is masked first with
``iota + axis_index * block < d``.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import prims
from ..collectives import psum_p, psum_scatter_p
from ..core import (Aval, Eqn, Literal, Params, Program, Var, _fmt_param, _ProgramPrinter,
                    attributed, bind, current_builder, trace)
from ..shard_map import shard_map_p
from ..transforms.ad import dce
from .cost import CostModel
from .placements import Sharding
from .redistribute import Step, apply, axis_index, plan
from .rules import Strategy, category, dim_maps

_FILL = {"sum": 0, "max": -np.inf, "min": np.inf, "prod": 1, "and": True, "or": False}


@dataclasses.dataclass
class Inserted:
    """A collective the compiler inserted: where, why, how much."""
    eqn_index: int | None      # None: program output
    _where: object             # the equation, printed on demand: str or () -> str
    _why: object               # str or () -> str
    step: Step
    source: object = None      # the equation's user line (core.Eqn.source)

    @property
    def where(self) -> str:
        return self._where if isinstance(self._where, str) else self._where()

    @property
    def why(self) -> str:
        return self._why if isinstance(self._why, str) else self._why()

    @property
    def nbytes(self):
        return self.step.nbytes

    @property
    def time(self):
        return self.step.time


def _fill(dtype, op):
    v = _FILL[op]
    if np.dtype(dtype).kind in "iub" and np.isinf(v):
        info = np.iinfo(dtype) if np.dtype(dtype).kind != "b" else None
        v = (info.min if v < 0 else info.max) if info else (op == "min")
    return np.asarray(v, dtype)


def mask_padding(x, sh: Sharding, shape, dims, sizes, op):
    """Set the padding of uneven sharded ``dims`` of block ``x`` to the identity of ``op``."""
    for d in dims:
        axes = sh.dims[d]
        n = int(np.prod([sizes[a] for a in axes])) if axes else 1
        if not axes or shape[d] % n == 0:
            continue
        blk = x.shape[d]
        glob = axis_index(axes) * np.int32(blk) + _iota(blk)
        valid = glob < np.int32(shape[d])
        valid = valid.reshape(tuple(blk if i == d else 1 for i in range(x.ndim)))
        x = np.where(valid, x, _fill(x.dtype, op))
    return x


def _iota(n):
    return bind(prims.iota_p, dtype=np.dtype(np.int32), shape=(n,), dimension=0)


def lower_equation(e, s, args, sizes):
    """Emit the per-device form of global equation ``e`` under strategy ``s``."""
    cat = category(e.prim)
    p = dict(e.params)
    ins = [a.aval for a in e.inputs]
    out = e.outputs[0].aval if e.outputs else None
    local_out = s.outs[0].local_shape(out.shape, sizes) if out is not None else None
    local_in = [r.local_shape(a.shape, sizes) for r, a in zip(s.ins, ins)]
    if cat == "constraint":
        return [args[0]]
    if s.variant == "inline":
        return _inline(e.prim.manual(e.params)[3], args)
    if cat in ("reshape", "broadcast"):
        p["shape"] = local_out
    elif cat == "slice":
        p["index"] = tuple((0, li, 1) if sl == (0, n, 1) else sl
                           for sl, n, li in zip(p["index"], ins[0].shape, local_in[0]))
    elif cat == "window":
        p["sizes"] = tuple(li if sz == n else sz for sz, n, li in zip(p["sizes"], ins[0].shape, local_in[0]))
    elif cat == "reduction":
        args[0] = mask_padding(args[0], s.ins[0], ins[0].shape, p["axes"], sizes, e.prim.monoid)
    elif cat == "contraction":
        (xc, yc), _ = p["contract"], p["batch"]
        args[0] = mask_padding(args[0], s.ins[0], ins[0].shape, xc, sizes, "sum")
        args[1] = mask_padding(args[1], s.ins[1], ins[1].shape, yc, sizes, "sum")
    if s.variant == "masked" and cat == "gather":
        return [_masked_take(args, s, ins, sizes, p["axis"])]
    if s.variant == "masked" and cat == "scatter":
        return [_masked_scatter_add(args, s, ins, sizes, p["axis"])]
    out_vals = bind(e.prim, *args, **p)
    return out_vals if e.prim.multiple_results else [out_vals]


def _inline(body: Program, args):
    """The equations of a per-device region's body over the same mesh, on our blocks."""
    env = {id(v): a for v, a in zip(body.in_vars, args)}
    read = lambda a: a.val if isinstance(a, Literal) else env[id(a)]
    for e in body.eqns:
        outs = bind(e.prim, *[read(a) for a in e.inputs], **e.params)
        for v, o in zip(e.outputs, outs if e.prim.multiple_results else [outs]):
            env[id(v)] = o
    return [read(a) for a in body.out_vars]


def _local_indices(idx, axes, blk, n_global, sizes):
    idx = np.where(idx < 0, idx + n_global, idx)
    local = idx - (axis_index(axes) * np.int32(blk)).astype(idx.dtype)
    inside = (local >= 0) & (local < blk)
    return np.where(inside, local, np.zeros((), local.dtype)), inside


def _masked_take(args, s, ins, sizes, axis):
    """Lookup in a table whose ``axis`` is sharded: each device answers the indices it owns
    and zeros elsewhere -- a pending sum over the table's axes (vocab-parallel embedding)."""
    x, idx = args
    axes = s.ins[0].dims[axis]
    blk = x.shape[axis]
    local, inside = _local_indices(idx, axes, blk, ins[0].shape[axis], sizes)
    y = bind(prims.take_p, x, local, axis=axis)
    ni = idx.ndim
    shape = tuple(idx.shape[d - axis] if axis <= d < axis + ni else 1 for d in range(y.ndim))
    return np.where(inside.reshape(shape), y, np.zeros((), y.dtype))


def _masked_scatter_add(args, s, ins, sizes, axis):
    """Scatter-add into a target whose ``axis`` is sharded: updates for other rows are dropped."""
    x, idx, upd = args
    axes = s.ins[0].dims[axis]
    blk = x.shape[axis]
    local, inside = _local_indices(idx, axes, blk, ins[0].shape[axis], sizes)
    ni = idx.ndim
    shape = tuple(idx.shape[d - axis] if axis <= d < axis + ni else 1 for d in range(upd.ndim))
    upd = np.where(inside.reshape(shape), upd, np.zeros((), upd.dtype))
    return bind(prims.scatter_add_p, x, local, upd, axis=axis)


def _spec_aval(aval: Aval, sh: Sharding, sizes) -> Aval:
    return Aval(sh.local_shape(aval.shape, sizes), aval.dtype, frozenset(sh.used_axes))


def lower(program: Program, prop, mesh, cm: CostModel, name: str, in_names=None, out_names=None):
    """The manual Program and the list of inserted collectives.  ``in_names`` / ``out_names``:
    how messages name the program's inputs and outputs (their pytree paths: ``params['w1']``,
    ``output[1]``); by default ``output 3`` and letters."""
    in_names = dict(zip(map(id, program.in_vars), in_names or ()))
    out_name = lambda k: out_names[k] if out_names else f"output {k}"
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    mesh_sizes = tuple(sizes.items())
    inserted: list[Inserted] = []
    texts: list[str] = []

    def eqn_text(i):
        if not texts:        # name the values in program order, once, when first asked
            printer = _ProgramPrinter()
            for v in program.in_vars:
                printer.name(v)
            printer.names.update(in_names)       # arguments by their paths
            texts.extend(_eqn_text(printer, e) for e in program.eqns)
        return texts[i]

    made: dict[tuple, object] = {}       # (id(var), sharding) -> block: redistribute once
    psum_records: dict[int, Inserted] = {}   # id(psum equation) -> its record
    broadcasts: dict[int, tuple] = {}        # id(var) -> (equation, strategy, operand blocks)

    def reshard(x, a, src, dst, eqn_index, where, why):
        if src == dst:
            return x
        if isinstance(a, Var) and (id(a), dst) in made:
            return made[(id(a), dst)]
        if isinstance(a, Var) and id(a) in broadcasts and _splits_new_dims(
                *broadcasts[id(a)][:2], dst, sizes):
            e, s, args = broadcasts[id(a)]
            made[(id(a), dst)] = y = lower_equation(e, Strategy(s.ins, (dst,)), list(args),
                                                    sizes)[0]
            return y
        pl = plan(tuple(a.aval.shape), a.aval.dtype.itemsize, src, dst, mesh_sizes, cm)
        records = []
        for st in pl.collectives:
            source = program.eqns[eqn_index].source if eqn_index is not None else None
            records.append(Inserted(eqn_index, where, (lambda st: lambda: why(st))(st), st, source))
            inserted.append(records[-1])
        builder = current_builder()
        start = len(builder.eqns)
        y = apply(x, pl, a.aval.shape, sizes)
        emitted = [e for e in builder.eqns[start:] if e.prim is psum_p]
        for e, r in zip(emitted, [r for r in records if r.step.kind == "psum"]):
            psum_records[id(e)] = r
        if isinstance(a, Var):
            made[(id(a), dst)] = y
        return y

    def body(*blocks):
        env = {id(v): (b, sh) for v, b, sh in zip(program.in_vars, blocks, prop.in_shardings)}

        def read(a):
            if isinstance(a, Literal):
                return a.val, Sharding.replicated(len(a.aval.shape))
            return env[id(a)]

        # the per-device equations keep the user's lines of the global ones (and binding them
        # looks at no stack)
        for i, (e, s) in enumerate(zip(attributed(program.eqns), prop.strategies)):
            where = (lambda i: lambda: eqn_text(i))(i)
            args = []
            for j, (a, req) in enumerate(zip(e.inputs, s.ins)):
                x, cur = read(a)
                why = _why(e, j, cur, req, in_names.get(id(a)))
                args.append(reshard(x, a, cur, req, i, where, why))
            outs = lower_equation(e, s, args, sizes)
            for v, o, sh in zip(e.outputs, outs, s.outs):
                env[id(v)] = (o, sh)
            if category(e.prim) == "broadcast":
                broadcasts[id(e.outputs[0])] = (e, s, args)
        results = [None] * len(program.out_vars)
        batches: dict[tuple, list] = {}
        for k, (a, want) in enumerate(zip(program.out_vars, prop.out_shardings)):
            x, cur = read(a)
            why = (lambda cur, want, k: lambda st: (
                f"{out_name(k)} is {cur} but must be {want}"
                + (" (out_shardings)" if cur.partial == () else
                   f"; its pending {_pending(cur)} is reduced")))(cur, want, k)
            key = _combinable(a, cur, want, sizes, mesh_sizes, cm)
            if key is not None:
                batches.setdefault(key, []).append((k, x, a, cur, want, why))
            else:
                results[k] = reshard(x, a, cur, want, None, out_name(k), why)
        for key, members in batches.items():
            if len(members) == 1:
                k, x, a, cur, want, why = members[0]
                results[k] = reshard(x, a, cur, want, None, out_name(k), why)
                continue
            outs, step = _combined(key, members, sizes, cm)
            ks = ", ".join(out_name(m[0]) for m in members)
            inserted.append(Inserted(None, ks, f"the pending sums of {ks} over the same "
                                     f"axes are reduced together (one {step.kind} of their concatenation)", step))
            for (k, *_), o in zip(members, outs):
                results[k] = o
        return results

    in_avals = [_spec_aval(v.aval, sh, sizes) for v, sh in zip(program.in_vars, prop.in_shardings)]
    # No implicit pvary: the body is not differentiated again, and letting the executors
    # broadcast invariant operands (size-1 mesh dims) is cheaper than materializing them.
    body_prog, captured = trace(body, in_avals, mesh=mesh, manual_axes=mesh.axis_names,
                                check_vma=False, context=f"jit({name}) per-device body")
    assert not captured
    body_prog = dce(body_prog)     # whole broadcasts that every reader made again at its shape
    body_prog = reduce_before_scaling(body_prog, psum_records)
    body_prog = reduce_once(body_prog, psum_records, inserted)
    body_prog = combine_psums(body_prog, psum_records, inserted, sizes, cm)
    in_specs = tuple(sh.spec for sh in prop.in_shardings)
    out_specs = tuple(sh.spec for sh in prop.out_shardings)
    params = Params(body=body_prog, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                    manual_axes=tuple(mesh.axis_names), check_vma=True, name=name)
    glob_in = [Var(Aval(tuple(b.shape[d] * n for d, n in enumerate(sh.parts(sizes))), b.dtype))
               for b, sh in zip(in_avals, prop.in_shardings)]
    out_avals = shard_map_p.abstract_eval(*[v.aval for v in glob_in], **params)
    glob_out = [Var(a) for a in out_avals]
    manual = Program(glob_in, [Eqn(shard_map_p, list(glob_in), params, glob_out)], glob_out)
    return manual, inserted


def _splits_new_dims(e, s: Strategy, dst: Sharding, sizes) -> bool:
    """Whether broadcast ``e``'s result, made under ``s``, is wanted as ``dst`` that only
    splits (evenly) dims the broadcast creates: then each device broadcasts its operand block
    straight to its own block, instead of broadcasting the whole array and slicing it (an
    ``axis_index``, a product and a ``dynamic_slice`` per reader: a position embedding or a
    layer norm's gain added to a batch-split activation)."""
    have, shape = s.outs[0], e.outputs[0].aval.shape
    made = {d for d in dim_maps(e)[0] if d is not None}
    return (not have.partial and not dst.partial and dst.is_even(shape, sizes)
            and all(w == h or (not h and d not in made)
                    for d, (w, h) in enumerate(zip(dst.dims, have.dims))))


def _scaled_operands(f) -> tuple:
    """The operands that elementwise equation ``f`` scales: linear in each one alone."""
    if category(f.prim) != "elementwise":
        return ()
    alone = f.prim.linear_operands(1, f.params) if len(f.inputs) == 1 else ()
    return tuple(f.prim.multilinear) + alone


def reduce_before_scaling(body: Program, records: dict) -> Program:
    """``psum(c * x)`` -> ``c * psum(x)`` for ``c`` the same on every device of the sum (also
    ``x / c`` and ``-x``), up a chain of such scalings.  A pending sum stays pending through
    linear operations, so the reduction lands after the scaling that a training step applies to
    its gradients; moved before it, the scaling works on the reduced value: the same work per
    device, and on the simulated mesh (which stores an invariant value once) a fraction."""
    eqns = body.eqns
    producer = {id(v): i for i, e in enumerate(eqns) for v in e.outputs}
    uses: dict[int, int] = {}
    for a in [a for e in eqns for a in e.inputs] + list(body.out_vars):
        if isinstance(a, Var):
            uses[id(a)] = uses.get(id(a), 0) + 1

    def scaling_under(e):
        """The scaling equation that alone feeds psum ``e`` and commutes with it, or None."""
        x = e.inputs[0]
        if not isinstance(x, Var) or uses[id(x)] != 1 or id(x) not in producer:
            return None
        f = eqns[producer[id(x)]]
        axes = set(e.params["axes"])
        varying = [k for k, a in enumerate(f.inputs) if axes & a.aval.vma]
        if (len(varying) != 1 or varying[0] not in _scaled_operands(f)
                or not axes <= f.inputs[varying[0]].aval.vma
                or f.inputs[varying[0]].aval.dtype != f.outputs[0].aval.dtype):
            return None
        return f, varying[0]

    dropped, replaced = set(), {}
    for i, e in enumerate(eqns):
        if e.prim is not psum_p or e.params.get("groups") is not None or id(e) not in records:
            continue
        chain, top = [], e
        while (found := scaling_under(top)) is not None:
            f, k = found
            chain.append(found)
            top = Eqn(psum_p, [f.inputs[k]], e.params, [None])
        if not chain:
            continue
        u = chain[-1][0].inputs[chain[-1][1]]
        red = Var(Aval(u.aval.shape, u.aval.dtype, u.aval.vma - set(e.params["axes"])))
        new = [Eqn(psum_p, [u], e.params, [red])]
        records[id(new[0])] = records.pop(id(e))
        for n, (f, k) in enumerate(reversed(chain)):
            fa = f.outputs[0].aval
            out = e.outputs[0] if n == len(chain) - 1 else \
                Var(Aval(fa.shape, fa.dtype, fa.vma - set(e.params["axes"])))
            new.append(Eqn(f.prim, [red if j == k else a for j, a in enumerate(f.inputs)], f.params, [out]))
            red = out
            dropped.add(producer[id(f.outputs[0])])
        replaced[i] = new
    if not replaced:
        return body
    out = []
    for i, e in enumerate(eqns):
        if i not in dropped:
            out += replaced.get(i, [e])
    return Program(body.in_vars, out, body.out_vars)


def reduce_once(body: Program, records: dict, inserted: list) -> Program:
    """Inserted psums of one value over the same axes become one.  A gradient pending a sum
    and read by several updates (``0.9 * m + 0.1 * g`` and ``0.01 * g * g`` in Adam) is
    reduced for each of them, and once the reductions have moved before the scalings
    (:func:`reduce_before_scaling`) they reduce the same value: the later ones read the
    first's result instead."""
    first: dict[tuple, Var] = {}
    alias: dict[int, Var] = {}           # id(output of a dropped psum) -> the first's output
    out = []
    for e in body.eqns:
        if alias and any(isinstance(a, Var) and id(a) in alias for a in e.inputs):
            e = dataclasses.replace(e, inputs=[alias.get(id(a), a) if isinstance(a, Var) else a
                                               for a in e.inputs])
        if e.prim is psum_p and id(e) in records and isinstance(e.inputs[0], Var):
            key = (id(e.inputs[0]), e.params)
            if key in first:
                alias[id(e.outputs[0])] = first[key]
                dropped = records.pop(id(e))
                inserted[:] = [r for r in inserted if r is not dropped]
                continue
            first[key] = e.outputs[0]
        out.append(e)
    if not alias:
        return body
    return Program(body.in_vars, out, [alias.get(id(a), a) if isinstance(a, Var) else a
                                       for a in body.out_vars])


def combine_psums(body: Program, records: dict, inserted: list, sizes, cm) -> Program:
    """Merge inserted psums over the same axes that do not depend on each other into one psum
    of their concatenated buffers (XLA's all-reduce combiner): one collective call instead of
    several, for the buffers small enough that the copy costs less than a call
    (``CostModel.worth_combining``).  The merged psum runs where the last of them ran; what used the earlier ones
    moves after it.

    One batch is merged at a time, and the next is found on the program that merge left:
    merging reorders equations and makes every user of the merged psum depend on all its
    operands, so batches planned together (by index, on the old dependencies) could point at
    moved equations or close a cycle between two batches."""
    eqns = body.eqns
    while (found := _next_batch(eqns, records, cm)) is not None:
        eqns = _merge(eqns, *found, records, inserted, sizes, cm)
    return body if eqns is body.eqns else Program(body.in_vars, eqns, body.out_vars)


def _next_batch(eqns, records, cm):
    """(indices, their dependents) of the first inserted psums over the same axes, dtype and
    vma that do not depend on each other and are worth combining; None when there are none."""
    producer = {id(v): i for i, e in enumerate(eqns) for v in e.outputs}
    users: dict[int, list] = {}
    for i, e in enumerate(eqns):
        for a in e.inputs:
            if isinstance(a, Var) and id(a) in producer:
                users.setdefault(producer[id(a)], []).append(i)

    def dependents(i):
        seen, todo = set(), [i]
        while todo:
            for j in users.get(todo.pop(), ()):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    groups: dict[tuple, list] = {}
    for i, e in enumerate(eqns):
        if e.prim is psum_p and id(e) in records and e.params.get("groups") is None:
            x = e.inputs[0].aval
            if not cm.worth_combining(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize, e.params["axes"]):
                continue
            groups.setdefault((e.params["axes"], np.dtype(x.dtype), x.vma), []).append(i)
    for idx in groups.values():
        batch, after = [], set()
        for i in idx:
            if batch and i not in after:
                batch.append(i)
                after |= dependents(i)
            elif len(batch) > 1:
                return batch, after
            else:
                batch, after = [i], dependents(i)
        if len(batch) > 1:
            return batch, after
    return None


def _merge(eqns, batch, after, records, inserted, sizes, cm):
    members = [eqns[i] for i in batch]
    axes = members[0].params["axes"]
    x0 = members[0].inputs[0].aval
    flat, new = [], []
    for e in members:
        v = Var(Aval((int(np.prod(e.inputs[0].aval.shape)),), x0.dtype, x0.vma))
        new.append(Eqn(prims.reshape_p, [e.inputs[0]], Params(shape=v.aval.shape), [v]))
        flat.append(v)
    total = sum(v.aval.shape[0] for v in flat)
    cat = Var(Aval((total,), x0.dtype, x0.vma))
    new.append(Eqn(prims.concatenate_p, flat, Params(axis=0), [cat]))
    red = Var(Aval((total,), x0.dtype, x0.vma - set(axes)))
    new.append(Eqn(psum_p, [cat], Params(axes=axes, groups=None), [red]))
    start = 0
    for e, v in zip(members, flat):
        n = v.aval.shape[0]
        piece = Var(Aval((n,), x0.dtype, red.aval.vma))
        new.append(Eqn(prims.slice_p, [red], Params(index=((start, start + n, 1),)), [piece]))
        new.append(Eqn(prims.reshape_p, [piece], Params(shape=e.outputs[0].aval.shape), [e.outputs[0]]))
        start += n
    last = batch[-1]
    members_set = set(batch)
    out = [e for i, e in enumerate(eqns[:last]) if i not in members_set and i not in after]
    out += new
    out += [e for i, e in enumerate(eqns[:last]) if i in after and i not in members_set]
    out += eqns[last + 1:]
    # one record for the combined collective, where the first one was
    recs = [records[id(e)] for e in members]
    nbytes = total * np.dtype(x0.dtype).itemsize
    step = dataclasses.replace(recs[0].step, nbytes=nbytes, time=cm.time("all_reduce", nbytes, axes, sizes))
    why = (lambda recs: lambda: "; ".join(dict.fromkeys(r.why for r in recs))
           + f" ({len(recs)} psums combined into one)")(recs)
    at = min(inserted.index(r) for r in recs)
    for r in recs:
        inserted.remove(r)
    inserted.insert(at, Inserted(recs[0].eqn_index, recs[0]._where, why, step, recs[0].source))
    return out


def _combinable(a, cur, want, sizes, mesh_sizes, cm):
    """The batching key of an output whose redistribution is one psum / psum_scatter (those
    over the same axes are reduced as one buffer, as XLA's all-reduce combiner does)."""
    if not isinstance(a, Var) or cur == want:
        return None
    pl = plan(tuple(a.aval.shape), a.aval.dtype.itemsize, cur, want, mesh_sizes, cm)
    if len(pl.steps) != 1 or pl.steps[0].kind not in ("psum", "psum_scatter"):
        return None
    st = pl.steps[0]
    if not cm.worth_combining(st.nbytes, st.axes):
        return None
    if st.kind == "psum_scatter":
        n = int(np.prod([sizes[x] for x in st.axes]))
        if cur.local_shape(a.aval.shape, sizes)[st.dim] % n:
            return None               # would need padding: keep it on its own
    return (st.kind, st.axes, np.dtype(a.aval.dtype))


def _combined(key, members, sizes, cm):
    """One collective over the concatenation of several outputs' blocks."""
    kind, axes, dtype = key
    n = int(np.prod([sizes[x] for x in axes]))
    rows, dims = [], []
    for k, x, a, cur, want, why in members:
        if kind == "psum":
            rows.append(bind(prims.reshape_p, x, shape=(int(np.prod(x.shape)),)))
            dims.append(None)
        else:
            d = next(i for i, (c, w) in enumerate(zip(cur.dims, want.dims)) if c != w)
            perm = (d,) + tuple(i for i in range(x.ndim) if i != d)
            y = bind(prims.transpose_p, x, perm=perm) if d else x
            rows.append(bind(prims.reshape_p, y, shape=(n, int(np.prod(x.shape)) // n)))
            dims.append((d, perm, y.shape))
    axis = 0 if kind == "psum" else 1
    cat = bind(prims.concatenate_p, *rows, axis=axis)
    if kind == "psum":
        red = bind(psum_p, cat, axes=axes, groups=None)
    else:
        red = bind(psum_scatter_p, cat, axes=axes, scatter_dimension=0, tiled=True, groups=None, size=n)
        red = bind(prims.reshape_p, red, shape=(red.shape[1],))
    outs, start = [], 0
    for (k, x, a, cur, want, why), r, dd in zip(members, rows, dims):
        size = int(np.prod(r.shape)) // (n if kind == "psum_scatter" else 1)
        piece = bind(prims.slice_p, red, index=((start, start + size, 1),))
        start += size
        if dd is None:
            outs.append(bind(prims.reshape_p, piece, shape=x.shape))
        else:
            d, perm, yshape = dd
            block = bind(prims.reshape_p, piece, shape=(yshape[0] // n,) + tuple(yshape[1:]))
            outs.append(bind(prims.transpose_p, block, perm=tuple(int(i) for i in np.argsort(perm))) if d else block)
    nbytes = int(np.prod(cat.shape)) * np.dtype(dtype).itemsize
    collective = "all_reduce" if kind == "psum" else "reduce_scatter"
    src = members[0][3]
    step = Step(kind, axes, None, None, src, members[0][4], collective, nbytes,
                cm.time(collective, nbytes, axes, sizes))
    return outs, step


def _pending(sh):
    return ", ".join(f"{op} over {a!r}" for a, op in sh.partial)


def _why(e, j, cur, req, arg_name=None):
    operand = f"operand {j} of {e.prim.name}" + (f" ({arg_name})" if arg_name else "")

    def why(st):
        if cur.partial and st.kind in ("psum", "pmax", "pmin", "psum_scatter"):
            linear = e.prim.linear_operands(len(e.inputs), e.params) + tuple(e.prim.multilinear)
            lin = "needs its operands reduced" if j in linear else "is not linear"
            return (f"{operand} is pending a {_pending(cur)}; "
                    f"{e.prim.name} {lin}, so it is reduced first")
        return f"{operand} is {cur}; the cheapest strategy needs {req}"
    return why


def _eqn_text(printer, e):
    outs = " ".join(printer.decl(v) for v in e.outputs)
    shown = {k: v for k, v in e.params.items() if not isinstance(v, Program)}
    params = ("[" + " ".join(f"{k}={_fmt_param(v)}" for k, v in shown.items()) + "]") if shown else ""
    return f"{outs} = {e.prim.name}{params} {' '.join(printer.name(a) for a in e.inputs)}"
