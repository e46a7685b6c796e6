"""Bad input to shard_map and the collectives: one row per mistake.

Each row checks the exception type, that spmd raised it on purpose (one of its own types, or
from a frame inside spmd/), and that the message names what the user needs to find the
mistake: the user's function, the argument or output path, and the mesh axis, where they
apply.  The user functions below have distinctive names so the check is meaningful.
"""
import os

import numpy as np
import pytest

import spmd
from spmd import P, psum

SPMD_DIR = os.path.dirname(spmd.__file__)
X = np.arange(64.).reshape(8, 8)


def _mesh():
    return spmd.make_mesh((2, 4), ("data", "model"))


def run(body, in_specs=P("data", "model"), out_specs=P("data", "model"), args=(X,), **kw):
    """A thunk that calls ``shard_map(body, ...)`` on ``args``."""
    return lambda: spmd.shard_map(body, mesh=_mesh(), in_specs=in_specs, out_specs=out_specs,
                                  **kw)(*args)


# -- the user's functions ------------------------------------------------------------------------

def sum_over_rows(x):
    return psum(x, "rows")


def twice(x):
    return x * 2


def pair_sum(x, y):
    return x + y


def keep_block(x):
    return x


def dict_out(x):
    return {"loss": x.sum(), "acc": psum(x.sum(), "model")}


def total_twice(x):
    return psum(psum(x, "model"), "model")


def total_of_constant(x):
    return psum(np.ones(3), "data") + x.sum()


def scatter_invariant(x):
    return spmd.psum_scatter(psum(x, "model"), "model", tiled=True)


def shift_bad_source(x):
    return spmd.ppermute(x, "model", [(0, 1), (0, 2)])


def shift_bad_dest(x):
    return spmd.ppermute(x, "model", [(0, 1), (2, 1)])


def shift_out_of_range(x):
    return spmd.ppermute(x, "model", [(0, 4)])


def swap_uneven(x):
    return spmd.all_to_all(x[:3], "model", 0, 1, tiled=True)


def swap_untiled_wrong_size(x):
    return spmd.all_to_all(x, "model", 1, 0)                  # dim 1 has size 2, not 4


def scatter_uneven(x):
    return spmd.psum_scatter(x[:3], "model", tiled=True)


def scatter_untiled_wrong_size(x):
    return spmd.psum_scatter(x, "model", scatter_dimension=1)  # size 2, not 4


def groups_missing_index(x):
    return psum(x, "model", axis_index_groups=[[0, 1], [2]])


def groups_unequal(x):
    return psum(x, "model", axis_index_groups=[[0, 1, 2], [3]])


def groups_repeated(x):
    return spmd.all_gather(x, "model", axis_index_groups=[[0, 1], [1, 2]])


def groups_out_of_range(x):
    return psum(x, "model", axis_index_groups=[[0, 1], [2, 7]])


def broadcast_bad_source(x):
    return spmd.pbroadcast(x, "model", 4)


def axis_twice(x):
    return psum(x, ("model", "model"))


def gather_bad_to(x):
    return spmd.all_gather(x, "model", to="replicated")


def gather_bad_axis(x):
    return spmd.all_gather(x, "model", axis=3)


def uses_fft(x):
    return np.fft.fft(x)


def to_float(x):
    return float(x.sum())


def to_host_array(x):
    return np.asarray(x) + 1


def take_item(x):
    return x.sum().item()


def branch_on_value(x):
    if x.sum() > 0:
        return x
    return -x


def shift_float_bits(x):
    return np.left_shift(x, 1)


def and_float_int(x):
    return np.bitwise_and(x, x.astype(np.int32))


def accumulate_float_into_int(x):
    acc = np.zeros(x.shape, np.int32) + x.astype(np.int32)
    acc += x * 0.5
    return acc


def write_into_out(x):
    return np.add(x, 1, out=np.zeros((4, 2)))


def jitted_psum(x):
    return psum(x, "data")


def axis_index_bad(x):
    return spmd.axis_index("batch") + x


