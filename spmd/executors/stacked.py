"""The stacked executor: a value inside ``shard_map`` is one array
``[one dim per mesh axis] + local_shape`` with size 1 on the axes it does not vary over.

Local operations are the primitives' batched implementations (``k`` = number of mesh axes);
collectives are array operations along the mesh dims.  No Python loop over devices.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .. import _cache, layout
from ..layout import GlobalValue
from ..core import Literal, Program
from ..sharding import NamedSharding
from ..transforms import simplify
from ..transforms.ad import dce
from . import fusion, lean, native, profiling


class StackedExecutor:
    """Runs a Program on the stacked layout.

    Each Program is compiled once into a plan: its equations become a list of
    ``(rule with its params bound, input slots, output slots)`` over a flat list of values, so
    a cached call does no dict lookups by variable and re-derives no layout.
    """

    # global values come in as ``GlobalValue``s in the stacked layout, padding included
    takes_padded_storage = True

    def __init__(self, xp=np):
        self.xp = xp
        self._plans = _cache.LRU()               # Program -> its plan

    def run(self, program: Program, args) -> list:
        plan = self._plans.get(program)
        if plan is None:
            plan = self._compile(program, mesh=None)
            self._plans.put(program, plan)
        return plan(args)

    def _stacked_rule(self, prim):
        """A collective's implementation on the stacked layout (the GPU executor swaps in
        kernel-backed ones: ``spmd.gpu.stacked``)."""
        return prim.stacked

    # values at top level are global arrays (np.ndarray or spmd.Array, kept sharded as long
    # as possible); inside shard_map they are stacked arrays.
    def _compile(self, program: Program, mesh, fuse: bool = True):
        xp = self.xp
        k = len(mesh.axis_sizes) if mesh is not None else 0
        if k and fuse:                  # sums of joined products: one contraction per piece
            summed = simplify.psums_before_joins(program)
            program = program if summed is program else dce(summed)
        slots: dict[int, int] = {}
        template: list = [None] * len(program.in_vars)
        for i, v in enumerate(program.in_vars):
            slots[id(v)] = i

        def slot(a):
            if isinstance(a, Literal):
                val = a.val
                if (k or xp is not np) and not isinstance(val, (bool, int, float, complex)):
                    val = xp.asarray(val)                 # onto the device (a GPU's copy)
                    val = val.reshape((1,) * k + val.shape)
                template.append(val)
                return len(template) - 1
            return slots[id(a)]

        steps = []
        covered = []                                    # (eqns, inputs, outputs) of each step
        fused = fusion.plan_fusions(program, k, xp) if fuse else {}
        for e in program.eqns:
            how = fused.get(id(e))
            if how == "skip":                           # runs inside a later fused step
                continue
            if how is not None:
                ins, outputs, fn = how.inputs, how.outputs, how.make(xp, mesh)
                if k == 0:                              # top level: on whole arrays
                    fn = functools.partial(_gathered, fn)
                many = len(outputs) > 1
                covered.append((how.eqns, ins, outputs))
            else:
                ins, outputs, fn = e.inputs, e.outputs, self._step(e, xp, mesh, k)
                many = e.prim.multiple_results
                covered.append(((e,), ins, outputs))
            ins = tuple(slot(a) for a in ins)
            outs = []
            for v in outputs:
                template.append(None)
                slots[id(v)] = len(template) - 1
                outs.append(len(template) - 1)
            steps.append((fn, ins, tuple(outs) if many else outs[0]))
        out_slots = [slot(a) for a in program.out_vars]
        n_in = len(program.in_vars)
        # Drop each value after its last use, so peak memory is what is live, not everything
        # the program ever computed (this is what makes rematerialisation pay off).
        last_use = {}
        for j, (_, ins, _) in enumerate(steps):
            for i in ins:
                last_use[i] = j
        keep = set(out_slots)
        frees = [[] for _ in steps]
        for i, j in last_use.items():
            if i not in keep:
                frees[j].append(i)
        steps = [(fn, ins, out, tuple(f)) for (fn, ins, out), f in zip(steps, frees)]
        timed_steps = []                                # the steps recording their time

        def timed():
            if len(timed_steps) < len(steps):
                timed_steps[:] = [(functools.partial(profiling.timed, profiling.step_of(*c), fn),
                                   ins, out, free)
                                  for (fn, ins, out, free), c in zip(steps, covered)]
            return timed_steps

        def interpreted(args):          # while profiling: each step timed
            env = template.copy()
            env[:n_in] = args
            for fn, ins, out, free in timed():
                r = fn(*[env[i] for i in ins])
                for i in free:
                    env[i] = None
                if type(out) is int:
                    env[out] = r
                else:
                    for o, val in zip(out, r):
                        env[o] = val
            return [env[i] for i in out_slots]
        return _generated(steps, template, n_in, out_slots, interpreted, len(program.eqns))

    def _step(self, e, xp, mesh, k):
        """Equation ``e`` as a function of its input values."""
        if e.prim.execute is not None:                  # higher-order: runs its sub-programs
            return e.prim.execute(_Run(self, mesh), **e.params)
        if e.prim.stacked is not None:
            return functools.partial(self._stacked_rule(e.prim), xp, mesh, **e.params)
        if k == 0:
            return functools.partial(_gathered, functools.partial(e.prim.rule("impl"), xp, 0,
                                                                   **e.params))
        return functools.partial(e.prim.rule("impl"), xp, k, **e.params)

    def _compile_manual(self, outer_mesh, body, *, mesh, in_specs, out_specs, manual_axes,
                        check_vma):
        xp = self.xp
        sizes, names = mesh.axis_sizes, mesh.axis_names
        m = len(sizes)
        run_body = self._compile(body, mesh)
        full = tuple(sizes[j] if names[j] in manual_axes else None for j in range(m))

        def take_input(spec, aval):
            dims = layout.mesh_positions(names, spec.axes + ((),) * (aval.ndim - len(spec)))
            target = NamedSharding(mesh, spec) if outer_mesh is None else None
            known = {}                                  # id -> sharding already found equivalent

            def stack(v):
                if outer_mesh is not None:
                    s = layout.split_into_mesh(v, sizes, dims, xp)
                elif isinstance(v, GlobalValue) and (v.sharding is target or known.get(id(v.sharding)) is v.sharding):
                    s = v._storage                      # already in this layout: no copy
                elif (isinstance(v, GlobalValue) and v.sharding.mesh == mesh and v._storage is not None
                        and v._storage.ndim == m + aval.ndim
                        and v.sharding.is_equivalent_to(target, aval.ndim)):
                    if len(known) > 64:
                        known.clear()
                    known[id(v.sharding)] = v.sharding
                    s = v._storage
                else:
                    g = xp.asarray(_global(v))
                    s = layout.split_into_mesh(g.reshape((1,) * m + g.shape), sizes, dims, xp)
                if not check_vma:                       # every value varies over every manual axis
                    want = tuple(f if f is not None else n for f, n in zip(full, s.shape))
                    s = xp.broadcast_to(s, want + s.shape[m:])
                return s
            return stack

        def give_output(spec, aval):
            named = {a for axes in spec.axes for a in axes}
            # axes the output does not vary over in out_specs: keep device 0's value
            idx = tuple(slice(0, 1) if (names[j] in manual_axes and names[j] not in named) else slice(None)
                        for j in range(m))
            if all(s == slice(None) for s in idx):
                idx = None
            axes_full = spec.axes + ((),) * (aval.ndim - len(spec))
            dims = layout.mesh_positions(names, axes_full)
            rank = m + aval.ndim
            want = tuple(sizes[j] if names[j] in named else 1 for j in range(m))
            shape = tuple(d * math.prod(mesh.axis_size(a) for a in axes)
                          for d, axes in zip(aval.shape, axes_full))
            sharding = NamedSharding(mesh, spec) if outer_mesh is None else None

            def unstack(z):
                if not hasattr(z, "shape"):
                    z = xp.asarray(z)
                if z.ndim < rank:
                    z = z.reshape((1,) * (rank - z.ndim) + z.shape)
                if idx is not None:
                    z = z[idx]
                if outer_mesh is not None:
                    return layout.merge_from_mesh(z, sizes, dims, xp)
                if z.shape[:m] != want:
                    z = xp.broadcast_to(z, want + z.shape[m:])
                return GlobalValue(z, shape, sharding)
            return unstack

        stackers = [take_input(s, a) for s, a in zip(in_specs, body.in_avals)]
        unstackers = [give_output(s, a) for s, a in zip(out_specs, body.out_avals)]

        def run(*vals):
            outs = run_body([f(v) for f, v in zip(stackers, vals)])
            return [f(z) for f, z in zip(unstackers, outs)]
        return run


def _generated(steps, template, n_in, out_slots, interpreted, n_eqns):
    """The plan ``steps`` (``(fn, input slots, output slot(s), slots freed)``) as one
    generated Python function of the list of inputs: each value a local variable, each step
    one line, each value deleted after its last use; no list of values to index, no loop.
    ``template`` holds the constants at their slots; ``interpreted`` runs instead while
    profiling is on."""
    ns = {"profiling": profiling, "interpreted": interpreted}
    made = set(range(n_in))

    def ref(i):
        if i in made:
            return f"s{i}"
        ns[f"k{i}"] = template[i]               # a constant
        return f"k{i}"
    lines = ["if profiling.active is not None: return interpreted(args)"]
    if n_in:
        lines.append(f"{', '.join(f's{i}' for i in range(n_in))}, = args")
    for j, (fn, ins, out, free) in enumerate(steps):
        ns[f"f{j}"] = fn
        call = f"f{j}({', '.join(ref(i) for i in ins)})"
        if type(out) is int:
            lines.append(f"s{out} = {call}")
            made.add(out)
        else:
            lines.append(f"r = {call}")
            lines += [f"s{o} = r[{n}]" for n, o in enumerate(out)] + ["del r"]
            made.update(out)
        dead = [f"s{i}" for i in free if i in made]
        if dead:
            lines.append(f"del {', '.join(dead)}")
    lines.append(f"return [{', '.join(ref(i) for i in out_slots)}]")
    source = "\n    ".join(["def run(args):"] + lines)
    exec(compile(source, f"<plan of {n_eqns} equations>", "exec"), ns)
    return ns["run"]


class _Run:
    """The stacked executor at one place of a program (top level, or inside a manual region
    over ``mesh``), as ``Primitive.execute`` rules see it."""

    def __init__(self, executor: StackedExecutor, mesh):
        self.executor, self.mesh = executor, mesh

    def call(self, program: Program):
        ex = self.executor
        if self.mesh is not None:
            run = ex._compile(program, self.mesh)
            return lambda *vals: run(list(vals))
        # At the top level the program (a loop's body, run once per step) is one straight-line
        # function of array calls; while profiling is on, the plan of the same unfused steps,
        # each timed.
        plan = []

        def timed(vals):
            if not plan:
                plan.append(ex._compile(program, None, fuse=False))
            return plan[0](vals)
        return lean.straight_line(program, ex.xp, higher=lambda e: ex._step(e, ex.xp, None, 0),
                                  gather=_global, timed=timed,
                                  const=None if ex.xp is np else ex.xp.asarray)

    def manual(self, program: Program, **region):
        return self.executor._compile_manual(self.mesh, program, **region)

    def local(self, fn):
        """``fn(xp, k, *arrays) -> list of arrays`` on the values as one stacked array each (k
        mesh dims in front; whole arrays at the top level): a loop's slicing and stacking."""
        xp, k = self.executor.xp, len(self.mesh.axis_sizes) if self.mesh is not None else 0
        return lambda *vals: fn(xp, k, *[_global(v) for v in vals])

    def native_scan(self, step: Program, n_consts: int, n_carry: int, reverse: bool):
        """A scan's steps as one native call (``native.Loop``) on the host, or None (on a
        GPU).  Inside ``shard_map``, one call per device on its blocks."""
        if self.executor.xp is not np:
            return None
        k = len(self.mesh.axis_sizes) if self.mesh is not None else 0
        return native.scan_runner(step, n_consts, n_carry, reverse, _global, k=k)

    def scalar(self, value):
        """A value that is the same on every device (a loop's predicate) as a Python scalar."""
        v = _global(value)
        return v.reshape(-1)[0].item() if hasattr(v, "reshape") else v


def _gathered(fn, *vals):
    """A step outside shard_map (an equation, or a fused chain): on whole (gathered) arrays."""
    return fn(*[_global(v) for v in vals])


def _global(v):
    return v._gather() if isinstance(v, GlobalValue) else v
