"""Sharding rules on Explicit axes, one row per op: for random Explicit shardings of the
operands on 1-D and 2-D meshes, the type spmd gives the result equals ``jax.typeof`` of the
same program traced by JAX (abstractly: ``jax.eval_shape``), or both refuse the program.

Both frameworks trace without running anything, so the whole table takes seconds.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.core import ShardingTypeError   # JAX raises it, but exports it under no public name

import spmd
from spmd import P
from spmd.core import Aval, trace
from spmd.sharding import NamedSharding, sharding_type

# name, the program (``xp`` is numpy for spmd, jax.numpy for JAX), operand shapes
OPS = [
    ("add", lambda xp, x, y: x + y, [(8, 16), (8, 16)]),
    ("mul row broadcast", lambda xp, x, y: x * y, [(8, 16), (16,)]),
    ("sub column broadcast", lambda xp, x, y: x - y, [(8, 16), (8, 1)]),
    ("maximum", lambda xp, x, y: xp.maximum(x, y), [(8, 16), (8, 16)]),
    ("where", lambda xp, x, y: xp.where(x > 0, x, y), [(8, 16), (8, 16)]),
    ("add rank 3", lambda xp, x, y: x + y, [(4, 8, 16), (4, 8, 16)]),
    ("tanh", lambda xp, x: xp.tanh(x), [(8, 16)]),
    ("scale", lambda xp, x: x * 2.0 + 1.0, [(8, 16)]),
    ("sum axis 0", lambda xp, x: x.sum(0), [(8, 16)]),
    ("sum axis 1", lambda xp, x: x.sum(axis=1), [(8, 16)]),
    ("sum all", lambda xp, x: x.sum(), [(8, 16)]),
    ("max axis 1", lambda xp, x: x.max(axis=1), [(8, 16)]),
    ("sum rank 3", lambda xp, x: x.sum(axis=(0, 2)), [(4, 8, 16)]),
    ("argmax", lambda xp, x: xp.argmax(x, axis=1), [(8, 16)]),
    ("transpose", lambda xp, x: x.T, [(8, 16)]),
    ("transpose rank 3", lambda xp, x: xp.transpose(x, (2, 0, 1)), [(4, 8, 16)]),
    ("reshape flatten", lambda xp, x: x.reshape(128), [(8, 16)]),
    ("reshape split last", lambda xp, x: x.reshape(8, 4, 4), [(8, 16)]),
    ("reshape split first", lambda xp, x: x.reshape(2, 4, 16), [(8, 16)]),
    ("reshape merge last", lambda xp, x: x.reshape(8, 16), [(8, 4, 4)]),
    ("reshape merge first", lambda xp, x: x.reshape(8, 16), [(2, 4, 16)]),
    ("reshape add 1", lambda xp, x: x.reshape(8, 1, 16), [(8, 16)]),
    ("reshape drop 1", lambda xp, x: x.reshape(8, 16), [(8, 1, 16)]),
    ("reshape two groups", lambda xp, x: x.reshape(4, 2, 4, 4), [(8, 16)]),
    ("broadcast_to", lambda xp, x: xp.broadcast_to(x, (8, 16)), [(16,)]),
    ("matmul", lambda xp, x, y: x @ y, [(8, 16), (16, 8)]),
    ("matvec", lambda xp, x, y: x @ y, [(8, 16), (16,)]),
    ("matmul transposed", lambda xp, x, y: x @ y.T, [(8, 16), (8, 16)]),
    ("einsum batch", lambda xp, x, y: xp.einsum("bij,bjk->bik", x, y), [(4, 8, 16), (4, 16, 8)]),
    ("einsum outer", lambda xp, x, y: xp.einsum("i,j->ij", x, y), [(8,), (16,)]),
    ("concatenate 0", lambda xp, x, y: xp.concatenate([x, y], axis=0), [(8, 16), (8, 16)]),
    ("concatenate 1", lambda xp, x, y: xp.concatenate([x, y], axis=1), [(8, 16), (8, 16)]),
    ("slice rows", lambda xp, x: x[4:8], [(8, 16)]),
    ("slice columns", lambda xp, x: x[:, 4:12], [(8, 16)]),
    ("slice odd", lambda xp, x: x[1:4], [(8, 16)]),
    ("integer index", lambda xp, x: x[3], [(8, 16)]),
    ("cumsum", lambda xp, x: xp.cumsum(x, axis=1), [(8, 16)]),
    ("sort", lambda xp, x: xp.sort(x, axis=0), [(8, 16)]),
    ("pad", lambda xp, x: xp.pad(x, ((0, 0), (4, 4))), [(8, 16)]),
    ("take", lambda xp, x: xp.take(x, xp.asarray([1, 2, 3, 0]), axis=1), [(8, 16)]),
    ("index array", lambda xp, x: x[xp.asarray([0, 2])], [(8, 16)]),
    ("flip", lambda xp, x: xp.flip(x, 0), [(8, 16)]),
    ("stack", lambda xp, x, y: xp.stack([x, y]), [(8, 16), (8, 16)]),
    ("mean and var", lambda xp, x: x.mean(0) + x.var(0), [(8, 16)]),
    ("softmax", lambda xp, x: xp.exp(x) / xp.exp(x).sum(axis=1, keepdims=True), [(8, 16)]),
]

MESHES = {1: ((4,), ("x",)), 2: ((2, 4), ("x", "y"))}
CASES_PER_MESH = 6


def _dim_choices(size: int, mesh_sizes: dict) -> list:
    """Spec entries that split a dim of ``size`` evenly (JAX needs even splits)."""
    names = list(mesh_sizes)
    out = [None]
    for k in (1, 2):
        for axes in itertools.permutations(names, k):
            parts = int(np.prod([mesh_sizes[a] for a in axes]))
            if size > 1 and size % parts == 0:
                out.append(axes[0] if k == 1 else axes)
    return out


def _random_spec(rng, shape, mesh_sizes):
    while True:       # redraw until no mesh axis splits two dims
        spec = [_dim_choices(n, mesh_sizes)[rng.integers(len(_dim_choices(n, mesh_sizes)))]
                for n in shape]
        used = [a for e in spec if e for a in ((e,) if isinstance(e, str) else e)]
        if len(set(used)) == len(used):
            return tuple(spec)


def _cases():
    rng = np.random.default_rng(13)
    cases = []
    for name, fn, shapes in OPS:
        for rank in MESHES:
            sizes = dict(zip(MESHES[rank][1], MESHES[rank][0]))
            seen = set()
            for _ in range(4 * CASES_PER_MESH):
                specs = tuple(_random_spec(rng, s, sizes) for s in shapes)
                if specs not in seen:
                    seen.add(specs)
                if len(seen) == CASES_PER_MESH:
                    break
            cases += [(name, fn, shapes, rank, specs) for specs in sorted(seen, key=repr)]
    return cases


CASES = _cases()


def _jax_type(fn, shapes, rank, specs) -> str:
    mesh = jax.make_mesh(*MESHES[rank])
    args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=jax.NamedSharding(mesh, P_jax(sp)))
            for s, sp in zip(shapes, specs)]
    seen = []

    def f(*xs):
        out = fn(jnp, *xs)
        seen.append(str(jax.typeof(out)))
        return out
    try:
        jax.eval_shape(f, *args)
    except ShardingTypeError:
        return "raises"
    return seen[0].split("[", 1)[1]        # the dims with their axes (dtype rules differ: x64)


def P_jax(spec):
    return jax.sharding.PartitionSpec(*spec)


def _spmd_type(fn, shapes, rank, specs) -> str:
    mesh = spmd.make_mesh(*MESHES[rank])
    avals = [Aval(s, np.dtype(np.float32),
                  sharding=sharding_type(NamedSharding(mesh, P(*sp)), len(s)))
             for s, sp in zip(shapes, specs)]
    seen = []

    def f(*xs):
        out = fn(np, *xs)
        seen.append(str(spmd.typeof(out)))
        return [out]
    try:
        trace(f, avals)
    except spmd.ShardingError:
        return "raises"
    return seen[0].split("[", 1)[1]


def test_table_is_large_and_mixed():
    assert len(CASES) >= 300
    assert {name for name, *_ in CASES} == {name for name, *_ in OPS}


@pytest.mark.parametrize("name, fn, shapes, rank, specs", CASES,
                         ids=[f"{c[0]}-{c[3]}d-{c[4]}" for c in CASES])
def test_output_type_equals_jax(name, fn, shapes, rank, specs):
    assert _spmd_type(fn, shapes, rank, specs) == _jax_type(fn, shapes, rank, specs)
