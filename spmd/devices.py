"""Devices: simulated CPU devices (the default) and the platforms that plug-ins register.

On the CPU, ``SPMD_NUM_CPU_DEVICES`` simulated devices (default 8) live in this one process.
Other platforms register a function listing their devices with :func:`register_platform`
(``spmd.gpu`` registers ``"gpu"``, alias ``"cuda"``, when it is imported).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

from . import runtime
from .errors import MeshError, SpmdError

DEFAULT_NUM_CPU_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Device:
    """One device of the (possibly simulated) machine.  ``id`` is global across processes."""

    id: int
    platform: str = "cpu"
    process_index: int = 0
    local_id: int = 0

    @property
    def device_kind(self) -> str:
        return {"cpu": "cpu (simulated)", "gpu": "gpu"}.get(self.platform, self.platform)

    def __repr__(self) -> str:
        kind = {"cpu": "CpuDevice", "gpu": "CudaDevice"}.get(self.platform, "Device")
        return f"{kind}(id={self.id})"


MAX_CPU_DEVICES = 16384


def _num_cpu_devices() -> int:
    try:
        return runtime.int_setting("SPMD_NUM_CPU_DEVICES", DEFAULT_NUM_CPU_DEVICES,
                                   most=MAX_CPU_DEVICES, what="the number of simulated CPU devices")
    except SpmdError as e:
        raise MeshError(str(e)) from None


_cpu_cache: dict[tuple[int, int, int], tuple[Device, ...]] = {}


def _cpu_devices() -> tuple[Device, ...]:
    n = _num_cpu_devices()
    state = runtime.state()
    key = (n, state.process_index, state.process_count)
    if key not in _cpu_cache:
        if state.process_count == 1:
            devs = tuple(Device(i, "cpu", 0, i) for i in range(n))
        else:
            # One device per process (a CPU under MPI, a GPU under NCCL): meshes span processes.
            platform = "gpu" if state.backend == "nccl" else "cpu"
            devs = tuple(Device(p, platform, p, 0) for p in range(state.process_count))
        _cpu_cache[key] = devs
    return _cpu_cache[key]


# platform name -> the function listing its devices; filled by the plug-ins at import
_platforms: dict[str, Callable[[], Sequence[Device]]] = {"cpu": _cpu_devices}
_aliases: dict[str, str] = {}


def register_platform(name: str, list_devices: Callable[[], Sequence[Device]],
                      aliases: Sequence[str] = ()) -> None:
    """Make ``devices(name)`` (and ``devices(alias)``) call ``list_devices()``."""
    _platforms[name] = list_devices
    for a in aliases:
        _aliases[a] = name


def devices(platform: str | None = None) -> list[Device]:
    """All devices of ``platform`` (``"cpu"`` by default, or a registered one such as
    ``"gpu"``), across processes.

    >>> len(devices()) == device_count()
    True
    """
    name = "cpu" if platform is None else _aliases.get(platform, platform)
    if name not in _platforms:
        raise MeshError(f"unknown platform {platform!r}; use one of "
                        f"{sorted(set(_platforms) | set(_aliases))!r}.")
    return list(_platforms[name]())


def local_devices(platform: str | None = None) -> list[Device]:
    """The devices this process can address."""
    me = runtime.process_index()
    return [d for d in devices(platform) if d.process_index == me]


def device_count(platform: str | None = None) -> int:
    return len(devices(platform))


def local_device_count(platform: str | None = None) -> int:
    return len(local_devices(platform))
