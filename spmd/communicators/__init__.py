"""Communicators carry out collectives for the per-device executor.

A communicator knows the mesh and which mesh positions (flat indices into ``mesh.devices``)
this process holds.  Every method takes ``bufs``, a dict from local position to array, plus
the mesh ``axes`` the collective runs over and optional ``groups`` (``axis_index_groups``:
indices along those axes); it returns a dict of the same positions.

- ``all_reduce(bufs, axes, groups, op)``, op in sum/max/min
- ``all_gather(bufs, axes, groups)`` -> arrays with a new leading dim (group order)
- ``reduce_scatter(bufs, axes, groups, op)``: each buffer has a leading dim of group size
- ``all_to_all(bufs, axes, groups)``: leading dim of group size, chunk j goes to member j
- ``permute(bufs, axes, perm)``: (source, destination) pairs along the axes; zeros elsewhere
- ``broadcast(bufs, axes, groups, source)``
- ``axis_index(axes)`` -> {position: index along axes}

A communicator may also say where local arrays live (``placement``: the array namespace and the
device to select around each position's work, e.g. CuPy on that position's GPU); without one
they are host NumPy arrays.
"""
from __future__ import annotations

import numpy as np

from .. import _cache

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
    return getattr(comm, "placement", _HOST)
