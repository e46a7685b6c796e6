"""spmd.core.Primitive: the one list of rule names (a misspelt rule is an error), the error for
a missing rule, and the interface of higher-order primitives (``execute``) on both executors,
at the top level and inside shard_map."""
import pathlib
import re

import numpy as np
import pytest

import spmd
from spmd import P, prims
from spmd.core import Aval, Primitive, aval_of, trace
from spmd.executors import reference_executor
from spmd.transforms import ad

MESH = spmd.make_mesh((8,), ("x",))
same = lambda x, **params: Aval(x.shape, x.dtype)


# ---------------------------------------------------------------------------------------------
# rule names
# ---------------------------------------------------------------------------------------------

def test_every_rule_has_a_one_line_meaning():
    assert Primitive.RULES and all(isinstance(m, str) and m and "\n" not in m
                                   for m in Primitive.RULES.values())


def test_constructor_rejects_an_unknown_rule():
    with pytest.raises(TypeError, match=r"^Primitive 'foo': unknown rule 'jpv'; known rules: "
                                        r"abstract, impl, .*jvp.*\. Did you mean 'jvp'\?$"):
        Primitive("foo", abstract=same, jpv=lambda primals, tangents: None)


@pytest.mark.parametrize("set_rule", [lambda p: setattr(p, "transpsoe", None),
                                      lambda p: p.rules.__setitem__("transpsoe", None),
                                      lambda p: p.rules.update(transpsoe=None),
                                      lambda p: p.rules.setdefault("transpsoe", None)],
                         ids=["attribute", "item", "update", "setdefault"])
def test_setting_an_unknown_rule_afterwards_is_an_error(set_rule):
    p = Primitive("foo", abstract=same)
    with pytest.raises(TypeError, match="^Primitive 'foo': unknown rule 'transpsoe'; known "):
        set_rule(p)
    assert "transpsoe" not in p.rules


def test_known_rules_set_afterwards_are_declared():
    p = Primitive("foo", abstract=same)
    jvp = lambda primals, tangents: None
    p.jvp = jvp
    p.rules["partial_eval"] = ad.partial_eval_program
    assert p.jvp is jvp and p.rules["jvp"] is jvp and p.partial_eval is ad.partial_eval_program


def test_undeclared_rules_read_as_absent_and_other_names_stay_attribute_errors():
    p = Primitive("foo", abstract=same)
    assert (p.impl, p.jvp, p.execute, p.category) == (None, None, None, None)
    assert (p.multiple_results, p.linear, p.multilinear, p.free) == (False, False, (), False)
    with pytest.raises(AttributeError):
        p.no_such_attribute


def test_a_missing_rule_names_the_rule_and_the_primitive():
    p = Primitive("foo", abstract=same)
    with pytest.raises(NotImplementedError, match="^jvp rule for foo$"):
        p.rule("jvp")
    with pytest.raises(NotImplementedError, match="^impl rule for foo$"):
        p(np.ones(3))
    with pytest.raises(NotImplementedError, match="^jvp rule for foo"):
        spmd.jvp(lambda x: p(x), (np.ones(3),), (np.ones(3),))


def test_linear_operands():
    assert prims.add_p.linear_operands(2, {}) == (0, 1)
    assert prims.select_p.linear_operands(3, {}) == (1, 2)             # not the predicate
    assert prims.mul_p.linear_operands(2, {}) == () and prims.mul_p.multilinear == (0, 1)
    convert = prims.convert_element_type_p
    assert convert.linear_operands(1, {"dtype": np.float32}) == (0,)
    assert convert.linear_operands(1, {"dtype": np.int32}) == ()     # rounding is not linear


def test_no_code_outside_the_primitives_branches_on_a_primitive_name():
    root = pathlib.Path(spmd.__file__).parent
    branching = re.compile(r"prim\.name\s*(==|!=|in\b|not\s+in\b)|name\s*==\s*\"shard_map\"")
    offenders = [f"{path.relative_to(root)}:{i}"
                 for package in ("compiler", "executors", "transforms")
                 for path in sorted((root / package).glob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if branching.search(line)]
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# higher-order primitives: ``execute``
# ---------------------------------------------------------------------------------------------

# A minimal higher-order primitive: its body applied to its operands, run by the executors
# through the same interface as shard_map and checkpoint.
call_p = Primitive("call", abstract=lambda *avals, body: body.out_avals, multiple_results=True,
                   execute=lambda run, *, body: run.call(body))


def doubled_tanh(x):
    body, captured = trace(lambda v: [np.tanh(v) * 2], [aval_of(x)], **ad.context())
    assert not captured
    return call_p(x, body=body)[0]


X = np.linspace(-1, 1, 16).reshape(8, 2)


def test_a_new_higher_order_primitive_runs_on_both_executors():
    program = spmd.make_program(doubled_tanh)(X)
    assert [e.prim for e in program.eqns] == [call_p]
    (body,) = call_p.subprograms(program.eqns[0].params)
    assert [e.prim.name for e in body.eqns] == ["tanh", "mul"]
    np.testing.assert_allclose(np.asarray(spmd.jit(doubled_tanh)(X)), np.tanh(X) * 2)
    np.testing.assert_allclose(reference_executor().run(program, [X])[0], np.tanh(X) * 2)


def test_a_new_higher_order_primitive_runs_inside_shard_map():
    f = spmd.shard_map(doubled_tanh, mesh=MESH, in_specs=P("x"), out_specs=P("x"))
    np.testing.assert_allclose(np.asarray(spmd.jit(f)(X)), np.tanh(X) * 2)        # stacked
    program = spmd.make_program(f)(X)
    np.testing.assert_allclose(reference_executor().run(program, [X])[0], np.tanh(X) * 2)


def test_shard_map_and_checkpoint_declare_execute():
    from spmd.shard_map import shard_map_p
    from spmd.transforms.checkpoint import checkpoint_p
    assert shard_map_p.execute is not None and checkpoint_p.execute is not None
    assert shard_map_p.manual is not None and checkpoint_p.inline is not None


@pytest.mark.parametrize("k, c_shape, x_shape, y_shape", [
    (1, (8, 1, 1), (8, 64, 256), (8, 64, 256)),        # one predicate per device
    (1, (1, 1, 1), (8, 64, 256), (1, 64, 256)),        # the same predicate everywhere
    (1, (8, 1, 1), (8, 64, 256), ()),                  # a scalar branch
    (2, (2, 4, 1, 1), (2, 4, 128, 128), (1, 4, 128, 128)),
    (0, (1, 1), (128, 256), (128, 256)),
    (1, (8, 64, 1), (8, 64, 256), (8, 64, 256)),       # not one value per device: where
])
def test_select_of_one_predicate_per_device_is_where(k, c_shape, x_shape, y_shape):
    """``select`` whose predicate is one value per device copies each device's block whole; it
    equals ``np.where`` (broadcast operands, a scalar branch, no device dims)."""
    rng = np.random.default_rng(0)
    c = np.broadcast_to(rng.random(c_shape) > 0.5, np.broadcast_shapes(c_shape, x_shape))
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = rng.standard_normal(y_shape).astype(np.float32) if y_shape else np.float32(0)
    got = prims.select_p.rule("impl")(np, k, c, x, y)
    np.testing.assert_array_equal(got, np.where(c, x, y))
    assert got.dtype == np.float32
