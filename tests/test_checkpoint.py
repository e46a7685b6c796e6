"""``spmd.checkpoint``: same gradients as the plain function, less memory held between the
forward and the backward pass (measured with tracemalloc, which sees NumPy's allocations)."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import spmd
from spmd import P

POLICIES = {"nothing": spmd.checkpoint_policies.nothing_saveable,
            "dots": spmd.checkpoint_policies.dots_saveable}


def mlp_loss(depth, remat=None):
    def layer(w, h):
        z = h @ w                     # elementwise work around the matmul: what remat recomputes
        return np.tanh(z) * (1 + 0.5 * np.sin(z))
    if remat is not None:
        layer = spmd.checkpoint(layer, policy=POLICIES[remat])

    def loss(ws, x):
        h = x
        for w in ws:
            h = layer(w, h)
        return np.sum(h ** 2)
    return loss


def _params(depth, width, batch, seed=0):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((width, width)) / np.sqrt(width) for _ in range(depth)]
    return ws, rng.standard_normal((batch, width))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_checkpointed_gradient_equals_plain(policy):
    ws, x = _params(4, 8, 5)
    plain = spmd.grad(mlp_loss(4))(ws, x)
    remat = spmd.grad(mlp_loss(4, policy))(ws, x)
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def test_checkpoint_is_transparent_outside_autodiff_and_under_vmap_and_jvp():
    ws, x = _params(2, 4, 3)
    f = mlp_loss(2, "nothing")
    np.testing.assert_allclose(np.asarray(spmd.jit(f)(ws, x)), mlp_loss(2)(ws, x))
    t = [np.ones_like(w) for w in ws]
    np.testing.assert_allclose(np.asarray(spmd.jvp(f, (ws, x), (t, np.zeros_like(x)))[1]),
                               np.asarray(spmd.jvp(mlp_loss(2), (ws, x), (t, np.zeros_like(x)))[1]))
    xs = np.stack([x, 2 * x])
    np.testing.assert_allclose(np.asarray(spmd.vmap(spmd.grad(f), in_axes=(None, 0))(ws, xs)[0]),
                               np.asarray(spmd.vmap(spmd.grad(mlp_loss(2)), in_axes=(None, 0))(ws, xs)[0]))


def test_second_order_through_checkpoint():
    from spmd.transforms.check import check_grads
    ws, x = _params(2, 3, 2)
    check_grads(lambda w0, w1: mlp_loss(2, "dots")([w0, w1], x), tuple(ws), order=2)


def test_checkpoint_inside_shard_map():
    mesh = spmd.make_mesh((8,), ("data",))
    ws, x = _params(3, 6, 16)

    def loss(ws, x, remat):
        body = lambda ws, xb: spmd.psum(mlp_loss(3, remat)(ws, xb), "data")
        return spmd.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())(ws, x)
    plain = spmd.grad(loss)(ws, x, None)
    remat = spmd.grad(loss)(ws, x, "nothing")
    for a, b in zip(plain, remat):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def peak_bytes(fn, *args):
    fn(*args)                                       # trace and warm up outside the measurement
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(depth=16, width=256, batch=256):
    """Peak traced bytes of one jitted gradient step of a deep tanh MLP, per policy."""
    ws, x = _params(depth, width, batch)
    out = {}
    for name in (None, "dots", "nothing"):
        step = spmd.jit(spmd.grad(mlp_loss(depth, name)))
        out[name or "plain"] = peak_bytes(step, ws, x)
    return out


def test_checkpoint_lowers_peak_memory():
    peaks = measure(depth=12, width=128, batch=128)
    activation = 128 * 128 * 8
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()})
    # plain keeps ~4 activations per layer for the backward pass (tanh, sin and their
    # derivatives), saving the matmul outputs keeps 2, saving nothing keeps 1
    assert peaks["nothing"] < peaks["dots"] < peaks["plain"], peaks
    assert peaks["plain"] - peaks["nothing"] > 12 * 2 * activation, peaks
