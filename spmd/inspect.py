"""Look inside programs: which collectives run, over which mesh axes, moving how many bytes."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from rich.console import Console
from rich.table import Table

from .core import Program


@dataclasses.dataclass(frozen=True)
class CollectiveUse:
    op: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]          # per-device operand shape
    dtype: np.dtype
    where: str                      # the shard_map body it is in

    @property
    def bytes_per_device(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def collectives_of(program: Program, _where: str = "top") -> list[CollectiveUse]:
    """Every collective equation in ``program`` and its nested programs, in program order.

    >>> import numpy as np, spmd
    >>> mesh = spmd.make_mesh((8,), ("x",))
    >>> total = spmd.shard_map(lambda a: spmd.psum(a, "x"), mesh=mesh, in_specs=spmd.P("x"),
    ...                        out_specs=spmd.P())
    >>> program = spmd.make_program(total)(np.ones(16))
    >>> [(c.op, c.axes, c.shape) for c in spmd.collectives_of(program)]
    [('psum', ('x',), (2,))]
    """
    out = []
    for e in program.eqns:
        if e.prim.rules.get("collective") not in (None, "none"):
            a = e.inputs[0].aval
            out.append(CollectiveUse(e.prim.name, tuple(e.params.get("axes", ())), a.shape,
                                     np.dtype(a.dtype), _where))
        for sub in e.prim.subprograms(e.params):
            name = e.params.get("name", e.prim.name)
            out.extend(collectives_of(sub, f"{e.prim.name}({name})"))
    return out



def print_collectives(program: Program) -> None:
    """A table of the collectives in ``program`` (op, axes, per-device shape, bytes)."""
    t = Table(title="collectives")
    for col in ("op", "mesh axes", "per-device operand", "bytes/device", "in"):
        t.add_column(col)
    for c in collectives_of(program):
        t.add_row(c.op, ",".join(c.axes), f"{np.dtype(c.dtype).name}{list(c.shape)}",
                  f"{c.bytes_per_device:,}", c.where)
    Console().print(t)
