"""spmd.jit with shardings: the API (NamedShardings, bare P under set_mesh, Array shardings,
with_sharding_constraint, donation), gradients, explain / as_text, and the error table."""
import os
import subprocess
import sys

import numpy as np
import pytest

import spmd
from spmd import NamedSharding, P
from spmd.errors import ShardingError

# Auto axes: these tests are about the compiler's propagation (JAX's jit on Auto meshes)
AUTO = spmd.AxisType.Auto
MESH = spmd.make_mesh((2, 4), ("data", "model"), (AUTO, AUTO))
MESH1 = spmd.make_mesh((8,), ("x",), (AUTO,))
NS = lambda *spec: NamedSharding(MESH, P(*spec))
rng = np.random.default_rng(0)
X = rng.normal(size=(8, 16)).astype(np.float32)
W1 = rng.normal(size=(16, 32)).astype(np.float32)
W2 = rng.normal(size=(32, 16)).astype(np.float32)


def kinds(f, *args):
    return sorted(f"{k}({','.join(a)})" for k, a in f.lower(*args).collectives())


def test_bare_specs_under_set_mesh():
    with spmd.set_mesh(MESH):
        f = spmd.jit(lambda x, w: x @ w, in_shardings=(P("data"), P(None, "model")), out_shardings=P("data"))
        y = f(X, W1)
        assert kinds(f, X, W1) == ["all_gather(model)"]
    assert y.sharding.spec == P("data") and y.sharding.mesh == MESH
    np.testing.assert_allclose(np.asarray(y), X @ W1, rtol=1e-5)


def test_shardings_from_array_arguments():
    x = spmd.device_put(X, NS("data"))
    w = spmd.device_put(W1, NS(None, "model"))
    f = spmd.jit(lambda x, w: np.tanh(x @ w), out_shardings=NS("data", "model"))
    y = f(x, w)
    assert y.sharding.spec == P("data", "model")
    np.testing.assert_allclose(np.asarray(y), np.tanh(X @ W1), rtol=1e-5)
    assert kinds(f, x, w) == []


def test_propagated_output_sharding():
    f = spmd.jit(lambda x, w: np.tanh(x @ w), in_shardings=(NS("data"), NS(None, "model")))
    y = f(X, W1)
    assert y.sharding.spec == P("data", "model")


def test_with_sharding_constraint_inside():
    def f(x, w1, w2):
        h = spmd.with_sharding_constraint(x @ w1, NS("data", "model"))
        return h @ w2
    jf = spmd.jit(f, in_shardings=(NS("data"), NS(), NS()), out_shardings=NS("data"))
    np.testing.assert_allclose(np.asarray(jf(X, W1, W2)), X @ W1 @ W2, rtol=1e-4)
    # the constraint wins over replicated weights: w2 is sliced locally, then one psum
    assert kinds(jf, X, W1, W2) == ["psum(model)"]


def test_constraint_flows_backward_to_free_inputs():
    def f(x, w):
        return spmd.with_sharding_constraint(x @ w, NS(None, "model"))
    jf = spmd.jit(f, in_shardings=(NS(), None), out_shardings=NS(None, "model"))
    assert jf.lower(X, W1).compiled.prop.in_shardings[1].spec == P(None, "model")
    np.testing.assert_allclose(np.asarray(jf(X, W1)), X @ W1, rtol=1e-5)


def test_with_sharding_constraint_eager_reshards():
    x = spmd.device_put(X, NS("data"))
    y = spmd.with_sharding_constraint(x, NS(None, "model"))
    assert y.sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(y), X)


def test_donation_and_reuse_error():
    x = spmd.device_put(X, NS("data"))
    f = spmd.jit(lambda x: x * 2, in_shardings=NS("data"), out_shardings=NS("data"), donate_argnums=0)
    y = f(x)
    np.testing.assert_array_equal(np.asarray(y), 2 * X)
    assert x.is_deleted()
    with pytest.raises(RuntimeError, match=r"args\[0\] was donated"):
        f(x)


