"""``spmd.random`` against ``jax.random``: the same keys and the same bits.

One table of samplers, each row written once against a module (``spmd.random`` or
``jax.random``) and run on 4 shapes and the dtypes it takes, eagerly and under ``spmd.jit``,
with typed keys; raw keys, ``vmap``, ``shard_map`` streams (``fold_in(axis_index)``) and the
64-bit dtypes (JAX with x64 enabled) in the tests after it.  Every comparison is exact: equal
dtypes, equal shapes, equal bits.
"""
from __future__ import annotations

import math
import os

import ml_dtypes

import numpy as np
import pytest

import spmd
import spmd.random as sr
from spmd import P, prims

jax = pytest.importorskip("jax")
jr = jax.random
jnp = jax.numpy
JP = jax.sharding.PartitionSpec

SHAPES = [(), (5,), (3, 4), (2, 3, 2)]
f16, bf16, f32, f64 = (np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
i8, i16, i32, i64 = (np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64))
u8, u16, u32, u64 = (np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64))

LOGITS = np.log(np.array([0.1, 0.3, 0.05, 0.25, 0.2, 0.1]))
PROBS = np.array([0.1, 0.3, 0.05, 0.25, 0.2, 0.05, 0.02, 0.03])
POOL = np.arange(24.).reshape(2, 12)


def _arange(shape, dtype):
    return np.arange(math.prod(shape) or 1, dtype=dtype).reshape(shape or (1,))


# Each row: f(module, key, shape, dtype), the dtypes it takes.  Elementwise samplers hash each
# element's index on its own (partitionable threefry), so the first n values of a draw of any
# shape are the values of a draw of n: one JAX draw is the reference for every shape.
ELEMENTWISE = {
    "bits": (lambda r, k, s, d: r.bits(k, s, d), [u32, u8, u16]),
    "uniform": (lambda r, k, s, d: r.uniform(k, s, d), [f32, f16, bf16]),
    "uniform_range": (lambda r, k, s, d: r.uniform(k, s, d, minval=-2.5, maxval=4.0), [f32]),
    "normal": (lambda r, k, s, d: r.normal(k, s, d), [f32, np.dtype(np.complex64)]),
    "truncated_normal": (lambda r, k, s, d: r.truncated_normal(k, -1.5, 2.0, s, d), [f32]),
    "bernoulli": (lambda r, k, s, d: r.bernoulli(k, d.type(0.3), s), [f32]),
    "gumbel": (lambda r, k, s, d: r.gumbel(k, s, d), [f32]),
    "randint": (lambda r, k, s, d: r.randint(k, s, -3, 20, d), [i32, i8, u16]),
    "randint_wide": (lambda r, k, s, d: r.randint(k, s, np.iinfo(d).min, np.iinfo(d).max, d), [i32]),
    "randint_past_max": (lambda r, k, s, d: r.randint(k, s, 0, 256, d), [u8]),
    "split": (lambda r, k, s, d: r.key_data(r.split(k, s)), [u32]),
}
SHAPED = {      # the values depend on the whole shape
    "categorical": (lambda r, k, s, d: r.categorical(k, LOGITS.astype(d), shape=s), [f32]),
    "permutation": (lambda r, k, s, d: r.permutation(k, _arange(s, d)), [i32]),
    "choice": (lambda r, k, s, d: r.choice(k, 10, s), [i32]),
}
VARIANTS = {    # other branches of the samplers, at one shape each
    "bernoulli_high": lambda r, k, s: r.bernoulli(k, np.float32(0.3), s, mode="high"),
    "gumbel_high": lambda r, k, s: r.gumbel(k, s, mode="high"),
    "categorical_axis0": lambda r, k, s: r.categorical(k, np.tile(LOGITS, (3, 1)).T.astype(f32), axis=0,
                                                       shape=(2, 3)),
    "categorical_noreplace": lambda r, k, s: r.categorical(k, np.tile(LOGITS, (3, 2)).astype(f32),
                                                           shape=(4, 3), replace=False),
    "permutation_rows": lambda r, k, s: r.permutation(k, _arange(s, f32), axis=-1),
    "permutation_independent": lambda r, k, s: r.permutation(k, _arange(s, f32), axis=-1, independent=True),
    "permutation_int": lambda r, k, s: r.permutation(k, 9),
    "choice_noreplace": lambda r, k, s: r.choice(k, 20, s, replace=False),
    "choice_p": lambda r, k, s: r.choice(k, 8, s, p=PROBS.astype(f32)),
    "choice_p_noreplace": lambda r, k, s: r.choice(k, 8, s[:1], replace=False, p=PROBS.astype(f32)),
    "choice_array": lambda r, k, s: r.choice(k, POOL.astype(f32), s, axis=1),
    "fold_in": lambda r, k, s: r.key_data(r.fold_in(k, 12345)),
}
CASES = [(name, d) for table in (ELEMENTWISE, SHAPED) for name, (_, dtypes) in table.items() for d in dtypes]


