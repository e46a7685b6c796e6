"""The examples in spmd's docstrings run and print what they show (one test per module).

A module is skipped only when its examples need an optional package that is not installed
(CuPy, mpi4py); every other module runs, and one that fails to import fails its test."""
import doctest
import importlib
import importlib.util
import io
import pkgutil

import pytest

import spmd

MODULES = sorted(["spmd"] + [m.name for m in pkgutil.walk_packages(spmd.__path__, "spmd.")])
OPTIONAL = ("cupy", "mpi4py")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _missing(name: str) -> bool:
    return importlib.util.find_spec(name) is None


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {e.name}, which is not installed")
        raise
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    needs = sorted({m for m in OPTIONAL for t in tests for ex in t.examples if m in ex.source})
    if any(_missing(m) for m in needs):
        pytest.skip(f"the examples of {name} need {', '.join(needs)}, not installed")
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    for t in tests:
        runner.run(t, out=report.write)
    if runner.failures:
        pytest.fail(f"{runner.failures} of {runner.tries} docstring examples of {name} failed:\n"
                    f"{report.getvalue()}", pytrace=False)
