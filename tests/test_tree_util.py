"""``spmd.tree_util`` against ``jax.tree_util`` on the same trees: leaves, structure, maps,
key paths and their text, reductions, registered node types, and ``Partial``."""
from __future__ import annotations

import collections
import dataclasses
import functools
import operator

import numpy as np
import pytest

import spmd
from spmd import P, tree_util as tu

jax = pytest.importorskip("jax")
jtu = jax.tree_util
JP = jax.sharding.PartitionSpec

Point = collections.namedtuple("Point", "x y")


class Box:
    """A node registered without keys (children are FlattenedIndexKey)."""

    def __init__(self, a, b, tag):
        self.a, self.b, self.tag = a, b, tag


class Named:
    """A node registered with keys."""

    def __init__(self, w, b):
        self.w, self.b = w, b


@dataclasses.dataclass
class Layer:
    w: object
    b: object
    name: str = dataclasses.field(default="dense", metadata=dict(static=True))


for reg in (tu, jtu):
    reg.register_pytree_node(Box, lambda x: ((x.a, x.b), x.tag), lambda tag, ch: Box(*ch, tag))
    reg.register_pytree_with_keys(Named, lambda x, k=reg.GetAttrKey: (((k("w"), x.w), (k("b"), x.b)), None),
                                  lambda _, ch: Named(*ch))
tu.register_dataclass(Layer)
jtu.register_dataclass(Layer, data_fields=["w", "b"], meta_fields=["name"])


def trees(spec=P):
    """The same trees for both libraries (``spec``: the library's PartitionSpec)."""
    return [
        {"b": [1, 2, (3, None)], "a": 4.0},
        [None, (None,), {}, ()],
        (np.arange(3.), [np.ones(2), {"z": 5, "y": None}]),
        Point(1, [2, 3]),
        collections.OrderedDict([("q", 1), ("p", (2, 3))]),
        {"spec": spec("x", None), "specs": [spec(), spec(("x", "y"))], "n": 1},
        Box(1, [2, 3], "t"),
        Named(np.ones(2), (4, 5)),
        Layer(w=1.0, b=[2.0, 3.0]),
        7,
        None,
    ]


def _norm(leaf):
    """Leaves compared across libraries: specs by their entries."""
    return ("spec", tuple(leaf)) if isinstance(leaf, (P, JP)) else leaf


