"""The Program IR and tracing.

A traced function becomes a ``Program``: typed input variables, a list of equations
``outs = prim(ins, **params)`` and outputs.  Every value has an abstract value ``Aval``:
its (per-device, inside ``shard_map``) shape, dtype and *vma*, the set of mesh axes it varies
over.  Tracing works by handing ``Tracer`` objects to ordinary NumPy code: the tracer
implements NEP 13/18, so ``np.tanh(x)`` or ``x @ w`` lands in :func:`bind`, which appends an
equation to the innermost ``Builder``.

Primitives are registered once, with every rule beside them (see ``Primitive``).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import itertools
import linecache
import math
import os
import re
import sys
from typing import Any, Callable, Sequence

import numpy as np
import optree

from .errors import TracingError, VmaError
from .sharding import NamedSharding, sharding_type


# ---------------------------------------------------------------------------------------------
# Hooks: what core (and the rule helpers just above it) need from higher layers
# ---------------------------------------------------------------------------------------------

class Hooks:
    """Slots a higher layer fills at import, so that no lower layer imports a higher one (as
    JAX's ``core`` never imports ``lax``).  Each slot is filled by exactly one module, named
    beside it; reading an empty slot says which import is missing."""

    pvary: "Primitive"            # spmd.collectives: the implicit pvary of mixed-vma operands
    add: "Primitive"              # spmd.prims: adding cotangents
    broadcast_in_dim: "Primitive"  # spmd.prims: zeros of a type; unbatched operands under vmap
    transpose: "Primitive"        # spmd.prims: moving a batch dim
    reshape: "Primitive"          # spmd.prims: scalars lifted to rank 1 across sub-programs
    handle_ufunc: Callable        # spmd.numpy_api: NEP 13 on tracers
    handle_function: Callable     # spmd.numpy_api: NEP 18 on tracers
    array_namespace: Any          # spmd.numpy: ``__array_namespace__`` of tracers
    array_types: tuple = ()       # spmd.array: global array types (traced by shape and dtype)
    execute: Callable             # spmd.jit: run a Program on concrete arguments
    jit: Callable                 # spmd.jit: ``jit(f, _name=...)`` for eager transformations
    reshard: Callable             # spmd.jit: an Array moved by the redistribution planner
    constrain: Callable           # spmd.jit: a traced value given a sharding (its Explicit type)
    sharding_rule: Callable       # spmd.sharding_rules: the output sharding type on Explicit axes
    manual_unreduced: Callable    # spmd.sharding_rules: unreduced / reduced Manual axes of results
    reduced_vary_cast: "Primitive"  # spmd.collectives: the implicit cast of a reduced operand
    process_allgather: Callable   # spmd.distributed: the whole of an Array across processes
    eager: Any                    # spmd.eager: NumPy on sharded Arrays, one compiled op a time

    def __getattr__(self, name):
        if name in type(self).__annotations__:
            raise RuntimeError(f"spmd.core.hooks.{name} is empty: the module that fills it (see "
                               f"spmd.core.Hooks) was not imported; import spmd first.")
        raise AttributeError(name)


hooks = Hooks()


# ---------------------------------------------------------------------------------------------
# Abstract values
# ---------------------------------------------------------------------------------------------

_SHORT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64",
          "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8",
          "uint16": "u16", "uint32": "u32", "uint64": "u64", "bool": "bool",
          "complex64": "c64", "complex128": "c128"}


@dataclasses.dataclass(frozen=True)
class Aval:
    """Shape, dtype and varying mesh axes of a value (per device inside shard_map).

    ``weak``: the value is a Python scalar passed to a traced function; like the scalar itself
    it adopts the dtype of the arrays it meets (NEP 50, JAX's weak types): ``x_f32 * lr`` stays
    float32 for ``lr=0.1``.

    ``sharding``: on a mesh with Explicit axes, how the value is split over them, as part of
    its type (a ``NamedSharding`` on the abstract mesh, one spec entry per dim, printed
    ``f32[8@data,4]``); every primitive computes it for its outputs by its sharding rule
    (``spmd.sharding_rules``).  None: no Explicit axis is involved.

    ``unreduced`` / ``reduced`` (inside ``shard_map``, JAX's ``manual_axis_type``): Manual axes
    over which the value is a sum still pending (each device holds a part; the data vary as a
    varying value's do), or over which it is the same everywhere and its cotangent is such a
    pending sum.  ``pcast`` moves a value between these states (``spmd.collectives``).
    """
    shape: tuple[int, ...]
    dtype: np.dtype
    vma: frozenset = frozenset()
    weak: bool = False
    sharding: NamedSharding | None = None
    unreduced: frozenset = frozenset()
    reduced: frozenset = frozenset()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __hash__(self):               # every jit call hashes its arguments' types: once each
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.shape, self.dtype, self.vma, self.weak, self.sharding, self.unreduced,
                      self.reduced))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def update(self, **kw) -> "Aval":
        if self.sharding is not None and "sharding" not in kw and \
                len(kw.get("shape", self.shape)) != self.ndim:
            kw["sharding"] = None     # a new rank (vmap's batch dim): the rule recomputes it
        return dataclasses.replace(self, **kw)

    def dims_str(self) -> str:
        """``8@data,4``: the dims, each with the Explicit mesh axes it is split over."""
        if self.sharding is None:
            return ",".join(map(str, self.shape))
        dims = zip(self.shape, self.sharding._dim_axes(self.ndim))
        return ",".join(f"{n}@{axes_str(axes)}" if axes else str(n) for n, axes in dims)

    def unreduced_str(self) -> str:
        """``{U:x}`` / ``{R:x}``: the mesh axes over which the value is a pending sum (JAX's
        unreduced) or a reduced copy, on Explicit and Manual axes."""
        spec = self.sharding.spec if self.sharding is not None else None
        out = ""
        for tag, manual, typed in (("U", self.unreduced, spec and spec.unreduced),
                                   ("R", self.reduced, spec and spec.reduced)):
            axes = sorted(set(manual) | set(typed or ()))
            out += "{" + tag + ":" + axes_str(axes) + "}" if axes else ""
        return out

    def __str__(self):
        t = _SHORT.get(np.dtype(self.dtype).name, np.dtype(self.dtype).name)
        vma = "{" + ",".join(sorted(self.vma)) + "}" if self.vma else ""
        return f"{t}[{self.dims_str()}]{vma}{self.unreduced_str()}"


def axes_str(axes) -> str:
    """``X`` for one mesh axis, ``(X,Y)`` for several (as JAX prints types)."""
    return axes[0] if len(axes) == 1 else "(" + ",".join(axes) + ")"


def aval_of(x) -> Aval:
    if isinstance(x, Tracer):
        return x.aval
    if isinstance(x, hooks.array_types):
        return Aval(x.shape, x.dtype, sharding=sharding_type(x.sharding, x.ndim))
    if type(x) in _WEAK:        # Python scalars only: NumPy scalars (np.float64 too) are strong
        return Aval((), _weak_dtype(x), weak=True)
    a = np.asarray(x)
    if a.dtype.kind in "OUSMm" or (a.dtype.kind == "V" and a.dtype.type.__module__ != "ml_dtypes"):
        raise TypeError(f"{type(x).__name__} {short_repr(x)} (dtype {a.dtype}) is not a value spmd "
                        f"computes with: arguments and results are arrays of bool, integer, "
                        f"float or complex dtype (or pytrees of them; mark other arguments "
                        f"static).")
    return Aval(a.shape, a.dtype)


def short_repr(x) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


_WEAK = {bool: np.bool_, int: np.int64, float: np.float64, complex: np.complex128}


def _weak_dtype(x) -> np.dtype:
    return np.dtype(_WEAK[type(x)])


# ---------------------------------------------------------------------------------------------
# Program
# ---------------------------------------------------------------------------------------------

class Var:
    __slots__ = ("aval",)

    def __init__(self, aval: Aval):
        self.aval = aval

    def __repr__(self):
        return f"Var({self.aval})"


class Literal:
    """A constant inside a program (Python scalar or array)."""
    __slots__ = ("val", "aval")

    def __init__(self, val):
        self.val = val
        self.aval = aval_of(val)

    def __repr__(self):
        """Python scalars bare (weakly typed), NumPy scalars with their dtype (``2.0:f32``),
        small arrays by value, longer ones by type only."""
        if type(self.val) in _WEAK:
            return repr(self.val)
        t = _SHORT.get(self.aval.dtype.name, self.aval.dtype.name)
        if self.aval.ndim == 0:
            return f"{np.asarray(self.val).item()!r}:{t}"
        if self.aval.size <= _SHOWN_CONSTANT_SIZE:
            vals = np.array2string(np.asarray(self.val), separator=",", threshold=_SHOWN_CONSTANT_SIZE)
            return f"{vals.replace(' ', '').replace(chr(10), '')}:{t}"
        return f"const:{self.aval}"


_SHOWN_CONSTANT_SIZE = 6


Atom = "Var | Literal"


class Params(dict):
    """Equation parameters: a dict that hashes (params must be hashable so programs cache)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))


@dataclasses.dataclass(eq=False)
class Eqn:
    """``outputs = prim(inputs, **params)``; ``source``: ``(code, line)`` of the user's line it
    came from (the first frame outside spmd when it was bound; what a transformation makes of
    an equation keeps the equation's), for messages -- see :func:`source_text`."""
    prim: "Primitive"
    inputs: list
    params: Params
    outputs: list
    source: Any = None
    untyped: bool = False     # staged with sharding types off (see ``untyped``): replays keep it


_SPMD_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# optree's frames (``tree_map`` calling back into spmd, as ``psum`` does) are not the user's
_NOT_USER = (_SPMD_DIR, os.path.dirname(os.path.abspath(optree.__file__)) + os.sep)
_inside_spmd: dict = {}        # code object -> whether it is spmd's own (asked once per code)


def _user_source():
    """``(code, line)`` of the innermost frame outside the spmd package, or None.  Cheap: only
    the code object and line are kept; the text is looked up when a message needs it."""
    f = sys._getframe(2)
    while f is not None:
        code = f.f_code
        inside = _inside_spmd.get(code)
        if inside is None:
            inside = _inside_spmd[code] = os.path.abspath(code.co_filename).startswith(_NOT_USER)
        if not inside:
            return code, f.f_lineno
        f = f.f_back
    return None


def source_text(source) -> str:
    """``file:line (function): the line`` for an equation's ``source``; '' when unknown."""
    if source is None:
        return ""
    code, line = source
    text = linecache.getline(code.co_filename, line).strip()
    return f"{code.co_filename}:{line} ({code.co_name})" + (f": {text}" if text else "")


@dataclasses.dataclass(eq=False)
class Program:
    """A typed program: ``{ lambda in_vars ; eqns ; in out_vars }``."""
    in_vars: list
    eqns: list
    out_vars: list

    @property
    def in_avals(self):
        return [v.aval for v in self.in_vars]

    @property
    def out_avals(self):
        return [v.aval for v in self.out_vars]

    def __str__(self):
        return _ProgramPrinter().program(self, 0)

    __repr__ = __str__

    def check(self):
        """Type-check the program: every variable defined once before use, and every
        equation's output types equal what its primitive's rule gives for its inputs."""
        defined: set[int] = set()
        for v in self.in_vars:
            if not isinstance(v, Var):
                raise TypeError(f"program input {v!r} is not a Var")
            defined.add(id(v))

        def use(a, where):
            if isinstance(a, Literal):
                return
            if not isinstance(a, Var) or id(a) not in defined:
                raise TypeError(f"{where}: {a!r} is used before it is defined")

        for i, e in enumerate(self.eqns):
            for a in e.inputs:
                use(a, f"equation {i} ({e.prim.name})")
            for sub in e.prim.subprograms(e.params):       # inner programs first: errors point inside
                try:
                    sub.check()
                except TypeError as err:
                    where = next((k for k, v in e.params.items() if v is sub), "inner program")
                    raise TypeError(f"equation {i} ({e.prim.name}), {where}: {err}") from None
            want = e.prim.abstract_eval(*[a.aval for a in e.inputs], **e.params)
            want = list(want) if e.prim.multiple_results else [want]
            got = [v.aval for v in e.outputs]
            if len(want) != len(got) or any(
                    (w.shape, np.dtype(w.dtype), w.vma) != (g.shape, np.dtype(g.dtype), g.vma)
                    for w, g in zip(want, got)):
                raise TypeError(f"equation {i} ({e.prim.name}): outputs typed "
                                f"{[str(g) for g in got]} but its rule gives {[str(w) for w in want]}")
            for v in e.outputs:
                if id(v) in defined:
                    raise TypeError(f"equation {i} ({e.prim.name}) redefines {v!r}")
                defined.add(id(v))
        for a in self.out_vars:
            use(a, "program output")
        return self


class _ProgramPrinter:
    def __init__(self):
        self.names: dict[int, str] = {}
        self.counter = itertools.count()

    def name(self, a) -> str:
        if isinstance(a, Literal):
            return repr(a)
        if id(a) not in self.names:
            n = next(self.counter)
            s = ""
            while True:
                s = chr(ord("a") + n % 26) + s
                n = n // 26 - 1
                if n < 0:
                    break
            self.names[id(a)] = s
        return self.names[id(a)]

    def decl(self, v) -> str:
        return f"{self.name(v)}:{v.aval}"

    def program(self, p: Program, indent: int) -> str:
        pad = " " * indent
        ins = " ".join(self.decl(v) for v in p.in_vars)
        lines = [f"{{ lambda {ins} ;"]
        for e in p.eqns:
            outs = " ".join(self.decl(v) for v in e.outputs)
            subs = {k: ([v] if isinstance(v, Program) else v) for k, v in e.params.items()
                    if isinstance(v, Program) or (isinstance(v, tuple) and v
                                                  and all(isinstance(p, Program) for p in v))}
            shown = {k: v for k, v in e.params.items() if k not in subs and v is not None}
            params = ("[" + " ".join(f"{k}={_fmt_param(v)}" for k, v in shown.items()) + "]") if shown else ""
            args = " ".join(self.name(a) for a in e.inputs)
            lines.append(f"{pad}    {outs} = {e.prim.name}{params} {args}")
            for k, progs in subs.items():            # a cond's branches: one per line
                for i, v in enumerate(progs):
                    label = k if isinstance(e.params[k], Program) else f"{k}[{i}]"
                    lines.append(f"{pad}      {label}={self.program(v, indent + 6)}")
        outs = " ".join(self.name(a) for a in p.out_vars)
        lines.append(f"{pad}  in ({outs}) }}")
        return "\n".join(lines)


def _fmt_param(v) -> str:
    """Short forms: ``P(data,None)``, ``{data:2,model:4}``, ``f32``, strings unquoted.
    Parameter types of higher layers (specs, meshes) print themselves by ``_ir_str``."""
    if hasattr(v, "_ir_str"):
        return v._ir_str()
    if isinstance(v, np.dtype):
        return _SHORT.get(v.name, v.name)
    if isinstance(v, tuple) and len(v) == 1:
        return f"({_fmt_param(v[0])},)"
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt_param(x) for x in v) + ")"
    if isinstance(v, np.ndarray):
        return repr(Literal(v))
    if callable(v) and hasattr(v, "__name__"):
        return v.__name__
    return str(v)


# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------

class Primitive:
    """A primitive operation, registered once with all of its rules side by side.

    ``Primitive(name, abstract=..., **rules)`` takes only the rules named in ``RULES`` (below,
    each with its meaning), as does setting one afterwards (``p.jvp = ...``, for rules that
    need the primitive itself); any other name is a ``TypeError``, so a misspelt rule fails at
    import instead of being silently never used.  A rule the primitive does not declare reads
    as ``None`` (``False`` or ``()`` for the flags); ``p.rule(name)`` raises
    ``NotImplementedError("<rule> rule for <primitive>")`` for it instead.  ``p.rules`` holds
    the declared ones.

    Facts, not names: whatever a transformation, the compiler or an executor needs to know
    about a primitive is one of these rules (``linear``, ``category``, ``monoid``, ...), so no
    code outside the primitive's block tests ``prim.name``.

    Higher-order primitives (parameters holding sub-programs: ``shard_map``, ``checkpoint``;
    ``scan``, ``cond``, ``while`` of ``spmd.control_flow``; ``custom_vjp``) use the same rules
    on their sub-programs:

    - ``subprograms(params)`` lists them (for type checking, printing and inspection; by
      default every ``Program``-valued parameter);
    - ``jvp``, ``partial_eval``, ``transpose`` and ``batch`` bind the primitive again on the
      transformed sub-programs (``spmd.transforms.ad`` has the program-level functions);
    - ``execute(run, **params)`` is how every executor runs it.  ``run`` is the executor's
      handle at the place of the equation, with two operations, each returning a function of
      the values that returns the list of results:

      * ``run.call(program)``: ``program`` run right here (``checkpoint``; a loop calls it once
        per iteration);
      * ``run.manual(program, *, mesh, in_specs, out_specs, manual_axes, check_vma)``:
        ``program`` run on every device of ``mesh``, on the blocks of its operands that the
        specs give (``shard_map``);
      * ``run.local(fn)``: ``fn(xp, k, *arrays) -> list of arrays`` applied to the arrays the
        values are held as, with ``k`` leading mesh dims (a loop slices its ``xs`` and stacks
        its ``ys`` with it);
      * ``run.scalar(value)``: a value that is the same on every device as a Python scalar (a
        loop's predicate, a ``cond``'s branch index).

      ``execute`` returns the function of the equation's operands that returns the list of
      its results (the stacked executor asks once per compiled program and reuses it).
    - ``inline`` and ``manual`` tell the sharding compiler how to see through the primitive.
    """

    RULES = {
        "abstract": "(*avals, **params) -> Aval (a list with multiple_results): shapes and dtypes",
        "impl": "(xp, k, *arrays, **params): on any array namespace, every array with k leading "
                "batch dims (the stacked executor's mesh dims; 0 for one device) that broadcast",
        "multiple_results": "bool: the primitive returns a list of values",
        "vma": "(*avals, **params) -> frozenset: the varying mesh axes of the result, instead of "
               "the union of the operands' (collectives); also turns off the implicit pvary",
        "unreduced": "(*avals, **params) -> (unreduced, reduced): the Manual axes over which "
                     "the result is a pending sum or a reduced copy (pcast, collectives); "
                     "other primitives follow spmd.sharding_rules.manual_unreduced",
        "jvp": "(primals, tangents, **params) -> (primal out, tangent out)",
        "transpose": "(cts, *operands, **params) -> one cotangent (or None) per operand; linear "
                     "operands are ad_util.UndefinedPrimal",
        "partial_eval": "(eqn, unknown_ins, ctx) -> (known eqns, unknown eqn, out_unknown): split "
                        "an equation with sub-programs by what is known",
        "batch": "(vals, dims, **params) -> (out, out_dims): the vmap rule",
        "linear": "True: jointly linear in all operands; a tuple: in those operands, the others "
                  "held fixed; or a function of the params giving either (False: not linear)",
        "multilinear": "tuple of operands the result is linear in one at a time, the others held "
                       "fixed (mul: (0, 1); div: (0,))",
        "monoid": "'sum' | 'prod' | 'max' | 'min' | 'and' | 'or': the associative operation the "
                  "primitive is (max) or folds with (reduce_max)",
        "sharding": "(prim, avals, out, params) -> per-dim mesh axes of the result on Explicit "
                    "axes, where the rule of the category (spmd.sharding_rules) does not fit "
                    "(select: its operands must agree)",
        "category": "the sharding compiler's family: elementwise, broadcast, transpose, reshape, "
                    "slice, pad, concatenate, reduction, scan, arg, gather, window, scatter, "
                    "window_update, contraction, constraint (undeclared: opaque, replicated)",
        "elementwise": "(xp, *arrays) -> array: the elementwise function (executors fuse chains)",
        "collective": "what a collective moves ('sum', 'all_gather', ...; 'none': nothing)",
        "stacked": "(xp, mesh, *stacked, **params): a collective on the stacked layout",
        "per_device": "(comm, *per_device_dicts, **params): a collective through a Communicator",
        "free": "bool: moves no data (pvary); autodiff recomputes it rather than save its output",
        "subprograms": "(params) -> list[Program]: the sub-programs in the params (default: every "
                       "Program-valued param)",
        "execute": "(run, **params) -> function of the operands returning the list of results: "
                   "how executors run a higher-order primitive (see above)",
        "c": "how a loop body is written as C (spmd.executors.native): elementwise, (cw, "
             "operand dtypes, result dtype) -> a C expression of the operands' elements {0}, "
             "{1}, ... or None; other primitives, (cw, *views, **params) -> the result views, "
             "made with the writer's operations",
        "inline": "(params) -> Program: the equation is this program applied to its operands "
                  "(its own meaning matters to autodiff only); the compiler inlines it",
        "manual": "(params) -> (mesh, in_specs, out_specs, body) or None: the equation is a "
                  "per-device region over the whole mesh; the compiler keeps its specs and "
                  "inlines its body",
    }
    _UNDECLARED = {"multiple_results": False, "linear": False, "multilinear": (), "free": False}

    def __init__(self, name: str, *, abstract: Callable, **rules):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "rules", _Rules(name, abstract=abstract, **rules))

    def __getattr__(self, name):
        rules = self.__dict__.get("rules")
        if rules is not None and name in Primitive.RULES:
            return rules.get(name, Primitive._UNDECLARED.get(name))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, rule):
        self.rules[name] = rule

    def __repr__(self):
        return self.name

    def rule(self, name: str):
        r = self.rules.get(name)
        if r is None:
            raise NotImplementedError(f"{name} rule for {self.name}")
        return r

    def subprograms(self, params) -> list[Program]:
        rule = self.rules.get("subprograms")
        if rule is not None:
            return rule(params)
        return [v for v in params.values() if isinstance(v, Program)]

    def linear_operands(self, n: int, params) -> tuple[int, ...]:
        """The operands (of ``n``) that the result is jointly linear in (see ``linear``)."""
        lin = self.linear
        if callable(lin):
            lin = lin(**params)
        return tuple(range(n)) if lin is True else tuple(lin or ())

    def abstract_eval(self, *avals, **params):
        out = self.abstract(*avals, **params)
        if self.vma is not None:
            vma = self.vma(*avals, **params)
        else:
            vma = frozenset().union(*[a.vma for a in avals]) if avals else frozenset()
        if self.multiple_results:
            return [o if o.vma else o.update(vma=vma) for o in out]
        out = out.update(vma=vma) if not out.vma else out
        if self.unreduced is not None or any(a.unreduced or a.reduced for a in avals):
            b = current_builder()
            if b is not None and b.check_vma:      # unchecked bodies carry no Manual types
                rule = self.unreduced or hooks.manual_unreduced
                unreduced, reduced = rule(*avals, **params) if self.unreduced else rule(
                    self, avals, params)
                out = out.update(unreduced=frozenset(unreduced), reduced=frozenset(reduced))
        typed = any(a.sharding is not None for a in avals)
        if typed and out.sharding is None and not _types_off.get():
            out = out.update(sharding=hooks.sharding_rule(self, avals, out, params))
        return out

    def __call__(self, *args, **params):
        return bind(self, *args, **params)


