"""GPUs through CuPy: devices, the CuPy executors, the NCCL communicator and the CUDA kernels.

Nothing here imports CuPy at import time, so ``import spmd`` works with the ``cuda12`` extra
installed on a machine without a driver; asking for GPU devices then says why there are none.

- ``spmd.devices("gpu")``: one device per visible GPU, or ``SPMD_VIRTUAL_DEVICES=N`` virtual
  devices on GPU 0 (for the stacked executor: the whole mesh as one array on one GPU).
- :func:`stacked_executor`: virtual devices on one GPU (``spmd.gpu.stacked``).
- :func:`nccl_executor`: one process, one array per GPU, collectives through NCCL
  (``spmd.gpu.nccl``) and, for small all-reduces, the peer-memory kernels (``spmd.gpu.peer``).
"""
from __future__ import annotations

import ctypes
import functools
import os

from ..errors import MeshError


class GpuUnavailableError(MeshError):
    """No usable GPU; the message says which piece is missing."""


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise GpuUnavailableError(
            f"GPU devices need CuPy, which is not installed ({e}); install spmd with the cuda12 "
            f"extra: pip install 'spmd[cuda12]'.") from None
    return cupy


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
    from ..devices import Device
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
    from .stacked import CupyStackedExecutor
    return CupyStackedExecutor()


def nccl_executor():
    """One process, one array per GPU, NCCL collectives: see :mod:`spmd.gpu.nccl`."""
    from ..executors.per_device import PerDeviceExecutor
    from .nccl import NcclCommunicator
    _cupy()
    return PerDeviceExecutor(NcclCommunicator.for_mesh)
