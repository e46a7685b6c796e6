"""Control flow as higher-order primitives: ``scan``, ``while_loop`` and ``cond``, and JAX's
``fori_loop``, ``switch`` and ``map`` written over them.

Each is one equation whose parameters hold its bodies as Programs, traced once: an executor
runs the equation as a Python loop (``scan``, ``while_loop``) or a branch choice (``cond``)
over the compiled body, so tracing and compiling cost the same for 10 steps or 10,000.  Before
its steps a loop computes once what its body computes from the consts alone, and for all steps
at once what it computes from the consts and ``xs`` alone (see ``_Split``).  The
rules transform the bodies with ``spmd.transforms``: the JVP of a scan is a scan of the JVP of
its body; partial evaluation splits a scan into a forward scan that stacks the residuals each
step needs and a linear scan that reads them; its transpose is a scan in the other direction.
Inside ``shard_map`` the bodies may call collectives; a carry keeps its vma (the mesh axes it
varies over) from step to step, and a branch index or loop predicate that varies over devices
(each device choosing on its own, as in JAX) is evaluated as a select over the branches or a
loop masked per device, which is refused when the body calls a collective (in JAX, devices
that disagree on the number of collectives hang).

>>> import numpy as np, spmd.lax as lax
>>> carry, ys = lax.scan(lambda c, x: (c + x, c * x), 0.0, np.arange(4.0))
>>> float(carry), np.asarray(ys).tolist()
(6.0, [0.0, 0.0, 2.0, 9.0])
"""
from __future__ import annotations

import builtins
import functools
import operator

import numpy as np
import optree

from . import _host_parallel, ad_util, prims
from .batching import batch_size, moveaxis, to_front
from .collectives import pmax, pvary_p
from .core import (Aval, Eqn, Primitive, Program, Tracer, Var, aval_of, bind, current_builder,
                   hooks, trace)
from .errors import VmaError
from .sharding import NamedSharding, PartitionSpec, spec_entry
from .transforms import ad
from .transforms.vmap import batch_eval, vmap


# ---------------------------------------------------------------------------------------------
# tracing the user's functions
# ---------------------------------------------------------------------------------------------

def _fn_name(f) -> str:
    return getattr(f, "__qualname__", getattr(f, "__name__", repr(f)))


def _path(prefix: str, path) -> str:
    return prefix + "".join(f"[{p!r}]" for p in path)


def _flatten(tree):
    return optree.tree_flatten(tree, none_is_leaf=False)


def _trace(fun, in_tree, in_avals, context, split=None):
    """Trace ``fun(*unflatten(in_tree, leaves))``; returns ``(program, consts, out_trees)`` with
    the closed-over values first among the program's inputs.  ``split(out)`` gives the output
    parts flattened one by one (a scan body's ``(carry, y)``); by default the output is one."""
    trees = []

    def flat(*xs):
        out = fun(*optree.tree_unflatten(in_tree, list(xs)))
        parts = split(out) if split is not None else [out]
        leaves = []
        for part in parts:
            part_leaves, tree = _flatten(part)
            trees.append(tree)
            leaves += part_leaves
        return leaves
    prog, consts = trace(flat, in_avals, **ad.context(), context=context)
    n = len(in_avals)
    return Program(prog.in_vars[n:] + prog.in_vars[:n], prog.eqns, prog.out_vars), consts, trees


def _cast(x, dtype):
    """``x`` as ``dtype`` (a weakly typed carry or branch output adopting its partner's)."""
    if isinstance(x, Tracer):
        return bind(prims.convert_element_type_p, x, dtype=np.dtype(dtype))
    return np.asarray(x, dtype)


def _with_vma(x, vma):
    """``x`` made to vary over ``vma`` too (internal bodies whose carries must keep a type)."""
    missing = frozenset(vma) - aval_of(x).vma
    if not missing:
        return x
    b = current_builder()
    return bind(pvary_p, x, axes=tuple(a for a in b.mesh.axis_names if a in missing))


def _same_type(a: Aval, b: Aval) -> bool:
    return (a.shape == b.shape and np.dtype(a.dtype) == np.dtype(b.dtype) and a.vma == b.vma
            and not _shardings_differ(a, b))


def _shardings_differ(a: Aval, b: Aval) -> bool:
    """Both typed on Explicit axes, with different shardings (JAX's carry types then differ)."""
    return a.sharding is not None and b.sharding is not None and a.sharding != b.sharding


def _mismatch(a: Aval, b: Aval) -> str:
    if a.shape != b.shape:
        return "the shapes differ"
    if np.dtype(a.dtype) != np.dtype(b.dtype):
        return "the dtypes differ"
    if _shardings_differ(a, b):
        return (f"the shardings differ ({a.sharding.spec} and {b.sharding.spec}); give both one "
                f"sharding with spmd.reshard(x, P(...))")
    extra = sorted(b.vma - a.vma) or sorted(a.vma - b.vma)
    axes = ", ".join(repr(a) for a in extra)
    return (f"the mesh axes they vary over differ (vma); make both vary over {axes} with "
            f"spmd.pvary(x, {axes}) (JAX: lax.pcast(x, ..., to='varying'))")


def _weak_fix(ins, in_avals, out_avals):
    """The inputs with weakly typed ones (Python scalars) cast to the dtype the body gives them,
    or None when nothing changes (JAX's weak-type promotion of a loop carry)."""
    fixed, changed = list(ins), False
    for i, (a, o) in enumerate(zip(in_avals, out_avals)):
        if a.weak and a.shape == o.shape and np.dtype(a.dtype) != np.dtype(o.dtype):
            fixed[i], changed = _cast(ins[i], o.dtype), True
    return fixed if changed else None


def _error(a: Aval, b: Aval):
    """The exception type for two types that differ: VmaError when only their vma does."""
    same = a.shape == b.shape and np.dtype(a.dtype) == np.dtype(b.dtype)
    return VmaError if same and not _shardings_differ(a, b) else TypeError


def _check_carry(kind, name, describe, in_tree, out_tree, in_avals, out_avals):
    if in_tree != out_tree:
        raise TypeError(f"{kind}({name}): the body function returns a carry of structure "
                        f"{out_tree} but takes one of structure {in_tree}; return the carry in "
                        f"the structure it came in.")
    for p, a, o in zip(optree.treespec_paths(in_tree), in_avals, out_avals):
        if not _same_type(a, o):
            raise _error(a, o)(f"{kind}({name}): the carry {describe(p)} enters the body as {a} "
                               f"but the body returns it as {o}: {_mismatch(a, o)}. A carry must "
                               f"keep its type from step to step.")


def _has_collective(program: Program) -> bool:
    for e in program.eqns:
        if e.prim.collective not in (None, "none"):
            return True
        if any(_has_collective(s) for s in e.prim.subprograms(e.params)):
            return True
    return False


def _ordered_axes(vma) -> tuple:
    b = current_builder()
    return tuple(a for a in b.mesh.axis_names if a in vma)


def _staged(fun, name):
    """Called outside any trace, a control-flow function runs as a jitted program."""
    return hooks.jit(fun, _name=name)


def _depends(program: Program, flags) -> list:
    """Per output of ``program``: does it depend on the inputs flagged in ``flags``?"""
    dep = ad.linear_vars(program, flags)
    return [isinstance(a, Var) and id(a) in dep for a in program.out_vars]


def _unknown_outs(ctx):
    """Which outputs partial evaluation leaves unknown (a nested loop's primal outputs stay
    known even when tangents enter it)."""
    return lambda program, flags: ad.partial_eval_program(program, flags, ctx)[2]


def _nonzero(program: Program, flags) -> list:
    return [d and ad_util.differentiable(a.dtype)
            for d, a in zip(_depends(program, flags), program.out_avals)]


def _fixed_point(program, flags, start, n_carry, analyse):
    """Flags of the carries (``start`` at position ``start``..+n_carry of ``flags``) closed
    under the body: a carry is flagged when its output is."""
    carry = list(flags[start:start + n_carry])
    while True:
        full = list(flags[:start]) + carry + list(flags[start + n_carry:])
        outs = analyse(program, full)
        new = [c or o for c, o in zip(carry, outs[:n_carry])]
        if new == carry:
            return full, outs
        carry = new


def _reorder(program: Program, ins, outs) -> Program:
    return Program(list(ins), program.eqns, list(outs))


# ---------------------------------------------------------------------------------------------
# scan
# ---------------------------------------------------------------------------------------------

def _typed(avals) -> list:
    """A loop's or cond's results keep the types their bodies give them on Explicit axes (the
    carries' are checked equal to the inputs', as JAX's); an untyped one the compiler places."""
    return list(avals)


def _scan_abstract(*avals, body, length, reverse, unroll, n_consts, n_carry, name):
    outs = body.out_avals
    return _typed(list(outs[:n_carry]) + [a.update(shape=(length,) + tuple(a.shape), sharding=None
                                                   if a.sharding is None else _stacked_type(a))
                                          for a in outs[n_carry:]])