class _Rules(dict):
    """A primitive's declared rules: names of ``Primitive.RULES`` only."""

    def __init__(self, owner: str, **rules):
        super().__init__()
        self.owner = owner
        self.update(rules)

    def __setitem__(self, name, rule):
        if name not in Primitive.RULES:
            close = difflib.get_close_matches(str(name), Primitive.RULES, n=1)
            raise TypeError(f"Primitive {self.owner!r}: unknown rule {name!r}; known rules: "
                            f"{', '.join(Primitive.RULES)}"
                            + (f". Did you mean {close[0]!r}?" if close else ""))
        super().__setitem__(name, rule)

    def update(self, *args, **rules):
        for name, rule in dict(*args, **rules).items():
            self[name] = rule

    def setdefault(self, name, default=None):
        if name not in self:
            self[name] = default
        return self[name]


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------

class Builder:
    """Collects equations while a function is traced.

    ``manual_axes`` are the mesh axes made manual by enclosing shard_maps (the vma universe);
    ``check_vma`` is False inside ``shard_map(check_vma=False)``.
    """

    def __init__(self, parent: "Builder | None", *, mesh=None, manual_axes=(), check_vma=True,
                 context: str = "function"):
        self.parent = parent
        self.eqns: list[Eqn] = []
        self.mesh = mesh if mesh is not None else (parent.mesh if parent else None)
        self.manual_axes = tuple(manual_axes)
        self.check_vma = check_vma
        self.context = context
        self.captured: dict[int, tuple[Tracer, Var]] = {}
        # the source of the equation a transformation is replaying (see ``attributed``); None
        # while the user's own code runs: ``bind`` then looks at the stack
        self.source = parent.source if parent is not None else None

    def new_input(self, aval: Aval) -> "Tracer":
        return Tracer(self, Var(aval))

    def atom(self, x) -> Any:
        """The atom of this builder for ``x``: a Var, or a Literal for constants."""
        if isinstance(x, Tracer):
            if x.builder is self:
                return x.node
            self._check_closure(x.aval)
            # A tracer of an enclosing trace: close over it as an extra input.
            key = id(x)
            if key not in self.captured:
                # Closed-over values are the same on every device: their type carries over.
                var = Var(x.aval)
                self.captured[key] = (x, var)
            return self.captured[key][1]
        if isinstance(x, hooks.array_types):
            self._check_closure(aval_of(x))
            x = np.asarray(x)
        return Literal(x)

    def _check_closure(self, aval: Aval):
        """A per-device body may not close over a value split over its Manual axes on Explicit
        ones (JAX refuses it too): which block would each device see?"""
        split = [a for ax in (aval.sharding.spec.axes if aval.sharding is not None else ())
                 for a in ax if a in self.manual_axes]
        if split:
            raise NotImplementedError(
                f"{self.context}: the function closes over a value of type {aval}, split over "
                f"the Explicit mesh axes {split} that are Manual here; closing over inputs "
                f"sharded on Explicit axes is not supported: pass the value as an argument of "
                f"the shard_map, with its in_specs.")


