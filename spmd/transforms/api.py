"""The user-facing transformations: ``jvp vjp linearize grad value_and_grad jacfwd jacrev``.

Each one traces the function into a Program (in the context of the innermost trace: inside
a ``shard_map`` body the tracers keep their vma types), transforms the Program with
:mod:`spmd.transforms.ad`, and then either inlines the result into the enclosing trace (under
``jit``, ``shard_map`` or another transformation) or, called on concrete arrays, runs it on
the default executor.  So they nest in any order, and what they build is an ordinary Program.

Gradients and ``shard_map``: ``grad`` of a function that calls a ``shard_map`` is the gradient
of the *global* function it computes.  A parameter that enters the body with spec ``P()`` or
is closed over is invariant (one value seen by every device), so its gradient is the sum of
every device's contribution -- the ``pvary`` that mixed it with varying values transposes to a
``psum``.  (The same holds for ``grad`` taken inside the body: an invariant parameter has an
invariant gradient.)  To get per-device gradients instead, take ``grad`` inside the body with
respect to a *varying* copy of the parameter, ``spmd.pvary(w, axis)``: each device then
differentiates its own copy, and no psum is inserted:

>>> import numpy as np, spmd
>>> from spmd import P
>>> mesh = spmd.make_mesh((4,), ("data",), devices=spmd.devices()[:4])
>>> x, w = np.arange(8.), np.float64(2.0)
>>> loss = lambda w, xb: np.sum((w * xb) ** 2)
>>> glob = spmd.grad(lambda w, x: spmd.shard_map(
...     lambda w, xb: spmd.psum(loss(w, xb), "data"), mesh=mesh,
...     in_specs=(P(), P("data")), out_specs=P())(w, x))(w, x)
>>> per_device = spmd.shard_map(lambda w, xb: spmd.grad(loss)(spmd.pvary(w, "data"), xb)[None],
...     mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))(w, x)
>>> float(np.asarray(glob)), np.asarray(per_device).tolist()
(560.0, [4.0, 52.0, 164.0, 340.0])
"""
from __future__ import annotations

import functools

import numpy as np
import optree

from ..core import aval_of, current_builder, hooks, trace
from . import ad
from .vmap import vmap


def _flatten(x):
    return optree.tree_flatten(x, none_is_leaf=False)


def _trace_flat(f, leaves, in_tree, has_aux=False):
    """Trace ``f`` (taking the pytree ``in_tree`` of ``leaves``) in the current context.

    Returns (program, captured outer tracers, out_tree, aux_tree, number of main outputs)."""
    box = []

    def flat_fn(*xs):
        out = f(*optree.tree_unflatten(in_tree, list(xs)))
        aux = None
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("has_aux=True: the function must return a pair (output, aux)")
            out, aux = out
        out_leaves, out_tree = _flatten(out)
        aux_leaves, aux_tree = _flatten(aux)
        box.append((out_tree, aux_tree, len(out_leaves)))
        return list(out_leaves) + list(aux_leaves)
    prog, captured = trace(flat_fn, [aval_of(x) for x in leaves], **ad.context(),
                           context=f"transformation of {getattr(f, '__name__', 'function')}")
    return (prog, captured) + box[0]


def _zeros(aval):
    return np.zeros(aval.shape, aval.dtype) if current_builder() is None else ad.full(aval, 0)


# ---------------------------------------------------------------------------------------------
# jvp / linearize / vjp
# ---------------------------------------------------------------------------------------------

