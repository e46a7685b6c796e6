"""The stacked executor: a value inside ``shard_map`` is one array
``[one dim per mesh axis] + local_shape`` with size 1 on the axes it does not vary over.

Local operations are the primitives' batched implementations (``k`` = number of mesh axes);
collectives are array operations along the mesh dims.  No Python loop over devices.
"""
from __future__ import annotations

import numpy as np

from .. import layout
from ..core import Literal, Program
from ..sharding import NamedSharding


class StackedExecutor:
    def __init__(self, xp=np):
        self.xp = xp

    def run(self, program: Program, args) -> list:
        return self._eval(program, list(args), mesh=None)

    # values at top level are global arrays (np.ndarray or spmd.Array, kept sharded as long
    # as possible); inside shard_map they are stacked arrays.
    def _eval(self, program: Program, args, mesh):
        xp = self.xp
        k = len(mesh.axis_sizes) if mesh is not None else 0
        env = {id(v): a for v, a in zip(program.in_vars, args)}

        def read(a):
            if isinstance(a, Literal):
                val = a.val
                if k and not isinstance(val, (bool, int, float, complex)):
                    val = xp.asarray(val)
                    val = val.reshape((1,) * k + val.shape)
                return val
            return env[id(a)]

        # Drop each value after its last use, so peak memory is what is live, not everything
        # the program ever computed (this is what makes rematerialisation pay off).
        last_use = {id(a): i for i, e in enumerate(program.eqns) for a in e.inputs}
        for a in program.out_vars:
            last_use[id(a)] = len(program.eqns)
        for i, e in enumerate(program.eqns):
            vals = [read(a) for a in e.inputs]
            for a in e.inputs:
                if last_use.get(id(a)) == i:
                    env.pop(id(a), None)
            if e.prim.name == "shard_map":
                outs = self._shard_map(vals, mesh, **e.params)
            elif e.prim.rules.get("call"):              # checkpoint: run the body inline
                outs = self._eval(e.params["body"], vals, mesh)
            elif "stacked" in e.prim.rules:
                outs = e.prim.rules["stacked"](xp, mesh, *vals, **e.params)
            else:
                if k == 0:
                    vals = [_global(v) for v in vals]
                outs = e.prim.rule("impl")(xp, k, *vals, **e.params)
            if not e.prim.multiple_results:
                outs = [outs]
            for v, o in zip(e.outputs, outs):
                env[id(v)] = o
        return [read(a) for a in program.out_vars]

    def _shard_map(self, vals, outer_mesh, *, body, mesh, in_specs, out_specs, manual_axes,
                   check_vma, name):
        from ..array import Array
        xp = self.xp
        sizes, names = mesh.axis_sizes, mesh.axis_names
        m = len(sizes)
        stacked_in = []
        for v, spec, aval in zip(vals, in_specs, body.in_avals):
            dims = layout.mesh_positions(names, spec.axes + ((),) * (aval.ndim - len(spec)))
            if outer_mesh is None:
                if (isinstance(v, Array) and v.sharding.mesh == mesh and v._storage.ndim == m + aval.ndim
                        and v.sharding.is_equivalent_to(NamedSharding(mesh, spec), aval.ndim)):
                    s = v._storage                      # already in this layout: no copy
                else:
                    g = xp.asarray(_global(v))
                    s = layout.split_into_mesh(g.reshape((1,) * m + g.shape), sizes, dims, xp)
            else:
                s = layout.split_into_mesh(v, sizes, dims, xp)
            if not check_vma:                           # every value varies over every manual axis
                want = tuple(sizes[j] if names[j] in manual_axes else s.shape[j] for j in range(m))
                s = xp.broadcast_to(s, want + s.shape[m:])
            stacked_in.append(s)
        outs = self._eval(body, stacked_in, mesh)
        results = []
        for z, spec, aval in zip(outs, out_specs, body.out_avals):
            z = xp.asarray(z) if not hasattr(z, "shape") else z
            if z.ndim < m + aval.ndim:
                z = z.reshape((1,) * (m + aval.ndim - z.ndim) + z.shape)
            named = {a for axes in spec.axes for a in axes}
            # axes the output does not vary over in out_specs: keep device 0's value
            idx = tuple(slice(0, 1) if (names[j] in manual_axes and names[j] not in named) else slice(None)
                        for j in range(m))
            z = z[idx]
            axes_full = spec.axes + ((),) * (aval.ndim - len(spec))
            dims = layout.mesh_positions(names, axes_full)
            if outer_mesh is None:
                want = tuple(sizes[j] if names[j] in named else 1 for j in range(m))
                if z.shape[:m] != want:
                    z = xp.broadcast_to(z, want + z.shape[m:])
                shape = tuple(d * int(np.prod([mesh.axis_size(a) for a in axes]))
                              for d, axes in zip(aval.shape, axes_full))
                results.append(Array(z, shape, NamedSharding(mesh, spec)))
            else:
                results.append(layout.merge_from_mesh(z, sizes, dims, xp))
        return results


def _global(v):
    from ..array import Array
    return v._gather() if isinstance(v, Array) else v
