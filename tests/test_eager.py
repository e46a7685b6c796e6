"""Eager NumPy on sharded spmd.Arrays: each op compiles through the sharding compiler (cached)
and returns a sharded Array, as DTensor does with JAX's specs."""
import numpy as np
import pytest

import spmd
from spmd import NamedSharding, P
from spmd import eager

# Auto axes: eager ops compiled one at a time by the propagating compiler, as on JAX's Auto meshes
MESH = spmd.make_mesh((2, 4), ("data", "model"), (spmd.AxisType.Auto,) * 2)
NS = lambda *s: NamedSharding(MESH, P(*s))
rng = np.random.default_rng(0)
X = rng.normal(size=(8, 16)).astype(np.float32)
W = rng.normal(size=(16, 8)).astype(np.float32)


@pytest.fixture
def x():
    return spmd.device_put(X, NS("data"))


@pytest.fixture
def w():
    return spmd.device_put(W, NS(None, "model"))


OPS = [
    ("matmul", lambda x, w: x @ w, lambda X, W: X @ W, P("data", "model")),
    ("tanh", lambda x, w: np.tanh(x), lambda X, W: np.tanh(X), P("data")),
    ("add scalar", lambda x, w: x + 1, lambda X, W: X + 1, P("data")),
    ("radd ndarray", lambda x, w: np.ones(16, np.float32) + x, lambda X, W: 1 + X, P("data")),
    ("sum(0)", lambda x, w: x.sum(0), lambda X, W: X.sum(0), P()),
    ("sum(1)", lambda x, w: x.sum(1), lambda X, W: X.sum(1), P("data")),
    ("mean", lambda x, w: x.mean(), lambda X, W: X.mean(), P()),
    ("max axis", lambda x, w: np.max(x, axis=1), lambda X, W: X.max(1), P("data")),
    ("transpose", lambda x, w: x.T, lambda X, W: X.T, P(None, "data")),
    ("reshape", lambda x, w: x.reshape(8, 4, 4), lambda X, W: X.reshape(8, 4, 4), P("data")),
    ("getitem slice", lambda x, w: x[:, 2:6], lambda X, W: X[:, 2:6], P("data")),
    ("getitem int", lambda x, w: x[3], lambda X, W: X[3], P()),
    ("comparison", lambda x, w: x > 0, lambda X, W: X > 0, P("data")),
    ("einsum", lambda x, w: np.einsum("ij,jk->ik", x, w), lambda X, W: X @ W, P("data", "model")),
    ("softmax chain", lambda x, w: np.exp(x @ w) / np.exp(x @ w).sum(1, keepdims=True),
     lambda X, W: np.exp(X @ W) / np.exp(X @ W).sum(1, keepdims=True), P("data", "model")),
]


@pytest.mark.parametrize("row", OPS, ids=[r[0] for r in OPS])
def test_eager_op(row, x, w):
    _, op, ref, spec = row
    y = op(x, w)
    assert isinstance(y, spmd.Array)
    assert y.sharding.spec == spec
    np.testing.assert_allclose(np.asarray(y), ref(X, W), rtol=1e-5, atol=1e-5)


def test_cache_hits(x, w):
    eager._CACHE.clear()
    x @ w
    n = len(eager._CACHE)
    for _ in range(3):
        x @ w
    assert len(eager._CACHE) == n == 1
    x2 = spmd.device_put(X, NS("model"))
    x2 @ w                                     # another sharding: another entry
    assert len(eager._CACHE) == 2


def test_python_values_and_host_functions(x):
    assert float(x.sum()) == pytest.approx(float(X.sum()), rel=1e-5)
    assert np.allclose(x, X)
    assert np.shape(x) == (8, 16) and np.ndim(x) == 2
    assert bool((x * 0).sum() == 0)


def test_different_meshes_error(x):
    other = spmd.make_mesh((4, 2), ("data", "model"), (spmd.AxisType.Auto,) * 2)
    y = spmd.device_put(X, NamedSharding(other, P("data")))
    with pytest.raises(spmd.ShardingError, match="different meshes"):
        x + y
