"""``custom_jvp`` and ``custom_vjp``: a function with a derivative rule written by hand.

A call of a decorated function is one equation of a higher-order primitive whose ``body`` is
the function's Program; executors run the body and the compiler inlines it, so outside
autodiff the rule costs nothing.  The rules themselves are traced only when a transformation
needs them, as JAX does (a rule may call the function it belongs to, and second derivatives
then use the rule again):

- ``custom_jvp_call``: its JVP calls the user's ``jvp(primals, tangents)`` on the current
  values; what the rule computes is ordinary equations, so reverse mode transposes it.
- ``custom_vjp_call``: its JVP runs ``fwd`` and leaves the tangent to ``custom_lin``, an
  equation linear in the tangents whose transpose runs ``bwd(res, ct)``.  Forward mode alone
  (``jvp`` of a ``custom_vjp`` function) is an error, as in JAX.

Both work inside ``shard_map`` (the rules may call collectives) and under ``vmap`` (the body
and the rules are batched when the rule runs).

>>> import numpy as np, spmd
>>> @spmd.custom_jvp
... def log1pexp(x):
...     return np.log1p(np.exp(x))
>>> @log1pexp.defjvp
... def log1pexp_jvp(primals, tangents):
...     (x,), (t,) = primals, tangents
...     return log1pexp(x), t * (1 - 1 / (1 + np.exp(x)))
>>> float(np.asarray(spmd.grad(log1pexp)(100.)))
1.0
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import types

import numpy as np
import optree

from .core import Primitive, Program, Tracer, Var, aval_of, bind, current_builder, hooks, trace
from .transforms import ad
from .tree_util import flat_call
from .batching import batch_size, moveaxis, to_front
from .transforms.vmap import batch_eval
from .tree_util import keystr, tree_flatten_with_path

__all__ = ["custom_jvp", "custom_vjp"]


class _Rule:
    """A user's rule as an equation parameter (hashed by identity, printed by name).

    A rule runs later than the call that bound it, in the transformation's own trace, but it
    may close over traced values of the trace it was called in.  ``slots`` name the closure
    cells of ``fn`` that held one (``(cell, operand, id of the value the user's function
    holds)``); the value is an operand of the equation.  ``bound(ops)``, given the operands as
    they are now, is the callable to run: ``adapt(fn)`` (nondiff arguments first, ...) with
    those cells holding the current operands, and, while it runs, the same substitution for
    every function the rule calls that closes over the same values (its own custom function,
    called again inside the rule).
    """

    def __init__(self, fn, name, adapt=None, slots=()):
        self.fn, self.__name__, self.adapt, self.slots = fn, name, adapt, tuple(slots)

    def bound(self, ops):
        fn = _with_cells(self.fn, {c: ops[i] for c, i, _ in self.slots})
        fn = self.adapt(fn) if self.adapt else fn
        if not self.slots:
            return fn
        new = {origin: ops[i] for _, i, origin in self.slots}

        def call(*args):
            token = _substitutions.set({**_substitutions.get(), **new})
            try:
                return fn(*args)
            finally:
                _substitutions.reset(token)
        return call


# id of a traced value a user's function closes over -> the value that stands for it now
_substitutions: contextvars.ContextVar[dict] = contextvars.ContextVar("spmd_rule_closures",
                                                                      default={})


def _cell_tracers(fn) -> list:
    """``(cell index, tracer)`` for the closure cells of ``fn`` that hold a traced value."""
    out = []
    for c, cell in enumerate(getattr(fn, "__closure__", None) or ()):
        try:
            v = cell.cell_contents
        except ValueError:          # a cell not filled yet
            continue
        if isinstance(v, Tracer):
            out.append((c, v))
    return out


def _with_cells(fn, values: dict):
    """``fn`` with the closure cells ``values`` names holding those values instead."""
    if not values:
        return fn
    cells = list(fn.__closure__)
    for c, v in values.items():
        cells[c] = types.CellType(v)
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                             tuple(cells))
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _resolve_args(fun, name, args, kwargs):
    """Keyword arguments bound to their positions (the rules take positional primals)."""
    if not kwargs:
        return tuple(args)
    try:
        bound = inspect.signature(fun).bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
    bound.apply_defaults()
    return tuple(bound.args) + tuple(bound.kwargs.values())


def _split_nondiff(args, nondiff_argnums, name):
    """``(diff args, nondiff args, their positions)``; nondiff arguments stay Python values."""
    nums = tuple(sorted(i % len(args) if -len(args) <= i < len(args) else i
                        for i in nondiff_argnums))
    for i in nums:
        if not 0 <= i < len(args):
            raise ValueError(f"{name}: nondiff_argnums={tuple(nondiff_argnums)} names argument "
                             f"{i}, but the function was called with {len(args)} positional "
                             f"arguments")
    diff = tuple(a for i, a in enumerate(args) if i not in nums)
    return diff, tuple(args[i] for i in nums), nums


def _merge(diff, nondiff, nums):
    """The positional arguments with the nondiff ones back at their places."""
    d, n = iter(diff), iter(nondiff)
    return [next(n) if i in nums else next(d) for i in range(len(diff) + len(nondiff))]


def _trace_rule(fn, avals, name, what):
    """Trace a rule in the current context: ``(program, captured)``.  What it captures must be
    a value of a trace still running (its closure cells were rebound); a helper closing over a
    value of a finished trace cannot be, and is an error."""
    prog, captured = trace(fn, avals, **ad.context(), context=f"{what} of {name}")
    live, b = set(), current_builder()
    while b is not None:
        live.add(id(b))
        b = b.parent
    for t in captured:
        if id(t.builder) not in live:
            raise TypeError(f"the {what} of {name} uses a traced value ({t.aval}) through a "
                            f"function it calls, which closes over it; pass the value as an "
                            f"argument of {name} (or close over it in the rule itself).")
    return prog, captured


def _run_rule(fn, args, name, what):
    """``fn(*args)`` (flat leaves in and out) traced as a rule and inlined here."""
    prog, captured = _trace_rule(fn, [aval_of(x) for x in args], name, what)
    return ad.eval_program(prog, list(args) + captured)


def _check_tree(name, what, got, want):
    if got != want:
        raise TypeError(f"{name}: the {what} has structure {got}, but it must match the "
                        f"structure of {name}'s output, {want}")


def _paths(tree) -> list[str]:
    return [keystr(p) or "the top" for p, _ in
            tree_flatten_with_path(optree.tree_unflatten(tree, list(range(tree.num_leaves))))[0]]


def _check_leaf_types(name, what, got_leaves, want_avals, tree):
    for path, g, w in zip(_paths(tree), got_leaves, want_avals):
        ga = aval_of(g)
        if tuple(ga.shape) != tuple(w.shape) or (np.dtype(ga.dtype) != np.dtype(w.dtype)
                                                 and not ga.weak):
            raise TypeError(f"{name}: the {what} at {path} has type "
                            f"{np.dtype(ga.dtype).name}{list(ga.shape)}, but the primal has "
                            f"{np.dtype(w.dtype).name}{list(w.shape)}; it must have the same "
                            f"shape and dtype.")


def _like(x, aval):
    """A rule's leaf typed as the primal value: its dtype (a constant or a Python scalar in a
    rule adopts it) and, inside ``shard_map``, its varying axes."""
    if not isinstance(x, Tracer):
        x = np.asarray(x, aval.dtype)
    elif x.dtype != aval.dtype:
        x = x.astype(aval.dtype)
    missing = aval.vma - aval_of(x).vma
    if missing:
        b = current_builder()
        x = bind(hooks.pvary, x, axes=tuple(a for a in b.mesh.axis_names if a in missing))
    return x


def _closure_tangents(name, tangents, n):
    if any(not ad.is_zero(t) for t in tangents[n:]):
        raise TypeError(f"{name} closes over a traced value that is being differentiated; pass it "
                        f"as an argument of {name} so that its rule sees its tangent.")


def _bind_call(prim, name, fun, diff, nondiff, nums, **rules):
    """Trace ``fun`` over the leaves of the differentiable arguments and bind ``prim``.  The
    operands: those leaves, then what the function closes over, then the traced values the
    rules close over (each rule's slots point at them)."""
    subst = _substitutions.get()
    fun = _with_cells(fun, {c: subst[id(t)] for c, t in _cell_tracers(fun) if id(t) in subst})
    leaves, in_tree = optree.tree_flatten(tuple(diff), none_is_leaf=False)
    flat, box = flat_call(lambda *d: fun(*_merge(d, nondiff, nums)), in_tree)
    body, captured = trace(flat, [aval_of(x) for x in leaves], **ad.context(),
                           context=f"{prim.name}({name})")
    consts = list(captured)
    where = {id(t): len(leaves) + i for i, t in enumerate(consts)}
    bound_rules = {}
    for key, (fn, adapt) in rules.items():
        slots = []
        for c, t in _cell_tracers(fn):
            now = subst.get(id(t), t)
            if id(now) not in where:
                where[id(now)] = len(leaves) + len(consts)
                consts.append(now)
            slots.append((c, where[id(now)], id(t)))
        bound_rules[key] = _Rule(fn, getattr(fn, "__name__", key), adapt, slots)
    if len(consts) > len(captured):        # the body ignores the rules' extra operands
        extra = [Var(t.aval) for t in consts[len(captured):]]
        body = Program(body.in_vars + extra, body.eqns, body.out_vars)
    outs = bind(prim, *leaves, *consts, body=body, n_args=len(leaves), in_tree=in_tree,
                out_tree=box[0], name=name, **bound_rules)
    return optree.tree_unflatten(box[0], outs)


def _execute(run, *, body, **params):
    return run.call(body)


def _to_front(x, d, size):
    return to_front(x if isinstance(x, Tracer) else np.asarray(x), d, size)


def _batch_program(prog, batched, size):
    """``prog`` with the inputs flagged ``batched`` carrying a leading batch dim; every output
    comes out batched at the front."""
    def fn(*xs):
        outs, dims = batch_eval(prog, xs, [0 if b else None for b in batched], size)
        return [_to_front(o, d, size) for o, d in zip(outs, dims)]
    avals = [v.aval.update(shape=(size,) + tuple(v.aval.shape)) if b else v.aval
             for v, b in zip(prog.in_vars, batched)]
    return trace(fn, avals, **ad.context())[0]


class _BatchedRule:
    """A rule under ``vmap``: ``bound(ops)`` runs the rule of one batch entry (traced on the
    entries' types, its operands included) and batches that program.  ``arrange(rule, xs)``
    calls the inner rule on the flat arguments ``xs`` and returns flat results."""

    def __init__(self, inner, batched, size, name, arrange):
        self.inner, self.batched, self.size, self.__name__ = inner, batched, size, name
        self.arrange = arrange

    def run(self, xs, flags, ops, what, name):
        """The inner rule on the flat values ``xs`` (batched where ``flags``) and the
        equation's operands ``ops`` (batched as the equation's were)."""
        n_x, size = len(xs), self.size
        every = list(xs) + list(ops)
        fl = list(flags) + list(self.batched)
        box = []

        def one(*ys):
            out = self.arrange(self.inner.bound(list(ys[n_x:])), list(ys[:n_x]))
            leaves, tree = optree.tree_flatten(out, none_is_leaf=False)
            box.append(tree)
            return leaves
        avals = [aval_of(x).update(shape=aval_of(x).shape[1:]) if f else aval_of(x)
                 for x, f in zip(every, fl)]
        prog, captured = _trace_rule(one, avals, name, what)
        outs, dims = batch_eval(prog, every + captured, [0 if f else None for f in fl]
                                + [None] * len(captured), size)
        return optree.tree_unflatten(box[0], [_to_front(o, d, size) for o, d in zip(outs, dims)])


def _front(vals, dims):
    return [moveaxis(v, d, 0) if d is not None else v for v, d in zip(vals, dims)]


# ---------------------------------------------------------------------------------------------
# custom_jvp
# ---------------------------------------------------------------------------------------------

def _jvp_call_jvp(primals, tangents, *, body, jvp, n_args, in_tree, out_tree, name):
    _closure_tangents(name, tangents, n_args)
    avals = [ad.aval_of_value(p) for p in primals[:n_args]]
    ts = [ad.instantiate(t, a) for t, a in zip(tangents[:n_args], avals)]
    rule = jvp.bound(list(primals))

    def flat(*xs):
        out = rule(optree.tree_unflatten(in_tree, list(xs[:n_args])),
                   optree.tree_unflatten(in_tree, list(xs[n_args:])))
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"the JVP rule of {name} must return a pair (primal_out, tangent_out), "
                            f"got {type(out).__name__}")
        p_leaves, p_tree = optree.tree_flatten(out[0], none_is_leaf=False)
        t_leaves, t_tree = optree.tree_flatten(out[1], none_is_leaf=False)
        _check_tree(name, "primal output of the JVP rule", p_tree, out_tree)
        _check_tree(name, "tangent output of the JVP rule", t_tree, out_tree)
        for what, leaves in (("primal", p_leaves), ("tangent", t_leaves)):
            _check_leaf_types(name, f"{what} output of the JVP rule", leaves, body.out_avals,
                              out_tree)
        return [_like(x, a) for x, a in zip(p_leaves + t_leaves, body.out_avals * 2)]
    outs = _run_rule(flat, list(primals[:n_args]) + ts, name, "JVP rule")
    n = len(body.out_vars)
    return outs[:n], outs[n:]


