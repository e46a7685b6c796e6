"""The fault table: real jobs under ``spmd-run`` where one rank (or the launcher) goes wrong.  For
each fault every process of the job is gone within the collective deadline + 5 s (no orphans,
checked with ``ps``), and the first line of the flight-recorder analysis names the true culprit
rank and the collective.  Every job has a subprocess timeout and every test a pytest timeout."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from spmd import flight_recorder

from _mp import MULTIPROCESS, ROOT, script

SCRIPT = script("fault_table.py")
DEADLINE = 3            # SPMD_COLLECTIVE_TIMEOUT of these jobs, seconds

pytestmark = MULTIPROCESS
pytest.importorskip("mpi4py")


def _leftovers(token: str, sessions=()) -> list[str]:
    """Processes of the job still alive: any whose command line holds the token, or that sit in
    the session of the job's mpiexec (its proxies)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    alive = []
    for line in out.splitlines():
        pid, sid, stat, args = line.split(None, 3)
        if int(pid) == os.getpid() or stat.startswith("Z"):
            continue
        if token in args or int(sid) in sessions:
            alive.append(line.strip())
    return alive


def _sessions(token: str) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]) for line in out.splitlines()
            if "mpiexec" in line and token in line}


def _run(mode, n, tmp_path, *, launcher_signal=None, env=None):
    """Start the job, optionally signal the launcher once every rank is warm; wait for the end.
    Returns (stderr, seconds from the fault to the last process gone, leftovers, dumps dir)."""
    token = uuid.uuid4().hex[:12]
    dumps = str(tmp_path / "fr")
    env = dict(os.environ, PYTHONPATH=ROOT, SPMD_COLLECTIVE_TIMEOUT=str(DEADLINE),
               SPMD_FLIGHT_RECORDER_DIR=dumps, **(env or {}))
    p = subprocess.Popen([sys.executable, "-m", "spmd.run", "-n", str(n), SCRIPT, mode, token],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sessions = set()
    try:
        warm = 0
        deadline = time.monotonic() + 60
        while warm < n and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            warm += line.rstrip().endswith("] warm")
        assert warm == n, f"only {warm} of {n} ranks got ready"
        sessions = _sessions(token)
        fault = time.monotonic()
        if launcher_signal is not None:
            time.sleep(0.3)
            p.send_signal(launcher_signal)
        if launcher_signal == signal.SIGKILL:
            p.wait(timeout=10)
            err = p.stderr.read()
        else:
            _, err = p.communicate(timeout=DEADLINE + 30)
        limit = fault + DEADLINE + 5
        while _leftovers(token, sessions) and time.monotonic() < limit + 1:
            time.sleep(0.1)
        return err, time.monotonic() - fault, _leftovers(token, sessions), dumps
    finally:
        if p.poll() is None:
            p.kill()
        for line in _leftovers(token, sessions):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


# (mode, processes, the analysis' first line starts with)
FAULTS = [
    ("raise", 3, "culprit: rank 1 failed: uncaught ValueError: bad batch on this rank; the others "
                 "waited for it in collective #3 psum("),
    ("shape", 3, "culprit: rank 1: collective #3 called psum(axes=('i',), shape=4,"),
    ("dtype", 3, "culprit: rank 1: collective #3 called psum(axes=('i',), shape=2, dtype=float32)"),
    ("op", 3, "culprit: rank 1: collective #3 called pmax("),
    ("groups", 4, "culprit: rank 1: collective #3 called psum(axes=('i',), shape=2, dtype=float64, "
                  "groups=[[0, 1], [2, 3]]) where ranks 0, 2, 3 called psum("),
    ("perm", 3, "culprit: rank 1: collective #3 called ppermute(axes=('i',), shape=2, dtype=float64, "
                "perm=[[0, 2], [1, 0], [2, 1]]) where ranks 0, 2 called ppermute("),
    ("hang", 3, "culprit: rank 1 never arrived (dumped: SIGTERM); the others waited for it in "
                "collective #3 psum("),
    ("sigkill", 3, "culprit: rank 1 left no dump (killed, stopped or crashed); the others waited "
                   "for it in collective #3 psum("),
    ("sigterm", 3, "culprit: rank 1 never arrived (dumped: SIGTERM); the others waited for it in "
                   "collective #3 psum("),
    ("sigstop", 3, "culprit: rank 1 left no dump (killed, stopped or crashed); the others waited "
                   "for it in collective #3 psum("),
    ("early_exit", 3, "culprit: rank 1 left early (dumped: exited); the others waited for it in "
                      "collective #3 psum("),
    ("extra", 3, "culprit: rank 1 ran collective #4 psum("),
]


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory):
    """Every job of the table, three at a time (most of a job's time is waiting for deadlines):
    {mode: what _run returns}."""
    def one(fault):
        return fault[0], _run(fault[0], fault[1], tmp_path_factory.mktemp(fault[0]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, FAULTS))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode, n, first_line", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_ends_the_job_and_the_analysis_names_the_culprit(fault_runs, mode, n, first_line):
    err, seconds, left, dumps = fault_runs[mode]
    assert not left, f"processes left behind: {left}"
    assert seconds < DEADLINE + 5 + 1, seconds
    report = flight_recorder.analyze(flight_recorder.load(dumps),
                                     partial=flight_recorder.partial_dumps(dumps))
    assert report.culprit == [1], str(report)
    assert str(report).splitlines()[0].startswith(first_line), str(report)
    summary = [line for line in err.splitlines() if line.startswith("spmd-run: culprit")]
    assert summary and summary[0].startswith("spmd-run: " + first_line), err[-3000:]


