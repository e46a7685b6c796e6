"""A NumPy stand-in for the slice of CuPy and ``cupy.cuda.nccl`` that ``spmd.gpu`` uses, to run
the GPU layer's Python (NCCL communicator, placements, executors) on a machine without a GPU.

It checks plumbing, not CUDA: arrays are host NumPy arrays tagged with a device id, "device
pointers" are host addresses, and an NCCL collective runs when every rank of its communicator
has posted it (as NCCL completes a collective when all ranks arrive); until then the streams it
was posted on are not ``done``.  Ranks may be threads of this process standing for processes
(one GPU per process: ``get_unique_id`` and ``NcclCommunicator(n, uid, rank)``): the current
device and stream are per thread, and a group runs under a lock.  The kernels are never
launched (``SPMD_GPU_KERNELS=0`` makes ``spmd.gpu.ops`` use array ops instead).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import sys
import threading
import types

import numpy as np


class _PerThread(threading.local):
    device = 0
    stream = None


_here = _PerThread()


class _Current:
    """``_current[0]``: this thread's current device."""

    def __getitem__(self, i):
        return _here.device

    def __setitem__(self, i, value):
        _here.device = value


_current = _Current()


class Device:
    def __init__(self, i=None):
        self.id = _current[0] if i is None else int(i)
        self._saved = []

    def __enter__(self):
        self._saved.append(_current[0])
        _current[0] = self.id
        return self

    def __exit__(self, *exc):
        _current[0] = self._saved.pop()

    def use(self):
        _current[0] = self.id


_streams: dict = {}
_stream_ids = itertools.count(1)


class Stream:
    """A stream: ``done`` once every NCCL call posted on it has run."""

    def __init__(self, non_blocking=False, ptr=None):
        self.ptr = next(_stream_ids) if ptr is None else ptr
        self.pending = 0
        self._saved = []
        _streams[self.ptr] = self

    @property
    def done(self):
        return self.pending == 0

    def synchronize(self):
        if self.pending:
            raise RuntimeError("the stand-in stream would wait forever: its NCCL calls never ran")

    def __enter__(self):
        self._saved.append(_here.stream)
        _here.stream = self
        return self

    def __exit__(self, *exc):
        _here.stream = self._saved.pop()

    def use(self):
        _here.stream = self


_null_stream = Stream(ptr=0)


def get_current_stream():
    return _here.stream or _null_stream


class _Ptr:
    def __init__(self, a):
        self.ptr = a.__array_interface__["data"][0]

    def copy_from_device(self, src, nbytes):
        ctypes.memmove(self.ptr, src.ptr, nbytes)


class ndarray(np.ndarray):
    def __array_finalize__(self, obj):
        self._dev = getattr(obj, "_dev", _current[0])

    @property
    def data(self):
        return _Ptr(self)

    @property
    def device(self):
        return Device(self._dev)

    def get(self):
        return np.array(self)


def _wrap(x):
    if isinstance(x, np.ndarray) and not isinstance(x, ndarray):
        x = x.view(ndarray)
        x._dev = _current[0]
    return x


def _wrapped(fn):
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        return [_wrap(o) for o in out] if isinstance(out, (list, tuple)) else _wrap(out)
    return call


def _host_memory(ptr, nbytes):
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))


# -- cupy.cuda.nccl ------------------------------------------------------------------------------
_NCCL_TYPES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64,
               6: np.float16, 7: np.float32, 8: np.float64}


