"""Real multi-process jobs through ``spmd-run``: the collective table on 2 and 4 MPI processes
against the simulated mesh, and the ways a job goes wrong (mismatched collectives, a rank that
never arrives, a rank killed with SIGKILL, a transient failure with --max-restarts, SIGUSR1).

Every job has a subprocess timeout and every test a pytest timeout: nothing here can hang.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from spmd import flight_recorder

from _mp import MULTIPROCESS, ROOT, ranks_saying, script

pytestmark = MULTIPROCESS
mpi4py = pytest.importorskip("mpi4py")


def spmd_run(*args, timeout=60, env=None, **popen):
    """Run ``python -m spmd.run *args``; returns (returncode, stdout, stderr, seconds)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "spmd.run", *args], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=timeout, **popen)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", [2, 4])
def test_collective_table_matches_simulated_mesh(n):
    """Every row of the collective table (1-D meshes, 2x2 with every axis choice and
    axis_index_groups), float rows, a shard_map program and a jit program."""
    code, out, err, _ = spmd_run("-n", str(n), script("collective_table.py"), timeout=50)
    assert code == 0, err[-3000:]
    assert ranks_saying(out, rf"OK \d+ on {n} processes") == list(range(n)), out


@pytest.mark.timeout(60)
def test_a_profiled_step_gives_the_same_values_and_a_row_per_collective():
    code, out, err, _ = spmd_run("-n", "2", script("profiled.py"), timeout=50)
    assert code == 0, err[-3000:]
    assert ranks_saying(out, "profiled OK on 2 processes") == [0, 1], out


@pytest.mark.timeout(40)
def test_mismatched_collectives_fail_every_rank_and_analyzer_names_them(tmp_path):
    dumps = str(tmp_path / "fr")
    code, out, err, seconds = spmd_run("-n", "4", script("faults.py"), "mismatch", timeout=30,
                                       env={"SPMD_COLLECTIVE_TIMEOUT": "10",
                                            "SPMD_FLIGHT_RECORDER_DIR": dumps})
    assert code != 0 and seconds < 30
    assert ranks_saying(err, "CollectiveMismatchError") == [0, 1, 2, 3], err[-3000:]
    summary = [line for line in err.splitlines() if line.startswith("spmd-run: culprit")]
    assert summary and summary[0].startswith("spmd-run: culprit: rank 1: collective #3 called "
                                             "all_gather("), err[-2000:]
    assert "CollectiveMismatchError" in summary[0]
    report = flight_recorder.analyze(flight_recorder.load(dumps))
    d = report.disagreement
    assert d is not None and d["odd"] == [1]
    assert d["calls"][1].startswith("all_gather(")
    assert all(d["calls"][r].startswith("psum(") for r in (0, 2, 3))
    cli = subprocess.run([sys.executable, "-m", "spmd.flight_recorder", dumps, "--trace",
                          str(tmp_path / "trace.json")], capture_output=True, text=True,
                         timeout=30, env=dict(os.environ, PYTHONPATH=ROOT))
    assert cli.returncode == 0
    assert "rank 1 differs from the rest" in cli.stdout
    assert "rank 1: all_gather(" in cli.stdout and "rank 0: psum(" in cli.stdout
    assert (tmp_path / "trace.json").stat().st_size > 0


@pytest.mark.timeout(40)
def test_rank_that_never_arrives_times_out_on_the_others(tmp_path):
    dumps = str(tmp_path / "fr")
    code, out, err, seconds = spmd_run("-n", "4", script("faults.py"), "hang", timeout=30,
                                       env={"SPMD_COLLECTIVE_TIMEOUT": "2",
                                            "SPMD_FLIGHT_RECORDER_DIR": dumps})
    assert code != 0 and seconds < 20
    waiting = ranks_saying(err, r"CollectiveTimeoutError: psum over axes \('i',\) \(collective #3 "
                                r".*ranks \[1\] did not arrive")
    assert waiting == [0, 2, 3], err[-3000:]
    report = flight_recorder.analyze(flight_recorder.load(dumps))
    assert report.behind == [1]
    assert report.disagreement is None


@pytest.mark.timeout(40)
def test_sigkilled_rank_stops_the_job_and_is_reported():
    code, out, err, seconds = spmd_run("-n", "4", script("faults.py"), "kill", timeout=30,
                                       env={"SPMD_COLLECTIVE_TIMEOUT": "10"})
    assert code != 0 and seconds < 25
    assert "rank 2 failed first: killed by signal SIGKILL" in err, err[-2000:]
    assert "spmd-run: culprit: rank 2 left no dump" in err, err[-2000:]
    assert "done" not in out


