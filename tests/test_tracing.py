"""Tracing: Programs (printing, type checking), make_program, jit's cache, and the errors a
user meets when traced code asks for a concrete value or a NumPy feature spmd lacks."""
import numpy as np
import pytest

import spmd
from spmd import P, prims, psum, shard_map
from spmd.core import Aval, Eqn, Params, Program, Var

MESH = spmd.make_mesh((2, 4), ("data", "model"))
f32, f64 = np.dtype(np.float32), np.dtype(np.float64)


# ---------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------

def test_program_prints_like_a_jaxpr():
    prog = spmd.make_program(lambda x, w: np.tanh(x @ w).sum(axis=1))(
        np.ones((8, 4), f32), np.ones((4, 2), f32))
    assert str(prog) == (
        "{ lambda a:f32[8,4] b:f32[4,2] ;\n"
        "    c:f32[8,2] = dot_general[contract=((1,),(0,)) batch=((),())] a b\n"
        "    d:f32[8,2] = tanh c\n"
        "    e:f32[8] = reduce_sum[axes=(1,)] d\n"
        "  in (e) }")
    assert repr(prog) == str(prog)


def test_shard_map_body_prints_per_device_types_with_vma():
    def body(block, w):
        return psum((block * w).sum(axis=1), "model")
    f = shard_map(body, mesh=MESH, in_specs=(P("data", "model"), P()), out_specs=P("data"))
    text = str(spmd.make_program(f)(np.ones((8, 4), f32), np.ones((1,), f32)))
    assert "shard_map[mesh={data:2,model:4} in_specs=(P(data,model),P()) out_specs=(P(data),)" in text
    assert "body={ lambda d:f32[4,1]{data,model} e:f32[1] ;" in text       # per-device blocks
    # the implicit pvary, on the parameter before its broadcast
    assert "f:f32[1]{data,model} = pvary[axes=(data,model)] e" in text
    assert "g:f32[4,1]{data,model} = broadcast_in_dim[shape=(4,1) dims=(1,)] f" in text
    assert "f32[4]{data} = psum[axes=(model,)]" in text
    assert "groups" not in text                                     # None params are not shown
    assert "c:f32[8@data] = shard_map" in text      # global result type: out_specs on Explicit axes


def test_constants_print_by_value_when_small_and_by_type_when_large():
    prog = spmd.make_program(lambda x: (x + np.arange(3.0), x * np.float32(2), x + 1, x[:1] + np.arange(1000.0)[:1]))(
        np.ones(3, f32))
    text = str(prog)
    assert "[0.,1.,2.]:f64" in text                   # small array: values
    assert "2.0:f32" in text                          # NumPy scalar: value and dtype
    assert "const:f64[1000]" not in text or "0.,1.,2.,3.,4.,5.,6." not in text
    big = str(spmd.make_program(lambda x: x + np.arange(1000.0))(np.ones(1000)))
    assert "const:f64[1000]" in big and len(big) < 200


# ---------------------------------------------------------------------------------------------
# check()
# ---------------------------------------------------------------------------------------------

def _exp_program(out_aval=Aval((3,), f32)):
    x, y = Var(Aval((3,), f32)), Var(out_aval)
    return Program([x], [Eqn(prims.exp_p, [x], Params(), [y])], [y]), x, y


def test_check_accepts_traced_programs():
    f = shard_map(lambda b: psum(np.exp(b).sum(0), "data"), mesh=MESH, in_specs=P("data"), out_specs=P())
    for prog in [spmd.make_program(lambda x: np.sort(x)[::-1] @ x)(np.ones(3)),
                 spmd.make_program(f)(np.ones((4, 3)))]:
        assert prog.check() is prog


@pytest.mark.parametrize("bad", [Aval((4,), f32), Aval((3,), f64), Aval((3,), f32, frozenset({"data"}))],
                         ids=["shape", "dtype", "vma"])
