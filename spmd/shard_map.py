"""``shard_map``: run a per-device function over a mesh, with specs for inputs and outputs.

Inside the body every value has a vma (the mesh axes it varies over).  An ``in_specs`` entry
naming axis ``a`` makes the argument varying over ``a``; closed-over values are invariant.
``out_specs`` that omit a manual axis promise the output is invariant over it: checked.
"""
from __future__ import annotations

import functools
import math

import optree

from . import _cache
from .core import (Aval, Primitive, Program, Tracer, short_repr, aval_of, bind, current_builder,
                   hooks, trace)
from .errors import ShardingError, VmaError
from .mesh import AbstractMesh, AxisType, Mesh, get_mesh
from .sharding import NamedSharding, PartitionSpec, check_spec, sharding_type
from . import prims
from .batching import batch_size, moveaxis, to_front
from .collectives import psum_p, pvary_p, vary_unreduced_cast_p
from .transforms import ad
from .transforms.vmap import batch_eval


def _shard_map_abstract(*avals, body, mesh, in_specs, out_specs, manual_axes, check_vma, name):
    outs = []
    for aval, spec in zip(body.out_avals, out_specs):
        shape = list(aval.shape)
        for d, axes in enumerate(spec.axes):
            shape[d] *= math.prod(mesh.axis_size(a) for a in axes)
        # Inside an enclosing shard_map, an output varies over the outer axes its body value
        # varies over (the body's types cover the outer manual axes too), not over every axis
        # some input varies over.  Outside any, on Explicit axes, out_specs is its type.
        vma = aval.vma - set(manual_axes)
        if aval.sharding is not None:   # the body's type on the other Explicit axes joins
            inner = aval.sharding._dim_axes(len(shape))
            spec = PartitionSpec(*[tuple(a) + tuple(b) or None
                                   for a, b in zip(spec.axes + ((),) * len(shape), inner)],
                                 unreduced=spec.unreduced, reduced=spec.reduced)
        typed = None if vma else sharding_type(NamedSharding(mesh, spec), len(shape))
        outs.append(Aval(tuple(shape), aval.dtype, vma, sharding=typed))
    return outs


def _shard_map_vma(*avals, **_):
    return frozenset()                     # per output, from the body: see _shard_map_abstract


def _shard_map_execute(run, *, body, mesh, in_specs, out_specs, manual_axes, check_vma, name):
    return run.manual(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                      manual_axes=manual_axes, check_vma=check_vma)


def _shard_map_manual(params):
    """Over all of its mesh with checked types, a shard_map is a per-device region that the
    sharding compiler keeps as it is (see ``Primitive.RULES['manual']``)."""
    p = params
    if set(p["manual_axes"]) != set(p["mesh"].axis_names) or not p["check_vma"]:
        return None
    return p["mesh"], p["in_specs"], p["out_specs"], p["body"]


shard_map_p = Primitive("shard_map", abstract=_shard_map_abstract, multiple_results=True,
                        vma=_shard_map_vma, execute=_shard_map_execute, manual=_shard_map_manual)


# Autodiff: the JVP, the partial evaluation and the transpose of a shard_map are shard_maps of
# the JVP, the partial evaluation and the transpose of its body.

def _body_ctx(mesh, manual_axes, check_vma, outer_manual=None):
    if outer_manual is None:
        b = current_builder()
        outer_manual = b.manual_axes if b is not None else ()
    manual = set(outer_manual) | set(manual_axes)
    return dict(mesh=mesh, manual_axes=tuple(a for a in mesh.axis_names if a in manual),
                check_vma=check_vma)


def _shard_map_jvp(primals, tangents, *, body, mesh, in_specs, out_specs, manual_axes, check_vma, name):
    nonzero = [not ad.is_zero(t) for t in tangents]
    jbody = ad.jvp_program(body, nonzero, _body_ctx(mesh, manual_axes, check_vma))
    outs = bind(shard_map_p, *primals, *[t for t in tangents if not ad.is_zero(t)], body=jbody,
                mesh=mesh, in_specs=tuple(in_specs) + tuple(s for s, nz in zip(in_specs, nonzero) if nz),
                out_specs=tuple(out_specs) * 2, manual_axes=manual_axes, check_vma=check_vma, name=name)
    return outs[:len(out_specs)], outs[len(out_specs):]


