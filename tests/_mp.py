"""What the tests that start real processes share: where the scripts are, the marks that skip
them cleanly without mpiexec, and reading output whose lines spmd-run prefixes with the rank."""
from __future__ import annotations

import os
import re
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "mp_scripts")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")

needs_mpi = pytest.mark.skipif(not (os.path.exists(MPIEXEC) or shutil.which("mpiexec")),
                               reason="needs mpiexec (pip install 'spmd[mpi]')")
MULTIPROCESS = [pytest.mark.multiprocess, needs_mpi]     # a module's pytestmark


def script(name: str) -> str:
    return os.path.join(SCRIPTS, name)


def ranks_saying(text: str, pattern: str) -> list[int]:
    """The ranks whose prefixed output has a line matching ``pattern``."""
    return sorted({int(m.group(1)) for m in re.finditer(rf"^\[(\d+)\] .*{pattern}", text, re.M)})
