"""Pipeline parallelism: consecutive stages of a model on the devices of a ``stage`` axis.

**GPipe**: the batch is cut into ``m`` microbatches. At tick ``t`` stage ``s`` works on
microbatch ``t - s``; between ticks every stage passes its output to the next with one
``ppermute``. Every device runs the same program at every tick, so in the ``p - 1`` ticks of
the fill and of the drain a stage computes on nothing (the bubble): ``(p - 1) / (m + p - 1)``
of all stage-ticks. The backward pass is the same schedule reversed (the transpose of each
``ppermute`` sends gradients to the previous stage)::

    for t in range(m + p - 1):                          # stage s: microbatch t - s
        x = microbatch[t] on stage 0, else what arrived
        y = stage_fn(stage_params, x)
        x = ppermute(y, "stage", [(s, s + 1) ...])      # one ppermute per tick
    outputs: psum over "stage" of the last stage's    # one psum

**1F1B** (``one_f_one_b``): a training step that runs each microbatch's backward as soon as
its gradient arrives instead of after all forwards. At every tick each stage runs one forward
(microbatch ``t - s``) and one backward (microbatch ``t - 2(p - 1) + s``), so a stage holds the
inputs of at most ``2p - 1`` microbatches in flight, whatever ``m``: GPipe holds the
activations of all ``m``. The backward recomputes the stage from its stashed input (``vjp``),
and gradients travel to the previous stage by the inverse ``ppermute``::

    for t in range(m + 2p - 2):
        y = stage_fn(params, x);   stash[t - s] = x                    # forward
        g = loss gradient on the last stage, else what arrived
        dparams, dx = vjp(stage_fn, params, stash[t - 2(p - 1) + s])(g)   # backward
        x, g = ppermute(y, forward), ppermute(dx, backward)            # 2 ppermutes

The ticks are lock-step (a forward and a backward slot in each), so the idle share is
``(2p - 2) / (m + 2p - 2)``, more than GPipe's, traded for the memory.

**Interleaved 1F1B** (``one_f_one_b(..., chunks=v)``): each device holds ``v`` model stages
(model stage ``c * p + s`` is chunk ``c`` of device ``s``) and microbatches go round the ring of
stages ``v`` times, in groups of ``p``. A tick is one chunk's forward and backward, ``1/v`` of a
stage's, and the fill and drain take ``p v + p - 2`` of them instead of ``v (2p - 2)``.

The ticks are a ``scan`` (after a first tick outside it that fixes the carry's type), so the
program holds the stage twice whatever the number of microbatches. ``schedule`` gives the
table of who works on what, for pictures and the bubble fraction.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..collectives import axis_index, axis_size, ppermute, psum
from ..control_flow import scan
from ..transforms.api import value_and_grad, vjp
from ..tree_util import tree_map


def _units(p: int, m: int, chunks: int):
    """Per stage (rows) and tick (columns) of the lock-step 1F1B schedule with ``chunks``
    model stages per device: ``(forward microbatch, forward chunk, backward microbatch,
    backward chunk)``, -1 when idle. Model stage ``c * p + s`` is chunk ``c`` of stage ``s``."""
    v = chunks
    ticks = m * v + p * v + p - 2
    t, s = np.arange(ticks)[None, :], np.arange(p)[:, None]

    def unit(u, chunk_of):
        ok = (u >= 0) & (u < m * v)
        return np.where(ok, (u // (p * v)) * p + u % p, -1), np.where(ok, chunk_of(u), -1)
    fwd_mb, fwd_chunk = unit(t - s, lambda u: (u // p) % v)
    # the first backward waits for microbatch 0 to leave the last model stage (tick p*v - 1)
    bwd_mb, bwd_chunk = unit(t - (p * v - 1) - (p - 1 - s), lambda u: v - 1 - (u // p) % v)
    return fwd_mb, fwd_chunk, bwd_mb, bwd_chunk


def schedule(stages: int, microbatches: int, kind: str = "gpipe", chunks: int = 1):
    """``(forward, backward)``: which microbatch each stage runs forward and backward in each
    unit of time (a forward or a backward of one stage, or of one chunk, on one microbatch),
    -1 when idle.

    ``gpipe``: all forwards (``m + p - 1`` ticks), then the same ticks reversed for the
    backward. ``1f1b``: ``one_f_one_b``'s lock-step ticks, each a forward then a backward.
    ``interleaved``: the same with ``chunks`` model stages per device
    (``one_f_one_b(..., chunks=v)``); ``schedule_chunks`` says which chunk each unit runs."""
    p, m = stages, microbatches
    if kind == "gpipe":
        ticks = m + p - 1
        mb = np.arange(ticks)[None, :] - np.arange(p)[:, None]
        forward = np.where((mb >= 0) & (mb < m), mb, -1)
        idle = np.full_like(forward, -1)
        return (np.concatenate([forward, idle], axis=1),
                np.concatenate([idle, forward[:, ::-1]], axis=1))
    if kind in ("1f1b", "interleaved"):
        v = _check_chunks(p, m, chunks if kind == "interleaved" else 1, "schedule")
        forward, _, backward, _ = _units(p, m, v)
        return _lock_step(forward, backward)
    raise ValueError(f"schedule: kind={kind!r}; use 'gpipe', '1f1b' or 'interleaved'")


def schedule_chunks(stages: int, microbatches: int, chunks: int):
    """``(forward, backward)`` of the ``interleaved`` schedule: the chunk each unit runs."""
    v = _check_chunks(stages, microbatches, chunks, "schedule_chunks")
    _, forward, _, backward = _units(stages, microbatches, v)
    return _lock_step(forward, backward)


def _lock_step(forward, backward):
    """Each tick as two units: its forward, then its backward."""
    p = forward.shape[0]
    idle = np.full_like(forward, -1)
    return (np.stack([forward, idle], axis=-1).reshape(p, -1),
            np.stack([idle, backward], axis=-1).reshape(p, -1))


def _check_chunks(p, m, chunks, where):
    if not isinstance(chunks, (int, np.integer)) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"{where}: chunks={chunks!r}; give the number of model stages per "
                         f"device, a positive int")
    if chunks > 1 and m % p:
        raise ValueError(f"{where}: {m} microbatches on {p} stages with chunks={chunks}: the "
                         f"interleaved schedule sends microbatches round in groups of {p}, so "
                         f"the number of microbatches must be a multiple of {p}")
    return int(chunks)


def bubble_fraction(forward, backward) -> float:
    """The share of stage time in a ``schedule`` spent idle."""
    return float(np.mean((forward < 0) & (backward < 0)))


def _check_stage(stage_fn, x, y, recipe, axis_name):
    if y.shape != x.shape or y.dtype != x.dtype:
        name = getattr(stage_fn, "__qualname__", repr(stage_fn))
        raise ValueError(f"{recipe} over axis {axis_name!r}: stage function {name} maps a "
                         f"microbatch {x.dtype}{list(x.shape)} to {y.dtype}{list(y.shape)}; each "
                         f"stage's output is the next stage's input, so it must keep the shape "
                         f"and dtype (project in and out of the pipeline outside it).")


def gpipe(stage_fn: Callable, stage_params, microbatches, axis_name):
    """The last stage's outputs for ``microbatches`` ``(m, ...)`` fed to the first stage.

    ``stage_params`` is this device's stage; ``stage_fn(params, x)`` keeps ``x``'s shape.
    The result ``(m, ...)`` is the same on every stage (one ``psum`` at the end). The ticks
    after the first are one ``scan`` (the program holds the stage twice, whatever ``m``)."""
    p, me = axis_size(axis_name), axis_index(axis_name)
    m = microbatches.shape[0]
    forward = [(s, s + 1) for s in range(p - 1)]

    def tick(arrived, fed):
        y = stage_fn(stage_params, np.where(me == 0, fed, arrived))
        return ppermute(y, axis_name, forward), y
    # the first tick outside the scan fixes the carry's type (the axes it varies over)
    first = stage_fn(stage_params, np.where(me == 0, microbatches[0],
                                            np.zeros_like(microbatches[0])))
    _check_stage(stage_fn, microbatches[0], first, "gpipe", axis_name)
    drain = np.zeros((p - 1,) + microbatches.shape[1:], microbatches.dtype)
    _, ys = scan(tick, ppermute(first, axis_name, forward),
                 np.concatenate([microbatches[1:], drain]))
    last = np.concatenate([first[None], ys])[p - 1:]
    return psum(np.where(me == p - 1, last, np.zeros_like(last)), axis_name)


def _in_range(i, m):
    return (i >= 0) & (i < m)


def one_f_one_b(stage_fn: Callable, stage_params, microbatches, targets, loss_fn: Callable,
                axis_name, *, chunks: int = 1):
    """``(loss, grads)``: the mean over microbatches of ``loss_fn(last stage output, target)``
    and its gradient with respect to this device's ``stage_params``, on the 1F1B schedule.

    ``microbatches`` and ``targets`` ``(m, ...)`` are the same on every stage;
    ``stage_fn(params, x)`` keeps ``x``'s shape. Collectives: two ``ppermute``\\ s per tick
    (activations forward, gradients backward) and one ``psum`` of the loss. Stashed inputs:
    ``min(m, 2p - 1)`` microbatches per stage. The ticks after the first are one ``scan``.

    **Interleaved** (``chunks=v > 1``): each device holds ``v`` model stages, the leaves of
    ``stage_params`` stacked on a leading axis of size ``v``; model stage ``c * p + s`` is
    chunk ``c`` of stage ``s``, so microbatches go round the stages ``v`` times (the
    ``ppermute``\\ s are rings) in groups of ``p`` (``m`` must be a multiple of ``p``). A tick
    is one chunk's forward and backward: ``m v + p v + p - 2`` ticks, so the idle share
    ``(p v + p - 2) / (m v + p v + p - 2)`` is below plain 1F1B's when ``p > 2`` (the
    ticks hold a forward and a backward slot, so the warm-up fills only the forward ones:
    equal on two stages); stashed inputs:
    ``min(m v, 2 p v - 1)``. ``grads`` has ``stage_params``' layout."""
    p, me = axis_size(axis_name), axis_index(axis_name)
    m = microbatches.shape[0]
    v = _check_chunks(p, m, chunks, "one_f_one_b")
    units, ticks = m * v, m * v + p * v + p - 2
    slots = min(units, 2 * p * v - 1)
    ring = [(s, (s + 1) % p) for s in range(p)] if v > 1 else [(s, s + 1) for s in range(p - 1)]
    forward, backward = ring, [(b, a) for a, b in ring]
    slot_ids = np.arange(slots).reshape((slots,) + (1,) * (microbatches.ndim - 1))
    fwd_mb, fwd_chunk, _, _ = _units(p, m, v)
    # what each tick reads: its number, stage 0's microbatch, the last stage's target
    fed = _per_tick(microbatches, np.where(fwd_chunk[0] == 0, fwd_mb[0], -1))
    wanted = _per_tick(targets, np.where(fwd_chunk[p - 1] == v - 1, fwd_mb[p - 1], -1))
    inputs = (np.arange(ticks, dtype=np.int32), fed, wanted)
    chunk = (lambda params, c: params) if v == 1 else (
        lambda params, c: tree_map(lambda a: a[c], params))

    def tick(carry, tick_inputs):
        arrived, returned, stash, grads, total = carry
        t, fed, target = tick_inputs
        u, w = t - me, t - (p * v - 1) - (p - 1 - me)       # this stage's forward, backward unit
        fwd_c, bwd_c = (u // p) % v, v - 1 - (w // p) % v
        stashed = (w // (p * v)) * (p * v) + bwd_c * p + w % p   # the forward unit w undoes
        x = np.where((me == 0) & (fwd_c == 0), fed, arrived)
        y = stage_fn(chunk(stage_params, fwd_c), x)
        _check_stage(stage_fn, x, y, "one_f_one_b", axis_name)
        stash = np.where((slot_ids == u % slots) & _in_range(u, units), x, stash)
        # the last model stage's backward is for the microbatch it just finished
        loss, dy = value_and_grad(loss_fn)(y, target)
        last = (me == p - 1) & (fwd_c == v - 1)
        total = total + np.where(last & _in_range(u, units), loss, np.zeros_like(loss))
        use = _in_range(w, units)
        x_b = np.sum(np.where((slot_ids == stashed % slots) & use, stash, np.zeros_like(stash)),
                     axis=0)
        g = np.where((me == p - 1) & (bwd_c == v - 1), dy, returned)
        dparams, dx = vjp(lambda q, h: stage_fn(chunk(q, bwd_c), h), stage_params, x_b)[1](
            np.where(use, g, np.zeros_like(g)))
        grads = tree_map(lambda a, d: a + d, grads, dparams)
        return (ppermute(y, axis_name, forward),
                ppermute(np.where(use, dx, np.zeros_like(dx)), axis_name, backward),
                stash, grads, total), None
    zero = np.zeros_like(microbatches[0])
    start = (zero, zero, np.zeros((slots,) + zero.shape, zero.dtype),
             tree_map(np.zeros_like, stage_params), np.zeros((), microbatches.dtype))
    # the first tick outside the scan fixes the carry's type (the axes it varies over)
    carry, _ = tick(start, tree_map(lambda a: a[0], inputs))
    (_, _, _, grads, total), _ = scan(tick, carry, tree_map(lambda a: a[1:], inputs))
    scale = np.asarray(1 / m, total.dtype)
    return psum(total, axis_name) * scale, tree_map(lambda d: d * scale.astype(d.dtype), grads)


def _per_tick(batch, index):
    """``batch[index[t]]`` for each tick ``t``, zeros where ``index`` is -1."""
    rows = batch[np.clip(index, 0, None)]
    keep = (index >= 0).reshape((-1,) + (1,) * (batch.ndim - 1))
    return np.where(keep, rows, np.zeros_like(rows))