def _stacked_type(a: Aval):
    """The type of a scan's stacked ``ys``: the steps' dim in front, unsplit."""
    s = a.sharding
    return NamedSharding(s.mesh, PartitionSpec(None, *[spec_entry(d) for d in s._dim_axes(a.ndim)],
                                               unreduced=s.spec.unreduced, reduced=s.spec.reduced))


def _stack(length, ys_avals, xp, k, *ys):
    """Per output, its ``length`` per-step values (step order) written into one array, the steps
    after the mesh dims."""
    out = []
    for j, aval in enumerate(ys_avals):
        group = ys[j * length:(j + 1) * length]
        if not k and aval.ndim and group:        # whole arrays: one copy, if they are all whole
            try:
                out.append(xp.concatenate(group).reshape((length,) + tuple(aval.shape)))
                continue
            except ValueError:                  # some broadcast or scalar: one at a time
                pass
        rank = k + aval.ndim
        shapes = {tuple(getattr(y, "shape", ())) for y in group} or {(1,) * k + tuple(aval.shape)}
        # constants among varying values, values without their mesh dims: broadcast in
        shape = np.broadcast_shapes(*[(1,) * (rank - len(s)) + s for s in shapes])
        dtype = next((y.dtype for y in group if hasattr(y, "dtype")), aval.dtype)
        # from the buffer pool: the residuals of a pipeline's or RNN's forward scan are many
        # MiB, made every training step; a fresh array faults in every page of them
        stacked = _host_parallel.empty(xp, shape[:k] + (length,) + shape[k:], dtype)
        steps = xp.moveaxis(stacked, k, 0) if k else stacked
        for i, y in enumerate(group):
            steps[i] = y
        out.append(stacked)
    return out


# Invariant values up to this size are made contiguous before the loop: a ufunc over a
# broadcast or transposed operand of a few KiB costs about twice one over a contiguous one.
_COMPACT_MAX_BYTES = 1 << 20


def _compact(xp, k, *vals):
    """Small strided invariants made contiguous; one value per device broadcast over its block
    stays a broadcast (``select`` picks whole blocks by it)."""
    return [xp.ascontiguousarray(v) if hasattr(v, "flags") and not v.flags.c_contiguous
            and v.nbytes <= _COMPACT_MAX_BYTES and any(v.strides[k:]) else v for v in vals]


def _unstack(length, xp, k, *xs):
    """The ``length`` steps (the dim after the mesh dims) of each array in turn, as views."""
    out = []
    for x in xs:
        if x.shape[k] == length:
            out += list(xp.moveaxis(x, k, 0)) if k else list(x)
        else:                                   # one step for all (a broadcast value)
            out += [x[(slice(None),) * k + (0,)]] * length
    return out


# ---------------------------------------------------------------------------------------------
# moving work out of a loop's steps
#
# A loop body runs once per step; what it computes from the consts alone is the same at every
# step, and what it computes from the consts and the step's ``xs`` alone (no carry) can be
# computed for all steps at once before the loop, as one array operation over the stacked
# ``xs`` (a product of every step's input with a weight becomes one big product instead of a
# thousand small ones).  Only pure array operations move: no collective, no callback, no
# sub-program, and nothing whose results for all steps together would take more than
# ``_BATCHED_STEPS_MAX_BYTES``.
# ---------------------------------------------------------------------------------------------

_BATCHED_STEPS_MAX_BYTES = 64 << 20


def _movable(e) -> bool:
    return (e.prim.category is not None and e.prim.execute is None and e.prim.stacked is None
            and bool(e.outputs))


def _nbytes(avals) -> int:
    return builtins.sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in avals)


class _Split:
    """A loop body split three ways.  ``invariant``: the consts -> values every step reads
    alike, or None; ``batched``: ``(eqns, consts in, xs in, outs)`` computed for all steps at
    once from the consts (and invariant values) and the ``xs``, or None; ``step``: the rest, a
    program of the consts, the invariant values it reads, the carries, the ``xs`` it reads (by
    position: ``xs_read``) and the batched values."""

    def __init__(self, body: Program, n_consts: int, n_carry: int, length: int = 0):
        consts = body.in_vars[:n_consts]
        carry = body.in_vars[n_consts:n_consts + n_carry]
        xs = body.in_vars[n_consts + n_carry:]
        kind = {id(v): "const" for v in consts}
        kind.update({id(v): "carry" for v in carry})
        kind.update({id(v): "x" for v in xs})
        invariant, batched, rest = [], [], []
        budget = _BATCHED_STEPS_MAX_BYTES
        for e in body.eqns:
            kinds = {kind[id(a)] for a in e.inputs if isinstance(a, Var)}
            if _movable(e) and kinds <= {"const"}:
                where, what = invariant, "const"
            elif (_movable(e) and kinds <= {"const", "x"}
                  and length * _nbytes(v.aval for v in e.outputs) <= budget):
                budget -= length * _nbytes(v.aval for v in e.outputs)
                where, what = batched, "x"
            else:
                where, what = rest, "carry"
            where.append(e)
            kind.update({id(v): what for v in e.outputs})
        read_by = lambda eqns: {id(a) for e in eqns for a in e.inputs if isinstance(a, Var)}
        step_reads = read_by(rest) | {id(a) for a in body.out_vars if isinstance(a, Var)}
        batched_reads = read_by(batched)
        made_inv = [v for e in invariant for v in e.outputs]
        made_bat = [v for e in batched for v in e.outputs]
        inv_out = [v for v in made_inv if id(v) in step_reads | batched_reads]
        self.invariant = Program(list(consts), invariant, inv_out) if invariant else None
        self.inv_for_step = [i for i, v in enumerate(inv_out) if id(v) in step_reads]
        self.batched = None
        if batched:
            self.batched = (batched, [v for v in list(consts) + inv_out if id(v) in batched_reads],
                            [v for v in xs if id(v) in batched_reads],
                            [v for v in made_bat if id(v) in step_reads])
        out_vars, self.accumulators, extra = list(body.out_vars), [], []
        if length:
            rest, budget = self._accumulate(rest, body, carry, xs, kind, out_vars, extra, budget,
                                            length)
        self.extra_ys = extra
        step_reads = read_by(rest) | {id(a) for a in out_vars + extra if isinstance(a, Var)}
        self.xs_read = [i for i, v in enumerate(xs) if id(v) in step_reads]
        bat_out = self.batched[3] if batched else []
        self.n_consts = n_consts + len(self.inv_for_step)
        self.step = Program(list(consts) + [inv_out[i] for i in self.inv_for_step] + list(carry)
                            + [xs[i] for i in self.xs_read] + bat_out, rest, out_vars + extra)
        self.moved = bool(invariant or batched or self.accumulators)

    def _accumulate(self, rest, body, carry, xs, kind, out_vars, extra, budget, length):
        """Carries that only sum a product per step (``dw = dw + x.T @ g``, a weight's
        gradient in a backward scan) of which one operand is stacked already (an ``xs``, or a
        value made for all steps before the loop): the step passes the carry through and
        gives the product's other operand as an extra stacked output, and after the loop the
        carry takes all the products at once, as one product that also contracts over the
        steps (``accumulators``: ``(carry, product or sum, where each operand comes from)``).
        The sum then runs as one big product instead of one small product and one addition per
        step."""
        stacked = self.batched[3] if self.batched is not None else []   # made for all steps
        uses: dict[int, int] = {}
        for e in rest:
            for a in e.inputs:
                uses[id(a)] = uses.get(id(a), 0) + 1
        for a in body.out_vars:
            uses[id(a)] = uses.get(id(a), 0) + 1
        made = {id(v): e for e in rest for v in e.outputs}
        dropped = set()

        def summand(j, c, prim):
            """``(the addition, the equation of prim)`` where carry ``c`` adds the result of an
            equation of ``prim`` (read by nothing else) to itself each step, or None."""
            add = made.get(id(body.out_vars[j]))
            if out_vars[j] is c or add is None or add.prim is not prims.add_p \
                    or c not in add.inputs or uses.get(id(c)) != 1 \
                    or uses.get(id(body.out_vars[j])) != 1:
                return None
            d = next((a for a in add.inputs if a is not c), None)
            term = made.get(id(d)) if isinstance(d, Var) and uses.get(id(d)) == 1 else None
            if (term is None or term.prim is not prim or d.aval.shape != c.aval.shape
                    or d.aval.dtype != c.aval.dtype):
                return None
            return add, term

        def stacked_at(a):
            """Where ``a`` is stacked for all steps already (an ``xs``, a value made for all
            steps, an extra stacked output), or None."""
            if a in xs:
                return "xs", xs.index(a)
            if a in stacked:
                return "batched", stacked.index(a)
            at = next((i for i, e in enumerate(extra) if e is a), None)
            return None if at is None else ("ys", at)

        def accept(j, c, found, where):
            add, term = found
            self.accumulators.append((j, term, tuple(where)))
            out_vars[j] = c
            dropped.update((id(add), id(term)))

        for j, c in enumerate(carry):
            found = summand(j, c, prims.dot_general_p)
            dot = found[1] if found else None
            # one operand must be stacked already (an ``xs``: a forward pass's residual), so
            # stacking the other costs no more memory than the loop holds anyway (a loop
            # that keeps a bounded stash, as 1F1B does, keeps its products in the loop)
            if (dot is None or not all(isinstance(a, Var) and kind[id(a)] in ("x", "carry")
                                       for a in dot.inputs)
                    or not any(a in xs or a in stacked for a in dot.inputs)):
                continue
            cost = length * _nbytes(a.aval for a in dot.inputs if a not in xs and a not in stacked)
            if cost > budget:
                continue
            budget -= cost
            for a in dot.inputs:
                if stacked_at(a) is None:
                    extra.append(a)
            accept(j, c, found, [stacked_at(a) for a in dot.inputs])
        # sums of a value stacked already (``db = db + g.sum(0)``, a bias's gradient beside its
        # weight's): one sum over the steps too after the loop, no reduction and addition a step
        for j, c in enumerate(carry):
            found = summand(j, c, prims.reduce_sum_p)
            a = found[1].inputs[0] if found else None
            where = stacked_at(a) if isinstance(a, Var) else None
            if where is not None:                # (stacking it for this alone costs more)
                accept(j, c, found, [where])
        return [e for e in rest if id(e) not in dropped], budget


