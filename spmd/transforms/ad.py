"""Automatic differentiation as three Program -> Program interpreters.

1. :func:`jvp_program` re-traces a program equation by equation, applying each primitive's
   ``jvp`` rule.  Rules are written with ``bind`` (or NumPy calls on tracers), so tangents are
   ordinary equations.  A tangent that is known to be zero is the symbolic :class:`Zero`, so
   no work is spent on it (the gradient of ``x @ w`` with respect to ``w`` alone never
   multiplies by a zero tangent of ``x``).
2. :func:`partial_eval_program` splits the JVP program into the *known* part (depends only on
   primals: the forward pass, plus the residuals the tangents need) and the *unknown* part,
   which is linear in the tangents.
3. :func:`transpose_program` walks the linear part backwards, applying each linear
   primitive's ``transpose`` rule; ``grad`` is the transposed linear program fed with ones.

Primitives with a sub-program (``shard_map``, ``checkpoint``) carry rules that apply the same
three functions to their body, so the transpose of a ``shard_map`` is a ``shard_map``.

The ``vma`` types make the collectives of the backward pass fall out of the algebra: mixing an
invariant and a varying operand inside ``shard_map`` leaves an explicit ``pvary`` in the
program, ``pvary`` transposes to ``psum``, and ``psum`` transposes to ``pvary``.  No psum is
added "to be safe".

On Explicit mesh axes a tangent or cotangent has its primal's type, as in JAX: the JVP's
tangents are typed by the same sharding rules as the primals, a zero is made with its primal's
sharding (``ad_util.full``), and the backward pass gives each cotangent its primal's sharding
(``_typed_like``: a reshard only where a transpose rule left it untyped or typed otherwise),
so ``grad`` returns gradients typed like the parameters.
"""
from __future__ import annotations

import numpy as np

from ..ad_util import (UndefinedPrimal, Zero, add_tangents, aval_of_value, deriv_jvp,  # noqa: F401
                       differentiable, full, instantiate, is_undefined, is_zero, linear_jvp,
                       no_jvp, zero_jvp)
from ..core import (Aval, Eqn, Literal, Params, Program, Var, attributed, bind, current_builder,
                    hooks, trace)
from ..sharding import NamedSharding, PartitionSpec
from . import simplify


def context() -> dict:
    """Tracing context (mesh, manual axes, vma checking) of the innermost trace."""
    b = current_builder()
    if b is None:
        return {}
    return dict(mesh=b.mesh, manual_axes=b.manual_axes, check_vma=b.check_vma)


def _read(env, a):
    return a.val if isinstance(a, Literal) else env[id(a)]


def eval_program(program: Program, args) -> list:
    """Inline ``program`` into the current trace (each equation re-bound)."""
    env = {id(v): x for v, x in zip(program.in_vars, args)}
    for e in attributed(program.eqns):
        outs = bind(e.prim, *[_read(env, a) for a in e.inputs], **e.params)
        for v, o in zip(e.outputs, outs if e.prim.multiple_results else [outs]):
            env[id(v)] = o
    return [_read(env, a) for a in program.out_vars]


def run_program(program: Program, args) -> list:
    """Inline into the current trace, or, outside any trace, execute (default executor)."""
    if current_builder() is not None:
        return eval_program(program, args)
    return hooks.execute(program, args)


# ---------------------------------------------------------------------------------------------
# JVP
# ---------------------------------------------------------------------------------------------

def jvp_eval(program: Program, primals, tangents):
    """Inline the JVP of ``program``; ``tangents`` entries may be :class:`Zero`."""
    env, tenv = {}, {}
    for v, p, t in zip(program.in_vars, primals, tangents):
        env[id(v)] = p
        tenv[id(v)] = t
    read_t = lambda a: tenv.get(id(a), Zero(a.aval)) if isinstance(a, Var) else Zero(a.aval)
    for e in attributed(program.eqns):
        ps = [_read(env, a) for a in e.inputs]
        ts = [read_t(a) for a in e.inputs]
        if all(is_zero(t) for t in ts):
            outs = bind(e.prim, *ps, **e.params)
            touts = [Zero(v.aval) for v in e.outputs] if e.prim.multiple_results else Zero(e.outputs[0].aval)
        else:
            outs, touts = e.prim.rule("jvp")(ps, ts, **e.params)
        if not e.prim.multiple_results:
            outs, touts = [outs], [touts]
        for v, o, t in zip(e.outputs, outs, touts):
            env[id(v)] = o
            tenv[id(v)] = t if differentiable(v.aval.dtype) else Zero(v.aval)
    return [_read(env, a) for a in program.out_vars], [read_t(a) for a in program.out_vars]


