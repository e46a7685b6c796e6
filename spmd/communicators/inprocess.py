"""The in-process communicator: every device of the mesh is in this process, and each
collective is a plain loop over the group's buffers.  Short and obviously right: it is the
oracle the other executors are tested against."""
from __future__ import annotations

import functools

import numpy as np

from ..comm_protocol import Communicator, axis_groups

_REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}


class InProcessCommunicator(Communicator):
    def __init__(self, mesh):
        self.mesh = mesh
        self.local_positions = list(range(mesh.size))

    def _groups(self, axes, groups):
        return axis_groups(self.mesh, axes, groups)

    def all_reduce(self, bufs, axes, groups, op):
        out = {}
        for g in self._groups(axes, groups):
            total = functools.reduce(_REDUCE[op], [bufs[p] for p in g])
            for p in g:
                out[p] = np.array(total)
        return out

    def all_gather(self, bufs, axes, groups):
        out = {}
        for g in self._groups(axes, groups):
            stacked = np.stack([bufs[p] for p in g])
            for p in g:
                out[p] = stacked
        return out

    def reduce_scatter(self, bufs, axes, groups, op):
        out = {}
        for g in self._groups(axes, groups):
            for i, p in enumerate(g):
                out[p] = functools.reduce(_REDUCE[op], [bufs[q][i] for q in g])
        return out

    def all_to_all(self, bufs, axes, groups):
        out = {}
        for g in self._groups(axes, groups):
            for j, p in enumerate(g):
                out[p] = np.stack([bufs[q][j] for q in g])
        return out

    def permute(self, bufs, axes, perm):
        out = {}
        for g in self._groups(axes, None):
            for p in g:
                out[p] = np.zeros_like(bufs[p])
            for s, d in perm:
                out[g[d]] = np.array(bufs[g[s]])
        return out

    def broadcast(self, bufs, axes, groups, source):
        out = {}
        for g in self._groups(axes, groups):
            for p in g:
                out[p] = np.array(bufs[g[source]])
        return out

    def barrier(self):
        """Every position is in this process and every call above is synchronous: nothing to do."""
