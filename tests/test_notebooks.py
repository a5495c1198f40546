"""Every notebook under notebooks/ runs from top to bottom, in a fresh kernel, without an error or
a warning.

The kernel is a separate process: the settings of conftest.py (float64, strict dtype promotion,
warnings as errors) do not reach it, so the notebooks are checked as a reader runs them. A cell
put in front of each notebook shows every warning in the kernel, and a notebook fails on any
output to stderr, which is where they go. (It does not make them errors: that would also raise in
ipykernel's own shutdown handler, which warns about itself.) The cell also prints the kernel's
interpreter, which must be this one: jupyter_client starts the ``python3`` kernel spec with
``sys.executable``, so the notebook sees the packages of the environment under test."""

import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

_PRELUDE = """\
import sys
import warnings

warnings.simplefilter("default")
print(sys.executable)
"""


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_executes(path):
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(_PRELUDE))
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first cell that raises
    assert notebook.cells[0].outputs[0]["text"].strip() == sys.executable
    stderr = [
        output["text"]
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("name") == "stderr"
    ]
    assert not stderr, f"{path.name} wrote to stderr:\n" + "".join(stderr)
