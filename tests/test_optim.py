"""spmd.optim against optax: the same gradients give the same updates and states, step after
step, eagerly, inside ``spmd.jit`` and with parameters and state sharded over a mesh."""
import functools

import jax
import ml_dtypes
import numpy as np
import optax
import pytest

import spmd
import spmd.optim as optim
from spmd import P, NamedSharding

SHAPES = {"w": (8, 16), "b": (16,), "k": (4, 6, 8)}
STEPS = 10


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(step):
    rng = np.random.default_rng(100 + step)
    return {k: (rng.standard_normal(s) * (3.0 if step % 3 == 0 else 0.1)).astype(np.float32)
            for k, s in SHAPES.items()}


def _pair(name, *args, **kwargs):
    return name, getattr(optim, name)(*args, **kwargs), getattr(optax, name)(*args, **kwargs)


WARMUP_COSINE = dict(init_value=0.0, peak_value=0.1, warmup_steps=3, decay_steps=8, end_value=0.01)
OPTIMIZERS = [
    _pair("sgd", 0.1),
    _pair("sgd", 0.1, momentum=0.9),
    _pair("sgd", 0.1, momentum=0.9, nesterov=True),
    _pair("adam", 1e-2),
    _pair("adam", 1e-2, b1=0.8, eps_root=1e-8, nesterov=True),
    _pair("adamw", 1e-2, weight_decay=0.1),
    _pair("lion", 1e-3, weight_decay=0.01),
    _pair("adafactor", 1e-2, min_dim_size_to_factor=4),
    _pair("adafactor", None, min_dim_size_to_factor=4, momentum=0.9, weight_decay_rate=0.01),
    ("clip+adamw(warmup_cosine)",
     optim.chain(optim.clip_by_global_norm(1.0),
                 optim.adamw(optim.warmup_cosine_decay_schedule(**WARMUP_COSINE))),
     optax.chain(optax.clip_by_global_norm(1.0),
                 optax.adamw(optax.warmup_cosine_decay_schedule(**WARMUP_COSINE)))),
    ("sgd(linear)", optim.sgd(optim.linear_schedule(0.1, 0.0, 6, transition_begin=2)),
     optax.sgd(optax.linear_schedule(0.1, 0.0, 6, transition_begin=2))),
    ("sgd(constant)", optim.sgd(optim.constant_schedule(0.05), momentum=0.5),
     optax.sgd(optax.constant_schedule(0.05), momentum=0.5)),
]
IDS = [f"{i}-{row[0]}" for i, row in enumerate(OPTIMIZERS)]


def _close(ours, theirs, rtol=2e-5, atol=1e-6):
    leaves_ours, leaves_theirs = spmd.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)
    assert len(leaves_ours) == len(leaves_theirs)
    for x, y in zip(leaves_ours, leaves_theirs):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol)


@functools.lru_cache(maxsize=None)
def _optax_run(tx):
    """optax's updates, parameters and final state over the same ``STEPS`` gradients."""
    return _run_optax(tx, _params())


