"""The per-device executor: one local array per device, collectives through a Communicator.

With the in-process communicator this is the *reference executor*: a loop over mesh
positions, obviously right, the oracle for the stacked executor and the compiler.  With an
MPI or NCCL communicator the same loop runs over this process's devices only.
"""
from __future__ import annotations

import numpy as np

from ..communicators import rank_in
from ..core import Literal, Program


class PerDeviceExecutor:
    def __init__(self, make_communicator):
        self.make_communicator = make_communicator
        self._comms = {}

    def comm(self, mesh):
        if mesh not in self._comms:
            self._comms[mesh] = self.make_communicator(mesh)
        return self._comms[mesh]

    def run(self, program: Program, args) -> list:
        from ..array import Array
        args = [np.asarray(a) if isinstance(a, Array) else a for a in args]
        return self._eval_global(program, args)

    def _eval_global(self, program, args):
        env = {id(v): a for v, a in zip(program.in_vars, args)}
        read = lambda a: a.val if isinstance(a, Literal) else env[id(a)]
        for e in program.eqns:
            vals = [read(a) for a in e.inputs]
            if e.prim.name == "shard_map":
                comm = self.comm(e.params["mesh"])
                bufs = [{p: v for p in comm.local_positions} for v in vals]
                outs = self._shard_map(comm, bufs, outer_axes=(), **e.params)
                any_pos = comm.local_positions[0]
                outs = [o[any_pos] for o in outs]
            else:
                outs = e.prim.rule("impl")(np, 0, *vals, **e.params)
                if not e.prim.multiple_results:
                    outs = [outs]
            for v, o in zip(e.outputs, outs):
                env[id(v)] = o
        return [read(a) for a in program.out_vars]

    def _eval_local(self, comm, program, bufs_in, manual):
        """``bufs_in``: per program input, a dict position -> local array."""
        env = {id(v): b for v, b in zip(program.in_vars, bufs_in)}
        positions = comm.local_positions

        def read(a):
            if isinstance(a, Literal):
                return {p: a.val for p in positions}
            return env[id(a)]

        for e in program.eqns:
            vals = [read(a) for a in e.inputs]
            if e.prim.name == "shard_map":
                outs = self._shard_map(comm, vals, outer_axes=manual, **e.params)
            elif "per_device" in e.prim.rules:
                outs = e.prim.rules["per_device"](comm, *vals, **e.params)
                if e.prim.multiple_results is False:
                    outs = [outs]
            else:
                impl = e.prim.rule("impl")
                per = {p: impl(np, 0, *[v[p] for v in vals], **e.params) for p in positions}
                outs = ([{p: per[p][i] for p in positions} for i in range(len(e.outputs))]
                        if e.prim.multiple_results else [per])
            for v, o in zip(e.outputs, outs):
                env[id(v)] = o
        return [read(a) for a in program.out_vars]

    def _shard_map(self, comm, bufs, *, outer_axes, body, mesh, in_specs, out_specs,
                   manual_axes, check_vma, name):
        positions = comm.local_positions
        local_in = []
        for b, spec in zip(bufs, in_specs):
            per = {}
            for p in positions:
                v = np.asarray(b[p])
                index = []
                for d, axes in enumerate(spec.axes):
                    n = int(np.prod([mesh.axis_size(a) for a in axes]))
                    blk = v.shape[d] // n if axes else v.shape[d]
                    i = rank_in(mesh, axes, p) if axes else 0
                    index.append(slice(i * blk, (i + 1) * blk))
                per[p] = v[tuple(index)]
            local_in.append(per)
        all_manual = tuple(outer_axes) + tuple(manual_axes)
        outs = self._eval_local(comm, body, local_in, all_manual)
        results = []
        for o, spec in zip(outs, out_specs):
            named = {a for axes in spec.axes for a in axes}
            # Devices along manual axes the spec omits hold the same value (checked by the vma
            # types); take the one at index 0, as the stacked executor does.
            unnamed = tuple(a for a in mesh.axis_names if a in manual_axes and a not in named)
            if unnamed:
                o = comm.broadcast(o, unnamed, None, 0)
            for d, axes in enumerate(spec.axes):
                if axes:
                    gathered = comm.all_gather(o, axes, None)
                    o = {p: np.concatenate(list(g), axis=d) for p, g in gathered.items()}
            results.append(o)
        return results


def reference_executor():
    from ..communicators.inprocess import InProcessCommunicator
    return PerDeviceExecutor(InProcessCommunicator)