def jvp(f, primals, tangents):
    """``(f(*primals), J f(primals) @ tangents)``, forward mode.

    >>> import numpy as np, spmd
    >>> y, t = spmd.jvp(np.sin, (0.0,), (1.0,))
    >>> float(np.asarray(y)), float(np.asarray(t))
    (0.0, 1.0)
    """
    leaves, in_tree = _flatten(tuple(primals))
    t_leaves, t_tree = _flatten(tuple(tangents))
    if t_tree != in_tree:
        raise TypeError(f"jvp: tangents {t_tree} do not match the structure of primals {in_tree}")
    prog, captured, out_tree, _, n_out = _trace_flat(f, leaves, in_tree)
    diff = [ad.differentiable(aval_of(x).dtype) for x in leaves]
    jprog = ad.jvp_program(prog, diff + [False] * len(captured), ad.context())
    outs = ad.run_program(jprog, list(leaves) + captured + [t for t, d in zip(t_leaves, diff) if d])
    return (optree.tree_unflatten(out_tree, outs[:n_out]), optree.tree_unflatten(out_tree, outs[n_out:]))


def _linearize(f, leaves, in_tree, has_aux):
    """Trace, JVP and partially evaluate: the forward pass runs now, the linear part is a
    Program over the residuals and the tangents."""
    prog, captured, out_tree, aux_tree, n_out = _trace_flat(f, leaves, in_tree, has_aux)
    ctx = ad.context()
    n_all = len(prog.out_vars)
    diff = [ad.differentiable(aval_of(x).dtype) for x in leaves] + [False] * len(captured)
    jprog = ad.jvp_program(prog, diff, ctx, tangent_outs=[True] * n_out + [False] * (n_all - n_out))
    known, linear, out_unknown, n_res = ad.partial_eval_program(
        jprog, [False] * len(prog.in_vars) + [True] * sum(diff), ctx)
    assert not any(out_unknown[:n_all]), "a primal output depends on a tangent"
    outs = ad.run_program(known, list(leaves) + captured)
    primal_outs, res = outs[:n_all], outs[len(outs) - n_res:]
    t_unknown = out_unknown[n_all:]
    return primal_outs, res, linear, t_unknown, diff, out_tree, aux_tree, n_out, prog


def linearize(f, *primals):
    """``(f(*primals), f_jvp)`` where ``f_jvp(*tangents)`` evaluates the JVP at ``primals``
    with the forward pass already done (only the linear part runs)."""
    leaves, in_tree = _flatten(primals)
    outs, res, linear, t_unknown, diff, out_tree, _, n_out, prog = _linearize(f, leaves, in_tree, False)

    def f_jvp(*tangents):
        t_leaves, _ = _flatten(tangents)
        touts = iter(ad.run_program(linear, list(res) + [t for t, d in zip(t_leaves, diff) if d]))
        return optree.tree_unflatten(out_tree, [next(touts) if u else _zeros(v.aval)
                                                for u, v in zip(t_unknown, prog.out_vars[:n_out])])
    return optree.tree_unflatten(out_tree, outs[:n_out]), f_jvp


def vjp(f, *primals, has_aux=False):
    """``(f(*primals), vjp_fn)`` (and ``aux`` with ``has_aux``): ``vjp_fn(ct)`` returns one
    cotangent per primal, the transpose of the linearized function applied to ``ct``."""
    leaves, in_tree = _flatten(primals)
    outs, res, linear, t_unknown, diff, out_tree, aux_tree, n_out, prog = _linearize(f, leaves, in_tree, has_aux)
    n_res = len(res)
    backward = ad.transpose_program(linear, [False] * n_res + [True] * sum(diff), ad.context())

    def vjp_fn(ct):
        ct_leaves, ct_tree = _flatten(ct)
        if ct_tree != out_tree:
            raise TypeError(f"vjp: the cotangent's structure {ct_tree} does not match the output's "
                            f"{out_tree}")
        cts = iter(ad.run_program(backward, list(res) + [c for c, u in zip(ct_leaves, t_unknown) if u]))
        grads = [next(cts) if d else _zeros(aval_of(x)) for x, d in zip(leaves, diff)]
        return optree.tree_unflatten(in_tree, grads)
    out = optree.tree_unflatten(out_tree, outs[:n_out])
    if has_aux:
        return out, vjp_fn, optree.tree_unflatten(aux_tree, outs[n_out:])
    return out, vjp_fn


# ---------------------------------------------------------------------------------------------
# grad
# ---------------------------------------------------------------------------------------------

