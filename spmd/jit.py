"""``spmd.jit``: one jit for every program.

``jit(f)`` traces ``f`` once per argument types (and static arguments) into a global Program
and caches it.  A call then either runs that Program as it is (no shardings anywhere: plain
arrays, or ``shard_map`` inside, which already says where everything lives), or, when
``in_shardings`` / ``out_shardings`` / ``donate_argnums`` are given or sharded ``Array``s come
in, hands it to the sharding compiler (``spmd.compiler``), which propagates shardings and
inserts the collectives, and runs the per-device Program it returns.  Either way
``f.lower(*args)`` gives one ``Lowered`` whose ``.program`` is the global Program,
``.per_device_program`` what the executor runs, ``.as_text()`` both, and ``.explain()`` every
collective the program performs.

>>> import numpy as np, spmd
>>> from spmd import P
>>> double = spmd.jit(lambda x: 2 * x)
>>> np.asarray(double(np.arange(3.)))
array([0., 2., 4.])
>>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
>>> f = spmd.jit(lambda x, w: np.tanh(x @ w), in_shardings=(spmd.NamedSharding(mesh, P("data")),
...              spmd.NamedSharding(mesh, P(None, "model"))))
>>> f(np.ones((8, 4)), np.ones((4, 8))).sharding.spec
P('data', 'model')
"""
from __future__ import annotations

import functools
import os
import weakref
from inspect import signature

import numpy as np
import optree

from . import _cache, distributed, inspect
from .array import Array, device_put
from .compiler import Compiled, Sharding, compile_program, default_cost_model
from .compiler.explain import explain_text
from .core import Aval, aval_of, bind, current_builder, hooks, trace
from .errors import ShardingError
from .executors import StackedExecutor, reference_executor
from .prims import sharding_constraint_p
from .layout import GlobalValue
from .mesh import Mesh, get_mesh
from .sharding import (NamedSharding, PartitionSpec, ShardingAssertionError, as_sharding,
                       check_spec, sharding_type)
from .transforms.ad import dce, eval_program


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------

_EXECUTORS: dict = {}     # one per SPMD_EXECUTOR value: executors keep their compiled plans
# SPMD_EXECUTOR value -> a function making that executor; plug-ins add theirs (spmd.gpu: "gpu")
_FACTORIES: dict = {"stacked": StackedExecutor, "reference": reference_executor}


# a device platform -> () -> the executor name its meshes run on (spmd.gpu: "gpu" -> virtual
# devices on GPU 0, or one GPU per device)
_BY_PLATFORM: dict = {}


def register_executor(name: str, factory, *, platform: str | None = None, when=None) -> None:
    """Let ``SPMD_EXECUTOR=name`` choose the executor ``factory()`` makes (once, then kept);
    with ``platform``, a program on a mesh of that platform's devices runs on it by default
    where ``when()`` holds (the first registered whose ``when`` holds)."""
    _FACTORIES[name] = factory
    if platform is not None:
        _BY_PLATFORM.setdefault(platform, []).append((when or (lambda: True), name))


def default_executor(platform=None):
    """The executor a call runs on: the job's per-device executor after
    ``spmd.distributed.initialize()``, else ``SPMD_EXECUTOR`` (``stacked``, ``reference``, or
    one a plug-in registered: ``gpu``, the stacked executor on GPU 0), else the one registered
    for the platform of the call's mesh (``platform()``: "gpu" runs on the GPUs), else
    ``stacked``."""
    if distributed.process_count() > 1:
        return distributed.executor()
    if distributed.UNJOINED_LAUNCH:
        distributed.warn_if_unjoined()
    name = os.environ.get("SPMD_EXECUTOR")
    why = f"SPMD_EXECUTOR={name!r}"
    if name is None:
        name, on = "stacked", platform() if platform is not None else None
        for when, candidate in _BY_PLATFORM.get(on, ()):
            if when():
                name, why = candidate, f"a mesh of {on} devices runs on the {candidate!r} executor"
                break
    executor = _EXECUTORS.get(name)
    if executor is None:
        factory = _FACTORIES.get(name)
        if factory is None:
            raise ValueError(f"SPMD_EXECUTOR={name!r}; use one of "
                             f"{', '.join(repr(k) for k in _FACTORIES)}.")
        try:
            made = factory()
        except Exception as e:           # say which setting asked for it (a GPU, say)
            e.args = (f"{why}: {e}",) + e.args[1:]
            raise
        executor = _EXECUTORS.setdefault(name, made)
    return executor


_PLATFORMS = _cache.LRU()     # program -> the platform of the meshes it names, or None


