"""Control flow (``scan fori_loop while_loop cond switch map``) against JAX running the same
programs: under ``jit``, ``vmap`` and ``grad``, inside ``shard_map`` with collectives in the
bodies (stacked and reference executors), in a ``jit`` with shardings, second-order gradients
against finite differences, and the bad inputs each named in a clear error.

Each program is written once against a namespace ``(L, N)`` -- ``(spmd.lax, numpy)`` or
``(jax.lax, jax.numpy)`` -- so both frameworks trace the same code.
"""
import functools

import numpy as np
import pytest

import spmd
import spmd.lax as slax
from spmd import P, NamedSharding
from spmd.executors import reference_executor
from spmd.transforms.check import check_grads

from _jax_oracle import jax_mesh, jax_spec

REFERENCE = reference_executor()
RNG = np.random.default_rng(0)


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@functools.cache
def _jax():
    import jax
    return jax, jax.lax, jax.numpy


def _jax_run(f, *args):
    """``jax.jit(f)(*args)``, compiled without XLA's optimisation passes (the programs are tiny:
    the passes cost more than they save)."""
    jax = _jax()[0]
    options = {"xla_backend_optimization_level": 0}
    compiled = jax.jit(f).lower(*args).compile(compiler_options=options)
    return compiled(*args)


def _close(got, want, tol=2e-5):
    import optree
    got_l, want_l = optree.tree_leaves(got), optree.tree_leaves(want)
    assert len(got_l) == len(want_l)
    for g, w in zip(got_l, want_l):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# the programs: (L, N, *args) -> pytree
# ---------------------------------------------------------------------------------------------

def rnn(L, N, w, u, h0, xs):
    def cell(h, x):
        h = N.tanh(h @ w + x @ u)
        return h, h.sum(-1)
    return L.scan(cell, h0, xs)


def scan_pytree_reverse(L, N, a, b, xs):
    def body(c, x):
        s, (t, n) = c["s"], c["p"]
        return {"s": s * x[0] + t, "p": (N.sin(t) + x[1], n + 1)}, (s * t, x[1] * 2)
    return L.scan(body, {"s": a, "p": (b, N.int32(0))},
                  (xs, xs * 0.5), reverse=True, unroll=2)


def scan_length(L, N, c0):
    return L.scan(lambda c, _: (c * 0.9 + 1.0, N.sin(c)), c0, None, length=5)


def fori_static(L, N, x):
    return L.fori_loop(0, 6, lambda i, c: c * 0.9 + N.cos(c) * i, x)


def while_loop(L, N, x):
    return L.while_loop(lambda c: c[0] < 7, lambda c: (c[0] + 1, N.sin(c[1]) + c[1]),
                        (N.int32(0), x))


def cond(L, N, x, y):
    return L.cond(x.sum() > 0, lambda a, b: a * b + 1, lambda a, b: N.exp(a) - b, x, y)


def cond_closure(L, N, x, y):
    return L.cond(x.sum() < 0, lambda a: a * y, lambda a: N.tanh(a) + y.sum(), x)


def switch(L, N, x):
    i = (N.abs(x.sum()) * 3).astype(N.int32)
    return L.switch(i, [lambda a: a * 2, lambda a: N.sin(a), lambda a: a * a], x)


def lax_map(L, N, w, xs):
    return L.map(lambda r: N.tanh(r @ w), xs)


def nested(L, N, w, xs):
    def outer(c, x):
        inner = L.scan(lambda a, y: (N.sin(a * w + y), a), c, x)[0]
        c = L.cond(inner.sum() > 0, lambda v: v * w, lambda v: N.cos(v), inner)
        return c, L.fori_loop(0, 2, lambda i, v: v * 0.5 + w, c)
    return L.scan(outer, xs[0, 0], xs)


def rnn_bias(L, N, w, u, b, h0, xs):
    # the benchmark's cell: the bias broadcast is the same every step, x @ u reads no carry
    def cell(h, x):
        h = N.tanh(h @ w + x @ u + b)
        return h, h
    return L.scan(cell, h0, xs)


def scan_products(L, N, a, big, xs):
    # products with either operand transposed, stacks of them, one over the size at which
    # the host spreads a product over threads, and a product of three dims by two (x is (2,3,3))
    def body(c, x):
        c = N.tanh(c @ a.T * 0.5 + (a.T @ c) * 0.25 + x[0] @ x[1].T)
        stacked = N.matmul(x, x) + N.matmul(N.swapaxes(x, 1, 2), x)
        wide = N.tanh(N.tile(c, (22, 27)) @ big)
        counts = (x[0] * 4).astype(N.int32) @ N.arange(9, dtype=N.int32).reshape(3, 3)
        return c, (stacked, wide.sum(), (x @ a).sum(0), counts)
    return L.scan(body, a * 0.1, xs)