def test_check_catches_wrong_output_type(bad):
    prog, _, _ = _exp_program(bad)
    with pytest.raises(TypeError, match=r"equation 0 \(exp\): outputs typed .* but its rule gives \['f32\[3\]'\]"):
        prog.check()


def test_check_catches_use_before_definition():
    x, y, z = Var(Aval((3,), f32)), Var(Aval((3,), f32)), Var(Aval((3,), f32))
    prog = Program([x], [Eqn(prims.exp_p, [y], Params(), [z]), Eqn(prims.exp_p, [x], Params(), [y])], [z])
    with pytest.raises(TypeError, match=r"equation 0 \(exp\).*used before it is defined"):
        prog.check()


def test_check_catches_redefinition():
    prog, x, _ = _exp_program()
    prog.eqns.append(Eqn(prims.exp_p, [x], Params(), [x]))
    with pytest.raises(TypeError, match=r"equation 1 \(exp\) redefines"):
        prog.check()


def test_check_catches_undefined_output():
    prog, _, _ = _exp_program()
    prog.out_vars.append(Var(Aval((3,), f32)))
    with pytest.raises(TypeError, match="program output.*used before it is defined"):
        prog.check()


def test_check_looks_inside_shard_map_bodies():
    f = shard_map(lambda b: np.exp(b), mesh=MESH, in_specs=P("data"), out_specs=P("data"))
    prog = spmd.make_program(f)(np.ones((4, 3), f32))
    body = prog.eqns[0].params["body"]
    body.eqns[0].outputs[0].aval = Aval((2, 4), f32, frozenset({"data"}))
    with pytest.raises(TypeError, match=r"equation 0 \(shard_map\), body: equation 0 \(exp\): outputs typed "
                                         r"\['f32\[2,4\]\{data\}'\] but its rule gives \['f32\[2,3\]\{data\}'\]"):
        prog.check()


# ---------------------------------------------------------------------------------------------
# make_program and jit
# ---------------------------------------------------------------------------------------------

def test_make_program_types_inputs_and_outputs():
    prog = spmd.make_program(lambda x, n: x.reshape(n, -1).mean(0), static_argnums=1)(np.ones(6, f32), 2)
    assert isinstance(prog, Program)
    assert [str(a) for a in prog.in_avals] == ["f32[6]"]
    assert [str(a) for a in prog.out_avals] == ["f32[3]"]


def test_jit_traces_once_per_argument_types():
    traces = []

    @spmd.jit
    def f(x, y):
        traces.append(1)
        return x * y

    np.testing.assert_array_equal(np.asarray(f(np.ones(3), np.full(3, 2.0))), np.full(3, 2.0))
    f(np.zeros(3), np.ones(3))
    assert len(traces) == 1
    f(np.zeros(4), np.ones(4))                  # new shape
    f(np.zeros(3, f32), np.ones(3, f32))        # new dtype
    assert len(traces) == 3
    f(np.zeros(3), 2.0)                         # weak Python scalar
    f(np.zeros(3), 5.0)
    assert len(traces) == 4
    f(np.zeros(3), np.float64(2.0))             # NumPy scalar: strongly typed, another program
    assert len(traces) == 5
    np.testing.assert_array_equal(np.asarray(f(np.ones(3), 2.5)), np.full(3, 2.5))


def test_python_scalar_arguments_are_weakly_typed():
    """A Python scalar argument promotes like the scalar itself (NEP 50, JAX's weak types):
    a learning rate does not turn float32 parameters into float64."""
    step = spmd.jit(lambda w, lr: w - lr * w)
    assert step(np.ones(3, f32), 0.1).dtype == f32
    assert step(np.ones(3, np.int32), 2).dtype == np.int32
    assert step(np.ones(3, np.int32), 2.5).dtype == f64             # NumPy: int32 * 2.5 -> float64
    assert step(np.ones(3, f32), np.float64(0.1)).dtype == f64      # NumPy scalars are strong
    assert "b:f64[]" in str(spmd.make_program(lambda w, lr: w * lr)(np.ones(2, f32), 0.5))