def _platform_of(program, leaves):
    """The device platform of the mesh a call runs on: its first ``Array`` argument's, else
    one its program names (a ``shard_map``'s mesh, an Explicit sharding's), else None."""
    for x in leaves:
        if type(x) is Array and isinstance(x.sharding.mesh, Mesh):
            return x.sharding.mesh.platform
    found = _PLATFORMS.get(program, _cache._MISSING)
    if found is _cache._MISSING:
        meshes = [e.params.get("mesh") for e in program.eqns]
        meshes += [getattr(v.aval.sharding, "mesh", None) for v in program.in_vars]
        found = next((m.platform for m in meshes if isinstance(m, Mesh)), None)
        _PLATFORMS.put(program, found)
    return found


def _as_array(x):
    """An executor's output as the user's ``Array``."""
    if type(x) is Array:
        return x
    if isinstance(x, GlobalValue):
        return _array_of(x, x.shape, x.sharding)
    return device_put(np.asarray(x))


def _array_of(value: GlobalValue, shape, sharding) -> Array:
    """The ``Array`` over an executor's ``GlobalValue`` (its storage, or across processes its
    blocks), with the global ``shape`` and ``sharding`` given."""
    return (Array(value._storage, tuple(shape), sharding) if value._blocks is None else
            Array.over_blocks(value._blocks, shape, sharding, value._dtype))


def _on_devices(outs, leaves):
    """Outputs of a ``shard_map(mesh=mesh.abstract_mesh)`` carry a mesh without devices; as in
    JAX they land on the concrete mesh of that shape the arguments are on, or else the one of
    ``with spmd.set_mesh(mesh):`` (if neither gives one, they keep the abstract mesh, and the
    methods that need devices say so)."""
    for o in outs:
        if not isinstance(o.sharding.mesh, Mesh):
            break
    else:
        return outs
    meshes = [x.sharding.mesh for x in leaves if type(x) is Array] + [get_mesh()]
    for i, o in enumerate(outs):
        abstract = o.sharding.mesh
        if not isinstance(abstract, Mesh):
            m = next((m for m in meshes if isinstance(m, Mesh)
                      and m.abstract_mesh == abstract), None)
            if m is not None and o._blocks is None:
                outs[i] = Array(o._storage, o.shape, NamedSharding(m, o.sharding.spec))
    return outs


def execute(program, args) -> list:
    """Run ``program`` on concrete arguments; ``Array`` results.  Where an argument is split
    over a mesh (``vjp`` or ``jvp`` of sharded arrays) it is compiled as ``jit`` would compile
    it, so the results have the shardings their types give; else the default executor runs it."""
    if any(isinstance(a, Array) and a.sharding.mesh.size > 1 for a in args):
        return jit(lambda *xs: eval_program(program, xs), _name="program")(*args)
    return [_as_array(o) for o in default_executor().run(program, list(args))]


# ---------------------------------------------------------------------------------------------
# with_sharding_constraint
# ---------------------------------------------------------------------------------------------

def constrain(x, ns: NamedSharding, what: str):
    """``x`` (traced) laid out by ``ns`` from here on: the constraint the compiler honours, and
    on Explicit axes the value's new type (``reshard``).  A concrete mesh is kept in the
    equation, so that a plain ``jit`` whose only sharding is a constraint runs on it."""
    ndim = len(np.shape(x)) if not hasattr(x, "aval") else x.aval.ndim
    check_spec(ns.spec, ns.mesh, ndim, what=f"{what}({ns.spec})")
    return bind(sharding_constraint_p, x, sharding=Sharding.from_spec(ns.spec, ndim), mesh=ns.mesh)


def with_sharding_constraint(x, sharding):
    """Ask for ``x`` (a pytree) to have ``sharding`` at this point of a ``jit`` program.
    Outside ``jit`` it reshards an ``Array`` (or places a host array).  On a mesh whose axes
    are all Explicit it asserts instead (as JAX): the value's type must already be
    ``sharding``; ``spmd.reshard`` changes it."""
    def one(leaf, s):
        ns = as_sharding(s, what="with_sharding_constraint")
        if current_builder() is None:
            return device_put(leaf, ns)
        named = [a for ax in ns.spec.axes for a in ax if a in ns.mesh.explicit_axes]
        if isinstance(s, NamedSharding) and named:
            raise ShardingError(
                f"with_sharding_constraint({ns.spec}): a NamedSharding given to it may name only "
                f"Auto mesh axes (as in JAX), but {named} are Explicit. Use spmd.reshard(x, "
                f"sharding) to move a value on Explicit axes.")
        typed = getattr(getattr(leaf, "aval", None), "sharding", None)
        if typed is not None and len(ns.mesh.explicit_axes) == len(ns.mesh.axis_names):
            if typed != sharding_type(ns, leaf.aval.ndim):
                raise ShardingAssertionError(
                    f"with_sharding_constraint asserts on a mesh whose axes are all Explicit: the "
                    f"value is {leaf.aval} ({typed.spec}), not {ns.spec}. Use spmd.reshard(x, "
                    f"{ns.spec}) to move it.")
            return leaf
        return constrain(leaf, ns, "with_sharding_constraint")
    if isinstance(sharding, (NamedSharding, PartitionSpec)):
        return optree.tree_map(lambda leaf: one(leaf, sharding), x)
    return optree.tree_map(one, x, sharding)


