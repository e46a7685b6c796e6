"""Executors run Programs.

- ``stacked``: mesh axes as leading array dims; collectives are array operations (the default).
- ``per_device``: one array per device; collectives through a ``Communicator``.  With the
  in-process communicator it is the *reference executor*, the oracle for everything else.
"""
from .stacked import StackedExecutor
from .per_device import PerDeviceExecutor, reference_executor

__all__ = ["StackedExecutor", "PerDeviceExecutor", "reference_executor"]
