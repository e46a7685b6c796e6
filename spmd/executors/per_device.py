"""The per-device executor: one local array per device, collectives through a Communicator.

With the in-process communicator this is the *reference executor*: a loop over mesh
positions, obviously right, the oracle for the stacked executor and the compiler.  With an
MPI or NCCL communicator the same loop runs over this process's devices only.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .. import _cache
from ..comm_protocol import placement as _placement, rank_in
from ..communicators.inprocess import InProcessCommunicator
from ..core import Literal, Program
from ..layout import GlobalValue
from ..sharding import NamedSharding
from . import lean, native, profiling


_UNKNOWN = object()


class PerDeviceExecutor:
    # global values come in whole (padded to the blocks' multiple where a dim is uneven)
    takes_padded_storage = False

    def __init__(self, make_communicator):
        self.make_communicator = make_communicator
        self._comms = {}
        self._plans = _cache.LRU()      # Program -> its equations bound (the top level)
        self._tops = _cache.LRU()       # Program -> its straight line (the top level)
        self._direct = _cache.LRU()     # Program -> the one-device region that is all of it
        self._lines = _cache.LRU()      # (program, comm, manual axes) -> its straight line
        self._region_ends = _cache.LRU()   # a manual region -> what finishes each output

    def comm(self, mesh):
        if mesh not in self._comms:
            self._comms[mesh] = self.make_communicator(mesh)
        return self._comms[mesh]

    def run(self, program: Program, args) -> list:
        direct = self._direct.get(program, _UNKNOWN)
        if direct is _UNKNOWN:
            direct = self._direct_region(program)
            self._direct.put(program, direct)
        if direct is not None:
            outs = direct.direct(args)
            if outs is not None:
                return outs
        args = [(_Blocks.of(a) if a._blocks is not None else np.array(a._gather()))
                if isinstance(a, GlobalValue) else a for a in args]
        outs = self._eval_global(program, args)
        return [o.to_array() if type(o) is _Blocks else o for o in outs]

    def _direct_region(self, program):
        """The ``_OneDeviceRegion`` that is all of ``program`` (its one equation, taking the
        program's inputs in order and giving its outputs), or None."""
        if len(program.eqns) != 1:
            return None
        (e,) = program.eqns
        region = self._bound(program)[id(e)]
        if (not isinstance(region, _OneDeviceRegion)
                or not getattr(region.mesh, "is_multi_process", False)   # else whole arrays out
                or [id(v) for v in e.inputs] != [id(v) for v in program.in_vars]
                or [id(v) for v in e.outputs] != [id(v) for v in program.out_vars]):
            return None
        return region

    def _bound(self, program) -> dict:
        """``{id(eqn): fn(*values) -> list of results}`` for the equations of ``program`` at
        the top level, bound once per program (a ``shard_map`` to its prepared region)."""
        bound = self._plans.get(program)
        if bound is None:
            bound = {}
            for e in program.eqns:
                if e.prim.execute is not None:          # higher-order: runs its sub-programs
                    bound[id(e)] = e.prim.execute(_Run(self), **e.params)
                    continue
                call = functools.partial(_on_whole, self, e.prim.rule("impl"), e.params)
                bound[id(e)] = call if e.prim.multiple_results else _one_result(call)
            self._plans.put(program, bound)
        return bound

    def _eval_global(self, program, args):
        """Top-level values are whole arrays, except that across processes the outputs of a
        shard_map stay as this process's blocks (``_Blocks``) until something needs them whole.
        The program runs as one straight line (:func:`lean.straight_line`), made once."""
        line = self._tops.get(program)
        if line is None:
            bound = self._bound(program)

            def higher(e):
                fn = bound[id(e)]
                return fn if e.prim.multiple_results else (lambda *vals: fn(*vals)[0])
            line = lean.straight_line(program, np, higher=higher, gather=self._whole,
                                      timed=functools.partial(self._walk, program))
            self._tops.put(program, line)
        return line(*args)

    def _walk(self, program, args):
        """``_eval_global`` equation by equation (while profiling: each equation timed)."""
        bound = self._bound(program)
        env = {id(v): a for v, a in zip(program.in_vars, args)}
        read = lambda a: a.val if isinstance(a, Literal) else env[id(a)]

        def apply(e, vals):
            return bound[id(e)](*vals)
        if profiling.active is not None:
            apply = profiling.per_equation(apply)
        for e in program.eqns:
            for v, o in zip(e.outputs, apply(e, [read(a) for a in e.inputs])):
                env[id(v)] = o
        return [read(a) for a in program.out_vars]

    def _region(self, body, *, mesh, in_specs, out_specs, manual_axes, check_vma):
        """A manual region at the top level, prepared once: a function of whole values (or,
        across processes, blocks) in, whole values out (across processes, this process's
        blocks out)."""
        comm = self.comm(mesh)
        split = getattr(comm, "multi_process", False)
        positions = comm.local_positions
        region = dict(mesh=mesh, in_specs=in_specs, out_specs=out_specs, manual_axes=manual_axes,
                      check_vma=check_vma)
        # an input held as blocks that are the region's own (same mesh, same split, even dims)
        # goes in as it is
        own = [(tuple(_dim_axes(spec, a.ndim)), _global_shape(a, spec, mesh))
               for spec, a in zip(in_specs, body.in_avals)]
        shapes = [_global_shape(a, spec, mesh) for spec, a in zip(out_specs, body.out_avals)]
        shardings = [NamedSharding(mesh, spec) for spec in out_specs]

        def inputs(vals):
            bufs = []
            for v, fit in zip(vals, own):
                b = _own_blocks(v, mesh, fit) if type(v) is _Blocks else None
                bufs.append({p: self._whole(v) for p in positions} if b is None else b)
            return bufs

        def finish(bufs):
            outs = self._shard_map(comm, bufs, outer_axes=(), gather=not split, body=body,
                                   **region)
            if split:
                return [_Blocks(o, comm, sharding, shape)
                        for o, sharding, shape in zip(outs, shardings, shapes)]
            return [_placement(comm).to_host(o[positions[0]]) for o in outs]
        if split and len(positions) == 1:
            return _OneDeviceRegion(self, comm, body, own, shardings, shapes, finish, inputs,
                                    region)
        return lambda *vals: finish(inputs(vals))

    def _whole(self, v):
        if isinstance(v, _Blocks):
            comm = v.comm or self.comm(v.mesh)
            return gather_blocks(comm, v.mesh, v.spec, v.shape, v.bufs)
        return v

    def _eval_local(self, comm, program, bufs_in, manual):
        """``bufs_in``: per program input, a dict position -> local array."""
        positions = comm.local_positions
        if len(positions) == 1 and profiling.active is None:     # one device per process
            (p,) = positions
            line = self._line(comm, program, manual)
            outs = _placement(comm).call(p, _call_line, line, *[b[p] for b in bufs_in])
            return [{p: o} for o in outs]
        env = {id(v): b for v, b in zip(program.in_vars, bufs_in)}

        placement = _placement(comm)

        def read(a):
            if isinstance(a, Literal):
                if placement.xp is np or not isinstance(a.val, np.ndarray):
                    return {p: a.val for p in positions}
                return {p: placement.to_local(p, a.val) for p in positions}   # onto each GPU
            return env[id(a)]

        def apply(e, vals):
            if e.prim.execute is not None:
                return e.prim.execute(_Run(self, comm, manual), **e.params)(*vals)
            if e.prim.per_device is not None:
                outs = e.prim.per_device(comm, *vals, **e.params)
                return [outs] if e.prim.multiple_results is False else outs
            impl = e.prim.rule("impl")
            per = {p: placement.call(p, impl, 0, *[v[p] for v in vals], **e.params)
                   for p in positions}
            return ([{p: per[p][i] for p in positions} for i in range(len(e.outputs))]
                    if e.prim.multiple_results else [per])
        if profiling.active is not None:
            apply = profiling.per_equation(apply)
        for e in program.eqns:
            for v, o in zip(e.outputs, apply(e, [read(a) for a in e.inputs])):
                env[id(v)] = o
        return [read(a) for a in program.out_vars]

    def _line(self, comm, program, manual):
        """The body ``program`` of a manual region on a process that holds one device, as one
        straight-line function of its local arrays (:func:`lean.straight_line`): each equation
        bound once to the array call or collective that computes it, so a call costs the calls
        and little besides (a collective of a small buffer is dominated by what surrounds it)."""
        key = (program, comm, manual)
        line = self._lines.get(key)
        if line is None:
            placement = _placement(comm)
            (p,) = comm.local_positions
            line = lean.straight_line(program, placement.xp, higher=functools.partial(
                self._local_step, comm, manual, placement.xp), gather=lambda v: v,
                const=None if placement.xp is np else functools.partial(placement.to_local, p))
            self._lines.put(key, line)
        return line

    def _local_step(self, comm, manual, xp, e):
        """Equation ``e`` of a region's straight line (a higher-order equation or a collective)
        on this process's one local array per operand."""
        (p,) = comm.local_positions
        if e.prim.execute is not None:
            run = e.prim.execute(_Run(self, comm, manual), **e.params)
            return lambda *xs: [o[p] for o in run(*[{p: x} for x in xs])]
        if e.prim.per_device is not None:
            rule, params, many = e.prim.per_device, e.params, e.prim.multiple_results
            if many:
                return lambda *xs: [o[p] for o in rule(comm, *[{p: x} for x in xs], **params)]
            return lambda *xs: rule(comm, *[{p: x} for x in xs], **params)[p]
        return functools.partial(e.prim.rule("impl"), xp, 0, **e.params)

    def _shard_map(self, comm, bufs, *, outer_axes, body, mesh, in_specs, out_specs,
                   manual_axes, check_vma, gather=True):
        """``bufs``: per input, {position: whole value}, or a ``_Blocks``' own blocks.  With
        ``gather=False`` the outputs stay as blocks (the caller wraps them)."""
        local_in = self._local_inputs(comm, bufs, mesh, in_specs)
        all_manual = tuple(outer_axes) + tuple(manual_axes)
        outs = self._eval_local(comm, body, local_in, all_manual)
        ends = self._ends(comm, mesh, body, out_specs, manual_axes, check_vma)
        results = []
        for o, spec, end in zip(outs, out_specs, ends):
            if end is not None:
                o = end(comm, o)
            if not gather:
                results.append(o)
                continue
            for d, axes in enumerate(spec.axes):
                if axes:
                    gathered = comm.all_gather(o, axes, None)
                    o = {p: _placement(comm).call(p, lambda xp, g: xp.concatenate(g, axis=d), list(g))
                         for p, g in gathered.items()}
            results.append(o)
        return results

    def _local_inputs(self, comm, bufs, mesh, in_specs):
        """Per input, {position: this device's block}: a ``_Blocks``' own blocks as they are,
        a whole value sliced by its spec."""
        local_in = []
        for b, spec in zip(bufs, in_specs):
            if isinstance(b, _LocalBlocks):
                local_in.append(b)
                continue
            per = {}
            for p in comm.local_positions:
                v = b[p] if hasattr(b[p], "shape") else np.asarray(b[p])
                index = []
                for d, axes in enumerate(spec.axes):
                    n = int(np.prod([mesh.axis_size(a) for a in axes]))
                    blk = v.shape[d] // n if axes else v.shape[d]
                    i = rank_in(mesh, axes, p) if axes else 0
                    index.append(slice(i * blk, (i + 1) * blk))
                per[p] = _placement(comm).to_local(p, v[tuple(index)])   # moves the block only
            local_in.append(per)
        return local_in

    def _ends(self, comm, mesh, body, out_specs, manual_axes, check_vma) -> list:
        """Per output of a manual region, None, or what makes its per-device values the
        output: devices along manual axes its spec omits hold the same value (the vma types
        check it); unless the types show it, the one at index 0 is broadcast, as the stacked
        executor takes index 0.  Worked out once per region."""
        key = (body, comm, mesh, tuple(out_specs), tuple(manual_axes), check_vma)
        ends = self._region_ends.get(key)
        if ends is None:
            ends = []
            for spec, var in zip(out_specs, body.out_vars):
                named = {a for axes in spec.axes for a in axes}
                unnamed = tuple(a for a in mesh.axis_names if a in manual_axes and a not in named)
                vma = getattr(getattr(var, "aval", None), "vma", None)
                if unnamed and not (check_vma and vma is not None and not set(unnamed) & set(vma)):
                    ends.append(functools.partial(_broadcast_first, axes=unnamed))
                else:
                    ends.append(None)
            self._region_ends.put(key, ends)
        return ends


def _broadcast_first(comm, o, *, axes):
    return comm.broadcast(o, axes, None, 0)


class _OneDeviceRegion:
    """A top-level manual region on a process that holds one device (MPI, one GPU per
    process), prepared once: the body's straight line on this device's blocks, what finishes
    each output, the outputs' shardings and shapes.  Called with the region's inputs (blocks
    of the region's own layout go in as they are), it returns ``_Blocks``; :meth:`direct`
    runs it on the program's ``GlobalValue`` arguments and returns ``GlobalValue``s, skipping
    the top level's bookkeeping (a step that is one ``jit(shard_map(...))`` call).  Other
    inputs, and every call while profiling, take the general path (``general(bufs)``)."""

    def __init__(self, ex, comm, body, own, shardings, shapes, general, inputs, region):
        self.comm, self.own, self.general, self.inputs = comm, own, general, inputs
        (self.p,) = comm.local_positions
        self.mesh = region["mesh"]
        self.line = ex._line(comm, body, tuple(region["manual_axes"]))
        self.call = _placement(comm).call
        ends = ex._ends(comm, self.mesh, body, region["out_specs"], region["manual_axes"],
                        region["check_vma"])
        self.outputs = list(zip(ends, shardings, shapes))

    def _run(self, xs) -> list:
        """The outputs of the body's straight line on this device's blocks ``xs``, finished."""
        p, comm = self.p, self.comm
        outs = self.call(p, _call_line, self.line, *xs)
        return [o if end is None else end(comm, {p: o})[p]
                for o, (end, _, _) in zip(outs, self.outputs)]

    def __call__(self, *vals):
        bufs = self.inputs(vals)
        if profiling.active is not None or not all(type(b) is _LocalBlocks for b in bufs):
            return self.general(bufs)
        p = self.p
        return [_Blocks({p: o}, self.comm, sharding, shape)
                for o, (_, sharding, shape) in zip(self._run([b[p] for b in bufs]), self.outputs)]

    def direct(self, args):
        """The region on ``args`` (``GlobalValue``s of this process's blocks, in the region's
        own layout) as ``GlobalValue``s; None when an argument is anything else."""
        if profiling.active is not None:
            return None
        xs = []
        for a, fit in zip(args, self.own):
            blocks = _own_blocks(a, self.mesh, fit)
            if blocks is None:
                return None
            xs.append(blocks[self.p])
        over = GlobalValue.over_blocks
        return [over({self.p: np.asarray(o)}, shape, sharding)
                for o, (_, sharding, shape) in zip(self._run(xs), self.outputs)]


def _own_blocks(v, mesh, fit):
    """The blocks of ``v`` where it is held as this process's blocks in a region's own layout
    (``fit``: the dims' mesh axes and the global shape, on ``mesh``): a ``_Blocks``' or a
    ``GlobalValue``'s of a mesh that spans processes; else None."""
    if type(v) is _Blocks:
        blocks, sharding = v.bufs, v.sharding
    elif isinstance(v, GlobalValue) and v._blocks is not None:
        blocks, sharding = v._blocks, v.sharding
        if v.__dict__.get("_fits") is fit:     # a value's layout never changes: checked once
            return blocks
    else:
        return None
    if (v.shape != fit[1] or sharding.mesh != mesh
            or sharding._dim_axes(len(v.shape)) != fit[0]):
        return None
    if type(v) is not _Blocks:
        v._fits = fit
    return blocks


class _Run:
    """The per-device executor at one place of a program, as ``Primitive.execute`` rules see
    it: the top level (whole values; ``comm`` None) or inside a manual region (per-device
    dicts through ``comm``, with ``manual_axes`` manual)."""

    def __init__(self, executor: PerDeviceExecutor, comm=None, manual_axes=()):
        self.executor, self.comm, self.manual_axes = executor, comm, manual_axes

    def call(self, program: Program):
        ex, comm = self.executor, self.comm
        if comm is None:
            return lambda *vals: ex._eval_global(program, list(vals))
        return lambda *vals: ex._eval_local(comm, program, list(vals), self.manual_axes)

    def manual(self, program: Program, **region):
        ex, comm = self.executor, self.comm
        if comm is None:
            return ex._region(program, **region)
        return lambda *vals: ex._shard_map(comm, list(vals), outer_axes=self.manual_axes,
                                           body=program, **region)

    def local(self, fn):
        """``fn(xp, k, *arrays) -> list of arrays`` on each device's arrays (on whole values at
        the top level), with ``k = 0``: a loop's slicing and stacking."""
        ex, comm = self.executor, self.comm
        if comm is None:
            return lambda *vals: fn(np, 0, *[ex._whole(v) for v in vals])

        def per_device(*vals):
            per = {p: _placement(comm).call(p, fn, 0, *[v[p] for v in vals])
                   for p in comm.local_positions}
            n = len(next(iter(per.values())))
            return [{p: per[p][i] for p in per} for i in range(n)]
        return per_device

    def native_scan(self, step: Program, n_consts: int, n_carry: int, reverse: bool):
        """A scan's steps as one native call (``native.Loop``); inside ``shard_map``, one
        call per device this process holds, on its arrays."""
        positions = list(self.comm.local_positions) if self.comm is not None else None
        return native.scan_runner(step, n_consts, n_carry, reverse, self.executor._whole,
                                  positions=positions)

    def scalar(self, value):
        """A value that is the same on every device (a loop's predicate) as a Python scalar."""
        if self.comm is not None:
            value = value[self.comm.local_positions[0]]
        v = self.executor._whole(value)
        return v.reshape(-1)[0].item() if hasattr(v, "reshape") else v


def _on_whole(ex, impl, params, *vals):
    """A local equation outside ``shard_map``: on whole arrays."""
    return impl(np, 0, *[ex._whole(v) for v in vals], **params)


def _one_result(call):
    return lambda *vals: [call(*vals)]


def _call_line(xp, line, *xs):
    return line(*xs)


def _global_shape(aval, spec, mesh) -> tuple:
    """The global shape of a manual region's output whose blocks are ``aval``."""
    return tuple(d * math.prod(mesh.axis_size(a) for a in axes)
                 for d, axes in zip(aval.shape, _dim_axes(spec, aval.ndim)))


class _LocalBlocks(dict):
    """{position: block}: the blocks of a sharded value, already split by its spec."""


def _dim_axes(spec, ndim):
    axes = tuple(spec.axes)
    return axes + ((),) * (ndim - len(axes))


class _Blocks:
    """A global value held as this process's blocks (the mesh spans processes)."""

    def __init__(self, bufs, comm, sharding: NamedSharding, shape):
        self.bufs = _LocalBlocks(bufs)
        self.comm, self.sharding, self.shape = comm, sharding, tuple(shape)
        self.mesh, self.spec = sharding.mesh, sharding.spec
        self.dim_axes = sharding._dim_axes(len(self.shape))

    @classmethod
    def of(cls, value):
        return cls(value._blocks, None, value.sharding, value.shape)

    def to_array(self):
        return GlobalValue.from_blocks(self.bufs, self.shape, self.sharding)


def gather_blocks(comm, mesh, spec, shape, bufs) -> np.ndarray:
    """The whole global array from each process's blocks ``bufs`` (one all_gather over the mesh).
    Blocks of unevenly split dims may be short; they are padded for the exchange."""
    sharding = NamedSharding(mesh, spec)
    block_shape = sharding.shard_shape(shape)
    padded = {}
    for p, b in bufs.items():
        b = np.asarray(b)
        padded[p] = np.zeros(block_shape, b.dtype)
        padded[p][tuple(slice(0, s) for s in b.shape)] = b
    blocks = comm.all_gather(padded, mesh.axis_names, None)[comm.local_positions[0]]
    out = np.empty(shape, blocks.dtype)
    for pos in range(mesh.size):
        coords = dict(zip(mesh.axis_names, np.unravel_index(pos, mesh.axis_sizes)))
        index = sharding.index_at(coords, shape)
        true = tuple(slice(0, len(range(*s.indices(g)))) for s, g in zip(index, shape))
        out[index] = blocks[pos][true]
    return out


def reference_executor():
    return PerDeviceExecutor(InProcessCommunicator)
