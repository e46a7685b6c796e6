"""The flight recorder: the last collectives of this process, dumped when something goes wrong.

Every collective a multi-process communicator runs is one entry of a ring buffer (size
``SPMD_FLIGHT_RECORDER_SIZE``, default 2000): sequence number, op, mesh axes, the ranks of its
group, shape, dtype, bytes, state (``started`` / ``completed`` / ``timeout`` / ``mismatch`` /
``error``) and wall-clock start and end.  The buffer is written as JSON to
``$SPMD_FLIGHT_RECORDER_DIR/rank<r>.json`` (default: a ``spmd-flight-recorder`` folder in the
temp dir) on a collective timeout or error, on an uncaught exception, and on ``SIGUSR1``.

The analyzer reads every rank's dump and says which rank is behind and the first call where
the ranks disagree (op, shape or order)::

    python -m spmd.flight_recorder DIR              # the report
    python -m spmd.flight_recorder DIR --trace t.json   # Chrome / Perfetto timeline
"""
from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import glob
import json
import os
import signal
import sys
import tempfile
import time
import traceback

from . import runtime
from .errors import CollectiveMismatchError

DEFAULT_SIZE = 2000


def dump_dir() -> str:
    return os.environ.get("SPMD_FLIGHT_RECORDER_DIR") or os.path.join(
        tempfile.gettempdir(), "spmd-flight-recorder")


class FlightRecorder:
    """A ring buffer of this process's collectives."""

    def __init__(self, size: int | None = None):
        size = size or runtime.int_setting("SPMD_FLIGHT_RECORDER_SIZE", DEFAULT_SIZE, most=10**7,
                                           what="the number of collectives the recorder keeps")
        self.entries: collections.deque = collections.deque(maxlen=size)
        self.seq = 0

    def start(self, op: str, axes, ranks, shape, dtype, nbytes: int) -> dict:
        return self.begin({"op": op, "axes": list(axes), "ranks": list(ranks),
                           "shape": list(shape), "dtype": str(dtype), "nbytes": int(nbytes)})

    def begin(self, call: dict) -> dict:
        """``start`` for a call whose fields (op, axes, ranks, shape, dtype, nbytes, and groups
        or perm) are in ``call``, made once (its lists are shared, never changed)."""
        entry = call.copy()
        entry["seq"] = self.seq
        entry["state"], entry["start"], entry["end"] = "started", time.time(), None
        self.seq += 1
        self.entries.append(entry)
        return entry

    @staticmethod
    def finish(entry: dict, state: str = "completed"):
        entry["state"] = state
        entry["end"] = time.time()

    def dump(self, reason: str, directory: str | None = None) -> str:
        st = runtime.state()
        directory = directory or dump_dir()
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"rank{st.process_index}.json")
        data = {"rank": st.process_index, "world_size": st.process_count, "pid": os.getpid(),
                "backend": st.backend, "reason": reason, "time": time.time(),
                "job": os.environ.get("SPMD_JOB_ID"),
                "attempt": int(os.environ.get("SPMD_RESTART_COUNT", "0") or 0),
                "entries": list(self.entries)}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
        return path


_recorder = FlightRecorder()


def recorder() -> FlightRecorder:
    return _recorder


def dump(reason: str) -> str:
    return _recorder.dump(reason)


def dump_quietly(reason: str) -> str | None:
    """Dump, or None when the dump cannot be written (the error being reported matters more)."""
    try:
        return dump(reason)
    except OSError:
        return None



# What every rank of a collective's group must pass alike: the field of a flight-recorder entry
# (and of a call's signature) and how the user spells it. The communicators' check, its error
# and the analysis of dumps all compare these.
CALL_FIELDS = {"op": "op", "axes": "axes", "shape": "shape", "dtype": "dtype",
               "groups": "axis_index_groups", "perm": "perm"}