def _run_optax(tx, params):
    state, update = tx.init(params), jax.jit(tx.update)
    out = []
    for step in range(STEPS):
        updates, state = update(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
        out.append((updates, params))
    return out, state


@pytest.mark.parametrize("name,ours,theirs", OPTIMIZERS, ids=IDS)
def test_updates_equal_optax_eagerly(name, ours, theirs):
    expected, expected_state = _optax_run(theirs)
    params = _params()
    state = ours.init(params)
    for step in range(STEPS):
        updates, state = ours.update(_grads(step), state, params)
        params = optim.apply_updates(params, updates)
        _close(updates, expected[step][0])
        _close(params, expected[step][1])
    _close(state, expected_state)


@pytest.mark.parametrize("name,ours,theirs", OPTIMIZERS[3:10], ids=IDS[3:10])
def test_updates_equal_optax_in_jit_with_sharded_state(name, ours, theirs):
    expected, expected_state = _optax_run(theirs)
    mesh = spmd.make_mesh((2, 4), ("data", "model"))
    specs = {"w": P("data", "model"), "b": P("model"), "k": P(None, "data")}
    params = {k: spmd.device_put(v, NamedSharding(mesh, specs[k])) for k, v in _params().items()}
    step_fn = spmd.jit(lambda g, s, p: (lambda u, s: (optim.apply_updates(p, u), s))(
        *ours.update(g, s, p)))
    state = spmd.jit(ours.init)(params)
    for step in range(STEPS):
        grads = {k: spmd.device_put(v, NamedSharding(mesh, specs[k]))
                 for k, v in _grads(step).items()}
        params, state = step_fn(grads, state, params)
        _close(params, expected[step][1])
    _close(state, expected_state)
    for k, p in params.items():      # state laid out like the parameters: 1/n per device
        assert p.sharding.spec == specs[k]
    moments = [s for s in state if isinstance(s, optim.ScaleByAdamState)]
    for m in moments:
        assert {k: v.sharding.spec for k, v in m.mu.items()} == specs


def test_schedules_equal_optax():
    pairs = [(optim.warmup_cosine_decay_schedule(**WARMUP_COSINE),
              optax.warmup_cosine_decay_schedule(**WARMUP_COSINE)),
             (optim.linear_schedule(1.0, 0.1, 5, 2), optax.linear_schedule(1.0, 0.1, 5, 2)),
             (optim.cosine_decay_schedule(2.0, 7, alpha=0.1, exponent=2.0),
              optax.cosine_decay_schedule(2.0, 7, alpha=0.1, exponent=2.0)),
             (optim.polynomial_schedule(1.0, 0.0, 2, 6), optax.polynomial_schedule(1.0, 0.0, 2, 6)),
             (optim.constant_schedule(0.3), optax.constant_schedule(0.3))]
    traced = spmd.jit(lambda c: [s(c) for s, _ in pairs])
    for count in range(12):
        got = traced(np.int32(count))
        for (ours, theirs), g in zip(pairs, got):
            np.testing.assert_allclose(float(ours(count)), float(theirs(count)), rtol=1e-6)
            np.testing.assert_allclose(float(np.asarray(g)), float(theirs(count)), rtol=1e-6)


def test_master_weights_keep_float32_copies_of_bfloat16_params():
    """bf16 parameters stay the rounding of float32 master copies that follow optax in float32."""
    bf16 = lambda tree: {k: v.astype(ml_dtypes.bfloat16) for k, v in tree.items()}
    f32 = lambda tree: {k: v.astype(np.float32) for k, v in tree.items()}
    reference, reference_state = f32(bf16(_params())), optax.adam(1e-3).init(f32(bf16(_params())))
    tx = optim.master_weights(optim.adam(1e-3))
    params = bf16(_params())
    state = tx.init(params)
    step_fn = spmd.jit(tx.update)
    for step in range(STEPS):
        grads = bf16(_grads(step))
        updates, state = step_fn(grads, state, params)
        params = optim.apply_updates(params, updates)
        steps, reference_state = optax.adam(1e-3).update(f32(grads), reference_state)
        reference = optax.apply_updates(reference, steps)
        _close(state.master, reference)
        for k in SHAPES:
            assert np.asarray(params[k]).dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(np.asarray(params[k]),
                                          np.asarray(state.master[k]).astype(ml_dtypes.bfloat16))


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_dynamic_loss_scale_skips_overflowing_steps():
    x = np.linspace(-1, 1, 16).astype(np.float16)

    def step(w, loss_scale, opt_state):
        grads = spmd.grad(lambda w: loss_scale.scale(np.sum((w * x) ** 2)))(w)
        grads = loss_scale.unscale(grads)
        finite = optim.all_finite(grads)
        updates, new_state = tx.update(grads, opt_state, w)
        w = optim.select_tree(finite, optim.apply_updates(w, updates), w)
        return w, loss_scale.adjust(finite), optim.select_tree(finite, new_state, opt_state)

    tx = optim.sgd(0.1)
    w = np.ones(16, np.float16)
    exact = w - 0.1 * (2 * w * x * x)
    # 2**20 overflows float16: the step is skipped and the scale halves until it fits
    loss_scale = optim.DynamicLossScale(np.float32(2.0 ** 20), period=3)
    run = spmd.jit(step)
    scales = []
    for _ in range(8):
        w_before = w
        w, loss_scale, _ = run(w, loss_scale, tx.init(w))
        scales.append(float(np.asarray(loss_scale.loss_scale)))
        if np.array_equal(np.asarray(w), np.asarray(w_before)):
            continue
        break
    # the largest gradient is 2 * scale: from 2**20 down, 2**14 is the first that fits float16
    assert scales == [2.0 ** e for e in range(19, 13, -1)] + [2.0 ** 14]
    np.testing.assert_allclose(np.asarray(w, np.float32), exact.astype(np.float32), rtol=2e-3)
    finite = optim.DynamicLossScale(np.float32(4.0), period=2)
    assert [float(finite.adjust(np.bool_(True)).loss_scale),
            float(finite.adjust(np.bool_(True)).adjust(np.bool_(True)).loss_scale)] == [4.0, 8.0]


def test_errors_say_what_is_missing():
    with pytest.raises(ValueError, match="needs the parameters"):
        optim.adamw(1e-3).update(_grads(0), optim.adamw(1e-3).init(_params()))
    with pytest.raises(ValueError, match="build it with this chain's init"):
        optim.adam(1e-3).update(_grads(0), (), _params())
