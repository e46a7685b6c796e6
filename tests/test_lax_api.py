"""``spmd.lax`` against ``jax.lax``: every name a program calls exists (the list JAX's own
``tests/shard_map_test.py`` uses, and the functions issue 14 names), and each function gives
JAX's values, shapes and dtypes on the same inputs under ``jit`` (gradients too where they are
the point: ``erf``, ``conv_general_dilated``, ``top_k``), plus the bad inputs JAX rejects.
Then the NumPy functions models use that had no rule (``pad`` modes, ``insert``,
``histogram``, ``put_along_axis``, ``scipy.special.erf``, ``numpy.linalg``) against NumPy, and
the derivatives of the linear algebra against finite differences.
"""
import functools

import numpy as np
import pytest

import spmd
import spmd.lax as slax
from spmd import P

from _jax_oracle import jax_mesh, jax_spec

# The jax.lax / jax.nn / jax.random / jax.tree_util names JAX's tests/shard_map_test.py uses
# (jax-ml/jax at cec06d1, `lax.X`, `jax.lax.X`, `jax.nn.X`, `jax.random.X`, `jax.tree_util.X`),
# the control-flow ones included.  psend / precv / create_token (GPU-only point-to-point
# experiments with tokens) are left out; so is jax._src's treedef_is_strict_leaf.
SHARD_MAP_TEST_NAMES = {
    "lax": """add all_gather all_to_all approx_max_k axis_index axis_size cond conv_general_dilated
              cos dynamic_slice_in_dim erf exp full_like iota map mul optimization_barrier pbroadcast
              pcast pmax pmin ppermute psum psum_scatter scan sin switch while_loop
              with_sharding_constraint""".split(),
    "nn": ["relu"],
    "random": "PRNGKey beta bits choice key key_data normal randint split uniform".split(),
    "tree_util": "tree_map tree_unflatten tree_structure tree_all tree_leaves tree_flatten".split(),
}
# the jax.lax functions issue 14 names, and the rest of this module
ISSUE_NAMES = """all_gather all_to_all axis_index axis_size pbroadcast pmax pmean pmin ppermute psum
    psum_scatter pcast dot_general conv_general_dilated dynamic_slice dynamic_update_slice
    broadcast_in_dim iota rsqrt erf top_k sort cumsum select reduce_precision scan fori_loop
    while_loop cond switch map stop_gradient""".split()


@pytest.mark.parametrize("module", sorted(SHARD_MAP_TEST_NAMES))
def test_names_used_by_jax_shard_map_tests_exist(module):
    mod = getattr(spmd, module)
    missing = [n for n in SHARD_MAP_TEST_NAMES[module] if not hasattr(mod, n)]
    assert not missing, f"spmd.{module} lacks {missing}"


def test_names_of_the_issue_and_all_exist():
    assert not [n for n in ISSUE_NAMES if not hasattr(slax, n)]
    assert not [n for n in slax.__all__ if not hasattr(slax, n)]


# ---------------------------------------------------------------------------------------------
# values against jax.lax: (name, args, kwargs)
# ---------------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)
F = RNG.standard_normal((3, 4)).astype(np.float32)
G = RNG.standard_normal((3, 4)).astype(np.float32)
POS = np.abs(F) + 0.5
I = np.array([[-7, 7, 3, 0], [5, -5, 2, 9], [1, 2, 3, 4]], np.int32)
J = np.array([[2, -2, 2, 3], [3, 3, -4, 2], [1, 1, 2, 5]], np.int32)
UNIT = np.tanh(F)

ROWS = [(n, (F,), {}) for n in "abs cos cosh exp expm1 floor ceil neg sign sin sinh tanh "
                               "logistic is_finite square atan asinh cbrt erf exp2".split()]
