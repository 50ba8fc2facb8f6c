"""The notebooks are committed without outputs and run headless against a tiny-model dump."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from stage_data import tiny_dump  # noqa: F401 (fixture)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
STAGES_NOTEBOOK = NOTEBOOKS / "01_stages.ipynb"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cell"
    assert [cell.outputs for cell in code] == [[] for _ in code]
    assert [cell.execution_count for cell in code] == [None for _ in code]


def test_stages_notebook_reads_its_path_from_the_environment():
    first_code = next(cell for cell in nbformat.read(STAGES_NOTEBOOK, as_version=4).cells if cell.cell_type == "code")
    assert 'os.environ.get("DYVTE_STATS", "../runs/demo")' in first_code.source


def test_stages_notebook_executes_headless(tiny_dump, monkeypatch):
    monkeypatch.setenv("DYVTE_STATS", str(tiny_dump))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(STAGES_NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "3 samples, 6 layers" in text and "stages of 3 samples" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # stage plot, heads heatmap, boundaries, entropy
