"""Regression tests, one per bug: each failed before its fix.

Values against NumPy, gradients against JAX's (``jax.shard_map``) where JAX runs the same
program, and the collectives of backward programs counted in bytes.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import spmd
from spmd import P

from _mp import ROOT, needs_mpi


# --- indexing with an ellipsis and None ---------------------------------------------------------

@pytest.mark.parametrize("index", [
    lambda x: x[..., None], lambda x: x[None, ...], lambda x: x[None, ..., None],
    lambda x: x[..., None, 1], lambda x: x[0, ..., None], lambda x: x[...],
    lambda x: x[..., np.array([0, 2])], lambda x: x[:, None, ...]])
def test_ellipsis_with_new_axes_matches_numpy(index):
    a = np.arange(24.0).reshape(2, 3, 4)[..., 0]
    got = np.asarray(spmd.jit(index)(a))
    np.testing.assert_array_equal(got, index(a))


# --- combining inserted psums of several groups -------------------------------------------------

@pytest.mark.parametrize("mixed", ["dtype", "axes"])
def test_adam_moment_of_six_gradients_pending_over_different_groups(mixed):
    """Six gradients pending a sum, then ``0.9 * m + 0.1 * g`` in the same jit: the compiler
    combines the psums of each group (same axes and dtype) into one; two groups interleaved in
    program order made the second merge read equations the first had moved (KeyError)."""
    mesh = spmd.make_mesh((2, 4), ("a", "b"))
    rng = np.random.default_rng(0)
    keys = [f"w{i}" for i in range(6)]
    dtype = lambda i: np.float32 if mixed == "dtype" and i % 2 else np.float64
    params = {k: rng.normal(size=4).astype(dtype(i)) for i, k in enumerate(keys)}
    m = {k: rng.normal(size=4).astype(dtype(i)) for i, k in enumerate(keys)}
    x, z = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
    data = lambda i: z if mixed == "axes" and i % 2 else x

    def loss(p, x, z):
        return sum(np.sum(np.tanh((z if mixed == "axes" and i % 2 else x) * p[k]))
                   for i, k in enumerate(keys))

    def step(p, m, x, z):
        g = spmd.grad(loss)(p, x, z)
        return {k: 0.9 * m[k] + 0.1 * g[k] for k in keys}

    put = lambda s: spmd.NamedSharding(mesh, s)
    f = spmd.jit(step, in_shardings=(put(P()), put(P()), put(P("a")), put(P(("a", "b")))))
    comp = f.lower(params, m, x, z)
    assert [c.step.kind for c in comp.compiled.inserted] == ["psum", "psum"]
    got = f(params, m, x, z)
    for i, k in enumerate(keys):
        grad = np.sum(data(i) * (1 - np.tanh(data(i) * params[k]) ** 2), axis=0)
        np.testing.assert_allclose(np.asarray(got[k]), 0.9 * m[k] + 0.1 * grad, rtol=1e-5)
        assert got[k].dtype == dtype(i)


# --- gradient psums the size of the parameters --------------------------------------------------

def _matmul_layer(C, x, w, g):
    return C.psum(C.np.sum(C.np.tanh(x @ w)), "d")


def _layer_norm_gain(C, x, w, g):
    mu = C.np.mean(x, axis=-1, keepdims=True)
    return C.psum(C.np.sum(C.np.tanh((x - mu) * g) @ w), "d")


@pytest.mark.parametrize("body,used", [(_matmul_layer, "w"), (_layer_norm_gain, "wg")])
def test_data_parallel_gradient_psums_are_parameter_sized(body, used):
    """``x (B,T,D) @ w`` and ``x * g`` with invariant ``w``, ``g`` in a data-parallel shard_map:
    the backward program psums a cotangent the size of each parameter (the implicit pvary sits
    on the parameter, before the broadcast), and the gradients are JAX's."""
    import jax
    import jax.numpy as jnp
    from _jax_oracle import SPMD, jax_mesh, jax_namespace, jax_spec

    mesh = spmd.make_mesh((8,), ("d",))
    rng = np.random.default_rng(1)
    x, w, g = rng.normal(size=(64, 10, 16)), rng.normal(size=(16, 4)), rng.normal(size=16)
    specs = (P("d"), P(), P())
    loss = spmd.shard_map(lambda x, w, g: body(SPMD, x, w, g), mesh=mesh, in_specs=specs,
                          out_specs=P())
    grad = spmd.grad(loss, argnums=(1, 2))
    backward = [c for c in spmd.collectives_of(spmd.make_program(grad)(x, w, g))
                if "transpose" in c.where]
    params = dict(w=w, g=g)
    assert sorted(c.bytes_per_device for c in backward) == sorted(params[p].nbytes for p in used)

    J = jax_namespace()
    jloss = jax.shard_map(lambda x, w, g: body(J, x, w, g), mesh=jax_mesh((8,), ("d",)),
                          in_specs=tuple(map(jax_spec, specs)), out_specs=jax_spec(P()))
    with jax.enable_x64(True):
        want = jax.jit(jax.grad(jloss, argnums=(1, 2)))(x, w, g)
    for got, ref in zip(grad(x, w, g), want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-10, atol=1e-12)