def _with_dims(xp, x, rank):
    """``x`` as an array of ``rank`` dims (leading ones added: a Python scalar, a value without
    its mesh dims)."""
    if getattr(x, "ndim", -1) == rank:
        return x
    x = xp.asarray(x)
    return x.reshape((1,) * (rank - x.ndim) + x.shape)


def _batched_steps(eqns, const_in, xs_in, outs):
    """``fn(xp, k, *consts, *xs)`` for ``run.local``: ``eqns`` for every step at once, the
    steps one more leading batch dim (after the ``k`` mesh dims) of the implementations; the
    consts have size 1 there.  Returns ``outs`` stacked like ``xs``."""
    def fn(xp, k, *vals):
        env = {}
        for v, x in zip(const_in, vals):
            x = _with_dims(xp, x, k + v.aval.ndim)
            env[id(v)] = x.reshape(x.shape[:k] + (1,) + x.shape[k:])
        for v, x in zip(xs_in, vals[len(const_in):]):
            env[id(v)] = _with_dims(xp, x, k + 1 + v.aval.ndim)
        read = lambda a: env[id(a)] if isinstance(a, Var) else (
            a.val if isinstance(a.val, (bool, int, float, complex))
            else _with_dims(xp, a.val, k + 1 + a.aval.ndim))
        for e in eqns:
            r = e.prim.rule("impl")(xp, k + 1, *[read(a) for a in e.inputs], **e.params)
            for v, o in zip(e.outputs, r if e.prim.multiple_results else [r]):
                env[id(v)] = o
        return [env[id(v)] for v in outs]
    return fn


def _hoisted(run, split: _Split):
    """The function of the consts giving the invariant values of ``split``, or None."""
    if split.invariant is None:
        return None
    invariant, compact = run.call(split.invariant), run.local(_compact)
    return lambda *consts: compact(*invariant(*consts))


def _scan_execute(run, *, body, length, reverse, unroll, n_consts, n_carry, name):
    split = _Split(body, n_consts, n_carry, length)
    step = run.call(split.step)
    hoisted = _hoisted(run, split)
    if split.batched is not None:
        eqns, const_in, xs_in, bat_out = split.batched
        batched = run.local(_batched_steps(eqns, const_in, xs_in, bat_out))
        inv_vars = split.invariant.out_vars if split.invariant is not None else []
        sources = {id(v): i for i, v in enumerate(list(body.in_vars[:n_consts]) + inv_vars)}
        bat_consts = [sources[id(v)] for v in const_in]
        x_pos = {id(v): i for i, v in enumerate(body.in_vars[n_consts + n_carry:])}
        bat_xs = [x_pos[id(v)] for v in xs_in]
    unstack = run.local(lambda xp, k, *xs: _unstack(length, xp, k, *xs))
    ys_avals = body.out_avals[n_carry:] + [v.aval for v in split.extra_ys]
    stack = run.local(lambda xp, k, *ys: _stack(length, ys_avals, xp, k, *ys))
    n_ys = len(body.out_vars) - n_carry
    n_out = n_ys + len(split.extra_ys)
    order = range(length - 1, -1, -1) if reverse else range(length)
    summed = [run.local(functools.partial(
        _all_steps_sum if eqn.prim is prims.reduce_sum_p else _all_steps_product, eqn))
        for _, eqn, _ in split.accumulators]
    # the steps as one call of native code, where the executor has it for this body
    native = run.native_scan(split.step, split.n_consts, n_carry, reverse)

    def loop(*vals):
        consts, carry = vals[:n_consts], vals[n_consts:n_consts + n_carry]
        xs = vals[n_consts + n_carry:]
        stacked, made = [], []
        if length:
            inv = hoisted(*consts) if hoisted is not None else []
            step_consts = list(consts) + [inv[i] for i in split.inv_for_step]
            per_step = [xs[i] for i in split.xs_read]
            if split.batched is not None:
                known = list(consts) + list(inv)
                made = batched(*[known[i] for i in bat_consts], *[xs[i] for i in bat_xs])
                per_step += made
            done = native(length, step_consts, carry, per_step) if native is not None else None
            if done is not None:
                carry, stacked = done
            else:
                flat = unstack(*per_step) if per_step else []
                per_step = [flat[i::length] for i in range(length)]
                ys = [()] * length
                for i in order:
                    outs = step(*step_consts, *carry, *per_step[i])
                    carry = outs[:n_carry]
                    ys[i] = outs[n_carry:]
                stacked = stack(*[y[j] for j in range(n_out) for y in ys]) if n_out else []
        if length and split.accumulators:
            carry = list(carry)
            for (j, _, where), total in zip(split.accumulators, summed):
                ops = [{"xs": xs, "batched": made}[src][i] if src != "ys" else stacked[n_ys + i]
                       for src, i in where]
                carry[j], = total(carry[j], *ops)
        return list(carry) + (stacked[:n_ys] if n_ys and length else
                              (stack() if n_ys else []))
    return loop


def _all_steps_product(dot, xp, k, c, a, b):
    """``[c`` plus the sum over the steps of ``dot`` of each step's operands``]``: ``a`` and ``b``
    stacked (the steps after the ``k`` mesh dims), the steps one more contracted dim."""
    (xc, yc), (xb, yb) = dot.params["contract"], dot.params["batch"]
    up = lambda dims: tuple(d + 1 for d in dims)
    a = _with_dims(xp, a, k + 1 + dot.inputs[0].aval.ndim)
    b = _with_dims(xp, b, k + 1 + dot.inputs[1].aval.ndim)
    steps = max(a.shape[k], b.shape[k])         # an ``xs`` the same at every step: size 1
    a, b = (x if x.shape[k] == steps else
            xp.broadcast_to(x, x.shape[:k] + (steps,) + x.shape[k + 1:]) for x in (a, b))
    total = dot.prim.rule("impl")(xp, k, a, b, contract=((0,) + up(xc), (0,) + up(yc)),
                                  batch=(up(xb), up(yb)))
    return [xp.add(_with_dims(xp, c, total.ndim), total)]


def _all_steps_sum(red, xp, k, c, a):
    """``[c`` plus the sum over the steps of ``red`` (a ``reduce_sum``) of each step's
    operand``]``: ``a`` stacked, the steps one more summed dim after the ``k`` mesh dims."""
    a = _with_dims(xp, a, k + 1 + red.inputs[0].aval.ndim)
    total = red.prim.rule("impl")(xp, k, a, axes=(0,) + tuple(d + 1 for d in red.params["axes"]))
    return [xp.add(_with_dims(xp, c, total.ndim), total)]


def _split_scan(xs, n_consts, n_carry):
    return xs[:n_consts], xs[n_consts:n_consts + n_carry], xs[n_consts + n_carry:]