class _BatchedJvp(_BatchedRule):
    def bound(self, ops):
        def rule(primals, tangents):
            xs = optree.tree_leaves((primals, tangents), none_is_leaf=False)
            n = len(xs) // 2
            flags = self.batched[:n] * 2
            return self.run(xs, flags, ops[n:], "JVP rule", self.__name__)
        return rule


def _jvp_arrange(in_tree):
    def arrange(rule, xs):
        n = len(xs) // 2
        return rule(optree.tree_unflatten(in_tree, xs[:n]), optree.tree_unflatten(in_tree, xs[n:]))
    return arrange


def _jvp_call_batch(vals, dims, *, body, jvp, n_args, in_tree, out_tree, name):
    size = batch_size(vals, dims)
    batched = [d is not None for d in dims]
    bjvp = _BatchedJvp(jvp, batched, size, name, _jvp_arrange(in_tree))
    outs = bind(custom_jvp_call_p, *_front(vals, dims), body=_batch_program(body, batched, size),
                jvp=bjvp, n_args=n_args, in_tree=in_tree, out_tree=out_tree, name=name)
    return outs, [0] * len(outs)


custom_jvp_call_p = Primitive(
    "custom_jvp_call", abstract=lambda *avals, body, **params: body.out_avals,
    multiple_results=True, vma=lambda *avals, **params: frozenset(),
    jvp=_jvp_call_jvp, batch=_jvp_call_batch, execute=_execute,
    inline=lambda params: params["body"])