# --- jacfwd / jacrev nest their blocks as JAX does ----------------------------------------------

def _h(w, xy, np=np):
    x, y = xy
    return np.tanh(x * w) * y


def _h_tree(w, xy, np=np):
    return {"a": np.sin(w), "b": (np.tanh(xy[0] * w), np.sum(xy[1]))}


@pytest.mark.parametrize("f", [_h, _h_tree])
@pytest.mark.parametrize("argnums", [0, 1, (0,), (0, 1), (1, 0)])
@pytest.mark.parametrize("which", ["jacfwd", "jacrev"])
def test_jacobians_have_jax_structure_and_values(which, argnums, f):
    """Pytree arguments and outputs: output structure outside, the picked arguments' inside,
    one block ``out.shape + in.shape`` per pair of leaves (was one stacked array, or a
    TypeError for jacfwd)."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(2)
    w, x, y = rng.normal(size=3), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    with jax.enable_x64(True):
        want = getattr(jax, which)(lambda *a: f(*a, np=jnp), argnums=argnums)(w, (x, y))
    got = getattr(spmd, which)(f, argnums=argnums)(w, (x, y))
    want_leaves, want_tree = jax.tree.flatten(want)
    got_leaves, got_tree = jax.tree.flatten(jax.tree.map(np.asarray, got))
    assert got_tree == want_tree
    for g, r in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(g, np.asarray(r), rtol=1e-12, atol=1e-12)


def test_vmap_of_an_elementwise_op_with_a_lower_rank_constant():
    """``x * c`` with ``c`` of lower rank than ``x`` (NumPy broadcasting) under vmap, batched
    operands of lower rank too; jacrev's backward programs hold such products."""
    c, b = np.arange(3.0), np.arange(12.0).reshape(4, 3)
    x = np.arange(24.0).reshape(2, 4, 3)
    np.testing.assert_array_equal(np.asarray(spmd.vmap(lambda x: x * c)(x)), x * c)
    np.testing.assert_array_equal(np.asarray(spmd.vmap(lambda r: r * b)(x[:, 0])),
                                  x[:, :1] * b)
    np.testing.assert_array_equal(np.asarray(spmd.vmap(lambda r, s: r + s)(x[:, 0], x)),
                                  x[:, :1] + x)


# --- grad(remat(shard_map(f))) ------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable", "everything_saveable"])
def test_grad_of_remat_of_shard_map_matches_jax(policy):
    """The JVP of a shard_map inside a checkpoint is split by the shard_map's own rule, so its
    primal outputs stay known (was: 'a primal output depends on a tangent')."""
    import jax
    import jax.numpy as jnp
    from _jax_oracle import SPMD, jax_mesh, jax_namespace, jax_spec

    def body(C, x, w):
        return C.psum(C.np.sum(C.np.tanh(x @ w) ** 2), "d")

    mesh = spmd.make_mesh((8,), ("d",))
    rng = np.random.default_rng(3)
    x, w = rng.normal(size=(16, 4)), rng.normal(size=(4, 3))
    f = spmd.shard_map(lambda x, w: body(SPMD, x, w), mesh=mesh, in_specs=(P("d"), P()),
                       out_specs=P())
    remat = spmd.remat(f, policy=getattr(spmd.checkpoint_policies, policy))
    value, grads = spmd.value_and_grad(remat, argnums=(0, 1))(x, w)
    jitted = spmd.jit(spmd.grad(lambda x, w: 2 * remat(x, w), argnums=1))(x, w)

    J = jax_namespace()
    jf = jax.shard_map(lambda x, w: body(J, x, w), mesh=jax_mesh((8,), ("d",)),
                       in_specs=(jax_spec(P("d")), jax_spec(P())), out_specs=jax_spec(P()))
    with jax.enable_x64(True):
        jvalue, jgrads = jax.value_and_grad(jax.checkpoint(jf), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(value), np.asarray(jvalue), rtol=1e-12)
    for g, r in zip(grads, jgrads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jitted), 2 * np.asarray(jgrads[1]), rtol=1e-10)