ROWS += [(n, (POS,), {}) for n in "log log1p sqrt rsqrt reciprocal acosh".split()]
ROWS += [(n, (UNIT,), {}) for n in "asin acos atanh tan erf_inv".split()]
ROWS += [(n, (F, G), {}) for n in "add sub mul div max min atan2 rem eq ne lt le gt ge".split()]
ROWS += [("pow", (POS, G), {}), ("div", (I, J), {}), ("rem", (I, J), {}),
         ("shift_left", (I, np.abs(J)), {}), ("shift_right_arithmetic", (I, np.abs(J)), {}),
         ("shift_right_logical", (I, np.abs(J)), {}), ("bitwise_and", (I, J), {}),
         ("bitwise_or", (I, J), {}), ("bitwise_xor", (I, J), {}), ("bitwise_not", (I,), {}),
         ("add", (F, 2.0), {}), ("mul", (3, I), {}),
         ("integer_pow", (F, 3), {}), ("integer_pow", (POS, -2), {}), ("integer_pow", (F, 0), {}),
         ("round", (np.array([0.5, 1.5, -2.5, 0.49999997, -0.5, 2.7], np.float32),), {}),
         ("round", (np.array([0.5, 1.5, -2.5, 2.7], np.float32), 1), {}),
         ("clamp", (np.float32(-0.5), F, np.float32(0.5)), {}),
         ("select", (F > 0, F, G), {}), ("select_n", (F > 0, F, G), {}),
         ("select_n", (np.array([0, 2, 1, 0], np.int32), F[0], G[0], F[1]), {}),
         ("convert_element_type", (F, np.int32), {}), ("bitcast_convert_type", (F, np.int32), {}),
         ("reduce_precision", (np.array([1.0000001, 3.14159, 1e30, 1e-30, -1e-30, np.nan, -2.5e-5,
                                         65504, 65520], np.float32),), dict(exponent_bits=5, mantissa_bits=10)),
         ("reduce_precision", (F * 1e3,), dict(exponent_bits=8, mantissa_bits=7)),
         ("broadcast_in_dim", (F[0], (3, 2, 4), (2,)), {}), ("broadcast", (F, (2,)), {}),
         ("reshape", (F, (2, 6)), {}), ("reshape", (F, (4, 3)), dict(dimensions=(1, 0))),
         ("transpose", (F, (1, 0)), {}), ("rev", (F, (0, 1)), {}),
         ("squeeze", (F[:1], (0,)), {}), ("expand_dims", (F, (0, 2)), {}),
         ("collapse", (F.reshape(3, 2, 2), 1), {}), ("concatenate", ([F, G], 1), {}),
         ("pad", (F, np.float32(-1), [(1, 2, 1), (-1, 0, 2)]), {}),
         ("pad", (F, np.float32(0), [(0, 0, 0), (2, -3, 0)]), {}),
         ("slice", (F, (0, 1), (3, 4), (2, 2)), {}), ("slice_in_dim", (F, 1, 4, 2, 1), {}),
         ("index_in_dim", (F, -1, 1, False), {}),
         ("dynamic_slice", (F, (1, -1), (2, 2)), {}), ("dynamic_slice", (F, (5, 3), (2, 3)), {}),
         ("dynamic_slice_in_dim", (F, 2, 2, 1), {}), ("dynamic_index_in_dim", (F, 1, 0, False), {}),
         ("dynamic_update_slice", (F, G[:2, :2], (2, 1)), {}),
         ("dynamic_update_slice_in_dim", (F, G[:1], -1, 0), {}),
         ("dynamic_update_index_in_dim", (F, G[0], 1, 0), {}),
         ("full_like", (F, 2.5), {}),
         ("reduce_sum", (F, (0,)), {}), ("reduce_sum", (I.astype(np.int8), (1,)), {}),
         ("reduce_max", (F, (0, 1)), {}), ("reduce_min", (I, (1,)), {}),
         ("reduce_prod", (F, (1,)), {}), ("reduce_and", (F > 0, (1,)), {}),
         ("reduce_or", (F > 0, (0,)), {}), ("argmax", (F, 1, np.int32), {}),
         ("argmin", (F, 0, np.int32), {}),
         ("cumsum", (F,), {}), ("cumsum", (F, 1, True), {}), ("cumprod", (F, 1), {}),
         ("cummax", (F, 1), {}), ("cummin", (F, 0, True), {}), ("cumlogsumexp", (F, 1), {}),
         ("sort", (F,), {}), ("sort", (F, 0), {}),
         ("sort", ((I % 3, F),), dict(num_keys=1)), ("sort", ((I % 2, I % 3, F),), dict(num_keys=2)),
         ("sort_key_val", (I % 3, F), {}),
         ("top_k", (np.array([[1., 3., 3., 2.], [0., -1., 5., 5.]], np.float32), 3), {}),
         ("approx_max_k", (F, 2), {}), ("approx_min_k", (F.T, 2), dict(reduction_dimension=0)),
         ("dot_general", (F, G.T, (((1,), (0,)), ((), ()))), {}),
         ("dot_general", (F.reshape(3, 2, 2), G.reshape(3, 2, 2), (((1,), (2,)), ((0,), (0,)))), {}),
         ("dot", (F, G.T), {}), ("dot", (F[0], G[0]), {}),
         ("dot", (I, J.T), dict(preferred_element_type=np.float32)),
         ("batch_matmul", (F.reshape(3, 2, 2), G.reshape(3, 2, 2)), {}),
         ]