def jvp_program(program: Program, nonzero, ctx, *, tangent_outs=None) -> Program:
    """``(primals..., tangents of the nonzero inputs...) -> (outs..., tangents of outs...)``.

    ``tangent_outs`` selects which outputs get a tangent (default: all)."""
    n = len(program.in_vars)
    tangent_outs = [True] * len(program.out_vars) if tangent_outs is None else tangent_outs
    t_avals = [v.aval for v, nz in zip(program.in_vars, nonzero) if nz]

    def fn(*args):
        it = iter(args[n:])
        ts = [next(it) if nz else Zero(v.aval) for v, nz in zip(program.in_vars, nonzero)]
        outs, touts = jvp_eval(program, args[:n], ts)
        return list(outs) + [instantiate(t, a.aval) for t, a, keep in zip(touts, program.out_vars, tangent_outs)
                             if keep]
    prog, captured = trace(fn, program.in_avals + t_avals, **ctx)
    assert not captured
    return dce(prog)


# ---------------------------------------------------------------------------------------------
# partial evaluation
# ---------------------------------------------------------------------------------------------

def new_eqn(prim, inputs, params, outputs=None) -> Eqn:
    """An equation with fresh output variables typed by the primitive's rule."""
    if outputs is None:
        avals = prim.abstract_eval(*[a.aval for a in inputs], **params)
        outputs = [Var(a) for a in (avals if prim.multiple_results else [avals])]
    return Eqn(prim, list(inputs), Params(params), outputs)


def partial_eval_program(program: Program, unknown_ins, ctx):
    """Split ``program`` by what depends on its unknown inputs.

    Returns ``(known, unknown, out_unknown, n_res)``: ``known`` maps the known inputs to the
    known outputs followed by ``n_res`` residuals; ``unknown`` maps the residuals followed by
    the unknown inputs to the unknown outputs.  Equations whose primitive has a
    ``partial_eval`` rule (sub-programs) are split themselves.
    """
    unknown = {id(v) for v, u in zip(program.in_vars, unknown_ins) if u}
    is_unknown = lambda a: isinstance(a, Var) and id(a) in unknown
    known_eqns, unknown_eqns = [], []
    for e in program.eqns:
        u = [is_unknown(a) for a in e.inputs]
        if not any(u):
            known_eqns.append(e)
        elif not all(u) and e.prim.partial_eval is not None:
            k, ue, out_unknown = e.prim.partial_eval(e, u, ctx)
            for part in k + [ue]:
                part.source = part.source or e.source
            known_eqns += k
            unknown_eqns.append(ue)
            unknown |= {id(v) for v, uo in zip(e.outputs, out_unknown) if uo}
        else:
            unknown_eqns.append(e)
            unknown |= {id(v) for v in e.outputs}
    # A residual made by a free equation (pvary moves no data) is recomputed on the unknown
    # side from its input instead, so the forward pass does not store a replicated copy.
    made_by = {id(v): e for e in known_eqns for v in e.outputs}
    recomputed, todo = [], [a for e in unknown_eqns for a in e.inputs]
    while todo:
        a = todo.pop()
        e = made_by.get(id(a)) if isinstance(a, Var) else None
        if e is not None and e.prim.free and e not in recomputed:
            recomputed.append(e)
            todo += e.inputs
    if recomputed:
        order = {id(e): i for i, e in enumerate(known_eqns)}
        unknown_eqns = sorted(recomputed, key=lambda e: order[id(e)]) + unknown_eqns
    # residuals: known variables that the unknown equations read
    res, seen = [], {id(v) for e in recomputed for v in e.outputs}
    for e in unknown_eqns:
        for a in e.inputs:
            if isinstance(a, Var) and id(a) not in unknown and id(a) not in seen:
                seen.add(id(a))
                res.append(a)
    out_unknown = [is_unknown(a) for a in program.out_vars]
    known_ins = [v for v, u in zip(program.in_vars, unknown_ins) if not u]
    unknown_ins_v = [v for v, u in zip(program.in_vars, unknown_ins) if u]
    known = Program(known_ins, known_eqns, [a for a, u in zip(program.out_vars, out_unknown) if not u] + res)
    unk = Program(res + unknown_ins_v, unknown_eqns, [a for a, u in zip(program.out_vars, out_unknown) if u])
    return known, unk, out_unknown, len(res)


# ---------------------------------------------------------------------------------------------
# transposition
# ---------------------------------------------------------------------------------------------