def test_jit_keyword_and_pytree_arguments():
    traces = []

    @spmd.jit
    def f(params, x, *, scale):
        traces.append(1)
        return {"y": (x @ params["w"]) * scale, "stats": [x.sum(), params["b"]]}

    params = {"w": np.eye(3), "b": np.arange(2.0)}
    out = f(params, np.ones((2, 3)), scale=2.0)
    assert sorted(out) == ["stats", "y"] and isinstance(out["stats"], list)
    np.testing.assert_array_equal(np.asarray(out["y"]), np.full((2, 3), 2.0))
    np.testing.assert_array_equal(np.asarray(out["stats"][1]), np.arange(2.0))
    f(params, np.zeros((2, 3)), scale=3.0)
    assert len(traces) == 1
    f({"w": np.eye(3), "b": np.arange(2.0), "c": np.ones(1)}, np.zeros((2, 3)), scale=3.0)
    assert len(traces) == 2                    # another tree structure


def test_jit_static_arguments():
    traces = []

    def f(x, n, *, mode):
        traces.append(1)
        if n > 2 and mode == "sum":           # Python control flow on static values is fine
            return x.sum()
        return x * n

    g = spmd.jit(f, static_argnums=1, static_argnames="mode")
    assert float(np.asarray(g(np.ones(3), 3, mode="sum"))) == 3.0
    np.testing.assert_array_equal(np.asarray(g(np.ones(3), 2, mode="sum")), np.full(3, 2.0))
    g(np.zeros(3), 3, mode="sum")
    assert len(traces) == 2
    g(np.zeros(3), 3, mode="scale")
    assert len(traces) == 3
    with pytest.raises(TypeError, match="not hashable"):
        g(np.zeros(3), [1, 2], mode="sum")


def test_metadata_functions_return_python_values():
    seen = []

    def f(x):
        seen.append((np.shape(x), np.ndim(x), np.size(x), np.size(x, 1), np.result_type(x, 1.0), x.nbytes, len(x)))
        return x
    spmd.make_program(f)(np.ones((2, 3), f32))
    assert seen == [((2, 3), 2, 6, 3, np.dtype(f32), 24, 2)]


def test_array_namespace_of_a_tracer_is_spmd_numpy():
    seen = []
    spmd.make_program(lambda x: seen.append(x.__array_namespace__()) or x)(np.ones(2))
    assert seen == [spmd.numpy]
    assert spmd.numpy.acos is spmd.numpy.arccos and spmd.numpy.concat is spmd.numpy.concatenate
    assert not hasattr(spmd.numpy, "allclose")           # needs concrete values


def test_jit_inside_jit_is_inlined():
    inner = spmd.jit(lambda x: np.exp(x))
    prog = spmd.make_program(lambda x: inner(x) + 1)(np.ones(2))
    assert [e.prim.name for e in prog.eqns] == ["exp", "add"]


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

CONCRETE = {
    "bool": lambda x: bool(x), "if": lambda x: 1 if x > 0 else 0, "float": lambda x: float(x),
    "int": lambda x: int(x), "complex": lambda x: complex(x), "np.asarray": lambda x: np.asarray(x),
    "np.array": lambda x: np.array(x), "item": lambda x: x.item(), "tolist": lambda x: x.tolist(),
    "range": lambda x: range(x), "np.allclose": lambda x: np.allclose(x, 0),
}


@pytest.mark.parametrize("name", CONCRETE)
def test_concrete_value_of_a_tracer_explains_tracing(name):
    def my_function(x):
        return CONCRETE[name](x)
    with pytest.raises(spmd.TracingError) as e:
        spmd.jit(my_function)(np.float32(1.0))
    msg = str(e.value)
    assert "traced" in msg
    if name != "np.allclose":
        assert ("bool[]" if name == "if" else "f32[]") in msg and "jit(" in msg and "my_function" in msg
        assert "static_argnums" in msg and "np.where" in msg


