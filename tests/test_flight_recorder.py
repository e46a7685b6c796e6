"""The flight recorder's ring buffer, its dumps, the analyzer and the Chrome trace export, on
dumps written by hand (the multi-process tests check them on real jobs)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from spmd import flight_recorder as fr
from spmd.communicators.frame import CollectiveFrame, signature_check
from spmd.errors import (CollectiveMismatchError, CollectiveTimeoutError, ProcessExitedError,
                         SpmdError)
from spmd.runtime import collective_timeout


def entry(seq, op="psum", axes=("i",), shape=(4,), dtype="float32", state="completed",
          start=100.0, ranks=(0, 1, 2)):
    return {"seq": seq, "op": op, "axes": list(axes), "ranks": list(ranks), "shape": list(shape),
            "dtype": dtype, "nbytes": 16, "state": state, "start": start + seq,
            "end": None if state == "started" else start + seq + 0.5}


def write_dumps(tmp_path, per_rank, world=None, reasons=None, job="j1", attempt=0, time=200.0):
    for r, entries in per_rank.items():
        (tmp_path / f"rank{r}.json").write_text(json.dumps({
            "rank": r, "world_size": world or len(per_rank), "pid": 1000 + r, "backend": "mpi",
            "reason": (reasons or {}).get(r, "test"), "time": time + r * 1e-3, "job": job,
            "attempt": attempt, "entries": entries}))
    return str(tmp_path)


def test_ring_buffer_keeps_the_last_n_and_dumps(tmp_path):
    rec = fr.FlightRecorder(size=3)
    for i in range(5):
        e = rec.start("psum", ("i",), (0, 1), (2, 3), "float32", 24)
        rec.finish(e, "completed" if i < 4 else "timeout")
    assert [e["seq"] for e in rec.entries] == [2, 3, 4]
    assert rec.entries[-1]["state"] == "timeout" and rec.entries[-1]["end"] is not None
    path = rec.dump("because", str(tmp_path))
    d = json.loads(open(path).read())
    assert d["reason"] == "because" and [e["seq"] for e in d["entries"]] == [2, 3, 4]
    assert fr.load(str(tmp_path))[0]["entries"][0]["shape"] == [2, 3]


def test_analyzer_names_the_rank_that_is_behind(tmp_path):
    d = write_dumps(tmp_path, {0: [entry(0), entry(1), entry(2, state="timeout")],
                               1: [entry(0), entry(1)],
                               2: [entry(0), entry(1), entry(2, state="timeout")]})
    report = fr.analyze(fr.load(d))
    assert report.behind == [1] and report.disagreement is None and report.missing == []
    text = str(report)
    assert "behind: rank 1 (at #1; others reached #2)" in text
    assert "no disagreement" in text


def test_analyzer_finds_the_first_disagreement(tmp_path):
    d = write_dumps(tmp_path, {
        0: [entry(0), entry(1, op="all_gather", shape=(2,)), entry(2)],
        1: [entry(0), entry(1, op="psum", shape=(2,)), entry(2, op="ppermute")],
        2: [entry(0), entry(1, op="all_gather", shape=(2,)), entry(2)]})
    report = fr.analyze(fr.load(d))
    assert report.disagreement["seq"] == 1 and report.disagreement["odd"] == [1]
    text = str(report)
    assert "first disagreement at collective #1: rank 1 differs from the rest" in text
    assert "rank 1: psum(axes=('i',), shape=2, dtype=float32)" in text
    assert "rank 0: all_gather(axes=('i',), shape=2, dtype=float32)" in text


@pytest.mark.parametrize("field, value", [("shape", [5]), ("dtype", "float64"), ("axes", ["j"])])
def test_disagreement_in_shape_dtype_or_axes(tmp_path, field, value):
    odd = entry(0)
    odd[field] = value
    d = write_dumps(tmp_path, {0: [entry(0)], 1: [entry(0)], 2: [odd], 3: [entry(0)]})
    assert fr.analyze(fr.load(d)).disagreement["odd"] == [2]


def test_missing_ranks_and_two_way_ties(tmp_path):
    d = write_dumps(tmp_path, {0: [entry(0, op="psum")], 1: [entry(0, op="pmax")]}, world=3)
    report = fr.analyze(fr.load(d))
    assert report.missing == [2] and report.behind == [2]
    assert report.disagreement["odd"] == [0, 1]          # no majority: both named
    assert "rank 2: no dump (killed or stopped" in str(report)
    assert "behind: rank 2 (no dump; others reached #0)" in str(report)
    assert str(report).splitlines()[0].startswith("culprit: ranks 0, 1: collective #0 called")


TIMEOUT = "uncaught CollectiveTimeoutError: psum over axes ('i',) ... did not complete"


@pytest.mark.parametrize("case, culprit, first_line", [
    # rank 1 raised its own error; the others timed out waiting for it in psum #1
    ({0: ([0, 1], TIMEOUT), 1: ([0], "uncaught ValueError: bad batch"), 2: ([0, 1], TIMEOUT)},
     [1], "culprit: rank 1 failed: uncaught ValueError: bad batch; the others waited for it in "
          "collective #1 psum("),
    # rank 2 was SIGKILLed: no dump; the others were stopped in psum #1
    ({0: ([0, 1], "SIGTERM"), 1: ([0, 1], "SIGTERM")},
     [2], "culprit: rank 2 left no dump (killed, stopped or crashed); the others waited for it in "
          "collective #1 psum("),
    # rank 1 hung before psum #1 and was stopped by the launcher
    ({0: ([0, 1], TIMEOUT), 1: ([0], "SIGTERM"), 2: ([0, 1], TIMEOUT)},
     [1], "culprit: rank 1 never arrived (dumped: SIGTERM); the others waited for it in "
          "collective #1 psum("),
    # rank 0 returned early: the others failed in psum #1 when it left
    ({0: ([0], "exited"), 1: ([0, 1], TIMEOUT), 2: ([0, 1], TIMEOUT)},
     [0], "culprit: rank 0 left early (dumped: exited); the others waited for it in collective #1"),
    # rank 2 ran one collective more than the others, who had finished
    ({0: ([0], "exited"), 1: ([0], "exited"), 2: ([0, 1], TIMEOUT)},
     [2], "culprit: rank 2 ran collective #1 psum("),
    # nobody failed on its own: the job was stopped from outside
    ({0: ([0], "SIGTERM"), 1: ([0], "SIGTERM")}, [], "no culprit: every rank reached the same"),
])
def test_first_line_names_the_culprit_and_the_collective(tmp_path, case, culprit, first_line):
    d = write_dumps(tmp_path, {r: [entry(s) for s in seqs] for r, (seqs, _) in case.items()},
                    world=3 if len(case) < 3 and culprit == [2] else len(case),
                    reasons={r: why for r, (_, why) in case.items()})
    report = fr.analyze(fr.load(d))
    assert report.culprit == culprit
    assert str(report).splitlines()[0].startswith(first_line), str(report)


def test_dumps_of_an_earlier_attempt_are_left_out_and_partial_dumps_named(tmp_path):
    write_dumps(tmp_path, {0: [entry(0)], 1: [entry(0)], 2: [entry(0)]}, job="j1", attempt=0,
                time=100.0)
    write_dumps(tmp_path, {0: [entry(0), entry(1)], 1: [entry(0), entry(1)]}, world=3, job="j1",
                attempt=1, time=200.0)
    (tmp_path / "rank2.json.4242.tmp").write_text("{")
    dumps = fr.load(str(tmp_path))
    assert sorted(dumps) == [0, 1] and len(fr.load(str(tmp_path), all_attempts=True)) == 3
    report = fr.analyze(dumps, partial=fr.partial_dumps(str(tmp_path)))
    assert report.missing == [2] and report.partial == [2]
    assert report.lines()[0].startswith("culprit: rank 2 was killed while writing its")
    assert "rank 2: no dump (killed while writing it)" in str(report)


def test_chrome_trace(tmp_path):
    d = write_dumps(tmp_path, {0: [entry(0), entry(1, state="started")], 1: [entry(0)]})
    trace = fr.chrome_trace(fr.load(d))
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(events) == 3
    assert {e["pid"] for e in events} == {0, 1} and events[0]["tid"] == "i"
    assert events[0]["ts"] == 100.0 * 1e6 and events[0]["dur"] == pytest.approx(0.5e6)
    started = next(e for e in events if e["args"]["state"] == "started")
    assert started["dur"] == pytest.approx((200.0 - 101.0) * 1e6)   # open until the dump
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"]
    assert names == ["rank 0", "rank 1"]


def test_cli(tmp_path, capsys):
    d = write_dumps(tmp_path / "dumps" if (tmp_path / "dumps").mkdir() is None else None,
                    {0: [entry(0)], 1: [entry(0, op="all_to_all")], 2: [entry(0)]})
    out = tmp_path / "trace.json"
    assert fr.main([d, "--trace", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rank 1 differs" in text and f"trace: {out}" in text
    assert json.loads(out.read_text())["traceEvents"]
    assert fr.main([str(tmp_path / "nowhere")]) == 2


# ---------------------------------------------------------------------------------------------
# the collective frame every multi-process communicator (MPI, NCCL) runs its collectives in
# ---------------------------------------------------------------------------------------------

def test_collective_frame_records_completes_and_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("SPMD_FLIGHT_RECORDER_DIR", str(tmp_path))
    monkeypatch.delenv("SPMD_COLLECTIVE_TIMEOUT", raising=False)
    x = np.zeros((2, 3), np.float32)
    with CollectiveFrame("psum", ("i",), (0, 1), x, me=0) as frame:       # completes
        assert frame.entry["state"] == "started" and frame.timeout == 300
        assert frame.signature() == {"seq": frame.seq, "op": "psum", "axes": ["i"], "shape": [2, 3],
                                     "dtype": "float32", "ranks": [0, 1]}
        frame.check({0: frame.signature(), 1: frame.signature()})
    assert frame.entry["state"] == "completed" and frame.entry["nbytes"] == 24
    # a deadline: the wait gives up, the cleanup says why, the frame records and dumps
    with collective_timeout(0.05), pytest.raises(CollectiveTimeoutError) as err:
        with CollectiveFrame("all_gather", ("i",), (0, 1), x, me=0) as frame:
            frame.wait(lambda: False, on_timeout=lambda: "ranks [1] did not arrive")
    assert frame.entry["state"] == "timeout"
    assert re.search(r"all_gather over axes \('i',\) \(collective #\d+ of rank 0, shape \(2, 3\), "
                     r"group ranks \[0, 1\]\) did not complete within 0.05 s: ranks \[1\] did not "
                     r"arrive\. Flight recorder: .*rank0\.json", str(err.value))
    assert fr.load(str(tmp_path))[0]["entries"][-1]["state"] == "timeout"
    # another rank called something else
    with pytest.raises(CollectiveMismatchError, match="rank 1: #7 pmax"):
        with CollectiveFrame("psum", ("i",), (0, 1), x, me=0) as frame:
            frame.check({0: frame.signature(), 1: {**frame.signature(), "seq": 7, "op": "pmax"}})
    assert frame.entry["state"] == "mismatch"
    # any other error inside the frame: recorded as an error, dumped
    with pytest.raises(KeyError):
        with CollectiveFrame("ppermute", ("i",), (0, 1), x, me=0) as frame:
            raise KeyError("boom")
    assert frame.entry["state"] == "error"
    assert "KeyError in ppermute" in fr.load(str(tmp_path))[0]["reason"]
    # a peer that exited
    def gone():
        raise frame.exited([1])
    with pytest.raises(ProcessExitedError, match=r"rank\(s\) \[1\] exited"):
        with CollectiveFrame("psum", ("i",), (0, 1), x, me=0) as frame:
            frame.wait(lambda: False, on_timeout=lambda: "never", poll=gone)
    assert frame.entry["state"] == "error"
    # the check's setting
    monkeypatch.delenv("SPMD_COLLECTIVE_CHECK", raising=False)
    assert signature_check(True) and not signature_check(False)
    monkeypatch.setenv("SPMD_COLLECTIVE_CHECK", "0")
    assert not signature_check(True)
    monkeypatch.setenv("SPMD_COLLECTIVE_CHECK", "yes")
    with pytest.raises(SpmdError, match="SPMD_COLLECTIVE_CHECK='yes'"):
        signature_check(True)
