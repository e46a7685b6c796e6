"""The redistribution table and planner: every (source, destination) pair of specs for a 3-D
array on a 2x4 mesh reshards correctly, plans never cost more than gather-then-slice, and
every row of the table is exercised (including pending reductions)."""
import itertools

import numpy as np
import pytest

import spmd
from spmd import P, NamedSharding
from spmd.compiler.cost import CPU, GPU, CostModel
from spmd.compiler.placements import Partial, Replicate, Shard, Sharding
from spmd.compiler.redistribute import apply, plan
from spmd.core import Aval, Eqn, Params, Program, Var, trace
from spmd.shard_map import shard_map_p

MESH = spmd.make_mesh((2, 4), ("data", "model"))
SIZES = {"data": 2, "model": 4}
MS = tuple(SIZES.items())


def all_specs(ndim=3):
    """Every way to place the two mesh axes on the dims of a rank-``ndim`` array."""
    out = []
    for dd, dm in itertools.product(range(-1, ndim), repeat=2):
        dims = [[] for _ in range(ndim)]
        if dd >= 0:
            dims[dd].append("data")
        if dm >= 0:
            dims[dm].append("model")
        orders = [dims]
        if dd == dm and dd >= 0:
            swapped = [list(a) for a in dims]
            swapped[dd] = ["model", "data"]
            orders.append(swapped)
        for o in orders:
            out.append(Sharding(tuple(tuple(a) for a in o)))
    return out


SPECS = all_specs()


def test_spec_count():
    assert len(SPECS) == 19


def test_all_pairs_reshard_exactly():
    x = np.arange(8 * 16 * 8, dtype=np.float32).reshape(8, 16, 8)
    for src in SPECS:
        a = spmd.device_put(x, NamedSharding(MESH, src.spec))
        for dst in SPECS:
            b = spmd.reshard(a, NamedSharding(MESH, dst.spec))
            assert b.sharding.spec == dst.spec
            np.testing.assert_array_equal(np.asarray(b), x, err_msg=f"{src} -> {dst}")
            for sh in b.addressable_shards:
                np.testing.assert_array_equal(sh.data, x[sh.index])


def _gather_then_slice(src, dst, shape, itemsize, cm):
    """The naive route: reduce pending sums, gather every sharded dim, slice to ``dst``."""
    mid = Sharding(((),) * len(shape))
    return plan(shape, itemsize, src, mid, MS, cm).time + plan(shape, itemsize, mid, dst, MS, cm).time


@pytest.mark.parametrize("cm", [CPU, GPU, CPU.with_axes(model=(1e-6, 1e12))], ids=["cpu", "gpu", "fast-model"])
def test_plans_never_cost_more_than_gather_then_slice(cm):
    shape = (8, 16, 8)
    for src, dst in itertools.product(SPECS, SPECS):
        p = plan(shape, 4, src, dst, MS, cm)
        assert p.time <= _gather_then_slice(src, dst, shape, 4, cm) + 1e-15
        assert p.steps == () or p.steps[-1].dst == dst
        for s, t in zip(p.steps, p.steps[1:]):
            assert s.dst == t.src


def _run_plan(x, src, dst, start=None):
    """Run ``plan(start -> src)`` then ``plan(src -> dst)`` in a per-device program (``start``
    defaults to ``src`` without its pending reductions) and return the global result."""
    start = start or src.without_partial()
    shape = x.shape
    p1 = plan(shape, x.itemsize, start, src, MS, CPU)
    p2 = plan(shape, x.itemsize, src, dst, MS, CPU)
    aval = Aval(start.local_shape(shape, SIZES), x.dtype, frozenset(start.used_axes))
    body, _ = trace(lambda b: [apply(apply(b, p1, shape, SIZES), p2, shape, SIZES)], [aval],
                    mesh=MESH, manual_axes=MESH.axis_names)
    params = Params(body=body, mesh=MESH, in_specs=(start.spec,), out_specs=(dst.spec,),
                    manual_axes=MESH.axis_names, check_vma=True, name="plan")
    v = Var(Aval(shape, x.dtype))
    outs = [Var(a) for a in shard_map_p.abstract_eval(v.aval, **params)]
    prog = Program([v], [Eqn(shard_map_p, [v], params, outs)], outs)
    arr = spmd.device_put(x, NamedSharding(MESH, start.spec))
    out = spmd.executors.StackedExecutor().run(prog, [arr])[0]
    return np.asarray(out)[tuple(slice(0, d) for d in shape)], p2


def _kinds(p):
    return [s.kind for s in p.steps]


