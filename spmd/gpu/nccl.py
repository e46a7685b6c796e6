"""The NCCL communicator (``cupy.cuda.nccl``) for the per-device executor, one process
driving every GPU of the mesh (:func:`spmd.gpu.nccl_executor`).

Mesh position ``p`` is NCCL rank ``p`` on GPU ``ordinals[p]``.  Each group of a collective
(mesh axes, ``axis_index_groups``) gets its communicators from ``ncclCommInitAll`` on first use,
and every collective issues one call per GPU inside ``ncclGroupStart/End`` (one thread, several
GPUs).  One GPU per process is ``spmd.communicators.nccl.NcclProcessCommunicator`` (unique ids
through the coordinator, deadlines, flight recorder).

Every call runs on the current stream of the array's GPU.  Small all-reduces inside one process
go through the peer-memory kernels (``spmd.gpu.peer``) when
:func:`spmd.gpu.index_math.choose_all_reduce` says they beat NCCL.  Communicators and peer
buffers are released by :meth:`close` (also a context manager), never by the garbage collector.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..communicators import axis_groups, rank_in
from ..errors import SpmdError
from . import index_math as im
from . import ops


class NcclError(SpmdError):
    """An NCCL call failed; the message names the collective, the axis, the rank and a fix."""


# ncclResult_t -> what usually causes it
_HINTS = {
    1: "a CUDA call inside NCCL failed (out of memory, or an earlier kernel faulted); run with "
       "CUDA_LAUNCH_BLOCKING=1 to find the faulting kernel",
    2: "a system call failed (sockets, /dev/shm too small in a container: docker --shm-size=1g, "
       "or NCCL_SOCKET_IFNAME names the wrong interface)",
    3: "NCCL hit an internal error; set NCCL_DEBUG=WARN (or INFO) and look at its log",
    4: "an argument was invalid (buffer on another GPU than the communicator, or counts that "
       "differ between ranks)",
    5: "NCCL was used wrongly (ranks issued different collectives, or a communicator was used "
       "after close())",
    6: "a remote rank failed or left; look at the other processes' output",
    7: "the operation is still in progress (non-blocking communicator)",
}


def describe_nccl_error(status: int, what: str) -> str:
    hint = _HINTS.get(status, "set NCCL_DEBUG=WARN for NCCL's own explanation")
    return f"{what} failed with NCCL error {status}: {hint}. Set NCCL_DEBUG=WARN for details."


def _nccl():
    from . import GpuUnavailableError
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise GpuUnavailableError(f"NCCL is not available through CuPy ({e}); pip install "
                                  f"'spmd[cuda12]' (it brings nvidia-nccl-cu12).") from None
    if not getattr(nccl, "available", True):
        raise GpuUnavailableError("CuPy was built without NCCL; pip install nvidia-nccl-cu12.")
    return nccl


def _nccl_dtype(nccl, dtype, op):
    """(NCCL dtype, element multiplier) for ``dtype``; complex travels as pairs of reals."""
    dt = np.dtype(dtype)
    table = {"int8": nccl.NCCL_INT8, "uint8": nccl.NCCL_UINT8, "bool": nccl.NCCL_UINT8,
             "int32": nccl.NCCL_INT32, "uint32": nccl.NCCL_UINT32, "int64": nccl.NCCL_INT64,
             "uint64": nccl.NCCL_UINT64, "float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
             "float64": nccl.NCCL_FLOAT64, "bfloat16": getattr(nccl, "NCCL_BFLOAT16", None),
             "complex64": nccl.NCCL_FLOAT32, "complex128": nccl.NCCL_FLOAT64}
    if dt.kind == "c" and op in ("max", "min"):
        raise TypeError(f"p{op} of complex values is not defined")
    if dt.name in ("int16", "uint16") and op is None:
        return nccl.NCCL_FLOAT16, 1                      # data movement only: any 16-bit type
    if table.get(dt.name) is None:
        raise TypeError(f"NCCL has no type for {dt}; convert the value first")
    return table[dt.name], 2 if dt.kind == "c" else 1


_OPS = {"sum": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}


class GpuPlacement:
    """Local arrays of the per-device executor as CuPy arrays, position ``p`` on GPU
    ``ordinals[p]``, which is made current around each position's work."""

    def __init__(self, ordinals: dict):
        import cupy
        self.xp, self._ordinal = cupy, ordinals

    def call(self, position, fn, *args, **kwargs):
        with self.xp.cuda.Device(self._ordinal[position]):
            return fn(self.xp, *args, **kwargs)

    def to_local(self, position, value):
        cupy = self.xp
        with cupy.cuda.Device(self._ordinal[position]):
            if isinstance(value, cupy.ndarray) and value.device.id != self._ordinal[position]:
                with value.device:
                    src = cupy.ascontiguousarray(value)
                out = cupy.empty(value.shape, value.dtype)
                out.data.copy_from_device(src.data, src.nbytes)     # cudaMemcpy across GPUs (UVA)
                return out
            return cupy.asarray(value)

    def to_host(self, value):
        return value.get() if isinstance(value, self.xp.ndarray) else value