# The stack of builders being traced into, per thread (and per asyncio task): threads trace and
# run compiled programs independently.
_builders: contextvars.ContextVar[tuple[Builder, ...]] = contextvars.ContextVar("spmd_builders",
                                                                                 default=())


def current_builder() -> Builder | None:
    stack = _builders.get()
    return stack[-1] if stack else None


class _Scope:
    def __init__(self, b: Builder):
        self.b = b

    def __enter__(self):
        self.token = _builders.set(_builders.get() + (self.b,))
        return self.b

    def __exit__(self, *exc):
        _builders.reset(self.token)


def bind(prim: Primitive, *args, **params):
    """Apply ``prim`` to ``args``: stage an equation into the innermost trace, or, when
    nothing is being traced, evaluate it on NumPy arrays."""
    builder = current_builder()
    params = Params(params)
    if builder is None:
        arrays = [np.asarray(a) if not isinstance(a, (bool, int, float, complex)) else a for a in args]
        out = prim.rule("impl")(np, 0, *arrays, **params)
        return out
    atoms = [builder.atom(a) for a in args]
    source = builder.source or _user_source()
    if builder.manual_axes and prim.vma is None and builder.check_vma:
        atoms = _implicit_pvary(builder, atoms, source)
    avals = [a.aval for a in atoms]
    out = prim.abstract_eval(*avals, **params)
    outs = out if prim.multiple_results else [out]
    out_vars = [Var(o) for o in outs]
    builder.eqns.append(Eqn(prim, atoms, params, out_vars, source, _types_off.get()))
    tracers = [Tracer(builder, v) for v in out_vars]
    return tracers if prim.multiple_results else tracers[0]