# ---------------------------------------------------------------------------------------------
# Lowered
# ---------------------------------------------------------------------------------------------

class Lowered:
    """``jit(f).lower(*args)``: the same four views whether or not the compiler ran.

    - ``program``: the global Program ``f`` traced to;
    - ``per_device_program``: what the executor runs (the compiler's output, or ``program``);
    - ``as_text()``: the global program (with each value's sharding when compiled), then the
      per-device one;
    - ``explain()``: the collectives the compiler inserted (where, why, bytes, est. time) and
      those written in ``shard_map`` bodies; ``collectives()`` the inserted ones as
      ``[(kind, axes)]``.
    """

    def __init__(self, name, program, in_tree, out_tree, compiled: Compiled | None = None):
        self.name = name
        self.program = program
        self.in_tree = in_tree
        self.out_tree = out_tree
        self.compiled = compiled

    @property
    def per_device_program(self):
        return self.compiled.manual if self.compiled is not None else self.program

    def as_text(self) -> str:
        if self.compiled is not None:
            return self.compiled.as_text()
        return f"# global program (jit({self.name}), no shardings)\n{self.program}"

    def collectives(self) -> list[tuple[str, tuple]]:
        return self.compiled.collectives() if self.compiled is not None else []

    def explain(self) -> str:
        if self.compiled is not None:
            head = self.compiled.explain()
        else:
            head = f"jit({self.name}): no shardings given or found; the compiler inserted nothing."
        written = inspect.collectives_of(self.per_device_program)
        if self.compiled is not None:      # the compiler's own show up above
            written = [c for c in written if c.where != f"shard_map({self.name})"]
        if not written:
            return head
        lines = [head, f"{len(written)} collective{'s' if len(written) != 1 else ''} written in "
                       f"shard_map bodies:"]
        lines += [f"  {c.op}({','.join(c.axes)}) in {c.where}: {np.dtype(c.dtype).name}"
                  f"{list(c.shape)}, {c.bytes_per_device:,} B per device" for c in written]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Jitted
# ---------------------------------------------------------------------------------------------

def _hashable_static(v, name):
    try:
        hash(v)
    except TypeError:
        raise TypeError(f"jit({name}): static argument {v!r} is not hashable; static arguments "
                        f"key the compilation cache, so pass a tuple instead of a list.") from None
    return v


def _is_sharding_leaf(x):
    return x is None or isinstance(x, (NamedSharding, PartitionSpec))


def _check_argnums(f, name, **argnums):
    """``static_argnums`` / ``donate_argnums`` must name positional parameters of ``f`` (when its
    signature says how many it takes), as JAX checks; returns them with negative ones counted
    from the end."""
    try:
        params = signature(f).parameters.values()
    except (TypeError, ValueError):
        return tuple(argnums.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return tuple(argnums.values())
    n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    for what, nums in argnums.items():
        for i in nums:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"jit({name}): {what}={nums!r} holds {i!r}; give argument positions "
                                f"as integers.")
            if not -n <= i < n:
                raise ValueError(f"jit({name}): {what}={nums!r}, but {name} takes only {n} "
                                 f"positional argument{'s' if n != 1 else ''}.")
    return tuple(tuple(i % n for i in nums) for nums in argnums.values())


