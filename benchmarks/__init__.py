"""Benchmarks: ``spmd`` side by side with its peer (JAX), run as ``python -m benchmarks``.

Add a module ``benchmarks/bench_<topic>.py`` with functions decorated ``@benchmark("name")``;
see ``benchmarks/_harness.py``.
"""
