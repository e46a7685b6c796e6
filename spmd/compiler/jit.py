"""``jit`` with shardings: trace, propagate, lower, run on the executors; plus
``with_sharding_constraint`` and ``reshard``.

>>> import numpy as np, spmd
>>> from spmd import P
>>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
>>> f = spmd.jit(lambda x, w: np.tanh(x @ w), in_shardings=(spmd.NamedSharding(mesh, P("data")),
...              spmd.NamedSharding(mesh, P(None, "model"))))
>>> y = f(np.ones((8, 4)), np.ones((4, 8)))
>>> y.sharding.spec
P('data', 'model')
"""
from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import optree

from ..core import Aval, Primitive, Program, bind, current_builder
from ..errors import ShardingError
from ..mesh import get_mesh
from ..sharding import NamedSharding, PartitionSpec, as_sharding, check_spec
from .cost import CostModel, default_cost_model
from .explain import explain_text, global_text
from .lower import lower
from .placements import Sharding
from .propagate import check_constraints, inline_calls, propagate


# ---------------------------------------------------------------------------------------------
# with_sharding_constraint
# ---------------------------------------------------------------------------------------------

sharding_constraint_p = Primitive(
    "sharding_constraint", abstract=lambda x, **p: Aval(x.shape, x.dtype),
    impl=lambda xp, k, x, **p: x, linear=True, category="constraint")


def _constraint_jvp(primals, tangents, **params):
    from ..transforms.ad import is_zero
    (x,), (t,) = primals, tangents
    return bind(sharding_constraint_p, x, **params), t if is_zero(t) else bind(sharding_constraint_p, t, **params)


def _constraint_transpose(ct, x, **params):
    from ..transforms.ad import is_zero
    return [ct if is_zero(ct) else bind(sharding_constraint_p, ct, **params)]


sharding_constraint_p.jvp = _constraint_jvp
sharding_constraint_p.transpose = _constraint_transpose


def with_sharding_constraint(x, sharding):
    """Ask for ``x`` (a pytree) to have ``sharding`` at this point of a ``jit`` program.
    Outside ``jit`` it reshards an ``Array`` (or places a host array)."""
    def one(leaf, s):
        ns = as_sharding(s, what="with_sharding_constraint")
        if current_builder() is None:
            from ..array import device_put
            return device_put(leaf, ns)
        ndim = len(np.shape(leaf)) if not hasattr(leaf, "aval") else leaf.aval.ndim
        check_spec(ns.spec, ns.mesh, ndim, what=f"with_sharding_constraint({ns.spec})")
        return bind(sharding_constraint_p, leaf, sharding=Sharding.from_spec(ns.spec, ndim),
                    mesh=ns.mesh.abstract_mesh if hasattr(ns.mesh, "abstract_mesh") else ns.mesh)
    if isinstance(sharding, (NamedSharding, PartitionSpec)):
        return optree.tree_map(lambda l: one(l, sharding), x)
    return optree.tree_map(one, x, sharding)


# ---------------------------------------------------------------------------------------------
# the compiled form
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Compiled:
    name: str
    program: Program              # global
    prop: object                  # Propagation
    manual: Program               # shard_map form
    inserted: list
    mesh: object
    out_shapes: list
    out_tree: object
    padded: bool = False          # some block carries padding (an uneven dim)

    def as_text(self) -> str:
        return (f"# global program (jit({self.name}), shardings after each type)\n"
                f"{global_text(self.program, self.prop)}\n"
                f"# per-device program\n{self.manual}")

    def explain(self) -> str:
        return explain_text(self.inserted, self.mesh, self.name)

    def collectives(self) -> list[tuple[str, tuple]]:
        """``[(kind, axes), ...]`` of every inserted collective, in program order."""
        return [(i.step.kind, i.step.axes) for i in self.inserted]


def compile_program(program: Program, in_shardings, out_shardings, mesh, *, name="function",
                    cost_model: CostModel | None = None, out_shapes=None, out_tree=None) -> Compiled:
    cm = cost_model or default_cost_model()
    program = inline_calls(program)
    check_constraints(program, name)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    prop = propagate(program, list(in_shardings), list(out_shardings), sizes, cm)
    manual, inserted = lower(program, prop, mesh, cm, name)
    padded = any(not sh.is_even(v.aval.shape, sizes)
                 for e, st in zip(program.eqns, prop.strategies)
                 for v, sh in zip(list(e.inputs) + list(e.outputs), list(st.ins) + list(st.outs)))
    comp = Compiled(name, program, prop, manual, inserted, mesh,
                    out_shapes or [a.shape for a in program.out_avals], out_tree, padded)
    if os.environ.get("SPMD_EXPLAIN") == "1":
        print(comp.explain())
    return comp


