"""The MPI communicator on real processes (``spmd-run``): values built in reused receive
buffers, the check that no rank can skip (different ``axis_index_groups`` or ``ppermute`` perm
fail every rank, naming the rank, the collective and the argument), a waiting rank that leaves
its core to others, and the deadline inside the data exchange (the watchdog).

Every job has a subprocess timeout and every test a pytest timeout: nothing here can hang."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from spmd import flight_recorder

from _mp import MULTIPROCESS, ROOT, SCRIPTS, ranks_saying

pytestmark = MULTIPROCESS
pytest.importorskip("mpi4py")


def spmd_run(n, name, *args, deadline=10, dumps=None, timeout=40):
    """``spmd-run -n N tests/mp_scripts/NAME args``: (returncode, stdout, stderr, end time)."""
    env = dict(os.environ, PYTHONPATH=ROOT, SPMD_COLLECTIVE_TIMEOUT=str(deadline))
    if dumps:
        env["SPMD_FLIGHT_RECORDER_DIR"] = dumps
    p = subprocess.run([sys.executable, "-m", "spmd.run", "-n", str(n),
                        os.path.join(SCRIPTS, name), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.monotonic()




ARGUMENT_MISMATCHES = [
    r"psum over axes \('i',\) \(collective #\d+ of rank \d\): rank 1 passed "
    r"axis_index_groups=\[\[0, 1\], \[2, 3\]\] where ranks 0, 2, 3 passed "
    r"axis_index_groups=\[\[0, 2\], \[1, 3\]\]",
    r"ppermute over axes \('i',\) \(collective #\d+ of rank \d\): rank 1 passed "
    r"perm=\[\[0, 2\], \[1, 3\], \[2, 0\], \[3, 1\]\] where ranks 0, 2, 3 passed "
    r"perm=\[\[0, 1\], \[1, 2\], \[2, 3\], \[3, 0\]\]",
]


@pytest.mark.timeout(60)
def test_values_in_reused_buffers_and_every_rank_fails_on_another_argument(tmp_path):
    dumps = str(tmp_path / "fr")
    code, out, err, _ = spmd_run(4, "mpi_checks.py", dumps=dumps)
    assert code == 0, err[-3000:]
    assert ranks_saying(out, "values OK on 4 processes") == [0, 1, 2, 3], out
    for message in ARGUMENT_MISMATCHES:
        assert ranks_saying(out, "CollectiveMismatchError: " + message) == [0, 1, 2, 3], out
    assert "no error" not in out
    report = flight_recorder.analyze(flight_recorder.load(dumps))
    assert report.culprit == [1], str(report)
    assert str(report).splitlines()[0].startswith("culprit: rank 1: collective #"), str(report)
    assert "called psum(axes=('i',), shape=2, dtype=float64, groups=[[0, 1], [2, 3]])" in \
        str(report).splitlines()[0], str(report)


@pytest.mark.timeout(60)
def test_waiting_rank_leaves_its_core_and_times_out_on_the_deadline():
    code, out, err, _ = spmd_run(2, "mpi_faults.py", "sleep", deadline=3)
    assert code != 0
    waited = re.search(r"^\[0\] waited ([\d.]+) s using ([\d.]+) s of CPU", out, re.M)
    assert waited, out + err[-2000:]
    seconds, cpu = map(float, waited.groups())
    assert 3 <= seconds < 4 and cpu < 0.3, (seconds, cpu)
    assert ranks_saying(err, r"CollectiveTimeoutError: psum .* ranks \[1\] did not arrive") == [0]


@pytest.mark.timeout(60)
def test_watchdog_ends_a_collective_stalled_inside_the_data_exchange(tmp_path):
    dumps = str(tmp_path / "fr")
    code, out, err, end = spmd_run(2, "mpi_faults.py", "stall", deadline=3, dumps=dumps)
    assert code != 0 and "done" not in out
    started = float(re.search(r"^\[0\] started ([\d.]+)", out, re.M).group(1))
    assert end - started < 3 + 1 + 2, end - started        # deadline + watchdog + teardown
    assert ranks_saying(err, r"CollectiveTimeoutError: psum over axes \('i',\) .* the data "
                             r"exchange did not finish") == [0, 1], err[-3000:]
    dumped = flight_recorder.load(dumps)
    assert sorted(dumped) == [0, 1]
    assert all(d["entries"][-1]["state"] == "timeout" for d in dumped.values())
