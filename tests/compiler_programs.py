"""The program table of the sharding compiler's tests and benchmarks.

Each row: a program written against an array namespace ``xp`` (NumPy for spmd and the
reference, ``jax.numpy`` for the JAX comparison), argument shapes, a mesh, in/out specs, and
the exact collectives spmd must insert (``"kind(axes)"``, order-free).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np


@dataclasses.dataclass
class Row:
    name: str
    fn: Callable                 # fn(xp, *args)
    shapes: tuple                # shapes of the arguments; ("int", shape, high) for indices
    mesh: tuple                  # ((sizes), (names))
    in_specs: tuple              # one spec (tuple of entries) per argument
    out_specs: object            # a spec (tuple of entries), or a list of them for several outputs
    expect: list                 # ["psum(model)", ...]
    jax: bool = True             # JAX can run the same program


MESH2 = ((2, 4), ("data", "model"))
MESH1 = ((8,), ("x",))


def softmax(xp, x, axis=-1):
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def layer_norm(xp, x, g, b):
    mu = xp.mean(x, axis=-1, keepdims=True)
    var = xp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return (x - mu) / xp.sqrt(var + 1e-5) * g + b


def mlp(xp, x, w1, b1, w2):
    return xp.tanh(x @ w1 + b1) @ w2


def attention(xp, q, k, v):
    s = xp.einsum("bhsd,bhtd->bhst", q, k) / 4.0
    return xp.einsum("bhst,bhtd->bhsd", softmax(xp, s), v)


def attention_proj(xp, q, k, v, wo):
    o = attention(xp, q, k, v)                       # b h s d
    return xp.einsum("bhsd,hde->bse", o, wo)


def mlp_grads(xp, w1, w2, x, y):
    """Forward and backward of a two-layer MLP: the gradients of a squared loss."""
    def loss(params):
        a, b = params
        return xp.sum((xp.tanh(x @ a) @ b - y) ** 2)
    if xp is np:
        import spmd
        return spmd.grad(loss)((w1, w2))
    import jax
    return jax.grad(loss)((w1, w2))


def grad_dp(xp, x, w, y):
    """The weight gradient of a least-squares layer, written out: x^T (x w - y)."""
    return x.T @ (x @ w - y)


def reduced_then_nonlinear(xp, x, w, s, t):
    """A row-parallel product read by a reduction and then by a nonlinearity (a layer norm's
    backward): reduced once, right after the product, not once per reader."""
    u = (x @ w) * s
    r = xp.sum(u * t, axis=1, keepdims=True)
    return r + xp.tanh(u)


def summed_then_nonlinear(xp, x, w):
    """A row-parallel product summed (a bias gradient) and then read by a nonlinearity: the
    sum reads the reduced product, which the nonlinearity needs anyway."""
    y = x @ w
    return xp.sum(y, axis=1, keepdims=True) + xp.tanh(y)


def scatter_add(xp, t, i, u):
    """``t`` with rows ``u`` added at ``i`` (the embedding gradient's primitive)."""
    from spmd import prims
    from spmd.core import bind
    return bind(prims.scatter_add_p, t, i, u, axis=0)


ROWS = [
    Row("matmul batch x cols", lambda xp, x, w: x @ w, ((8, 16), (16, 8)), MESH2,
        (("data",), (None, "model")), ("data", "model"), []),
    Row("matmul contract sharded -> R", lambda xp, x, w: x @ w, ((8, 16), (16, 8)), MESH2,
        ((None, "model"), ("model",)), (), ["psum(model)"]),
    Row("matmul contract sharded -> S", lambda xp, x, w: x @ w, ((8, 16), (16, 8)), MESH2,
        ((None, "model"), ("model",)), ("model",), ["psum_scatter(model)"]),
    Row("matmul chain megatron", lambda xp, x, w1, w2: (x @ w1) @ w2, ((8, 16), (16, 32), (32, 16)), MESH2,
        (("data",), (None, "model"), ("model",)), ("data",), ["psum(model)"]),
    Row("row-parallel product read twice", reduced_then_nonlinear,
        ((32, 64), (64, 64), (32, 64), (32, 64)), MESH2,
        ((None, "model"), ("model",), (), ()), (), ["psum(model)"]),
    Row("row-parallel product summed first", summed_then_nonlinear, ((32, 64), (64, 64)), MESH2,
        ((None, "model"), ("model",)), (), ["psum(model)"]),
    Row("matmul chain of three", lambda xp, x, a, b, c: x @ a @ b @ c, ((8, 8), (8, 16), (16, 8), (8, 8)),
        MESH2, (("data",), (None, "model"), ("model",), ()), ("data",), ["psum(model)"]),
    Row("matmul weight gathered", lambda xp, x, w: x @ w, ((16, 8), (8, 8)), MESH1,
        (("x",), ("x",)), ("x",), ["all_gather(x)"]),
    Row("mlp megatron fwd", mlp, ((8, 16), (16, 32), (32,), (32, 16)), MESH2,
        (("data",), (None, "model"), ("model",), ("model",)), ("data",), ["psum(model)"]),
    Row("mlp data parallel fwd", mlp, ((16, 8), (8, 8), (8,), (8, 8)), MESH1,
        (("x",), (), (), ()), ("x",), []),
    Row("mlp out replicated", mlp, ((8, 16), (16, 32), (32,), (32, 16)), MESH2,
        (("data",), (None, "model"), ("model",), ("model",)), (),
        ["psum_scatter(model)", "all_gather(data,model)"]),
    Row("dp weight gradient (psum)", grad_dp, ((16, 8), (8, 4), (16, 4)), MESH1,
        (("x",), (), ("x",)), (), ["psum(x)"]),
    Row("zero weight gradient (psum_scatter)", grad_dp, ((16, 8), (8, 4), (16, 4)), MESH1,
        (("x",), (), ("x",)), ("x",), ["psum_scatter(x)"]),
    Row("mlp megatron fwd+bwd", mlp_grads, ((16, 32), (32, 16), (8, 16), (8, 16)), MESH2,
        ((None, "model"), ("model",), ("data",), ("data",)), [(None, "model"), ("model",)],
        ["psum(model)", "psum(data)"]),                       # both gradients in one psum
    Row("mlp data parallel fwd+bwd", mlp_grads, ((8, 8), (8, 8), (16, 8), (16, 8)), MESH1,
        ((), (), ("x",), ("x",)), [(), ()], ["psum(x)"]),
    Row("mlp zero fwd+bwd", mlp_grads, ((8, 8), (8, 8), (16, 8), (16, 8)), MESH1,
        ((), (), ("x",), ("x",)), [("x",), ("x",)], ["psum_scatter(x)"]),
    Row("attention heads sharded", attention, ((2, 4, 8, 4),) * 3, MESH2,
        (("data", "model"),) * 3, ("data", "model"), []),
    Row("attention + out projection", attention_proj, ((2, 4, 8, 4),) * 3 + ((4, 4, 8),), MESH2,
        (("data", "model"),) * 3 + (("model",),), ("data",), ["psum(model)"]),
    Row("attention seq sharded keys", attention, ((2, 4, 8, 4),) * 3, MESH1,
        ((None, None, "x"),) * 3, (None, None, "x"), ["all_gather(x)", "all_gather(x)"]),
    Row("layer norm batch sharded", layer_norm, ((8, 16), (16,), (16,)), MESH2,
        (("data",), (), ()), ("data",), []),
    Row("layer norm features sharded", layer_norm, ((8, 16), (16,), (16,)), MESH2,
        (("data", "model"), ("model",), ("model",)), ("data", "model"), ["psum(model)", "psum(model)"]),
    Row("softmax over sharded dim", lambda xp, x: softmax(xp, x), ((8, 16),), MESH2,
        (("data", "model"),), ("data", "model"), ["pmax(model)", "psum(model)"]),
    Row("softmax over replicated dim", lambda xp, x: softmax(xp, x), ((8, 16),), MESH1,
        (("x",),), ("x",), []),
    Row("embedding vocab sharded", lambda xp, t, i: t[i], ((256, 8), ("int", (4, 6), 256)), MESH2,
        (("model",), ()), (), ["psum(model)"]),
    Row("embedding vocab x batch", lambda xp, t, i: t[i], ((256, 8), ("int", (4, 6), 256)), MESH2,
        (("model",), ("data",)), ("data",), ["psum(model)"]),
    Row("scatter-add into row-sharded table", scatter_add, ((64, 8), ("int", (10,), 64), (10, 8)), MESH2,
        (("model",), (), ()), ("model",), [], jax=False),
    Row("scatter-add, updates batch-sharded", scatter_add, ((64, 8), ("int", (16,), 64), (16, 8)), MESH2,
        (("model",), ("data",), ("data",)), ("model",), ["all_gather(data)", "all_gather(data)"], jax=False),
    Row("sum over sharded dim", lambda xp, x: x.sum(0), ((8, 16),), MESH2,
        (("data", "model"),), ("model",), ["psum(data)"]),
    Row("sum of everything", lambda xp, x: x.sum(), ((8, 16),), MESH2,
        (("data", "model"),), (), ["psum(data,model)"]),
    Row("max over sharded dim", lambda xp, x: x.max(1), ((8, 16),), MESH2,
        (("data", "model"),), ("data",), ["pmax(model)"]),
    Row("mean over sharded dim", lambda xp, x: xp.mean(x, axis=0), ((16, 4),), MESH1,
        (("x",),), (), ["psum(x)"]),
    Row("reshape merge sharded major", lambda xp, x: x.reshape(8, 24), ((8, 4, 6),), MESH2,
        (("data",),), ("data",), []),
    Row("reshape split sharded major", lambda xp, x: x.reshape(8, 4, 6), ((8, 24),), MESH2,
        (("data", "model"),), ("data", "model"), []),
    Row("reshape merge two sharded", lambda xp, x: x.reshape(64), ((8, 8),), MESH2,
        (("data", "model"),), (("data", "model"),), ["all_to_all(model)"]),
    Row("transpose", lambda xp, x: x.T, ((8, 16),), MESH2,
        (("data", "model"),), ("model", "data"), []),
    Row("transpose keep layout", lambda xp, x: x.T, ((8, 8),), MESH1,
        (("x",),), ("x",), ["all_to_all(x)"]),
    Row("concatenate along sharded dim", lambda xp, x, y: xp.concatenate([x, y], 0), ((8, 4), (8, 4)), MESH1,
        (("x",), ("x",)), ("x",), ["all_gather(x)", "all_gather(x)"]),
    Row("concatenate along other dim", lambda xp, x, y: xp.concatenate([x, y], 1), ((8, 4), (8, 4)), MESH1,
        (("x",), ("x",)), ("x",), []),
    Row("slice of unsharded dim", lambda xp, x: x[:, 2:6], ((16, 8),), MESH1,
        (("x",),), ("x",), []),
    Row("partial through linear ops", lambda xp, x, w, v: 2 * (x @ w) - x @ v, ((8, 16), (16, 8), (16, 8)), MESH2,
        ((None, "model"), ("model",), ("model",)), (), ["psum(model)"]),
    Row("pad a partial sum with zeros", lambda xp, x, w: xp.pad(x @ w, ((0, 0), (2, 2))),
        ((8, 64), (64, 64)), MESH2, ((None, "model"), ("model",)), (None, "model"),
        ["psum_scatter(model)"], jax=False),      # JAX all-reduces first: fewer bytes, more time
    Row("pad a partial sum with a constant: reduced first",
        lambda xp, x, w: xp.pad(x @ w, ((0, 0), (2, 2)), constant_values=5.0),
        ((8, 64), (64, 64)), MESH2, ((None, "model"), ("model",)), (None, "model"),
        ["psum(model)"]),
    Row("mismatched elementwise", lambda xp, x, y: x + y, ((8, 8), (8, 8)), MESH1,
        (("x",), (None, "x")), ("x",), ["all_to_all(x)"]),
    Row("bias broadcast", lambda xp, x, b: x + b, ((8, 16), (16,)), MESH2,
        (("data", "model"), ("model",)), ("data", "model"), []),
    Row("argmax over replicated dim", lambda xp, x: xp.argmax(x, axis=1), ((16, 8),), MESH1,
        (("x",),), ("x",), []),
    Row("cumsum along replicated dim", lambda xp, x: xp.cumsum(x, axis=1), ((16, 8),), MESH1,
        (("x",),), ("x",), []),
    Row("uneven sum", lambda xp, x: x.sum(0), ((7, 5),), MESH2,
        (("data", "model"),), (), ["psum(data)", "all_gather(model)"], jax=False),
    Row("uneven softmax", lambda xp, x: softmax(xp, x), ((6, 10),), MESH2,
        (("data", "model"),), ("data", "model"), ["pmax(model)", "psum(model)"], jax=False),
    Row("uneven matmul", lambda xp, x, w: x @ w, ((6, 10), (10, 3)), MESH2,
        ((None, "model"), ("model",)), (), ["psum(model)"], jax=False),
    Row("uneven max", lambda xp, x: x.max(), ((5, 7),), MESH2,
        (("data", "model"),), (), ["pmax(data,model)"], jax=False),
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def out_shardings(row, mesh, named_sharding, spec):
    """The row's out_shardings, built with either library's NamedSharding / PartitionSpec."""
    if isinstance(row.out_specs, list):
        return tuple(named_sharding(mesh, spec(*s)) for s in row.out_specs)
    return named_sharding(mesh, spec(*row.out_specs))


def make_args(row, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for s in row.shapes:
        if s and s[0] == "int":
            out.append(rng.integers(0, s[2], size=s[1]).astype(np.int32))
        else:
            out.append(rng.normal(size=s).astype(np.float32))
    return out


_COLL = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
_SHAPE = re.compile(r"(pred|s8|s16|s32|s64|u8|u16|u32|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def hlo_collectives(text: str) -> list[tuple[str, int]]:
    """(op, bytes per device) for every collective in compiled HLO text."""
    out = []
    for line in text.splitlines():
        m = _COLL.search(line)
        if not m:
            continue
        sizes = [_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d])) for t, dims in
                 _SHAPE.findall(m.group(1))]
        out.append((m.group(2), max(sizes) if m.group(3) else sum(sizes)))
    return out
