"""The recipes of spmd.parallel equal the unsharded model: losses, gradients and parameters
after training steps, with the collectives each recipe inserts counted."""
import collections
import os
import runpy
import tracemalloc

import numpy as np
import pytest

import spmd
import spmd.optim as optim
from spmd import P, _host_parallel, pmean, pvary, shard_map
from spmd.parallel import data, fsdp, pipeline, sequence, tensor, experts
from conftest import ROOT

D, LAYERS, BATCH, STEPS = 16, 3, 32, 20


def _mlp_params(seed=0, layers=LAYERS, d=D):
    rng = np.random.default_rng(seed)
    return [{"w": (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32),
             "b": (0.1 * rng.standard_normal(d)).astype(np.float32)} for _ in range(layers)]


def _batch(seed=1, batch=BATCH, d=D):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, d)).astype(np.float32),
            rng.standard_normal((batch, d)).astype(np.float32))


def _layer(p, h):
    return np.tanh(h @ p["w"] + p["b"])


def _loss(params, x, y):
    h = x
    for p in params:
        h = _layer(p, h)
    return np.mean((h - y) ** 2)


def _executed(program, times=1):
    """Counter of ``(op, axes)`` of the collectives one run of ``program`` issues: those in a
    ``scan`` body once per step."""
    out = collections.Counter()
    for e in program.eqns:
        if e.prim.rules.get("collective") not in (None, "none"):
            out[e.prim.name, tuple(e.params.get("axes", ()))] += times
        for sub in e.prim.subprograms(e.params):
            out += _executed(sub, times * (e.params["length"] if e.prim.name == "scan" else 1))
    return out


def _counts(program):
    """Counter of the ops of the collectives one run of ``program`` issues."""
    out = collections.Counter()
    for (op, _), n in _executed(program).items():
        out[op] += n
    return out


def _train(step, params, state, x, y, steps=STEPS):
    """``steps`` calls of ``step(params, state, x, y) -> (loss, params, state)``: the losses,
    the final parameters and the final state."""
    losses = []
    for _ in range(steps):
        loss, params, state = step(params, state, x, y)
        losses.append(float(np.asarray(loss)))
    return losses, params, state


def _reference_training(tx, params, x, y, steps=STEPS, loss_fn=None):
    """The unsharded model (``loss_fn``, default the MLP's) trained on one device: losses and
    final parameters."""
    @spmd.jit
    def step(params, state, x, y):
        loss, grads = spmd.value_and_grad(loss_fn or _loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return loss, optim.apply_updates(params, updates), state
    return _train(step, params, tx.init(params), x, y, steps)[:2]


def _assert_tree_close(a, b, tol=1e-5):
    la, lb = spmd.tree_util.tree_leaves(a), spmd.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=tol, atol=tol)


TX = optim.sgd(0.1, momentum=0.9)      # not scale-invariant: a wrong gradient scale shows


# ---- data parallelism ------------------------------------------------------------------------

def _data_parallel_step(bucket_bytes=None, compress=data.allreduce_hook):
    mesh = spmd.make_mesh((8,), ("data",))

    def train_step(params, state, x, y):
        loss, grads = spmd.value_and_grad(_loss)(pvary(params, "data"), x, y)
        grads = data.mean_gradients(grads, "data", bucket_bytes=bucket_bytes, compress=compress)
        updates, state = TX.update(grads, state, params)
        return pmean(loss, "data"), optim.apply_updates(params, updates), state
    return spmd.jit(shard_map(train_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                              out_specs=(P(), P(), P())))


@pytest.mark.parametrize("bucket_bytes,compress,psums", [
    (None, data.allreduce_hook, 2 * LAYERS),          # one psum per leaf
    (3 * (D * D + D) * 4, data.allreduce_hook, 1),    # all leaves in one bucket
    (2 * (D * D + D) * 4, data.allreduce_hook, 2),    # two layers, then one
])
def test_data_parallel_training_equals_one_device(bucket_bytes, compress, psums):
    x, y = _batch()
    step = _data_parallel_step(bucket_bytes, compress)
    params, state = _mlp_params(), TX.init(_mlp_params())
    counts = _counts(spmd.make_program(step)(params, state, x, y))
    assert counts == {"psum": psums + 1}          # the gradient buckets and the loss
    losses, params, state = _train(step, params, state, x, y)
    expected_losses, expected = _reference_training(TX, _mlp_params(), x, y)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    _assert_tree_close(params, expected)


