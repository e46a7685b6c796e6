"""Every example runs: notebooks through a Jupyter kernel of this interpreter, scripts as processes."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.ipynb")))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))


@pytest.fixture
def this_interpreter_kernel(tmp_path, monkeypatch):
    """A ``python3`` kernel spec that runs ``sys.executable``, found before any other."""
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (spmd tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, this_interpreter_kernel):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=this_interpreter_kernel, timeout=120,
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if os.path.basename(path) == "quickstart.ipynb":
        html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
        assert any("spmd-layout" in h and "CPU 7" in h for h in html)  # layouts drawn as HTML
    if os.path.basename(path) == "parallelism.ipynb":
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        checks = re.findall(r"(equals? [^:\n]*|gradients equal): (\w+)", text)
        assert len(checks) == 7 and all(ok == "True" for _, ok in checks), checks
        assert "parameter bytes per device: 544 (data parallel: 4352)" in text   # 1/8
        assert any("image/png" in o.get("data", {}) for o in outputs)          # the schedules


def test_examples_found():
    assert any(p.endswith("quickstart.ipynb") for p in NOTEBOOKS)
    assert any(p.endswith("quickstart.py") for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_script_runs(path):
    proc = subprocess.run([sys.executable, path], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if os.path.basename(path) == "quickstart.py":
        assert "CPU 0,1,2,3" in proc.stdout and "np.asarray(...) == x: True" in proc.stdout


def test_readme_snippets_run(capsys):
    with open(os.path.join(ROOT, "README.md")) as f:
        snippets = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert snippets
    for code in snippets:
        exec(compile(code, "README.md", "exec"), {})
    assert "CPU 5" in capsys.readouterr().out