def _residual_spec(aval, mesh, manual_axes):
    """Out/in spec of a residual crossing from the known to the unknown shard_map: stacked
    along dim 0 over the manual axes it varies over.  Scalars get a leading dim of 1."""
    axes = tuple(a for a in mesh.axis_names if a in aval.vma and a in manual_axes)
    lift = bool(axes) and aval.ndim == 0
    return PartitionSpec(axes) if axes else PartitionSpec(), lift


def _shard_map_partial_eval(eqn, unknown_ins, ctx):
    p = eqn.params
    body, mesh, manual = p["body"], p["mesh"], p["manual_axes"]
    bctx = _body_ctx(mesh, manual, p["check_vma"], ctx.get("manual_axes", ()))
    known, unknown, out_unknown, n_res = ad.partial_eval_program(body, unknown_ins, bctx)
    residuals = unknown.in_vars[:n_res]
    n_known_out = len(known.out_vars) - n_res
    position = {id(v): i for i, v in enumerate(body.in_vars)}
    computed = [i for i, r in enumerate(residuals) if id(r) not in position]
    specs = {i: _residual_spec(residuals[i].aval, mesh, manual) for i in computed}

    def known_body(*args):
        outs = ad.eval_program(known, args)
        res = outs[n_known_out:]
        return outs[:n_known_out] + [bind(prims.reshape_p, res[i], shape=(1,)) if specs[i][1] else res[i]
                                     for i in computed]
    kbody, _ = trace(known_body, known.in_avals, **bctx)
    kin = [a for a, u in zip(eqn.inputs, unknown_ins) if not u]
    kparams = dict(p, body=kbody, in_specs=tuple(s for s, u in zip(p["in_specs"], unknown_ins) if not u),
                   out_specs=tuple(s for s, u in zip(p["out_specs"], out_unknown) if not u)
                   + tuple(specs[i][0] for i in computed))
    keqn = ad.new_eqn(shard_map_p, kin, kparams)
    keqn.outputs[:n_known_out] = [v for v, u in zip(eqn.outputs, out_unknown) if not u]
    res_outer = iter(keqn.outputs[n_known_out:])

    res_in, res_specs, res_avals = [], [], []
    for i, r in enumerate(residuals):
        if id(r) in position:               # a body input: pass the outer value straight in
            j = position[id(r)]
            res_in.append(eqn.inputs[j])
            res_specs.append(p["in_specs"][j])
            res_avals.append(r.aval)
        else:
            res_in.append(next(res_outer))
            res_specs.append(specs[i][0])
            res_avals.append(r.aval.update(shape=(1,)) if specs[i][1] else r.aval)

    def unknown_body(*args):
        res = [bind(prims.reshape_p, a, shape=()) if i in specs and specs[i][1] else a
               for i, a in enumerate(args[:n_res])]
        return ad.eval_program(unknown, res + list(args[n_res:]))
    uin_avals = [v.aval for v, u in zip(body.in_vars, unknown_ins) if u]
    ubody, _ = trace(unknown_body, res_avals + uin_avals, **bctx)
    uparams = dict(p, body=ubody,
                   in_specs=tuple(res_specs) + tuple(s for s, u in zip(p["in_specs"], unknown_ins) if u),
                   out_specs=tuple(s for s, u in zip(p["out_specs"], out_unknown) if u))
    ueqn = ad.new_eqn(shard_map_p, res_in + [a for a, u in zip(eqn.inputs, unknown_ins) if u], uparams,
                      outputs=[v for v, u in zip(eqn.outputs, out_unknown) if u])
    return [keqn], ueqn, out_unknown


