"""The compiler's one entry point: a global Program plus shardings in, a per-device Program out.

>>> import numpy as np, spmd
>>> from spmd import P
>>> from spmd.compiler import Sharding, compile_program
>>> mesh = spmd.make_mesh((2, 4), ("data", "model"))
>>> program = spmd.make_program(lambda x, w: x @ w)(np.ones((8, 4)), np.ones((4, 8)))
>>> comp = compile_program(program, [Sharding.from_spec(P("data"), 2),
...                                  Sharding.from_spec(P(None, "model"), 2)], [None], mesh)
>>> comp.prop.out_shardings[0].spec
P('data', 'model')
"""
from __future__ import annotations

import dataclasses
import os

from ..core import Program, untyped
from .cost import CostModel, default_cost_model
from .explain import explain_text, global_text
from .lower import lower
from .propagate import check_constraints, inline_calls, propagate


@dataclasses.dataclass
class Compiled:
    """A compiled program: the global one, its shardings, the per-device (manual) one and the
    collectives the compiler inserted."""
    name: str
    program: Program              # global
    prop: object                  # Propagation: every value's sharding
    manual: Program               # the per-device (shard_map) form
    inserted: list
    mesh: object
    out_shapes: list
    out_tree: object
    padded: bool = False          # some block carries padding (an uneven dim)

    def as_text(self) -> str:
        return (f"# global program (jit({self.name}), shardings after each type)\n"
                f"{global_text(self.program, self.prop)}\n"
                f"# per-device program\n{self.manual}")

    def explain(self) -> str:
        return explain_text(self.inserted, self.mesh, self.name)

    def collectives(self) -> list[tuple[str, tuple]]:
        """``[(kind, axes), ...]`` of every inserted collective, in program order."""
        return [(i.step.kind, i.step.axes) for i in self.inserted]


def compile_program(program: Program, in_shardings, out_shardings, mesh, *, name="function",
                    cost_model: CostModel | None = None, out_shapes=None, out_tree=None,
                    in_names=None, out_names=None) -> Compiled:
    """Propagate shardings through ``program`` (``None``: the compiler chooses), insert the
    collectives by the cost model, and lower it to the per-device form.  ``in_names`` /
    ``out_names`` name the inputs and outputs in ``explain()`` (pytree paths)."""
    cm = cost_model or default_cost_model()
    program = inline_calls(program)
    check_constraints(program, name)
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    prop = propagate(program, list(in_shardings), list(out_shardings), sizes, cm)
    with untyped():    # the per-device program: sharding types were the global program's
        manual, inserted = lower(program, prop, mesh, cm, name, in_names, out_names)
    padded = any(not sh.is_even(v.aval.shape, sizes)
                 for e, st in zip(program.eqns, prop.strategies)
                 for v, sh in zip(list(e.inputs) + list(e.outputs), list(st.ins) + list(st.outs)))
    comp = Compiled(name, program, prop, manual, inserted, mesh,
                    out_shapes or [a.shape for a in program.out_avals], out_tree, padded)
    if os.environ.get("SPMD_EXPLAIN") == "1":
        print(comp.explain())
    return comp