def _argnums(argnums, nargs, who):
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in nums:
        if not -nargs <= i < nargs:
            raise ValueError(f"{who}: argnums {argnums} is out of range for {nargs} positional arguments")
    return tuple(i % nargs for i in nums)


def _on_argnums(f, args, kwargs, nums):
    def g(*dyn):
        full = list(args)
        for i, a in zip(nums, dyn):
            full[i] = a
        return f(*full, **kwargs)
    return g, tuple(args[i] for i in nums)


def _all_arrays(args) -> bool:
    return all(isinstance(x, (np.ndarray, np.generic, bool, int, float, complex) + hooks.array_types)
               for x in optree.tree_leaves(args, none_is_leaf=False))


def value_and_grad(f, argnums=0, has_aux=False):
    """``(f(*args), grad f(*args))`` for a function with a scalar output.

    >>> import numpy as np, spmd
    >>> v, g = spmd.value_and_grad(lambda x: np.sum(x ** 2))(np.array([1., 2.]))
    >>> float(np.asarray(v)), np.asarray(g).tolist()
    (5.0, [2.0, 4.0])
    """
    name = getattr(f, "__name__", "function")
    jitted = []

    @functools.wraps(f, updated=())
    def value_and_grad_f(*args, **kwargs):
        if current_builder() is None and not kwargs and _all_arrays(args):
            # on concrete arrays: trace and transform once per argument types (jit's cache)
            if not jitted:
                jitted.append(hooks.jit(value_and_grad_f, _name=f"value_and_grad({name})"))
            return jitted[0](*args)
        nums = _argnums(argnums, len(args), f"grad({name})")
        g, dyn = _on_argnums(f, args, kwargs, nums)
        for i, x in zip(nums, dyn):
            for leaf in optree.tree_leaves(x, none_is_leaf=False):
                if not ad.differentiable(aval_of(leaf).dtype):
                    raise TypeError(f"grad({name}): argument {i} has dtype {aval_of(leaf).dtype}; "
                                    f"gradients need float or complex inputs (cast with .astype(float), "
                                    f"or leave the argument out of argnums).")
        res = vjp(g, *dyn, has_aux=has_aux)
        out, vjp_fn = res[0], res[1]
        a = aval_of(out) if not isinstance(out, (list, tuple, dict)) else None
        if a is None or a.shape != () or not ad.differentiable(a.dtype):
            raise TypeError(f"grad({name}): the function must return a float scalar, got "
                            f"{a if a is not None else type(out).__name__}; use spmd.vjp or "
                            f"spmd.jacrev for non-scalar outputs.")
        one = np.ones((), a.dtype) if current_builder() is None else ad.full(a, 1)
        grads = vjp_fn(one)
        grads = grads[0] if isinstance(argnums, int) else grads
        return ((out, res[2]) if has_aux else out), grads
    return value_and_grad_f


def grad(f, argnums=0, has_aux=False):
    """The gradient of a scalar function with respect to argument(s) ``argnums``.

    Through ``shard_map`` this is the gradient of the global function: a parameter that every
    device sees (spec ``P()`` or closed over) gets the sum of all devices' contributions.  For
    per-device gradients take ``grad`` inside the body with respect to ``spmd.pvary(w, axis)``
    (see :mod:`spmd.transforms.api` for a worked example).

    >>> import numpy as np, spmd
    >>> float(np.asarray(spmd.grad(np.sin)(0.0)))
    1.0
    >>> float(np.asarray(spmd.grad(spmd.grad(np.sin))(0.0)))
    -0.0
    """
    vg = value_and_grad(f, argnums, has_aux)

    @functools.wraps(f, updated=())
    def grad_f(*args, **kwargs):
        (out, aux), g = vg(*args, **kwargs) if has_aux else ((None, None), vg(*args, **kwargs)[1])
        return (g, aux) if has_aux else g
    return grad_f


# ---------------------------------------------------------------------------------------------
# Jacobians (vmap of jvp / vjp over a basis)
# ---------------------------------------------------------------------------------------------

