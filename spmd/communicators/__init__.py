"""Communicator backends for the per-device executor: in-process (``inprocess``, the reference),
MPI (``mpi``, one device per process) and NCCL (``nccl``, the GPUs of one process or one GPU per
process).  Each implements ``spmd.comm_protocol.Communicator`` and runs every collective of a
multi-process job through the one collective frame of ``frame`` (flight recorder, cross-rank
signature check, deadline).
"""
from __future__ import annotations

# The protocol lives in spmd.comm_protocol; these names stay importable from here.
from ..comm_protocol import (BUS_FACTOR, Communicator, HostPlacement, axis_groups,  # noqa: F401
                             group_of, placement, rank_in)