def _shard_map_transpose(cts, *invals, body, mesh, in_specs, out_specs, manual_axes, check_vma, name):
    ctx = _body_ctx(mesh, manual_axes, check_vma)
    linear = [ad.is_undefined(x) for x in invals]
    consts = [x for x in invals if not ad.is_undefined(x)]
    cts = [ad.instantiate(ct) for ct in cts]
    ct_avals = []
    for ct, spec, o in zip(cts, out_specs, body.out_avals):
        named = {a for axes in spec.axes for a in axes} if check_vma else set(manual_axes)
        ct_avals.append(o.update(vma=frozenset(ad.aval_of_value(ct).vma) | named,
                                 unreduced=o.reduced, reduced=o.unreduced))
    live = ad.linear_vars(body, linear)
    n = len(consts)
    ct_out_specs = tuple(_cotangent_spec(s) for s, l in zip(in_specs, linear) if l)

    def transposed_body(*args):
        cts_in = []
        for ct, v, spec in zip(args[n:], body.out_vars, out_specs):
            if not check_vma:
                # Untyped: an output that out_specs does not split over an axis is taken from
                # one device but may be computed on all of them; like JAX, each device gets its
                # share of the cotangent, and psum (below, and its transpose) adds them back.
                named = {a for axes in spec.axes for a in axes}
                share = math.prod(mesh.axis_size(a) for a in manual_axes if a not in named)
                cts_in.append(ct / share if share > 1 else ct)
                continue
            # an output typed invariant over an axis that out_specs tiles it over: every copy's
            # cotangent flows back into the one value
            extra = tuple(a for a in mesh.axis_names if a in ct.aval.vma - v.aval.vma and a in manual_axes)
            cts_in.append(bind(psum_p, ct, axes=extra, groups=None) if extra and id(v) in live else ct)
        out = ad.backward_pass(body, linear, args[:n], cts_in)
        lin_vars = [v for v, l in zip(body.in_vars, linear) if l]
        if check_vma:   # the cotangent of a reduced input is a pending sum, a zero one too
            return [_as_spec_says(ad.instantiate(c, v.aval), s, mesh, zero=ad.is_zero(c))
                    for c, v, s in zip(out, lin_vars, ct_out_specs)]
        out = [ad.instantiate(c, v.aval) for c, v in zip(out, lin_vars)]
        # Untyped (check_vma=False): every value counts as varying, so an input replicated over
        # an axis its spec omits collects its cotangent from every device here.
        specs = [s for s, l in zip(in_specs, linear) if l]
        unnamed = [tuple(a for a in manual_axes if a not in {x for axes in s.axes for x in axes}) for s in specs]
        return [bind(psum_p, c, axes=u, groups=None) if u else c for c, u in zip(out, unnamed)]
    tbody, _ = trace(transposed_body, [v.aval for v, l in zip(body.in_vars, linear) if not l] + ct_avals, **ctx)
    outs = iter(bind(shard_map_p, *consts, *cts, body=tbody, mesh=mesh,
                     in_specs=tuple(s for s, l in zip(in_specs, linear) if not l)
                     + tuple(map(_cotangent_spec, out_specs)),
                     out_specs=ct_out_specs, manual_axes=manual_axes,
                     check_vma=check_vma, name=f"transpose({name})"))
    return [next(outs) if l else None for l in linear]


def _cotangent_spec(spec: PartitionSpec) -> PartitionSpec:
    """The spec of a cotangent: a pending sum's is reduced there, a reduced value's pending."""
    return PartitionSpec(*spec, unreduced=spec.reduced, reduced=spec.unreduced)


def _as_spec_says(x, spec, mesh, zero=False):
    """A body result made a pending sum over the axes its out_specs entry names unreduced
    where it varies (JAX casts it so); a symbolic zero is one, whatever its type."""
    missing = tuple(a for a in mesh.axis_names if a in spec.unreduced - x.aval.unreduced)
    if not missing or not (zero or set(missing) <= x.aval.vma):
        return x
    if zero:
        x = bind(pvary_p, x, axes=tuple(a for a in missing if a not in x.aval.vma))
    return bind(vary_unreduced_cast_p, x, axes=missing)


def _shard_map_batch(vals, dims, *, body, mesh, in_specs, out_specs, manual_axes, check_vma, name):
    """vmap of a shard_map: a shard_map of the batched body, the batch dim never split."""
    size = batch_size(vals, dims)
    vals = [moveaxis(v, d, 0) if d is not None else v for v, d in zip(vals, dims)]
    bdims = [0 if d is not None else None for d in dims]
    unsplit = lambda s: PartitionSpec(None, *s)
    avals = [v.aval.update(shape=(size,) + v.aval.shape) if d is not None else v.aval
             for v, d in zip(body.in_vars, bdims)]

    def batched_body(*xs):
        outs, odims = batch_eval(body, xs, bdims, size)
        return [to_front(o, d, size) for o, d in zip(outs, odims)]
    bbody, _ = trace(batched_body, avals, **_body_ctx(mesh, manual_axes, check_vma))
    outs = bind(shard_map_p, *vals, body=bbody, mesh=mesh,
                in_specs=tuple(unsplit(s) if d is not None else s for s, d in zip(in_specs, bdims)),
                out_specs=tuple(unsplit(s) for s in out_specs), manual_axes=manual_axes,
                check_vma=check_vma, name=name)
    return outs, [0] * len(outs)