# --- shard_map over an AbstractMesh, called eagerly ---------------------------------------------

def test_eager_shard_map_on_an_abstract_mesh_runs_on_the_concrete_mesh():
    """The concrete mesh comes from the arguments or ``set_mesh`` (as in JAX); without either
    the error names the fix instead of an AttributeError from ``addressable_shards``."""
    mesh = spmd.make_mesh((2, 4), ("a", "b"))
    x = np.arange(16.0).reshape(8, 2)
    f = spmd.shard_map(lambda x: x * 2, mesh=mesh.abstract_mesh, in_specs=P("a"),
                       out_specs=P("a"))
    on_mesh = spmd.device_put(x, spmd.NamedSharding(mesh, P("a")))
    with spmd.set_mesh(mesh):
        from_context = f(x)
    for y in (f(on_mesh), spmd.jit(f)(on_mesh), from_context):
        assert y.sharding.mesh == mesh
        shards = y.addressable_shards
        assert len(shards) == 8
        for s in shards:
            np.testing.assert_array_equal(s.data, 2 * x[s.index])
    with pytest.raises(spmd.ShardingError, match="set_mesh"):
        f(x)
    with pytest.raises(spmd.ShardingError, match="set_mesh"):
        spmd.jit(f)(x).addressable_shards


# --- in_specs: None leaves and list entries, as in JAX 0.10 -------------------------------------

def test_in_specs_none_passes_the_argument_through_and_list_entries_are_tuples():
    import jax
    from _jax_oracle import SPMD, jax_mesh, jax_namespace, jax_spec

    def body(C, a, d):
        return a * d["s"] + d["t"]

    mesh = spmd.make_mesh((2, 4), ("x", "y"))
    x, t = np.arange(16.0).reshape(8, 2), np.array([1.0, -1.0])
    f = spmd.shard_map(lambda a, d: body(SPMD, a, d), mesh=mesh, in_specs=(P("x"), None),
                       out_specs=P("x"))
    J = jax_namespace()
    jf = jax.shard_map(lambda a, d: body(J, a, d), mesh=jax_mesh((2, 4), ("x", "y")),
                       in_specs=(jax_spec(P("x")), None), out_specs=jax_spec(P("x")))
    with jax.enable_x64(True):
        want = jf(x, {"s": 3.0, "t": t})
        jgrad = jax.grad(lambda t: (jf(x, {"s": 3.0, "t": t}) ** 2).sum())(t)
    np.testing.assert_array_equal(np.asarray(f(x, {"s": 3.0, "t": t})), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(spmd.jit(f)(x, {"s": 3.0, "t": t})), np.asarray(want))
    grad = spmd.grad(lambda t: np.sum(f(x, {"s": 3.0, "t": t}) ** 2))(t)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jgrad))

    assert P(["x", "y"], None) == P(("x", "y"))
    g = spmd.shard_map(lambda a: a.sum(keepdims=True), mesh=mesh, in_specs=P(["x", "y"]),
                       out_specs=P(["x", "y"]))
    np.testing.assert_array_equal(np.asarray(g(np.arange(16.0))), np.arange(16.0).reshape(8, 2).sum(1))


# --- pmax / pmin of invariant values ------------------------------------------------------------

