"""Data parallelism: every device holds the whole model and a slice of the batch; gradients
are averaged over the data axis.

Inside a ``shard_map`` body, differentiate the local loss with respect to parameters marked
varying (``pvary``) to get each device's own gradient, then average them::

    grads = spmd.grad(local_loss)(spmd.pvary(params, "data"), batch)   # no collective
    grads = mean_gradients(grads, "data", bucket_bytes=2**20)          # psum per bucket

``mean_gradients`` packs the leaves into flat buckets of about ``bucket_bytes`` (as DDP does)
and issues one ``psum`` per bucket instead of one per leaf; ``compress`` is a communication
hook that runs on each bucket around the all-reduce, as torch's DDP hooks do
(``bf16_compress`` / ``fp16_compress``: cast down, all-reduce, cast back).
"""
from __future__ import annotations

import math
from typing import Callable

import ml_dtypes
import numpy as np

from ..collectives import axis_size, psum
from ..tree_util import tree_flatten, tree_unflatten


def _kind(leaf):
    """What leaves of one bucket share: the dtype, and the mesh axes they vary over (a leaf
    replicated over a tensor-parallel axis must not become varying by sharing a bucket)."""
    return np.dtype(leaf.dtype), getattr(getattr(leaf, "aval", None), "vma", None)


def _buckets(leaves, bucket_bytes):
    """Runs of leaf indices of one kind, in order, each of about ``bucket_bytes`` (one leaf at
    least)."""
    runs, open_runs = [], {}
    for i, leaf in enumerate(leaves):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        run, size = open_runs.get(_kind(leaf), ([], 0))
        if run and size + nbytes > bucket_bytes:
            runs.append(run)
            run, size = [], 0
        open_runs[_kind(leaf)] = (run + [i], size + nbytes)
    return runs + [run for run, _ in open_runs.values()]


def allreduce_hook(bucket, axis_name):
    """The default communication hook: the sum over ``axis_name`` (one ``psum``)."""
    return psum(bucket, axis_name)


def _compress_hook(dtype, name):
    def hook(bucket, axis_name):
        n = axis_size(axis_name)
        small = (bucket / np.asarray(n, bucket.dtype)).astype(dtype)
        return psum(small, axis_name).astype(bucket.dtype) * np.asarray(n, bucket.dtype)
    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = (f"A communication hook that halves the bytes sent: divide by the group size, "
                    f"all-reduce in {np.dtype(dtype).name}, cast back (as torch's "
                    f"``{name}_hook``); the sum loses precision.")
    return hook


bf16_compress = _compress_hook(ml_dtypes.bfloat16, "bf16_compress")
fp16_compress = _compress_hook(np.float16, "fp16_compress")


def mean_gradients(grads, axis_name, *, bucket_bytes: int | None = None,
                   compress: Callable = allreduce_hook):
    """The mean of each device's ``grads`` over ``axis_name``: ``psum / n`` per bucket.

    Collectives: ``bucket_bytes=None``: one ``psum`` per leaf; otherwise one ``psum`` per
    bucket of about ``bucket_bytes`` (leaves ravelled and concatenated, split back after).
    """
    leaves, treedef = tree_flatten(grads)
    n = axis_size(axis_name)
    if bucket_bytes is None:
        runs = [[i] for i in range(len(leaves))]
    else:
        runs = _buckets(leaves, bucket_bytes)
    out = [None] * len(leaves)
    for run in runs:
        if len(run) == 1:
            leaf = leaves[run[0]]
            out[run[0]] = compress(leaf, axis_name) / np.asarray(n, leaf.dtype)
            continue
        flat = np.concatenate([np.ravel(leaves[i]) for i in run])
        total = compress(flat, axis_name) / np.asarray(n, flat.dtype)
        offsets = np.cumsum([0] + [math.prod(leaves[i].shape) for i in run])
        for i, start, stop in zip(run, offsets[:-1], offsets[1:]):
            out[i] = np.reshape(total[int(start):int(stop)], leaves[i].shape)
    return tree_unflatten(treedef, out)