class Jitted:
    """What ``spmd.jit`` returns: call it, ``.lower(*args)`` it."""

    def __init__(self, f, *, in_shardings=None, out_shardings=None, donate_argnums=(),
                 static_argnums=(), static_argnames=(), name=None, executor=None,
                 cost_model=None, donate_argnames=()):
        self.f = f
        self.static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
        self.static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        self.name = name or getattr(f, "__qualname__", getattr(f, "__name__", "function"))
        self.executor = executor
        self.in_shardings = in_shardings
        self.out_shardings = out_shardings
        self.donate_argnums = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
        self.cost_model = cost_model
        self.static_argnums, self.donate_argnums = _check_argnums(
            f, self.name, static_argnums=self.static_argnums, donate_argnums=self.donate_argnums)
        self.donate_argnames, by_name = _donate_argnames(f, self.name, donate_argnames)
        self.donate_argnums = tuple(sorted(set(self.donate_argnums) | set(by_name)))
        self.explicit = (in_shardings is not None or out_shardings is not None
                         or bool(self.donate_argnums) or bool(self.donate_argnames))
        self._traces = _cache.LRU()     # trace key -> (program, in_tree, out_tree)
        self._compiled = _cache.LRU()   # (trace key, mesh, specs, cost model) -> Compiled
        self._calls = _cache.LRU()      # (trace key, context, leaf shardings) -> (Compiled, paths)
        functools.update_wrapper(self, f)

    # -- tracing ---------------------------------------------------------------------------------
    def _split(self, args, kwargs):
        static = tuple((i, _hashable_static(args[i], self.name)) for i in self.static_argnums if i < len(args))
        static_kw = tuple(sorted((k, _hashable_static(v, self.name)) for k, v in kwargs.items()
                                 if k in self.static_argnames))
        dyn_args = [a for i, a in enumerate(args) if i not in self.static_argnums]
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        return static, static_kw, dyn_args, dyn_kwargs

    def _trace(self, args, kwargs):
        """``(key, (program, in_tree, out_tree), leaves)`` for this call's dynamic arguments."""
        if self.static_argnums or self.static_argnames:
            static, static_kw, dyn_args, dyn_kwargs = self._split(args, kwargs)
        else:
            static, static_kw, dyn_args, dyn_kwargs = (), (), list(args), kwargs
        leaves, in_tree = optree.tree_flatten((dyn_args, dyn_kwargs), none_is_leaf=False)
        signatures = tuple(map(_signature, leaves))
        if _DELETED in signatures:
            self._refuse_deleted(args, kwargs)
        key = (in_tree, signatures, static, static_kw)
        hit = self._traces.get(key)
        if hit is None:
            avals = tuple(aval_of(x) for x in leaves)
            out_box = []

            def flat_fn(*tracers):
                a, kw = optree.tree_unflatten(in_tree, list(tracers))
                full = list(a)
                for i, v in sorted(static):
                    full.insert(i, v)
                out = self.f(*full, **kw, **dict(static_kw))
                out_leaves, out_tree = optree.tree_flatten(out, none_is_leaf=False)
                out_box.append(out_tree)
                return out_leaves

            program, captured = trace(flat_fn, avals, context=f"jit({self.name})")
            assert not captured
            # values the function computed but does not return (the loss under spmd.grad) go
            program = dce(program)
            hit = (program, in_tree, out_box[0])
            self._traces.put(key, hit)
        return key, hit, leaves

    def _refuse_deleted(self, args, kwargs):
        """Raise naming the (first) argument whose buffer was donated or deleted."""
        leaves = optree.tree_leaves((args, kwargs), none_is_leaf=False)
        paths = optree.tree_paths((args, kwargs), none_is_leaf=False)
        path = next(p for p, x in zip(paths, leaves) if isinstance(x, Array) and x.is_deleted())
        where = ("args" if path[0] == 0 else "kwargs") + "".join(f"[{k!r}]" for k in path[1:])
        raise _deleted_argument(self.name, where)

    # -- shardings -------------------------------------------------------------------------------
    def _uses_compiler(self, program, leaves) -> bool:
        if self.explicit:
            return True
        needs = _needs.get(program)
        if needs is None:
            needs = _needs[program] = _program_needs(program)
        return needs if needs is not None else _sharded_arguments(leaves)

    def _argument_names(self, args, kwargs) -> list[str]:
        """Each dynamic argument leaf as ``explain()`` names it: its pytree path under the name
        of its parameter (``params['layers'][0]['w1']``; ``args[2]`` where the signature
        gives no name)."""
        try:
            params = signature(self.f).parameters.values()
        except (TypeError, ValueError):
            params = ()
        positional = [p.name for p in params
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        _, _, dyn_args, dyn_kwargs = self._split(args, kwargs)
        dynamic = [i for i in range(len(args)) if i not in self.static_argnums]

        def name(path):
            if path[0] == 1:                                # a keyword argument
                return str(path[1]) + _path_text(path[2:])
            i = dynamic[path[1]]
            return (positional[i] if i < len(positional) else f"args[{i}]") + _path_text(path[2:])
        return [name(p) for p in optree.tree_paths((dyn_args, dyn_kwargs), none_is_leaf=False)]

    def _arg_shardings(self, args, kwargs, leaves, program=None):
        """(mesh, per-leaf NamedSharding or None, leaf paths) for the dynamic arguments."""
        _, _, dyn_args, dyn_kwargs = self._split(args, kwargs)
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
                sub = self._sharding_leaves(s, a, f"in_shardings[{i}]", f"args[{i}]")
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
            mesh = get_mesh() or (program is not None and _constraint_mesh(program)) or None
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
        return mesh, final, paths

    def _sharding_leaves(self, spec, value, what, of):
        """One sharding (or None) per leaf of ``value`` from ``spec``, a prefix of its structure."""
        try:
            full = optree.tree_broadcast_prefix(spec, value, is_leaf=_is_sharding_leaf, none_is_leaf=True)
        except ValueError as e:
            raise ShardingError(f"jit({self.name}): {what} {spec!r} does not match the structure "
                                f"of {of} ({e}).") from None
        return optree.tree_leaves(full, is_leaf=_is_sharding_leaf, none_is_leaf=True)

    def _out_specs(self, out_tree, out_avals, mesh):
        if self.out_shardings is None:
            return [None] * len(out_avals)
        spec = self.out_shardings
        if _is_sharding_leaf(spec):
            spec_leaves = [spec] * out_tree.num_leaves
        else:
            out_struct = optree.tree_unflatten(out_tree, list(range(out_tree.num_leaves)))
            spec_leaves = self._sharding_leaves(spec, out_struct, "out_shardings",
                                                f"the outputs ({out_tree})")
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

    def _compile(self, args, kwargs, key, traced, leaves):
        # a call like an earlier one (the same arguments' shardings, mesh in context and cost
        # model) has its compiled program: no per-leaf paths, prefixes and checks again
        fast = (key, get_mesh(), self.cost_model or default_cost_model(),
                tuple(x.sharding if type(x) is Array else None for x in leaves))
        hit = self._calls.get(fast)
        if hit is not None:
            return hit
        hit = self._compile_slow(args, kwargs, key, traced, leaves)
        self._calls.put(fast, hit)
        return hit

    def _compile_slow(self, args, kwargs, key, traced, leaves):
        program, in_tree, out_tree = traced
        mesh, shardings, paths = self._arg_shardings(args, kwargs, leaves, program)
        ckey = (key, mesh, tuple(None if s is None else s.spec for s in shardings),
                self.cost_model or default_cost_model())
        comp = self._compiled.get(ckey)
        if comp is None:
            for e in program.eqns:
                m = e.params.get("mesh") if e.prim is sharding_constraint_p else None
                if m is not None and (tuple(m.axis_names) != tuple(mesh.axis_names)
                                      or tuple(m.axis_sizes) != tuple(mesh.axis_sizes)):
                    raise ShardingError(f"jit({self.name}): with_sharding_constraint uses mesh {m!r}, "
                                        f"but the arguments are on {mesh!r}.")
            ins = [None if s is None else Sharding.from_spec(s.spec, v.aval.ndim)
                   for s, v in zip(shardings, program.in_vars)]
            outs = self._out_specs(out_tree, program.out_avals, mesh)
            outs = _typed_outputs(program, outs, mesh)
            if self.out_shardings is None:
                outs = _gradients_like_parameters(args, self, out_tree, program, ins, outs)
            comp = compile_program(program, ins, outs, mesh, name=self.name,
                                   cost_model=self.cost_model, out_tree=out_tree,
                                   in_names=self._argument_names(args, kwargs),
                                   out_names=_output_names(out_tree))
            self._compiled.put(ckey, comp)
        return comp, paths

    # -- calling ---------------------------------------------------------------------------------
    def lower(self, *args, **kwargs) -> Lowered:
        key, traced, leaves = self._trace(args, kwargs)
        program, in_tree, out_tree = traced
        comp = (self._compile(args, kwargs, key, traced, leaves)[0]
                if self._uses_compiler(program, leaves) else None)
        return Lowered(self.name, program, in_tree, out_tree, comp)

    def __call__(self, *args, **kwargs):
        if current_builder() is not None:          # inside another trace: inline
            return self._inline(args, kwargs)
        key, traced, leaves = self._trace(args, kwargs)
        program, _, out_tree = traced
        if not self._uses_compiler(program, leaves):
            executor = self.executor or default_executor(lambda: _platform_of(program, leaves))
            leaves = [np.asarray(x) if type(x) in (bool, int, float, complex) else x for x in leaves]
            outs = [_as_array(o) for o in executor.run(program, leaves)]
            return optree.tree_unflatten(out_tree, _on_devices(outs, leaves))
        comp, paths = self._compile(args, kwargs, key, traced, leaves)
        outs = run_compiled(comp, leaves, paths, self.executor)
        for i in self._donated_leaves(args, kwargs):
            if isinstance(leaves[i], Array):
                leaves[i].delete()
        return optree.tree_unflatten(comp.out_tree, outs)

    def _inline(self, args, kwargs):
        """The call inside another trace (``vmap``, ``grad``, an outer ``jit``): ``f`` itself,
        with ``in_shardings`` / ``out_shardings`` as sharding constraints on its arguments and
        results (under ``vmap`` the batch dim is left unsplit), as JAX's nested jit does."""
        if self.in_shardings is not None and not (self.static_argnums or self.static_argnames):
            spec = self.in_shardings
            spec = (spec,) * len(args) if _is_sharding_leaf(spec) else tuple(spec)
            args = self._constrained(tuple(args), spec + (None,) * (len(args) - len(spec)),
                                     "in_shardings")
        out = self.f(*args, **kwargs)
        return out if self.out_shardings is None else self._constrained(out, self.out_shardings,
                                                                          "out_shardings")

    def _constrained(self, value, spec, what):
        vals, tree = optree.tree_flatten(value, none_is_leaf=False)
        specs = self._sharding_leaves(spec, value, what, what)
        what = f"jit({self.name}) {what}"
        return optree.tree_unflatten(tree, [
            v if s is None else constrain(v, as_sharding(s, what=what), what)
            for v, s in zip(vals, specs)])

    def _donated_leaves(self, args, kwargs):
        if not self.donate_argnums and not self.donate_argnames:
            return []
        idx, start = [], 0
        dyn = [i for i in range(len(args)) if i not in self.static_argnums]
        for i in dyn:
            n = optree.tree_structure(args[i], none_is_leaf=False).num_leaves
            if i in self.donate_argnums:
                idx.extend(range(start, start + n))
            start += n
        for k in sorted(set(kwargs) - set(self.static_argnames)):   # keyword arguments flatten after
            n = optree.tree_structure(kwargs[k], none_is_leaf=False).num_leaves
            if k in self.donate_argnames:
                idx.extend(range(start, start + n))
            start += n
        return idx

    def _cache_size(self) -> int:
        return len(self._traces)


def _donate_argnames(f, name, names):
    """``donate_argnames`` as names (for keyword arguments) and the positions of the positional
    parameters they name, as JAX resolves them from ``f``'s signature."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names:
        return (), ()
    try:
        params = list(signature(f).parameters.values())
    except (TypeError, ValueError):
        return names, ()
    known = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    unknown = [n for n in names if n not in known and not takes_kwargs]
    if unknown:
        raise ValueError(f"jit({name}): donate_argnames={names!r} names {unknown[0]!r}, which is "
                         f"not a parameter of {name} (its parameters: {', '.join(sorted(known))}).")
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, tuple(positional.index(n) for n in names if n in positional)


def _path_text(path) -> str:
    return "".join(f"[{p!r}]" for p in path)


def _output_names(out_tree) -> list[str]:
    """Each output leaf as ``explain()`` names it: ``output[1]['layers'][0]['w1']``."""
    struct = optree.tree_unflatten(out_tree, [0] * out_tree.num_leaves)
    return ["output" + _path_text(p) for p in optree.tree_paths(struct, none_is_leaf=False)]


_DELETED = object()         # the signature of a donated or deleted Array (the call is refused)


def _signature(x):
    """What the program traced for argument ``x`` depends on: its shape and dtype (and, on
    Explicit mesh axes, its sharding), or, for a Python scalar (weakly typed), its type."""
    t = type(x)
    if t is Array:
        known = x.__dict__
        sig = known.get("_signature")            # an Array's type never changes: once per Array
        if sig is None or "_deleted" in known:
            if x.is_deleted():
                return _DELETED
            sig = x._signature = (aval_of(x) if x.sharding.mesh.explicit_axes
                                  else (x.shape, x.dtype))
        return sig
    if t is np.ndarray or isinstance(x, np.generic):
        return x.shape, x.dtype
    if t in (bool, int, float, complex):
        return t
    return aval_of(x)


def _program_needs(program) -> bool | None:
    """Whether ``program`` runs through the compiler whatever its arguments (True), never
    (False: a ``shard_map`` inside already says where everything lives), or only when an
    argument is split over a mesh (None), as ``jax.jit`` follows its arguments' shardings."""
    # a sharding constraint, or results whose type (on Explicit axes) splits them over an axis
    # a shard_map left out
    constrained = _constraint_mesh(program) is not None
    # a shard_map result that is a sum still pending (out_specs P(unreduced=...)): the compiler
    # makes the sum where the program needs it
    pending = any(v.aval.sharding is not None and v.aval.sharding.spec.unreduced
                  for e in program.eqns for v in e.outputs) or any(
        s.unreduced for e in program.eqns if e.prim.manual is not None
        for s in e.params["in_specs"] + e.params["out_specs"])
    if constrained or pending:
        return True
    return False if _has_manual_subprogram(program) else None


_needs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()     # Program -> _program_needs


def _sharded_arguments(leaves) -> bool:
    return any(type(x) is Array and x.sharding.mesh.size > 1 and not x.sharding.is_fully_replicated
               for x in leaves)


def _has_manual_subprogram(program) -> bool:
    return any(e.prim.manual is not None for e in program.eqns)


def _constraint_mesh(program) -> Mesh | None:
    """The concrete mesh of the first sharding constraint of ``program`` over several devices,
    or of a shard_map over some axes whose result's type splits it over the other Explicit
    ones (the compiler places it there)."""
    for e in program.eqns:
        m = e.params.get("mesh")
        if not isinstance(m, Mesh) or m.size == 1:
            continue
        if e.prim is sharding_constraint_p:
            return m
        if e.prim.manual is not None and any(
                a not in e.params["manual_axes"] for v in e.outputs if v.aval.sharding is not None
                for ax in v.aval.sharding.spec.axes for a in ax):
            return m
    return None


def _typed_outputs(program, outs, mesh):
    """Outputs with no out_shardings take the sharding their type gives on a mesh whose axes
    are all Explicit (JAX's sharding in types), or else the ``with_sharding_constraint`` that
    computed them, as JAX honours a final constraint."""
    made_by = {id(v): e for e in program.eqns for v in e.outputs}
    explicit = len(mesh.explicit_axes) == len(mesh.axis_names)
    outs = list(outs)
    for k, v in enumerate(program.out_vars):
        if outs[k] is not None:
            continue
        t = getattr(v, "aval", None)
        e = made_by.get(id(v))
        if explicit and t is not None and t.sharding is not None:   # pending sums are made
            outs[k] = Sharding.from_spec(t.sharding.spec, t.ndim).without_partial()
        elif e is not None and e.prim is sharding_constraint_p:
            outs[k] = e.params["sharding"].without_partial()
    return outs


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


def _deleted_argument(name, where) -> RuntimeError:
    return RuntimeError(f"jit({name}): {where} was donated to an earlier call (donate_argnums) "
                        f"or deleted (Array.delete()), and its buffer is gone; pass a fresh array "
                        f"(donated and deleted arrays cannot be reused).")


def run_compiled(comp: Compiled, leaves, paths, executor=None):
    """Place the arguments as the compiled program expects, run it, wrap the outputs."""
    mesh = comp.mesh
    named = getattr(comp, "_named", None)
    if named is None:           # made once per compiled program, not per argument per call
        named = comp._named = ([NamedSharding(mesh, sh.spec) for sh in comp.prop.in_shardings],
                               [NamedSharding(mesh, sh.spec) for sh in comp.prop.out_shardings])
    placed = []
    for x, want, p in zip(leaves, named[0], paths):
        if isinstance(x, Array):
            if x.is_deleted():
                raise _deleted_argument(comp.name, p)
            if not (x.sharding is want or (x.sharding.mesh == mesh
                                            and x.sharding.is_equivalent_to(want, x.ndim))):
                x = device_put(x, want)
        else:
            x = device_put(np.asarray(x), want)
        placed.append(x)
    executor = executor or default_executor(lambda: mesh.platform if isinstance(mesh, Mesh)
                                            else None)
    if not executor.takes_padded_storage:
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
    for o, shape, ns in zip(outs, comp.out_shapes, named[1]):
        if isinstance(o, GlobalValue):
            result.append(_array_of(o, shape, ns))
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

@_cache.memoize
def _reshard_compiled(shape, dtype, mesh, src_spec, dst_spec):
    prog, _ = trace(lambda x: [x], [Aval(shape, np.dtype(dtype))], context="reshard")
    nd = len(shape)
    return compile_program(prog, [Sharding.from_spec(src_spec, nd)], [Sharding.from_spec(dst_spec, nd)],
                           mesh, name="reshard")


def reshard_planned(x, sharding: NamedSharding):
    """``x`` (an Array on ``sharding.mesh``) moved to ``sharding`` by the planner's collectives."""
    comp = _reshard_compiled(tuple(x.shape), np.dtype(x.dtype), sharding.mesh, x.sharding.spec,
                             sharding.spec)
    return run_compiled(comp, [x], ["x"])[0]


# ---------------------------------------------------------------------------------------------
# the public function
# ---------------------------------------------------------------------------------------------

def jit(f=None, *, in_shardings=None, out_shardings=None, donate_argnums=(), static_argnums=(),
        static_argnames=(), _name=None, executor=None, cost_model=None, donate_argnames=()):
    """Trace ``f`` once per argument types (and static arguments), cache the program, run it.

    With ``in_shardings`` / ``out_shardings`` / ``donate_argnums``, or sharded ``Array``
    arguments, the sharding compiler (``spmd.compiler``) propagates shardings and inserts the
    collectives.
    """
    if f is None:
        return functools.partial(jit, in_shardings=in_shardings, out_shardings=out_shardings,
                                 donate_argnums=donate_argnums, static_argnums=static_argnums,
                                 static_argnames=static_argnames, _name=_name, executor=executor,
                                 cost_model=cost_model, donate_argnames=donate_argnames)
    return Jitted(f, in_shardings=in_shardings, out_shardings=out_shardings,
                  donate_argnums=donate_argnums, static_argnums=static_argnums,
                  static_argnames=static_argnames, name=_name, executor=executor,
                  cost_model=cost_model, donate_argnames=donate_argnames)


class ShapeDtypeStruct:
    """A shape, a dtype and optionally a sharding, standing for an array (JAX's
    ``jax.ShapeDtypeStruct``): what ``eval_shape`` takes and returns, and how ``pure_callback``
    declares its results."""
    __slots__ = ("shape", "dtype", "sharding", "weak_type")

    def __init__(self, shape, dtype, *, sharding=None, weak_type=False):
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        self.sharding, self.weak_type = sharding, bool(weak_type)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape)))

    def _key(self):
        return (self.shape, self.dtype, self.sharding, self.weak_type)

    def __eq__(self, other):
        return isinstance(other, ShapeDtypeStruct) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        extra = (f", sharding={self.sharding}" if self.sharding is not None else "") + \
            (", weak_type=True" if self.weak_type else "")
        return f"ShapeDtypeStruct(shape={self.shape}, dtype={self.dtype.name}{extra})"


