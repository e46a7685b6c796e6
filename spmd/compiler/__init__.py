"""The sharding compiler: a global Program plus shardings -> a manual (shard_map) Program.

- ``placements``: ``Sharding`` = a PartitionSpec per dim + pending reductions (``P(sum)``).
- ``cost``: the alpha-beta model of collectives (NCCL bus-bandwidth factors), CPU/GPU defaults.
- ``redistribute``: THE transition table between shardings, its planner and its lowering.
- ``rules``: sharding rules derived from what each primitive declares.
- ``propagate``: backward preferences, forward choice of the cheapest strategy per equation.
- ``lower``: the per-device body with explicit collectives and padding masks.
- ``explain``: ``as_text`` and ``explain``.
- ``compile``: ``compile_program``, the one entry point, and its result ``Compiled``.

It takes Programs and shardings and gives Programs: it never runs anything, and neither the
executors nor anything below import it (``spmd.jit`` calls it).
"""
from .compile import Compiled, compile_program
from .cost import CostModel, default_cost_model
from .placements import Sharding

__all__ = ["Compiled", "compile_program", "CostModel", "default_cost_model", "Sharding"]
