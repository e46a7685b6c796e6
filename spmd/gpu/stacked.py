"""The stacked executor on one GPU: virtual devices (``SPMD_VIRTUAL_DEVICES=N``) as the leading
mesh dims of CuPy arrays.

The primitives' batched implementations run unchanged with ``xp = cupy``.  ``psum``, ``pmax``
and ``pmin`` go through the fused n-way reduce kernel (``kernels/reduce.cu``: one pass over the
strided stacked value, no transpose, no temporary); the other collectives are the generic
stacked rules, which on this layout are views plus one CuPy copy, their reductions over the
ranks (``psum_scatter``, grouped psums) through the same kernel.  Inputs are uploaded at the
start of a call and outputs come back to the host at the end, so ``np.asarray`` of a result
works as on the CPU.
"""
from __future__ import annotations

import numpy as np

from .. import _host_parallel
from ..collectives import DEVICE_REDUCE, pmax_p, pmin_p, psum_p
from ..communicators.cuda import cupy as _cupy
from ..executors.stacked import StackedExecutor
from ..layout import GlobalValue
from . import kernels, ops


def _all_reduce_rule(prim, op):
    generic = prim.rules["stacked"]

    def stacked(xp, mesh, x, *, axes, groups=None):
        dims = [mesh.axis_names.index(a) for a in axes]
        if (groups is not None or kernels.env_disabled() or kernels.reduce_ctype(x.dtype) is None
                or any(x.shape[d] == 1 and mesh.axis_sizes[d] > 1 for d in dims)):
            return generic(xp, mesh, x, axes=axes, groups=groups)
        for d in dims:                                   # mesh dims of size 1 need no pass
            if x.shape[d] > 1:
                x = ops.reduce_axis(x, d, op)
        return x
    return stacked


KERNEL_RULES = {p: _all_reduce_rule(p, op) for p, op in ((psum_p, "sum"), (pmax_p, "max"),
                                                             (pmin_p, "min"))}


def _reduce_ranks(y, op):
    """The generic stacked rules' reduction over the ranks (axis 1: psum_scatter, grouped
    psums) in one pass of the fused kernel, where it applies."""
    if kernels.env_disabled() or kernels.reduce_ctype(y.dtype) is None:
        return None
    return ops.reduce_axis(y, 1, op, keepdims=False)


DEVICE_REDUCE["cupy"] = _reduce_ranks
_host_parallel.DEVICE_MODULES.add("cupy")


class CupyStackedExecutor(StackedExecutor):
    def __init__(self):
        super().__init__(xp=_cupy())

    def _stacked_rule(self, prim):
        return KERNEL_RULES.get(prim) or super()._stacked_rule(prim)

    def run(self, program, args) -> list:
        return [_to_host(o) for o in super().run(program, [_to_device(a) for a in args])]


def _to_device(a):
    cupy = _cupy()
    if isinstance(a, GlobalValue) and isinstance(a._storage, np.ndarray):
        return GlobalValue(cupy.asarray(a._storage), a.shape, a.sharding)
    if isinstance(a, np.ndarray):
        return cupy.asarray(a)
    return a


def _to_host(o):
    cupy = _cupy()
    if isinstance(o, GlobalValue) and isinstance(o._storage, cupy.ndarray):
        return GlobalValue(o._storage.get(), o.shape, o.sharding)
    if isinstance(o, cupy.ndarray):
        return o.get()
    return o