@pytest.mark.timeout(60)
def test_max_restarts_reruns_a_job_that_fails_once():
    code, out, err, _ = spmd_run("-n", "2", "--max-restarts", "1", script("faults.py"), "flaky",
                                 timeout=50, env={"SPMD_COLLECTIVE_TIMEOUT": "10"})
    assert code == 0, err[-2000:]
    assert "restarting the job (1 of 1 restarts)" in err
    assert ranks_saying(out, "done") == [0, 1]
    code, out, err, _ = spmd_run("-n", "2", script("faults.py"), "flaky", timeout=30,
                                 env={"SPMD_COLLECTIVE_TIMEOUT": "10"})
    assert code != 0
    summary, kept = err.strip().splitlines()[-2:]
    assert summary.startswith("spmd-run: culprit: rank 0 failed: uncaught RuntimeError: transient "
                              "failure on the first attempt"), summary
    assert "rank 0 failed first: exited with code 1" in summary
    folder = kept.rsplit(" ", 1)[1]
    assert kept.startswith("spmd-run: the job's files are kept in") and os.path.isdir(folder)
    shutil.rmtree(folder)


@pytest.mark.timeout(40)
def test_sigusr1_is_forwarded_and_every_rank_dumps(tmp_path):
    dumps = tmp_path / "fr"
    env = dict(os.environ, PYTHONPATH=ROOT, SPMD_FLIGHT_RECORDER_DIR=str(dumps))
    p = subprocess.Popen([sys.executable, "-m", "spmd.run", "-n", "2", script("usr1.py")],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = set()
        deadline = time.monotonic() + 25
        while len(ready) < 2 and time.monotonic() < deadline:
            line = p.stdout.readline()
            m = re.match(r"\[(\d)\] ready", line)
            if m:
                ready.add(m.group(1))
        assert len(ready) == 2
        p.send_signal(signal.SIGUSR1)
        while time.monotonic() < deadline and len(list(dumps.glob("rank*.json"))) < 2:
            time.sleep(0.05)
        dumped = flight_recorder.load(str(dumps))
        assert sorted(dumped) == [0, 1]
        assert all(d["reason"] == "SIGUSR1" and len(d["entries"]) >= 3 for d in dumped.values()), \
            {r: (d["reason"], len(d["entries"])) for r, d in dumped.items()}
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) != 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.timeout(40)
def test_direct_launch_sets_the_environment_and_the_coordinator_store():
    """--backend nccl starts the processes itself (no mpiexec) with a coordinator; the store
    carries values between them.  No GPU is touched."""
    code, out, err, _ = spmd_run("-n", "3", "--backend", "nccl", script("store.py"), timeout=30)
    assert code == 0, err[-2000:]
    for r in range(3):
        assert f"[{r}] rank {r} of 3 backend nccl launcher spmd-run sees [0, 10, 20]" in out, out


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_nccl_collective_table_on_two_gpus():
    """The same table over NCCL, one GPU per process, the unique id through the coordinator."""
    import spmd.gpu
    ok, why = spmd.gpu.available()
    if not ok:
        pytest.skip(why)
    if spmd.gpu.gpu_count() < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {spmd.gpu.gpu_count()}")
    code, out, err, _ = spmd_run("-n", "2", "--backend", "nccl", script("collective_table.py"),
                                 timeout=170)
    assert code == 0, err[-3000:]
    assert ranks_saying(out, r"OK \d+ on 2 processes") == [0, 1], out


@pytest.mark.timeout(60)
def test_ranks_on_one_machine_share_its_cores(monkeypatch):
    """spmd-run gives each of its N local processes cores // N host threads (ranks that each
    took every core would spin against each other); a user's SPMD_HOST_THREADS wins."""
    monkeypatch.delenv("SPMD_HOST_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    code, out, err, _ = spmd_run("-n", "2", script("threads.py"), timeout=40)
    assert code == 0, err[-2000:]
    assert ranks_saying(out, f"threads {max(1, cores // 2)} of {cores} cores") == [0, 1], out
    code, out, err, _ = spmd_run("-n", "2", script("threads.py"), timeout=40,
                                 env={"SPMD_HOST_THREADS": "3"})
    assert code == 0, err[-2000:]
    assert ranks_saying(out, f"threads 3 of {cores} cores") == [0, 1], out


def test_host_threads_setting_is_checked(monkeypatch):
    from spmd import _host_parallel
    monkeypatch.setenv("SPMD_HOST_THREADS", "two")
    _host_parallel.num_threads.cache_clear()
    try:
        with pytest.raises(ValueError, match="SPMD_HOST_THREADS='two'"):
            _host_parallel.num_threads()
    finally:
        monkeypatch.delenv("SPMD_HOST_THREADS")
        _host_parallel.num_threads.cache_clear()