class custom_jvp:
    """A function with a hand-written JVP rule (JAX's ``jax.custom_jvp``).

    ``@f.defjvp`` registers ``jvp(primals, tangents) -> (primal_out, tangent_out)`` (with
    ``nondiff_argnums``, ``jvp(*nondiff_args, primals, tangents)``); ``f.defjvps(*jvps)``
    registers one ``jvp_i(g_i, primal_out, *primals)`` per argument (``None``: no
    dependence).  Reverse mode transposes the rule, so it must be linear in the tangents.
    """

    def __init__(self, fun, nondiff_argnums=()):
        functools.update_wrapper(self, fun)
        self.fun, self.nondiff_argnums, self.jvp = fun, tuple(nondiff_argnums), None

    def defjvp(self, jvp, symbolic_zeros=False):
        if symbolic_zeros:
            raise NotImplementedError(f"{self.__name__}.defjvp(symbolic_zeros=True): tangents are "
                                      f"always instantiated (zeros where there is no tangent)")
        self.jvp = jvp
        return jvp

    def defjvps(self, *jvps):
        if self.nondiff_argnums:
            raise TypeError(f"{self.__name__}: defjvps is not available with nondiff_argnums; "
                            f"use defjvp.")

        def jvp(primals, tangents):
            if len(jvps) != len(primals):
                raise TypeError(f"{self.__name__}.defjvps got {len(jvps)} rules for a function of "
                                f"{len(primals)} arguments: give one per argument (None for none)")
            out = self(*primals)
            parts = [r(t, out, *primals) for r, t in zip(jvps, tangents) if r is not None]
            if not parts:
                return out, optree.tree_map(np.zeros_like, out)
            return out, functools.reduce(lambda a, b: optree.tree_map(np.add, a, b), parts)
        self.defjvp(jvp)

    def __call__(self, *args, **kwargs):
        name = getattr(self, "__name__", "custom_jvp function")
        if self.jvp is None:
            raise AttributeError(f"No JVP defined for custom_jvp function {name} using defjvp.")
        args = _resolve_args(self.fun, name, args, kwargs)
        if current_builder() is None:            # nothing to differentiate: run the function
            return self.fun(*args)
        diff, nondiff, nums = _split_nondiff(args, self.nondiff_argnums, name)
        adapt = (lambda fn: lambda ps, ts: fn(*nondiff, ps, ts)) if nums else None
        return _bind_call(custom_jvp_call_p, name, self.fun, diff, nondiff, nums,
                          jvp=(self.jvp, adapt))