def _eq(a, b):
    a, b = _norm(a), _norm(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("i", range(len(trees())))
def test_leaves_structure_and_round_trip(i):
    mine, theirs = trees(P)[i], trees(JP)[i]
    leaves, jleaves = tu.tree_leaves(mine), jtu.tree_leaves(theirs)
    assert len(leaves) == len(jleaves) and all(map(_eq, leaves, jleaves))
    flat, treedef = tu.tree_flatten(mine)
    assert tu.tree_structure(mine).num_leaves == jtu.tree_structure(theirs).num_leaves == len(flat)
    back = tu.tree_unflatten(treedef, flat)
    assert tu.tree_structure(back) == treedef
    assert all(map(_eq, tu.tree_leaves(back), leaves))


@pytest.mark.parametrize("i", range(len(trees())))
def test_tree_map_and_paths(i):
    mine, theirs = trees(P)[i], trees(JP)[i]
    bump = lambda x: x if isinstance(x, (P, JP, str)) else x * 2
    assert all(map(_eq, tu.tree_leaves(tu.tree_map(bump, mine)), jtu.tree_leaves(jtu.tree_map(bump, theirs))))
    paths = [tu.keystr(p) for p, _ in tu.tree_flatten_with_path(mine)[0]]
    jpaths = [jtu.keystr(p) for p, _ in jtu.tree_flatten_with_path(theirs)[0]]
    assert paths == jpaths
    simple = [tu.keystr(p, simple=True, separator="/") for p, _ in tu.tree_leaves_with_path(mine)]
    jsimple = [jtu.keystr(p, simple=True, separator="/") for p, _ in jtu.tree_leaves_with_path(theirs)]
    assert simple == jsimple
    tagged = tu.tree_map_with_path(lambda p, x: tu.keystr(p), mine)
    jtagged = jtu.tree_map_with_path(lambda p, x: jtu.keystr(p), theirs)
    assert tu.tree_leaves(tagged) == jtu.tree_leaves(jtagged)


def test_key_types_print_as_jax():
    for mine, theirs in [(tu.DictKey("a"), jtu.DictKey("a")), (tu.SequenceKey(2), jtu.SequenceKey(2)),
                         (tu.GetAttrKey("w"), jtu.GetAttrKey("w")),
                         (tu.FlattenedIndexKey(1), jtu.FlattenedIndexKey(1))]:
        assert str(mine) == str(theirs) and repr(mine) == repr(theirs)
    assert tu.DictKey(0) != tu.SequenceKey(0)
    path = tu.tree_flatten_with_path({"a": Point(1, 2)})[0][1][0]
    assert path == (tu.DictKey("a"), tu.GetAttrKey("y"))


def test_none_is_an_empty_subtree_and_specs_are_leaves():
    assert tu.tree_leaves([1, None, [None, 2]]) == [1, 2]
    assert tu.tree_map(lambda x: x + 1, {"a": None, "b": 1}) == {"a": None, "b": 2}
    spec = P("x", None, ("y", "z"))
    assert tu.tree_leaves(spec) == [spec]
    assert tu.tree_map(lambda s: s, [spec]) == [spec]
    sharding = spmd.NamedSharding(spmd.make_mesh((2,), ("x",), devices=spmd.devices()[:2]), P("x"))
    assert tu.tree_leaves({"s": sharding}) == [sharding]


def test_tree_map_with_rest_and_is_leaf():
    a, b = {"x": (1, 2), "y": 3}, {"x": (10, 20), "y": 30}
    assert tu.tree_map(operator.add, a, b) == jtu.tree_map(operator.add, a, b)
    is_pair = lambda x: isinstance(x, tuple)
    total = lambda x: sum(x) if is_pair(x) else x
    assert tu.tree_map(total, a, is_leaf=is_pair) == jtu.tree_map(total, a, is_leaf=is_pair) == {"x": 3, "y": 3}
    assert tu.tree_leaves(a, is_leaf=is_pair) == jtu.tree_leaves(a, is_leaf=is_pair)
    assert (tu.tree_structure(a, is_leaf=is_pair).num_leaves
            == jtu.tree_structure(a, is_leaf=is_pair).num_leaves == 2)
    with pytest.raises(ValueError):
        tu.tree_map(operator.add, a, {"x": 1})


def test_reductions():
    t = {"a": [1, 2], "b": (3, None, 4)}
    assert tu.tree_reduce(operator.add, t) == jtu.tree_reduce(operator.add, t) == 10
    assert tu.tree_reduce(operator.add, t, 100) == jtu.tree_reduce(operator.add, t, 100)
    assert tu.tree_all({"a": True, "b": [1, 2]}) is jtu.tree_all({"a": True, "b": [1, 2]}) is True
    assert tu.tree_all([True, 0]) is jtu.tree_all([True, 0]) is False
    assert tu.tree_all([]) is jtu.tree_all([]) is True


def test_registered_nodes_pass_through_transformations():
    """The registry is the one jit, vmap, grad and shard_map flatten with."""
    layer = Layer(w=np.ones(3), b=np.zeros(3), name="l1")
    out = spmd.jit(lambda l: Layer(w=l.w * 2, b=l.b + 1, name=l.name))(layer)
    assert isinstance(out, Layer) and out.name == "l1"
    np.testing.assert_allclose(np.asarray(out.w), 2.0)
    g = spmd.grad(lambda box: np.sum(box.a * box.b))(Box(np.ones(2), np.full(2, 3.0), "t"))
    assert isinstance(g, Box) and g.tag == "t"
    np.testing.assert_allclose(np.asarray(g.a), 3.0)
    v = spmd.vmap(lambda n: n.w @ n.b)(Named(np.ones((4, 2)), np.ones((4, 2))))
    np.testing.assert_allclose(np.asarray(v), 2.0)


def test_register_dataclass_forms():
    @tu.register_dataclass
    @dataclasses.dataclass
    class Pair:
        x: object
        y: object
        meta: int = dataclasses.field(default=0, metadata=dict(static=True))

    p = Pair(1, 2, meta=7)
    leaves, treedef = tu.tree_flatten(p)
    assert leaves == [1, 2]
    assert tu.tree_unflatten(treedef, [3, 4]) == Pair(3, 4, meta=7)
    assert [tu.keystr(k) for k, _ in tu.tree_leaves_with_path(p)] == [".x", ".y"]

    class Plain:
        def __init__(self, u, v):
            self.u, self.v = u, v
    tu.register_dataclass(Plain, data_fields=["u"], meta_fields=["v"])
    assert tu.tree_leaves(Plain(1, 2)) == [1]
    with pytest.raises(TypeError, match="not a dataclass"):
        tu.register_dataclass(type("NotData", (), {}))


def test_partial():
    f = tu.Partial(operator.mul, np.float64(3.0))
    assert tu.tree_leaves(f) == jtu.tree_leaves(jtu.Partial(operator.mul, np.float64(3.0)))
    assert float(spmd.jit(lambda f, x: f(x))(f, 2.0)) == 6.0
    g = tu.Partial(f, 4.0)                      # nested: one level of arguments
    assert g.func is operator.mul and g() == 12.0
    assert isinstance(tu.tree_map(lambda x: x * 2, g), tu.Partial) and tu.tree_map(lambda x: x * 2, g)() == 48.0
    assert functools.partial(operator.mul, 2)(5) == tu.Partial(operator.mul, 2)(5)