def _same(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != JAX's {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != JAX's {want.shape}"
    bits = lambda a: np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(a.size, -1)
    same = np.all(bits(got) == bits(want), axis=-1)
    assert same.all(), f"{what}: bits differ from JAX's at {np.argwhere(~same)[:5].ravel().tolist()}\n{got}\n{want}"


def _check(fn, seed, shape, want, what):
    _same(fn(sr, sr.key(seed), shape), want, f"{what}{list(shape)} eager")
    _same(spmd.jit(lambda k: fn(sr, k, shape))(sr.key(seed)), want, f"{what}{list(shape)} under jit")


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_same_bits_as_jax(name, dtype):
    """Every sampler, 4 shapes, its dtypes: eager and under jit, JAX's bits."""
    row, seed = (ELEMENTWISE.get(name) or SHAPED[name])[0], len(name)
    fn = lambda r, k, s: row(r, k, s, dtype)
    if name in ELEMENTWISE:
        n = max(math.prod(s) for s in SHAPES)
        whole = np.asarray(fn(jr, jr.key(seed), (n,)))
        wants = [whole[:math.prod(s)].reshape(s + whole.shape[1:]) for s in SHAPES]
    else:
        wants = [fn(jr, jr.key(seed), s) for s in SHAPES]
    for shape, want in zip(SHAPES, wants):
        _check(fn, seed, shape, want, name)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_same_bits_as_jax(name):
    fn, shape = VARIANTS[name], (3, 4)
    _check(fn, 11, shape, fn(jr, jr.key(11), shape), name)


def test_threefry2x32_known_answers():
    """The Random123 known-answer vectors of threefry2x32 with 20 rounds."""
    u = np.uint32
    for key, count, out in [((0, 0), (0, 0), (0x6b200159, 0x99ba4efe)),
                            ((0xffffffff,) * 2, (0xffffffff,) * 2, (0x1cb996fc, 0xbb002be7)),
                            ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0))]:
        got = prims.threefry2x32_p(u(key[0]), u(key[1]), np.array([count[0]], u), np.array([count[1]], u))
        assert [int(g[0]) for g in got] == list(out)


@pytest.mark.parametrize("seed", [0, 42, -1, 2 ** 31 + 5, 2 ** 40 + 3, np.int32(-7), np.uint32(2 ** 32 - 1)])
def test_seeds(seed):
    _same(sr.key_data(sr.key(seed)), jr.key_data(jr.key(seed)), f"key({seed!r})")
    _same(sr.PRNGKey(seed), jr.PRNGKey(seed), f"PRNGKey({seed!r})")


def test_raw_keys_and_conversions():
    raw, jraw = sr.PRNGKey(3), jr.PRNGKey(3)
    assert isinstance(raw, np.ndarray) and raw.dtype == np.uint32 and raw.shape == (2,)
    _same(sr.split(raw, 4), jr.split(jraw, 4), "split of a raw key")
    _same(sr.fold_in(raw, 5), jr.fold_in(jraw, 5), "fold_in of a raw key")
    _same(sr.normal(raw, (3,)), jr.normal(jraw, (3,)), "normal of a raw key")
    _same(spmd.jit(lambda k: sr.uniform(k, (2, 2)))(raw), jr.uniform(jraw, (2, 2)), "uniform of a raw key under jit")
    typed = sr.wrap_key_data(raw)
    assert typed.shape == () and str(typed.dtype) == "key<fry>"
    _same(sr.key_data(typed), raw, "key_data(wrap_key_data(raw))")
    keys = sr.split(sr.key(1), (2, 3))
    assert keys.shape == (2, 3) and len(keys) == 2 and keys[1, 2].shape == () and keys[..., 0].shape == (2,)
    _same(sr.key_data(keys[1, 2]), jr.key_data(jr.split(jr.key(1), (2, 3))[1, 2]), "indexing typed keys")
    k1, k2 = sr.split(sr.key(1))                                 # unpacking, as in JAX
    _same(sr.key_data(k2), jr.key_data(jr.split(jr.key(1))[1]), "unpacked key")