def _scan_jvp(primals, tangents, *, body, length, reverse, unroll, n_consts, n_carry, name):
    nz = [not ad.is_zero(t) and ad_util.differentiable(ad.aval_of_value(p).dtype)
          for p, t in zip(primals, tangents)]
    nz, outs_nz = _fixed_point(body, nz, n_consts, n_carry, _nonzero)
    carry_nz, ys_nz = nz[n_consts:n_consts + n_carry], outs_nz[n_carry:]
    jp = ad.jvp_program(body, nz, ad.context(), tangent_outs=carry_nz + ys_nz)
    n_in, n_out = len(body.in_vars), len(body.out_vars)
    tin = iter(jp.in_vars[n_in:])
    tan_in = [next(tin) if f else None for f in nz]
    c, car, x = _split_scan(list(zip(jp.in_vars[:n_in], tan_in)), n_consts, n_carry)
    group = lambda pairs: [p for p, _ in pairs] + [t for _, t in pairs if t is not None]
    t_out = jp.out_vars[n_out:]
    n_ct = sum(carry_nz)
    jbody = _reorder(jp, group(c) + group(car) + group(x),
                     jp.out_vars[:n_carry] + t_out[:n_ct] + jp.out_vars[n_carry:n_out]
                     + t_out[n_ct:])
    ops = []
    for part in _split_scan(list(zip(primals, tangents, nz)), n_consts, n_carry):
        ops += [p for p, _, _ in part]
        ops += [ad.instantiate(t, ad.aval_of_value(p)) for p, t, f in part if f]
    outs = bind(scan_p, *ops, body=jbody, length=length, reverse=reverse, unroll=unroll,
                n_consts=n_consts + sum(nz[:n_consts]), n_carry=n_carry + n_ct, name=name)
    carry_out, ys_out = outs[:n_carry + n_ct], outs[n_carry + n_ct:]
    primal_out = carry_out[:n_carry] + ys_out[:len(ys_nz)]
    tc, ty = iter(carry_out[n_carry:]), iter(ys_out[len(ys_nz):])
    avals = _scan_abstract(body=body, length=length, reverse=reverse, unroll=unroll,
                           n_consts=n_consts, n_carry=n_carry, name=name)
    t_out = [next(tc) if f else ad.Zero(a) for f, a in zip(carry_nz, avals[:n_carry])]
    t_out += [next(ty) if f else ad.Zero(a) for f, a in zip(ys_nz, avals[n_carry:])]
    return primal_out, t_out


def _scan_partial_eval(eqn, unknown_ins, ctx):
    """A forward scan of the known part, which also stacks the residuals of every step (values
    the unknown part reads; a const or an ``xs`` it reads is passed as it is), and a scan of the
    unknown part over them."""
    p = eqn.params
    body, nc, ncar = p["body"], p["n_consts"], p["n_carry"]
    unknown, _ = _fixed_point(body, list(unknown_ins), nc, ncar, _unknown_outs(ctx))
    known, unk, out_u, n_res = ad.partial_eval_program(body, unknown, ctx)
    carry_u = unknown[nc:nc + ncar]
    # a carry unknown on the way in but known on the way out: its value becomes a residual
    forced = [i for i in range(ncar) if carry_u[i] and not out_u[i]]
    out_u = carry_u + list(out_u[ncar:])
    residuals = unk.in_vars[:n_res]
    position = {id(v): i for i, v in enumerate(body.in_vars)}
    const_res = [r for r in residuals if position.get(id(r), nc) < nc]
    xs_res = [r for r in residuals if position.get(id(r), -1) >= nc + ncar]
    taken = {id(r) for r in const_res + xs_res}
    known_consts = [(v, a) for v, a, u in zip(body.in_vars[:nc], eqn.inputs[:nc], unknown[:nc])
                    if not u]
    hoisted, before, outer_of = _invariant_residuals(
        known, known_consts, ncar - sum(carry_u), [r for r in residuals if id(r) not in taken])
    taken |= {id(r) for r in hoisted}
    stacked = [r for r in residuals if id(r) not in taken] + [body.out_vars[i] for i in forced]
    known_outs = [a for a, u in zip(body.out_vars, out_u) if not u]
    n_kcarry = ncar - sum(carry_u)
    # a residual that is also one of the known ys is stacked once, as that y
    as_y = {id(v): j for j, v in enumerate(known_outs) if j >= n_kcarry}
    new = [r for r in stacked if id(r) not in as_y]
    kbody = Program(known.in_vars, known.eqns, known_outs + new)
    kin = [a for a, u in zip(eqn.inputs, unknown) if not u]
    keqn = ad.new_eqn(scan_p, kin, dict(p, body=kbody, n_consts=nc - sum(unknown[:nc]),
                                        n_carry=n_kcarry))
    n_kout = len(known_outs)
    keqn.outputs[:n_kout] = [v for v, u in zip(eqn.outputs, out_u) if not u]
    outer_new = {id(r): o for r, o in zip(new, keqn.outputs[n_kout:])}
    res_outer = [keqn.outputs[as_y[id(r)]] if id(r) in as_y else outer_new[id(r)] for r in stacked]
    # the unknown body: residual consts, unknown consts, carries, stacked residuals, residual
    # xs, unknown xs
    forced_vars = {i: Var(body.out_vars[i].aval) for i in forced}
    stacked_in = [r for r in residuals if id(r) not in taken] + [forced_vars[i] for i in forced]
    u_c = [v for v, u in zip(body.in_vars[:nc], unknown[:nc]) if u]
    u_car = [v for v, u in zip(body.in_vars[nc:nc + ncar], carry_u) if u]
    u_x = [v for v, u in zip(body.in_vars[nc + ncar:], unknown[nc + ncar:]) if u]
    uouts = iter(unk.out_vars)
    carry_outs = [forced_vars[i] if i in forced_vars else next(uouts)
                  for i in range(ncar) if carry_u[i]]
    ubody = Program(const_res + hoisted + u_c + u_car + stacked_in + xs_res + u_x, unk.eqns,
                    carry_outs + list(uouts))
    outer = lambda r: eqn.inputs[position[id(r)]]
    uin = ([outer(r) for r in const_res] + [outer_of[id(r)] for r in hoisted]
           + [a for a, u in zip(eqn.inputs[:nc], unknown[:nc]) if u]
           + [a for a, u in zip(eqn.inputs[nc:nc + ncar], carry_u) if u] + list(res_outer)
           + [outer(r) for r in xs_res]
           + [a for a, u in zip(eqn.inputs[nc + ncar:], unknown[nc + ncar:]) if u])
    ueqn = ad.new_eqn(scan_p, uin, dict(p, body=ubody, n_consts=len(const_res) + len(hoisted)
                                        + len(u_c), n_carry=len(u_car)),
                      outputs=[v for v, u in zip(eqn.outputs, out_u) if u])
    return before + [keqn], ueqn, out_u


def _invariant_residuals(known: Program, consts, n_carry: int, candidates):
    """Residuals of a scan's known body that it computes from its known consts alone (the
    invariant part of its :class:`_Split`): the same at every step, so they are computed once
    before the loop and handed to the unknown scan as consts instead of being stacked once per
    step (JAX hoists loop-invariant residuals too).  ``consts``: (body variable, the scan's
    operand) of each known const; ``n_carry``: the known carries.  Returns (those residuals,
    the equations that compute them outside the loop, {id(residual): its variable outside})."""
    outer_of = {id(v): a for v, a in consts}
    split = _Split(known, len(consts), n_carry)
    made_once = split.invariant.eqns if split.invariant is not None else []
    invariant = {id(v) for e in made_once for v in e.outputs}
    hoisted = [r for r in candidates if id(r) in invariant]
    if not hoisted:
        return [], [], {}
    need, chosen = {id(r) for r in hoisted}, []
    for e in reversed(known.eqns):
        if any(id(v) in need for v in e.outputs):
            chosen.append(e)
            need.update(id(a) for a in e.inputs if isinstance(a, Var))
    before = []
    for e in reversed(chosen):
        outs = [Var(v.aval) for v in e.outputs]
        before.append(Eqn(e.prim, [outer_of[id(a)] if isinstance(a, Var) else a
                                   for a in e.inputs], e.params, outs, e.source))
        outer_of.update({id(v): o for v, o in zip(e.outputs, outs)})
    return hoisted, before, outer_of