@pytest.mark.parametrize("hook,tol", [(data.bf16_compress, 2e-2), (data.fp16_compress, 2e-3)])
def test_compression_hooks_halve_the_bytes_and_stay_close(hook, tol):
    mesh = spmd.make_mesh((8,), ("data",))
    x, y = _batch()

    def grads_of(compress):
        def body(params, x, y):
            grads = spmd.grad(_loss)(pvary(params, "data"), x, y)
            return data.mean_gradients(grads, "data", bucket_bytes=1 << 20, compress=compress)
        return shard_map(body, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
    exact, compressed = grads_of(data.allreduce_hook), grads_of(hook)
    [full] = spmd.collectives_of(spmd.make_program(exact)(_mlp_params(), x, y))
    [half] = spmd.collectives_of(spmd.make_program(compressed)(_mlp_params(), x, y))
    assert half.bytes_per_device * 2 == full.bytes_per_device
    _assert_tree_close(compressed(_mlp_params(), x, y), spmd.grad(_loss)(_mlp_params(), x, y),
                       tol=tol)
    _assert_tree_close(exact(_mlp_params(), x, y), spmd.grad(_loss)(_mlp_params(), x, y))


# ---- FSDP / ZeRO ---------------------------------------------------------------------------

def _fsdp_loss(shards, x, y):
    return pmean(np.mean((fsdp.fsdp_apply(_layer, shards, x, "data") - y) ** 2), "data")


def _fsdp_step(state):
    mesh = spmd.make_mesh((8,), ("data",))
    state_specs = fsdp.state_specs(state, "data")

    def train_step(shards, state, x, y):
        loss, grads = spmd.value_and_grad(_fsdp_loss)(shards, x, y)
        updates, state = TX.update(grads, state, shards)       # on the shards: no collective
        return loss, optim.apply_updates(shards, updates), state
    return spmd.jit(shard_map(train_step, mesh=mesh,
                              in_specs=(P("data"), state_specs, P("data"), P("data")),
                              out_specs=(P(), P("data"), state_specs)))


def test_fsdp_training_equals_one_device_with_one_gather_and_scatter_per_leaf():
    x, y = _batch()
    params = _mlp_params()
    state = TX.init(params)
    step = _fsdp_step(state)
    program = spmd.make_program(step)(params, state, x, y)
    # forward: one all_gather per leaf per layer (kept for the backward); backward: one
    # psum_scatter per leaf per layer; and the loss's psum
    assert _counts(program) == {"all_gather": 2 * LAYERS, "psum_scatter": 2 * LAYERS, "psum": 1}
    gathers = [c for c in spmd.collectives_of(program) if c.op == "all_gather"]
    assert sum(c.bytes_per_device for c in gathers) * 8 == sum(p.nbytes for p in
                                                               spmd.tree_util.tree_leaves(params))
    losses, params, state = _train(step, params, state, x, y)
    expected_losses, expected = _reference_training(TX, _mlp_params(), x, y)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    _assert_tree_close(params, expected)
    # parameters and optimizer state: 1/8 per device
    w = params[0]["w"]
    assert w.sharding.shard_shape(w.shape) == (D // 8, D)
    assert state[0].trace[0]["w"].sharding.spec == P("data")


def test_fsdp_keeps_one_eighth_of_parameters_and_state_per_device():
    x, y = _batch()
    measured = {}
    for name, step in (("dp", _data_parallel_step()), ("fsdp", _fsdp_step(TX.init(_mlp_params())))):
        _, params, state = step(_mlp_params(), TX.init(_mlp_params()), x, y)
        for device in range(8):       # bytes each device holds after a step, read off its shards
            held = sum(a.addressable_shards[device].data.nbytes
                       for a in spmd.tree_util.tree_leaves((params, state)))
            measured.setdefault(name, set()).add(held)
    [dp], [fsdp_bytes] = measured["dp"], measured["fsdp"]
    total = 2 * sum(p.nbytes for p in spmd.tree_util.tree_leaves(_mlp_params()))
    assert (dp, fsdp_bytes) == (total, total // 8)


def test_fsdp_prefetch_issues_the_next_gather_before_the_current_layer():
    mesh = spmd.make_mesh((8,), ("data",))
    x, y = _batch()
    f = shard_map(lambda s, x: fsdp.fsdp_apply(_layer, s, x, "data"), mesh=mesh,
                  in_specs=(P("data"), P("data")), out_specs=P("data"))
    program = spmd.make_program(f)(_mlp_params(), x)
    body = next(e.params["body"] for e in program.eqns if "body" in e.params)
    order = [("gather" if e.prim.name == "all_gather" else "compute") for e in body.eqns
             if e.prim.name in ("all_gather", "tanh")]
    # layer 0's and layer 1's parameters are gathered before layer 0's tanh, and so on
    assert order == ["gather"] * 4 + ["compute"] + ["gather"] * 2 + ["compute"] * 2
    np.testing.assert_allclose(np.asarray(f(_mlp_params(), x)),
                               np.asarray(spmd.jit(lambda p, x: _layer(p[2], _layer(p[1], _layer(
                                   p[0], x))))(_mlp_params(), x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stage,counts", [(1, {"psum": 2 * LAYERS + 1, "all_gather": 2 * LAYERS}),
                                          (2, {"psum_scatter": 2 * LAYERS, "psum": 1,
                                               "all_gather": 2 * LAYERS})])
def test_zero_training_equals_one_device(stage, counts):
    mesh = spmd.make_mesh((8,), ("data",))
    x, y = _batch()
    params = _mlp_params()
    state = TX.init(params)
    state_specs = fsdp.state_specs(state, "data")

    def train_step(params, state, x, y):
        loss, grads = spmd.value_and_grad(_loss)(pvary(params, "data"), x, y)
        params, state = fsdp.zero_update(TX, grads, state, params, "data", stage=stage)
        return pmean(loss, "data"), params, state
    step = spmd.jit(shard_map(train_step, mesh=mesh,
                              in_specs=(P(), state_specs, P("data"), P("data")),
                              out_specs=(P(), P(), state_specs)))
    assert _counts(spmd.make_program(step)(params, state, x, y)) == counts
    losses, params, state = _train(step, params, state, x, y)
    expected_losses, expected = _reference_training(TX, _mlp_params(), x, y)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    _assert_tree_close(params, expected)
    assert state[0].trace[1]["w"].sharding.shard_shape((D, D)) == (D // 8, D)


# ---- tensor parallelism ----------------------------------------------------------------------

def _tp_params(seed=2, layers=2, d=D, hidden=4 * D):
    rng = np.random.default_rng(seed)
    return [{"w1": (rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32),
             "b1": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
             "w2": (rng.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32),
             "b2": (0.1 * rng.standard_normal(d)).astype(np.float32)} for _ in range(layers)]


TP_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model"), "b2": P()}


def _tp_loss(params, x, y):
    for p in params:
        h = np.tanh(tensor.column_parallel_linear(x, p["w1"], p["b1"]))
        x = x + tensor.row_parallel_linear(h, p["w2"], "model", p["b2"])
    return np.mean((x - y) ** 2)


def _dense_loss(params, x, y):
    for p in params:
        x = x + np.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return np.mean((x - y) ** 2)


def test_tensor_parallel_times_data_parallel_training_equals_one_device():
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    x, y = _batch()
    params = _tp_params()
    specs = [TP_SPECS] * len(params)

    def train_step(params, state, x, y):
        loss, grads = spmd.value_and_grad(_tp_loss)(pvary(params, "data"), x, y)
        grads = data.mean_gradients(grads, "data", bucket_bytes=1 << 20)
        updates, state = TX.update(grads, state, params)
        return pmean(loss, "data"), optim.apply_updates(params, updates), state
    state = TX.init(params)
    state_specs = (optim.TraceState(specs), optim.EmptyState())
    step = spmd.jit(shard_map(train_step, mesh=mesh,
                              in_specs=(specs, state_specs, P("data"), P("data")),
                              out_specs=(P(), specs, state_specs)))
    uses = spmd.collectives_of(spmd.make_program(step)(params, state, x, y))
    over_model = [c.op for c in uses if c.axes == ("model",)]
    # forward: one psum per block (row-parallel); backward: one per block for the gradient of
    # its input, except the first block's input (the data, not differentiated)
    assert over_model == ["psum"] * (2 * len(params) - 1)
    # each moves one (local batch, d) activation: the textbook all-reduce per block and pass
    assert {c.bytes_per_device for c in uses if c.axes == ("model",)} == {BATCH // 2 * D * 4}
    # the data axis: one bucket of gradients split over "model", one of replicated ones, the loss
    assert collections.Counter(c.op for c in uses if c.axes == ("data",)) == {"psum": 3}
    losses, params, state = _train(step, params, state, x, y)
    expected_losses, expected = _reference_training(TX, _tp_params(), x, y,
                                                    loss_fn=_dense_loss)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    _assert_tree_close(params, expected)
    assert params[0]["w1"].sharding.shard_shape((D, 4 * D)) == (D, D)


V, S = 32, 8


def _lm_params(seed=3):
    rng = np.random.default_rng(seed)
    return {"embed": rng.standard_normal((V, D)).astype(np.float32),
            "out": (rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32)}


def _lm_batch(seed=4, batch=4):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (batch, S)), rng.integers(0, V, (batch, S))


def test_vocab_parallel_embedding_and_cross_entropy_equal_the_dense_ones():
    mesh = spmd.make_mesh((4,), ("model",))
    ids, labels = _lm_batch()

    def sharded(p, ids, labels):
        h = np.tanh(tensor.vocab_parallel_embedding(ids, p["embed"], "model"))
        logits = tensor.column_parallel_linear(h, p["out"])      # split over the vocabulary
        return np.mean(tensor.vocab_parallel_cross_entropy(logits, labels, "model"))

    def dense(p, ids, labels):
        logits = np.tanh(p["embed"][ids]) @ p["out"]
        top = np.max(logits, axis=-1, keepdims=True)
        lse = np.log(np.sum(np.exp(logits - top), axis=-1)) + top[..., 0]
        return np.mean(lse - np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0])
    f = shard_map(spmd.value_and_grad(sharded), mesh=mesh,
                  in_specs=({"embed": P("model"), "out": P(None, "model")}, P(), P()),
                  out_specs=(P(), {"embed": P("model"), "out": P(None, "model")}))
    loss, grads = f(_lm_params(), ids, labels)
    expected_loss, expected_grads = spmd.value_and_grad(dense)(_lm_params(), ids, labels)
    np.testing.assert_allclose(float(np.asarray(loss)), float(np.asarray(expected_loss)),
                               rtol=1e-6)
    _assert_tree_close(grads, expected_grads)
    counts = _counts(spmd.make_program(f)(_lm_params(), ids, labels))
    # forward: embedding psum, pmax, two psums of per-token values; backward: the psum of the
    # hidden state's gradient (replicated h meets the split output weight)
    assert counts == {"psum": 4, "pmax": 1}


# ---- sequence parallelism --------------------------------------------------------------------

def _qkv(seed=5, batch=2, heads=8, seq=32, head_dim=4):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32)
                 for _ in range(3))


def _attention_loss(attend):
    weights = np.linspace(-1, 1, 4, dtype=np.float32)
    return lambda q, k, v: np.sum(np.tanh(attend(q, k, v)) * weights)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("recipe,forward,backward", [
    ("ring", {"ppermute": 7}, {"ppermute": 7}),              # n - 1 each way
    ("ulysses", {"all_to_all": 2}, {"all_to_all": 2}),
])
def test_sequence_parallel_attention_equals_attention(recipe, forward, backward, causal):
    mesh = spmd.make_mesh((8,), ("seq",))
    q, k, v = _qkv()
    attend = {"ring": sequence.ring_attention, "ulysses": sequence.ulysses_attention}[recipe]
    local = lambda q, k, v: attend(q, k, v, "seq", causal=causal)
    spec = P(None, None, "seq")
    f = shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
    reference = lambda q, k, v: sequence.attention(q, k, v, causal=causal)
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(spmd.jit(reference)(q, k, v)),
                               rtol=1e-5, atol=1e-6)
    grads = shard_map(spmd.grad(lambda q, k, v: spmd.psum(_attention_loss(local)(q, k, v), "seq"),
                                argnums=(0, 1, 2)),
                      mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3)
    expected = spmd.grad(_attention_loss(reference), argnums=(0, 1, 2))(q, k, v)
    _assert_tree_close(grads(q, k, v), expected)
    uses = spmd.collectives_of(spmd.make_program(f)(q, k, v))
    assert _counts(spmd.make_program(f)(q, k, v)) == forward
    # bytes per device: ring passes k and v blocks (2/8 of q's bytes); Ulysses moves q, k, v
    # in (3/8) and the output back (1/8)
    block = q.nbytes // 8
    assert [c.bytes_per_device for c in uses] == ([2 * block] * 7 if recipe == "ring"
                                                  else [3 * block, block])
    both = _counts(spmd.make_program(grads)(q, k, v))        # and the psum of the loss
    assert both == sum(map(collections.Counter, (forward, backward, {"psum": 1})),
                       collections.Counter())


def test_attention_reference_equals_numpy():
    q, k, v = (a.astype(np.float64) for a in _qkv())
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) / 2.0               # head_dim 4
    scores[..., ~np.tril(np.ones((32, 32), bool))] = -np.inf
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(np.asarray(spmd.jit(sequence.attention)(*_qkv())), expected,
                               rtol=1e-5, atol=1e-6)


