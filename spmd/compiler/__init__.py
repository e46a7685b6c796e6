"""The sharding compiler: a global Program plus shardings -> a manual (shard_map) Program.

- ``placements``: ``Sharding`` = a PartitionSpec per dim + pending reductions (``P(sum)``).
- ``cost``: the alpha-beta model of collectives (NCCL bus-bandwidth factors), CPU/GPU defaults.
- ``redistribute``: THE transition table between shardings, its planner and its lowering.
- ``rules``: sharding rules derived from each primitive's category.
- ``propagate``: backward preferences, forward choice of the cheapest strategy per equation.
- ``lower``: the per-device body with explicit collectives and padding masks.
- ``explain``: ``as_text`` and ``explain``.
- ``jit``: ``spmd.jit(f, in_shardings=, out_shardings=, donate_argnums=)``,
  ``with_sharding_constraint``, ``reshard``.
- ``eager``: NumPy operations on sharded ``Array``s, one compiled op at a time.

Executors never import this package; it only produces Programs they already run.
"""