# ---------------------------------------------------------------------------------------------
# custom_vjp
# ---------------------------------------------------------------------------------------------

def _vjp_call_jvp(primals, tangents, *, body, fwd, bwd, n_args, in_tree, out_tree, name):
    _closure_tangents(name, tangents, n_args)
    avals = [ad.aval_of_value(p) for p in primals[:n_args]]
    rule, box = fwd.bound(list(primals)), []

    def flat(*xs):
        out = rule(*optree.tree_unflatten(in_tree, list(xs)))
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"the fwd rule of {name} must return a pair (primal_out, residuals), "
                            f"got {type(out).__name__}")
        p_leaves, p_tree = optree.tree_flatten(out[0], none_is_leaf=False)
        _check_tree(name, "primal output of the fwd rule", p_tree, out_tree)
        _check_leaf_types(name, "primal output of the fwd rule", p_leaves, body.out_avals, out_tree)
        r_leaves, r_tree = optree.tree_flatten(out[1], none_is_leaf=False)
        box.append(r_tree)
        return [_like(x, a) for x, a in zip(p_leaves, body.out_avals)] + list(r_leaves)
    outs = _run_rule(flat, list(primals[:n_args]), name, "fwd rule")
    n, consts = len(body.out_vars), list(primals[n_args:])
    ts = [ad.instantiate(t, a) for t, a in zip(tangents[:n_args], avals)]
    touts = bind(custom_lin_p, *outs[n:], *consts, *ts, bwd=bwd, n_res=len(outs) - n,
                 n_consts=len(consts), n_lin=n_args, res_tree=box[0], in_tree=in_tree,
                 out_tree=out_tree, out_avals=tuple(body.out_avals), name=name)
    return outs[:n], touts


