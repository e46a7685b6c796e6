"""Run the same shard_map program with JAX (``jax.shard_map`` and ``jax.lax`` collectives).

Test bodies are written once against a small namespace of collectives (``SPMD`` or ``JAX``
below), so one function is traced by both frameworks::

    body = lambda C, x: C.psum(x * 2, "i")
    run_spmd(body, mesh, P("i"), P(), x)  ==  run_jax(body, mesh, P("i"), P(), x)

Where JAX's spelling or support differs, the ``JAX`` namespace emulates spmd's meaning:
``pvary`` is ``pcast(..., to="varying")``; ``all_gather(to="invariant")`` is JAX's
``"invarying"``; ``ppermute`` over an axis tuple numbers devices in the tuple's order (JAX's
own ppermute uses mesh order there, unlike its ``axis_index`` and ``all_gather``);
``pbroadcast`` (no CPU lowering in JAX) is its documented meaning, a masked ``psum``.
"""
from __future__ import annotations

import functools
import types

import numpy as np

import spmd


def _spmd_namespace():
    names = ("psum pmean pmax pmin all_gather psum_scatter all_to_all ppermute pbroadcast "
             "axis_index axis_size pvary").split()
    ns = {n: getattr(spmd, n) for n in names}
    ns["np"] = np
    ns["shard_map"] = spmd.shard_map
    ns["name"] = "spmd"
    return types.SimpleNamespace(**ns)


SPMD = _spmd_namespace()


@functools.cache
def _jax():
    import jax
    import jax.numpy as jnp
    lax = jax.lax

    def all_gather(x, axis_name, *, axis_index_groups=None, axis=0, tiled=False, to="varying"):
        to = {"invariant": "invarying"}.get(to, to)
        return lax.all_gather(x, axis_name, axis_index_groups=axis_index_groups, axis=axis,
                              tiled=tiled, to=to)

    def pvary(x, axis_name):
        return lax.pcast(x, axis_name, to="varying")

    def ppermute(x, axis_name, perm):
        # JAX numbers the devices of an axis tuple in mesh order for ppermute (but in the tuple's
        # order for axis_index and all_gather); spmd uses the tuple's order throughout.
        axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
        mesh_order = tuple(a for a in jax.sharding.get_abstract_mesh().axis_names if a in axes)
        sizes = {a: lax.axis_size(a) for a in axes}

        def to_mesh_order(i):
            coords = dict(zip(axes, np.unravel_index(i, [sizes[a] for a in axes])))
            return int(np.ravel_multi_index([coords[a] for a in mesh_order],
                                            [sizes[a] for a in mesh_order]))
        perm = [(to_mesh_order(s), to_mesh_order(d)) for s, d in perm]
        return lax.ppermute(x, mesh_order, perm)

    def pbroadcast(x, axis_name, source):
        # JAX's own pbroadcast has no CPU lowering; this is its documented meaning.
        mine = lax.axis_index(axis_name) == source
        return lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), axis_name)

    def shard_map(f, *, in_specs, out_specs, axis_names=None, check_vma=True):
        # nested: JAX takes the mesh from the enclosing shard_map's context
        kw = {} if axis_names is None else {"axis_names": frozenset(axis_names)}
        return jax.shard_map(f, in_specs=_tree_specs(in_specs, jax_spec),
                             out_specs=_tree_specs(out_specs, jax_spec), check_vma=check_vma, **kw)

    return types.SimpleNamespace(
        shard_map=shard_map, psum=lax.psum, pmean=lax.pmean, pmax=lax.pmax, pmin=lax.pmin, all_gather=all_gather,
        psum_scatter=lax.psum_scatter, all_to_all=lax.all_to_all, ppermute=ppermute,
        pbroadcast=pbroadcast, axis_index=lax.axis_index, axis_size=lax.axis_size, pvary=pvary,
        np=jnp, name="jax")


def jax_namespace():
    return _jax()


@functools.cache
def jax_mesh(shape: tuple[int, ...], names: tuple[str, ...]):
    """A JAX mesh over the first prod(shape) CPU devices, in the order spmd uses."""
    import jax
    n = int(np.prod(shape))
    return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def jax_spec(spec: spmd.PartitionSpec):
    import jax
    return jax.sharding.PartitionSpec(*spec)


def _tree_specs(specs, to):
    import optree
    return optree.tree_map(to, specs, is_leaf=lambda s: isinstance(s, spmd.PartitionSpec),
                           none_is_leaf=False)


def run_jax(body, mesh: spmd.Mesh, in_specs, out_specs, *args, check_vma=True, axis_names=None):
    """``body(JAX, *blocks)`` under ``jax.jit(jax.shard_map(...))`` on the mesh of the same shape;
    returns NumPy arrays (a pytree like the body's output)."""
    import jax
    import optree
    jmesh = jax_mesh(tuple(mesh.axis_sizes), tuple(mesh.axis_names))
    kw = {} if axis_names is None else {"axis_names": frozenset(axis_names)}
    f = jax.shard_map(lambda *xs: body(_jax(), *xs), mesh=jmesh,
                      in_specs=_tree_specs(in_specs, jax_spec),
                      out_specs=_tree_specs(out_specs, jax_spec), check_vma=check_vma, **kw)
    # the programs are tiny: XLA's optimisation passes cost more than they save
    compiled = jax.jit(f).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    out = compiled(*args)
    return optree.tree_map(np.asarray, out)


def run_spmd(body, mesh: spmd.Mesh, in_specs, out_specs, *args, check_vma=True, axis_names=None,
             executor=None):
    """``body(SPMD, *blocks)`` under ``spmd.jit(spmd.shard_map(...))``; returns the raw outputs
    (``spmd.Array`` from the stacked executor, NumPy arrays from the reference executor)."""
    f = spmd.shard_map(lambda *xs: body(SPMD, *xs), mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs, check_vma=check_vma, axis_names=axis_names)
    return spmd.jit(f, executor=executor)(*args)
