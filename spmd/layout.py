"""The stacked layout: a value on a mesh as one array ``[one dim per mesh axis] + local_shape``.

A mesh dim has the axis size where the value varies over that axis and size 1 where it is
the same on every device of the axis, so broadcasting is the implicit ``pvary``.  These two
functions move blocks between local dims and mesh dims; both are views whenever strides allow,
and both work for any array namespace ``xp`` (numpy, cupy).  ``GlobalValue`` is a global
array stored this way, as the executors see it.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import ShardingError


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


def padded_shape(shape, parts) -> tuple[int, ...]:
    """``shape`` with each dim rounded up to a multiple of its number of blocks (``parts``)."""
    return tuple(-(-d // n) * n for d, n in zip(shape, parts))


_DELETED = ("this spmd.Array was deleted, or donated to a jit call (donate_argnums), and its "
            "buffer is gone; use the jitted function's result instead.")


class GlobalValue:
    """A global array as the executors hold it: on the simulated mesh one stacked array
    (``storage``: a dim per mesh axis, size 1 where the value is replicated over it, then the
    block shape, padded where a dim does not divide); across processes, this process's blocks
    (``{flat mesh position: block}``).  ``sharding`` is its ``NamedSharding``.

    ``spmd.Array`` is this plus the user's API; executors take and return ``GlobalValue``s, so
    they never depend on the API layer.
    """

    __array_priority__ = 100

    def __init__(self, storage, shape: tuple[int, ...], sharding):
        self._storage = storage
        self.shape = tuple(shape)
        self.sharding = sharding
        self._blocks = None          # multi-process: {flat mesh position: block} of this process

    @classmethod
    def from_host(cls, host: np.ndarray, sharding):
        """The value whose global array is ``host`` (a view of it where the dims divide)."""
        mesh = sharding.mesh
        padded = padded_shape(host.shape, sharding.num_parts(host.ndim))
        x = host
        if padded != host.shape:
            x = np.zeros(padded, host.dtype)
            x[tuple(slice(0, d) for d in host.shape)] = host
        stacked = x.reshape((1,) * len(mesh.axis_sizes) + x.shape)
        dims = mesh_positions(mesh.axis_names, sharding._dim_axes(host.ndim))
        return cls(split_into_mesh(stacked, mesh.axis_sizes, dims, np), host.shape, sharding)

    @classmethod
    def from_blocks(cls, blocks: dict, shape, sharding):
        """The value whose block at each flat mesh position in ``blocks`` is given.

        On a mesh within this process ``blocks`` must cover every position; on a mesh that
        spans processes it holds this process's positions only (the others are not stored)."""
        shape = tuple(shape)
        if sharding.is_fully_addressable:
            mesh = sharding.mesh
            any_block = next(iter(blocks.values()))
            host = np.empty(shape, any_block.dtype)
            for pos, block in blocks.items():
                coords = dict(zip(mesh.axis_names, np.unravel_index(pos, mesh.axis_sizes)))
                host[sharding.index_at(coords, shape)] = block
            return cls.from_host(host, sharding)
        return cls.over_blocks({p: np.asarray(b) for p, b in blocks.items()}, shape, sharding)

    @classmethod
    def over_blocks(cls, blocks: dict, shape, sharding, dtype=None):
        """The value of a mesh that spans processes over this process's ``blocks`` ({flat mesh
        position: NumPy block}, kept as given)."""
        a = cls(None, shape, sharding)
        a._blocks = blocks
        a._dtype = next(iter(blocks.values())).dtype if dtype is None else dtype
        return a

    @property
    def dtype(self) -> np.dtype:
        if self._blocks is not None:
            return self._dtype
        if self._storage is None:
            raise RuntimeError(_DELETED)
        return self._storage.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        out = self._gather()
        if copy is False:
            if (self._storage is None or not np.shares_memory(out, self._storage)
                    or (dtype is not None and np.dtype(dtype) != out.dtype)):
                raise ValueError("np.asarray(spmd.Array, copy=False): the global array is not one "
                                 "view of the shards with that dtype; a copy is needed.")
            return out
        return np.array(out, dtype=dtype, copy=True)

    def delete(self):
        """Free the buffers (``jit(..., donate_argnums=...)`` does this to donated arguments)."""
        self._storage, self._blocks, self._deleted = None, None, True

    def is_deleted(self) -> bool:
        return getattr(self, "_deleted", False)

    def _block_at(self, mesh_index: tuple[int, ...]) -> np.ndarray:
        if self.is_deleted():
            raise RuntimeError(_DELETED)
        if self._blocks is not None:
            return self._blocks[int(np.ravel_multi_index(mesh_index, self.sharding.mesh.axis_sizes))]
        m = len(mesh_index)
        idx = tuple(i if n > 1 else 0 for i, n in zip(mesh_index, self._storage.shape[:m]))
        return self._storage[idx + (Ellipsis,)]  # the Ellipsis keeps a rank-0 block an array view

    def _gather(self) -> np.ndarray:
        """The whole global array on the host (a view where the layout allows)."""
        if self.is_deleted():
            raise RuntimeError(_DELETED)
        if self._blocks is not None:
            if self.sharding.is_fully_replicated:
                return next(iter(self._blocks.values()))
            raise ShardingError(
                f"this Array of shape {self.shape} is sharded as {self.sharding.spec} over a mesh "
                f"that spans {len({d.process_index for d in self.sharding.mesh.devices.flat})} "
                f"processes, so this process holds only its own shards; use "
                f"spmd.distributed.process_allgather(x) to get the whole array on every process, "
                f"or x.addressable_shards for the local blocks.")
        mesh = self.sharding.mesh
        dims = mesh_positions(mesh.axis_names, self.sharding._dim_axes(self.ndim))
        merged = merge_from_mesh(self._storage, mesh.axis_sizes, dims, np)
        full = merged.reshape(merged.shape[len(mesh.axis_sizes):])
        if full.shape != self.shape:
            full = full[tuple(slice(0, d) for d in self.shape)]
        return full
