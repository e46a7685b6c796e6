"""C code built at run time: ``gcc`` (or ``$CC``) on a source, the shared library cached on
disk under a hash of the source, the compiler, its flags and the CPU, so that a later process
loads it at once.  The native loops (``spmd.executors.native``) and the host threads' matrix
products (``spmd._gemm``) are built this way.

The cache is ``$SPMD_NATIVE_CACHE``, else ``~/.cache/spmd/native``; it keeps the
``CACHE_MAX_FILES`` most recently built libraries.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

CACHE_ENV_VAR = "SPMD_NATIVE_CACHE"
CACHE_MAX_FILES = 2000              # libraries kept on disk (about 16 KiB each)

_lock = threading.Lock()
_libraries: dict[str, object] = {}  # key -> the loaded library, or the error its build gave


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def cache_dir() -> str:
    base = os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "spmd", "native")
    os.makedirs(base, exist_ok=True)
    return base


def _prune(where: str, keep: str) -> None:
    """At most ``CACHE_MAX_FILES`` libraries in the cache: the least recently built go."""
    try:
        libs = [e for e in os.scandir(where) if e.name.endswith(".so") and e.path != keep]
        if len(libs) < CACHE_MAX_FILES:
            return
        libs.sort(key=lambda e: e.stat().st_mtime)
        for e in libs[:len(libs) + 1 - CACHE_MAX_FILES]:
            os.unlink(e.path)
    except OSError:
        pass                        # another process pruned the same files first


def library(source: str, flags: tuple[str, ...], link: tuple[str, ...] = ("-lm",), *,
            what: str = "C code") -> ctypes.CDLL:
    """The library of ``source`` built with ``flags`` and ``link`` (built once per machine,
    loaded once per process).  Raises ``RuntimeError`` with the compiler's message where it
    fails (``what`` names the source in it), the same error on every later call."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256("\n".join([source, cc, *flags, *link, _cpu_key()]).encode()).hexdigest()[:32]
    with _lock:
        got = _libraries.get(key)
        if got is None:
            got = _libraries[key] = _load(source, cc, flags, link, key, what)
    if isinstance(got, Exception):
        raise got
    return got


def _load(source, cc, flags, link, key, what):
    try:
        where = cache_dir()
        lib = os.path.join(where, f"{key}.so")
        if not os.path.exists(lib):
            with tempfile.TemporaryDirectory(dir=where) as tmp:
                c, so = os.path.join(tmp, "source.c"), os.path.join(tmp, "built.so")
                with open(c, "w") as f:
                    f.write(source)
                done = subprocess.run([cc, *flags, "-o", so, c, *link], capture_output=True,
                                      text=True, timeout=120)
                if done.returncode:
                    raise RuntimeError(f"{cc} failed on {what}:\n{done.stderr[-2000:]}")
                os.replace(so, lib)             # atomic: another process may race us here
            _prune(where, keep=lib)
        return ctypes.CDLL(lib)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return RuntimeError(str(err))
