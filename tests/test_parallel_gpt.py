"""The GPT of ``examples/train_gpt.py`` (shrunk to test size) trained 20 steps with the recipes
of spmd.parallel gives the losses and parameters of one device, within 1e-5."""
import importlib.util
import os

import numpy as np
import pytest

import spmd
import spmd.optim as optim
from spmd import P, pmean, pvary, shard_map
from spmd.parallel import data
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
    step = GPT.make_recipe_step(recipe, GPT.recipe_mesh(recipe, 8), TX)
    state = TX.init(GPT.init_params())
    leaves = len(spmd.tree_util.tree_leaves(GPT.init_params()))
    x, y = _batches()[0]
    counts = [c.op for c in spmd.collectives_of(spmd.make_program(step)(
        GPT.init_params(), state, x, y))]
    # one gather per parameter, one reduce-scatter per gradient, and the loss's psum
    assert sorted(set(counts)) == ["all_gather", "psum", "psum_scatter"]
    assert (counts.count("all_gather"), counts.count("psum_scatter"),
            counts.count("psum")) == (leaves, leaves, 1)
    _assert_matches_one_device(*_train(step, GPT.init_params(), state))


def test_gpt_data_fsdp_tensor_pipeline_composition():
    """2 x 2 x 2: batch and parameter storage over ``data`` (DP + FSDP), one layer per pipeline
    stage over ``stage``, Megatron heads and FFN columns over ``model``."""
    recipe = "dp_fsdp_tp_pp"
    step = GPT.make_recipe_step(recipe, GPT.recipe_mesh(recipe, 8), TX)
    params = GPT.recipe_params(recipe, GPT.init_params())
    losses, params = _train(step, params, TX.init(params))
    expected_losses, expected = _expected()
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(spmd.tree_util.tree_leaves(params),
                    spmd.tree_util.tree_leaves(GPT.recipe_params(recipe, expected))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    wq = params["layers"]["wq"]                           # 1 of 2 layers, 1/2 rows, 1/2 heads
    assert wq.sharding.shard_shape(wq.shape) == (1, GPT.D_MODEL // 2, GPT.D_MODEL // 2)


def test_gpt_tensor_parallel_with_vocabulary_parallel_embedding_and_loss():
    """Megatron over 4 devices: heads and FFN columns split, and the vocabulary of the
    embedding and of the output logits split too (the logits are never gathered)."""
    step = GPT.make_recipe_step("tp_vocab", GPT.recipe_mesh("tp_vocab", 8), TX)
    _assert_matches_one_device(*_train(step, GPT.init_params(), TX.init(GPT.init_params())))
    logits_bytes = GPT.BATCH * GPT.SEQ * 256 // 4 * 4             # this device's logits
    x, y = _batches()[0]
    uses = spmd.collectives_of(spmd.make_program(step)(GPT.init_params(),
                                                       TX.init(GPT.init_params()), x, y))
    assert max(c.bytes_per_device for c in uses) < logits_bytes


def test_every_recipe_runs_from_the_command_line(capsys):
    """``--parallel <recipe>`` trains with spmd.optim's Adam: the same losses as the same
    recipe called directly, and as the hand-written shard_map of the example."""
    direct = GPT.train_recipe("fsdp", steps=3)
    for recipe in GPT.RECIPES:
        GPT.main(["--parallel", recipe, "--steps", "3", "--plot", os.devnull])
        assert f"spmd.parallel {recipe}" in capsys.readouterr().out
        assert GPT.train_recipe(recipe, steps=3) == pytest.approx(direct, rel=1e-5)
    assert GPT.train(spmd, np, "dp_tp", steps=3) == pytest.approx(direct, rel=1e-5)