def eval_shape(fun, *args, **kwargs):
    """The shapes, dtypes (and, on Explicit mesh axes, shardings) of ``fun(*args, **kwargs)``
    as ``ShapeDtypeStruct``s, by tracing only: nothing runs.  Arguments may be arrays or
    ``ShapeDtypeStruct``s.

    >>> import numpy as np, spmd
    >>> spmd.eval_shape(lambda x, y: x @ y, spmd.ShapeDtypeStruct((4, 3), np.float32), np.ones((3, 2), np.float32))
    ShapeDtypeStruct(shape=(4, 2), dtype=float32)
    """
    leaves, tree = optree.tree_flatten((args, kwargs), none_is_leaf=False)

    def aval(x):
        if isinstance(x, ShapeDtypeStruct):
            return Aval(x.shape, x.dtype, weak=x.weak_type, sharding=sharding_type(x.sharding, x.ndim)
                        if isinstance(x.sharding, NamedSharding) else None)
        return aval_of(x)
    box = []

    def flat(*xs):
        a, kw = optree.tree_unflatten(tree, list(xs))
        out, out_tree = optree.tree_flatten(fun(*a, **kw), none_is_leaf=False)
        box.append(out_tree)
        return out
    name = getattr(fun, "__name__", "function")
    program, _ = trace(flat, [aval(x) for x in leaves], context=f"eval_shape({name})")
    return optree.tree_unflatten(box[0], [
        ShapeDtypeStruct(v.aval.shape, v.aval.dtype, sharding=v.aval.sharding, weak_type=v.aval.weak)
        for v in program.out_vars])


def make_program(f, *, static_argnums=()):
    """``make_program(f)(*args)`` returns the Program that ``f`` traces to (like make_jaxpr)."""
    def build(*args, **kwargs):
        return Jitted(f, static_argnums=static_argnums).lower(*args, **kwargs).program
    return build


hooks.execute, hooks.jit, hooks.reshard, hooks.constrain = execute, jit, reshard_planned, constrain
