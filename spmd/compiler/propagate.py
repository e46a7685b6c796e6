"""Sharding propagation over a global Program.

1. **Backward**: preferred shardings flow upstream from ``out_shardings`` and
   ``with_sharding_constraint`` through each rule's dim map.  Each preference carries a
   priority: user constraints (3) > output shardings (2) > inferred (1).
2. **Forward**: equation by equation, each candidate strategy of the rule is priced with the
   cost model: the redistributions it needs on its inputs, plus moving its output to the
   preferred sharding, or else reducing the sums its output leaves pending (a pending sum is
   a reduction owed, not one saved: carried through an op that does not shrink it, it costs
   the same later, and every device computes on a varying value meanwhile).  The cheapest
   wins; ties go to the strategy that splits the work over more devices, then to the earlier
   one (which reduces its inputs first).

Inputs without a given sharding take their preferred sharding, else replicated.
"""
from __future__ import annotations

import dataclasses

from ..core import Eqn, Literal, Program, Var
from ..errors import ShardingError
from .cost import CostModel
from .placements import Sharding
from .redistribute import plan
from .rules import (backward_hints, category, contraction_flops, known_dims, resolve_hint,
                    strategies)

CONSTRAINT, OUTPUT, INFERRED = 3, 2, 1


@dataclasses.dataclass
class Propagation:
    in_shardings: list          # Sharding per program input
    strategies: list            # Strategy per equation
    out_shardings: list         # Sharding per program output (no pending reductions)
    hints: dict                 # id(var) -> (priority, Sharding)


def _sharding_of(env, a):
    if isinstance(a, Literal):
        return Sharding.replicated(len(a.aval.shape))
    return env[id(a)]


def propagate(program: Program, in_shardings: list, out_shardings: list, sizes: dict,
              cm: CostModel) -> Propagation:
    hints: dict[int, tuple[int, Sharding]] = {}

    def hint(v, prio, sh):
        if isinstance(v, Var) and sh is not None and prio > hints.get(id(v), (0, None))[0]:
            hints[id(v)] = (prio, sh)

    for v, sh in zip(program.out_vars, out_shardings):
        hint(v, OUTPUT, sh)
    for e in reversed(program.eqns):
        if category(e.prim) == "constraint":
            hint(e.inputs[0], CONSTRAINT, e.params["sharding"])
            continue
        outs = [hints.get(id(v)) for v in e.outputs]
        if not any(outs):
            continue
        prio = max(h[0] for h in outs if h)
        for a, h in zip(e.inputs, backward_hints(e, [h[1] if h else None for h in outs])):
            hint(a, prio, h)

    env: dict[int, Sharding] = {}
    ins = []
    for v, sh in zip(program.in_vars, in_shardings):
        if sh is None:
            sh = Sharding(known_dims(hints[id(v)][1])) if id(v) in hints else Sharding.replicated(v.aval.ndim)
        env[id(v)] = sh
        ins.append(sh)
    times: dict = {}                    # (shape, itemsize, src, dst) -> the move's time
    chosen, final, owed = _forward(program, env, hints, sizes, cm, frozenset(), times=times)
    if owed:
        # equations before the first that makes or reads an owed value choose as before
        touched = {v for v, _ in owed}
        start = next(i for i, e in enumerate(program.eqns)
                     if any(id(a) in touched for a in list(e.inputs) + list(e.outputs)))
        chosen, final, _ = _forward(program, env, hints, sizes, cm, owed, chosen[:start],
                                    times=times)
    outs = []
    for a, want in zip(program.out_vars, out_shardings):
        outs.append(want if want is not None else _sharding_of(final, a).without_partial())
    return Propagation(ins, chosen, outs, hints)