shard_map_p.jvp = _shard_map_jvp
shard_map_p.transpose = _shard_map_transpose
shard_map_p.batch = _shard_map_batch
shard_map_p.partial_eval = _shard_map_partial_eval


def _fn_name(f) -> str:
    return getattr(f, "__qualname__", getattr(f, "__name__", repr(f)))


def _path_str(path) -> str:
    return "".join(f"[{p!r}]" for p in path)


def shard_map(f=None, /, *, out_specs, in_specs=None, mesh=None, axis_names=None, check_vma=True,
              check_rep=None):
    """Map ``f`` over the devices of ``mesh``; ``f`` sees per-device blocks.

    Usable as ``shard_map(f, mesh=..., in_specs=..., out_specs=...)`` and as a decorator with
    keywords only.  ``mesh=None`` takes the mesh of ``with spmd.set_mesh(mesh):``;
    ``in_specs=None`` takes the arguments' own shardings.  ``axis_names`` makes only those
    axes manual (the others stay with the caller).

    Gradients: ``grad`` of a function that calls a ``shard_map`` is the gradient of the
    *global* function it computes.  For a parameter that enters with spec ``P()`` (or is
    closed over) that is the sum of every device's contribution.  For per-device gradients,
    take ``grad`` inside the body with respect to ``spmd.pvary(w, axis)`` (each device then
    differentiates its own copy; see ``spmd.transforms.api``).
    """
    if f is None:
        return functools.partial(shard_map, out_specs=out_specs, in_specs=in_specs, mesh=mesh,
                                 axis_names=axis_names, check_vma=check_vma, check_rep=check_rep)
    if check_rep is not None:
        check_vma = check_rep
    name = _fn_name(f)
    if mesh is not None and not isinstance(mesh, (Mesh, AbstractMesh)):
        raise TypeError(f"shard_map({name}): mesh={short_repr(mesh)} is a {type(mesh).__name__}; pass "
                        f"an spmd.Mesh (spmd.make_mesh(shape, names)) or an AbstractMesh.")

    eager = _cache.LRU()       # (mesh, specs taken from the arguments) -> the jit that runs it

    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        if kwargs:
            raise TypeError(f"shard_map({name}) was called with keyword arguments "
                            f"{sorted(kwargs)}; in_specs match positional arguments only, so pass "
                            f"them positionally (or close over them).")
        b = current_builder()
        m = mesh if mesh is not None else get_mesh()
        if m is None and b is not None:                  # nested: the enclosing mesh
            m = b.mesh
        if m is None and in_specs is None:               # the arguments' own mesh
            m = next((s.mesh for s in _arg_specs(f"shard_map({name})", args, sharding=True)), None)
        if m is None:
            raise ShardingError(f"shard_map({name}): no mesh; pass mesh=... or call inside "
                                f"`with spmd.set_mesh(mesh):`.")
        if b is None:
            # Called eagerly: trace and run the one shard_map through jit (cached per layout).
            if not isinstance(m, Mesh):                 # an AbstractMesh: no devices
                m = _concrete_mesh(name, m, args)
            specs = in_specs
            if specs is None:
                specs = optree.tree_unflatten(optree.tree_structure(args, none_is_leaf=False),
                                              _arg_specs(f"shard_map({name})", args))
            key = (m, None if in_specs is not None else
                   (optree.tree_structure(args, none_is_leaf=False), tuple(optree.tree_leaves(
                       specs, is_leaf=lambda x: isinstance(x, PartitionSpec), none_is_leaf=False))))
            run = eager.get(key)
            if run is None:
                run = hooks.jit(lambda *a: _bind_shard_map(f, name, m, a, specs, out_specs,
                                                           axis_names, check_vma),
                                _name=f"shard_map({name})")
                eager.put(key, run)
            return run(*args)
        return _bind_shard_map(f, name, m, args, in_specs, out_specs, axis_names, check_vma)

    return wrapped


