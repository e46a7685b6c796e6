"""``checkpoint`` (rematerialisation): trade compute for memory in the backward pass.

``checkpoint(f)`` stages ``f`` as one ``checkpoint`` equation holding ``f``'s Program.  It
runs like ``f``; the difference is in autodiff.  When the JVP of a ``checkpoint`` is split into
its forward and linear parts, the forward part keeps only what the ``policy`` says may be
saved, and the linear part *recomputes* the rest from the function's inputs.  Its transpose is
inlined where the backward pass reaches it, so the recomputed values of one checkpointed block
are alive only while that block's gradient is being computed.

>>> import numpy as np, spmd
>>> layer = spmd.checkpoint(lambda w, x: np.tanh(x @ w))
>>> g = spmd.grad(lambda w, x: np.sum(layer(w, layer(w, x))))(np.eye(2), np.ones((3, 2)))
>>> np.asarray(g).shape
(2, 2)
"""
from __future__ import annotations

import functools

import optree

from ..core import Primitive, Program, Var, aval_of, bind, current_builder, trace
from . import ad
from ..batching import batch_size, moveaxis, to_front
from .vmap import batch_eval
from ..tree_util import flat_call


class checkpoint_policies:
    """What the forward pass may keep for the backward pass: ``policy(prim, *avals, **params)``."""

    @staticmethod
    def nothing_saveable(prim, *avals, **params) -> bool:
        """Save only the inputs: recompute everything (least memory)."""
        return False

    @staticmethod
    def dots_saveable(prim, *avals, **params) -> bool:
        """Save the matmul outputs, recompute the cheap elementwise work around them."""
        return prim.category == "contraction"

    @staticmethod
    def everything_saveable(prim, *avals, **params) -> bool:
        return True

    dots_with_no_batch_dims_saveable = dots_saveable


def _jvp(primals, tangents, *, body, policy, name):
    nonzero = [not ad.is_zero(t) for t in tangents]
    jbody = ad.jvp_program(body, nonzero, ad.context())
    outs = bind(checkpoint_p, *primals, *[t for t in tangents if not ad.is_zero(t)], body=jbody,
                policy=policy, name=name)
    return outs[:len(body.out_vars)], outs[len(body.out_vars):]


def _partial_eval(eqn, unknown_ins, ctx):
    """Known side: the forward pass, keeping the outputs the policy saves.  Unknown side: the
    linear part, preceded by the recomputation of every other value it reads."""
    body, policy = eqn.params["body"], eqn.params["policy"] or checkpoint_policies.nothing_saveable
    unknown = {id(v) for v, u in zip(body.in_vars, unknown_ins) if u}
    known_eqns, unknown_eqns, saved = [], [], []

    def keep(e):
        known_eqns.append(e)
        if policy(e.prim, *[a.aval for a in e.inputs], **e.params):
            saved.extend(e.outputs)

    for e in body.eqns:
        u = [isinstance(a, Var) and id(a) in unknown for a in e.inputs]
        if not any(u):
            keep(e)
        elif not all(u) and e.prim.partial_eval is not None:
            # a sub-program (the JVP of a shard_map): its own rule splits it, so its primal
            # outputs stay known (and are recomputed below unless the policy saves them)
            known_parts, unknown_part, out_unknown = e.prim.partial_eval(e, u, ctx)
            for k in known_parts:
                keep(k)
            unknown_eqns.append(unknown_part)
            unknown |= {id(v) for v, uo in zip(e.outputs, out_unknown) if uo}
        else:
            unknown_eqns.append(e)
            unknown |= {id(v) for v in e.outputs}
    out_unknown = [isinstance(a, Var) and id(a) in unknown for a in body.out_vars]
    saved_ids = {id(v) for v in saved}
    known_in = [v for v, u in zip(body.in_vars, unknown_ins) if not u]
    unknown_in = [v for v, u in zip(body.in_vars, unknown_ins) if u]
    # the unknown side, cut at the saved values, recomputing the remaining known equations
    recompute = ad.dce(Program(known_in + saved + unknown_in,
                               [e for e in known_eqns if not any(id(v) in saved_ids for v in e.outputs)]
                               + unknown_eqns,
                               [a for a, u in zip(body.out_vars, out_unknown) if u]))
    used = {id(a) for e in recompute.eqns for a in e.inputs} | {id(a) for a in recompute.out_vars}
    res_saved = [v for v in saved if id(v) in used]
    res_known = [i for i, v in enumerate(body.in_vars) if not unknown_ins[i] and id(v) in used]
    name = eqn.params["name"]
    kbody = ad.dce(Program(known_in, known_eqns,
                           [a for a, u in zip(body.out_vars, out_unknown) if not u] + res_saved))
    keqn = ad.new_eqn(checkpoint_p, [a for a, u in zip(eqn.inputs, unknown_ins) if not u],
                      dict(body=kbody, policy=eqn.params["policy"], name=name))
    n_known_out = len(kbody.out_vars) - len(res_saved)
    keqn.outputs[:n_known_out] = [v for v, u in zip(eqn.outputs, out_unknown) if not u]
    ubody = Program([body.in_vars[i] for i in res_known] + res_saved + unknown_in, recompute.eqns,
                    recompute.out_vars)
    ueqn = ad.new_eqn(checkpoint_p, [eqn.inputs[i] for i in res_known] + keqn.outputs[n_known_out:]
                      + [a for a, u in zip(eqn.inputs, unknown_ins) if u],
                      dict(body=ubody, policy=eqn.params["policy"], name=name),
                      outputs=[v for v, u in zip(eqn.outputs, out_unknown) if u])
    return [keqn], ueqn, out_unknown