# one row per transition of the table: (name, source, destination, steps the planner must
# choose).  A source pending a reduction is made from a replicated x by the R->P row, so
# the global value is x throughout.
R3 = Sharding(((), (), ()))
ROWS = [
    ("S->R all_gather", Sharding((("data",), (), ())), R3, ["all_gather"]),
    ("R->S slice", R3, Sharding(((), ("model",), ())), ["slice"]),
    ("P->R psum", Sharding(((), (), ()), (("model", "sum"),)), R3, ["psum"]),
    ("P->S psum_scatter", Sharding(((), (), ()), (("model", "sum"),)), Sharding((("model",), (), ())),
     ["psum_scatter"]),
    ("S(i)->S(j) all_to_all", Sharding((("model",), (), ())), Sharding(((), ("model",), ())), ["all_to_all"]),
    ("axis move ppermute", Sharding((("data",), (), ())), Sharding((("model",), (), ())), None),
    ("R->P mask", R3, Sharding(((), (), ()), (("data", "sum"),)), ["mask"]),
    ("P(max)->R pmax", Sharding(((), (), ()), (("data", "max"),)), R3, ["pmax"]),
    ("two pending axes, one psum", Sharding(((), (), ()), (("data", "sum"), ("model", "sum"))), R3,
     ["psum"]),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_transition_rows(row):
    name, src, dst, kinds = row
    x = np.arange(8 * 8 * 4, dtype=np.float64).reshape(8, 8, 4)
    got, p = _run_plan(x, src, dst)
    if kinds is not None:
        assert _kinds(p) == kinds
    # (a destination pending a sum shows device 0's block, which holds x)
    np.testing.assert_allclose(got, x)


def test_axis_move_uses_ppermute_when_sizes_match():
    mesh_sizes = (("a", 4), ("b", 4))
    src, dst = Sharding((("a",), ())), Sharding((("b",), ()))
    p = plan((16, 4), 4, src, dst, mesh_sizes, CPU)
    assert _kinds(p) == ["ppermute"]


def test_ppermute_row_runs():
    mesh = spmd.make_mesh((2, 2), ("a", "b"), devices=spmd.devices()[:4])
    x = np.arange(8 * 3.).reshape(8, 3)
    a = spmd.device_put(x, NamedSharding(mesh, P("a")))
    b = spmd.reshard(a, NamedSharding(mesh, P("b")))
    np.testing.assert_array_equal(np.asarray(b), x)
    from spmd.jit import _reshard_compiled
    comp = _reshard_compiled((8, 3), x.dtype, mesh, P("a"), P("b"))
    assert comp.collectives() == [("ppermute", ("a", "b"))]


@pytest.mark.parametrize("shape", [(5, 7, 3), (3, 9, 2)])
def test_uneven_pairs(shape):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    specs = SPECS[::3]
    for src in specs:
        a = spmd.device_put(x, NamedSharding(MESH, src.spec))
        for dst in specs:
            b = spmd.reshard(a, NamedSharding(MESH, dst.spec))
            np.testing.assert_array_equal(np.asarray(b), x, err_msg=f"{src} -> {dst}")


def test_placements_print_short():
    s = Sharding((("data",), (), ("model",)), (("x", "sum"),))
    assert str(s) == "[data,-,model]+P(sum:x)"
    assert s.placements(("data", "model", "x")) == (Shard(0), Shard(2), Partial("sum"))
    assert repr(Replicate()) == "R" and repr(Shard(1)) == "S(1)" and repr(Partial()) == "P(sum)"
    assert Sharding.from_spec(P("data", ("model", "x")), 3).spec == P("data", ("model", "x"))


def test_cost_model_busbw():
    sizes = {"a": 4}
    cm = CostModel(alpha=0.0, bandwidth=1.0)
    assert cm.time("all_reduce", 100, ("a",), sizes) == pytest.approx(100 * 2 * 3 / 4)
    assert cm.time("all_reduce", 100, ("a",), {"a": 1}) == 0
    assert cm.time("all_gather", 100, ("a",), sizes) == pytest.approx(75)
    assert cm.time("reduce_scatter", 100, ("a",), sizes) == pytest.approx(75)
    assert cm.time("all_to_all", 100, ("a",), sizes) == pytest.approx(75)
    slow = cm.with_axes(a=(1.0, 0.5))
    assert slow.time("permute", 100, ("a",), sizes) == pytest.approx(1 + 200)


def test_axis_bandwidth_changes_the_plan():
    src = Sharding((("data",), ()), (("model", "sum"),))
    dst = Sharding(((), ()))
    shape = (1024, 1024)
    fast = plan(shape, 4, src, dst, MS, CPU)
    slow_model = plan(shape, 4, src, dst, MS, CPU.with_axes(model=(5e-6, 1e8)))
    assert _kinds(fast) == ["psum_scatter", "all_gather"]        # reduce-scatter + one 8-way gather
    assert _kinds(slow_model) == ["psum", "all_gather"]          # less traffic on the slow axis
    assert [s.axes for s in slow_model.steps] == [("model",), ("data",)]


def test_set_cost_model_reaches_jit():
    from spmd.compiler.cost import set_cost_model
    mesh = MESH
    f = spmd.jit(lambda x: x, in_shardings=NamedSharding(mesh, P(("data", "model"))), out_shardings=NamedSharding(mesh, P()))
    x = np.ones((64, 4), np.float32)
    with set_cost_model(GPU):
        t_gpu = sum(i.time for i in f.lower(x).compiled.inserted)
    t_cpu = sum(i.time for i in f.lower(x).compiled.inserted)
    assert t_gpu != t_cpu