def _basis(aval):
    n = int(np.prod(aval.shape))
    return np.eye(n, dtype=aval.dtype).reshape((n,) + tuple(aval.shape))


def _on_leaves(f, args, kwargs, argnums, who):
    """``f`` as a function of the flat leaves of the arguments ``argnums`` picks (the argument
    itself for an int, the tuple of them for a tuple), returning the flat leaves of its
    output; with those leaves, their tree, and a box that receives the output's tree."""
    g, dyn = _on_argnums(f, args, kwargs, _argnums(argnums, len(args), who))
    leaves, in_tree = _flatten(dyn[0] if isinstance(argnums, int) else dyn)
    out_tree = []

    def flat(*xs):
        tree = optree.tree_unflatten(in_tree, list(xs))
        out_leaves, tree_out = _flatten(g(*((tree,) if isinstance(argnums, int) else tree)))
        out_tree.append(tree_out)
        return out_leaves
    return flat, leaves, in_tree, out_tree


def _jacobian_tree(blocks, in_tree, out_tree):
    """JAX's layout of a Jacobian: the output's structure outside, the arguments' inside;
    ``blocks[j][i]`` is d out leaf j / d in leaf i, of shape ``out.shape + in.shape``."""
    return optree.tree_unflatten(out_tree, [optree.tree_unflatten(in_tree, row) for row in blocks])


def jacfwd(f, argnums=0):
    """The Jacobian of ``f`` by forward mode: for each output leaf and argument leaf a block of
    shape ``out.shape + arg.shape``, nested as JAX nests them (output structure outside, the
    structure of the arguments ``argnums`` picks inside).

    >>> import numpy as np, spmd
    >>> j = spmd.jacfwd(lambda w, xy: w * xy[0] + xy[1], argnums=1)(2.0, (np.ones(2), np.ones(2)))
    >>> [np.asarray(b).tolist() for b in j]
    [[[2.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]]
    """

    def jac(*args, **kwargs):
        flat, leaves, in_tree, out_tree = _on_leaves(f, args, kwargs, argnums, "jacfwd")
        columns = []                 # per input leaf: the blocks of every output leaf
        for k, leaf in enumerate(leaves):
            def pushforward(t, k=k):
                ts = [t if i == k else _zeros(aval_of(x)) for i, x in enumerate(leaves)]
                return jvp(flat, leaves, ts)[1]
            shape = tuple(aval_of(leaf).shape)
            columns.append([np.reshape(b, tuple(np.shape(b)[:-1]) + shape)
                            for b in vmap(pushforward, out_axes=-1)(_basis(aval_of(leaf)))])
        rows = [list(row) for row in zip(*columns)] if leaves else [[] for _ in flat()]
        return _jacobian_tree(rows, in_tree, out_tree[-1])
    return jac


def jacrev(f, argnums=0):
    """The Jacobian of ``f`` by reverse mode, laid out as :func:`jacfwd`'s.

    >>> import numpy as np, spmd
    >>> j = spmd.jacrev(lambda w, xy: w * xy[0] + xy[1], argnums=1)(2.0, (np.ones(2), np.ones(2)))
    >>> [np.asarray(b).tolist() for b in j]
    [[[2.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]]
    """

    def jac(*args, **kwargs):
        flat, leaves, in_tree, out_tree = _on_leaves(f, args, kwargs, argnums, "jacrev")
        outs, vjp_fn = vjp(flat, *leaves)
        blocks = []                  # per output leaf: the blocks of every input leaf
        for j, out in enumerate(outs):
            def pullback(ct, j=j):
                return vjp_fn([ct if i == j else _zeros(aval_of(o)) for i, o in enumerate(outs)])
            shape = tuple(aval_of(out).shape)
            blocks.append([np.reshape(b, shape + tuple(aval_of(x).shape))
                           for b, x in zip(vmap(pullback)(_basis(aval_of(out))), leaves)])
        return _jacobian_tree(blocks, in_tree, out_tree[-1])
    return jac