def backward_pass(program: Program, linear, consts, cts):
    """Inline the transpose of ``program`` (linear in the inputs flagged ``linear``).

    Equations that read no linear value are evaluated forwards first (inside a checkpointed
    or shard_map body they recompute what the backward pass needs).  Returns one cotangent
    per linear input (possibly :class:`Zero`).
    """
    lin = {id(v) for v, l in zip(program.in_vars, linear) if l}
    env = {id(v): c for v, c in zip([v for v, l in zip(program.in_vars, linear) if not l], consts)}
    lin_eqns = []
    for e in attributed(program.eqns):
        if any(isinstance(a, Var) and id(a) in lin for a in e.inputs):
            lin_eqns.append(e)
            lin |= {id(v) for v in e.outputs}
        else:
            outs = bind(e.prim, *[_read(env, a) for a in e.inputs], **e.params)
            for v, o in zip(e.outputs, outs if e.prim.multiple_results else [outs]):
                env[id(v)] = o
    ct_env: dict = {}

    def accumulate(v, ct):
        if ct is None or is_zero(ct):
            return
        ct_env[id(v)] = add_tangents(ct_env.get(id(v), Zero(v.aval)), ct)

    for v, ct in zip(program.out_vars, cts):
        if isinstance(v, Var) and id(v) in lin:
            accumulate(v, ct)
    for e in attributed(reversed(lin_eqns)):
        cts_out = [ct_env.pop(id(v), Zero(v.aval)) for v in e.outputs]
        if all(is_zero(c) for c in cts_out):
            continue
        invals = [UndefinedPrimal(a.aval) if isinstance(a, Var) and id(a) in lin else _read(env, a)
                  for a in e.inputs]
        cts_in = e.prim.rule("transpose")(cts_out if e.prim.multiple_results else cts_out[0],
                                          *invals, **e.params)
        for a, x, ct in zip(e.inputs, invals, cts_in):
            if is_undefined(x):
                accumulate(a, _typed_like(ct, x.aval))
    return [_typed_like(ct_env.get(id(v), Zero(v.aval)), v.aval)
            for v, l in zip(program.in_vars, linear) if l]


def _typed_like(ct, aval):
    """A cotangent carries its primal's sharding on Explicit axes (a pending sum's cotangent
    reduced there, a reduced one's pending), as every transpose of JAX gives it with
    ``out_sharding=``: one that a transpose rule left untyped (a product whose contraction
    is ambiguous by the rules) or typed otherwise is resharded to it, so the types of the
    backward pass survive every replay of the program and the compiler sees JAX's
    placements."""
    b = current_builder()
    if aval.sharding is None or is_zero(ct) or b is None or b.manual_axes:
        return ct
    spec = aval.sharding.spec
    want = NamedSharding(aval.sharding.mesh, PartitionSpec(*spec, unreduced=spec.reduced,
                                                           reduced=spec.unreduced))
    typed = getattr(getattr(ct, "aval", None), "sharding", None)
    return ct if typed == want else hooks.constrain(ct, want, "the cotangent")


def transpose_program(program: Program, linear, ctx, *, ct_avals=None) -> Program:
    """``(non-linear inputs..., cotangents of the outputs...) -> cotangents of the linear
    inputs`` as a Program."""
    consts = [v.aval for v, l in zip(program.in_vars, linear) if not l]
    ct_avals = program.out_avals if ct_avals is None else ct_avals
    n = len(consts)
    lin_avals = [v.aval for v, l in zip(program.in_vars, linear) if l]

    def fn(*args):
        cts = backward_pass(program, linear, args[:n], args[n:])
        return [instantiate(c, a) for c, a in zip(cts, lin_avals)]
    prog, captured = trace(fn, consts + list(ct_avals), **ctx)
    assert not captured
    return dce(simplify.merge_padded_sums(dce(prog)))


def linear_vars(program: Program, linear) -> set:
    """Ids of the variables of ``program`` that depend on its ``linear`` inputs."""
    lin = {id(v) for v, l in zip(program.in_vars, linear) if l}
    for e in program.eqns:
        if any(isinstance(a, Var) and id(a) in lin for a in e.inputs):
            lin |= {id(v) for v in e.outputs}
    return lin


def dce(program: Program) -> Program:
    """Drop equations whose outputs nothing uses (rules compute partials eagerly; the ones a
    zero tangent did not need disappear here).  An equation without outputs is there for its
    effect (a debug callback) and stays."""
    live = {id(a) for a in program.out_vars if isinstance(a, Var)}
    kept = []
    for e in reversed(program.eqns):
        if not e.outputs or any(id(v) in live for v in e.outputs):
            kept.append(e)
            live |= {id(a) for a in e.inputs if isinstance(a, Var)}
    return Program(program.in_vars, kept[::-1], program.out_vars)