_CALL = 4                       # the first fields name the call; the rest are its arguments
ARGUMENT_FIELDS = tuple(CALL_FIELDS)[_CALL:]


def call_key(call: dict) -> tuple:
    """The fields of ``call`` that must match across ranks, JSON-normal (tuples as lists)."""
    return tuple(json.dumps(call.get(f), sort_keys=True, default=str) for f in CALL_FIELDS)


def check_same_calls(entry: dict, ranks, theirs: dict, *, who: str = "",
                     differ: bool = False) -> None:
    """Raise ``CollectiveMismatchError`` (after recording and dumping) unless every rank of the
    group sent the same call (``CALL_FIELDS``) for collective ``entry``. ``theirs``: {rank:
    signature}; ``who``: this rank's call, to start the message; ``differ``: the ranks already
    know that they disagree (their digests differ), so raise in any case."""
    if not differ:             # the usual case, cheap: every rank sent the same values
        calls = [tuple(s.get(f) for f in CALL_FIELDS) for s in theirs.values()]
        if all(c == calls[0] for c in calls):
            return
    keys = {r: call_key(s) for r, s in theirs.items()}
    if len(set(keys.values())) <= 1 and not differ:
        return
    recorder().finish(entry, "mismatch")
    path = dump_quietly(f"mismatch at collective #{entry['seq']}")
    if len({k[:_CALL] for k in keys.values()}) > 1:          # another collective altogether
        calls = "; ".join(f"rank {r}: #{s['seq']} {s['op']}(axes={tuple(s['axes'])}, "
                          f"shape={tuple(s['shape'])}, dtype={s['dtype']}"
                          + (f", group={s['ranks']}" if "ranks" in s else "") + ")"
                          for r, s in sorted(theirs.items()))
        raise CollectiveMismatchError(
            f"the ranks of group {list(ranks)} called different collectives at the same "
            f"point: {calls}. Every process must run the same collectives in the same order "
            f"(look for a branch on process_index() or on data). Flight recorder: {path}")
    for i, spelled in enumerate(list(CALL_FIELDS.values())[_CALL:], _CALL):
        values = {r: k[i] for r, k in keys.items()}
        if len(set(values.values())) > 1:
            what = (f"{_odd_one_out(values, spelled)}. Every process must pass the same "
                    f"{spelled}")
            break
    else:
        what = f"the ranks' calls differ in an argument too long to show: {theirs}"
    raise CollectiveMismatchError(f"{who}: {what} (look for a branch on process_index() or on "
                                  f"data). Flight recorder: {path}")


def _odd_one_out(values: dict, spelled: str) -> str:
    """``values``: {rank: argument as JSON}; the ranks that differ from the most common value."""
    counts = {}
    for r in sorted(values):
        counts.setdefault(values[r], []).append(r)
    common = max(counts.values(), key=len)
    odd = [r for r in sorted(values) if r not in common]
    return (f"{_ranks(odd)} passed {spelled}={values[odd[0]]} where {_ranks(common)} passed "
            f"{spelled}={values[common[0]]}")


_installed = False
_exiting = False


def _dump_at_exit():
    global _exiting
    _exiting = True
    if _recorder.entries:
        dump_quietly("exited")