def attributed(eqns):
    """``eqns`` one by one, with what is bound meanwhile attributed to the source line of the
    equation at hand: for the interpreters that replay a program (JVP, transposition, vmap,
    inlining), so the equations they make point at the user's line, not at the transform."""
    b = current_builder()
    if b is None:
        yield from eqns
        return
    outer = b.source
    try:
        for e in eqns:
            b.source = e.source or outer
            token = _types_off.set(True) if e.untyped else None
            try:
                yield e
            finally:
                if token is not None:
                    _types_off.reset(token)
    finally:
        b.source = outer


# While set, ops compute no sharding types and refuse nothing on Explicit axes: an op given
# ``out_sharding=`` (whose result the constraint after it types) and the transposes that give a
# cotangent its primal's type.  Equations record it, so every replay stages them the same way.
_types_off: contextvars.ContextVar[bool] = contextvars.ContextVar("spmd_types_off", default=False)


@contextlib.contextmanager
def untyped():
    """Ops bound inside give untyped results (the sharding compiler chooses for them)."""
    token = _types_off.set(True)
    try:
        yield
    finally:
        _types_off.reset(token)


def _implicit_pvary(builder: Builder, atoms, source):
    """Ordinary ops on operands of mixed vma first ``pvary`` the less varying ones (explicit in
    the program, so autodiff sees the psum that ``pvary`` transposes to)."""
    vmas = [a.aval.vma for a in atoms if isinstance(a, Var)]
    if not vmas:
        return atoms
    union = frozenset().union(*vmas)
    out = []
    for a in atoms:
        if isinstance(a, Var):
            for prim, axes in _casts_to_vary(builder, a.aval, union):
                v = Var(prim.abstract_eval(a.aval, axes=axes))
                builder.eqns.append(Eqn(prim, [a], Params(axes=axes), [v], source))
                a = v
        out.append(a)
    return out


