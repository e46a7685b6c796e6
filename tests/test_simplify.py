"""The gradient of slices of one array: one buffer, not a padded copy per slice (values checked
against NumPy, programs inspected)."""
import numpy as np
import pytest

import spmd
from spmd import P, shard_map


def _ops(program):
    out = []
    for e in program.eqns:
        out.append(e.prim.name)
        for sub in e.prim.subprograms(e.params):
            out += _ops(sub)
    return out


def _pad_shapes(program):
    out = []
    for e in program.eqns:
        if e.prim.name == "pad":
            out.append(e.outputs[0].aval.shape)
        for sub in e.prim.subprograms(e.params):
            out += _pad_shapes(sub)
    return out


def _grad_program(f, *args):
    return spmd.make_program(spmd.grad(f))(*args)


W = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)


def test_stacked_layers_gradient_is_one_concatenation():
    def loss(w):
        return sum(np.sum(np.sin(w[i]) * (i + 1)) for i in range(4))
    g = spmd.grad(loss)(W)
    expected = np.cos(W) * np.arange(1, 5, dtype=np.float32)[:, None, None]
    np.testing.assert_allclose(np.asarray(g), expected, rtol=1e-6)
    ops = _ops(_grad_program(loss, W))
    assert ops.count("concatenate") == 1 and "pad" not in ops, ops


def test_inside_shard_map_the_per_device_gradients_merge_too():
    mesh = spmd.make_mesh((8,), ("data",))
    x = np.random.default_rng(1).standard_normal((16, 3)).astype(np.float32)

    @spmd.jit
    def grads(w, x):
        def local(w, x):
            def loss(w):
                h = x
                for i in range(4):
                    h = np.tanh(h @ w[i][:, :3])
                return np.sum(h)
            return spmd.psum(spmd.grad(loss)(spmd.pvary(w, "data")), "data")
        return shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())(w, x)

    def reference(w):
        h = x.astype(np.float64)
        for i in range(4):
            h = np.tanh(h @ w[i][:, :3])
        return np.sum(h)
    eps, w64 = 1e-6, W.astype(np.float64)
    numeric = np.zeros_like(w64)
    for idx in np.ndindex(*W.shape):
        d = np.zeros_like(w64)
        d[idx] = eps
        numeric[idx] = (reference(w64 + d) - reference(w64 - d)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grads(W, x)), numeric, rtol=1e-4, atol=1e-5)
    program = spmd.make_program(grads)(W, x)
    ops = _ops(program)
    # the column slice [:, :3] pads each layer's (3, 5); no pad of the whole (4, 3, 5)
    assert ops.count("concatenate") == 1 and _pad_shapes(program) == [(3, 5)] * 4, ops


@pytest.mark.parametrize("picks", [(0, 2), (3, 1), (1, 2)])
def test_ranges_that_do_not_meet_stay_apart_and_values_are_right(picks):
    def loss(w):
        return sum(np.sum(w[i] ** 2) * (k + 1) for k, i in enumerate(picks))
    expected = np.zeros_like(W)
    for k, i in enumerate(picks):
        expected[i] += 2 * W[i] * (k + 1)
    np.testing.assert_allclose(np.asarray(spmd.grad(loss)(W)), expected, rtol=1e-6)
    ops = _ops(_grad_program(loss, W))
    adjacent = abs(picks[0] - picks[1]) == 1
    assert ops.count("concatenate") == (1 if adjacent else 0), ops


def test_slices_along_different_dims_and_strided_slices():
    def loss(w):
        return np.sum(w[1] ** 2) + np.sum(w[:, 2] * 3) + np.sum(w[::2, :, 1:4:2] ** 3)
    expected = np.zeros_like(W)
    expected[1] += 2 * W[1]
    expected[:, 2] += 3
    expected[::2, :, 1:4:2] += 3 * W[::2, :, 1:4:2] ** 2
    np.testing.assert_allclose(np.asarray(spmd.grad(loss)(W)), expected, rtol=1e-5)


@pytest.mark.parametrize("config,value", [(((1, 2), (0, 0), (3, 0)), 0.0),
                                          (((0, 0), (2, 2), (0, 1)), 1.5),
                                          (((0, 0), (0, 0), (0, 0)), 0.0)])