def test_sequence_parallel_region_around_a_tensor_parallel_block():
    """Layer norm on sequence blocks, gather, column/row-parallel MLP, reduce-scatter back."""
    mesh = spmd.make_mesh((4,), ("model",))
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 8, D)).astype(np.float32)
    [p] = _tp_params(layers=1)

    def norm(x):
        mu = np.mean(x, axis=-1, keepdims=True)
        return (x - mu) / np.sqrt(np.mean((x - mu) ** 2, axis=-1, keepdims=True) + 1e-5)

    def sharded(p, x):                                       # x: (batch, seq / 4, d)
        h = sequence.gather_sequence(norm(x), "model", axis=1)
        h = np.tanh(tensor.column_parallel_linear(h, p["w1"], p["b1"]))
        return x + tensor.row_parallel_linear(h, p["w2"], "model", scatter_dimension=1)

    def dense(p, x):
        return x + np.tanh(norm(x) @ p["w1"] + p["b1"]) @ p["w2"]
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model"), "b2": P()}
    f = shard_map(sharded, mesh=mesh, in_specs=(specs, P(None, "model")),
                  out_specs=P(None, "model"))
    np.testing.assert_allclose(np.asarray(f(p, x)), np.asarray(spmd.jit(dense)(p, x)),
                               rtol=1e-5, atol=1e-5)
    assert _counts(spmd.make_program(f)(p, x)) == {"all_gather": 1, "psum_scatter": 1}
    g = shard_map(spmd.grad(lambda p, x: spmd.psum(np.sum(np.sin(sharded(p, x))), "model")),
                  mesh=mesh, in_specs=(specs, P(None, "model")), out_specs=specs)
    expected = spmd.grad(lambda p, x: np.sum(np.sin(dense(p, x))))(p, x)
    _assert_tree_close(g(p, x), expected)