CONV_X = RNG.standard_normal((2, 3, 7, 6)).astype(np.float32)        # NCHW
CONV_W = RNG.standard_normal((6, 3, 3, 2)).astype(np.float32)         # OIHW
CONV_ROWS = {
    "valid": dict(window_strides=(1, 1), padding="VALID"),
    "same strided": dict(window_strides=(2, 3), padding="SAME"),
    "same_lower": dict(window_strides=(2, 2), padding="SAME_LOWER"),
    "explicit negative": dict(window_strides=(1, 2), padding=((2, -1), (0, 3))),
    "rhs dilation": dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 3)),
    "lhs dilation (transposed)": dict(window_strides=(1, 1), padding=((2, 2), (1, 1)), lhs_dilation=(2, 3)),
    "feature groups": dict(window_strides=(1, 1), padding="VALID", feature_group_count=3),
}


@functools.cache
def _jax():
    import jax
    return jax


def _jax_lax(name):
    return getattr(_jax().lax, name)


def _close(got, want, tol):
    import optree
    got_l, want_l = optree.tree_leaves(got), optree.tree_leaves(want)
    assert len(got_l) == len(want_l)
    for g, w in zip(got_l, want_l):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


def _static(args):
    """Arrays become traced arguments; everything else stays a Python value."""
    dyn = [i for i, a in enumerate(args) if isinstance(a, np.ndarray) and a.ndim
           or isinstance(a, list) and a and isinstance(a[0], np.ndarray)]
    return dyn


def _call(lax_fn, jit, args, kwargs):
    dyn = _static(args)

    def f(*xs):
        full = list(args)
        for i, x in zip(dyn, xs):
            full[i] = x
        return lax_fn(*full, **kwargs)
    return jit(f)(*[args[i] for i in dyn])


@functools.cache
def _jax_rows():
    """Every row's JAX result, from one compiled JAX program (one compile, not one per row)."""
    jax = _jax()
    flat = [(i, j) for i, (_, args, _) in enumerate(ROWS) for j in _static(args)]

    def program(*xs):
        rows = [list(args) for _, args, _ in ROWS]
        for (i, j), x in zip(flat, xs):
            rows[i][j] = x
        return [_jax_lax(n)(*a, **kw) for (n, _, kw), a in zip(ROWS, rows)]
    compiled = jax.jit(program).lower(*[ROWS[i][1][j] for i, j in flat]).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*[ROWS[i][1][j] for i, j in flat])


@pytest.mark.parametrize("i", range(len(ROWS)), ids=[f"{r[0]}-{i}" for i, r in enumerate(ROWS)])
def test_values_match_jax(i):
    name, args, kwargs = ROWS[i]
    want = _jax_rows()[i]
    got = _call(getattr(slax, name), spmd.jit, args, kwargs)
    _close(got, want, 2e-6 if name not in ("erf_inv", "cumlogsumexp", "pow") else 1e-5)