# ---------------------------------------------------------------------------------------------
# jit
# ---------------------------------------------------------------------------------------------

def _is_sharding_leaf(x):
    return x is None or isinstance(x, (NamedSharding, PartitionSpec))


class Lowered:
    def __init__(self, compiled: Compiled):
        self.compiled = compiled

    def as_text(self) -> str:
        return self.compiled.as_text()

    def explain(self) -> str:
        return self.compiled.explain()

    def collectives(self):
        return self.compiled.collectives()

    @property
    def program(self):
        return self.compiled.manual


class ShardedJitted:
    """``spmd.jit(f, in_shardings=..., out_shardings=..., donate_argnums=...)``."""

    def __init__(self, jitted, in_shardings=None, out_shardings=None, donate_argnums=(),
                 cost_model=None):
        self.jitted = jitted          # the plain spmd.jit object: tracing and its cache
        self.name = jitted.name
        self.in_shardings = in_shardings
        self.out_shardings = out_shardings
        self.donate_argnums = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
        self.cost_model = cost_model
        self._cache: dict = {}
        functools.update_wrapper(self, jitted.f)

    # -- argument shardings ------------------------------------------------------------------
    def _arg_shardings(self, args, kwargs):
        """(mesh, per-leaf NamedSharding or None, leaf paths) for the dynamic arguments."""
        from ..array import Array
        static, static_kw, dyn_args, dyn_kwargs = self.jitted._split(args, kwargs)
        leaves, tree = optree.tree_flatten((dyn_args, dyn_kwargs), none_is_leaf=False)
        paths = ["args" + "".join(f"[{p!r}]" for p in path[1:]) if path[0] == 0 else
                 "kwargs" + "".join(f"[{p!r}]" for p in path[1:])
                 for path in optree.tree_paths((dyn_args, dyn_kwargs), none_is_leaf=False)]
        given = [None] * len(leaves)
        if self.in_shardings is not None:
            spec = self.in_shardings
            if _is_sharding_leaf(spec):
                spec = (spec,) * len(dyn_args)
            if isinstance(spec, list):
                spec = tuple(spec)
            if not isinstance(spec, tuple):
                spec = (spec,)
            if len(spec) > len(dyn_args):
                raise ShardingError(
                    f"jit({self.name}): in_shardings gives {len(spec)} shardings but the function "
                    f"was called with {len(dyn_args)} positional argument(s); in_shardings[{len(dyn_args)}] "
                    f"is for an argument that does not exist.")
            spec = spec + (None,) * (len(dyn_args) - len(spec))
            for i, (s, a) in enumerate(zip(spec, dyn_args)):
                try:
                    full = optree.tree_broadcast_prefix(s, a, is_leaf=_is_sharding_leaf, none_is_leaf=True)
                except ValueError as e:
                    raise ShardingError(f"jit({self.name}): in_shardings[{i}] {s!r} does not match the "
                                        f"structure of args[{i}] ({e}).") from None
                sub = optree.tree_leaves(full, is_leaf=_is_sharding_leaf, none_is_leaf=True)
                start = sum(optree.tree_structure(x, none_is_leaf=False).num_leaves for x in dyn_args[:i])
                for k, sh in enumerate(sub):
                    if sh is not None:
                        what = f"jit({self.name}): in_shardings for {paths[start + k]}"
                        try:
                            given[start + k] = as_sharding(sh, what=what)
                        except ShardingError as e:
                            raise ShardingError(f"{what}: {e}") from None
        mesh, mesh_from = None, None
        candidates = [(g, p) for g, p in zip(given, paths) if g is not None]
        candidates += [(x.sharding, p) for x, p, g in zip(leaves, paths, given)
                       if g is None and isinstance(x, Array) and x.sharding.mesh.axis_names != ("_device",)]
        candidates += [(s, "out_shardings") for s in optree.tree_leaves(self.out_shardings, is_leaf=_is_sharding_leaf)
                       if isinstance(s, NamedSharding)]
        for sh, p in candidates:
            if mesh is None:
                mesh, mesh_from = sh.mesh, p
            elif sh.mesh != mesh:
                raise ShardingError(f"jit({self.name}): {p} is on mesh {sh.mesh!r} but {mesh_from} is on "
                                    f"{mesh!r}; every argument and sharding of one call must use the same mesh.")
        if mesh is None:
            mesh = get_mesh()
        if mesh is None:
            raise ShardingError(f"jit({self.name}): no mesh; give NamedShardings, sharded spmd.Array "
                                f"arguments, or call inside `with spmd.set_mesh(mesh):`.")
        final = []
        for x, g, p in zip(leaves, given, paths):
            if g is None and isinstance(x, Array) and x.sharding.mesh == mesh:
                g = x.sharding
            if g is not None:
                check_spec(g.spec, mesh, np.ndim(x) if not isinstance(x, Array) else x.ndim,
                           what=f"jit({self.name}): the sharding {g.spec} of {p}")
            final.append(g)
        return mesh, final, paths, leaves

    def _out_specs(self, out_tree, out_avals, mesh):
        if self.out_shardings is None:
            return [None] * len(out_avals)
        spec = self.out_shardings
        if _is_sharding_leaf(spec):
            spec_leaves = [spec] * out_tree.num_leaves
        else:
            out_struct = optree.tree_unflatten(out_tree, list(range(out_tree.num_leaves)))
            try:
                full = optree.tree_broadcast_prefix(spec, out_struct, is_leaf=_is_sharding_leaf, none_is_leaf=True)
            except ValueError as e:
                raise ShardingError(f"jit({self.name}): out_shardings {spec!r} does not match the "
                                    f"structure of the outputs ({out_tree}): {e}") from None
            spec_leaves = optree.tree_leaves(full, is_leaf=_is_sharding_leaf, none_is_leaf=True)
        out = []
        for k, (s, a) in enumerate(zip(spec_leaves, out_avals)):
            if s is None:
                out.append(None)
                continue
            try:
                ns = s if isinstance(s, NamedSharding) else NamedSharding(mesh, s)
            except ShardingError as e:
                raise ShardingError(f"jit({self.name}): out_shardings for output {k}: {e}") from None
            check_spec(ns.spec, mesh, a.ndim, what=f"jit({self.name}): out_shardings for output {k}")
            out.append(Sharding.from_spec(ns.spec, a.ndim))
        return out

    def _compile(self, args, kwargs):
        mesh, shardings, paths, leaves = self._arg_shardings(args, kwargs)
        (program, in_tree, out_tree), _ = self.jitted._program(args, kwargs)
        key = (id(program), mesh, tuple(None if s is None else s.spec for s in shardings),
               self.cost_model or default_cost_model())
        comp = self._cache.get(key)
        if comp is None:
            for e in program.eqns:
                m = e.params.get("mesh") if e.prim is sharding_constraint_p else None
                if m is not None and tuple(m.axis_names) != tuple(mesh.axis_names) or \
                        m is not None and tuple(m.axis_sizes) != tuple(mesh.axis_sizes):
                    raise ShardingError(f"jit({self.name}): with_sharding_constraint uses mesh {m!r}, "
                                        f"but the arguments are on {mesh!r}.")
            ins = [None if s is None else Sharding.from_spec(s.spec, v.aval.ndim)
                   for s, v in zip(shardings, program.in_vars)]
            outs = self._out_specs(out_tree, program.out_avals, mesh)
            if self.out_shardings is None:
                outs = _gradients_like_parameters(args, self.jitted, out_tree, program, ins, outs)
            comp = compile_program(program, ins, outs, mesh, name=self.name,
                                   cost_model=self.cost_model, out_tree=out_tree)
            self._cache[key] = comp
        return comp, leaves, paths

    def lower(self, *args, **kwargs) -> Lowered:
        return Lowered(self._compile(args, kwargs)[0])

    def __call__(self, *args, **kwargs):
        if current_builder() is not None:
            return self.jitted.f(*args, **kwargs)
        from ..array import Array
        for i, x in enumerate(args):
            for leaf in optree.tree_leaves(x, none_is_leaf=False):
                if isinstance(leaf, Array) and leaf.is_deleted():
                    raise RuntimeError(f"jit({self.name}): args[{i}] was donated to an earlier call and "
                                       f"its buffer is gone; pass a fresh array (donated arrays cannot "
                                       f"be reused).")
        comp, leaves, paths = self._compile(args, kwargs)
        donated = self._donated_leaves(args, kwargs)
        outs = run_compiled(comp, leaves, paths, self.jitted.executor)
        from ..array import Array
        for i in donated:
            if isinstance(leaves[i], Array):
                leaves[i].delete()
        return optree.tree_unflatten(comp.out_tree, outs)

    def _donated_leaves(self, args, kwargs):
        if not self.donate_argnums:
            return []
        idx, start = [], 0
        dyn = [i for i in range(len(args)) if i not in self.jitted.static_argnums]
        for pos, i in enumerate(dyn):
            n = optree.tree_structure(args[i], none_is_leaf=False).num_leaves
            if i in self.donate_argnums:
                idx.extend(range(start, start + n))
            start += n
        return idx