@pytest.mark.parametrize("op", ["pmax", "pmin"])
def test_pmax_pmin_of_an_invariant_value_match_jax(op):
    """Idempotent: over the axes the value is already the same on they return it (JAX); psum
    keeps its error (it would count the value n times)."""
    from _jax_oracle import run_jax, run_spmd

    mesh = spmd.make_mesh((2, 4), ("i", "j"))
    x, w = np.arange(8.0) - 3.5, np.arange(3.0)

    def body(C, x, w):
        red = getattr(C, op)
        return red(w, "j"), red(w * C.np.sum(x), ("i", "j")), red(x, ("i", "j"))

    args = (mesh, (P("i"), P()), (P(), P("i"), P()), x, w)
    for got, want in zip(run_spmd(body, *args), run_jax(body, *args)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # groups across 'i' (devices 0 and 4, ...): a value varying over 'i' only, reduced over both
    grouped = spmd.shard_map(
        lambda x: getattr(spmd, op)(x, ("i", "j"), axis_index_groups=[[0, 4], [1, 5], [2, 6], [3, 7]]),
        mesh=mesh, in_specs=P("i"), out_specs=P(("i", "j")))
    reduce = np.maximum if op == "pmax" else np.minimum
    np.testing.assert_array_equal(np.asarray(grouped(x)), np.tile(reduce(x[:4], x[4:]), 8))
    with pytest.raises(spmd.VmaError, match="4 times"):
        spmd.shard_map(lambda w: spmd.psum(w, "j"), mesh=mesh, in_specs=P(), out_specs=P())(w)


# --- deleted and donated Arrays -----------------------------------------------------------------

_USES = {
    "np.asarray": np.asarray, "dtype": lambda a: a.dtype, "add": lambda a: a + 1,
    "radd": lambda a: 1 + a, "addressable_shards": lambda a: a.addressable_shards,
    "np.sum": np.sum, "getitem": lambda a: a[0], "tolist": lambda a: a.tolist(),
    "astype": lambda a: a.astype(np.float32), "block_until_ready": lambda a: a.block_until_ready(),
    "jit": lambda a: spmd.jit(lambda x: x * 2)(a), "nbytes": lambda a: a.nbytes,
}


@pytest.mark.parametrize("use", list(_USES))
@pytest.mark.parametrize("how", ["delete", "donate"])
def test_using_a_deleted_or_donated_array_says_so(how, use):
    mesh = spmd.make_mesh((2, 4), ("a", "b"))
    a = spmd.device_put(np.arange(8.0), spmd.NamedSharding(mesh, P("a")))
    if how == "delete":
        a.delete()
    else:
        spmd.jit(lambda x: x + 1, donate_argnums=0)(a)
    assert a.is_deleted()
    with pytest.raises(RuntimeError, match="deleted.*donated|donated.*deleted"):
        _USES[use](a)


# --- explain(): argument and output paths, the user's source line -------------------------------

def _sgd(p, g):
    return p - g        # reads the argument `p` and reduces the gradient's pending sum


def test_explain_names_pytree_paths_and_the_users_line():
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    params = {"layers": [{"w1": rng.normal(size=(8, 16)), "w2": rng.normal(size=(16, 8))}
                         for _ in range(2)]}
    x = rng.normal(size=(16, 8))

    def loss(params, x):
        h = x
        for layer in params["layers"]:
            h = np.tanh(h @ layer["w1"]) @ layer["w2"]
        return np.mean(h ** 2)

    def step(params, x):
        grads = spmd.grad(loss)(params, x)
        return grads, spmd.tree_util.tree_map(_sgd, params, grads)

    put = lambda s: spmd.NamedSharding(mesh, s)
    text = spmd.jit(step, in_shardings=(put(P()), put(P("data")))).lower(params, x).explain()
    assert "output[0]['layers'][0]['w1']" in text          # was "output 0"
    assert "params['layers'][0]['w1']" in text              # an argument read by an equation
    line = _sgd.__code__.co_firstlineno + 1
    assert f"{__file__}:{line} (_sgd): return p - g" in text
    assert "eqn " in text and " = sub params['layers']" in text


# --- many processes: P() scalars, and spmd-run without initialize() ---------------------------


_SCALAR_LOSS = """
import numpy as np, spmd
from spmd import P

def losses():
    mesh = spmd.make_mesh((2,), ("i",), devices=spmd.devices()[:2])
    x = np.arange(8.0)
    sm = spmd.jit(spmd.shard_map(lambda b: spmd.psum(np.sum(b * b), "i"), mesh=mesh,
                                 in_specs=P("i"), out_specs=P()))
    jt = spmd.jit(lambda x: np.sum(x * x), in_shardings=spmd.NamedSharding(mesh, P("i")),
                  out_shardings=spmd.NamedSharding(mesh, P()))
    return [(o.shape, float(o)) for o in (sm(x), jt(x))]

simulated = losses()              # before initialize(): this process's simulated devices
spmd.distributed.initialize()
assert losses() == simulated == [((), 140.0), ((), 140.0)], (losses(), simulated)
print("scalars OK", flush=True)
"""


def _spmd_run(tmp_path, source, n=2):
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run([sys.executable, "-m", "spmd.run", "-n", str(n), str(script)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=50)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
@needs_mpi
def test_replicated_scalar_output_is_a_scalar_on_every_process(tmp_path):
    """A ``P()`` scalar (a shard_map's psum, a jit's reduction) has shape ``()`` on every
    process and ``float()`` works (MPI's all-reduce gave the 0-d operand back as ``(1,)``);
    computing on simulated devices before ``initialize()`` stays allowed (it warns)."""
    p = _spmd_run(tmp_path, _SCALAR_LOSS)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("scalars OK") == 2
    assert "spmd: error" not in p.stderr


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
@needs_mpi
def test_spmd_run_without_initialize_warns_and_fails(tmp_path):
    """Every process of ``spmd-run -n 2`` computing alone: the first computation warns at the
    user's line, and the job fails at exit with the fix, instead of succeeding twice."""
    p = _spmd_run(tmp_path, "import numpy as np, spmd\n"
                            "print(float(spmd.jit(np.sum)(np.arange(4.0))), flush=True)\n")
    assert p.returncode != 0
    assert p.stdout.count("6.0") == 2
    for rank in (0, 1):
        assert (f"[{rank}] {tmp_path / 'script.py'}:2: RuntimeWarning: process {rank} of 2 was "
                f"started by spmd-run but has not called spmd.distributed.initialize()") in p.stderr
        assert (f"[{rank}] spmd: error: process {rank} of 2 was started by spmd-run but has not "
                f"called spmd.distributed.initialize()") in p.stderr
    assert "call spmd.distributed.initialize() at the top of the script" in p.stderr


# --- the GPT step's speed fixes keep JAX's values -----------------------------------------------

@pytest.mark.parametrize("f,products", [
    (lambda x: x ** 3, lambda x: x * x * x), (lambda x: x ** 2, lambda x: x * x),
    (lambda x: x ** 3.0, lambda x: x * x * x)])
def test_small_integral_powers_are_jax_bits(f, products):
    """``x ** 3`` (GELU's cube and its derivative's square) runs as products, as XLA computes
    JAX's ``integer_pow``: JAX's float32 bits; inside a fused elementwise chain, whose buffers
    are reused once a value is dead, the same products."""
    import jax
    x = np.abs(np.random.default_rng(3).standard_normal(4096).astype(np.float32)) + 0.5
    np.testing.assert_array_equal(np.asarray(spmd.jit(f)(x)), np.asarray(jax.jit(f)(x)))
    mesh = spmd.make_mesh((8,), ("d",))
    g = spmd.shard_map(lambda b: f(b + 1) - 1, mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    np.testing.assert_array_equal(np.asarray(spmd.jit(g)(x)), products(x + 1) - 1)
    # other exponents stay NumPy's power
    np.testing.assert_array_equal(np.asarray(spmd.jit(lambda x: x ** 2.5)(x)), x ** 2.5)


def test_elementwise_chain_spans_scalar_index_arithmetic():
    """Scalar integer ops between the members of an elementwise chain (the compiler's slice
    starts, ``axis_index * block``) run in place and leave the chain whole."""
    from spmd.executors import fusion
    mesh = spmd.make_mesh((8,), ("d",))

    def body(b):
        y = np.tanh(b)
        start = spmd.lax.axis_index("d") * 3
        return y * 2 + 1, start

    f = spmd.shard_map(lambda b: (lambda y, s: (y, s[None]))(*body(b)), mesh=mesh,
                       in_specs=P("d"), out_specs=(P("d"), P("d")))
    program = spmd.make_program(f)(np.ones(16))
    inner = next(e for e in program.eqns if e.prim.name == "shard_map").params["body"]
    fused = [f for f in fusion.plan_fusions(inner, 1, np).values() if f != "skip"]
    assert [len(f.params["members"]) for f in fused] == [3]
    y, start = spmd.jit(f)(np.arange(16.0))
    np.testing.assert_allclose(np.asarray(y), np.tanh(np.arange(16.0)) * 2 + 1, rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(start), np.arange(8) * 3)
