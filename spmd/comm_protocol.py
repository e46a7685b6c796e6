"""The communicator protocol: what the per-device executor asks of a communicator.

A communicator carries out collectives for the per-device executor.  It knows the mesh and
which mesh positions (flat indices into ``mesh.devices``) this process holds
(``local_positions``).  Every method takes ``bufs``, a dict from local position to array, plus
the mesh ``axes`` the collective runs over and optional ``groups`` (``axis_index_groups``:
indices along those axes); it returns a dict of the same positions.

- ``all_reduce(bufs, axes, groups, op)``, op in sum/max/min
- ``all_gather(bufs, axes, groups)`` -> arrays with a new leading dim (group order)
- ``reduce_scatter(bufs, axes, groups, op)``: each buffer has a leading dim of group size
- ``all_to_all(bufs, axes, groups)``: leading dim of group size, chunk j goes to member j
- ``permute(bufs, axes, perm)``: (source, destination) pairs along the axes; zeros elsewhere
- ``broadcast(bufs, axes, groups, source)``
- ``axis_index(axes)`` -> {position: index along axes}
- ``barrier()``: every member of the mesh reached this point (and, on GPUs, is idle)

A communicator may also say where local arrays live (``placement``: the array namespace and the
device to select around each position's work, e.g. CuPy on that position's GPU); without one
they are host NumPy arrays.  ``multi_process`` says whether the mesh spans processes (then
each process holds only its own positions' values).

Every backend (``spmd.communicators.inprocess``, ``.mpi``, ``.nccl``) subclasses
:class:`Communicator`.
"""
from __future__ import annotations

import abc

import numpy as np

from . import _cache

# Bytes each rank sends over the slowest link, per byte of its input: the nccl-tests "bus"
# factors.  The cost model and the bandwidth reports both use this one table.
BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "permute": lambda n: 1.0,
}


def axis_groups(mesh, axes, groups=None) -> list[list[int]]:
    """The flat mesh positions that take part together in a collective over ``axes``, each list
    in rank order (major-to-minor over ``axes``), split by ``axis_index_groups``."""
    ids = np.arange(mesh.size).reshape(mesh.axis_sizes)
    pos = [mesh.axis_names.index(a) for a in axes]
    others = [j for j in range(len(mesh.axis_sizes)) if j not in pos]
    n = int(np.prod([mesh.axis_sizes[p] for p in pos]))
    rows = np.transpose(ids, others + pos).reshape(-1, n)
    out = []
    for row in rows:
        if groups is None:
            out.append([int(i) for i in row])
        else:
            out.extend([[int(row[i]) for i in g] for g in groups])
    return out


def rank_in(mesh, axes, position) -> int:
    coords = np.unravel_index(position, mesh.axis_sizes)
    r = 0
    for a in axes:
        p = mesh.axis_names.index(a)
        r = r * mesh.axis_sizes[p] + int(coords[p])
    return r


@_cache.memoize
def group_of(mesh, axes, groups, position) -> tuple[int, ...]:
    """The positions of ``position``'s group in a collective over ``axes``, in rank order (for
    communicators that hold one position per process)."""
    return tuple(next(g for g in axis_groups(mesh, axes, groups) if position in g))


class HostPlacement:
    """Local arrays as host NumPy arrays (the default placement)."""
    xp = np

    def call(self, position, fn, *args, **kwargs):
        """``fn(xp, *args, **kwargs)`` where ``position``'s arrays live."""
        return fn(np, *args, **kwargs)

    def to_local(self, position, value):
        return np.asarray(value)

    def to_host(self, value):
        return value


_HOST = HostPlacement()


def placement(comm):
    """Where ``comm``'s local arrays live (:class:`HostPlacement` unless it says otherwise)."""
    return getattr(comm, "placement", _HOST)


class Communicator(abc.ABC):
    """The protocol every communicator backend implements (see the module docstring).

    Subclasses set ``mesh`` and ``local_positions`` and implement the collectives; multi-process
    backends also accept a keyword ``timeout`` (seconds) on each collective."""

    multi_process: bool = False
    placement = _HOST
    mesh: object
    local_positions: list[int]

    @abc.abstractmethod
    def all_reduce(self, bufs, axes, groups, op):
        """op (sum/max/min) over each group; every member gets the result."""

    @abc.abstractmethod
    def all_gather(self, bufs, axes, groups):
        """Every member's buffer, stacked on a new leading dim in group order."""

    @abc.abstractmethod
    def reduce_scatter(self, bufs, axes, groups, op):
        """Member j gets op over the group of chunk j of the leading (group-size) dim."""

    @abc.abstractmethod
    def all_to_all(self, bufs, axes, groups):
        """Chunk j of the leading (group-size) dim goes to member j, stacked in source order."""

    @abc.abstractmethod
    def permute(self, bufs, axes, perm):
        """(source, destination) rank pairs along ``axes``; a rank no one sends to gets zeros."""

    @abc.abstractmethod
    def broadcast(self, bufs, axes, groups, source):
        """Member ``source``'s buffer to every member of its group."""

    @abc.abstractmethod
    def barrier(self):
        """Every member reached this point."""

    def axis_index(self, axes):
        """{position: its index along ``axes``} for the local positions."""
        return {p: np.int32(rank_in(self.mesh, axes, p)) for p in self.local_positions}
