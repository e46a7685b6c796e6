"""The GPT of ``examples/train_gpt.py`` (shrunk to test size) trained 20 steps with the recipes
of spmd.parallel gives the losses and parameters of one device, within 1e-5."""
import importlib.util
import os

import numpy as np
import pytest

import spmd
import spmd.optim as optim
from spmd import P, pmean, pvary, shard_map
from spmd.parallel import data, fsdp, pipeline, tensor
from conftest import ROOT

STEPS = 20


def _load_gpt():
    spec = importlib.util.spec_from_file_location(
        "train_gpt_small", os.path.join(ROOT, "examples", "train_gpt.py"))
    gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpt)
    # the same model, small: 2 layers of width 32, 4 heads, 16 bytes of context, batch 16
    for name, value in dict(D_MODEL=32, HEADS=4, HEAD_DIM=8, SEQ=16, BATCH=16, FFN=64).items():
        setattr(gpt, name, value)
    return gpt


GPT = _load_gpt()
TX = optim.adam(1e-2, b1=0.9, b2=0.99)


def _batches():
    data_iter = GPT.batches(0)
    return [next(data_iter) for _ in range(STEPS)]


def _reference():
    """Losses and final parameters of the unsharded GPT on one device."""
    @spmd.jit
    def step(params, state, x, y):
        loss, grads = spmd.value_and_grad(lambda p: GPT.loss_fn(np, p, x, y))(params)
        updates, state = TX.update(grads, state, params)
        return loss, optim.apply_updates(params, updates), state
    params = GPT.init_params()
    state, losses = TX.init(params), []
    for x, y in _batches():
        loss, params, state = step(params, state, x, y)
        losses.append(float(np.asarray(loss)))
    return losses, params


_REFERENCE = []


def _expected():
    if not _REFERENCE:
        _REFERENCE.append(_reference())
    return _REFERENCE[0]


def _train(step, params, state):
    losses = []
    for x, y in _batches():
        loss, params, state = step(params, state, x, y)
        losses.append(float(np.asarray(loss)))
    return losses, params


