"""``spmd-run``: start a multi-process job on this host.

    spmd-run -n 4 train.py --lr 0.1                 # 4 MPI processes (CPU)
    spmd-run -n 2 --backend nccl train.py           # 2 processes, one GPU each
    spmd-run -n 4 --max-restarts 2 train.py         # restart the whole job up to twice
    spmd-run -n 4 -m mypackage.train                # a module, as with python -m
    python -m spmd.run -n 4 train.py                # the same without the console script

Each process gets the environment that ``spmd.distributed.initialize()`` reads
(``SPMD_PROCESS_ID``, ``SPMD_NUM_PROCESSES``, ``SPMD_LOCAL_RANK``, ``SPMD_BACKEND``,
``SPMD_COORDINATOR``, ``SPMD_RESTART_COUNT``, ``SPMD_FLIGHT_RECORDER_DIR``); with the MPI backend
the processes are started by the ``mpiexec`` next to this Python.  Every line of output is
prefixed with its rank.  SIGINT, SIGTERM, SIGUSR1 (dump the flight recorders) and SIGUSR2 are
forwarded.  When a process fails, the others are stopped and ``spmd-run`` exits non-zero with
one line saying which rank failed first and why.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
# After the first rank fails the others get SETTLE_S to end on their own (ranks waiting in the
# same collective time out and say who did not arrive), then SIGTERM (they dump their flight
# recorders), then SIGKILL after GRACE_S more.
SETTLE_S = 2.0
GRACE_S = 2.0
_out_lock = threading.Lock()


def _die_with_parent():
    """In a child (or in this process): get SIGKILL when the parent dies, so nothing is orphaned."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# What mpiexec (hydra) prints after a rank fails; spmd-run says it in one line instead.
_HYDRA_NOISE = (b"=====", b"=   ", b"YOUR APPLICATION TERMINATED", b"This typically refers",
                b"Please see the FAQ", b"[mpiexec@")


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)(:|$)")


def _pump(stream, sink, prefix: bytes, tail=None):
    for line in iter(stream.readline, b""):
        if not prefix and (line.startswith(_HYDRA_NOISE) or not line.strip()):
            continue
        if tail is not None and line.strip():
            tail.append(line.decode(errors="replace").strip())
        with _out_lock:
            sink.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
            sink.flush()
    stream.close()


