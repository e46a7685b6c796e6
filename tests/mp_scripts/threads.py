"""Prints how many host threads this process's work uses (for test_multiprocess)."""
import os

from spmd import _host_parallel

print(f"threads {_host_parallel.num_threads()} of {len(os.sched_getaffinity(0))} cores",
      flush=True)