def install_signal_handler():
    """Dump on SIGUSR1 and on an uncaught exception (called by ``distributed.initialize``).

    After an uncaught exception in a multi-process job the process exits at once: a normal exit
    would wait in ``MPI_Finalize`` for peers that are themselves waiting for this process, and
    the job would only end when their collectives time out."""
    global _installed
    if _installed:
        return
    _installed = True
    def on_sigterm(signum, frame):
        # Stopped by the launcher because another rank failed: leave a dump, then die as asked
        # (a rank stopped while it waits for the others at exit keeps saying that it exited).
        if _recorder.entries and not _exiting:
            dump("SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    try:
        signal.signal(signal.SIGUSR1, lambda signum, frame: dump("SIGUSR1"))
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:          # not the main thread: no signal handler, the rest still works
        pass
    if os.environ.get("SPMD_RUN_DIR") and runtime.process_count() > 1:
        # Under spmd-run every rank leaves its last collectives at a normal exit too, so that a
        # rank that left early (or one that ran an extra collective) shows in the analysis.
        atexit.register(_dump_at_exit)
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        # This rank is failing on its own: finish the dump and the traceback even if the launcher,
        # told of another rank's failure, asks it to stop meanwhile (it kills after a grace time).
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:
            pass
        if _recorder.entries or runtime.process_count() > 1:
            try:
                dump(f"uncaught {kind.__name__}: {value}")
            except OSError:
                pass
        if issubclass(kind, KeyboardInterrupt) and runtime.process_count() > 1:
            # Ctrl-C reaches every rank: one line each, not N tracebacks.
            frame = traceback.extract_tb(tb)[-1] if tb is not None else None
            where = f" in {frame.name} ({frame.filename}:{frame.lineno})" if frame else ""
            sys.stderr.write(f"KeyboardInterrupt{where}\n")
        else:
            previous(kind, value, tb)
        if runtime.process_count() > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
    sys.excepthook = excepthook


# ---------------------------------------------------------------------------------------------
# analysis of the dumps of every rank
# ---------------------------------------------------------------------------------------------

_PEER_ERRORS = ("CollectiveTimeoutError", "CollectiveMismatchError", "ProcessExitedError",
                "KeyboardInterrupt", "SIGINT",
                "SIGTERM", "exited")


def load(directory: str, *, all_attempts: bool = False, job: str | None = None,
         attempt: int | None = None) -> dict[int, dict]:
    """Every rank's dump in ``directory``: {rank: dump}.  Only the dumps of one job attempt are
    kept: ``job``/``attempt`` if given, else the newest (``all_attempts``: every dump);
    unreadable files are left out."""
    dumps = {}
    for path in glob.glob(os.path.join(directory, "rank*.json")):
        try:
            with open(path) as f:
                d = json.load(f)
            dumps[int(d["rank"])] = d
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if dumps and not all_attempts:
        newest = max(dumps.values(), key=lambda d: d.get("time", 0))
        run = (newest.get("job"), newest.get("attempt")) if job is None else (job, attempt)
        dumps = {r: d for r, d in dumps.items() if (d.get("job"), d.get("attempt")) == run}
    return dict(sorted(dumps.items()))


def partial_dumps(directory: str) -> list[int]:
    """Ranks that were killed while writing their dump (only a ``.tmp`` file is left)."""
    ranks = set()
    for path in glob.glob(os.path.join(directory, "rank*.json.*.tmp")):
        name = os.path.basename(path)
        try:
            ranks.add(int(name[4:name.index(".")]))
        except ValueError:
            continue
    return sorted(ranks)


def _call(e: dict) -> str:
    shape = "x".join(str(s) for s in e["shape"]) or "scalar"
    extra = "".join(f", {k}={e[k]}" for k in ("groups", "perm") if e.get(k) is not None)
    return f"{e['op']}(axes={tuple(e['axes'])}, shape={shape}, dtype={e['dtype']}{extra})"


def _ranks(rs) -> str:
    return f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))}"