def test_typed_keys_pass_through_jit():
    """Keys in and out of jit: the key data is the pytree leaf."""
    out = spmd.jit(lambda k: sr.split(k, 3))(sr.key(0))
    assert isinstance(out, sr.PRNGKeyArray) and out.shape == (3,)
    _same(sr.key_data(out), jr.key_data(jr.split(jr.key(0), 3)), "split under jit")
    _same(sr.normal(out[2], (4,)), jr.normal(jr.split(jr.key(0), 3)[2], (4,)), "a key that came out of jit")
    program = spmd.make_program(lambda k: sr.normal(k, (4,)))(sr.key(0))
    assert "threefry2x32" in str(program)


def test_vmap_over_keys():
    keys, jkeys = sr.split(sr.key(2), 5), jr.split(jr.key(2), 5)
    _same(spmd.vmap(lambda k: sr.normal(k, (3,)))(keys), jax.vmap(lambda k: jr.normal(k, (3,)))(jkeys), "vmap normal")
    _same(spmd.vmap(lambda k: sr.randint(k, (2,), 0, 9))(keys), jax.vmap(lambda k: jr.randint(k, (2,), 0, 9))(jkeys),
          "vmap randint")
    _same(spmd.vmap(lambda k: sr.key_data(sr.split(k)))(keys), jax.vmap(lambda k: jr.key_data(jr.split(k)))(jkeys),
          "vmap split")
    _same(spmd.vmap(lambda s: sr.key_data(sr.key(s)))(np.arange(4, dtype=np.int32)),
          jax.vmap(lambda s: jr.key_data(jr.key(s)))(jnp.arange(4)), "vmap key(seed)")


@pytest.mark.parametrize("sampler", ["normal", "uniform", "bits", "randint", "gamma"])
def test_shard_map_streams_match_jax(sampler):
    """``fold_in(key, axis_index)`` inside shard_map: a stream per device, JAX's bits (gamma:
    its rejection loops run on every device until all devices' draws are accepted)."""
    draw = {"normal": lambda r, k: r.normal(k, (2, 3)), "uniform": lambda r, k: r.uniform(k, (2, 3)),
            "bits": lambda r, k: r.bits(k, (2, 3)), "randint": lambda r, k: r.randint(k, (2, 3), 0, 100),
            "gamma": lambda r, k: r.gamma(k, 2.5, (2, 3))}[sampler]
    mesh, jmesh = spmd.make_mesh((2, 4), ("x", "y")), jax.make_mesh((2, 4), ("x", "y"))

    def body(r, axis_index, k):
        k = r.fold_in(r.fold_in(k, axis_index("x")), axis_index("y"))
        return draw(r, k)[None, None]

    got = spmd.shard_map(lambda k: body(sr, spmd.axis_index, k), mesh=mesh, in_specs=P(),
                         out_specs=P("x", "y"))(sr.key(5))
    want = jax.shard_map(lambda k: body(jr, jax.lax.axis_index, k), mesh=jmesh, in_specs=JP(),
                         out_specs=JP("x", "y"))(jr.key(5))
    _same(got, want, f"{sampler} in shard_map")
    assert len({np.asarray(got)[i, j].tobytes() for i in range(2) for j in range(4)}) == 8   # 8 streams
    jitted = spmd.jit(spmd.shard_map(lambda k: body(sr, spmd.axis_index, k), mesh=mesh, in_specs=P(),
                                     out_specs=P("x", "y")))
    _same(jitted(sr.PRNGKey(5)), want, f"{sampler} in shard_map under jit, raw key")


def test_split_keys_sharded_into_shard_map():
    mesh, jmesh = spmd.make_mesh((8,), ("i",)), jax.make_mesh((8,), ("i",))
    got = spmd.shard_map(lambda k: sr.uniform(k[0], (1, 3)), mesh=mesh, in_specs=P("i"),
                         out_specs=P("i"))(sr.split(sr.key(9), 8))
    jkeys = jax.device_put(jr.split(jr.key(9), 8), jax.sharding.NamedSharding(jmesh, JP("i")))
    want = jax.shard_map(lambda k: jr.uniform(k[0], (1, 3)), mesh=jmesh, in_specs=JP("i"), out_specs=JP("i"))(jkeys)
    _same(got, want, "per-device keys")


def test_sharded_draw_through_the_compiler():
    """A draw whose output is sharded: the compiler splits the elementwise hash, JAX's bits."""
    mesh = spmd.make_mesh((2, 4), ("x", "y"))
    f = spmd.jit(lambda k: sr.uniform(k, (8, 4), minval=-1.0, maxval=3.0),
                 out_shardings=spmd.NamedSharding(mesh, P("x", "y")))
    out = f(sr.key(4))
    assert out.sharding.spec == P("x", "y")
    _same(out, jr.uniform(jr.key(4), (8, 4), minval=-1.0, maxval=3.0), "sharded uniform")