class _Group:
    def __init__(self, n):
        self.n, self.posted = n, []
        self.lock = threading.RLock()

    def post(self, rank, op, args, stream):
        with self.lock:
            _streams[stream].pending += 1
            self.posted.append((rank, op, args + (stream,)))
            self._run()

    def _ran(self, entries):
        for entry in entries:
            self.posted.remove(entry)
            _streams[entry[2][-1]].pending -= 1

    def abort(self, rank):
        with self.lock:
            self._ran([p for p in self.posted if p[0] == rank])

    def _run(self):
        ops = {}
        for rank, op, args in self.posted:
            ops.setdefault(op, {})[rank] = args
        for op, by_rank in ops.items():
            if op in ("send", "recv"):
                continue
            if len(by_rank) == self.n:
                getattr(self, "_" + op)({r: a[:-1] for r, a in by_rank.items()})
                self._ran([p for p in self.posted if p[1] == op])
        sends = [(r, a) for r, o, a in self.posted if o == "send"]
        recvs = [(r, a) for r, o, a in self.posted if o == "recv"]
        for sr, sargs in sends:
            sptr, count, dt, peer, _ = sargs
            for rr, rargs in recvs:
                rptr, rcount, rdt, rpeer, _ = rargs
                if peer == rr and rpeer == sr:
                    nbytes = count * np.dtype(_NCCL_TYPES[dt]).itemsize
                    _host_memory(rptr, nbytes)[:] = _host_memory(sptr, nbytes)
                    self._ran([(sr, "send", sargs), (rr, "recv", rargs)])
                    return self._run()

    @staticmethod
    def _arr(ptr, count, dt):
        dtype = np.dtype(_NCCL_TYPES[dt])
        return _host_memory(ptr, count * dtype.itemsize).view(dtype)

    def _allReduce(self, by_rank):
        (_, _, count, dt, op) = by_rank[0]
        vals = [self._arr(s, count, dt).copy() for s, *_ in by_rank.values()]
        red = {0: np.add, 2: np.maximum, 3: np.minimum}[op].reduce(np.stack(vals))
        for s, r, *_ in by_rank.values():
            self._arr(r, count, dt)[:] = red

    def _allGather(self, by_rank):
        (_, _, count, dt) = by_rank[0]
        data = np.concatenate([self._arr(by_rank[i][0], count, dt).copy() for i in range(self.n)])
        for s, r, *_ in by_rank.values():
            self._arr(r, count * self.n, dt)[:] = data

    def _reduceScatter(self, by_rank):
        (_, _, count, dt, op) = by_rank[0]
        red = {0: np.add, 2: np.maximum, 3: np.minimum}[op].reduce(
            np.stack([self._arr(by_rank[i][0], count * self.n, dt).copy() for i in range(self.n)]))
        for i in range(self.n):
            self._arr(by_rank[i][1], count, dt)[:] = red[i * count:(i + 1) * count]

    def _broadcast(self, by_rank):
        (_, _, count, dt, root) = by_rank[0]
        data = self._arr(by_rank[root][0], count, dt).copy()
        for s, r, *_ in by_rank.values():
            self._arr(r, count, dt)[:] = data


_by_uid: dict = {}
_uid_lock = threading.Lock()


def get_unique_id():
    return tuple(int(b) - 128 for b in os.urandom(128))


class NcclCommunicator:
    """``NcclCommunicator(n, uid, rank)``: rank ``rank`` of the group that every rank created
    with the same ``uid`` meets in (as ``ncclCommInitRank``); ``initAll`` makes a whole group."""

    def __init__(self, ndev, uid, rank):
        with _uid_lock:
            group = _by_uid.setdefault(tuple(uid), _Group(ndev))
        if group.n != ndev:
            raise NcclError(f"ranks of one unique id disagree on the group size ({group.n}, {ndev})")
        self._group, self._rank, self.destroyed, self.aborted = group, rank, False, False

    @staticmethod
    def initAll(devices):
        uid = get_unique_id()
        return [NcclCommunicator(len(devices), uid, r) for r in range(len(devices))]

    def _post(self, op, args, stream):
        if self.destroyed or self.aborted:
            raise NcclError(5)
        self._group.post(self._rank, op, args, stream)

    def allReduce(self, s, r, count, dt, op, stream):
        self._post("allReduce", (s, r, count, dt, op), stream)

    def allGather(self, s, r, count, dt, stream):
        self._post("allGather", (s, r, count, dt), stream)

    def reduceScatter(self, s, r, count, dt, op, stream):
        self._post("reduceScatter", (s, r, count, dt, op), stream)

    def broadcast(self, s, r, count, dt, root, stream):
        self._post("broadcast", (s, r, count, dt, root), stream)

    def send(self, s, count, dt, peer, stream):
        self._post("send", (s, count, dt, peer), stream)

    def recv(self, r, count, dt, peer, stream):
        self._post("recv", (r, count, dt, peer), stream)

    def check_async_error(self):
        pass

    def abort(self):
        """Drop this rank's calls that never ran (their streams become done)."""
        self.aborted = True
        self._group.abort(self._rank)

    def destroy(self):
        self.destroyed = True