def _conv_loss(lax, kw):
    return lambda x, w: (lax.conv_general_dilated(x, w, **kw) ** 2).sum()


def _conv_kernel(kw):
    return CONV_W[:, :1] if "feature_group_count" in kw else CONV_W


@functools.cache
def _jax_conv_rows():
    """Value and gradients of every convolution row, from one compiled JAX program."""
    jax = _jax()
    grads = [jax.value_and_grad(_conv_loss(jax.lax, kw), argnums=(0, 1)) for kw in CONV_ROWS.values()]
    return jax.jit(lambda x, w, wg: [g(x, wg if "feature_group_count" in kw else w) for g, kw in
                                     zip(grads, CONV_ROWS.values())])(CONV_X, CONV_W, CONV_W[:, :1])


@pytest.mark.parametrize("name", CONV_ROWS)
def test_conv_general_dilated_values_and_gradients_match_jax(name):
    kw = CONV_ROWS[name]
    got = spmd.jit(spmd.value_and_grad(_conv_loss(slax, kw), argnums=(0, 1)))(CONV_X, _conv_kernel(kw))
    _close(got, _jax_conv_rows()[list(CONV_ROWS).index(name)], 2e-4)


def test_conv_dimension_numbers_nhwc():
    x = np.moveaxis(CONV_X, 1, -1)
    w = np.transpose(CONV_W, (2, 3, 1, 0))                  # HWIO
    dn = ("NHWC", "HWIO", "NHWC")
    want = _jax().lax.conv_general_dilated(x, w, (1, 2), "SAME", dimension_numbers=dn)
    got = spmd.jit(lambda x, w: slax.conv_general_dilated(x, w, (1, 2), "SAME",
                                                          dimension_numbers=dn))(x, w)
    _close(got, want, 2e-5)


CONV_T_ROWS = {
    "same": dict(strides=(2, 2), padding="SAME"),
    "valid dilated": dict(strides=(2, 1), padding="VALID", rhs_dilation=(1, 2)),
    "explicit": dict(strides=(3, 2), padding=((1, 2), (0, 1))),
    "consistent transpose_kernel": dict(strides=(2, 2), padding=((1, 1), (0, 1)),
                                        use_consistent_padding=True, transpose_kernel=True),
}


@pytest.mark.parametrize("name", CONV_T_ROWS)
def test_conv_transpose_matches_jax(name):
    x, w = np.moveaxis(CONV_X, 1, -1), np.transpose(CONV_W, (2, 3, 1, 0))    # NHWC, HWIO
    kw = CONV_T_ROWS[name]
    if kw.get("transpose_kernel"):
        w = np.swapaxes(w, 2, 3)[..., :3]
    want = _jax().lax.conv_transpose(x, w, precision=_jax().lax.Precision.HIGHEST, **kw)
    got = spmd.jit(lambda x, w: slax.conv_transpose(x, w, precision=slax.Precision.HIGHEST, **kw))(x, w)
    _close(got, want, 2e-5)


@pytest.mark.parametrize("name,x", [("erf", F), ("erf_inv", UNIT * 0.9), ("rsqrt", POS)])
def test_gradients_match_jax(name, x):
    jax = _jax()
    want = jax.jit(jax.grad(lambda x: _jax_lax(name)(x).sum()))(x)
    got = spmd.jit(spmd.grad(lambda x: getattr(slax, name)(x).sum()))(x)
    _close(got, want, 2e-6)


def test_top_k_and_sort_gradients_match_jax():
    jax = _jax()
    x = F.copy()

    def loss(lax):
        return lambda x: (lax.top_k(x, 2)[0] * lax.sort(x, 0)[:2, :2].sum()).sum()
    _close(spmd.jit(spmd.grad(loss(slax)))(x), jax.jit(jax.grad(loss(jax.lax)))(x), 2e-6)