X64_ROWS = {
    "bits": (lambda r, k, s: r.bits(k, s, np.uint64)),
    "uniform": (lambda r, k, s: r.uniform(k, s, np.float64, -3.7, 5.1)),
    "normal": (lambda r, k, s: r.normal(k, s, np.float64)),
    "normal_complex": (lambda r, k, s: r.normal(k, s, np.complex128)),
    "truncated_normal": (lambda r, k, s: r.truncated_normal(k, -1.5, 2.0, s, np.float64)),
    "bernoulli": (lambda r, k, s: r.bernoulli(k, np.float64(0.3), s)),
    "randint": (lambda r, k, s: r.randint(k, s, -5, 2 ** 40, np.int64)),
    "seed": (lambda r, k, s: r.key_data(r.key(np.int64(-2 ** 40 - 3)))),
}


@pytest.mark.parametrize("name", list(X64_ROWS))
def test_64_bit_dtypes_match_jax_x64(name):
    """A 64-bit dtype asked for gives JAX's values under ``jax_enable_x64``."""
    fn = X64_ROWS[name]
    with jax.enable_x64(True):
        whole = np.asarray(fn(jr, jr.key(3), (2000,)))
        for shape in SHAPES[:3] + [(40, 50)]:
            want = whole if name == "seed" else whole[:math.prod(shape)].reshape(shape)
            _same(fn(sr, sr.key(3), shape), want, f"{name}{list(shape)}")


def test_float64_logs_within_an_ulp_of_jax_x64():
    """gumbel in float64 goes through NumPy's log, which differs from XLA's in the last bit
    for about one value in a thousand."""
    with jax.enable_x64(True):
        got, want = sr.gumbel(sr.key(3), (2000,), np.float64), np.asarray(jr.gumbel(jr.key(3), (2000,), np.float64))
    np.testing.assert_array_max_ulp(got, want, maxulp=2)
    assert (got != want).mean() < 0.01


def test_errors_name_the_function_and_argument():
    with pytest.raises(TypeError, match=r"spmd\.random\.normal: argument `key` must be a PRNG key"):
        sr.normal(3, (2,))
    with pytest.raises(TypeError, match=r"spmd\.random\.uniform: argument `key`.*float64\[2\]"):
        sr.uniform(np.zeros(2), (2,))
    with pytest.raises(ValueError, match=r"spmd\.random\.normal accepts a single key.*shape \(3,\)"):
        sr.normal(sr.split(sr.key(0), 3), (2,))
    with pytest.raises(TypeError, match=r"spmd\.random\.split: argument `key`"):
        sr.split([0, 1])
    with pytest.raises(TypeError, match="scalar seed"):
        sr.key(np.arange(2))
    with pytest.raises(ValueError, match="must be a float dtype"):
        sr.uniform(sr.key(0), (2,), np.int32)
    with pytest.raises(TypeError, match="integer dtypes"):
        sr.randint(sr.key(0), (2,), 0, 3, np.float32)
    with pytest.raises(OverflowError):
        sr.fold_in(sr.key(0), -1)
    with pytest.raises(TypeError, match=r"spmd\.random\.normal: argument `key`"):
        spmd.jit(lambda x: sr.normal(x, (2,)))(np.zeros(2, np.float32))


# gamma and the samplers on it: the values depend on the whole shape (a key per element, split
# from the one key), so each shape has its own JAX draw.  Parameters: scalars and an array that
# broadcasts against the shape.  (Each JAX draw compiles for a second or so: few shapes.)
GAMMA_A = {"0.3": 0.3, "1.0": 1.0, "2.5": 2.5, "array": np.array([0.2, 0.9, 1.7, 3.0, 8.5], f32)}
_CI = os.environ.get("CI") == "true"      # fewer JAX compiles in CI; all of them on demand
GAMMA_ROWS = {   # the sampler, its shapes, its parameters
    "gamma": (lambda r, k, s, a: r.gamma(k, a, s), [(), (2, 5)] if _CI else [(), (3,), (2, 5)],
              list(GAMMA_A)),
    "loggamma": (lambda r, k, s, a: r.loggamma(k, a, s), [(2, 5)], ["array"] if _CI else ["0.3", "array"]),
    "beta": (lambda r, k, s, a: r.beta(k, a, 1.5, s), [(2, 5)], ["array"]),
}
GAMMA_CASES = [(name, s) for name, (_, shapes, _) in GAMMA_ROWS.items() for s in shapes]
_jax_c = jax.jit(lambda d: np.float32(1 / 3) / jnp.sqrt(d))