class NcclCommunicator:
    """The Communicator protocol of ``spmd.communicators`` over NCCL, every position local."""

    multi_process = False

    def __init__(self, mesh, world: dict, ordinals: dict):
        self.mesh = mesh
        self.local_positions = sorted(world)
        self._world = world                   # position -> world NCCL communicator
        self._ordinal = ordinals              # position -> CUDA device in this process
        self._groups: dict = {}               # (axes, groups) -> {position: communicator}
        self._peer: dict = {}                 # group -> {position: PeerAllReduce}
        self._closed = False
        self.placement = GpuPlacement(ordinals)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def for_mesh(cls, mesh) -> "NcclCommunicator":
        """Every device of ``mesh`` is a GPU of this process (one device per GPU)."""
        from . import cuda_ordinal
        nccl = _nccl()
        devs = list(mesh.devices.flat)
        if any(d.platform != "gpu" for d in devs):
            raise ValueError("the NCCL executor needs a mesh of GPU devices: "
                             "spmd.make_mesh(shape, names, devices=spmd.devices('gpu'))")
        ordinals = {p: cuda_ordinal(d) for p, d in enumerate(devs)}
        if len(set(ordinals.values())) != len(ordinals):
            raise ValueError("the NCCL executor needs one GPU per mesh device, but several mesh "
                             "devices share a GPU (SPMD_VIRTUAL_DEVICES?); run virtual devices with "
                             "spmd.gpu.stacked_executor() instead.")
        comms = _call(lambda: nccl.NcclCommunicator.initAll([ordinals[p] for p in range(len(devs))]),
                      "ncclCommInitAll over the mesh")
        return cls(mesh, dict(enumerate(comms)), ordinals)

    def close(self):
        """Destroy every communicator and free the peer buffers.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        import cupy
        for peers in self._peer.values():
            for p in peers.values():
                p.close()
        seen = set()
        for comms in [self._world, *self._groups.values()]:
            for pos, c in comms.items():
                if id(c) not in seen:
                    seen.add(id(c))
                    with cupy.cuda.Device(self._ordinal[pos]):
                        c.destroy()
        self._groups.clear()
        self._peer.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- groups --------------------------------------------------------------------------------
    def _members(self, axes, groups):
        """The groups of a collective: lists of positions in rank order."""
        return axis_groups(self.mesh, axes, groups)

    def _comms(self, axes, groups) -> dict:
        key = (tuple(axes), groups)
        if key in self._groups:
            return self._groups[key]
        if self._closed:
            raise NcclError("this NCCL communicator was closed")
        comms = {}
        for g in self._members(axes, groups):
            if g == list(range(self.mesh.size)):
                comms.update({p: self._world[p] for p in g})
            else:
                nccl = _nccl()
                made = _call(lambda: nccl.NcclCommunicator.initAll([self._ordinal[p] for p in g]),
                             f"ncclCommInitAll for axes {axes}")
                comms.update(zip(g, made))
        self._groups[key] = comms
        return comms

    # -- issuing calls -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _grouped(self):
        """One thread drives several GPUs: their calls must be one NCCL group."""
        nccl = _nccl()
        nccl.groupStart()
        try:
            yield
        finally:
            _call(nccl.groupEnd, "ncclGroupEnd (the grouped calls above)")

    def _each(self, bufs, what, fn):
        """``fn(position, array, stream_ptr)`` for every local position, on its GPU, grouped."""
        import cupy
        out = {}
        with self._grouped():
            for p, x in bufs.items():
                with cupy.cuda.Device(self._ordinal[p]):
                    stream = cupy.cuda.get_current_stream().ptr
                    out[p] = _call(lambda: fn(p, x, stream), f"{what} on mesh position {p} "
                                   f"(GPU {self._ordinal[p]})")
        return out

    def _local(self, p, x):
        """``x`` on position ``p``'s GPU, contiguous (a strided view is packed by the kernel)."""
        import cupy
        x = self.placement.to_local(p, x)
        with cupy.cuda.Device(self._ordinal[p]):
            return x if x.flags.c_contiguous else ops.pack(x) if x.ndim else cupy.ascontiguousarray(x)

    # -- the protocol --------------------------------------------------------------------------
    def all_reduce(self, bufs, axes, groups, op):
        import cupy
        nccl = _nccl()
        comms = self._comms(axes, groups)
        bufs = {p: self._local(p, x) for p, x in bufs.items()}
        peer = self._peer_path(axes, groups, bufs, op)
        if peer is not None:
            return peer
        any_x = next(iter(bufs.values()))
        dtype, k = _nccl_dtype(nccl, any_x.dtype, op)
        nop = getattr(nccl, _OPS[op])

        def call(p, x, stream):
            out = cupy.empty_like(x)
            comms[p].allReduce(x.data.ptr, out.data.ptr, x.size * k, dtype, nop, stream)
            return out
        return self._each(bufs, f"all_reduce({op}) over {axes}", call)

    def _peer_path(self, axes, groups, bufs, op):
        """The one-/two-shot kernels for a small all-reduce whose group is all in this process."""
        from . import kernels
        if kernels.env_disabled():
            return None
        x = next(iter(bufs.values()))
        members = self._members(axes, groups)
        aligned = all(b.data.ptr % 16 == 0 for b in bufs.values())
        algo = im.choose_all_reduce(x.nbytes, len(members[0]), x.itemsize, peer_ok=True,
                                    aligned=aligned and kernels.reduce_ctype(x.dtype) is not None)
        if algo == "nccl":
            return None
        import cupy
        out = {}
        for g in members:
            key = tuple(g)
            if key not in self._peer:
                try:
                    made = _peer_in_process([self._ordinal[p] for p in g])
                except RuntimeError:          # no P2P between these GPUs: NCCL it is
                    self._peer[key] = None
                    return None
                self._peer[key] = dict(zip(g, made))
            if self._peer[key] is None:
                return None
            for p in g:
                with cupy.cuda.Device(self._ordinal[p]):
                    out[p] = self._peer[key][p](bufs[p], cupy.empty_like(bufs[p]), op, algo)
        return out

    def all_gather(self, bufs, axes, groups):
        import cupy
        nccl = _nccl()
        comms = self._comms(axes, groups)
        n = len(self._members(axes, groups)[0])
        bufs = {p: self._local(p, x) for p, x in bufs.items()}
        dtype, k = _nccl_dtype(nccl, next(iter(bufs.values())).dtype, None)

        def call(p, x, stream):
            out = cupy.empty((n,) + x.shape, x.dtype)
            comms[p].allGather(x.data.ptr, out.data.ptr, x.size * k, dtype, stream)
            return out
        return self._each(bufs, f"all_gather over {axes}", call)

    def reduce_scatter(self, bufs, axes, groups, op):
        import cupy
        nccl = _nccl()
        comms = self._comms(axes, groups)
        bufs = {p: self._local(p, x) for p, x in bufs.items()}   # packs the rank-major view
        dtype, k = _nccl_dtype(nccl, next(iter(bufs.values())).dtype, op)
        nop = getattr(nccl, _OPS[op])

        def call(p, x, stream):
            out = cupy.empty(x.shape[1:], x.dtype)
            comms[p].reduceScatter(x.data.ptr, out.data.ptr, out.size * k, dtype, nop, stream)
            return out
        return self._each(bufs, f"reduce_scatter({op}) over {axes}", call)

    def all_to_all(self, bufs, axes, groups):
        import cupy
        nccl = _nccl()
        comms = self._comms(axes, groups)
        bufs = {p: self._local(p, x) for p, x in bufs.items()}
        dtype, k = _nccl_dtype(nccl, next(iter(bufs.values())).dtype, None)

        def call(p, x, stream):
            out = cupy.empty_like(x)
            count = x[0].size * k
            step = x[0].nbytes
            for j in range(x.shape[0]):
                comms[p].send(x.data.ptr + j * step, count, dtype, j, stream)
                comms[p].recv(out.data.ptr + j * step, count, dtype, j, stream)
            return out
        return self._each(bufs, f"all_to_all over {axes}", call)

    def permute(self, bufs, axes, perm):
        import cupy
        nccl = _nccl()
        comms = self._comms(axes, None)
        bufs = {p: self._local(p, x) for p, x in bufs.items()}
        dtype, k = _nccl_dtype(nccl, next(iter(bufs.values())).dtype, None)
        rank = {p: g.index(p) for g in self._members(axes, None) for p in g}
        dest = dict(perm)
        source = {d: s for s, d in perm}

        def call(p, x, stream):
            out = cupy.zeros_like(x)
            r = rank[p]
            if r in dest:
                comms[p].send(x.data.ptr, x.size * k, dtype, dest[r], stream)
            if r in source:
                comms[p].recv(out.data.ptr, x.size * k, dtype, source[r], stream)
            return out
        return self._each(bufs, f"ppermute over {axes}", call)

    def broadcast(self, bufs, axes, groups, source):
        import cupy
        nccl = _nccl()
        comms = self._comms(axes, groups)
        bufs = {p: self._local(p, x) for p, x in bufs.items()}
        dtype, k = _nccl_dtype(nccl, next(iter(bufs.values())).dtype, None)

        def call(p, x, stream):
            out = cupy.empty_like(x)
            comms[p].broadcast(x.data.ptr, out.data.ptr, x.size * k, dtype, source, stream)
            return out
        return self._each(bufs, f"broadcast from {source} over {axes}", call)

    def axis_index(self, axes):
        return {p: np.int32(rank_in(self.mesh, axes, p)) for p in self.local_positions}

    def barrier(self):
        """Every GPU of the mesh idle."""
        import cupy
        for p in self.local_positions:
            with cupy.cuda.Device(self._ordinal[p]):
                cupy.cuda.get_current_stream().synchronize()


def _peer_in_process(ordinals):
    from .peer import PeerAllReduce
    return PeerAllReduce.in_process(ordinals, im.TWO_SHOT_MAX_BYTES)


def _call(fn, what):
    """Run an NCCL call; its NcclError becomes an :class:`NcclError` that says what failed."""
    from cupy.cuda import nccl
    try:
        return fn()
    except nccl.NcclError as e:
        status = getattr(e, "status", None)
        if status is None:
            status = int(e.args[0]) if e.args and str(e.args[0]).isdigit() else -1
        raise NcclError(describe_nccl_error(status, what) + f" ({e})") from e