def _scan_transpose(cts, *invals, body, length, reverse, unroll, n_consts, n_carry, name):
    """A scan the other way: the carry holds the cotangents of the carry and the sums of those
    of the linear consts; each step's ``xs`` cotangents come out as its ``ys``."""
    consts, carry, xs = _split_scan(list(invals), n_consts, n_carry)
    c_lin = [ad.is_undefined(x) for x in consts]
    x_lin = [ad.is_undefined(x) for x in xs]
    linear = c_lin + [True] * n_carry + x_lin      # the body is linear in every carry
    b_c, b_car, b_x = _split_scan(body.in_vars, n_consts, n_carry)
    nl_c = [x for x, l in zip(consts, c_lin) if not l]
    nl_x = [x for x, l in zip(xs, x_lin) if not l]
    acc_avals = [v.aval for v, l in zip(b_c, c_lin) if l]
    ys_avals = body.out_avals[n_carry:]
    ct_carry = [ad.instantiate(ct, a) for ct, a in zip(cts[:n_carry], body.out_avals[:n_carry])]
    car_avals = [a.update(vma=a.vma | ad.aval_of_value(ct).vma)
                 for a, ct in zip(body.out_avals[:n_carry], ct_carry)]
    ct_ys = [ad.instantiate(ct, a.update(shape=(length,) + tuple(a.shape)))
             for ct, a in zip(cts[n_carry:], ys_avals)]
    cty_avals = [ad.aval_of_value(ct) for ct in ct_ys]
    cty_avals = [a.update(shape=a.shape[1:]) for a in cty_avals]
    n_nlc, n_acc = len(nl_c), len(acc_avals)
    lin_x_avals = [v.aval for v, l in zip(b_x, x_lin) if l]

    def backward(*args):
        nlc, acc = args[:n_nlc], args[n_nlc:n_nlc + n_acc]
        ctc = args[n_nlc + n_acc:n_nlc + n_acc + n_carry]
        rest = args[n_nlc + n_acc + n_carry:]
        nlx, cty = rest[:len(nl_x)], rest[len(nl_x):]
        got = ad.backward_pass(body, linear, list(nlc) + list(nlx), list(ctc) + list(cty))
        g_c, g_car, g_x = got[:n_acc], got[n_acc:n_acc + n_carry], got[n_acc + n_carry:]
        acc = [_with_vma(ad.add_tangents(a, g), a.aval.vma) for a, g in zip(acc, g_c)]
        g_car = [_with_vma(ad.instantiate(g, a), a.vma) for g, a in zip(g_car, car_avals)]
        return acc + g_car + [ad.instantiate(g, a) for g, a in zip(g_x, lin_x_avals)]
    in_avals = ([v.aval for v, l in zip(b_c, c_lin) if not l] + acc_avals + car_avals
                + [v.aval for v, l in zip(b_x, x_lin) if not l] + cty_avals)
    tbody, captured = trace(backward, in_avals, **ad.context())
    assert not captured
    acc0 = [ad_util.full(a, 0) for a in acc_avals]
    ct_carry = [_with_vma(c, a.vma) for c, a in zip(ct_carry, car_avals)]
    outs = bind(scan_p, *nl_c, *acc0, *ct_carry, *nl_x, *ct_ys, body=tbody, length=length,
                reverse=not reverse, unroll=unroll, n_consts=n_nlc, n_carry=n_acc + n_carry,
                name=f"transpose({name})")
    g_c, g_car, g_x = iter(outs[:n_acc]), outs[n_acc:n_acc + n_carry], iter(outs[n_acc + n_carry:])
    return ([next(g_c) if l else None for l in c_lin]
            + [g if ad.is_undefined(x) else None for g, x in zip(g_car, carry)]
            + [next(g_x) if l else None for l in x_lin])


def _scan_batch(vals, dims, *, body, length, reverse, unroll, n_consts, n_carry, name):
    """A scan of the batched body: consts and carries batched at dim 0, ``xs`` at dim 1 (after
    the scanned dim); every output comes out batched."""
    size = batch_size(vals, dims)
    batched = [d is not None for d in dims]
    while True:
        bdims = [0 if b else None for b in batched]
        in_avals = [v.aval.update(shape=(size,) + tuple(v.aval.shape)) if b else v.aval
                    for v, b in zip(body.in_vars, batched)]
        carry_b = batched[n_consts:n_consts + n_carry]
        grew = []

        def batched_body(*xs):
            outs, odims = batch_eval(body, xs, bdims, size)
            grew.extend(not cb and d is not None for cb, d in zip(carry_b, odims[:n_carry]))
            return [to_front(o, d, size) if (i >= n_carry or carry_b[i]) else o
                    for i, (o, d) in enumerate(zip(outs, odims))]
        bbody, captured = trace(batched_body, in_avals, **ad.context())
        assert not captured
        if not any(grew):
            break
        batched[n_consts:n_consts + n_carry] = [c or g for c, g in zip(carry_b, grew)]
    ops = []
    for i, (v, d, b) in enumerate(zip(vals, dims, batched)):
        if i < n_consts + n_carry:
            ops.append(to_front(v, d, size) if b else v)
        else:
            ops.append(moveaxis(v, d, 1) if d is not None else v)
    outs = bind(scan_p, *ops, body=bbody, length=length, reverse=reverse, unroll=unroll,
                n_consts=n_consts, n_carry=n_carry, name=name)
    return outs, [0 if b else None for b in carry_b] + [1] * (len(outs) - n_carry)


scan_p = Primitive("scan", abstract=_scan_abstract, multiple_results=True,
                   vma=lambda *avals, **params: frozenset(), execute=_scan_execute,
                   jvp=_scan_jvp, partial_eval=_scan_partial_eval, transpose=_scan_transpose,
                   batch=_scan_batch)


def _scan(f, init, xs, length, reverse, unroll, *, kind, name, describe):
    init_leaves, init_tree = _flatten(init)
    xs_leaves, xs_tree = _flatten(xs)
    lengths = []
    for p, x in zip(optree.treespec_paths(xs_tree), xs_leaves):
        a = aval_of(x)
        if a.ndim == 0:
            raise ValueError(f"{kind}({name}): xs{_path('', p)} is a scalar ({a}); every leaf of "
                             f"xs needs a leading axis to scan over.")
        lengths.append(a.shape[0])
    if length is not None:
        length = operator.index(length)
        if any(n != length for n in lengths):
            raise ValueError(f"{kind}({name}): length={length} disagrees with the leading axis "
                             f"sizes of xs {sorted(set(lengths))}.")
    elif not lengths:
        raise ValueError(f"{kind}({name}): no xs to scan over and no `length`; pass length=.")
    elif len(set(lengths)) > 1:
        raise ValueError(f"{kind}({name}): the leaves of xs have different leading axis sizes "
                         f"{lengths}; they must all have the same length.")
    else:
        length = lengths[0]
    if not isinstance(unroll, (bool, int, np.integer)) or unroll < 0:
        raise ValueError(f"{kind}({name}): unroll={unroll!r} must be a non-negative int or a bool.")
    in_tree = optree.tree_structure((init, xs), none_is_leaf=False)
    x_avals = [aval_of(x).update(shape=aval_of(x).shape[1:]) for x in xs_leaves]

    def pair(out):
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"{kind}({name}): the body function must return a pair (carry, y), "
                            f"but returned {type(out).__name__}.")
        return out
    for _ in range(2):
        c_avals = [aval_of(c) for c in init_leaves]
        body, consts, (out_tree, y_tree) = _trace(f, in_tree, c_avals + x_avals, f"{kind}({name})",
                                                  split=pair)
        n = len(consts)
        out_avals = body.out_avals[:len(init_leaves)]
        if out_tree == init_tree:
            fixed = _weak_fix(init_leaves, c_avals, out_avals)
            if fixed is not None:
                init_leaves = fixed
                continue
        break
    _check_carry(kind, name, describe, init_tree, out_tree, c_avals, out_avals)
    outs = bind(scan_p, *consts, *init_leaves, *xs_leaves, body=body, length=length,
                reverse=bool(reverse), unroll=unroll, n_consts=n, n_carry=len(init_leaves),
                name=name)
    k = len(init_leaves)
    return optree.tree_unflatten(init_tree, outs[:k]), optree.tree_unflatten(y_tree, outs[k:])


def scan(f, init, xs=None, length=None, reverse=False, unroll=1, _split_transpose=False):
    """``jax.lax.scan``: ``f(carry, x) -> (carry, y)`` over the leading axis of ``xs``; returns
    the last carry and the stacked ``y``s.  ``init`` and ``xs`` are pytrees; ``length`` is needed
    when ``xs`` is None; ``reverse`` scans from the end (``ys`` keep their positions); ``unroll``
    is accepted for JAX's signature (the executors run one body per step either way).

    >>> import numpy as np, spmd.lax as lax
    >>> last, ys = lax.scan(lambda c, x: (c * x, c), 1.0, np.arange(1.0, 5.0), reverse=True)
    >>> float(last), np.asarray(ys).tolist()
    (24.0, [24.0, 12.0, 4.0, 1.0])
    """
    name = _fn_name(f)
    if current_builder() is None:
        return _staged(lambda i, x: scan(f, i, x, length, reverse, unroll),
                       f"scan({name})")(init, xs)
    return _scan(f, init, xs, length, reverse, unroll, kind="scan", name=name,
                 describe=lambda p: _path("carry", p))