def test_pytree_arguments_and_outputs():
    f = spmd.jit(lambda p, x: {"y": x @ p["w"], "s": (x @ p["w"]).sum()},
                 in_shardings=({"w": NS(None, "model")}, NS("data")),
                 out_shardings={"y": NS("data", "model"), "s": NS()})
    out = f({"w": W1}, X)
    np.testing.assert_allclose(np.asarray(out["y"]), X @ W1, rtol=1e-5)
    np.testing.assert_allclose(float(np.asarray(out["s"])), (X @ W1).sum(), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------

def mlp_loss(params, x, y):
    w1, w2 = params
    return np.sum((np.tanh(x @ w1) @ w2 - y) ** 2)


Y = rng.normal(size=(8, 16)).astype(np.float32)


def _check_grads(f, params):
    got = f(params, X, Y)
    want = spmd.grad(mlp_loss)(params, X, Y)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-3)
    return got


def test_grad_data_parallel_one_psum_for_all_parameters():
    f = spmd.jit(spmd.grad(mlp_loss), in_shardings=((NS(), NS()), NS(("data", "model")), NS(("data", "model"))))
    got = _check_grads(f, (W1, W2))
    assert [g.sharding.spec for g in got] == [P(), P()]      # like the parameters
    # one psum per parameter, combined into one collective (as XLA's all-reduce combiner)
    assert kinds(f, (W1, W2), X, Y) == ["psum(data,model)"]
    assert f.lower((W1, W2), X, Y).compiled.inserted[0].nbytes == (W1.size + W2.size) * 4


def test_grad_zero_sharded_gradients_psum_scatter():
    dp = MESH1
    f = spmd.jit(spmd.grad(mlp_loss), in_shardings=((NamedSharding(dp, P()),) * 2, NamedSharding(dp, P("x")),
                                                    NamedSharding(dp, P("x"))),
                 out_shardings=(NamedSharding(dp, P("x")),) * 2)
    _check_grads(f, (W1, W2))
    assert kinds(f, (W1, W2), X, Y) == ["psum_scatter(x)"]       # both gradients, one reduce-scatter


def test_grad_megatron_dp_tp():
    params = (NS(None, "model"), NS("model"))
    f = spmd.jit(spmd.grad(mlp_loss), in_shardings=(params, NS("data"), NS("data")))
    got = _check_grads(f, (W1, W2))
    assert [g.sharding.spec for g in got] == [P(None, "model"), P("model")]
    # forward: one psum over model; backward: the parameters' psums over data, combined
    assert kinds(f, (W1, W2), X, Y) == ["psum(data)", "psum(model)"]


def test_value_and_grad_shardings():
    params = (NS(None, "model"), NS("model"))
    f = spmd.jit(spmd.value_and_grad(mlp_loss), in_shardings=(params, NS("data"), NS("data")))
    v, g = f((W1, W2), X, Y)
    np.testing.assert_allclose(float(np.asarray(v)), mlp_loss((W1, W2), X, Y), rtol=1e-4)
    assert [x.sharding.spec for x in g] == [P(None, "model"), P("model")]


def test_grad_of_vocab_parallel_embedding():
    table = rng.normal(size=(64, 8)).astype(np.float32)
    ids = rng.integers(0, 64, size=(4, 6)).astype(np.int32)
    tgt = rng.normal(size=(4, 6, 8)).astype(np.float32)

    def loss(t, ids, tgt):
        return np.sum((t[ids] - tgt) ** 2)
    f = spmd.jit(spmd.grad(loss), in_shardings=(NS("model"), NS(), NS()))
    g = f(table, ids, tgt)
    np.testing.assert_allclose(np.asarray(g), np.asarray(spmd.grad(loss)(table, ids, tgt)), rtol=1e-4, atol=1e-4)
    assert g.sharding.spec == P("model")
    # forward: the masked lookup pends a sum over 'model'; backward: a masked local scatter-add
    assert kinds(f, table, ids, tgt) == ["psum(model)"]


# ---------------------------------------------------------------------------------------------
# explain / as_text
# ---------------------------------------------------------------------------------------------

def megatron(x, w1, w2):
    return np.tanh(x @ w1) @ w2


MEGATRON = dict(in_shardings=(NS("data"), NS(None, "model"), NS("model")), out_shardings=NS("data"))


def test_as_text_shows_global_and_per_device_programs():
    text = spmd.jit(megatron, **MEGATRON).lower(X, W1, W2).as_text()
    assert "f32[8,16][data,-]" in text and "+P(sum:model)" in text
    assert "shard_map" in text and "psum[axes=(model,)" in text
    assert "f32[4,16]{data}" in text            # a per-device block