@dataclasses.dataclass
class Report:
    ranks: list[int]
    missing: list[int]                    # ranks of the job that wrote no dump
    last: dict[int, dict | None]          # each rank's latest entry
    behind: list[int]                     # ranks with no dump, else those whose latest is oldest
    disagreement: dict | None             # {"seq", "calls": {rank: call}, "odd": [ranks]}
    reasons: dict[int, str] = dataclasses.field(default_factory=dict)   # why each rank dumped
    partial: list[int] = dataclasses.field(default_factory=list)        # killed while dumping
    ahead: list[int] = dataclasses.field(default_factory=list)          # ran collectives no other did
    culprit: list[int] = dataclasses.field(default_factory=list)
    summary: str = ""                     # the first line: the culprit rank(s) and the op

    def lines(self) -> list[str]:
        out = [self.summary, f"flight recorder: {len(self.ranks)} rank dump(s) {self.ranks}"]
        for r in self.missing:
            why = ("killed while writing it" if r in self.partial else
                   "killed or stopped before it could write one, or it never started")
            out.append(f"  rank {r}: no dump ({why})")
        for r in self.ranks:
            e = self.last[r]
            out.append(f"  rank {r}: " + ("no collectives" if e is None else
                                          f"last #{e['seq']} {_call(e)} {e['state']}")
                       + (f"; dumped: {self.reasons[r]}" if self.reasons.get(r) else ""))
        if self.behind:
            seqs = {r: (self.last[r]["seq"] if self.last[r] else -1) for r in self.ranks}
            ahead = max(seqs.values()) if seqs else -1
            where = ("no dump" if self.behind[0] in self.missing else f"at #{seqs[self.behind[0]]}")
            out.append(f"behind: {_ranks(self.behind)} ({where}; others reached #{ahead})")
        else:
            out.append("behind: no rank (all reached the same collective)")
        if self.disagreement:
            d = self.disagreement
            many = len(d["odd"]) > 1
            out.append(f"first disagreement at collective #{d['seq']}: {_ranks(d['odd'])} "
                       f"differ{'' if many else 's'} from the rest")
            for r, call in sorted(d["calls"].items()):
                out.append(f"  rank {r}: {call}")
        else:
            out.append("no disagreement: every rank ran the same collectives in the same order")
        return out

    def __str__(self):
        return "\n".join(self.lines())


def _first_failure(reasons: dict[int, str], dumps: dict[int, dict]) -> list[int]:
    """Ranks that failed on their own (an uncaught error that is not a peer's fault), earliest first."""
    own = [r for r, why in reasons.items()
           if why.startswith("uncaught") and not any(p in why for p in _PEER_ERRORS)]
    return sorted(own, key=lambda r: dumps[r].get("time", 0))[:1]


def analyze(dumps: dict[int, dict], *, partial=()) -> Report:
    ranks = sorted(dumps)
    world = max([d.get("world_size", 1) for d in dumps.values()] + [len(ranks)])
    missing = [r for r in range(world) if r not in dumps]
    by_seq = {r: {e["seq"]: e for e in dumps[r]["entries"]} for r in ranks}
    last = {r: (dumps[r]["entries"][-1] if dumps[r]["entries"] else None) for r in ranks}
    reasons = {r: dumps[r].get("reason", "") for r in ranks}
    seqs = {r: (last[r]["seq"] if last[r] else -1) for r in ranks}
    behind, ahead = [], []
    if missing and ranks:
        # A rank with no dump never reached a collective that failed (it hung elsewhere, or died).
        behind = missing
    elif len(set(seqs.values())) > 1:
        low, high = min(seqs.values()), max(seqs.values())
        behind = [r for r in ranks if seqs[r] == low]
        top = [r for r in ranks if seqs[r] == high]
        if len(top) < len(ranks) - len(top) and all(reasons[r] == "exited" for r in ranks
                                                    if r not in top):
            behind, ahead = [], top          # the others finished: these ran extra collectives
    disagreement = None
    common = sorted(set().union(*[set(s) for s in by_seq.values()])) if ranks else []
    for s in common:
        present = {r: by_seq[r][s] for r in ranks if s in by_seq[r]}
        if len(present) < 2:
            continue
        groups = collections.defaultdict(list)
        for r, e in present.items():
            groups[call_key(e)].append(r)   # not the group's ranks: they differ by design
        if len(groups) > 1:
            smallest = min(len(g) for g in groups.values())
            odd = sorted(r for g in groups.values() if len(g) == smallest for r in g)
            if smallest * len(groups) == len(present):       # a tie: no majority to compare to
                odd = sorted(present)
            disagreement = {"seq": s, "calls": {r: _call(e) for r, e in present.items()}, "odd": odd}
            break
    report = Report(ranks, missing, last, behind, disagreement, reasons,
                    [r for r in partial if r in missing], ahead)
    report.culprit, report.summary = _blame(report, dumps)
    return report


