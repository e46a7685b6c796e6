"""The layering of ARCHITECTURE.md, checked: imports only point down (``lint-imports``), no two
``spmd`` modules import each other in a cycle (imports inside functions included), and the few
imports inside functions are there for an optional dependency, with the reason on the line."""
import ast
import collections
import os
import pkgutil
import re
import subprocess
import sys
import types

import pytest

import spmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "spmd")
MAX_IMPORTS_IN_FUNCTIONS = 10


def _modules() -> dict[str, str]:
    """{dotted name: path} of every module of the spmd package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _targets(module: str, path: str, node) -> list[str]:
    """The modules an import statement names (``from a import b``: ``a.b`` if it is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")
        if not path.endswith("__init__.py"):
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else prefix for a in node.names]


def _own_module(name: str) -> str | None:
    """The spmd module that importing ``name`` runs (``spmd.x.f`` -> ``spmd.x``), or None."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


Import = collections.namedtuple("Import", "module line targets in_function source")


def _imports() -> list[Import]:
    """Every import statement of spmd, with whether it sits inside a function."""
    out = []
    for module, path in sorted(MODULES.items()):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        lines = text.splitlines()

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    source = "\n".join(lines[child.lineno - 1:child.end_lineno])
                    out.append(Import(module, child.lineno, _targets(module, path, child), inside,
                                      source))
                visit(child, inside)
        visit(ast.parse(text, path), False)
    return out


IMPORTS = _imports()


def _graph() -> dict[str, dict[str, list[Import]]]:
    """{module: {spmd module it imports: the statements}}."""
    g = {m: collections.defaultdict(list) for m in MODULES}
    for imp in IMPORTS:
        for t in imp.targets:
            own = _own_module(t) if t.split(".")[0] == "spmd" else None
            if own is not None and own != imp.module:
                g[imp.module][own].append(imp)
    return g


def _cycles(g) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, without recursion)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    for start in sorted(g):
        if start in index:
            continue
        work = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _shortest_cycle(g, comp: list[str]) -> list[str]:
    """One shortest cycle through the first module of ``comp`` (breadth first)."""
    start, members = comp[0], set(comp)
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if w == start:
                    chain = [v]
                    while parent[chain[-1]] is not None:
                        chain.append(parent[chain[-1]])
                    return chain[::-1] + [start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_lint_imports():
    """The contracts of ``[tool.importlinter]`` in pyproject.toml hold (imports only point down)."""
    exe = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(exe):
        pytest.fail(f"{exe} is missing: install the test extra (pip install -e '.[test]').")
    r = subprocess.run([exe, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        pytest.fail(f"lint-imports failed (exit {r.returncode}):\n{r.stdout}{r.stderr}",
                    pytrace=False)


def test_no_import_cycles():
    """No two spmd modules import each other, directly or around a loop, even from inside a
    function (an import inside a function only hides a cycle until the function runs)."""
    g = _graph()
    cycles = _cycles(g)
    if not cycles:
        return
    report = []
    for comp in cycles:
        loop = _shortest_cycle(g, comp)
        steps = []
        for a, b in zip(loop, loop[1:]):
            imp = g[a][b][0]
            where = "inside a function" if imp.in_function else "at module level"
            at = f"{os.path.relpath(MODULES[a], ROOT)}:{imp.line}"
            steps.append(f"    {a} -> {b}   ({at}, {where})")
        report.append(f"  {len(comp)} modules import each other: {', '.join(comp)}\n"
                      f"  for example:\n" + "\n".join(steps))
    pytest.fail(f"{len(cycles)} import cycle(s) among spmd modules:\n" + "\n\n".join(report),
                pytrace=False)


def _reason(source: str) -> str:
    """The comment on an import statement's lines, without ``noqa`` markers."""
    comments = " ".join(line.split("#", 1)[1] for line in source.splitlines() if "#" in line)
    text = re.sub(r"noqa(:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*)?|type:\s*ignore(\[[^]]*\])?", "",
                  comments)
    return text.strip(" \t()") if re.search("[A-Za-z]", text) else ""


def test_imports_inside_functions_are_few_and_explained():
    """At most 10 imports sit inside functions, each for an optional dependency (cupy, mpi4py,
    IPython, ...) with its reason in a comment on the line; the rest belong at the top."""
    inside = [imp for imp in IMPORTS if imp.in_function]
    unexplained = [imp for imp in inside if not _reason(imp.source)]
    if len(inside) <= MAX_IMPORTS_IN_FUNCTIONS and not unexplained:
        return
    by_module = collections.Counter(imp.module for imp in inside)
    listing = "\n".join(f"  {os.path.relpath(MODULES[imp.module], ROOT)}:{imp.line}: "
                        f"{' '.join(imp.source.split())}"
                        f"{'' if _reason(imp.source) else '    <- no reason given'}"
                        for imp in inside)
    pytest.fail(f"{len(inside)} imports inside functions (at most {MAX_IMPORTS_IN_FUNCTIONS}), "
                f"{len(unexplained)} without a reason on the line; per module: "
                f"{dict(by_module.most_common())}\n{listing}", pytrace=False)


# JAX's functions of these names win over the modules of the same name (as in JAX)
_FUNCTIONS_OVER_MODULES = {"devices", "jit", "shard_map"}


def test_submodules_are_not_shadowed():
    """``spmd.<name>`` is the module ``spmd/<name>.py`` wherever both exist: a function exported
    under a module's name would hide the module (``spmd.collectives`` once did)."""
    shadowed = [m.name for m in pkgutil.iter_modules(spmd.__path__)
                if m.name not in _FUNCTIONS_OVER_MODULES and hasattr(spmd, m.name)
                and not isinstance(getattr(spmd, m.name), types.ModuleType)]
    assert not shadowed, f"spmd attributes that hide a submodule of the same name: {shadowed}"
    assert isinstance(spmd.collectives, types.ModuleType)
    assert spmd.collectives.psum is spmd.psum