def _transpose(cts, *invals, body, policy, name):
    linear = [ad.is_undefined(x) for x in invals]
    backward = ad.transpose_program(body, linear, ad.context(),
                                    ct_avals=[ad.aval_of_value(c) if not ad.is_zero(c) else c.aval for c in cts])
    outs = iter(ad.eval_program(backward, [x for x in invals if not ad.is_undefined(x)]
                                + [ad.instantiate(c) for c in cts]))
    return [next(outs) if l else None for l in linear]


def _batch(vals, dims, *, body, policy, name):
    size = batch_size(vals, dims)
    vals = [moveaxis(v, d, 0) if d is not None else v for v, d in zip(vals, dims)]
    bdims = [0 if d is not None else None for d in dims]

    def batched(*xs):
        outs, odims = batch_eval(body, xs, bdims, size)
        return [to_front(o, d, size) for o, d in zip(outs, odims)]
    avals = [v.aval.update(shape=(size,) + v.aval.shape) if d is not None else v.aval
             for v, d in zip(body.in_vars, bdims)]
    bbody, _ = trace(batched, avals, **ad.context())
    outs = bind(checkpoint_p, *vals, body=bbody, policy=policy, name=name)
    return outs, [0] * len(outs)


# Outside autodiff a checkpoint is its body: executors run it in place, the compiler inlines it.
checkpoint_p = Primitive("checkpoint", abstract=lambda *avals, body, policy, name: body.out_avals,
                         multiple_results=True, vma=lambda *avals, **params: frozenset(),
                         jvp=_jvp, transpose=_transpose, batch=_batch, partial_eval=_partial_eval,
                         execute=lambda run, *, body, policy, name: run.call(body),
                         inline=lambda params: params["body"])


def checkpoint(fun=None, *, policy=None, prevent_cse=True, static_argnums=()):
    """Rematerialise ``fun`` in the backward pass (JAX's ``jax.checkpoint`` / ``remat``).

    ``policy`` says which intermediate values the forward pass keeps:
    ``checkpoint_policies.nothing_saveable`` (the default: keep only ``fun``'s inputs, recompute
    the rest -- least memory) or ``checkpoint_policies.dots_saveable`` (keep the matmul outputs,
    recompute the elementwise work around them).  Values are identical; only peak memory and
    compute change.
    """
    if fun is None:
        return functools.partial(checkpoint, policy=policy, prevent_cse=prevent_cse,
                                 static_argnums=static_argnums)
    name = getattr(fun, "__name__", "function")

    @functools.wraps(fun, updated=())
    def checkpointed(*args):
        if current_builder() is None:       # not under a transformation: nothing to save
            return fun(*args)
        leaves, tree = optree.tree_flatten(args, none_is_leaf=False)
        flat, box = flat_call(fun, tree)
        body, captured = trace(flat, [aval_of(x) for x in leaves], **ad.context(),
                               context=f"checkpoint({name})")
        outs = bind(checkpoint_p, *leaves, *captured, body=body, policy=policy, name=name)
        return optree.tree_unflatten(box[0], outs)
    return checkpointed


remat = checkpoint
