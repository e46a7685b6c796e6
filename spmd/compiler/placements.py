"""Placement values: how one array is laid out over the mesh.

A ``Sharding`` is a ``PartitionSpec`` per dim (the mesh axes splitting it, major to minor) plus
the *pending reductions*: mesh axes over which every device holds a partial result that still
has to be summed (or maxed).  Seen from one mesh axis this is DTensor's placement:
``S(d)`` (splits dim d), ``R`` (replicated) or ``P(sum)`` (pending sum).

>>> s = Sharding((("data",), ()), (("model", "sum"),))
>>> str(s), s.placements(("data", "model"))
('[data,-]+P(sum:model)', (S(0), P(sum)))
"""
from __future__ import annotations

import dataclasses
import math

from ..sharding import PartitionSpec, block_size


@dataclasses.dataclass(frozen=True)
class Shard:
    dim: int

    def __repr__(self):
        return f"S({self.dim})"


@dataclasses.dataclass(frozen=True)
class Replicate:
    def __repr__(self):
        return "R"


@dataclasses.dataclass(frozen=True)
class Partial:
    op: str = "sum"

    def __repr__(self):
        return f"P({self.op})"


@dataclasses.dataclass(frozen=True, eq=False)
class Sharding:
    """Per-dim mesh axes plus pending reductions ``((axis, op), ...)`` (sorted by axis)."""
    dims: tuple[tuple[str, ...], ...]
    partial: tuple[tuple[str, str], ...] = ()

    def __eq__(self, other):
        return self is other or (isinstance(other, Sharding) and self.dims == other.dims
                                 and self.partial == other.partial)

    def __hash__(self):          # cached: shardings key every table of the compiler
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.dims, self.partial))
            object.__setattr__(self, "_hash", h)
        return h

    @staticmethod
    def replicated(ndim: int) -> "Sharding":
        return Sharding(((),) * ndim)

    @staticmethod
    def from_spec(spec: PartitionSpec, ndim: int) -> "Sharding":
        """``spec``'s dims; its ``unreduced`` axes (JAX's) are sums pending over them."""
        axes = tuple(spec.axes)
        return Sharding(axes + ((),) * (ndim - len(axes)),
                        tuple((a, "sum") for a in sorted(getattr(spec, "unreduced", ()))))

    @property
    def ndim(self) -> int:
        return len(self.dims)

    @property
    def spec(self) -> PartitionSpec:
        entries = [None if not a else (a[0] if len(a) == 1 else a) for a in self.dims]
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    @property
    def used_axes(self) -> frozenset:
        return frozenset(a for axes in self.dims for a in axes)

    @property
    def partial_axes(self) -> frozenset:
        return frozenset(a for a, _ in self.partial)

    def partial_op(self, axis: str) -> str | None:
        return dict(self.partial).get(axis)

    def with_dims(self, dims) -> "Sharding":
        return Sharding(tuple(tuple(a) for a in dims), self.partial)

    def with_partial(self, partial) -> "Sharding":
        return Sharding(self.dims, tuple(sorted(partial)))

    def without_partial(self) -> "Sharding":
        return Sharding(self.dims)

    def parts(self, sizes: dict) -> tuple[int, ...]:
        return tuple(math.prod(sizes[a] for a in axes) for axes in self.dims)

    def local_shape(self, shape, sizes: dict) -> tuple[int, ...]:
        """The per-device block shape: dims split ``n`` ways have ``ceil(d / n)`` (padded)."""
        return tuple(block_size(d, n) if n > 1 else d for d, n in zip(shape, self.parts(sizes)))

    def is_even(self, shape, sizes: dict) -> bool:
        return all(d % n == 0 for d, n in zip(shape, self.parts(sizes)))

    def placements(self, axis_names) -> tuple:
        """DTensor's view: one placement per mesh axis."""
        out = []
        for a in axis_names:
            dim = next((d for d, axes in enumerate(self.dims) if a in axes), None)
            op = self.partial_op(a)
            out.append(Shard(dim) if dim is not None else Partial(op) if op else Replicate())
        return tuple(out)

    def __str__(self):
        dims = ",".join("-" if not a else a[0] if len(a) == 1 else "(" + ",".join(a) + ")"
                        for a in self.dims)
        s = f"[{dims}]"
        if self.partial:
            ops: dict[str, list[str]] = {}
            for a, op in self.partial:
                ops.setdefault(op, []).append(a)
            s += "+" + "+".join(f"P({op}:{','.join(ax)})" for op, ax in ops.items())
        return s

    __repr__ = __str__