def test_explain_lists_each_collective():
    text = spmd.jit(megatron, **MEGATRON).lower(X, W1, W2).explain()
    assert "1 collective inserted" in text
    assert "psum(model)" in text and "pending sum over 'model'" in text
    assert "B per device" in text and "est." in text


def test_spmd_explain_env_prints():
    code = ("import numpy as np, spmd; from spmd import P, NamedSharding as NS;"
            "m = spmd.make_mesh((8,), ('x',));"
            "f = spmd.jit(lambda x: x.sum(), in_shardings=NS(m, P('x')), out_shardings=NS(m, P()));"
            "f(np.ones(8))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SPMD_EXPLAIN": "1"},
                         capture_output=True, text=True, timeout=120)
    assert "psum(x)" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------------
# errors: each names the argument
# ---------------------------------------------------------------------------------------------

OTHER = spmd.make_mesh((4, 2), ("data", "model"), (AUTO, AUTO))

ERRORS = [
    ("axis not in mesh", lambda: spmd.jit(lambda x: x, in_shardings=P("nope")), (X,),
     ShardingError, r"in_shardings for args\[0\].*'nope'", MESH),
    ("spec longer than rank", lambda: spmd.jit(lambda x: x, in_shardings=NS("data", None, "model")), (X,),
     ShardingError, r"args\[0\].*rank 2", None),
    ("argument that does not exist", lambda: spmd.jit(lambda x: x, in_shardings=(NS(), NS("data"))), (X,),
     ShardingError, r"in_shardings\[1\] is for an argument that does not exist", None),
    ("out_shardings structure", lambda: spmd.jit(lambda x: x, out_shardings=(NS(), NS()), in_shardings=NS()),
     (X,), ShardingError, r"out_shardings .* does not match the structure of the outputs", None),
    ("out_shardings axis", lambda: spmd.jit(lambda x: x, in_shardings=NS(), out_shardings=P("nope")),
     (X,), ShardingError, r"out_shardings for output 0.*'nope'", MESH),
    ("mesh mismatch", lambda: spmd.jit(lambda x, y: x + y, in_shardings=(NS("data"), NamedSharding(OTHER, P("data")))),
     (X, X), ShardingError, r"args\[1\] is on mesh .* but args\[0\]", None),
    ("contradicting constraints", lambda: spmd.jit(
        lambda x: spmd.with_sharding_constraint(x, NS("data")) + spmd.with_sharding_constraint(x, NS("model")),
        in_shardings=NS()), (X,), ShardingError, r"contradicting shardings P\('data'\) and P\('model'\)", None),
    ("no mesh", lambda: spmd.jit(lambda x: x, in_shardings=P("data")), (X,), ShardingError,
     r"needs a mesh", None),
]


@pytest.mark.parametrize("row", ERRORS, ids=[r[0] for r in ERRORS])
def test_errors(row):
    _, make, args, exc, pattern, mesh = row
    if mesh is not None:
        with spmd.set_mesh(mesh):
            with pytest.raises(exc, match=pattern):
                make()(*args)
    else:
        with pytest.raises(exc, match=pattern):
            make()(*args)


def test_mesh_mismatch_between_array_arguments():
    a = spmd.device_put(X, NS("data"))
    b = spmd.device_put(X, NamedSharding(OTHER, P("data")))
    f = spmd.jit(lambda x, y: x + y, out_shardings=NS())
    with pytest.raises(ShardingError, match=r"args\[1\] is on mesh"):
        f(a, b)


def test_shard_map_inside_sharded_jit_is_inlined():
    rowsum = spmd.shard_map(lambda b: spmd.psum(b.sum(axis=1), "model"), mesh=MESH,
                            in_specs=P("data", "model"), out_specs=P("data"))
    f = spmd.jit(lambda x: np.tanh(rowsum(2 * x)), in_shardings=NS("data", "model"))
    y = f(X)
    np.testing.assert_allclose(np.asarray(y), np.tanh((2 * X).sum(1)), rtol=1e-5)
    assert y.sharding.spec == P("data")
    assert kinds(f, X) == []                     # the user's psum is the only collective
    assert "psum[axes=(model,)" in f.lower(X).as_text()


