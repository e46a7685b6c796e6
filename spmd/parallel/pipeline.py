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


def schedule(stages: int, microbatches: int, kind: str = "gpipe"):
    """``(forward, backward)``: which microbatch each stage runs forward and backward in each
    unit of time (a forward or a backward of one stage on one microbatch), -1 when idle.

    ``gpipe``: all forwards (``m + p - 1`` ticks), then the same ticks reversed for the
    backward. ``1f1b``: ``one_f_one_b``'s lock-step ticks, each a forward then a backward."""
    p, m = stages, microbatches
    if kind == "gpipe":
        ticks = m + p - 1
        mb = np.arange(ticks)[None, :] - np.arange(p)[:, None]
        forward = np.where((mb >= 0) & (mb < m), mb, -1)
        idle = np.full_like(forward, -1)
        return (np.concatenate([forward, idle], axis=1),
                np.concatenate([idle, forward[:, ::-1]], axis=1))
    if kind == "1f1b":
        ticks = m + 2 * p - 2
        t, s = np.arange(ticks)[None, :], np.arange(p)[:, None]
        fwd, bwd = t - s, t - 2 * (p - 1) + s
        forward = np.where((fwd >= 0) & (fwd < m), fwd, -1)
        backward = np.where((bwd >= 0) & (bwd < m), bwd, -1)
        idle = np.full_like(forward, -1)
        return (np.stack([forward, idle], axis=-1).reshape(p, -1),
                np.stack([idle, backward], axis=-1).reshape(p, -1))
    raise ValueError(f"schedule: kind={kind!r}; use 'gpipe' or '1f1b'")


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
                axis_name):
    """``(loss, grads)``: the mean over microbatches of ``loss_fn(last stage output, target)``
    and its gradient with respect to this device's ``stage_params``, on the 1F1B schedule.

    ``microbatches`` and ``targets`` ``(m, ...)`` are the same on every stage;
    ``stage_fn(params, x)`` keeps ``x``'s shape. Collectives: two ``ppermute``\\ s per tick
    (activations forward, gradients backward) and one ``psum`` of the loss. Stashed inputs:
    ``min(m, 2p - 1)`` microbatches per stage. The ticks after the first are one ``scan``."""
    p, me = axis_size(axis_name), axis_index(axis_name)
    m = microbatches.shape[0]
    ticks, slots = m + 2 * p - 2, min(m, 2 * p - 1)
    forward = [(s, s + 1) for s in range(p - 1)]
    backward = [(s + 1, s) for s in range(p - 1)]
    slot_ids = np.arange(slots).reshape((slots,) + (1,) * (microbatches.ndim - 1))
    pad = lambda a, before, after: np.concatenate(
        [np.zeros((before,) + a.shape[1:], a.dtype), a, np.zeros((after,) + a.shape[1:], a.dtype)])
    # what each tick reads: its number, stage 0's microbatch, the last stage's target
    inputs = (np.arange(ticks, dtype=np.int32), pad(microbatches, 0, 2 * p - 2),
              pad(targets, p - 1, p - 1))

    def tick(carry, tick_inputs):
        arrived, returned, stash, grads, total = carry
        t, fed, target = tick_inputs
        fwd_mb, bwd_mb, last = t - me, t - 2 * (p - 1) + me, t - (p - 1)
        x = np.where(me == 0, fed, arrived)
        y = stage_fn(stage_params, x)
        stash = np.where((slot_ids == fwd_mb % slots) & _in_range(fwd_mb, m), x, stash)
        # the last stage's backward is for the microbatch it just finished
        loss, dy = value_and_grad(loss_fn)(y, target)
        keep = (me == p - 1) & _in_range(last, m)
        total = total + np.where(keep, loss, np.zeros_like(loss))
        x_b = np.sum(np.where(slot_ids == bwd_mb % slots, stash, np.zeros_like(stash)), axis=0)
        dparams, dx = vjp(stage_fn, stage_params, x_b)[1](np.where(me == p - 1, dy, returned))
        use = _in_range(bwd_mb, m)
        grads = tree_map(lambda a, d: a + np.where(use, d, np.zeros_like(d)), grads, dparams)
        return (ppermute(y, axis_name, forward),
                ppermute(np.where(use, dx, np.zeros_like(dx)), axis_name, backward),
                stash, grads, total), None
    zero = np.zeros_like(microbatches[0])
    _check_stage(stage_fn, zero, stage_fn(stage_params, zero), "one_f_one_b", axis_name)
    start = (zero, zero, np.zeros((slots,) + zero.shape, zero.dtype),
             tree_map(np.zeros_like, stage_params), np.zeros((), microbatches.dtype))
    # the first tick outside the scan fixes the carry's type (the axes it varies over)
    carry, _ = tick(start, tree_map(lambda a: a[0], inputs))
    (_, _, _, grads, total), _ = scan(tick, carry, tree_map(lambda a: a[1:], inputs))
    scale = np.asarray(1 / m, total.dtype)
    return psum(total, axis_name) * scale, tree_map(lambda d: d * scale.astype(d.dtype), grads)