def test_pad_equals_numpy_at_top_level_and_per_device(config, value):
    x = W[:, :2]                                                # (4, 2, 5)

    def pad(a, config):
        return spmd.lax.pad(a, np.float32(value), [(lo, hi, 0) for lo, hi in config])
    np.testing.assert_array_equal(np.asarray(spmd.jit(lambda a: pad(a, config))(x)),
                                  np.pad(x, config, constant_values=value))
    mesh = spmd.make_mesh((4,), ("x",))
    per_device = shard_map(lambda a: pad(a[0], config[1:])[None], mesh=mesh, in_specs=P("x"),
                           out_specs=P("x"))
    np.testing.assert_array_equal(
        np.asarray(per_device(x)), np.stack([np.pad(b, config[1:], constant_values=value)
                                             for b in x]))


def test_data_parallel_sum_of_stacked_weight_gradients_is_summed_per_layer():
    """psum(concatenate(reshape(x_i^T g_i))) -> concatenate(reshape(psum(x_i^T g_i))): each sum
    meets its product, which the stacked executor runs as one contraction over the devices
    (no per-device partial products); the values are the reference executor's and NumPy's."""
    from spmd.executors import fusion, reference_executor
    from spmd.transforms import simplify
    from spmd.transforms.ad import dce
    mesh = spmd.make_mesh((8,), ("data",))
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((3, 6, 6)) * 0.4).astype(np.float32)
    x = rng.standard_normal((32, 6)).astype(np.float32)

    def local(w, x):
        def loss(w):
            h = x
            for i in range(3):
                h = np.tanh(h @ w[i])
            return np.sum(h * h)
        return spmd.psum(spmd.grad(loss)(spmd.pvary(w, "data")), "data")
    f = shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    body = spmd.make_program(f)(w, x).eqns[0].params["body"]
    assert _ops(body).count("psum") == 1
    summed = dce(simplify.psums_before_joins(body))
    assert _ops(summed).count("psum") == 3
    fused = [v for v in fusion.plan_fusions(summed, 1, np).values() if v != "skip"]
    assert sum(v.kind == "dot_then_psum" for v in fused) == 3

    def numpy_grad(w, x):
        hs, h = [x], x
        for i in range(3):
            h = np.tanh(h @ w[i])
            hs.append(h)
        g, out = 2 * h, np.zeros_like(w)
        for i in reversed(range(3)):
            g = g * (1 - hs[i + 1] ** 2)
            out[i] = hs[i].T @ g
            g = g @ w[i].T
        return out
    got = spmd.jit(f)(w, x)
    ref = spmd.jit(f, executor=reference_executor())(w, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), numpy_grad(w, x), rtol=1e-4, atol=1e-4)


def test_a_sum_of_products_is_summed_per_product_and_other_joins_are_left_alone():
    """psum(a @ w1 + b @ w2) -> psum(a @ w1) + psum(b @ w2), each fused with its product; a
    concatenation of a product and a reduction keeps its one psum (more, smaller sums of
    values that are not products would cost more)."""
    from spmd.executors import fusion, reference_executor
    from spmd.transforms import simplify
    from spmd.transforms.ad import dce
    mesh = spmd.make_mesh((4,), ("model",))
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((5, 8)).astype(np.float32) for _ in range(2))
    w1, w2 = (rng.standard_normal((8, 3)).astype(np.float32) for _ in range(2))

    def local(a, b, w1, w2):
        both = spmd.psum(a @ w1 + b @ w2, "model")
        mixed = spmd.psum(np.concatenate([a @ w1, np.sum(b, axis=1, keepdims=True)], axis=1),
                          "model")
        return both, mixed
    specs = (P(None, "model"), P(None, "model"), P("model"), P("model"))
    f = shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
    body = spmd.make_program(f)(a, b, w1, w2).eqns[0].params["body"]
    summed = dce(simplify.psums_before_joins(body))
    assert _ops(body).count("psum") == 2 and _ops(summed).count("psum") == 3
    fused = [v for v in fusion.plan_fusions(summed, 1, np).values() if v != "skip"]
    assert sum(v.kind == "dot_then_psum" for v in fused) == 2
    got = spmd.jit(f)(a, b, w1, w2)
    ref = spmd.jit(f, executor=reference_executor())(a, b, w1, w2)
    want = (a @ w1 + b @ w2, np.concatenate([a @ w1, np.sum(b, axis=1, keepdims=True)], axis=1))
    for g, r, w in zip(got, ref, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-4)
