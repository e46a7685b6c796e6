"""Tensor parallelism (Megatron-LM): weights split over a ``model`` axis.

A two-layer block is a column-parallel linear (weight split by output columns, no
communication) followed by a row-parallel linear (weight split by input rows, partial sums
added by one ``psum``)::

    h = act(column_parallel_linear(x, w1_shard))        # x replicated: forward nothing
    y = row_parallel_linear(h, w2_shard, "model")        # forward: psum over "model"

In the backward pass the gradient of ``x`` is summed over ``model`` (one ``psum``: the
transpose of the implicit ``pvary`` where the replicated ``x`` meets the split weight), so a
block costs one all-reduce forward and one backward. With ``scatter_dimension`` the
row-parallel output is reduce-scattered along the sequence instead (sequence parallelism:
``spmd.parallel.sequence``).

The vocabulary of an embedding table and of the output logits can be split the same way:
``vocab_parallel_embedding`` looks up the rows a device holds and sums (one ``psum``);
``vocab_parallel_cross_entropy`` computes the softmax over split logits with one ``pmax`` (of
values without gradient) and two ``psum``\\ s of per-token scalars, never gathering the logits.
"""
from __future__ import annotations

import numpy as np

from ..collectives import axis_index, pmax, psum, psum_scatter
from ..prims import stop_gradient


def column_parallel_linear(x, w_shard, b_shard=None):
    """``x @ w_shard (+ b_shard)``: this device's output columns. No forward collective."""
    y = x @ w_shard
    return y if b_shard is None else y + b_shard


def row_parallel_linear(x_shard, w_shard, axis_name, b=None, *, scatter_dimension=None):
    """``sum over axis_name of x_shard @ w_shard (+ b)``: one ``psum``, or with
    ``scatter_dimension`` one ``psum_scatter`` leaving that dim split over the axis."""
    partial = x_shard @ w_shard
    if scatter_dimension is None:
        y = psum(partial, axis_name)
    else:
        y = psum_scatter(partial, axis_name, scatter_dimension=scatter_dimension, tiled=True)
    return y if b is None else y + b


def _vocab_range(axis_name, local_size):
    start = axis_index(axis_name) * local_size
    return start, start + local_size


def vocab_parallel_embedding(ids, table_shard, axis_name):
    """Rows ``ids`` of a table split by rows (vocabulary) over ``axis_name``: each device looks
    up the ids in its range, zeros elsewhere; one ``psum``."""
    start, stop = _vocab_range(axis_name, table_shard.shape[0])
    inside = (ids >= start) & (ids < stop)
    rows = np.take(table_shard, np.where(inside, ids - start, 0), axis=0)
    return psum(rows * inside[..., None].astype(rows.dtype), axis_name)


def vocab_parallel_cross_entropy(logits_shard, labels, axis_name):
    """Per-token ``logsumexp(logits) - logits[label]`` for logits split along the last dim
    (vocabulary) over ``axis_name``: one ``pmax`` and two ``psum``\\ s of per-token values."""
    local_max = stop_gradient(np.max(logits_shard, axis=-1))
    top = stop_gradient(pmax(local_max, axis_name))
    shifted = logits_shard - top[..., None]
    total = psum(np.sum(np.exp(shifted), axis=-1), axis_name)
    start, stop = _vocab_range(axis_name, logits_shard.shape[-1])
    inside = (labels >= start) & (labels < stop)
    local = np.where(inside, labels - start, 0)
    picked = np.take_along_axis(shifted, local[..., None], axis=-1)[..., 0]
    target = psum(np.where(inside, picked, np.zeros_like(picked)), axis_name)
    return np.log(total) - target