def scan_invariant_ys(L, N, w, xs):
    # ys the same every step (a const's function, a literal), a scalar per step, an ``xs``
    # value the carry never reads, and a carry updated by a value computed from w alone
    def body(c, x):
        k = N.exp(w) * 2
        return c * 0.5 + k, (k, 1.5, (c * x).sum(), N.sin(x) * w, c)
    return L.scan(body, w, xs, reverse=True)


def scan_empty(L, N, w, xs):
    return L.scan(lambda c, x: (c + N.exp(w) * x, c * x), w, xs[:0])


def while_invariant(L, N, w, x):
    # the predicate's bound and the body's factor are computed from consts only
    limit = w.sum() * 0
    return L.while_loop(lambda c: c[0] < N.abs(w).sum() * 0 + 5 + limit,
                        lambda c: (c[0] + 1, c[1] * N.cos(w) + N.exp(w * 0.1)), (N.int32(0), x))


PROGRAMS = {                          # name -> (program, args, differentiable)
    "rnn_bias": (rnn_bias, lambda: (_f32(5, 5) * 0.3, _f32(3, 5) * 0.3, _f32(5), _f32(2, 5),
                                    _f32(7, 2, 3)), True),
    "scan_products": (scan_products, lambda: (_f32(3, 3) * 0.5, _f32(81, 64) * 0.1,
                                              _f32(4, 2, 3, 3) * 0.5), True),
    "scan_invariant_ys": (scan_invariant_ys, lambda: (_f32(3) * 0.5, _f32(4, 3)), True),
    "scan_empty": (scan_empty, lambda: (_f32(3), _f32(4, 3)), True),
    "while_invariant": (while_invariant, lambda: (_f32(3), _f32(3)), False),
    "rnn": (rnn, lambda: (_f32(4, 4) * 0.5, _f32(3, 4) * 0.5, _f32(2, 4), _f32(6, 2, 3)), True),
    "scan_pytree_reverse": (scan_pytree_reverse, lambda: (_f32(3), _f32(3), _f32(5, 3)), True),
    "scan_length": (scan_length, lambda: (_f32(3),), True),
    "fori_static": (fori_static, lambda: (_f32(3),), True),
    "while_loop": (while_loop, lambda: (_f32(3),), False),
    "cond": (cond, lambda: (_f32(3), _f32(3)), True),
    "cond_closure": (cond_closure, lambda: (-np.abs(_f32(3)), _f32(3)), True),
    "switch": (switch, lambda: (_f32(3) * 0.3,), True),
    "map": (lax_map, lambda: (_f32(3, 3), _f32(4, 2, 3)), True),
    "nested": (nested, lambda: (np.float32(0.7), _f32(3, 4, 2)), True),
}


def _both(prog):
    jax, jlax, jnp = _jax()
    return (lambda *a: prog(slax, np, *a)), (lambda *a: prog(jlax, jnp, *a))


def _float_sum(tree, N):
    import optree
    return sum(N.sum(leaf) for leaf in optree.tree_leaves(tree)
               if np.issubdtype(np.dtype(leaf.dtype), np.floating))


@pytest.mark.parametrize("name", PROGRAMS)
def test_jit_equals_jax(name):
    prog, make, _ = PROGRAMS[name]
    args = make()
    mine, theirs = _both(prog)
    jax = _jax()[0]
    want = _jax_run(theirs, *args)
    _close(spmd.jit(mine)(*args), want)
    _close(spmd.jit(mine, executor=REFERENCE)(*args), want)


@pytest.mark.parametrize("name", PROGRAMS)
def test_vmap_equals_jax(name):
    prog, make, _ = PROGRAMS[name]
    args = make()
    batched = tuple(np.stack([a, a * 0.5 + 0.1, -a]) for a in args)
    mine, theirs = _both(prog)
    jax = _jax()[0]
    _close(spmd.vmap(mine)(*batched), _jax_run(jax.vmap(theirs), *batched))
    # one batched argument, the others shared
    in_axes = (0,) + (None,) * (len(args) - 1)
    _close(spmd.vmap(mine, in_axes=in_axes)(batched[0], *args[1:]),
           _jax_run(jax.vmap(theirs, in_axes=in_axes), batched[0], *args[1:]))