def _casts_to_vary(builder: Builder, aval: Aval, union) -> list:
    """``(primitive, axes)`` making a value of type ``aval`` vary over ``union``: over the axes
    it is reduced on a ``reduced_vary_cast`` (its cotangent then stays a pending sum there, as
    JAX inserts it), over the others a ``pvary``."""
    missing = frozenset(union) - aval.vma
    red = missing & aval.reduced
    return [(p, _ordered(builder, axes)) for p, axes in
            ((hooks.reduced_vary_cast, red), (hooks.pvary, missing - red)) if axes]


def implicit_pvary(xs: Sequence) -> list:
    """``xs`` with the traced ones ``pvary``'d to the vma of them all, as ``bind`` does to the
    operands of one equation.  The NumPy mapping calls it before it broadcasts operands for an
    equation (``x * g``, ``x @ w``), so that the pvary sits on the operand as the user passed
    it (a parameter): its transpose, the psum of the gradient, then reduces a parameter-sized
    cotangent instead of one the size of the broadcast activation."""
    builder = current_builder()
    if builder is None or not builder.manual_axes or not builder.check_vma:
        return list(xs)
    union = frozenset().union(*[x.aval.vma for x in xs if isinstance(x, Tracer)])
    out = []
    for x in xs:
        if isinstance(x, Tracer):
            for prim, axes in _casts_to_vary(builder, x.aval, union):
                x = bind(prim, x, axes=axes)
        out.append(x)
    return out


