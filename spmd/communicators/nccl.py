"""NCCL collectives (``cupy.cuda.nccl``) for the per-device executor: one class,
:class:`NcclCommunicator`, for both ways a job lays out its GPUs.

- **One process, many GPUs** (:meth:`NcclCommunicator.for_mesh`; ``spmd.gpu.nccl_executor()``).
  Every mesh position is a GPU of this process: position ``p`` is NCCL rank ``g.index(p)`` of
  its group ``g`` on GPU ``ordinals[p]``.  Each group (mesh axes, ``axis_index_groups``) gets
  its communicators from ``ncclCommInitAll`` on first use, and every collective issues one call
  per GPU inside ``ncclGroupStart/End`` (one thread, several GPUs), on the current stream of
  each GPU.  Local arrays are CuPy arrays (:class:`GpuPlacement`).  Small all-reduces go through
  the peer-memory kernels when the GPU plug-in (``spmd.gpu``) registered them in :data:`hooks`
  and they beat NCCL (``spmd.gpu.index_math.choose_all_reduce``).
- **One GPU per process** (:meth:`NcclCommunicator.one_gpu_per_process`; the ``nccl`` backend of
  ``spmd.distributed.initialize()``).  Process ``p`` drives CUDA device ``local_rank`` (from the
  launcher) on a stream of its own.  A group's communicator is made on first use: the group's
  first rank makes the NCCL unique id and hands it to the others through the coordinator's
  key-value store (``spmd.runtime.store()``) or, when the job was started by MPI, through MPI
  point-to-point messages.  Buffers may be CuPy arrays (on this GPU) or NumPy arrays (copied to
  the GPU and back, for the NumPy per-device executor).

Every collective runs in the shared collective frame (:mod:`spmd.communicators.frame`): an
entry in the flight recorder, a dump on failure.  Across processes the stream is polled against
the collective's deadline (``SPMD_COLLECTIVE_TIMEOUT``); on expiry the NCCL communicator is
aborted (so no kernel waits forever) and ``CollectiveTimeoutError`` is raised; with
``SPMD_COLLECTIVE_CHECK=1`` (and a coordinator store) the ranks first exchange each call's
signature, which names the ranks that did not arrive and catches mismatched calls.  In one
process the calls of every rank are issued together by this thread, so no rank can be missing:
they are enqueued asynchronously and the entry completes once they are enqueued.

Data moves as bytes; reductions run in the dtype (bool as uint8 max/min, complex sums as pairs
of reals; complex max/min is not defined).  A failing NCCL call raises :class:`NcclError`, which
names the call and its likely cause.  Communicators and peer buffers are released by
:meth:`NcclCommunicator.close` (also a context manager), never by the garbage collector.

Without a GPU this module runs on a NumPy stand-in of CuPy and NCCL (``tests/_fake_cupy.py``):
plumbing, not CUDA.  On hardware its tests are marked ``gpu``.
"""
from __future__ import annotations

import contextlib
import json

import ml_dtypes
import numpy as np

from .. import runtime
from ..comm_protocol import Communicator, axis_groups, group_of
from ..errors import CollectiveTimeoutError, SpmdError
from . import cuda
from .frame import CollectiveFrame, signature_check
from .mpi import mpi, mpi4py_world

_UID_TAG = 7074


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


def _call(fn, what):
    """Run an NCCL call; its NcclError becomes an :class:`NcclError` that says what failed."""
    nccl = cuda.nccl()
    try:
        return fn()
    except nccl.NcclError as e:
        status = getattr(e, "status", None)
        if status is None:
            status = int(e.args[0]) if e.args and str(e.args[0]).isdigit() else -1
        raise NcclError(describe_nccl_error(status, what) + f" ({e})") from e


def encode_unique_id(uid) -> bytes:
    """NCCL's unique id (a tuple of 128 signed chars in CuPy) as bytes, and back."""
    return bytes(int(b) & 0xFF for b in uid)


def decode_unique_id(data: bytes) -> tuple:
    return tuple(b - 256 if b > 127 else b for b in data)