CASES = [
    # (id, thunk, exception type, texts the message must contain)
    ("unbound-axis-name", run(sum_over_rows), NameError, ["sum_over_rows", "'rows'", "'data', 'model'"]),
    ("unbound-axis-index", run(axis_index_bad), NameError, ["axis_index_bad", "'batch'"]),
    ("collective-outside-shard_map", lambda: psum(X, "data"), NameError, ["psum", "'data'", "shard_map"]),
    ("collective-in-jit-outside-shard_map", lambda: spmd.jit(jitted_psum)(X), NameError,
     ["jitted_psum", "'data'", "shard_map"]),
    ("in_specs-too-many", run(twice, in_specs=(P("data"), P("model"))), spmd.ShardingError,
     ["twice", "in_specs", "structure"]),
    ("in_specs-too-few", run(pair_sum, in_specs=(P("data"),), args=(X, X)), spmd.ShardingError,
     ["pair_sum", "in_specs"]),
    ("in_specs-dict-keys", lambda: spmd.shard_map(lambda d: d["w"], mesh=_mesh(),
                                                  in_specs=({"v": P()},), out_specs=P())({"w": X}),
     spmd.ShardingError, ["in_specs", "'v'"]),
    ("in_specs-unknown-axis", run(twice, in_specs=P("batch")), spmd.ShardingError,
     ["twice", "args[0]", "'batch'"]),
    ("in_specs-longer-than-rank", run(twice, in_specs=P("data", "model", None), out_specs=P()),
     spmd.ShardingError, ["twice", "args[0]", "rank 2"]),
    ("in_specs-non-divisible", run(twice, in_specs=P("model"), out_specs=P("model"), args=(X[:6],)),
     spmd.ShardingError, ["twice", "args[0]", "'model'", "dim 0", "(size 6)"]),
    ("in_specs-non-divisible-nested-arg", run(pair_sum, in_specs=(P(), P(None, ("data", "model"))),
                                              out_specs=P(), args=(X, X[:, :6])),
     spmd.ShardingError, ["pair_sum", "args[1]", "('data', 'model')", "dim 1"]),
    ("in_specs-not-manual", run(twice, in_specs=P("data", "model"), axis_names={"data"}),
     spmd.ShardingError, ["twice", "args[0]", "'model'", "not manual"]),
    ("in_specs-None-host-array", run(twice, in_specs=None), spmd.ShardingError,
     ["twice", "args[0]", "in_specs=None"]),
    ("axis_names-unknown", run(twice, axis_names={"batch"}), spmd.ShardingError, ["twice", "'batch'"]),
    ("out_specs-promises-invariance", run(keep_block, out_specs=P("data")), spmd.VmaError,
     ["keep_block", "output", "'model'", "psum"]),
    ("out_specs-invariance-in-pytree", run(dict_out, out_specs={"loss": P(), "acc": P()}),
     spmd.VmaError, ["dict_out", "output['acc']", "'data'"]),
    ("out_specs-structure", run(twice, out_specs=(P(), P())), spmd.ShardingError,
     ["twice", "out_specs"]),
    ("out_specs-unknown-axis", run(twice, out_specs=P("batch")), spmd.ShardingError,
     ["twice", "output", "'batch'"]),
    ("psum-of-invariant", run(total_twice, out_specs=P()), spmd.VmaError,
     ["total_twice", "'model'", "invariant", "pvary"]),
    ("psum-of-constant", run(total_of_constant, out_specs=P()), spmd.VmaError,
     ["total_of_constant", "'data'", "pvary"]),
    ("psum_scatter-of-invariant", run(scatter_invariant), spmd.VmaError,
     ["scatter_invariant", "'model'", "pvary"]),
    ("ppermute-repeated-source", run(shift_bad_source), ValueError,
     ["shift_bad_source", "source 0", "'model'"]),
    ("ppermute-repeated-destination", run(shift_bad_dest), ValueError,
     ["shift_bad_dest", "destination 1", "'model'"]),
    ("ppermute-out-of-range", run(shift_out_of_range), ValueError,
     ["shift_out_of_range", "index 4", "'model'", "size 4"]),
    ("all_to_all-non-divisible", run(swap_uneven), ValueError,
     ["swap_uneven", "split_axis 0", "size 3", "'model'", "multiple of 4"]),
    ("all_to_all-untiled-size", run(swap_untiled_wrong_size), ValueError,
     ["swap_untiled_wrong_size", "'model'", "exactly 4"]),
    ("psum_scatter-non-divisible", run(scatter_uneven), ValueError,
     ["scatter_uneven", "scatter_dimension 0", "size 3", "'model'"]),
    ("psum_scatter-untiled-size", run(scatter_untiled_wrong_size), ValueError,
     ["scatter_untiled_wrong_size", "'model'", "exactly 4"]),
    ("groups-missing-index", run(groups_missing_index), ValueError,
     ["groups_missing_index", "'model'", "axis_index_groups"]),
    ("groups-unequal-sizes", run(groups_unequal), ValueError, ["groups_unequal", "'model'", "equal size"]),
    ("groups-repeated-index", run(groups_repeated), ValueError, ["groups_repeated", "'model'", "exactly once"]),
    ("groups-out-of-range", run(groups_out_of_range), ValueError, ["groups_out_of_range", "'model'"]),
    ("pbroadcast-source-out-of-range", run(broadcast_bad_source), ValueError,
     ["broadcast_bad_source", "source 4", "'model'"]),
    ("axis-named-twice", run(axis_twice), ValueError, ["axis_twice", "'model'", "twice"]),
    ("all_gather-bad-to", run(gather_bad_to), ValueError, ["gather_bad_to", "'replicated'"]),
    ("all_gather-axis-out-of-range", run(gather_bad_axis), ValueError, ["gather_bad_axis", "axis 3"]),
    ("numpy-function-without-rule", run(uses_fft), NotImplementedError, ["uses_fft", "numpy.fft.fft"]),
    ("tracer-to-float", run(to_float, out_specs=P()), spmd.TracingError, ["to_float", "float()"]),
    ("tracer-to-np-asarray", run(to_host_array), spmd.TracingError, ["to_host_array", "np.asarray"]),
    ("tracer-item", run(take_item, out_specs=P()), spmd.TracingError, ["take_item", ".item()"]),
    ("python-if-on-traced-value", run(branch_on_value), spmd.TracingError,
     ["branch_on_value", "Python `if`", "np.where"]),
    ("dtype-float-shift", run(shift_float_bits), TypeError, ["shift_float_bits", "left_shift", "float64"]),
    ("dtype-bitwise-float-int", run(and_float_int), TypeError, ["and_float_int", "bitwise_and", "float64"]),
    ("dtype-inplace-float-into-int", run(accumulate_float_into_int), TypeError,
     ["accumulate_float_into_int", "float64", "int32", "same_kind"]),
    ("write-into-out", run(write_into_out), TypeError, ["write_into_out", "out="]),
    ("keyword-arguments", lambda: spmd.shard_map(pair_sum, mesh=_mesh(), in_specs=P(), out_specs=P())(X, y=X),
     TypeError, ["pair_sum", "['y']", "positional"]),
    ("no-mesh", lambda: spmd.shard_map(twice, in_specs=P(), out_specs=P())(X), spmd.ShardingError,
     ["twice", "no mesh", "set_mesh"]),
]


