"""``python -m benchmarks [--quick] [--gpu] [--out FILE.json] [names...]``

Imports every ``benchmarks/bench_*.py``, runs the selected benchmarks (all CPU ones by
default; ``--gpu`` runs those registered with ``gpu=True``), prints a table and writes JSON.
Exits non-zero if a benchmark raised.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
import traceback

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from ._harness import REGISTRY, Row  # noqa: E402


def _import_all() -> list[Row]:
    """Import every bench_* module; one that fails to import becomes an error row."""
    failures = []
    package = os.path.dirname(__file__)
    for info in pkgutil.iter_modules([package]):
        if info.name.startswith("bench_"):
            try:
                importlib.import_module(f"{__package__}.{info.name}")
            except Exception as e:  # a broken module must not hide the others' results
                failures.append(Row(info.name, "import", None, "-", None, {"error": f"{type(e).__name__}: {e}"}))
    return failures


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _print_table(rows: list[Row]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    table = Table(title="spmd vs peer (time per call; ratio < 1: spmd is faster)")
    for col, justify in (("benchmark", "left"), ("case", "left"), ("spmd", "right"), ("peer", "left"),
                         ("peer time", "right"), ("ratio", "right"), ("extra", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3g}"
        extra = ", ".join(f"{k}={v}" for k, v in r.extra.items())
        table.add_row(*map(escape, (r.benchmark, r.case, _fmt_time(r.spmd_s), r.peer,
                                    _fmt_time(r.peer_s), ratio, extra)))  # "[cuda12]" is not markup
    console = Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
        console = Console(width=180)
    console.print(table)


def _meta(quick: bool) -> dict:
    meta = {"quick": quick, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count()}
    for lib in ("numpy", "jax", "spmd"):
        try:
            meta[lib] = importlib.import_module(lib).__version__
        except ImportError:
            meta[lib] = None
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[2])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (for CI)")
    parser.add_argument("--gpu", action="store_true", help="run the GPU benchmarks")
    parser.add_argument("--out", help="write the rows as JSON to this file")
    args = parser.parse_args(argv)

    rows = _import_all()
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(sorted(REGISTRY))}")
    selected = [REGISTRY[n] for n in args.names] if args.names else \
        [b for b in REGISTRY.values() if b.gpu == args.gpu]
    for bench in selected:
        try:
            rows += bench.fn(args.quick)
        except Exception as e:
            traceback.print_exc()
            rows.append(Row(bench.name, "run", None, "-", None, {"error": f"{type(e).__name__}: {e}"}))
    if not selected:
        print(f"no {'GPU' if args.gpu else 'CPU'} benchmarks registered")
    _print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": _meta(args.quick), "rows": [r.as_dict() for r in rows]}, f, indent=1)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 1 if any("error" in r.extra for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