def _cotangent_leaves(got, in_tree, name):
    """The leaves of what ``bwd`` returned, one per leaf of the differentiable arguments
    (``None`` for zero: a whole argument or a leaf), checked against their structure."""
    in_struct = optree.tree_unflatten(in_tree, [None] * in_tree.num_leaves)
    if not isinstance(got, (tuple, list)):
        raise TypeError(f"the bwd rule of {name} must return a tuple with one cotangent per "
                        f"differentiable argument ({len(in_struct)}), got {type(got).__name__}")
    if len(got) != len(in_struct):
        raise TypeError(f"the bwd rule of {name} returned {len(got)} cotangents, but {name} has "
                        f"{len(in_struct)} differentiable arguments: return a tuple with one "
                        f"entry per argument (None for a zero cotangent)")
    leaves = []
    for i, (g, want) in enumerate(zip(got, in_struct)):
        want_tree = optree.tree_structure(want, none_is_leaf=True)
        if g is None:
            leaves += [None] * want_tree.num_leaves
            continue
        try:
            got_leaves = want_tree.flatten_up_to(g)
            if any(optree.tree_structure(x, none_is_leaf=True).num_nodes != 1 for x in got_leaves):
                raise ValueError("a container where the argument has a leaf")
            leaves += got_leaves
        except ValueError:
            raise TypeError(f"the bwd rule of {name}: the cotangent of argument {i} has structure "
                            f"{optree.tree_structure(g, none_is_leaf=True)}, but the argument has "
                            f"{want_tree}") from None
    return leaves


