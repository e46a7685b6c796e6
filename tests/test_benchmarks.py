"""The benchmark runner: registry, timer, and ``python -m benchmarks --quick`` end to end."""
import json
import subprocess
import sys

import pytest

from benchmarks._harness import REGISTRY, Row, benchmark, memcopy_seconds, timeit
from conftest import ROOT


def test_quick_run_writes_rows_with_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "device_put"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "device_put" in proc.stdout and "ratio" in proc.stdout
    report = json.loads(out.read_text())
    assert report["meta"]["quick"] is True
    rows = report["rows"]
    assert all(set(r) >= {"benchmark", "case", "spmd_s", "peer", "peer_s", "ratio", "extra"} for r in rows)
    measured = [r for r in rows if r["peer"] == "jax"]
    assert len(measured) == 4  # device_put and device_put + gather, on two layouts
    for r in measured:
        assert r["spmd_s"] > 0 and r["peer_s"] > 0
        assert r["ratio"] == pytest.approx(r["spmd_s"] / r["peer_s"])
    baseline = next(r for r in rows if r["case"].startswith("memcopy"))
    assert baseline["peer_s"] > 0 and baseline["extra"]["GB/s"] > 0


def test_unknown_benchmark_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "no_such_benchmark"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no_such_benchmark" in proc.stderr and "device_put" in proc.stderr


def test_row_ratio_and_skip():
    assert Row("b", "c", 2.0, "jax", 4.0).ratio == 0.5
    assert Row("b", "c", None, "jax", 4.0).ratio is None
    assert Row("b", "c", 1.0, "jax", None).as_dict()["ratio"] is None


def test_timeit_and_memcopy():
    calls = []
    t = timeit(lambda: calls.append(1), repeat=3, min_time=0.001)
    assert t > 0 and len(calls) >= 5  # warm-up, calibration, then at least one loop per repeat
    assert memcopy_seconds(1 << 16) > 0


def test_registry_rejects_duplicate_names():
    @benchmark("_test_only")
    def first(quick):
        return []
    try:
        with pytest.raises(ValueError, match="_test_only"):
            benchmark("_test_only")(lambda quick: [])
    finally:
        del REGISTRY["_test_only"]
