"""Sharded data parallelism: FSDP / ZeRO-3, and ZeRO-1 / ZeRO-2 optimizer sharding.

**FSDP (ZeRO-3)**: each parameter is stored split along dim 0 over the data axis
(``P("data")``: 1/n of the parameters per device). A layer gathers its parameters just before
use; differentiating through the gather gives the gradient already reduce-scattered, because
the transpose of a tiled ``all_gather`` is a ``psum_scatter``::

    forward, per layer:   w = all_gather(w_shard, "data", tiled=True)        # all_gather
    backward, per layer:  grad(w_shard) = psum_scatter(grad(w), "data")       # psum_scatter

The forward's gathered parameters are kept for the backward (no second gather); wrap the layer
in ``spmd.checkpoint`` to gather again instead. The optimizer then runs on the shards
(elementwise optimizers need no collective; state is 1/n per device too; a global-norm clip
needs the norm over all shards, so run it on the global arrays outside the ``shard_map``, as
``examples/train_fsdp.py`` does). ``fsdp_apply`` issues
the gather of layer ``i + 1`` before the compute of layer ``i``, so a backend that overlaps
communication with compute can hide it.

**ZeRO-1 / ZeRO-2**: parameters replicated, optimizer state split along dim 0.
``zero_update`` averages each device's gradient (ZeRO-1: ``psum``, then each device keeps its
slice; ZeRO-2: ``psum_scatter``, so only a slice of the gradient is ever materialized),
updates its slice of the parameters with its slice of the state, and ``all_gather``\\ s the new
parameters.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..collectives import all_gather, axis_index, axis_size, psum, psum_scatter
from ..sharding import PartitionSpec
from ..tree_util import tree_leaves, tree_map
from .. import optim


def gather_params(shards, axis_name):
    """Each leaf's blocks along dim 0 gathered from every device of ``axis_name``
    (one tiled ``all_gather`` per leaf; its gradient is one ``psum_scatter``)."""
    return tree_map(lambda s: all_gather(s, axis_name, axis=0, tiled=True), shards)


def fsdp_apply(layer_fn: Callable, layer_shards, x, axis_name):
    """``x`` through ``layer_fn(params, x)`` for each entry of ``layer_shards`` (stored split
    over ``axis_name``), gathering layer ``i + 1``'s parameters before computing layer ``i``.

    Collectives: forward one ``all_gather`` per leaf per layer; backward one ``psum_scatter``
    per leaf per layer."""
    upcoming = gather_params(layer_shards[0], axis_name)
    for i in range(len(layer_shards)):
        params = upcoming
        if i + 1 < len(layer_shards):
            upcoming = gather_params(layer_shards[i + 1], axis_name)
        x = layer_fn(params, x)
    return x


def state_specs(state, axis_name):
    """The ``PartitionSpec`` of each leaf of optimizer ``state`` when parameters are split along
    dim 0 over ``axis_name``: ``P(axis_name)`` for arrays, ``P()`` for scalars (step counts)."""
    return tree_map(lambda s: PartitionSpec(axis_name) if np.ndim(s) else PartitionSpec(), state)


def _check_divisible(params, axis_name):
    n = axis_size(axis_name)
    for x in tree_leaves(params):
        if not np.ndim(x) or x.shape[0] % n:
            raise ValueError(f"ZeRO over axis {axis_name!r}: a parameter of shape {x.shape} "
                             f"does not split along dim 0 over the axis's {n} devices; pad "
                             f"dim 0 to a multiple of {n}.")


def _my_slice(x, axis_name):
    """This device's block of dim 0 of an invariant ``x`` (no communication)."""
    n = axis_size(axis_name)
    return np.reshape(x, (n, x.shape[0] // n) + x.shape[1:])[axis_index(axis_name)]


def zero_update(tx: optim.GradientTransformation, grads, state_shards, params, axis_name, *,
                stage: int = 2):
    """One ZeRO step inside a ``shard_map`` body: ``(new_params, new_state_shards)``.

    ``grads``: this device's gradients (varying over ``axis_name``); ``params``: replicated;
    ``state_shards``: this device's slice (dim 0) of ``tx``'s state. Collectives per leaf:
    stage 1: ``psum`` of the gradient and ``all_gather`` of the parameters; stage 2:
    ``psum_scatter`` and ``all_gather`` (half of stage 1's bytes for the reduction).
    """
    _check_divisible(params, axis_name)
    n = axis_size(axis_name)
    if stage == 1:
        g = tree_map(lambda g: _my_slice(psum(g, axis_name) / np.asarray(n, g.dtype), axis_name),
                     grads)
    elif stage == 2:
        g = tree_map(lambda g: psum_scatter(g, axis_name, scatter_dimension=0, tiled=True)
                     / np.asarray(n, g.dtype), grads)
    else:
        raise ValueError(f"zero_update: stage={stage!r}; use 1 (optimizer state sharded) or 2 "
                         f"(state and gradients sharded); for stage 3 store the parameters "
                         f"sharded and use fsdp_apply")
    mine = tree_map(lambda p: _my_slice(p, axis_name), params)
    updates, state_shards = tx.update(g, state_shards, mine)
    mine = optim.apply_updates(mine, updates)
    new = tree_map(lambda p: all_gather(p, axis_name, axis=0, tiled=True, to="invariant"), mine)
    return new, state_shards