def map(f, xs, *, batch_size=None):                             # noqa: A001 (JAX's name)
    """``jax.lax.map``: ``f`` applied to each slice of ``xs`` along its leading axis, as a scan
    (``batch_size``: that many slices at a time under ``vmap``)."""
    name = _fn_name(f)
    if current_builder() is None:
        return _staged(lambda x: map(f, x, batch_size=batch_size), f"map({name})")(xs)
    if batch_size is None:
        return _scan(lambda c, x: (c, f(x)), (), xs, None, False, 1, kind="map", name=name,
                     describe=lambda p: _path("carry", p))[1]
    leaves, tree = _flatten(xs)
    n = aval_of(leaves[0]).shape[0]
    full, rest = divmod(n, batch_size)
    g = vmap(f)
    head = [np.reshape(x[:full * batch_size], (full, batch_size) + tuple(aval_of(x).shape[1:]))
            for x in leaves]
    ys = _scan(lambda c, x: (c, g(x)), (), optree.tree_unflatten(tree, head), None, False, 1,
               kind="map", name=name, describe=lambda p: _path("carry", p))[1]
    ys = optree.tree_map(
        lambda y: np.reshape(y, (full * batch_size,) + tuple(aval_of(y).shape[2:])), ys)
    if rest:
        tail = g(optree.tree_unflatten(tree, [x[full * batch_size:] for x in leaves]))
        ys = optree.tree_map(lambda a, b: np.concatenate([a, b]), ys, tail)
    return ys


def fori_loop(lower, upper, body_fun, init_val, *, unroll=None):
    """``jax.lax.fori_loop``: ``body_fun(i, val)`` for ``i`` in ``range(lower, upper)``.  With
    concrete bounds it is a scan (reverse-mode differentiable), otherwise a while_loop."""
    name = _fn_name(body_fun)
    if current_builder() is None:           # concrete bounds stay static
        return _staged(lambda v: fori_loop(lower, upper, body_fun, v, unroll=unroll),
                       f"fori_loop({name})")(init_val)
    traced = [aval_of(b).dtype for b in (lower, upper) if isinstance(b, Tracer)]
    static = not traced
    dtype = np.result_type(*traced) if traced else np.dtype(np.int32)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"fori_loop({name}): lower and upper must be integers, got {dtype}.")
    describe = lambda p: _path("init_val", p[1:])
    if static:
        lo, up = operator.index(lower), operator.index(upper)

        def step(carry, _):
            i, x = carry
            return (i + 1, body_fun(i, x)), None
        # the counter is weakly typed, like a Python int: ``c * i`` keeps the dtype of ``c``
        (_, out), _ = _scan(step, (lo, init_val), None, builtins.max(up - lo, 0),
                            False, 1 if unroll is None else unroll, kind="fori_loop", name=name,
                            describe=describe)
        return out
    lo, up = _cast(lower, dtype), _cast(upper, dtype)
    step = lambda c: (c[0] + np.asarray(1, dtype), c[1], body_fun(c[0], c[2]))
    return _while(lambda c: c[0] < c[1], step, (lo, up, init_val), kind="fori_loop", name=name,
                  describe=lambda p: _path("init_val", p[1:]))[2]


# ---------------------------------------------------------------------------------------------
# while_loop
# ---------------------------------------------------------------------------------------------

def _while_abstract(*avals, cond, body, n_cond_consts, n_body_consts, name):
    return _typed(body.out_avals)


def _while_execute(run, *, cond, body, n_cond_consts, n_body_consts, name):
    nc, nb = n_cond_consts, n_body_consts
    n_carry = len(body.in_vars) - nb
    csplit, bsplit = _Split(cond, nc, n_carry), _Split(body, nb, n_carry)
    test, step = run.call(csplit.step), run.call(bsplit.step)
    choist, bhoist = _hoisted(run, csplit), _hoisted(run, bsplit)

    def with_invariant(split, hoist, consts):
        if hoist is None:
            return list(consts)
        inv = hoist(*consts)
        return list(consts) + [inv[i] for i in split.inv_for_step]

    def loop(*vals):
        cc, bc, carry = vals[:nc], vals[nc:nc + nb], list(vals[nc + nb:])
        cc = with_invariant(csplit, choist, cc)
        if run.scalar(test(*cc, *carry)[0]):
            bc = with_invariant(bsplit, bhoist, bc)     # the body runs at least once
            carry = step(*bc, *carry)
            while run.scalar(test(*cc, *carry)[0]):
                carry = step(*bc, *carry)
        return carry
    return loop


def _while_jvp(primals, tangents, *, cond, body, n_cond_consts, n_body_consts, name):
    nc, nb = n_cond_consts, n_body_consts
    n_carry = len(primals) - nc - nb
    nz = [not ad.is_zero(t) and ad_util.differentiable(ad.aval_of_value(p).dtype)
          for p, t in zip(primals[nc:], tangents[nc:])]
    nz, _ = _fixed_point(body, nz, nb, n_carry, _nonzero)
    carry_nz = nz[nb:]
    jp = ad.jvp_program(body, nz, ad.context(), tangent_outs=carry_nz)
    n_in = len(body.in_vars)
    t_in = jp.in_vars[n_in:]
    n_bt = sum(nz[:nb])
    jbody = _reorder(jp, jp.in_vars[:nb] + t_in[:n_bt] + jp.in_vars[nb:n_in] + t_in[n_bt:],
                     jp.out_vars)
    t_avals = [v.aval for v, f in zip(body.in_vars[nb:], carry_nz) if f]
    jcond = Program(cond.in_vars + [Var(a) for a in t_avals], cond.eqns, cond.out_vars)
    bprims, btans = primals[nc:nc + nb], tangents[nc:nc + nb]
    cprims, ctans = primals[nc + nb:], tangents[nc + nb:]
    ops = (list(primals[:nc]) + list(bprims) + [t for t, f in zip(btans, nz[:nb]) if f]
           + list(cprims) + [ad.instantiate(t, ad.aval_of_value(p))
                             for p, t, f in zip(cprims, ctans, carry_nz) if f])
    outs = bind(while_p, *ops, cond=jcond, body=jbody, n_cond_consts=nc, n_body_consts=nb + n_bt,
                name=name)
    tc = iter(outs[n_carry:])
    return outs[:n_carry], [next(tc) if f else ad.Zero(v.aval)
                            for f, v in zip(carry_nz, body.out_vars)]


def _while_partial_eval(eqn, unknown_ins, ctx):
    """The known carries by a loop of their own (when the predicate is known); the unknown ones
    by the whole loop again, which reverse mode cannot transpose (JAX's rule)."""
    p = eqn.params
    cond, body, nc, nb = p["cond"], p["body"], p["n_cond_consts"], p["n_body_consts"]
    unknown, _ = _fixed_point(body, list(unknown_ins[nc:]), nb, len(body.out_vars),
                              _unknown_outs(ctx))
    carry_u = unknown[nb:]
    cond_u = list(unknown_ins[:nc]) + carry_u
    everything = ad.new_eqn(while_p, eqn.inputs, p, outputs=list(eqn.outputs))
    kcond, _, pred_u, _ = ad.partial_eval_program(cond, cond_u, ctx)
    if pred_u[0] or all(carry_u):
        return [], everything, [True] * len(carry_u)
    known = ad.partial_eval_program(body, unknown, ctx)[0]
    kbody = ad.dce(Program(known.in_vars, known.eqns,
                           [a for a, u in zip(body.out_vars, carry_u) if not u]))
    kcond = ad.dce(Program(kcond.in_vars, kcond.eqns, kcond.out_vars[:1]))
    kin = list(eqn.inputs[:nc]) + [a for a, u in zip(eqn.inputs[nc:], unknown) if not u]
    keqn = ad.new_eqn(while_p, kin, dict(p, cond=kcond, body=kbody,
                                         n_body_consts=nb - sum(unknown[:nb])),
                      outputs=[v for v, u in zip(eqn.outputs, carry_u) if not u])
    ueqn = ad.new_eqn(while_p, eqn.inputs, p,
                      outputs=[v if u else Var(v.aval) for v, u in zip(eqn.outputs, carry_u)])
    return [keqn], ueqn, carry_u


def _while_transpose(cts, *invals, **params):
    raise ValueError(f"while_loop({params['name']}): Reverse-mode differentiation does not work "
                     f"for lax.while_loop or lax.fori_loop with dynamic start/stop values. Try "
                     f"using lax.scan, or using fori_loop with static start/stop.")


