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
import collections
import dataclasses
import glob
import json
import os
import signal
import sys
import tempfile
import time

from . import runtime
from .errors import CollectiveMismatchError

DEFAULT_SIZE = 2000


def dump_dir() -> str:
    return os.environ.get("SPMD_FLIGHT_RECORDER_DIR") or os.path.join(
        tempfile.gettempdir(), "spmd-flight-recorder")


class FlightRecorder:
    """A ring buffer of this process's collectives."""

    def __init__(self, size: int | None = None):
        size = size or int(os.environ.get("SPMD_FLIGHT_RECORDER_SIZE", DEFAULT_SIZE))
        self.entries: collections.deque = collections.deque(maxlen=size)
        self.seq = 0

    def start(self, op: str, axes, ranks, shape, dtype, nbytes: int) -> dict:
        entry = {"seq": self.seq, "op": op, "axes": list(axes), "ranks": list(ranks),
                 "shape": list(shape), "dtype": str(dtype), "nbytes": int(nbytes),
                 "state": "started", "start": time.time(), "end": None}
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



def check_same_calls(entry: dict, ranks, theirs: dict) -> None:
    """Raise ``CollectiveMismatchError`` (after recording and dumping) unless every rank of the
    group sent the same call signature (op, axes, shape, dtype, group) for collective ``entry``."""
    key = lambda s: (s["op"], tuple(s["axes"]), tuple(s["shape"]), s["dtype"], tuple(s.get("ranks", ())))
    if len({key(s) for s in theirs.values()}) <= 1:
        return
    recorder().finish(entry, "mismatch")
    calls = "; ".join(f"rank {r}: #{s['seq']} {s['op']}(axes={tuple(s['axes'])}, "
                      f"shape={tuple(s['shape'])}, dtype={s['dtype']}"
                      + (f", group={s['ranks']}" if "ranks" in s else "") + ")"
                      for r, s in sorted(theirs.items()))
    path = dump_quietly(f"mismatch at collective #{entry['seq']}")
    raise CollectiveMismatchError(
        f"the ranks of group {list(ranks)} called different collectives at the same "
        f"point: {calls}. Every process must run the same collectives in the same order "
        f"(look for a branch on process_index() or on data). Flight recorder: {path}")


_installed = False


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
        # Stopped by the launcher because another rank failed: leave a dump, then die as asked.
        if _recorder.entries:
            dump("SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    try:
        signal.signal(signal.SIGUSR1, lambda signum, frame: dump("SIGUSR1"))
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:          # not the main thread: no signal handler, the rest still works
        pass
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        # This rank is failing on its own: finish the dump and the traceback even if the launcher,
        # told of another rank's failure, asks it to stop meanwhile (it kills after a grace time).
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        except ValueError:
            pass
        if _recorder.entries:
            try:
                dump(f"uncaught {kind.__name__}: {value}")
            except OSError:
                pass
        previous(kind, value, tb)
        if runtime.process_count() > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
    sys.excepthook = excepthook


# ---------------------------------------------------------------------------------------------
# analysis of the dumps of every rank
# ---------------------------------------------------------------------------------------------

def load(directory: str) -> dict[int, dict]:
    """Every rank's dump in ``directory``: {rank: dump}."""
    dumps = {}
    for path in glob.glob(os.path.join(directory, "rank*.json")):
        with open(path) as f:
            d = json.load(f)
        dumps[int(d["rank"])] = d
    return dict(sorted(dumps.items()))


def _call(e: dict) -> str:
    shape = "x".join(str(s) for s in e["shape"]) or "scalar"
    return f"{e['op']}(axes={tuple(e['axes'])}, shape={shape}, dtype={e['dtype']})"


def _signature(e: dict):
    return (e["op"], tuple(e["axes"]), tuple(e["shape"]), e["dtype"])


@dataclasses.dataclass
class Report:
    ranks: list[int]
    missing: list[int]                    # ranks of the job that wrote no dump
    last: dict[int, dict | None]          # each rank's latest entry
    behind: list[int]                     # ranks with no dump, else those whose latest is oldest
    disagreement: dict | None             # {"seq", "calls": {rank: call}, "odd": [ranks]}

    def lines(self) -> list[str]:
        out = [f"flight recorder: {len(self.ranks)} rank dump(s) {self.ranks}"]
        if self.missing:
            out.append(f"  ranks {self.missing} wrote no dump (dead, or stuck outside a collective)")
        for r in self.ranks:
            e = self.last[r]
            out.append(f"  rank {r}: " + ("no collectives" if e is None else
                                          f"last #{e['seq']} {_call(e)} {e['state']}"))
        if self.behind:
            seqs = {r: (self.last[r]["seq"] if self.last[r] else -1) for r in self.ranks}
            ahead = max(seqs.values())
            where = ("no dump" if self.behind[0] in self.missing else f"at #{seqs[self.behind[0]]}")
            out.append(f"behind: rank{'s' if len(self.behind) > 1 else ''} "
                       f"{', '.join(map(str, self.behind))} ({where}; others reached #{ahead})")
        else:
            out.append("behind: no rank (all reached the same collective)")
        if self.disagreement:
            d = self.disagreement
            many = len(d["odd"]) > 1
            out.append(f"first disagreement at collective #{d['seq']}: rank{'s' if many else ''} "
                       f"{', '.join(map(str, d['odd']))} differ{'' if many else 's'} from the rest")
            for r, call in sorted(d["calls"].items()):
                out.append(f"  rank {r}: {call}")
        else:
            out.append("no disagreement: every rank ran the same collectives in the same order")
        return out

    def __str__(self):
        return "\n".join(self.lines())


def analyze(dumps: dict[int, dict]) -> Report:
    ranks = sorted(dumps)
    world = max([d.get("world_size", 1) for d in dumps.values()] + [len(ranks)])
    missing = [r for r in range(world) if r not in dumps]
    by_seq = {r: {e["seq"]: e for e in dumps[r]["entries"]} for r in ranks}
    last = {r: (dumps[r]["entries"][-1] if dumps[r]["entries"] else None) for r in ranks}
    seqs = {r: (last[r]["seq"] if last[r] else -1) for r in ranks}
    behind = []
    if missing and ranks:
        # A rank with no dump never reached a collective that failed (it hung elsewhere, or died).
        behind = missing
    elif len(set(seqs.values())) > 1:
        low = min(seqs.values())
        behind = [r for r in ranks if seqs[r] == low]
    disagreement = None
    common = sorted(set().union(*[set(s) for s in by_seq.values()])) if ranks else []
    for s in common:
        present = {r: by_seq[r][s] for r in ranks if s in by_seq[r]}
        if len(present) < 2:
            continue
        groups = collections.defaultdict(list)
        for r, e in present.items():
            groups[_signature(e)].append(r)
        if len(groups) > 1:
            smallest = min(len(g) for g in groups.values())
            odd = sorted(r for g in groups.values() if len(g) == smallest for r in g)
            if smallest * len(groups) == len(present):       # a tie: no majority to compare to
                odd = sorted(present)
            disagreement = {"seq": s, "calls": {r: _call(e) for r, e in present.items()}, "odd": odd}
            break
    return Report(ranks, missing, last, behind, disagreement)


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
    print(analyze(dumps))
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(chrome_trace(dumps), f)
        print(f"trace: {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