# ---- expert parallelism ----------------------------------------------------------------------

EXPERTS, TOKENS = 16, 8                                     # per device: 2 experts, 8 tokens


def _moe_params(seed=7, d=D, hidden=8):
    rng = np.random.default_rng(seed)
    return {"router": rng.standard_normal((d, EXPERTS)).astype(np.float32),
            "w1": (rng.standard_normal((EXPERTS, d, hidden)) / np.sqrt(d)).astype(np.float32),
            "w2": (rng.standard_normal((EXPERTS, hidden, d)) / np.sqrt(hidden)).astype(np.float32)}


def _expert_fn(p, slots):                                   # (local experts, slots, d)
    return np.einsum("ech,ehd->ecd", np.tanh(np.einsum("ecd,edh->ech", slots, p["w1"])), p["w2"])


MOE_SPECS = {"router": P(), "w1": P("expert"), "w2": P("expert")}


def _moe_sharded(k, capacity_factor):
    def local(p, x):
        y, balance = experts.moe(x, p["router"], {"w1": p["w1"], "w2": p["w2"]}, _expert_fn,
                                 "expert", k=k, capacity_factor=capacity_factor)
        return y, balance
    mesh = spmd.make_mesh((8,), ("expert",))
    return shard_map(local, mesh=mesh, in_specs=(MOE_SPECS, P("expert")),
                     out_specs=(P("expert"), P()))