def _waiting_in(report: Report, culprit) -> str:
    """The collective the other ranks were in when the culprit failed them."""
    others = [report.last[r] for r in report.ranks if r not in culprit and report.last[r]]
    if not others:
        return ""
    e = max(others, key=lambda e: e["seq"])
    return f"; the others waited for it in collective #{e['seq']} {_call(e)}"


def _blame(report: Report, dumps) -> tuple[list[int], str]:
    if report.disagreement:
        d = report.disagreement
        odd = d["odd"]
        rest = sorted(set(d["calls"]) - set(odd))
        theirs = f" where {_ranks(rest)} called {d['calls'][rest[0]]}" if rest else ""
        return odd, (f"culprit: {_ranks(odd)}: collective #{d['seq']} called "
                     f"{d['calls'][odd[0]]}{theirs}")
    raised = _first_failure(report.reasons, dumps)
    if raised:
        r = raised[0]
        return raised, f"culprit: rank {r} failed: {report.reasons[r]}{_waiting_in(report, raised)}"
    if report.missing and report.ranks:
        why = ("was killed while writing its flight-recorder dump" if report.missing[0] in report.partial
               else "left no dump (killed, stopped or crashed)")
        return report.missing, f"culprit: {_ranks(report.missing)} {why}{_waiting_in(report, report.missing)}"
    if report.ahead:
        e = report.last[report.ahead[0]]
        return report.ahead, (f"culprit: {_ranks(report.ahead)} ran collective #{e['seq']} {_call(e)} "
                              f"after every other rank had finished")
    if report.behind:
        r = report.behind[0]
        stopped = report.reasons.get(r, "")
        how = "left early" if stopped == "exited" else "never arrived"
        return report.behind, (f"culprit: {_ranks(report.behind)} {how} (dumped: {stopped or '?'})"
                               f"{_waiting_in(report, report.behind)}")
    why = sorted(set(report.reasons.values()))
    return [], f"no culprit: every rank reached the same collective (dumped: {', '.join(why)})"


def chrome_trace(dumps: dict[int, dict]) -> dict:
    """The collectives of every rank in the Chrome trace event format (open it in
    https://ui.perfetto.dev or chrome://tracing): one process per rank, one track per axes."""
    events = []
    for r, d in sorted(dumps.items()):
        events.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"rank {r}"}})
        for e in d["entries"]:
            end = e["end"] if e["end"] is not None else d["time"]
            events.append({"name": e["op"], "cat": "collective", "ph": "X", "pid": r,
                           "tid": ",".join(e["axes"]) or "-", "ts": e["start"] * 1e6,
                           "dur": max(end - e["start"], 0) * 1e6,
                           "args": {k: e[k] for k in ("seq", "shape", "dtype", "nbytes", "state",
                                                      "ranks")}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spmd.flight_recorder",
                                     description="Read every rank's flight-recorder dump and "
                                                 "report the rank that is behind and the first "
                                                 "collective where the ranks disagree.")
    parser.add_argument("directory", nargs="?", default=dump_dir())
    parser.add_argument("--trace", metavar="OUT.json",
                        help="also write the collective timeline in the Chrome/Perfetto format")
    args = parser.parse_args(argv)
    dumps = load(args.directory)
    if not dumps:
        print(f"no flight-recorder dumps (rank*.json) in {args.directory}", file=sys.stderr)
        return 2
    print(analyze(dumps, partial=partial_dumps(args.directory)))
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(chrome_trace(dumps), f)
        print(f"trace: {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
