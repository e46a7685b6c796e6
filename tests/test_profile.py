"""``spmd.profile``: one row per executed step naming the primitive, the user's line and the
bytes; times that add up; a trace Perfetto opens; nothing recorded while it is off; the same
values as unprofiled runs, on the stacked and the reference executors."""
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import spmd
from spmd import flight_recorder
from spmd.executors import StackedExecutor, profiling, reference_executor

MESH = spmd.make_mesh((8,), ("i",))
P = spmd.P
EXECUTORS = {"stacked": StackedExecutor(), "reference": reference_executor()}
HERE = os.path.abspath(__file__)


def step(x, w):
    y = x @ w
    t = np.tanh(y)
    return spmd.shard_map(lambda a: spmd.psum(a, "i"), mesh=MESH, in_specs=P("i"), out_specs=P())(t)


def line_of(fn, text: str) -> int:
    """The line of this file where ``fn``'s source has ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


def args():
    rng = np.random.default_rng(0)
    return rng.standard_normal((64, 32), np.float32), rng.standard_normal((32, 16), np.float32)


def profiled(f, *a):
    """``f(*a)`` unprofiled (which also compiles), then profiled: both results, the profile."""
    want = f(*a)
    with spmd.profile() as prof:
        got = f(*a)
    return want, got, prof


def track_names(trace) -> dict:
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}


def sources(row):
    return [(os.path.abspath(code.co_filename), line) for code, line in row.step.sources]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_rows_name_the_primitive_the_line_and_the_bytes(executor):
    x, w = args()
    want, got, prof = profiled(spmd.jit(step, executor=EXECUTORS[executor]), x, w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    rows = {r.op: r for r in prof.rows()}
    assert sorted(rows) == ["dot_general", "psum", "shard_map", "tanh"]
    at = {op: [(HERE, line_of(step, text))]
          for op, text in (("dot_general", "x @ w"), ("tanh", "np.tanh"), ("psum", "spmd.psum"),
                           ("shard_map", "spmd.psum"))}
    for op, row in rows.items():
        assert sources(row) == at[op], op
        assert row.source.startswith(f"test_profile.py:{at[op][0][1]} ")
        assert row.calls == 1 and row.total_s >= row.self_s > 0
    y = x @ w
    out = np.asarray(got)
    dot = rows["dot_general"]
    assert (dot.bytes_in, dot.bytes_out) == (x.nbytes + w.nbytes, y.nbytes)
    assert (rows["tanh"].bytes_in, rows["tanh"].bytes_out) == (y.nbytes, y.nbytes)
    assert (rows["shard_map"].bytes_in, rows["shard_map"].bytes_out) == (y.nbytes, out.nbytes)
    assert (rows["psum"].bytes_in, rows["psum"].bytes_out) == (y.nbytes // 8, out.nbytes)
    assert [r.op for r in prof.rows() if r.collective] == ["psum"]
    assert {op: r.depth for op, r in rows.items()} == {"dot_general": 0, "tanh": 0, "shard_map": 0,
                                                        "psum": 1}
    # the region's time is its own (splitting and joining blocks) plus its body's
    region = rows["shard_map"]
    assert region.total_s == pytest.approx(region.self_s + rows["psum"].total_s, rel=0, abs=1e-12)
    assert sum(r.self_s for r in prof.rows()) <= prof.wall_s
    table = prof.table()
    for op, [(_, line)] in at.items():
        assert op in table and f"test_profile.py:{line}" in table


@pytest.mark.parametrize("executor", EXECUTORS)
def test_trace_has_an_event_per_step_and_collectives_on_their_own_track(executor, tmp_path):
    x, w = args()
    _, _, prof = profiled(spmd.jit(step, executor=EXECUTORS[executor]), x, w)
    with open(prof.save_trace(str(tmp_path / "trace.json"))) as f:
        trace = json.load(f)
    tracks = track_names(trace)
    steps = [e for e in trace["traceEvents"] if e["ph"] == "X" and e.get("cat") != "flight recorder"
             and e["name"] != "profile"]
    assert sorted(e["name"] for e in steps) == ["dot_general", "psum", "shard_map", "tanh"]
    assert len(steps) == len(prof.events)
    assert {tracks[e["tid"]] for e in steps if e["name"] == "psum"} == {"collectives"}
    assert {tracks[e["tid"]] for e in steps if e["name"] != "psum"} == {"executor"}
    wall_us = prof.wall_s * 1e6
    for e in steps:
        assert 0 <= e["ts"] and e["ts"] + e["dur"] <= wall_us + 1e-3 and e["dur"] > 0
        assert e["args"]["source"] and e["args"]["source"][0].startswith(HERE)
    dot = next(e for e in steps if e["name"] == "dot_general")
    assert dot["args"]["bytes_out"] == (x @ w).nbytes


def test_flight_recorder_collectives_get_their_own_track(tmp_path):
    """The collectives a multi-process communicator records (here written to the recorder as
    its frame does) show in the window they ran in, not before it."""
    rec = flight_recorder.recorder()
    rec.finish(rec.start("all_reduce", ("i",), (0, 1), (4,), "float32", 16))   # before
    with spmd.profile() as prof:
        entry = rec.start("all_gather", ("i",), (0, 1), (8, 2), "float32", 64)
        rec.finish(entry)
    assert [e["op"] for e in prof.collectives] == ["all_gather"]
    trace = prof.trace()
    tracks = track_names(trace)
    [event] = [e for e in trace["traceEvents"] if e.get("cat") == "flight recorder"]
    assert tracks[event["tid"]] == "flight recorder"
    assert event["name"] == "all_gather" and event["args"]["nbytes"] == 64
    assert 0 <= event["ts"] <= prof.wall_s * 1e6


def test_nothing_is_recorded_when_off(monkeypatch):
    """Off, the executors never reach the timing code."""
    x, w = args()
    for executor in EXECUTORS.values():
        f = spmd.jit(step, executor=executor)
        want, _, prof = profiled(f, x, w)
        assert profiling.active is None
        seen = len(prof.events)

        def refuse(*a, **k):
            raise AssertionError("timed while profiling is off")
        monkeypatch.setattr(profiling, "timed", refuse)
        np.testing.assert_array_equal(np.asarray(f(x, w)), np.asarray(want))
        monkeypatch.undo()
        assert len(prof.events) == seen


def test_nested_profiles():
    x, w = args()
    f = spmd.jit(step)
    f(x, w)
    with spmd.profile() as outer:
        f(x, w)
        with spmd.profile() as inner:
            f(x, w)
        assert profiling.active is not None
    assert profiling.active is None
    assert len(outer.events) == 2 * len(inner.events) == 8
    assert all(r.calls == 2 for r in outer.rows()) and all(r.calls == 1 for r in inner.rows())


def scaled_tanh(x):
    return np.tanh(x * 2.0 + 1.0)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_compiled_step_rows_are_per_device_and_fused_on_the_stacked_executor(executor):
    x = np.linspace(-1, 1, 64 * 16, dtype=np.float32).reshape(64, 16)
    sh = spmd.NamedSharding(MESH, P("i"))
    f = spmd.jit(scaled_tanh, in_shardings=sh, out_shardings=sh, executor=EXECUTORS[executor])
    want, got, prof = profiled(f, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.asarray(got), np.tanh(x * 2 + 1), rtol=1e-6)
    body = [r for r in prof.rows() if r.depth == 1]
    block = x.nbytes // 8
    line = line_of(scaled_tanh, "np.tanh")
    if executor == "stacked":               # one step: the chain runs block by block
        assert [r.op for r in body] == ["fused(mul·add·tanh)"]
        assert body[0].bytes_out == block
    else:
        assert sorted(r.op for r in body) == ["add", "mul", "tanh"]
        assert all(r.bytes_out == block for r in body)
    assert all(sources(r) == [(HERE, line)] for r in body)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_loop_is_one_row_with_its_body_one_level_deeper(executor, native, monkeypatch):
    monkeypatch.setenv("SPMD_NATIVE", "1" if native else "0")

    def loop(c, xs):            # sin of the carry: each step needs the one before
        return spmd.lax.scan(lambda c, x: (np.sin(c) + x, None), c, xs)[0]
    xs = np.arange(12, dtype=np.float32).reshape(6, 2)
    f = spmd.jit(loop, executor=EXECUTORS[executor])
    want, got, prof = profiled(f, np.zeros(2, np.float32), xs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    c = np.zeros(2, np.float32)
    for x in xs:
        c = np.sin(c) + x
    np.testing.assert_allclose(np.asarray(got), c, rtol=1e-6)
    rows = {r.op: r for r in prof.rows()}
    assert rows["scan"].depth == 0 and rows["scan"].calls == 1
    if native:                  # the steps: one call of native code
        assert rows["native(sin·add)"].depth == 1 and rows["native(sin·add)"].calls == 1
        assert "sin" not in rows
    else:
        assert rows["sin"].depth == 1 and rows["sin"].calls == len(xs)
    assert rows["scan"].total_s >= sum(r.total_s for r in prof.rows() if r.depth == 1)


def test_spmd_profile_setting_writes_the_trace_at_exit(tmp_path):
    path = tmp_path / "whole.json"
    code = ("import numpy as np, spmd\n"
            "f = spmd.jit(lambda x: np.tanh(x) * 2)\n"
            "f(np.ones(4, np.float32)); f(np.ones(4, np.float32))\n")
    env = dict(os.environ, SPMD_PROFILE=str(path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "spmd.profile:" in done.stderr and str(path) in done.stderr
    with open(path) as f:
        names = [e["name"] for e in json.load(f)["traceEvents"] if e.get("cat") == "step"]
    assert names == ["fused(tanh·mul)"] * 2          # the chain outside shard_map runs fused