def _rsqrt_as_jax(a, shape):
    """Where the draw's ``1 / sqrt(a - 1/3)`` (``a + 2/3`` below 1) is JAX's: XLA's CPU backend refines the
    processor's approximate reciprocal square root, so for some ``a`` it is an ulp off the
    correctly rounded one spmd uses, and the draw then differs by a few ulps."""
    a = np.asarray(a, f32)
    d = np.where(a >= 1, a, a + np.float32(1)) - np.float32(1 / 3)
    correct = np.float32(1 / 3) * (1 / np.sqrt(d.astype(f64))).astype(f32)
    return np.broadcast_to(np.asarray(_jax_c(d)) == correct, shape)


def _same_where(got, want, exact, what):
    """JAX's bits where ``exact``, within float32 rounding of them elsewhere."""
    _same(np.where(exact, got, want), want, what)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("name,shape", GAMMA_CASES, ids=[f"{n}-{list(s)}" for n, s in GAMMA_CASES])
def test_gamma_family_same_bits_as_jax(name, shape):
    """gamma, loggamma and beta: eager and under jit, several seeds and parameters, JAX's
    float32 bits wherever XLA's reciprocal square root of the parameter is correctly rounded,
    close elsewhere."""
    fn, _, a_names = GAMMA_ROWS[name]
    for a_name in a_names:
        a = GAMMA_A[a_name]
        if np.shape(a) not in ((), shape[-1:]):
            continue
        exact = _rsqrt_as_jax(a, shape) & _rsqrt_as_jax(1.5 if name == "beta" else 1.0, shape)
        for seed in (0, 1, 42):
            want = np.asarray(fn(jr, jr.key(seed), shape, a))
            runs = [("eager", lambda k: fn(sr, k, shape, a))]
            if seed == 0:
                runs.append(("under jit", spmd.jit(lambda k: fn(sr, k, shape, a))))
            for how, draw in runs:
                _same_where(draw(sr.key(seed)), want, exact, f"{name}(a={a_name}){list(shape)} seed {seed} {how}")


def test_gamma_parameters_broadcast_and_raw_keys():
    a, b = np.array([0.9, 3.0, 8.5], f32), np.array([[0.5], [2.0]], f32)
    _same_where(sr.beta(sr.PRNGKey(5), a, b), jr.beta(jr.PRNGKey(5), a, b),
                _rsqrt_as_jax(a, (2, 3)) & _rsqrt_as_jax(b, (2, 3)), "beta, a and b broadcast together, raw key")
    empty = sr.gamma(sr.key(5), 0.5, (0, 3))
    assert empty.shape == (0, 3) and empty.dtype == f32
    with pytest.raises(ValueError, match=r"spmd\.random\.gamma: parameter shapes \[\(3,\)\] must broadcast"):
        sr.gamma(sr.key(0), a, (2,))
    with pytest.raises(ValueError, match="must be a float dtype"):
        sr.beta(sr.key(0), 1.0, 2.0, dtype=np.int32)


_softmax = jax.jit(lambda x: jax.nn.softmax(x, -1))


def test_dirichlet_is_the_softmax_of_jax_log_gammas():
    """dirichlet's bits are those of the softmax of JAX's log-gamma draw (for parameters whose
    reciprocal square roots are JAX's); JAX's own dirichlet fuses the two, and XLA then rounds
    a few elements differently, by a few ulps."""
    alpha = GAMMA_A["array"]
    alpha = alpha[_rsqrt_as_jax(alpha, alpha.shape)]
    for seed in (0, 1):
        got = sr.dirichlet(sr.key(seed), alpha, (2, 3))
        _same(got, _softmax(jr.loggamma(jr.key(seed), alpha, (2, 3) + alpha.shape)), f"dirichlet seed {seed}")
        np.testing.assert_allclose(got, jr.dirichlet(jr.key(seed), alpha, (2, 3)), rtol=1e-5, atol=1e-7)
    _same(spmd.jit(lambda k: sr.dirichlet(k, alpha, (2, 3)))(sr.key(3)),
          _softmax(jr.loggamma(jr.key(3), alpha, (2, 3) + alpha.shape)), "dirichlet under jit")


def test_gamma_float64_close_to_jax_x64():
    """In float64 the logs are NumPy's (see above) and the power too: a few ulps."""
    with jax.enable_x64(True):
        got = sr.gamma(sr.key(4), 0.6, (2, 5), np.float64)
        want = np.asarray(jr.gamma(jr.key(4), 0.6, (2, 5), np.float64))
    assert got.dtype == want.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13)
