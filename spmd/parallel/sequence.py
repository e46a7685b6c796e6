"""Sequence parallelism: activations split along the sequence over a ``seq`` axis.

**Regions** (Megatron-SP): layer norm, dropout and residual adds work on sequence-split
activations with no communication; before a tensor-parallel block the sequence is gathered
(``gather_sequence``: one ``all_gather``), and its row-parallel linear ends in a
``psum_scatter`` along the sequence instead of a ``psum`` (``row_parallel_linear(...,
scatter_dimension=...)``), so each device keeps only its part of the activations.

**Ring attention**: each device keeps its query block and passes its key/value block around
the ring; after ``n - 1`` ``ppermute``\\ s every query block has met every key block. Scores
are folded into an online softmax (running maximum, running sum, rescaled accumulator), and
the causal mask compares global positions, so the result equals attention over the whole
sequence::

    acc, m, l = online_softmax(q, kv_block, causal mask)          # the device's own block
    for step in range(1, n):
        kv_block = ppermute(kv_block, "seq", ring)                 # n - 1 ppermutes
        acc, m, l = online_softmax(q, kv_block, acc, m, l, causal mask)   # block i - step

**All-to-all (Ulysses) attention**: one ``all_to_all`` turns (sequence-split, all heads) q, k,
v into (whole sequence, a slice of the heads); attention runs locally per head; one
``all_to_all`` turns the result back. The number of heads must be divisible by the axis size.
"""
from __future__ import annotations

import numpy as np

from ..collectives import all_gather, all_to_all, axis_index, axis_size, ppermute

_MASKED = -1e30     # finite: a block whose keys are all in the future adds exactly nothing


def gather_sequence(x, axis_name, *, axis: int = 1):
    """The whole sequence from its blocks along ``axis`` (one ``all_gather``; its gradient
    is one ``psum_scatter``)."""
    return all_gather(x, axis_name, axis=axis, tiled=True)


def attention(q, k, v, *, causal: bool = True):
    """Softmax attention over ``(batch, heads, seq, head_dim)`` arrays, the reference the
    parallel forms equal."""
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(np.float32(q.shape[-1])).astype(q.dtype)
    if causal:
        s = q.shape[-2]
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, np.asarray(_MASKED, q.dtype))
    scores = scores - np.max(scores, axis=-1, keepdims=True)
    weights = np.exp(scores)
    return (weights / np.sum(weights, axis=-1, keepdims=True)) @ v


def ring_attention(q, k, v, axis_name, *, causal: bool = True):
    """Attention of this device's query block over the whole sequence, split along dim -2
    over ``axis_name`` (blocks in device order). Collectives: ``n - 1`` ``ppermute``\\ s of
    the stacked key/value block."""
    n, me = axis_size(axis_name), axis_index(axis_name)
    block = q.shape[-2]
    scale = (1 / np.sqrt(np.float32(q.shape[-1]))).astype(q.dtype)
    q_pos = me * block + np.arange(block)[:, None]
    ring = [(i, (i + 1) % n) for i in range(n)]

    def weights_of(keys, source, new_max=None):
        """The block's scores, its row maxima folded into ``new_max``, and exp(scores - max)
        with future keys at exactly 0."""
        scores = q @ np.swapaxes(keys, -1, -2) * scale
        visible = (source * block + np.arange(block)[None, :]) <= q_pos
        if causal:
            scores = np.where(visible, scores, np.asarray(_MASKED, q.dtype))
        block_max = np.max(scores, axis=-1, keepdims=True)
        new_max = block_max if new_max is None else np.maximum(new_max, block_max)
        weights = np.exp(scores - new_max)
        return new_max, np.where(visible, weights, np.zeros_like(weights)) if causal else weights

    # the device's own block first: every query sees at least itself there
    kv = np.stack([k, v])
    run_max, weights = weights_of(kv[0], me)
    run_sum, acc = np.sum(weights, axis=-1, keepdims=True), weights @ kv[1]
    for step in range(1, n):
        kv = ppermute(kv, axis_name, ring)                 # now block (me - step) mod n
        new_max, weights = weights_of(kv[0], (me - step) % n, run_max)
        rescale = np.exp(run_max - new_max)
        run_sum = run_sum * rescale + np.sum(weights, axis=-1, keepdims=True)
        acc = acc * rescale + weights @ kv[1]
        run_max = new_max
    return acc / run_sum


def ulysses_attention(q, k, v, axis_name, *, causal: bool = True):
    """Attention for ``(batch, heads, seq_block, head_dim)`` blocks split along the sequence
    over ``axis_name``: two ``all_to_all``\\ s (q, k, v stacked into one; the output back)."""
    n = axis_size(axis_name)
    if q.shape[1] % n:
        raise ValueError(f"ulysses_attention over axis {axis_name!r}: {q.shape[1]} heads do not "
                         f"split over the axis's {n} devices; use a head count divisible by {n}, "
                         f"or ring_attention, which splits only the sequence.")
    qkv = all_to_all(np.stack([q, k, v]), axis_name, split_axis=2, concat_axis=3, tiled=True)
    out = attention(qkv[0], qkv[1], qkv[2], causal=causal)
    return all_to_all(out, axis_name, split_axis=2, concat_axis=1, tiled=True)