def test_collectives_and_pcast_inside_shard_map_match_jax():
    jax = _jax()
    mesh = spmd.make_mesh((2, 4), ("x", "y"))
    x = np.arange(32.).reshape(8, 4).astype(np.float32)

    def body(lax):
        def f(a, b):
            b = lax.pcast(b, "x", to="varying")
            s = lax.psum(a * b, "y") + lax.pmax(a, ("x", "y")) + lax.axis_index("y").astype(a.dtype)
            g = lax.all_gather(a, "x", tiled=True)
            return s, g.sum(0, keepdims=True) * lax.axis_size("x")
        return f
    out_specs = (P("x", "y"), P("x", "y"))
    got = spmd.jit(spmd.shard_map(body(slax), mesh=mesh, in_specs=(P("x", "y"), P(None, "y")),
                                  out_specs=out_specs))(x, x[:4])
    jm = jax_mesh((2, 4), ("x", "y"))
    want = jax.jit(jax.shard_map(body(jax.lax), mesh=jm, in_specs=(jax_spec(P("x", "y")), jax_spec(P(None, "y"))),
                                 out_specs=tuple(jax_spec(s) for s in out_specs)))(x, x[:4])
    _close(got, want, 1e-6)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

BAD = {
    "mixed dtypes": (lambda: slax.add(F, F.astype(np.float64)), TypeError,
                     "lax.add requires arguments to have the same dtypes, got float32, float64"),
    "select on a float predicate": (lambda: slax.select(F, F, G), TypeError,
                                    "pred must be boolean"),
    "select of other shapes": (lambda: slax.select(F > 0, F, G[0]), TypeError, "one shape"),
    "integer_pow by a float": (lambda: slax.integer_pow(F, 2.0), TypeError, "must be a Python int"),
    "dynamic_slice too large": (lambda: slax.dynamic_slice(F, (0, 0), (4, 1)), TypeError,
                                "within the operand's shape"),
    "dynamic_slice rank": (lambda: slax.dynamic_slice(F, (0,), (1,)), TypeError, "needs 2 start"),
    "top_k beyond the dim": (lambda: slax.top_k(F, 5), ValueError, "k=5 must be between 0 and"),
    "pad with negative interior": (lambda: slax.pad(F, 0., [(0, 0, -1), (0, 0, 0)]), ValueError,
                                   "interior padding must be non-negative"),
    "conv feature mismatch": (lambda: slax.conv_general_dilated(CONV_X, CONV_W[:, :2], (1, 1), "VALID"),
                              ValueError, "lhs has 3 features and rhs 2"),
    "conv bad padding": (lambda: slax.conv_general_dilated(CONV_X, CONV_W, (1, 1), "FULL"),
                         ValueError, "padding 'FULL' is not"),
    "pcast with a set": (lambda: slax.pcast(F, {"x"}, to="varying"), TypeError,
                         "must be a tuple or a str"),
    "pcast to an unknown type": (lambda: slax.pcast(F, "x", to="bogus"), ValueError,
                                 "unexpected to='bogus'"),
    "sort with too many keys": (lambda: slax.sort((F, G), num_keys=3), ValueError,
                                "num_keys=3 must be between 1"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_are_clear_errors(name):
    fn, exc, match = BAD[name]
    with pytest.raises(exc, match=match):
        fn()


def test_pcast_of_a_varying_value_is_an_error_as_in_jax():
    mesh = spmd.make_mesh((4,), ("i",), devices=spmd.devices()[:4])
    f = spmd.shard_map(lambda b: slax.pcast(b, "i", to="varying"), mesh=mesh, in_specs=P("i"),
                       out_specs=P("i"))
    with pytest.raises(ValueError, match="already varies over mesh axis 'i'"):
        f(np.arange(8.))


# ---------------------------------------------------------------------------------------------
# NumPy functions models use (issue 14, item 6): values, shapes and dtypes against NumPy
# ---------------------------------------------------------------------------------------------

A = np.arange(12.).reshape(3, 4) * 0.5 - 1
A_INT = np.array([[-3, 5, 7, 0], [2, -9, 4, 1], [6, 6, -1, 8]])
IDX = np.array([[0, 2, 0], [1, 1, 3], [2, 0, 0]])
HIST = np.array([0.1, 0.5, 0.5, 2.0, 3.0, 3.0, -1.])
NUMPY_ROWS = {
    **{f"pad {mode} {dt}": (lambda a, mode=mode: np.pad(a, ((1, 2), (2, 1)), mode=mode), (arr,))
       for mode in ("maximum", "minimum", "mean", "median", "linear_ramp")
       for dt, arr in (("float", A), ("int", A_INT))},
    "pad stat_length": (lambda a: np.pad(a, ((1, 2), (2, 1)), mode="mean", stat_length=((1, 2), (3, 1))), (A_INT,)),
    "pad linear_ramp end_values": (lambda a: np.pad(a, 2, mode="linear_ramp", end_values=(5, -3)), (A_INT,)),
    "insert scalar": (lambda a: np.insert(a, 1, 99.), (A,)),
    "insert positions": (lambda a, v: np.insert(a, [0, 2, 2], v), (A, np.array([7., 8., 9.]))),
    "insert row": (lambda a, v: np.insert(a, 2, v, axis=0), (A, np.arange(4.))),
    "insert slice": (lambda a: np.insert(a, slice(1, 3), -1, axis=1), (A_INT,)),
    "histogram": (lambda a: np.histogram(a), (HIST,)),
    "histogram bins": (lambda a: np.histogram(a, bins=3), (HIST,)),
    "histogram range": (lambda a: np.histogram(a, bins=4, range=(0, 3)), (HIST,)),
    "histogram edges": (lambda a: np.histogram(a, bins=np.array([0., 1., 2.5, 3.])), (HIST,)),
    "histogram weights density": (lambda a, w: (np.histogram(a, bins=3, weights=w),
                                                np.histogram(a, bins=3, density=True)), (HIST, np.arange(7.))),
}


@pytest.mark.parametrize("name", NUMPY_ROWS)
def test_numpy_functions_match_numpy(name):
    fn, args = NUMPY_ROWS[name]
    _close(spmd.jit(fn)(*args), fn(*args), 1e-12)


def test_put_along_axis_and_scipy_erf():
    import scipy.special
    import spmd.numpy as snp
    v = np.arange(9.).reshape(3, 3)
    want = A.copy()
    np.put_along_axis(want, IDX, v, axis=1)                      # IDX repeats: the last write wins
    got = spmd.jit(lambda a, v: snp.put_along_axis(a, IDX, v, 1, inplace=False))(A, v)
    _close(got, want, 0)
    with pytest.raises(TypeError, match=r"put_along_axis\(arr, indices, values, axis, inplace=False\)"):
        spmd.jit(lambda a: np.put_along_axis(a, IDX, 1., axis=1))(A)
    x = np.linspace(-3, 3, 13)
    _close(spmd.jit(scipy.special.erf)(x), scipy.special.erf(x), 1e-15)
    _close(spmd.jit(scipy.special.erf)(x.astype(np.float32)), scipy.special.erf(x.astype(np.float32)), 1e-7)
    _close(spmd.grad(lambda x: scipy.special.erf(x).sum())(x), 2 / np.sqrt(np.pi) * np.exp(-x * x), 1e-14)


def test_pad_empty_keeps_the_interior():
    got = np.asarray(spmd.jit(lambda a: np.pad(a, ((1, 2), (2, 1)), mode="empty"))(A_INT))
    want = np.pad(A_INT, ((1, 2), (2, 1)), mode="empty")        # NumPy leaves the rest unset
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got[1:4, 2:6], A_INT)


def test_insert_with_traced_positions_is_a_clear_error():
    with pytest.raises(spmd.TracingError, match="numpy.insert needs concrete positions"):
        spmd.jit(lambda a, i: np.insert(a, i, 0.))(A, np.int64(1))


# ---------------------------------------------------------------------------------------------
# numpy.linalg on traced values (the jax.lax.linalg primitives): values against NumPy, batched,
# inside shard_map, and derivatives against finite differences
# ---------------------------------------------------------------------------------------------

_R = np.random.default_rng(1)
_M = _R.standard_normal((4, 4))
SPD = _M @ _M.T + 4 * np.eye(4)
RHS, TALL = _R.standard_normal((4, 3)), _R.standard_normal((5, 3))
STACK = np.stack([SPD, SPD + np.diag(np.arange(4.))])
LINALG_ROWS = {
    "solve": (np.linalg.solve, (SPD, RHS)),
    "solve vector": (np.linalg.solve, (SPD, RHS[:, 0])),
    "solve batched": (np.linalg.solve, (STACK, np.stack([RHS, 2 * RHS]))),
    "inv": (np.linalg.inv, (_M,)),
    "cholesky": (np.linalg.cholesky, (SPD,)),
    "cholesky upper batched": (lambda a: np.linalg.cholesky(a, upper=True), (STACK,)),
    "eigh": (lambda a: np.linalg.eigh(a)[0], (STACK,)),
    "eigh vectors": (lambda a: np.abs(np.linalg.eigh(a)[1]), (SPD,)),
    "eigvalsh upper": (lambda a: np.linalg.eigvalsh(a, UPLO="U"), (_M,)),
    "qr": (lambda a: np.abs(np.linalg.qr(a)[1]), (TALL,)),
    "qr complete": (lambda a: np.abs(np.linalg.qr(a, mode="complete")[0]), (TALL,)),
    "svd": (lambda a: np.linalg.svd(a, compute_uv=False), (TALL.T,)),
    "svd vectors": (lambda a: np.abs(np.linalg.svd(a)[2]), (TALL,)),
}


@pytest.mark.parametrize("name", LINALG_ROWS)
def test_linalg_values_match_numpy(name):
    fn, args = LINALG_ROWS[name]
    _close(spmd.jit(fn)(*args), fn(*args), 1e-10)


LINALG_GRADS = {
    "solve": (lambda a, b: np.linalg.solve(a, b), (SPD, RHS), 2),
    "inv": (np.linalg.inv, (_M,), 1),
    "cholesky": (np.linalg.cholesky, (SPD,), 2),
    "eigh": (lambda a: (lambda w, v: (w, v * v[:1]))(*np.linalg.eigh(a)), (SPD,), 1),
    "qr": (np.linalg.qr, (TALL,), 1),
    "svd tall": (lambda a: (lambda u, s, vh: (s, u * u[:1], vh * vh[:1]))(
        *np.linalg.svd(a, full_matrices=False)), (TALL,), 1),
    "svd wide": (lambda a: (lambda u, s, vh: (s, u * u[:1], vh * vh[:1]))(
        *np.linalg.svd(a, full_matrices=False)), (TALL.T,), 1),
}


@pytest.mark.parametrize("name", LINALG_GRADS)
def test_linalg_derivatives_match_finite_differences(name):
    from spmd.transforms.check import check_grads
    fn, args, order = LINALG_GRADS[name]
    check_grads(fn, args, order=order)


def test_linalg_under_vmap_and_shard_map():
    batched = spmd.vmap(np.linalg.solve, in_axes=(None, 0))(SPD, np.stack([RHS, -RHS]))
    _close(batched, np.linalg.solve(SPD, np.stack([RHS, -RHS])), 1e-10)
    mesh = spmd.make_mesh((2,), ("i",), devices=spmd.devices()[:2])
    f = spmd.shard_map(lambda a: np.linalg.cholesky(a), mesh=mesh, in_specs=P("i"), out_specs=P("i"))
    _close(spmd.jit(f)(STACK), np.linalg.cholesky(STACK), 1e-10)
    with pytest.raises(NotImplementedError, match="full_matrices=True"):
        spmd.grad(lambda a: np.linalg.svd(a)[0].sum())(TALL)
    import spmd.numpy as snp
    _close(snp.linalg.solve(SPD, RHS), np.linalg.solve(SPD, RHS), 1e-12)
