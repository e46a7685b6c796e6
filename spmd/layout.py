"""The stacked layout: a value on a mesh as one array ``[one dim per mesh axis] + local_shape``.

A mesh dim has the axis size where the value varies over that axis and size 1 where it is
the same on every device of the axis, so broadcasting is the implicit ``pvary``.  These two
functions move blocks between local dims and mesh dims; both are views whenever strides allow,
and both work for any array namespace ``xp`` (numpy, cupy).
"""
from __future__ import annotations

import math


def split_into_mesh(x, mesh_sizes: tuple[int, ...], dim_axes: tuple[tuple[int, ...], ...], xp):
    """Split local dim ``d`` of ``x`` over the mesh dims ``dim_axes[d]`` (major first).

    ``x`` has shape ``[m mesh dims] + local``; the targeted mesh dims must have size 1 and the
    local dims must divide evenly.
    """
    m = len(mesh_sizes)
    targets = [p for axes in dim_axes for p in axes]
    if not targets:
        return x
    keep = [j for j in range(m) if j not in targets]
    local = x.shape[m:]
    y = x.reshape(tuple(x.shape[j] for j in keep) + tuple(local))
    split_shape, where, block_pos = list(y.shape[:len(keep)]), {}, []
    for d, axes in enumerate(dim_axes):
        for p in axes:
            where[p] = len(split_shape)
            split_shape.append(mesh_sizes[p])
        block_pos.append(len(split_shape))
        split_shape.append(local[d] // math.prod(mesh_sizes[p] for p in axes))
    y = y.reshape(tuple(split_shape))
    perm = [where[j] if j in where else keep.index(j) for j in range(m)] + block_pos
    return xp.transpose(y, perm) if perm != list(range(len(perm))) else y


def merge_from_mesh(x, mesh_sizes: tuple[int, ...], dim_axes: tuple[tuple[int, ...], ...], xp):
    """Inverse of :func:`split_into_mesh`: concatenate the blocks along mesh dims ``dim_axes[d]``
    into local dim ``d``; those mesh dims become size 1.  A value that is invariant over such an
    axis (mesh dim of size 1) is repeated, as ``out_specs`` naming that axis means."""
    m = len(mesh_sizes)
    targets = [p for axes in dim_axes for p in axes]
    if not targets:
        return x
    want = tuple(mesh_sizes[j] if j in targets else x.shape[j] for j in range(m)) + tuple(x.shape[m:])
    if want != tuple(x.shape):
        x = xp.broadcast_to(x, want)
    keep = [j for j in range(m) if j not in targets]
    perm = keep + [q for d, axes in enumerate(dim_axes) for q in (*axes, m + d)]
    y = xp.transpose(x, perm) if perm != list(range(len(perm))) else x
    local = [x.shape[m + d] * math.prod(mesh_sizes[p] for p in axes) for d, axes in enumerate(dim_axes)]
    out_shape = tuple(1 if j in targets else x.shape[j] for j in range(m)) + tuple(local)
    return y.reshape(out_shape)


def mesh_positions(axis_names: tuple[str, ...], spec_axes) -> tuple[tuple[int, ...], ...]:
    """Per dim, the mesh-dim positions of a spec's axes."""
    return tuple(tuple(axis_names.index(a) for a in axes) for axes in spec_axes)