class _Rank:
    """One process of the job, its output prefixed with its rank, its end written to a status file."""

    def __init__(self, rank: int, cmd: list[str], env: dict, status_dir: str, pass_fds=()):
        self.rank, self.status_dir = rank, status_dir
        self.start = time.time()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent, pass_fds=pass_fds)
        self.tail = collections.deque(maxlen=200)
        prefix = f"[{rank}] ".encode()
        self.pumps = [threading.Thread(target=_pump, args=(self.proc.stdout, sys.stdout.buffer, prefix),
                                       daemon=True),
                      threading.Thread(target=_pump, args=(self.proc.stderr, sys.stderr.buffer, prefix,
                                                           self.tail), daemon=True)]
        for t in self.pumps:
            t.start()

    def wait(self) -> int:
        code = self.proc.wait()
        for t in self.pumps:
            t.join(timeout=5)
        self.write_status(code)
        return code

    def write_status(self, code: int):
        if code < 0:
            name = signal.Signals(-code).name
            reason = f"killed by signal {name}"
        else:
            reason = f"exited with code {code}"
            if code and self.tail:
                raised = [t for t in self.tail if _EXCEPTION_LINE.match(t)]
                last = raised[-1] if raised else self.tail[-1]
                reason += f": {last[:240]}{'...' if len(last) > 240 else ''}"
        status = {"rank": self.rank, "returncode": code, "reason": reason, "pid": self.proc.pid,
                  "start": self.start, "end": time.time()}
        path = os.path.join(self.status_dir, f"rank{self.rank}.json")
        os.makedirs(self.status_dir, exist_ok=True)     # another host: a folder of its own
        with open(path + ".tmp", "w") as f:
            json.dump(status, f)
        os.replace(path + ".tmp", path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec")
    if not found:
        raise SystemExit("spmd-run: --backend mpi needs mpiexec (pip install 'spmd[mpi]' installs "
                         "mpich); none next to this Python or on PATH.")
    return found


def _is_python_source(path: str) -> bool:
    if path.endswith(".py"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return True                  # let Python say that the file is missing
    if b"\0" in head:
        return False                 # a compiled program
    return not head.startswith(b"#!") or b"python" in head.split(b"\n", 1)[0]


def _command(args) -> list[str]:
    """What every rank runs: ``python SCRIPT ARGS``, ``python -m MODULE ARGS``, or a command as
    given (``--no-python``, or a program such as ``python`` or a compiled binary in its place,
    as ``mpirun`` is used: ``spmd-run -n 4 python train.py``)."""
    if args.module:
        return [sys.executable, "-m", args.script, *args.script_args]
    name = os.path.basename(args.script)
    program = (args.no_python or re.fullmatch(r"python[\d.]*", name) is not None
               or (not os.path.exists(args.script) and shutil.which(args.script) is not None)
               or not _is_python_source(args.script))
    return [args.script, *args.script_args] if program else [sys.executable, args.script,
                                                              *args.script_args]


_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}


def _hosts(args) -> list[str]:
    """The hosts of the job: --hosts, else --hostfile, else a SLURM allocation, else none."""
    if args.hosts:
        return [h.strip() for h in args.hosts.split(",") if h.strip()]
    if args.hostfile:
        with open(args.hostfile) as f:
            return [line.split("#")[0].split()[0] for line in f if line.split("#")[0].strip()]
    nodes = os.environ.get("SLURM_JOB_NODELIST")
    if nodes and shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.split() if out.returncode == 0 else []
    return []


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _placement(args) -> list[str]:
    """mpiexec's arguments for where the ranks run.  Hosts that are all names of this machine
    (a test of a many-host job on one machine) are started by fork; other hosts by mpiexec's
    default launcher (ssh, or SLURM's inside an allocation).  No hosts: this machine, by fork
    (sandboxes and containers often have no ssh)."""
    hosts = _hosts(args)
    if not hosts:
        return ["-launcher", "fork"]
    local = all(h in _LOCAL_NAMES for h in hosts)
    return (["-launcher", "fork"] if local else []) + ["-hosts", ",".join(hosts)]


def _read_pids(status_dir: str) -> list[int]:
    """The pids of the ranks' scripts still running (written by each rank's wrapper)."""
    done = set(_read_statuses(status_dir))
    pids = []
    for name in os.listdir(status_dir):
        if name.startswith("rank") and name.endswith(".pid") and int(name[4:-4]) not in done:
            try:
                with open(os.path.join(status_dir, name)) as f:
                    pids.append(int(f.read()))
            except (OSError, ValueError):
                continue
    return pids


def _read_statuses(status_dir: str) -> dict[int, dict]:
    out = {}
    for name in os.listdir(status_dir):
        if name.startswith("rank") and name.endswith(".json"):
            try:
                with open(os.path.join(status_dir, name)) as f:
                    s = json.load(f)
            except (OSError, ValueError):
                continue
            out[s["rank"]] = s
    return out


class _Job:
    """One attempt: N processes, watched until all succeed or the first one fails."""

    def __init__(self, args, attempt: int, job_id: str):
        self.args, self.attempt, self.job_id = args, attempt, job_id
        base = os.environ.get("SPMD_RUN_DIR")       # a shared folder, for jobs across machines
        if base:
            os.makedirs(base, exist_ok=True)
        self.run_dir = tempfile.mkdtemp(prefix="spmd-run-", dir=base or None)
        self.status_dir = os.path.join(self.run_dir, "status")
        os.makedirs(self.status_dir)
        env = dict(os.environ)
        env.update(SPMD_NUM_PROCESSES=str(args.n), SPMD_BACKEND=args.backend,
                   SPMD_LAUNCHER_PID=str(os.getpid()), SPMD_JOB_ID=job_id,
                   SPMD_RESTART_COUNT=str(attempt), SPMD_RUN_DIR=self.run_dir,
                   PYTHONUNBUFFERED="1")
        env.setdefault("SPMD_FLIGHT_RECORDER_DIR", os.path.join(self.run_dir, "flight-recorder"))
        if not _hosts(args):              # every rank on this machine: a share of its cores each
            env.setdefault("SPMD_HOST_THREADS", str(max(1, _cores() // args.n)))
        self.recorder_dir = env["SPMD_FLIGHT_RECORDER_DIR"]
        script = _command(args)
        self.ranks: list[_Rank] = []
        self.launcher = None
        if args.backend == "mpi":
            # Each rank runs this file alone (stdlib only: no need to import all of spmd), by
            # runpy so that spmd/ does not land on sys.path and shadow the stdlib's `array`.
            boot = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')")
            cmd = [_mpiexec(), *_placement(args), "-n", str(args.n), sys.executable, "-c", boot,
                   os.path.abspath(__file__), "--_rank", self.status_dir, "--", *script]
            self.launcher = subprocess.Popen(cmd, env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.pumps = [threading.Thread(target=_pump, args=(self.launcher.stdout, sys.stdout.buffer, b""),
                                           daemon=True),
                          threading.Thread(target=_pump, args=(self.launcher.stderr, sys.stderr.buffer, b""),
                                           daemon=True)]
            for t in self.pumps:
                t.start()
        else:
            env["SPMD_COORDINATOR"] = f"127.0.0.1:{_free_port()}"
            for r in range(args.n):
                self.ranks.append(_Rank(r, script, dict(env, SPMD_PROCESS_ID=str(r),
                                                        SPMD_LOCAL_RANK=str(r)), self.status_dir))
            self.waiters = [threading.Thread(target=r.wait, daemon=True) for r in self.ranks]
            for t in self.waiters:
                t.start()

    def signal(self, sig):
        if self.launcher is not None and self.launcher.poll() is None:
            # Straight to the ranks' processes (each wrapper wrote its script's pid): mpiexec
            # would turn SIGTERM into a kill before the ranks can dump their flight recorders.
            pids = _read_pids(self.status_dir)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if not pids or sig not in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
                                       signal.SIGUSR2):
                self.launcher.send_signal(sig)
        for r in self.ranks:
            if r.proc.poll() is None:
                r.proc.send_signal(sig)

    def _alive(self) -> bool:
        if self.launcher is not None:
            return self.launcher.poll() is None
        return any(t.is_alive() for t in self.waiters)

    def _kill(self):
        if self.launcher is not None:
            try:
                os.killpg(self.launcher.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for r in self.ranks:
            if r.proc.poll() is None:
                r.proc.kill()

    def watch(self) -> tuple[int, str | None]:
        """Wait for the job; returns (exit code, one-line summary of the first failure)."""
        first = None
        failed_at = None
        terminated = False
        while True:
            statuses = _read_statuses(self.status_dir)
            failed = [s for s in statuses.values() if s["returncode"] != 0]
            if failed and first is None:
                first = min(failed, key=lambda s: s["end"])
                failed_at = time.monotonic()
            if not self._alive():
                break
            since = None if failed_at is None else time.monotonic() - failed_at
            if since is not None and since > SETTLE_S and not terminated:
                terminated = True
                self.signal(signal.SIGTERM)
            if since is not None and since > SETTLE_S + GRACE_S:
                self._kill()
            time.sleep(0.05)
        if self.launcher is not None:
            self.launcher.wait()
        for t in getattr(self, "waiters", []) + getattr(self, "pumps", []):
            t.join()
        statuses = _read_statuses(self.status_dir)
        if first is None:
            failed = [s for s in statuses.values() if s["returncode"] != 0]
            if failed:
                first = min(failed, key=lambda s: s["end"])
            elif len(statuses) < self.args.n or (self.launcher and self.launcher.returncode):
                missing = sorted(set(range(self.args.n)) - set(statuses))
                code = self.launcher.returncode if self.launcher else 1
                return code or 1, (f"spmd-run: the launcher exited with code {code} before ranks "
                                   f"{missing} finished")
        if first is None:
            return 0, None
        code = first["returncode"]
        code = 128 - code if code < 0 else code
        return code, self.summary(first)

    def summary(self, first: dict) -> str:
        """One line, the culprit first: what the flight recorders say (the rank that differs,
        raised, died or never arrived, and the collective), then the rank that failed first."""
        failed = f"rank {first['rank']} failed first: {first['reason']}"
        report = _analysis(self.recorder_dir, self.job_id, self.attempt)
        if report is None:
            return f"spmd-run: {failed}"
        return (f"spmd-run: {report.summary}. ({failed}; flight recorder dumps in "
                f"{self.recorder_dir}: python -m spmd.flight_recorder {self.recorder_dir})")

    def cleanup(self, ok: bool):
        """A job that succeeded leaves nothing behind; a failed one keeps its folder (statuses,
        flight-recorder dumps) for a look."""
        if ok:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _analysis(directory: str, job: str, attempt: int):
    """The flight-recorder analysis of this attempt's dumps, or None when there are none."""
    from spmd import flight_recorder      # here: each rank runs this file without the package
    dumps = (flight_recorder.load(directory, job=job, attempt=attempt)
             if os.path.isdir(directory) else {})
    if not dumps:
        return None
    return flight_recorder.analyze(dumps, partial=flight_recorder.partial_dumps(directory))


def _parse(argv):
    p = argparse.ArgumentParser(prog="spmd-run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-processes", dest="n", type=int, required=True,
                   help="number of processes to start on this host")
    p.add_argument("--backend", choices=("mpi", "nccl"), default="mpi",
                   help="mpi: CPU processes under mpiexec (default); nccl: one GPU per process")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart the whole job up to this many times after a failure")
    p.add_argument("-m", "--module", action="store_true",
                   help="run the library module SCRIPT as a script (like python -m)")
    p.add_argument("--no-python", action="store_true",
                   help="SCRIPT is a program to run as it is (found without this flag when it "
                        "is python itself or not Python source: spmd-run -n 4 python x.py)")
    p.add_argument("--hosts", help="comma-separated hosts to spread the processes over (MPI)")
    p.add_argument("--hostfile", help="a file of hosts, one per line (MPI)")
    p.add_argument("script", help="the Python script every process runs (or a program)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"-n {args.n}: the number of processes must be at least 1")
    if args.max_restarts < 0:
        p.error(f"--max-restarts {args.max_restarts}: must be 0 or more")
    if (args.hosts or args.hostfile) and args.backend != "mpi":
        p.error("--hosts/--hostfile: jobs across machines run on the mpi backend")
    if args.hostfile and not os.path.isfile(args.hostfile):
        p.error(f"--hostfile {args.hostfile}: no such file")
    if args.module and args.no_python:
        p.error("-m and --no-python: choose one")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [os.path.abspath(__file__)]:        # started by the runpy line above
        argv = argv[1:]
    if argv[:1] == ["--_rank"]:
        return _rank_main(argv[1], argv[3:])
    args = _parse(argv)
    interrupted = []
    job = None

    def forward(sig, frame):
        if sig in (signal.SIGINT, signal.SIGTERM):
            interrupted.append(sig)
        if job is not None:
            job.signal(sig)
    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = 0
    job_id = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
    for attempt in range(args.max_restarts + 1):
        job = _Job(args, attempt, job_id)
        code, summary = job.watch()
        job.cleanup(code == 0)
        if code == 0:
            return 0
        if interrupted:
            name = signal.Signals(interrupted[0]).name
            summary = f"spmd-run: stopped by {name}: every rank was asked to stop"
        print(summary, file=sys.stderr, flush=True)
        print(f"spmd-run: the job's files are kept in {job.run_dir}", file=sys.stderr, flush=True)
        if interrupted:
            break
        if attempt < args.max_restarts:
            print(f"spmd-run: restarting the job ({attempt + 1} of {args.max_restarts} restarts)",
                  file=sys.stderr, flush=True)
    return code


def _watch_launcher(proc, period=0.25):
    """Under mpiexec: kill the rank when spmd-run is gone (killed by any signal, SIGKILL too).
    mpiexec and its proxies live in their own session and do not always notice."""
    launcher = int(os.environ.get("SPMD_LAUNCHER_PID", "0"))
    while launcher and proc.poll() is None:
        try:
            os.kill(launcher, 0)
        except ProcessLookupError:
            proc.kill()
            return
        except PermissionError:
            pass
        time.sleep(period)


def _rank_main(status_dir: str, cmd: list[str]) -> int:
    """One rank under mpiexec: run the script, prefix its output, record how it ended."""
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    env = dict(os.environ, SPMD_PROCESS_ID=str(rank),
               SPMD_LOCAL_RANK=os.environ.get("MPI_LOCALRANKID",
                                              os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", str(rank))))
    # The script talks to the process manager through the inherited PMI socket.
    fds = tuple(int(os.environ[k]) for k in ("PMI_FD",) if k in os.environ)
    proc_box = []

    def forward(sig, frame):
        if proc_box and proc_box[0].proc.poll() is None:
            proc_box[0].proc.send_signal(sig)
    for sig in FORWARDED:
        signal.signal(sig, forward)
    _die_with_parent()           # mpiexec's proxy died
    rank_proc = _Rank(rank, cmd, env, status_dir, pass_fds=fds)
    proc_box.append(rank_proc)
    try:
        with open(os.path.join(status_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(rank_proc.proc.pid))
    except OSError:
        pass                     # another host's folder: spmd-run signals through mpiexec
    threading.Thread(target=_watch_launcher, args=(rank_proc.proc,), daemon=True).start()
    code = rank_proc.wait()
    if code != 0:
        # mpiexec kills every rank as soon as this process exits with an error: first give the
        # others time to end on their own (ranks waiting for this one in a collective time out
        # and report it) and to dump when spmd-run stops them (SETTLE_S, then GRACE_S).
        deadline = time.monotonic() + SETTLE_S + GRACE_S
        n = int(os.environ.get("SPMD_NUM_PROCESSES", "1"))
        while len(_read_statuses(status_dir)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