@pytest.mark.parametrize("call, exc_type, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc_type, needles):
    with pytest.raises(exc_type) as info:
        call()
    err = info.value
    for needle in needles:
        assert needle in str(err), f"message does not name {needle!r}: {err}"
    assert isinstance(err, spmd.SpmdError) or info.traceback[-1].path.is_relative_to(SPMD_DIR), \
        f"{type(err).__name__} escaped from {info.traceback[-1].path}: {err}"


def test_table_is_large_enough():
    assert len(CASES) >= 20


def test_psum_of_invariant_is_fine_after_pvary():
    """The fix the psum-of-invariant message suggests works and gives n·x."""
    f = spmd.shard_map(lambda x: psum(spmd.pvary(psum(x, "model"), "model"), "model"), mesh=_mesh(),
                       in_specs=P("data", "model"), out_specs=P("data"))
    np.testing.assert_array_equal(np.asarray(f(X)), 4 * X.reshape(8, 4, 2).sum(1))


def test_errors_come_before_any_side_effect():
    """A bad program raises while tracing: the body's collectives never run."""
    ran = []
    from spmd.collectives import psum_p
    rule = psum_p.rules["stacked"]
    try:
        psum_p.rules["stacked"] = lambda *a, **k: ran.append(1) or rule(*a, **k)
        with pytest.raises(spmd.VmaError):
            spmd.shard_map(lambda x: (psum(x, "model"), x), mesh=_mesh(), in_specs=P("data", "model"),
                           out_specs=(P("data"), P()))(X)
    finally:
        psum_p.rules["stacked"] = rule
    assert not ran