def _assert_matches_one_device(losses, params):
    expected_losses, expected = _expected()
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(spmd.tree_util.tree_leaves(params), spmd.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert expected_losses[-1] < expected_losses[0] - 0.5         # it does learn


def _gpt_loss(params, x, y):
    return GPT.loss_fn(np, params, x, y)


def test_gpt_data_parallel():
    mesh = spmd.make_mesh((8,), ("data",))

    def train_step(params, state, x, y):
        loss, grads = spmd.value_and_grad(_gpt_loss)(pvary(params, "data"), x, y)
        grads = data.mean_gradients(grads, "data", bucket_bytes=1 << 16)
        updates, state = TX.update(grads, state, params)
        return pmean(loss, "data"), optim.apply_updates(params, updates), state
    step = spmd.jit(shard_map(train_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                              out_specs=(P(), P(), P())))
    _assert_matches_one_device(*_train(step, GPT.init_params(), TX.init(GPT.init_params())))


@pytest.mark.parametrize("recipe", ["fsdp", "zero2"])
def test_gpt_sharded_data_parallel(recipe):
    mesh = spmd.make_mesh((8,), ("data",))
    state = TX.init(GPT.init_params())
    state_specs = fsdp.state_specs(state, "data")

    def fsdp_step(shards, state, x, y):
        def loss(shards):
            return pmean(_gpt_loss(fsdp.gather_params(shards, "data"), x, y), "data")
        value, grads = spmd.value_and_grad(loss)(shards)
        updates, state = TX.update(grads, state, shards)
        return value, optim.apply_updates(shards, updates), state

    def zero_step(params, state, x, y):
        value, grads = spmd.value_and_grad(_gpt_loss)(pvary(params, "data"), x, y)
        params, state = fsdp.zero_update(TX, grads, state, params, "data", stage=2)
        return pmean(value, "data"), params, state
    param_spec = P("data") if recipe == "fsdp" else P()
    step = spmd.jit(shard_map(fsdp_step if recipe == "fsdp" else zero_step, mesh=mesh,
                              in_specs=(param_spec, state_specs, P("data"), P("data")),
                              out_specs=(P(), param_spec, state_specs)))
    leaves = len(spmd.tree_util.tree_leaves(GPT.init_params()))
    x, y = _batches()[0]
    counts = [c.op for c in spmd.collectives_of(spmd.make_program(step)(
        GPT.init_params(), state, x, y))]
    # one gather per parameter, one reduce-scatter per gradient, and the loss's psum
    assert sorted(set(counts)) == ["all_gather", "psum", "psum_scatter"]
    assert (counts.count("all_gather"), counts.count("psum_scatter"),
            counts.count("psum")) == (leaves, leaves, 1)
    _assert_matches_one_device(*_train(step, GPT.init_params(), state))


def _stacked(params):
    """The GPT's parameters with its layers stacked (one per pipeline stage)."""
    layers = params["layers"]
    return dict({k: v for k, v in params.items() if k != "layers"},
                layers={k: np.stack([layer[k] for layer in layers]) for k in layers[0]})


def test_gpt_data_fsdp_tensor_pipeline_composition():
    """2 x 2 x 2: batch and parameter storage over ``data`` (DP + FSDP), one layer per pipeline
    stage over ``stage``, Megatron heads and FFN columns over ``model``."""
    mesh = spmd.make_mesh((2, 2, 2), ("data", "stage", "model"))
    split_rows = P("stage", ("model", "data"))             # row-parallel, then stored over data
    layer_specs = dict(ln1_g=P("stage", "data"), ln1_b=P("stage", "data"), bo=P("stage", "data"),
                       wq=P("stage", "data", "model"), wk=P("stage", "data", "model"),
                       wv=P("stage", "data", "model"), wo=split_rows, ln2_g=P("stage", "data"),
                       ln2_b=P("stage", "data"), w1=P("stage", "data", "model"), b1=split_rows,
                       w2=split_rows, b2=P("stage", "data"))
    specs = dict(wte=P("data"), wpe=P("data"), lnf_g=P("data"), lnf_b=P("data"),
                 w_out=P("data"), layers=layer_specs)
    state_specs = (optim.ScaleByAdamState(P(), specs, specs), optim.EmptyState())

    def layer(p, h):                                      # one stage: a GPT block, Megatron TP
        psum = lambda a: spmd.psum(a, "model")
        h = h + psum(GPT.attention(np, GPT.layer_norm(np, h, p["ln1_g"], p["ln1_b"]), p)) + p["bo"]
        u = GPT.gelu(np, GPT.layer_norm(np, h, p["ln2_g"], p["ln2_b"]) @ p["w1"] + p["b1"])
        return h + psum(u @ p["w2"]) + p["b2"]

    def loss(shards, x, y):
        params = fsdp.gather_params(dict(shards, layers={k: v[0] for k, v in
                                                         shards["layers"].items()}), "data")
        h = params["wte"][x] + params["wpe"]
        h = pipeline.gpipe(layer, params["layers"], h.reshape((2, -1) + h.shape[1:]), "stage")
        logits = GPT.layer_norm(np, h.reshape((-1,) + h.shape[2:]), params["lnf_g"],
                                params["lnf_b"]) @ params["w_out"]
        top = np.max(logits, axis=-1, keepdims=True)
        log_z = np.log(np.sum(np.exp(logits - top), axis=-1)) + top[..., 0]
        picked = np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return pmean(np.mean(log_z - picked), "data")

    def train_step(shards, state, x, y):
        value, grads = spmd.value_and_grad(loss)(shards, x, y)
        updates, state = TX.update(grads, state, shards)
        return value, optim.apply_updates(shards, updates), state
    step = spmd.jit(shard_map(train_step, mesh=mesh,
                              in_specs=(specs, state_specs, P("data"), P("data")),
                              out_specs=(P(), specs, state_specs)))
    params = _stacked(GPT.init_params())
    losses, params = _train(step, params, TX.init(params))
    expected_losses, expected = _expected()
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(spmd.tree_util.tree_leaves(params),
                    spmd.tree_util.tree_leaves(_stacked(expected))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    wq = params["layers"]["wq"]                           # 1 of 2 layers, 1/2 rows, 1/2 heads
    assert wq.sharding.shard_shape(wq.shape) == (1, GPT.D_MODEL // 2, GPT.D_MODEL // 2)


def test_gpt_tensor_parallel_with_vocabulary_parallel_embedding_and_loss():
    """Megatron over 4 devices: heads and FFN columns split, and the vocabulary of the
    embedding and of the output logits split too (the logits are never gathered)."""
    mesh = spmd.make_mesh((4,), ("model",))
    col, row = P(None, "model"), P("model", None)
    layer = dict(ln1_g=P(), ln1_b=P(), wq=col, wk=col, wv=col, wo=row, bo=P(), ln2_g=P(),
                 ln2_b=P(), w1=col, b1=P("model"), w2=row, b2=P())
    specs = dict(wte=P("model"), wpe=P(), lnf_g=P(), lnf_b=P(), w_out=col,
                 layers=[layer] * len(GPT.init_params()["layers"]))
    state_specs = (optim.ScaleByAdamState(P(), specs, specs), optim.EmptyState())

    def loss(p, x, y):
        psum = lambda a: spmd.psum(a, "model")
        h = tensor.vocab_parallel_embedding(x, p["wte"], "model") + p["wpe"]
        for q in p["layers"]:
            a = GPT.attention(np, GPT.layer_norm(np, h, q["ln1_g"], q["ln1_b"]), q)
            h = h + psum(a) + q["bo"]
            u = GPT.gelu(np, tensor.column_parallel_linear(
                GPT.layer_norm(np, h, q["ln2_g"], q["ln2_b"]), q["w1"], q["b1"]))
            h = h + tensor.row_parallel_linear(u, q["w2"], "model", q["b2"])
        logits = tensor.column_parallel_linear(
            GPT.layer_norm(np, h, p["lnf_g"], p["lnf_b"]), p["w_out"])
        return np.mean(tensor.vocab_parallel_cross_entropy(logits, y, "model"))

    def train_step(params, state, x, y):
        value, grads = spmd.value_and_grad(loss)(params, x, y)
        updates, state = TX.update(grads, state, params)
        return value, optim.apply_updates(params, updates), state
    step = spmd.jit(shard_map(train_step, mesh=mesh, in_specs=(specs, state_specs, P(), P()),
                              out_specs=(P(), specs, state_specs)))
    _assert_matches_one_device(*_train(step, GPT.init_params(), TX.init(GPT.init_params())))
    logits_bytes = GPT.BATCH * GPT.SEQ * 256 // 4 * 4             # this device's logits
    x, y = _batches()[0]
    uses = spmd.collectives_of(spmd.make_program(step)(GPT.init_params(),
                                                       TX.init(GPT.init_params()), x, y))
    assert max(c.bytes_per_device for c in uses) < logits_bytes