@pytest.mark.timeout(90)
def test_the_cheap_check_cannot_be_turned_off(tmp_path):
    """SPMD_COLLECTIVE_CHECK=0 does not turn a shape mismatch into silently wrong data."""
    err, seconds, left, dumps = _run("shape", 3, tmp_path, env={"SPMD_COLLECTIVE_CHECK": "0"})
    assert not left and "done" not in err
    assert "spmd-run: culprit: rank 1: collective #3 called psum(axes=('i',), shape=4," in err, \
        err[-2000:]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_signal_to_the_launcher_stops_every_process(tmp_path, sig):
    err, seconds, left, dumps = _run("wait", 3, tmp_path, launcher_signal=sig)
    assert not left, f"processes left behind: {left}"
    assert seconds < DEADLINE + 5 + 1, seconds
    if sig != signal.SIGKILL:
        name = signal.Signals(sig).name
        assert f"spmd-run: stopped by {name}" in err, err[-2000:]
        if sig == signal.SIGINT:      # Ctrl-C: one line per rank, no tracebacks
            assert "Traceback" not in err, err[-2000:]
            assert sum("KeyboardInterrupt" in line for line in err.splitlines()) <= 3 + 1, err
        report = flight_recorder.analyze(flight_recorder.load(dumps))
        assert report.culprit == [] and report.lines()[0].startswith("no culprit"), str(report)


# -- the launcher's habits ---------------------------------------------------------------------------

def _spmd_run(*args, env=None, timeout=60):
    full = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "spmd.run", *args], cwd=ROOT, env=full,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.timeout(90)
def test_a_job_across_two_hosts_runs_the_collective_table(tmp_path):
    """Two "hosts" that are both names of this machine: mpiexec places the ranks on both."""
    code, out, err = _spmd_run("--hosts", "localhost,127.0.0.1", "-n", "2",
                               os.path.join(ROOT, "tests", "mp_scripts", "collective_table.py"),
                               env={"SPMD_RUN_DIR": str(tmp_path)}, timeout=80)
    assert code == 0, err[-3000:]
    assert "OK" in out and "[0] OK" in out and "[1] OK" in out, out[-2000:]
    assert os.listdir(tmp_path) == []          # the job's folder is removed after a success


@pytest.mark.timeout(60)
def test_a_command_runs_as_given_and_a_failed_job_keeps_its_folder(tmp_path):
    code, out, err = _spmd_run("-n", "2", sys.executable, "-c",
                               "import os; print('rank', os.environ['SPMD_PROCESS_ID'])",
                               env={"SPMD_RUN_DIR": str(tmp_path)})
    assert code == 0, err[-2000:]
    assert "[0] rank 0" in out and "[1] rank 1" in out
    assert os.listdir(tmp_path) == []
    code, out, err = _spmd_run("-n", "2", "--no-python", sys.executable, "-c",
                               "import sys; sys.exit(3)", env={"SPMD_RUN_DIR": str(tmp_path)})
    assert code == 3
    kept = err.strip().splitlines()[-1]
    assert kept.startswith("spmd-run: the job's files are kept in " + str(tmp_path)), err
    assert os.path.isdir(kept.rsplit(" ", 1)[1])


def test_hosts_come_from_the_flag_a_hostfile_or_slurm(tmp_path, monkeypatch):
    from spmd import run
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# the job's machines\nnode1 slots=2\n\nnode2  # second\n")
    parse = lambda *argv: run._parse([*argv, "-n", "2", "x.py"])
    assert run._hosts(parse("--hosts", "a, b")) == ["a", "b"]
    assert run._hosts(parse("--hostfile", str(hostfile))) == ["node1", "node2"]
    assert run._placement(parse("--hosts", "node1,node2")) == ["-hosts", "node1,node2"]
    assert run._placement(parse("--hosts", "localhost,127.0.0.1"))[:2] == ["-launcher", "fork"]
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    assert run._placement(parse()) == ["-launcher", "fork"]
    with pytest.raises(SystemExit):
        parse("--hostfile", str(tmp_path / "missing"))


@pytest.mark.parametrize("argv, expected", [
    (["train.py", "--lr", "1"], [sys.executable, "train.py", "--lr", "1"]),
    (["python", "train.py"], ["python", "train.py"]),
    (["python3.11", "-u", "train.py"], ["python3.11", "-u", "train.py"]),
    (["--no-python", "train.py"], ["train.py"]),
    (["-m", "pkg.train"], [sys.executable, "-m", "pkg.train"]),
])
def test_what_each_rank_runs(argv, expected):
    from spmd import run
    assert run._command(run._parse(["-n", "2", *argv])) == expected
