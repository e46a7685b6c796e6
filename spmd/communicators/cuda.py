"""CuPy and its NCCL binding, imported on first use: the one place that imports them.

CuPy is optional (the ``cuda12`` extra): ``import spmd`` never imports it, and a machine
without it (or without NCCL) learns what to install when it first asks for a GPU.  Every GPU
module (``spmd.communicators.nccl``, ``spmd.gpu.*``) reaches CuPy through :func:`cupy` and NCCL
through :func:`nccl`.
"""
from __future__ import annotations

from ..errors import MeshError


class GpuUnavailableError(MeshError):
    """No usable GPU; the message says which piece is missing."""


def cupy():
    """The ``cupy`` module; :class:`GpuUnavailableError` saying how to install it if missing."""
    try:
        import cupy  # optional: CuPy (the cuda12 extra) is needed only once a GPU is used
    except ImportError as e:
        raise GpuUnavailableError(
            f"GPU devices need CuPy, which is not installed ({e}); install spmd with the cuda12 "
            f"extra: pip install 'spmd[cuda12]'.") from None
    return cupy


def nccl():
    """``cupy.cuda.nccl``; :class:`GpuUnavailableError` saying how to get NCCL if missing."""
    cupy()                                  # CuPy itself missing: say that first
    try:
        from cupy.cuda import nccl  # optional: NCCL through CuPy, needed only by NCCL collectives
    except ImportError as e:
        raise GpuUnavailableError(f"NCCL is not available through CuPy ({e}); pip install "
                                  f"'spmd[cuda12]' (it brings nvidia-nccl-cu12).") from None
    if not getattr(nccl, "available", True):
        raise GpuUnavailableError("CuPy was built without NCCL; pip install nvidia-nccl-cu12.")
    return nccl
