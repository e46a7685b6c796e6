"""GPUs through CuPy (a plug-in): the ``gpu`` platform, the CuPy executors and the CUDA kernels.

Importing this package (``import spmd`` does) registers the ``gpu`` platform with
``spmd.devices`` and the kernels with the NCCL communicator (``spmd.communicators.nccl.hooks``).
Nothing here imports CuPy at import time (``spmd.communicators.cuda`` does, on first use), so
``import spmd`` works with the ``cuda12`` extra installed on a machine without a driver; asking
for GPU devices then says why there are none.

- ``spmd.devices("gpu")``: one device per visible GPU, or ``SPMD_VIRTUAL_DEVICES=N`` virtual
  devices on GPU 0 (for the stacked executor: the whole mesh as one array on one GPU).
- :func:`stacked_executor`: virtual devices on one GPU (``spmd.gpu.stacked``); also what
  ``SPMD_EXECUTOR=gpu`` makes every ``spmd.jit`` run on.
- A program on a mesh of GPU devices runs on them without ``executor=``: on the stacked
  executor where they are virtual, else on :func:`nccl_executor`.
- :func:`nccl_executor`: one process, one array per GPU, collectives through the NCCL
  communicator (``spmd.communicators.nccl.NcclCommunicator``, the class that also serves one GPU
  per process) and, for small all-reduces, the peer-memory kernels (``spmd.gpu.peer``).
"""
from __future__ import annotations

import ctypes
import functools
import os

from ..communicators import nccl as _nccl
from ..communicators.cuda import GpuUnavailableError, cupy as _cupy  # noqa: F401 (public here)
from ..communicators.nccl import NcclCommunicator, NcclError, describe_nccl_error  # noqa: F401
from ..devices import Device, register_platform
from ..errors import MeshError
from ..executors.per_device import PerDeviceExecutor
from ..jit import register_executor
from . import index_math as im
from . import kernels, ops
from .peer import PeerAllReduce
from .stacked import CupyStackedExecutor


def _driver_cuda_version() -> int | None:
    """The CUDA version the installed driver supports (e.g. 12040), or None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    v = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(v)) != 0:
        return None
    return v.value


def _fmt(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    """Visible GPUs; raises :class:`GpuUnavailableError` saying why there are none."""
    cupy = _cupy()
    rt = cupy.cuda.runtime
    runtime = rt.runtimeGetVersion()
    driver = _driver_cuda_version()
    if driver is None:
        raise GpuUnavailableError(
            "no NVIDIA driver: libcuda.so.1 cannot be loaded, so CuPy cannot reach a GPU. Install "
            "the NVIDIA driver (or run on a machine with a GPU); CPU devices (spmd.devices()) "
            "work without one.")
    if driver // 1000 < runtime // 1000:
        raise GpuUnavailableError(
            f"wrong CUDA major: the NVIDIA driver supports CUDA {_fmt(driver)}, but CuPy was built "
            f"for CUDA {_fmt(runtime)}. Upgrade the driver, or install the CuPy wheel for CUDA "
            f"{driver // 1000} (cupy-cuda{driver // 1000}x).")
    try:
        n = rt.getDeviceCount()
    except rt.CUDARuntimeError as e:
        raise GpuUnavailableError(f"CUDA cannot list GPUs: {e} (driver CUDA {_fmt(driver)}, "
                                  f"CuPy built for CUDA {_fmt(runtime)}).") from None
    if n == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r} hides them?)" if visible is not None else ""
        raise GpuUnavailableError(f"no GPU: the driver (CUDA {_fmt(driver)}) sees no device{hint}.")
    return n


def _virtual_devices() -> int | None:
    raw = os.environ.get("SPMD_VIRTUAL_DEVICES", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise MeshError(f"SPMD_VIRTUAL_DEVICES={raw!r} is not a positive integer; set it to the "
                        f"number of virtual devices to put on GPU 0, or unset it.")
    return int(raw)


_cache: dict = {}


def gpu_devices():
    """The GPU devices: one per visible GPU, or ``SPMD_VIRTUAL_DEVICES`` virtual ones on GPU 0.

    A device's ``local_id`` is its CUDA ordinal in this process (always 0 for virtual ones:
    see :func:`cuda_ordinal`)."""
    n_gpus = gpu_count()
    virtual = _virtual_devices()
    key = (n_gpus, virtual)
    if key not in _cache:
        n = virtual or n_gpus
        _cache[key] = tuple(Device(i, "gpu", 0, i) for i in range(n))
    return _cache[key]


def is_virtual() -> bool:
    return _virtual_devices() is not None


def cuda_ordinal(device) -> int:
    """The CUDA device that holds ``device``'s data in this process."""
    return 0 if is_virtual() else device.local_id


def available() -> tuple[bool, str]:
    """(True, "") when GPU devices can be used, else (False, the reason): for skips."""
    try:
        gpu_count()
    except GpuUnavailableError as e:
        return False, str(e)
    return True, ""


def stacked_executor():
    """The stacked executor on GPU 0 (virtual devices): see :mod:`spmd.gpu.stacked`."""
    return CupyStackedExecutor()


def nccl_executor():
    """One process, one array per GPU, NCCL collectives: see :mod:`spmd.communicators.nccl`."""
    _cupy()
    return PerDeviceExecutor(NcclCommunicator.for_mesh)


# -- what this plug-in registers below it ---------------------------------------------------------

def _peer_algorithm(bufs, n: int) -> str:
    """The NCCL communicator's question: the peer kernels ("one_shot" / "two_shot") or "nccl"
    for an all-reduce of ``bufs`` (this process's device arrays) over groups of ``n``."""
    if kernels.env_disabled():
        return "nccl"
    x = bufs[0]
    aligned = all(b.data.ptr % 16 == 0 for b in bufs)
    return im.choose_all_reduce(x.nbytes, n, x.itemsize, peer_ok=True,
                                aligned=aligned and kernels.reduce_ctype(x.dtype) is not None)


def _peer_in_process(ordinals):
    return PeerAllReduce.in_process(ordinals, im.TWO_SHOT_MAX_BYTES)


register_platform("gpu", gpu_devices, aliases=("cuda",))
# SPMD_EXECUTOR=gpu / nccl; and by default a mesh of GPU devices runs on its GPUs: virtual
# devices on the stacked executor on GPU 0, one GPU per device on NCCL
register_executor("gpu", stacked_executor, platform="gpu", when=is_virtual)
register_executor("nccl", nccl_executor, platform="gpu")
_nccl.hooks.cuda_ordinal = cuda_ordinal
_nccl.hooks.pack = ops.pack
_nccl.hooks.peer_algorithm = _peer_algorithm
_nccl.hooks.peer_in_process = _peer_in_process
