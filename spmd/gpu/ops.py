"""Launchers: the kernels of ``kernels/`` applied to CuPy arrays.

Each function works out the kernel's view with :mod:`spmd.gpu.index_math` and falls back to
CuPy's own ops where a kernel does not apply (a layout that needs more than three strided runs,
a dtype with no instantiation, ``SPMD_GPU_KERNELS=0``).  All launches go on the current
stream of the current device; callers select the device of the arrays.
"""
from __future__ import annotations

import numpy as np

from ..communicators.cuda import cupy as _cupy
from . import index_math as im
from . import kernels


def _elem_strides(a) -> tuple[int, ...]:
    return tuple(s // a.itemsize for s in a.strides)


def _ints(itype, *values):
    return tuple((np.int32 if itype == "int" else np.int64)(v) for v in values)


def _launch_pack(name, src_ptr_array, dst_ptr_array, lay, unit):
    itype = im.index_type(lay.total, lay.max_offset())
    fn = kernels.kernel("pack.cu", f"spmd::{name}<{kernels.MOVE_TYPES[unit]}, {itype}>")
    blocks, threads = kernels.grid(lay.total)
    fn((blocks,), (threads,), (src_ptr_array, dst_ptr_array, *_ints(
        itype, lay.n, lay.d0, lay.d1, lay.d2, lay.s_rank, lay.s0, lay.s1, lay.s2)))


def pack(view, out=None):
    """A contiguous copy of ``view`` (rank dim first, any strides): shape ``view.shape``."""
    cupy = _cupy()
    out = cupy.empty(view.shape, view.dtype) if out is None else out
    lay = im.pack_layout(view.shape, _elem_strides(view)) if view.size else None
    if lay is None or kernels.env_disabled() or view.itemsize > 16 or 16 % view.itemsize:
        out[...] = view
        return out
    lay, unit = im.widen(lay, view.itemsize, [view.data.ptr, out.data.ptr])
    _launch_pack("pack_chunks", _ptr(view), _ptr(out), lay, unit)
    return out


def unpack(packed, view):
    """Write the contiguous ``packed`` into the strided ``view`` (same shape)."""
    lay = im.pack_layout(view.shape, _elem_strides(view)) if view.size else None
    if lay is None or kernels.env_disabled() or view.itemsize > 16 or 16 % view.itemsize:
        view[...] = packed
        return view
    lay, unit = im.widen(lay, view.itemsize, [view.data.ptr, packed.data.ptr])
    _launch_pack("unpack_chunks", _ptr(packed), _ptr(view), lay, unit)
    return view


def _ptr(a):
    """A raw device pointer as a kernel argument (CuPy passes numpy.uint64 as a 64-bit value)."""
    return np.uint64(a.data.ptr)


def _ptr_array(arrays):
    cupy = _cupy()
    return cupy.asarray(np.array([a if isinstance(a, (int, np.integer)) else a.data.ptr
                                  for a in arrays], dtype=np.uint64))


def reduce_axis(x, axis: int, op: str, scale: float | None = None, keepdims: bool = True):
    """``op`` over ``axis`` of ``x`` in one pass (``* scale`` if given): the n-way reduce of the
    stacked layout.  Falls back to CuPy where the kernel does not apply."""
    cupy = _cupy()
    ctype = kernels.reduce_ctype(x.dtype)
    before = im.runs(x.shape[:axis], _elem_strides(x)[:axis])
    after = im.runs(x.shape[axis + 1:], _elem_strides(x)[axis + 1:])
    if (ctype is None or kernels.env_disabled() or len(before) > 1 or len(after) > 1 or x.size == 0
            or any(s < 0 for s in x.strides)):
        kw = {"dtype": x.dtype} if op == "sum" else {}           # no integer promotion
        out = {"sum": cupy.sum, "max": cupy.max, "min": cupy.min}[op](x, axis=axis, keepdims=keepdims, **kw)
        return out * scale if scale is not None else out
    (outer, s_outer), = before or [(1, 0)]
    (inner, s_inner), = after or [(1, 1)]
    n, s_n = x.shape[axis], x.strides[axis] // x.itemsize
    shape = x.shape[:axis] + ((1,) if keepdims else ()) + x.shape[axis + 1:]
    out = cupy.empty(shape, x.dtype)
    itype = im.index_type(outer * inner, outer * s_outer + n * s_n + inner * s_inner)
    fn = kernels.kernel("reduce.cu", f"spmd::reduce_axis<{ctype}, {kernels.OPS[op]}, {itype}>")
    blocks, threads = kernels.grid(outer * inner)
    fn((blocks,), (threads,), (_ptr(x), _ptr(out), *_ints(itype, outer, n, inner, s_outer, s_n, s_inner),
                               np.float64(scale or 1.0), np.int32(scale is not None)))
    return out


def reduce_ptrs(srcs, out, op: str, scale: float | None = None):
    """``out = op(srcs[0], ..., srcs[n-1])`` (contiguous buffers of one dtype and size)."""
    ctype = kernels.reduce_ctype(out.dtype)
    if ctype is None or kernels.env_disabled():
        cupy = _cupy()
        combine = {"sum": cupy.add, "max": cupy.maximum, "min": cupy.minimum}[op]
        acc = srcs[0]
        for s in srcs[1:]:
            acc = combine(acc, s)
        out[...] = acc * scale if scale is not None else acc
        return out
    ptrs = _ptr_array(srcs)
    vectorized = all(p % 16 == 0 for p in [s.data.ptr for s in srcs] + [out.data.ptr])
    fn = kernels.kernel("reduce.cu", f"spmd::reduce_ptrs<{ctype}, {kernels.OPS[op]}>")
    blocks, threads = kernels.grid(max(1, out.size // (16 // out.itemsize)))
    fn((blocks,), (threads,), (ptrs, np.int32(len(srcs)), _ptr(out), np.int64(out.size),
                               np.float64(scale or 1.0), np.int32(scale is not None), np.int32(vectorized)))
    return out


def copy_batched(pairs):
    """Copy each ``(src, dst)`` of contiguous arrays (any devices with peer access) in one
    launch; sizes in bytes must match pairwise."""
    cupy = _cupy()
    if not pairs:
        return
    if kernels.env_disabled():
        for s, d in pairs:
            d.data.copy_from_device(s.data, s.nbytes)    # cudaMemcpyAsync: peers too (UVA)
        return
    addresses = [a.data.ptr for p in pairs for a in p]
    nbytes = [s.nbytes for s, _ in pairs]
    unit = im.copy_unit(addresses, nbytes)
    counts = cupy.asarray(np.array([b // unit for b in nbytes], dtype=np.int64))
    fn = kernels.kernel("copy.cu", f"spmd::copy_batched<{kernels.COPY_TYPES[unit]}>")
    blocks, threads = kernels.grid(max(nbytes) // unit)
    srcs, dsts = _ptr_array([s for s, _ in pairs]), _ptr_array([d for _, d in pairs])
    fn((blocks, len(pairs)), (threads,), (srcs, dsts, counts))