def _lin_transpose(cts, *invals, bwd, n_res, n_consts, n_lin, res_tree, in_tree, out_tree,
                   out_avals, name):
    res = optree.tree_unflatten(res_tree, list(invals[:n_res]))
    consts = list(invals[n_res:n_res + n_consts])
    in_avals = [ad.aval_of_value(x) for x in invals[n_res + n_consts:]]
    cts = [ad.instantiate(c, a) for c, a in zip(cts, out_avals)]
    rule = bwd.bound([None] * n_lin + consts)     # a bwd rule sees no primal argument
    leaves = _cotangent_leaves(rule(res, optree.tree_unflatten(out_tree, cts)), in_tree, name)
    out = []
    for path, g, a in zip(_paths(in_tree), leaves, in_avals):
        if g is None:
            out.append(ad.full(a, 0))
            continue
        ga = aval_of(g)
        if tuple(ga.shape) != tuple(a.shape):
            raise TypeError(f"the bwd rule of {name} returned a cotangent of shape "
                            f"{list(ga.shape)} for the argument at {path}, whose shape is "
                            f"{list(a.shape)}; it must have the argument's shape and dtype.")
        out.append(_like(g, a))
    return [None] * (n_res + n_consts) + out


def _lin_no_forward(run, *, name, **params):
    raise TypeError(f"can't apply forward-mode autodiff (jvp) to a custom_vjp function ({name}); "
                    f"use reverse mode (grad, vjp) or define the function with custom_jvp.")


custom_lin_p = Primitive(
    "custom_lin", abstract=lambda *avals, out_avals, **params: list(out_avals),
    multiple_results=True, vma=lambda *avals, **params: frozenset(),
    linear=lambda n_res, n_consts, n_lin, **params: tuple(range(n_res + n_consts,
                                                                 n_res + n_consts + n_lin)),
    transpose=_lin_transpose, execute=_lin_no_forward)


class _BatchedFwd(_BatchedRule):
    def bound(self, ops):
        def rule(*args):
            xs = optree.tree_leaves(tuple(args), none_is_leaf=False)
            return self.run(xs, self.batched[:len(xs)], ops[len(xs):], "fwd rule", self.__name__)
        return rule