def _ordered(builder: Builder, axes) -> tuple[str, ...]:
    return tuple(a for a in builder.mesh.axis_names if a in axes)


def trace(fn: Callable, in_avals: Sequence[Aval], *, mesh=None, manual_axes=(), check_vma=True,
          context: str = "function") -> tuple[Program, list, Any]:
    """Trace ``fn`` (taking flat positional tracers, returning a flat list) into a Program.

    Returns the program, the list of outer tracers it closed over (appended to its inputs),
    and whatever extra ``fn`` returned as a second value, if it returned a pair.
    """
    parent = current_builder()
    b = Builder(parent, mesh=mesh, manual_axes=manual_axes, check_vma=check_vma, context=context)
    ins = [b.new_input(a) for a in in_avals]
    with _Scope(b):
        try:
            outs = fn(*ins)
        except (TypeError, ValueError, NotImplementedError) as e:
            _name_traced_function(e, context)
            raise
        out_atoms = [b.atom(o) for o in outs]
    captured = list(b.captured.values())
    program = Program([t.node for t in ins] + [v for _, v in captured], b.eqns, out_atoms)
    return program, [t for t, _ in captured]


_NAMES_A_FUNCTION = re.compile(r"\b(shard_map|jit)\(")


def _name_traced_function(e: BaseException, context: str):
    """An error spmd raises while tracing names the function being traced (errors raised by
    the user's own code pass through untouched)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    here = os.path.dirname(os.path.abspath(__file__))
    if (getattr(e, "_spmd_named", False) or tb is None
            or not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(here + os.sep)
            or not e.args or not isinstance(e.args[0], str)):
        return
    if not _NAMES_A_FUNCTION.search(e.args[0]):   # the innermost traced function is the one to name
        e.args = (f"{e.args[0]} (while tracing {context})",) + e.args[1:]
    e._spmd_named = True


# ---------------------------------------------------------------------------------------------
# Tracer
# ---------------------------------------------------------------------------------------------

_CONCRETE_HELP = (
    "{what} needs a concrete value, but this is a traced value ({aval}) inside {context}: "
    "its value is known only when the program runs on the devices. Use spmd.numpy.where / "
    "np.where instead of Python `if`, make the argument static (static_argnums), or compute it "
    "outside the traced function.")


class Tracer:
    """A value being traced.  Unmodified NumPy code works on it (NEP 13/18)."""

    __array_priority__ = 1000
    __slots__ = ("builder", "node")

    def __init__(self, builder: Builder, var: Var):
        self.builder = builder
        self.node = var

    @property
    def aval(self) -> Aval:
        return self.node.aval

    shape = property(lambda self: self.aval.shape)
    dtype = property(lambda self: self.aval.dtype)
    ndim = property(lambda self: self.aval.ndim)
    size = property(lambda self: self.aval.size)
    vma = property(lambda self: self.aval.vma)

    def __repr__(self):
        return f"Tracer<{self.aval}>"

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d traced value")
        return self.shape[0]

    def __iter__(self):
        if not self.shape:
            raise TypeError("iteration over a 0-d traced value")
        return (self[i] for i in range(self.shape[0]))

    def _concrete(self, what):
        raise TracingError(_CONCRETE_HELP.format(what=what, aval=self.aval, context=self.builder.context))

    def __bool__(self):
        self._concrete("Python `if`/`bool()` on a traced value")

    def __float__(self):
        self._concrete("float()")

    def __int__(self):
        self._concrete("int()")

    def __complex__(self):
        self._concrete("complex()")

    def __index__(self):
        self._concrete("using a traced value as a Python index")

    def __array__(self, dtype=None, copy=None):
        self._concrete("np.asarray()/np.array()")

    def tolist(self):
        self._concrete(".tolist()")

    def item(self):
        self._concrete(".item()")

    def __hash__(self):
        return id(self)

    # NEP 13 / NEP 18 -- the table lives in spmd.numpy_api
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return hooks.handle_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return hooks.handle_function(func, args, kwargs)

    def __array_namespace__(self, api_version=None):
        return hooks.array_namespace


def _inplace(ufunc, x, y):
    """``x op= y`` rebinds ``x`` (traced values are immutable) under NumPy's rule: the result
    must cast back to ``x``'s dtype with casting='same_kind', and keeps that dtype."""
    r = ufunc(x, y)
    if r.dtype != x.dtype:
        if not np.can_cast(r.dtype, x.dtype, "same_kind"):
            raise TypeError(f"in-place np.{ufunc.__name__} in {x.builder.context}: NumPy refuses "
                            f"to cast the result ({r.dtype}) back to the dtype of the left "
                            f"operand ({x.dtype}) with casting='same_kind'; write `x = x op y` for "
                            f"a new {r.dtype} value, or cast the right operand first.")
        r = r.astype(x.dtype)
    return r