_REDUCE_NAMES = {"sum": "psum", "max": "pmax", "min": "pmin"}
_OPS = {"sum": "NCCL_SUM", "max": "NCCL_MAX", "min": "NCCL_MIN"}


def _reduction(nccl, dtype, op):
    """(NCCL dtype, elements per item, NCCL op) to reduce an array of ``dtype`` with ``op``."""
    dt = np.dtype(dtype)
    if dt.kind == "c" and op in ("max", "min"):
        raise TypeError(f"p{op} of complex values is not defined")
    if dt == np.bool_:                                 # logical or / and on 0/1 bytes
        return nccl.NCCL_UINT8, 1, {"sum": nccl.NCCL_MAX, "max": nccl.NCCL_MAX,
                                    "min": nccl.NCCL_MIN}[op]
    table = {"int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32",
             "uint32": "NCCL_UINT32", "int64": "NCCL_INT64", "uint64": "NCCL_UINT64",
             "float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
             "bfloat16": "NCCL_BFLOAT16", "complex64": "NCCL_FLOAT32",
             "complex128": "NCCL_FLOAT64"}
    kind = getattr(nccl, table.get(dt.name, ""), None)
    if kind is None:
        raise SpmdError(f"{_REDUCE_NAMES[op]} over NCCL: dtype {dt} has no NCCL reduction; "
                        f"convert the value first.")
    return kind, 2 if dt.kind == "c" else 1, getattr(nccl, _OPS[op])


class GpuHooks:
    """What the GPU plug-in (``spmd.gpu``) adds at import, one slot per need; without it the
    communicator runs on NCCL alone and packs strided views with CuPy."""

    def __init__(self):
        self.cuda_ordinal = lambda device: device.local_id   # the GPU holding a mesh device
        self.pack = None              # view -> contiguous copy (the pack kernel)
        self.peer_algorithm = None    # (buffers, group size) -> "nccl" | "one_shot" | "two_shot"
        self.peer_in_process = None   # ordinals -> a PeerAllReduce per rank (RuntimeError: no P2P)


hooks = GpuHooks()


class GpuPlacement:
    """Local arrays of the per-device executor as CuPy arrays, position ``p`` on GPU
    ``ordinals[p]``, which is made current around each position's work."""

    def __init__(self, ordinals: dict):
        self.xp, self._ordinal = cuda.cupy(), ordinals

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


def _dtype(x) -> np.dtype:
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