def _while_batch(vals, dims, *, cond, body, n_cond_consts, n_body_consts, name):
    """A while of the batched body.  A batched predicate runs the loop while any entry's holds,
    each entry keeping its carry once its own predicate fails."""
    size = batch_size(vals, dims)
    nc, nb = n_cond_consts, n_body_consts
    n_carry = len(vals) - nc - nb
    batched = [d is not None for d in dims]
    vals = [to_front(v, d, size) if d is not None else v for v, d in zip(vals, dims)]
    lift = lambda v, b: v.aval.update(shape=(size,) + tuple(v.aval.shape)) if b else v.aval
    while True:
        carry_b = batched[nc + nb:]
        cdims = [0 if b else None for b in batched[:nc] + carry_b]
        bdims = [0 if b else None for b in batched[nc:]]
        c_avals = [lift(v, d is not None) for v, d in zip(cond.in_vars, cdims)]
        pred_dim = []
        trace(lambda *xs: pred_dim.extend(batch_eval(cond, xs, cdims, size)[1]) or [], c_avals,
              **ad.context())
        if pred_dim[0] is not None and not all(carry_b):
            batched[nc + nb:] = [True] * n_carry
            continue
        grew = []

        def step(*xs):                      # the cond's consts, the body's consts, the carries
            cc, bc, carry = xs[:nc], xs[nc:nc + nb], xs[nc + nb:]
            outs, odims = batch_eval(body, list(bc) + list(carry), bdims, size)
            grew[:] = [not b and d is not None for b, d in zip(carry_b, odims)]
            outs = [to_front(o, d, size) if b else o for o, d, b in zip(outs, odims, carry_b)]
            if pred_dim[0] is None:
                return outs
            keep, kd = batch_eval(cond, list(cc) + list(carry), cdims, size)
            keep = to_front(keep[0], kd[0], size)
            return [np.where(np.reshape(keep, (size,) + (1,) * (aval_of(o).ndim - 1)), o, c)
                    for o, c in zip(outs, carry)]
        b_avals = [lift(v, d is not None) for v, d in zip(body.in_vars, bdims)]
        bbody, _ = trace(step, c_avals[:nc] + b_avals, **ad.context())
        if not any(grew):
            break
        batched[nc + nb:] = [b or g for b, g in zip(carry_b, grew)]

    def any_entry(*xs):
        pred, d = batch_eval(cond, xs, cdims, size)
        return [np.any(pred[0]) if d[0] is not None else pred[0]]
    bcond, _ = trace(any_entry, c_avals, **ad.context())
    carries = [to_front(v, None, size) if b and d is None else v
               for v, b, d in zip(vals[nc + nb:], carry_b, dims[nc + nb:])]
    outs = bind(while_p, *vals[:nc], *vals[:nc], *vals[nc:nc + nb], *carries, cond=bcond,
                body=bbody, n_cond_consts=nc, n_body_consts=nc + nb, name=name)
    return outs, [0 if b else None for b in carry_b]


while_p = Primitive("while", abstract=_while_abstract, multiple_results=True,
                    vma=lambda *avals, **params: frozenset(), execute=_while_execute,
                    jvp=_while_jvp, partial_eval=_while_partial_eval, transpose=_while_transpose,
                    batch=_while_batch,
                    subprograms=lambda params: [params["cond"], params["body"]])


def _while(cond_fun, body_fun, init_val, *, kind, name, describe):
    leaves, tree = _flatten(init_val)
    in_tree = optree.tree_structure((init_val,), none_is_leaf=False)
    for _ in range(2):
        avals = [aval_of(x) for x in leaves]
        cprog, cconsts, (ctree,) = _trace(cond_fun, in_tree, avals, f"{kind}({name}) cond_fun")
        pred = cprog.out_avals
        if ctree.num_leaves != 1 or pred[0].shape != () or np.dtype(pred[0].dtype) != np.bool_:
            raise TypeError(f"{kind}({name}): cond_fun must return a boolean scalar, but returned "
                            f"{[str(a) for a in pred]}.")
        bprog, bconsts, (out_tree,) = _trace(body_fun, in_tree, avals, f"{kind}({name})")
        out_avals = bprog.out_avals
        if out_tree == tree:
            fixed = _weak_fix(leaves, avals, out_avals)
            if fixed is not None:
                leaves = fixed
                continue
        break
    _check_carry(kind, name, describe, tree, out_tree, avals, out_avals)
    if pred[0].vma:
        return _masked_while(cond_fun, body_fun, tree, leaves, bprog, pred[0].vma, kind, name,
                             describe)
    outs = bind(while_p, *cconsts, *bconsts, *leaves, cond=cprog, body=bprog,
                n_cond_consts=len(cconsts), n_body_consts=len(bconsts), name=name)
    return optree.tree_unflatten(tree, outs)


def _masked_while(cond_fun, body_fun, tree, leaves, bprog, vma, kind, name, describe):
    """A predicate that varies over mesh axes: every device runs until all are done, each
    keeping its carry once its own predicate fails (what JAX's devices do, each on its own)."""
    axes = _ordered_axes(vma)
    if _has_collective(bprog):
        raise VmaError(f"{kind}({name}): the predicate varies over mesh axes {axes} (devices may "
                       f"stop at different steps), but the body calls a collective, which every "
                       f"device must call the same number of times (JAX hangs here). Make the "
                       f"predicate the same on every device (psum/pmax it over {axes}).")
    leaves = [_with_vma(x, vma) for x in leaves]

    def any_device(c):
        return pmax(_cast(cond_fun(c), np.int32), axes) > 0

    def masked_body(c):
        keep = cond_fun(c)
        return optree.tree_map(lambda new, old: np.where(keep, new, old), body_fun(c), c)
    return _while(any_device, masked_body, optree.tree_unflatten(tree, leaves), kind=kind,
                  name=name, describe=describe)


def while_loop(cond_fun, body_fun, init_val):
    """``jax.lax.while_loop``: ``val = body_fun(val)`` while ``cond_fun(val)``.  Forward-mode
    differentiable; reverse mode raises JAX's error (use ``scan`` or a static ``fori_loop``)."""
    name = _fn_name(body_fun)
    if current_builder() is None:
        return _staged(lambda v: while_loop(cond_fun, body_fun, v), f"while_loop({name})")(init_val)
    return _while(cond_fun, body_fun, init_val, kind="while_loop", name=name,
                  describe=lambda p: _path("init_val", p))


# ---------------------------------------------------------------------------------------------
# cond and switch
# ---------------------------------------------------------------------------------------------

def _cond_abstract(index, *avals, branches, name):
    return _typed(branches[0].out_avals)


def _cond_execute(run, *, branches, name):
    calls = [run.call(b) for b in branches]
    last = len(calls) - 1
    clamp = lambda i: builtins.min(builtins.max(int(i), 0), last)
    return lambda index, *ops: calls[clamp(run.scalar(index))](*ops)


def _cond_jvp(primals, tangents, *, branches, name):
    index, ops, t_ops = primals[0], primals[1:], tangents[1:]
    nz = [not ad.is_zero(t) and ad_util.differentiable(ad.aval_of_value(p).dtype)
          for p, t in zip(ops, t_ops)]
    out_nz = [builtins.any(f) for f in zip(*[_nonzero(b, nz) for b in branches])]
    jbranches = tuple(ad.jvp_program(b, nz, ad.context(), tangent_outs=out_nz) for b in branches)
    outs = bind(cond_p, index, *ops, *[t for t, f in zip(t_ops, nz) if f], branches=jbranches,
                name=name)
    n = len(branches[0].out_vars)
    t = iter(outs[n:])
    return outs[:n], [next(t) if f else ad.Zero(a) for f, a in zip(out_nz, branches[0].out_avals)]


def _cond_partial_eval(eqn, unknown_ins, ctx):
    """The known outputs by a cond of the known parts, which also returns the residuals of
    every branch (zeros for those of the branches not taken); the unknown ones by a cond of
    the unknown parts reading them."""
    branches, name = eqn.params["branches"], eqn.params["name"]
    if unknown_ins[0]:
        return [], ad.new_eqn(cond_p, eqn.inputs, eqn.params, outputs=list(eqn.outputs)), \
            [True] * len(eqn.outputs)
    ops_u = list(unknown_ins[1:])
    pes = [ad.partial_eval_program(b, ops_u, ctx) for b in branches]
    out_u = [builtins.any(f) for f in zip(*[pe[2] for pe in pes])]
    res = []                               # per branch: its residual atoms (forced outputs last)
    for b, (known, unk, bu, n_res) in zip(branches, pes):
        forced = [a for a, u, o in zip(b.out_vars, out_u, bu) if u and not o]
        res.append(list(unk.in_vars[:n_res]) + forced)
    known_in_avals = [v.aval for v, u in zip(branches[0].in_vars, ops_u) if not u]

    def known_branch(k):
        known = pes[k][0]
        prog = Program(known.in_vars, known.eqns,
                       [a for a, u in zip(branches[k].out_vars, out_u) if not u] + res[k])

        def fn(*args):
            outs = ad.eval_program(prog, args)
            n_out = len(outs) - len(res[k])
            mine, own = outs[:n_out], iter(outs[n_out:])
            return mine + [next(own) if j == k else ad_util.full(a.aval, 0)
                           for j, r in enumerate(res) for a in r]
        return trace(fn, known_in_avals, **ctx)[0]
    kbranches = tuple(known_branch(k) for k in range(len(branches)))
    kin = [eqn.inputs[0]] + [a for a, u in zip(eqn.inputs[1:], ops_u) if not u]
    keqn = ad.new_eqn(cond_p, kin, dict(branches=kbranches, name=name))
    n_kout = len(eqn.outputs) - sum(out_u)
    keqn.outputs[:n_kout] = [v for v, u in zip(eqn.outputs, out_u) if not u]
    res_outer = keqn.outputs[n_kout:]

    def unknown_branch(k):
        _, unk, bu, n_res = pes[k]
        forced = [Var(a.aval) for a in res[k][n_res:]]
        slots = [list(unk.in_vars[:n_res]) + forced if j == k else [Var(a.aval) for a in r]
                 for j, r in enumerate(res)]
        outs, forced_outs = iter(unk.out_vars), iter(forced)
        return Program([v for slot in slots for v in slot] + list(unk.in_vars[n_res:]), unk.eqns,
                       [next(outs) if o else next(forced_outs) for u, o in zip(out_u, bu) if u])
    ubranches = tuple(unknown_branch(k) for k in range(len(branches)))
    uin = [eqn.inputs[0]] + list(res_outer) + [a for a, u in zip(eqn.inputs[1:], ops_u) if u]
    ueqn = ad.new_eqn(cond_p, uin, dict(branches=ubranches, name=name),
                      outputs=[v for v, u in zip(eqn.outputs, out_u) if u])
    return [keqn], ueqn, out_u


