"""Parallelism recipes over ``shard_map``: small functions whose collectives are written out,
each tested equal to the unsharded model (values and gradients).

- ``data``: gradient mean over a data axis, bucketed, with communication hooks (bf16).
- ``fsdp``: FSDP / ZeRO-3 (gather before use, gradients reduce-scattered), ZeRO-1 / ZeRO-2.
- ``tensor``: Megatron column- and row-parallel linears, vocabulary-parallel embedding and
  cross-entropy.
- ``sequence``: sequence-parallel regions, ring attention, all-to-all (Ulysses) attention.
- ``pipeline``: GPipe, 1F1B and interleaved 1F1B over a stage axis, their schedules and bubbles.
- ``experts``: mixture of experts with top-k routing, capacity and ``all_to_all`` dispatch.

Each function is called inside a ``shard_map`` body with the name of the mesh axis it works
over; its docstring lists the collectives it issues.
"""
from . import data, experts, fsdp, pipeline, sequence, tensor
from .data import bf16_compress, fp16_compress, mean_gradients
from .experts import moe
from .fsdp import fsdp_apply, gather_params, zero_update
from .pipeline import bubble_fraction, gpipe, one_f_one_b, schedule, schedule_chunks
from .sequence import attention, gather_sequence, ring_attention, ulysses_attention
from .tensor import (column_parallel_linear, row_parallel_linear, vocab_parallel_cross_entropy,
                     vocab_parallel_embedding)