def _concrete_mesh(name, abstract, args):
    """An eager call runs on devices: the mesh of ``abstract``'s shape that the arguments are
    on, or else the one of ``with spmd.set_mesh(mesh):`` (JAX takes it from the same places)."""
    arg_meshes = [leaf.sharding.mesh for leaf in optree.tree_leaves(args, none_is_leaf=False)
                  if isinstance(leaf, hooks.array_types)]
    for m in arg_meshes + [get_mesh()]:
        if isinstance(m, Mesh) and m.abstract_mesh == abstract:
            return m
    raise ShardingError(
        f"shard_map({name}): mesh={abstract!r} is an AbstractMesh (axis names and sizes, no "
        f"devices), and an eager call must run on devices, but no argument is an spmd.Array on "
        f"a mesh of that shape and no `with spmd.set_mesh(mesh):` gives one. Pass the concrete "
        f"mesh (mesh=mesh instead of mesh.abstract_mesh), device_put the arguments onto it, or "
        f"call inside `with spmd.set_mesh(mesh):`.")


def _arg_specs(ctx, args, sharding=False):
    """``in_specs=None``: each argument's own PartitionSpec (or NamedSharding)."""
    leaves = optree.tree_leaves(args, none_is_leaf=False)
    paths = [f"args{_path_str(p)}" for p in optree.tree_paths(args, none_is_leaf=False)]
    out = []
    for leaf, path in zip(leaves, paths):
        typed = getattr(getattr(leaf, "aval", None), "sharding", None)   # on Explicit axes
        if typed is not None:
            out.append(typed if sharding else typed.spec)
            continue
        if not isinstance(leaf, hooks.array_types):
            inside = (" (inside a traced function only values on Explicit mesh axes carry their "
                      "sharding in their type)") if current_builder() is not None else ""
            raise ShardingError(f"{ctx}: in_specs=None takes each argument's own sharding, but "
                                f"{path} is not an spmd.Array{inside}; pass in_specs.")
        out.append(leaf.sharding if sharding else leaf.sharding.spec)
    return out


def _abstract(mesh):
    return mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh


def _keep_axes(spec: PartitionSpec, axes) -> PartitionSpec:
    return PartitionSpec(*[tuple(a for a in ax if a in axes) or None for ax in spec.axes])


def _inner_type(aval, mesh, manual):
    """Inside a shard_map over some axes, a value keeps its type on the other Explicit axes
    (on the mesh with the manual ones typed Manual)."""
    if aval.sharding is None or not mesh.explicit_axes:
        return None
    rest = [tuple(a for a in ax if a not in manual) for ax in aval.sharding.spec.axes]
    if not any(rest):
        return None
    inner = mesh.abstract_mesh.update_axis_types({a: AxisType.Manual for a in manual})
    return NamedSharding(inner, PartitionSpec(*[ax or None for ax in rest]))