class NcclCommunicator(Communicator):
    """The communicator protocol (``spmd.comm_protocol``) over NCCL: every GPU of the mesh in
    this process (:meth:`for_mesh`), or one GPU per process (:meth:`one_gpu_per_process`).
    See the module docstring."""

    def __init__(self, mesh, ordinals: dict, *, multi_process: bool, me: int = 0,
                 world: dict | None = None, store=None, check: bool = False):
        cupy = cuda.cupy()
        self.mesh, self.me, self.multi_process = mesh, me, multi_process
        self.process_of = [d.process_index for d in mesh.devices.flat]
        self.local_positions = sorted(ordinals)
        self._ordinal = dict(ordinals)        # position -> CUDA device in this process
        self._world = dict(world or {})       # position -> communicator over the whole mesh
        self._groups: dict = {}               # groups of a collective -> {position: communicator}
        self._peer: dict = {}                 # group -> {position: PeerAllReduce}, None: no P2P
        self._store, self.check = store, check
        self._tag = f"{'-'.join(mesh.axis_names)}/{'-'.join(map(str, self.process_of))}"
        self._made = 0                        # communicators made across processes so far
        self._checked: dict = {}              # group ranks -> signatures exchanged so far
        self._closed = False
        self._streams = {}                    # position -> its own stream (one GPU per process)
        if multi_process:
            for p in self.local_positions:
                with cupy.cuda.Device(self._ordinal[p]):
                    self._streams[p] = cupy.cuda.Stream(non_blocking=True)
        else:
            self.placement = GpuPlacement(self._ordinal)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def for_mesh(cls, mesh) -> "NcclCommunicator":
        """Every device of ``mesh`` is a GPU of this process (one device per GPU)."""
        nccl = cuda.nccl()
        devs = list(mesh.devices.flat)
        if any(d.platform != "gpu" for d in devs):
            raise ValueError("the NCCL executor needs a mesh of GPU devices: "
                             "spmd.make_mesh(shape, names, devices=spmd.devices('gpu'))")
        ordinals = {p: hooks.cuda_ordinal(d) for p, d in enumerate(devs)}
        if len(set(ordinals.values())) != len(ordinals):
            raise ValueError("the NCCL executor needs one GPU per mesh device, but several mesh "
                             "devices share a GPU (SPMD_VIRTUAL_DEVICES?); run virtual devices with "
                             "spmd.gpu.stacked_executor() instead.")
        comms = _call(lambda: nccl.NcclCommunicator.initAll([ordinals[p] for p in range(len(devs))]),
                      "ncclCommInitAll over the mesh")
        return cls(mesh, ordinals, multi_process=False, me=runtime.process_index(),
                   world=dict(enumerate(comms)))

    @classmethod
    def one_gpu_per_process(cls, mesh, *, me: int | None = None, local_rank: int | None = None,
                            store=None, check: bool | None = None) -> "NcclCommunicator":
        """This process's one device of ``mesh``, on CUDA device ``local_rank``.  Defaults come
        from ``spmd.runtime`` (what ``initialize()`` recorded): the process index, the
        launcher's local rank, and the coordinator's store unless MPI started the job (then
        the unique ids travel over MPI)."""
        cupy = cuda.cupy()
        st = runtime.state()
        me = st.process_index if me is None else me
        local_rank = st.local_rank if local_rank is None else local_rank
        if store is None and st.coordinator is not None and st.backend != "mpi":
            store = runtime.store()
        mine = [p for p, d in enumerate(mesh.devices.flat) if d.process_index == me]
        if len(mine) != 1:
            raise SpmdError(f"the cross-process NCCL communicator holds one GPU per process, but "
                            f"{mesh!r} puts {len(mine)} devices on process {me}; for several "
                            f"GPUs in one process use spmd.gpu.nccl_executor().")
        check = signature_check(default=False) if check is None else check
        if check and store is None:
            raise SpmdError("SPMD_COLLECTIVE_CHECK=1 on the nccl backend exchanges call "
                            "signatures through the coordinator's store, and this job has none "
                            "(it was started by MPI); unset SPMD_COLLECTIVE_CHECK or launch "
                            "with spmd-run / torchrun.")
        cupy.cuda.Device(local_rank).use()
        return cls(mesh, {mine[0]: local_rank}, multi_process=True, me=me, store=store,
                   check=check)

    def close(self):
        """Destroy every communicator and free the peer buffers.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        cupy = cuda.cupy()
        for peers in self._peer.values():
            for p in (peers or {}).values():
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

    # -- groups and their NCCL communicators -----------------------------------------------------
    def _members(self, axes, groups) -> list[list[int]]:
        """The groups of a collective that hold local positions: positions in rank order."""
        if self.multi_process:
            return [list(group_of(self.mesh, tuple(axes), groups, self.local_positions[0]))]
        return axis_groups(self.mesh, axes, groups)

    def _ranks(self, members) -> tuple[int, ...]:
        """The processes of this process's group, in rank order (one entry per process)."""
        g = next(g for g in members if self.local_positions[0] in g)
        return tuple(dict.fromkeys(self.process_of[q] for q in g))

    def _comms(self, members, frame) -> dict:
        """{local position: its NCCL communicator} for the groups ``members``, made on first use."""
        key = tuple(map(tuple, members))
        got = self._groups.get(key)
        if got is not None:
            return got
        if self._closed:
            raise NcclError("this NCCL communicator was closed")
        nccl = cuda.nccl()
        got = {}
        for g in members:
            if self.multi_process:
                (p,) = [q for q in g if q in self._ordinal]
                ranks = tuple(self.process_of[q] for q in g)
                uid = self._unique_id(ranks, frame)
                with cuda.cupy().cuda.Device(self._ordinal[p]):
                    got[p] = _call(lambda: nccl.NcclCommunicator(len(g), uid, g.index(p)),
                                   f"ncclCommInitRank for group ranks {list(ranks)}")
            elif self._world and g == list(range(self.mesh.size)):
                got.update({p: self._world[p] for p in g})
            else:
                made = _call(lambda: nccl.NcclCommunicator.initAll([self._ordinal[p] for p in g]),
                             f"ncclCommInitAll for axes {frame.axes}")
                got.update(zip(g, made))
        self._groups[key] = got
        return got

    def _unique_id(self, ranks, frame):
        """The NCCL unique id of the group ``ranks``: made by its first rank, handed to the
        others through the store or, without one, MPI."""
        nccl = cuda.nccl()
        key = f"nccl-uid/{self._tag}/{self._made}/{'-'.join(map(str, ranks))}"
        self._made += 1
        root = ranks[0] == self.me
        uid = nccl.get_unique_id() if root else None
        if self._store is not None:
            if root:
                self._store.set(key, encode_unique_id(uid))
                return uid
            return decode_unique_id(self._store.get(key, frame.left(0.01)))
        # Started by MPI: the group's first rank sends the id to the others.
        world = mpi4py_world()
        buf = np.zeros(128, np.uint8)
        if root:
            buf[:] = np.frombuffer(encode_unique_id(uid), np.uint8)
            for r in ranks[1:]:
                world.Isend(buf, dest=r, tag=_UID_TAG).Free()
            return uid
        req = world.Irecv(buf, source=ranks[0], tag=_UID_TAG)

        def cancel():
            try:
                req.Cancel()
            except mpi().Exception:
                pass
            return f"rank {ranks[0]} did not send the NCCL unique id of group {list(ranks)}"
        frame.wait(req.Test, on_timeout=cancel)
        return decode_unique_id(bytes(buf))

    # -- one collective in the shared frame ------------------------------------------------------
    def _run(self, op, axes, groups, bufs, enqueue, *, what, timeout=None, fast=None):
        """``enqueue(x, comm, index, size, stream)`` puts one rank's NCCL calls for its device
        array ``x`` (rank ``index`` of a group of ``size``) on ``stream`` and returns the output
        array; ``fast(local, members)`` may do the whole collective another way (the peer
        kernels) or return None."""
        members = self._members(axes, groups)
        with CollectiveFrame(op, axes, self._ranks(members), next(iter(bufs.values())),
                             me=self.me, timeout=timeout) as frame:
            if self.check and len(frame.ranks) > 1:
                self._arrive(frame)
            comms = self._comms(members, frame)
            local = {p: self._to_device(p, x) for p, x in bufs.items()}
            out = fast(local, members) if fast is not None else None
            if out is None:
                out = self._enqueue(local, comms, members, what, enqueue)
            if self.multi_process:
                self._wait(frame, members, comms)
            return {p: self._to_caller(bufs[p], o) for p, o in out.items()}

    def _arrive(self, frame):
        """Exchange call signatures with the group through the store: names the ranks that do
        not arrive and those that call something else."""
        mine = frame.signature()
        n = self._checked.get(frame.ranks, 0)
        self._checked[frame.ranks] = n + 1
        prefix = f"sig/{self._tag}/{'-'.join(map(str, frame.ranks))}/{n}"
        self._store.set(f"{prefix}/{self.me}", json.dumps(mine).encode())
        theirs, missing = {self.me: mine}, []
        for r in frame.ranks:
            if r != self.me:
                try:
                    theirs[r] = json.loads(self._store.get(f"{prefix}/{r}", frame.left(0.01)))
                except CollectiveTimeoutError:
                    missing.append(r)
        if missing:
            raise frame.not_arrived(missing)
        frame.check(theirs)

    @contextlib.contextmanager
    def _grouped(self):
        """Several GPUs from one thread, or a rank's sends and receives: one NCCL group."""
        nccl = cuda.nccl()
        nccl.groupStart()
        try:
            yield
        finally:
            _call(nccl.groupEnd, "ncclGroupEnd (the grouped calls above)")

    def _stream(self, p):
        """Position ``p``'s stream as a context: its own across processes, else the current one."""
        if self.multi_process:
            return self._streams[p]
        return contextlib.nullcontext(cuda.cupy().cuda.get_current_stream())

    def _enqueue(self, local, comms, members, what, enqueue):
        cupy = cuda.cupy()
        where = {p: (g.index(p), len(g)) for g in members for p in g if p in local}
        out = {}
        with self._grouped():
            for p, x in local.items():
                with cupy.cuda.Device(self._ordinal[p]), self._stream(p) as stream:
                    out[p] = _call(lambda: enqueue(x, comms[p], *where[p], stream.ptr),
                                   f"{what} on mesh position {p} (GPU {self._ordinal[p]})")
        return out

    def _wait(self, frame, members, comms):
        """Across processes: poll the streams until the deadline; on expiry abort the group's
        communicator (so no kernel waits forever) and forget it."""
        streams = [self._streams[p] for p in comms]

        def abort():
            for c in comms.values():
                c.abort()
            self._groups.pop(tuple(map(tuple, members)), None)
            known = ("every rank arrived, but NCCL did not finish (a peer may have died)"
                     if self.check else "NCCL did not finish (run with SPMD_COLLECTIVE_CHECK=1 "
                     "to learn which ranks did not arrive)")
            return known + "; the NCCL communicator was aborted"
        frame.wait(lambda: all(s.done for s in streams), on_timeout=abort)
        for p, c in comms.items():
            _call(c.check_async_error, f"{frame.op} over {frame.axes} on mesh position {p}")

    def _to_device(self, p, x):
        """``x`` on position ``p``'s GPU, contiguous (a strided view is packed by the kernel)."""
        cupy = cuda.cupy()
        if not self.multi_process:
            x = self.placement.to_local(p, x)
            if x.flags.c_contiguous:
                return x
            with cupy.cuda.Device(self._ordinal[p]):
                return hooks.pack(x) if hooks.pack is not None and x.ndim else cupy.ascontiguousarray(x)
        with cupy.cuda.Device(self._ordinal[p]), self._streams[p]:
            if not isinstance(x, cupy.ndarray):
                x = np.asarray(x, order="C")
                if x.dtype == np.dtype(ml_dtypes.bfloat16):  # CuPy has no bfloat16: send uint16
                    x = x.view(np.uint16)
                x = cupy.asarray(x)
            return x if x.flags.c_contiguous else cupy.ascontiguousarray(x)

    def _to_caller(self, given, out):
        """The result as the caller gave the input: host data back on the host."""
        if not self.multi_process or isinstance(given, cuda.cupy().ndarray):
            return out
        host = out.get()
        dtype = _dtype(given)
        return host.view(dtype) if host.dtype != dtype else host

    # -- the protocol ----------------------------------------------------------------------------
    def all_reduce(self, bufs, axes, groups, op, *, timeout=None):
        cupy, nccl = cuda.cupy(), cuda.nccl()
        kind, per, nop = _reduction(nccl, _dtype(next(iter(bufs.values()))), op)

        def enqueue(x, comm, index, size, stream):
            out = cupy.empty_like(x)
            comm.allReduce(x.data.ptr, out.data.ptr, x.size * per, kind, nop, stream)
            return out
        return self._run(_REDUCE_NAMES[op], axes, groups, bufs, enqueue, timeout=timeout,
                         what=f"all_reduce({op}) over {tuple(axes)}",
                         fast=lambda local, members: self._peer_path(local, members, op))

    def _peer_path(self, local, members, op):
        """The one-/two-shot kernels for a small all-reduce whose group is all in this process
        (when the GPU plug-in registered them and they beat NCCL)."""
        if self.multi_process or hooks.peer_algorithm is None:
            return None
        algo = hooks.peer_algorithm(list(local.values()), len(members[0]))
        if algo == "nccl":
            return None
        cupy = cuda.cupy()
        out = {}
        for g in members:
            key = tuple(g)
            if key not in self._peer:
                try:
                    made = hooks.peer_in_process([self._ordinal[p] for p in g])
                except RuntimeError:          # no P2P between these GPUs: NCCL it is
                    self._peer[key] = None
                    return None
                self._peer[key] = dict(zip(g, made))
            if self._peer[key] is None:
                return None
            for p in g:
                with cupy.cuda.Device(self._ordinal[p]):
                    out[p] = self._peer[key][p](local[p], cupy.empty_like(local[p]), op, algo)
        return out

    def all_gather(self, bufs, axes, groups, *, timeout=None):
        cupy, nccl = cuda.cupy(), cuda.nccl()

        def enqueue(x, comm, index, size, stream):
            out = cupy.empty((size,) + x.shape, x.dtype)
            comm.allGather(x.data.ptr, out.data.ptr, x.nbytes, nccl.NCCL_UINT8, stream)
            return out
        return self._run("all_gather", axes, groups, bufs, enqueue, timeout=timeout,
                         what=f"all_gather over {tuple(axes)}")

    def reduce_scatter(self, bufs, axes, groups, op, *, timeout=None):
        cupy, nccl = cuda.cupy(), cuda.nccl()
        kind, per, nop = _reduction(nccl, _dtype(next(iter(bufs.values()))), op)

        def enqueue(x, comm, index, size, stream):     # x: the rank-major view, packed
            out = cupy.empty(x.shape[1:], x.dtype)
            comm.reduceScatter(x.data.ptr, out.data.ptr, out.size * per, kind, nop, stream)
            return out
        return self._run("psum_scatter" if op == "sum" else f"reduce_scatter({op})", axes, groups,
                         bufs, enqueue, timeout=timeout,
                         what=f"reduce_scatter({op}) over {tuple(axes)}")

    def all_to_all(self, bufs, axes, groups, *, timeout=None):
        cupy, nccl = cuda.cupy(), cuda.nccl()

        def enqueue(x, comm, index, size, stream):
            out = cupy.empty_like(x)
            chunk = x.nbytes // x.shape[0]
            for j in range(x.shape[0]):
                comm.send(x.data.ptr + j * chunk, chunk, nccl.NCCL_UINT8, j, stream)
                comm.recv(out.data.ptr + j * chunk, chunk, nccl.NCCL_UINT8, j, stream)
            return out
        return self._run("all_to_all", axes, groups, bufs, enqueue, timeout=timeout,
                         what=f"all_to_all over {tuple(axes)}")

    def permute(self, bufs, axes, perm, *, timeout=None):
        cupy, nccl = cuda.cupy(), cuda.nccl()
        dest = dict(perm)
        source = {d: s for s, d in perm}

        def enqueue(x, comm, index, size, stream):
            # zeros only where nothing arrives; a received block is written whole
            out = cupy.empty_like(x) if index in source else cupy.zeros_like(x)
            if index in dest:
                comm.send(x.data.ptr, x.nbytes, nccl.NCCL_UINT8, dest[index], stream)
            if index in source:
                comm.recv(out.data.ptr, out.nbytes, nccl.NCCL_UINT8, source[index], stream)
            return out
        return self._run("ppermute", axes, None, bufs, enqueue, timeout=timeout,
                         what=f"ppermute over {tuple(axes)}")

    def broadcast(self, bufs, axes, groups, source, *, timeout=None):
        cupy, nccl = cuda.cupy(), cuda.nccl()

        def enqueue(x, comm, index, size, stream):
            out = cupy.empty_like(x)
            comm.broadcast(x.data.ptr, out.data.ptr, x.nbytes, nccl.NCCL_UINT8, source, stream)
            return out
        return self._run("pbroadcast", axes, groups, bufs, enqueue, timeout=timeout,
                         what=f"broadcast from {source} over {tuple(axes)}")

    def barrier(self, *, timeout=None):
        """Across processes: every rank reached this point; in one process: every GPU idle."""
        if self.multi_process:
            self.all_reduce({self.local_positions[0]: np.zeros(1, np.float32)},
                            self.mesh.axis_names, None, "sum", timeout=timeout)
            return
        cupy = cuda.cupy()
        for p in self.local_positions:
            with cupy.cuda.Device(self._ordinal[p]):
                cupy.cuda.get_current_stream().synchronize()
