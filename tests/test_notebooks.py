"""The notebooks in notebooks/ run top to bottom (with small settings) and stay clean.

Each notebook is one test case, executed by nbclient in a fresh kernel of *this* Python (a
kernelspec pointing at ``sys.executable`` is put first on ``JUPYTER_PATH``) with
``MARGINALIZE_SMOKE=1``, which every notebook reads to shrink steps, draws and data.
Set ``MARGINALIZE_NOTEBOOK_TIMEOUT`` (seconds per cell, default 300) to change the timeout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SMOKE_FLAG = 'SMOKE = os.environ.get("MARGINALIZE_SMOKE") == "1"'
CELL_TIMEOUT = int(os.environ.get("MARGINALIZE_NOTEBOOK_TIMEOUT", "300"))


def _read_module(name: str):
    return pytest.importorskip(name)


def _read(path: Path):
    return _read_module("nbformat").read(path, as_version=4)


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory) -> Path:
    """A ``python3`` kernelspec that launches this interpreter (the project's venv)."""
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps(
            {"argv": argv, "display_name": "Python 3 (marginalize tests)", "language": "python"}
        )
    )
    return root


def test_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names[:6] == [
        "01_quickstart",
        "02_regression",
        "03_classification_ood",
        "04_priors_over_functions",
        "05_model_averaging",
        "06_active_learning",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean(path):
    """Committed without outputs, on the python3 kernel, reading the smoke flag."""
    nb = _read(path)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and SMOKE_FLAG in code[0].source, "the first code cell must set SMOKE"
    dirty = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count)
    ]
    assert not dirty, f"cells {dirty} have outputs; clear them before committing"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 4, (
        "notebooks should explain themselves"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv(
        "JUPYTER_PATH",
        os.pathsep.join([str(kernel_path), *filter(None, [os.environ.get("JUPYTER_PATH")])]),
    )
    monkeypatch.setenv("MARGINALIZE_SMOKE", "1")
    # one thread per kernel: on a shared 2-core machine more threads only oversubscribe it
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("MARGINALIZE_TEST_THREADS", "1"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the kernel use its inline backend
    nb = _read(path)
    nb.cells.append(_read_module("nbformat").v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable, "ran on another Python"
