"""The alpha-beta cost model of collectives.

A collective over a group of ``n`` devices moving a buffer of ``S`` bytes per device takes
``alpha + S * factor / bandwidth`` seconds, where ``factor`` is NCCL's bus-bandwidth factor
(nccl-tests ``PERFORMANCE.md``): the bytes each device really sends per byte of ``S``, and
``alpha`` is the latency of one collective call (launch and synchronization, which dominate
small messages whatever the algorithm).

====================  ======================  =============
collective            S (bytes per device)    factor
====================  ======================  =============
all_reduce (psum)     buffer                  2(n-1)/n
all_gather            gathered output         (n-1)/n
reduce_scatter        input                   (n-1)/n
all_to_all            buffer                  (n-1)/n
permute / broadcast   buffer                  1
====================  ======================  =============

Contractions are also priced by their per-device flops (``flops`` per second), so a strategy
that gathers operands to compute the same product on every device pays for the repeated work.

Latency and bandwidth are per mesh axis (``CostModel(axes={"model": (alpha, bw)})``); a
collective over several axes runs at the slowest of them.

``memory_bandwidth`` prices local copies: combining several reductions into one collective
(XLA's all-reduce combiner) saves a call's latency per reduction merged but copies each buffer
into the combined one, so a buffer is combined only when copying it is quicker than ``alpha``.
"""
from __future__ import annotations

import dataclasses
import os

from ..comm_protocol import BUS_FACTOR as FACTORS
@dataclasses.dataclass(frozen=True)
class CostModel:
    """``alpha`` seconds per message step, ``bandwidth`` bytes/s; ``axes`` overrides per axis."""
    alpha: float             # seconds per collective call
    bandwidth: float         # bytes per second (bus bandwidth)
    axes: tuple = ()         # ((axis_name, alpha, bandwidth), ...)
    flops: float = 2e10      # per device: prices contractions that replicate work
    memory_bandwidth: float = 2e9   # per device, bytes/s of a local copy (read + write)

    def compute(self, flop_count: float) -> float:
        return flop_count / self.flops

    def axis(self, name: str) -> tuple[float, float]:
        for a, alpha, bw in self.axes:
            if a == name:
                return alpha, bw
        return self.alpha, self.bandwidth

    def with_axes(self, **per_axis) -> "CostModel":
        """``cm.with_axes(model=(alpha, bandwidth))``."""
        return dataclasses.replace(self, axes=tuple((a, float(al), float(bw)) for a, (al, bw) in per_axis.items()))

    def worth_combining(self, nbytes: int, axes) -> bool:
        """Whether a reduction of ``nbytes`` per device over ``axes`` should join a combined
        collective: copying it in and out of the combined buffer costs less than one call."""
        return 2 * nbytes / self.memory_bandwidth < max(self.axis(a)[0] for a in axes)

    def time(self, kind: str, nbytes: int, axes, sizes: dict) -> float:
        """Seconds for collective ``kind`` over mesh ``axes`` with ``nbytes`` per device."""
        n = 1
        for a in axes:
            n *= sizes[a]
        if n == 1:
            return 0.0
        alpha = max(self.axis(a)[0] for a in axes)
        bw = min(self.axis(a)[1] for a in axes)
        return alpha + nbytes * FACTORS[kind](n) / bw


# Simulated CPU mesh: memory copies between "devices" of one process (which share the host's
# memory bandwidth: about 2 GB/s each for 8 devices).
CPU = CostModel(alpha=5e-6, bandwidth=10e9, flops=2e10, memory_bandwidth=2e9)
# One node of GPUs over NVLink (NCCL ring, bus bandwidth as measured by nccl-tests; HBM copies).
GPU = CostModel(alpha=15e-6, bandwidth=150e9, flops=4e14, memory_bandwidth=1.5e12)


_override: list = []


def default_cost_model() -> CostModel:
    """The model of ``set_cost_model``, else ``SPMD_COST_MODEL=gpu|cpu``, else CPU."""
    if _override:
        return _override[-1]
    return GPU if os.environ.get("SPMD_COST_MODEL", "cpu").lower() == "gpu" else CPU


class set_cost_model:
    """``with set_cost_model(GPU.with_axes(data=(25e-6, 25e9))):`` prices compilations
    started inside it with that model (e.g. a slow inter-node ``data`` axis)."""

    def __init__(self, cm: CostModel):
        self.cm = cm

    def __enter__(self):
        _override.append(self.cm)
        return self.cm

    def __exit__(self, *exc):
        _override.pop()