def test_concrete_value_inside_shard_map_names_it():
    f = shard_map(lambda b: b if b.sum() > 0 else -b, mesh=MESH, in_specs=P("data"), out_specs=P("data"))
    with pytest.raises(spmd.TracingError, match=r"\(bool\[\]\{data\}\) inside shard_map\(.*<lambda>\)"):
        f(np.ones((4, 2)))


@pytest.mark.parametrize("fn, name", [
    (lambda x: np.linalg.det(x), "numpy.linalg.det"),
    (lambda x: np.fft.fft(x), "numpy.fft.fft"),
    (lambda x: np.linalg.pinv(x), "numpy.linalg.pinv"),
    (lambda x: np.interp(x, x[0], x[1]), "numpy.interp"),
    (lambda x: np.gcd(x.astype(int), 2), "numpy.gcd"),
    (lambda x: np.add.outer(x, x), "numpy.add.outer"),
    (lambda x: np.nonzero(x), "numpy.nonzero"),
])
def test_unsupported_numpy_function_is_named(fn, name):
    with pytest.raises(NotImplementedError, match=name.replace(".", r"\.")):
        spmd.jit(fn)(np.ones((2, 2)))


def test_data_dependent_shapes_say_why():
    with pytest.raises(NotImplementedError, match="depends on the values"):
        spmd.jit(lambda x: np.unique(x))(np.ones(3))
    with pytest.raises(IndexError, match="boolean mask"):
        spmd.jit(lambda x: x[x > 0])(np.ones(3))
    with pytest.raises(NotImplementedError, match="pass both x and y"):
        spmd.jit(lambda x: np.where(x > 0))(np.ones(3))


@pytest.mark.parametrize("fn, dtype, match", [
    (lambda x: x - x, np.bool_, r"np\.subtract of \(bool, bool\): NumPy refuses"),
    (lambda x: np.negative(x), np.bool_, r"np\.negative of \(bool\)"),
    (lambda x: x + 1000, np.int8, r"1000 out of bounds for int8"),
    (lambda x: x + -1, np.uint8, r"out of bounds for uint8"),
    (lambda x: x & 1.5, np.int32, r"np\.bitwise_and of \(int32, float\)"),
])
def test_dtype_combinations_numpy_refuses_raise_type_errors(fn, dtype, match):
    x = np.ones(3, dtype)
    with pytest.raises((TypeError, OverflowError)):
        fn(x)                                   # NumPy refuses too
    with pytest.raises(TypeError, match=match):
        spmd.jit(fn)(x)


def test_traced_values_are_immutable():
    def f(x):
        x[0] = 1.0
        return x
    with pytest.raises(TypeError, match="immutable"):
        spmd.jit(f)(np.ones(3))
    with pytest.raises(TypeError, match="immutable"):
        spmd.jit(lambda x: np.exp(x, out=x))(np.ones(3))
    with pytest.raises(TypeError, match=r"np.sum\(..., out=...\): traced values are immutable"):
        spmd.jit(lambda x: np.sum(x, out=np.zeros(())))(np.ones(3))
    with pytest.raises(TypeError, match=r"x.sort\(\) changes x in place.*np.sort\(x\)"):
        spmd.jit(lambda x: x.sort())(np.ones(3))


def test_shape_errors_match_numpy():
    with pytest.raises(ValueError, match="could not be broadcast"):
        spmd.jit(lambda x, y: x + y)(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="cannot reshape"):
        spmd.jit(lambda x: x.reshape(4, -1))(np.ones(6))
    with pytest.raises(np.exceptions.AxisError):
        spmd.jit(lambda x: x.sum(axis=2))(np.ones((2, 2)))
    with pytest.raises(IndexError, match="out of bounds"):
        spmd.jit(lambda x: x[5])(np.ones(3))
    with pytest.raises(IndexError, match="out of bounds"):
        spmd.jit(lambda x: x[np.array([0, 3])])(np.ones(3))