@pytest.mark.parametrize("name", [n for n, (_, _, d) in PROGRAMS.items() if d])
def test_grad_equals_jax(name):
    prog, make, _ = PROGRAMS[name]
    args = make()
    jax, jlax, jnp = _jax()
    argnums = tuple(range(len(args)))
    mine = spmd.grad(lambda *a: _float_sum(prog(slax, np, *a), np), argnums=argnums)
    theirs = jax.grad(lambda *a: _float_sum(prog(jlax, jnp, *a), jnp), argnums=argnums)
    _close(spmd.jit(mine)(*args), _jax_run(theirs, *args), tol=1e-4)


@pytest.mark.parametrize("name", ["rnn", "cond", "switch", "fori_static"])
def test_jvp_and_grad_under_vmap(name):
    prog, make, _ = PROGRAMS[name]
    args = make()
    jax, jlax, jnp = _jax()
    batched = tuple(np.stack([a, a * 0.5 + 0.1]) for a in args)
    mine = spmd.vmap(spmd.grad(lambda *a: _float_sum(prog(slax, np, *a), np)))
    theirs = jax.vmap(jax.grad(lambda *a: _float_sum(prog(jlax, jnp, *a), jnp)))
    _close(mine(*batched), _jax_run(theirs, *batched), tol=1e-4)
    t = tuple(np.ones_like(a) for a in args)
    _close(spmd.jvp(lambda *a: prog(slax, np, *a), args, t),
           _jax_run(lambda *a: jax.jvp(lambda *b: prog(jlax, jnp, *b), a, t), *args), tol=1e-4)


def test_while_loop_forward_mode_equals_jax():
    jax, jlax, jnp = _jax()
    mine, theirs = _both(while_loop)
    x, t = _f32(3), np.ones(3, np.float32)
    floats = lambda pair: [part[1] for part in pair]        # the carry, not the int counter
    want = floats(_jax_run(lambda x: jax.jvp(theirs, (x,), (t,)), x))
    _close(floats(spmd.jvp(mine, (x,), (t,))), want)
    y, lin = spmd.linearize(mine, x)
    _close(floats((y, lin(t))), want)