def _moe_dense(p, x, k):
    """Every expert on every token, weighted by the router's top-k probabilities (no dropping)."""
    logits = x @ p["router"]
    probs = np.exp(logits - np.max(logits, axis=-1, keepdims=True))
    probs = probs / np.sum(probs, axis=-1, keepdims=True)
    kth = np.sort(probs, axis=-1)[:, -k][:, None]
    weights = np.where(probs >= kth, probs, np.zeros_like(probs))
    every = np.einsum("teh,ehd->ted", np.tanh(np.einsum("td,edh->teh", x, p["w1"])), p["w2"])
    return np.einsum("te,ted->td", weights, every)


@pytest.mark.parametrize("k", [1, 2])
def test_moe_without_dropping_equals_the_dense_mixture(k):
    x = np.random.default_rng(8).standard_normal((8 * TOKENS, D)).astype(np.float32)
    f = _moe_sharded(k, capacity_factor=EXPERTS / k)        # room for every token
    y, balance = f(_moe_params(), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(spmd.jit(_moe_dense, static_argnums=2)(
        _moe_params(), x, k)), rtol=1e-5, atol=1e-6)
    loss = lambda p, x: np.sum(np.sin(f(p, x)[0]))
    dense_loss = lambda p, x: np.sum(np.sin(_moe_dense(p, x, k)))
    _assert_tree_close(spmd.grad(loss)(_moe_params(), x), spmd.grad(dense_loss)(_moe_params(), x))
    # Switch's balance loss over the global batch
    logits = x @ _moe_params()["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    fraction = np.bincount(np.argmax(probs, -1), minlength=EXPERTS) / len(x)
    np.testing.assert_allclose(float(np.asarray(balance)),
                               EXPERTS * np.sum(fraction * probs.mean(0)), rtol=1e-5)
    counts = _counts(spmd.make_program(f)(_moe_params(), x))
    assert counts == {"all_to_all": 2, "psum": 2}


def test_moe_drops_tokens_beyond_capacity():
    """Capacity 1 per expert per device: the first token routed to an expert on each device
    gets it; the others pass through as zeros."""
    x = np.random.default_rng(9).standard_normal((8 * TOKENS, D)).astype(np.float32)
    p = _moe_params()
    y = np.asarray(_moe_sharded(1, capacity_factor=EXPERTS / TOKENS / 4)(p, x)[0])
    dense = np.asarray(spmd.jit(_moe_dense, static_argnums=2)(p, x, 1))
    choice = np.argmax(x @ p["router"], axis=-1).reshape(8, TOKENS)
    kept = np.zeros((8, TOKENS), bool)
    for device in range(8):
        for e in np.unique(choice[device]):
            kept[device, np.flatnonzero(choice[device] == e)[0]] = True
    kept = kept.reshape(-1)
    assert 0 < kept.sum() < len(kept)
    np.testing.assert_allclose(y[kept], dense[kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[~kept], 0)


# ---- pipeline parallelism --------------------------------------------------------------------

@pytest.mark.parametrize("stages,microbatches", [(4, 4), (8, 2)])
def test_gpipe_equals_the_sequential_model(stages, microbatches):
    mesh = spmd.make_mesh((stages,), ("stage",))
    layers = _mlp_params(layers=stages)
    stacked = {k: np.stack([p[k] for p in layers]) for k in ("w", "b")}
    x, y = _batch()
    mbs, targets = (a.reshape(microbatches, -1, D) for a in (x, y))

    def local_loss(p, mbs, targets):
        out = pipeline.gpipe(_layer, {k: v[0] for k, v in p.items()}, mbs, "stage")
        return np.mean((out - targets) ** 2)
    f = shard_map(spmd.value_and_grad(local_loss), mesh=mesh,
                  in_specs=(P("stage"), P(), P()), out_specs=(P(), P("stage")))
    loss, grads = f(stacked, mbs, targets)
    expected_loss, expected = spmd.value_and_grad(_loss)(layers, x, y)
    np.testing.assert_allclose(float(np.asarray(loss)), float(np.asarray(expected_loss)),
                               rtol=1e-6)
    _assert_tree_close(grads, {k: np.stack([g[k] for g in expected]) for k in ("w", "b")})
    ticks = microbatches + stages - 1
    counts = _counts(spmd.make_program(f)(stacked, mbs, targets))
    assert counts == {"ppermute": 2 * ticks, "psum": 1}      # one per tick, forward and back
    forward, backward = pipeline.schedule(stages, microbatches)
    assert forward.shape == backward.shape == (stages, 2 * ticks)
    for table in (forward, backward):          # every stage runs every microbatch once each way
        assert all(sorted(row[row >= 0]) == list(range(microbatches)) for row in table)
    assert pipeline.bubble_fraction(forward, backward) == pytest.approx((stages - 1) / ticks)


# ---- composition: DP x FSDP x TP x PP on 2 x 2 x 2 ---------------------------------------

def test_data_fsdp_tensor_pipeline_composition_trains_like_one_device():
    """Two pipeline stages, each a tensor-parallel block whose parameters are stored split over
    the data axis (FSDP) while the batch is split over it too (DP)."""
    mesh = spmd.make_mesh((2, 2, 2), ("data", "stage", "model"))
    blocks = _tp_params(layers=2)
    stacked = {k: np.stack([b[k] for b in blocks]) for k in blocks[0]}
    specs = {"w1": P("stage", "data", "model"), "b1": P("stage", ("model", "data")),
             "w2": P("stage", ("model", "data")), "b2": P("stage", "data")}
    x, y = _batch()
    microbatches = 2

    def block(p, h):
        h1 = np.tanh(tensor.column_parallel_linear(h, p["w1"], p["b1"]))
        return h + tensor.row_parallel_linear(h1, p["w2"], "model", p["b2"])

    def local_loss(shards, x, y):
        params = fsdp.gather_params({k: v[0] for k, v in shards.items()}, "data")
        out = pipeline.gpipe(block, params, x.reshape(microbatches, -1, D), "stage")
        return pmean(np.mean((out.reshape(y.shape) - y) ** 2), "data")

    def train_step(shards, state, x, y):
        loss, grads = spmd.value_and_grad(local_loss)(shards, x, y)
        updates, state = TX.update(grads, state, shards)
        return loss, optim.apply_updates(shards, updates), state
    state = TX.init(stacked)
    state_specs = (optim.TraceState(specs), optim.EmptyState())
    step = spmd.jit(shard_map(train_step, mesh=mesh,
                              in_specs=(specs, state_specs, P("data"), P("data")),
                              out_specs=(P(), specs, state_specs)))
    by_axis = _executed(spmd.make_program(step)(stacked, state, x, y))
    ticks = microbatches + 1
    assert by_axis == {("all_gather", ("data",)): 4, ("psum_scatter", ("data",)): 4,   # FSDP
                       # TP: the row-parallel psum per tick, and the input gradient's psum
                       # per tick except the first (whose input is data, not differentiated)
                       ("psum", ("model",)): 2 * ticks - 1,
                       ("ppermute", ("stage",)): 2 * ticks, ("psum", ("stage",)): 1,
                       ("psum", ("data",)): 1}                                          # loss
    losses, stacked, state = _train(step, stacked, state, x, y)
    expected_losses, expected = _reference_training(TX, _tp_params(layers=2), x, y,
                                                    loss_fn=_dense_loss)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)
    _assert_tree_close(stacked, {k: np.stack([b[k] for b in expected]) for k in specs})
    assert stacked["w1"].sharding.shard_shape(stacked["w1"].shape) == (1, D // 2, 2 * D)


def test_train_fsdp_example_matches_one_device(capsys):
    main = runpy.run_path(os.path.join(ROOT, "examples", "train_fsdp.py"))["main"]
    assert main() < 1e-5
    out = capsys.readouterr().out
    assert "psum_scatter" in out and "each device holds (4, 32)" in out


@pytest.mark.parametrize("stages,microbatches", [(4, 8), (2, 2)])
def test_one_f_one_b_equals_the_sequential_model(stages, microbatches):
    mesh = spmd.make_mesh((stages,), ("stage",))
    layers = _mlp_params(layers=stages)
    stacked = {k: np.stack([p[k] for p in layers]) for k in ("w", "b")}
    x, y = _batch()
    mbs, targets = (a.reshape(microbatches, -1, D) for a in (x, y))

    def local(p, mbs, targets):
        loss, grads = pipeline.one_f_one_b(_layer, {k: v[0] for k, v in p.items()}, mbs, targets,
                                           lambda out, t: np.mean((out - t) ** 2), "stage")
        return loss, {k: v[None] for k, v in grads.items()}
    f = shard_map(local, mesh=mesh, in_specs=(P("stage"), P(), P()),
                  out_specs=(P(), P("stage")))
    loss, grads = f(stacked, mbs, targets)
    expected_loss, expected = spmd.value_and_grad(_loss)(layers, x, y)
    np.testing.assert_allclose(float(np.asarray(loss)), float(np.asarray(expected_loss)),
                               rtol=1e-6)
    _assert_tree_close(grads, {k: np.stack([g[k] for g in expected]) for k in ("w", "b")})
    ticks = microbatches + 2 * stages - 2
    assert _counts(spmd.make_program(f)(stacked, mbs, targets)) == {
        "ppermute": 2 * ticks, "psum": 1}
    forward, backward = pipeline.schedule(stages, microbatches, "1f1b")
    for table in (forward, backward):
        assert all(sorted(row[row >= 0]) == list(range(microbatches)) for row in table)
    # a backward never comes before its forward on a stage, nor before the next stage's
    first = lambda table, s, i: int(np.flatnonzero(table[s] == i)[0])
    for s in range(stages):
        for i in range(microbatches):
            assert first(forward, s, i) < first(backward, s, i)
            if s + 1 < stages:
                assert first(backward, s + 1, i) < first(backward, s, i)
    # lock-step ticks hold a forward and a backward: idle time (2p - 2) / (m + 2p - 2)
    assert pipeline.bubble_fraction(forward, backward) == pytest.approx(
        (2 * stages - 2) / ticks)


def _chunked(layers, stages, chunks):
    """Model stage ``c * p + s`` as chunk ``c`` of stage ``s``: leaves ``(p, v, ...)``."""
    return {k: np.stack([np.stack([layers[c * stages + s][k] for c in range(chunks)])
                         for s in range(stages)]) for k in ("w", "b")}


@pytest.mark.parametrize("stages,chunks,microbatches", [(4, 2, 8), (2, 3, 4)])
def test_interleaved_one_f_one_b_equals_the_sequential_model(stages, chunks, microbatches):
    mesh = spmd.make_mesh((stages,), ("stage",))
    layers = _mlp_params(layers=stages * chunks)
    x, y = _batch()
    mbs, targets = (a.reshape(microbatches, -1, D) for a in (x, y))

    def local(p, mbs, targets):
        loss, grads = pipeline.one_f_one_b(_layer, {k: v[0] for k, v in p.items()}, mbs, targets,
                                           lambda out, t: np.mean((out - t) ** 2), "stage",
                                           chunks=chunks)
        return loss, {k: v[None] for k, v in grads.items()}
    f = shard_map(local, mesh=mesh, in_specs=(P("stage"), P(), P()),
                  out_specs=(P(), P("stage")))
    stacked = _chunked(layers, stages, chunks)
    loss, grads = f(stacked, mbs, targets)
    expected_loss, expected = spmd.value_and_grad(_loss)(layers, x, y)
    np.testing.assert_allclose(float(np.asarray(loss)), float(np.asarray(expected_loss)),
                               rtol=1e-6)
    _assert_tree_close(grads, _chunked(expected, stages, chunks))
    ticks = microbatches * chunks + stages * chunks + stages - 2
    assert _counts(spmd.make_program(f)(stacked, mbs, targets)) == {
        "ppermute": 2 * ticks, "psum": 1}
    forward, backward = pipeline.schedule(stages, microbatches, "interleaved", chunks=chunks)
    fchunk, bchunk = pipeline.schedule_chunks(stages, microbatches, chunks)
    assert forward.shape == fchunk.shape == (stages, 2 * ticks)
    # each stage runs each (microbatch, chunk) once each way, a backward after its forward,
    # and a model stage after the one before it (forward) or after it (backward)
    when = {}
    for name, table, chunk in (("f", forward, fchunk), ("b", backward, bchunk)):
        for s, unit in zip(*np.nonzero(table >= 0)):
            key = (name, int(table[s, unit]), int(chunk[s, unit]) * stages + int(s))
            assert key not in when
            when[key] = unit
    assert len(when) == 2 * microbatches * chunks * stages
    for i in range(microbatches):
        for j in range(stages * chunks):
            assert when["f", i, j] < when["b", i, j]
            if j + 1 < stages * chunks:
                assert when["f", i, j] < when["f", i, j + 1]
                assert when["b", i, j + 1] < when["b", i, j]
    assert pipeline.bubble_fraction(forward, backward) == pytest.approx(
        (stages * chunks + stages - 2) / ticks)
    # below plain 1F1B's (2p - 2) / (m + 2p - 2) by (p - 2)(v - 1) > 0: equal on two stages
    plain = pipeline.bubble_fraction(*pipeline.schedule(stages, microbatches, "1f1b"))
    interleaved = pipeline.bubble_fraction(forward, backward)
    assert interleaved < plain if stages > 2 else interleaved == pytest.approx(plain)


@pytest.mark.parametrize("kind,stages,chunks,microbatches",
                         [("gpipe", 4, 1, 4), ("1f1b", 4, 1, 8), ("1f1b", 2, 1, 3),
                          ("interleaved", 4, 2, 8), ("interleaved", 2, 3, 2)])
def test_bubble_measured_on_the_executor_equals_the_schedule(kind, stages, chunks,
                                                             microbatches):
    """Every device runs the stage function at every tick, on zeros where the schedule has it
    idle: a debug callback in the stage function sees, per device, which calls did work."""
    calls = collections.defaultdict(list)

    def record(stage, x):
        calls[int(stage)].append(bool(np.any(x != 0)))

    def stage_fn(w, x):
        spmd.debug.callback(record, spmd.axis_index("stage"), x)
        return np.tanh(x * w)
    mesh = spmd.make_mesh((stages,), ("stage",))
    mbs = (np.arange(1, microbatches + 1, dtype=np.float32)[:, None, None]
           * np.ones((microbatches, 2, D), np.float32))
    weights = np.ones((stages, chunks, D), np.float32)

    def body(w, mbs):
        if kind == "gpipe":
            return np.sum(pipeline.gpipe(stage_fn, w[0, 0], mbs, "stage"))
        return pipeline.one_f_one_b(stage_fn, w[0] if chunks > 1 else w[0, 0], mbs, mbs,
                                    lambda out, t: np.mean(out * t), "stage", chunks=chunks)[0]
    shard_map(body, mesh=mesh, in_specs=(P("stage"), P()), out_specs=P())(weights, mbs)
    assert sorted(calls) == list(range(stages))
    measured = 1 - np.mean([np.mean(c) for c in calls.values()])
    if kind == "gpipe":     # the forward ticks (the backward is their transpose, reversed)
        assert all(len(c) == microbatches + stages - 1 for c in calls.values())
        assert measured == pytest.approx((stages - 1) / (microbatches + stages - 1))
    forward, backward = pipeline.schedule(stages, microbatches, kind, chunks=chunks)
    assert measured == pytest.approx(pipeline.bubble_fraction(forward, backward))


def test_one_f_one_b_holds_less_activation_memory_than_gpipe():
    """Peak host memory of one step on the executor (tracemalloc sees every NumPy buffer): GPipe
    keeps all 16 microbatches' activations for the backward, 1F1B at most 2p - 1 inputs."""
    stages, microbatches, rows = 4, 16, 256
    mesh = spmd.make_mesh((stages,), ("stage",))
    stacked = {k: np.stack([p[k] for p in _mlp_params(layers=stages)]) for k in ("w", "b")}
    rng = np.random.default_rng(10)
    mbs, targets = (rng.standard_normal((microbatches, rows, D)).astype(np.float32)
                    for _ in range(2))
    mse = lambda out, t: np.mean((out - t) ** 2)

    def gpipe_step(p, mbs, targets):
        return spmd.value_and_grad(lambda p: mse(pipeline.gpipe(
            _layer, {k: v[0] for k, v in p.items()}, mbs, "stage"), targets))(p)

    def one_f_one_b_step(p, mbs, targets):
        loss, grads = pipeline.one_f_one_b(_layer, {k: v[0] for k, v in p.items()}, mbs,
                                           targets, mse, "stage")
        return loss, {k: v[None] for k, v in grads.items()}
    peaks, results = {}, {}
    for name, body in (("gpipe", gpipe_step), ("1f1b", one_f_one_b_step)):
        step = spmd.jit(shard_map(body, mesh=mesh, in_specs=(P("stage"), P(), P()),
                                  out_specs=(P(), P("stage"))))
        step(stacked, mbs, targets)                               # compile outside the count
        _host_parallel.release_pool()             # buffers made in the count, not before it
        tracemalloc.start()
        results[name] = step(stacked, mbs, targets)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    _assert_tree_close(results["1f1b"], results["gpipe"])
    assert peaks["1f1b"] < peaks["gpipe"] / 2, peaks


def test_errors_name_the_recipe_the_axis_and_the_fix():
    mesh = spmd.make_mesh((8,), ("seq",))
    q = np.zeros((1, 4, 16, 2), np.float32)               # 4 heads over 8 devices
    with pytest.raises(ValueError, match=r"ulysses_attention over axis 'seq': 4 heads .*ring_"):
        shard_map(lambda q: sequence.ulysses_attention(q, q, q, "seq"), mesh=mesh,
                  in_specs=P(None, None, "seq"), out_specs=P(None, None, "seq"))(q)
    def widen(p, x):
        return np.concatenate([x, x], axis=-1)
    with pytest.raises(ValueError, match=r"gpipe over axis 'seq': stage function .*widen"):
        shard_map(lambda x: pipeline.gpipe(widen, None, x, "seq"), mesh=mesh, in_specs=P(),
                  out_specs=P())(np.zeros((2, 3, 4), np.float32))
    params = _moe_params()
    with pytest.raises(ValueError, match=r"moe over axis 'seq': 12 experts .* divisible by 8"):
        shard_map(lambda x: experts.moe(x, np.zeros((D, 12), np.float32), params, _expert_fn,
                                        "seq"), mesh=mesh, in_specs=P("seq"),
                  out_specs=(P("seq"), P()))(np.zeros((64, D), np.float32))
    with pytest.raises(ValueError, match=r"ZeRO over axis 'seq': .* \(12,\) does not split"):
        shard_map(lambda g: fsdp.zero_update(TX, g, TX.init(np.zeros(12, np.float32)),
                                             np.zeros(12, np.float32), "seq"),
                  mesh=mesh, in_specs=P(), out_specs=P())(np.zeros(12, np.float32))


def test_pipeline_schedule_picture(tmp_path):
    main = runpy.run_path(os.path.join(ROOT, "examples", "pipeline_schedule.py"))["main"]
    fractions = main(str(tmp_path / "schedule.png"))
    assert fractions == {"gpipe": pytest.approx(3 / 11), "1f1b": pytest.approx(6 / 14),
                         "interleaved": pytest.approx(10 / 26)}
    assert (tmp_path / "schedule.png").stat().st_size > 10_000