def _bind_shard_map(f, name, mesh, args, in_specs, out_specs, axis_names, check_vma):
    ctx = f"shard_map({name})"
    outer = current_builder()
    outer_manual = outer.manual_axes if outer is not None else ()
    if outer_manual and outer.mesh is not None and _abstract(mesh) != _abstract(outer.mesh):
        raise ShardingError(
            f"{ctx}: nested inside a shard_map over mesh {_abstract(outer.mesh)}, it maps over "
            f"mesh {_abstract(mesh)}; a nested shard_map must use the enclosing mesh (pass the "
            f"same mesh, or leave mesh= out to take it from the enclosing shard_map).")
    manual = tuple(a for a in mesh.axis_names
                   if (axis_names is None or a in axis_names) and a not in outer_manual)
    if axis_names is not None:
        for a in axis_names:
            if a not in mesh.axis_names:
                raise ShardingError(f"{ctx}: axis_names names {a!r}, which is not in the mesh "
                                    f"{mesh.axis_names}.")
    leaves, tree = optree.tree_flatten(args, none_is_leaf=False)
    paths = [f"args{_path_str(p)}" for p in optree.tree_paths(args, none_is_leaf=False)]
    if in_specs is None:    # the arguments' own: their manual axes split them, the rest types them
        own = _arg_specs(ctx, args)
        specs = [None if sp is None else _keep_axes(sp, manual) for sp in own]
    else:
        specs = _broadcast_specs(ctx, "in_specs", in_specs, args, tree, len(leaves))
    # An in_specs entry None passes its argument into the body as it is (JAX): closed over,
    # so the same on every device, not split and not an operand of the shard_map.
    passed = {i: leaf for i, (leaf, spec) in enumerate(zip(leaves, specs)) if spec is None}
    if passed:
        leaves, specs, paths = ([x for i, x in enumerate(xs) if i not in passed]
                                for xs in (leaves, specs, paths))
    in_avals = []
    for leaf, spec, path in zip(leaves, specs, paths):
        aval = aval_of(leaf)
        _check_spec_for(ctx, "in_specs", path, spec, mesh, aval.ndim, manual)
        _check_pending_argument(ctx, path, spec, aval)
        shape = list(aval.shape)
        for d, axes in enumerate(spec.axes):
            n = math.prod(mesh.axis_size(a) for a in axes)
            if shape[d] % n:
                raise ShardingError(
                    f"{ctx}: argument {path} has shape {tuple(aval.shape)}; dim {d} (size "
                    f"{shape[d]}) is split over mesh axis {axes if len(axes) > 1 else axes[0]!r} "
                    f"({n} devices) by in_specs {spec}, but does not divide evenly. shard_map "
                    f"needs divisible dims: pad the array, or use spmd.jit, which handles uneven "
                    f"dims.")
            shape[d] //= n
        vma = set(aval.vma)
        vma |= set(manual) if not check_vma else {a for axes in spec.axes for a in axes}
        in_avals.append(Aval(tuple(shape), aval.dtype, frozenset(vma),
                             sharding=_inner_type(aval, mesh, manual),
                             unreduced=spec.unreduced & set(manual) if check_vma else frozenset(),
                             reduced=spec.reduced & set(manual) if check_vma else frozenset()))

    out_tree_box = []

    def body_flat(*tracers):
        mapped = iter(tracers)
        full = [passed[i] if i in passed else next(mapped) for i in range(tree.num_leaves)]
        out = f(*optree.tree_unflatten(tree, full))
        out_leaves, out_tree = optree.tree_flatten(out, none_is_leaf=False)
        specs = _broadcast_specs(ctx, "out_specs", out_specs, out, out_tree, out_tree.num_leaves)
        out_tree_box.append((out, out_tree, specs))
        return [_as_spec_says(x, s, mesh) if check_vma and isinstance(x, Tracer) else x
                for x, s in zip(out_leaves, specs)]

    all_manual = tuple(a for a in mesh.axis_names if a in set(outer_manual) | set(manual))
    body, captured = trace(body_flat, in_avals, mesh=mesh, manual_axes=all_manual,
                           check_vma=check_vma, context=ctx)
    out_struct, out_tree, out_specs_flat = out_tree_box[0]
    out_paths = [f"output{_path_str(p)}" for p in optree.tree_paths(out_struct, none_is_leaf=False)]
    for aval, spec, path in zip(body.out_avals, out_specs_flat, out_paths):
        _check_spec_for(ctx, "out_specs", path, spec, mesh, aval.ndim, manual)
        if check_vma:
            _check_pending(ctx, path, spec, aval, manual)
            named = {a for axes in spec.axes for a in axes}
            for a in manual:
                if a in aval.vma and a not in named:
                    raise VmaError(
                        f"{ctx}: out_specs {spec} for {path} omits mesh axis {a!r}, promising the "
                        f"value is the same on every device along {a!r}, but it varies over "
                        f"{a!r} ({aval}). Reduce it first (psum/pmean/all_gather(..., "
                        f"to='invariant') over {a!r}) or name {a!r} in out_specs.")
    specs = list(specs) + [PartitionSpec()] * len(captured)
    outs = bind(shard_map_p, *leaves, *captured, body=body, mesh=mesh,
                in_specs=tuple(specs), out_specs=tuple(out_specs_flat), manual_axes=manual,
                check_vma=check_vma, name=name)
    return optree.tree_unflatten(out_tree, outs)