class _BatchedBwd(_BatchedRule):
    """Residuals and cotangents are batched at the front; the cotangent of an unbatched
    argument is summed over the batch."""

    def __init__(self, inner, batched, size, name, in_tree, n_args):
        self.in_tree, self.n_args = in_tree, n_args

        def arrange(rule, xs):
            got = rule(optree.tree_unflatten(self.res_tree, xs[:self.n_res]),
                       optree.tree_unflatten(self.ct_tree, xs[self.n_res:]))
            return optree.tree_unflatten(in_tree, _cotangent_leaves(got, in_tree, name))
        super().__init__(inner, batched, size, name, arrange)

    def bound(self, ops):
        def rule(res, ct):
            r_leaves, self.res_tree = optree.tree_flatten(res, none_is_leaf=False)
            c_leaves, self.ct_tree = optree.tree_flatten(ct, none_is_leaf=False)
            self.n_res = len(r_leaves)
            xs = r_leaves + c_leaves
            got = self.run(xs, [True] * len(xs), ops[self.n_args:], "bwd rule", self.__name__)
            leaves = optree.tree_flatten(got, none_is_leaf=True)[0]
            return optree.tree_unflatten(self.in_tree, [
                g if g is None or b else g.sum(0) for g, b in zip(leaves, self.batched)])
        return rule


def _vjp_call_batch(vals, dims, *, body, fwd, bwd, n_args, in_tree, out_tree, name):
    size = batch_size(vals, dims)
    batched = [d is not None for d in dims]
    bfwd = _BatchedFwd(fwd, batched, size, name,
                       lambda rule, xs: rule(*optree.tree_unflatten(in_tree, xs)))
    bbwd = _BatchedBwd(bwd, batched, size, name, in_tree, n_args)
    outs = bind(custom_vjp_call_p, *_front(vals, dims), body=_batch_program(body, batched, size),
                fwd=bfwd, bwd=bbwd, n_args=n_args, in_tree=in_tree, out_tree=out_tree, name=name)
    return outs, [0] * len(outs)


custom_vjp_call_p = Primitive(
    "custom_vjp_call", abstract=lambda *avals, body, **params: body.out_avals,
    multiple_results=True, vma=lambda *avals, **params: frozenset(),
    jvp=_vjp_call_jvp, batch=_vjp_call_batch, execute=_execute,
    inline=lambda params: params["body"])


class custom_vjp:
    """A function with a hand-written reverse-mode rule (JAX's ``jax.custom_vjp``).

    ``f.defvjp(fwd, bwd)``: ``fwd(*args) -> (out, residuals)``, ``bwd(residuals, ct) -> tuple``
    with one cotangent per argument (``None`` for zero); with ``nondiff_argnums`` the
    nondifferentiable arguments come first in ``bwd(*nondiff_args, residuals, ct)`` and get
    no cotangent.
    """

    def __init__(self, fun, nondiff_argnums=()):
        functools.update_wrapper(self, fun)
        self.fun, self.nondiff_argnums = fun, tuple(nondiff_argnums)
        self.fwd = self.bwd = None

    def defvjp(self, fwd, bwd, symbolic_zeros=False, optimize_remat=False):
        if symbolic_zeros:
            raise NotImplementedError(f"{self.__name__}.defvjp(symbolic_zeros=True): cotangents "
                                      f"are always instantiated")
        self.fwd, self.bwd = fwd, bwd

    def __call__(self, *args, **kwargs):
        name = getattr(self, "__name__", "custom_vjp function")
        if self.fwd is None:
            raise AttributeError(f"No VJP defined for custom_vjp function {name} using defvjp.")
        args = _resolve_args(self.fun, name, args, kwargs)
        if current_builder() is None:
            return self.fun(*args)
        diff, nondiff, nums = _split_nondiff(args, self.nondiff_argnums, name)
        fwd_adapt = (lambda fn: lambda *d: fn(*_merge(d, nondiff, nums))) if nums else None
        bwd_adapt = (lambda fn: lambda res, ct: fn(*nondiff, res, ct)) if nums else None
        return _bind_call(custom_vjp_call_p, name, self.fun, diff, nondiff, nums,
                          fwd=(self.fwd, fwd_adapt), bwd=(self.bwd, bwd_adapt))