def test_grad_through_with_sharding_constraint():
    def loss(w, x):
        h = spmd.with_sharding_constraint(np.tanh(x @ w), NS("data", "model"))
        return np.sum(h * h)
    f = spmd.jit(spmd.grad(loss), in_shardings=(NS(), NS("data")))
    g = f(W1, X)
    np.testing.assert_allclose(np.asarray(g), np.asarray(spmd.grad(loss)(W1, X)), rtol=1e-3, atol=1e-3)
    assert any(e.prim.name == "sharding_constraint" for e in f.lower(W1, X).compiled.program.eqns)


def test_plain_jit_follows_sharded_array_arguments():
    x = spmd.device_put(X, NS("data"))
    w = spmd.device_put(W1, NS(None, "model"))
    f = spmd.jit(lambda x, w: np.tanh(x @ w).sum(0))
    y = f(x, w)
    assert y.sharding.spec == P("model")          # propagated, as jax.jit does
    np.testing.assert_allclose(np.asarray(y), np.tanh(X @ W1).sum(0), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(f(X, W1)), np.tanh(X @ W1).sum(0), rtol=1e-4)  # host args: as before


def test_checkpointed_bodies_are_seen_through():
    def loss(w, x):
        layer = spmd.checkpoint(lambda w: np.tanh(x @ w))
        return np.sum(layer(w)) + np.sum(layer(2 * w))          # the same body twice
    f = spmd.jit(spmd.grad(loss), in_shardings=(NS(None, "model"), NS("data")))
    g = f(W1, X)
    np.testing.assert_allclose(np.asarray(g), np.asarray(spmd.grad(loss)(W1, X)), rtol=1e-3, atol=1e-3)
    assert g.sharding.spec == P(None, "model")
    assert kinds(f, W1, X) == ["psum(data)"]


def test_uneven_padding_is_silent_and_exact():
    import warnings
    x = rng.random(size=(6, 10)).astype(np.float32) + 1
    f = spmd.jit(lambda x: np.log(x) / x.sum(1, keepdims=True), in_shardings=NS("data", "model"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = f(x)
    np.testing.assert_allclose(np.asarray(y), np.log(x) / x.sum(1, keepdims=True), rtol=1e-5)
    assert [s.data.shape for s in y.addressable_shards][:2] == [(3, 3), (3, 3)]
    assert y.addressable_shards[3].data.shape == (3, 1)          # 10 = 3 + 3 + 3 + 1


# ---------------------------------------------------------------------------------------------
# one jit, one Lowered: the same views with and without shardings
# ---------------------------------------------------------------------------------------------

def _mlp(x, w1, w2):
    return np.tanh(x @ w1) @ w2


def test_lowered_means_the_same_with_and_without_shardings():
    plain = spmd.jit(_mlp).lower(X, W1, W2)
    sharded = spmd.jit(_mlp, in_shardings=(NS("data"), NS(None, "model"), NS("model"))).lower(X, W1, W2)
    # .program: the global program the function traced to, the same in both
    assert str(plain.program) == str(sharded.program)
    assert [a.shape for a in sharded.program.in_avals] == [X.shape, W1.shape, W2.shape]
    # .per_device_program: what runs; the compiler's output has per-device shapes
    assert plain.per_device_program is plain.program
    assert sharded.per_device_program is sharded.compiled.manual
    assert sharded.per_device_program.eqns[0].prim.name == "shard_map"
    # .as_text(): the global program first, then (when compiled) the per-device one
    assert plain.as_text().startswith("# global program (jit(_mlp)")
    assert sharded.as_text().startswith("# global program (jit(_mlp)")
    assert "# per-device program" in sharded.as_text()
    # .explain(): the collectives; nothing inserted without shardings
    assert "inserted nothing" in plain.explain() and plain.collectives() == []
    assert "psum(model)" in sharded.explain() and sharded.collectives() == [("psum", ("model",))]


def test_explain_lists_collectives_written_in_shard_map():
    f = spmd.jit(spmd.shard_map(lambda b: spmd.psum(b.sum(1), "model"), mesh=MESH,
                                in_specs=P("data", "model"), out_specs=P("data")))
    text = f.lower(X).explain()
    assert "inserted nothing" in text
    assert "1 collective written in shard_map bodies" in text and "psum(model)" in text


def test_core_hooks_are_all_filled_by_import_spmd():
    from spmd.core import Hooks, hooks
    for name in Hooks.__annotations__:
        getattr(hooks, name)          # an empty slot raises, naming the slot
