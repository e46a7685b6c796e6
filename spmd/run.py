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
    """In the child: get SIGKILL when the supervising process dies, so no rank is orphaned."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# What mpiexec (hydra) prints after a rank fails; spmd-run says it in one line instead.
_HYDRA_NOISE = (b"=====", b"=   ", b"YOUR APPLICATION TERMINATED", b"This typically refers",
                b"Please see the FAQ")


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

    def __init__(self, args, attempt: int):
        self.args = args
        self.run_dir = tempfile.mkdtemp(prefix="spmd-run-")
        self.status_dir = os.path.join(self.run_dir, "status")
        os.makedirs(self.status_dir)
        env = dict(os.environ)
        env.update(SPMD_NUM_PROCESSES=str(args.n), SPMD_BACKEND=args.backend,
                   SPMD_RESTART_COUNT=str(attempt), SPMD_RUN_DIR=self.run_dir,
                   PYTHONUNBUFFERED="1")
        env.setdefault("SPMD_FLIGHT_RECORDER_DIR", os.path.join(self.run_dir, "flight-recorder"))
        self.recorder_dir = env["SPMD_FLIGHT_RECORDER_DIR"]
        script = [sys.executable, *(["-m"] if args.module else []), args.script, *args.script_args]
        self.ranks: list[_Rank] = []
        self.launcher = None
        if args.backend == "mpi":
            # Each rank runs this file alone (stdlib only: no need to import all of spmd), by
            # runpy so that spmd/ does not land on sys.path and shadow the stdlib's `array`.
            boot = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')")
            # -launcher fork: one host, so no ssh (sandboxes and containers often lack it).
            cmd = [_mpiexec(), "-launcher", "fork", "-n", str(args.n), sys.executable, "-c", boot,
                   os.path.abspath(__file__), "--_rank", self.status_dir, "--", *script]
            self.launcher = subprocess.Popen(cmd, env=env, start_new_session=True,
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
        if self.launcher is not None:
            if self.launcher.poll() is None:
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
        dumps = [f for f in os.listdir(self.recorder_dir)] if os.path.isdir(self.recorder_dir) else []
        more = (f"; flight recorder dumps in {self.recorder_dir} (python -m spmd.flight_recorder "
                f"{self.recorder_dir})" if dumps else "")
        return code, f"spmd-run: rank {first['rank']} failed first: {first['reason']}{more}"


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
    p.add_argument("script", help="the Python script every process runs")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"-n {args.n}: the number of processes must be at least 1")
    if args.max_restarts < 0:
        p.error(f"--max-restarts {args.max_restarts}: must be 0 or more")
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
    for attempt in range(args.max_restarts + 1):
        job = _Job(args, attempt)
        code, summary = job.watch()
        if code == 0:
            return 0
        print(summary, file=sys.stderr, flush=True)
        if interrupted:
            break
        if attempt < args.max_restarts:
            print(f"spmd-run: restarting the job ({attempt + 1} of {args.max_restarts} restarts)",
                  file=sys.stderr, flush=True)
    return code


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
    rank_proc = _Rank(rank, cmd, env, status_dir, pass_fds=fds)
    proc_box.append(rank_proc)
    code = rank_proc.wait()
    if code != 0:
        # mpiexec kills every rank as soon as this process exits with an error: first give the
        # others SETTLE_S to end on their own (ranks waiting for this one in a collective time
        # out and report it); spmd-run stops them after that.
        deadline = time.monotonic() + SETTLE_S
        n = int(os.environ.get("SPMD_NUM_PROCESSES", "1"))
        while len(_read_statuses(status_dir)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
