"""The benchmark registry, the timer and the result rows.

A benchmark is a function ``fn(quick: bool) -> list[Row]`` registered with
``@benchmark("name")``.  ``quick`` asks for tiny sizes and few repeats (CI runs it to check
that every benchmark still works; it asserts no timing).  Import the peer library (JAX)
inside the function and return :func:`skip_rows` when it is missing, so one absent
dependency gives a clear row instead of a crash.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass
class Row:
    """One measurement: ``spmd`` against ``peer`` on one case.  Times are seconds per call."""
    benchmark: str
    case: str
    spmd_s: float | None
    peer: str
    peer_s: float | None
    extra: dict = dataclasses.field(default_factory=dict)
    ratio: float | None = dataclasses.field(init=False)

    def __post_init__(self):
        ok = self.spmd_s is not None and self.peer_s
        self.ratio = self.spmd_s / self.peer_s if ok else None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    fn: Callable[[bool], list[Row]]
    gpu: bool = False


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, *, gpu: bool = False):
    """Register ``fn(quick) -> list[Row]`` under ``name``; ``gpu=True`` ones run with ``--gpu``."""
    def register(fn):
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice "
                             f"({REGISTRY[name].fn.__module__} and {fn.__module__}).")
        REGISTRY[name] = Benchmark(name, fn, gpu)
        return fn
    return register


def skip_rows(name: str, case: str, peer: str, reason: str) -> list[Row]:
    return [Row(name, case, None, peer, None, {"skipped": reason})]


def jax_peer(n: int = 8):
    """``(jax, None)`` when JAX is importable and sees ``n`` CPU devices, else ``(None, why)``."""
    try:
        import jax
    except ImportError as e:
        return None, f"jax is not installed ({e})"
    if jax.device_count() < n:
        return None, (f"jax sees {jax.device_count()} devices; set "
                      f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return jax, None


def timeit(fn: Callable[[], object], repeat: int = 7, min_time: float = 0.05, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` runs, after ``warmup`` calls.

    Each run loops ``fn`` enough times to last at least ``min_time`` seconds, so that very
    fast calls are not lost in the timer's resolution.
    """
    for _ in range(warmup):
        fn()
    loops = _loops(fn, min_time)
    return statistics.median(_run(fn, loops) for _ in range(repeat))


def timeit_pair(ours: Callable[[], object], peer: Callable[[], object], repeat: int = 7,
                min_time: float = 0.05) -> tuple[float, float]:
    """Median seconds per call of ``ours`` and of ``peer``, their runs interleaved (ours, peer,
    ours, ...) so that a change in the machine's load falls on both and not on one side of
    the ratio."""
    fns = (ours, peer)
    for fn in fns:
        fn()                                        # warm up
    loops = [_loops(fn, min_time) for fn in fns]
    samples: tuple[list, list] = ([], [])
    for _ in range(repeat):
        for fn, n, out in zip(fns, loops, samples):
            out.append(_run(fn, n))
    return statistics.median(samples[0]), statistics.median(samples[1])


def _loops(fn, min_time: float) -> int:
    """How many calls of ``fn`` last at least ``min_time`` seconds (from one timed call)."""
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    return max(1, int(min_time / once) if once > 0 else 1000)


def _run(fn, loops: int) -> float:
    """Seconds per call of ``fn`` over ``loops`` calls in a row."""
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) / loops


@functools.lru_cache(maxsize=None)
def memcopy_seconds(nbytes: int, repeat: int = 7) -> float:
    """Seconds for one ``np.copyto`` of ``nbytes`` between host buffers: the bandwidth bound
    that moving the same bytes between (simulated) devices is compared against."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    return timeit(lambda: np.copyto(dst, src), repeat=repeat)


def gbps(nbytes: int, seconds: float | None) -> float | None:
    return round(nbytes / seconds / 1e9, 2) if seconds else None