def _forward(program: Program, env: dict, hints: dict, sizes: dict, cm: CostModel,
             owed: frozenset, known: list = (), times: dict | None = None):
    """Choose every equation's strategy in program order (step 2 of the module docstring):
    ``(strategies, every value's sharding, owed)``.

    ``owed``: the reductions of pending values that some equation makes while another reads
    the same value still pending (a bias gradient summed from a cotangent that the layer
    norm's backward then reduces).  Given them, a second pass prices them as made: the
    reader takes the reduced value, and the product whose sum it is stays read once (which
    the stacked executor fuses with its psum).  ``known``: the strategies of the first
    equations, already chosen (by a pass that they do not depend on)."""
    env = dict(env)
    mesh_sizes = tuple(sizes.items())
    avail = set(owed)                   # (id(var), sharding): a redistribution already made

    times = {} if times is None else times

    def cost(a, src, dst):
        if src == dst or (id(a), dst) in avail:
            return 0.0
        key = (a.aval.shape, a.aval.dtype.itemsize, src, dst)
        t = times.get(key)
        if t is None:
            t = times[key] = plan(tuple(a.aval.shape), a.aval.dtype.itemsize, src, dst,
                                  mesh_sizes, cm).time
        return t

    chosen, reduced, read_pending = [], set(), set()
    for j, e in enumerate(program.eqns):
        cur = [_sharding_of(env, a) for a in e.inputs]
        out_hints = [hints.get(id(v), (0, None))[1] for v in e.outputs]
        cands = [known[j]] if j < len(known) else _typed(e, strategies(e, cur, out_hints, sizes))
        is_dot = category(e.prim) == "contraction"
        best, best_key = (cands[0], None) if j < len(known) else (None, None)
        for idx, s in enumerate(cands if j >= len(known) else ()):
            c = sum(cost(a, src, req) for a, src, req in zip(e.inputs, cur, s.ins))
            if is_dot:
                c += cm.compute(contraction_flops(e, s, sizes))
            c += sum(cost(v, o, resolve_hint(h, o) if h is not None else o.without_partial())
                     for v, o, h in zip(e.outputs, s.outs, out_hints))
            key = (round(c, 15), -s.parallelism(sizes), idx)
            if best_key is None or key < best_key:
                best, best_key = s, key
        chosen.append(best)
        for a, src, req in zip(e.inputs, cur, best.ins):
            if isinstance(a, Var):
                avail.add((id(a), req))
                if src.partial and req == src.without_partial():
                    reduced.add((id(a), req))
                elif req.partial:
                    read_pending.add(id(a))
        for v, o in zip(e.outputs, best.outs):
            env[id(v)] = o
    return chosen, env, frozenset(r for r in reduced if r[0] in read_pending)


def _typed(e: Eqn, cands: list) -> list:
    """On Explicit mesh axes an output's sharding is part of its type (``Aval.sharding``, set
    by the rules of ``spmd.sharding_rules`` while tracing): the strategies that give every
    typed output its type over those axes, with no sum pending over them (all of them when
    none does: the value is moved to its type later)."""
    types = [v.aval.sharding for v in e.outputs]
    if not any(t is not None for t in types):
        return cands

    def fits(out, t):
        if t is None:
            return True
        explicit = set(t.mesh.explicit_axes)
        dims = tuple(tuple(a for a in d if a in explicit) for d in out.dims)
        return dims == t._dim_axes(len(dims)) and not (set(out.partial_axes) & explicit)
    return [s for s in cands if all(fits(o, t) for o, t in zip(s.outs, types))] or cands


def inline_calls(program: Program) -> Program:
    """``program`` with the equations of primitives that declare an ``inline`` rule replaced by
    their sub-program, with fresh variables (``checkpoint``: its meaning matters to autodiff,
    which has already run)."""
    if not any(e.prim.inline is not None for e in program.eqns):
        return program
    subst: dict[int, object] = {}
    read = lambda a: subst.get(id(a), a) if isinstance(a, Var) else a
    eqns = []
    for e in program.eqns:
        if e.prim.inline is None:
            eqns.append(Eqn(e.prim, [read(a) for a in e.inputs], e.params, e.outputs, e.source))
            continue
        body = inline_calls(e.prim.inline(e.params))
        inner = {id(v): read(a) for v, a in zip(body.in_vars, e.inputs)}
        bread = lambda a: inner.get(id(a), a) if isinstance(a, Var) else a
        for be in body.eqns:
            outs = [Var(v.aval) for v in be.outputs]
            eqns.append(Eqn(be.prim, [bread(a) for a in be.inputs], be.params, outs,
                            be.source or e.source))
            inner.update({id(v): o for v, o in zip(be.outputs, outs)})
        for v, o in zip(e.outputs, body.out_vars):
            subst[id(v)] = bread(o)
    return Program(program.in_vars, eqns, [read(a) for a in program.out_vars])


def check_constraints(program: Program, name: str):
    """Two constraints on one value that disagree are an error (before anything runs)."""
    seen: dict[int, Sharding] = {}
    for e in program.eqns:
        if category(e.prim) != "constraint" or not isinstance(e.inputs[0], Var):
            continue
        sh = e.params["sharding"]
        prev = seen.setdefault(id(e.inputs[0]), sh)
        if prev != sh:
            raise ShardingError(
                f"jit({name}): with_sharding_constraint is applied twice to the same value "
                f"({e.inputs[0].aval}) with contradicting shardings {prev.spec} and {sh.spec}; "
                f"keep one of them.")