def _check_pending(ctx, path, spec, aval, manual):
    """out_specs' unreduced and reduced axes must be the body value's (JAX's check)."""
    for a in manual:
        if (a in spec.unreduced) != (a in aval.unreduced):
            says = "a sum still pending" if a in spec.unreduced else "not a pending sum"
            raise ShardingError(
                f"{ctx}: out_specs {spec} for {path} says the value is {says} over mesh axis "
                f"{a!r} (unreduced), but it is {aval}. Name {a!r} in unreduced={{...}} exactly "
                f"where the value is unreduced (pcast(x, {a!r}, to='unreduced') makes a varying "
                f"value so; psum makes the sum).")
        if (a in spec.reduced) != (a in aval.reduced):
            raise ShardingError(
                f"{ctx}: out_specs {spec} for {path} should be equal to the reduced present on "
                f"the value ({aval}) over mesh axis {a!r}: name it in reduced={{...}} exactly "
                f"where the value is reduced (pcast(x, {a!r}, to='reduced')).")


def _check_pending_argument(ctx, path, spec, aval):
    """in_specs' unreduced and reduced axes must be the argument's type's (JAX's check): a
    pending sum enters the body as one, and nothing else becomes one at the boundary."""
    typed = aval.sharding.spec if aval.sharding is not None else PartitionSpec()
    for kind in ("unreduced", "reduced"):
        if getattr(spec, kind) != getattr(typed, kind):
            raise ShardingError(
                f"{ctx}: in_specs {spec} for {path} should be equal to the {kind} present on the "
                f"argument ({aval}, {kind} over {sorted(getattr(typed, kind))}): name in "
                f"{kind}={{...}} exactly the mesh axes the argument's type does, or reshard the "
                f"argument first (spmd.reshard(x, P(..., {kind}={{...}}))).")


def _check_spec_for(ctx, which, path, spec, mesh, ndim, manual):
    if not isinstance(spec, PartitionSpec):
        raise ShardingError(f"{ctx}: {which} entry for {path} is {spec!r}, not a PartitionSpec.")
    check_spec(spec, mesh, ndim, what=f"{ctx}: {which} {spec} for {path}")
    if spec.unreduced or spec.reduced:
        kinds = " and ".join(k for k in ("unreduced", "reduced") if getattr(spec, k))
        if set(manual) != set(mesh.axis_names):
            raise NotImplementedError(f"{ctx}: {which} {spec} for {path}: {kinds} axes can only "
                                      f"be passed when shard_map is manual over every mesh axis.")
        if any(t is not AxisType.Explicit for t in mesh.axis_types):
            raise ShardingError(f"{ctx}: {which} {spec} for {path}: {kinds} axes can only be used "
                                f"when the mesh passed to shard_map has only Explicit axes "
                                f"(its axis types: {mesh.axis_types}).")
    for axes in spec.axes:
        for a in axes:
            if a not in manual:
                raise ShardingError(f"{ctx}: {which} {spec} for {path} names mesh axis {a!r}, which "
                                    f"is not manual here (manual axes: {manual}).")


def _broadcast_specs(ctx, which, specs, struct, tree, n):
    """Expand a spec pytree (a prefix of the value's structure) to one spec per leaf."""
    if which == "in_specs" and isinstance(specs, list):
        specs = tuple(specs)
    if which == "in_specs" and not isinstance(specs, (tuple, PartitionSpec)):
        specs = (specs,)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    none_leaf = which == "in_specs"    # an in_specs None passes its arguments through
    try:
        full = optree.tree_broadcast_prefix(specs, struct, is_leaf=is_spec, none_is_leaf=none_leaf)
    except ValueError as e:
        what = "arguments" if which == "in_specs" else "outputs"
        raise ShardingError(
            f"{ctx}: {which} {specs!r} does not match the structure of the {what} ({tree}); "
            f"give one spec per {what[:-1]}, or a single P for all. ({e})") from None
    out = optree.tree_leaves(full, is_leaf=is_spec, none_is_leaf=none_leaf)
    if none_leaf:                      # the specs of the value's leaves, not of its Nones
        values = optree.tree_leaves(struct, none_is_leaf=True)
        out = [s for s, v in zip(out, values) if v is not None]
    if len(out) != n:
        raise ShardingError(f"{ctx}: {which} gives {len(out)} specs for {n} values.")
    return out
