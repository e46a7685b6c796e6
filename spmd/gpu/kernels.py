"""The CUDA kernels of ``kernels/``: sources, the template instantiations, and loading.

Every source is turned into one self-contained string (local ``#include "..."`` lines are
inlined), so the string alone keys CuPy's on-disk compile cache and a changed header can never
hit a stale binary.  ``INSTANTIATIONS`` lists every template instantiation once; the loader
compiles exactly those (NVRTC name expressions), and the CPU-side test compiles the same list for
sm_80, sm_90 and sm_100.  Nothing here imports CuPy until a kernel is loaded.
"""
from __future__ import annotations

import functools
import itertools
import os
import pathlib
import re

import numpy as np

from ..communicators.cuda import cupy as _cupy

SOURCES = ("pack.cu", "copy.cu", "reduce.cu", "allreduce.cu")
HEADERS = ("common.cuh", "index_math.cuh")
TARGET_ARCHS = ("sm_80", "sm_90", "sm_100")
COMPILE_OPTIONS = ("-std=c++17",)

# element types by what the kernel needs to know about them
MOVE_TYPES = {1: "unsigned char", 2: "unsigned short", 4: "unsigned int", 8: "unsigned long long",
              16: "spmd::b128"}
COPY_TYPES = {1: "unsigned char", 2: "unsigned short", 4: "unsigned int", 8: "unsigned long long",
              16: "spmd::Pack<unsigned int>"}
REDUCE_TYPES = {"float16": "spmd::half_t", "bfloat16": "spmd::bf16_t", "float32": "float",
                "float64": "double", "int32": "int", "int64": "long long"}
OPS = {"sum": "spmd::Sum", "max": "spmd::Max", "min": "spmd::Min"}
INDEX_TYPES = ("int", "long long")


def _instantiations() -> dict[str, tuple[str, ...]]:
    t = {}
    t["pack.cu"] = tuple(f"spmd::{k}<{ty}, {ix}>" for k in ("pack_chunks", "unpack_chunks")
                         for ty in MOVE_TYPES.values() for ix in INDEX_TYPES)
    t["copy.cu"] = tuple(f"spmd::copy_batched<{ty}>" for ty in COPY_TYPES.values())
    t["reduce.cu"] = (tuple(f"spmd::reduce_axis<{ty}, {op}, {ix}>" for ty, op, ix
                            in itertools.product(REDUCE_TYPES.values(), OPS.values(), INDEX_TYPES))
                      + tuple(f"spmd::reduce_ptrs<{ty}, {op}>" for ty, op
                              in itertools.product(REDUCE_TYPES.values(), OPS.values())))
    t["allreduce.cu"] = tuple(f"spmd::allreduce_{shot}<{ty}, {op}>" for shot, ty, op
                              in itertools.product(("one_shot", "two_shot"), REDUCE_TYPES.values(),
                                                   OPS.values()))
    return t


INSTANTIATIONS = _instantiations()


def kernels_dir() -> pathlib.Path:
    """Where the ``.cu`` files are: inside the installed wheel (``spmd/_kernels``) or, in a
    source checkout, the repository's ``kernels/``."""
    here = pathlib.Path(__file__).resolve().parent.parent
    for candidate in (here / "_kernels", here.parent / "kernels"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"spmd's CUDA sources are missing: looked in {here / '_kernels'} and "
                            f"{here.parent / 'kernels'}; reinstall spmd.")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def source(name: str) -> str:
    """``kernels/<name>`` with its local includes inlined (each header once)."""
    root = kernels_dir()
    seen: set[str] = set()

    def expand(fname: str) -> str:
        if fname in seen:
            return ""
        seen.add(fname)
        text = (root / fname).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)
    return expand(name)


def reduce_ctype(dtype) -> str | None:
    """The C type the reduce kernels use for ``dtype``, or None when none is instantiated."""
    return REDUCE_TYPES.get(np.dtype(dtype).name)


# ---------------------------------------------------------------------------------------------
# loading (needs CuPy and a GPU)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _module(name: str, device_id: int):
    """The compiled RawModule of ``name`` for the GPU ``device_id`` (CuPy compiles for that
    GPU's arch on first use and keeps the binary in its on-disk cache)."""
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=source(name), options=COMPILE_OPTIONS,
                              name_expressions=INSTANTIATIONS[name])


def kernel(name: str, expression: str):
    """The kernel ``expression`` (one of ``INSTANTIATIONS[name]``) on the current GPU."""
    cupy = _cupy()
    if expression not in INSTANTIATIONS[name]:
        raise KeyError(f"{expression} is not instantiated in {name}; add it to "
                       f"spmd.gpu.kernels.INSTANTIATIONS")
    return _module(name, cupy.cuda.Device().id).get_function(expression)


@functools.lru_cache(maxsize=None)
def sm_count(device_id: int) -> int:
    cupy = _cupy()
    return cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]


def grid(units: int, threads: int = 256, per_sm: int = 4) -> tuple[int, int]:
    """(blocks, threads) for a grid-stride loop over ``units`` items."""
    cupy = _cupy()
    most = sm_count(cupy.cuda.Device().id) * per_sm
    return max(1, min(most, -(-units // threads))), threads


def env_disabled() -> bool:
    """``SPMD_GPU_KERNELS=0`` turns the custom kernels off (CuPy's generic ops run instead)."""
    return os.environ.get("SPMD_GPU_KERNELS", "1") == "0"