def install_operators(cls, *, inplace: bool):
    """Python's operators on ``cls`` (``Tracer``, and ``spmd.Array`` for eager ops) as NumPy
    calls, so both go through NumPy's protocols (NEP 13/18) and one table serves both.
    ``inplace``: ``x op= y`` rebinds ``x`` under NumPy's casting rule (traced values are
    immutable)."""
    ops = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
           "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power,
           "matmul": np.matmul, "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
           "lshift": np.left_shift, "rshift": np.right_shift}
    for name, uf in ops.items():
        setattr(cls, f"__{name}__", (lambda uf: lambda s, o: uf(s, o))(uf))
        setattr(cls, f"__r{name}__", (lambda uf: lambda s, o: uf(o, s))(uf))
        if inplace:
            setattr(cls, f"__i{name}__", (lambda uf: lambda s, o: _inplace(uf, s, o))(uf))
    for name, uf in {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
                     "eq": np.equal, "ne": np.not_equal}.items():
        setattr(cls, f"__{name}__", (lambda uf: lambda s, o: uf(s, o))(uf))
    cls.__neg__ = lambda s: np.negative(s)
    cls.__pos__ = lambda s: s
    cls.__abs__ = lambda s: np.abs(s)
    cls.__invert__ = lambda s: np.invert(s)


install_operators(Tracer, inplace=True)