def _cond_transpose(cts, index, *ops, branches, name):
    linear = [ad.is_undefined(x) for x in ops]
    consts = [x for x in ops if not ad.is_undefined(x)]
    cts = [ad.instantiate(ct, a) for ct, a in zip(cts, branches[0].out_avals)]
    ct_avals = [ad.aval_of_value(c) for c in cts]
    tbranches = tuple(ad.transpose_program(b, linear, ad.context(), ct_avals=ct_avals)
                      for b in branches)
    outs = iter(bind(cond_p, index, *consts, *cts, branches=tbranches, name=f"transpose({name})"))
    return [None] + [next(outs) if l else None for l in linear]


def _cond_batch(vals, dims, *, branches, name):
    size = batch_size(vals, dims)
    index, ops = vals[0], vals[1:]
    bdims = [0 if d is not None else None for d in dims[1:]]
    ops = [moveaxis(v, d, 0) if d is not None else v for v, d in zip(ops, dims[1:])]
    if dims[0] is not None:             # a batched index: every branch, then a select per entry
        index = to_front(index, dims[0], size)
        per_branch = [[to_front(o, d, size) for o, d in zip(*batch_eval(b, ops, bdims, size))]
                      for b in branches]
        outs = per_branch[0]
        for k, b_outs in enumerate(per_branch[1:], 1):
            outs = [np.where(np.reshape(index == k, (size,) + (1,) * (aval_of(o).ndim - 1)), bo, o)
                    for o, bo in zip(outs, b_outs)]
        return outs, [0] * len(outs)
    avals = [v.aval.update(shape=(size,) + tuple(v.aval.shape)) if d is not None else v.aval
             for v, d in zip(branches[0].in_vars, bdims)]

    def batched(b):
        front = lambda *xs: [to_front(o, d, size) for o, d in zip(*batch_eval(b, xs, bdims, size))]
        return trace(front, avals, **ad.context())[0]
    outs = bind(cond_p, index, *ops, branches=tuple(batched(b) for b in branches), name=name)
    return outs, [0] * len(outs)


cond_p = Primitive("cond", abstract=_cond_abstract, multiple_results=True,
                   vma=lambda *avals, **params: frozenset(), execute=_cond_execute,
                   jvp=_cond_jvp, partial_eval=_cond_partial_eval, transpose=_cond_transpose,
                   batch=_cond_batch, subprograms=lambda params: list(params["branches"]))


def _branches(kind, funs, names, operands):
    """Trace every branch on the operands; one program per branch over the operands followed by
    the closed-over values of all branches."""
    leaves, tree = _flatten(operands)
    avals = [aval_of(x) for x in leaves]
    traced = [_trace(f, tree, avals, f"{kind}({n})") for f, n in zip(funs, names)]
    trees = [t[2][0] for t in traced]
    for k in range(1, len(funs)):
        if trees[k] != trees[0]:
            raise TypeError(f"{kind}({', '.join(names)}): branch {names[k]} returns structure "
                            f"{trees[k]} but branch {names[0]} returns {trees[0]}; every "
                            f"branch must return the same pytree of the same types.")
    outs = [t[0].out_avals for t in traced]
    # weakly typed outputs (Python scalars) adopt the dtype of the other branches'
    target = [next((o[j].dtype for o in outs if not o[j].weak), outs[0][j].dtype)
              for j in range(len(outs[0]))]
    if any(np.dtype(o[j].dtype) != np.dtype(target[j]) and o[j].weak
           for o in outs for j in range(len(o))):
        casted = [lambda *a, f=f: optree.tree_map(lambda y, dt: _cast(y, dt), f(*a),
                                                  optree.tree_unflatten(trees[0], target))
                  for f in funs]
        traced = [_trace(f, tree, avals, f"{kind}({n})") for f, n in zip(casted, names)]
        outs = [t[0].out_avals for t in traced]
    for k in range(1, len(funs)):
        for p, a, b in zip(optree.treespec_paths(trees[0]), outs[0], outs[k]):
            if not _same_type(a, b):
                raise _error(a, b)(f"{kind}({', '.join(names)}): branches must return equal types, "
                                   f"but output{_path('', p)} of {names[0]} is {a} and of "
                                   f"{names[k]} is {b}: {_mismatch(a, b)}.")
    all_consts = [c for t in traced for c in t[1]]
    progs = []
    for k, (prog, consts, _) in enumerate(traced):
        others = [[Var(aval_of(c)) for c in t[1]] for t in traced]
        mine = prog.in_vars[:len(consts)]
        const_vars = [v for j, vs in enumerate(others) for v in (mine if j == k else vs)]
        progs.append(Program(prog.in_vars[len(consts):] + const_vars, prog.eqns, prog.out_vars))
    return leaves + all_consts, tuple(progs), trees[0]


def _cond(kind, index, funs, names, operands):
    ops, progs, out_tree = _branches(kind, funs, names, operands)
    index_aval = aval_of(index)
    if index_aval.vma:                    # devices choose on their own: every branch, a select
        if builtins.any(_has_collective(p) for p in progs):
            raise VmaError(f"{kind}({', '.join(names)}): the branch index varies over mesh axes "
                           f"{_ordered_axes(index_aval.vma)} but a branch calls a collective, "
                           f"which every device must call alike (JAX hangs here). Make the index "
                           f"the same on every device (psum/pmax it) before {kind}.")
        outs = None
        for k, prog in enumerate(progs):
            mine = ad.eval_program(prog, ops)
            outs = mine if outs is None else [np.where(index == k, m, o)
                                              for m, o in zip(mine, outs)]
        return optree.tree_unflatten(out_tree, outs)
    outs = bind(cond_p, index, *ops, branches=progs, name=", ".join(names))
    return optree.tree_unflatten(out_tree, outs)


def _as_index(kind, x, n):
    a = aval_of(x)
    if a.shape != ():
        what = "predicate" if kind == "cond" else "index"
        raise TypeError(f"{kind}: the {what} must be a scalar, got shape {a.shape}.")
    if kind == "cond":
        if not isinstance(x, Tracer):
            return np.int32(bool(np.asarray(x)))
        x = x if np.dtype(a.dtype) == np.bool_ else np.not_equal(x, 0)
        return _cast(x, np.int32)
    if not np.issubdtype(np.dtype(a.dtype), np.integer):
        raise TypeError(f"switch: the index must be an integer scalar, got {a}.")
    if not isinstance(x, Tracer):
        return np.int32(builtins.min(builtins.max(int(x), 0), n - 1))
    return np.clip(_cast(x, np.int32), 0, n - 1)


def cond(pred, true_fun, false_fun, *operands):
    """``jax.lax.cond``: ``true_fun(*operands)`` if ``pred`` else ``false_fun(*operands)``; both
    branches are traced and must return the same types."""
    names = [_fn_name(false_fun), _fn_name(true_fun)]
    if current_builder() is None:
        return _staged(lambda p, *o: cond(p, true_fun, false_fun, *o),
                       f"cond({names[1]})")(pred, *operands)
    return _cond("cond", _as_index("cond", pred, 2), [false_fun, true_fun], names, operands)


def switch(index, branches, *operands):
    """``jax.lax.switch``: ``branches[index](*operands)``, the index clamped into range."""
    branches = list(branches)
    if not branches:
        raise ValueError("switch: branches must be a non-empty sequence of functions.")
    names = [_fn_name(b) for b in branches]
    if current_builder() is None:
        return _staged(lambda i, *o: switch(i, branches, *o),
                       f"switch({names[0]})")(index, *operands)
    return _cond("switch", _as_index("switch", index, len(branches)), branches, names, operands)
