"""Compile every kernel with NVRTC for each target arch, without a GPU, and read ptxas's report.

NVRTC (``libnvrtc.so`` from the ``nvidia-cuda-nvrtc-cu12`` wheel) compiles to CUBIN for a real
arch with no driver present; ``-Xptxas=-v`` makes ptxas log, per kernel, its registers, stack
frame and spill bytes.  Called through ``ctypes`` so that no CUDA Python binding is needed.
``python -m spmd.gpu.nvrtc_check`` prints the table; ``tests/test_kernels.py`` asserts on it.

The ``kernels-check`` extra pins NVRTC and the CUDA headers (``nvidia-cuda-runtime-cu12``) to one
CUDA minor: an NVRTC older than the headers fails inside ``cuda_fp8.hpp``.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib
import os
import pathlib
import re
from concurrent.futures import ThreadPoolExecutor

from rich.console import Console
from rich.table import Table

from . import kernels


class NvrtcUnavailable(RuntimeError):
    pass


def _wheel_dir(module: str) -> pathlib.Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise NvrtcUnavailable(f"{module} is not installed ({e}); "
                               f"pip install 'spmd[kernels-check]'") from None
    return pathlib.Path(list(mod.__path__)[0])


@functools.lru_cache(maxsize=None)
def _lib():
    path = _wheel_dir("nvidia.cuda_nvrtc") / "lib" / "libnvrtc.so.12"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NvrtcUnavailable(f"cannot load {path}: {e}") from None
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def include_dir() -> pathlib.Path:
    """The CUDA headers of the pinned ``nvidia-cuda-runtime-cu12`` wheel."""
    return _wheel_dir("nvidia.cuda_runtime") / "include"


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(_lib().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def headers_version() -> tuple[int, int]:
    text = (include_dir() / "cuda_runtime_api.h").read_text()
    v = int(re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text).group(1))
    return v // 1000, (v % 1000) // 10


def _check(status: int, what: str, log: str = ""):
    if status != 0:
        msg = _lib().nvrtcGetErrorString(status).decode()
        raise RuntimeError(f"{what} failed: {msg}\n{log}")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """What ptxas said about one kernel on one arch."""
    expression: str
    arch: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


def compile_source(code: str, arch: str, expressions=(), options=()) -> tuple[bytes, str, dict[str, str]]:
    """(CUBIN, log, {expression: mangled name}) of ``code`` compiled for ``arch``."""
    lib = _lib()
    prog = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"spmd_kernels.cu", 0, None, None),
           "nvrtcCreateProgram")
    try:
        for e in expressions:
            _check(lib.nvrtcAddNameExpression(prog, e.encode()), f"nvrtcAddNameExpression({e})")
        opts = [f"-arch={arch}", "-Xptxas=-v", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        _check(status, f"NVRTC compile for {arch}", log)
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        lowered = {}
        for e in expressions:
            name = ctypes.c_char_p()
            _check(lib.nvrtcGetLoweredName(prog, e.encode(), ctypes.byref(name)), "nvrtcGetLoweredName")
            lowered[e] = name.value.decode()
        return cubin.raw, log, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str, lowered: dict[str, str]) -> list[KernelReport]:
    """One report per kernel entry in ptxas's ``-v`` output."""
    by_mangled = {m: e for e, m in lowered.items()}
    reports, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"expression": by_mangled.get(m.group(1), m.group(1)), "arch": m.group(2)}
        elif current is not None and (m := _FRAME.search(line)):
            current.update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        elif current is not None and (m := _REGS.search(line)):
            reports.append(KernelReport(registers=int(m.group(1)), **current))
            current = None
    return reports


def _compile_one(name: str, arch: str) -> list[KernelReport]:
    expressions = kernels.INSTANTIATIONS[name]
    _, log, lowered = compile_source(kernels.source(name), arch, expressions, kernels.COMPILE_OPTIONS)
    reports = parse_ptxas_log(log, lowered)
    missing = set(expressions) - {r.expression for r in reports}
    if missing:
        raise RuntimeError(f"ptxas reported nothing for {sorted(missing)} in {name} ({arch}):\n{log}")
    return [dataclasses.replace(r, expression=f"{name}: {r.expression}") for r in reports]


def compile_all(archs=kernels.TARGET_ARCHS) -> dict[str, list[KernelReport]]:
    """Compile every source of ``kernels/`` with every instantiation for each of ``archs``.

    One NVRTC program per (source, arch), in threads: NVRTC is thread-safe and releases the
    GIL, and ptxas (most of the time) runs once per kernel."""
    jobs = [(name, arch) for arch in archs for name in kernels.SOURCES]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        done = list(pool.map(lambda job: _compile_one(*job), jobs))
    out = {arch: [] for arch in archs}
    for (name, arch), reports in zip(jobs, done):
        out[arch] += reports
    return out


def main() -> None:
    print(f"NVRTC {nvrtc_version()}, headers {headers_version()}")
    table = Table(title="kernels/ compiled by NVRTC (registers / spill bytes per arch)")
    table.add_column("kernel")
    results = {arch: {r.expression: r for r in reports} for arch, reports in compile_all().items()}
    for arch in kernels.TARGET_ARCHS:
        table.add_column(arch, justify="right")
    for expr in results[kernels.TARGET_ARCHS[0]]:
        cells = []
        for arch in kernels.TARGET_ARCHS:
            r = results[arch][expr]
            spill = f", SPILL {r.spill_stores}/{r.spill_loads}" if r.spills else ""
            cells.append(f"{r.registers} regs" + spill
                         + (f", stack {r.stack_bytes}" if r.stack_bytes else ""))
        table.add_row(expr, *cells)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