@pytest.mark.parametrize("name", ["rnn", "scan_pytree_reverse", "cond", "switch", "map", "nested"])
def test_second_order_against_finite_differences(name):
    prog, make, _ = PROGRAMS[name]
    args = tuple(a.astype(np.float64) for a in make())
    check_grads(lambda *a: _float_sum(prog(slax, np, *a), np), args, order=2,
                rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# inside shard_map, with collectives in the bodies
# ---------------------------------------------------------------------------------------------

def sm_scan_psum(L, N, C, xs):
    # a running sum over devices each step, and a ring shift of the carry
    def body(c, x):
        n = C.axis_size("i")
        c = C.ppermute(c, "i", [(j, (j + 1) % n) for j in range(n)]) + C.psum(x, "i")
        return c, N.tanh(c)
    c, ys = L.scan(body, N.zeros_like(xs[0]), xs)
    return c + ys.sum(0)


def sm_fori_psum(L, N, C, x):
    return L.fori_loop(0, 3, lambda i, c: C.pmean(c, "i") * 0.5 + c, x)


def sm_while_psum(L, N, C, x):
    def body(c):
        k, v = c
        return k + 1, v + C.psum(v, "i") * 0.1
    return L.while_loop(lambda c: c[0] < 3, body, (N.int32(0), x))[1]


def sm_cond_psum(L, N, C, x):
    total = C.psum(x.sum(), "i")            # the same on every device: the branch index
    return L.cond(total > 0, lambda v: C.pvary(C.psum(v, "i"), "i"), lambda v: v * 2, x)


def sm_cond_varying(L, N, C, x):           # each device takes its own branch
    return L.cond(x[0, 0] > 0, lambda v: v * 2, lambda v: N.sin(v), x)


def sm_while_varying(L, N, C, x):          # each device stops at its own step
    return L.while_loop(lambda c: c[0, 0] < 4, lambda c: c * 1.5 + 0.5, x)


def sm_switch_varying(L, N, C, x):
    return L.switch(C.axis_index("i") % 3, [lambda v: v, lambda v: v * 2, lambda v: -v], x)


def sm_map_psum(L, N, C, xs):
    return L.map(lambda r: C.psum(N.sin(r), "i") * r, xs)


def sm_switch_psum(L, N, C, x):
    i = (C.psum(N.abs(x).sum(), "i") * 2).astype(N.int32)      # the same on every device
    return L.switch(i, [lambda v: v * 3, lambda v: C.psum(v, "i") * v, lambda v: N.cos(v)], x)


SHARD_MAP = {                         # name -> (body, args, in_specs, out_specs, differentiable)
    "scan_psum_ppermute": (sm_scan_psum, lambda: (_f32(4, 8, 3),), (P(None, "i"),), P("i"), True),
    "fori_pmean": (sm_fori_psum, lambda: (_f32(8, 3),), (P("i"),), P("i"), True),
    "while_psum": (sm_while_psum, lambda: (_f32(8, 3),), (P("i"),), P("i"), False),
    "cond_psum": (sm_cond_psum, lambda: (_f32(8, 3),), (P("i"),), P("i"), True),
    "cond_varying_index": (sm_cond_varying, lambda: (_f32(8, 3),), (P("i"),), P("i"), True),
    "while_varying_predicate": (sm_while_varying, lambda: (np.abs(_f32(8, 1)) * 3,), (P("i"),),
                                P("i"), False),
    "switch_varying_index": (sm_switch_varying, lambda: (_f32(8, 3),), (P("i"),), P("i"), True),
    "map_psum": (sm_map_psum, lambda: (_f32(4, 8),), (P(None, "i"),), P(None, "i"), True),
    "switch_psum": (sm_switch_psum, lambda: (_f32(8, 3) * 0.05,), (P("i"),), P("i"), True),
}


def _shard_mapped(body, in_specs, out_specs, framework):
    from _jax_oracle import SPMD, jax_namespace
    if framework == "spmd":
        mesh = spmd.make_mesh((8,), ("i",))
        return spmd.shard_map(lambda *xs: body(slax, np, SPMD, *xs), mesh=mesh,
                              in_specs=in_specs, out_specs=out_specs)
    jax, jlax, jnp = _jax()
    return jax.shard_map(lambda *xs: body(jlax, jnp, jax_namespace(), *xs),
                         mesh=jax_mesh((8,), ("i",)), in_specs=tuple(jax_spec(s) for s in in_specs),
                         out_specs=jax_spec(out_specs))


@pytest.mark.parametrize("name", SHARD_MAP)
def test_shard_map_equals_jax(name):
    body, make, ins, out, _ = SHARD_MAP[name]
    args = make()
    jax = _jax()[0]
    want = _jax_run(_shard_mapped(body, ins, out, "jax"), *args)
    mine = _shard_mapped(body, ins, out, "spmd")
    _close(spmd.jit(mine)(*args), want)
    _close(spmd.jit(mine, executor=REFERENCE)(*args), want)


@pytest.mark.parametrize("name", [n for n, row in SHARD_MAP.items() if row[4]])
def test_shard_map_grad_equals_jax(name):
    body, make, ins, out, _ = SHARD_MAP[name]
    args = make()
    jax, _, jnp = _jax()
    theirs = _shard_mapped(body, ins, out, "jax")
    want = _jax_run(jax.grad(lambda *a: jnp.sum(jnp.sin(theirs(*a)))), *args)
    mine = spmd.grad(lambda *a: np.sum(np.sin(_shard_mapped(body, ins, out, "spmd")(*a))))
    _close(spmd.jit(mine)(*args), want, tol=1e-4)
    _close(spmd.jit(mine, executor=REFERENCE)(*args), want, tol=1e-4)


@pytest.mark.parametrize("name", ["scan_psum_ppermute", "cond_psum", "fori_pmean"])
def test_shard_map_under_vmap_equals_jax(name):
    body, make, ins, out, _ = SHARD_MAP[name]
    args = tuple(np.stack([a, a * 0.5 + 0.1]) for a in make())
    jax = _jax()[0]
    want = _jax_run(jax.vmap(_shard_mapped(body, ins, out, "jax")), *args)
    _close(spmd.jit(spmd.vmap(_shard_mapped(body, ins, out, "spmd")))(*args), want)


def test_second_order_inside_shard_map():
    body, make, ins, out, _ = SHARD_MAP["scan_psum_ppermute"]
    f = _shard_mapped(body, ins, out, "spmd")
    check_grads(lambda x: np.sum(np.sin(f(x))), (make()[0].astype(np.float64),), order=2,
                rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the sharding compiler, and one equation whatever the length
# ---------------------------------------------------------------------------------------------

def test_jit_with_shardings_runs_a_loop():
    mesh = spmd.make_mesh((2, 4), ("data", "model"), (spmd.AxisType.Auto,) * 2)
    w, h0, xs = _f32(8, 8) * 0.3, _f32(4, 8), _f32(5, 4, 8)

    def step(w, h0, xs):
        h, ys = slax.scan(lambda h, x: (np.tanh(h @ w + x), h.sum(1)), h0 @ w, xs)
        h = slax.cond(h.sum() > 0, lambda v: v * 2, lambda v: v - 1, h)
        return slax.fori_loop(0, 3, lambda i, v: v * 0.5 + 1, h), ys
    S = lambda *spec: NamedSharding(mesh, P(*spec))
    f = spmd.jit(step, in_shardings=(S(None, "model"), S("data"), S(None, "data")),
                 out_shardings=(S("data"), S()))
    jax = _jax()[0]

    def jstep(w, h0, xs):
        jlax, jnp = _jax()[1:]
        h, ys = jlax.scan(lambda h, x: (jnp.tanh(h @ w + x), h.sum(1)), h0 @ w, xs)
        h = jlax.cond(h.sum() > 0, lambda v: v * 2, lambda v: v - 1, h)
        return jlax.fori_loop(0, 3, lambda i, v: v * 0.5 + 1, h), ys
    _close(f(w, h0, xs), _jax_run(jstep, w, h0, xs))
    _close(spmd.grad(lambda w: np.sum(f(w, h0, xs)[0]))(w),
           _jax_run(jax.grad(lambda w: jax.numpy.sum(jstep(w, h0, xs)[0])), w), tol=1e-4)


def test_shard_map_inside_a_loop_under_jit_with_shardings():
    mesh = spmd.make_mesh((8,), ("i",), (spmd.AxisType.Auto,))
    total = spmd.shard_map(lambda a: spmd.psum(a, "i"), mesh=mesh, in_specs=P("i"), out_specs=P())
    f = lambda xs: slax.scan(lambda c, x: (c + total(x).sum(0), c), np.zeros(2, np.float32), xs)
    xs = _f32(3, 16, 2)
    want = np.cumsum(xs.sum(1), 0)
    for g in (spmd.jit(f, in_shardings=NamedSharding(mesh, P(None, "i"))), spmd.jit(f)):
        c, ys = g(xs)
        _close((c, ys), (want[-1], np.concatenate([np.zeros((1, 2)), want[:-1]])), tol=1e-4)


def test_loop_on_explicit_mesh_axes():
    mesh = spmd.make_mesh((2, 4), ("data", "model"))        # Explicit axes, JAX 0.10's default
    w, h0, xs = _f32(8, 8) * 0.3, _f32(4, 8), _f32(5, 4, 8)
    put = lambda a, *spec: spmd.device_put(a, NamedSharding(mesh, P(*spec)))
    args = put(w, None, "model"), put(h0, "data"), put(xs, None, "data")
    with pytest.raises(TypeError, match="shardings differ"):    # h @ w is split over "model"
        spmd.jit(lambda w, h0, xs: slax.scan(lambda h, x: (np.tanh(h @ w + x), h.sum(1)),
                                             h0, xs))(*args)
    keep = NamedSharding(mesh, P("data", None))         # the carry keeps its type, as JAX asks
    h, ys = spmd.jit(lambda w, h0, xs: slax.scan(
        lambda h, x: (np.tanh(spmd.numpy.matmul(h, w, out_sharding=keep) + x), h.sum(1)),
        h0, xs))(*args)
    want_h, want_ys = h0, []
    for x in xs:                                            # the loop in Python, on NumPy
        want_ys.append(want_h.sum(1))
        want_h = np.tanh(want_h @ w + x)
    _close((h, ys), (want_h, np.stack(want_ys)))


LOOPS = [
    lambda L, N, n: (lambda x: L.scan(lambda c, _: (c * 0.5 + 1, c), x, None, length=n)),
    lambda L, N, n: (lambda x: L.fori_loop(0, n, lambda i, c: c * 0.5 + i, x)),
    lambda L, N, n: (lambda x: L.map(lambda r: N.sin(r) * x, N.arange(n) * 1.0)),
]


@pytest.mark.parametrize("loop", range(len(LOOPS)))
def test_a_loop_is_one_equation_whatever_its_length(loop):
    make, x = LOOPS[loop], np.float32(0.3)
    grad = lambda n: spmd.grad(lambda y: _float_sum(make(slax, np, n)(y), np))
    for f in (lambda n: make(slax, np, n), grad):
        assert len({len(spmd.make_program(f(n))(x).eqns) for n in (3, 300, 30000)}) == 1
    jax, jlax, jnp = _jax()
    _close(spmd.jit(make(slax, np, 7))(x), _jax_run(make(jlax, jnp, 7), x))
    want = _jax_run(jax.grad(lambda y: _float_sum(make(jlax, jnp, 7)(y), jnp)), x)
    _close(grad(7)(x), want, tol=1e-4)


# ---------------------------------------------------------------------------------------------
# bad inputs: each a clear error naming the function and the leaf
# ---------------------------------------------------------------------------------------------

def grows(c, x):
    return np.stack([c, c]), x


def to_int(c, x):
    return {"a": c["a"].astype(np.int32)}, x


def drops(c, x):
    return c[0], x


def no_pair(c, x):
    return c


def gathers(c, x):
    return slax.psum(c, "i") + x, x


def big(x):
    return np.ones(4)


def small(x):
    return x


def as_int(x):
    return x.astype(np.int32)


def reduced(x):
    return slax.psum(x, "i")


def tuple_out(x):
    return (x, x)


def keep_going(c):
    return np.concatenate([c, c])


def summed(c):
    return c.sum()


def halve(c):
    return c * 0.5


def with_psum(c):
    return c + slax.psum(c, "i") * 0.5


def _in_shard_map(f):
    mesh = spmd.make_mesh((8,), ("i",))
    return lambda: spmd.shard_map(f, mesh=mesh, in_specs=P("i"), out_specs=P("i"))(X8)


X3, X8 = np.ones(3, np.float32), np.ones(8, np.float32)
BAD = [   # (id, call, exception, fragments of the message)
    ("scan-carry-shape", lambda: slax.scan(grows, X3, np.ones((4, 3))), TypeError,
     ["scan(grows)", "carry", "f32[3]", "f32[2,3]", "shapes differ"]),
    ("scan-carry-dtype", lambda: slax.scan(to_int, {"a": X3}, np.ones(4)), TypeError,
     ["scan(to_int)", "carry['a']", "dtypes differ"]),
    ("scan-carry-structure", lambda: slax.scan(drops, (X3, X3), np.ones(4)), TypeError,
     ["scan(drops)", "structure"]),
    ("scan-carry-vma", _in_shard_map(lambda x: slax.scan(gathers, x, np.ones((2, 1), np.float32))[0]
                                     ),
     spmd.VmaError, ["scan(gathers)", "carry", "vma", "spmd.pvary"]),
    ("scan-not-a-pair", lambda: slax.scan(no_pair, X3, np.ones(4)), TypeError,
     ["scan(no_pair)", "pair (carry, y)"]),
    ("scan-lengths-differ", lambda: slax.scan(small, X3, (np.ones(3), np.ones(4))), ValueError,
     ["scan(small)", "[3, 4]"]),
    ("scan-no-length", lambda: slax.scan(small, X3, None), ValueError, ["scan(small)", "length="]),
    ("scan-length-disagrees", lambda: slax.scan(small, X3, np.ones(4), length=5), ValueError,
     ["scan(small)", "length=5", "[4]"]),
    ("scan-scalar-xs", lambda: slax.scan(small, X3, {"t": np.float32(1)}), ValueError,
     ["scan(small)", "xs['t']", "leading axis"]),
    ("cond-branch-shapes", lambda: slax.cond(True, big, small, X3), TypeError,
     ["cond", "small", "big", "f32[3]", "f64[4]", "shapes differ"]),
    ("cond-branch-dtypes", lambda: slax.cond(True, as_int, small, X3), TypeError,
     ["cond", "as_int", "i32[3]", "dtypes differ"]),
    ("cond-branch-vma", _in_shard_map(lambda x: slax.cond(x.shape[0] == 1, reduced, small, x)),
     spmd.VmaError, ["cond", "reduced", "vma", "spmd.pvary"]),
    ("cond-branch-structure", lambda: slax.cond(True, tuple_out, small, X3), TypeError,
     ["cond", "tuple_out", "structure"]),
    ("cond-predicate-shape", lambda: slax.cond(np.array([True, False]), small, small, X3),
     TypeError, ["cond", "scalar", "(2,)"]),
    ("switch-no-branches", lambda: slax.switch(0, [], X3), ValueError, ["switch", "non-empty"]),
    ("switch-float-index", lambda: slax.switch(0.5, [small, small], X3), TypeError,
     ["switch", "integer"]),
    ("while-body-shape", lambda: slax.while_loop(lambda c: c.sum() < 9, keep_going, X3), TypeError,
     ["while_loop(keep_going)", "init_val", "f32[6]", "shapes differ"]),
    ("while-cond-not-bool", lambda: slax.while_loop(summed, halve, X3), TypeError,
     ["while_loop(halve)", "boolean scalar", "f32[]"]),
    ("while-reverse-mode",
     lambda: spmd.grad(lambda x: slax.while_loop(lambda c: c < 9, halve, x))(1.0),
     ValueError, ["while_loop(halve)", "Reverse-mode differentiation does not work", "lax.scan"]),
    ("fori-dynamic-reverse-mode", lambda: spmd.grad(
        lambda x, n: slax.fori_loop(0, n, lambda i, c: c * 2, x))(1.0, np.int32(3)), ValueError,
     ["fori_loop", "Reverse-mode differentiation does not work", "static start/stop"]),
    ("fori-float-bounds", lambda: spmd.jit(lambda n: slax.fori_loop(0, n, lambda i, c: c, X3))(2.0),
     TypeError, ["fori_loop", "integers", "float64"]),
    ("while-varying-predicate-collective", _in_shard_map(
        lambda x: slax.while_loop(lambda c: c[0] < 9, with_psum, x)), spmd.VmaError,
     ["while_loop(with_psum)", "varies over mesh axes ('i',)", "collective", "psum/pmax"]),
    ("cond-varying-index-collective", _in_shard_map(
        lambda x: slax.cond(x[0] > 0, with_psum, halve, x)), spmd.VmaError,
     ["cond(halve, with_psum)", "varies over mesh axes ('i',)", "collective"]),
]


@pytest.mark.parametrize("row", BAD, ids=[r[0] for r in BAD])
def test_bad_input_is_a_clear_error(row):
    _, call, exc, fragments = row
    with pytest.raises(exc) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# ---------------------------------------------------------------------------------------------
# a carry that only sums a product per step runs as one product after the loop
# ---------------------------------------------------------------------------------------------

def _splits(monkeypatch):
    from spmd import control_flow
    made, real = [], control_flow._Split.__init__

    def record(self, *a, **kw):
        real(self, *a, **kw)
        made.append(self)
    monkeypatch.setattr(control_flow._Split, "__init__", record)
    return made


@pytest.mark.parametrize("reverse", [False, True])
def test_weight_gradients_of_a_scan_are_one_product_after_the_loop(monkeypatch, reverse):
    """The backward scan of an RNN sums ``h.T @ g`` and ``x.T @ g`` into its weights'
    gradients at every step: those carries leave the loop, which stacks ``g`` (``x`` is read
    where it is), and each gradient is one product over all steps; JAX's gradients."""
    splits = _splits(monkeypatch)
    w, u, h0, xs = _f32(5, 5) * 0.4, _f32(3, 5) * 0.4, _f32(2, 5), _f32(9, 2, 3)

    def loss(L, N, w, u):
        def cell(h, x):
            h = N.tanh(h @ w + x @ u)
            return h, h
        return (L.scan(cell, h0, xs, reverse=reverse)[1] ** 2).sum()
    got = spmd.jit(spmd.grad(lambda w, u: loss(slax, np, w, u), argnums=(0, 1)))(w, u)
    jax, lax, jnp = _jax()
    want = _jax_run(jax.grad(lambda w, u: loss(lax, jnp, w, u), argnums=(0, 1)), w, u)
    _close(got, want, tol=5e-5)
    backward = [s for s in splits if s.accumulators]
    assert len(backward) == 1 and len(backward[0].accumulators) == 2
    assert not any(e.prim.name == "dot_general" and e.outputs[0].aval.shape in ((5, 5), (3, 5))
                   for e in backward[0].step.eqns)


def test_bias_gradients_of_a_scan_are_one_sum_after_the_loop(monkeypatch):
    """Beside the weight's product, the backward scan sums ``g.sum(0)`` into the bias's
    gradient at every step; ``g`` is stacked for the product already, so that carry leaves the
    loop too and is one sum over all steps; JAX's gradients, on both executors."""
    splits = _splits(monkeypatch)
    w, b, h0, xs = _f32(5, 5) * 0.4, _f32(5) * 0.1, _f32(2, 5), _f32(9, 2, 5)

    def loss(L, N, w, b):
        def cell(h, x):
            h = N.tanh(h @ w + x + b)
            return h, h
        return (L.scan(cell, h0, xs)[1] ** 2).sum()
    grad = spmd.grad(lambda w, b: loss(slax, np, w, b), argnums=(0, 1))
    jax, lax, jnp = _jax()
    want = _jax_run(jax.grad(lambda w, b: loss(lax, jnp, w, b), argnums=(0, 1)), w, b)
    _close(spmd.jit(grad)(w, b), want, tol=5e-5)
    _close(spmd.jit(grad, executor=REFERENCE)(w, b), want, tol=5e-5)
    backward = [s for s in splits if s.accumulators]
    assert backward and all(sorted(e.prim.name for _, e, _ in s.accumulators)
                            == ["dot_general", "reduce_sum"] for s in backward)
    assert not any(e.prim.name == "reduce_sum" for s in backward for e in s.step.eqns)


def test_summed_products_inside_shard_map_and_a_carry_read_in_the_body_stays(monkeypatch):
    """Per device inside shard_map (the pipeline's backward): the same values as the reference
    executor; a carry the body also reads (here: scaled each step) is left in the loop."""
    splits = _splits(monkeypatch)
    mesh = spmd.make_mesh((4,), ("x",))
    a, g0 = _f32(4 * 6, 3, 5), _f32(4 * 3, 2)

    def body(a, g0):
        def step(c, x):
            acc, decayed, g = c
            g = np.tanh(g + 1)                          # the product reads a carry
            return (acc + x.T @ g, 0.5 * decayed + x.T @ g, g), None
        zero = spmd.pvary(np.zeros((5, 2), np.float32), "x")
        return slax.scan(step, (zero, zero, g0), a)[0]
    specs = (P("x"), P("x"), P("x"))
    f = spmd.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=specs)
    got = spmd.jit(f)(a, g0)
    ref = spmd.jit(f, executor=REFERENCE)(a, g0)
    _close(got, ref)
    want = []
    for i in range(4):
        acc, g = np.zeros((5, 2), np.float32), g0[i * 3:(i + 1) * 3]
        for x in a[i * 6:(i + 1) * 6]:
            g = np.tanh(g + 1)
            acc = acc + x.T @ g
        want.append(acc)
    np.testing.assert_allclose(np.asarray(got[0]), np.concatenate(want), rtol=1e-4, atol=1e-5)
    # one split per executor (stacked, reference), each with the one pure accumulator
    assert [len(s.accumulators) for s in splits if s.accumulators] == [1, 1]


def _grad_as_jax(loss, w):
    """``loss(L, N, w)``'s gradient in ``w`` on both executors equals JAX's; returns its program."""
    grad = spmd.grad(lambda w: loss(slax, np, w))
    jax, lax, jnp = _jax()
    want = _jax_run(jax.grad(lambda w: loss(lax, jnp, w)), w)
    _close(spmd.jit(grad)(w), want)
    _close(spmd.jit(grad, executor=REFERENCE)(w), want)
    return spmd.make_program(grad)(w)


def test_a_residual_made_from_consts_alone_is_computed_once_not_stacked_per_step():
    """A value the body computes from its consts alone (here a select's predicate) is the same
    at every step: the gradient computes it once before the loop and hands it to the backward
    scan as a const, as JAX does, instead of storing a copy of it per step; JAX's gradient."""
    w, xs = _f32(4), _f32(12, 4)

    def loss(L, N, w):
        def step(h, x):
            keep = N.broadcast_to(w > 0, h.shape)              # from the const alone
            h = N.where(keep, N.tanh(h * w + x), 0.5 * h)
            return h, h
        return (L.scan(step, N.zeros(4, N.float32), xs)[1] ** 2).sum()
    program = _grad_as_jax(loss, w)
    per_step = [v.aval for e in program.eqns if e.prim.name == "scan" for v in e.outputs
                if v.aval.shape[:1] == (12,)]
    assert per_step and not any(a.dtype == np.bool_ for a in per_step), per_step


def test_a_residual_that_is_also_a_y_is_stacked_once():
    """``exp``'s derivative is its own output: the residual the backward scan reads is the ys
    the forward scan stacks already, so the forward scan stacks it once, not twice; JAX's
    gradient."""
    w, xs = _f32(4), _f32(12, 4)

    def loss(L, N, w):
        return (L.scan(lambda c, x: (c, N.exp(x * w)), N.zeros((), N.float32), xs)[1] ** 2).sum()
    program = _grad_as_jax(loss, w)
    forward = next(e for e in program.eqns if e.prim.name == "scan")
    assert [v.aval.shape for v in forward.outputs] == [(), (12, 4)]