def _gradients_like_parameters(args, jitted, out_tree, program, ins, outs):
    """Without out_shardings, outputs shaped like the first argument (``grad(loss)(params,
    ...)``, or the gradient half of ``value_and_grad``) take the first argument's shardings,
    so parameters and their gradients match."""
    dyn = [a for i, a in enumerate(args) if i not in jitted.static_argnums]
    if not dyn:
        return outs
    ptree = optree.tree_structure(dyn[0], none_is_leaf=False)
    n = ptree.num_leaves
    pavals = [v.aval for v in program.in_vars[:n]]
    out_avals = program.out_avals
    start = None
    if out_tree == ptree:
        start = 0
    elif out_tree.num_children == 2 and out_tree.children()[1] == ptree:
        start = out_tree.children()[0].num_leaves
    if start is None or [(a.shape, a.dtype) for a in out_avals[start:start + n]] != \
            [(a.shape, a.dtype) for a in pavals]:
        return outs
    outs = list(outs)
    for k in range(n):
        if outs[start + k] is None and ins[k] is not None:
            outs[start + k] = ins[k]
    return outs


def run_compiled(comp: Compiled, leaves, paths, executor=None):
    """Place the arguments as the compiled program expects, run it, wrap the outputs."""
    from ..array import Array, device_put
    from ..jit import _default_executor
    mesh = comp.mesh
    placed = []
    for x, sh, p in zip(leaves, comp.prop.in_shardings, paths):
        want = NamedSharding(mesh, sh.spec)
        if isinstance(x, Array):
            if x.is_deleted():
                raise RuntimeError(f"jit({comp.name}): {p} was donated to an earlier call and its "
                                   f"buffer is gone; pass a fresh array (donated arrays cannot be reused).")
            if not (x.sharding.mesh == mesh and x.sharding.is_equivalent_to(want, x.ndim)):
                x = device_put(x, want)
        else:
            x = device_put(np.asarray(x), want)
        placed.append(x)
    executor = executor or _default_executor()
    from ..executors import StackedExecutor
    if not isinstance(executor, StackedExecutor):
        # executors that split global arrays themselves get them padded like the blocks
        # (an Array whose shards live in other processes is passed as is when nothing is padded)
        placed = [x if tuple(x.shape) == tuple(v.aval.shape) else _pad_global(np.asarray(x), v.aval.shape)
                  for x, v in zip(placed, comp.manual.in_vars)]
    if comp.padded:
        # the padding of uneven blocks may hold anything (log(0), 0/0): masked before it can
        # reach a result, so NumPy's warnings about it would only be noise
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            outs = executor.run(comp.manual, placed)
    else:
        outs = executor.run(comp.manual, placed)
    result = []
    for o, shape, sh in zip(outs, comp.out_shapes, comp.prop.out_shardings):
        ns = NamedSharding(mesh, sh.spec)
        if isinstance(o, Array):
            result.append(Array(o._storage, tuple(shape), ns) if o._blocks is None else
                          Array.from_blocks(o._blocks, tuple(shape), ns))   # across processes
        else:
            arr = np.asarray(o)
            result.append(device_put(arr[tuple(slice(0, d) for d in shape)], ns))
    return result


def _pad_global(x, shape):
    if x.shape == tuple(shape):
        return x
    out = np.zeros(shape, x.dtype)
    out[tuple(slice(0, d) for d in x.shape)] = x
    return out


# ---------------------------------------------------------------------------------------------
# reshard (the planner on a whole Array)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _reshard_compiled(shape, dtype, mesh, src_spec, dst_spec):
    from ..core import trace
    prog, _ = trace(lambda x: [x], [Aval(shape, np.dtype(dtype))], context="reshard")
    nd = len(shape)
    return compile_program(prog, [Sharding.from_spec(src_spec, nd)], [Sharding.from_spec(dst_spec, nd)],
                           mesh, name="reshard")


def reshard(x, sharding: NamedSharding):
    """``x`` (an Array on ``sharding.mesh``) moved to ``sharding`` by the planner's collectives."""
    comp = _reshard_compiled(tuple(x.shape), np.dtype(x.dtype), sharding.mesh, x.sharding.spec,
                             sharding.spec)
    return run_compiled(comp, [x], ["x"])[0]
