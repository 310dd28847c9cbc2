"""The example notebooks run from top to bottom (executed here, so they cannot rot); stored without outputs."""
import json
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="the notebooks extra: pip install -e '.[notebooks]'")
import nbformat  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "custom_learner"])
def test_the_example_notebook_runs(name):
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the figures were drawn


def test_notebooks_are_stored_without_outputs():
    for path in EXAMPLES.glob("*.ipynb"):
        cells = json.loads(path.read_text())["cells"]
        assert all(not cell.get("outputs") and not cell.get("execution_count") for cell in cells
                   if cell["cell_type"] == "code"), path.name