class NcclError(RuntimeError):
    pass


def install(monkeypatch, n_gpus: int):
    """Put the stand-in in ``sys.modules`` as cupy, cupy.cuda, cupy.cuda.nccl, cupy.cuda.runtime."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    nccl = types.ModuleType("cupy.cuda.nccl")
    runtime = types.ModuleType("cupy.cuda.runtime")
    nccl.__dict__.update(NcclCommunicator=NcclCommunicator, NcclError=NcclError, available=True,
                         groupStart=lambda: None, groupEnd=lambda: None,
                         get_unique_id=get_unique_id,
                         NCCL_SUM=0, NCCL_MAX=2, NCCL_MIN=3, NCCL_INT8=0, NCCL_UINT8=1,
                         NCCL_INT32=2, NCCL_UINT32=3, NCCL_INT64=4, NCCL_UINT64=5,
                         NCCL_FLOAT16=6, NCCL_FLOAT32=7, NCCL_FLOAT64=8)

    class CUDARuntimeError(RuntimeError):
        pass
    runtime.__dict__.update(CUDARuntimeError=CUDARuntimeError, runtimeGetVersion=lambda: 12090,
                            getDeviceCount=lambda: n_gpus,
                            getDeviceProperties=lambda i: {"multiProcessorCount": 4})
    cuda.__dict__.update(Device=Device, nccl=nccl, runtime=runtime, Stream=Stream,
                         get_current_stream=get_current_stream)
    for name in dir(np):
        obj = getattr(np, name)
        if callable(obj) and not isinstance(obj, type) and not name.startswith("_"):
            setattr(cupy, name, _wrapped(obj))
    cupy.__dict__.update(ndarray=ndarray, cuda=cuda, float16=np.float16, float32=np.float32,
                         float64=np.float64, int32=np.int32, int64=np.int64, uint8=np.uint8,
                         bool_=np.bool_, newaxis=None, add=np.add, maximum=np.maximum,
                         minimum=np.minimum, multiply=np.multiply)
    for mod in (cupy, cuda, nccl, runtime):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setenv("SPMD_GPU_KERNELS", "0")
    import spmd.gpu as gpu
    monkeypatch.setattr(gpu, "_driver_cuda_version", lambda: 12040)
    monkeypatch.delenv("SPMD_VIRTUAL_DEVICES", raising=False)
    gpu.gpu_count.cache_clear()
    return cupy



# -- the kernels, run as host C++ behind a stand-in of RawModule.get_function --------------------
_DT = {"float": 0, "double": 1, "spmd::half_t": 2, "spmd::bf16_t": 3, "int": 4, "long long": 5}
_OP = {"spmd::Sum": 0, "spmd::Max": 1, "spmd::Min": 2}
_UNIT = {"unsigned char": 1, "unsigned short": 2, "unsigned int": 4, "unsigned long long": 8,
         "spmd::b128": 16, "spmd::Pack<unsigned int>": 16}


def _c(arg):
    """A kernel argument as CuPy would pass it, as a ctypes value."""
    if isinstance(arg, np.ndarray):
        return ctypes.c_void_p(arg.__array_interface__["data"][0])
    return {np.uint64: ctypes.c_void_p, np.int32: ctypes.c_int, np.int64: ctypes.c_longlong,
            np.uint32: ctypes.c_uint, np.float64: ctypes.c_double}[type(arg)](arg.item())


class HostKernel:
    """``kernel((blocks, [copies]), (threads,), args)`` runs ``expression`` through the host
    driver of tests/test_kernels.py.  The peer all-reduce is launched once per rank; the ranks
    are held until all have launched, then run together (as they would on their GPUs)."""

    pending: dict = {}

    def __init__(self, lib, expression):
        self.lib, self.expr = lib, expression
        name, rest = expression.split("<", 1)
        self.name = name.split("::")[1]
        self.targs = [t.strip() for t in rest[:-1].split(", ")] if ", " in rest else [rest[:-1]]

    def __call__(self, grid, block, args):
        args = [_c(a) for a in args]
        blocks, threads = ctypes.c_int(grid[0]), ctypes.c_int(block[0])
        t = self.targs
        if self.name in ("pack_chunks", "unpack_chunks"):
            self.lib.run_pack(ctypes.c_int(self.name == "unpack_chunks"), ctypes.c_int(_UNIT[t[0]]),
                              ctypes.c_int(t[1] == "long long"), *args, blocks, threads)
        elif self.name == "copy_batched":
            self.lib.run_copy_batched(ctypes.c_int(_UNIT[t[0]]), *args, ctypes.c_int(grid[1]), blocks, threads)
        elif self.name == "reduce_axis":
            self.lib.run_reduce_axis(ctypes.c_int(_DT[t[0]]), ctypes.c_int(_OP[t[1]]),
                                     ctypes.c_int(t[2] == "long long"), *args, blocks, threads)
        elif self.name == "reduce_ptrs":
            self.lib.run_reduce_ptrs(ctypes.c_int(_DT[t[0]]), ctypes.c_int(_OP[t[1]]), *args, blocks, threads)
        else:                                            # allreduce_one_shot / _two_shot
            ins, outs, bufs, flags, n, rank, packs, epoch, scale, use_scale = args
            peers = tuple((ctypes.c_uint64 * n.value).from_address(bufs.value))   # the group's buffers
            key = (self.expr, peers, epoch.value)
            ranks = HostKernel.pending.setdefault(key, {})
            ranks[rank.value] = (ins.value, outs.value)
            if len(ranks) == n.value:
                del HostKernel.pending[key]
                order = [ranks[r] for r in range(n.value)]
                P = ctypes.c_void_p * n.value
                # every rank's pointer tables hold the same peer addresses (one process here);
                # one std::thread per CUDA thread, so a smaller grid (the loops are grid-stride)
                blocks, threads = ctypes.c_int(min(grid[0], 2)), ctypes.c_int(min(block[0], 8))
                self.lib.run_allreduce(ctypes.c_int(self.name.endswith("two_shot")), ctypes.c_int(_DT[t[0]]),
                                       ctypes.c_int(_OP[t[1]]), P(*[o[0] for o in order]),
                                       P(*[o[1] for o in order]), bufs, flags, n, packs, epoch, scale,
                                       use_scale, blocks, threads)


def kernels_on_host(monkeypatch, lib):
    """Route ``spmd.gpu.kernels.kernel`` to the host-run kernels; a stand-in CUDA runtime
    allocates host memory for the peer buffers."""
    import spmd.gpu.kernels as kernels
    monkeypatch.setenv("SPMD_GPU_KERNELS", "1")
    monkeypatch.setattr(kernels, "kernel", lambda name, expr: HostKernel(lib, expr))
    memory = {}

    def malloc(size):
        buf = np.zeros(size + 256, np.uint8)
        ptr = buf.ctypes.data
        ptr += -ptr % 256
        memory[ptr] = buf
        return ptr
    runtime = sys.modules["cupy.cuda.runtime"]
    runtime.__dict__.update(malloc=malloc, memset=lambda p, v, n: ctypes.memset(p, v, n),
                            free=lambda p: memory.pop(p), deviceSynchronize=lambda: None,
                            deviceCanAccessPeer=lambda i, j: True,
                            deviceEnablePeerAccess=lambda j: None)
    return memory
